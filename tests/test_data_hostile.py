"""Hostile inputs to the data stage (issue 17): prepare never writes over another kind of folder, memory stays
bounded whatever the text's shape, and damaged or odd data gives one clear line instead of a traceback or a
silent mistake."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_DOCUMENTS

import zaizai.data.build_plain
from zaizai.common.errors import ZaizaiError
from zaizai.data.corpus import iter_file_pieces, split_documents
from zaizai.data.preparation import prepare
from zaizai.data.tokendata import TokenData, load_meta
from zaizai.data.tokenizer import EOT_ID


def _dialogues(path: Path, n: int = 12) -> Path:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"问题{i}"},
                                      {"role": "assistant", "content": f"回答{i}，好的。"}]}, ensure_ascii=False)
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- 1. never over another kind of folder, nor over data without overwrite ---------------------------------


def test_prepare_refuses_a_model_folder_before_reading_anything(tmp_path, tiny_corpus):
    model = tmp_path / "m1"
    model.mkdir()
    (model / "last.safetensors").write_bytes(b"weights")
    (model / "tokenizer.json").write_text('{"the": "model\'s tokenizer"}', encoding="utf-8")
    before = _files(model)
    for overwrite in (False, True):
        with pytest.raises(ZaizaiError, match="already is a model folder"):
            prepare([tiny_corpus], model, verbose=False, overwrite=overwrite)
        # refused before the inputs are even looked at
        with pytest.raises(ZaizaiError, match="already is a model folder"):
            prepare([tmp_path / "missing.txt"], model, verbose=False, overwrite=overwrite)
    assert _files(model) == before


def test_prepare_replaces_a_data_folder_only_with_overwrite(tmp_path, tiny_corpus):
    out = tmp_path / "data"
    prepare([tiny_corpus], out, verbose=False)
    with pytest.raises(ZaizaiError, match="already exists; add --overwrite"):
        prepare([tiny_corpus], out, verbose=False, seed=2)
    stray = tmp_path / "stuff"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ZaizaiError, match="already exists; add --overwrite"):
        prepare([tiny_corpus], stray, verbose=False)
    assert prepare([tiny_corpus], out, verbose=False, seed=2, overwrite=True)["seed"] == 2


@pytest.mark.parametrize("streamed", [False, True])
def test_a_failing_prepare_leaves_the_data_folder_as_it_was(tmp_path, tiny_corpus, monkeypatch, streamed):
    out = tmp_path / "data"
    prepare([tiny_corpus], out, verbose=False)
    before = _files(out)
    if streamed:
        monkeypatch.setattr(zaizai.data.build_plain, "PIECE_BYTES", 64)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("一\n\n二\n\n".encode() * 20 + b"\xff\xfe tail")  # not UTF-8, near the end
    with pytest.raises(ZaizaiError, match="not valid UTF-8"):
        prepare([bad], out, verbose=False, overwrite=True, workers=1)
    assert _files(out) == before
    TokenData(out).train  # noqa: B018 - still loads


# -- 2. bounded memory: long lines are cut into pieces too --------------------------------------------------


def test_pieces_are_cut_inside_a_long_line_at_character_borders(tmp_path):
    from zaizai.data.corpus import split_segments

    text = "床前明月光，疑是地上霜。举头望明月 low 头思故乡" * 40 + "\n\n短文\n"
    path = tmp_path / "line.txt"
    path.write_bytes(text.encode())
    pieces = list(iter_file_pieces(path, "utf-8", piece_bytes=100))
    assert len(pieces) > 10 and max(len(raw) for _, raw, _ in pieces) <= 200
    assert b"".join(raw for _, raw, _ in pieces) == text.encode()
    for offset, raw, inside in pieces:
        raw.decode()  # every piece decodes on its own: never cut inside a character
        if inside:
            assert not raw.decode()[-1].isspace()
    # the segments, joined back across the cuts, are exactly the documents
    documents, open_ = [], False
    for _, raw, inside in pieces:
        segments = split_segments(raw.decode(), open_, inside)
        if open_:
            documents[-1] += segments.pop(0)
        documents += segments
        open_ = inside
    assert documents == split_documents(text)


def test_gbk_pieces_are_cut_at_character_borders(tmp_path):
    text = "中文文本没有换行也没有标点" * 50
    path = tmp_path / "gbk.txt"
    path.write_bytes(text.encode("gbk"))
    pieces = list(iter_file_pieces(path, "gbk", piece_bytes=101))
    assert len(pieces) > 5
    assert "".join(raw.decode("gbk") for _, raw, _ in pieces) == text


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_a_single_long_line_prepares_in_pieces_and_loses_nothing(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(zaizai.data.build_plain, "PIECE_BYTES", 512)
    text = "".join(f"第{i}句话，说的是月亮和星星。" for i in range(400))  # one line, ~8 KB
    path = tmp_path / "line.txt"
    path.write_text(text, encoding="utf-8")
    meta = prepare([path], tmp_path / "data", tokenizer=tokenizer, vocab_size=300, val_fraction=0.1,
                   verbose=False, workers=1)
    data = TokenData(tmp_path / "data")
    train, val = np.asarray(data.train), np.asarray(data.val)
    assert meta["split_by"] == "characters" and train[-1] == EOT_ID and val[-1] == EOT_ID
    assert np.count_nonzero(train == EOT_ID) == 1 and np.count_nonzero(val == EOT_ID) == 1
    assert data.tokenizer.decode(train[:-1]) + data.tokenizer.decode(val[:-1]) == text
    assert abs(meta["splits"]["val"]["chars"] - 1 - 0.1 * len(text)) <= 1


def test_a_huge_document_among_others_keeps_whole_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(zaizai.data.build_plain, "PIECE_BYTES", 256)
    documents = [f"短文档{i}" for i in range(8)]
    documents.insert(3, "很长的一段话，" * 300)  # spans many pieces
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(documents), encoding="utf-8")
    meta = prepare([path], tmp_path / "data", val_fraction=0.3, tokenizer="bpe", vocab_size=300, verbose=False,
                   workers=1)
    data = TokenData(tmp_path / "data")
    texts = []
    for split in ("train", "val"):
        texts += data.tokenizer.decode(np.asarray(data.split(split))).split("<|endoftext|>")[:-1]
    assert sorted(texts) == sorted(documents)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(documents)


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_a_long_line_reaches_the_tokenizer_in_bounded_pieces(tmp_path, monkeypatch, tokenizer):
    """What bounds memory: no text longer than a piece is decoded or encoded at once, the BPE encodes and
    trains on short chunks, and trains on a sample only (before: the whole line, at once, all of it)."""
    from zaizai.data.tokenizer import BPETokenizer, CharTokenizer, HFTokenizer

    monkeypatch.setattr(zaizai.data.build_plain, "PIECE_BYTES", 16 << 10)
    monkeypatch.setattr(zaizai.data.build_plain, "BPE_SAMPLE_CHARS", 20_000)
    seen = {"encode": 0, "train_longest": 0, "train_total": 0}

    def spy(method, longest):
        def wrapped(self, texts):
            seen["encode"] = max(seen["encode"], longest(texts))
            return method(self, texts)
        return wrapped

    monkeypatch.setattr(HFTokenizer, "encode_batch", spy(HFTokenizer.encode_batch, lambda t: max(map(len, t))))
    monkeypatch.setattr(CharTokenizer, "encode_array", spy(CharTokenizer.encode_array, len))
    train = BPETokenizer.train.__func__

    def counting_train(cls, texts, *args, **kwargs):
        texts = list(texts)
        seen["train_longest"] = max(map(len, texts))
        seen["train_total"] = sum(map(len, texts))
        return train(cls, texts, *args, **kwargs)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(counting_train))
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(np.array([chr(c) for c in range(0x4E00, 0x4E00 + 500)] + ["，", "。"]), size=100_000))
    path = tmp_path / "line.txt"
    path.write_text(text, encoding="utf-8")  # 300 KB, one line
    prepare([path], tmp_path / "data", tokenizer=tokenizer, vocab_size=300, verbose=False, workers=1)
    assert 0 < seen["encode"] <= (4096 if tokenizer == "bpe" else 16 << 10)
    if tokenizer == "bpe":
        assert 0 < seen["train_longest"] <= 4096 and seen["train_total"] <= 30_000


_MEASURE = textwrap.dedent("""
    import resource, sys
    import zaizai.data.build_plain as build_plain
    from zaizai.data.preparation import prepare
    build_plain.PIECE_BYTES = 1 << 20
    build_plain.BPE_SAMPLE_CHARS = 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prepare([sys.argv[1]], sys.argv[2], tokenizer="bpe", vocab_size=400, verbose=False, workers=1)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


