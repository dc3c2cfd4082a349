"""prepare (text -> token bins + tokenizer + meta) and TokenData (batches, eval windows)."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DOCUMENTS

import zaizai.data.tokenizer
from zaizai.common.ids import IGNORE_INDEX
from zaizai.data.preparation import prepare
from zaizai.data.tokendata import TokenData, load_meta
from zaizai.common.errors import ZaizaiError
from zaizai.data.tokenizer import EOT_ID, UNK_ID, CharTokenizer, load_tokenizer


def _documents_in(ids: np.ndarray) -> list[np.ndarray]:
    """Split a bin ``doc EOT doc EOT ...`` into its documents' ids (asserting the layout)."""
    ends = np.flatnonzero(ids == EOT_ID)
    assert len(ends) and ends[-1] == len(ids) - 1, "a bin ends with EOT"
    return [doc[:-1] for doc in np.split(np.asarray(ids), ends + 1)[:-1]]


def _split_of_each_document(data_dir: Path, documents: list[str]) -> list[str]:
    """For each original document, "train" or "val", checked against the bins' contents."""
    data = TokenData(data_dir)
    tok = data.tokenizer
    sides = {}
    for split in ("train", "val"):
        for ids in _documents_in(data.split(split)):
            matches = [i for i, doc in enumerate(documents) if tok.encode(doc) == ids.tolist()]
            assert len(matches) == 1, "every document in a bin is exactly one whole input document"
            assert matches[0] not in sides, "no document is in both splits"
            sides[matches[0]] = split
    assert sorted(sides) == list(range(len(documents))), "every document is in a split"
    return [sides[i] for i in range(len(documents))]


def _write_docs(path: Path, documents: list[str]) -> Path:
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


# -- prepare: outputs --------------------------------------------------------------------------


