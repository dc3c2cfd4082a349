"""Shared fixtures: a tiny corpus in the articles' layout and a folder prepared from it."""

from __future__ import annotations

from pathlib import Path

import pytest

# Twenty distinct short two-line dialogues: blocks of lines separated by blank lines.
TINY_DOCUMENTS = [
    f"{question}（{round_}）\n{answer}"
    for round_ in range(1, 5)
    for question, answer in [
        ("你好", "你好，我是崽崽。"),
        ("今天天气怎么样？", "晴天，适合出去走走。"),
        ("你会写诗吗？", "床前明月光，疑是地上霜。"),
        ("早上好", "早上好！吃早饭了吗？"),
        ("晚安", "晚安，做个好梦。"),
    ]
]


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A UTF-8 text file holding TINY_DOCUMENTS separated by blank lines."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(TINY_DOCUMENTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_data_dir(tmp_path: Path, tiny_corpus: Path) -> Path:
    """``tiny_corpus`` prepared (seed 1337, 20% validation) into ``tmp_path/data``."""
    from zaizai.data.preparation import prepare

    prepare([tiny_corpus], tmp_path / "data", val_fraction=0.2, verbose=False)
    return tmp_path / "data"


@pytest.fixture(scope="session", autouse=True)
def compiled_steps_cache(tmp_path_factory):
    """Compiled decode steps (--compile) are kept in a folder of this test session (shared by its workers), not
    the user's cache: each model shape is compiled once per session, and a run never finds another run's."""
    import os

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "zaizai-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZAIZAI_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: with two threads per test worker, cores shared with other work make OpenMP threads
    wait on each other (a 0.1 s test took 15 s under load); one thread keeps such files at a few seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["torch", "onednn"])
def dense_backend(request, monkeypatch):
    """Both ways a decode step multiplies (zaizai.models.dense.Dense): torch.mm on a transposed copy (small
    weights, GPUs) and oneDNN's packed weights (CPU weights of 1 MiB and up); test models are small, so the
    oneDNN one is forced by lowering its threshold to 0."""
    import torch

    from zaizai.models import dense

    if request.param == "onednn":
        if not dense._onednn_ok(torch.zeros(1)):
            pytest.skip("this torch has no oneDNN linear")
        monkeypatch.setattr(dense.Dense, "ONEDNN_BYTES", 0)
    else:
        monkeypatch.setattr(dense.Dense, "ONEDNN_BYTES", 1 << 62)
    return request.param
