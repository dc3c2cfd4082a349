"""Checkpoints are safetensors, round-trip exactly, and survive failures and kills mid-write."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

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
