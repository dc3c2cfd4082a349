"""Command line: ``zaizai prepare | train | sample | chat | demo | eval | report | attention | compare | serve``. Thin: parse flags, call the library, print."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from . import __version__
from .common.errors import ZaizaiError

# Help for the flags generated from the config dataclasses (one flag per field).
FIELD_HELP = {
    "model": "bigram | rnn | gpt",
    "block_size": "context length in tokens",
    "n_layer": "transformer blocks (gpt) or GRU layers (rnn)",
    "n_head": "attention heads (gpt)",
    "n_embd": "embedding width",
    "dropout": "dropout probability",
    "bias": "biases in Linear/LayerNorm",
    "preset": "named defaults: cpu (default), tiny, demo, nanogpt-cpu, small, gpt2",
    "batch_size": "sequences per micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "max_iters": "stop after this many optimizer steps",
    "max_time": "stop after this many seconds (the lr schedule fits the budget)",
    "lr": "peak learning rate",
    "min_lr": "final learning rate of the cosine decay; negative = lr/10",
    "warmup_iters": "linear warmup steps",
    "weight_decay": "AdamW weight decay on 2-D weights",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm (0 = off)",
    "eval_interval": "steps between evaluations and `last` checkpoints (default: about 20 over the run)",
    "eval_iters": "batches per loss estimate",
    "device": "auto | cpu | cuda | mps",
    "dtype": "auto | float32 | bfloat16 | float16",
    "compile": "torch.compile the model",
    "threads": "CPU threads (0 = PyTorch's choice)",
    "seed": "random seed",
    "resume": "continue the run saved in --out",
    "overwrite": "start over even if --out already holds a model",
    "loss_on": "dialogue data: learn the assistant turns only (assistant) or every turn (all)",
    "init_from": "start from the weights of this trained model folder (pretrain -> fine-tune)",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from .training.config import PRESETS, TrainConfig
    from .models.config import ModelConfig

    default_preset = PRESETS[TrainConfig.preset]

    for cls, skip in ((ModelConfig, {"vocab_size"}), (TrainConfig, {"data_dir", "out_dir"})):
        group = parser.add_argument_group(f"{cls.__name__} options")
        for f in fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = type(f.default)
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                   help=FIELD_HELP.get(f.name))
            else:
                default = default_preset.get(f.name, f.default)
                shown = "lr/10" if f.name == "min_lr" and default < 0 else repr(default)
                group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                                   help=f"{FIELD_HELP.get(f.name, '')} (default {shown})")


def _add_sampling_flags(parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float, top_p: float,
                        repetition_penalty: float) -> None:
    """The decoding flags `sample` and `chat` share (with their own defaults), plus checkpoint and device."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help=f"tokens to generate at most (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=temperature, metavar="T",
                        help=f"0 = greedy (default {temperature:g})")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default 0)")
    parser.add_argument("--top-p", type=float, default=top_p, metavar="P", help=f"1 = off (default {top_p:g})")
    parser.add_argument("--repetition-penalty", type=float, default=repetition_penalty, metavar="X",
                        help=f"1 = off (default {repetition_penalty:g})")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N", help="0 = off (default 0)")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same text (default: none)")
    parser.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"],
                        help="auto (default): best if there is one, else last")
    parser.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | mps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zaizai", description="崽崽 zaizai: train a GPT-2-style model on your own "
                                "Chinese text, then talk to it.")
    p.add_argument("--version", action="version", version=f"zaizai {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_data_commands(sub)
    _add_generation_commands(sub)
    _add_evaluation_commands(sub)
    _add_interop_commands(sub)
    return p


def _add_data_commands(sub) -> None:
    """prepare, train, demo: from text to a trained model."""
    pp = sub.add_parser("prepare", help="准备数据：文本 → 词表 + 训练/验证 token 文件 · "
        "text file(s) -> tokenizer + train/val token bins")
    pp.add_argument("corpus", nargs="+", help="text files or folders of .txt files")
    pp.add_argument("--out", required=True, help="data folder to write")
    pp.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out (default 0.1)")
    pp.add_argument("--seed", type=int, default=1337, help="seed of the train/val split")
    pp.add_argument("--encoding", default="utf-8", help="text encoding of the files (e.g. gbk)")
    pp.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"],
                    help="bytes that do not decode: strict (default: stop and say where), replace (with U+FFFD) "
                         "or ignore (drop them); replace/ignore count them in the summary")
    pp.add_argument("--format", default="auto", choices=["auto", "plain", "text", "jsonl", "lccc"],
                    help="plain text, or dialogues: text (one turn per line, a blank line between dialogues), "
                         "jsonl (OpenAI messages), lccc (JSON lists of utterances); auto: by file extension")
    pp.add_argument("--tokenizer", default="char", metavar="char|bpe|PATH",
                    help="char (default: one token per character), bpe (byte-level BPE of --vocab-size tokens, "
                         "for plain text and dialogues), or a tokenizer.json / data or model folder to reuse, e.g. "
                         "to fine-tune that model (an existing file or folder wins over the names)")
    pp.add_argument("--vocab-size", type=int, default=8000, help="tokens of a new bpe tokenizer (default 8000)")
    pp.add_argument("--skip-bad", action="store_true", help="skip malformed dialogues (and count them)")

    tp = sub.add_parser("train", help="训练 · train a model on a prepared data folder")
    tp.add_argument("data_dir", nargs="?", help="folder written by `zaizai prepare` (optional with --resume)")
    tp.add_argument("--out", dest="out_dir", default=None, help="output folder (default out)")
    tp.add_argument("--config", dest="config_file", default=None, help="TOML or JSON file of options")
    _add_config_flags(tp)


    dp = sub.add_parser("demo", help="演示：在内置语料上训练一个小对话模型并聊几句 · "
        "train a small chat model on the built-in corpus and show it")
    dp.add_argument("--out", default="demo", help="folder for the demo corpus, data and model (default demo)")
    dp.add_argument("--max-time", type=float, default=60.0, help="training budget in seconds (default 60)")
    dp.add_argument("--retrain", action="store_true", help="train again even if the demo model exists")


