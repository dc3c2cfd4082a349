"""Dense: linear layers laid out once for a decode step's small products (:mod:`zaizai.models.decode`)."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F


_DENSE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (its weights' versions, Dense)


class Dense:
    """``y = x W^T + b`` of one or more linear layers side by side (their weights (C_out_i, C_in) stacked), laid
    out once for a decode step's small products, with the activation or residual add fused where it can be.

    On CPU the weight is packed for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``, the layout Inductor's
    freezing uses): MKL's sgemm/sgemv, what ``F.linear`` calls, is 1.7-3x slower at 1-32 rows on the AMD EPYC
    this project measures on (6L/384d, a step's 25 products timed in a loop, 2 threads: 3.7 vs 6.8 ms at one
    row, 7.5 vs 15.4 ms at 32; bench/generate_speed.py shows the whole step). Elsewhere (CUDA, or a torch built without oneDNN) it is a contiguous (C_in, C_out)
    copy and ``torch.mm``. A copy either way: the step reads these, not the model's weights.
    """

    ROWS_HINT = 32  # the batch oneDNN lays the weight out for; any number of rows works
    ONEDNN_BYTES = 1 << 20  # smaller weights stay with torch.mm: a oneDNN call costs ~20 us more at one row

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor] | None):
        weight = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
        self.bias = None if biases is None else torch.cat([b.detach() for b in biases]).contiguous()
        self.packed = None
        if weight.numel() * weight.element_size() >= self.ONEDNN_BYTES and _onednn_ok(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), self.ROWS_HINT)
        else:
            self.weight_t = weight.t().contiguous()  # (C_in, C_out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, C_in) -> (n, C_out)."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.mm(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        """GELU (tanh form, GPT-2's) of the product, fused into it where oneDNN runs it."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], "tanh")
        return F.gelu(self(x), approximate="tanh")

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + the product of x: a block's output added to the stream it came from."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        if self.bias is None:
            return torch.addmm(residual, x, self.weight_t)
        return residual + torch.addmm(self.bias, x, self.weight_t)


_ONEDNN: dict = {}


def _onednn_ok(weight: torch.Tensor) -> bool:
    """Whether oneDNN's packed linear runs here for ``weight``'s dtype: CPU, fp32 or bf16, and a trial product
    equal to torch's (a build without oneDNN, or one whose private ops changed, falls back to torch.mm)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    if weight.dtype not in _ONEDNN:
        try:
            w = torch.linspace(-1, 1, 48, dtype=weight.dtype).view(6, 8)
            x = torch.linspace(1, -1, 24, dtype=weight.dtype).view(3, 8)
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), None, "none",
                                                   [], "")
            _ONEDNN[weight.dtype] = bool(torch.backends.mkldnn.is_available()) and torch.allclose(
                y.float(), (x.float() @ w.float().t()), atol=0.1)
        except (AttributeError, RuntimeError, NotImplementedError):
            _ONEDNN[weight.dtype] = False
    return _ONEDNN[weight.dtype]


def _dense1(layer: torch.nn.Linear) -> Dense:
    return dense(layer, (layer,))


def dense(owner: torch.nn.Module, layers: tuple[torch.nn.Linear, ...]) -> Dense:
    """The :class:`Dense` of ``layers`` (side by side), made once per ``owner`` and again after a weight changes
    (a training step, a load): a Batch makes its decoder per generation, the weights' layout is made once."""
    weights = [layer.weight for layer in layers]
    biases = None if layers[0].bias is None else [layer.bias for layer in layers]
    if any(w.is_inference() for w in weights):  # no version counter to tell a change: lay out every time
        return Dense(weights, biases)
    tensors = weights + (biases or [])
    version = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    held = _DENSE.get(owner)
    if held is None or held[0] != version:
        held = (version, Dense(weights, biases))
        _DENSE[owner] = held
    return held[1]
