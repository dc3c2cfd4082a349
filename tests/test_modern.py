"""The modern (Qwen3-style) model: causal, cache = full pass, decode step = full pass, windows slide in a Batch,
segments apart, GQA, learns, is Qwen3 by name."""

from __future__ import annotations

import pytest
import torch

from zaizai.common.errors import ZaizaiError
from zaizai.inference.batch import Batch
from zaizai.inference.generate import generate_ids
from zaizai.inference.sampling import SamplingConfig
from zaizai.models import ModelConfig, build_model
from zaizai.models.decode import ModernDecoder, decoder_for
from zaizai.models.modern import ModernLM, swiglu_hidden
from zaizai.training.optim import configure_optimizer

VOCAB = 67

pytestmark = pytest.mark.usefixtures("one_thread")


def make(randomise: bool = True, **overrides) -> ModernLM:
    """A small modern model; ``randomise``: every weight random (the zero-init projections would otherwise
    make each block the identity, and attention would not show in the logits)."""
    cfg = dict(model="modern", vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg))
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
    return model.eval()


def tokens(B=2, T=16, seed=1):
    return torch.randint(VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_causal_future_tokens_do_not_change_past_logits():
    model = make()
    x = tokens()
    x2 = x.clone()
    x2[:, 9] = (x2[:, 9] + 1) % VOCAB
    a, b = model(x)[0], model(x2)[0]
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 10:], b[:, 10:])  # later positions do see it (through attention)


@pytest.mark.parametrize("n_kv_head", [0, 2, 1])
def test_cached_generation_equals_the_full_forward(n_kv_head):
    model = make(n_kv_head=n_kv_head)
    x = tokens()
    with torch.no_grad():
        full = model(x)[0]
        cache = model.new_cache(batch_size=2)
        parts = [model(x[:, :7], cache=cache)[0]]  # a prefill, then one token at a time, then a few at once
        parts += [model(x[:, t:t + 1], cache=cache)[0] for t in range(7, 12)]
        parts.append(model(x[:, 12:], cache=cache)[0])
        last = model(x[:, :5], cache=model.new_cache(2), last_only=True)[0]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, full[:, 4:5], atol=1e-5, rtol=1e-5)
    assert cache.full and cache.pos == 16
    with pytest.raises(ZaizaiError, match="block_size"):
        model(x[:, :1], cache=cache)


@torch.inference_mode()
@pytest.mark.parametrize("overrides", [dict(n_kv_head=0), dict(n_kv_head=2), dict(n_kv_head=1),
                                       dict(n_kv_head=2, qk_norm=False, rms_norm_eps=1e-5)])
def test_decode_step_equals_the_forward_pass_for_rows_joining_at_different_times(overrides, dense_backend):
    """The batched decode step (own cache of the key/value heads, rotary at each row's own position): every row's
    logits are those of a full forward pass over its sequence, and its greedy tokens the forward pass's, while
    rows of different lengths join, leave and move."""
    model = make(block_size=24, **overrides)
    decoder = decoder_for(model, rows=1)
    assert isinstance(decoder, ModernDecoder)
    assert decoder.k.shape[2] == model.config.kv_heads  # shared heads only: no repeated keys in memory
    prompts = [tokens(1, n, seed=10 + n)[0].tolist() for n in (9, 3, 14, 1)]
    seqs, next_logits = [], []
    joins = {0: 0, 2: 1, 3: 2, 5: 3}  # step -> the prompt that joins before it (rows 2, 3 make the cache grow)

    def check(logits, row):
        full = model(torch.tensor([seqs[row]]))[0][0, -1]
        torch.testing.assert_close(logits, full, atol=2e-5, rtol=1e-5)
        assert int(logits.argmax()) == int(full.argmax())

    for step in range(9):
        if step in joins:
            seqs.append(list(prompts[joins[step]]))
            next_logits.append(decoder.prefill(len(seqs) - 1, seqs[-1]))
            check(next_logits[-1], len(seqs) - 1)
        if step == 7:  # row 1 leaves; the last row's sequence moves into it
            decoder.move(len(seqs) - 1, 1)
            seqs[1], next_logits[1] = seqs.pop(), next_logits.pop()
        ptr = decoder.k.data_ptr()
        greedy = [int(logits.argmax()) for logits in next_logits]
        for seq, token in zip(seqs, greedy):
            seq.append(token)
        step_logits = decoder.step(torch.tensor(greedy))  # (n, V)
        assert decoder.k.data_ptr() == ptr  # written in place
        for row in range(len(seqs)):
            check(step_logits[row], row)
        next_logits = list(step_logits)
    assert decoder.lengths[:len(seqs)] == [len(s) for s in seqs]


def test_batch_window_slides_and_rope_restarts_with_it():
    """Batch re-prefills the last 3/4 of the window when a row is full: every step's logits are then those of a
    full forward pass over the sequence's window, positions counted from 0 again, for sequences that join late
    and slide at different steps."""
    model = make()  # block_size 16
    batch = Batch(model)
    greedy = SamplingConfig(max_new_tokens=30, temperature=0)
    seqs = [batch.add(tokens(1, 10, seed=3)[0].tolist(), greedy)]
    slides = [0, 0]
    for step in range(30):
        if step == 4:
            seqs.append(batch.add(tokens(1, 2, seed=4)[0].tolist(), SamplingConfig(max_new_tokens=25, temperature=0)))
        before = [len(s.window) for s in seqs]
        batch.step()
        with torch.no_grad():
            for k, seq in enumerate(seqs):
                if seq.done:
                    continue
                slides[k] += len(seq.window) < before[k]
                expected = model(torch.tensor([seq.window]))[0][0, -1]
                torch.testing.assert_close(seq.logits, expected, atol=1e-5, rtol=1e-5)
    assert all(s.done for s in seqs) and len(batch) == 0
    assert slides[0] >= 2 and slides[1] >= 1  # both slid, at different steps
    alone = [list(generate_ids(model, s.prompt, s.cfg)) for s in seqs]
    assert [s.tokens for s in seqs] == alone


