"""GPT-2: a decoder-only transformer, readable top to bottom.

Module and parameter names follow GPT-2 (and nanoGPT) so that a checkpoint maps one-to-one onto Hugging
Face's ``GPT2LMHeadModel``: ``transformer.wte``, ``transformer.wpe``, ``transformer.h.{i}.ln_1``,
``.attn.c_attn``, ``.attn.c_proj``, ``.ln_2``, ``.mlp.c_fc``, ``.mlp.c_proj``, ``transformer.ln_f``,
``lm_head``. Hugging Face stores the four ``c_*`` weights as Conv1D, i.e. transposed relative to our
``nn.Linear`` weights.

Shapes: B batch, T time (tokens), C channels (n_embd), V vocab_size, nh heads, hs head size (C // nh).

Two computations come from ``ops.py``, where each is written for speed on CPU and tested equal to its
textbook form: ``causal_attention`` (scaled dot-product attention with a causal mask) and
``linear_cross_entropy`` (the output layer and its loss in one step).

Three extras over nanoGPT, each optional and off by default:

- ``segments``: several conversations packed into one row for dialogue training. Positions restart at 0
  where a segment starts and attention stays inside the segment (block-diagonal and causal).
- ``cache``: a :class:`KVCache` for generation (``model.new_cache()``). The keys and values of tokens already
  seen are kept, so each new token costs one position's worth of work instead of a pass over the whole context.
- ``attn_weights``: a list that each layer appends its attention weights to, for pictures of what the model
  attends to (the weights this forward pass used, not a recomputation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common.errors import ZaizaiError
from .config import ModelConfig
from .ops import attention_with_weights, causal_attention, linear_cross_entropy


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, in buffers allocated once.

    ``k`` and ``v`` are (n_layer, B, nh, max_len, hs); positions ``[0, pos)`` hold data. Each forward pass
    with the cache writes its T new positions in place (no ``torch.cat``, no reallocation) and then moves
    ``pos`` on by T. ``max_len`` is at most block_size: the position table ends there.
    """

    def __init__(self, config: ModelConfig, batch_size: int = 1, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        max_len = config.block_size if max_len is None else max_len
        if not 0 < max_len <= config.block_size:
            raise ZaizaiError(f"a KV cache holds 1 to block_size ({config.block_size}) tokens, not {max_len}")
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # each layer's (B, nh, max_len, hs) views
        self.max_len = max_len
        self.pos = 0  # tokens cached so far (the position the next token gets)

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """An empty cache on existing buffers (n_layer, B, nh, max_len, hs), e.g. one row of a decoder's rows
        (see :mod:`zaizai.models.decode`): a forward pass with it writes straight into them."""
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        cache.layers = list(zip(k.unbind(0), v.unbind(0)))
        cache.max_len, cache.pos = k.size(3), 0
        return cache

    def reset(self) -> None:
        self.pos = 0

    @property
    def full(self) -> bool:
        """No room for another token: generation has to start a new window."""
        return self.pos >= self.max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (B, nh, T, hs) after the cached ones; return all keys and values so far,
        (B, nh, pos + T, hs) each, as views of the buffers."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ZaizaiError(f"the KV cache holds {self.max_len} tokens; {end} do not fit (start a new cache)")
        keys, values = self.layers[layer]
        keys.narrow(2, self.pos, k.size(2)).copy_(k)
        values.narrow(2, self.pos, v.size(2)).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)



def check_input(idx: torch.Tensor, segments: torch.Tensor | None, cache, block_size: int) -> int:
    """Refuse a forward's inputs that cannot work, in one line each; return the position the tokens start at
    (``cache.pos``, or 0 without a cache). Shared by every attention model."""
    if idx.dim() != 2:
        raise ZaizaiError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
    start = 0 if cache is None else cache.pos
    if start + idx.size(1) > block_size:
        raise ZaizaiError(f"input has {start + idx.size(1)} tokens but block_size is {block_size}; crop the input")
    if segments is not None:
        if cache is not None:
            raise ZaizaiError("segments and a cache cannot be combined; generate one sequence at a time")
        if segments.shape != idx.shape:
            raise ZaizaiError(f"segments must have idx's shape {tuple(idx.shape)}, got {tuple(segments.shape)}")
    return start

