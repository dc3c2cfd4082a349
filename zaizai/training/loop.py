"""The training loop: AdamW, warmup + cosine schedule fitted to steps or wall clock, evaluation,
checkpoints, metrics, exact resume.

It reads top to bottom like nanoGPT's ``train.py``: :func:`train` plans the run (configs, data, the checkpoint
it resumes), :func:`_setup` builds the model, optimizer and run state, :func:`_loop` calls :func:`train_step`
once per optimizer step and :func:`evaluate_and_save` every ``eval_interval`` steps, and :func:`_finish`
evaluates the whole validation split and reports.

Every random draw of a step is seeded from (seed, step), so a run that is stopped and resumed from its
``last`` checkpoint computes exactly the same losses as one that never stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..common.device import autocast, autocast_dtype, enable_tf32, resolve_device, set_threads, tune_glibc_malloc
from ..common.distributed import (Distributed, agree, distributed_device, distributed_from_env, gradient_sync,
                                  mean_over_replicas, on_main, process_group, replica_max_diff, replicate)
from ..common.errors import ZaizaiError
from ..common.fileio import remove_stale_temps
from ..data.batches import Batches
from ..models import build_model
from .autopreset import fit_auto_preset
from .cadence import SAVE_SECONDS, fit_to_steps, fit_to_time, time_to_probe
from .checkpoint import BEST, LAST, save_checkpoint
from .config import ModelConfig, TrainConfig
from .evaluation import estimate_loss, evaluate_split_until, forward
from .metrics import PlotThrottle, append_metrics, read_metrics, truncate_metrics
from .optim import configure_optimizer
from .plan import FULL_EVAL_MAX_TOKENS, Plan, nothing_left_to_do, plan_run, prepare_out_dir, write_run_files
from .progress import ProgressBar, StopFlag

Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (x, y, segments or None)


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    tokens_seen: int
    elapsed: float
    train_loss: float | None
    val_loss: float | None          # last estimate (eval_iters batches)
    best_val_loss: float | None
    full_val_loss: float | None     # over the whole validation split, at the end
    full_val_bpc: float | None
    stopped_by: str                 # max_iters | max_time | interrupt
    replica_max_diff: float | None = None  # under torchrun: largest parameter difference between ranks (0)
    full_val_share: float | None = None    # the share of the val split full_val_loss covers (< 1: --max-time cut it)


@dataclass
class RunState:
    """How far a run has got: saved in every checkpoint, so that --resume continues where it stopped."""

    step: int = 0                          # optimizer steps taken
    tokens_seen: int = 0
    elapsed: float = 0.0                   # seconds of training, over every resumed part of the run
    best_val_loss: float | None = None     # lowest loss estimate so far (val; train when there is no val split)
    data_kind: str = "plain"               # the data's kind: plain | dialogue (a chat model)
    replica_max_diff: float | None = None  # under torchrun, measured at the end of the run
    full_val_loss: float | None = None     # over the whole val split, at the end of the run
    eval_interval: int | None = None       # the cadence in use (fitted, see cadence.py, or --eval-interval) ...
    eval_iters: int | None = None          # ... so that a resumed run keeps it
    final_reserve: float = 0.0             # seconds of --max-time kept for the final evaluation

    def to_dict(self) -> dict:
        """The checkpoint's ``state``; the cadence once chosen, the two end-of-run figures once measured."""
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                 "best_val_loss": self.best_val_loss, "data_kind": self.data_kind}
        if self.final_reserve:
            state["final_reserve"] = self.final_reserve
        for name in ("eval_interval", "eval_iters", "replica_max_diff", "full_val_loss"):
            if getattr(self, name) is not None:
                state[name] = getattr(self, name)
        return state

    @classmethod
    def from_dict(cls, state: dict) -> RunState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


