"""The byte-level BPE tokenizer, the Hugging Face tokenizer.json of both tokenizers, and a BPE
data folder that trains and samples."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_DOCUMENTS
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from util import TINY, write_corpus, write_pairs

from zaizai.data.preparation import prepare
from zaizai.data.tokendata import TokenData
from zaizai.common.errors import ZaizaiError
from zaizai.inference.text import IncrementalDecoder
from zaizai.data.tokenizer import (
    MIN_BPE_VOCAB,
    SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    load_tokenizer,
)

CORPUS = "\n\n".join(TINY_DOCUMENTS) * 3 + "\nhello world, 你好世界！The quick brown fox.\n"
PROBE = "你好，崽崽！ unseen 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ሰላም 😀👍🏽 e\u0301 \t\r\n <|user|>x<|end|>"


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400)


def test_specials_come_first_and_vocab_is_bounded(bpe):
    assert [bpe.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert MIN_BPE_VOCAB < bpe.vocab_size <= 400
    assert bpe.dtype == np.uint16
    assert len(bpe.encode("你好，我是崽崽。")) < len("你好，我是崽崽。")  # merges were learned


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trips_any_unicode(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # never a special token, never <|unk|>


def test_text_that_looks_like_a_marker_is_only_text(bpe):
    ids = bpe.encode("<|user|>你好<|end|><|endoftext|>")
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert bpe.decode([3, *bpe.encode("hi"), 5]) == "<|user|>hi<|end|>"  # specials decode to markers


def test_bad_vocab_size_is_a_user_error():
    with pytest.raises(ZaizaiError, match="--vocab-size must be"):
        BPETokenizer.train(CORPUS, vocab_size=100)


def _byte_level_char(b: int) -> str:
    """GPT-2's printable stand-in for byte ``b`` (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + sum(1 for x in range(b) if x not in printable))


def test_incremental_decoder_waits_for_whole_characters(bpe):
    # One token per UTF-8 byte: the worst case for a stream (4-byte emoji split in 4).
    byte_ids = [bpe.token_to_id(_byte_level_char(b)) for b in PROBE.encode("utf-8")]
    assert bpe.decode(byte_ids) == PROBE
    decoder = IncrementalDecoder(bpe)
    pieces = [decoder.push(i) for i in byte_ids] + [decoder.flush()]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == PROBE
    # and a real encoding, with a special token in the middle rendered as given
    decoder = IncrementalDecoder(bpe, special_text={0: "\n\n"})
    ids = bpe.encode("😀你好") + [0] + bpe.encode("𝔘x")
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == "😀你好\n\n𝔘x"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_json_loads_in_hugging_face_with_identical_ids(tmp_path, bpe, kind):
    from transformers import AutoTokenizer

    tok = bpe if kind == "bpe" else CharTokenizer.from_text(CORPUS)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    prepare([corpus], tmp_path / "data", tokenizer=kind, vocab_size=400, verbose=False)
    tok = load_tokenizer(tmp_path / "data" / "tokenizer.json")
    assert tok.type == kind
    text = CORPUS[:200] + PROBE
    ids = tok.encode(text)

    hf = HFTokenizer.from_file(str(tmp_path / "data" / "tokenizer.json"))
    hf.encode_special_tokens = True  # zaizai's rule; HF matches markers in text by default
    assert hf.encode(text, add_special_tokens=False).ids == ids
    assert hf.encode(CORPUS[:200], add_special_tokens=False).ids == tok.encode(CORPUS[:200])
    auto = AutoTokenizer.from_pretrained(tmp_path / "data")  # reads tokenizer_config.json too
    assert auto(text, add_special_tokens=False)["input_ids"] == ids  # split_special_tokens
    assert auto.decode(ids) == tok.decode(ids)
    if kind == "bpe":
        assert tok.decode(ids) == text
    assert tok == load_tokenizer(tmp_path / "data" / "tokenizer.json")


