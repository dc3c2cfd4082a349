"""GPT-2 small (124M, block 1024) training throughput on a CUDA GPU: tokens/s and MFU, zaizai's GPT side
by side with Hugging Face's GPT2LMHeadModel measured in the same run.

    .venv/bin/python bench/gpu_train_speed.py                  # bf16 autocast, eager
    .venv/bin/python bench/gpu_train_speed.py --compile        # torch.compile both models
    .venv/bin/python bench/gpu_train_speed.py --batch-size 32 --no-peer

Both train on random tokens with the trainer's step: bf16 autocast, TF32 for what stays fp32, fused AdamW
(``configure_optimizer``), flash attention through SDPA, grad clipping at 1.0. The shapes are the ``gpt2``
preset's with GPT-2's vocabulary padded to 50304 (a multiple of 64, as nanoGPT does). Warm-up steps are
not timed; the two models alternate in rounds so machine noise hits both.

MFU = model FLOPs per second / the GPU's peak dense bf16 FLOPs. Model FLOPs per token, as in the PaLM paper
and nanoGPT: 6 N (forward + backward through N parameters, the position table left out) + 12 L T C for the
attention scores (full, not halved for the causal mask). Peak: H100 SXM / H200 989 TFLOPS, H100 PCIe 756,
A100 312; other GPUs need --peak-tflops. Without a GPU the script says so and exits 0. The goal: >= 40% MFU on
an H100 in bf16.
"""

from __future__ import annotations

import argparse
import time

import torch

from zaizai.training.config import PRESETS
from zaizai.common.device import enable_tf32
from zaizai.models import ModelConfig, build_model
from zaizai.training.optim import configure_optimizer

# Peak dense bf16 tensor-core FLOPs, from NVIDIA's data sheets (the "with sparsity" figures halved).
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("A10G", 70e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(name: str) -> tuple[float | None, str]:
    for key, flops in PEAK_BF16:
        if key.lower() in name.lower():
            return flops, f"{key} dense bf16 peak"
    return None, "unknown GPU"


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def zaizai_step(model, optimizer, x, y):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def hf_step(model, optimizer, x, y):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss  # labels shift inside; same work as next-token targets
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_peer(cfg: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16, the gpt2 preset's)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (more are taken with --compile)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the models")
    ap.add_argument("--no-peer", action="store_true", help="measure zaizai only")
    ap.add_argument("--peak-tflops", type=float, default=None, help="this GPU's dense bf16 peak, if not detected")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("skipped: torch sees no CUDA GPU (this benchmark measures GPU training)")
        return 0
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak, source = peak_flops(name)
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    enable_tf32()

    preset = PRESETS["gpt2"]
    cfg = ModelConfig(model="gpt", vocab_size=50304, dropout=0.0,
                      **{k: preset[k] for k in ("n_layer", "n_head", "n_embd", "block_size")})
    B, T = args.batch_size, cfg.block_size

    runs = {}
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    runs["zaizai gpt"] = (model, zaizai_step, model.num_params(non_embedding=True))
    if not args.no_peer:
        try:
            peer = build_peer(cfg).to(device)
            n_peer = sum(p.numel() for p in peer.parameters()) - peer.transformer.wpe.weight.numel()
            runs["transformers GPT2LMHeadModel"] = (peer, hf_step, n_peer)
        except ImportError:
            print("note: transformers is not installed; measuring zaizai only")

    print(f"GPU: {name} · torch {torch.__version__} · peak {peak / 1e12:.0f} TFLOPS ({source})" if peak else
          f"GPU: {name} · torch {torch.__version__} · peak unknown: pass --peak-tflops for MFU")
    print(f"GPT-2 small: {cfg.n_layer} layers · n_embd {cfg.n_embd} · block {T} · vocab {cfg.vocab_size} · "
          f"batch {B} · bf16 autocast · {'torch.compile' if args.compile else 'eager'}")

    steppers = {}
    for label, (m, step, n) in runs.items():
        opt = configure_optimizer(m, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), device_type="cuda")
        compiled = torch.compile(m) if args.compile else m
        steppers[label] = (compiled, opt, step, n)

    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    warmup = args.warmup + (5 if args.compile else 0)
    for label, (m, opt, step, _) in steppers.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step(m, opt, x, y)
        torch.cuda.synchronize()
        print(f"  warm-up {label}: {time.perf_counter() - t0:.1f}s")

    times = {label: [] for label in steppers}
    for _ in range(args.rounds):
        for label, (m, opt, step, _) in steppers.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(m, opt, x, y)
            torch.cuda.synchronize()
            times[label].append((time.perf_counter() - t0) / args.steps)

    print(f"\n{'model':<30} {'params':>8} {'ms/step':>9} {'tokens/s':>11} {'TFLOPS':>8} {'MFU':>7}")
    for label, (_, _, _, n) in steppers.items():
        best = min(times[label])
        tps = B * T / best
        achieved = flops_per_token(cfg, n) * tps
        mfu = f"{achieved / peak:.1%}" if peak else "n/a"
        print(f"{label:<30} {n / 1e6:>7.1f}M {best * 1e3:>9.1f} {tps:>11,.0f} {achieved / 1e12:>8.1f} {mfu:>7}")
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
