"""Reading a Hugging Face folder (GPT-2; Qwen3 and Llama in :mod:`zaizai.interop.hf_modern`) for
``zaizai import-hf``, which may come from anyone.

- Only files inside the folder are read: a ``weight_map`` entry must be a relative file name without ``..``, and
  a symbolic link must lead inside the folder (or, in transformers' own cache, from ``snapshots/<commit>/`` into
  the model's ``blobs/``).
- Every value config.json gives is checked for its type (``true`` is no number) before it is used.
- Sizes are checked before anything is allocated: the tensor shapes come from the safetensors headers (which the
  library checks against the file sizes) and must be exactly what config.json describes, the tokenizer may not
  name more ids than the embedding has rows. So a loader never allocates more than the weights on disk justify.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

import torch

from ..common.errors import ZaizaiError
from ..models import ModelConfig

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the same function (up to float rounding)
LAYER_NORM_EPS = 1e-5  # what zaizai's nn.LayerNorm uses
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
ROLE_KEYS = ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token", "bos_token", "eos_token")
CACHE_LINK = "snapshots"  # transformers' cache: models--x--y/snapshots/<commit>/<file> -> ../../blobs/<hash>

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 40
_short.maxlevel = 2


def show(value: Any) -> str:
    """A value from a file, shortened for a message."""
    return _short.repr(value)


# --------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------


def inside(src: Path, path: Path) -> Path:
    """``path`` if it (after links) lies inside ``src``; refuse otherwise."""
    try:
        root, real = src.resolve(strict=True), path.resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise ZaizaiError(f"{path} cannot be followed ({e})") from None
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == CACHE_LINK else [])
    if not any(real == a or a in real.parents for a in allowed):
        raise ZaizaiError(f"{path} leads outside {src} (to {real}); import-hf reads only files inside the folder")
    return path


def source_file(src: Path, name: str) -> Path | None:
    """``src/name`` if it is a file inside ``src``, None if there is none."""
    path = src / name
    return inside(src, path) if path.is_file() else None


def read_json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZaizaiError(f"{path} is missing; give a folder saved by transformers' save_pretrained") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise ZaizaiError(f"{path} is not valid JSON ({str(e) or type(e).__name__}); download it again") from None
    except OSError as e:
        raise ZaizaiError(f"cannot read {path} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ZaizaiError(f"{path} is not a JSON object; download it again")
    return data


def read_source_json(src: Path, name: str) -> dict[str, Any]:
    """``src/name`` as a JSON object (missing: an error), read only from inside ``src``."""
    path = src / name
    if path.exists() or path.is_symlink():
        inside(src, path)
    return read_json_file(path)


# --------------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------------


def positive_int(config: dict[str, Any], *keys: str, src: Path) -> int | None:
    """The first of ``keys`` config.json sets, which must be a positive whole number (not a bool)."""
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ZaizaiError(f"{src}/config.json: {key} is {show(value)}, not a positive whole number")
        return value
    return None


READS = "import-hf reads GPT-2, Qwen3 and Llama checkpoints (model_type gpt2, qwen3 or llama)"


def model_type_of(config: dict[str, Any], src: Path) -> str:
    """config.json's ``model_type``; a folder without one is not a transformers model (say what it is instead)."""
    model_type = config.get("model_type")
    if model_type is not None:
        return model_type
    from ..common.outputs import MODEL, folder_kind

    if folder_kind(src) == MODEL:
        raise ZaizaiError(f"{src} 已是 zaizai 模型文件夹，无需导入 · is a zaizai model folder already: use it as "
                          "it is (zaizai sample/chat/train --init-from); import-hf reads a transformers folder")
    raise ZaizaiError(f"{src}/config.json has no model_type, so it is no transformers model; give a folder "
                      "saved by transformers' save_pretrained")


