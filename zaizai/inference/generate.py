"""Generation: a streaming token generator on the model's own forward pass and cache.

:func:`generate_ids` continues a list of token ids one token at a time and yields each as it is chosen.
:class:`Engine` does the forward passes, the model's own, with the model's cache:

- ``gpt``: a preallocated KV cache (see :class:`zaizai.models.gpt.KVCache`). The prompt goes through in one
  forward pass (prefill); each new token then costs one position through every layer. When the cache is
  full (block_size tokens), the window slides: the last 3/4 of block_size tokens are run through again as
  a fresh prefill, and generation goes on from there. Keeping 3/4 (rather than 1/2) keeps most of the
  context after a slide, at the cost of a re-prefill every block_size/4 tokens; a prefill runs many
  positions in one matrix multiply, so it costs a few decode steps, not hundreds.
- ``rnn``: the hidden state is carried from step to step; no context limit.
- ``bigram``: no cache; only the last token matters.

Then the logits of the last position go through the sampling steps of :mod:`zaizai.inference.sampling`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..common.errors import ZaizaiError
from .sampling import NGramBlocker, SamplingConfig, apply_repetition_penalty, sample_next


# --- the engine: the model's own forward pass, one call per new token ---------------------------------------


class Engine:
    """Feeds a model token ids and gives back the next token's logits, keeping the model's cache between calls.

    It knows nothing of text or sampling: purely token id sequences, batch 1. Every call is the model's own
    forward pass (``model(idx, cache=..., last_only=True)``); the cache is whatever the model's ``new_cache``
    makes: a KV cache (gpt) that holds block_size tokens, a hidden state (rnn) that holds any number, or
    nothing (bigram). A full KV cache slides its window (see the module docstring).
    """

    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.cache = model.new_cache(batch_size=1, device=device)
        self.block_size = model.config.block_size
        # the longest prompt the model can take at once: a KV cache's length; unbounded for a recurrent state
        self.max_prompt = self.block_size if self.cache is None else getattr(self.cache, "max_len", None)
        self.keep = max(1, self.block_size * 3 // 4)  # tokens kept when the window slides
        self.window: list[int] = []  # the tokens in a bounded (KV) cache, in order, to slide it when full

    def _run(self, ids: list[int]) -> torch.Tensor:
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        logits, _ = self.model(idx, cache=self.cache, last_only=True)  # (1, 1, V)
        return logits[:, -1]  # (1, V)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Start over from ``ids`` (its last max_prompt tokens); the logits (1, V) of the token after them."""
        if self.max_prompt is not None:
            ids = ids[-self.max_prompt:]
        if self.cache is not None:
            self.cache.reset()
        self.window = list(ids)
        return self._run(ids)

    def step(self, token: int) -> torch.Tensor:
        """Feed one more token; the logits (1, V) of the token after it."""
        if self.cache is not None and self.cache.full:
            return self.prefill(self.window[len(self.window) - self.keep + 1:] + [token])
        if self.cache is not None and self.max_prompt is not None:  # a cache that can fill up: remember its tokens
            self.window.append(token)
        return self._run([token])


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
        engine = Engine(model, device)
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
