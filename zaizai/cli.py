"""Command line: ``zaizai prepare | train | sample | chat | demo | eval | report | attention | compare | serve``. Thin: parse flags, call the library, print."""

from __future__ import annotations

import argparse
import errno
import sys
from dataclasses import fields

from . import __version__
from .cli_args import (FIELD_HELP, FIELD_TYPE, any_int, finite_float, max_tokens_int, nonneg_float, nonneg_int,
                       open_fraction, port_int, positive_float, positive_int, probability, seed_int)
from .common.errors import ZaizaiError


def _shown_default(name: str, default) -> str:
    if name == "min_lr" and default < 0:
        return "lr/10"
    if isinstance(default, str):
        return default or "none"
    return repr(default)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from .training.config import AUTO_CANDIDATES, PRESETS, TrainConfig
    from .models.config import ModelConfig

    default_preset = PRESETS[TrainConfig.preset]
    chosen = {k for row in AUTO_CANDIDATES.values() for k in row} | {"warmup_iters"} if TrainConfig.preset == "auto" \
        else set()  # the auto preset picks these per run

    for cls, skip in ((ModelConfig, {"vocab_size"}), (TrainConfig, {"data_dir", "out_dir"})):
        group = parser.add_argument_group(f"{cls.__name__} options")
        for f in fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            text = FIELD_HELP.get(f.name, f"配置项 · the {f.name} option")
            if f.name == "preset":
                text += ": " + ", ".join(PRESETS) + ("; auto 按本机速度、--max-time 和语料大小选模型 · fits a modern "
                                                    "model to this CPU, --max-time and the corpus (with --model gpt, "
                                                    "rnn, bigram or --init-from: cpu)")
            kind = type(f.default)
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            else:
                default = default_preset.get(f.name, f.default)
                shown = ("自动 chosen by the auto preset" if f.name in chosen
                         else _shown_default(f.name, default))
                parse = FIELD_TYPE.get(f.name) or {int: any_int, float: finite_float}.get(kind, kind)
                group.add_argument(flag, type=parse, default=None, metavar=kind.__name__.upper(),
                                   help=f"{text} (default {shown})")


def _add_sampling_flags(parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float, top_p: float,
                        repetition_penalty: float) -> None:
    """The decoding flags `sample` and `chat` share (with their own defaults), plus checkpoint and device."""
    parser.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, metavar="N",
                        help=f"最多生成的 token 数 · tokens to generate at most (default {max_new_tokens})")
    parser.add_argument("--temperature", type=nonneg_float, default=temperature, metavar="T",
                        help=f"温度，0 = 总选最可能的 · 0 = greedy (default {temperature:g})")
    parser.add_argument("--top-k", type=nonneg_int, default=0, metavar="K",
                        help="只从最可能的 K 个里选 · 0 = off (default 0)")
    parser.add_argument("--top-p", type=probability, default=top_p, metavar="P",
                        help=f"核采样，在 (0, 1] 之内 · nucleus sampling, 1 = off (default {top_p:g})")
    parser.add_argument("--repetition-penalty", type=positive_float, default=repetition_penalty, metavar="X",
                        help=f"重复惩罚 · 1 = off (default {repetition_penalty:g})")
    parser.add_argument("--no-repeat-ngram-size", type=nonneg_int, default=0, metavar="N",
                        help="不许重复的 n 元组长度 · 0 = off (default 0)")
    parser.add_argument("--seed", type=seed_int, default=None,
                        help="随机种子：同一种子，同样的文字 · same seed, same text (default: none)")
    _add_checkpoint_flags(parser)


def _add_checkpoint_flags(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"],
                        help="用哪个检查点 · auto (default): best if there is one, else last")
    if device:
        parser.add_argument("--device", default="auto", help="设备 · auto (default) | cpu | cuda | mps")


def _add_compile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="预先编译解码步骤（CPU 上 gpt/modern，单个生成约快 2-4 倍；需要 C++ 编译器，每种模型形状首次约 "
                             "20-30 秒，之后从 ~/.cache/zaizai 载入）· compile the decode step ahead of time (gpt/modern "
                             "on CPU: a lone generation ~2-4x faster; needs a C++ compiler; 20-30 s the first time for "
                             "a model shape, then loaded from ~/.cache/zaizai)")
    parser.add_argument("--weights", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="解码权重精度（配合 --compile）：float16/bfloat16 读一半字节，6 层/384 宽约快 1.7 倍，计算仍是 float32 · "
                             "weights of the compiled step (with --compile): float16 or bfloat16 rounds the model's "
                             "matrices and reads half the bytes (~1.7x faster at 6L/384d; arithmetic stays float32)")


