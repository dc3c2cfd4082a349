"""Before a run starts: its configs (from flags, a config file, or the checkpoint it resumes), the data checked
against them, and its output folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..common.errors import ZaizaiError
from ..common.fileio import atomic_write_text, remove_stale_temps
from ..common.outputs import MODEL, check_output_folder, folder_kind
from ..data.tokendata import TokenData
from ..data.tokenizer import load_tokenizer
from .checkpoint import BEST, LAST, Checkpoint, find_checkpoint, load_checkpoint
from .config import MODEL_FIELDS, TRAIN_FIELDS, ModelConfig, TrainConfig, resolve_config
from .metrics import LOSS_PNG, METRICS, read_metrics

# Evaluate the whole validation split at the end of a run when it is at most this many tokens.
FULL_EVAL_MAX_TOKENS = 5_000_000


@dataclass
class Plan:
    """What a run will train: its configs, its data, and the checkpoint it resumes or starts from (if any)."""

    model_config: ModelConfig
    train_config: TrainConfig
    data: TokenData
    resume_from: Checkpoint | None = None   # --resume: model, optimizer and run state of out_dir's `last`
    init_from: Checkpoint | None = None     # --init-from: the weights a new run starts from
    options: dict[str, Any] = field(default_factory=dict)  # what the user set (flags, call), for refit_plan
    config_file: str | Path | None = None

    @property
    def auto(self) -> bool:
        """Whether the `auto` preset has yet to choose this new run's size (see autopreset.py)."""
        return self.train_config.preset == "auto" and self.resume_from is None and self.init_from is None


def plan_run(data_dir, out_dir, config_file, options: dict[str, Any]) -> Plan:
    """Work out the run's configs from ``options`` (flags), and check the data folder against them."""
    mcfg, cfg, ckpt = _configs(data_dir, out_dir, config_file, options)
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
    plan = Plan(mcfg, cfg, data, resume_from=ckpt, init_from=init, options=dict(options), config_file=config_file)
    _check_fit(plan)
    return plan


def refit_plan(plan: Plan, preset_table: dict[str, Any]) -> Plan:
    """``plan`` (a new run) with the `auto` preset's chosen values in place of its table, checked again."""
    options = {**plan.options, "data_dir": plan.train_config.data_dir, "out_dir": plan.train_config.out_dir}
    mcfg, cfg = resolve_config(options, plan.config_file, preset_table=preset_table)
    mcfg.vocab_size = plan.data.tokenizer.vocab_size
    cfg.validate()
    fitted = replace(plan, model_config=mcfg, train_config=cfg)
    _check_fit(fitted)
    return fitted


def _check_fit(plan: Plan) -> None:
    """The model's config, and its context against the data (a block longer than the training split)."""
    mcfg, data = plan.model_config, plan.data
    mcfg.validate()
    if data.kind != "dialogue" and data.num_tokens("train") <= mcfg.block_size:
        raise ZaizaiError(f"the training split has only {data.num_tokens('train')} tokens, fewer than "
                          f"block_size + 1 = {mcfg.block_size + 1}; use a smaller --block-size or more text")


def _configs(data_dir, out_dir, config_file, options) -> tuple[ModelConfig, TrainConfig, Checkpoint | None]:
    """The run's configs, and the checkpoint to resume or start from (or None)."""
    options = {k.replace("-", "_"): v for k, v in options.items() if v is not None}
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    if out_dir is not None:
        options["out_dir"] = str(out_dir)
    out = Path(options.get("out_dir", TrainConfig.out_dir))
    resume = bool(options.get("resume"))
    if resume and options.get("overwrite"):
        raise ZaizaiError(f"--resume continues the run in {out}, --overwrite starts it over; pick one")
    if not resume:
        mcfg, tcfg = resolve_config(options, config_file)
        check_out_dir(Path(tcfg.out_dir), overwrite=tcfg.overwrite, resuming=False)
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
        again = "--overwrite instead of --resume" if (out / BEST).is_file() else "a new run: drop --resume"
        raise ZaizaiError(f"nothing to resume: {last} does not exist; start {again}")
    check_out_dir(out, overwrite=False, resuming=True)
    ckpt = load_checkpoint(last)
    saved = {k: v for k, v in ckpt.train_config.items() if k in TRAIN_FIELDS}
    kept = {**{name: ckpt.model_config.get(name) for name in MODEL_FIELDS},
            "optimizer": saved.get("optimizer", "adamw")}  # the optimizer's state is saved for this one
    for name, value in kept.items():
        if name in options and options[name] != value:
            raise ZaizaiError(f"cannot change {name} when resuming (the run has {value}); start fresh with "
                              f"--overwrite instead of --resume, or choose another --out")
    merged = {**saved, **{k: v for k, v in options.items() if k in TRAIN_FIELDS}}
    merged.update({k: v for k, v in ckpt.model_config.items() if k in MODEL_FIELDS})
    merged.update(resume=True, overwrite=False)
    mcfg, tcfg = resolve_config(merged)
    mcfg.vocab_size = ckpt.model_config["vocab_size"]
    return mcfg, tcfg, ckpt


