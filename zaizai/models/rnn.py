"""A GRU language model: the recurrent step between the bigram table and the transformer.

Tokens are embedded, run through a stack of GRU layers that carry a hidden state from left to right,
normalised, and projected back onto the vocabulary with the embedding matrix itself (tied weights).
Unlike the GPT, the model has no hard context limit: with a cache (:meth:`RNNLM.new_cache`, the hidden state)
``forward`` carries the state across calls, which is how generation continues past ``block_size``.

A recurrent state runs through a whole row, so packed sequences cannot be kept apart: ``supports_segments``
is False, ``forward`` ignores ``segments``, and the trainer gives the RNN one conversation per row.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.errors import ZaizaiError
from .config import ModelConfig
from .ops import linear_cross_entropy


class RNNState:
    """The "cache" of a recurrent model: its hidden state (n_layer, B, C), carried from call to call."""

    full = False  # the state summarises any length: generation never has to start a new window

    def __init__(self):
        self.hidden: torch.Tensor | None = None  # None: zeros, before the first token
        self.pos = 0  # tokens seen so far

    def reset(self) -> None:
        self.hidden, self.pos = None, 0


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

    def new_cache(self, batch_size: int = 1, device: torch.device | str = "cpu") -> RNNState:
        """An empty state for generation (the batch size and device come with the first tokens)."""
        return RNNState()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                cache: RNNState | None = None, last_only: bool = False):
        """idx (B, T) -> (logits (B, T, V), loss or None). ``segments`` is accepted and ignored (one
        sequence per row; see the module docstring). ``cache``: start from its hidden state and leave the new
        one there; then any T is fine (no block_size limit). ``last_only``: logits of the last position only."""
        if idx.dim() != 2:
            raise ZaizaiError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if cache is None and T > self.config.block_size:
            raise ZaizaiError(f"input has {T} tokens but block_size is {self.config.block_size}; crop the input")
        x = self.drop(self.wte(idx))  # (B, T, C)
        x, hidden = self.gru(x, None if cache is None else cache.hidden)  # (B, T, C), (n_layer, B, C)
        x = self.drop(self.ln_f(x))  # (B, T, C)
        if cache is not None:
            cache.hidden, cache.pos = hidden, cache.pos + T
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None  # (B, T, V) or (B, 1, V)
        logits, loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T))
        return logits.view(B, T, -1), loss  # (B, T, V), scalar

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, the tied output layer counted once.

        ``non_embedding`` would leave out tables that only look tokens up; the token table here is also
        the output layer (as in nanoGPT's count for GPT), so it stays and the count is the same.
        """
        return sum(p.numel() for p in self.parameters())
