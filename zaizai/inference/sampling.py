"""Sampling options and the logit processing between a model's logits and the next token.

The logits of the last position go through, in this order (as in Hugging Face transformers): repetition
penalty, no-repeat-n-gram ban, temperature, top-k, top-p, and are sampled (or argmax'ed when temperature
is 0). Everything is seedable: ``SamplingConfig.seed`` drives a private ``torch.Generator``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..common.errors import ZaizaiError


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
        if self.max_new_tokens < 1:  # 0 is no reply at all (and became one token in chat): refuse it everywhere
            raise ZaizaiError(f"max_new_tokens (--max-new-tokens, /set max_new_tokens, the API's max_tokens) must be "
                              f">= 1, got {self.max_new_tokens}")
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
    return draw(next_token_probs(logits, cfg), generator)


def next_token_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The probabilities a sampled draw (temperature > 0) picks from: logits (..., V) -> fp32 (..., V), after
    temperature, top-k and top-p."""
    # A temperature near 0 must not overflow the logits to inf (softmax would give nan): below MIN_TEMPERATURE
    # the draw is, to float32 precision, the argmax anyway.
    logits = filter_logits(logits.float() / max(cfg.temperature, MIN_TEMPERATURE), cfg.top_k, cfg.top_p)
    return torch.softmax(logits, dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token from each row of ``probs`` (..., V), non-negative, summing to about 1: (..., 1) int64.

    The inverse of the cumulative distribution: one uniform number per row, scaled by the row's total, then the
    first token whose running sum passes it (a token of probability 0 is never taken). The same distribution as
    ``torch.multinomial(probs, 1)``, which on CPU takes 13x longer (V = 9,706: 235 vs 18 us a draw, 1 thread):
    at 32 sampled rows that was 7.5 ms a step, more than the 6L/384d step itself.
    """
    return draw_cumulative(probs.cumsum(-1), generator)


def draw_cumulative(cdf: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """:func:`draw` from the running sums of the probabilities, ``probs.cumsum(-1)`` (..., V), for a caller that
    has them already (a batch checks their total before the draw) -> (..., 1) int64."""
    total = cdf[..., -1:]  # (..., 1)
    u = torch.rand(total.shape, generator=generator, dtype=cdf.dtype, device=cdf.device) * total
    index = torch.searchsorted(cdf, u, right=True)  # (..., 1): the first running sum > u
    past = index >= cdf.size(-1)  # u rounded up to the total: take the last token that has any probability
    if bool(past.any()):
        index = torch.where(past, torch.searchsorted(cdf, total, right=False), index)
    return index
