"""Language models behind one interface, looked up by name.

Every model is an ``nn.Module`` built from a :class:`ModelConfig` with
``forward(idx, targets=None) -> (logits, loss)``:

- ``idx``: (B, T) int64 token ids, T <= block_size
- ``logits``: (B, T, vocab_size)
- ``loss``: mean cross-entropy over positions whose target is not -1, or None without targets

``forward`` also takes ``segments=None``: (B, T) ids of the conversations packed in each row (-1 = padding).
Models with ``supports_segments = True`` keep packed conversations apart (gpt: positions restart and attention
stays within a segment; bigram: no context at all); the trainer gives the others (rnn) one conversation per row.
"""

from __future__ import annotations

from .bigram import BigramLM
from .config import ModelConfig
from .gpt import GPT
from .rnn import RNNLM

MODELS = {"bigram": BigramLM, "rnn": RNNLM, "gpt": GPT}


def build_model(cfg: ModelConfig):
    """Validate ``cfg`` and return a freshly initialised model."""
    cfg.validate()
    return MODELS[cfg.model](cfg)


__all__ = ["ModelConfig", "MODELS", "build_model", "BigramLM", "RNNLM", "GPT"]
