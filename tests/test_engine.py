"""The generation engine: KV cache equals plain decoding, every model through one API, stops, seeds, streaming."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from zaizai.common.errors import ZaizaiError
from zaizai.inference.generate import generate_ids
from zaizai.inference.sampling import SamplingConfig, banned_ngram_tokens
from zaizai.models import ModelConfig, build_model
from zaizai.models.gpt import KVCache
from zaizai.models.rnn import RNNLM
from zaizai.inference.loaded import Zaizai
from zaizai.inference.text import IncrementalDecoder, decode_stream
from zaizai.data.tokenizer import END_ID, EOT_ID, CharTokenizer
from util import DECODE_VOCAB as VOCAB, decode_model as make, decode_prompt as prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(n: int, **kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0, **kw)


@torch.no_grad()
def reference_gpt(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding without a cache: the whole window through forward() for every token, the window
    sliding as the engine's does (last block_size prompt tokens; when full, keep the last 3/4)."""
    block = model.config.block_size
    keep = block * 3 // 4
    window = list(ids[-block:])
    out = []
    for i in range(n):
        if i > 0:
            if len(window) == block:
                window = window[len(window) - keep + 1:]
            window.append(out[-1])
        logits, _ = model(torch.tensor([window]))
        out.append(int(logits[0, -1].argmax()))
    return out


@torch.no_grad()
def reference_full(model, ids: list[int], n: int, window: int | None = None) -> list[int]:
    """Greedy decoding by a forward pass over the whole sequence (rnn: from a fresh state over all; bigram: last token)."""
    seq = list(ids)
    for _ in range(n):
        x = torch.tensor([seq if window is None else seq[-window:]])
        logits = model(x, cache=model.new_cache())[0] if isinstance(model, RNNLM) else model(x)[0]
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


# --- the KV cache ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [1, 7, 20])
def test_gpt_kv_cache_greedy_equals_no_cache_decoding(prompt_len):
    model = make("gpt")
    ids = prompt(prompt_len)
    n = 24 - prompt_len  # fill the context exactly: no sliding yet
    got = list(generate_ids(model, ids, greedy(n)))
    assert got == reference_gpt(model, ids, n)
    if n > 10:
        assert len(set(got)) > 3  # a real sequence, not one token over and over


@pytest.mark.parametrize("prompt_len", [5, 24, 40])
def test_gpt_window_slides_past_block_size(prompt_len):
    model = make("gpt")
    ids = prompt(prompt_len, seed=3)
    got = list(generate_ids(model, ids, greedy(60)))  # several slides of a 24-token window
    assert got == reference_gpt(model, ids, 60)


def test_kv_cache_logits_equal_the_full_forward_pass():
    model = make("gpt", n_layer=3, n_head=4)
    x = torch.tensor([prompt(24, seed=5)])
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(model.config)
        chunks = [model(x[:, :9], cache=cache)[0], model(x[:, 9:13], cache=cache)[0]]
        chunks += [model(x[:, t:t + 1], cache=cache)[0] for t in range(13, 24)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 24
    with pytest.raises(ZaizaiError, match="block_size"):
        model(x[:, :1], cache=cache)


def test_kv_cache_is_preallocated_and_written_in_place():
    model = make("gpt")
    cache = KVCache(model.config, batch_size=2)
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    assert cache.k.shape == (2, 2, 2, 24, 16)  # (n_layer, B, nh, block_size, hs)
    with torch.no_grad():
        model(torch.tensor([prompt(5), prompt(5, 1)]), cache=cache)
        model(torch.tensor([[7], [8]]), cache=cache)
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == (k_ptr, v_ptr)
    assert cache.pos == 6 and cache.k[:, :, :, :6].abs().sum() > 0 and cache.k[:, :, :, 6:].abs().sum() == 0
    with pytest.raises(ZaizaiError, match="block_size"):
        KVCache(model.config, max_len=25)


# --- every model through the same API ------------------------------------------------------------------------------


def test_rnn_carries_its_hidden_state():
    model = make("rnn")
    ids = prompt(10)
    got = list(generate_ids(model, ids, greedy(40)))  # past block_size: the RNN has no window
    assert got == reference_full(model, ids, 40)


def test_bigram_generates_from_the_last_token():
    model = make("bigram")
    ids = prompt(10)
    got = list(generate_ids(model, ids, greedy(30)))
    assert got == reference_full(model, ids, 30, window=1)


@pytest.mark.parametrize("name", ["gpt", "rnn", "bigram"])
def test_seeded_sampling_repeats_and_streams(name):
    model = make(name)
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.95, seed=11)
    stream = generate_ids(model, prompt(6), cfg)
    first = next(stream)
    assert not torch.is_inference_mode_enabled()  # the caller's code between tokens runs normally
    a = [first, *stream]
    assert a == list(generate_ids(model, prompt(6), cfg))
    assert len(a) == 30 and all(0 <= t < VOCAB for t in a)
    other = list(generate_ids(model, prompt(6), SamplingConfig(max_new_tokens=30, temperature=1.0, seed=12)))
    assert other != a