MODEL_DIR_HELP = "`zaizai train` 写的模型文件夹 · folder written by `zaizai train`"
DATA_HELP = "数据文件夹 · prepared data folder (default: the one the model was trained on)"
MAX_PAIRS_HELP = "评估的对话数 · held-out dialogue pairs to score (default 200)"
HELP_HELP = "显示帮助并退出 · show this help and exit"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zaizai", description="崽崽 zaizai: 用你自己的中文文本训练一个 GPT-2 式的模型，"
                                "然后和它聊天 · train a GPT-2-style model on your own Chinese text, then talk to it.")
    p.add_argument("--version", action="version", version=f"zaizai {__version__}", help="显示版本 · show the version")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_data_commands(sub)
    _add_generation_commands(sub)
    _add_evaluation_commands(sub)
    _add_interop_commands(sub)
    for parser in (p, *sub.choices.values()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                action.help = HELP_HELP
    return p


def _add_data_commands(sub) -> None:
    """prepare, train, demo: from text to a trained model."""
    pp = sub.add_parser("prepare", help="准备数据：文本 → 词表 + 训练/验证 token 文件 · "
        "text file(s) -> tokenizer + train/val token bins")
    pp.add_argument("corpus", nargs="+", help="文本文件或装 .txt 的文件夹 · text files or folders of .txt files")
    pp.add_argument("--out", required=True, help="要写的数据文件夹 · data folder to write")
    pp.add_argument("--overwrite", action="store_true",
                    help="替换 --out 里已有的数据文件夹 · replace the data folder already in --out")
    pp.add_argument("--val-fraction", type=open_fraction, default=0.1,
                    help="留作验证的文档比例 · share of documents held out, in (0, 1) (default 0.1)")
    pp.add_argument("--seed", type=seed_int, default=1337,
                    help="训练/验证划分的种子 · seed of the train/val split (default 1337)")
    pp.add_argument("--encoding", default="utf-8", help="文件编码 · text encoding of the files, e.g. gbk "
                    "(default utf-8)")
    pp.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"],
                    help="无法解码的字节 · bytes that do not decode: strict (default: stop and say where), replace "
                         "(with U+FFFD) or ignore (drop them); replace/ignore count them in the summary")
    pp.add_argument("--format", default="auto", choices=["auto", "plain", "text", "jsonl", "lccc"],
                    help="语料格式 · plain text, or dialogues: text (one turn per line, a blank line between "
                         "dialogues), jsonl (OpenAI messages), lccc (JSON lists of utterances); auto (default): by "
                         "file extension")
    pp.add_argument("--tokenizer", default="char", metavar="char|bpe|PATH",
                    help="分词 · char (default: one token per character), bpe (byte-level BPE of --vocab-size "
                         "tokens), or a tokenizer.json / data or model folder to reuse, e.g. to fine-tune that model "
                         "(an existing file or folder wins over the names)")
    pp.add_argument("--vocab-size", type=positive_int, default=8000,
                    help="新 bpe 词表大小 · tokens of a new bpe tokenizer (default 8000)")
    pp.add_argument("--skip-bad", action="store_true", help="跳过格式错误的对话（并计数）· skip malformed dialogues "
                    "(and count them)")

    tp = sub.add_parser("train", help="训练 · train a model on a prepared data folder")
    tp.add_argument("data_dir", nargs="?", help="`zaizai prepare` 写的数据文件夹 · folder written by `zaizai "
                    "prepare` (optional with --resume)")
    tp.add_argument("--out", dest="out_dir", default=None, help="输出文件夹 · output folder (default out)")
    tp.add_argument("--config", dest="config_file", default=None, help="选项文件 · TOML or JSON file of options")
    _add_config_flags(tp)

    dp = sub.add_parser("demo", help="演示：在内置语料上训练一个小对话模型并聊几句 · "
        "train a small chat model on the built-in corpus and show it")
    dp.add_argument("--out", default="demo", help="演示语料、数据和模型的文件夹 · folder for the demo corpus, data and "
                    "model (default demo)")
    dp.add_argument("--max-time", type=positive_float, default=60.0,
                    help="训练时间（秒）· training budget in seconds (default 60)")
    dp.add_argument("--retrain", action="store_true", help="重新训练 · train again even if the demo model exists")


