"""Before a run starts: its configs (from flags, a config file, or the checkpoint it resumes), the data checked
against them, and its output folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import ZaizaiError
from ..data.tokendata import TokenData
from ..data.tokenizer import load_tokenizer
from .checkpoint import BEST, LAST, Checkpoint, find_checkpoint, load_checkpoint
from .config import MODEL_FIELDS, TRAIN_FIELDS, ModelConfig, TrainConfig, resolve_config
from .metrics import LOSS_PNG, METRICS


@dataclass
class Plan:
    """What a run will train: its configs, its data, and the checkpoint it resumes or starts from (if any)."""

    model_config: ModelConfig
    train_config: TrainConfig
    data: TokenData
    resume_from: Checkpoint | None = None   # --resume: model, optimizer and run state of out_dir's `last`
    init_from: Checkpoint | None = None     # --init-from: the weights a new run starts from


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
    mcfg.validate()
    if data.kind != "dialogue" and data.num_tokens("train") <= mcfg.block_size:
        raise ZaizaiError(f"the training split has only {data.num_tokens('train')} tokens, fewer than "
                          f"block_size + 1 = {mcfg.block_size + 1}; use a smaller --block-size or more text")
    return Plan(mcfg, cfg, data, resume_from=ckpt, init_from=init)


def _configs(data_dir, out_dir, config_file, options) -> tuple[ModelConfig, TrainConfig, Checkpoint | None]:
    """The run's configs, and the checkpoint to resume or start from (or None)."""
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


def prepare_out_dir(out: Path, cfg: TrainConfig, resuming: bool) -> None:
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
