"""Batched decoding: the decode step equals the forward pass, and a request's tokens are the same alone or in a batch."""

from __future__ import annotations

import pytest
import torch

from zaizai.common.errors import ZaizaiError
from zaizai.inference.batch import CANCELLED, ERROR, LENGTH, STOP, Batch
from zaizai.inference.generate import generate_ids
from zaizai.inference.sampling import SamplingConfig
from zaizai.models import MODEL_NAMES
from zaizai.models.decode import CacheDecoder, GPTDecoder, decoder_for
from zaizai.models.dense import Dense
from util import DECODE_VOCAB as VOCAB, decode_model as make, decode_prompt as prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def run(batch: Batch, seqs) -> None:
    """Step until every sequence in ``seqs`` has ended."""
    while not all(s.done for s in seqs):
        batch.step()


OPTIONS = [  # (prompt length, sampling options): lengths and options differ from row to row
    (7, dict(temperature=0)),
    (3, dict(temperature=0.9, top_k=12, seed=1)),
    (12, dict(temperature=1.2, top_p=0.9, repetition_penalty=1.3, seed=2)),
    (1, dict(temperature=0.7, no_repeat_ngram_size=2, seed=3)),
    (5, dict(temperature=0, repetition_penalty=1.5)),
]


# --- the decoder ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_gpt_decode_step_equals_the_forward_pass_for_rows_of_different_lengths(dense_backend):
    model = make(n_layer=3, n_head=4)
    a, b, c = prompt(9, 1), prompt(4, 2), prompt(15, 3)
    decoder = decoder_for(model, rows=1)
    assert isinstance(decoder, GPTDecoder)
    first = [decoder.prefill(row, ids) for row, ids in enumerate((a, b, c))]  # row 2 makes the cache grow
    k_ptr = decoder.k.data_ptr()
    seqs = [list(a), list(b), list(c)]
    for i in range(6):
        new = [5 + i, 9 + i, 40 - i]
        logits = decoder.step(torch.tensor(new))  # (3, V)
        for row, seq in enumerate(seqs):
            seq.append(new[row])
            full, _ = model(torch.tensor([seq]))
            torch.testing.assert_close(logits[row], full[0, -1], atol=2e-5, rtol=1e-5)
    for row, ids in enumerate((a, b, c)):
        torch.testing.assert_close(first[row], model(torch.tensor([ids]))[0][0, -1], atol=2e-5, rtol=1e-5)
    assert decoder.k.data_ptr() == k_ptr  # written in place: no new cache per step
    assert decoder.lengths[:3] == [15, 10, 21]
    generic = CacheDecoder(model, 3, torch.device("cpu"))  # any model's own forward pass, row by row: the same
    for row, seq in enumerate(seqs):
        generic.prefill(row, seq[:-1])
    torch.testing.assert_close(generic.step(torch.tensor([s[-1] for s in seqs])), logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_dense_equals_linear_layers_side_by_side(dense_backend, dtype, bias):
    """Dense: the products of several linear layers stacked, with GELU or a residual added, as nn.Linear's."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(24, n, bias=bias).to(dtype) for n in (8, 16)]
    dense = Dense([layer.weight for layer in layers], [layer.bias for layer in layers] if bias else None)
    assert (dense.packed is not None) == (dense_backend == "onednn")
    x, residual = torch.randn(5, 24, dtype=dtype), torch.randn(5, 24, dtype=dtype)
    want = torch.cat([layer(x) for layer in layers], dim=1)  # (5, 24)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(dense(x), want, **tol)
    torch.testing.assert_close(dense(x[:1]), want[:1], **tol)  # one row (a batch of 1)
    torch.testing.assert_close(dense(x.t().contiguous().t()), want, **tol)  # a strided input
    torch.testing.assert_close(dense.gelu(x), torch.nn.functional.gelu(want, approximate="tanh"), **tol)
    torch.testing.assert_close(dense.add_to(residual, x), residual + want, **tol)


@torch.inference_mode()
def test_a_row_reused_after_nan_keys_is_clean():
    """A sequence that broke leaves nan keys in its row; the next one there must not see them through its mask."""
    model = make()
    decoder = decoder_for(model, rows=3)
    short, long = prompt(3, 1), prompt(16, 2)
    decoder.prefill(0, prompt(14, 3))
    decoder.prefill(1, long)
    decoder.prefill(2, prompt(12, 4))
    for cache in (decoder.k, decoder.v):
        cache[:, 2, :, :12] = float("nan")  # what a broken sequence leaves behind
    decoder.release(2)
    decoder.prefill(2, short)  # shorter than the others: its row is masked beyond 3, over the old nan keys
    logits = decoder.step(torch.tensor([7, 8, 9]))
    torch.testing.assert_close(logits[2], model(torch.tensor([short + [9]]))[0][0, -1], atol=2e-5, rtol=1e-5)
    for cache in (decoder.k, decoder.v):
        cache[:, 0, :, :15] = float("nan")  # row 0's sequence broke and leaves ...
    decoder.move(2, 0)  # ... and the last row's (shorter) sequence moves in
    logits = decoder.step(torch.tensor([10, 11]))
    torch.testing.assert_close(logits[0], model(torch.tensor([short + [9, 10]]))[0][0, -1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], model(torch.tensor([long + [8, 11]]))[0][0, -1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name, kw", [("gpt", {}), ("modern", dict(n_head=4, n_kv_head=2))])
@torch.inference_mode()
def test_prefill_many_equals_prefills_one_at_a_time_and_the_forward_pass(dense_backend, name, kw):
    """Prompts of different lengths (1 and block_size among them) prefilled together, into rows reused after
    sequences that broke (nan keys): each row's logits, then a step's, as one prefill at a time and the forward."""
    model = make(name, **kw)
    prompts = [prompt(n, seed=20 + n) for n in (9, 1, 24, 4, 13)]
    rows = [3, 0, 4, 1, 2]  # not in order
    alone = decoder_for(model, rows=5)
    one = [alone.prefill(row, ids) for row, ids in zip(rows, prompts)]
    decoder = decoder_for(model, rows=2)  # prefill_many makes it grow
    decoder.prefill_many([0, 1, 2, 3, 4], [prompt(20, seed=s) for s in range(5)])
    decoder.kv[:, :, :5] = float("nan")  # what broken sequences leave behind
    for row in range(5):
        decoder.release(row)
    many = decoder.prefill_many(rows, prompts)
    assert decoder.lengths[:5] == alone.lengths[:5] == [1, 4, 13, 9, 24]
    for ids, a, b in zip(prompts, one, many):
        forward = model(torch.tensor([ids]))[0][0, -1]
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(b, forward, atol=2e-5, rtol=1e-5)
    order = sorted(range(5), key=lambda i: rows[i])  # the prompts by row
    for d in (decoder, alone):
        d.release(4)  # (the full row leaves: the others step, masked beyond their lengths over the old nan keys)
    logits = decoder.step(torch.tensor([7, 8, 9, 10]))
    torch.testing.assert_close(logits, alone.step(torch.tensor([7, 8, 9, 10])), atol=2e-5, rtol=1e-5)
    for row, i in enumerate(order[:4]):
        torch.testing.assert_close(logits[row], model(torch.tensor([prompts[i] + [7 + row]]))[0][0, -1],
                                   atol=2e-5, rtol=1e-5)
    assert decoder.prefill_many([1, 3], [[], prompt(2)])[0] is None and decoder.lengths[1] == 0
    with pytest.raises(ZaizaiError, match="block_size"):
        decoder.prefill_many([0, 1], [prompt(2), prompt(25)])
    assert decoder.lengths[:4] == [2, 0, 14, 2]  # a refused call changes no row


@pytest.mark.parametrize("name", MODEL_NAMES)
@torch.inference_mode()
def test_every_decoder_prefills_many_rows_as_one_at_a_time(name):
    model = make(name)
    prompts = [prompt(n, seed=n) for n in (5, 1, 11)]
    decoders = [decoder_for(model, rows=3)] + ([CacheDecoder(model, 3, torch.device("cpu"))] if name == "gpt" else [])
    for decoder in decoders:
        many = decoder.prefill_many([2, 0, 1], prompts)
        for row, ids, logits in zip([2, 0, 1], prompts, many):
            torch.testing.assert_close(logits, model(torch.tensor([ids]))[0][0, -1], atol=2e-5, rtol=1e-5)
            assert decoder.lengths[row] == len(ids)


# --- alone or in a batch: the same tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_request_gets_the_same_tokens_alone_or_in_a_batch(name):
    model = make(name)
    requests = [(prompt(n, seed=10 + i), SamplingConfig(max_new_tokens=20 + 3 * i, **kw))
                for i, (n, kw) in enumerate(OPTIONS)]
    alone = [list(generate_ids(model, ids, cfg)) for ids, cfg in requests]
    batch = Batch(model)
    seqs = [batch.add(ids, cfg) for ids, cfg in requests[:3]]
    for _ in range(4):  # the others join between steps, while the first ones run
        batch.step()
    seqs += [batch.add(ids, cfg) for ids, cfg in requests[3:]]
    run(batch, seqs)
    assert [s.tokens for s in seqs] == alone
    assert all(s.finish_reason == LENGTH for s in seqs) and len(batch) == 0
    assert len({tuple(t) for t in alone}) == len(alone)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sequences_added_together_get_the_same_tokens_as_alone(name):
    model = make(name)
    requests = [(prompt(n, seed=30 + i), SamplingConfig(max_new_tokens=12 + 2 * i, **kw), {5} if i == 2 else None)
                for i, (n, kw) in enumerate(OPTIONS)]
    alone = [list(generate_ids(model, ids, cfg, stop)) for ids, cfg, stop in requests]
    batch = Batch(model)
    seqs = batch.add_many(requests[:2])
    batch.step()  # the others join together while the first ones run
    seqs += batch.add_many(requests[2:])
    assert batch.add_many([]) == [] and len(batch) == len(requests)
    run(batch, seqs)
    assert [s.tokens for s in seqs] == alone


def test_windows_slide_in_a_batch_as_alone():
    model = make()  # block_size 24: every sequence slides its window several times
    requests = [(prompt(n, seed=n), SamplingConfig(max_new_tokens=50 + n, temperature=0)) for n in (2, 20, 30)]
    # with the second one's length: the two slide at the same steps, their rows started over together
    requests.append((prompt(20, seed=99), SamplingConfig(max_new_tokens=60, temperature=0.9, seed=4)))
    alone = [list(generate_ids(model, ids, cfg)) for ids, cfg in requests]
    batch = Batch(model)
    seqs = [batch.add(ids, cfg) for ids, cfg in requests]
    run(batch, seqs)
    assert [s.tokens for s in seqs] == alone


def test_sequences_leave_at_stop_ids_and_when_cancelled():
    model = make()
    ids = [prompt(4, seed=s) for s in range(3)]
    free = [list(generate_ids(model, i, SamplingConfig(max_new_tokens=15, temperature=0))) for i in ids]
    stop = free[0][5]
    batch = Batch(model)
    a = batch.add(ids[0], SamplingConfig(max_new_tokens=15, temperature=0), stop_ids={stop})
    b = batch.add(ids[1], SamplingConfig(max_new_tokens=15, temperature=0))
    c = batch.add(ids[2], SamplingConfig(max_new_tokens=15, temperature=0))
    for _ in range(3):
        batch.step()
    batch.cancel(b)  # a client went away: its row is free at once
    assert b.finish_reason == CANCELLED and len(batch) == 2 and b.tokens == free[1][:3]
    events = []
    while batch:
        events += batch.step()
    assert a.tokens == free[0][:free[0].index(stop)] and a.finish_reason == STOP
    assert c.tokens == free[2] and c.finish_reason == LENGTH
    assert (a, None) in events  # a stop id ends a sequence without a token
    batch.cancel(c)  # after the end: nothing to do
    assert c.finish_reason == LENGTH


def test_a_step_hands_its_tokens_back_before_the_decoder_takes_them():
    """The first token comes straight from the prefill's logits: a step's tokens reach the caller before they go
    through the decoder, which takes them when the batch next needs logits (the next step, or a join); a
    sequence cancelled meanwhile costs no decoder step, and every sequence's tokens are its tokens alone."""
    model = make()
    cfg = SamplingConfig(max_new_tokens=6, temperature=0)
    ids = [prompt(4, seed=s) for s in (1, 2)]
    alone = [list(generate_ids(model, i, cfg)) for i in ids]
    batch = Batch(model)
    fed = []  # rows in each decoder step
    step = batch.decoder.step
    batch.decoder.step = lambda tokens: fed.append(len(tokens)) or step(tokens)
    a = batch.add(ids[0], cfg)
    assert batch.step() == [(a, alone[0][0])] and fed == []
    batch.cancel(a)  # its first token never goes through the decoder
    b = batch.add(ids[1], cfg)
    batch.step()
    assert fed == []
    c = batch.add(ids[0], cfg)  # b's token goes first, in one row; then c joins
    assert fed == [1]
    run(batch, [b, c])  # b's 6th token is its last: it leaves and c's 6th follows from one row
    assert fed == [1, 2, 2, 2, 2, 1] and b.tokens == alone[1] and c.tokens == alone[0]


def test_a_decode_step_that_fails_at_a_join_fails_the_batch_from_then_on():
    """The running rows' tokens go through the decoder when another sequence joins: if that step fails, the join
    raises, and so does every later step and join (the running sequences have no logits to go on from)."""
    model = make()
    batch = Batch(model)
    batch.add(prompt(4, seed=1), SamplingConfig(max_new_tokens=9, temperature=0))
    batch.step()

    def broken(tokens):
        raise RuntimeError("out of memory")

    batch.decoder.step = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        batch.add(prompt(3, seed=2), SamplingConfig(max_new_tokens=9, temperature=0))
    for again in (batch.step, lambda: batch.add(prompt(3, seed=2), SamplingConfig(max_new_tokens=9))):
        with pytest.raises(ZaizaiError, match=r"cannot go on: its decode step failed \(RuntimeError: out of memory\)"):
            again()


def test_a_sequence_whose_scores_become_nan_fails_alone():
    model = make()
    with torch.no_grad():
        model.transformer.wpe.weight[14] = float("nan")  # only a sequence that reaches position 14 breaks
    good = [(prompt(3, seed=1), SamplingConfig(max_new_tokens=8, temperature=0)),
            (prompt(5, seed=2), SamplingConfig(max_new_tokens=9, temperature=0.8, seed=5))]
    alone = [list(generate_ids(model, ids, cfg)) for ids, cfg in good]
    batch = Batch(model)
    bad = batch.add(prompt(10, seed=3), SamplingConfig(max_new_tokens=20, temperature=0.8, seed=6))
    seqs = [batch.add(ids, cfg) for ids, cfg in good]
    run(batch, [bad, *seqs])
    assert bad.finish_reason == ERROR and "nan" in bad.error and len(bad.tokens) == 5  # fed at 10..13: fine
    assert [s.tokens for s in seqs] == alone and all(s.finish_reason == LENGTH for s in seqs)
    with pytest.raises(ZaizaiError, match="nan"):  # alone, generation says so
        list(generate_ids(model, prompt(10, seed=3), SamplingConfig(max_new_tokens=20)))


def test_add_refuses_bad_requests():
    batch = Batch(make())
    with pytest.raises(ZaizaiError, match="at least one token"):
        batch.add([], SamplingConfig())
    with pytest.raises(ZaizaiError, match="token ids must be in"):
        batch.add([VOCAB], SamplingConfig())
    with pytest.raises(ZaizaiError, match="--temperature"):
        batch.add([1], SamplingConfig(temperature=-1))
    with pytest.raises(ZaizaiError, match="max_new_tokens"):  # no reply at all is refused (sampling.validate)
        batch.add([1, 2], SamplingConfig(max_new_tokens=0))
    with pytest.raises(ZaizaiError, match="token ids must be in"):  # one bad request: none of them joins
        batch.add_many([([1, 2], SamplingConfig(), None), ([VOCAB], SamplingConfig(), None)])
    assert len(batch) == 0


def test_a_sequence_whose_draw_overflows_fails_alone():
    """Finite scores so large that a small temperature takes them to inf: that sequence's draw has no
    probabilities and it ends with an error; a greedy one beside it gets its usual tokens."""
    model = make()
    ids = prompt(6, seed=1)
    greedy = SamplingConfig(max_new_tokens=10, temperature=0)
    with torch.no_grad():
        scale = 1e36 / model(torch.tensor([ids]))[0].abs().max().item()  # the largest score ~1e36: / 1e-3 is inf
        model.transformer.ln_f.weight.mul_(scale)
        model.transformer.ln_f.bias.mul_(scale)
    alone = list(generate_ids(model, ids, greedy))
    batch = Batch(model)
    hot = batch.add(prompt(4, seed=2), SamplingConfig(temperature=1e-3, seed=1))
    cold = batch.add(ids, greedy)
    run(batch, [hot, cold])
    assert hot.finish_reason == ERROR and "temperature" in hot.error and hot.tokens == []
    assert cold.finish_reason == LENGTH and cold.tokens == alone
