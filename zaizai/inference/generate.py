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

Then the logits of the last position go through, in this order (as in Hugging Face transformers):
repetition penalty, no-repeat-n-gram ban, temperature, top-k, top-p, and are sampled (or argmax'ed when
temperature is 0). Everything is seedable: ``SamplingConfig.seed`` drives a private ``torch.Generator``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common.errors import ZaizaiError
from ..models.bigram import BigramLM
from ..models.gpt import GPT, KVCache
from ..models.rnn import RNNLM


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8        # 0 = greedy
    top_k: int = 0                  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0              # keep the smallest set of tokens whose probability reaches p; 1 = off
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the context less likely (CTRL); 1 = off
    no_repeat_ngram_size: int = 0   # never repeat an n-gram of this many tokens; 0 = off
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ZaizaiError(f"--max-new-tokens must not be negative, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ZaizaiError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ZaizaiError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ZaizaiError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ZaizaiError(f"--repetition-penalty must be > 0 (1 = off, 1.1-1.3 is typical), "
                              f"got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ZaizaiError(f"--no-repeat-ngram-size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")


# --- logit processing -----------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make the tokens marked in ``seen`` less likely, as CTRL and Hugging Face define it.

    logits (B, V) float, seen (B, V) or (V,) bool -> (B, V). A seen token's logit is divided by ``penalty``
    when positive and multiplied by it when negative, so it always moves down for penalty > 1. (Dividing
    a negative logit, as some code does, moves it *up* towards 0: the repeated token becomes more likely.)
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def banned_ngram_tokens(ids: list[int], n: int) -> set[int]:
    """Tokens that, appended to ``ids``, would repeat an n-gram already in ``ids`` (the plain definition;
    the generator uses :class:`NGramBlocker`, which gives the same answer in O(1) per token)."""
    if n <= 0 or len(ids) < n - 1:
        return set()
    prefix = ids[len(ids) - (n - 1):]
    return {ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i:i + n - 1] == prefix}


class NGramBlocker:
    """Remembers every n-gram of a growing token list, to ban the tokens that would repeat one."""

    def __init__(self, n: int, ids: Iterable[int] = ()):
        self.n = n
        self.ids: list[int] = []
        self.followers: dict[tuple[int, ...], set[int]] = defaultdict(set)  # (n-1)-gram -> tokens seen after it
        self.extend(ids)

    def extend(self, ids: Iterable[int]) -> None:
        n = self.n
        for token in ids:
            self.ids.append(token)
            if len(self.ids) >= n:
                self.followers[tuple(self.ids[len(self.ids) - n:-1])].add(token)

    def banned(self) -> set[int]:
        if len(self.ids) < self.n - 1:
            return set()
        return self.followers.get(tuple(self.ids[len(self.ids) - (self.n - 1):]), set())


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (B, V).

    Top-k keeps the k largest (ties at the k-th value all stay). Top-p keeps the smallest set of most
    likely tokens whose probabilities add up to at least ``top_p``; the most likely token always stays.
    """
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p; the first token always stays
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False  # even when top_p is so small that it rounds to 0 in float32
        drop_unsorted = torch.zeros_like(drop).scatter(-1, order, drop)
        logits = logits.masked_fill(drop_unsorted, float("-inf"))
    return logits


MIN_TEMPERATURE = 1e-5


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token id from the last position's logits (B, V) -> (B, 1): argmax when temperature is
    0, else a draw after temperature, top-k and top-p. (Penalties need the context: see
    :func:`apply_repetition_penalty` and :class:`NGramBlocker`; :func:`generate_ids` applies them first.)"""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # no softmax: the largest logit is the most likely token
    # A temperature near 0 must not overflow the logits to inf (softmax would give nan): below MIN_TEMPERATURE
    # the draw is, to float32 precision, the argmax anyway.
    logits = filter_logits(logits.float() / max(cfg.temperature, MIN_TEMPERATURE), cfg.top_k, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


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
