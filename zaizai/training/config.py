"""Training configuration: one dataclass, named presets, TOML/JSON files, and how they combine.

Order of precedence, lowest first: the dataclass defaults < the preset < the config file < explicit flags.
A preset is just a named set of field values.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..common.errors import ZaizaiError
from ..models.config import ModelConfig

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class TrainConfig:
    """Everything about a training run except the model's shape (that is :class:`ModelConfig`)."""

    data_dir: str = ""
    out_dir: str = "out"
    preset: str = "auto"              # named defaults; see PRESETS (auto: fitted to this machine, budget, corpus)
    batch_size: int = 32              # sequences per micro-step (per process under torchrun)
    grad_accum: int = 1               # micro-steps per optimizer step
    max_iters: int = 0                # optimizer steps; 0 = no step limit (then --max-time is required)
    max_time: float = 0.0             # wall-clock budget in seconds; 0 = none. The lr schedule fits the budget.
    lr: float = 1e-3                  # peak learning rate
    min_lr: float = -1.0              # floor of the cosine decay; negative = lr / 10
    warmup_iters: int = 100           # linear warmup steps
    weight_decay: float = 0.1         # applied to 2-D weights only
    optimizer: str = "adamw"          # adamw | muon (Muon for the hidden matrices, AdamW for the rest)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # max global grad norm; 0 = off
    eval_interval: int = 0            # steps between train/val loss estimates (and `last` checkpoints);
                                      # 0 = fitted to the run: about 20 estimates (see cadence.py)
    eval_iters: int = 20              # batches per loss estimate (a fitted cadence may use fewer: cadence.py)
    device: str = "auto"              # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"               # auto | float32 | bfloat16 | float16 (autocast)
    compile: bool = False             # torch.compile the model (slow start, faster steps)
    threads: int = 0                  # CPU threads for torch; 0 = PyTorch's choice (torchrun: cores / processes)
    seed: int = 1337
    resume: bool = False              # continue the run saved in out_dir
    overwrite: bool = False           # start over even if out_dir already holds a checkpoint
    loss_on: str = "assistant"        # dialogue data: assistant | all
    init_from: str = ""               # a trained model folder whose weights (and tokenizer) to start from

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        positive = ("batch_size", "grad_accum", "eval_iters")
        for name in positive:
            if getattr(self, name) < 1:
                raise ZaizaiError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "threads", "eval_interval"):
            if getattr(self, name) < 0:
                raise ZaizaiError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ZaizaiError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.max_time < 0:
            raise ZaizaiError(f"--max-time must not be negative, got {self.max_time}")
        if self.max_iters == 0 and self.max_time == 0:
            raise ZaizaiError("give a stopping point: --max-iters N or --max-time SECONDS")
        if not self.lr > 0:
            raise ZaizaiError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ZaizaiError("--weight-decay and --grad-clip must not be negative")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ZaizaiError("--beta1 and --beta2 must be in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            raise ZaizaiError(f"--optimizer must be one of {' | '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.dtype.lower() not in (*DTYPES, "fp32", "bf16", "fp16"):
            raise ZaizaiError(f"--dtype must be one of {' | '.join(DTYPES)}, got {self.dtype!r}")
        if self.loss_on not in ("assistant", "all"):
            raise ZaizaiError(f"--loss-on must be assistant or all, got {self.loss_on!r}")
        if self.resume and self.init_from:
            raise ZaizaiError("--resume continues a run, --init-from starts a new one from a model; pick one")
        if self.resume and self.overwrite:
            raise ZaizaiError("--resume and --overwrite contradict each other; pick one")

    @property
    def min_lr_value(self) -> float:
        return self.lr / 10 if self.min_lr < 0 else self.min_lr


OPTIMIZERS = ("adamw", "muon")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # also their short forms fp32, bf16, fp16

# The `auto` preset (the default): a modern block trained with Muon, its size, batch and lr chosen per run from
# these candidates (smallest first) by zaizai/training/autopreset.py: by the corpus size, and for a --max-time run
# by the tokens each candidate would train in the budget on this CPU (measured in the run's first seconds).
# The values are starting points, to be tuned on a quiet machine (bench/time_to_quality.py).
AUTO_COMMON = dict(model="modern", optimizer="muon", dropout=0.0, warmup_iters=100, beta2=0.99, eval_iters=20)
AUTO_CANDIDATES: dict[str, dict[str, Any]] = {
    # lr: Tang, 4x128, fp32, 500 steps: whole-val 4.941 at 6e-3 vs 5.011 at 3e-3 (Muon at 2x, optim.MUON_LR_SCALE).
    "2x128": dict(n_layer=2, n_head=4, n_embd=128, block_size=64, batch_size=32, lr=6e-3),
    "4x128": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, lr=6e-3),
    "4x192": dict(n_layer=4, n_head=6, n_embd=192, block_size=128, batch_size=16, lr=3e-3),
    "6x256": dict(n_layer=6, n_head=8, n_embd=256, block_size=128, batch_size=16, lr=2e-3),
}
AUTO_DEFAULT = "4x128"  # what `auto` stands for before it has seen the data (resolve_config alone, --help)

# Presets: named field values for both ModelConfig and TrainConfig.
PRESETS: dict[str, dict[str, Any]] = {
    # Fitted to the run (see AUTO_CANDIDATES); with --model gpt|rnn|bigram or --init-from it is the `cpu` preset.
    "auto": {**AUTO_COMMON, **AUTO_CANDIDATES[AUTO_DEFAULT]},
    # Tuned to learn the most per second on a laptop CPU (2 cores, bf16 where the CPU has it):
    # see bench/train_speed.py --mode preset.
    # Tang corpus, 210 s of wall time on 2 cores (AMD EPYC with bf16, 2026-12-02; about 20 evaluations and the final
    # whole-val pass inside the budget): whole-val 5.22 nats/char, nanoGPT's recipe 5.50. An earlier day's CPU, with
    # evaluations every 250 steps and the final pass after the budget, gave 4.68 at lr 3e-3 vs 4.73 at lr 2e-3.
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0,
                batch_size=32, lr=3e-3, warmup_iters=100, beta2=0.99, eval_iters=20),
    # The smallest useful model: 2 x 64 wide, most parameters in the vocabulary (0.42M with 5,000 characters).
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, dropout=0.0,
                 batch_size=32, lr=3e-3, warmup_iters=50, beta2=0.99),
    # The built-in demo: a small chat model on a few thousand dialogue lines, minutes on a CPU.
    "demo": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0,
                 batch_size=16, lr=3e-3, warmup_iters=50, beta2=0.99, eval_iters=10),
    # nanoGPT's README recipe for a CPU (the reference the cpu preset must beat).
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, batch_size=12,
                        lr=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, max_iters=2000,
                        eval_iters=20, dtype="float32"),
    # nanoGPT's shakespeare-char shape: good on a GPU, slow but fine on a patient CPU.
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
                  batch_size=64, lr=1e-3, warmup_iters=100, beta2=0.99, eval_iters=50),
    # GPT-2 small, 124M parameters with GPT-2's vocabulary (fewer with a char vocabulary): for a GPU.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0,
                 batch_size=16, grad_accum=8, lr=6e-4, warmup_iters=700, beta2=0.95,
                 eval_iters=50),
}


