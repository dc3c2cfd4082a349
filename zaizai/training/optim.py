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
# The embedding tables' AdamW lr relative to the schedule's, with Muon (the speedrun and nanochat train embeddings at
# a far higher lr than the rest; a row moves only when its token occurs). Tang, modern 2x128 (embedding tied to the
# output layer) + Muon, fp32, 800 steps of 32x64 tokens, lr 6e-3, whole-val nats/char: scale 1 = 4.839, 4 = 4.767,
# 8 = 4.766 (1 thread each, 2026-12-03).
EMBED_LR_SCALE = 4.0
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
    embeds = embedding_tables(model) if matrices else []
    decay = [p for p in rest if p.dim() >= 2 and all(p is not e for e in embeds)]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": embeds, "weight_decay": weight_decay, "lr_scale": EMBED_LR_SCALE},
    ]
    groups = [g for g in groups if g["params"]]  # the bigram model has no vectors at all
    if fused is None:
        fused = fused_adamw_supported(device_type)
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=bool(fused) or None)
    if not matrices:  # adamw, or a model without hidden matrices (bigram)
        return adamw
    muon = torch.optim.Muon([{"params": matrices, "lr_scale": MUON_LR_SCALE}], lr=lr, weight_decay=weight_decay,
                            momentum=MUON_MOMENTUM, adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(adamw, muon, before_embed_group=[p for p in rest if p.dim() >= 2] + no_decay)


def embedding_tables(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the model's nn.Embedding layers (a tied output layer shares the token embedding's)."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]


class MuonAdamW:
    """``torch.optim.Muon`` on the hidden matrices and ``torch.optim.AdamW`` on the rest, as one optimizer.

    ``param_groups`` lists AdamW's groups, then Muon's: the loop sets every group's ``lr`` to the schedule's
    value; a Muon group multiplies it by its ``lr_scale`` for the step (and leaves ``lr`` as it was set).
    ``state_dict()`` is torch's format, the two optimizers' parameters numbered one after the other (AdamW's
    first) and each group marked with ``"optimizer"``, so checkpoints save and restore it exactly as AdamW's.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon, before_embed_group: list | None = None):
        self.adamw, self.muon = adamw, muon
        self.before_embed_group = before_embed_group  # AdamW's parameters in the order of a checkpoint made before
        # the embedding had a group of its own (decay, then no-decay): such a checkpoint still resumes

    @property
    def param_groups(self) -> list[dict]:
        return [*self.adamw.param_groups, *self.muon.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for optimizer in (self.adamw, self.muon):
            lrs = [g["lr"] for g in optimizer.param_groups]
            try:
                for g, lr in zip(optimizer.param_groups, lrs):
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                optimizer.step()
            finally:  # the schedule's values back, exactly
                for g, lr in zip(optimizer.param_groups, lrs):
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
        state_dict = self._with_embed_group(state_dict)
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

    def _with_embed_group(self, state_dict: dict) -> dict:
        """A checkpoint from before the embedding tables had an AdamW group of their own (AdamW: decay, no-decay)
        in today's layout: the same per-parameter state, renumbered; anything else as it is."""
        groups = state_dict["param_groups"]
        old = [g for g in groups if g.get("optimizer", "adamw") == "adamw"]
        if (self.before_embed_group is None or any("lr_scale" in g for g in old)
                or not any("lr_scale" in g for g in self.adamw.param_groups)
                or sum(len(g["params"]) for g in old) != len(self.before_embed_group)):
            return state_dict
        now = [p for g in self.adamw.param_groups for p in g["params"]]
        where = {id(p): i for i, p in enumerate(now)}
        order = sorted(int(i) for g in old for i in g["params"])
        renumber = {i: where[id(p)] for i, p in zip(order, self.before_embed_group)}
        home = {renumber[int(i)]: g for g in old for i in g["params"]}  # today's index -> the group it was in
        n_old, n_now = len(order), len(now)
        state = {(renumber[int(i)] if int(i) < n_old else int(i) - n_old + n_now): s
                 for i, s in state_dict["state"].items()}
        adamw, start = [], 0
        for g in self.adamw.param_groups:
            ids = list(range(start, start + len(g["params"])))
            settings = {k: v for k, v in home[ids[0]].items() if k != "params"}
            adamw.append({**settings, "params": ids, **({"lr_scale": g["lr_scale"]} if "lr_scale" in g else {})})
            start += len(ids)
        muon = [{**g, "params": [int(i) - n_old + n_now for i in g["params"]]} for g in groups
                if g.get("optimizer", "adamw") == "muon"]
        return {"state": state, "param_groups": adamw + muon}