@dataclass
class Run:
    """The fixed parts of a run, built once by :func:`_setup`."""

    model_config: ModelConfig
    cfg: TrainConfig
    model: torch.nn.Module          # the plain module: checkpoints and evaluation use it
    step_model: torch.nn.Module     # what trains: the model, compiled (--compile) and/or in DDP (torchrun)
    optimizer: torch.optim.Optimizer
    batches: Batches
    device: torch.device
    amp_dtype: torch.dtype | None
    dist: Distributed
    out: Path
    plots: PlotThrottle             # redraws loss.png, at most a small share of the run's time

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on, all processes together."""
        return self.cfg.batch_size * self.dist.world_size * self.model_config.block_size * self.cfg.grad_accum


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_iters`` steps, times a cosine from lr down to min_lr over progress 0..1.

    ``progress`` is the larger of step/max_iters and elapsed/max_time, so a wall-clock budget gets a full
    decay just as a step budget does.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
    p = min(max(progress, 0.0), 1.0)
    lo = cfg.min_lr_value
    return warm * (lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * p)))


def _progress(step: int, elapsed: float, cfg: TrainConfig, final_reserve: float = 0.0) -> float:
    """How far the run is, 0..1; a --max-time run's training ends ``final_reserve`` s before the budget."""
    parts = []
    if cfg.max_iters:
        parts.append(step / cfg.max_iters)
    if cfg.max_time:
        parts.append(elapsed / max(cfg.max_time - final_reserve, 1e-9))
    return max(parts)


def _step_seed(seed: int, step: int, rank: int = 0) -> int:
    # Distinct, reproducible torch seed per step (dropout); independent of how the run was split up.
    # Under torchrun each rank drops out differently (rank 0 as a single process does).
    return (seed * 1_000_003 + step + rank * 7_919_000_003) % (2**63 - 1)


def train(data_dir: str | Path | None = None, out_dir: str | Path | None = None, *,
          config_file: str | Path | None = None, verbose: bool = True,
          on_step: Callable[[dict], bool | None] | None = None, **options) -> TrainResult:
    """Train a model on a folder made by :func:`zaizai.prepare`; checkpoints and metrics go to ``out_dir``.

    ``options`` are any fields of :class:`ModelConfig` and :class:`TrainConfig` (``model="gpt"``,
    ``max_iters=2000``, ``preset="cpu"``, ``resume=True`` ...). ``on_step(state)`` is called after every
    optimizer step; returning True stops the run as Ctrl-C does (evaluate, save ``last``, return).
    Returns a :class:`TrainResult`.
    """
    started = time.perf_counter()  # a --max-time budget is the call's wall time: setup and final pass included
    plan = plan_run(data_dir, out_dir, config_file, options)
    cfg = plan.train_config
    dist = distributed_from_env()
    finished = nothing_left_to_do(plan)
    if finished is not None:
        return _already_finished(plan, finished, dist, verbose)
    set_threads(cfg.threads, dist.local_world_size if dist.enabled else 1)
    device = distributed_device(cfg.device, dist) if dist.enabled else resolve_device(cfg.device)
    plan = fit_auto_preset(plan, device, dist, started=started, verbose=verbose)  # `auto`: size, batch, lr
    with process_group(dist, device):
        run, state = _setup(plan, dist, device, verbose, started)
        stopped_by, last_eval, replica_diff, deadline = _loop(run, state, started, verbose=verbose, on_step=on_step)
        return _finish(run, state, stopped_by=stopped_by, last_eval=last_eval, replica_diff=replica_diff,
                       deadline=deadline, verbose=verbose)


def _already_finished(plan: Plan, last_record: dict, dist: Distributed, verbose: bool) -> TrainResult:
    """--resume of a run that has reached its stopping point, final evaluation recorded: say so, write nothing."""
    cfg, state = plan.train_config, RunState.from_dict(plan.resume_from.state)
    out = Path(cfg.out_dir)
    if dist.is_main:
        remove_stale_temps(out)
    stopped_by = _stop_reason(cfg, state.step, state.elapsed, False, state.final_reserve) or "max_iters"
    if verbose and dist.is_main:
        limit = f"--max-iters {cfg.max_iters}" if stopped_by == "max_iters" else f"--max-time {cfg.max_time:g}"
        print(f"已完成 nothing to do: the run in {out} already reached {limit} at step {state.step}; "
              "raise --max-iters or --max-time to train further")
    full = state.full_val_loss
    return TrainResult(out_dir=out, step=state.step, tokens_seen=state.tokens_seen, elapsed=state.elapsed,
                       train_loss=last_record.get("train_loss"), val_loss=last_record.get("val_loss"),
                       best_val_loss=state.best_val_loss, full_val_loss=full, stopped_by=stopped_by,
                       full_val_bpc=None if full is None else plan.data.bits_per_char("val", full, loss_on=cfg.loss_on),
                       replica_max_diff=state.replica_max_diff, full_val_share=None if full is None else 1.0)


