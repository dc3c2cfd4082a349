"""Attention pictures (zaizai/evals/attention.py): the weights are softmax(QK^T / sqrt(hs)) of the model's own
forward pass, for gpt and modern (after QK-norm and rotary, grouped heads expanded); the picture is an output file
that never replaces a model's own files and replaces an existing file only with --overwrite."""

from __future__ import annotations

import math

import pytest
import torch

from util import TINY, prepared

import zaizai
from zaizai.common.errors import ZaizaiError
from zaizai.evals.attention import attention_picture, attention_weights, find_cjk_font
from zaizai.models import build_model
from zaizai.models.config import ModelConfig
from zaizai.models.modern import apply_rope

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IDS = [0, 5, 9, 3, 3, 17, 2, 30, 11]


def random_model(name: str, **overrides):
    """A small model with every weight random (modern's zero-initialised projections would hide mistakes)."""
    torch.manual_seed(0)
    cfg = dict(model=name, vocab_size=40, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    model = build_model(ModelConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def textbook(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) under the causal mask: q, k (nh, T, hs) -> (nh, T, T)."""
    T = q.size(1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def check_distributions(w: torch.Tensor, n_layer: int, n_head: int) -> None:
    T = len(IDS)
    assert w.shape == (n_layer, n_head, T, T) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(n_layer, n_head, T))  # each row a distribution
    assert not w.triu(1).any()  # causal: no query looks ahead


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_modern_weights_are_softmax_after_qk_norm_and_rotary_with_grouped_heads_expanded(n_kv_head):
    model = random_model("modern", n_kv_head=n_kv_head)
    w = attention_weights(model, IDS)
    check_distributions(w, 2, 4)
    # layer 0 by hand: Qwen3's order (project, QK-norm per head, rotate), query head h reads key head h // group
    attn, T, hs = model.model.layers[0].self_attn, len(IDS), 8
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(IDS)))  # (T, C)
        cos, sin = model.rope_cos[:T].unsqueeze(1), model.rope_sin[:T].unsqueeze(1)  # (T, 1, hs)
        q = apply_rope(attn.q_norm(attn.q_proj(h).view(T, 4, hs)), cos, sin).transpose(0, 1)  # (nh, T, hs)
        k = apply_rope(attn.k_norm(attn.k_proj(h).view(T, n_kv_head, hs)), cos, sin).transpose(0, 1)  # (nkv, T, hs)
        k = k[[head // (4 // n_kv_head) for head in range(4)]]  # (nh, T, hs)
    torch.testing.assert_close(w[0], textbook(q, k), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(w[0, 0], w[0, 1], atol=1e-3)  # heads differ, even when they share keys


def test_gpt_weights_are_unchanged():
    model = random_model("gpt")
    w = attention_weights(model, IDS)
    check_distributions(w, 2, 4)
    T, block = len(IDS), model.transformer.h[0]
    with torch.no_grad():
        x = model.transformer.wte(torch.tensor(IDS)) + model.transformer.wpe(torch.arange(T))
        q, k, _ = block.attn.c_attn(block.ln_1(x)).view(T, 3, 4, 8).permute(1, 2, 0, 3)  # 3 x (nh, T, hs)
    torch.testing.assert_close(w[0], textbook(q, k), atol=1e-5, rtol=1e-4)


def test_other_models_are_refused():
    with pytest.raises(ZaizaiError, match="need a gpt or modern model, not bigram"):
        attention_weights(random_model("bigram"), IDS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attention")
    data = prepared(tmp)
    for name, extra in (("gpt", {}), ("modern", dict(n_head=4, n_kv_head=2))):
        zaizai.train(data, tmp / name, max_iters=2, verbose=False, **{**TINY, "model": name, **extra})
    return tmp


@pytest.fixture
def font():
    try:
        find_cjk_font()
    except ZaizaiError as e:
        pytest.skip(f"no CJK font on this machine ({e})")


def test_a_modern_model_gets_its_picture(models, tmp_path, font):
    png = attention_picture(models / "modern", "你好，我是崽崽", tmp_path / "modern.png")
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_the_picture_never_replaces_model_files_and_replaces_a_picture_only_with_overwrite(models, tmp_path, font):
    from zaizai.cli import main

    out = models / "gpt"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for name in ("last.safetensors", "tokenizer.json", "config.json", "best.safetensors"):
        with pytest.raises(ZaizaiError, match="belongs to a model folder"):
            attention_picture(out, "你好", out / name, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the default picture, OUT_DIR/attention.png: written once, then only with --overwrite
    first = attention_picture(out, "你好", None)
    assert first == out / "attention.png" and first.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ZaizaiError, match="attention.png already exists; add --overwrite"):
        attention_picture(out, "床前明月光", None)
    first.write_bytes(b"old picture")
    assert main(["attention", str(out), "--text", "床前明月光", "--overwrite"]) == 0
    assert first.read_bytes().startswith(PNG_MAGIC)
    first.unlink()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