def test_max_new_tokens_and_stop_ids():
    model = make("gpt")
    ids = prompt(4)
    free = list(generate_ids(model, ids, greedy(15)))
    assert len(free) == 15
    with pytest.raises(ZaizaiError, match="max_new_tokens"):  # no reply at all is refused (sampling.validate)
        list(generate_ids(model, ids, greedy(0)))
    stop = free[6]
    first = free.index(stop)
    stopped = list(generate_ids(model, ids, greedy(15), stop_ids={stop}))
    assert stopped == free[:first]  # the stop id ends the stream and is not yielded


def test_bad_prompts_are_refused():
    model = make("gpt")
    with pytest.raises(ZaizaiError, match="at least one token"):
        list(generate_ids(model, [], greedy(3)))
    with pytest.raises(ZaizaiError, match="token ids must be in"):
        list(generate_ids(model, [VOCAB], greedy(3)))
    with pytest.raises(ZaizaiError, match="--top-p"):
        list(generate_ids(model, [1], SamplingConfig(top_p=0)))


# --- penalties inside generation ----------------------------------------------------------------------------------


def looping_bigram():
    """A bigram model whose greedy choice after token t is t + 1 within {10, 11, 12}: 10 11 12 10 11 12 ..."""
    model = build_model(ModelConfig(model="bigram", vocab_size=20, block_size=8)).eval()
    table = torch.full((20, 20), -5.0)
    for t in range(20):
        table[t, 10 + (t - 9) % 3] = 5.0  # the loop: 10 -> 11 -> 12 -> 10 (and anything else -> 10)
        table[t, 15] = 4.0  # second choice everywhere
        table[t, 16] = 3.0  # third
    with torch.no_grad():
        model.token_embedding_table.weight.copy_(table)
    return model


def test_no_repeat_ngram_bans_exactly_the_repeats():
    model = looping_bigram()
    plain = list(generate_ids(model, [10], greedy(8)))
    assert plain == [11, 12, 10, 11, 12, 10, 11, 12]
    ids = [10]
    out = list(generate_ids(model, ids, greedy(12, no_repeat_ngram_size=2)))
    seq = ids + out
    bigrams = list(itertools.pairwise(seq))
    assert len(bigrams) == len(set(bigrams))  # no 2-gram twice
    assert out[:3] == [11, 12, 10]  # nothing is banned before a repeat would happen
    assert out[3] == 15  # "10 11" would repeat: the next best token instead


def test_banned_ngram_tokens():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 2) == {3}
    assert banned_ngram_tokens([1, 2, 1, 4, 1], 2) == {2, 4}
    assert banned_ngram_tokens([5, 6, 7], 1) == {5, 6, 7}
    assert banned_ngram_tokens([1, 2], 3) == set() and banned_ngram_tokens([1, 2], 0) == set()


