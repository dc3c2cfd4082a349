"""The training loop: AdamW, warmup + cosine schedule fitted to steps or wall clock, evaluation,
checkpoints, metrics, exact resume.

Every random draw of a step is seeded from (seed, step), so a run that is stopped and resumed from its
``last`` checkpoint computes exactly the same losses as one that never stopped.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from .checkpoint import BEST, LAST, find_checkpoint, load_checkpoint, save_checkpoint
from .config import MODEL_FIELDS, TRAIN_FIELDS, ModelConfig, TrainConfig, resolve_config
from ..data.tokenizer import load_tokenizer
from ..data.batches import Batches
from ..data.preparation import TokenData
from ..common.device import (Distributed, autocast, autocast_dtype, available_cpus, distributed_device,
                     distributed_from_env, enable_tf32, resolve_device, tune_glibc_malloc)
from ..common.errors import ZaizaiError
from ..common.fileio import atomic_write_text
from .metrics import LOSS_PNG, METRICS, append_metrics, plot_losses, truncate_metrics
from ..models import build_model
from .optim import configure_optimizer

LN2 = math.log(2)
# Evaluate the whole validation split at the end of a run when it is at most this many tokens.
FULL_EVAL_MAX_TOKENS = 5_000_000


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


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_iters`` steps, times a cosine from lr down to min_lr over progress 0..1.

    ``progress`` is the larger of step/max_iters and elapsed/max_time, so a wall-clock budget gets a full
    decay just as a step budget does.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
    p = min(max(progress, 0.0), 1.0)
    lo = cfg.min_lr_value
    return warm * (lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * p)))


def _progress(step: int, elapsed: float, cfg: TrainConfig) -> float:
    parts = []
    if cfg.max_iters:
        parts.append(step / cfg.max_iters)
    if cfg.max_time:
        parts.append(elapsed / cfg.max_time)
    return max(parts)


def _step_seed(seed: int, step: int, rank: int = 0) -> int:
    # Distinct, reproducible torch seed per step (dropout); independent of how the run was split up.
    # Under torchrun each rank drops out differently (rank 0 as a single process does).
    return (seed * 1_000_003 + step + rank * 7_919_000_003) % (2**63 - 1)


def forward(model, x, y, segments):
    return model(x, y) if segments is None else model(x, y, segments=segments)


@torch.no_grad()
def estimate_loss(model, batches: Batches, cfg: TrainConfig, device, amp_dtype) -> dict:
    """Mean loss over ``eval_iters`` fixed batches of each split (the same batches at every evaluation)."""
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
        for k in range(cfg.eval_iters):
            rng = np.random.default_rng([cfg.seed, 1_000_000 + split_no, k])
            x, y, seg = batches.get(split, cfg.batch_size, rng)
            with autocast(device, amp_dtype):
                _, loss = forward(model, x.to(device), y.to(device), None if seg is None else seg.to(device))
            if math.isfinite(loss.item()):  # a batch with no target at all has a nan mean
                losses.append(loss.item())
        out[split] = float(np.mean(losses)) if losses else None
    model.train()
    return out


@torch.no_grad()
def evaluate_split(model, batches: Batches, split: str, batch_size: int, device, amp_dtype=None) -> float:
    """Mean loss per target token over the whole of ``split``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y, seg in batches.whole_split(split, batch_size):
        x, y = x.to(device), y.to(device)
        with autocast(device, amp_dtype):
            logits, _ = model(x) if seg is None else model(x, segments=seg.to(device))
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                                ignore_index=-1, reduction="sum")
        total += nll.item()
        count += int((y != -1).sum())
    model.train(was_training)
    if count == 0:
        raise ZaizaiError(f"the {split} split has no tokens to evaluate")
    return total / count


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self):
        self.requested = False

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _plan(data_dir, out_dir, config_file, options) -> tuple[ModelConfig, TrainConfig, Any]:
    """Work out the run's configs, and the checkpoint to resume from (or None)."""
    options = {k.replace("-", "_"): v for k, v in options.items() if v is not None}
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    if out_dir is not None:
        options["out_dir"] = str(out_dir)
    out = Path(options.get("out_dir", TrainConfig.out_dir))
    resume = bool(options.get("resume"))
    if not resume:
        mcfg, tcfg = resolve_config(options, config_file)
        if tcfg.init_from:
            init = load_checkpoint(find_checkpoint(Path(tcfg.init_from)), with_optimizer=False)
            for name in MODEL_FIELDS - {"dropout"}:
                if name in options and options[name] != init.model_config.get(name):
                    raise ZaizaiError(f"--init-from keeps the model's shape: {name} is "
                                      f"{init.model_config.get(name)} there; drop --{name.replace('_', '-')}")
            dropout = mcfg.dropout
            mcfg = ModelConfig.from_dict(init.model_config)
            mcfg.dropout = dropout
            return mcfg, tcfg, init
        return mcfg, tcfg, None
    last = out / LAST
    if not last.is_file():
        raise ZaizaiError(f"nothing to resume: {last} does not exist; drop --resume to start a new run")
    ckpt = load_checkpoint(last)
    for name in MODEL_FIELDS:
        if name in options and options[name] != ckpt.model_config.get(name):
            raise ZaizaiError(f"cannot change {name} when resuming (the checkpoint has "
                              f"{ckpt.model_config.get(name)}); start a new run with another --out")
    saved = {k: v for k, v in ckpt.train_config.items() if k in TRAIN_FIELDS}
    merged = {**saved, **{k: v for k, v in options.items() if k in TRAIN_FIELDS}}
    merged.update({k: v for k, v in ckpt.model_config.items() if k in MODEL_FIELDS})
    merged.update(resume=True, overwrite=False)
    mcfg, tcfg = resolve_config(merged)
    mcfg.vocab_size = ckpt.model_config["vocab_size"]
    return mcfg, tcfg, ckpt


