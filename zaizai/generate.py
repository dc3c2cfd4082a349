"""Sampling: temperature, top-k, top-p, and a streaming token generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import ZaizaiError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8     # 0 = greedy
    top_k: int = 0               # keep the k most likely tokens; 0 = off
    top_p: float = 1.0           # keep the smallest set of tokens whose probability reaches p; 1 = off
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


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (B, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p; the first token always stays
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop_unsorted = torch.zeros_like(drop).scatter(-1, order, drop)
        logits = logits.masked_fill(drop_unsorted, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token id from the last position's logits (B, V) -> (B, 1)."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate_ids(model, ids: list[int], cfg: SamplingConfig, stop_ids: set[int] | None = None,
                 device: torch.device | str = "cpu") -> Iterator[int]:
    """Yield new token ids one by one, continuing ``ids``; stops after max_new_tokens or at a stop id."""
    cfg.validate()
    model.eval()
    block_size = model.config.block_size
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(cfg.max_new_tokens):
        logits, _ = model(idx[:, -block_size:])
        next_id = sample_next(logits[:, -1, :], cfg, generator)
        token = int(next_id)
        if stop_ids and token in stop_ids:
            return
        yield token
        idx = torch.cat([idx, next_id], dim=1)
