"""zaizai's modern model <-> Hugging Face's Qwen3ForCausalLM and LlamaForCausalLM.

The modern block with QK-norm is Qwen3's, without it Llama's (``ModelConfig.qk_norm``), and its parameter names
are transformers' (``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj`` ...): export and import copy
the tensors as they are, only the config is translated. Both use RoPE in the "rotate half" layout, which is
zaizai's.

What import checks in config.json, before anything is built (each a clear refusal): the types of the values (as
for GPT-2, :mod:`zaizai.interop.hf_read`); ``head_dim`` equal to hidden_size / num_attention_heads (transformers'
Qwen3Config defaults it to 128 when the file leaves it out); no biases (``attention_bias``, ``mlp_bias``); SiLU;
plain RoPE (``rope_scaling`` / a ``rope_type`` other than "default" is refused); no sliding-window layers; a
context of at most :data:`MAX_CONTEXT` positions (the rotation tables are allocated for all of them). Then the
safetensors headers must hold exactly the shapes the config describes (:func:`check_shapes`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..common.errors import ZaizaiError
from ..models import ModelConfig
from ..models.modern import swiglu_hidden
from .hf_read import positive_int, show

QWEN3, LLAMA = "qwen3", "llama"
MODERN_TYPES = (QWEN3, LLAMA)
ARCHITECTURES = {QWEN3: "Qwen3ForCausalLM", LLAMA: "LlamaForCausalLM"}
QWEN3_HEAD_DIM = 128  # transformers' Qwen3Config default when config.json has no head_dim
MAX_CONTEXT = 1 << 17  # 131,072 positions: the rotation tables and a full KV cache must fit in memory
EMBEDDING = "model.embed_tokens.weight"


def family(c: ModelConfig) -> str:
    """"qwen3" (with QK-norm) or "llama" (without)."""
    return QWEN3 if c.qk_norm else LLAMA


def hf_name(key: str) -> str | None:
    """A tensor's zaizai name (the same); None for the rotation frequencies old Llama checkpoints saved."""
    return None if key.endswith("rotary_emb.inv_freq") else key


# --------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------


def export_config(c: ModelConfig, *, bos: int, eos: int, pad: int) -> dict[str, Any]:
    """config.json of the Qwen3ForCausalLM (or LlamaForCausalLM, without QK-norm) that computes ``c``."""
    kind = family(c)
    config = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": swiglu_hidden(c),
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.n_embd // c.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.rms_norm_eps,
        # transformers 4.x reads rope_theta, 5.x rope_parameters (and converts a lone rope_theta)
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    }
    if kind == QWEN3:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    else:
        config.update(mlp_bias=False, pretraining_tp=1)
    return config


# --------------------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------------------


def _number(config: dict[str, Any], key: str, default: float, src: Path) -> float:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ZaizaiError(f"{src}/config.json: {key} is {show(value)}, not a number")
    return float(value)


def _rope_theta(config: dict[str, Any], src: Path, unsupported: list[str]) -> float:
    """The RoPE base from rope_theta (transformers 4.x) or rope_parameters (5.x); scaled RoPE is unsupported."""
    theta = _number(config, "rope_theta", 10000.0, src)
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ZaizaiError(f"{src}/config.json: {key} is {show(value)}, not a table")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            unsupported.append(f"{key} {show(kind)} (zaizai computes plain RoPE; rope scaling is not supported)")
        if value.get("partial_rotary_factor", 1.0) != 1.0:
            unsupported.append(f"partial_rotary_factor {show(value['partial_rotary_factor'])} (zaizai rotates "
                               "whole heads)")
        if "rope_theta" in value:
            theta = _number(value, "rope_theta", theta, src)
    if theta <= 1.0:
        unsupported.append(f"rope_theta {theta} (must be greater than 1)")
    return theta


def _bool(config: dict[str, Any], key: str, default: bool, src: Path) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ZaizaiError(f"{src}/config.json: {key} is {show(value)}, not true or false")
    return value