def train(data_dir: str | Path | None = None, out_dir: str | Path | None = None, *,
          config_file: str | Path | None = None, verbose: bool = True,
          on_step: Callable[[dict], bool | None] | None = None, **options) -> TrainResult:
    """Train a model on a folder made by :func:`zaizai.prepare`; checkpoints and metrics go to ``out_dir``.

    ``options`` are any fields of :class:`ModelConfig` and :class:`TrainConfig` (``model="gpt"``,
    ``max_iters=2000``, ``preset="cpu"``, ``resume=True`` ...). ``on_step(state)`` is called after every
    optimizer step; returning True stops the run as Ctrl-C does (evaluate, save ``last``, return).
    Returns a :class:`TrainResult`.
    """
    mcfg, cfg, ckpt = _plan(data_dir, out_dir, config_file, options)
    if not cfg.data_dir:
        raise ZaizaiError("no data folder given; run `zaizai prepare CORPUS --out DATA_DIR` and pass DATA_DIR")
    cfg.validate()
    data = TokenData(cfg.data_dir)
    init = ckpt if cfg.init_from else None
    if init is not None:
        ckpt = None
        init_tokenizer = load_tokenizer(find_checkpoint(Path(cfg.init_from)).parent / "tokenizer.json")
        if init_tokenizer != data.tokenizer:
            raise ZaizaiError(f"{cfg.data_dir} was not prepared with the tokenizer of {cfg.init_from}; prepare it "
                              f"again with `zaizai prepare ... --tokenizer {cfg.init_from}`")
    if ckpt is None and init is None:
        mcfg.vocab_size = data.tokenizer.vocab_size
    elif data.tokenizer.vocab_size != mcfg.vocab_size:
        raise ZaizaiError(f"{cfg.data_dir} has a different tokenizer ({data.tokenizer.vocab_size} tokens) than "
                          f"the checkpoint ({mcfg.vocab_size}); resume with the data it was trained on")
    mcfg.validate()
    if data.kind != "dialogue" and data.num_tokens("train") <= mcfg.block_size:
        raise ZaizaiError(f"the training split has only {data.num_tokens('train')} tokens, fewer than "
                          f"block_size + 1 = {mcfg.block_size + 1}; use a smaller --block-size or more text")

    dist_env = distributed_from_env()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif dist_env.enabled:
        # torchrun sets OMP_NUM_THREADS=1; share the node's cores among its processes instead.
        torch.set_num_threads(max(1, available_cpus() // dist_env.local_world_size))
    device = distributed_device(cfg.device, dist_env) if dist_env.enabled else resolve_device(cfg.device)
    owns_group = False
    if dist_env.enabled and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.distributed.init_process_group(backend="nccl", device_id=device)
        else:
            torch.distributed.init_process_group(backend="gloo")
        owns_group = True
    try:
        result = _train(mcfg, cfg, ckpt, init, data, dist_env, device, verbose, on_step)
        if owns_group:
            # every rank done with the group (and its DDP reducer freed) before any rank tears it down;
            # without this a fast rank's teardown can abort a slower one's exit ("terminate called ...")
            gc.collect()
            torch.distributed.barrier()
        return result
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _train(mcfg: ModelConfig, cfg: TrainConfig, ckpt, init, data: TokenData, dist_env: Distributed,
           device: torch.device, verbose: bool, on_step) -> TrainResult:
    """The run itself, once configs, data and (under torchrun) the process group are ready.

    Under torchrun every rank runs this; rank 0 alone writes files and prints, the others wait for it where
    it does (``_on_main``). Each rank trains on its slice of a global batch that depends only on
    (seed, step, micro), so N ranks with ``batch_size`` B follow one process with ``batch_size`` N * B.
    """
    out = Path(cfg.out_dir)
    main = dist_env.is_main
    _on_main(dist_env, lambda: _prepare_out_dir(out, cfg, resuming=ckpt is not None))
    say = print if verbose and main else (lambda *a, **k: None)

    amp_dtype = autocast_dtype(device, cfg.dtype)
    if device.type == "cpu":
        tune_glibc_malloc()
    if device.type == "cuda":
        enable_tf32()

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    optimizer = configure_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    betas=(cfg.beta1, cfg.beta2), device_type=device.type)
    state = {"step": 0, "tokens_seen": 0, "elapsed": 0.0, "best_val_loss": None, "data_kind": data.kind}
    if init is not None:
        model.load_state_dict(init.model_state)
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
        state.update(ckpt.state)
        if main:
            truncate_metrics(out, state["step"])
    step_model = torch.compile(model) if cfg.compile else model
    if dist_env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # `model` stays the plain module: checkpoints, evaluation and clipping use it.
        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None,
                                             gradient_as_bucket_view=True)

    if main:
        data.tokenizer.save(out / "tokenizer.json")
        hf_config = Path(cfg.data_dir) / "tokenizer_config.json"  # lets transformers' AutoTokenizer load out/
        if hf_config.is_file():
            atomic_write_text(out / "tokenizer_config.json", hf_config.read_text(encoding="utf-8"))
        run_config = {"model": mcfg.to_dict(), "train": cfg.to_dict(), "data": data.meta,
                      "zaizai_version": __version__, "world_size": dist_env.world_size}
        atomic_write_text(out / "config.json", json.dumps(run_config, ensure_ascii=False, indent=2))

    n_params = sum(p.numel() for p in model.parameters())
    precision = {None: "float32", torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast"}[amp_dtype]
    say(f"模型 model: {mcfg.model} · {n_params / 1e6:.2f}M 参数 parameters · {mcfg.n_layer} layers · "
        f"n_embd {mcfg.n_embd} · block {mcfg.block_size} · vocab {mcfg.vocab_size}")
    say(f"设备 device: {device} · {precision} · {torch.get_num_threads()} threads · preset {cfg.preset}"
        + (f" · {dist_env.world_size} processes (DDP, {torch.distributed.get_backend()}), batch "
           f"{cfg.batch_size} per process" if dist_env.enabled else "")
        + (f" · resuming at step {state['step']}" if ckpt is not None else ""))

    def save(kind: str, with_optimizer: bool) -> None:
        save_checkpoint(out / kind, model, model_config=mcfg.to_dict(), train_config=cfg.to_dict(),
                        state=dict(state), optimizer=optimizer if with_optimizer else None)

    def evaluate_and_save(lr: float, tokens_per_second: float) -> dict:
        def on_main():
            record = _evaluate_and_save(model, batches, cfg, device, amp_dtype, state, out, save, lr,
                                        tokens_per_second, bar)
            return record, state["best_val_loss"]

        record, state["best_val_loss"] = _on_main(dist_env, on_main)
        return record

    batches = Batches(data, mcfg.block_size, packed=bool(getattr(model, "supports_segments", False)),
                      loss_on=cfg.loss_on)
    world, rank, per_rank = dist_env.world_size, dist_env.rank, cfg.batch_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    tokens_per_step = per_rank * world * mcfg.block_size * cfg.grad_accum
    bar = _ProgressBar(cfg, state, enabled=verbose and main)
    last_eval: dict = {}
    train_time_since_eval, tokens_since_eval = 0.0, 0
    stopped_by = "max_iters"
    stop = _StopFlag()
    model.train()
    with stop.installed():
        t_start = time.perf_counter() - state["elapsed"]
        while True:
            elapsed = time.perf_counter() - t_start
            if dist_env.enabled:
                # Every rank must take the same decisions: stop together, one lr schedule.
                elapsed, stop.requested = _agree(elapsed, stop.requested, device)
            if cfg.max_iters and state["step"] >= cfg.max_iters:
                stopped_by = "max_iters"
                break
            if cfg.max_time and elapsed >= cfg.max_time:
                stopped_by = "max_time"
                break
            if stop.requested:
                stopped_by = "interrupt"
                break
            step = state["step"]
            lr = lr_at(step, _progress(step, elapsed, cfg), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            torch.manual_seed(_step_seed(cfg.seed, step, rank))
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for micro in range(cfg.grad_accum):
                # The global batch of this micro-step depends on (seed, step, micro) only; rank r trains on
                # rows r*B .. (r+1)*B - 1 of it.
                x, y, seg = batches.get("train", per_rank * world, np.random.default_rng([cfg.seed, step, micro]))
                if world > 1:
                    x, y, seg = x[rows], y[rows], None if seg is None else seg[rows]
                x, y = _to_device(x, device), _to_device(y, device)
                seg = None if seg is None else _to_device(seg, device)
                # DDP all-reduces gradients in the backward pass; only the last micro-step's needs to.
                last_micro = micro == cfg.grad_accum - 1
                with (contextlib.nullcontext() if last_micro or world == 1 else step_model.no_sync()):
                    with autocast(device, amp_dtype):
                        _, loss = forward(step_model, x, y, seg)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
            if world > 1:
                torch.distributed.all_reduce(loss_sum)  # a nan on any rank reaches all of them: they stop together
                loss_sum /= world
            train_loss = loss_sum.item() / cfg.grad_accum
            if not math.isfinite(train_loss):
                bar.close()
                raise ZaizaiError(
                    f"the loss became {train_loss} at step {step}; the run stopped and the last good checkpoint "
                    f"in {out} is kept; lower --lr (now {cfg.lr:g}) or try --dtype float32, then --resume")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["tokens_seen"] += tokens_per_step
            state["elapsed"] = time.perf_counter() - t_start
            train_time_since_eval += dt
            tokens_since_eval += tokens_per_step
            bar.update(state, train_loss, tokens_per_step / dt if dt > 0 else 0.0, lr)
            if on_step is not None and on_step(dict(state)):
                stop.requested = True

            if state["step"] % cfg.eval_interval == 0:
                last_eval = evaluate_and_save(lr, tokens_since_eval / max(train_time_since_eval, 1e-9))
                train_time_since_eval, tokens_since_eval = 0.0, 0

        replica_diff = None
        if world > 1:
            replica_diff = _replica_max_diff(model)
            state["replica_max_diff"] = replica_diff
        if last_eval.get("step") != state["step"] and state["step"] > 0:
            last_eval = evaluate_and_save(lr_at(state["step"], 1.0, cfg),
                                          tokens_since_eval / max(train_time_since_eval, 1e-9))
        bar.close()

    full_val = full_bpc = None
    if 1 < data.num_tokens("val") <= FULL_EVAL_MAX_TOKENS and state["step"] > 0:
        def full_eval():
            loss = evaluate_split(model, batches, "val", max(cfg.batch_size, 16), device, amp_dtype)
            bpc = data.bits_per_char("val", loss, loss_on=cfg.loss_on)
            state["full_val_loss"] = loss
            save(LAST, with_optimizer=True)
            return loss, bpc

        full_val, full_bpc = _on_main(dist_env, full_eval)
        say(f"整个验证集 whole val split: {full_val:.4f} nats/token · {full_bpc:.4f} bits/char")
    if replica_diff is not None:
        say(f"{world} 个进程参数一致 replicas agree: max |Δparam| = {replica_diff:g}" if replica_diff == 0 else
            f"警告 warning: the {world} processes' parameters differ by up to {replica_diff:g}")
    if stopped_by == "interrupt":
        say(f"已停止 stopped at step {state['step']}; continue with: zaizai train --out {out} --resume")
    say(f"完成 done: step {state['step']} · {state['tokens_seen']:,} tokens · {state['elapsed']:.0f}s · "
        f"checkpoints in {out}/")
    return TrainResult(out_dir=out, step=state["step"], tokens_seen=state["tokens_seen"], elapsed=state["elapsed"],
                       train_loss=last_eval.get("train_loss"), val_loss=last_eval.get("val_loss"),
                       best_val_loss=state.get("best_val_loss"), full_val_loss=full_val, full_val_bpc=full_bpc,
                       stopped_by=stopped_by, replica_max_diff=replica_diff)


def _on_main(dist_env: Distributed, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (it writes files); the other ranks wait and get its result, or its error."""
    if not dist_env.enabled:
        return fn()
    box: list[Any] = [None]
    if dist_env.is_main:
        try:
            box[0] = ("ok", fn())
        except ZaizaiError as e:
            box[0] = ("error", str(e))
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ZaizaiError(value)
    return value


def _agree(elapsed: float, stop_requested: bool, device: torch.device) -> tuple[float, bool]:
    """The largest elapsed time of all ranks, and whether any rank was asked to stop."""
    t = torch.tensor([elapsed, float(stop_requested)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t[0]), bool(t[1] > 0)


@torch.no_grad()
def _replica_max_diff(model: torch.nn.Module) -> float:
    """Largest |p - p on rank 0| over all parameters and ranks: 0 when DDP kept every replica identical."""
    worst = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    for p in model.parameters():
        reference = p.detach().clone()
        torch.distributed.broadcast(reference, src=0)
        worst = torch.maximum(worst, (p.detach().float() - reference.float()).abs().max())
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return float(worst)


def _evaluate_and_save(model, batches, cfg, device, amp_dtype, state, out, save, lr, tokens_per_second, bar):
    data = batches.data
    losses = estimate_loss(model, batches, cfg, device, amp_dtype)
    record = {
        "step": state["step"],
        "tokens": state["tokens_seen"],
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "train_bpc": None if losses["train"] is None else data.bits_per_char("train", losses["train"], loss_on=cfg.loss_on),
        "val_bpc": None if losses["val"] is None else data.bits_per_char("val", losses["val"], loss_on=cfg.loss_on),
        "lr": lr,
        "tokens_per_second": tokens_per_second,
        "elapsed": state["elapsed"],
    }
    score = losses["val"] if losses["val"] is not None else losses["train"]
    improved = state.get("best_val_loss") is None or score < state["best_val_loss"]
    if improved:
        state["best_val_loss"] = score
        save(BEST, with_optimizer=False)
    save(LAST, with_optimizer=True)
    append_metrics(out, record)
    plot_losses(out)
    val = (f"val {losses['val']:.4f} nats · {record['val_bpc']:.3f} bits/char"
           if losses["val"] is not None else "no val split")
    bar.write(f"step {state['step']:>6} · train {losses['train']:.4f} · {val} · "
              f"{tokens_per_second:,.0f} tok/s" + (" · best" if improved else ""))
    return record


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _prepare_out_dir(out: Path, cfg: TrainConfig, resuming: bool) -> None:
    """Create ``out``; refuse to train over an existing run unless told to (never destroy a checkpoint silently)."""
    if out.exists() and not out.is_dir():
        raise ZaizaiError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    existing = [n for n in (LAST, BEST) if (out / n).exists()]
    if resuming or not existing:
        if not resuming:
            for name in (METRICS, LOSS_PNG):
                (out / name).unlink(missing_ok=True)
        return
    if not cfg.overwrite:
        raise ZaizaiError(f"{out} already holds a trained model ({', '.join(existing)}); "
                          "add --resume to continue it, --overwrite to start over, or choose another --out")
    for name in (*existing, METRICS, LOSS_PNG):
        (out / name).unlink(missing_ok=True)


class _ProgressBar:
    """tqdm bar over steps (with --max-iters) or seconds (with --max-time only); shows loss, tok/s and ETA."""

    def __init__(self, cfg: TrainConfig, state: dict, enabled: bool):
        self.by_time = not cfg.max_iters
        self.bar = None
        self.tps = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        if self.by_time:
            self.bar = tqdm(total=int(cfg.max_time), initial=int(state["elapsed"]), unit="s", desc="训练 train",
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=cfg.max_iters, initial=state["step"], unit="step", desc="训练 train",
                            dynamic_ncols=True)

    def update(self, state: dict, loss: float, tokens_per_second: float, lr: float) -> None:
        if self.bar is None:
            return
        self.tps = tokens_per_second if self.tps is None else 0.9 * self.tps + 0.1 * tokens_per_second
        if self.by_time:
            self.bar.set_postfix_str(f"step {state['step']} · loss {loss:.3f} · {self.tps:,.0f} tok/s", refresh=False)
            self.bar.update(min(state["elapsed"], self.bar.total) - self.bar.n)  # redraws at tqdm's own pace
        else:
            self.bar.set_postfix_str(f"loss {loss:.3f} · {self.tps:,.0f} tok/s · lr {lr:.2e}", refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is None:
            print(text)
        else:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