def model_config(config: dict[str, Any], src: Path) -> ModelConfig:
    """config.json of a GPT-2 -> zaizai's ModelConfig, refusing a wrong type or what zaizai's GPT does not compute."""
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise ZaizaiError(f"{src} holds a {show(model_type)} model; {READS}")
    n_embd = positive_int(config, "n_embd", "hidden_size", src=src)
    n_layer = positive_int(config, "n_layer", "num_hidden_layers", src=src)
    n_head, n_positions = positive_int(config, "n_head", src=src), positive_int(config, "n_positions", "n_ctx",
                                                                                src=src)
    vocab_size = positive_int(config, "vocab_size", src=src)
    if None in (n_embd, n_layer, n_head, n_positions, vocab_size):
        raise ZaizaiError(f"{src}/config.json lacks n_embd, n_layer, n_head, n_positions or vocab_size")
    unsupported = []
    activation = config.get("activation_function")
    if activation is not None and (not isinstance(activation, str) or activation not in GELU_TANH):
        unsupported.append(f"activation_function {show(activation)} (zaizai uses gelu_new)")
    n_inner = config.get("n_inner")
    if n_inner is not None and (isinstance(n_inner, bool) or n_inner != 4 * n_embd):
        unsupported.append(f"n_inner {show(n_inner)} (zaizai uses 4 x n_embd)")
    eps = config.get("layer_norm_epsilon")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                            or abs(eps - LAYER_NORM_EPS) > 1e-12):
        unsupported.append(f"layer_norm_epsilon {show(eps)} (zaizai uses 1e-5)")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
        unsupported.append("a different attention scaling (zaizai divides by sqrt(head size))")
    if config.get("tie_word_embeddings") is False:
        unsupported.append("untied input and output embeddings (zaizai ties them)")
    if n_embd % n_head:
        unsupported.append(f"n_embd {n_embd} not divisible by n_head {n_head}")
    if unsupported:
        raise ZaizaiError(f"{src}: zaizai's GPT cannot compute this model: {'; '.join(unsupported)}")
    return ModelConfig(model="gpt", vocab_size=vocab_size, block_size=n_positions, n_layer=n_layer,
                       n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True)


# --------------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------------


def _shard(src: Path, index: Path, key: Any, name: Any) -> Path:
    """The file a ``weight_map`` entry names: a relative name inside ``src``."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ZaizaiError(f"{index}: weight_map[{show(key)}] is {show(name)}, not a file name; the index is damaged")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise ZaizaiError(f"{index}: weight_map names {show(name)}, outside the folder; import-hf reads only "
                          "files inside it")
    path = src / name
    if not path.is_file():
        raise ZaizaiError(f"{path} is listed in the index but missing; download it again")
    return inside(src, path)


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of the folder: model.safetensors or the shards its index lists."""
    import shlex

    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file() or single.is_symlink():
        return [inside(src, single)]
    if index.is_file():
        weight_map = read_source_json(src, index.name).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ZaizaiError(f"{index} has no weight_map; the download is incomplete")
        return sorted({_shard(src, index, key, name) for key, name in weight_map.items()})
    if any((src / name).is_file() for name in ("pytorch_model.bin", "model.bin", "tf_model.h5")):
        program = (f"from transformers import AutoModelForCausalLM as M; "
                   f"M.from_pretrained({str(src)!r}).save_pretrained({str(src)!r})")
        raise ZaizaiError(
            f"{src} has its weights in a pickle (pytorch_model.bin), which zaizai never loads (a pickle can run "
            f"code); convert it once with transformers: python -c {shlex.quote(program)} (writes "
            "model.safetensors), then import again")
    raise ZaizaiError(f"{src} has no model.safetensors; give a folder saved by transformers' save_pretrained")


def gpt2_name(key: str) -> str | None:
    """A GPT-2 tensor's name without ``transformer.``; None for the causal mask old transformers versions saved."""
    name = key.removeprefix("transformer.")
    return None if name.endswith((".attn.bias", ".attn.masked_bias")) else name


