"""Training on a CUDA GPU: bf16 autocast, TF32, fused AdamW, flash attention. Skipped without a GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import zaizai
from zaizai.common.device import autocast, enable_tf32
from zaizai.models import ModelConfig, build_model
from zaizai.training.optim import configure_optimizer
from util import TINY, prepared

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")]


def _loss(model, x, y, device, dtype):
    with autocast(device, dtype):
        _, loss = model(x.to(device), y.to(device))
    return loss


def test_bf16_cuda_loss_matches_fp32_cpu_and_training_steps_agree():
    cfg = ModelConfig(model="gpt", vocab_size=500, n_layer=2, n_head=4, n_embd=128, block_size=128, dropout=0.0)
    torch.manual_seed(0)
    cpu_model = build_model(cfg)
    gpu_model = build_model(cfg).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, cfg.vocab_size, size=(8, cfg.block_size + 1)))
    x, y = tokens[:, :-1], tokens[:, 1:]
    cuda = torch.device("cuda")
    enable_tf32()

    assert _loss(gpu_model, x, y, cuda, torch.bfloat16).item() == pytest.approx(
        _loss(cpu_model, x, y, torch.device("cpu"), None).item(), rel=2e-2)

    cpu_opt = configure_optimizer(cpu_model, lr=1e-3, weight_decay=0.1, device_type="cpu")
    gpu_opt = configure_optimizer(gpu_model, lr=1e-3, weight_decay=0.1, device_type="cuda")
    assert gpu_opt.defaults.get("fused")  # one fused AdamW kernel on CUDA
    for _ in range(5):
        for model, opt, device, dtype in ((cpu_model, cpu_opt, torch.device("cpu"), None),
                                          (gpu_model, gpu_opt, cuda, torch.bfloat16)):
            loss = _loss(model, x, y, device, dtype)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    cpu_after = _loss(cpu_model, x, y, torch.device("cpu"), None).item()
    gpu_after = _loss(gpu_model, x, y, cuda, torch.bfloat16).item()
    assert gpu_after == pytest.approx(cpu_after, rel=3e-2)


def test_flash_attention_runs_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zaizai.models.ops import causal_attention

    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot take these inputs
        y = causal_attention(q, k, v)
    reference = causal_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(y.float(), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("compile", [False, True])
def test_trainer_on_cuda_learns(tmp_path, compile):
    data_dir = prepared(tmp_path)
    result = zaizai.train(data_dir, tmp_path / "out", model="gpt", device="cuda", dtype="bfloat16",
                          compile=compile, max_iters=30, verbose=False, **{**TINY, "threads": 0})
    assert result.step == 30 and math.isfinite(result.val_loss)
    bot = zaizai.load(tmp_path / "out", device="cuda")
    assert bot.generate("床前", max_new_tokens=5, temperature=0.8, seed=1)
