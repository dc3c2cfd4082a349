"""How often a run evaluates when ``--eval-interval`` is not given: about 20 loss estimates over the run, so that
even a one-minute run draws a curve, each estimate a small share of the run's time; and, for a ``--max-time``
run, how much of the budget to keep for the final evaluation so that the whole run ends within it.

A ``--max-iters`` run knows its length up front; a ``--max-time`` run times its first few steps, then fits.
The chosen values go into the run state (and so every checkpoint): a resumed run keeps them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import TrainConfig

EVALS_PER_RUN = 20     # loss estimates over a run whose interval is fitted
EVAL_SHARE = 0.15      # at most about this share of the run goes to the periodic loss estimates
PROBE_STEPS = 5        # a --max-time run times its steps (the first, warm-up, left out) until this many ...
PROBE_SHARE = 0.1      # ... or until this share of the budget has passed, whichever comes first
FORWARD_COST = 1 / 3   # an evaluation batch (forward only) costs about a third of a training micro-step
FINAL_SHARE = 0.25     # the final evaluation may keep at most this share of a --max-time budget
SAVE_SECONDS = 0.5     # room for the last checkpoint, metrics and loss.png after the final pass


@dataclass
class Cadence:
    eval_interval: int             # steps between loss estimates
    eval_iters: int                # batches per split per estimate (at most --eval-iters)
    final_reserve: float = 0.0     # seconds of a --max-time budget kept for the final evaluation


def fit_to_steps(cfg: TrainConfig, expected_steps: float) -> Cadence:
    """About EVALS_PER_RUN estimates over ``expected_steps`` steps, with eval_iters lowered so that they take at
    most about EVAL_SHARE of the run. The estimate's batches are the same ones every time, so even one batch per
    split draws a smooth curve: its changes are the model's, not sampling noise."""
    expected_steps = max(1.0, expected_steps)
    interval = max(1, round(expected_steps / EVALS_PER_RUN))
    evals = max(1.0, expected_steps / interval)
    # one estimate ~ 2 splits x eval_iters batches x FORWARD_COST / grad_accum steps; keep the sum under the share
    affordable = EVAL_SHARE / (1 - EVAL_SHARE) * expected_steps * cfg.grad_accum / (evals * 2 * FORWARD_COST)
    return Cadence(eval_interval=interval, eval_iters=max(1, min(cfg.eval_iters, math.floor(affordable))))


def fit_to_time(cfg: TrainConfig, step: int, elapsed: float, step_seconds: float, final_eval_tokens: int,
                tokens_per_step: int) -> Cadence:
    """Fit a --max-time run (``step`` steps done in ``elapsed`` s, ``step_seconds`` per step from now on).

    ``final_eval_tokens`` is the size of the final whole-split pass (0: none); its time is estimated from the
    step time (an eval token costs about FORWARD_COST of a training token) and kept out of the training budget.
    """
    token_seconds = step_seconds / max(1, tokens_per_step) * FORWARD_COST
    reserve = min(FINAL_SHARE * cfg.max_time, final_eval_tokens * token_seconds + SAVE_SECONDS)
    remaining = max(0.0, cfg.max_time - reserve - elapsed)
    steps = step + (1 - EVAL_SHARE) * remaining / max(step_seconds, 1e-9)
    if cfg.max_iters:
        steps = min(steps, cfg.max_iters)
    fitted = fit_to_steps(cfg, steps)
    fitted.final_reserve = reserve
    return fitted


def time_to_probe(cfg: TrainConfig, steps_timed: int, seconds_timed: float) -> bool:
    """Whether a --max-time run has timed enough steps (after its warm-up step) to fit its cadence."""
    return steps_timed >= PROBE_STEPS or (steps_timed >= 1 and seconds_timed >= PROBE_SHARE * cfg.max_time)
