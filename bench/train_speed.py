"""Training speed of zaizai's GPT, side by side with a peer measured in the same run.

    .venv/bin/python bench/train_speed.py                    # throughput: zaizai gpt vs transformers GPT2LMHeadModel
    .venv/bin/python bench/train_speed.py --dtype float32    # one precision only
    .venv/bin/python bench/train_speed.py --mode ablation    # what each speed change in zaizai is worth
    .venv/bin/python bench/train_speed.py --mode preset      # default preset (auto), 210 s, vs nanoGPT's recipe
    .venv/bin/python bench/train_speed.py --corpus ../shared/corpora/tang.txt.xz [--mode ...]  # the README's figures

--corpus: a .txt, .txt.xz or folder of .txt files; the README's figures came from the 4.5M-character
Tang-poetry corpus (``../shared/corpora/tang.txt.xz`` on the project's machine). Without it, the built-in
demo corpus (chatterbot-corpus Chinese + 崽崽's introduction; see ``bench/corpus.py``).

throughput mode: nanoGPT's CPU shapes (4 layers, 4 heads, n_embd 128, block 64, batch 12, dropout 0) with
the corpus's vocabulary size (distinct characters + 6 special tokens) on random token data.
Both models train with torch AdamW (lr 1e-3, weight decay 0.1): zaizai through ``configure_optimizer`` as
its trainer does (decay on matrices only, fused kernel), the peer with a plain ``torch.optim.AdamW``.
They alternate in interleaved rounds in one process, warm-up steps excluded, so machine noise hits both.
Precision: bf16 autocast for both where the CPU has native bf16, and a line in fp32.

ablation mode: the same measurement over zaizai variants that add one change at a time, from a plain
nanoGPT-style step (F.linear + F.cross_entropy on fp32 logits, SDPA in the autocast dtype, unfused AdamW).

preset mode: not throughput but what a run learns. ``zaizai train --max-time T`` with its default preset
(``auto``: a modern block with Muon, its size, batch and lr chosen for the corpus and this CPU in the run's first
seconds; ``--preset cpu`` for the older fixed GPT preset, or any other) next to its peer, nanoGPT's README CPU
recipe (preset ``nanogpt-cpu``), on the same prepared corpus, one after the other in the same process, each for
``--max-time`` seconds of wall time; then each one's loss over the whole validation split.

--tune-malloc keeps freed memory mapped (glibc mallopt) for the whole process, so both models stop
page-faulting on their big per-step tensors; it helps the peer more than zaizai.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import zaizai.models.gpt as gpt_module
from zaizai.common.device import autocast, autocast_dtype, cpu_has_fast_bf16, tune_glibc_malloc
from zaizai.models import ModelConfig, build_model
from zaizai.training.config import PRESETS
from zaizai.training.optim import configure_optimizer

from corpus import add_corpus_argument, load_corpus


# --- the two trainers ---------------------------------------------------------------------------------------


def zaizai_trainer(vocab_size: int, args, fused_adamw: bool | None = None):
    cfg = ModelConfig(
        model="gpt", vocab_size=vocab_size, block_size=args.block_size,
        n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True,
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu", fused=fused_adamw)

    def loss_fn(x, y):
        _, loss = model(x, y)
        return loss

    return loss_fn, opt


def hf_trainer(vocab_size: int, args):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.loss.loss_utils import ForCausalLMLoss

    hf_cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=args.block_size, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))

    def loss_fn(x, y):
        logits = model(input_ids=x).logits
        # transformers' own causal-LM loss (it upcasts the logits to fp32), on the same targets as zaizai
        return ForCausalLMLoss(logits, y, vocab_size=vocab_size, shift_labels=y)

    return loss_fn, opt


def make_step(loss_fn, opt, dtype, patches=contextlib.nullcontext):
    """One training step; ``patches`` swaps zaizai's implementations for the ablation variants."""
    device = torch.device("cpu")

    def step(x, y):
        with patches(), autocast(device, dtype):
            loss = loss_fn(x, y)
        with patches():
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def measure(steps: dict, vocab_size: int, args) -> dict[str, float]:
    """Tokens per second of each step function: interleaved rounds, order alternating, warm-up excluded."""
    g = torch.Generator().manual_seed(0)
    n_batches = 16
    data = torch.randint(vocab_size, (n_batches, args.batch_size, args.block_size + 1), generator=g)
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]
    for step in steps.values():
        for i in range(args.warmup):
            step(*batches[i % n_batches])
    elapsed = dict.fromkeys(steps, 0.0)
    order = list(steps)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            for i in range(args.steps_per_round):
                steps[name](*batches[(r * args.steps_per_round + i) % n_batches])
            elapsed[name] += time.perf_counter() - t0
    tokens = args.rounds * args.steps_per_round * args.batch_size * args.block_size
    return {name: tokens / elapsed[name] for name in steps}