def test_repetition_penalty_steers_away_but_never_from_stop_ids():
    model = looping_bigram()
    out = list(generate_ids(model, [10], greedy(4, repetition_penalty=100.0)))
    assert out[:2] == [11, 12] and out[2] == 15  # 10 is in the context: 5 / 100 < 4
    # a stop id keeps its full probability, however often the context holds it (ending a turn is no repeat)
    assert list(generate_ids(model, [10, 11, 12, 15], greedy(4, repetition_penalty=100.0), stop_ids={10})) == []


# --- text: incremental decoding, stop strings, the pipeline ---------------------------------------------------


def tiny_bot(model_name: str = "gpt", state: dict | None = None) -> Zaizai:
    tok = CharTokenizer("你好吗我是崽。\n")
    cfg = dict(model=model_name, vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg)).eval()
    return Zaizai(model, tok, model.config, {}, state or {}, torch.device("cpu"), Path("."))


def test_incremental_decoder_and_stop_strings():
    tok = CharTokenizer("abc\n")
    ids = tok.encode("ab\nc") + [EOT_ID] + tok.encode("cab")
    decoder = IncrementalDecoder(tok, special_text={EOT_ID: "\n\n"})
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "ab\nc\n\ncab"
    pieces = list(decode_stream(iter(ids), IncrementalDecoder(tok)))
    assert "".join(pieces) == "ab\nccab" and len(pieces) == len(ids) - 1  # one piece per character

    def text(stop):
        return "".join(decode_stream(iter(ids), IncrementalDecoder(tok, {EOT_ID: "\n\n"}), stop))

    assert text(["\n"]) == "ab"
    assert text(["ca"]) == "ab\nc\n\n"
    assert text(["cab", "\n\nc"]) == "ab\nc"  # the first stop string to appear wins
    assert text(["zz"]) == "ab\nc\n\ncab"
    # text that may become a stop string is held back, then released when it does not
    held = list(decode_stream(iter(tok.encode("abab")), IncrementalDecoder(tok), ["abc"]))
    assert held == ["ab", "ab"]  # "a", then "ab" could start "abc"; "aba" releases "ab"


def test_decode_stream_closes_the_generator_at_a_stop_string():
    closed = []

    def tokens():
        try:
            yield from CharTokenizer("ab").encode("abab")
        finally:
            closed.append(True)

    tok = CharTokenizer("ab")
    assert "".join(decode_stream(tokens(), IncrementalDecoder(tok), ["b"])) == "a"
    assert closed == [True]


def test_pipeline_stream_generate_and_stream_ids():
    bot = tiny_bot()
    kw = dict(max_new_tokens=12, temperature=1.0, seed=4, repetition_penalty=1.2, no_repeat_ngram_size=3)
    text = bot.generate("你好", **kw)
    assert text == "".join(bot.stream("你好", **kw))
    assert isinstance(text, str) and text
    ids = [EOT_ID] + bot.tokenizer.encode("你好")
    sampling = SamplingConfig(**kw)
    ids_out = list(bot.stream_ids(ids, sampling))
    assert len(ids_out) == 12
    assert "".join(bot.stream_text(ids, sampling)) == bot.tokenizer.decode(
        [i for i in ids_out if i >= 6])  # special tokens show as nothing
    stop = {ids_out[3]}
    assert list(bot.stream_ids(ids, sampling, stop_ids=stop)) == ids_out[:ids_out.index(ids_out[3])]
    assert bot.generate("你好", stop=[text[:1]], **kw) == ""
    assert not bot.is_chat_model and tiny_bot(state={"data_kind": "dialogue"}).is_chat_model


@pytest.mark.parametrize("name", ["rnn", "bigram"])
def test_pipeline_works_for_every_model(name):
    bot = tiny_bot(name)
    a = bot.generate("你", max_new_tokens=10, temperature=0.9, seed=1)
    assert a == bot.generate("你", max_new_tokens=10, temperature=0.9, seed=1)
    chat_ids = [EOT_ID] + bot.tokenizer.encode("你好")
    assert len(list(bot.stream_ids(chat_ids, greedy(5), stop_ids={END_ID}))) <= 5
