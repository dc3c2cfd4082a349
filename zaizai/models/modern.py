"""Modern: a Qwen3-style decoder, the block that small models train with today, next to GPT-2.

What changes from ``gpt.py`` (GPT-2), each a known gain for small models trained briefly:

- RMSNorm instead of LayerNorm (a gain only, no bias, no mean), before each sublayer and at the end;
- rotary position embeddings (RoPE) on queries and keys instead of a learned position table: attention sees
  how far apart two tokens are, and there is no table to learn;
- QK-norm: an RMSNorm over each head's queries and keys before RoPE, which keeps attention logits tame at
  high learning rates (``qk_norm=False`` leaves it out: then the block is Llama's, which ``import-hf`` reads);
- a SwiGLU MLP, ``down(silu(gate(x)) * up(x))``, instead of GELU;
- optional grouped-query attention (``n_kv_head`` < ``n_head``: heads share keys and values; a smaller cache);
- no biases anywhere, and the two projections that end a residual branch (``o_proj``, ``down_proj``) start at
  zero, so every block starts as the identity;
- the output layer tied to the token embedding by default (``tie_embeddings``), as Qwen3's small models do.

Parameter names are those of Hugging Face's ``Qwen3ForCausalLM``, so an export is a plain copy:
``model.embed_tokens``, ``model.layers.{i}.input_layernorm``, ``.self_attn.{q,k,v,o}_proj``,
``.self_attn.{q,k}_norm``, ``.post_attention_layernorm``, ``.mlp.{gate,up,down}_proj``, ``model.norm``,
``lm_head``; RMSNorm eps ``rms_norm_eps`` (1e-6, as Qwen3) and RoPE in the "rotate half" layout (llama.cpp's
NEOX type), as Qwen3. Without QK-norm the names are those of ``LlamaForCausalLM``.

Shapes: B batch, T time, C n_embd, V vocab, nh heads, nkv key/value heads, hs head size (C // nh).
The forward interface is the one every model shares (see ``zaizai/models/__init__.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common.errors import ZaizaiError
from .config import ModelConfig
from .gpt import check_input, segment_layout
from .ops import attention_with_weights, causal_attention, linear_cross_entropy

RMS_EPS = 1e-6  # Qwen3's rms_norm_eps, ModelConfig's default


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (Qwen3RMSNorm; the weight starts at 1)."""

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:  # torch's fused kernel
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # under autocast (bf16 x, fp32 weight): normalise in fp32, as Qwen3RMSNorm, and keep x's dtype
        return F.rms_norm(x.float(), (x.size(-1),), self.weight, self.eps).to(x.dtype)


def rope_tables(head_size: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, hs) in fp32 for positions 0 .. length - 1: pair i of a head (dims i and i + hs/2)
    turns by position * theta^(-2i/hs), Hugging Face's layout (each frequency written twice, half after half)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (length, hs/2)
    angles = torch.cat([angles, angles], dim=1)  # (length, hs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, n, hs) by the angles of its positions: cos, sin (T, 1, hs) or (B, T, 1, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # Hugging Face's rotate_half
    return (x * cos + rotated * sin).to(x.dtype)