def segment_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention mask for rows that pack several sequences: ``segments`` (B, T) int64.

    A new segment starts wherever the value changes from the previous position, so values need not be
    unique within a row (two runs of the same value are two segments). Returns ``pos`` (B, T): the
    position within the segment, restarting at 0; and ``mask`` (B, 1, T, T) bool, True where query t may
    attend to key s: s <= t in the same segment. Every row of the mask allows at least its diagonal, so
    padding (segment -1) attends to itself and no row is fully masked (which would give NaN).
    """
    T = segments.size(1)
    t = torch.arange(T, device=segments.device)  # (T,)
    starts = torch.ones_like(segments, dtype=torch.bool)  # (B, T): a segment starts here
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    run = starts.cumsum(dim=1)  # (B, T): which segment of the row each position is in
    first = torch.where(starts, t, 0).cummax(dim=1).values  # (B, T): where the current segment started
    pos = t - first  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    mask = (run.unsqueeze(2) == run.unsqueeze(1)) & causal  # (B, T, T)
    return pos, mask.unsqueeze(1)  # (B, T), (B, 1, T, T)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with a KV cache, new queries also see the cached keys and values."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0, attn_weights: list | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). ``attn_mask`` (B, 1, T, T) bool replaces the plain causal mask (packed
        segments); ``cache`` adds the cached positions in front of this call's T (layer: its slot);
        ``attn_weights``: append this layer's weights (B, nh, T, start + T) to it."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.transpose(1, 3).unbind(2)  # 3 x (B, nh, T, hs)
        start = 0
        if cache is not None:  # generation: keys and values of the tokens before these T come from the cache
            start = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nh, start + T, hs)
        if attn_weights is not None:  # the textbook form, which has the weights to show
            if attn_mask is None:  # query i sits at position start + i and sees keys 0 .. start + i
                attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y, weights = attention_with_weights(q, k, v, attn_mask)  # (B, nh, T, hs), (B, nh, T, start + T)
            attn_weights.append(weights)
        elif start == 0:  # training, evaluation, or the first tokens of a generation
            dropout_p = self.dropout if self.training else 0.0
            y = causal_attention(q, k, v, dropout_p=dropout_p, attn_mask=attn_mask)  # (B, nh, T, hs)
        elif T == 1:  # one new token after the cached ones: it sees them all, no mask needed
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
        else:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C): heads side by side again
        # (dropout only where it does something: a module call per layer is a cost when generating token by token)
        return self.resid_dropout(y) if self.training and self.dropout else y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.p = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, 4C) -> (B, T, C)
        return self.dropout(x) if self.training and self.p else x


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0, attn_weights: list | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer, attn_weights)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    supports_segments = True  # forward() can keep packed sequences apart

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: the output projection is the token embedding (one tensor, two uses).
        self.lm_head.weight = self.transformer.wte.weight

        self.apply(self._init_weights)
        # GPT-2: each residual branch ends in a c_proj; scale those so the residual stream's variance
        # does not grow with depth (2 branches per layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, the tied lm_head counted once; ``non_embedding`` leaves out the position table.

        The token table stays in, as nanoGPT counts it, because it is also the output layer's weight.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def new_cache(self, batch_size: int = 1, device: torch.device | str = "cpu") -> KVCache:
        """An empty KV cache for generation, in the dtype of the weights."""
        return KVCache(self.config, batch_size=batch_size, device=device, dtype=self.lm_head.weight.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                cache: KVCache | None = None, attn_weights: list | None = None, last_only: bool = False):
        """idx (B, T) -> (logits (B, T, V), loss or None); ``last_only``: logits of the last position only,
        (B, 1, V), which is all generation needs. See :meth:`hidden_states` for the other options."""
        x = self.hidden_states(idx, segments=segments, cache=cache, attn_weights=attn_weights)  # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None  # (B, T, V) or (B, 1, V)
        B, T = idx.shape
        logits, loss = linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T))
        return logits.view(B, T, -1), loss  # (B, T, V), scalar

    def hidden_states(self, idx: torch.Tensor, segments: torch.Tensor | None = None, cache: KVCache | None = None,
                      attn_weights: list | None = None) -> torch.Tensor:
        """The final normalised features (B, T, C) that the output layer turns into logits.

        ``segments`` (B, T) int64: packed sequences (see :func:`segment_layout`); attention then goes
        through SDPA with a boolean mask, otherwise through the plain causal path, which is faster.
        ``cache``: continue after the ``cache.pos`` tokens already cached (positions go on from there) and
        cache these T; used by generation, not with ``segments``. ``attn_weights``: a list that gets each
        layer's attention weights (B, nh, T, cache.pos + T), in layer order.
        """
        start = check_input(idx, segments, cache, self.config.block_size)
        T = idx.size(1)
        attn_mask = None
        if segments is not None:
            pos, attn_mask = segment_layout(segments)  # (B, T), (B, 1, T, T)
        else:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), or (B, T, C) with segments
        x = tok_emb + pos_emb  # (B, T, C)
        if self.training and self.config.dropout:
            x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, cache, layer, attn_weights)  # (B, T, C)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)  # (B, T, C)
