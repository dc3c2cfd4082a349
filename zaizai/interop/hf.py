"""Hugging Face transformers <-> zaizai.

``export_hf``: a zaizai gpt (modern) model folder -> a folder ``GPT2LMHeadModel`` (``Qwen3ForCausalLM``, or
``LlamaForCausalLM`` for a modern model without QK-norm) and ``AutoTokenizer`` load with ``from_pretrained``:
``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` and
``tokenizer_config.json``; a chat model's has a chat template that renders a conversation exactly as
:func:`zaizai.data.dialogue.render_conversation` does (and import reads a model as chat only when it has it).

``import_hf``: a local GPT-2, Qwen3 or Llama folder (``config.json``, safetensors weights, and a
``tokenizer.json``, a BERT-style ``vocab.txt`` as the Chinese GPT-2 checkpoints have, or GPT-2's ``vocab.json``
+ ``merges.txt``) -> a zaizai gpt (GPT-2) or modern (Qwen3, Llama) model folder that samples, chats and
fine-tunes (``zaizai train --init-from``).

zaizai's GPT has GPT-2's parameter names (see :mod:`zaizai.models.gpt`); the only change of layout is that
Hugging Face keeps the four ``c_*`` projection weights as ``Conv1D``, the transpose of ``nn.Linear``. The
modern model has Qwen3's and Llama's names and layout (:mod:`zaizai.interop.hf_modern`).

Vocabulary on import: ids 0..5 must hold zaizai's special tokens, so the imported vocabulary is reordered
(:mod:`zaizai.interop.hf_vocab`). The embedding rows move with their tokens, so the model computes exactly what
it did before (tested: equal logits); a new token's row starts as the mean of the others (so do the rows of an
untied output layer). What import reads from
a folder it did not make, and what it checks first, is in :mod:`zaizai.interop.hf_read`.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import __version__
from ..common.errors import ZaizaiError
from ..common.fileio import remove_stale_temps, temp_name
from ..common.outputs import HF, MODEL, check_output_folder
from ..data.tokenizer import END_ID, EOT_ID, SPECIAL_TOKENS, UNK_ID, hf_tokenizer_config, special_token_texts
from ..inference.loaded import load
from ..models import build_model
from ..training.checkpoint import BEST, save_checkpoint
from ..training.config import TrainConfig
from . import hf_modern
from .hf_read import (CONV1D, LAYER_NORM_EPS, check_shapes, gpt2_name, model_config, model_type_of,
                      read_source_json, read_weights, tensor_shapes, untie_check, weight_files)
from .hf_vocab import read_tokenizer, zaizai_layout

__all__ = ["CONV1D", "LAYER_NORM_EPS", "chat_template", "export_hf", "import_hf"]


# --------------------------------------------------------------------------------------------------------
# the chat template
# --------------------------------------------------------------------------------------------------------


def chat_template(names: list[str] | None = None) -> str:
    """A Jinja chat template rendering messages as :func:`zaizai.data.dialogue.render_conversation` does:
    ``<|endoftext|>``, then per message its role marker, its text and ``<|end|>``; with
    ``add_generation_prompt`` a final ``<|assistant|>``. ``names``: the texts of ids 0..5
    (default zaizai's markers)."""
    eot, _, system, user, assistant, end = (json.dumps(n) for n in (names or SPECIAL_TOKENS))
    return (
        "{{- " + eot + " -}}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is not string -%}"
        "{{- raise_exception('zaizai models take text content only') -}}"
        "{%- elif message['role'] == 'system' -%}{{- " + system + " -}}"
        "{%- elif message['role'] == 'user' -%}{{- " + user + " -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- " + assistant + " -}}"
        "{%- else -%}{{- raise_exception('zaizai models know the roles system, user and assistant') -}}"
        "{%- endif -%}"
        "{{- message['content'] -}}{{- " + end + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + assistant + " -}}{%- endif -%}"
    )


# --------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------


def export_hf(model_dir: str | os.PathLike, to: str | os.PathLike, *, overwrite: bool = False,
              verbose: bool = True) -> Path:
    """Write the model in ``model_dir`` (a ``zaizai train`` folder) as a Hugging Face folder ``to``: a gpt as
    GPT2LMHeadModel, a modern model as Qwen3ForCausalLM (LlamaForCausalLM without QK-norm). An existing HF folder
    or other non-empty folder is replaced only with ``overwrite``, a model or data folder never."""
    check_output_folder(to, HF, overwrite=overwrite, flag="--to")
    _refuse_holding(Path(to), Path(model_dir), "--to", "the model folder")
    bot = load(model_dir, device="cpu")
    c = bot.model_config
    tok = bot.tokenizer
    names = special_token_texts(tok)
    chat = bot.is_chat_model
    eos = END_ID if chat else EOT_ID
    if c.model == "gpt":
        tensors, config = _gpt2_tensors(bot.model.state_dict(), c), _gpt2_config(c, eos)
    elif c.model == "modern":
        tensors = {name: t.float().contiguous().clone() for name, t in bot.model.state_dict().items()
                   if not (c.tie_embeddings and name == "lm_head.weight")}  # tied: transformers' own layout
        config = hf_modern.export_config(c, bos=EOT_ID, eos=eos, pad=EOT_ID)
    else:
        raise ZaizaiError(f"{model_dir} holds a {c.model} model; only gpt and modern models have a transformers "
                          "counterpart (GPT2LMHeadModel, Qwen3ForCausalLM)")
    arch = config["architectures"][0]
    generation = {"bos_token_id": EOT_ID, "eos_token_id": [END_ID, EOT_ID] if chat else EOT_ID,
                  "pad_token_id": EOT_ID}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[EOT_ID],
        "eos_token": names[eos],
        "unk_token": names[UNK_ID],
        "pad_token": names[EOT_ID],
        "additional_special_tokens": [n for n in names[2:] if n != names[eos]],
        "clean_up_tokenization_spaces": False,
        "model_max_length": c.block_size,
    }
    if chat:  # a plain model has no turn markers to render; import-hf reads the template as "chat model"
        tok_config["chat_template"] = chat_template(names)
    card = _model_card(bot, Path(to).name, names, chat, arch, step=bot.state.get("step"))

    from safetensors.torch import save_file

    with _new_folder(Path(to), overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation)
        tok.save(tmp / "tokenizer.json")
        _write_json(tmp / "tokenizer_config.json", tok_config)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    if verbose:
        print(f"已导出 exported {bot.path} -> {to} ({arch}, {bot.num_params() / 1e6:.2f}M parameters"
              f"{', chat template' if chat else ''})")
    return Path(to)


