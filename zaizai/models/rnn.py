"""A GRU language model: the recurrent step between the bigram table and the transformer.

Tokens are embedded, run through a stack of GRU layers that carry a hidden state from left to right,
normalised, and projected back onto the vocabulary with the embedding matrix itself (tied weights).
Unlike the GPT, the model has no hard context limit: :meth:`RNNLM.step` carries the hidden state across
calls, which is how generation continues past ``block_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZaizaiError
from .config import ModelConfig


class RNNLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(
            cfg.n_embd,
            cfg.n_embd,
            num_layers=cfg.n_layer,
            batch_first=True,
            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,  # GRU applies it between layers only
        )
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one (V, C) matrix reads tokens in and writes them out
        # Small embeddings keep the initial logits near zero, so the first loss is about ln(vocab_size).
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)

    def step(self, idx: torch.Tensor, hidden: torch.Tensor | None = None):
        """Run ``idx`` (B, T) on from ``hidden`` (n_layer, B, C) or zeros; return (logits (B, T, V), hidden)."""
        x = self.drop(self.wte(idx))  # (B, T, C)
        x, hidden = self.gru(x, hidden)  # (B, T, C), (n_layer, B, C)
        x = self.drop(self.ln_f(x))  # (B, T, C)
        return self.lm_head(x), hidden  # (B, T, V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ZaizaiError(f"input has {T} tokens but block_size is {self.config.block_size}; crop the input")
        logits, _ = self.step(idx)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied output layer counted once); ``non_embedding`` leaves out the token table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
        return n
