"""Compare bigram, rnn and gpt: each trained for the same wall-clock budget on the same data, then a table
of whole-validation-split loss and bits per character with a sample each, and one plot of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..common.errors import ZaizaiError
from ..common.fileio import atomic_write_text
from ..data.tokendata import TokenData
from ..inference.chat import ChatSession
from ..inference.loaded import load
from ..inference.sampling import SamplingConfig
from ..training.loop import train
from ..training.metrics import read_metrics, save_png
from .evaluation import split_loss

# Settings that suit each model (a bigram table is one lookup per token and needs a far larger lr).
MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "bigram": dict(model="bigram", preset="cpu", lr=3e-2, warmup_iters=20, weight_decay=0.0),
    "rnn": dict(model="rnn", preset="cpu", lr=3e-3, n_layer=2, n_embd=256),
    "gpt": dict(model="gpt", preset="cpu"),
}


def compare(data_dir: str | Path, out_dir: str | Path = "compare", *, max_time: float = 120.0,
            models: tuple[str, ...] = ("bigram", "rnn", "gpt"), overwrite: bool = True, verbose: bool = True,
            **options) -> list[dict[str, Any]]:
    """Train each of ``models`` for ``max_time`` seconds into ``out_dir/compare-<model>``; return the table rows
    (also written to ``out_dir/compare.json``, with the plot in ``out_dir/compare.png``)."""
    if max_time <= 0:
        raise ZaizaiError(f"--max-time must be positive, got {max_time}")
    unknown = [m for m in models if m not in MODEL_SETTINGS]
    if unknown:
        raise ZaizaiError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_SETTINGS)}")
    data = TokenData(data_dir)
    if data.num_tokens("val") < 2:
        raise ZaizaiError(f"{data_dir} has no validation split to compare on; prepare with --val-fraction > 0")
    out = Path(out_dir)
    rows = []
    for name in models:
        folder = out / f"compare-{name}"
        if verbose:
            print(f"\n== {name}: {max_time:g} s → {folder}")
        settings = {**MODEL_SETTINGS[name], **options, "max_time": max_time, "max_iters": 0, "overwrite": overwrite}
        result = train(data_dir, folder, verbose=verbose, **settings)
        bot = load(folder, which="best")  # each model at its best on val, as `eval` and `chat` load it
        scores = split_loss(bot, data, "val")
        val_loss, bpc = scores["loss"], scores["bits_per_char"]
        prompt = "" if data.kind == "plain" else None
        sample = (bot.generate(prompt, max_new_tokens=40, temperature=0.8, seed=0, stop_at_eot=True)
                  if prompt is not None else _chat_sample(bot))
        rows.append({"model": name, "params": bot.num_params(), "steps": result.step,
                     "tokens_seen": result.tokens_seen, "seconds": result.elapsed, "val_loss": val_loss,
                     "bits_per_char": bpc, "sample": sample.strip(), "out_dir": str(folder)})
    atomic_write_text(out / "compare.json", json.dumps(rows, ensure_ascii=False, indent=2))
    plot_compare(rows, out / "compare.png")
    if verbose:
        print()
        print(format_table(rows))
        print(f"\n图 plot: {out / 'compare.png'}")
    return rows


def _chat_sample(bot) -> str:
    return ChatSession(bot, sampling=SamplingConfig(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=0)).say("你好")


def format_table(rows: list[dict[str, Any]], max_chars: int = 30) -> str:
    lines = ["| model | params | steps | tokens seen | whole-val loss | bits/char | sample |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        sample = r["sample"].replace("\n", " / ").replace("|", "｜")
        sample = sample if len(sample) <= max_chars else sample[:max_chars - 1] + "…"
        loss = "n/a" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        bpc = "n/a" if r["bits_per_char"] is None else f"{r['bits_per_char']:.4f}"
        lines.append(f"| {r['model']} | {r['params']:,} | {r['steps']:,} | {r['tokens_seen']:,} | {loss} | {bpc} | "
                     f"{sample} |")
    return "\n".join(lines)


def plot_compare(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One picture: each model's validation loss against training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        records = [x for x in read_metrics(Path(r["out_dir"])) if x.get("val_loss") is not None]
        if records:
            ax.plot([x["elapsed"] for x in records], [x["val_loss"] for x in records], marker=".",
                    label=f"{r['model']} ({r['params'] / 1e6:.2f}M)")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("val loss (nats per token)")
    ax.set_title("bigram vs rnn vs gpt, same time budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(fig, path)