def _add_generation_commands(sub) -> None:
    """sample, chat, serve: a trained model talks."""
    sp = sub.add_parser("sample", help="续写 · generate text from a trained model, streamed")
    sp.add_argument("out_dir", help="folder written by `zaizai train`")
    sp.add_argument("--prompt", default="", help="text to continue")
    _add_sampling_flags(sp, max_new_tokens=200, temperature=0.8, top_p=1.0, repetition_penalty=1.0)
    sp.add_argument("--stop", action="append", default=None, help="stop when this text appears (repeatable)")

    cp = sub.add_parser("chat", help="聊天 · talk with a trained model in the terminal (or answer --message / stdin)")
    cp.add_argument("out_dir", help="folder written by `zaizai train`")
    cp.add_argument("--message", "-m", action="append", default=None,
                    help="say this and print the reply (repeat for several turns); no interactive prompt")
    cp.add_argument("--system", default=None, help="a system message that starts the conversation")
    cp.add_argument("--history", type=int, default=None, metavar="N",
                    help="earlier exchanges to feed the model, 0 = none (default: as many as its training "
                         "dialogues had before their last: none for one-question-one-answer data; all if unknown)")
    _add_sampling_flags(cp, max_new_tokens=100, temperature=0.7, top_p=0.9, repetition_penalty=1.1)


    vp = sub.add_parser("serve", help="网页聊天 + OpenAI 兼容接口 · "
        "an OpenAI-compatible HTTP API and a chat page in the browser")
    vp.add_argument("out_dir", help="folder written by `zaizai train`")
    vp.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    vp.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    vp.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 calls "
                    "(default: the ZAIZAI_API_KEY environment variable, else none)")
    vp.add_argument("--max-tokens", type=int, default=4096, help="the largest max_tokens a request may ask (<= 4096)")
    vp.add_argument("--max-active", type=int, default=4, help="generations run interleaved at once (default 4)")
    vp.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond those; more get 429 (default 64)")
    vp.add_argument("--history", type=int, default=None, metavar="N",
                    help="earlier exchanges a chat prompt keeps "
                         "(default: as many as the model's training dialogues had)")
    vp.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"])
    vp.add_argument("--device", default="auto")


