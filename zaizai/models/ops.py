"""The attention and loss computations of the models, each tested equal to its plain form (tests/test_models.py).

- :func:`linear_cross_entropy`: the output layer and its loss, ``F.linear`` + ``F.cross_entropy``.
- :func:`causal_attention`: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` (or a given mask).
- :func:`attention_with_weights`: the textbook softmax(q k^T / sqrt(hs)) v, which also returns the weights.

With a character vocabulary of ~10k and a small model, the output layer is most of a training step on CPU:
see bench/train_speed.py for the measurements behind the choices made here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..common.ids import IGNORE_INDEX

# Rows of fp32 probabilities handled at once: small enough to stay in the cores' L2 cache (measured on
# 2 cores with 2 MiB L2 each: 1-2 MiB is the sweet spot; 4 MiB and up is ~2x slower).
_SOFTMAX_CHUNK_BYTES = 1 << 20


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """``(logits, loss)`` of an output layer without bias: ``logits = x @ weight^T`` and their mean
    cross-entropy against ``targets``, in fp32, ignoring targets equal to IGNORE_INDEX (-1).

    x (N, C), weight (V, C), targets (N,) int64 -> logits (N, V), loss (). Equal to
    ``logits = F.linear(x, weight); F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)``; under
    autocast the matmuls run in the autocast dtype, as ``F.linear`` would. On CPU this goes through a fused
    version that is several times faster (see ``_LinearCrossEntropy``); on GPUs, and under torch.compile
    (which fuses the plain form itself), through the plain form.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        logits = F.linear(x, weight)
        return logits, F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
    else:
        weight = weight.to(x.dtype)
    return _LinearCrossEntropy.apply(x, weight, targets)


class _LinearCrossEntropy(torch.autograd.Function):
    """The output layer and its loss in one step, with the loss's gradient made during the forward pass.

    The plain path makes several full passes over the (N, V) logits: an fp32 copy, log_softmax, a zeroed
    one-hot gradient, log_softmax's backward, a copy back to bf16. Here the softmax runs in fp32 over row
    chunks that fit in cache, and each chunk's probabilities go straight into the gradient buffer, since
    d loss / d logits = (softmax - one_hot(target)) / n. The backward pass is then just two matmuls,
    with the 1/n applied to their small results instead of the (N, V) gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, targets):
        N, V = x.shape[0], weight.shape[0]
        logits = torch.mm(x, weight.t())  # (N, V), x's dtype
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad = torch.empty_like(logits) if need_grad else None  # (N, V) softmax - one_hot, row by row
        valid = targets != IGNORE_INDEX  # (N,)
        safe_targets = targets.clamp(min=0)  # (N,) ignored rows point at class 0, masked out below
        acc_dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 (fp64 for fp64 inputs)
        p_target = torch.empty(N, dtype=acc_dtype)  # (N,) the probability of each row's target
        rows = torch.arange(N)
        chunk = max(1, _SOFTMAX_CHUNK_BYTES // (4 * V))
        for start in range(0, N, chunk):
            end = min(N, start + chunk)
            probs = torch.softmax(logits[start:end].to(acc_dtype), dim=1)  # (n, V), in cache
            p_target[start:end] = probs[rows[: end - start], safe_targets[start:end]]
            if grad is not None:
                grad[start:end] = probs
        losses = -torch.log(p_target)  # (N,) exact in fp32 ...
        tiny = (p_target < torch.finfo(acc_dtype).tiny) & valid  # ... unless p underflowed (logit gap > ~87)
        if tiny.any():
            bad = tiny.nonzero().squeeze(1)
            bad_logits = logits[bad].to(acc_dtype)  # (k, V)
            losses[bad] = torch.logsumexp(bad_logits, dim=1) - bad_logits[rows[: len(bad)], safe_targets[bad]]
        n_valid = valid.sum()
        loss = torch.where(valid, losses, 0.0).sum() / n_valid  # nan if all are ignored, as F.cross_entropy

        if grad is not None:
            grad[rows, safe_targets] = (p_target - 1).to(grad.dtype)  # minus the one-hot, rounded once
            if not bool(valid.all()):
                grad[~valid] = 0
            ctx.save_for_backward(x, weight, grad, n_valid)
        ctx.set_materialize_grads(False)
        return logits, loss

    @staticmethod
    def backward(ctx, grad_logits, grad_loss):
        x, weight, grad, n_valid = ctx.saved_tensors
        g, scale = grad, None
        if grad_loss is not None:
            scale = grad_loss / n_valid  # (): d total / d loss, times the mean's 1/n (fp32, or fp64)
        if grad_logits is not None:  # the logits were used downstream too (rare): one (N, V) gradient
            g = grad_logits if scale is None else grad_logits + grad * scale
            scale = None
        elif scale is None:
            return None, None, None
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight)  # (N, C)
            grad_x = grad_x if scale is None else grad_x.mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(g.t(), x)  # (V, C)
            grad_weight = grad_weight if scale is None else grad_weight.mul_(scale)
        return grad_x, grad_weight, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v for (B, nh, T, hs) tensors, through PyTorch's fused SDPA.

    ``attn_mask`` (B, 1, T, T) bool, True where a query may attend, replaces the causal mask (it must be
    causal itself; packed segments use it); without it SDPA's ``is_causal`` path runs, which is faster.

    On CPU the fused kernel is ~10x slower in bf16 than in fp32 at small head sizes (forward + backward,
    torch 2.13, AVX512-BF16/AMX cores: 9 ms vs 0.8 ms per layer at B=12, nh=4, T=64, hs=32), so under CPU
    autocast the attention itself runs in fp32: faster, and more accurate. GPUs keep the autocast dtype.
    """
    causal = dict(is_causal=True) if attn_mask is None else dict(attn_mask=attn_mask)
    if q.device.type == "cpu" and q.dtype != torch.float32:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p, **causal)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **causal)


def attention_with_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook attention of the articles, softmax(q k^T / sqrt(hs)) v, keeping its weights.

    q (B, nh, T, hs), k and v (B, nh, S, hs), mask (T, S) or (B, 1, T, S) bool, True where a query may attend
    -> (y (B, nh, T, hs), weights (B, nh, T, S) in fp32, each row summing to 1).
    """
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (B, nh, T, S)
    return (weights @ v.float()).to(q.dtype), weights
