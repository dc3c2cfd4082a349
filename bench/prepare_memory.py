"""Memory of ``zaizai prepare --tokenizer bpe`` on one huge line (issue 17: "a 1 GB file with no newlines stays
under 1 GB").

    nice -n 10 .venv/bin/python bench/prepare_memory.py --size-mb 1024
    .venv/bin/python bench/prepare_memory.py --size-mb 50 --tokenizer char

It writes a file of ``--size-mb`` MB into a temporary folder: a seeded stream of random Chinese characters
(uniform over U+4E00..U+9FA5, 3 bytes each in UTF-8) with no newline and no space at all, the worst shape for a
reader that cuts at lines and, for a BPE, the most tokens per character. It then runs
``python -m zaizai prepare FILE --out DIR --tokenizer bpe`` as a subprocess and, every ``--interval`` seconds,
reads ``/proc/PID/smaps_rollup`` of every process of its tree (the prepare and its worker processes).

What it prints:

- peak total PSS: the most the tree held at one moment, each shared page divided among the processes that share
  it (fork children share the parent's pages: adding their RSS counts those pages again). This is the figure
  that says whether the machine's memory suffices.
- peak total RSS: the same sum with shared pages counted once per process (an overestimate, for comparison);
- peak max-RSS: the largest high-water RSS of any one process of the tree (the kernel's ``VmHWM``, which
  catches peaks between samples; not ``ru_maxrss``, which in a child starts from its parent's size at the fork);
- the CPU (``lscpu``'s model name, whether it has bf16 instructions), the prepare's wall time and MB/s.

Sampling every 0.2 s can miss a peak shorter than that; the kernel's high-water mark cannot, and bounds one
process.
Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CJK_FIRST, CJK_LAST = 0x4E00, 0x9FA5  # the CJK Unified Ideographs of GB 13000 / Unicode 1.1
BLOCK_CHARS = 4 << 20  # characters generated at a time


def write_corpus(path: Path, size_mb: float, seed: int) -> int:
    """Write about ``size_mb`` MB of random CJK characters, no newline; return the bytes written."""
    rng = np.random.default_rng(seed)
    left = int(size_mb * 2**20) // 3  # characters
    written = 0
    with open(path, "wb") as f:
        while left > 0:
            n = min(left, BLOCK_CHARS)
            cp = rng.integers(CJK_FIRST, CJK_LAST + 1, size=n, dtype=np.uint32)
            utf8 = np.empty((n, 3), dtype=np.uint8)  # 1110xxxx 10xxxxxx 10xxxxxx
            utf8[:, 0] = 0xE0 | (cp >> 12)
            utf8[:, 1] = 0x80 | ((cp >> 6) & 0x3F)
            utf8[:, 2] = 0x80 | (cp & 0x3F)
            f.write(utf8.tobytes())
            written += 3 * n
            left -= n
    return written


def tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc/*/stat's parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # after "pid (comm) state"
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def rollup(pid: int) -> tuple[int, int, int]:
    """(PSS, RSS, high-water RSS) of a process in bytes; zeros once it is gone."""
    values = {}
    try:
        for name in ("smaps_rollup", "status"):
            with open(f"/proc/{pid}/{name}") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("Pss", "Rss", "VmHWM"):
                        values[key] = int(rest.split()[0]) * 1024
    except OSError:
        return 0, 0, 0
    return values.get("Pss", 0), values.get("Rss", 0), values.get("VmHWM", 0)


class Sampler(threading.Thread):
    """Samples the total PSS and RSS of a process tree until told to stop."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_pss = self.peak_rss = self.max_rss = self.peak_processes = self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = tree(self.pid)
            sizes = [rollup(pid) for pid in pids]
            self.peak_pss = max(self.peak_pss, sum(p for p, _, _ in sizes))
            self.peak_rss = max(self.peak_rss, sum(r for _, r, _ in sizes))
            self.max_rss = max(self.max_rss, *(h for _, _, h in sizes))
            self.peak_processes = max(self.peak_processes, sum(1 for p, _, _ in sizes if p))
            self.samples += 1
            self.stop.wait(self.interval)


def cpu() -> tuple[str, bool]:
    """(lscpu's model name, whether the CPU has bf16 instructions)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     "unknown")
    except OSError:
        model = "unknown"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return model, any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=1024, help="size of the one-line corpus (default 1024)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default="bpe", help="char or bpe (default bpe)")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between samples (default 0.2)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary corpus and data (default: the system's)")
    args = ap.parse_args()
    if not Path("/proc/self/smaps_rollup").exists():
        print("needs Linux's /proc/PID/smaps_rollup", file=sys.stderr)
        return 2
    model, bf16 = cpu()
    with tempfile.TemporaryDirectory(prefix="zaizai-prepare-memory-", dir=args.tmp) as tmp:
        corpus = Path(tmp) / "one-line.txt"
        size = write_corpus(corpus, args.size_mb, args.seed)
        command = [sys.executable, "-m", "zaizai", "prepare", str(corpus), "--out", str(Path(tmp) / "data"),
                   "--tokenizer", args.tokenizer]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = Sampler(process.pid, args.interval)
        sampler.start()
        output = process.communicate()[0]
        wall = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
    if process.returncode:
        print(output[-3000:], file=sys.stderr)
        print(f"prepare failed (exit {process.returncode})", file=sys.stderr)
        return 1
    mb = 2**20
    print(f"corpus: {size / mb:,.0f} MB, one line of random CJK characters (seed {args.seed}), "
          f"--tokenizer {args.tokenizer}")
    print(f"command: {' '.join(command[1:])}")
    print(f"CPU: {model}, {os.cpu_count()} cores, bf16 {'yes' if bf16 else 'no'}")
    print(f"wall time: {wall:,.1f} s ({size / mb / wall:,.1f} MB/s)")
    print(f"peak total PSS of the process tree: {sampler.peak_pss / mb:,.0f} MB "
          f"({sampler.samples} samples every {args.interval} s, up to {sampler.peak_processes} processes)")
    print(f"peak total RSS of the tree (shared pages counted per process): {sampler.peak_rss / mb:,.0f} MB")
    print(f"peak max-RSS of one process of the tree (kernel high-water mark): {sampler.max_rss / mb:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
