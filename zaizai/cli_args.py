"""The command line's argument types and the help of the flags made from the config dataclasses.

A bad number (``nan``, ``inf``, ``-1``, ``2**70``) is argparse's usual one-line error (exit 2), never a traceback
later. Helps are Chinese first: "中文 · English".
"""

from __future__ import annotations

import argparse
import math

MAX_INT = 2**63 - 1  # the largest seed torch and numpy take; a larger count is a typo anyway


def int_type(name: str, lo: int, hi: int = MAX_INT):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"须为整数 must be a whole number, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"须为 >= {lo} 的整数 must be a whole number >= {lo}, got {text}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"太大 too large: at most {hi}, got {text}")
        return value

    parse.__name__ = name
    return parse


def float_type(name: str, lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    if hi is not None:
        shown = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    else:
        shown = "" if lo is None else f"> {lo:g}" if lo_open else f">= {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"须为数字 must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"须为有限的数 must be a finite number, got {text}")
        low_ok = lo is None or (value > lo if lo_open else value >= lo)
        high_ok = hi is None or (value < hi if hi_open else value <= hi)
        if not (low_ok and high_ok):
            where = f"须在 {shown} 之内 must be in {shown}" if hi is not None else f"须为 {shown} 的数 must be a number {shown}"
            raise argparse.ArgumentTypeError(f"{where}, got {text}")
        return value

    parse.__name__ = name
    return parse


positive_int = int_type("positive_int", 1)
nonneg_int = int_type("nonneg_int", 0)
seed_int = int_type("seed_int", 0)
any_int = int_type("any_int", -MAX_INT - 1)
port_int = int_type("port_int", 1, 65535)
max_tokens_int = int_type("max_tokens_int", 1, 4096)  # the server's own limit
finite_float = float_type("finite_float")
nonneg_float = float_type("nonneg_float", 0.0)
positive_float = float_type("positive_float", 0.0, lo_open=True)
probability = float_type("probability", 0.0, 1.0, lo_open=True)            # (0, 1]: top-p
fraction = float_type("fraction", 0.0, 1.0, hi_open=True)                   # [0, 1): dropout, betas
open_fraction = float_type("open_fraction", 0.0, 1.0, lo_open=True, hi_open=True)  # (0, 1): --val-fraction

# The type of each flag generated from the config dataclasses; other fields get any_int / finite_float / str.
FIELD_TYPE = {
    **dict.fromkeys(("block_size", "n_layer", "n_head", "n_embd", "batch_size", "grad_accum", "eval_iters"),
                    positive_int),
    **dict.fromkeys(("max_iters", "warmup_iters", "eval_interval", "threads", "n_kv_head", "ffn_hidden"), nonneg_int),
    **dict.fromkeys(("max_time", "weight_decay", "grad_clip"), nonneg_float),
    **dict.fromkeys(("dropout", "beta1", "beta2"), fraction),
    "seed": seed_int, "lr": positive_float, "rope_theta": positive_float, "min_lr": finite_float,
}

# Help for the flags generated from the config dataclasses (one flag per field): "中文 · English".
FIELD_HELP = {
    "model": "模型结构 · bigram | rnn | gpt | modern (a Qwen3-style block)",
    "block_size": "上下文长度 · context length in tokens",
    "n_layer": "层数 · transformer blocks (gpt) or GRU layers (rnn)",
    "n_head": "注意力头数 · attention heads (gpt)",
    "n_embd": "嵌入宽度 · embedding width",
    "dropout": "丢弃率 · dropout probability, [0, 1)",
    "bias": "线性层和 LayerNorm 带偏置 · biases in Linear/LayerNorm",
    "n_kv_head": "键值头数（modern）· key/value heads of grouped-query attention (modern; 0 = n_head)",
    "rope_theta": "RoPE 基数（modern）· RoPE base (modern)",
    "ffn_hidden": "前馈层宽度（modern）· SwiGLU inner width (modern; 0 = 8/3 n_embd, a multiple of 64)",
    "tie_embeddings": "输出层共用词嵌入（modern）· the output layer is the token embedding (modern)",
    "qk_norm": "QK 归一化（modern；关掉即 Llama 块）· RMSNorm on queries and keys (modern; off = a Llama block)", "rms_norm_eps": "RMSNorm 的 epsilon（modern）· RMSNorm epsilon (modern)",
    "preset": "预设 · named defaults",
    "batch_size": "批大小 · sequences per micro-step",
    "grad_accum": "梯度累积 · micro-steps per optimizer step",
    "max_iters": "最多步数 · stop after this many optimizer steps (0 = no limit)",
    "max_time": "时间预算（秒）· stop after this many seconds, the lr schedule fits it (0 = none)",
    "lr": "峰值学习率 · peak learning rate",
    "min_lr": "最终学习率 · final learning rate of the cosine decay; negative = lr/10",
    "warmup_iters": "预热步数 · linear warmup steps",
    "weight_decay": "权重衰减 · weight decay on 2-D weights",
    "beta1": "AdamW 一阶动量 · AdamW beta1",
    "beta2": "AdamW 二阶动量 · AdamW beta2",
    "grad_clip": "梯度裁剪 · clip the global gradient norm (0 = off)",
    "eval_interval": "评估间隔 · steps between evaluations and `last` checkpoints (0 = about 20 over the run)",
    "eval_iters": "每次评估的批数 · batches per loss estimate",
    "device": "设备 · auto | cpu | cuda | mps",
    "dtype": "数值类型 · auto | float32 | bfloat16 | float16",
    "compile": "用 torch.compile 编译模型 · torch.compile the model",
    "threads": "CPU 线程数 · CPU threads (0 = chosen for this machine)",
    "seed": "随机种子 · random seed",
    "resume": "接着训练 --out 里的运行 · continue the run saved in --out",
    "overwrite": "从头训练，替换 --out 里的模型 · start over even if --out already holds a model",
    "loss_on": "对话数据学哪些轮 · dialogue data: learn the assistant turns only (assistant) or every turn (all)",
    "init_from": "从这个已训练模型的权重开始（预训练 → 微调）· start from this trained model's weights "
                 "(pretrain -> fine-tune)",
    "optimizer": "优化器 · adamw | muon (Muon for hidden matrices, AdamW for the rest)",
}
