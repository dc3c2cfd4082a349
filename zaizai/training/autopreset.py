"""The `auto` preset (the default): the model size, batch and learning rate that should learn most in this run,
chosen from ``AUTO_CANDIDATES`` (config.py) before the run starts.

- Corpus size. A candidate is eligible when the training split holds at least ``MIN_TOKENS_PER_PARAM`` tokens per
  parameter of its blocks (a larger model would only learn a small corpus by heart). A run without ``--max-time``
  takes the largest eligible candidate: nothing is timed, so the same data always gets the same model.
- Budget. A ``--max-time`` run on a CPU (one process) times a training step of each eligible candidate, smallest
  first (the modern block with Muon, the corpus's vocabulary, the run's precision and threads), for at most
  ``MEASURE_SECONDS`` (and ``MEASURE_SHARE`` of the budget) that count inside the budget; a candidate left
  untimed is predicted from the last one timed by its arithmetic. From its speed, each candidate's tokens in the
  budget follow (the periodic and final evaluations left out); the one with the lowest predicted loss
  ``A / N^alpha + B / D^beta`` (N: parameters of the blocks, D: tokens trained, at most ``MAX_EPOCHS`` passes over
  the corpus; Chinchilla's form, Hoffmann et al. 2022, fitted to runs on Tang: ``LOSS_FIT``) wins. On a GPU or
  under torchrun it is the corpus rule.
- Same machine, same choice: a speed is replaced by the middle of its bucket (an eighth of an octave, 9% wide)
  before it is used, so the noise of a few timed steps changes the choice only for a machine right at a
  bucket's edge, where the candidates' predicted losses are close anyway.

The choice goes into the run's configs (config.json, every checkpoint): --resume keeps it and measures nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from ..common.device import autocast, autocast_dtype
from ..common.distributed import Distributed
from ..common.errors import ZaizaiError
from ..models import build_model
from .cadence import EVAL_SHARE, FINAL_SHARE, FORWARD_COST
from .config import AUTO_CANDIDATES, AUTO_COMMON, PRESETS, ModelConfig, resolve_config
from .optim import configure_optimizer, hidden_matrices
from .plan import Plan, refit_plan

# The rule's knobs (the candidates themselves are AUTO_CANDIDATES in config.py).
MIN_TOKENS_PER_PARAM = 4.0   # corpus tokens per parameter of the blocks a candidate needs to be eligible
MAX_EPOCHS = 4.0             # passes over the corpus that still count as new data in the loss prediction
# Predicted loss A / N^alpha + B / D^beta (+ E, which no choice depends on). Chinchilla's exponents; A and B
# fitted (least squares, with E = 3.35) to this project's own runs of the candidates on Tang (fp32, whole-val
# nats/char, bench/time_to_quality.py): 2x128 after 258k and 1.13M tokens (5.491, 4.892), 4x128 after 668k and
# 2.38M (5.018, 4.572); every run within 0.013 of the fit. Chinchilla's own A and B (406.4, 410.7), used before,
# weigh the model's size about twice as much against the tokens: they chose 4x128 for 210 s on Tang, which
# reached 5.018 where 2x128 reached 4.892.
LOSS_FIT = dict(A=26.3, B=59.8, alpha=0.34, beta=0.28)
MEASURE_SECONDS = 5.0        # timing all candidates takes at most this long ...
MEASURE_SHARE = 0.05         # ... and at most this share of the --max-time budget
TIMED_STEPS = 2              # timed steps per candidate after one warm-up step; the fastest one counts
BUCKETS_PER_OCTAVE = 8       # a measured speed counts as the middle of its 1/8 octave (bucket())
WARMUP_SHARE = 0.1           # warmup_iters: this share of the expected steps, at most AUTO_COMMON's


@dataclass
class Candidate:
    name: str
    model_config: ModelConfig
    table: dict                   # AUTO_COMMON + the candidate's row
    params: int                   # parameters of the blocks (matrices Muon trains; no embeddings)
    flops: float                  # per token, forward + backward (for predicting an untimed candidate's speed)
    tokens_per_step: int
    rows: int                     # batch rows of one forward/backward (a timed step is one of these)
    speed: float | None = None    # tokens/s, bucketed
    timed: bool = False
    tokens: float = 0.0           # tokens it would train in the budget
    loss: float | None = None     # predicted


def fit_auto_preset(plan: Plan, device: torch.device, dist: Distributed, *, started: float,
                    verbose: bool = True) -> Plan:
    """``plan`` with the `auto` preset's choice applied (a no-op for any other preset or a resumed run)."""
    if not plan.auto:
        return plan
    cfg = plan.train_config
    candidates = [c for c in (_candidate(name, plan) for name in AUTO_CANDIDATES) if c is not None]
    if not candidates:  # the flags fit no candidate: the default's own error says why
        return refit_plan(plan, PRESETS["auto"])
    train_tokens = plan.data.num_tokens("train")
    eligible = [c for c in candidates if train_tokens >= MIN_TOKENS_PER_PARAM * c.params] or candidates[:1]
    timed = bool(cfg.max_time) and device.type == "cpu" and not dist.enabled
    if timed:
        allowance = min(MEASURE_SECONDS, MEASURE_SHARE * cfg.max_time)
        _measure(eligible, device, autocast_dtype(device, cfg.dtype), allowance)
        remaining = max(0.0, cfg.max_time - (time.perf_counter() - started))
        for c in eligible:
            _predict(c, remaining, train_tokens, plan.data.num_tokens("val"))
        chosen = min(eligible, key=lambda c: (c.loss, c.params))
        steps = chosen.tokens / chosen.tokens_per_step
    else:
        chosen = eligible[-1]
        steps = cfg.max_iters or 0
    table = dict(chosen.table)
    if steps:
        table["warmup_iters"] = max(1, min(AUTO_COMMON["warmup_iters"], round(WARMUP_SHARE * steps)))
    fitted = refit_plan(plan, table)
    if verbose and dist.is_main:
        print(_describe_choice(fitted, chosen, eligible, candidates, train_tokens, timed), flush=True)
    return fitted


