"""Decoding: one new token for each of many sequences per step, the step a generation server runs.

A decoder holds *rows*, one sequence's cache each, and rows ``0 .. n-1`` are the ones in use: the caller
keeps them packed (:meth:`move` fills the gap a finished sequence leaves). Sequences join and leave between
steps, and each has its own length:

- :meth:`prefill` starts a row over from a list of ids (all positions in one pass, causal attention among
  them) and gives the logits of the token after them; :meth:`prefill_many` starts several rows, all their
  prompts' tokens through the layers together (gpt, modern: in passes of at most ``PREFILL_TOKENS`` tokens;
  attention still within each prompt);
- :meth:`step` takes one new token for each row in use and gives each row's next-token logits, (n, V).

``decoder_for(model)`` picks the decoder of a model: :class:`GPTDecoder` and :class:`ModernDecoder` (a KV
cache for every row, written in place; :class:`KVDecoder` is what they share), :class:`RNNDecoder` (a hidden
state per row), :class:`StatelessDecoder` (bigram: the last token only) or, for any other model,
:class:`CacheDecoder` (the model's own cache and forward pass, one row at a time).

Why gpt's and modern's decoders do not call the model's forward: one query against the cache is a
matrix-vector product, and at batch 1 the step's time is the weights' read from memory plus the cost of every
operation launched. The forward pass of the model is written for training (module calls, SDPA's flash kernel,
which splits one query into blocks); here the same arithmetic runs as plain tensor operations on weights laid
out once for small products (:class:`~zaizai.models.dense.Dense`: oneDNN's packed layout on CPU), attention as
two batched matrix products over ``cache[:, :, :L]`` (grouped-query heads read their shared keys in place, no
copy), and a mask only when the rows' lengths differ. A prefill runs the same layers (``_run``) over all of a
prompt's positions, with SDPA's causal attention, so that it too gets the packed weights (6L/384d, 200-token
prompt: first token in ~38 ms, 55 ms through the forward pass); prompts prefilled together share those products
(32 chat prompts of 10-30 tokens: ~3x faster than one at a time). The logits equal the forward pass's to float
rounding (tests/test_batch_decode.py, tests/test_modern.py). With ``compile``, a lone sequence steps through a
compiled step instead (:mod:`zaizai.models.compiled`; CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..common.errors import ZaizaiError
from .compiled import CompiledStep, as_cached, flat_weights, gpt_step, modern_step, weights_dtype
from .decode_rows import CacheDecoder, Decoder, RNNDecoder, StatelessDecoder
from .dense import _dense1, dense
from .gpt import GPT
from .modern import ModernLM
from .rnn import RNNLM


def decoder_for(model, rows: int = 1, device: torch.device | str | None = None, compile: bool = False):
    """The decoder of ``model`` (gpt, modern, rnn or bigram) with room for ``rows`` sequences (it grows when
    asked for more). ``compile``: gpt and modern on CPU step a lone sequence with a compiled step
    (:mod:`zaizai.models.compiled`); other models and devices ignore it."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    compile = compile and device.type == "cpu"
    if isinstance(model, GPT):
        return GPTDecoder(model, rows, device, compile)
    if isinstance(model, ModernLM):  # with QK-norm (Qwen3) or without (Llama)
        return ModernDecoder(model, rows, device, compile)
    if isinstance(model, RNNLM):
        return RNNDecoder(model, rows, device)
    if model.new_cache(1, device) is None:
        return StatelessDecoder(model, rows, device)
    return CacheDecoder(model, rows, device)