def _add_generation_commands(sub) -> None:
    """sample, chat, serve: a trained model talks."""
    sp = sub.add_parser("sample", help="续写 · generate text from a trained model, streamed")
    sp.add_argument("out_dir", help=MODEL_DIR_HELP)
    sp.add_argument("--prompt", default="", help="要续写的文字 · text to continue")
    _add_sampling_flags(sp, max_new_tokens=200, temperature=0.8, top_p=1.0, repetition_penalty=1.0)
    _add_compile_flag(sp)
    sp.add_argument("--stop", action="append", default=None,
                    help="出现这段文字就停 · stop when this text appears (repeatable)")

    cp = sub.add_parser("chat", help="聊天 · talk with a trained model in the terminal (or answer --message / stdin)")
    cp.add_argument("out_dir", help=MODEL_DIR_HELP)
    cp.add_argument("--message", "-m", action="append", default=None,
                    help="说这句并打印回答（可重复，多轮）· say this and print the reply (repeat for several turns); "
                         "no interactive prompt")
    cp.add_argument("--system", default=None, help="开场的系统消息 · a system message that starts the conversation")
    cp.add_argument("--history", type=nonneg_int, default=None, metavar="N",
                    help="给模型看的前几轮对话 · earlier exchanges to feed the model, 0 = none (default: as many as "
                         "its training dialogues had before their last: none for one-question-one-answer data; all "
                         "if unknown)")
    _add_sampling_flags(cp, max_new_tokens=100, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    _add_compile_flag(cp)

    vp = sub.add_parser("serve", help="网页聊天 + OpenAI 兼容接口 · "
        "an OpenAI-compatible HTTP API and a chat page in the browser")
    vp.add_argument("out_dir", help=MODEL_DIR_HELP)
    vp.add_argument("--host", default="127.0.0.1",
                    help="监听的地址 · interface to bind (default 127.0.0.1: this machine only)")
    vp.add_argument("--port", type=port_int, default=8000, help="端口 · port (default 8000)")
    vp.add_argument("--allowed-host", action="append", default=None, metavar="HOST",
                    help="也接受这个 Host 头（可重复）· also accept requests for this Host name (repeatable); "
                         "localhost names are always allowed (default: none)")
    vp.add_argument("--api-key", default=None,
                    help="/v1 调用须带 'Authorization: Bearer KEY' · require this key on /v1 calls; a key on the "
                         "command line shows in `ps`: prefer the ZAIZAI_API_KEY environment variable or "
                         "--api-key-file (default: ZAIZAI_API_KEY, else none)")
    vp.add_argument("--api-key-file", default=None, metavar="PATH",
                    help="从这个文件读 API 密钥 · read the API key from this file")
    vp.add_argument("--max-tokens", type=max_tokens_int, default=4096,
                    help="一个请求最多可要的 max_tokens · the largest max_tokens a request may ask, 1..4096 "
                         "(default 4096)")
    vp.add_argument("--max-active", type=positive_int, default=32,
                    help="同一批里同时生成的请求数 · generations decoded together in one batch (default 32)")
    vp.add_argument("--max-waiting", type=nonneg_int, default=64,
                    help="排队请求数，再多回 429 · requests queued beyond those; more get 429 (default 64)")
    vp.add_argument("--history", type=nonneg_int, default=None, metavar="N",
                    help="聊天提示保留的前几轮 · earlier exchanges a chat prompt keeps "
                         "(default: as many as the model's training dialogues had)")
    _add_checkpoint_flags(vp)
    _add_compile_flag(vp)


def _add_evaluation_commands(sub) -> None:
    """eval, report, attention, compare: how good is it, and what does it look at."""
    ep = sub.add_parser("eval", help="评估 · "
        "loss, perplexity, bits per char/byte on the whole val split (+ dialogue metrics)")
    ep.add_argument("out_dir", help=MODEL_DIR_HELP)
    ep.add_argument("--data", default=None, help=DATA_HELP)
    ep.add_argument("--max-pairs", type=positive_int, default=200, help=MAX_PAIRS_HELP)
    ep.add_argument("--seed", type=seed_int, default=0,
                    help="选对话和采样回答的种子 · seed of the pair choice and of sampled replies (default 0)")
    ep.add_argument("--no-dialogue", action="store_true", help="不算回答指标 · skip the reply metrics (BLEU, "
                    "distinct-n)")
    _add_checkpoint_flags(ep)

    rp = sub.add_parser("report", help="模型报告 · "
        "write report.md: a model card with config, data, losses, metrics, samples")
    rp.add_argument("out_dir", help=MODEL_DIR_HELP)
    rp.add_argument("--data", default=None, help=DATA_HELP)
    rp.add_argument("--max-pairs", type=positive_int, default=200, help=MAX_PAIRS_HELP)
    rp.add_argument("--reevaluate", action="store_true", help="重新评估 · evaluate again even if eval.json exists")
    rp.add_argument("--device", default="auto", help="设备 · auto (default) | cpu | cuda | mps")

    ap = sub.add_parser("attention", help="注意力图 · draw the attention weights (layers x heads) of a gpt or modern model over a text")
    ap.add_argument("out_dir", help=MODEL_DIR_HELP)
    ap.add_argument("--text", required=True, help="要看的文字 · the text to look at, e.g. 你好，我是崽崽")
    ap.add_argument("--png", default=None, help="要写的图片 · picture to write (default OUT_DIR/attention.png)")
    ap.add_argument("--overwrite", action="store_true", help="替换已有的图片 · replace an existing picture (never a model file)")
    _add_checkpoint_flags(ap, device=False)

    mp = sub.add_parser("compare", help="比较 bigram / rnn / gpt · "
        "train bigram, rnn and gpt for the same time and compare them")
    mp.add_argument("data_dir", help="`zaizai prepare` 写的数据文件夹 · folder written by `zaizai prepare`")
    mp.add_argument("--max-time", type=positive_float, default=120.0,
                    help="每个模型训练几秒 · seconds of training per model (default 120)")
    mp.add_argument("--out", default="compare", help="各次运行和图的文件夹 · folder for compare-<model>/ runs and "
                    "the plot (default compare)")
    mp.add_argument("--models", default="bigram,rnn,gpt", help="要比较的模型，逗号分隔 · comma-separated "
                    "(default bigram,rnn,gpt)")
    mp.add_argument("--threads", type=nonneg_int, default=None,
                    help="CPU 线程数 · CPU threads (default: chosen for this machine)")
    mp.add_argument("--device", default=None, help="设备 · auto (default) | cpu | cuda | mps")


def _add_interop_commands(sub) -> None:
    """export, import-hf: models to and from other tools."""
    xp = sub.add_parser("export", help="导出 · "
        "write a gpt for other tools: a Hugging Face folder or a GGUF file (llama.cpp)")
    xp.add_argument("out_dir", help="`zaizai train` 或 `zaizai import-hf` 写的模型文件夹 · folder written by "
                    "`zaizai train` (or `zaizai import-hf`)")
    xp.add_argument("--format", required=True, choices=["hf", "gguf"],
                    help="导出格式 · hf: a transformers folder (GPT2LMHeadModel; Qwen3ForCausalLM for modern); "
                         "gguf: one file for llama.cpp / ollama")
    xp.add_argument("--to", required=True, help="要写的文件夹 (hf) 或文件 (gguf) · folder (hf) or file (gguf) to write")
    xp.add_argument("--dtype", default="f16", choices=["f16", "f32"], help="gguf 权重精度 · gguf weights (default f16)")
    xp.add_argument("--overwrite", action="store_true",
                    help="替换已有的 --to 文件夹或文件 · replace an existing --to folder (hf) or file (gguf)")

    ip = sub.add_parser("import-hf", help="导入 · a local Hugging Face GPT-2 / Qwen3 / Llama folder -> a zaizai model folder")
    ip.add_argument("hf_dir", help="含 config.json、model.safetensors 和分词文件的文件夹 · folder with config.json, "
                    "model.safetensors and the tokenizer files")
    ip.add_argument("--out", required=True, help="要写的 zaizai 模型文件夹 · zaizai model folder to write")
    ip.add_argument("--overwrite", action="store_true",
                    help="替换已有的 --out 文件夹 · replace an existing non-empty --out folder")


def starting_note(stream=None) -> None:
    """Say something at once on a terminal: importing PyTorch takes seconds on a laptop, and a silent terminal
    looks hung. (Not when the output goes to a file or a script: it would only be noise there.)"""
    stream = stream or sys.stderr
    if stream.isatty():
        print("zaizai: 启动中 starting (loading PyTorch) …", file=stream, flush=True)


def os_error_line(e: OSError) -> str:
    """One line for a file the system refused (permissions, a full disk, a file where a folder should be)."""
    reason = e.strerror or str(e)
    if e.filename is None:
        return f"系统错误 system error: {reason}"
    path = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"无法写入 cannot write {path}: {reason}; 腾出磁盘空间 free some disk space"
    if isinstance(e, PermissionError) or e.errno == errno.EROFS:
        return f"无法写入或读取 cannot write or read {path}: {reason}; 检查权限 check permissions"
    return f"无法访问 cannot access {path}: {reason}; 检查路径 check the path"


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C anywhere, the lazy imports of torch included, is one line and exit 130
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if args.command != "prepare":  # prepare needs numpy and tokenizers only, not PyTorch
            starting_note()
        return COMMANDS[args.command](args) or 0
    except ZaizaiError as e:
        print(f"zaizai: 错误 error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nzaizai: 已中断 interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `zaizai sample ... | head`
        return 0
    except OSError as e:  # a read-only --out, a full disk: one line, never a traceback
        print(f"zaizai: 错误 error: {os_error_line(e)}", file=sys.stderr)
        return 2


def cmd_prepare(args) -> int:
    from .data.preparation import prepare

    prepare(args.corpus, args.out, val_fraction=args.val_fraction, seed=args.seed, encoding=args.encoding,
            errors=args.errors, format=args.format, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            skip_bad=args.skip_bad, overwrite=args.overwrite)
    return 0


def cmd_train(args) -> int:
    from .training.loop import train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "data_dir", "out_dir", "config_file")}
    result = train(args.data_dir, args.out_dir, config_file=args.config_file, **options)
    return 130 if result.stopped_by == "interrupt" else 0


