"""Decoding: one new token for each of many sequences per step, the step a generation server runs.

A decoder holds *rows*, one sequence's cache each, and rows ``0 .. n-1`` are the ones in use: the caller
keeps them packed (:meth:`move` fills the gap a finished sequence leaves). Sequences join and leave between
steps, and each has its own length:

- :meth:`prefill` starts a row over from a list of ids through the model's own forward pass (all positions
  in one matrix multiply) and gives the logits of the token after them;
- :meth:`step` takes one new token for each row in use and gives each row's next-token logits, (n, V).

``decoder_for(model)`` picks the decoder of a model: :class:`GPTDecoder` (a KV cache for every row, written in
place), :class:`RNNDecoder` (a hidden state per row), :class:`StatelessDecoder` (bigram: the last token only)
or, for any other model, :class:`CacheDecoder` (the model's own cache and forward pass, one row at a time).

Why GPT's step is not the model's forward: one query against the cache is a matrix-vector product, and at
batch 1 the step's time is the weights' read from memory plus the cost of every operation launched. The
forward pass of the model is written for training (module calls, SDPA's flash kernel, which splits one query
into blocks); here the same arithmetic runs as plain tensor operations on weights gathered once, attention as
two batched matrix products over ``cache[:, :, :L]``, and a mask only when the rows' lengths differ. The logits
equal the forward pass's to float rounding (tests/test_batch_decode.py).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from ..common.errors import ZaizaiError
from .gpt import GPT, KVCache
from .rnn import RNNLM, RNNState


def decoder_for(model, rows: int = 1, device: torch.device | str | None = None):
    """The decoder of ``model`` (gpt, rnn or bigram) with room for ``rows`` sequences (it grows when asked for more)."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    if isinstance(model, GPT):
        return GPTDecoder(model, rows, device)
    if isinstance(model, RNNLM):
        return RNNDecoder(model, rows, device)
    if model.new_cache(1, device) is None:
        return StatelessDecoder(model, rows, device)
    return CacheDecoder(model, rows, device)


class Decoder:
    """What every decoder has: rows in use, their lengths, and a window (the most tokens a row holds; None: no limit)."""

    window: int | None = None

    def __init__(self, model, rows: int, device: torch.device):
        self.model = model
        self.device = device
        self.vocab_size = model.config.vocab_size
        self.capacity = 0
        self.lengths: list[int] = []  # tokens in each row's cache
        self._grow(max(1, rows))

    def _grow(self, rows: int) -> None:
        self.lengths += [0] * (rows - self.capacity)
        self.capacity = rows

    def _room(self, row: int) -> None:
        if row >= self.capacity:
            self._grow(max(row + 1, 2 * self.capacity))

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)

    def full(self, row: int) -> bool:
        """The row has no room for another token: its sequence has to start a new window."""
        return self.window is not None and self.lengths[row] >= self.window

    def release(self, row: int) -> None:
        """The row's sequence has left."""
        self.lengths[row] = 0


