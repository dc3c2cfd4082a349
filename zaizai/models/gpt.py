"""GPT-2: a decoder-only transformer, readable top to bottom.

Module and parameter names follow GPT-2 (and nanoGPT) so that a checkpoint maps one-to-one onto Hugging
Face's ``GPT2LMHeadModel``: ``transformer.wte``, ``transformer.wpe``, ``transformer.h.{i}.ln_1``,
``.attn.c_attn``, ``.attn.c_proj``, ``.ln_2``, ``.mlp.c_fc``, ``.mlp.c_proj``, ``transformer.ln_f``,
``lm_head``. Hugging Face stores the four ``c_*`` weights as Conv1D, i.e. transposed relative to our
``nn.Linear`` weights.

Shapes: B batch, T time (tokens), C channels (n_embd), V vocab_size, nh heads, hs head size (C // nh).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZaizaiError
from .config import ModelConfig


class _LinearCrossEntropy(torch.autograd.Function):
    """logits = x @ weight^T and their mean cross-entropy, with the loss's gradient made in the forward pass.

    The output layer is the costliest part of a small model with a large vocabulary: (N, V) logits, and the
    plain ``F.cross_entropy(logits.float(), ...)`` path makes several full-size passes over them (an fp32
    copy, log_softmax, a zero-filled one-hot gradient, log_softmax's backward, a copy back to bf16). Here the
    softmax runs on row chunks small enough to stay in cache, in fp32, and each chunk's probabilities are
    written straight into the gradient buffer: d loss / d logits = (softmax - one_hot(target)) / n. The
    backward pass is then just the two matmuls. Rows whose target is -1 are ignored.
    """

    @staticmethod
    def forward(ctx, x, weight, targets):
        # x (N, C), weight (V, C), targets (N,) int64; x and weight share one dtype (bf16 under autocast)
        N, V = x.shape[0], weight.shape[0]
        logits = torch.mm(x, weight.t())  # (N, V)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad = torch.empty_like(logits) if need_grad else None  # (N, V) d loss / d logits, before the 1/n
        valid = targets != -1  # (N,)
        safe_targets = targets.clamp(min=0)  # (N,) ignored rows index class 0, then get masked out
        acc_dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        p_target = torch.empty(N, dtype=acc_dtype, device=x.device)  # (N,) softmax at the target
        rows = torch.arange(N, device=x.device)
        chunk = max(1, _SOFTMAX_CHUNK_BYTES // (4 * V))
        for start in range(0, N, chunk):
            end = min(N, start + chunk)
            probs = torch.softmax(logits[start:end].to(acc_dtype), dim=1)  # (n, V) fp32, in cache
            p_target[start:end] = probs[rows[: end - start], safe_targets[start:end]]
            if grad is not None:
                grad[start:end].copy_(probs)
        # -log(softmax) is exact in fp32 unless a target's probability underflowed to 0 (a logit more than
        # ~87 below the row's largest): those rows are recomputed as logsumexp - logit.
        losses = -torch.log(p_target)  # (N,)
        underflow = (p_target == 0) & valid
        if underflow.any():
            bad = underflow.nonzero().squeeze(1)
            bad_logits = logits[bad].to(acc_dtype)
            losses[bad] = torch.logsumexp(bad_logits, dim=1) - bad_logits[rows[: len(bad)], safe_targets[bad]]
        n_valid = valid.sum()
        loss = torch.where(valid, losses, 0.0).sum() / n_valid  # nan when every target is ignored, as F.cross_entropy
        if grad is not None:
            grad[rows, safe_targets] -= 1
            if not bool(valid.all()):
                grad[~valid] = 0
            ctx.save_for_backward(x, weight, grad, n_valid)
        ctx.set_materialize_grads(False)
        return logits, loss

    @staticmethod
    def backward(ctx, grad_logits, grad_loss):
        x, weight, grad, n_valid = ctx.saved_tensors
        if grad_loss is None and grad_logits is None:
            return None, None, None
        scale = grad_loss.float() / n_valid if grad_loss is not None else None  # d total / d loss, and the mean's 1/n
        if grad_logits is None:
            g = grad  # the 1/n scale goes on the small (N, C) and (V, C) products below, not on this (N, V)
        else:  # the logits were used downstream too (rare): sum both gradients at full size
            g = grad_logits if scale is None else grad_logits + grad * scale.to(grad.dtype)
            scale = None
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight)  # (N, C)
            grad_x = grad_x if scale is None else grad_x.mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(g.t(), x)  # (V, C)
            grad_weight = grad_weight if scale is None else grad_weight.mul_(scale)
        return grad_x, grad_weight, None


_SOFTMAX_CHUNK_BYTES = 2 << 20  # ~2 MiB of fp32 probabilities per chunk: two cores' share of L2


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """(logits, loss) of the output layer ``x @ weight^T`` (no bias) against ``targets`` (-1 = ignore).

    x (N, C), weight (V, C), targets (N,). Equal to ``F.linear`` then ``F.cross_entropy(logits.float(),
    targets, ignore_index=-1)``; under autocast the matmuls run in the autocast dtype, and the loss is
    computed in fp32 as in that reference.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    else:
        weight = weight.to(x.dtype)
    return _LinearCrossEntropy.apply(x, weight, targets)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v, for (B, nh, T, hs) tensors, through PyTorch's fused SDPA.

    On CPU the fused kernel is about ten times slower in bf16 than in fp32 at these small head sizes
    (forward plus backward, measured with torch 2.13 on AVX512-BF16/AMX cores), so under CPU bf16 autocast
    the attention itself runs in fp32: faster, and more accurate. GPUs keep the autocast dtype.
    """
    if q.device.type == "cpu" and q.dtype != torch.float32:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p, is_causal=True)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; the one place a KV cache will hook in."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: the output projection is the token embedding (one tensor, two uses).
        self.lm_head.weight = self.transformer.wte.weight

        self.apply(self._init_weights)
        # GPT-2: each residual branch ends in a c_proj; scale those so the residual stream's variance
        # does not grow with depth (2 branches per layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied lm_head counted once); ``non_embedding`` leaves out the position table.

        The token table is kept in, as nanoGPT does, because it is also the output layer's weight.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ZaizaiError(f"input has {T} tokens but block_size is {self.config.block_size}; crop the input")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)

        if targets is None:
            return self.lm_head(x), None  # (B, T, V)
        logits, loss = linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T))
        return logits.view(B, T, -1), loss  # (B, T, V), scalar