def _candidate(name: str, plan: Plan) -> Candidate | None:
    """A candidate as this run would train it (the user's own flags and config file still win); None when that
    does not fit: a model the flags make invalid, a block longer than the training split."""
    table = {**AUTO_COMMON, **AUTO_CANDIDATES[name]}
    options = {**plan.options, "data_dir": plan.train_config.data_dir, "out_dir": plan.train_config.out_dir}
    mcfg, tcfg = resolve_config(options, plan.config_file, preset_table=table)
    mcfg.vocab_size = plan.data.tokenizer.vocab_size
    try:
        mcfg.validate()
    except ZaizaiError:
        return None
    if plan.data.kind != "dialogue" and plan.data.num_tokens("train") <= mcfg.block_size:
        return None
    with torch.random.fork_rng(devices=[]):  # its blocks only: the parameters counted do not depend on the vocab
        params = sum(p.numel() for p in hidden_matrices(build_model(replace(mcfg, vocab_size=2))))
    width = mcfg.n_embd
    flops = 6.0 * (params + mcfg.vocab_size * width) + 6.0 * mcfg.n_layer * mcfg.block_size * width
    return Candidate(name, mcfg, {**table, "optimizer": tcfg.optimizer}, params, flops,
                     tokens_per_step=tcfg.batch_size * tcfg.grad_accum * mcfg.block_size, rows=tcfg.batch_size)


def bucket(tokens_per_second: float) -> float:
    """What the choice sees of a measured speed: the middle (geometric) of its eighth of an octave,
    [2^(k/8), 2^((k+1)/8)), so at most 4.4% off. Half-octave buckets (41% wide) were too coarse: on Tang
    (9.7k characters, the head's cost the same for both) 2x128 trains only ~1.3x faster than 4x128, and both
    fell into one bucket, so the choice lost the difference that decides it."""
    if tokens_per_second <= 0:
        return 0.0
    return 2.0 ** ((math.floor(BUCKETS_PER_OCTAVE * math.log2(tokens_per_second)) + 0.5) / BUCKETS_PER_OCTAVE)