# What a run writes next to its checkpoints. A folder holding only these is a run killed before its first
# checkpoint: starting again there needs no --overwrite (nothing trained would be lost).
RUN_FILES = frozenset({"config.json", "tokenizer.json", "tokenizer_config.json", METRICS, LOSS_PNG})


def check_out_dir(out: Path, *, overwrite: bool, resuming: bool) -> None:
    """Refuse, before any work, an ``--out`` the run may not write: a file, another kind of folder (a data
    folder: never, not even with --overwrite), an existing run unless resumed or overwritten, or any other
    non-empty folder without --overwrite. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise ZaizaiError(f"--out {out} 是一个文件，请给一个文件夹 · is a file; give a folder")
    if folder_kind(out) == MODEL and not (resuming or overwrite):
        existing = [n for n in (LAST, BEST) if (out / n).exists()]
        if LAST not in existing:  # killed between its first best and last checkpoints: nothing to resume
            raise ZaizaiError(f"{out} holds {', '.join(existing)} but no {LAST} to resume from; add --overwrite "
                              "to start over, or choose another --out")
        raise ZaizaiError(f"{out} already holds a trained model ({', '.join(existing)}); "
                          "add --resume to continue it, --overwrite to start over, or choose another --out")
    if not resuming and _unfinished_run(out):
        return
    check_output_folder(out, MODEL, overwrite=overwrite, allow_same=resuming)


def _unfinished_run(out: Path) -> bool:
    """Whether ``out`` holds nothing but the files of a run that never saved a checkpoint (and temporaries)."""
    if not out.is_dir() or folder_kind(out) is not None:
        return False
    names = {p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    if not names or not names <= RUN_FILES:
        return False
    if "config.json" not in names:
        return True
    try:  # a run's config.json holds its model and train configs; any other config.json is not ours to replace
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "train" in config and "model" in config


def prepare_out_dir(out: Path, cfg: TrainConfig, resuming: bool) -> None:
    """Create ``out``; refuse to train over an existing run unless told to (never destroy a checkpoint silently);
    remove the temporaries a killed run left there."""
    check_out_dir(out, overwrite=cfg.overwrite, resuming=resuming)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZaizaiError(f"cannot create --out {out}: {e.strerror}; choose another --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ZaizaiError(f"--out {out} is not writable; choose another --out or fix its permissions")
    remove_stale_temps(out)
    if resuming:
        return
    existing = [n for n in (LAST, BEST) if (out / n).exists()]
    for name in (*existing, METRICS, LOSS_PNG):
        (out / name).unlink(missing_ok=True)


def nothing_left_to_do(plan: Plan) -> dict | None:
    """For --resume of a run that already reached its stopping point (--max-iters, --max-time) and recorded its
    final evaluation: that last metrics record (resuming it again must add nothing). None when there is work."""
    if plan.resume_from is None:
        return None
    cfg, state = plan.train_config, plan.resume_from.state
    step, elapsed = state.get("step", 0), state.get("elapsed", 0.0)
    if not ((cfg.max_iters and step >= cfg.max_iters)
            or (cfg.max_time and elapsed >= cfg.max_time - state.get("final_reserve", 0.0))):
        return None
    records = read_metrics(Path(cfg.out_dir))
    if not records or records[-1].get("step") != step:
        return None  # killed before its final record: evaluate it (once)
    val_tokens = plan.data.num_tokens("val")
    if state.get("full_val_loss") is None and 1 < val_tokens <= FULL_EVAL_MAX_TOKENS and not cfg.max_time:
        return None  # killed during the final pass over the val split: do that pass
    return records[-1]


def write_run_files(out: Path, mcfg: ModelConfig, cfg: TrainConfig, data: TokenData, world_size: int) -> None:
    """The tokenizer and the run's configs, next to the checkpoints."""
    data.tokenizer.save(out / "tokenizer.json")
    hf_config = Path(cfg.data_dir) / "tokenizer_config.json"  # lets transformers' AutoTokenizer load out/
    if hf_config.is_file():
        atomic_write_text(out / "tokenizer_config.json", hf_config.read_text(encoding="utf-8"))
    run_config = {"model": mcfg.to_dict(), "train": cfg.to_dict(), "data": data.meta,
                  "zaizai_version": __version__, "world_size": world_size}
    atomic_write_text(out / "config.json", json.dumps(run_config, ensure_ascii=False, indent=2))
