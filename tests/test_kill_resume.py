"""The audit's kill test, reduced (bench/kill_resume.py is the full one): SIGKILL `zaizai train` at seeded random
moments, resume each time, and end bit for bit where a run that was never stopped ends."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

import zaizai

BENCH = Path(__file__).resolve().parent.parent / "bench" / "kill_resume.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("kill_resume", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_options(args: list[str]) -> dict:
    """The bench's CLI flags as zaizai.train options (the reference trains in this process: one start fewer)."""
    pairs = dict(zip(args[::2], args[1::2]))
    kinds = {"--lr": float, "--dropout": float, "--device": str, "--dtype": str, "--preset": str}
    return {k[2:].replace("-", "_"): kinds.get(k, int)(v) for k, v in pairs.items()}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kills_at_random_moments_resume_to_the_uninterrupted_run(tmp_path, one_thread):
    bench = load_bench()
    max_iters, interval = 60, 5
    data = bench.make_data(tmp_path)
    t0 = time.monotonic()
    zaizai.train(data, tmp_path / "reference", max_iters=max_iters, eval_interval=interval, verbose=False,
                 **cli_options(bench.TINY))
    train_seconds = time.monotonic() - t0
    rows, starts = bench.killed_run(data, tmp_path / "killed", kills=3, seed=1, max_iters=max_iters,
                                    eval_interval=interval, startup=2.0, train_seconds=train_seconds)
    assert rows, "the run finished before its first kill"
    for row in rows:
        if row["after_first_checkpoint"]:
            assert row["resumable"], row
        if row["lost"] is not None:
            assert row["lost"] <= interval, row
    assert not list((tmp_path / "killed").glob(".*.tmp"))   # the resumes removed what the kills left
    result = bench.compare(tmp_path / "reference", tmp_path / "killed")
    assert result == {"weights_equal": True, "optimizer_equal": True, "metrics_equal": True, "step": max_iters,
                      "records": max_iters // interval}