def _setup(plan: Plan, dist: Distributed, device: torch.device, verbose: bool,
           started: float) -> tuple[Run, RunState]:
    """Build the model and optimizer (loaded from the checkpoint when resuming), then write the run's files.

    Under torchrun every rank runs the whole run; rank 0 alone writes files and prints, the others wait for it
    where it does (``on_main``).
    """
    mcfg, cfg, data = plan.model_config, plan.train_config, plan.data
    resume = plan.resume_from
    out = Path(cfg.out_dir)
    amp_dtype = autocast_dtype(device, cfg.dtype)
    if device.type == "cpu":
        tune_glibc_malloc()
    if device.type == "cuda":
        enable_tf32()

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    optimizer = configure_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    betas=(cfg.beta1, cfg.beta2), device_type=device.type, optimizer=cfg.optimizer)
    state = RunState(data_kind=data.kind)
    if plan.init_from is not None:
        model.load_state_dict(plan.init_from.model_state)
    if resume is not None:
        model.load_state_dict(resume.model_state)
        if resume.optimizer_state is not None:
            optimizer.load_state_dict(resume.optimizer_state)
        state = RunState.from_dict({**state.to_dict(), **resume.state})
    spent, _ = agree(dist, time.perf_counter() - started, False, device)
    if cfg.max_time and resume is None and spent >= cfg.max_time:  # nothing written yet
        raise ZaizaiError(f"--max-time {cfg.max_time:g} s is used up before the first step (getting ready took "
                          f"{spent:.1f} s); give it more seconds")
    on_main(dist, lambda: prepare_out_dir(out, cfg, resuming=resume is not None))
    if resume is not None and dist.is_main:
        truncate_metrics(out, state.step)
    if cfg.eval_interval:  # given (flag, config file, call): it wins, also over a resumed run's
        state.eval_interval, state.eval_iters = cfg.eval_interval, cfg.eval_iters
    elif state.eval_interval is None and not cfg.max_time:  # a --max-time run fits once it has timed a few steps
        fitted = fit_to_steps(cfg, cfg.max_iters)
        state.eval_interval, state.eval_iters = fitted.eval_interval, fitted.eval_iters
    step_model = torch.compile(model) if cfg.compile else model
    if dist.enabled:
        step_model = replicate(step_model, device)
    if dist.is_main:
        write_run_files(out, mcfg, cfg, data, dist.world_size)

    run = Run(mcfg, cfg, model, step_model, optimizer, device=device, amp_dtype=amp_dtype, dist=dist, out=out,
              plots=PlotThrottle(),
              batches=Batches(data, mcfg.block_size, packed=bool(getattr(model, "supports_segments", False)),
                              loss_on=cfg.loss_on))
    if verbose and dist.is_main:
        _describe(run, resuming_at=state.step if resume is not None else None)
    return run, state


def _describe(run: Run, resuming_at: int | None) -> None:
    mcfg, cfg, dist = run.model_config, run.cfg, run.dist
    n_params = sum(p.numel() for p in run.model.parameters())
    precision = {None: "float32", torch.bfloat16: "bfloat16 autocast",
                 torch.float16: "float16 autocast"}[run.amp_dtype]
    shape = ("a vocab x vocab table" if mcfg.model == "bigram"  # it has no layers or width
             else f"{mcfg.n_layer} layers · n_embd {mcfg.n_embd}")
    print(f"模型 model: {mcfg.model} · {n_params / 1e6:.2f}M 参数 parameters · {shape} · block {mcfg.block_size} · "
          f"vocab {mcfg.vocab_size}")
    threads = torch.get_num_threads()
    print(f"设备 device: {run.device} · {precision} · {threads} thread{'' if threads == 1 else 's'} · preset {cfg.preset}"
          + (f" · {dist.world_size} processes (DDP, {torch.distributed.get_backend()}), batch "
             f"{cfg.batch_size} per process" if dist.enabled else "")
          + (f" · resuming at step {resuming_at}" if resuming_at is not None else ""))