# --- modes --------------------------------------------------------------------------------------------------


def precisions(args) -> list[str]:
    if args.dtype != "auto":
        return [args.dtype]
    return ["bfloat16", "float32"] if cpu_has_fast_bf16() else ["float32"]


def to_dtype(name: str):
    return torch.bfloat16 if name == "bfloat16" else None  # None: plain fp32, no autocast


def header(vocab_size: int, corpus_name: str, args) -> str:
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_fast_bf16()}; "
        f"vocab {vocab_size} ({corpus_name}), 4 layers x 4 heads x 128, block {args.block_size}, batch {args.batch_size}; "
        f"{args.warmup} warm-up + {args.rounds} x {args.steps_per_round} timed steps each"
        + ("; glibc malloc tuned" if args.tune_malloc else "")
    )


def throughput(vocab_size: int, args) -> None:
    print(f"{'precision':<10} {'zaizai tok/s':>13} {'transformers tok/s':>19} {'ratio':>7}")
    for name in precisions(args):
        dtype = to_dtype(name)
        steps = {
            "zaizai": make_step(*zaizai_trainer(vocab_size, args), dtype),
            "transformers": make_step(*hf_trainer(vocab_size, args), dtype),
        }
        tps = measure(steps, vocab_size, args)
        ratio = tps["zaizai"] / tps["transformers"]
        print(f"{name:<10} {tps['zaizai']:>13,.0f} {tps['transformers']:>19,.0f} {ratio:>6.2f}x", flush=True)


@contextlib.contextmanager
def swapped(**replacements):
    """Temporarily replace attributes of zaizai's model modules (``module__name=value``)."""
    modules = {"gpt": gpt_module}
    saved = []
    for key, value in replacements.items():
        module, attr = key.split("__", 1)
        saved.append((modules[module], attr, getattr(modules[module], attr)))
        setattr(modules[module], attr, value)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def plain_linear_cross_entropy(x, weight, targets):
    logits = F.linear(x, weight)
    return logits, F.cross_entropy(logits.float(), targets, ignore_index=-1)


def plain_attention(q, k, v, dropout_p=0.0, attn_mask=None):
    if attn_mask is not None:  # packed dialogues: a mask per segment (random-token batches here have none)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def ablation(vocab_size: int, args) -> None:
    plain_ce = dict(gpt__linear_cross_entropy=plain_linear_cross_entropy)
    plain_attn = dict(gpt__causal_attention=plain_attention)
    variants = [  # (name, replacements, fused AdamW), each adding one change to the one before
        ("plain nanoGPT-style step", {**plain_ce, **plain_attn}, False),
        ("+ attention in fp32 on CPU", plain_ce, False),
        ("+ fused output layer + loss", {}, False),
        ("+ fused AdamW (= zaizai)", {}, True),
    ]
    for name in precisions(args):
        dtype = to_dtype(name)
        steps = {
            label: make_step(*zaizai_trainer(vocab_size, args, fused), dtype, lambda r=repl: swapped(**r))
            for label, repl, fused in variants
        }
        tps = measure(steps, vocab_size, args)
        print(f"{name}:")
        previous = None
        for label, value in tps.items():
            gain = "" if previous is None else f"  {value / previous - 1:+6.1%}"
            print(f"  {label:<30} {value:>8,.0f} tok/s{gain}")
            previous = value


