"""Atomic writes: the old file or the complete new one, with the permissions of any other output."""

import os

import pytest
import torch

from zaizai.common.fileio import atomic_path, atomic_write_text
from zaizai.training.checkpoint import save_checkpoint


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_outputs_get_the_mode_a_plain_open_gives_even_from_a_0600_writer(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_path(tmp_path / "private.bin") as tmp:
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors creates its files
    assert mode(tmp_path / "private.bin") == mode(plain)
    atomic_write_text(tmp_path / "text.txt", "你好")
    assert mode(tmp_path / "text.txt") == mode(plain)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_checkpoints_are_as_readable_as_the_config_next_to_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, torch.nn.Linear(2, 2), model_config={}, train_config={}, state={})
    assert mode(path) == mode(tmp_path / "config.json")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