def test_tokenizer_names_and_paths(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    prepare([corpus], tmp_path / "a", tokenizer="bpe", vocab_size=300, verbose=False)
    # a path reuses, whatever its tokenizer's type
    meta = prepare([corpus], tmp_path / "b", tokenizer=tmp_path / "a", verbose=False)
    assert meta["tokenizer"] == "bpe" and meta["tokenizer_from"].endswith("a/tokenizer.json")
    with pytest.raises(ZaizaiError, match="--tokenizer char or bpe"):
        prepare([corpus], tmp_path / "c", tokenizer="bpee", verbose=False)


def test_bpe_dialogues_render_each_message_on_its_own(tmp_path):
    """Dialogues with a subword tokenizer: every message is encoded alone (no token spans two
    messages), the bins equal render_conversation of each dialogue, and bits/char counts characters."""
    from zaizai.data.tokendata import TokenData
    from zaizai.data.dialogue import render_conversation
    from zaizai.evals.evaluation import split_messages, split_sizes

    pairs = [("你好", "你好，我是崽崽。"), ("今天天气怎么样？", "晴天，适合出去走走。"), ("晚安", "晚安，做个好梦。"),
             ("你会写诗吗？", "床前明月光，疑是地上霜。"), ("谢谢", "不客气。")] * 6
    path = write_pairs(tmp_path / "d.jsonl", pairs)
    meta = prepare([path], tmp_path / "data", tokenizer="bpe", vocab_size=300, verbose=False)
    assert meta["tokenizer"] == "bpe" and meta["kind"] == "dialogue"
    data = TokenData(tmp_path / "data")
    tok = data.tokenizer
    ids, roles = data.split("train"), data.roles("train")
    for start, length in data.dialogues("train").tolist():
        body = tok.decode(ids[start:start + length])
        q, a = body.removeprefix("<|endoftext|><|user|>").removesuffix("<|end|>").split("<|end|><|assistant|>")
        expected_ids, expected_roles = render_conversation(tok, [{"role": "user", "content": q},
                                                                 {"role": "assistant", "content": a}])
        assert ids[start:start + length].tolist() == expected_ids
        assert roles[start:start + length].tolist() == expected_roles
        assert expected_ids == [0, 3, *tok.encode(q), 5, 4, *tok.encode(a), 5]
    # the characters behind the counted targets: the replies plus one per <|end|>
    replies = [m["content"] for c in split_messages(data, "val") for m in c if m["role"] == "assistant"]
    sizes = split_sizes(data, "val")
    assert sizes["chars"] == data.meta["splits"]["val"]["assistant_chars"] == sum(len(r) + 1 for r in replies)
    assert sizes["bytes"] == sum(len(r.encode("utf-8")) + 1 for r in replies)
    assert set(replies) <= {a for _, a in pairs}


def test_bpe_folder_trains_samples_and_round_trips(tmp_path):
    import zaizai

    corpus = write_corpus(tmp_path / "corpus.txt")
    meta = prepare([corpus], tmp_path / "data", tokenizer="bpe", vocab_size=600, verbose=False)
    data = TokenData(tmp_path / "data")
    text = corpus.read_text(encoding="utf-8")
    assert meta["splits"]["train"]["tokens"] < meta["splits"]["train"]["chars"]  # fewer tokens than chars
    documents = [data.tokenizer.decode(d) for d in np.split(data.train, np.flatnonzero(data.train == 0) + 1)[:-1]]
    assert all(doc.endswith("<|endoftext|>") and doc[: -len("<|endoftext|>")] in text for doc in documents)

    zaizai.train(tmp_path / "data", tmp_path / "out", model="gpt", max_iters=10, verbose=False, **TINY)
    bot = zaizai.load(tmp_path / "out", device="cpu")
    assert bot.tokenizer.type == "bpe" and bot.model_config.vocab_size == meta["vocab_size"]
    sample = bot.generate("床前", max_new_tokens=20, temperature=1.0)
    # An untrained model may sample bytes that are no UTF-8 (they decode to U+FFFD): just text.
    assert isinstance(sample, str) and sample