class KVDecoder(Decoder):
    """Rows of KV caches in one buffer, ``kv`` (n_layer, 2, rows, heads, block_size, hs): keys then values,
    written in place (both with one copy per layer); ``heads`` are the key/value heads (fewer than the query
    heads with grouped-query attention). A subclass gathers its model's weights and writes :meth:`step`."""

    # The most tokens one prefill pass takes: prompts prefilled together go through the layers in passes of at
    # most this many tokens (a prompt longer than that, up to block_size, in a pass of its own). A pass holds
    # every token's activations at once, the MLP's hidden layer the largest (GPT: (N, 4C)): 32 prompts of 1024
    # tokens at 768 wide would be 32768 x 3072 floats (400 MB) in one pass, 50 MB in passes of 4096. The
    # products are as fast per token: a matrix product's speed levels off at a few hundred rows (6L/384d, 32
    # prompts of 128 tokens, one thread: ~1.15 s in one pass and in passes of 4096 or 512 tokens alike), and
    # the logits are the same to float rounding (tests/test_decode_prefill.py).
    PREFILL_TOKENS = 4096

    compiled: CompiledStep | None = None  # a lone sequence's step, compiled (set by a subclass for --compile)

    def __init__(self, model, rows: int, device: torch.device, heads: int, head_size: int, dtype: torch.dtype):
        self.heads, self.head_size = heads, head_size
        self.window = model.config.block_size
        self.scale = 1.0 / math.sqrt(head_size)
        self.dtype = dtype
        self.kv_dtype = weights_dtype(model)  # keys and values rounded to it (16-bit weights, as llama.cpp's F16)
        self.kv = None
        self.dirty: list[int] = []  # positions [0, dirty) of a row may hold an earlier sequence's keys
        self.stale = False  # whether positions[0] is behind lengths[0] (compiled steps do not write it)
        super().__init__(model, rows, device)
        self.arange = torch.arange(self.window, device=device)  # (block_size,)

    def _grow(self, rows: int) -> None:
        heads, window = self.heads, self.window
        kv = torch.zeros(self.model.config.n_layer, 2, rows, heads, window, self.head_size, device=self.device,
                         dtype=self.dtype)
        if self.kv is not None:
            kv[:, :, :self.capacity].copy_(self.kv)
        self.kv, self.k, self.v = kv, kv[:, 0], kv[:, 1]  # k, v: (n_layer, rows, heads, block_size, hs) each
        self.row0 = list(zip(self.k[:, 0], self.v[:, 0]))  # each layer's row-0 (keys, values), (heads, block_size, hs)
        # where a head's new key (then value) goes in a layer's buffer seen as (2 * rows * heads * block_size, hs)
        offsets = torch.arange(heads, device=self.device) * window  # (heads,)
        self.kv_offsets = torch.cat([offsets, offsets + rows * heads * window])  # (2 heads,)
        self.row_starts = torch.arange(rows, device=self.device) * (heads * window)  # (rows,)
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
        if row == 0 and self.compiled is not None:
            self.compiled.forget()  # a new sequence, or one moved here, or none
        self.positions[row] = n

    def _run(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, attend) -> torch.Tensor:
        """The layers over N tokens, tokens (N,) at positions pos (N,): each token's keys and values go to
        ``slots`` (N * 2 * heads,) of a layer's buffer; ``attend(q, kv)`` turns the scaled queries (N, nh, hs)
        into the attention's output (N, nh * hs). -> the final norm's output (N, C). What a subclass writes."""
        raise NotImplementedError

    def _slots(self, starts: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Where the keys, then values, of tokens at ``pos`` (N,) in rows starting at ``starts`` (N,) go in a
        layer's buffer seen as (2 * rows * heads * block_size, hs): (N * 2 * heads,), token by token."""
        return ((starts + pos).unsqueeze(1) + self.kv_offsets).view(-1)

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor | None:
        """Start ``row`` over from ``ids`` (at most block_size), all positions in one pass (causal attention
        among them); the logits (V,) of the next token (None for no ids: an empty row)."""
        return self.prefill_many([row], [ids])[0]

    def prefill_many(self, rows: list[int], prompts: list[list[int]]) -> list[torch.Tensor | None]:
        """:meth:`prefill` of each of ``rows`` (distinct) from its prompt, the prompts' tokens through the layers
        together (each product gets every token of a pass at once; passes of at most :attr:`PREFILL_TOKENS`
        tokens), attention causal within each prompt only."""
        if len(set(rows)) != len(rows) or len(rows) != len(prompts):
            raise ZaizaiError(f"prefill_many needs one prompt for each of distinct rows, got rows {rows}")
        for ids in prompts:
            if len(ids) > self.window:
                raise ZaizaiError(f"a row holds {self.window} tokens (block_size), not {len(ids)}; crop the prompt")
        if rows:
            self._room(max(rows))
        for row, ids in zip(rows, prompts):
            self._clean(row, len(ids))
            self._set_length(row, 0)
        logits: dict[int, torch.Tensor] = {}  # row -> its next-token logits
        group: list[tuple[int, list[int]]] = []  # (row, ids) of the prompts in the next pass, size tokens
        size = 0
        for row, ids in zip(rows, prompts):
            if not ids:
                continue
            if group and size + len(ids) > self.PREFILL_TOKENS:
                logits.update(self._prefill_pass(group))
                group, size = [], 0
            group.append((row, ids))
            size += len(ids)
        if group:
            logits.update(self._prefill_pass(group))
        return [logits.get(row) for row in rows]

    def _prefill_pass(self, group: list[tuple[int, list[int]]]) -> dict[int, torch.Tensor]:
        """One pass through the layers of the prompts ``(row, ids)`` (ids not empty) side by side: each row's
        cache holds its prompt; -> each row's next-token logits (V,)."""
        parts = [(row, len(ids)) for row, ids in group]  # (row, T) of each prompt
        sizes = torch.tensor([T for _, T in parts], device=self.device)
        pos = torch.cat([self.arange[:T] for _, T in parts])  # (N,): each token's own position
        starts = self.row_starts[[row for row, _ in parts]].repeat_interleave(sizes)  # (N,): its row's
        tokens = torch.tensor([t for _, ids in group for t in ids], dtype=torch.long, device=self.device)
        x = self._run(tokens, pos, self._slots(starts, pos), self._prompts_attention(parts))
        logits = self.lm_head(x[sizes.cumsum(0) - 1])  # (P, V): after each prompt's last token
        for row, T in parts:
            self._set_length(row, T)
        return {row: row_logits for (row, _), row_logits in zip(parts, logits)}

    def _prompts_attention(self, parts: list[tuple[int, int]]):
        """``attend`` for a prefill of prompts side by side, (row, T) each: causal attention of each prompt's
        queries against its own row's first T keys (SDPA, one call per prompt)."""

        def attend(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:  # q (N, nh, hs) -> (N, nh * hs)
            out, start = [], 0
            for row, T in parts:
                keys, values = kv[:, row, :, :T].unsqueeze(1)  # (1, heads, T, hs) each
                y = F.scaled_dot_product_attention(q[start:start + T].transpose(0, 1).unsqueeze(0), keys, values,
                                                   is_causal=True, scale=1.0, enable_gqa=self.heads != q.size(1))
                out.append(y[0].transpose(0, 1).reshape(T, -1))  # (T, nh * hs)
                start += T
            return out[0] if len(out) == 1 else torch.cat(out)

        return attend

    def step(self, tokens: torch.Tensor | list[int]) -> torch.Tensor:
        """tokens (n,) int64 (or a list of n ids), one for each row 0 .. n-1 -> the next-token logits (n, V) of
        each row."""
        n = len(tokens)
        self.choice = None
        if n == 1 and self.compiled is not None and self.compiled.takes(self.lengths[0]):
            logits = self._step_compiled(int(tokens[0]))
            if logits is not None:
                return logits
        L, pos, slots, hide = self._begin(n)
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        x = self._run(tokens, pos, slots, lambda q, kv: self._attend(q, kv, L, hide))
        self._end(n)
        return self.lm_head(x)  # (n, V)

    def _step_compiled(self, token: int) -> torch.Tensor | None:
        """:meth:`step` of row 0 alone through the compiled step: its logits (1, V) (and :attr:`choice`), or None
        where it could not be compiled (nothing written: the eager step follows). At batch 1 of a small model
        every tensor operation counts (each ~5-15 us, run with the caches just flushed by the weights' read): here
        there is none but the step (which writes the cache), and row 0's position on the device is brought up to
        date when an eager step needs it."""
        p = self.lengths[0]
        out = self.compiled(token, p, self.row0)
        if out is None:
            return None
        logits, self.choice = out  # the token's keys and values went to row 0's position p
        self.lengths[0] = p + 1
        self.stale = True
        return logits

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

    def _begin(self, n: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """For a step of rows 0 .. n-1: L (keys each row's query reads, the new one included), pos (n,) where
        each new token goes, slots (n * 2 * heads,) where its keys and values go in a layer's buffer (in the
        order row, k|v, head), and hide (n, 1, L), True where a row has no key yet (None: same lengths)."""
        if self.stale:  # compiled steps moved row 0 on
            self.positions[0], self.stale = self.lengths[0], False
        lengths = self.lengths[:n]
        longest = max(lengths)
        if longest >= self.window:
            raise ZaizaiError(f"row {lengths.index(longest)} is full ({self.window} tokens); start it over")
        L = longest + 1
        pos = self.positions[:n]
        slots = self._slots(self.row_starts[:n], pos)
        hide = (self.arange[:L] > pos.unsqueeze(1)).unsqueeze(1) if min(lengths) < longest else None
        return L, pos, slots, hide

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, L: int, hide: torch.Tensor | None) -> torch.Tensor:
        """Single-query attention of n rows: q (n, nh, hs), already scaled, against one layer's buffer ``kv``
        (2, rows, heads, block_size, hs) up to L -> (n, nh * hs). Query head h reads key/value head
        h // (nh / heads) (Hugging Face's repeat_kv) with no copy of the keys: the queries of a group go side
        by side, (n * heads, group, hs), against their head's keys, (n * heads, L, hs), a view of the buffer."""
        n, nh, hs = q.shape
        keys, values = kv  # (rows, heads, block_size, hs) each
        att = torch.bmm(q.reshape(n * self.heads, nh // self.heads, hs),
                        keys[:n, :, :L].reshape(n * self.heads, L, hs).transpose(1, 2))  # (n*heads, group, L)
        if hide is not None:
            att.view(n, nh, L).masked_fill_(hide, float("-inf"))
        att = torch.softmax(att, dim=-1)
        return torch.bmm(att, values[:n, :, :L].reshape(n * self.heads, L, hs)).view(n, nh * hs)

    def _end(self, n: int) -> None:
        self.positions[:n] += 1
        for i in range(n):
            self.lengths[i] += 1


class GPTDecoder(KVDecoder):
    """GPT-2: the step in plain tensor operations on the model's weights (see the module docstring)."""

    def __init__(self, model: GPT, rows: int, device: torch.device, compile: bool = False):
        cfg = model.config
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        t = model.transformer
        self.eps = t.ln_f.eps
        self.wte, self.wpe, self.ln_f = t.wte.weight, t.wpe.weight, (t.ln_f.weight, t.ln_f.bias)
        self.lm_head = _dense1(model.lm_head)
        self.layers = [(b.ln_1.weight, b.ln_1.bias, _dense1(b.attn.c_attn), _dense1(b.attn.c_proj), b.ln_2.weight,
                        b.ln_2.bias, _dense1(b.mlp.c_fc), _dense1(b.mlp.c_proj)) for b in t.h]
        if compile:
            weights = [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
                        b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
                        b.mlp.c_proj.weight, b.mlp.c_proj.bias) for b in t.h]
            flat = flat_weights(model, (t.wte.weight, t.wpe.weight, t.ln_f.weight, t.ln_f.bias, model.lm_head.weight,
                                        weights))
            self.compiled = CompiledStep(gpt_step, flat, cfg.n_head, self.eps, cfg.block_size, cfg.n_layer,
                                         weights_dtype(model))
        super().__init__(model, rows, device, cfg.n_head, cfg.n_embd // cfg.n_head, model.lm_head.weight.dtype)

    def _run(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, attend) -> torch.Tensor:
        N = tokens.size(0)
        nh, hs, C = self.n_head, self.head_size, self.n_embd
        x = F.embedding(tokens, self.wte) + F.embedding(pos, self.wpe)  # (N, C)
        for (ln1_w, ln1_b, attn, proj, ln2_w, ln2_b, fc, out), kv in zip(self.layers, self.kv):
            qkv = attn(F.layer_norm(x, (C,), ln1_w, ln1_b, self.eps))  # (N, 3C)
            new = as_cached(qkv[:, C:].reshape(N * 2 * nh, hs), self.kv_dtype)  # this layer's keys and values
            kv.view(-1, hs).index_copy_(0, slots, new)  # in place: no new cache
            x = proj.add_to(x, attend((qkv[:, :C] * self.scale).view(N, nh, hs), kv))  # heads side by side
            x = out.add_to(x, fc.gelu(F.layer_norm(x, (C,), ln2_w, ln2_b, self.eps)))
        return F.layer_norm(x, (C,), self.ln_f[0], self.ln_f[1], self.eps)


class ModernDecoder(KVDecoder):
    """The modern (Qwen3-style) model: RMSNorm, QK-norm, rotary positions at each row's own position, SwiGLU,
    grouped-query attention over a cache of the key/value heads only.

    Laid out for the step: q, k, v in one (C, (nh + 2 nkv) hs) matrix and gate, up in one (C, 2 H), contiguous
    (one product each; see :class:`~zaizai.models.dense.Dense`); the queries' and keys' QK-norm weights as one
    (nh + nkv, hs) weight, ``qk_w`` (ones for a model without QK-norm), whose queries' rows carry the attention
    scale 1/sqrt(hs): one multiply by ``qk_w`` applies the norms' weights and scales the queries, so that queries
    and keys are normalised, scaled and rotated together (four small operations a layer instead of a dozen: at
    batch 1 a small model's step is mostly their count); RoPE's sign folded into the sine table,
    ``x cos + roll(x, hs/2) sin``. Weights are read when the decoder is made (a Batch's lifetime)."""

    def __init__(self, model: ModernLM, rows: int, device: torch.device, compile: bool = False):
        cfg = model.config
        self.n_head, self.n_embd, hs, nkv = cfg.n_head, cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.kv_heads
        m = model.model
        self.eps = m.norm.eps  # every RMSNorm's (ModelConfig.rms_norm_eps)
        self.embed, self.norm = m.embed_tokens.weight, m.norm.weight
        half = torch.ones(hs, dtype=model.rope_sin.dtype, device=model.rope_sin.device)
        half[:hs // 2] = -1.0  # rotate_half(x) = (-x2, x1) = roll(x, hs/2) * (-1 .. -1, 1 .. 1)
        self.cos, self.sin = model.rope_cos, model.rope_sin * half  # (block_size, hs) each
        self.lm_head = _dense1(model.lm_head)
        self.layers, raw = [], []  # raw: each layer's weights as they are, for a compiled step
        scale = 1.0 / math.sqrt(hs)
        for b in m.layers:
            a, mlp = b.self_attn, b.mlp
            q_norm, k_norm = getattr(a.q_norm, "weight", None), getattr(a.k_norm, "weight", None)  # None: no QK-norm
            ones = torch.ones(hs, dtype=a.q_proj.weight.dtype, device=a.q_proj.weight.device)
            qk_w = torch.cat([(ones if q_norm is None else q_norm.detach()).expand(cfg.n_head, hs) * scale,
                              (ones if k_norm is None else k_norm.detach()).expand(nkv, hs)])  # (nh + nkv, hs)
            self.layers.append((b.input_layernorm.weight, dense(a, (a.q_proj, a.k_proj, a.v_proj)),
                                q_norm is not None, qk_w, _dense1(a.o_proj), b.post_attention_layernorm.weight,
                                dense(mlp, (mlp.gate_proj, mlp.up_proj)), _dense1(mlp.down_proj)))
            raw += [(b.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, q_norm is not None,
                        qk_w, a.o_proj.weight, b.post_attention_layernorm.weight, mlp.gate_proj.weight,
                        mlp.up_proj.weight, mlp.down_proj.weight)] if compile else []
        if compile:
            flat = flat_weights(model, (self.embed, self.norm, model.lm_head.weight, self.cos, self.sin, raw))
            self.compiled = CompiledStep(modern_step, flat, cfg.n_head, self.eps, cfg.block_size, cfg.n_layer,
                                         weights_dtype(model))
        super().__init__(model, rows, device, nkv, hs, model.lm_head.weight.dtype)

    def _run(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, attend) -> torch.Tensor:
        n = tokens.size(0)
        nh, nkv, hs, C, eps = self.n_head, self.heads, self.head_size, self.n_embd, self.eps
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # (n, 1, hs): each token's own angles
        x = F.embedding(tokens, self.embed)  # (n, C)
        for (ln1, qkv_proj, qk_norm, qk_w, o_proj, ln2, gate_up, down), kv in zip(self.layers, self.kv):
            qkv = qkv_proj(F.rms_norm(x, (C,), ln1, eps))  # (n, (nh + 2 nkv) hs)
            qk = qkv[:, :(nh + nkv) * hs].view(n, nh + nkv, hs)  # queries, then keys
            qk = (F.rms_norm(qk, (hs,), None, eps) if qk_norm else qk) * qk_w  # QK-norm; queries scaled
            qk = torch.addcmul(qk * cos, qk.roll(hs // 2, dims=-1), sin)  # RoPE at each row's position
            new = torch.stack((qk[:, nh:], qkv[:, (nh + nkv) * hs:].view(n, nkv, hs)), dim=1)  # (n, 2, nkv, hs)
            kv.view(-1, hs).index_copy_(0, slots, as_cached(new.view(-1, hs), self.kv_dtype))  # in place: no new cache
            x = o_proj.add_to(x, attend(qk[:, :nh], kv))
            gate, up = gate_up(F.rms_norm(x, (C,), ln2, eps)).chunk(2, dim=1)  # (n, H) each
            x = down.add_to(x, F.silu(gate) * up)
        return F.rms_norm(x, (C,), self.norm, eps)
