"""Loss evaluation during and after training: a quick estimate on fixed batches, or the whole of a split."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..common.device import autocast
from ..common.errors import ZaizaiError
from ..common.ids import IGNORE_INDEX
from ..data.batches import Batches
from .config import TrainConfig


def forward(model, x, y, segments):
    """``model(x, y)``, passing ``segments`` (packed dialogues) only to the models that take them."""
    return model(x, y) if segments is None else model(x, y, segments=segments)


@torch.no_grad()
def estimate_loss(model, batches: Batches, cfg: TrainConfig, device, amp_dtype, eval_iters: int | None = None) -> dict:
    """Mean loss over ``eval_iters`` (default ``cfg.eval_iters``) fixed batches of each split (the same batches
    at every evaluation)."""
    eval_iters = eval_iters or cfg.eval_iters
    model.eval()
    out: dict[str, float | None] = {}
    data = batches.data
    for split_no, split in enumerate(("train", "val")):
        if data.num_tokens(split) < 2:
            out[split] = None
            continue
        if not batches.dialogue and data.num_tokens(split) <= batches.block_size:
            out[split] = evaluate_split(model, batches, split, cfg.batch_size, device, amp_dtype)
            continue
        losses = []
        for k in range(eval_iters):
            rng = np.random.default_rng([cfg.seed, 1_000_000 + split_no, k])
            x, y, seg = batches.get(split, cfg.batch_size, rng)
            with autocast(device, amp_dtype):
                _, loss = forward(model, x.to(device), y.to(device), None if seg is None else seg.to(device))
            if math.isfinite(loss.item()):  # a batch with no target at all has a nan mean
                losses.append(loss.item())
        out[split] = float(np.mean(losses)) if losses else None
    model.train()
    return out


def evaluate_split(model, batches: Batches, split: str, batch_size: int, device, amp_dtype=None) -> float:
    """Mean loss per target token over the whole of ``split``."""
    return evaluate_split_until(model, batches, split, batch_size, device, amp_dtype)[0]


@torch.no_grad()
def evaluate_split_until(model, batches: Batches, split: str, batch_size: int, device, amp_dtype=None, *,
                         deadline: float | None = None, progress: bool = False) -> tuple[float, float]:
    """Mean loss per target token over ``split`` from its start, stopping after the batch that passes
    ``deadline`` (a ``time.perf_counter()`` time); returns (loss, the share of the split's tokens it covered:
    1.0 = all of it). ``progress`` shows a tqdm bar over the split's tokens."""
    was_training = model.training
    model.eval()
    total, count, seen, n_tokens = 0.0, 0, 0, max(1, batches.data.num_tokens(split))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc=f"评估 eval {split}", dynamic_ncols=True)
    for x, y, seg in batches.whole_split(split, batch_size):
        if deadline is not None and count and time.perf_counter() >= deadline:
            break
        step_tokens = x.numel()
        x, y = x.to(device), y.to(device)
        with autocast(device, amp_dtype):
            logits, _ = model(x) if seg is None else model(x, segments=seg.to(device))
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
        total += nll.item()
        count += int((y != IGNORE_INDEX).sum())
        if bar is not None:
            bar.update(max(0, min(step_tokens, n_tokens - seen)))
        seen += step_tokens
    else:  # the whole split
        if bar is not None:
            bar.update(n_tokens - bar.n)
        seen = n_tokens
    if bar is not None:
        bar.close()
    model.train(was_training)
    if count == 0:
        raise ZaizaiError(f"the {split} split has no tokens to evaluate")
    return total / count, min(1.0, seen / n_tokens)
