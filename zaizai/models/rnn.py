"""A GRU language model: the recurrent step between the bigram table and the transformer.

Tokens are embedded, run through a stack of GRU layers that carry a hidden state from left to right,
normalised, and projected back onto the vocabulary with the embedding matrix itself (tied weights).
Unlike the GPT, the model has no hard context limit: :meth:`RNNLM.step` carries the hidden state across
calls, which is how generation continues past ``block_size``.

A recurrent state runs through a whole row, so packed sequences cannot be kept apart: ``supports_segments``
is False, ``forward`` ignores ``segments``, and the trainer gives the RNN one conversation per row.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.errors import ZaizaiError
from .config import ModelConfig
from .ops import linear_cross_entropy


class RNNLM(nn.Module):
    supports_segments = False  # the hidden state would carry one packed sequence into the next

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

    def features(self, idx: torch.Tensor, hidden: torch.Tensor | None = None):
        """The GRU's normalised outputs for ``idx`` (B, T), starting from ``hidden`` (n_layer, B, C) or zeros."""
        x = self.drop(self.wte(idx))  # (B, T, C)
        x, hidden = self.gru(x, hidden)  # (B, T, C), (n_layer, B, C)
        return self.drop(self.ln_f(x)), hidden  # (B, T, C), (n_layer, B, C)

    def step(self, idx: torch.Tensor, hidden: torch.Tensor | None = None):
        """Run ``idx`` (B, T) on from ``hidden``; return (logits (B, T, V), the new hidden state).

        Any T is fine here: generation feeds the hidden state back in and goes on past block_size.
        """
        x, hidden = self.features(idx, hidden)
        return self.lm_head(x), hidden  # (B, T, V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        """idx (B, T) -> (logits (B, T, V), loss or None). ``segments`` is accepted and ignored (one
        sequence per row; see the module docstring)."""
        if idx.dim() != 2:
            raise ZaizaiError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ZaizaiError(f"input has {T} tokens but block_size is {self.config.block_size}; crop the input")
        if targets is None:
            return self.step(idx)[0], None  # (B, T, V)
        x, _ = self.features(idx)  # (B, T, C)
        logits, loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T))
        return logits.view(B, T, -1), loss  # (B, T, V), scalar

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, the tied output layer counted once.

        ``non_embedding`` would leave out tables that only look tokens up; the token table here is also
        the output layer (as in nanoGPT's count for GPT), so it stays and the count is the same.
        """
        return sum(p.numel() for p in self.parameters())