def preset(corpus, args) -> int:
    """`zaizai train` with ``--preset`` (default ``auto``, what `zaizai train` does without one) for --max-time
    seconds on the corpus, then the loss on the whole validation split; the peer is nanoGPT's README CPU recipe
    (preset nanogpt-cpu: 4 layers, 128 wide, block 64, batch 12, lr 1e-3, fp32, 2,000 iterations) on the same data
    in the same run and time budget. The table says what each run trained (auto picks its size in the run)."""
    import json
    import tempfile

    import zaizai

    rows = []
    with tempfile.TemporaryDirectory(prefix="zaizai-bench-") as tmp:
        zaizai.prepare([corpus.write(Path(tmp))], Path(tmp) / "data", verbose=False)
        default = "zaizai default" if args.preset == "auto" else "zaizai"
        runs = [(args.preset, f"{default} ({args.preset} preset)")]
        if not args.no_peer:
            runs.append(("nanogpt-cpu", "nanoGPT README CPU recipe"))
        for name, label in runs:
            print(f"== {label} (--preset {name}, --max-time {args.max_time:g})", flush=True)
            out = Path(tmp) / f"run-{len(rows)}"
            result = zaizai.train(Path(tmp) / "data", out, preset=name, max_time=args.max_time,
                                  verbose=not args.quiet)
            config = json.loads((out / "config.json").read_text(encoding="utf-8"))
            m, t = config["model"], config["train"]
            dtype = autocast_dtype(torch.device("cpu"), t["dtype"]) or torch.float32  # auto: bf16 where native
            what = f"{m['model']} {m['n_layer']}x{m['n_embd']} {t['optimizer']} {str(dtype).removeprefix('torch.')}"
            rows.append((label, name, what, result))
    print()
    print(f"{corpus.name} corpus, whole validation split, {args.max_time:g} s of training per run, "
          f"{torch.get_num_threads()} threads")
    print(f"{'run':<30} {'preset':<12} {'trained':<28} {'steps':>7} {'tokens':>11} {'tok/s':>8} "
          f"{'val nats/char':>14}")
    for label, name, what, r in rows:
        loss = "-" if r.full_val_loss is None else f"{r.full_val_loss:.4f}"
        if r.full_val_share is not None and r.full_val_share < 1:  # --max-time cut the final pass short
            loss += f" ({r.full_val_share:.0%} of val)"
        print(f"{label:<30} {name:<12} {what:<28} {r.step:>7,} {r.tokens_seen:>11,} "
              f"{r.tokens_seen / r.elapsed:>8,.0f} {loss:>14}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["throughput", "ablation", "preset"], default="throughput")
    add_corpus_argument(p)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: bf16 and fp32 where the CPU has native bf16, else fp32 only")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps-per-round", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tune-malloc", action="store_true",
                   help="keep freed memory mapped (glibc mallopt), for every model in the run: fewer page faults")
    p.add_argument("--max-time", type=float, default=210.0, help="preset mode: seconds of training per run")
    p.add_argument("--preset", default="auto", choices=sorted(PRESETS),
                   help="preset mode: zaizai's run (default auto, `zaizai train`'s default; cpu: the older GPT preset)")
    p.add_argument("--no-peer", action="store_true", help="preset mode: skip the nanoGPT-recipe run")
    p.add_argument("--quiet", action="store_true", help="preset mode: no progress bars")
    args = p.parse_args(argv)

    corpus = load_corpus(args.corpus)
    print(corpus.header(), flush=True)
    if args.mode == "preset":
        return preset(corpus, args)
    vocab_size = corpus.vocab_size
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tune_malloc and not tune_glibc_malloc():
        print("--tune-malloc: this C library has no glibc mallopt; allocator left as it is")
    print(header(vocab_size, corpus.name, args))
    (throughput if args.mode == "throughput" else ablation)(vocab_size, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