def _flag(name: str) -> str:
    return name.replace("_", "-")


MODEL_FIELDS = {f.name for f in fields(ModelConfig)} - {"vocab_size"}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON file of options. Sections ([model], [train]) are flattened."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ZaizaiError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8-sig"))
        else:
            data = tomllib.loads(raw.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ZaizaiError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    if not isinstance(data, dict):
        raise ZaizaiError(f"config file {path} must hold a table of options")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return {k.replace("-", "_"): v for k, v in flat.items()}


def resolve_config(options: dict[str, Any] | None = None, config_file: str | Path | None = None,
                   preset_table: dict[str, Any] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Combine defaults < preset < config file < ``options`` into (ModelConfig, TrainConfig).

    ``options`` holds only the values the user set explicitly (None values are ignored). ``preset_table``: the
    values the `auto` preset chose for this run, in place of its table. `auto` with another model than modern
    (or with --init-from, which keeps the model it starts from) is the `cpu` preset: gpt runs stay as they were.
    """
    given = {k.replace("-", "_"): v for k, v in (options or {}).items() if v is not None}
    from_file = read_config_file(config_file) if config_file else {}
    preset_name = given.get("preset", from_file.get("preset", TrainConfig.preset))
    if preset_name not in PRESETS:
        raise ZaizaiError(f"unknown preset '{preset_name}'; choose one of: {', '.join(PRESETS)}")
    if preset_name == "auto" and (given.get("init_from", from_file.get("init_from"))
                                  or given.get("model", from_file.get("model", "modern")) != "modern"):
        preset_name = "cpu"
    table = preset_table if preset_table is not None and preset_name == "auto" else PRESETS[preset_name]
    merged: dict[str, Any] = {**table, **from_file, **given, "preset": preset_name}
    unknown = set(merged) - MODEL_FIELDS - TRAIN_FIELDS - {"vocab_size"}
    if unknown:
        raise ZaizaiError(f"unknown option(s): {', '.join(sorted(unknown))}; see `zaizai train --help`")
    model_cfg = ModelConfig(**{k: _coerce(ModelConfig, k, v) for k, v in merged.items() if k in MODEL_FIELDS})
    train_cfg = TrainConfig(**{k: _coerce(TrainConfig, k, v) for k, v in merged.items() if k in TRAIN_FIELDS})
    return model_cfg, train_cfg


def _coerce(cls, name: str, value: Any) -> Any:
    """Check a file/flag value against the field's type (int fields accept 1e3-style floats that are whole);
    numbers must be finite (TOML reads 1e400 as inf) and a bool is not a number."""
    default = {f.name: f.default for f in fields(cls)}[name]
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            if isinstance(value, int):
                return value if kind is int else float(value)
            f = float(value)
            if not math.isfinite(f):
                raise ZaizaiError(f"option {name} expects a finite {kind.__name__}, got {f}")
            if kind is float:
                return f
            if f != int(f):
                raise ValueError
            return int(f)
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError
        return str(value) if isinstance(value, str) else os.fspath(value)
    except (TypeError, ValueError, OverflowError):
        raise ZaizaiError(f"option {name} expects a {kind.__name__}, got {value!r}") from None
