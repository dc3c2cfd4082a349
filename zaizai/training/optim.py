"""The optimizers: AdamW (weight decay on matrices only, fused where torch can), or Muon for the hidden matrices
with AdamW for the rest (``optimizer="muon"``), behind one object that the loop and checkpoints use alike."""

from __future__ import annotations

import torch
from torch import nn

from ..common.errors import ZaizaiError
from .config import OPTIMIZERS
# Muon's learning rate relative to the schedule's (the AdamW) lr. torch's Muon runs with
# adjust_lr_fn="match_rms_adamw": its update is scaled to the RMS of an AdamW update (0.2 sqrt(max(A, B)) per
# matrix), so the lr tuned for AdamW carries over (Moonshot, "Muon is Scalable for LLM Training"); the scale
# on top was measured on the Tang corpus: 4x128 modern, fp32, 500 steps of 32x64 tokens, lr 3e-3, whole-val
# nats/char scale 2 = 5.011, scale 4 = 5.062 (and at 120 steps: scale 1 = 6.113, scale 2 = 5.917, gpt + AdamW
# 6.290); gpt + AdamW at 500 steps: 5.528. Measured on a loaded 2-core AMD EPYC, 1 thread each, 2026-12-03.
MUON_LR_SCALE = 2.0
MUON_MOMENTUM = 0.95


def fused_adamw_supported(device_type: str) -> bool:
    """True when ``torch.optim.AdamW(fused=True)`` runs on ``device_type`` (CPU and CUDA in torch >= 2.4)."""
    if device_type == "cuda":
        return True
    if device_type == "cpu":
        major, minor = (int(p) for p in torch.__version__.split(".")[:2])
        return (major, minor) >= (2, 4)
    return False


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights inside the network, the ones Muon is for: every matrix except the token
    embedding(s) and the output layer (``lm_head``), which AdamW keeps, as do vectors (norm gains, biases)."""
    outer = {id(p) for name, module in model.named_modules()
             if isinstance(module, nn.Embedding) or name.split(".")[-1] == "lm_head"
             for p in module.parameters(recurse=False)}
    return [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in outer]


def configure_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    device_type: str = "cpu",
    fused: bool | None = None,
    optimizer: str = "adamw",
):
    """AdamW over ``model``'s trainable parameters, or (``optimizer="muon"``) Muon for its hidden matrices and
    AdamW for the rest.

    Parameters with two or more dimensions (the weights of Linear, Embedding, GRU matrices) decay;
    biases, LayerNorm gains and other vectors do not: shrinking a gain or a bias towards zero is not
    regularisation, it only fights the fit. A tied weight appears once (``model.parameters()`` already
    deduplicates shared tensors).

    ``fused=None`` uses the fused kernel where it is supported: one kernel per step for all tensors
    instead of a Python loop over them.
    """
    if optimizer not in OPTIMIZERS:
        raise ZaizaiError(f"unknown optimizer '{optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = hidden_matrices(model) if optimizer == "muon" else []
    rest = [p for p in params if all(p is not m for m in matrices)]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # the bigram model has no vectors at all
    if fused is None:
        fused = fused_adamw_supported(device_type)
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=bool(fused) or None)
    if not matrices:  # adamw, or a model without hidden matrices (bigram)
        return adamw
    muon = torch.optim.Muon([{"params": matrices, "lr_scale": MUON_LR_SCALE}], lr=lr, weight_decay=weight_decay,
                            momentum=MUON_MOMENTUM, adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(adamw, muon)


class MuonAdamW:
    """``torch.optim.Muon`` on the hidden matrices and ``torch.optim.AdamW`` on the rest, as one optimizer.

    ``param_groups`` lists AdamW's groups, then Muon's: the loop sets every group's ``lr`` to the schedule's
    value; a Muon group multiplies it by its ``lr_scale`` for the step (and leaves ``lr`` as it was set).
    ``state_dict()`` is torch's format, the two optimizers' parameters numbered one after the other (AdamW's
    first) and each group marked with ``"optimizer"``, so checkpoints save and restore it exactly as AdamW's.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon):
        self.adamw, self.muon = adamw, muon

    @property
    def param_groups(self) -> list[dict]:
        return [*self.adamw.param_groups, *self.muon.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.adamw.step()
        lrs = [g["lr"] for g in self.muon.param_groups]
        try:
            for g, lr in zip(self.muon.param_groups, lrs):
                g["lr"] = lr * g.get("lr_scale", 1.0)
            self.muon.step()
        finally:  # the schedule's values back, exactly
            for g, lr in zip(self.muon.param_groups, lrs):
                g["lr"] = lr

    def _kinds(self) -> list[str]:
        return ["adamw"] * len(self.adamw.param_groups) + ["muon"] * len(self.muon.param_groups)

    def state_dict(self) -> dict:
        a, m = self.adamw.state_dict(), self.muon.state_dict()
        n = sum(len(g["params"]) for g in a["param_groups"])
        state = {**a["state"], **{i + n: s for i, s in m["state"].items()}}
        groups = [{**g, "optimizer": "adamw"} for g in a["param_groups"]]
        groups += [{**g, "params": [i + n for i in g["params"]], "optimizer": "muon"} for g in m["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        kinds = [g.get("optimizer", "adamw") for g in groups]
        if kinds != self._kinds():
            raise ZaizaiError("the saved optimizer state is not Muon + AdamW for this model (the run was trained "
                              "with --optimizer adamw?); resume with the optimizer the run started with")
        n = sum(len(g["params"]) for g, kind in zip(groups, kinds) if kind == "adamw")
        state = {int(k): v for k, v in state_dict["state"].items()}
        strip = lambda g: {k: v for k, v in g.items() if k != "optimizer"}  # noqa: E731
        self.adamw.load_state_dict({
            "state": {i: s for i, s in state.items() if i < n},
            "param_groups": [strip(g) for g, kind in zip(groups, kinds) if kind == "adamw"]})
        self.muon.load_state_dict({
            "state": {i - n: s for i, s in state.items() if i >= n},
            "param_groups": [{**strip(g), "params": [i - n for i in g["params"]]}
                             for g, kind in zip(groups, kinds) if kind == "muon"]})
