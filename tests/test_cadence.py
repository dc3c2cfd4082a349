"""How often a run evaluates: about 20 times over a --max-iters or --max-time run unless --eval-interval is
given, kept on resume; and a --max-time run, final whole-val pass included, ends within its budget."""

import json
import math
import time

import pytest

import zaizai
from zaizai.data.batches import Batches
from zaizai.data.tokendata import TokenData
from zaizai.models import build_model
from zaizai.models.config import ModelConfig
from zaizai.training.checkpoint import LAST, load_checkpoint
from zaizai.training.config import TrainConfig
from zaizai.training.evaluation import evaluate_split
from util import TINY, prepared, write_corpus

AUTO = {k: v for k, v in TINY.items() if k != "eval_interval"}   # the tiny model, no --eval-interval


@pytest.fixture
def data_dir(tmp_path):
    return prepared(tmp_path)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_a_max_iters_run_evaluates_about_20_times(tmp_path, data_dir):
    zaizai.train(data_dir, tmp_path / "a", model="gpt", max_iters=40, verbose=False, **AUTO)
    assert [r["step"] for r in records(tmp_path / "a")] == list(range(2, 41, 2))
    assert load_checkpoint(tmp_path / "a" / LAST).state["eval_interval"] == 2


def test_an_explicit_eval_interval_is_kept(tmp_path, data_dir):
    zaizai.train(data_dir, tmp_path / "a", model="gpt", max_iters=40, eval_interval=7, verbose=False, **AUTO)
    assert [r["step"] for r in records(tmp_path / "a")] == [7, 14, 21, 28, 35, 40]


def test_a_resumed_run_keeps_its_fitted_cadence_and_losses(tmp_path, data_dir):
    opts = dict(AUTO, model="gpt", max_iters=40, verbose=False)
    zaizai.train(data_dir, tmp_path / "a", **opts)
    zaizai.train(data_dir, tmp_path / "b", on_step=lambda s: s["step"] == 10, **opts)
    zaizai.train(out_dir=tmp_path / "b", resume=True, verbose=False)
    assert records(tmp_path / "a") and [(r["step"], r["train_loss"], r["val_loss"]) for r in records(tmp_path / "a")] \
        == [(r["step"], r["train_loss"], r["val_loss"]) for r in records(tmp_path / "b")]
    # a longer resumed run keeps the stored interval (2), not one fitted to its new length
    zaizai.train(out_dir=tmp_path / "b", resume=True, max_iters=44, verbose=False)
    assert [r["step"] for r in records(tmp_path / "b")][-2:] == [42, 44]


def test_a_short_max_time_run_draws_a_curve_and_ends_within_its_budget(tmp_path, data_dir):
    budget = 4.0
    start = time.perf_counter()
    result = zaizai.train(data_dir, tmp_path / "a", model="gpt", max_time=budget, verbose=False, **AUTO)
    wall = time.perf_counter() - start
    assert result.stopped_by == "max_time"
    assert wall < budget + 6                                  # generous for a busy CI machine
    assert len(records(tmp_path / "a")) >= 5                  # was 1 with the preset's interval of 100 steps
    assert result.full_val_loss is not None and math.isfinite(result.full_val_loss)
    assert result.full_val_share == 1.0
    state = load_checkpoint(tmp_path / "a" / LAST).state
    assert state["eval_interval"] >= 1 and 0 < state["final_reserve"] <= budget / 4


def test_a_max_time_budget_includes_a_slow_final_pass(tmp_path):
    # The whole val split would take this model ~10 s here (the old end-of-run pass ran past the budget so);
    # the pass now stops at the budget and says it covered a sample.
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=40_000)
    zaizai.prepare([corpus], tmp_path / "data", verbose=False)
    opts = dict(AUTO, n_embd=256, n_layer=4, n_head=4, block_size=64)
    budget = 4.0
    start = time.perf_counter()
    result = zaizai.train(tmp_path / "data", tmp_path / "a", model="gpt", max_time=budget, verbose=False, **opts)
    assert time.perf_counter() - start < budget + 5
    assert result.full_val_loss is not None and math.isfinite(result.full_val_loss)
    assert 0 < result.full_val_share <= 1
    if result.full_val_share < 1:   # a sample is not recorded as the whole split's loss
        assert "full_val_loss" not in load_checkpoint(tmp_path / "a" / LAST).state


def test_a_very_short_max_time_run_still_evaluates_several_times(tmp_path, data_dir):
    zaizai.train(data_dir, tmp_path / "a", model="gpt", max_time=3.0, verbose=False, **AUTO)
    assert len(records(tmp_path / "a")) >= 5


def test_the_fit_keeps_evaluations_a_small_share():
    from zaizai.training.cadence import fit_to_steps, fit_to_time

    cfg = TrainConfig(max_iters=40, eval_iters=20)
    assert (fit_to_steps(cfg, 40).eval_interval, fit_to_steps(cfg, 40).eval_iters) == (2, 1)
    long = fit_to_steps(TrainConfig(max_iters=2000, eval_iters=20), 2000)
    assert (long.eval_interval, long.eval_iters) == (100, 20)
    # 60 s at 0.4 s a step: about 20 estimates over ~130 steps, and the final pass kept out of the budget
    fitted = fit_to_time(TrainConfig(max_time=60, eval_iters=20), step=5, elapsed=2.0, step_seconds=0.4,
                         final_eval_tokens=100_000, tokens_per_step=2048)
    assert 5 <= fitted.eval_interval <= 7 and fitted.eval_iters < 20
    assert 0 < fitted.final_reserve <= 15


def test_the_final_pass_stops_at_its_deadline_and_says_how_much_it_covered(data_dir, capsys):
    from zaizai.training.evaluation import evaluate_split_until

    data = TokenData(data_dir)
    mcfg = ModelConfig(model="gpt", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=data.tokenizer.vocab_size)
    model = build_model(mcfg)
    batches = Batches(data, 16, packed=False, loss_on="all")
    whole = evaluate_split(model, batches, "val", 1, "cpu")
    assert evaluate_split_until(model, batches, "val", 1, "cpu", progress=True) == (pytest.approx(whole), 1.0)
    assert "eval val" in capsys.readouterr().err                  # the tqdm bar of the final pass
    loss, share = evaluate_split_until(model, batches, "val", 1, "cpu", deadline=time.perf_counter())
    assert 0 < share < 1 and math.isfinite(loss)                  # one batch, then the deadline


def test_a_quiet_run_prints_nothing(tmp_path, data_dir, capsys):
    zaizai.train(data_dir, tmp_path / "a", model="gpt", max_iters=10, verbose=False, **AUTO)
    assert capsys.readouterr().out == ""
