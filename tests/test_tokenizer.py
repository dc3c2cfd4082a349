"""The character tokenizer: ids, round trips, unknown characters, markers, save/load."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zaizai.common.errors import ZaizaiError
from zaizai.data.tokenizer import (
    ASSISTANT_ID,
    END_ID,
    EOT_ID,
    SPECIAL_TOKENS,
    SYSTEM_ID,
    UNK_ID,
    USER_ID,
    CharTokenizer,
    load_tokenizer,
)

TEXT = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer.from_text(TEXT)


def test_special_tokens_have_fixed_ids_first(tok):
    assert list(SPECIAL_TOKENS) == [
        "<|endoftext|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
    ]
    assert (EOT_ID, UNK_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID) == (0, 1, 2, 3, 4, 5)
    assert tok.special_ids == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.token_to_id("<|assistant|>") == ASSISTANT_ID
    assert [tok.decode([i]) for i in range(6)] == list(SPECIAL_TOKENS)


def test_characters_follow_sorted_by_code_point(tok):
    chars = sorted(set(TEXT))
    assert tok.chars == tuple(chars)
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(chars)
    assert tok.encode(chars[0]) == [len(SPECIAL_TOKENS)]
    assert tok.token_to_id(chars[-1]) == tok.vocab_size - 1


def test_from_iterable_of_texts_equals_from_joined_text():
    assert CharTokenizer.from_text(["你好", "世界"]) == CharTokenizer.from_text("你好世界")


def test_encode_is_one_id_per_character_and_decodes_back(tok):
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT
    array = tok.encode_array(TEXT)
    assert array.dtype == np.uint16
    assert array.tolist() == ids


def test_decode_accepts_list_array_and_tensor(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(np.array(ids)) == TEXT
    assert tok.decode(torch.tensor(ids)) == TEXT
    assert tok.decode([]) == ""


def test_decode_refuses_ids_outside_the_vocabulary(tok):
    for bad in (tok.vocab_size, -1):
        with pytest.raises(ZaizaiError, match=f"token id {bad} is outside the vocabulary"):
            tok.decode([USER_ID, bad])


def test_unknown_characters_become_unk(tok):
    # "猫" is a missing character inside the table's range; the emoji and U+10FFFF lie beyond it.
    assert tok.encode("猫月😀\U0010ffff") == [UNK_ID, tok.token_to_id("月"), UNK_ID, UNK_ID]
    assert tok.decode(tok.encode("猫")) == "<|unk|>"


def test_empty_vocabulary_encodes_everything_as_unk():
    tok = CharTokenizer.from_text("")
    assert tok.vocab_size == len(SPECIAL_TOKENS)
    assert tok.encode("ab") == [UNK_ID, UNK_ID]
    assert tok.encode("") == []


def test_marker_text_typed_by_a_user_stays_text():
    tok = CharTokenizer.from_text("<|user|>你好")
    ids = tok.encode("<|user|>你好")
    assert len(ids) == len("<|user|>你好")
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == "<|user|>你好"


def test_token_to_id_refuses_unknown_tokens(tok):
    with pytest.raises(ZaizaiError, match=re.escape("'<|bot|>' is not a token of this vocabulary")):
        tok.token_to_id("<|bot|>")


def test_vocabularies_beyond_uint16_use_uint32():
    chars = [chr(cp) for cp in range(0x20000, 0x20000 + 65536)]  # CJK extension B and on
    tok = CharTokenizer(chars)
    assert tok.vocab_size > 65535
    assert tok.dtype == np.uint32
    sample = "".join(chars[-3:])
    assert tok.encode_array(sample).dtype == np.uint32
    assert tok.decode(tok.encode(sample)) == sample


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_of_any_text_with_its_own_vocabulary(text):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert UNK_ID not in tok.encode(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(sorted(set(TEXT)))), st.text())
def test_known_text_round_trips_and_unknown_text_never_raises(known, anything):
    tok = CharTokenizer.from_text(TEXT)
    assert tok.decode(tok.encode(known)) == known
    ids = tok.encode(anything)
    assert len(ids) == len(anything)
    assert all(i == UNK_ID or tok.decode([i]) == ch for i, ch in zip(ids, anything))


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1), st.text())
def test_save_then_load_gives_identical_ids(tmp_path_factory, corpus, probe):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok = CharTokenizer.from_text(corpus)
    tok.save(path)
    loaded = CharTokenizer.load(path)
    assert loaded == tok
    assert loaded.encode(corpus + probe) == tok.encode(corpus + probe)


# -- files -------------------------------------------------------------------------------------


def test_saved_file_is_readable_json(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    raw = path.read_text(encoding="utf-8")
    assert "明" in raw  # ensure_ascii=False: Chinese stays readable
    # A Hugging Face tokenizer.json: a BPE without merges, the specials then the characters
    data = json.loads(raw)
    assert data["model"]["type"] == "BPE" and data["model"]["merges"] == []
    assert data["model"]["unk_token"] == "<|unk|>"
    assert list(data["model"]["vocab"]) == [*SPECIAL_TOKENS, *tok.chars]
    assert list(data["model"]["vocab"].values()) == list(range(tok.vocab_size))
    assert [t["content"] for t in data["added_tokens"] if t["special"]] == list(SPECIAL_TOKENS)
    assert load_tokenizer(path) == tok
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"model": {"type": "BPE"}}', "is not a zaizai tokenizer file"),
        ('{"type": "sentencepiece"}', "is not a zaizai tokenizer file"),
    ],
)
def test_corrupt_or_foreign_files_are_refused(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    if "%s" in content:
        content = content % json.dumps(list(SPECIAL_TOKENS))
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ZaizaiError, match=message):
        load_tokenizer(path)
    with pytest.raises(ZaizaiError):
        CharTokenizer.load(path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"a": 6', '"a": 60', "is damaged \\(its vocabulary ids are not 0..n-1\\)"),
        ('"<|unk|>": 1', '"<unk>": 1', "has different special tokens"),
        ('"a": 6', '"ab": 6', "is damaged \\(a CharTokenizer vocabulary entry must be one character"),
    ],
)
def test_damaged_char_vocabularies_are_refused(tmp_path, old, new, message):
    path = tmp_path / "tokenizer.json"
    CharTokenizer.from_text("ab").save(path)
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")
    with pytest.raises(ZaizaiError, match=message):
        load_tokenizer(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ZaizaiError, match="no such tokenizer file; run `zaizai prepare` first"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_lone_surrogates_do_not_raise():
    # Possible in strings built from "surrogateescape"-decoded bytes; they are just code points.
    tok = CharTokenizer.from_text("a\ud800")
    assert tok.decode(tok.encode("a\ud800")) == "a\ud800"
    assert CharTokenizer.from_text("a").encode("\udfff") == [UNK_ID]
