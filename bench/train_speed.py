"""Training speed of zaizai's GPT, side by side with a peer measured in the same run.

    .venv/bin/python bench/train_speed.py                    # throughput: zaizai gpt vs transformers GPT2LMHeadModel
    .venv/bin/python bench/train_speed.py --dtype float32    # force one precision
    .venv/bin/python bench/train_speed.py --mode preset      # `zaizai train` with the default CPU preset (not yet)

throughput mode: nanoGPT's CPU shapes (4 layers, 4 heads, n_embd 128, block 64, batch 12, dropout 0) with
the Tang-poetry corpus's vocabulary size (distinct characters + 6 special tokens) on random token data.
Both models train with torch AdamW (lr 1e-3, weight decay 0.1): zaizai through ``configure_optimizer`` as
its trainer does (decay on matrices only, fused kernel), the peer with a plain ``torch.optim.AdamW``.
They alternate in interleaved rounds in one process, warm-up steps excluded, so machine noise hits both.
"""

from __future__ import annotations

import argparse
import lzma
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zaizai.device import autocast, cpu_has_fast_bf16
from zaizai.models import ModelConfig, build_model
from zaizai.optim import configure_optimizer

REPO = Path(__file__).resolve().parent.parent
TANG = REPO.parent / "shared" / "corpora" / "tang.txt.xz"
N_SPECIAL_TOKENS = 6  # the char tokenizer's special tokens, on top of the corpus's distinct characters


def tang_vocab_size() -> int | None:
    if not TANG.exists():
        return None
    with lzma.open(TANG, "rt", encoding="utf-8") as f:
        return len(set(f.read())) + N_SPECIAL_TOKENS


def zaizai_trainer(vocab_size: int, args):
    cfg = ModelConfig(
        model="gpt", vocab_size=vocab_size, block_size=args.block_size,
        n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True,
    )
    model = build_model(cfg).train()
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")

    def loss_fn(x, y):
        _, loss = model(x, y)
        return loss

    return model, opt, loss_fn


def hf_trainer(vocab_size: int, args):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=args.block_size, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))

    def loss_fn(x, y):
        logits = model(input_ids=x).logits
        # transformers' own causal-LM loss (upcasts the logits to fp32), on the same targets as zaizai
        return model.loss_function(logits, y, vocab_size=vocab_size, shift_labels=y)

    return model, opt, loss_fn


def make_step(opt, loss_fn, dtype):
    device = torch.device("cpu")

    def step(x, y):
        with autocast(device, dtype):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def measure(vocab_size: int, dtype, args) -> dict[str, float]:
    """Tokens per second of each trainer, interleaved rounds, warm-up excluded."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n_batches = 16
    data = torch.randint(vocab_size, (n_batches, args.batch_size, args.block_size + 1), generator=g)
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]
    steps = {}
    for name, build in (("zaizai", zaizai_trainer), ("transformers", hf_trainer)):
        _, opt, loss_fn = build(vocab_size, args)
        steps[name] = make_step(opt, loss_fn, dtype)
    elapsed = {name: 0.0 for name in steps}
    n_steps = {name: 0 for name in steps}
    for name, step in steps.items():
        for i in range(args.warmup):
            step(*batches[i % n_batches])
    order = list(steps)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else reversed(order):
            step = steps[name]
            t0 = time.perf_counter()
            for i in range(args.steps_per_round):
                step(*batches[(r * args.steps_per_round + i) % n_batches])
            elapsed[name] += time.perf_counter() - t0
            n_steps[name] += args.steps_per_round
    tokens_per_step = args.batch_size * args.block_size
    return {name: n_steps[name] * tokens_per_step / elapsed[name] for name in steps}


def throughput(args) -> int:
    vocab_size = tang_vocab_size()
    if vocab_size is None:
        print(f"skipped: the Tang corpus is not at {TANG} (it ships in the shared corpora folder)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        dtypes = ["bfloat16", "float32"] if cpu_has_fast_bf16() else ["float32"]
    else:
        dtypes = [args.dtype]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fast bf16: {cpu_has_fast_bf16()}; "
        f"vocab {vocab_size} (Tang), 4 layers x 4 heads x 128, block {args.block_size}, batch {args.batch_size}; "
        f"{args.warmup} warm-up + {args.rounds} x {args.steps_per_round} steps each"
    )
    print(f"{'precision':<10} {'zaizai tok/s':>13} {'transformers tok/s':>19} {'ratio':>7}")
    for name in dtypes:
        dtype = torch.bfloat16 if name == "bfloat16" else None
        tps = measure(vocab_size, dtype, args)
        ratio = tps["zaizai"] / tps["transformers"]
        print(f"{name:<10} {tps['zaizai']:>13,.0f} {tps['transformers']:>19,.0f} {ratio:>6.2f}x", flush=True)
    return 0


def preset(args) -> int:
    # TODO(lead): run `zaizai train` with the default CPU preset for --max-time 210 and report
    # tokens/s and the final val loss next to the nanoGPT reference figure.
    print("--mode preset: not implemented yet")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["throughput", "preset"], default="throughput")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: bf16 and fp32 where the CPU has fast bf16, else fp32 only")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5, help="steps per model not timed")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps-per-round", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--max-time", type=float, default=210.0, help="preset mode: training seconds")
    args = p.parse_args(argv)
    return throughput(args) if args.mode == "throughput" else preset(args)


if __name__ == "__main__":
    sys.exit(main())