def _loop(run: Run, state: RunState, started: float, *, verbose: bool,
          on_step: Callable[[dict], bool | None] | None) -> tuple[str, dict, float | None, float | None]:
    """Optimizer steps until a stopping point, evaluating and saving every ``eval_interval`` steps and at the end.

    Returns why it stopped (max_iters | max_time | interrupt), the last metrics record, under torchrun the
    largest parameter difference between the ranks, and the --max-time budget's end (a perf_counter time).
    The run's clock starts at ``started`` (when :func:`train` was called), so the setup counts too.
    """
    cfg, dist = run.cfg, run.dist
    tokens_per_step = run.tokens_per_step
    bar = ProgressBar(cfg, state.step, state.elapsed, enabled=verbose and dist.is_main)
    last_eval = _resumed_eval(run, state, bar)
    train_time_since_eval, tokens_since_eval = 0.0, 0
    stop = StopFlag()
    run.model.train()
    first_step, probe = state.step, None  # probe: (step, elapsed) after this process's first (warm-up) step
    with stop.installed():
        t_start = started - state.elapsed
        while True:
            elapsed, stop.requested = agree(dist, time.perf_counter() - t_start, stop.requested, run.device)
            if cfg.max_time and not state.final_reserve and state.step > first_step:  # agreed: ranks fit alike
                probe = probe or (state.step, elapsed)
                _fit_to_time(run, state, probe, elapsed)
            stopped_by = _stop_reason(cfg, state.step, elapsed, stop.requested, state.final_reserve)
            if stopped_by is not None:
                break
            lr = lr_at(state.step, _progress(state.step, elapsed, cfg, state.final_reserve), cfg)
            t0 = time.perf_counter()
            torch.manual_seed(_step_seed(cfg.seed, state.step, dist.rank))
            loss = train_step(run.step_model, run.optimizer, _micro_batches(run, state.step), lr=lr,
                              grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, device=run.device,
                              amp_dtype=run.amp_dtype)
            if not math.isfinite(loss):
                bar.close()
                raise ZaizaiError(f"the loss became {loss} at step {state.step}; the run stopped and " + (
                    f"the last good checkpoint in {run.out} is kept; lower --lr (now {cfg.lr:g}) or try --dtype "
                    "float32, then --resume" if (run.out / LAST).is_file() else
                    f"no checkpoint was saved yet; lower --lr (now {cfg.lr:g}) or try --dtype float32 and start "
                    "the run again"))
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens_seen += tokens_per_step
            state.elapsed = time.perf_counter() - t_start
            train_time_since_eval += dt
            tokens_since_eval += tokens_per_step
            bar.update(state.step, state.elapsed, loss, tokens_per_step / dt if dt > 0 else 0.0, lr)
            if on_step is not None and on_step(state.to_dict()):
                stop.requested = True

            if state.eval_interval and state.step % state.eval_interval == 0:
                last_eval = evaluate_and_save(run, state, lr=lr, bar=bar,
                                              tokens_per_second=tokens_since_eval / max(train_time_since_eval, 1e-9))
                train_time_since_eval, tokens_since_eval = 0.0, 0

        replica_diff = None
        if dist.enabled:
            replica_diff = state.replica_max_diff = replica_max_diff(run.model)
        if last_eval.get("step") != state.step and state.step > 0:
            last_eval = evaluate_and_save(run, state, lr=lr_at(state.step, 1.0, cfg), bar=bar,
                                          tokens_per_second=tokens_since_eval / max(train_time_since_eval, 1e-9))
        on_main(dist, lambda: run.plots.flush(run.out))
        bar.close()
    return stopped_by, last_eval, replica_diff, (t_start + cfg.max_time if cfg.max_time else None)


def _resumed_eval(run: Run, state: RunState, bar: ProgressBar) -> dict:
    """A resumed run's record of the step it resumes at: the one in metrics.jsonl (so the end of the run does not
    record it again), or, when the kill came between the checkpoint and its record, that evaluation made again
    (the same batches, the same weights: the same losses)."""
    if not state.step:
        return {}
    recorded = on_main(run.dist, lambda: [r for r in read_metrics(run.out) if r.get("step") == state.step])
    if recorded:
        return recorded[-1]
    if state.eval_interval and state.step % state.eval_interval == 0:
        before = state.step - 1
        lr = lr_at(before, _progress(before, state.elapsed, run.cfg, state.final_reserve), run.cfg)
        return evaluate_and_save(run, state, lr=lr, bar=bar, tokens_per_second=0.0)
    return {}


