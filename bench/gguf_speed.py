"""Generation speed after `zaizai export --format gguf`: llama.cpp (through llama-cpp-python) next to zaizai itself.

    .venv/bin/python bench/gguf_speed.py                 # three sizes, 2 threads
    .venv/bin/python bench/gguf_speed.py --threads 1
    .venv/bin/python bench/gguf_speed.py --corpus ../shared/corpora/tang.txt.xz   # the README's figures
    .venv/bin/python bench/gguf_speed.py --compile       # zaizai with its compiled decode step
    .venv/bin/python bench/gguf_speed.py --compile --weights float16   # ... on float16 weights, as the F16 file

For GPTs of 4 layers/128 wide, 6/384 and 12/768 (GPT-2 small's body) with random weights, block_size 1024 and
the ``--corpus`` character vocabulary (9,706 tokens for the 4.5M-character Tang-poetry corpus the README's
figures came from; without --corpus, the built-in demo corpus's, see ``bench/corpus.py``):
each model is saved as a zaizai folder, exported with :func:`zaizai.interop.gguf.export_gguf` as F32 and F16,
and both run greedy generation of ``--new-tokens`` (500) at batch 1 after a ``--prompt-tokens`` (200) history.

- zaizai: :func:`zaizai.inference.generate.generate_ids` (KV cache, fp32, temperature 0); with ``--compile``,
  its compiled decode step (``zaizai chat --compile``; :mod:`zaizai.models.compiled`), compiled before the rounds;
  with ``--weights float16`` too, that step on the model's matrices rounded to float16 (``zaizai chat --compile
  --weights float16``): the bytes the F16 file holds, arithmetic in fp32.
- llama.cpp: ``Llama.generate(prompt_ids, temp=0)`` (its greedy sampler; KV cache in F16, its default), in a
  child process of its own (``bench/llama_run.py``; ``--llama-in-process`` runs it in this one, beside torch).

tokens/s counts the new tokens over the whole call, prompt processing included. Rounds alternate the order; the
median round is reported. "same" is the share of generated tokens equal to zaizai's (F16 weights, and llama.cpp's
F16 KV cache, may flip near-ties on random weights, after which the texts part ways).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

from zaizai.training.checkpoint import BEST, save_checkpoint
from zaizai.training.config import TrainConfig
from zaizai.inference.generate import generate_ids
from zaizai.inference.sampling import SamplingConfig
from zaizai.interop.gguf import export_gguf
from zaizai.models import ModelConfig, build_model
from zaizai.models.compiled import round_weights
from zaizai.data.tokenizer import CharTokenizer

from corpus import add_corpus_argument, load_corpus
from llama_run import LlamaRun

SIZES = [(4, 4, 128), (6, 6, 384), (12, 12, 768)]  # (n_layer, n_head, n_embd)


def model_folder(folder: Path, tok: CharTokenizer, n_layer: int, n_head: int, n_embd: int, block_size: int):
    cfg = ModelConfig(model="gpt", vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, dropout=0.0, bias=True)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    folder.mkdir(parents=True)
    tok.save(folder / "tokenizer.json")
    save_checkpoint(folder / BEST, model, model_config=cfg.to_dict(), train_config=TrainConfig().to_dict(),
                    state={"step": 0})
    return model


def run_zaizai(model, prompt: list[int], n: int, compile: bool = False) -> tuple[float, list[int]]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = list(generate_ids(model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=n), compile=compile))
    return time.perf_counter() - start, out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``; None: sys.argv's)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-in-process", action="store_true",
                    help="run llama.cpp in this process, beside torch (default: a child process of its own)")
    ap.add_argument("--compile", action="store_true",
                    help="zaizai with its compiled decode step (zaizai chat --compile)")
    ap.add_argument("--weights", choices=("float32", "float16"), default="float32",
                    help="float16 (with --compile): zaizai's compiled step on float16 weights, as llama.cpp's F16")
    add_corpus_argument(ap)
    args = ap.parse_args(argv)
    if args.weights != "float32" and not args.compile:
        ap.error("--weights float16 needs --compile")
    return args


def main() -> None:
    args = parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python")

    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.corpus)
    tok, source = CharTokenizer.from_text(corpus.text), corpus.name
    block = 1024
    g = torch.Generator().manual_seed(1)
    prompt = [0] + torch.randint(6, tok.vocab_size, (args.prompt_tokens - 1,), generator=g).tolist()
    print(corpus.header())
    print(f"vocab {tok.vocab_size} ({source}) · prompt {args.prompt_tokens} · new {args.new_tokens} · "
          f"threads {args.threads} · median of {args.rounds} rounds"
          + (" · zaizai: compiled decode step (--compile)" if args.compile else "")
          + (" on float16 weights" if args.weights == "float16" else ""))
    print(f"{'model':>10} | {'zaizai tok/s':>12} | {'llama.cpp F32':>13} | {'F32 same':>8} | "
          f"{'llama.cpp F16':>13} | {'F16 same':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for n_layer, n_head, n_embd in SIZES:
            folder = Path(tmp) / f"{n_layer}x{n_embd}"
            model = model_folder(folder, tok, n_layer, n_head, n_embd, block)
            llms = {}
            for dtype in ("f32", "f16"):
                path = Path(tmp) / f"{n_layer}x{n_embd}-{dtype}.gguf"
                export_gguf(folder, path, dtype=dtype, verbose=False)
                llms[dtype] = LlamaRun(path, args.threads, n_ctx=block, in_process=args.llama_in_process)
            if args.weights == "float16":  # (after the F32 export, which keeps the weights as they were)
                round_weights(model, torch.float16)
            times: dict[str, list[float]] = {"zaizai": [], "f32": [], "f16": []}
            outs: dict[str, list[int]] = {}
            run_zaizai(model, prompt, 8, args.compile)  # warm up (and compile)
            for llm in llms.values():
                llm.generate(prompt, 8)
            for r in range(args.rounds):
                order = ["zaizai", "f32", "f16"] if r % 2 == 0 else ["f16", "f32", "zaizai"]
                for name in order:
                    if name == "zaizai":
                        t, out = run_zaizai(model, prompt, args.new_tokens, args.compile)
                    else:
                        t, out = llms[name].generate(prompt, args.new_tokens)
                    times[name].append(t)
                    outs[name] = out
            speed = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}

            def same(name: str) -> str:
                agree = 0
                for a, b in zip(outs[name], outs["zaizai"]):
                    if a != b:
                        break
                    agree += 1
                return f"{agree / args.new_tokens:.0%}"

            z = speed["zaizai"]
            print(f"{n_layer:>2}L/{n_embd:<4}d | {z:>12,.0f} | {speed['f32']:>8,.0f} {speed['f32'] / z:>3.1f}x |"
                  f" {same('f32'):>8} | {speed['f16']:>8,.0f} {speed['f16'] / z:>3.1f}x | {same('f16'):>8}", flush=True)
            for llm in llms.values():
                llm.close()


if __name__ == "__main__":
    main()