def _gpt2_tensors(state: dict[str, torch.Tensor], c) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors: Conv1D weights transposed, no lm_head (tied), zero biases for a bias-free gpt."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight, as GPT2LMHeadModel expects
        tensors[name] = (t.t() if name.endswith(CONV1D) else t).float().contiguous().clone()
    if not c.bias:  # GPT2LMHeadModel always has biases: zeros compute the same
        for name in list(tensors):
            if name.endswith((".ln_1.weight", ".ln_2.weight", "ln_f.weight")) or name.endswith(CONV1D):
                width = tensors[name].shape[-1]
                tensors[name[: -len("weight")] + "bias"] = torch.zeros(width)
    return tensors


def _gpt2_config(c, eos: int) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": eos,
        "pad_token_id": EOT_ID,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def _model_card(bot, name: str, names: list[str], chat: bool, arch: str, *, step) -> str:
    """The export's README.md: what the model is and a snippet that runs it in transformers."""
    from ..data.dialogue import render_conversation

    c, tok = bot.model_config, bot.tokenizer
    if arch == "GPT2LMHeadModel":
        what, heads, imports, cls = "A GPT-2", f"{c.n_head} heads", "AutoTokenizer, GPT2LMHeadModel", arch
    else:  # the Auto class picks Qwen3ForCausalLM / LlamaForCausalLM from config.json
        what = f"A {'Qwen3' if arch.startswith('Qwen3') else 'Llama'}-style model ({arch})"
        heads = f"{c.n_head} heads ({c.kv_heads} key/value)"
        imports, cls = "AutoModelForCausalLM, AutoTokenizer", "AutoModelForCausalLM"
    card = (f"# {name}\n\n{what} trained with [zaizai](https://pypi.org/project/zaizai/) "
            f"({c.n_layer} layers, n_embd {c.n_embd}, {heads}, context {c.block_size}, "
            f"{tok.type} vocabulary of {c.vocab_size}, step {step}).\n\n"
            f"```python\nfrom transformers import {imports}\n\n"
            f"PATH = {name!r}  # the path of this folder\n"
            f"tok = AutoTokenizer.from_pretrained(PATH)\nmodel = {cls}.from_pretrained(PATH)\n")
    # The snippet runs on transformers 4.4x and 5.x: it asks for a dict (5.x returns one from apply_chat_template
    # anyway) and passes input_ids and attention_mask by name, not **inputs: some 4.x tokenizers add token_type_ids,
    # which GPT-2 would add to its input embeddings.
    if chat:
        message = [{"role": "user", "content": "你好"}]
        prompt = render_conversation(tok, message, add_generation_prompt=True)[0]
        card += (f"inputs = tok.apply_chat_template({message!r}, add_generation_prompt=True,\n"
                 "                                 return_dict=True, return_tensors='pt')\n")
    else:
        prompt = [EOT_ID] + tok.encode("床前明月光")
        card += f"inputs = tok({names[EOT_ID]!r} + '床前明月光', return_tensors='pt')\n"
    n_new = max(1, min(50, c.block_size - len(prompt)))  # what fits in the context after the prompt
    return card + ("ids = inputs['input_ids']\n"
                   f"out = model.generate(ids, attention_mask=inputs['attention_mask'], max_new_tokens={n_new}, "
                   "do_sample=False)\n"
                   "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))  # the new tokens only\n"
                   "```\n")