def _fit_to_time(run: Run, state: RunState, probe: tuple[int, float], elapsed: float) -> None:
    """Once a --max-time run has timed a few steps: the time kept for its final evaluation, and its cadence
    unless one was given or resumed (until then it does not evaluate)."""
    cfg, steps_timed = run.cfg, state.step - probe[0]
    if not time_to_probe(cfg, steps_timed, elapsed - probe[1]):
        return
    step_seconds = (elapsed - probe[1]) / steps_timed
    val_tokens = run.batches.data.num_tokens("val")
    final_tokens = 2 * cfg.eval_iters * cfg.batch_size * run.model_config.block_size  # the last estimate
    if 1 < val_tokens <= FULL_EVAL_MAX_TOKENS:
        final_tokens += val_tokens
    fitted = fit_to_time(cfg, state.step, elapsed, step_seconds, final_tokens, run.tokens_per_step)
    state.final_reserve = fitted.final_reserve
    if state.eval_interval is None:
        state.eval_interval, state.eval_iters = fitted.eval_interval, fitted.eval_iters


def _stop_reason(cfg: TrainConfig, step: int, elapsed: float, stop_requested: bool,
                 final_reserve: float = 0.0) -> str | None:
    if cfg.max_iters and step >= cfg.max_iters:
        return "max_iters"
    if cfg.max_time and elapsed >= cfg.max_time - final_reserve:
        return "max_time"
    if stop_requested:
        return "interrupt"
    return None


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable[Batch], *,
               lr: float, grad_accum: int, grad_clip: float = 0.0, device: torch.device,
               amp_dtype: torch.dtype | None = None) -> float:
    """One optimizer step over ``grad_accum`` micro-batches (x, y, segments or None); returns the mean loss.

    The gradients add up to those of the micro-batches' union in one batch. Under DDP (``model`` wrapped in
    DistributedDataParallel) the loss is averaged over the ranks too, and gradients are all-reduced in the
    last micro-step's backward only. A loss that is not finite is returned without stepping: the weights stay
    the last good ones, for the caller to stop the run.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for micro, (x, y, seg) in enumerate(micro_batches):
        with gradient_sync(model, micro == grad_accum - 1):
            with autocast(device, amp_dtype):
                _, loss = forward(model, x, y, seg)
            (loss / grad_accum).backward()
        loss_sum += loss.detach().float()
    loss_sum = mean_over_replicas(loss_sum, model)  # a nan on any rank reaches all of them: they stop together
    mean_loss = loss_sum.item() / grad_accum
    if not math.isfinite(mean_loss):
        return mean_loss
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss


def _micro_batches(run: Run, step: int) -> Iterator[Batch]:
    """This rank's ``grad_accum`` micro-batches of ``step``, on the device, one at a time.

    The global batch of a micro-step depends on (seed, step, micro) only; rank r trains on rows
    r*B .. (r+1)*B - 1 of it, so N ranks with ``batch_size`` B follow one process with ``batch_size`` N * B.
    """
    cfg, world, rank = run.cfg, run.dist.world_size, run.dist.rank
    rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    for micro in range(cfg.grad_accum):
        x, y, seg = run.batches.get("train", cfg.batch_size * world, np.random.default_rng([cfg.seed, step, micro]))
        if world > 1:
            x, y, seg = x[rows], y[rows], None if seg is None else seg[rows]
        yield _to_device(x, run.device), _to_device(y, run.device), None if seg is None else _to_device(seg, run.device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def evaluate_and_save(run: Run, state: RunState, *, lr: float, tokens_per_second: float, bar: ProgressBar) -> dict:
    """Estimate the losses, save ``best`` (when they improved) and ``last``, append the metrics record and
    redraw loss.png (not more often than a small share of the time: the loop draws the last one). Rank 0 alone
    does this; the others wait and take its best loss. Returns the record."""
    record, state.best_val_loss = on_main(run.dist, lambda: _evaluate_and_save_here(
        run, state, lr=lr, tokens_per_second=tokens_per_second, bar=bar))
    return record


def _evaluate_and_save_here(run: Run, state: RunState, *, lr: float, tokens_per_second: float,
                            bar: ProgressBar) -> tuple[dict, float | None]:
    data, cfg = run.batches.data, run.cfg
    losses = estimate_loss(run.model, run.batches, cfg, run.device, run.amp_dtype, eval_iters=state.eval_iters)
    record = {
        "step": state.step,
        "tokens": state.tokens_seen,
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "train_bpc": None if losses["train"] is None else data.bits_per_char("train", losses["train"], loss_on=cfg.loss_on),
        "val_bpc": None if losses["val"] is None else data.bits_per_char("val", losses["val"], loss_on=cfg.loss_on),
        "lr": lr,
        "tokens_per_second": tokens_per_second,
        "elapsed": state.elapsed,
    }
    score = losses["val"] if losses["val"] is not None else losses["train"]
    improved = state.best_val_loss is None or score < state.best_val_loss
    if improved:
        state.best_val_loss = score
        _save(run, state, BEST, with_optimizer=False)
    _save(run, state, LAST, with_optimizer=True)
    append_metrics(run.out, record)
    run.plots.redraw(run.out)
    val = (f"val {losses['val']:.4f} nats · {record['val_bpc']:.3f} bits/char"
           if losses["val"] is not None else "no val split")
    bar.write(f"step {state.step:>6} · train {losses['train']:.4f} · {val} · "
              f"{tokens_per_second:,.0f} tok/s" + (" · best" if improved else ""))
    return record, state.best_val_loss


def _save(run: Run, state: RunState, name: str, *, with_optimizer: bool) -> None:
    save_checkpoint(run.out / name, run.model, model_config=run.model_config.to_dict(),
                    train_config=run.cfg.to_dict(), state=state.to_dict(),
                    optimizer=run.optimizer if with_optimizer else None)


def _finish(run: Run, state: RunState, *, stopped_by: str, last_eval: dict, replica_diff: float | None,
            deadline: float | None, verbose: bool) -> TrainResult:
    """Evaluate the whole validation split (when small enough; a --max-time run's pass stops at the budget's
    ``deadline``, leaving room to save, and then is a sample), say how the run ended, and sum it up."""
    cfg, data, out, world = run.cfg, run.batches.data, run.out, run.dist.world_size
    say = print if verbose and run.dist.is_main else (lambda *a, **k: None)
    full_val = full_bpc = share = None
    if 1 < data.num_tokens("val") <= FULL_EVAL_MAX_TOKENS and state.step > 0:
        def full_eval():
            cutoff = None if deadline is None else deadline - SAVE_SECONDS
            loss, share = evaluate_split_until(run.model, run.batches, "val", max(cfg.batch_size, 16), run.device,
                                               run.amp_dtype, deadline=cutoff, progress=verbose)
            state.full_val_loss = loss if share == 1.0 else None
            _save(run, state, LAST, with_optimizer=True)
            return loss, data.bits_per_char("val", loss, loss_on=cfg.loss_on), share

        full_val, full_bpc, share = on_main(run.dist, full_eval)
        if share == 1.0:
            say(f"整个验证集 whole val split: {full_val:.4f} nats/token · {full_bpc:.4f} bits/char")
        else:
            say(f"验证集样本 val sample (the first {share:.0%} of the split; --max-time ran out): "
                f"{full_val:.4f} nats/token · {full_bpc:.4f} bits/char")
    if replica_diff is not None:
        say(f"{world} 个进程参数一致 replicas agree: max |Δparam| = {replica_diff:g}" if replica_diff == 0 else
            f"警告 warning: the {world} processes' parameters differ by up to {replica_diff:g}")
    if stopped_by == "interrupt":
        say(f"已停止 stopped at step {state.step}; continue with: zaizai train --out {out} --resume")
    say(f"完成 done: step {state.step} · {state.tokens_seen:,} tokens · {state.elapsed:.0f}s · "
        f"checkpoints in {out}/")
    return TrainResult(out_dir=out, step=state.step, tokens_seen=state.tokens_seen, elapsed=state.elapsed,
                       train_loss=last_eval.get("train_loss"), val_loss=last_eval.get("val_loss"),
                       best_val_loss=state.best_val_loss, full_val_loss=full_val, full_val_bpc=full_bpc,
                       stopped_by=stopped_by, replica_max_diff=replica_diff, full_val_share=share)
