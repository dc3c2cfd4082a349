"""One rule for every writer (zaizai/common/outputs.py): a folder knows its kind, no kind is written over
another, and nothing existing is replaced without overwrite."""

from __future__ import annotations

import pytest

from zaizai.common.errors import ZaizaiError
from zaizai.common.outputs import DATA, HF, MODEL, check_output_file, check_output_folder, folder_kind


def make(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_folder_kinds_come_from_their_marker_files(tmp_path):
    assert folder_kind(tmp_path / "absent") is None
    assert folder_kind(make(tmp_path / "empty")) is None
    assert folder_kind(make(tmp_path / "other", "notes.txt", "config.json")) is None
    assert folder_kind(make(tmp_path / "data", "meta.json", "train.bin", "tokenizer.json")) == DATA
    # a model folder also holds a config.json and a tokenizer.json: its checkpoint decides
    assert folder_kind(make(tmp_path / "m1", "last.safetensors", "config.json", "tokenizer.json")) == MODEL
    assert folder_kind(make(tmp_path / "m2", "best.safetensors")) == MODEL
    assert folder_kind(make(tmp_path / "hf1", "model.safetensors", "config.json", "tokenizer.json")) == HF
    assert folder_kind(make(tmp_path / "hf2", "model.safetensors.index.json")) == HF
    assert folder_kind(make(tmp_path / "hf3", "pytorch_model.bin")) == HF
    # a marker that is a folder, not a file, says nothing
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "meta.json").mkdir()
    assert folder_kind(tmp_path / "odd") is None
    assert folder_kind(make(tmp_path, "a-file.txt") / "a-file.txt") is None


def test_absent_or_empty_folders_may_be_written_by_any_kind(tmp_path):
    make(tmp_path / "empty")
    for kind in (DATA, MODEL, HF):
        check_output_folder(tmp_path / "absent", kind, overwrite=False)
        check_output_folder(tmp_path / "empty", kind, overwrite=False)
    assert not (tmp_path / "absent").exists()   # checking writes nothing


@pytest.mark.parametrize("found", [DATA, MODEL, HF])
@pytest.mark.parametrize("kind", [DATA, MODEL, HF])
def test_one_kind_is_never_written_over_another_even_with_overwrite(tmp_path, found, kind):
    marker = {DATA: "meta.json", MODEL: "last.safetensors", HF: "model.safetensors"}[found]
    folder = make(tmp_path / "f", marker, "tokenizer.json")
    before = snapshot(folder)
    if found == kind:
        check_output_folder(folder, kind, overwrite=True)
        check_output_folder(folder, kind, overwrite=False, allow_same=True)
        with pytest.raises(ZaizaiError, match="already exists.*--overwrite"):
            check_output_folder(folder, kind, overwrite=False)
    else:
        for overwrite in (False, True):
            for allow_same in (False, True):
                with pytest.raises(ZaizaiError, match=f"already is a {found} folder.*choose another --out"):
                    check_output_folder(folder, kind, overwrite=overwrite, allow_same=allow_same)
    assert snapshot(folder) == before


def test_other_non_empty_folders_need_overwrite_and_files_are_refused(tmp_path):
    folder = make(tmp_path / "mine", "notes.txt")
    with pytest.raises(ZaizaiError, match="non-empty folder.*--overwrite"):
        check_output_folder(folder, MODEL, overwrite=False)
    with pytest.raises(ZaizaiError, match="non-empty folder"):
        check_output_folder(folder, MODEL, overwrite=False, allow_same=True)  # allow_same is for its own kind
    check_output_folder(folder, MODEL, overwrite=True)
    with pytest.raises(ZaizaiError, match="--to .*is a file; give a folder"):
        check_output_folder(folder / "notes.txt", HF, overwrite=True, flag="--to")
    assert (folder / "notes.txt").read_bytes() == b"x"


def test_messages_are_one_line_naming_the_flag(tmp_path):
    folder = make(tmp_path / "d", "meta.json")
    with pytest.raises(ZaizaiError) as info:
        check_output_folder(folder, HF, overwrite=True, flag="--to")
    assert "\n" not in str(info.value) and str(info.value).startswith("--to ")
    assert "·" in str(info.value)  # bilingual, Chinese first


