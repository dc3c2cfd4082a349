import math

import pytest
import torch

from zaizai.errors import ZaizaiError
from zaizai.generate import SamplingConfig, filter_logits, sample_next


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


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1.0, "--temperature"), ("top_p", 0.0, "--top-p"), ("top_k", -2, "--top-k"),
    ("max_new_tokens", -1, "--max-new-tokens")])
def test_sampling_values_are_checked(field, value, message):
    cfg = SamplingConfig()
    setattr(cfg, field, value)
    with pytest.raises(ZaizaiError, match=message):
        cfg.validate()


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    from zaizai.config import TrainConfig
    from zaizai.trainer import lr_at

    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100)
    assert lr_at(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_at(4, 0.0, cfg) == pytest.approx(0.5)
    assert lr_at(9, 0.0, cfg) == pytest.approx(1.0)
    assert lr_at(50, 0.5, cfg) == pytest.approx(0.55)
    assert lr_at(100, 1.0, cfg) == pytest.approx(0.1)
    values = [lr_at(s, s / 100, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert math.isclose(TrainConfig(lr=3.0).min_lr_value, 0.3)
