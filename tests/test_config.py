import json
from dataclasses import fields, replace

import pytest

from zaizai.training.config import (AUTO_CANDIDATES, AUTO_COMMON, AUTO_DEFAULT, MODEL_FIELDS, PRESETS, TrainConfig,
                                    resolve_config)
from zaizai.common.errors import ZaizaiError


def test_defaults_come_from_the_auto_preset_and_other_models_from_the_cpu_preset():
    mcfg, tcfg = resolve_config({})
    assert tcfg.preset == "auto" and mcfg.model == "modern" and tcfg.optimizer == "muon"
    assert PRESETS["auto"] == {**AUTO_COMMON, **AUTO_CANDIDATES[AUTO_DEFAULT]}
    for key, value in PRESETS["auto"].items():
        assert getattr(mcfg if hasattr(mcfg, key) else tcfg, key) == value
    # `auto` fits the modern block; a gpt (rnn, bigram), or a run from another model, keeps the cpu preset exactly
    for options in ({"model": "gpt"}, {"model": "rnn", "preset": "auto"}, {"init_from": "base/"}):
        mcfg, tcfg = resolve_config(options)
        assert tcfg.preset == "cpu" and tcfg.optimizer == "adamw"
        for key, value in PRESETS["cpu"].items():
            assert getattr(mcfg if hasattr(mcfg, key) else tcfg, key) == value


def test_every_auto_candidate_is_a_valid_modern_model():
    from zaizai.models import build_model

    for name, row in AUTO_CANDIDATES.items():
        mcfg, tcfg = resolve_config({}, preset_table={**AUTO_COMMON, **row})
        assert (mcfg.model, tcfg.optimizer, mcfg.n_layer, mcfg.n_embd) == ("modern", "muon", row["n_layer"],
                                                                           row["n_embd"]), name
        mcfg.vocab_size = 50
        mcfg.validate()
        replace(tcfg, max_iters=1).validate()
        assert build_model(mcfg).config.block_size == row["block_size"]


def test_precedence_preset_then_file_then_flags(tmp_path):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('preset = "tiny"\nlr = 0.005\n[model]\nn_embd = 96\nn_head = 3\n', encoding="utf-8")
    mcfg, tcfg = resolve_config({"lr": 0.01, "batch_size": None}, cfg_file)
    assert tcfg.preset == "tiny"
    assert tcfg.lr == 0.01                                       # flag beats file
    assert mcfg.n_embd == 96 and mcfg.n_head == 3                # file beats preset
    assert mcfg.n_layer == PRESETS["tiny"]["n_layer"]            # preset beats default
    assert tcfg.batch_size == PRESETS["tiny"]["batch_size"]      # None means "not given"


def test_json_config_file(tmp_path):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"max-iters": 7, "model": "rnn"}), encoding="utf-8")
    mcfg, tcfg = resolve_config({}, cfg_file)
    assert tcfg.max_iters == 7 and mcfg.model == "rnn"


@pytest.mark.parametrize("options, message", [
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"learning_rate": 1}, "unknown option(s): learning_rate"),
    ({"batch_size": "many"}, "batch_size expects a int"),
    ({"max_iters": 2.5}, "max_iters expects a int"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ZaizaiError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_config(options)


def test_broken_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3", encoding="utf-8")
    with pytest.raises(ZaizaiError, match="not valid TOML"):
        resolve_config({}, bad)
    with pytest.raises(ZaizaiError, match="cannot read config file"):
        resolve_config({}, tmp_path / "missing.toml")


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "--batch-size must be at least 1"),
    ("lr", 0.0, "--lr must be positive"),
    ("max_time", -1.0, "--max-time must not be negative"),
    ("eval_interval", -1, "--eval-interval must not be negative"),
    ("optimizer", "sgd", "--optimizer must be one of adamw | muon, got 'sgd'"),
    ("dtype", "int8", "--dtype must be one of auto | float32 | bfloat16 | float16, got 'int8'"),
])
def test_train_config_validation(field, value, message):
    cfg = TrainConfig(max_iters=10)
    setattr(cfg, field, value)
    with pytest.raises(ZaizaiError, match=message):
        cfg.validate()


def test_the_eval_interval_is_fitted_unless_given(tmp_path):
    # No preset sets it: 0 (fit about 20 evaluations to the run) unless a flag or config file gives it.
    assert all("eval_interval" not in table for table in PRESETS.values())
    for name in PRESETS:
        assert resolve_config({"preset": name})[1].eval_interval == 0
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text("eval_interval = 7\n", encoding="utf-8")
    assert resolve_config({}, cfg_file)[1].eval_interval == 7
    assert resolve_config({"eval_interval": 3}, cfg_file)[1].eval_interval == 3