def test_packed_segments_equal_each_sequence_alone():
    model = make()
    a, b = tokens(B=1, T=9, seed=4), tokens(B=1, T=7, seed=5)
    row = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 9 + [1] * 7])
    packed = model(row, segments=segments)[0]
    torch.testing.assert_close(packed[:, :9], model(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 9:], model(b)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ZaizaiError, match="segments and a cache"):
        model(row, segments=segments, cache=model.new_cache())


def test_gqa_shapes_and_equivalence_to_repeated_heads():
    """n_kv_head=2 of 4 heads: smaller k/v projections and cache; equal to plain multi-head attention whose
    heads 2i and 2i+1 share key/value head i."""
    gqa = make(n_kv_head=2)
    attn = gqa.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 32)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * 8, 32)
    assert gqa.new_cache(batch_size=3).k.shape == (2, 3, 2, 16, 8)  # (n_layer, B, nkv, block_size, hs)
    mha = make(n_kv_head=0)
    state = gqa.state_dict()
    for name, t in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (nkv * hs, C) -> (nh * hs, C), heads repeated
            state[name] = t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    x = tokens()
    torch.testing.assert_close(gqa(x)[0], mha(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_head=4, n_kv_head=3), r"n_head \(4\) must be a multiple of n_kv_head \(3\).*try n_kv_head=2"),
    (dict(n_head=4, n_kv_head=8), r"n_head \(4\) must be a multiple of n_kv_head \(8\).*try n_kv_head=4"),
    (dict(n_head=4, n_embd=34), r"n_embd \(34\) must be divisible by n_head \(4\)"),
    (dict(n_head=4, n_embd=12), r"head size .* = 3 must be even"),
    (dict(rope_theta=0.0), r"rope_theta must be greater than 1"),
])
def test_bad_config_is_one_clear_line(overrides, message):
    cfg = ModelConfig(**{**dict(model="modern", vocab_size=VOCAB, n_head=4, n_embd=32), **overrides})
    with pytest.raises(ZaizaiError, match=message) as err:
        cfg.validate()
    assert "\n" not in str(err.value)
    with pytest.raises(ZaizaiError):
        build_model(cfg)


def test_existing_configs_load_unchanged():
    """Old checkpoints' configs (no modern fields) read as before; gpt's parameters do not change."""
    old = dict(model="gpt", vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0, bias=True)
    cfg = ModelConfig.from_dict(old)
    assert {k: v for k, v in cfg.to_dict().items() if k in old} == old
    names = set(build_model(cfg).state_dict())
    assert not any("embed_tokens" in n or "rope" in n for n in names)
    assert "transformer.wpe.weight" in names


def test_initialisation_no_biases_and_zero_output_projections():
    model = make(randomise=False)
    assert all(not n.endswith("bias") for n, _ in model.named_parameters())
    for layer in model.model.layers:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied by default
    untied = make(randomise=False, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_params() == model.num_params() + VOCAB * 32
    assert swiglu_hidden(ModelConfig(n_embd=128)) == 384 and swiglu_hidden(ModelConfig(n_embd=64, ffn_hidden=100)) == 100


def test_attention_weights_are_the_forward_pass_ones():
    model = make()
    x = tokens()
    weights: list = []
    logits = model(x, attn_weights=weights)[0]
    torch.testing.assert_close(logits, model(x)[0], atol=1e-5, rtol=1e-5)
    assert len(weights) == 2 and weights[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 4, 16))
    assert not weights[0].triu(1).any()  # causal


def test_loss_falls_on_a_tiny_corpus():
    model = make(randomise=False, n_layer=2)
    model.train()
    text = torch.tensor([i % 11 for i in range(400)])  # a repeating pattern: learnable
    opt = configure_optimizer(model, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        starts = torch.randint(0, 400 - 17, (8,), generator=g)
        batch = torch.stack([text[s:s + 17] for s in starts.tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 2.5


def test_bf16_autocast_runs_close_to_fp32():
    model = make()
    x = tokens()
    y = tokens(seed=9)
    _, loss32 = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = model(x, y)
    assert loss16.dtype == torch.float32 and abs(loss16.item() - loss32.item()) < 0.05


def test_parameters_and_logits_are_those_of_transformers_qwen3():
    """The export to Qwen3ForCausalLM is a plain copy of the state dict: same names, shapes and logits."""
    transformers = pytest.importorskip("transformers")
    model = make(rope_theta=500.0)
    c = model.config
    hf_cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=c.n_embd, intermediate_size=swiglu_hidden(c), num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads, head_dim=c.n_embd // c.n_head,
        max_position_embeddings=c.block_size, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    assert sorted(hf.state_dict()) == sorted(model.state_dict())
    hf.load_state_dict(model.state_dict(), strict=True)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-5, rtol=1e-5)
