"""metrics.jsonl: a line torn by a kill is dropped, a damaged file is an error, rewrites are atomic."""

import json

import pytest

from zaizai.common.errors import ZaizaiError
from zaizai.training.metrics import METRICS, append_metrics, read_metrics, truncate_metrics


def write_records(out, steps):
    for step in steps:
        append_metrics(out, {"step": step, "train_loss": 5.0 - step / 10})


def test_records_round_trip(tmp_path):
    write_records(tmp_path, [5, 10])
    assert read_metrics(tmp_path) == [{"step": 5, "train_loss": 4.5}, {"step": 10, "train_loss": 4.0}]
    assert read_metrics(tmp_path / "none") == []


def test_a_torn_last_line_is_dropped(tmp_path):
    write_records(tmp_path, [5, 10])
    with open(tmp_path / METRICS, "a", encoding="utf-8") as f:
        f.write('{"step": 15, "train_lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10]


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    write_records(tmp_path, [5])
    with open(tmp_path / METRICS, "a", encoding="utf-8") as f:
        f.write("not json\n")
    write_records(tmp_path, [10])
    with pytest.raises(ZaizaiError, match=rf"{METRICS}, line 2, is not a JSON record .*delete or fix that line"):
        read_metrics(tmp_path)


def test_truncate_keeps_the_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    write_records(tmp_path, [5, 10, 15])
    with open(tmp_path / METRICS, "a", encoding="utf-8") as f:
        f.write('{"step": 2')
    truncate_metrics(tmp_path, after_step=10)
    lines = (tmp_path / METRICS).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 10]


def test_truncate_rewrites_atomically(tmp_path, monkeypatch):
    """A crash before the new file is complete leaves the old one, whole, and no partial file beside it."""
    import zaizai.common.fileio as fileio

    write_records(tmp_path, [5, 10, 15])
    before = (tmp_path / METRICS).read_bytes()

    def crash(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        truncate_metrics(tmp_path, after_step=5)
    assert (tmp_path / METRICS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [METRICS]