def _add_evaluation_commands(sub) -> None:
    """eval, report, attention, compare: how good is it, and what does it look at."""
    ep = sub.add_parser("eval", help="评估 · "
        "loss, perplexity, bits per char/byte on the whole val split (+ dialogue metrics)")
    ep.add_argument("out_dir", help="folder written by `zaizai train`")
    ep.add_argument("--data", default=None, help="prepared data folder (default: the one the model was trained on)")
    ep.add_argument("--max-pairs", type=int, default=200, help="held-out dialogue pairs to score (default 200)")
    ep.add_argument("--seed", type=int, default=0, help="seed of the pair choice and of sampled replies")
    ep.add_argument("--no-dialogue", action="store_true", help="skip the reply metrics (BLEU, distinct-n)")
    ep.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"])
    ep.add_argument("--device", default="auto")

    rp = sub.add_parser("report", help="模型报告 · "
        "write report.md: a model card with config, data, losses, metrics, samples")
    rp.add_argument("out_dir", help="folder written by `zaizai train`")
    rp.add_argument("--data", default=None, help="prepared data folder (default: the one the model was trained on)")
    rp.add_argument("--max-pairs", type=int, default=200, help="held-out dialogue pairs to score (default 200)")
    rp.add_argument("--reevaluate", action="store_true", help="evaluate again even if eval.json exists")
    rp.add_argument("--device", default="auto")

    ap = sub.add_parser("attention", help="注意力图 · draw the attention weights (layers x heads) of a gpt over a text")
    ap.add_argument("out_dir", help="folder written by `zaizai train`")
    ap.add_argument("--text", required=True, help="the text to look at, e.g. 你好，我是崽崽")
    ap.add_argument("--png", default=None, help="picture to write (default OUT_DIR/attention.png)")
    ap.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"])

    mp = sub.add_parser("compare", help="比较 bigram / rnn / gpt · "
        "train bigram, rnn and gpt for the same time and compare them")
    mp.add_argument("data_dir", help="folder written by `zaizai prepare`")
    mp.add_argument("--max-time", type=float, default=120.0, help="seconds of training per model (default 120)")
    mp.add_argument("--out", default="compare", help="folder for compare-<model>/ runs and the plot (default compare)")
    mp.add_argument("--models", default="bigram,rnn,gpt", help="comma-separated (default bigram,rnn,gpt)")
    mp.add_argument("--threads", type=int, default=None, help="CPU threads (0 = PyTorch's choice)")
    mp.add_argument("--device", default=None, help="auto | cpu | cuda | mps")


def _add_interop_commands(sub) -> None:
    """export, import-hf: models to and from other tools."""
    xp = sub.add_parser("export", help="导出 · "
        "write a gpt for other tools: a Hugging Face folder or a GGUF file (llama.cpp)")
    xp.add_argument("out_dir", help="folder written by `zaizai train` (or `zaizai import-hf`)")
    xp.add_argument("--format", required=True, choices=["hf", "gguf"],
                    help="hf: a transformers GPT2LMHeadModel folder; gguf: one file for llama.cpp / ollama")
    xp.add_argument("--to", required=True, help="folder (hf) or file (gguf) to write")
    xp.add_argument("--dtype", default="f16", choices=["f16", "f32"], help="gguf weights (default f16)")
    xp.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --to folder (hf)")

    ip = sub.add_parser("import-hf", help="导入 · a local Hugging Face GPT-2 folder -> a zaizai model folder")
    ip.add_argument("hf_dir", help="folder with config.json, model.safetensors and the tokenizer files")
    ip.add_argument("--out", required=True, help="zaizai model folder to write")
    ip.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")