def _measure(candidates: list[Candidate], device: torch.device, amp_dtype, allowance: float) -> None:
    """Each candidate's tokens/s (bucketed), smallest first, within ``allowance`` seconds; the rest predicted.
    While time is left, the timed ones are timed again, in turn, and each keeps its fastest: a slow moment of the
    machine (another program, a run just ending) then does not fall on one candidate alone."""
    begin = time.perf_counter()
    raw: dict[str, float] = {}  # name -> tokens/s as timed

    def fits(c: Candidate, speed: float) -> bool:  # its timing (warm-up included) fits in what is left
        return time.perf_counter() - begin + (TIMED_STEPS + 1) * c.rows * c.model_config.block_size / speed <= allowance

    def timed(c: Candidate) -> float:
        return time_candidate(c.model_config, c.table, device, amp_dtype, deadline=begin + allowance, rows=c.rows)

    last = None
    for c in candidates:
        if last is not None and not fits(c, raw[last.name] * last.flops / c.flops):
            break
        raw[c.name], c.timed, last = timed(c), True, c
    for c in [c for c in candidates if c.timed]:  # again, in turn, while each fits in what is left
        if not fits(c, raw[c.name]):
            break
        raw[c.name] = max(raw[c.name], timed(c))
    for c in candidates:  # the untimed ones come after the last timed one: predicted from it
        c.speed = bucket(raw[c.name] if c.timed else last.speed * last.flops / c.flops)


def time_candidate(mcfg: ModelConfig, table: dict, device: torch.device, amp_dtype,
                   deadline: float = math.inf, rows: int = 1) -> float:
    """Tokens/s of a training step (forward, backward, optimizer) of this model on ``rows`` random rows, the run's
    own batch: the fastest of TIMED_STEPS steps after a warm-up one (the warm-up alone once the perf_counter
    ``deadline`` has passed). The global random state is left as it was.

    The whole batch, not a smaller one: a step's fixed costs (the optimizer, Muon's orthogonalisation, the
    launches) weigh more on fewer tokens, and more for a larger model. Timed with 512 tokens instead of the runs'
    2,048 (1 thread), 6x256 came out 31% slower than it trains, 2x128 5%: the choice leaned to small models."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(mcfg).to(device).train()
        optimizer = configure_optimizer(model, lr=table["lr"], weight_decay=0.1, device_type=device.type,
                                        optimizer=table["optimizer"])
        x = torch.randint(mcfg.vocab_size, (rows, mcfg.block_size + 1), device=device)
        best = math.inf
        for step in range(TIMED_STEPS + 1):
            t0 = time.perf_counter()
            with autocast(device, amp_dtype):
                _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds, late = time.perf_counter() - t0, time.perf_counter() >= deadline
            if step or late:  # the warm-up step counts only when there is no time for another
                best = min(best, seconds)
            if late:
                break
    return rows * mcfg.block_size / best


def _predict(c: Candidate, seconds: float, train_tokens: int, val_tokens: int) -> None:
    """The tokens ``c`` would train in ``seconds`` (the final evaluation and the periodic ones left out), and the
    loss that predicts."""
    final = min(FINAL_SHARE * seconds, val_tokens * FORWARD_COST / c.speed)
    c.tokens = (1 - EVAL_SHARE) * max(0.0, seconds - final) * c.speed
    data = max(1.0, min(c.tokens, MAX_EPOCHS * train_tokens))
    fit = LOSS_FIT
    c.loss = fit["A"] / c.params ** fit["alpha"] + fit["B"] / data ** fit["beta"]


def _describe_choice(plan: Plan, chosen: Candidate, eligible: list[Candidate], candidates: list[Candidate],
                     train_tokens: int, timed: bool) -> str:
    mcfg, cfg = plan.model_config, plan.train_config
    what = (f"自动预设 auto preset: {chosen.name} = {mcfg.model} {mcfg.n_layer} layers x {mcfg.n_embd}, block "
            f"{mcfg.block_size}, batch {cfg.batch_size}, lr {cfg.lr:g}, {cfg.optimizer}, warmup {cfg.warmup_iters}")
    left_out = [c.name for c in candidates if c not in eligible]
    corpus = f"; {'/'.join(left_out)}: corpus of {train_tokens:,} tokens too small" if left_out else ""
    if not timed:
        why = ("no --max-time" if not cfg.max_time else "not timed on this device")
        return f"{what} · the largest candidate for the corpus ({why}{corpus})"
    speeds = "; ".join(f"{c.name} {c.speed / 1000:.1f}k{'' if c.timed else '*'} tok/s -> {c.tokens / 1e6:.2f}M "
                       f"tokens, score {c.loss:.2f}" for c in eligible)
    untimed = " (* predicted from the arithmetic, not timed)" if not all(c.timed for c in eligible) else ""
    return f"{what} · lowest predicted loss in {cfg.max_time:g} s: {speeds}{untimed}{corpus}"