def test_bpe_prepare_of_one_long_line_stays_in_bounded_memory(tmp_path):
    # 4 MB of Chinese text on one line, read in 1 MB pieces: memory grows with a piece, not the file
    # (before the fix the whole line was one document held, trained on and encoded at once: about 600 MB).
    rng = np.random.default_rng(0)
    han = np.array([chr(c) for c in range(0x4E00, 0x4E00 + 800)])
    sentence = "".join(rng.choice(han, size=4000)) + "，"
    path = tmp_path / "line.txt"
    path.write_text(sentence * 350, encoding="utf-8")
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "data")], capture_output=True,
                          text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    growth_mb = int(done.stdout.split()[-1])
    assert growth_mb < 150, f"peak RSS grew by {growth_mb} MB"
    print(f"peak RSS growth {growth_mb} MB")
    assert load_meta(tmp_path / "data")["splits"]["train"]["tokens"] > 0


# -- 3. JSON nested too deeply ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "lccc"])
def test_deeply_nested_json_is_one_line_not_a_recursion_error(tmp_path, fmt):
    deep = "[" * 100_000 + "]" * 100_000
    if fmt == "jsonl":
        path = _dialogues(tmp_path / "chat.jsonl")
        path.write_text(path.read_text(encoding="utf-8") + deep + "\n", encoding="utf-8")
    else:
        path = tmp_path / "chat.json"
        path.write_text(f'[["你好", "你好呀"], ["在吗", "在的"], {deep}]', encoding="utf-8")
    with pytest.raises(ZaizaiError, match="nested too deeply") as err:
        prepare([path], tmp_path / "data", verbose=False)
    assert "\n" not in str(err.value)
    if fmt == "jsonl":  # a bad line like any other: skipped with skip_bad
        meta = prepare([path], tmp_path / "data", verbose=False, skip_bad=True)
        assert meta["splits"]["train"]["dialogues"] + meta["splits"]["val"]["dialogues"] == 12


