"""Batch's draw and admission: a sequence whose probabilities cannot be drawn from is found by looking at them
(not at an exception's words) and ends alone; a request Batch.check took is not checked again by add_many."""

from __future__ import annotations

import pytest
import torch

from zaizai.common.errors import ZaizaiError
import zaizai.inference.batch as batch_module
from zaizai.inference.batch import ERROR, LENGTH, Batch, Checked
from zaizai.inference.generate import generate_ids
from zaizai.inference.sampling import SamplingConfig, draw, draw_cumulative, sample_next
from util import DECODE_VOCAB as VOCAB, decode_model as make, decode_prompt as prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def run(batch: Batch, seqs) -> None:
    while not all(s.done for s in seqs):
        batch.step()


def overflowing_model(ids):
    """decode_model with its final norm scaled so that the largest score after ``ids`` is ~1e36: finite, but a
    temperature of 1e-3 takes it to inf."""
    model = make()
    with torch.no_grad():
        scale = 1e36 / model(torch.tensor([ids]))[0].abs().max().item()
        model.transformer.ln_f.weight.mul_(scale)
        model.transformer.ln_f.bias.mul_(scale)
    return model


def test_probabilities_that_cannot_be_drawn_from_end_the_sequence_before_the_draw(monkeypatch):
    """The overflowing sequence ends with its error without the draw ever seeing its nan
    probabilities; the greedy one beside it gets its usual tokens, and a sampled one its draws."""
    ids = prompt(6, seed=1)
    model = overflowing_model(ids)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    alone = list(generate_ids(model, ids, greedy))
    draws = []
    monkeypatch.setattr(batch_module, "draw_cumulative",
                        lambda cdf, g: draws.append(bool(torch.isfinite(cdf).all())) or draw_cumulative(cdf, g))
    batch = Batch(model)
    hot = batch.add(prompt(4, seed=2), SamplingConfig(temperature=1e-3, seed=1))
    cold = batch.add(ids, greedy)
    warm = batch.add(prompt(5, seed=3), SamplingConfig(max_new_tokens=4, temperature=1e6, seed=2))  # finite
    run(batch, [hot, cold, warm])
    assert hot.finish_reason == ERROR and hot.tokens == []
    assert hot.error == ("the next-token probabilities became nan/inf after 0 tokens (scores too large for "
                         "temperature 0.001); try a higher temperature or another checkpoint")
    assert cold.finish_reason == LENGTH and cold.tokens == alone
    assert warm.finish_reason == LENGTH and len(warm.tokens) == 4
    assert draws == [True] * 4  # the warm sequence's draws only, all on finite running sums


@pytest.mark.parametrize("options", [dict(temperature=0.8), dict(temperature=1.3, top_k=5),
                                     dict(temperature=0.7, top_p=0.8), dict(temperature=1e-6)])
def test_a_sequence_draws_what_sample_next_draws(options):
    """The batch checks the probabilities (next_token_probs) before its draw: the tokens are still sample_next's."""
    batch = Batch(make())
    seq = batch.add(prompt(5, seed=1), SamplingConfig(seed=3, **options))
    logits = seq.logits
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        seq.logits = logits
        assert seq.choose() == int(sample_next(logits.unsqueeze(0), seq.cfg, generator))


def test_a_failure_inside_the_draw_is_raised_not_taken_for_a_sampling_error(monkeypatch):
    """An error of torch itself while drawing (here one whose message happens to hold "inf") is not the
    sequence's scores overflowing: it is raised from the step (the server then fails that batch, saying so),
    while greedy sequences never draw."""
    model = make()
    failure = RuntimeError("CUDA error: an illegal memory access was encountered; for more information, "
                           "compile with TORCH_USE_CUDA_DSA")

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "searchsorted", broken)
    batch = Batch(model)
    greedy = batch.add(prompt(5, seed=1), SamplingConfig(max_new_tokens=3, temperature=0))
    run(batch, [greedy])  # no draw: unaffected
    assert greedy.finish_reason == LENGTH and len(greedy.tokens) == 3
    sampled = batch.add(prompt(5, seed=1), SamplingConfig(max_new_tokens=3, temperature=0.8, seed=1))
    with pytest.raises(RuntimeError) as raised:
        batch.step()
    assert raised.value is failure and sampled.error is None


def test_add_many_takes_checked_requests_without_checking_them_again(monkeypatch):
    batch = Batch(make())
    ids, cfg = prompt(5, seed=1), SamplingConfig(max_new_tokens=2, temperature=0)
    request = batch.check([str(i) for i in ids], cfg, {3})  # ids as ints, stop ids as a set
    assert request == Checked(ids, cfg, {3})
    calls = []
    check = batch.check
    monkeypatch.setattr(batch, "check", lambda *a: calls.append(a) or check(*a))
    seq, other = batch.add_many([request, (prompt(3, seed=2), cfg, None)])
    assert len(calls) == 1 and calls[0][0] == prompt(3, seed=2)  # only the unchecked one
    assert seq.prompt == ids and seq.stop_ids == {3} and other.stop_ids == set()
    with pytest.raises(ZaizaiError, match="token ids must be in"):  # unchecked requests are still checked
        batch.add_many([request, ([VOCAB], cfg, None)])
    assert len(batch) == 2


def test_draw_follows_the_distribution_and_never_takes_a_token_of_probability_zero(monkeypatch):
    """The inverse-CDF draw: frequencies match the probabilities (30,000 seeded draws, each within 4 standard
    errors), zeros (what top-k/top-p leave) are never drawn, even when the uniform number comes out at the total
    itself (rounding), and a batch of rows draws each row from its own distribution."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 30_000
    counts = torch.bincount(draw(probs.expand(n, 6), g).view(-1), minlength=6).double() / n
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.all((counts - probs.double()).abs() <= 4 * (probs.double() * (1 - probs.double()) / n).sqrt())
    one_hot = torch.eye(6)[[4, 1, 3]]  # (3, 6): each row certain of its own token
    assert draw(one_hot, g).view(-1).tolist() == [4, 1, 3]
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None, dtype=None, device=None: torch.ones(shape))
    assert draw(probs, None).tolist() == [4]  # the last token with any probability, not token 5
