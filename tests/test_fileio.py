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


@pytest.mark.skipif(os.name != "posix", reason="process ids are checked with POSIX signals")
def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from zaizai.common.fileio import remove_stale_temps, temp_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its id names no process now
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ours = temp_name(tmp_path / "last.safetensors")
        ours.write_bytes(b"being written")
        stale_file = tmp_path / f".last.safetensors.{dead.pid}.0123abcd.tmp"
        stale_file.write_bytes(b"half a checkpoint")
        stale_folder = tmp_path / f".export.{dead.pid}.89abcdef.tmp"   # hf.py writes folders this way
        (stale_folder / "sub").mkdir(parents=True)
        (stale_folder / "sub" / "model.safetensors").write_bytes(b"x")
        other = tmp_path / f".config.json.{live.pid}.00ff00ff.tmp"
        other.write_bytes(b"another live run's")
        keep = ["last.safetensors", ".hidden", f".x.{dead.pid}.zz.tmp", f"x.{dead.pid}.0123abcd.tmp"]
        for name in keep:
            (tmp_path / name).write_bytes(b"not a temporary of ours")
        removed = remove_stale_temps(tmp_path)
        assert sorted(removed) == sorted([stale_file, stale_folder])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ours.name, other.name, *keep])
        assert remove_stale_temps(tmp_path / "absent") == []
    finally:
        live.kill()
        live.wait()
