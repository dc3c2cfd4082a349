"""Training metrics: one JSON line per evaluation, and the loss-curve picture."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..common.errors import ZaizaiError
from ..common.fileio import atomic_path, atomic_write_text

METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(Path(out_dir) / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_metrics(out_dir: Path) -> list[dict]:
    """All records of ``metrics.jsonl``; a torn last line (killed mid-write) is ignored.

    Any other line that is not a JSON record is an error: the file was damaged, not cut short.
    """
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if number == len(lines):
                break
            raise ZaizaiError(f"{path}, line {number}, is not a JSON record ({e}); "
                              "delete or fix that line, then run again") from None
    return records


def truncate_metrics(out_dir: Path, after_step: int) -> None:
    """Drop records past ``after_step`` (a resumed run repeats those steps), atomically."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return
    keep = [r for r in read_metrics(out_dir) if r.get("step", 0) <= after_step]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))


class PlotThrottle:
    """Redraws ``loss.png`` during a run, at most about ``share`` of the time (a redraw takes a good part of a
    second, many times a tiny model's evaluation); :meth:`flush` draws the one left out at the end."""

    def __init__(self, share: float = 0.1):
        self.share, self.next_at, self.pending = share, 0.0, False

    def redraw(self, out_dir: Path) -> None:
        now = time.perf_counter()
        if now < self.next_at:
            self.pending = True
            return
        plot_losses(out_dir)
        self.pending, self.next_at = False, now + (time.perf_counter() - now) / self.share

    def flush(self, out_dir: Path) -> None:
        if self.pending:
            self.next_at = 0.0
            self.redraw(out_dir)


def plot_losses(out_dir: Path, records: list[dict] | None = None, path: Path | None = None) -> Path | None:
    """Draw train/val loss against step and against time into ``loss.png`` (atomically)."""
    records = read_metrics(out_dir) if records is None else records
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    minutes = [r.get("elapsed", 0.0) / 60 for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, xs, label in ((axes[0], steps, "step"), (axes[1], minutes, "minutes")):
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            pts = [(x, r[key]) for x, r in zip(xs, records) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker=".", label=key.replace("_", " "))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per token)")
    axes[0].legend()
    fig.suptitle(f"{Path(out_dir).resolve().name}: loss")
    fig.tight_layout()
    path = Path(path) if path else Path(out_dir) / LOSS_PNG
    return save_png(fig, path)


def save_png(fig, path: Path) -> Path:
    """Write a matplotlib figure to ``path`` as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return Path(path)
