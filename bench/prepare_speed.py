"""How fast text becomes token ids: zaizai's vectorised encoder and ``prepare`` vs a naive peer.

Workload: the ``--corpus`` text (a .txt, .txt.xz or folder of .txt files; default: the built-in demo
corpus, see ``bench/corpus.py``), written as plain text into a temporary folder. The README's figures came
from ``--corpus ../shared/corpora/tang.txt.xz``, the 4.5M-character Tang-poetry corpus. Each method
runs in its own child process so that its peak RSS (``resource.getrusage``) is its own; the baseline
row is a child that only imports zaizai and reads the text, which every other row includes too.

Figures are MB/s of UTF-8 input (the file's size in bytes / seconds, best of a few runs).

``--size-mb N`` measures instead the streamed ``prepare`` on a corpus of N MB (the corpus
repeated, written under ``--tmp``), once per tokenizer kind, reporting MB/s and peak RSS of the
preparing process and, separately, of its largest worker process (fork children share most
pages with the parent, so the two do not simply add up).

    python bench/prepare_speed.py                                         # the demo corpus
    python bench/prepare_speed.py --corpus ../shared/corpora/tang.txt.xz  # the README's figures
    python bench/prepare_speed.py --corpus ../shared/corpora/tang.txt.xz --size-mb 1024 --kinds char,bpe
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corpus import Corpus, add_corpus_argument, load_corpus

METHODS = {
    "baseline": "baseline: import zaizai + read text",
    "naive": "naive [stoi[c] for c in text]",
    "encode_array": "CharTokenizer.encode_array",
    "prepare": "zaizai.prepare (read→bins)",
}
REPEATS = {"baseline": 1, "naive": 2, "encode_array": 5, "prepare": 2}


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def measure(method: str, path: Path) -> dict:
    """Run one method on the text file at ``path`` (in this process); return its figures."""
    from zaizai.data.preparation import prepare
    from zaizai.data.tokenizer import CharTokenizer

    text = path.read_text(encoding="utf-8")
    if method == "naive":
        # The articles' encoder: a dict from character to id, one lookup per character.
        stoi = {ch: i for i, ch in enumerate(sorted(set(text)), start=6)}

        def run():
            return [stoi[c] for c in text]

    elif method == "encode_array":
        tokenizer = CharTokenizer.from_text(text)

        def run():
            return tokenizer.encode_array(text)

    elif method == "prepare":
        out_dir = path.parent / "prepared"  # inside the parent's temporary folder

        def run():
            return prepare([path], out_dir, verbose=False, overwrite=True)

    else:

        def run():
            return None

    best = float("inf")
    for _ in range(REPEATS[method]):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
        del result
    return {"seconds": best, "peak_rss_mb": peak_rss_mb()}


def measure_large(kind: str, path: Path) -> dict:
    """The streamed prepare of ``path`` with a new ``kind`` tokenizer, once (in this process)."""
    from zaizai.data.preparation import prepare

    start = time.perf_counter()
    meta = prepare([path], path.parent / f"prepared-{kind}", tokenizer=kind, verbose=False)
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    children_mb = children / 2**20 if sys.platform == "darwin" else children / 2**10
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "worker_peak_rss_mb": children_mb,
            "tokens": meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]}


def large(corpus: Corpus, size_mb: int, kinds: list[str], tmp: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="zaizai-bench-", dir=tmp) as folder:
        path = Path(folder) / "big.txt"
        unit = corpus.text.encode("utf-8").rstrip(b"\n") + b"\n\n"
        with open(path, "wb") as f:
            f.writelines(unit for _ in range(max(1, size_mb * 2**20 // len(unit))))
        n_bytes = path.stat().st_size
        print(f"corpus: {corpus.name} repeated, {n_bytes / 2**20:,.0f} MiB UTF-8")
        print(f"{'prepare --tokenizer':<22} {'seconds':>8} {'MB/s':>8} {'peak RSS':>10} {'worker RSS':>11} {'tokens':>14}")
        for kind in kinds:
            child = subprocess.run(
                [sys.executable, __file__, "--child", f"large:{kind}", str(path)],
                capture_output=True, text=True, check=True,
            )
            f = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{kind:<22} {f['seconds']:>8.1f} {n_bytes / f['seconds'] / 1e6:>8.1f} "
                  f"{f['peak_rss_mb']:>7.0f} MB {f['worker_peak_rss_mb']:>8.0f} MB {f['tokens']:>14,}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--size-mb", type=int, default=0, help="measure the streamed prepare on N MB instead")
    parser.add_argument("--kinds", default="char,bpe", help="tokenizers for --size-mb (default char,bpe)")
    parser.add_argument("--tmp", default=None, help="folder for the --size-mb corpus (default: system temp)")
    add_corpus_argument(parser)
    args = parser.parse_args()
    if args.child:
        method, path = args.child
        if method.startswith("large:"):
            print(json.dumps(measure_large(method.split(":", 1)[1], Path(path))))
        else:
            print(json.dumps(measure(method, Path(path))))
        return 0

    corpus = load_corpus(args.corpus)
    if args.size_mb:
        return large(corpus, args.size_mb, args.kinds.split(","), args.tmp)

    with tempfile.TemporaryDirectory(prefix="zaizai-bench-") as tmp:
        path = corpus.write(Path(tmp))
        n_bytes = path.stat().st_size
        print(f"{corpus.header()}, {n_bytes / 1e6:.2f} MB UTF-8")
        print(f"{'method':<38} {'seconds':>8} {'MB/s':>8} {'peak RSS':>10}")
        for method, label in METHODS.items():
            child = subprocess.run(
                [sys.executable, __file__, "--child", method, str(path)],
                capture_output=True, text=True, check=True,
            )
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            rss = f"{figures['peak_rss_mb']:.0f} MB"
            if method == "baseline":
                print(f"{label:<38} {'-':>8} {'-':>8} {rss:>10}")
            else:
                seconds = figures["seconds"]
                print(f"{label:<38} {seconds:>8.3f} {n_bytes / seconds / 1e6:>8.1f} {rss:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
