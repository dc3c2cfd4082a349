"""Checkpoints are safetensors, round-trip exactly, and survive failures and kills mid-write."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zaizai.common.errors import ZaizaiError
from zaizai.training.checkpoint import LAST, load_checkpoint, save_checkpoint
from zaizai.common.fileio import atomic_write_text
from zaizai.models import ModelConfig, build_model
from zaizai.training.optim import configure_optimizer
from util import TINY, prepared


def small_model_and_optimizer():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = configure_optimizer(model, lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 30, (2, 8))
    for _ in range(3):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_model_optimizer_and_state(tmp_path):
    model, opt = small_model_and_optimizer()
    path = tmp_path / LAST
    save_checkpoint(path, model, model_config=model.config.to_dict(), train_config={"lr": 0.01},
                    state={"step": 3, "best_val_loss": 1.5}, optimizer=opt)
    ckpt = load_checkpoint(path)
    assert ckpt.state == {"step": 3, "best_val_loss": 1.5} and ckpt.train_config == {"lr": 0.01}
    for name, t in model.state_dict().items():
        assert torch.equal(ckpt.model_state[name], t)
    # tied weights are stored once and come back tied
    assert ckpt.model_state["lm_head.weight"] is ckpt.model_state["transformer.wte.weight"]
    fresh = build_model(ModelConfig(**ckpt.model_config))
    fresh.load_state_dict(ckpt.model_state)
    opt2 = configure_optimizer(fresh, lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(ckpt.optimizer_state)
    for (_, a), (_, b) in zip(sorted(opt.state_dict()["state"].items()), sorted(opt2.state_dict()["state"].items())):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the file is plain safetensors: no pickle anywhere
    assert path.read_bytes()[8:9] == b"{"


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import zaizai.training.checkpoint as ck

    model, opt = small_model_and_optimizer()
    path = tmp_path / LAST
    save_checkpoint(path, model, model_config=model.config.to_dict(), train_config={}, state={"step": 1})
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", half_write)
    with pytest.raises(OSError):
        save_checkpoint(path, model, model_config=model.config.to_dict(), train_config={}, state={"step": 2})
    assert path.read_bytes() == before
    assert load_checkpoint(path).state == {"step": 1}
    assert os.listdir(tmp_path) == [LAST]     # no temp file left behind


def test_atomic_text_write(tmp_path):
    atomic_write_text(tmp_path / "a.json", "一")
    atomic_write_text(tmp_path / "a.json", "二")
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == "二" and os.listdir(tmp_path) == ["a.json"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_training_run_leaves_a_loadable_checkpoint_and_resumes(tmp_path):
    data = prepared(tmp_path)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "zaizai", "train", str(data), "--out", str(out), "--max-iters", "100000",
            "--eval-interval", "2", "--eval-iters", "1"]
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "threads"):
        args += ["--" + key.replace("_", "-"), str(TINY[key])]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        # wait until several checkpoints have been written, then kill without warning (likely mid-write)
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.read_text().count("\n") >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = load_checkpoint(out / LAST)
    assert ckpt.state["step"] >= 8 and ckpt.state["step"] % 2 == 0
    import zaizai

    result = zaizai.train(out_dir=out, resume=True, max_iters=ckpt.state["step"] + 4, verbose=False)
    assert result.step == ckpt.state["step"] + 4


# --- damaged or edited metadata: one clear line, checked before anything is built or allocated -------------

def saved_checkpoint(tmp_path, **config):
    """A tiny gpt checkpoint (model + AdamW state) in ``tmp_path/last.safetensors``."""
    model, opt = small_model_and_optimizer()
    path = tmp_path / LAST
    save_checkpoint(path, model, model_config=model.config.to_dict(), train_config={"lr": 0.01},
                    state={"step": 3, "tokens_seen": 48, "elapsed": 1.5, "best_val_loss": 2.0}, optimizer=opt)
    return path


def edit_metadata(path, **changes):
    """Rewrite ``path`` with metadata keys replaced (values JSON-encoded; a model_config dict is merged)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    for key, value in changes.items():
        if key == "model_config" and isinstance(value, dict):
            value = {**json.loads(meta[key]), **value}
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("changes, message", [
    ({"model_config": {"n_layer": "2"}}, r"model config n_layer = '2' is not a valid int"),
    ({"model_config": {"n_embd": True}}, r"n_embd = True is not a valid int"),
    ({"model_config": {"n_head": 2.0}}, r"n_head = 2.0 is not a valid int"),
    ({"model_config": {"dropout": "NaN"}}, r"dropout = 'NaN' is not a valid float"),
    ({"model_config": {"model": 3}}, r"model = 3 is not a valid str"),
    ({"model_config": {"model": "lstm"}}, r"unknown model 'lstm'"),
    ({"model_config": {"n_head": 3}}, r"divisible by n_head"),
    ({"model_config": {"vocab_size": -5}}, r"vocab_size = -5"),
    ({"model_config": None}, r"model_config is NoneType, not a table"),
    ({"model_config": [1, 2]}, r"model_config is list, not a table"),
    ({"model_config": "{not json"}, r"damaged metadata"),
    ({"train_config": None}, r"train_config is NoneType, not a table"),
    ({"state": None}, r"state is NoneType, not a table"),
    ({"state": {"step": "3"}}, r"state step = '3', not a count"),
    ({"state": {"step": 3, "elapsed": 1e400}}, r"state elapsed = inf, not a finite number"),
    ({"aliases": {"lm_head.weight": "nowhere"}}, r"alias 'lm_head.weight' -> 'nowhere' names no tensor"),
    ({"aliases": []}, r"aliases is list, not a table"),
    # shapes: the position table and the widths must be what the weights say
    ({"model_config": {"block_size": 10**8}}, r"does not match its config: transformer.wpe.weight is \[8, 16\], "
                                              r"the config implies \[100000000, 16\]"),
    ({"model_config": {"n_embd": 10**8, "n_head": 1}}, r"does not match its config: .* the config implies"),
    ({"model_config": {"vocab_size": 31}}, r"transformer.wte.weight is \[30, 16\], the config implies \[31, 16\]"),
    ({"model_config": {"n_layer": 2}}, r"missing transformer.h.1"),
    ({"model_config": {"n_layer": 10**9}}, r"n_layer 1000000000 but only \d+ tensors"),
    ({"model_config": {"n_layer": 2**40}}, r"n_layer = 1099511627776 is not a valid int"),
    ({"model_config": {"bias": False}}, r"unexpected transformer.h.0"),
    ({"model_config": {"model": "rnn"}}, r"missing gru.bias_hh_l0"),
])
def test_damaged_or_edited_metadata_is_one_line_before_anything_is_built(tmp_path, changes, message):
    path = saved_checkpoint(tmp_path)
    edit_metadata(path, **changes)
    with pytest.raises(ZaizaiError, match=message) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    if "config implies" in message or "n_layer 1000000000" in message:
        assert "it is damaged or was edited" in text


