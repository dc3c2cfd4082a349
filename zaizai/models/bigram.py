"""The bigram language model of the tutorial articles: the next token depends only on this one.

The whole model is one (vocab_size, vocab_size) table: row i holds the logits of the token that follows
token i. It cannot look further back than one token, which is exactly what makes it the right first
model: everything the bigger models add (context, attention) is measured against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.errors import ZaizaiError
from ..common.ids import IGNORE_INDEX
from .config import ModelConfig


class BigramLM(nn.Module):
    # Each prediction depends on one token only, so packed sequences never see each other: segments need
    # no handling at all, and packing rows is exact.
    supports_segments = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)
        nn.init.normal_(self.token_embedding_table.weight, mean=0.0, std=0.02)

    def new_cache(self, batch_size: int = 1, device: torch.device | str = "cpu") -> None:
        """Nothing to keep between calls: the next token depends on the last one only."""
        return None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                cache: None = None, last_only: bool = False):
        """idx (B, T) -> (logits (B, T, V), loss or None). ``segments`` is accepted and ignored: a bigram
        model never looks past the current token, so packed sequences are already apart (and ``cache``, for
        the same reason, is always None). ``last_only``: logits of the last position only."""
        if idx.dim() != 2:
            raise ZaizaiError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ZaizaiError(f"input has {T} tokens but block_size is {self.config.block_size}; crop the input")
        if last_only and targets is None:
            idx = idx[:, -1:]  # (B, 1)
        logits = self.token_embedding_table(idx)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(B * T),
                                   ignore_index=IGNORE_INDEX)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count. The table is the output layer too, so ``non_embedding`` changes nothing
        (as nanoGPT counts GPT's tied token table)."""
        return sum(p.numel() for p in self.parameters())