def test_a_stopping_point_is_required():
    with pytest.raises(ZaizaiError, match="--max-iters N or --max-time"):
        TrainConfig().validate()


def gpt2_parameter_count(mcfg) -> int:
    """GPT-2's layout: token and position tables, per block 12·C² + 13·C (attention and MLP matrices with their
    biases, two LayerNorms), a final LayerNorm, and the output layer tied to the token table."""
    c = mcfg.n_embd
    return (mcfg.vocab_size + mcfg.block_size) * c + mcfg.n_layer * (12 * c * c + 13 * c) + 2 * c


@pytest.mark.parametrize("name", [name for name in PRESETS if name != "auto"])   # auto: the test above
def test_each_preset_is_its_table_and_builds_a_valid_model(name):
    from zaizai.models import build_model

    mcfg, tcfg = resolve_config({"preset": name})
    assert tcfg.preset == name
    table = PRESETS[name]
    for key, value in table.items():
        assert getattr(mcfg if key in MODEL_FIELDS else tcfg, key) == value, key
    for f in fields(TrainConfig):  # what the preset leaves out keeps the dataclass default
        if f.name not in table and f.name != "preset":
            assert getattr(tcfg, f.name) == f.default, f.name
    assert mcfg.model == "gpt" and mcfg.n_embd % mcfg.n_head == 0
    mcfg.vocab_size = 50
    replace(tcfg, max_iters=tcfg.max_iters or 1).validate()
    mcfg.validate()
    if name != "gpt2":  # 124M parameters: valid, but too big to build in a unit test
        model = build_model(mcfg)
        assert sum(p.numel() for p in model.parameters()) == gpt2_parameter_count(mcfg)
        assert model.config.block_size == table["block_size"] and len(model.transformer.h) == table["n_layer"]


def test_the_gpt2_preset_is_gpt2_small():
    mcfg, _ = resolve_config({"preset": "gpt2"})
    mcfg.vocab_size = 50257
    assert gpt2_parameter_count(mcfg) == 124_439_808  # GPT-2 small, as Hugging Face counts it


@pytest.mark.parametrize("text, message", [
    ("max_iters = 1e400\n", "max_iters expects a finite int, got inf"),      # TOML reads 1e400 as inf
    ("lr = 1e400\n", "lr expects a finite float, got inf"),
    ("lr = -1e400\n", "lr expects a finite float, got -inf"),
    ("max_time = nan\n", "max_time expects a finite float, got nan"),
    ("[model]\nn_embd = inf\n", "n_embd expects a finite int, got inf"),
    ("[model]\ndropout = nan\n", "dropout expects a finite float"),
    ("max_iters = true\n", "max_iters expects a int, got True"),
    ("lr = false\n", "lr expects a float, got False"),
    ("device = 5\n", "device expects a str, got 5"),
    ("[model]\nmodel = [\"gpt\"]\n", "model expects a str"),
    ("max_iters = [10]\n", "max_iters expects a int"),
    ("max_iters = {a = 1}\n", "unknown option"),                 # a nested table flattens to its keys
])
def test_config_file_values_of_the_wrong_type_or_not_finite_are_one_line(tmp_path, text, message):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(text, encoding="utf-8")
    with pytest.raises(ZaizaiError, match=message) as info:
        resolve_config({}, cfg_file)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e400])
def test_non_finite_flags_are_refused(value):
    with pytest.raises(ZaizaiError, match="max_time expects a finite float"):
        resolve_config({"max_time": value})
    with pytest.raises(ZaizaiError, match="max_iters expects a finite int"):
        resolve_config({"max_iters": value})


def test_a_json_config_with_nan_or_huge_numbers_is_one_line(tmp_path):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text('{"lr": NaN}', encoding="utf-8")
    with pytest.raises(ZaizaiError, match="lr expects a finite float, got nan"):
        resolve_config({}, cfg_file)
    cfg_file.write_text('{"batch_size": 1e999}', encoding="utf-8")
    with pytest.raises(ZaizaiError, match="batch_size expects a finite int"):
        resolve_config({}, cfg_file)


@pytest.mark.parametrize("seed", [2**70, -1, 2**63])
def test_seeds_out_of_range_are_refused(seed):
    cfg = resolve_config({"seed": seed, "max_iters": 1})[1]
    with pytest.raises(ZaizaiError, match=r"--seed must be in \[0, 2\*\*63\)"):
        cfg.validate()
