"""The three language models: shapes, losses, learning, masking, causality, GPT-2 equivalence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zaizai.common.errors import ZaizaiError
import zaizai.models.gpt as gpt_module
from zaizai.models import MODEL_NAMES, ModelConfig, build_model
from zaizai.models.gpt import GPT
from zaizai.models.ops import attention_with_weights, causal_attention, linear_cross_entropy
from zaizai.training.optim import configure_optimizer, fused_adamw_supported

VOCAB = 67


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, **overrides):
    cfg = dict(model=name, vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return build_model(ModelConfig(**cfg))


def batch(B=3, T=16, vocab=VOCAB, seed=1):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(vocab, (B, T + 1), generator=g)
    return data[:, :-1].clone(), data[:, 1:].clone()


ALL = sorted(MODEL_NAMES)


# --- the shared interface -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_loss(name):
    model = make(name)
    x, y = batch()
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, VOCAB)
    assert loss.shape == () and loss.dtype == torch.float32
    logits2, loss2 = model(x[:, :5])
    assert logits2.shape == (3, 5, VOCAB) and loss2 is None
    torch.testing.assert_close(model(x)[0], logits, atol=1e-6, rtol=1e-6)  # same logits with or without targets
    assert model.config.model == name


@pytest.mark.parametrize("name", ALL)
def test_initial_loss_is_about_ln_vocab(name):
    model = make(name)
    _, loss = model(*batch())
    assert abs(loss.item() - math.log(VOCAB)) < 0.1


@pytest.mark.parametrize("name", ALL)
def test_overfits_a_tiny_batch(name):
    model = make(name)
    x, y = batch(B=2, T=16)
    opt = configure_optimizer(model, lr=5e-2 if name == "bigram" else 1e-2, weight_decay=0.0)
    first = None
    for _ in range(50):
        _, loss = model(x, y)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _, loss = model(x, y)
    # the bigram model cannot memorise sequences, only next-token counts, so it goes less far
    assert loss.item() < first - (1.0 if name == "bigram" else 2.5)


@pytest.mark.parametrize("name", ALL)
def test_ignore_index_minus_one(name):
    model = make(name)
    x, y = batch()
    y[0, :7] = -1
    y[2, 3] = -1
    logits, loss = model(x, y)
    keep = y != -1
    expected = F.cross_entropy(logits.float()[keep], y[keep])
    assert torch.allclose(loss, expected, atol=1e-6)
    # an ignored position gets no gradient through its logits
    model.zero_grad()
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    assert logits.grad is None or torch.all(logits.grad[~keep] == 0)


@pytest.mark.parametrize("name", ALL)
def test_too_long_input_is_refused(name):
    model = make(name)
    x = torch.zeros(1, 17, dtype=torch.long)
    with pytest.raises(ZaizaiError, match="block_size"):
        model(x)
    with pytest.raises(ZaizaiError, match="batch, time"):
        model(torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("name", ALL)
def test_causal(name):
    model = make(name).eval()
    x, _ = batch(B=2)
    logits, _ = model(x)
    x2 = x.clone()
    x2[:, 9] = (x2[:, 9] + 1) % VOCAB
    logits2, _ = model(x2)
    assert torch.equal(logits[:, :9], logits2[:, :9])
    assert not torch.allclose(logits[:, 9:], logits2[:, 9:])


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast_close_to_fp32(name):
    model = make(name).eval()
    x, y = batch()
    logits32, loss32 = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits16, loss16 = model(x, y)
    assert loss16.dtype == torch.float32
    assert (logits16.float() - logits32).abs().max() < 0.03
    assert abs(loss16.item() - loss32.item()) < 0.01


@pytest.mark.parametrize("name", ALL)
def test_num_params(name):
    model = make(name)
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.num_params() == unique
    position_table = model.transformer.wpe.weight.numel() if name == "gpt" else 0
    assert model.num_params(non_embedding=True) == unique - position_table


def test_invalid_configs_refused_with_clear_messages():
    with pytest.raises(ZaizaiError, match="divisible by n_head"):
        build_model(ModelConfig(model="gpt", vocab_size=10, n_embd=30, n_head=4))
    with pytest.raises(ZaizaiError, match="unknown model 'lstm'.*bigram, gpt, (modern, )?rnn"):
        build_model(ModelConfig(model="lstm", vocab_size=10))
    with pytest.raises(ZaizaiError, match="vocab_size"):
        build_model(ModelConfig(model="gpt", vocab_size=0))


@pytest.mark.parametrize("name", ["gpt", "rnn"])
def test_output_layer_is_tied_to_the_embedding(name):
    model = make(name)
    wte = model.transformer.wte.weight if name == "gpt" else model.wte.weight
    assert model.lm_head.weight is wte
    assert model.lm_head.weight.data_ptr() == wte.data_ptr()


def test_gpt_initialisation_follows_gpt2():
    model = make("gpt", n_embd=128, n_head=4, n_layer=4, vocab_size=2000)
    sd = dict(model.named_parameters())
    proj = torch.cat([sd[f"transformer.h.{i}.{m}.c_proj.weight"].flatten() for i in range(4) for m in ("attn", "mlp")])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert sd["transformer.h.0.mlp.c_fc.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["transformer.wte.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["transformer.wpe.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    for name, p in sd.items():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        if ".ln_" in name and name.endswith(".weight"):
            assert torch.all(p == 1), name


def test_gpt_parameter_names_follow_gpt2():
    names = set(dict(make("gpt").named_parameters()))
    for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
              "transformer.h.1.ln_1.weight", "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.bias",
              "transformer.h.1.ln_2.bias", "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert n in names
    assert "lm_head.weight" in make("gpt").state_dict()


def test_gpt_dropout_trains_and_eval_is_deterministic():
    model = make("gpt", dropout=0.2)
    x, y = batch()
    _, loss = model(x, y)
    loss.backward()
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


# --- GPT-2 equivalence with Hugging Face transformers -------------------------------------------------------------


def hf_copy_of(model: GPT):
    transformers = pytest.importorskip("transformers")
    c = model.config
    hf_cfg = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours = model.state_dict()
    with torch.no_grad():
        for name, p in hf.state_dict().items():
            if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
                continue  # old transformers versions keep the causal mask as a buffer
            src = ours[name]
            p.copy_(src.t() if name.endswith(conv1d) else src)
    return hf


def test_gpt_equals_huggingface_gpt2():
    model = make("gpt", vocab_size=101, block_size=24, n_layer=3, n_head=4, n_embd=64).eval()
    # non-zero biases and LayerNorm parameters, so that every parameter is checked by the comparison
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf = hf_copy_of(model)
    x, y = batch(B=2, T=24, vocab=101)
    logits, loss = model(x, y)
    with torch.no_grad():
        hf_logits = hf(input_ids=x).logits
    assert (logits - hf_logits).abs().max().item() < 1e-4
    assert loss.item() == pytest.approx(F.cross_entropy(hf_logits.view(-1, 101), y.reshape(-1)).item(), abs=1e-5)


# --- the fused output layer and attention are the plain computations, faster --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_equals_reference(dtype):
    torch.manual_seed(0)
    N, C, V = 150, 16, 1000
    x = torch.randn(N, C, dtype=dtype, requires_grad=True)
    w = torch.randn(V, C, dtype=dtype, requires_grad=True)
    t = torch.randint(V, (N,))
    t[::7] = -1
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)

    def grads(fn):
        x.grad = w.grad = None
        logits, loss = fn()
        (3 * loss + 0.01 * logits.square().sum()).backward()  # the logits used downstream too
        return logits.detach(), loss.detach(), x.grad, w.grad

    def reference():
        logits = F.linear(x, w)
        return logits, F.cross_entropy(logits, t, ignore_index=-1)

    for ours, ref in zip(grads(lambda: linear_cross_entropy(x, w, t)), grads(reference)):
        torch.testing.assert_close(ours, ref, **tol)
    x.grad = w.grad = None
    _, loss = linear_cross_entropy(x, w, t)
    loss.backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    reference()[1].backward()
    torch.testing.assert_close(gx, x.grad, **tol)
    torch.testing.assert_close(gw, w.grad, **tol)


def test_linear_cross_entropy_edge_cases():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w = torch.tensor([[100.0, 0.0], [0.0, 0.0], [-100.0, 0.0]])
    t = torch.tensor([2, 0])  # row 0's target has probability exp(-200): underflows to 0 in fp32
    _, loss = linear_cross_entropy(x, w, t)
    assert loss.item() == pytest.approx(F.cross_entropy(x @ w.t(), t).item(), rel=1e-6)
    _, loss = linear_cross_entropy(x, w, torch.tensor([-1, -1]))
    assert torch.isnan(loss)  # as F.cross_entropy: a mean over no targets
    with torch.no_grad():
        logits, loss = linear_cross_entropy(x, w, t)
    assert logits.shape == (2, 3) and loss.requires_grad is False


def test_linear_cross_entropy_backward_twice_with_retain_graph():
    torch.manual_seed(0)
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(30, 4, requires_grad=True)
    t = torch.randint(30, (8,))
    _, loss = linear_cross_entropy(x, w, t)
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    linear_cross_entropy(x, w, t)[1].backward()  # another forward and backward in between changes nothing
    w.grad = None
    loss.backward()
    torch.testing.assert_close(w.grad, first)


def test_linear_cross_entropy_under_bf16_autocast_is_the_fp32_loss_of_its_logits():
    torch.manual_seed(0)
    x = torch.randn(96, 32, requires_grad=True)
    w = (torch.randn(500, 32) * 0.5).requires_grad_()
    t = torch.randint(500, (96,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = linear_cross_entropy(x, w, t)
        ref_logits = F.linear(x, w)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.equal(logits, ref_logits)
    ref_loss = F.cross_entropy(ref_logits.float(), t)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    loss.backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    ref_loss.backward()
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gx, x.grad, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(gw, w.grad, atol=2e-3, rtol=2e-2)


def test_causal_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    att = att.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    expected = att @ v
    torch.testing.assert_close(causal_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=3e-2)


def test_attention_with_weights_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    y, weights = attention_with_weights(q, k, v, causal)
    torch.testing.assert_close(y, causal_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 10))
    assert (weights.masked_select(~causal) == 0).all()


def test_gpt_attention_weights_come_from_the_same_forward_pass():
    model = make("gpt").eval()
    x, _ = batch(B=1)
    weights = []
    with torch.no_grad():
        logits, _ = model(x, attn_weights=weights)
        torch.testing.assert_close(logits, model(x)[0], atol=1e-5, rtol=1e-5)
    assert len(weights) == model.config.n_layer
    assert all(w.shape == (1, model.config.n_head, 16, 16) for w in weights)
    # a different model (weights changed after the first layer's attention) gives different pictures
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight.mul_(3.0)
        again = []
        model(x, attn_weights=again)
    torch.testing.assert_close(again[0], weights[0])
    assert not torch.allclose(again[1], weights[1])


def plain_gpt_ops(monkeypatch):
    """Make the GPT use the textbook forms of its output layer and attention."""

    def plain_linear_cross_entropy(x, weight, targets):
        logits = F.linear(x, weight)
        return logits, F.cross_entropy(logits.float(), targets, ignore_index=-1)

    def plain_attention(q, k, v, dropout_p=0.0, attn_mask=None):
        causal = dict(is_causal=True) if attn_mask is None else dict(attn_mask=attn_mask)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **causal)

    monkeypatch.setattr(gpt_module, "linear_cross_entropy", plain_linear_cross_entropy)
    monkeypatch.setattr(gpt_module, "causal_attention", plain_attention)


def gpt_grads(model, x, y, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        _, loss = model(x, y)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_gpt_gradients_equal_the_plain_computation(monkeypatch):
    model = make("gpt", vocab_size=500, n_embd=64, n_head=4)
    x, y = batch(B=4, vocab=500)
    y[1, :5] = -1
    loss, grads = gpt_grads(model, x, y)
    loss_bf16, grads_bf16 = gpt_grads(model, x, y, torch.bfloat16)
    plain_gpt_ops(monkeypatch)
    plain_loss, plain_grads = gpt_grads(model, x, y)
    plain_loss_bf16, plain_grads_bf16 = gpt_grads(model, x, y, torch.bfloat16)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    torch.testing.assert_close(grads, plain_grads, atol=1e-6, rtol=1e-4)
    # under bf16 autocast both differ from fp32 by rounding; the fused path is no less accurate
    err = (grads_bf16 - plain_grads).norm() / plain_grads.norm()
    plain_err = (plain_grads_bf16 - plain_grads).norm() / plain_grads.norm()
    assert err < 0.02 and err <= 1.2 * plain_err
    assert abs(loss_bf16 - plain_loss) <= max(2e-3, 1.2 * abs(plain_loss_bf16 - plain_loss))


# --- packed sequences (segments) ------------------------------------------------------------------------------


def packed_row(vocab=VOCAB):
    """Two sequences of 6 and 7 tokens packed in one 16-token row, then 3 padding positions."""
    a, _ = batch(B=1, T=6, vocab=vocab, seed=2)
    b, _ = batch(B=1, T=7, vocab=vocab, seed=3)
    x = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # (1, 16)
    segments = torch.tensor([[0] * 6 + [1] * 7 + [-1] * 3])
    return a, b, x, segments


def test_gpt_packed_segments_equal_each_sequence_alone():
    model = make("gpt").eval()
    a, b, x, segments = packed_row()
    with torch.no_grad():
        packed, _ = model(x, segments=segments)
        alone_a, _ = model(a)
        alone_b, _ = model(b)
    torch.testing.assert_close(packed[:, :6], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 6:13], alone_b, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(packed).all()  # padding attends to itself: no fully masked row, no NaN
    # a second row with another layout, batched: rows stay independent
    x2 = torch.cat([x, torch.cat([b, a, torch.zeros(1, 3, dtype=torch.long)], dim=1)])
    seg2 = torch.cat([segments, torch.tensor([[5] * 7 + [2] * 6 + [-1] * 3])])
    with torch.no_grad():
        both, _ = model(x2, segments=seg2)
    torch.testing.assert_close(both[1:, :7], alone_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:, 7:13], alone_a, atol=1e-5, rtol=1e-5)


def test_gpt_segments_loss_and_gradients_equal_separate_sequences():
    model = make("gpt")
    a, b, x, segments = packed_row()
    y = torch.roll(x, -1, dims=1)
    y[:, 5] = -1  # no target across the boundary between the two sequences
    y[:, 12:] = -1  # nor in the padding
    _, loss = model(x, y, segments=segments)
    loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ya, yb = y[:, :6], y[:, 6:13]
    _, loss_a = model(a, ya)
    _, loss_b = model(b, yb)
    n_a, n_b = (ya != -1).sum(), (yb != -1).sum()
    separate = (loss_a * n_a + loss_b * n_b) / (n_a + n_b)
    separate.backward()
    assert loss.item() == pytest.approx(separate.item(), abs=1e-5)
    for got, want in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert all(torch.isfinite(g).all() for g in packed_grads)


def test_gpt_segments_under_bf16_autocast_and_repeated_values():
    model = make("gpt").eval()
    _, _, x, segments = packed_row()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed, _ = model(x, segments=segments)
    assert torch.isfinite(packed).all()
    # a value that comes back later starts a new sequence: segments 0 0 1 1 0 0 are three sequences
    from zaizai.models.gpt import segment_layout

    pos, mask = segment_layout(torch.tensor([[0, 0, 1, 1, 0, 0]]))
    assert pos.tolist() == [[0, 1, 0, 1, 0, 1]]
    assert mask[0, 0, 4].tolist() == [False, False, False, False, True, False]
    with pytest.raises(ZaizaiError, match="segments must have"):
        model(x, segments=segments[:, :5])


@pytest.mark.parametrize("name", ALL)
def test_segments_accepted_by_every_model(name):
    model = make(name).eval()
    assert model.supports_segments == (name != "rnn")
    _, _, x, segments = packed_row()
    logits, _ = model(x, segments=segments)
    assert logits.shape == (1, 16, VOCAB)
    if name == "bigram":  # one token of context: packing changes nothing
        torch.testing.assert_close(logits, model(x)[0])


# --- the RNN carries its hidden state ---------------------------------------------------------------------------


def test_rnn_cache_carries_the_hidden_state():
    model = make("rnn").eval()
    x, _ = batch(B=2)
    full, _ = model(x)
    cache = model.new_cache()
    first, _ = model(x[:, :10], cache=cache)
    rest, _ = model(x[:, 10:], cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-6, rtol=1e-6)
    assert cache.hidden.shape == (2, 2, 32) and cache.pos == x.size(1)
    longer = torch.cat([x, x], dim=1)  # past block_size: fine with a cache, which carries any length
    assert model(longer, cache=model.new_cache())[0].shape[1] == longer.size(1)


# --- the optimizer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_configure_optimizer_decays_exactly_the_matrices(name):
    model = make(name)
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    params = {id(p): p for p in model.parameters()}
    assert decay == {i for i, p in params.items() if p.dim() >= 2}
    assert no_decay == {i for i, p in params.items() if p.dim() < 2}
    assert all(g["fused"] for g in opt.param_groups) == fused_adamw_supported("cpu")
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