class ModernKVCache:
    """Keys (after RoPE) and values of the tokens seen so far, every layer, in buffers allocated once.

    ``k`` and ``v`` are (n_layer, B, nkv, max_len, hs): with grouped-query attention the cache holds only the
    shared heads. Same contract as gpt's KV cache (``pos``, ``max_len``, ``full``, ``reset``, ``update``): the
    engine starts a new window (a fresh prefill from position 0) when it is full, so positions and their
    rotations always run 0 .. block_size - 1.
    """

    def __init__(self, config: ModelConfig, batch_size: int = 1, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        max_len = config.block_size if max_len is None else max_len
        if not 0 < max_len <= config.block_size:
            raise ZaizaiError(f"a KV cache holds 1 to block_size ({config.block_size}) tokens, not {max_len}")
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # tokens cached so far (the position the next token gets)

    def reset(self) -> None:
        self.pos = 0

    @property
    def full(self) -> bool:
        """No room for another token: generation has to start a new window."""
        return self.pos >= self.max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (B, nkv, T, hs) after the cached ones; return all so far, (B, nkv, pos + T, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ZaizaiError(f"the KV cache holds {self.max_len} tokens; {end} do not fit (start a new cache)")
        keys, values = self.k[layer], self.v[layer]  # (B, nkv, max_len, hs) views
        keys.narrow(2, self.pos, k.size(2)).copy_(k)
        values.narrow(2, self.pos, v.size(2)).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)


class Attention(nn.Module):
    """Causal self-attention with QK-norm, RoPE and optional grouped-query heads (Qwen3Attention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv = cfg.n_head, cfg.kv_heads
        self.hs = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, self.n_head * self.hs, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hs, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hs, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hs, cfg.n_embd, bias=False)
        if cfg.qk_norm:  # over each head's hs dimensions, as Qwen3 (Llama has none)
            self.q_norm = RMSNorm(self.hs, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hs, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: ModernKVCache | None = None, layer: int = 0, attn_weights: list | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); cos, sin: the rotations of these T positions (see :func:`apply_rope`);
        ``attn_mask`` (B, 1, T, T) bool for packed segments; ``cache`` and ``attn_weights`` as in gpt."""
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.hs)), cos, sin)  # (B, T, nh, hs)
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.hs)), cos, sin)  # (B, T, nkv, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs)  # (B, T, nkv, hs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hs)
        start = 0
        if cache is not None:  # generation: the keys and values of earlier tokens come from the cache
            start = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nkv, start + T, hs)
        if self.n_kv != self.n_head:  # query head h uses key/value head h // (nh / nkv), as Hugging Face's repeat_kv
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        if attn_weights is not None:  # the textbook form, which has the weights to show
            if attn_mask is None:
                attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y, weights = attention_with_weights(q, k, v, attn_mask)  # (B, nh, T, hs), (B, nh, T, start + T)
            attn_weights.append(weights)
        elif start == 0:  # training, evaluation, or the first tokens of a generation
            y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, attn_mask=attn_mask)
        elif T == 1:  # one new token after the cached ones: it sees them all
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
        else:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hs))  # (B, T, C)
        return F.dropout(y, self.dropout) if self.training and self.dropout else y


def swiglu_hidden(cfg: ModelConfig) -> int:
    """The MLP's inner width: ``ffn_hidden``, or 8/3 of n_embd rounded up to a multiple of 64 (the parameters of
    GPT-2's 4x GELU MLP, spread over three matrices)."""
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    hidden = math.ceil(8 * cfg.n_embd / 3)
    return math.ceil(hidden / 64) * 64 if cfg.n_embd >= 48 else hidden


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Qwen3MLP)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = swiglu_hidden(cfg)
        self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=False)
        self.p = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)
        return F.dropout(y, self.p) if self.training and self.p else y


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x)) (Qwen3DecoderLayer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, layer=0, attn_weights=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, layer, attn_weights)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, C)


class ModernLM(nn.Module):
    supports_segments = True  # forward() can keep packed sequences apart

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            layers=nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer)),
            norm=RMSNorm(cfg.n_embd, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs): derived, not saved
        self.register_buffer("rope_sin", sin, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for layer in self.model.layers:  # each residual branch starts as zero: every block is the identity
            nn.init.zeros_(layer.self_attn.o_proj.weight)
            nn.init.zeros_(layer.mlp.down_proj.weight)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, a tied lm_head counted once (there is no position table to leave out)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int = 1, device: torch.device | str = "cpu") -> ModernKVCache:
        """An empty KV cache for generation, in the dtype of the weights."""
        return ModernKVCache(self.config, batch_size=batch_size, device=device, dtype=self.lm_head.weight.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                cache: ModernKVCache | None = None, attn_weights: list | None = None, last_only: bool = False):
        """idx (B, T) -> (logits (B, T, V), loss or None); ``last_only``: the last position's logits (B, 1, V)."""
        x = self.hidden_states(idx, segments=segments, cache=cache, attn_weights=attn_weights)  # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None
        B, T = idx.shape
        logits, loss = linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T))
        return logits.view(B, T, -1), loss

    def hidden_states(self, idx: torch.Tensor, segments: torch.Tensor | None = None,
                      cache: ModernKVCache | None = None, attn_weights: list | None = None) -> torch.Tensor:
        """The final normalised features (B, T, C); ``segments``, ``cache``, ``attn_weights`` as in gpt."""
        start = check_input(idx, segments, cache, self.config.block_size)
        T = idx.size(1)
        attn_mask = None
        if segments is not None:
            pos, attn_mask = segment_layout(segments)  # (B, T) positions restarting per segment, (B, 1, T, T)
            cos, sin = self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2)  # (B, T, 1, hs)
        else:
            cos = self.rope_cos[start:start + T].unsqueeze(1)  # (T, 1, hs)
            sin = self.rope_sin[start:start + T].unsqueeze(1)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout)
        for layer, block in enumerate(self.model.layers):
            x = block(x, cos, sin, attn_mask, cache, layer, attn_weights)  # (B, T, C)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)  # (B, T, C)
