"""Bounded memory of the streamed prepare (issue 17: "BPE prepare of a 1 GB file with no newlines stays under
1 GB"; the measurement itself is bench/prepare_memory.py): what a worker is handed is bounded whatever the shape
of the file, and the BPE trainer's memory goes back to the system when it is done."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import zaizai.data.build_plain as build_plain
from zaizai.data.preparation import prepare
from zaizai.data.tokendata import TokenData

ROOT = Path(__file__).resolve().parent.parent


def test_a_5_mb_line_reaches_the_workers_in_pieces_of_at_most_4_mb(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    sentences = ["床前明月光，", "疑是地上霜。", "举头望明月，", "低头思故乡。", "春眠不觉晓，", "处处闻啼鸟。"]
    text = "".join(rng.choice(sentences, size=5 * 2**20 // 18))  # ~5 MB of UTF-8, not one newline
    path = tmp_path / "line.txt"
    path.write_text(text, encoding="utf-8")
    longest = []
    split = build_plain._piece_split

    def spying_split(task):
        longest.append(len(task[2]))  # the raw bytes a worker decodes
        return split(task)

    monkeypatch.setattr(build_plain, "_piece_split", spying_split)
    meta = prepare([path], tmp_path / "data", verbose=False, workers=1)
    assert longest and max(longest) <= 4 << 20  # before: the whole 5 MB line, at once
    assert meta["split_by"] == "characters"
    data = TokenData(tmp_path / "data")
    train, val = (data.tokenizer.decode(np.asarray(ids)) for ids in (data.train, data.val))
    end = data.tokenizer.decode([0])  # each split ends with the end-of-text token
    assert train.endswith(end) and val.endswith(end)
    assert train[: -len(end)] + val[: -len(end)] == text  # nothing lost or doubled at the cuts


class CountingTokenizer:
    """Stands in for a BPE: one id per character, remembering how many characters each call encodes."""

    type, dtype = "bpe", np.dtype(np.uint16)

    def __init__(self):
        self.batches: list[int] = []

    def encode_batch(self, texts):
        self.batches.append(sum(map(len, texts)))
        return [np.full(len(t), 7, dtype=self.dtype) for t in texts]


def test_a_bpe_encodes_a_long_document_a_quarter_million_characters_at_a_time():
    tok = CountingTokenizer()
    ids = build_plain._encode_documents(tok, ["字" * 2_000_000, "短"], eot_last=True)
    assert len(ids) == 2_000_000 + 1 + 1 + 1  # both documents, each followed by an EOT
    assert sum(tok.batches) == 2_000_001
    assert max(tok.batches) <= (1 << 18) + 4096  # before: a million characters (~160 MB of encodings)


_TRAIN = textwrap.dedent("""
    import numpy as np
    from zaizai.data.tokenizer import BPETokenizer

    def status_mb(key):  # VmHWM, not ru_maxrss: that one starts from the forking parent's size
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) >> 10

    rng = np.random.default_rng(0)  # random characters: every short run distinct, the trainer's worst case
    chunks = ["".join(map(chr, rng.integers(0x4E00, 0x9FA6, size=4096))) for _ in range(50)]
    before = status_mb("VmRSS")
    BPETokenizer.train(chunks, 2000)
    print(before, status_mb("VmHWM"), status_mb("VmRSS"))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; glibc's malloc_trim")
def test_the_bpe_trainer_hands_its_memory_back():
    done = subprocess.run([sys.executable, "-c", _TRAIN], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    before, peak, after = map(int, done.stdout.split())
    assert peak - before > 30  # the trainer did take memory (~70 MB for these 200k characters)
    assert after - before < (peak - before) / 2, (before, peak, after)  # before: kept almost all of it
