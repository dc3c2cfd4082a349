"""Generation: sampling options, logit filters, and a streaming token generator with a KV cache.

:func:`generate_ids` continues a list of token ids one token at a time and yields each as it is chosen.
The model's own engine does the forward passes:

- ``gpt``: a preallocated KV cache (see :class:`zaizai.models.gpt.KVCache`). The prompt goes through in one
  forward pass (prefill); each new token then costs one position through every layer. When the cache is
  full (block_size tokens), the window slides: the last 3/4 of block_size tokens are run through again as
  a fresh prefill, and generation goes on from there. Keeping 3/4 (rather than 1/2) keeps most of the
  context after a slide, at the cost of a re-prefill every block_size/4 tokens; a prefill runs many
  positions in one matrix multiply, so it costs a few decode steps, not hundreds.
- ``rnn``: the hidden state is carried from step to step (:meth:`RNNLM.step`); no context limit.
- ``bigram``: only the last token matters.
- anything else with ``forward(idx) -> (logits, _)``: the whole window (last block_size tokens) each step.

Then the logits of the last position go through the sampling steps of :mod:`zaizai.inference.sampling`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..common.errors import ZaizaiError
from ..models.bigram import BigramLM
from ..models.gpt import GPT, KVCache
from ..models.rnn import RNNLM
from .sampling import NGramBlocker, SamplingConfig, apply_repetition_penalty, sample_next


# --- engines: one forward pass per new token ------------------------------------------------------------------


class _GPTEngine:
    """GPT with a KV cache, batch 1; slides its window when the cache is full (see the module docstring).

    The prompt goes through ``GPT.hidden_states`` (the model's own forward). The one-token steps after it
    compute the same thing with functional ops on parameters gathered once: at batch 1 a small model's
    step is mostly per-op overhead (module calls, attribute lookups, views), and this skips a third of it.
    tests/test_engine.py checks that both give the tokens of plain forward passes without a cache.
    """

    def __init__(self, model: GPT, device: torch.device):
        cfg = model.config
        self.model = model
        self.block_size = cfg.block_size
        self.keep = max(1, self.block_size * 3 // 4)  # tokens kept when the window slides
        self.n_embd, self.n_head = cfg.n_embd, cfg.n_head
        self.cache = KVCache(cfg, batch_size=1, device=device, dtype=model.lm_head.weight.dtype)
        self.device = device
        self.window: list[int] = []  # the tokens in the cache, in order
        tr = model.transformer
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight  # (V, C), (block_size, C)
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
        self.head = model.lm_head.weight  # (V, C), the same tensor as wte (tied)
        self.layers = [
            (b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
             b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
             b.mlp.c_proj.weight, b.mlp.c_proj.bias)
            for b in tr.h
        ]

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        self.cache.reset()
        self.window = list(ids)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        x = self.model.hidden_states(idx, kv_cache=self.cache)  # (1, T, C)
        return F.linear(x[:, -1], self.head)  # (1, V): only the last position is needed

    def prefill(self, ids: list[int]) -> torch.Tensor:
        return self._prefill(ids[-self.block_size:])

    def step(self, token: int) -> torch.Tensor:
        cache = self.cache
        pos = cache.pos
        if pos == self.block_size:
            return self._prefill(self.window[len(self.window) - self.keep + 1:] + [token])
        self.window.append(token)
        C, nh = self.n_embd, self.n_head
        hs = C // nh
        x = self.wte[token] + self.wpe[pos]  # (C,)
        x = x.view(1, C)  # (1, C)
        for layer, (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, fc_proj_w,
                    fc_proj_b) in enumerate(self.layers):
            h = F.layer_norm(x, (C,), ln1_w, ln1_b)  # (1, C)
            qkv = F.linear(h, attn_w, attn_b).view(3, 1, nh, 1, hs)  # q, k, v, each (1, nh, 1, hs)
            cache.k[layer, :, :, pos:pos + 1] = qkv[1]
            cache.v[layer, :, :, pos:pos + 1] = qkv[2]
            y = F.scaled_dot_product_attention(qkv[0], cache.k[layer, :, :, :pos + 1],
                                               cache.v[layer, :, :, :pos + 1])  # (1, nh, 1, hs)
            x = x + F.linear(y.view(1, C), proj_w, proj_b)  # (1, C)
            h = F.gelu(F.linear(F.layer_norm(x, (C,), ln2_w, ln2_b), fc_w, fc_b), approximate="tanh")  # (1, 4C)
            x = x + F.linear(h, fc_proj_w, fc_proj_b)  # (1, C)
        cache.pos = pos + 1
        x = F.layer_norm(x, (C,), *self.ln_f)
        return F.linear(x, self.head)  # (1, V)


class _RNNEngine:
    """The GRU's hidden state carries the whole past; each step feeds one token."""

    def __init__(self, model: RNNLM, device: torch.device):
        self.model = model
        self.device = device
        self.hidden = None

    def prefill(self, ids: list[int]) -> torch.Tensor:
        logits, self.hidden = self.model.step(torch.tensor([ids], dtype=torch.long, device=self.device))
        return logits[:, -1]  # (1, V)

    def step(self, token: int) -> torch.Tensor:
        idx = torch.tensor([[token]], dtype=torch.long, device=self.device)
        logits, self.hidden = self.model.step(idx, self.hidden)
        return logits[:, -1]  # (1, V)


class _WindowEngine:
    """No cache: run the last ``window`` tokens through ``model(idx)`` every step (1 for the bigram model)."""

    def __init__(self, model, device: torch.device, window: int):
        self.model = model
        self.device = device
        self.window = window
        self.ids: list[int] = []

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.ids = list(ids[-self.window:])
        logits, _ = self.model(torch.tensor([self.ids], dtype=torch.long, device=self.device))
        return logits[:, -1]  # (1, V)

    def step(self, token: int) -> torch.Tensor:
        return self.prefill(self.ids + [token])


def make_engine(model, device: torch.device | str):
    """The decoding engine for ``model``: an object with ``prefill(ids) -> logits (1, V)`` and
    ``step(token) -> logits (1, V)``, each giving the next token's logits."""
    device = torch.device(device)
    if isinstance(model, GPT):
        return _GPTEngine(model, device)
    if isinstance(model, RNNLM):
        return _RNNEngine(model, device)
    if isinstance(model, BigramLM):
        return _WindowEngine(model, device, window=1)
    return _WindowEngine(model, device, window=model.config.block_size)


# --- the generator --------------------------------------------------------------------------------------------


def generate_ids(model, ids: list[int], cfg: SamplingConfig, stop_ids: set[int] | None = None,
                 device: torch.device | str | None = None) -> Iterator[int]:
    """Yield new token ids one by one, continuing ``ids``; stops after ``cfg.max_new_tokens`` or at a stop id
    (which is not yielded).

    With a seed, the same call gives the same tokens. Stop ids are never penalised or banned: ending a turn
    is not a repetition, however many turns the context already holds. ``device``: where the model is
    (by default, where its parameters are). The model is put in eval mode; torch runs in inference mode
    inside each step only, never while the caller holds control.
    """
    cfg.validate()
    ids = [int(i) for i in ids]
    if not ids:
        raise ZaizaiError("generation needs at least one token to start from (e.g. the end-of-text token 0)")
    vocab_size = model.config.vocab_size
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ZaizaiError(f"token ids must be in [0, {vocab_size}); the prompt does not fit this model")
    if cfg.max_new_tokens == 0:
        return
    stop_ids = set(stop_ids or ())
    model.eval()
    device = next(model.parameters()).device if device is None else torch.device(device)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
    greedy = cfg.temperature == 0
    penalty = cfg.repetition_penalty
    blocker = NGramBlocker(cfg.no_repeat_ngram_size, ids) if cfg.no_repeat_ngram_size > 0 else None
    exempt = torch.tensor(sorted(i for i in stop_ids if 0 <= i < vocab_size), dtype=torch.long, device=device)

    with torch.inference_mode():
        engine = make_engine(model, device)
        logits = engine.prefill(ids)
        seen = None
        if penalty != 1.0:
            seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # (V,) tokens in the context
            seen[torch.tensor(ids, device=device)] = True
            seen[exempt] = False

    for n in range(cfg.max_new_tokens):
        with torch.inference_mode():
            if seen is not None:
                logits = apply_repetition_penalty(logits.float(), seen, penalty)
            if blocker is not None:
                banned = blocker.banned() - stop_ids
                if banned:
                    logits = logits.float().index_fill(1, torch.tensor(sorted(banned), device=device), float("-inf"))
            if greedy:
                token = int(logits.argmax())
            else:
                token = int(sample_next(logits, cfg, generator))
        if token in stop_ids:
            return
        yield token
        if n + 1 == cfg.max_new_tokens:
            return
        with torch.inference_mode():
            if seen is not None:
                seen[token] = True
            if blocker is not None:
                blocker.extend((token,))
            logits = engine.step(token)