def model_config(config: dict[str, Any], src: Path) -> ModelConfig:
    """config.json of a Qwen3 or Llama -> a modern ModelConfig, refusing what the modern block does not compute."""
    kind = config.get("model_type")
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "vocab_size")
    C, n_layer, n_head, hidden, context, vocab = (positive_int(config, key, src=src) for key in names)
    if None in (C, n_layer, n_head, hidden, context, vocab):
        raise ZaizaiError(f"{src}/config.json lacks one of {', '.join(names)}; is it a {kind} model's config?")
    n_kv = positive_int(config, "num_key_value_heads", src=src) or n_head
    head_dim = positive_int(config, "head_dim", src=src) or (QWEN3_HEAD_DIM if kind == QWEN3 else C // n_head)
    unsupported = []
    if C % n_head or head_dim != C // n_head:
        unsupported.append(f"head_dim {head_dim} with hidden_size {C} and {n_head} heads (zaizai's heads are "
                           "hidden_size / num_attention_heads wide)")
    if n_head % n_kv:
        unsupported.append(f"num_key_value_heads {n_kv} does not divide num_attention_heads {n_head}")
    for key in ("attention_bias", "mlp_bias"):
        if _bool(config, key, False, src):
            unsupported.append(f"{key} (zaizai's modern block has no biases)")
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        unsupported.append(f"hidden_act {show(activation)} (zaizai uses silu)")
    theta = _rope_theta(config, src, unsupported)
    eps = _number(config, "rms_norm_eps", 1e-6, src)
    if not 0.0 < eps < 1.0:
        unsupported.append(f"rms_norm_eps {eps}")
    if kind == QWEN3 and _bool(config, "use_sliding_window", False, src):
        unsupported.append("use_sliding_window (zaizai attends to the whole context)")
    layer_types = config.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list)
                                    or any(t != "full_attention" for t in layer_types)):
        unsupported.append(f"layer_types {show(layer_types)} (zaizai has full attention in every layer)")
    if context > MAX_CONTEXT:
        unsupported.append(f"max_position_embeddings {context} (zaizai allocates rotations for every position; at "
                           f"most {MAX_CONTEXT})")
    tied = _bool(config, "tie_word_embeddings", False, src)  # transformers' default for both
    if unsupported:
        raise ZaizaiError(f"{src}: zaizai's modern model cannot compute this {kind} model: {'; '.join(unsupported)}")
    return ModelConfig(model="modern", vocab_size=vocab, block_size=context, n_layer=n_layer, n_head=n_head,
                       n_embd=C, dropout=0.0, bias=False, n_kv_head=0 if n_kv == n_head else n_kv, rope_theta=theta,
                       ffn_hidden=hidden, tie_embeddings=tied, qk_norm=kind == QWEN3, rms_norm_eps=eps)


def check_shapes(shapes: dict[str, tuple[int, ...]], c: ModelConfig, src: Path) -> None:
    """Refuse unless the weights are exactly the Qwen3 / Llama config.json describes (before anything is built).
    A tied model may still carry an ``lm_head.weight`` (it must then equal the embedding; checked on reading)."""
    layers = {int(m.group(1)) for name in shapes if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if len(layers) != c.n_layer or max(layers, default=-1) != c.n_layer - 1:  # not set(range(n)): n may be 1e8
        raise ZaizaiError(f"{src}: config.json says num_hidden_layers {c.n_layer} but the weights hold "
                          f"{len(layers)} layers; the folder mixes files of different models")
    C, V, hs, H = c.n_embd, c.vocab_size, c.n_embd // c.n_head, swiglu_hidden(c)
    q, kv = c.n_head * hs, c.kv_heads * hs
    want = {EMBEDDING: (V, C), "model.norm.weight": (C,)}
    layer = {"input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
             "self_attn.q_proj.weight": (q, C), "self_attn.k_proj.weight": (kv, C),
             "self_attn.v_proj.weight": (kv, C), "self_attn.o_proj.weight": (C, q),
             "mlp.gate_proj.weight": (H, C), "mlp.up_proj.weight": (H, C), "mlp.down_proj.weight": (C, H)}
    if c.qk_norm:
        layer |= {"self_attn.q_norm.weight": (hs,), "self_attn.k_norm.weight": (hs,)}
    for i in range(c.n_layer):
        want |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    if not c.tie_embeddings or "lm_head.weight" in shapes:
        want["lm_head.weight"] = (V, C)
    if EMBEDDING not in shapes:
        raise ZaizaiError(f"{src}: the weights have no {EMBEDDING}; is this a {family(c)} checkpoint?")
    wrong = ([f"{name} is {shapes.get(name, 'missing')}, config.json says {shape}" for name, shape in want.items()
              if shapes.get(name) != shape]
             + [f"{name} is not a {family(c)} weight zaizai computes" for name in shapes if name not in want])
    if wrong:
        more = f" (and {len(wrong) - 2} more)" if len(wrong) > 2 else ""
        raise ZaizaiError(f"{src}: the weights do not fit config.json: {'; '.join(wrong[:2])}{more}")
