import math

import pytest
import torch

from zaizai.common.errors import ZaizaiError
from zaizai.inference.sampling import (
    NGramBlocker,
    SamplingConfig,
    apply_repetition_penalty,
    banned_ngram_tokens,
    filter_logits,
    sample_next,
)


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.5, 1.0, -0.5]])
    assert kept(filter_logits(logits, top_k=3)) == {1, 3, 4}
    assert kept(filter_logits(logits, top_k=0)) == set(range(6))
    assert kept(filter_logits(logits, top_k=99)) == set(range(6))


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log()
    # sorted: 0.5 (1), 0.3 (3), 0.1 (2), ... -> 0.5 < 0.7, 0.8 >= 0.7: keep {1, 3}
    assert kept(filter_logits(logits, top_p=0.7)) == {1, 3}
    assert kept(filter_logits(logits, top_p=0.79)) == {1, 3}
    assert kept(filter_logits(logits, top_p=0.81)) == {1, 3, 2}
    assert kept(filter_logits(logits, top_p=0.1)) == {1}   # the most likely token always stays
    assert kept(filter_logits(logits, top_p=1.0)) == set(range(5))


def test_filters_work_row_by_row_and_combine():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.5, 1.0, -0.5],
                           [5.0, -1.0, 0.0, 0.2, 4.9, 0.1]])
    out = filter_logits(logits, top_k=2)
    assert kept(out) == {1, 3} and kept(out[1:]) == {0, 4}
    # top-k first, then top-p renormalised over what is left: row 0 keeps {1, 3}, p(1) = 0.62 < 0.7 -> both
    assert kept(filter_logits(logits, top_k=2, top_p=0.7)) == {1, 3}
    assert kept(filter_logits(logits, top_k=2, top_p=0.6)) == {1}
    kept_values = filter_logits(logits, top_k=3)
    assert torch.equal(kept_values[torch.isfinite(kept_values)], logits[torch.isfinite(kept_values)])  # unchanged


def test_top_p_then_sampling_never_leaves_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    gen = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(temperature=1.0, top_p=0.7)
    seen = {int(sample_next(logits, cfg, gen)) for _ in range(300)}
    assert seen == {0, 1}   # p = 0.64, 0.24, ...: 0.64 < 0.7 so the second token completes the nucleus


def test_temperature_zero_is_greedy_and_seed_repeats():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    assert int(sample_next(logits, SamplingConfig(temperature=0), None)) == int(logits.argmax())
    cfg = SamplingConfig(temperature=1.0)
    a = [int(sample_next(logits, cfg, torch.Generator().manual_seed(7))) for _ in range(5)]
    b = [int(sample_next(logits, cfg, torch.Generator().manual_seed(7))) for _ in range(5)]
    assert a == b


def test_repetition_penalty_lowers_seen_tokens_whatever_their_sign():
    logits = torch.tensor([[-2.0, -1.0, 1.0, 2.0, 0.0]])
    seen = torch.tensor([True, False, True, False, True])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[-4.0, -1.0, 0.5, 2.0, 0.0]]  # negative: times p; positive: divided by p
    before, after = torch.softmax(logits, -1)[0], torch.softmax(out, -1)[0]
    assert after[0] < before[0] and after[2] < before[2]  # both seen tokens became less likely
    # the well-known bug, logit / p for every sign, moves the negative logit up: -2 / 2 = -1
    buggy = torch.where(seen, logits / 2.0, logits)
    assert torch.softmax(buggy, -1)[0, 0] > before[0]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    # (V,) and (B, V) masks both work
    two = apply_repetition_penalty(logits.repeat(2, 1), torch.stack([seen, ~seen]), 2.0)
    assert two[0].tolist() == out[0].tolist() and two[1].tolist() == [-2.0, -2.0, 1.0, 1.0, 0.0]


def test_ngram_blocker_agrees_with_the_plain_definition():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, (200,), generator=g).tolist()
    for n in (1, 2, 3, 4):
        blocker = NGramBlocker(n)
        for i in range(len(ids)):
            assert blocker.banned() == banned_ngram_tokens(ids[:i], n), (n, i)
            blocker.extend(ids[i:i + 1])


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1.0, "--temperature"), ("top_p", 0.0, "--top-p"), ("top_k", -2, "--top-k"),
    ("max_new_tokens", -1, "--max-new-tokens"), ("repetition_penalty", 0.0, "--repetition-penalty"),
    ("no_repeat_ngram_size", -1, "--no-repeat-ngram-size")])
def test_sampling_values_are_checked(field, value, message):
    cfg = SamplingConfig()
    setattr(cfg, field, value)
    with pytest.raises(ZaizaiError, match=message):
        cfg.validate()


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    from zaizai.training.config import TrainConfig
    from zaizai.training.loop import lr_at

    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100)
    assert lr_at(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_at(4, 0.0, cfg) == pytest.approx(0.5)
    assert lr_at(9, 0.0, cfg) == pytest.approx(1.0)
    assert lr_at(50, 0.5, cfg) == pytest.approx(0.55)
    assert lr_at(100, 1.0, cfg) == pytest.approx(0.1)
    values = [lr_at(s, s / 100, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert math.isclose(TrainConfig(lr=3.0).min_lr_value, 0.3)


def test_extreme_but_valid_settings_still_sample():
    """Found by schemathesis through the server: a top_p or temperature that underflows float32."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    gen = torch.Generator().manual_seed(0)
    assert int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=1.6e-223), gen)) == 0
    assert int(sample_next(logits, SamplingConfig(temperature=1e-300), gen)) == 0
