"""The optimizer every model trains with: AdamW, weight decay on matrices only, fused where torch can."""

from __future__ import annotations

import torch
from torch import nn


def fused_adamw_supported(device_type: str) -> bool:
    """True when ``torch.optim.AdamW(fused=True)`` runs on ``device_type`` (CPU and CUDA in torch >= 2.4)."""
    if device_type == "cuda":
        return True
    if device_type == "cpu":
        major, minor = (int(p) for p in torch.__version__.split(".")[:2])
        return (major, minor) >= (2, 4)
    return False


def configure_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    device_type: str = "cpu",
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters.

    Parameters with two or more dimensions (the weights of Linear, Embedding, GRU matrices) decay;
    biases, LayerNorm gains and other vectors do not: shrinking a gain or a bias towards zero is not
    regularisation, it only fights the fit. A tied weight appears once (``model.parameters()`` already
    deduplicates shared tensors).

    ``fused=None`` uses the fused kernel where it is supported: one kernel per step for all tensors
    instead of a Python loop over them.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # the bigram model has no vectors at all
    if fused is None:
        fused = fused_adamw_supported(device_type)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=bool(fused) or None)