def starting_note(stream=None) -> None:
    """Say something at once on a terminal: importing PyTorch takes seconds on a laptop, and a silent terminal
    looks hung. (Not when the output goes to a file or a script: it would only be noise there.)"""
    stream = stream or sys.stderr
    if stream.isatty():
        print("zaizai: 启动中 starting (loading PyTorch) …", file=stream, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    starting_note()
    try:
        return COMMANDS[args.command](args) or 0
    except ZaizaiError as e:
        print(f"zaizai: 错误 error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nzaizai: 已中断 interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `zaizai sample ... | head`
        return 0


def cmd_prepare(args) -> int:
    from .data.preparation import prepare

    prepare(args.corpus, args.out, val_fraction=args.val_fraction, seed=args.seed, encoding=args.encoding,
            errors=args.errors, format=args.format, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            skip_bad=args.skip_bad)
    return 0


def cmd_train(args) -> int:
    from .training.loop import train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "data_dir", "out_dir", "config_file")}
    result = train(args.data_dir, args.out_dir, config_file=args.config_file, **options)
    return 130 if result.stopped_by == "interrupt" else 0


def cmd_sample(args) -> int:
    from .inference.loaded import load

    bot = load(args.out_dir, which=args.checkpoint, device=args.device)
    unknown = bot.unknown_chars(args.prompt)
    if unknown:
        print(f"注意 note: {len(unknown)} prompt character(s) not in the vocabulary: {''.join(unknown[:20])}",
              file=sys.stderr)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    for piece in bot.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            no_repeat_ngram_size=args.no_repeat_ngram_size, stop=args.stop, seed=args.seed):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def cmd_chat(args) -> int:
    from .inference.chat import ChatSession
    from .inference.loaded import load
    from .inference.sampling import SamplingConfig
    from .terminal import chat_from_lines, chat_in_terminal

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size, seed=args.seed)
    sampling.validate()
    bot = load(args.out_dir, which=args.checkpoint, device=args.device)
    session = ChatSession(bot, system=args.system, sampling=sampling, keep_history=args.history)
    if session.history_note():
        print(session.history_note(), file=sys.stderr)
    if not session.is_chat_model:
        print("注意 note: this model was not trained on dialogues: it continues what you type (completion mode); "
              "fine-tune it on dialogues with `zaizai train DATA --init-from MODEL`", file=sys.stderr)
    if args.message:
        return chat_from_lines(session, args.message)
    if not sys.stdin.isatty():  # scripted: one message per line on stdin, one reply per line on stdout
        return chat_from_lines(session, sys.stdin)
    return chat_in_terminal(session)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, max_time=args.max_time, retrain=args.retrain)


def cmd_eval(args) -> int:
    from .evals.evaluation import evaluate

    evaluate(args.out_dir, args.data, which=args.checkpoint, device=args.device, max_pairs=args.max_pairs,
             seed=args.seed, dialogue=not args.no_dialogue)
    return 0


def cmd_report(args) -> int:
    from .evals.report import write_report

    write_report(args.out_dir, args.data, device=args.device, max_pairs=args.max_pairs, reevaluate=args.reevaluate)
    return 0


def cmd_attention(args) -> int:
    from .evals.attention import attention_picture

    path = attention_picture(args.out_dir, args.text, args.png, which=args.checkpoint)
    print(f"已写入 written: {path}")
    return 0


def cmd_compare(args) -> int:
    from .evals.compare import compare

    options = {k: v for k, v in (("threads", args.threads), ("device", args.device)) if v is not None}
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    compare(args.data_dir, args.out, max_time=args.max_time, models=models, **options)
    return 0


def cmd_export(args) -> int:
    if args.format == "hf":
        from .interop.hf import export_hf

        export_hf(args.out_dir, args.to, overwrite=args.overwrite)
    else:
        from .interop.gguf import export_gguf

        export_gguf(args.out_dir, args.to, dtype=args.dtype)
    return 0


def cmd_import_hf(args) -> int:
    from .interop.hf import import_hf

    import_hf(args.hf_dir, args.out, overwrite=args.overwrite)
    return 0


def cmd_serve(args) -> int:
    from .serve.app import serve

    serve(args.out_dir, host=args.host, port=args.port, api_key=args.api_key, which=args.checkpoint,
          device=args.device, max_tokens=args.max_tokens, max_active=args.max_active, max_waiting=args.max_waiting,
          history=args.history)
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "chat": cmd_chat, "demo": cmd_demo,
            "eval": cmd_eval, "report": cmd_report, "attention": cmd_attention, "compare": cmd_compare,
            "serve": cmd_serve, "export": cmd_export, "import-hf": cmd_import_hf}