def test_loading_an_edited_model_is_one_line_and_allocates_nothing_big(tmp_path):
    """zaizai.load goes through the same check: a config that asks for gigabytes never builds a model."""
    import zaizai

    path = saved_checkpoint(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # never read: the checkpoint is refused first
    edit_metadata(path, model_config={"n_layer": "2"})
    with pytest.raises(ZaizaiError, match="n_layer = '2' is not a valid int"):
        zaizai.load(tmp_path)
    edit_metadata(path, model_config={"n_layer": 1, "block_size": 10**8})   # 6.4 GB if the model were built
    with pytest.raises(ZaizaiError, match="does not match its config.*wpe"):
        zaizai.load(tmp_path)


def test_check_weights_match_is_public_and_reads_shapes_only():
    from zaizai.training.checkpoint import check_weights_match

    cfg = dict(model="gpt", vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in build_model(ModelConfig(**cfg)).state_dict().items()}
    assert check_weights_match(cfg, shapes) == ModelConfig(**cfg)
    assert check_weights_match(ModelConfig(**cfg), shapes).block_size == 8
    with pytest.raises(ZaizaiError, match=r"^an import does not match its config: transformer.wpe.weight"):
        check_weights_match({**cfg, "block_size": 1024}, shapes, source="an import")
    with pytest.raises(ZaizaiError, match="missing lm_head.weight"):
        check_weights_match(cfg, {n: s for n, s in shapes.items() if n != "lm_head.weight"})
    big = {**cfg, "model": "bigram", "n_layer": 4}   # a bigram table has no layers: n_layer is not checked
    assert check_weights_match(big, {"token_embedding_table.weight": (30, 30)}).model == "bigram"


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                      max_size=3), max_leaves=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["model", "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout",
                              "bias", "model_config", "train_config", "state", "aliases"]),
       value=json_values)
def test_any_metadata_value_loads_or_is_one_zaizai_error(tmp_path, field, value):
    """Fuzz: whatever JSON a field of the metadata holds, the loader returns or raises ZaizaiError, and what it
    returns has exactly the saved shapes."""
    import json

    path = saved_checkpoint(tmp_path)
    if field in ("model_config", "train_config", "state", "aliases"):
        edit_metadata(path, **{field: json.dumps(value)})
    else:
        edit_metadata(path, model_config={field: value})
    try:
        ckpt = load_checkpoint(path)
    except ZaizaiError as e:
        assert "\n" not in str(e)
        return
    fresh = build_model(ModelConfig(**ckpt.model_config))
    fresh.load_state_dict(ckpt.model_state)
