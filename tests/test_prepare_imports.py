"""`zaizai prepare` needs numpy and tokenizers, never PyTorch: importing torch alone costs about 150 MB of memory
and seconds of start-up on every run. The torch imports in zaizai.data live inside the functions that make
tensors (zaizai.data.windows), so the CLI's prepare path never loads it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from util import write_corpus, write_pairs

CHILD = textwrap.dedent("""
    import sys
    from zaizai.cli import main

    corpus, dialogues, out = sys.argv[1:4]
    runs = [
        ["prepare", corpus, "--out", out + "/char"],
        ["prepare", corpus, "--out", out + "/bpe", "--tokenizer", "bpe", "--vocab-size", "300"],
        ["prepare", dialogues, "--out", out + "/dialogue"],
    ]
    codes = [main(argv) for argv in runs]
    print("RESULT", codes, "torch" in sys.modules)
""")


def test_prepare_from_the_cli_never_imports_torch(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    dialogues = write_pairs(tmp_path / "chat.jsonl", [("你好", "你好呀"), ("在吗", "在的"), ("吃了吗", "吃了")] * 10)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(dialogues), str(tmp_path / "out")],
                          capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT [0, 0, 0] False"], done.stdout  # before: torch was in sys.modules
    for name in ("char", "bpe", "dialogue"):
        assert (tmp_path / "out" / name / "meta.json").is_file()


def test_the_data_stage_still_hands_training_torch_tensors(tmp_path):
    import numpy as np
    import torch

    from zaizai.data.windows import assemble_rows, eval_windows, random_windows

    data = np.arange(50, dtype=np.uint16)
    x, y = random_windows(data, 3, 8, np.random.default_rng(0), split="train")
    assert isinstance(x, torch.Tensor) and x.dtype == torch.int64 and tuple(y.shape) == (3, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    batches = list(eval_windows(data, 8, 4))
    assert all(isinstance(t, torch.Tensor) for batch in batches for t in batch)
    roles = np.full(50, 2, dtype=np.uint8)
    x, y, segments = assemble_rows(data, roles, [[0, 1]], np.array([0, 10]), np.array([4, 5]), 8, "assistant")
    assert all(isinstance(t, torch.Tensor) for t in (x, y, segments))
    assert segments.tolist() == [[0, 0, 0, 1, 1, 1, 1, -1]]
