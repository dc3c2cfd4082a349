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
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..common.errors import ZaizaiError
from ..common.fileio import atomic_path
from ..models import build_model
from ..models.config import ModelConfig

FORMAT = "zaizai-checkpoint"
FORMAT_VERSION = "1"
LAST = "last.safetensors"
BEST = "best.safetensors"
_OPT = "optimizer/"
_MAX_DIM = 2**31 - 1  # no dimension of a real model comes near; larger ones only overflow shapes


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
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for missing/foreign/broken files.

    The metadata is checked before any tensor is read: the configs' types, and the shape of every tensor
    against the model its config describes (:func:`check_weights_match`), so a damaged or edited file is one
    clear error, never a model built larger than the weights on disk."""
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
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names if not n.startswith(_OPT)}
            parsed = _parse_metadata(path, meta, shapes)
            model_state = {n: f.get_tensor(n) for n in shapes}
            opt_tensors = {n: f.get_tensor(n) for n in names if n.startswith(_OPT)} if with_optimizer else {}
    except SafetensorError as e:
        raise ZaizaiError(f"{path} is truncated or not a checkpoint ({e}); "
                          "use the other checkpoint in that folder or train again") from None
    except (OSError, ValueError) as e:
        raise ZaizaiError(f"cannot read checkpoint {path}: {e}") from None
    model_config, train_config, state, aliases = parsed
    for name, target in aliases.items():
        model_state[name] = model_state[target]
    ckpt = Checkpoint(model_state=model_state, model_config=model_config, train_config=train_config, state=state,
                      path=path)
    try:
        if with_optimizer and "optimizer_param_groups" in meta:
            opt_state: dict[int, dict[str, torch.Tensor]] = {}
            for name, t in opt_tensors.items():
                idx, key = name[len(_OPT):].split("/", 1)
                opt_state.setdefault(int(idx), {})[key] = t
            groups = json.loads(meta["optimizer_param_groups"])
            if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
                raise ValueError("optimizer_param_groups is not a list of groups")
            ckpt.optimizer_state = {"state": opt_state, "param_groups": groups}
    except (KeyError, ValueError) as e:
        raise ZaizaiError(f"{path} has damaged metadata ({e}); use the other checkpoint or train again") from None
    return ckpt


def _parse_metadata(path: Path, meta: dict, shapes: dict[str, tuple]) -> tuple[dict, dict, dict, dict]:
    """The checkpoint's model config, train config, run state and tied-weight aliases, checked: JSON of the
    right types, and tensor shapes that are the ones the model config implies."""
    damaged = f"{path} has damaged metadata"
    try:
        parsed = {key: json.loads(meta[key]) for key in ("model_config", "train_config", "state")}
        aliases = json.loads(meta.get("aliases", "{}"))
    except (KeyError, ValueError) as e:
        raise ZaizaiError(f"{damaged} ({e}); use the other checkpoint or train again") from None
    for key, value in (*parsed.items(), ("aliases", aliases)):
        if not isinstance(value, dict):
            raise ZaizaiError(f"{damaged} ({key} is {type(value).__name__}, not a table); "
                              "use the other checkpoint or train again")
    _check_state(path, parsed["state"])
    for name, target in aliases.items():
        if not isinstance(target, str) or target not in shapes or name in shapes:
            raise ZaizaiError(f"checkpoint {path} does not match its config: alias {name!r} -> {target!r} names "
                              "no tensor of the file; it is damaged or was edited")
    check_weights_match(parsed["model_config"], {**shapes, **{n: shapes[t] for n, t in aliases.items()}},
                        source=f"checkpoint {path}")
    return parsed["model_config"], parsed["train_config"], parsed["state"], aliases


def _check_state(path: Path, state: dict) -> None:
    """The run state's counters are what a run wrote: whole numbers and finite figures."""
    for key in ("step", "tokens_seen", "eval_interval", "eval_iters"):
        value = state.get(key, 0 if key in ("step", "tokens_seen") else None)
        if value is not None and (type(value) is not int or value < 0):
            raise ZaizaiError(f"{path} has damaged metadata (state {key} = {value!r}, not a count); "
                              "use the other checkpoint or train again")
    for key in ("elapsed", "best_val_loss", "final_reserve", "full_val_loss", "replica_max_diff"):
        value = state.get(key)
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
            raise ZaizaiError(f"{path} has damaged metadata (state {key} = {value!r}, not a finite number); "
                              "use the other checkpoint or train again")


def model_config_from(raw: Any, source: str = "the model config") -> ModelConfig:
    """A :class:`ModelConfig` from untrusted JSON (a checkpoint's or an imported folder's), its types strict:
    ints are ints (not bools, strings or floats), in a sane range; floats finite; then validated."""
    if not isinstance(raw, dict):
        raise ZaizaiError(f"{source}: the model config is {type(raw).__name__}, not a table; "
                          "it is damaged or was edited")
    values = {}
    for f in fields(ModelConfig):
        if f.name not in raw:
            continue
        value, kind = raw[f.name], type(f.default)
        if kind is int:
            ok = type(value) is int and 0 <= value <= _MAX_DIM
        elif kind is float:
            ok = type(value) in (int, float) and math.isfinite(value)
        else:
            ok = type(value) is kind
        if not ok:
            raise ZaizaiError(f"{source}: model config {f.name} = {value!r} is not a valid {kind.__name__}; "
                              "it is damaged or was edited")
        values[f.name] = value
    cfg = ModelConfig(**values)
    try:
        cfg.validate()
    except ZaizaiError as e:
        raise ZaizaiError(f"{source}: {e}; it is damaged or was edited") from None
    return cfg


def check_weights_match(model_config: dict | ModelConfig, shapes: dict[str, tuple[int, ...]], *,
                        source: str = "the weights") -> ModelConfig:
    """Raise one :class:`ZaizaiError` unless ``shapes`` (tensor name -> shape, as a safetensors header gives
    them without reading any data) are exactly the tensors of the model ``model_config`` describes: no tensor
    missing or extra, every shape equal (the position table too: ``block_size`` is what the weights say).

    The model is built on the meta device, so this allocates nothing whatever the config says; call it before
    building the real model from an untrusted file. Returns the checked :class:`ModelConfig`."""
    cfg = model_config if isinstance(model_config, ModelConfig) else model_config_from(model_config, source)
    mismatch = f"{source} does not match its config"
    # Every layer holds at least one tensor: a larger n_layer is an edit, and building it (even on the meta
    # device) would take as long as the number says.
    if cfg.model != "bigram" and cfg.n_layer > len(shapes):  # (a bigram table has no layers)
        raise ZaizaiError(f"{mismatch}: n_layer {cfg.n_layer} but only {len(shapes)} tensors; "
                          "it is damaged or was edited")
    try:
        with torch.device("meta"):
            expected = {n: tuple(t.shape) for n, t in build_model(cfg).state_dict().items()}
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
        raise ZaizaiError(f"{mismatch}: the model cannot be built ({str(e).splitlines()[0]}); "
                          "it is damaged or was edited") from None
    got = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
    problems = [f"{what} {_some(names)}" for what, names in (("missing", set(expected) - set(got)),
                                                               ("unexpected", set(got) - set(expected))) if names]
    wrong = [n for n in expected if n in got and got[n] != expected[n]]
    for n in wrong[:3]:
        problems.append(f"{n} is {list(got[n])}, the config implies {list(expected[n])}")
    if problems:
        raise ZaizaiError(f"{mismatch}: {'; '.join(problems)}; it is damaged or was edited")
    return cfg


def _some(names: set[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


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
