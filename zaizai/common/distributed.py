"""torchrun: where this process sits, its device and process group, and the few collectives training needs.

A plain ``python -m zaizai train`` is one process of a world of one: none of this does anything there, so the
training loop reads as a single-process loop with a handful of calls that matter only under torchrun.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from .device import resolve_device
from .errors import ZaizaiError


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a ``torchrun`` launch (one process per GPU, or per slice of the CPU cores).

    ``world_size == 1`` (a plain ``python -m zaizai train``, or torchrun with one process) trains as a single
    process: no process group, no DistributedDataParallel.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed:
    """Read torchrun's ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Distributed()
    try:
        world = int(os.environ["WORLD_SIZE"])
        return Distributed(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                           world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    except ValueError:
        raise ZaizaiError("RANK / LOCAL_RANK / WORLD_SIZE are set but not integers; launch with torchrun") from None


def distributed_device(name: str, dist: Distributed) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when training on GPUs, else the CPU."""
    device = resolve_device(name)
    if device.type == "cuda":
        if torch.cuda.device_count() < dist.local_world_size:
            raise ZaizaiError(f"torchrun started {dist.local_world_size} processes on this node but it has "
                              f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node={torch.cuda.device_count()}")
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ZaizaiError(f"torchrun training runs on CUDA GPUs or the CPU, not {device.type}; add --device cpu")
    return device


@contextlib.contextmanager
def process_group(dist: Distributed, device: torch.device) -> Iterator[None]:
    """Under torchrun, start the process group (NCCL on GPUs, gloo on the CPU) and tear it down at the end.

    A group the caller already started is left alone; with one process there is none.
    """
    if not dist.enabled or torch.distributed.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.distributed.init_process_group(backend="nccl", device_id=device)
    else:
        torch.distributed.init_process_group(backend="gloo")
    try:
        yield
        # every rank done with the group (and its DDP reducer freed) before any rank tears it down;
        # without this a fast rank's teardown can abort a slower one's exit ("terminate called ...")
        gc.collect()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def replicate(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wrap ``model`` in DistributedDataParallel: gradients are averaged over the ranks in every backward."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients in the backward pass; ``sync=False`` skips that (``no_sync``), so that
    grad accumulation's earlier micro-steps only accumulate. A no-op for a plain module."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def mean_over_replicas(value: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """The mean of ``value`` over the ranks when ``model`` is replicated with DDP; else ``value`` itself."""
    if isinstance(model, DistributedDataParallel):
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value


def on_main(dist: Distributed, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (it writes files); the other ranks wait and get its result, or its error."""
    if not dist.enabled:
        return fn()
    box: list[Any] = [None]
    if dist.is_main:
        try:
            box[0] = ("ok", fn())
        except ZaizaiError as e:
            box[0] = ("error", str(e))
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ZaizaiError(value)
    return value


def agree(dist: Distributed, elapsed: float, stop_requested: bool, device: torch.device) -> tuple[float, bool]:
    """The largest elapsed time of all ranks, and whether any rank was asked to stop (as given with one process).

    Every rank must take the same decisions: stop together, follow one lr schedule.
    """
    if not dist.enabled:
        return elapsed, stop_requested
    t = torch.tensor([elapsed, float(stop_requested)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t[0]), bool(t[1] > 0)


@torch.no_grad()
def replica_max_diff(model: torch.nn.Module) -> float:
    """Largest |p - p on rank 0| over all parameters and ranks: 0 when DDP kept every replica identical."""
    worst = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    for p in model.parameters():
        reference = p.detach().clone()
        torch.distributed.broadcast(reference, src=0)
        worst = torch.maximum(worst, (p.detach().float() - reference.float()).abs().max())
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return float(worst)