def test_single_files_never_replace_a_folders_own_files(tmp_path):
    model = make(tmp_path / "m", "last.safetensors", "tokenizer.json", "config.json", "notes.gguf")
    data = make(tmp_path / "d", "meta.json", "train.bin", "val.bin")
    hf = make(tmp_path / "h", "model.safetensors", "generation_config.json")
    before = {f: snapshot(f) for f in (model, data, hf)}
    refused = [model / "last.safetensors", model / "tokenizer.json", model / "config.json", data / "train.bin",
               data / "meta.json", hf / "model.safetensors", hf / "generation_config.json"]
    for path in refused:
        with pytest.raises(ZaizaiError, match="belongs to a .* folder; choose another path"):
            check_output_file(path, overwrite=True, suffixes=(".gguf",))
        with pytest.raises(ZaizaiError, match="belongs to"):
            check_output_file(path, overwrite=True)
    # a file of the output's own type beside them is an ordinary existing file
    with pytest.raises(ZaizaiError, match="already exists; add --overwrite"):
        check_output_file(model / "notes.gguf", overwrite=False, suffixes=(".gguf",))
    check_output_file(model / "notes.gguf", overwrite=True, suffixes=(".gguf",))
    check_output_file(model / "new.gguf", overwrite=False)          # absent: fine
    with pytest.raises(ZaizaiError, match="is a folder; give a file path"):
        check_output_file(model, overwrite=True)
    assert {f: snapshot(f) for f in (model, data, hf)} == before


def test_existing_files_need_overwrite_and_the_right_suffix(tmp_path):
    picture = make(tmp_path / "plain", "loss.png", "essay.txt") / "loss.png"
    with pytest.raises(ZaizaiError, match="--to .*loss.png already exists; add --overwrite"):
        check_output_file(picture, overwrite=False)
    check_output_file(picture, overwrite=True)
    check_output_file(picture, overwrite=True, suffixes=(".png",))
    with pytest.raises(ZaizaiError, match="exists and is not a .gguf file"):
        check_output_file(tmp_path / "plain" / "essay.txt", overwrite=True, suffixes=(".gguf",))
    with pytest.raises(ZaizaiError, match="--out "):
        check_output_file(picture, overwrite=False, flag="--out")
    assert picture.read_bytes() == b"x"


def test_a_single_file_never_takes_the_name_of_a_folders_own_file(tmp_path):
    model = make(tmp_path / "m", "last.safetensors", "config.json")  # no best.safetensors, no tokenizer.json yet
    data = make(tmp_path / "d", "meta.json")
    for path in (model / "best.safetensors", model / "tokenizer.json", data / "train.bin", data / "x.npy"):
        with pytest.raises(ZaizaiError, match="belongs to a .* folder; choose another path"):
            check_output_file(path, overwrite=True, flag="--png")
    check_output_file(model / "attention.png", overwrite=False)  # a new picture beside them is fine
    check_output_file(make(tmp_path / "plain") / "best.safetensors", overwrite=False)  # not a model folder
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "last.safetensors"]


@pytest.mark.parametrize("check", ["folder", "file"])
def test_a_folder_that_cannot_be_read_is_one_line(tmp_path, monkeypatch, check):
    """No read permission (we may run as root, where chmod does not stop us: the listing is made to fail)."""
    import os
    from pathlib import Path

    folder = make(tmp_path / "locked", "notes.txt")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "scandir", refuse)
    monkeypatch.setattr(Path, "iterdir", refuse)
    monkeypatch.setattr(Path, "stat", refuse)  # is_dir / is_file / exists look with stat
    with pytest.raises(ZaizaiError) as info:
        if check == "folder":
            check_output_folder(folder, MODEL, overwrite=False)
        else:
            check_output_file(folder / "a.png", overwrite=False, flag="--png")
    message = str(info.value)
    assert "\n" not in message and "cannot be read (Permission denied)" in message and "·" in message
    assert message.startswith("--out " if check == "folder" else "--png ")