# -- 4. damaged bins, tables and meta.json ------------------------------------------------------------


def test_ids_beyond_the_vocabulary_are_found_when_the_bin_is_opened(tiny_data_dir):
    meta = load_meta(tiny_data_dir)
    train = np.fromfile(tiny_data_dir / "train.bin", dtype="<u2")
    train[len(train) // 2] = meta["vocab_size"]  # one id out of range
    train.tofile(tiny_data_dir / "train.bin")
    data = TokenData(tiny_data_dir)
    with pytest.raises(ZaizaiError, match="train.bin holds values out of range .*damaged; run `zaizai prepare`"):
        data.get_batch("train", 2, 4, np.random.default_rng(0))
    assert TokenData(tiny_data_dir).val.size  # the other split is fine


@pytest.mark.parametrize("damage", ["roles", "dialogues", "turns", "overlap"])
def test_garbage_dialogue_tables_are_refused(tmp_path, damage):
    out = tmp_path / "data"
    prepare([_dialogues(tmp_path / "chat.jsonl")], out, verbose=False)
    if damage == "roles":
        roles = np.fromfile(out / "train_roles.bin", dtype=np.uint8)
        roles[3] = 200
        roles.tofile(out / "train_roles.bin")
    else:
        name = "train_turns.npy" if damage == "turns" else "train_dialogues.npy"
        table = np.load(out / name)
        if damage == "dialogues":
            table[-1, 0] = 10**12  # a dialogue far past the end of the bin
        elif damage == "overlap":
            table[1, 0] = table[0, 0]
        else:
            table[2] = -5
        np.save(out / name, table)
    data = TokenData(out)
    with pytest.raises(ZaizaiError, match="damaged; run `zaizai prepare` again"):
        data.get_dialogue_batch("train", 2, 16, np.random.default_rng(0))


@pytest.mark.parametrize("text", [
    '{"version": 1, "kind": "plain", "dtype": "uint16", "vocab_sz',  # truncated
    "\x00\x01garbage",
    "[" * 50_000 + "]" * 50_000,
    '{"version": 1, "dtype": "uint16", "vocab_size": "80", "tokenizer_file": "tokenizer.json", "splits": {}}',
    '{"version": 1, "dtype": "uint16", "vocab_size": true, "tokenizer_file": "tokenizer.json", "splits": {}}',
    '{"version": 1, "dtype": "uint16", "vocab_size": 70000, "tokenizer_file": "tokenizer.json", "splits": {}}',
    '{"version": 1, "dtype": "uint16", "vocab_size": 80, "tokenizer_file": "t", "splits": '
    '{"train": {"tokens": -3, "chars": 1}, "val": {"tokens": 2, "chars": 1}}}',
    '{"version": 1, "dtype": "uint16", "vocab_size": 80, "tokenizer_file": "t", "splits": [1, 2]}',
    '{"version": 1, "kind": "plain", "dtype": "uint16", "vocab_size": 80, "tokenizer_file": "t", "splits": '
    '{"train": {"tokens": 3, "chars": 1}, "val": {"tokens": 2, "chars": 1e400}}}',
])
def test_damaged_meta_json_is_one_line(tiny_data_dir, text):
    (tiny_data_dir / "meta.json").write_text(text, encoding="utf-8")
    with pytest.raises(ZaizaiError, match="meta.json") as err:
        TokenData(tiny_data_dir)
    assert "\n" not in str(err.value) and "prepare" in str(err.value)


# -- 5. NUL characters --------------------------------------------------------------------------------


def test_a_few_nul_characters_are_dropped_and_counted(tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    text = "\n\n".join(TINY_DOCUMENTS)
    path.write_text(text[:50] + "\x00" + text[50:100] + "\x00" + text[100:], encoding="utf-8")
    meta = prepare([path], tmp_path / "data", verbose=True)
    assert "\x00" not in TokenData(tmp_path / "data").tokenizer.chars
    assert meta["sources"][0]["nul"] == 2
    assert "dropped 2 NUL character(s)" in capsys.readouterr().out


def test_utf16_read_as_utf8_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("你好\n\nhello world\n\nabc".encode("utf-16-le"))  # no byte-order mark, all valid UTF-8
    with pytest.raises(ZaizaiError, match="NUL bytes.*--encoding utf-16"):
        prepare([path], tmp_path / "data", verbose=False)
    dialogues = tmp_path / "chat.jsonl"
    dialogues.write_bytes(_dialogues(tmp_path / "x.jsonl").read_text(encoding="utf-8").encode("utf-16-le"))
    with pytest.raises(ZaizaiError, match="--encoding utf-16"):
        prepare([dialogues], tmp_path / "chat", verbose=False)


# -- 6. an empty validation split ---------------------------------------------------------------------


def test_an_empty_val_split_is_refused_when_the_data_is_loaded(tiny_data_dir):
    meta = json.loads((tiny_data_dir / "meta.json").read_text(encoding="utf-8"))
    meta["splits"]["val"]["tokens"] = 0
    (tiny_data_dir / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (tiny_data_dir / "val.bin").write_bytes(b"")
    with pytest.raises(ZaizaiError, match="validation split is empty .*--val-fraction"):
        TokenData(tiny_data_dir)


def test_prepare_warns_about_a_val_split_shorter_than_a_block(tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(["一二三四五"] * 40), encoding="utf-8")
    meta = prepare([path], tmp_path / "data", val_fraction=0.05, verbose=True)
    assert meta["splits"]["val"]["tokens"] < 64
    assert "validation split has only" in capsys.readouterr().out