def _scan(files: list[Path], rename: Callable[[str], str | None],
          visit: Callable[[Path, Any, str, str], None]) -> None:
    """``visit(path, f, key, name)`` for every tensor of ``files`` that ``rename`` gives a name (None: skip it);
    ``f`` is the open safetensors file. A damaged file is one error line, whatever reads it."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if (name := rename(key)) is not None:
                        visit(path, f, key, name)
        except (SafetensorError, OSError) as e:
            raise ZaizaiError(f"{path} is truncated or not a safetensors file ({e}); download it again") from None


def tensor_shapes(files: list[Path], rename: Callable[[str], str | None] = gpt2_name) -> dict[str, tuple[int, ...]]:
    """Shapes by name (``rename``: GPT-2's without ``transformer.``) from the safetensors headers; reads no
    tensor data."""
    shapes: dict[str, tuple[int, ...]] = {}

    def visit(path: Path, f, key: str, name: str) -> None:
        piece = f.get_slice(key)
        if piece.get_dtype() not in FLOAT_DTYPES:
            raise ZaizaiError(f"{path}: {key} holds {piece.get_dtype()} numbers; import-hf reads unquantized float "
                              f"weights ({', '.join(FLOAT_DTYPES)})")
        shapes[name] = tuple(piece.get_shape())

    _scan(files, rename, visit)
    return shapes


def check_shapes(shapes: dict[str, tuple[int, ...]], c: ModelConfig, src: Path) -> None:
    """Refuse unless the weights are exactly the GPT-2 config.json describes (before anything is built)."""
    layers = {int(m.group(1)) for name in shapes if (m := re.match(r"h\.(\d+)\.", name))}
    if len(layers) != c.n_layer or max(layers, default=-1) != c.n_layer - 1:  # not set(range(n)): n may be 1e8
        raise ZaizaiError(f"{src}: config.json says n_layer {c.n_layer} but the weights hold {len(layers)} "
                          "layers; the folder mixes files of different models")
    C, V, T = c.n_embd, c.vocab_size, c.block_size
    want = {"wte.weight": (V, C), "wpe.weight": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(c.n_layer):
        for name, shape in {"ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                            "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
                            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "mlp.c_fc.weight": (C, 4 * C),
                            "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
                            "mlp.c_proj.bias": (C,)}.items():
            want[f"h.{i}.{name}"] = shape
    if "lm_head.weight" in shapes:
        want["lm_head.weight"] = (V, C)
    if "wte.weight" not in shapes:
        raise ZaizaiError(f"{src}: the weights have no wte.weight; is this a GPT-2 checkpoint?")
    wrong = [f"{name} is {shapes.get(name, 'missing')}, config.json says {shape}" for name, shape in want.items()
             if shapes.get(name) != shape] + [f"{name} is not a GPT-2 weight" for name in shapes if name not in want]
    if wrong:
        more = f" (and {len(wrong) - 2} more)" if len(wrong) > 2 else ""
        raise ZaizaiError(f"{src}: the weights do not fit config.json: {'; '.join(wrong[:2])}{more}")


def read_weights(files: list[Path], rename: Callable[[str], str | None] = gpt2_name) -> dict[str, torch.Tensor]:
    """The model's tensors in float32 under the names ``rename`` gives (call :func:`tensor_shapes` and check the
    shapes first)."""
    weights: dict[str, torch.Tensor] = {}

    def visit(path: Path, f, key: str, name: str) -> None:
        weights[name] = f.get_tensor(key).float()

    _scan(files, rename, visit)
    return weights


def untie_check(weights: dict[str, torch.Tensor], embedding: str, src: Path) -> None:
    """Drop a saved ``lm_head.weight`` of a model whose output layer is its embedding, refusing one that differs."""
    head = weights.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, weights[embedding]):
        raise ZaizaiError(f"{src}: lm_head.weight differs from {embedding} but config.json ties them "
                          "(tie_word_embeddings); the folder mixes files of different models")