class GPTDecoder(Decoder):
    """Rows of KV caches in one buffer, ``kv`` (n_layer, 2, rows, nh, block_size, hs): keys then values,
    written in place (both with one copy per layer)."""

    def __init__(self, model: GPT, rows: int, device: torch.device):
        cfg = model.config
        self.n_head, self.head_size, self.n_embd = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd
        self.window = cfg.block_size
        self.scale = 1.0 / math.sqrt(self.head_size)
        self.dtype = model.lm_head.weight.dtype
        t = model.transformer
        self.eps = t.ln_f.eps
        self.wte, self.wpe, self.ln_f = t.wte.weight, t.wpe.weight, (t.ln_f.weight, t.ln_f.bias)
        self.lm_head_t = _transposed(model.lm_head)  # (C, V) contiguous: see _transposed
        self.layers = [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight.t(), b.attn.c_attn.bias,
                        b.attn.c_proj.weight.t(), b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                        b.mlp.c_fc.weight.t(), b.mlp.c_fc.bias, b.mlp.c_proj.weight.t(), b.mlp.c_proj.bias)
                       for b in t.h]
        self.kv = None
        self.dirty: list[int] = []  # positions [0, dirty) of a row may hold an earlier sequence's keys
        super().__init__(model, rows, device)
        self.arange = torch.arange(self.window, device=device)  # (block_size,)

    def _grow(self, rows: int) -> None:
        cfg = self.model.config
        kv = torch.zeros(cfg.n_layer, 2, rows, self.n_head, self.window, self.head_size, device=self.device,
                         dtype=self.dtype)
        if self.kv is not None:
            kv[:, :, :self.capacity].copy_(self.kv)
        self.kv = kv
        self.k, self.v = kv[:, 0], kv[:, 1]  # (n_layer, rows, nh, block_size, hs) each
        # where a head's new key (then value) goes in a layer's buffer seen as (2 * rows * nh * block_size, hs)
        heads = torch.arange(self.n_head, device=self.device) * self.window  # (nh,)
        self.kv_offsets = torch.cat([heads, heads + rows * self.n_head * self.window])  # (2 nh,)
        self.row_starts = torch.arange(rows, device=self.device) * (self.n_head * self.window)  # (rows,)
        self.dirty += [0] * (rows - self.capacity)
        self.positions = torch.zeros(rows, dtype=torch.long, device=self.device)  # (rows,) = lengths, on device
        self.positions[:self.capacity] = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        super()._grow(rows)

    def _clean(self, row: int, start: int) -> None:
        """Zero what an earlier sequence left at positions >= start of ``row``: a masked position's weight
        is 0, but 0 * nan is nan, so a broken sequence's keys must not stay where another row's mask hides them."""
        end = max(self.dirty[row], self.lengths[row])
        if end > start:
            self.kv[:, :, row, :, start:end].zero_()
        self.dirty[row] = start

    def _set_length(self, row: int, n: int) -> None:
        self.lengths[row] = n
        self.positions[row] = n

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor | None:
        """Start ``row`` over from ``ids`` (at most block_size) through the model's forward pass; the logits
        (V,) of the next token (None for no ids: an empty row)."""
        if len(ids) > self.window:
            raise ZaizaiError(f"a row holds {self.window} tokens (block_size), not {len(ids)}; crop the prompt")
        self._room(row)
        self._clean(row, len(ids))
        self._set_length(row, 0)
        if not ids:
            return None
        cache = KVCache.over(self.k[:, row:row + 1], self.v[:, row:row + 1])
        logits, _ = self.model(self._ids(ids), cache=cache, last_only=True)  # (1, 1, V)
        self._set_length(row, len(ids))
        return logits[0, -1]

    def move(self, src: int, dst: int) -> None:
        """Move row ``src``'s sequence into row ``dst`` (whose sequence has left); ``src`` is then free."""
        n = self.lengths[src]
        self._clean(dst, n)
        self.kv[:, :, dst, :, :n].copy_(self.kv[:, :, src, :, :n])
        self._set_length(dst, n)
        self.dirty[dst] = n
        self.release(src)

    def release(self, row: int) -> None:
        self.dirty[row] = max(self.dirty[row], self.lengths[row])
        self._set_length(row, 0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (n,) int64, one for each row 0 .. n-1 -> the next-token logits (n, V) of each row."""
        n = tokens.size(0)
        lengths = self.lengths[:n]
        longest = max(lengths)
        if longest >= self.window:
            raise ZaizaiError(f"row {lengths.index(longest)} is full ({self.window} tokens); start it over")
        nh, hs, C, L = self.n_head, self.head_size, self.n_embd, longest + 1
        pos = self.positions[:n]  # (n,) where each row's new token goes
        x = F.embedding(tokens, self.wte) + F.embedding(pos, self.wpe)  # (n, C)
        # each new key's and value's place in a layer's buffer, in the order of (n, 2, nh): row, k|v, head
        slots = ((self.row_starts[:n] + pos).unsqueeze(1) + self.kv_offsets).view(-1)  # (n*2*nh,)
        hide = None  # (n, 1, L) True where a row has no key yet (rows of different lengths)
        if min(lengths) < longest:
            hide = (self.arange[:L] > pos.unsqueeze(1)).unsqueeze(1)
        for (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b), kv in zip(
                self.layers, self.kv):
            h = F.layer_norm(x, (C,), ln1_w, ln1_b, self.eps)  # (n, C)
            qkv = _affine(h, attn_w, attn_b)  # (n, 3C)
            kv.view(-1, hs).index_copy_(0, slots, qkv[:, C:].reshape(n * 2 * nh, hs))  # in place: no new cache
            keys, values = kv  # (rows, nh, block_size, hs) each
            keys_so_far = keys[:n, :, :L].reshape(n * nh, L, hs)  # a view: rows and heads side by side
            q = (qkv[:, :C] * self.scale).view(n * nh, 1, hs)
            att = torch.bmm(q, keys_so_far.transpose(1, 2))  # (n*nh, 1, L)
            if hide is not None:
                att.view(n, nh, L).masked_fill_(hide, float("-inf"))
            att = torch.softmax(att, dim=-1)
            y = torch.bmm(att, values[:n, :, :L].reshape(n * nh, L, hs)).view(n, C)  # (n, C) heads side by side
            x = x + _affine(y, proj_w, proj_b)
            h = F.layer_norm(x, (C,), ln2_w, ln2_b, self.eps)
            x = x + _affine(F.gelu(_affine(h, fc_w, fc_b), approximate="tanh"), out_w, out_b)
        x = F.layer_norm(x, (C,), self.ln_f[0], self.ln_f[1], self.eps)
        self.positions[:n] += 1
        for i in range(n):
            self.lengths[i] += 1
        return torch.mm(x, self.lm_head_t)  # (n, V)


_TRANSPOSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (its weight's version, copy)


def _transposed(layer: torch.nn.Linear) -> torch.Tensor:
    """A linear layer's weight (V, C) as a contiguous (C, V) copy, made once (again after the weight changes).

    The output layer is the largest matrix of a small model (9.7k x 384 at 6L/384d: 15 MB) and one row
    against it is most of a decode step. Stored as (C, V), the product runs 2-4x faster on CPU (MKL, 1 row:
    0.4 vs 1.7 ms at 9.7k x 384, AMD EPYC Zen 4) than through the (V, C) weight ``nn.Linear`` keeps.
    """
    weight = layer.weight
    if weight.is_inference():  # no version counter to tell a change: copy every time
        return weight.t().contiguous()
    version = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
    held = _TRANSPOSED.get(layer)
    if held is None or held[0] != version:
        held = (version, weight.detach().t().contiguous())
        _TRANSPOSED[layer] = held
    return held[1]


def _affine(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight_t + bias, what ``nn.Linear`` computes, given the transposed weight (C_in, C_out)."""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


class RNNDecoder(Decoder):
    """Rows of GRU hidden states, (n_layer, rows, C); no window: a state summarises any length."""

    def __init__(self, model: RNNLM, rows: int, device: torch.device):
        self.hidden = None
        super().__init__(model, rows, device)

    def _grow(self, rows: int) -> None:
        cfg = self.model.config
        hidden = torch.zeros(cfg.n_layer, rows, cfg.n_embd, device=self.device, dtype=self.model.wte.weight.dtype)
        if self.hidden is not None:
            hidden[:, :self.capacity] = self.hidden
        self.hidden = hidden
        super()._grow(rows)

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor | None:
        self._room(row)
        self.hidden[:, row] = 0
        self.lengths[row] = len(ids)
        if not ids:
            return None
        state = RNNState()
        logits, _ = self.model(self._ids(ids), cache=state, last_only=True)  # (1, 1, V)
        self.hidden[:, row] = state.hidden[:, 0]
        return logits[0, -1]

    def move(self, src: int, dst: int) -> None:
        self.hidden[:, dst] = self.hidden[:, src]
        self.lengths[dst] = self.lengths[src]
        self.release(src)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.size(0)
        state = RNNState()
        state.hidden = self.hidden[:, :n].contiguous()  # (n_layer, n, C)
        logits, _ = self.model(tokens.view(n, 1), cache=state, last_only=True)  # (n, 1, V)
        self.hidden[:, :n] = state.hidden
        for i in range(n):
            self.lengths[i] += 1
        return logits[:, 0]


class StatelessDecoder(Decoder):
    """A model that needs no cache (bigram): the next token depends on the last one only."""

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor | None:
        self._room(row)
        self.lengths[row] = len(ids)
        if not ids:
            return None
        logits, _ = self.model(self._ids(ids[-1:]), last_only=True)  # (1, 1, V)
        return logits[0, -1]

    def move(self, src: int, dst: int) -> None:
        self.lengths[dst] = self.lengths[src]
        self.release(src)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.size(0)
        logits, _ = self.model(tokens.view(n, 1), last_only=True)  # (n, 1, V)
        for i in range(n):
            self.lengths[i] += 1
        return logits[:, 0]


class CacheDecoder(Decoder):
    """Any model with a cache (``model.new_cache``): one cache per row, each step the model's own forward pass
    row by row. Correct for every model, batched for none: a model gets its own decoder to share the step."""

    def __init__(self, model, rows: int, device: torch.device):
        self.caches: list = []
        super().__init__(model, rows, device)
        self.window = getattr(self.caches[0], "max_len", None)  # a KV cache's length; None for a recurrent state

    def _grow(self, rows: int) -> None:
        self.caches += [self.model.new_cache(1, self.device) for _ in range(rows - self.capacity)]
        super()._grow(rows)

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor | None:
        if self.window is not None and len(ids) > self.window:
            raise ZaizaiError(f"a row holds {self.window} tokens (block_size), not {len(ids)}; crop the prompt")
        self._room(row)
        self.caches[row].reset()
        self.lengths[row] = len(ids)
        if not ids:
            return None
        logits, _ = self.model(self._ids(ids), cache=self.caches[row], last_only=True)  # (1, 1, V)
        return logits[0, -1]

    def move(self, src: int, dst: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], self.caches[dst]  # no copy: the rows trade caches
        self.lengths[dst] = self.lengths[src]
        self.release(src)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.size(0)
        logits = [self.model(tokens[i].view(1, 1), cache=self.caches[i], last_only=True)[0][0, -1] for i in range(n)]
        for i in range(n):
            self.lengths[i] += 1
        return torch.stack(logits)  # (n, V)