# --------------------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------------------


def import_hf(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
              verbose: bool = True) -> Path:
    """Turn a local GPT2LMHeadModel, Qwen3ForCausalLM or LlamaForCausalLM folder ``src`` into a zaizai model
    folder ``out`` (a gpt, or a modern model).

    ``src`` may come from anyone (:mod:`zaizai.interop.hf_read`): only files inside it are read, and every size
    config.json gives is checked against the safetensors headers before a tensor is read or a model built."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ZaizaiError(f"{src} is not a folder; give the folder holding config.json and the model weights")
    check_output_folder(out, MODEL, overwrite=overwrite, flag="--out")
    _refuse_holding(out, src, "--out", "the source folder")
    config = read_source_json(src, "config.json")
    kind = model_type_of(config, src)
    modern = kind in hf_modern.MODERN_TYPES
    mcfg = hf_modern.model_config(config, src) if modern else model_config(config, src)
    files = weight_files(src)
    rename = hf_modern.hf_name if modern else gpt2_name
    (hf_modern.check_shapes if modern else check_shapes)(tensor_shapes(files, rename), mcfg, src)  # headers only
    raw, roles = read_tokenizer(src)
    tok, order = zaizai_layout(raw, roles, rows=mcfg.vocab_size)
    weights = read_weights(files, rename)

    if modern:  # zaizai's names are transformers' own
        embedding, state = hf_modern.EMBEDDING, weights
    else:
        embedding = "transformer.wte.weight"
        state = {name if name == "lm_head.weight" else f"transformer.{name}":
                 (t.t() if name.endswith(CONV1D) else t).contiguous() for name, t in weights.items()}
    tied = not modern or mcfg.tie_embeddings
    if tied:
        untie_check(state, embedding, src)
    is_new, dropped = _follow_vocabulary(state, [embedding] + ([] if tied else ["lm_head.weight"]), order)
    if tied:
        state["lm_head.weight"] = state[embedding]
    mcfg.vocab_size = len(order)
    model = build_model(mcfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ZaizaiError(f"{src}: the weights do not fit config.json ({str(e).splitlines()[-1].strip()})") from None

    names = special_token_texts(tok)
    # A model zaizai exported from a dialogue run: its template, and eos <|end|> (an older zaizai wrote the
    # template for plain models too; their eos is <|endoftext|>).
    chat = roles.get("chat_template") == chat_template(names) and roles.get("eos_token") == names[END_ID]
    # Only the folder's name: the absolute path would tell whoever gets the model about this machine.
    run_state = {"step": 0, "tokens_seen": 0, "imported_from": src.resolve().name,
                 "data_kind": "dialogue" if chat else "plain"}
    tcfg = TrainConfig().to_dict()
    with _new_folder(out, overwrite) as tmp:
        tok.save(tmp / "tokenizer.json")
        _write_json(tmp / "tokenizer_config.json", hf_tokenizer_config(tok))
        _write_json(tmp / "config.json", {"model": mcfg.to_dict(), "train": tcfg,
                                          "imported_from": src.resolve().name, "zaizai_version": __version__})
        save_checkpoint(tmp / BEST, model, model_config=mcfg.to_dict(), train_config=tcfg, state=run_state)
    if verbose:
        n_new, q = int(is_new.sum()), shlex.quote(str(out))
        what = {"qwen3": "Qwen3", "llama": "Llama"}.get(kind, "GPT-2")
        print(f"已导入 imported {src} -> {out}: {what} {mcfg.n_layer} layers, n_embd {mcfg.n_embd}, "
              f"context {mcfg.block_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        print(f"词表 vocabulary: {tok.type}, {len(order):,} tokens; ids 0..5 = {' '.join(names)}"
              + (f"; {n_new} new token(s)" if n_new else "")
              + (f"; {dropped} unused embedding row(s) dropped" if dropped else ""))
        if chat:
            print(f"这是 zaizai 导出的对话模型 a zaizai chat model: `zaizai chat {q}`")
        else:
            print(f"试试 try: zaizai sample {q} --prompt 今天  ·  对话微调 fine-tune on dialogues: "
                  f"zaizai prepare chats.jsonl --tokenizer {q} --out DATA && "
                  f"zaizai train DATA --init-from {q} --out OUT")
    return out


def _follow_vocabulary(state: dict[str, torch.Tensor], names: list[str],
                       order: list[int]) -> tuple[torch.Tensor, int]:
    """Reorder the rows of the tables ``names`` (embedding, untied output layer) as the vocabulary was reordered
    (``order``: each new id's old id, -1 for a new token, whose row becomes the mean of the known ones).
    Returns which ids are new and how many rows (padding no token maps to) were dropped."""
    known = [i for i in order if i >= 0]
    index = torch.tensor([max(i, 0) for i in order])
    is_new = torch.tensor([i < 0 for i in order])
    dropped = state[names[0]].shape[0] - len(known)
    for name in names:
        rows = state[name][index].clone()
        rows[is_new] = state[name][torch.tensor(known)].mean(dim=0)
        state[name] = rows
    return is_new, dropped


# --------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------


def _refuse_holding(target: Path, inner: Path, flag: str, what: str) -> None:
    """Refuse a ``target`` folder that is, or holds, ``inner``: replacing it would delete ``inner``."""
    t, i = target.resolve(), inner.resolve()
    if t == i or t in i.parents:
        raise ZaizaiError(f"{flag} {target} 包含{what}，不能替换 · holds {what} ({inner}); replacing it would "
                          f"delete that, so choose another {flag}")


@contextmanager
def _new_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; when the block succeeds it becomes ``target``
    (an existing ``target`` is replaced only with ``overwrite``, and only then). On failure nothing changes;
    a folder that cannot be written is one error line."""
    if target.exists() and not target.is_dir():
        raise ZaizaiError(f"{target} is a file; give a folder path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ZaizaiError(f"{target} already exists and is not empty; choose another path or add --overwrite")
    tmp = temp_name(target)
    remove_stale_temps(target.parent)  # what a killed export or import left next to it
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise ZaizaiError(f"cannot write {target}: {e.strerror or e}") from None
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
            target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            if old is not None:
                old.rename(target)  # put the old folder back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ZaizaiError(f"cannot write {target}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