def cmd_sample(args) -> int:
    from .inference.loaded import check_weights, load

    check_weights(args.compile, args.weights)  # before the model loads
    bot = load(args.out_dir, which=args.checkpoint, device=args.device)
    if args.compile:
        bot.compile_decoding(say=sys.stderr, weights=args.weights)
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
    from .inference.loaded import check_weights, load
    from .inference.sampling import SamplingConfig
    from .terminal import chat_from_lines, chat_in_terminal

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size, seed=args.seed)
    sampling.validate()
    check_weights(args.compile, args.weights)
    bot = load(args.out_dir, which=args.checkpoint, device=args.device)
    if args.compile:
        bot.compile_decoding(say=sys.stderr, weights=args.weights)
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

    path = attention_picture(args.out_dir, args.text, args.png, which=args.checkpoint, overwrite=args.overwrite)
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

        export_gguf(args.out_dir, args.to, dtype=args.dtype, overwrite=args.overwrite)
    return 0


def cmd_import_hf(args) -> int:
    from .interop.hf import import_hf

    import_hf(args.hf_dir, args.out, overwrite=args.overwrite)
    return 0


def cmd_serve(args) -> int:
    from .serve.app import serve

    serve(args.out_dir, host=args.host, port=args.port, api_key=args.api_key, api_key_file=args.api_key_file,
          allowed_hosts=args.allowed_host or [], which=args.checkpoint, device=args.device,
          max_tokens=args.max_tokens, max_active=args.max_active, max_waiting=args.max_waiting, history=args.history,
          compile=args.compile, weights=args.weights)
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample, "chat": cmd_chat, "demo": cmd_demo,
            "eval": cmd_eval, "report": cmd_report, "attention": cmd_attention, "compare": cmd_compare,
            "serve": cmd_serve, "export": cmd_export, "import-hf": cmd_import_hf}
