"""Checkpoints: one safetensors file each, written atomically, never unpickled.

A checkpoint file holds the model's tensors under their state_dict names and, for ``last``, the AdamW
state under ``optimizer/<param index>/<key>``. JSON metadata in the safetensors header carries the model
config, the training config, the run state (step, tokens seen, elapsed time, best val loss) and the
optimizer's param groups. Because every write goes to a temporary file that is renamed over the old one,
a kill at any moment leaves the previous checkpoint intact and loadable.

Layout of an output directory::

    OUT_DIR/
      config.json        model + training config of the run (human readable)
      tokenizer.json     the tokenizer the model was trained with
      last.safetensors   model + optimizer + run state: what --resume continues from
      best.safetensors   model weights with the lowest validation loss so far
      metrics.jsonl      one JSON line per evaluation
      loss.png           the loss curves
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..common.errors import ZaizaiError
from ..common.fileio import atomic_path

FORMAT = "zaizai-checkpoint"
FORMAT_VERSION = "1"
LAST = "last.safetensors"
BEST = "best.safetensors"
_OPT = "optimizer/"


@dataclass
class Checkpoint:
    """What a checkpoint file holds, loaded into memory."""

    model_state: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    state: dict[str, Any]                           # step, tokens_seen, elapsed, best_val_loss, ...
    optimizer_state: dict[str, Any] | None = None   # torch optimizer state_dict, or None
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights); return them as aliases."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().to("cpu").contiguous()
    return unique, aliases


def save_checkpoint(path: Path, model: torch.nn.Module, *, model_config: dict, train_config: dict,
                    state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Atomically write ``model`` (and ``optimizer`` if given) with configs and run state to ``path``."""
    raw = model.state_dict()
    tensors, aliases = _unique_tensors(raw)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": json.dumps(model_config),
        "train_config": json.dumps(train_config),
        "state": json.dumps(state),
        "aliases": json.dumps(aliases),
    }
    if optimizer is not None:
        opt = optimizer.state_dict()
        for idx, pstate in opt["state"].items():
            for key, value in pstate.items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"{_OPT}{idx}/{key}"] = t.detach().to("cpu").contiguous()
        meta["optimizer_param_groups"] = json.dumps(opt["param_groups"])
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_checkpoint(path: Path, *, with_optimizer: bool = True, map_location: str = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for missing/foreign/broken files."""
    path = Path(path)
    if not path.is_file():
        raise ZaizaiError(f"no checkpoint at {path}; train one first with `zaizai train`")
    try:
        with safe_open(str(path), framework="pt", device=map_location) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ZaizaiError(f"{path} is a safetensors file but not a zaizai checkpoint "
                                  "(to bring in a Hugging Face GPT-2, use `zaizai import-hf`)")
            names = list(f.keys())
            model_state = {n: f.get_tensor(n) for n in names if not n.startswith(_OPT)}
            opt_tensors = {n: f.get_tensor(n) for n in names if n.startswith(_OPT)} if with_optimizer else {}
    except SafetensorError as e:
        raise ZaizaiError(f"{path} is truncated or not a checkpoint ({e}); "
                          "use the other checkpoint in that folder or train again") from None
    except (OSError, ValueError) as e:
        raise ZaizaiError(f"cannot read checkpoint {path}: {e}") from None
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
        for name, target in aliases.items():
            model_state[name] = model_state[target]
        ckpt = Checkpoint(
            model_state=model_state,
            model_config=json.loads(meta["model_config"]),
            train_config=json.loads(meta["train_config"]),
            state=json.loads(meta["state"]),
            path=path,
        )
        if with_optimizer and "optimizer_param_groups" in meta:
            opt_state: dict[int, dict[str, torch.Tensor]] = {}
            for name, t in opt_tensors.items():
                idx, key = name[len(_OPT):].split("/", 1)
                opt_state.setdefault(int(idx), {})[key] = t
            ckpt.optimizer_state = {"state": opt_state,
                                    "param_groups": json.loads(meta["optimizer_param_groups"])}
    except (KeyError, ValueError) as e:
        raise ZaizaiError(f"{path} has damaged metadata ({e}); use the other checkpoint or train again") from None
    return ckpt


def find_checkpoint(out_dir: Path, which: str = "auto") -> Path:
    """The checkpoint file in ``out_dir``: ``best``, ``last``, or ``auto`` (best if present, else last)."""
    out_dir = Path(out_dir)
    if out_dir.is_file():
        return out_dir
    if not out_dir.is_dir():
        raise ZaizaiError(f"{out_dir} does not exist; give the folder `zaizai train --out` wrote")
    order = {"auto": [BEST, LAST], "best": [BEST], "last": [LAST]}.get(which)
    if order is None:
        raise ZaizaiError(f"unknown checkpoint '{which}'; choose best, last or auto")
    for name in order:
        if (out_dir / name).is_file():
            return out_dir / name
    raise ZaizaiError(f"no checkpoint ({' or '.join(order)}) in {out_dir}; train one first with `zaizai train`")
