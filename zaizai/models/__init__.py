"""Language models behind one interface, looked up by name.

Every model is an ``nn.Module`` built from a :class:`ModelConfig` with one forward pass:
``forward(idx, targets=None, segments=None, cache=None, last_only=False) -> (logits, loss)``:

- ``idx``: (B, T) int64 token ids, T <= block_size (a recurrent model with a cache takes any T)
- ``logits``: (B, T, vocab_size), or (B, 1, vocab_size) for the last position with ``last_only``
- ``loss``: mean cross-entropy over positions whose target is not IGNORE_INDEX, or None without targets
- ``segments``: (B, T) ids of the conversations packed in each row (-1 = padding). Models with
  ``supports_segments = True`` keep packed conversations apart (gpt, modern: positions restart and attention
  stays within a segment; bigram: no context at all); the trainer gives the others (rnn) one conversation per row.
- ``cache``: from ``model.new_cache(batch_size, device)``: what generation keeps between calls (gpt, modern: a
  KV cache; rnn: the hidden state; bigram: None, it needs nothing). Each call continues after the cached tokens.
- ``attn_weights`` (gpt, modern): a list that each layer appends its attention weights to.

The models: ``bigram`` (a table), ``rnn`` (GRU), ``gpt`` (GPT-2, the articles' model) and ``modern`` (a
Qwen3-style decoder: RMSNorm, RoPE, QK-norm, SwiGLU, optional grouped-query attention).

The model classes are imported when first asked for, so that reading a config (``zaizai --help``) does not
import torch.
"""

from __future__ import annotations

import importlib

from .config import MODEL_NAMES, ModelConfig

_CLASSES = {"bigram": ("bigram", "BigramLM"), "rnn": ("rnn", "RNNLM"), "gpt": ("gpt", "GPT"),
            "modern": ("modern", "ModernLM")}  # name -> module, class
assert tuple(_CLASSES) == MODEL_NAMES


def model_class(name: str):
    """The class of the model called ``name`` (one of MODEL_NAMES)."""
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def build_model(cfg: ModelConfig):
    """Validate ``cfg`` and return a freshly initialised model."""
    cfg.validate()
    return model_class(cfg.model)(cfg)


def __getattr__(name: str):
    for model_name, (_, cls) in _CLASSES.items():
        if name == cls:
            return model_class(model_name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ModelConfig", "MODEL_NAMES", "model_class", "build_model", "BigramLM", "RNNLM", "GPT", "ModernLM"]
