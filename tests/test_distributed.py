"""torchrun: two CPU processes (gloo) train like one process on the same global batch, and stay in step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zaizai
from zaizai.training.checkpoint import LAST, load_checkpoint
from util import TINY, prepared

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this PyTorch build has no torch.distributed gloo backend (needed for CPU torchrun training)")

# float32 and no dropout, so the only difference between the runs is how the batch is split.
OPTS = dict(TINY, model="gpt", dtype="float32", device="cpu", eval_interval=5)


def _flags(options: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]


def _torchrun(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "zaizai", "train", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_ranks_equal_one_process_on_the_global_batch_and_resume(tmp_path):
    data_dir = prepared(tmp_path)
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    per_rank = dict(OPTS, batch_size=2, grad_accum=2)  # 2 micro-steps: DDP syncs gradients in the last only

    t0 = time.perf_counter()
    first = _torchrun(data_dir, "--out", ddp_out, "--max-iters=4", *_flags(per_rank))
    assert "2 processes (DDP, gloo), batch 2 per process" in first.stdout
    assert first.stdout.count("完成 done") == 1  # only rank 0 prints
    at_step_4 = load_checkpoint(ddp_out / LAST).model_state
    resumed = _torchrun("--out", ddp_out, "--resume", "--max-iters=8")
    assert "resuming at step 4" in resumed.stdout
    assert "replicas agree: max |Δparam| = 0" in resumed.stdout
    print(f"two torchrun launches: {time.perf_counter() - t0:.1f}s")

    # One process with the global batch (2 ranks x 2 rows), stopped and resumed at the same steps.
    zaizai.train(data_dir, single_out, max_iters=4, verbose=False, **dict(OPTS, batch_size=4, grad_accum=2))
    zaizai.train(out_dir=single_out, resume=True, max_iters=8, verbose=False)

    ddp, single = load_checkpoint(ddp_out / LAST), load_checkpoint(single_out / LAST)
    assert ddp.state["step"] == single.state["step"] == 8
    assert ddp.state["tokens_seen"] == single.state["tokens_seen"]
    assert ddp.state["replica_max_diff"] == 0.0  # every rank ended with bit-identical parameters
    for name, tensor in single.model_state.items():
        torch.testing.assert_close(ddp.model_state[name], tensor, atol=5e-5, rtol=1e-4, msg=name)
    # the resumed run did train on: these are not two stalled models agreeing
    assert any(not torch.equal(at_step_4[name], ddp.model_state[name]) for name in at_step_4)

    def steps(out: Path) -> list[int]:
        return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert steps(ddp_out) == steps(single_out) == [4, 5, 8]  # one writer: no duplicated lines


def test_train_step_in_ddp_takes_the_plain_step(tmp_path):
    """In-process, a world of one: train_step on a DDP-wrapped model (no_sync on the first micro-step, the loss
    averaged over the ranks) moves the weights exactly as on the plain model."""
    from zaizai.common.distributed import replicate
    from zaizai.models import ModelConfig, build_model
    from zaizai.training.loop import train_step

    cpu = torch.device("cpu")
    x = torch.randint(0, 30, (4, 8), generator=torch.Generator().manual_seed(0))
    micro_batches = [(x[:2, :-1], x[:2, 1:], None), (x[2:, :-1], x[2:, 1:], None)]

    def one_step(wrap: bool):
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loss = train_step(replicate(model, cpu) if wrap else model, optimizer, micro_batches, lr=1.0,
                          grad_accum=2, grad_clip=1.0, device=cpu)
        return loss, model

    torch.distributed.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0,
                                         world_size=1)
    try:
        ddp_loss, ddp = one_step(wrap=True)
    finally:
        torch.distributed.destroy_process_group()
    plain_loss, plain = one_step(wrap=False)
    assert ddp_loss == plain_loss
    for (name, a), b in zip(plain.named_parameters(), ddp.parameters()):
        assert torch.equal(a, b), name
