"""Kill -9 at random moments, resume, and compare with a run that was never stopped (issue 17's audit).

    .venv/bin/python bench/kill_resume.py                 # 12 kills, seed 0
    .venv/bin/python bench/kill_resume.py --kills 20 --seed 3 --max-iters 400

It makes a tiny corpus and data folder of its own, then:

1. trains an uninterrupted reference run (``zaizai train``, a subprocess: tiny GPT, CPU, float32, 1 thread,
   fixed --max-iters, a checkpoint every --eval-interval steps);
2. trains the same run again in another folder and SIGKILLs it at ``--kills`` random moments (a seeded RNG picks
   each delay: one kill in five during startup, the others during training, in a step, an evaluation or a
   checkpoint write), each time starting
   it again: ``--resume`` once a checkpoint exists, else a fresh start, until it finishes;
3. prints a table and the figures: how many kills after the first checkpoint left a resumable run, how many steps
   each kill lost (<= one eval interval is the promise: checkpoints come every eval interval), whether stale
   temporary files were left, and whether the final weights, AdamW state and metrics equal the reference's bit
   for bit.

The step a killed process had reached is read from its progress bar (tqdm, told to redraw at every step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "1", "--warmup-iters", "5", "--lr", "3e-3", "--dropout", "0.1", "--threads", "1",
        "--device", "cpu", "--dtype", "float32", "--preset", "tiny", "--seed", "7"]
CHARS = "床前明月光疑是地上霜举头望低思故乡春眠不觉晓处闻啼鸟夜来风雨声花落知多少白日依山尽黄河入海流你好我崽有什么问题吗"
PROGRESS = re.compile(r"(\d+)/(\d+) \[")


def make_data(work: Path, seed: int = 0) -> Path:
    """A deterministic corpus of short lines in blank-line separated blocks, prepared into ``work/data``."""
    import zaizai

    rng = random.Random(seed)
    blocks = ["\n".join("".join(rng.choice(CHARS) for _ in range(rng.randint(4, 12))) for _ in range(3))
              for _ in range(300)]
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    zaizai.prepare([corpus], work / "data", verbose=False)
    return work / "data"


def _env() -> dict:
    # one thread everywhere; tqdm redraws at every step, so the last line says how far a killed run got
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", "TQDM_MININTERVAL": "0",
            "TQDM_MINITERS": "1"}


def start(data: Path, out: Path, max_iters: int, eval_interval: int, log: Path) -> subprocess.Popen:
    """``zaizai train`` as a subprocess: ``--resume`` when ``out`` holds a last checkpoint, else a new run."""
    args = [sys.executable, "-m", "zaizai", "train"]
    if (out / "last.safetensors").is_file():
        args += ["--out", str(out), "--resume"]
    else:
        args += [str(data), "--out", str(out), "--max-iters", str(max_iters), "--eval-interval", str(eval_interval),
                 *TINY]
        if (out / "best.safetensors").is_file():  # killed between its first best and last checkpoints
            args.append("--overwrite")
    with open(log, "wb") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=_env())


def reached_step(log: Path) -> int | None:
    """The last step the progress bar in ``log`` showed (None: training had not started)."""
    found = PROGRESS.findall(log.read_text(encoding="utf-8", errors="replace"))
    return int(found[-1][0]) if found else None


def checkpoint_step(out: Path) -> tuple[int | None, str]:
    """(step of ``out``'s last checkpoint, "" if it loads, else the error); (None, "") when there is none."""
    from zaizai.common.errors import ZaizaiError
    from zaizai.training.checkpoint import load_checkpoint

    if not (out / "last.safetensors").is_file():
        return None, ""
    try:
        return load_checkpoint(out / "last.safetensors", with_optimizer=True).state["step"], ""
    except ZaizaiError as e:
        return None, str(e)


def reference_run(data: Path, out: Path, max_iters: int, eval_interval: int) -> tuple[float, float]:
    """Train without a kill; return (seconds until the first step showed, seconds in all)."""
    log = out.parent / "reference.log"
    t0 = time.monotonic()
    proc = start(data, out, max_iters, eval_interval, log)
    first = None
    while proc.poll() is None:
        if first is None and reached_step(log):
            first = time.monotonic() - t0
        time.sleep(0.01)
    total = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{log.read_text(encoding='utf-8', errors='replace')[-2000:]}")
    return (first or total / 2), total


def killed_run(data: Path, out: Path, *, kills: int, seed: int, max_iters: int, eval_interval: int,
               startup: float, train_seconds: float) -> tuple[list[dict], int]:
    """Kill ``kills`` times at seeded random moments, restarting after each; then let the last start finish.
    Returns one row per kill and the number of starts."""
    rng = random.Random(seed)
    rows, starts = [], 0
    while True:
        before, _ = checkpoint_step(out)
        log = out.parent / f"start-{starts}.log"
        proc = start(data, out, max_iters, eval_interval, log)
        starts += 1
        if len(rows) == kills:
            if proc.wait() != 0:
                raise SystemExit(f"the last resume failed:\n{log.read_text(encoding='utf-8', errors='replace')}")
            return rows, starts
        # one kill in five during startup (import, plan, loading the checkpoint); the others during training:
        # up to twice this start's share of the training left, counted from its first step
        t0 = time.monotonic()
        if rng.random() < 0.2:
            delay = rng.uniform(0.0, startup)
        else:
            while proc.poll() is None and reached_step(log) is None:
                time.sleep(0.005)
            left = train_seconds * (max_iters - (before or 0)) / max_iters
            delay = time.monotonic() - t0 + rng.uniform(0.0, 2 * left / (kills - len(rows) + 1))
        while proc.poll() is None and time.monotonic() - t0 < delay:
            time.sleep(0.005)
        if proc.poll() is not None:  # it finished (or failed) before its kill
            if proc.returncode != 0:
                raise SystemExit(f"a start failed:\n{log.read_text(encoding='utf-8', errors='replace')}")
            return rows, starts
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reached = reached_step(log)
        after, error = checkpoint_step(out)
        rows.append({"kill": len(rows) + 1, "at": delay, "from": before, "reached": reached, "saved": after,
                     "lost": None if reached is None else reached - (after or 0),
                     "after_first_checkpoint": after is not None or bool(error), "resumable": not error,
                     "temporaries": sorted(p.name for p in out.glob(".*.tmp")) if out.is_dir() else []})


def compare(reference: Path, resumed: Path) -> dict:
    """Bitwise equality of the final weights and optimizer state, and equal metrics (steps and losses)."""
    import torch

    from zaizai.training.checkpoint import load_checkpoint

    a, b = load_checkpoint(reference / "last.safetensors"), load_checkpoint(resumed / "last.safetensors")
    weights = a.model_state.keys() == b.model_state.keys() and all(
        torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    sa, sb = a.optimizer_state["state"], b.optimizer_state["state"]
    optimizer = sa.keys() == sb.keys() and all(sa[i].keys() == sb[i].keys() and all(
        torch.equal(sa[i][k], sb[i][k]) for k in sa[i]) for i in sa)

    def losses(folder):
        lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in map(json.loads, lines)]

    return {"weights_equal": weights, "optimizer_equal": optimizer, "metrics_equal": losses(reference) == losses(resumed),
            "step": b.state["step"], "records": len(losses(resumed))}


def kill_test(work: Path, *, kills: int = 12, seed: int = 0, max_iters: int = 300, eval_interval: int = 10) -> dict:
    """The whole test in ``work``; returns the rows, the figures and the comparison."""
    data = make_data(work, seed)
    startup, total = reference_run(data, work / "reference", max_iters, eval_interval)
    rows, starts = killed_run(data, work / "killed", kills=kills, seed=seed, max_iters=max_iters,
                              eval_interval=eval_interval, startup=startup, train_seconds=max(total - startup, 0.5))
    after = [r for r in rows if r["after_first_checkpoint"]]
    lost = [r["lost"] for r in after if r["lost"] is not None]
    return {"rows": rows, "starts": starts, "kills": len(rows), "after_first_checkpoint": len(after),
            "resumable": sum(r["resumable"] for r in after), "max_lost": max(lost, default=0),
            "mean_lost": sum(lost) / len(lost) if lost else 0.0, "eval_interval": eval_interval,
            "stale_temporaries_at_end": sorted(p.name for p in (work / "killed").glob(".*.tmp")),
            "reference_seconds": total, **compare(work / "reference", work / "killed")}


def report(result: dict) -> None:
    print(f"{'kill':>4} {'at s':>6} {'from':>5} {'reached':>7} {'saved':>5} {'lost':>4}  resumable  temporaries")
    for r in result["rows"]:
        show = lambda v: "-" if v is None else str(v)  # noqa: E731
        print(f"{r['kill']:>4} {r['at']:>6.2f} {show(r['from']):>5} {show(r['reached']):>7} {show(r['saved']):>5} "
              f"{show(r['lost']):>4}  {'yes' if r['resumable'] else 'NO':>9}  {len(r['temporaries'])}")
    n, k = result["after_first_checkpoint"], result["resumable"]
    print(f"\nkills: {result['kills']} ({result['starts']} starts) · after the first checkpoint: {n} · "
          f"resumable: {k}/{n} ({100 * k / n if n else 100:.0f}%)")
    print(f"steps lost per kill: max {result['max_lost']}, mean {result['mean_lost']:.1f} "
          f"(eval interval {result['eval_interval']}: {'ok' if result['max_lost'] <= result['eval_interval'] else 'MORE'})")
    print(f"final step {result['step']} · {result['records']} metrics records · stale temporaries left: "
          f"{len(result['stale_temporaries_at_end'])}")
    print(f"equal to the uninterrupted run: weights {result['weights_equal']} · AdamW state "
          f"{result['optimizer_equal']} · metrics {result['metrics_equal']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-iters", type=int, default=300)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = kill_test(work, kills=args.kills, seed=args.seed, max_iters=args.max_iters,
                           eval_interval=args.eval_interval)
        report(result)
    ok = (result["resumable"] == result["after_first_checkpoint"] and result["weights_equal"]
          and result["optimizer_equal"] and result["metrics_equal"] and result["max_lost"] <= result["eval_interval"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