def test_prepare_writes_bins_tokenizer_and_meta(tmp_path, tiny_corpus):
    out = tmp_path / "data"
    meta = prepare([tiny_corpus], out, val_fraction=0.2, seed=7, verbose=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta

    tok = load_tokenizer(out / "tokenizer.json")
    n_val_docs = 4  # 20% of 20 documents
    val_chars = meta["splits"]["val"]["chars"]
    total_chars = sum(map(len, TINY_DOCUMENTS)) + len(TINY_DOCUMENTS)  # + one separator each
    raw = tiny_corpus.read_bytes()
    assert meta == {
        "version": 1,
        "kind": "plain",
        "format": "plain",
        "tokenizer": "char",
        "tokenizer_from": None,
        "tokenizer_file": "tokenizer.json",
        "vocab_size": tok.vocab_size,
        "dtype": "uint16",
        "val_fraction": 0.2,
        "seed": 7,
        "encoding": "utf-8",
        "split_by": "documents",
        "splits": {
            "train": {
                "tokens": total_chars - val_chars,
                "chars": total_chars - val_chars,
                "documents": len(TINY_DOCUMENTS) - n_val_docs,
                "unknown": 0,
            },
            "val": {
                "tokens": val_chars,
                "chars": val_chars,
                "documents": n_val_docs,
                "unknown": meta["splits"]["val"]["unknown"],
            },
        },
        "sources": [
            {"path": tiny_corpus.as_posix(), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        ],
        "created_by": meta["created_by"],
    }
    assert re.fullmatch(r"zaizai \S+", meta["created_by"])


def test_bins_are_plain_memmaps_of_documents_each_followed_by_eot(tiny_data_dir):
    meta = load_meta(tiny_data_dir)
    tok = load_tokenizer(tiny_data_dir / "tokenizer.json")
    train = np.memmap(tiny_data_dir / "train.bin", dtype=meta["dtype"], mode="r")
    assert len(train) == meta["splits"]["train"]["tokens"]
    assert (tiny_data_dir / "train.bin").stat().st_size == 2 * len(train)  # uint16, no header
    sides = _split_of_each_document(tiny_data_dir, TINY_DOCUMENTS)
    train_docs = [doc for doc, side in zip(TINY_DOCUMENTS, sides) if side == "train"]
    # Training documents decode exactly, in their original order.
    assert tok.decode(train) == "".join(doc + "<|endoftext|>" for doc in train_docs)


def test_tokenizer_is_built_from_the_training_split_only(tmp_path):
    documents = [f"文档{i}" for i in range(9)] + ["独一无二"]
    corpus = _write_docs(tmp_path / "corpus.txt", documents)
    for seed in range(20):  # find a seed that holds out the special document
        meta = prepare([corpus], tmp_path / "data", val_fraction=0.1, seed=seed, verbose=False, overwrite=True)
        if _split_of_each_document(tmp_path / "data", documents)[-1] == "val":
            break
    else:
        pytest.fail("no seed held out the last document")
    tok = load_tokenizer(tmp_path / "data" / "tokenizer.json")
    assert not set("独一无二") & set(tok.chars)
    val = TokenData(tmp_path / "data").val
    assert val.tolist() == [UNK_ID] * 4 + [EOT_ID]
    assert meta["splits"]["val"]["unknown"] == 4


# -- prepare: the validation split --------------------------------------------------------------


def test_same_seed_gives_identical_bins_and_another_seed_another_split(tmp_path, tiny_corpus):
    def bins(seed: int, name: str) -> tuple[bytes, bytes]:
        out = tmp_path / name
        prepare([tiny_corpus], out, val_fraction=0.2, seed=seed, verbose=False, overwrite=True)
        return (out / "train.bin").read_bytes(), (out / "val.bin").read_bytes()

    assert bins(1, "a") == bins(1, "b")
    assert bins(2, "c") != bins(1, "a")
    sides_a = _split_of_each_document(tmp_path / "a", TINY_DOCUMENTS)
    sides_c = _split_of_each_document(tmp_path / "c", TINY_DOCUMENTS)
    assert sides_a != sides_c
    assert sides_a.count("val") == sides_c.count("val") == 4


def test_val_split_is_whole_documents_in_original_order(tmp_path):
    documents = [f"第{i}篇\n内容{i}" for i in range(30)]
    corpus = _write_docs(tmp_path / "corpus.txt", documents)
    prepare([corpus], tmp_path / "data", val_fraction=0.1, seed=3, verbose=False)
    sides = _split_of_each_document(tmp_path / "data", documents)
    assert sides.count("val") == 3
    data = TokenData(tmp_path / "data")
    for split in ("train", "val"):
        decoded = [data.tokenizer.decode(ids) for ids in _documents_in(data.split(split))]
        assert decoded == [doc for doc, side in zip(documents, sides) if side == split]


@pytest.mark.parametrize("val_fraction", [0.01, 0.99])
def test_each_split_gets_at_least_one_document(tmp_path, val_fraction):
    corpus = _write_docs(tmp_path / "corpus.txt", ["甲", "乙"])
    meta = prepare([corpus], tmp_path / "data", val_fraction=val_fraction, verbose=False)
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1


def test_documents_never_span_files(tmp_path):
    (tmp_path / "a.txt").write_text("一\n二", encoding="utf-8")
    (tmp_path / "b.txt").write_text("三\n四", encoding="utf-8")
    meta = prepare([tmp_path], tmp_path / "data", verbose=False)
    assert meta["split_by"] == "documents"
    assert [s["path"] for s in meta["sources"]] == [(tmp_path / n).as_posix() for n in ("a.txt", "b.txt")]
    assert _split_of_each_document(tmp_path / "data", ["一\n二", "三\n四"]) in (
        ["train", "val"],
        ["val", "train"],
    )


def test_single_document_holds_out_its_last_lines(tmp_path, capsys):
    lines = [f"第{i}行" for i in range(20)]
    corpus = tmp_path / "one.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = prepare([corpus], tmp_path / "data", val_fraction=0.1, verbose=True)
    assert meta["split_by"] == "lines"
    data = TokenData(tmp_path / "data")
    assert data.tokenizer.decode(data.train) == "\n".join(lines[:18]) + "<|endoftext|>"
    assert data.val.tolist() == data.tokenizer.encode("\n".join(lines[18:])) + [EOT_ID]
    assert "only one document (no blank lines): holding out its last 2 of 20 lines" in capsys.readouterr().out


def test_single_line_holds_out_its_last_characters(tmp_path, capsys):
    corpus = tmp_path / "line.txt"
    corpus.write_text("一二三四五六七八九十", encoding="utf-8")
    meta = prepare([corpus], tmp_path / "data", val_fraction=0.2, verbose=True)
    assert meta["split_by"] == "characters"
    data = TokenData(tmp_path / "data")
    assert data.tokenizer.decode(data.train) == "一二三四五六七八<|endoftext|>"
    assert data.val.tolist() == [UNK_ID, UNK_ID, EOT_ID]  # 九十 were never seen in training
    assert "holding out its last 2 of 10 characters" in capsys.readouterr().out


# -- prepare: refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", " \n\n\t\u3000\r\n"])
def test_empty_or_whitespace_corpus_is_refused(tmp_path, content):
    corpus = tmp_path / "empty.txt"
    corpus.write_text(content, encoding="utf-8")
    with pytest.raises(ZaizaiError, match=re.escape(f"the corpus is empty or only whitespace ({corpus})")):
        prepare([corpus], tmp_path / "data", verbose=False)
    assert not (tmp_path / "data").exists()


def test_single_character_corpus_is_refused(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("一\n", encoding="utf-8")
    with pytest.raises(ZaizaiError, match="single character; it needs more text"):
        prepare([corpus], tmp_path / "data", verbose=False)


@pytest.mark.parametrize("val_fraction", [0, 1, -0.1, 1.5, float("nan"), True, "0.1"])
def test_val_fraction_must_be_between_0_and_1(tmp_path, tiny_corpus, val_fraction):
    with pytest.raises(ZaizaiError, match="--val-fraction must be between 0 and 1"):
        prepare([tiny_corpus], tmp_path / "data", val_fraction=val_fraction, verbose=False)


def test_non_utf8_input_is_refused_and_encoding_gbk_works(tmp_path):
    corpus = tmp_path / "gbk.txt"
    documents = ["你好\n你好，我是崽崽", "早上好\n早上好！"]
    corpus.write_bytes("\r\n\r\n".join(d.replace("\n", "\r\n") for d in documents).encode("gbk"))
    with pytest.raises(ZaizaiError, match=r"gbk.txt: not valid UTF-8 at byte 0; .* --encoding gbk"):
        prepare([corpus], tmp_path / "data", verbose=False)
    meta = prepare([corpus], tmp_path / "data", encoding="GBK", verbose=False)
    assert meta["encoding"] == "gbk"
    assert sorted(_split_of_each_document(tmp_path / "data", documents)) == ["train", "val"]


# -- bytes that do not decode: --errors strict | replace | ignore -----------------------------------

_CUT_DOCUMENTS = ["你好\n你好，我是崽崽", "早上好\n早上好！", "今天天气怎么样？\n晴天。", "晚安\n晚安，做个好梦"]


def _cut_corpus(path: Path) -> int:
    """Write _CUT_DOCUMENTS with the last character ("梦", 3 bytes) cut after its first 2 bytes;
    return the byte offset of the cut character."""
    raw = "\n\n".join(_CUT_DOCUMENTS).encode()
    path.write_bytes(raw[:-1])
    return len(raw) - 3


@pytest.mark.parametrize("streamed", [False, True])
def test_a_file_cut_inside_its_last_character(tmp_path, monkeypatch, capsys, streamed):
    import zaizai.data.build_plain

    workers = None
    if streamed:  # many pieces cut at blank lines, two worker processes
        monkeypatch.setattr(zaizai.data.build_plain, "PIECE_BYTES", 8)
        workers = 2
    corpus = tmp_path / "cut.txt"
    offset = _cut_corpus(corpus)
    with pytest.raises(ZaizaiError, match=rf"cut.txt: the file ends in the middle of a character at byte {offset} "
                                          r"\(truncated\?\); add --errors replace .* or --errors ignore") as err:
        prepare([corpus], tmp_path / "data", workers=workers, verbose=False)
    assert "gbk" not in str(err.value)
    assert not (tmp_path / "data").exists()

    for errors, last in (("replace", "晚安\n晚安，做个好\ufffd"), ("ignore", "晚安\n晚安，做个好")):
        capsys.readouterr()
        meta = prepare([corpus], tmp_path / errors, errors=errors, workers=workers)
        out = capsys.readouterr().out
        documents = [*_CUT_DOCUMENTS[:-1], last]
        assert meta["errors"] == errors and meta["sources"][0]["undecodable"] == 1
        assert "\n\n".join(documents) + "\n" in out  # the preview: the whole corpus, ending as it ends
        assert sorted(_split_of_each_document(tmp_path / errors, documents)) == ["train"] * 3 + ["val"]
        summary = {"replace": "替换了 1 个无法解码的字符 replaced 1 undecodable character(s) with U+FFFD",
                   "ignore": "丢弃了 1 个无法解码的字符 dropped 1 undecodable character(s) (--errors ignore)"}
        assert summary[errors] in out.splitlines()
    assert not list(tmp_path.glob("*/.*partial"))


def test_errors_apply_to_dialogues_too(tmp_path):
    corpus = tmp_path / "chat.txt"
    _cut_corpus(corpus)
    with pytest.raises(ZaizaiError, match="ends in the middle of a character"):
        prepare([corpus], tmp_path / "data", format="text", verbose=False)
    meta = prepare([corpus], tmp_path / "data", format="text", errors="replace", verbose=False)
    assert meta["kind"] == "dialogue" and meta["sources"][0]["undecodable"] == 1
    data = TokenData(tmp_path / "data")
    assert "晚安，做个好\ufffd" in data.tokenizer.decode(data.split("train"))  # (seed 1337 keeps it in train)


def test_strict_clean_files_record_no_errors_setting(tmp_path, tiny_corpus):
    meta = prepare([tiny_corpus], tmp_path / "data", verbose=False)
    assert "errors" not in meta and "undecodable" not in meta["sources"][0]
    meta = prepare([tiny_corpus], tmp_path / "data", errors="replace", verbose=False, overwrite=True)
    assert meta["errors"] == "replace" and meta["sources"][0]["undecodable"] == 0
    with pytest.raises(ZaizaiError, match="--errors must be one of strict, replace, ignore"):
        prepare([tiny_corpus], tmp_path / "data", errors="surrogateescape", verbose=False, overwrite=True)


def test_cli_errors_flag_and_messages(tmp_path, capsys):
    from util import run_cli

    from zaizai.cli import main

    cut = tmp_path / "cut.txt"
    offset = _cut_corpus(cut)
    refused = run_cli("prepare", cut, "--out", tmp_path / "data")
    assert refused.returncode == 2 and not (tmp_path / "data").exists()
    assert refused.stderr.strip().count("\n") == 0
    assert f"the file ends in the middle of a character at byte {offset} (truncated?)" in refused.stderr
    assert "--errors replace" in refused.stderr and "gbk" not in refused.stderr

    assert main(["prepare", str(cut), "--out", str(tmp_path / "data"), "--errors", "ignore"]) == 0
    assert "丢弃了 1 个无法解码的字符" in capsys.readouterr().out
    assert load_meta(tmp_path / "data")["errors"] == "ignore"

    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("\n\n".join(_CUT_DOCUMENTS).encode("gbk"))
    assert main(["prepare", str(gbk), "--out", str(tmp_path / "gbk")]) == 2
    assert not (tmp_path / "gbk").exists()
    message = capsys.readouterr().err
    assert "gbk.txt: not valid UTF-8 at byte 0;" in message and "--encoding gbk" in message
    assert "--errors replace" in message and message.strip().count("\n") == 0


def test_output_folder_that_is_a_file_is_refused(tmp_path, tiny_corpus):
    blocker = tmp_path / "data"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(ZaizaiError, match="is a file; give a folder"):
        prepare([tiny_corpus], blocker, verbose=False)


def test_outputs_never_overwrite_an_input(tmp_path):
    corpus = tmp_path / "meta.json"
    corpus.write_text("一\n\n二\n", encoding="utf-8")
    with pytest.raises(ZaizaiError, match="already exists; add --overwrite"):
        prepare([corpus], tmp_path, verbose=False)
    with pytest.raises(ZaizaiError, match="is both an input and an output"):
        prepare([corpus], tmp_path, verbose=False, overwrite=True)
    assert corpus.read_text(encoding="utf-8") == "一\n\n二\n"


def test_input_files_are_never_modified(tmp_path):
    corpus = tmp_path / "corpus.txt"
    raw = b"\xef\xbb\xbf" + "一\r\n二\r\n\r\n三\r\n".encode()
    corpus.write_bytes(raw)
    before = corpus.stat().st_mtime_ns
    prepare([corpus], tmp_path / "data", verbose=False)
    assert corpus.read_bytes() == raw
    assert corpus.stat().st_mtime_ns == before


# -- prepare: dtype, atomicity, printout ---------------------------------------------------------


def test_more_than_65535_tokens_are_stored_as_uint32(tmp_path):
    chars = "".join(chr(cp) for cp in range(0x20000, 0x20000 + 65536))  # CJK extension B and on
    corpus = _write_docs(tmp_path / "big.txt", [chars, chars])
    meta = prepare([corpus], tmp_path / "data", verbose=False)
    assert meta["vocab_size"] == 65536 + 6
    assert meta["dtype"] == "uint32"
    train = np.memmap(tmp_path / "data" / "train.bin", dtype=meta["dtype"], mode="r")
    assert train.max() == meta["vocab_size"] - 1
    assert (tmp_path / "data" / "train.bin").stat().st_size == 4 * (65536 + 1)


def test_small_vocabularies_are_stored_as_uint16(tiny_data_dir):
    assert load_meta(tiny_data_dir)["dtype"] == "uint16"
    assert TokenData(tiny_data_dir).train.dtype == np.uint16


def test_a_crash_while_writing_leaves_no_half_file_and_no_meta(tmp_path, tiny_corpus, monkeypatch):
    out = tmp_path / "data"
    prepare([tiny_corpus], out, seed=1, verbose=False)
    old_train = (out / "train.bin").read_bytes()
    old_meta = load_meta(out)
    files = ["meta.json", "tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"]

    def crash(fd):
        raise OSError(28, "No space left on device")

    # A crash while the streamed bins are written (to partial files) leaves the old folder whole.
    monkeypatch.setattr(zaizai.data.tokenizer.os, "fsync", crash)
    with pytest.raises(ZaizaiError, match="cannot write there \\(No space left on device\\)"):
        prepare([tiny_corpus], out, seed=2, verbose=False, overwrite=True)
    assert (out / "train.bin").read_bytes() == old_train  # the old file, whole
    assert sorted(p.name for p in out.iterdir()) == files  # no partial file left
    assert load_meta(out) == old_meta

    # A crash after the old meta.json is gone (writing the tokenizer) leaves no meta.json.
    monkeypatch.undo()

    def crash_saving(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zaizai.data.tokenizer.CharTokenizer, "save", crash_saving)
    with pytest.raises(ZaizaiError, match="cannot write there \\(No space left on device\\)"):
        prepare([tiny_corpus], out, seed=2, verbose=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == files[1:]  # no partial file, no meta.json
    with pytest.raises(ZaizaiError, match="not a prepared data folder"):
        load_meta(out)


def test_verbose_prints_counts_bilingually(tmp_path, tiny_corpus, capsys):
    meta = prepare([tiny_corpus], tmp_path / "data", val_fraction=0.2, verbose=True)
    out = capsys.readouterr().out
    text = tiny_corpus.read_text(encoding="utf-8")
    assert f"字符数 characters: {len(text):,}\n" in out
    assert f"词表大小 vocab size: {meta['vocab_size']:,}\n" in out
    assert f"前 100 个字符 first 100 characters:\n{text[:100]}\n" in out
    assert f"训练集 train: {meta['splits']['train']['tokens']:,} tokens (16 documents)\n" in out
    assert f"验证集 val: {meta['splits']['val']['tokens']:,} tokens (4 documents)\n" in out
    assert f"已写入 wrote: {tmp_path / 'data' / 'train.bin'}" in out


def test_quiet_prepare_prints_nothing(tmp_path, tiny_corpus, capsys):
    prepare([tiny_corpus], tmp_path / "data", verbose=False)
    assert capsys.readouterr() == ("", "")


# -- load_meta and TokenData ---------------------------------------------------------------------


def test_load_meta_refuses_folders_that_are_not_prepared(tmp_path):
    missing = "no such folder; run `zaizai prepare YOUR_TEXT --out .*missing` first"
    with pytest.raises(ZaizaiError, match=missing):
        load_meta(tmp_path / "missing")
    not_prepared = re.escape(
        f"not a prepared data folder (no meta.json); run `zaizai prepare YOUR_TEXT --out {tmp_path}`"
    )
    with pytest.raises(ZaizaiError, match=not_prepared):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(ZaizaiError, match="meta.json is damaged"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"version": 99}', encoding="utf-8")
    with pytest.raises(ZaizaiError, match="format version 99"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"version": 1, "dtype": "float32"}', encoding="utf-8")
    with pytest.raises(ZaizaiError, match="not zaizai data metadata"):
        load_meta(tmp_path)


def test_token_data_opens_read_only_memmaps(tiny_data_dir):
    data = TokenData(tiny_data_dir)
    meta = load_meta(tiny_data_dir)
    assert data.meta == meta
    assert isinstance(data.tokenizer, CharTokenizer)
    assert data.tokenizer.vocab_size == meta["vocab_size"]
    assert isinstance(data.train, np.memmap)
    assert not data.train.flags.writeable
    assert data.num_tokens("val") == meta["splits"]["val"]["tokens"]
    with pytest.raises(ZaizaiError, match="unknown split 'test'; use one of train, val"):
        data.split("test")


def test_token_data_pickles_without_its_arrays(tiny_data_dir):
    data = TokenData(tiny_data_dir)
    expected = data.train.tolist()
    copy = pickle.loads(pickle.dumps(data))  # what starting another process does
    assert copy._arrays == {}
    assert copy.train.tolist() == expected


def test_a_bin_that_does_not_match_meta_is_refused(tiny_data_dir):
    path = tiny_data_dir / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ZaizaiError, match="train.bin does not match meta.json"):
        TokenData(tiny_data_dir).train


def test_get_batch_samples_shifted_windows(tiny_data_dir):
    data = TokenData(tiny_data_dir)
    train = np.asarray(data.train, dtype=np.int64)
    block_size, batch_size = 8, 5
    x, y = data.get_batch("train", batch_size, block_size, np.random.default_rng(0))
    assert x.shape == y.shape == (batch_size, block_size)
    assert x.dtype == y.dtype == torch.int64
    windows = np.lib.stride_tricks.sliding_window_view(train, block_size + 1)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        assert (row_x[1:] == row_y[:-1]).all()
        window = np.concatenate([row_x, row_y[-1:]])
        assert (windows == window).all(axis=1).any(), "each row is a real window of the split"
    x2, y2 = data.get_batch("train", batch_size, block_size, np.random.default_rng(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded


def test_get_batch_reaches_the_last_token(tmp_path):
    corpus = _write_docs(tmp_path / "c.txt", ["一二", "三四"])
    prepare([corpus], tmp_path / "data", val_fraction=0.5, verbose=False)
    data = TokenData(tmp_path / "data")
    # A split of 3 tokens and block size 2 has exactly one window: all of it.
    x, y = data.get_batch("train", 4, 2, np.random.default_rng(0))
    train = data.train.tolist()
    assert x.tolist() == [train[:2]] * 4 and y.tolist() == [train[1:]] * 4


def test_split_shorter_than_a_block_is_refused(tiny_data_dir):
    data = TokenData(tiny_data_dir)
    n = data.num_tokens("val")
    too_short = f"only {n:,} tokens.*use a smaller --block-size \\(at most {n - 1}\\)"
    with pytest.raises(ZaizaiError, match=too_short):
        data.get_batch("val", 2, n, np.random.default_rng(0))
    data.get_batch("val", 2, n - 1, np.random.default_rng(0))  # exactly enough


@pytest.mark.parametrize(("block_size", "batch_size"), [(1, 1), (7, 3), (16, 64), (1000, 2)])
def test_eval_windows_cover_every_token_exactly_once(tiny_data_dir, block_size, batch_size):
    data = TokenData(tiny_data_dir)
    val = data.val.tolist()
    inputs, targets = [], []
    for x, y in data.iter_eval_windows("val", block_size, batch_size):
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape and x.shape[1] == block_size and 1 <= x.shape[0] <= batch_size
        keep = y != IGNORE_INDEX
        inputs += x[keep].tolist()
        targets += y[keep].tolist()
    assert targets == val[1:]  # every token after the first is predicted once, in order
    assert inputs == val[:-1]  # from the token right before it


def test_eval_windows_rows_are_consecutive_slices(tmp_path):
    corpus = _write_docs(tmp_path / "c.txt", ["一二三四五六七", "八"])
    prepare([corpus], tmp_path / "data", val_fraction=0.5, seed=0, verbose=False)
    data = TokenData(tmp_path / "data")
    split = "train" if data.num_tokens("train") == 8 else "val"
    ids = data.split(split).tolist()  # 一二三四五六七 EOT
    (x, y), = data.iter_eval_windows(split, 3, 8)
    assert x.tolist() == [ids[0:3], ids[3:6], ids[6:7] + [EOT_ID] * 2]
    assert y.tolist() == [ids[1:4], ids[4:7], ids[7:8] + [IGNORE_INDEX] * 2]


def test_bits_per_char_of_the_char_tokenizer_is_loss_over_ln2(tiny_data_dir):
    data = TokenData(tiny_data_dir)
    assert data.bits_per_char("val", 2.0) == pytest.approx(2.0 / math.log(2))


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_seed_must_be_a_non_negative_integer(tmp_path, tiny_corpus, seed):
    with pytest.raises(ZaizaiError, match="--seed must be a whole number >= 0"):
        prepare([tiny_corpus], tmp_path / "data", seed=seed, verbose=False)


def test_plain_text_can_reuse_a_tokenizer(tmp_path, tiny_corpus, capsys):
    prepare([tiny_corpus], tmp_path / "first", verbose=False)
    original = load_tokenizer(tmp_path / "first" / "tokenizer.json")
    more = _write_docs(tmp_path / "more.txt", ["你好，熊猫", "晚安，熊猫"])  # 熊猫 is new
    meta = prepare([more], tmp_path / "second", tokenizer=tmp_path / "first", verbose=True)
    assert load_tokenizer(tmp_path / "second" / "tokenizer.json") == original
    assert meta["tokenizer_from"] == (tmp_path / "first" / "tokenizer.json").as_posix()
    data = TokenData(tmp_path / "second")
    both = data.train.tolist() + data.val.tolist()
    assert sorted(both) == sorted(original.encode("你好，熊猫") + original.encode("晚安，熊猫") + [EOT_ID] * 2)
    assert meta["splits"]["train"]["unknown"] + meta["splits"]["val"]["unknown"] == 4
    assert "(reused " in capsys.readouterr().out


def test_missing_tokenizer_to_reuse_is_refused(tmp_path, tiny_corpus):
    with pytest.raises(ZaizaiError, match="--tokenizer .*nope: no such file or folder"):
        prepare([tiny_corpus], tmp_path / "data", tokenizer=tmp_path / "nope", verbose=False)
    assert not (tmp_path / "data").exists()


def test_cli_tokenizer_flag_builds_char_or_bpe_or_reuses_a_path(tmp_path, tiny_corpus):
    from zaizai.cli import main

    assert main(["prepare", str(tiny_corpus), "--out", str(tmp_path / "b"), "--tokenizer", "bpe",
                 "--vocab-size", "300"]) == 0
    assert load_meta(tmp_path / "b")["tokenizer"] == "bpe"
    assert load_meta(tmp_path / "b")["vocab_size"] <= 300
    assert main(["prepare", str(tiny_corpus), "--out", str(tmp_path / "c")]) == 0
    assert load_meta(tmp_path / "c")["tokenizer"] == "char"
    assert main(["prepare", str(tiny_corpus), "--out", str(tmp_path / "r"), "--tokenizer", str(tmp_path / "b")]) == 0
    reused = load_meta(tmp_path / "r")
    assert reused["tokenizer"] == "bpe" and reused["tokenizer_from"] == (tmp_path / "b" / "tokenizer.json").as_posix()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_streaming_in_small_pieces_with_workers_gives_the_same_folder(tmp_path, monkeypatch, kind):
    from util import write_corpus

    import zaizai.data.build_plain

    first = write_corpus(tmp_path / "a.txt", n_docs=80, seed=1)
    second = tmp_path / "b.txt"  # CRLF line endings and a BOM, cut between pieces too
    second.write_bytes(b"\xef\xbb\xbf" + write_corpus(tmp_path / "c.txt", n_docs=40, seed=2)
                       .read_bytes().replace(b"\n", b"\r\n"))
    whole = prepare([first, second], tmp_path / "whole", tokenizer=kind, vocab_size=300, verbose=False)
    monkeypatch.setattr(zaizai.data.build_plain, "PIECE_BYTES", 100)  # many pieces, two worker processes
    pieces = prepare([first, second], tmp_path / "pieces", tokenizer=kind, vocab_size=300, workers=2,
                     verbose=False)
    assert pieces["splits"] == whole["splits"] and pieces["sources"] == whole["sources"]
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "pieces" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not list((tmp_path / "pieces").glob(".*partial"))
