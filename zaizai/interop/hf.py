"""Hugging Face transformers <-> zaizai.

``export_hf``: a zaizai GPT folder -> a folder ``GPT2LMHeadModel.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load: ``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.json`` and ``tokenizer_config.json`` with a chat template that renders a conversation exactly as
:func:`zaizai.data.dialogue.render_conversation` does.

``import_hf``: a local GPT-2 folder (``config.json``, safetensors weights, and a ``tokenizer.json``, a BERT-style
``vocab.txt`` as the Chinese GPT-2 checkpoints have, or GPT-2's ``vocab.json`` + ``merges.txt``) -> a zaizai
model folder that samples, chats and fine-tunes (``zaizai train --init-from``).

zaizai's GPT has GPT-2's parameter names (see :mod:`zaizai.models.gpt`); the only change of layout is that
Hugging Face keeps the four ``c_*`` projection weights as ``Conv1D``, the transpose of ``nn.Linear``.

Vocabulary on import: zaizai needs ids 0..5 in the roles of its special tokens (document separator, unknown,
system, user, assistant, end of turn). The imported vocabulary is reordered so that tokens it already has in
those roles take those ids (``<|endoftext|>`` or ``[CLS]`` -> 0, ``[UNK]`` -> 1, zaizai's own markers in a
model zaizai exported), roles it lacks get new tokens, and every other token keeps its relative order after
them. The embedding rows move with their tokens, so the model computes exactly what it did before (tested:
equal logits); a new token's row starts as the mean of the others.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import __version__
from ..common.errors import ZaizaiError
from ..data.tokenizer import (END_ID, EOT_ID, SPECIAL_TOKENS, UNK_ID, BPETokenizer, HFTokenizer, Tokenizer,
                              hf_tokenizer_config, special_token_texts, tokenizer_type)
from ..inference.loaded import load
from ..models import ModelConfig, build_model
from ..training.checkpoint import BEST, save_checkpoint
from ..training.config import TrainConfig

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the same function (up to float rounding)
LAYER_NORM_EPS = 1e-5  # what zaizai's nn.LayerNorm uses


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
    """Write the GPT in ``model_dir`` (a ``zaizai train`` folder) as a Hugging Face GPT-2 folder ``to``."""
    bot = load(model_dir, device="cpu")
    c = bot.model_config
    if c.model != "gpt":
        raise ZaizaiError(f"{model_dir} holds a {c.model} model; only gpt models have a transformers "
                          "counterpart (GPT2LMHeadModel)")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in bot.model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight, as GPT2LMHeadModel expects
        tensors[name] = (t.t() if name.endswith(CONV1D) else t).float().contiguous().clone()
    if not c.bias:  # GPT2LMHeadModel always has biases: zeros compute the same
        for name in list(tensors):
            if name.endswith((".ln_1.weight", ".ln_2.weight", "ln_f.weight")) or name.endswith(CONV1D):
                width = tensors[name].shape[-1]
                tensors[name[: -len("weight")] + "bias"] = torch.zeros(width)

    tok = bot.tokenizer
    names = special_token_texts(tok)
    chat = bot.is_chat_model
    eos = END_ID if chat else EOT_ID
    config = {
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
        "chat_template": chat_template(names),
    }
    card = _model_card(bot, Path(to).name, names, chat, step=bot.state.get("step"))

    from safetensors.torch import save_file

    with _new_folder(Path(to), overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation)
        tok.save(tmp / "tokenizer.json")
        _write_json(tmp / "tokenizer_config.json", tok_config)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    if verbose:
        print(f"已导出 exported {bot.path} -> {to} (GPT2LMHeadModel, {bot.num_params() / 1e6:.2f}M parameters"
              f"{', chat template' if chat else ''})")
    return Path(to)


def _model_card(bot, name: str, names: list[str], chat: bool, *, step) -> str:
    """The export's README.md: what the model is and a snippet that runs it in transformers."""
    from ..data.dialogue import render_conversation

    c, tok = bot.model_config, bot.tokenizer
    card = (f"# {name}\n\nA GPT-2 trained with [zaizai](https://pypi.org/project/zaizai/) "
            f"({c.n_layer} layers, n_embd {c.n_embd}, {c.n_head} heads, context {c.block_size}, "
            f"{tok.type} vocabulary of {c.vocab_size}, step {step}).\n\n"
            "```python\nfrom transformers import AutoTokenizer, GPT2LMHeadModel\n\n"
            f"PATH = {name!r}  # the path of this folder\n"
            "tok = AutoTokenizer.from_pretrained(PATH)\nmodel = GPT2LMHeadModel.from_pretrained(PATH)\n")
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
    """Turn a local GPT2LMHeadModel folder ``src`` into a zaizai model folder ``out``."""
    src = Path(src)
    if not src.is_dir():
        raise ZaizaiError(f"{src} is not a folder; give the folder holding config.json and the model weights")
    config = _read_json_file(src / "config.json")
    mcfg = _model_config(config, src)
    weights = _read_weights(src)
    raw, roles = _read_tokenizer(src)
    tok, order = _zaizai_layout(raw, roles)

    wte = weights["wte.weight"]
    if wte.shape != (config["vocab_size"], mcfg.n_embd):
        raise ZaizaiError(f"{src}: wte.weight has shape {tuple(wte.shape)}, config.json says "
                          f"({config['vocab_size']}, {mcfg.n_embd})")
    known = [i for i in order if i >= 0]
    if max(known) >= wte.shape[0]:
        raise ZaizaiError(f"{src}: the tokenizer has {max(known) + 1} tokens but the model only "
                          f"{wte.shape[0]} embeddings; they do not belong together")
    dropped = wte.shape[0] - len(known)  # padding rows no token maps to
    index = torch.tensor([max(i, 0) for i in order])
    rows = wte[index].clone()
    is_new = torch.tensor([i < 0 for i in order])
    rows[is_new] = wte[torch.tensor(known)].mean(dim=0)
    weights["wte.weight"] = rows
    mcfg.vocab_size = len(order)

    state = {f"transformer.{name}": (t.t() if name.endswith(CONV1D) else t).contiguous()
             for name, t in weights.items()}
    model = build_model(mcfg)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ZaizaiError(f"{src}: the weights do not fit config.json ({str(e).splitlines()[-1].strip()})") from None

    names = special_token_texts(tok)
    source_template = roles.get("chat_template")
    chat = source_template == chat_template(names)  # a model zaizai exported from a dialogue run
    run_state = {"step": 0, "tokens_seen": 0, "imported_from": str(src.resolve()),
                 "data_kind": "dialogue" if chat else "plain"}
    tcfg = TrainConfig().to_dict()
    with _new_folder(Path(out), overwrite) as tmp:
        tok.save(tmp / "tokenizer.json")
        _write_json(tmp / "tokenizer_config.json", hf_tokenizer_config(tok))
        _write_json(tmp / "config.json", {"model": mcfg.to_dict(), "train": tcfg, "imported_from": str(src.resolve()),
                                          "zaizai_version": __version__})
        save_checkpoint(tmp / BEST, model, model_config=mcfg.to_dict(), train_config=tcfg, state=run_state)
    if verbose:
        n_new = int(is_new.sum())
        print(f"已导入 imported {src} -> {out}: GPT-2 {mcfg.n_layer} layers, n_embd {mcfg.n_embd}, "
              f"context {mcfg.block_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        print(f"词表 vocabulary: {tok.type}, {len(order):,} tokens; ids 0..5 = {' '.join(names)}"
              + (f"; {n_new} new token(s)" if n_new else "")
              + (f"; {dropped} unused embedding row(s) dropped" if dropped else ""))
        if chat:
            print("这是 zaizai 导出的对话模型 a zaizai chat model: `zaizai chat " + str(out) + "`")
        else:
            print(f"试试 try: zaizai sample {out} --prompt 今天  ·  对话微调 fine-tune on dialogues: "
                  f"zaizai prepare chats.jsonl --tokenizer {out} --out DATA && "
                  f"zaizai train DATA --init-from {out} --out OUT")
    return Path(out)


def _model_config(config: dict[str, Any], src: Path):
    """config.json of a GPT-2 -> zaizai's ModelConfig, refusing what zaizai's GPT does not compute."""
    if config.get("model_type") != "gpt2":
        raise ZaizaiError(f"{src} holds a {config.get('model_type')!r} model; import-hf reads GPT-2 "
                          "(model_type \"gpt2\", GPT2LMHeadModel) checkpoints")

    def get(*keys: str, default: Any = None) -> Any:  # the first of these keys config.json sets
        return next((config[k] for k in keys if config.get(k) is not None), default)

    n_embd, n_layer, n_head = get("n_embd", "hidden_size"), get("n_layer", "num_hidden_layers"), get("n_head")
    n_positions = get("n_positions", "n_ctx")
    if not all(isinstance(v, int) and v > 0 for v in (n_embd, n_layer, n_head, n_positions, config.get("vocab_size"))):
        raise ZaizaiError(f"{src}/config.json lacks n_embd, n_layer, n_head, n_positions or vocab_size")
    unsupported = []
    if get("activation_function", default="gelu_new") not in GELU_TANH:
        unsupported.append(f"activation_function {config['activation_function']!r} (zaizai uses gelu_new)")
    if get("n_inner") not in (None, 4 * n_embd):
        unsupported.append(f"n_inner {config['n_inner']} (zaizai uses 4 x n_embd)")
    if abs(float(get("layer_norm_epsilon", default=LAYER_NORM_EPS)) - LAYER_NORM_EPS) > 1e-12:
        unsupported.append(f"layer_norm_epsilon {config['layer_norm_epsilon']} (zaizai uses 1e-5)")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
        unsupported.append("a different attention scaling (zaizai divides by sqrt(head size))")
    if config.get("tie_word_embeddings") is False:
        unsupported.append("untied input and output embeddings (zaizai ties them)")
    if n_embd % n_head:
        unsupported.append(f"n_embd {n_embd} not divisible by n_head {n_head}")
    if unsupported:
        raise ZaizaiError(f"{src}: zaizai's GPT cannot compute this model: {'; '.join(unsupported)}")
    return ModelConfig(model="gpt", vocab_size=config["vocab_size"], block_size=n_positions, n_layer=n_layer,
                       n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True)


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    """The model's tensors in float32 under GPT-2's names without the ``transformer.`` prefix."""
    from safetensors import SafetensorError, safe_open

    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json_file(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ZaizaiError(f"{index} has no weight_map; the download is incomplete")
        files = [src / name for name in sorted(set(weight_map.values()))]
    elif any((src / name).is_file() for name in ("pytorch_model.bin", "model.bin", "tf_model.h5")):
        raise ZaizaiError(
            f"{src} has its weights in a pickle (pytorch_model.bin), which zaizai never loads (a pickle can run "
            "code); convert it once with transformers: python -c \"from transformers import GPT2LMHeadModel as M; "
            f"M.from_pretrained('{src}').save_pretrained('{src}')\" (writes model.safetensors), then import again"
        )
    else:
        raise ZaizaiError(f"{src} has no model.safetensors; give a folder saved by transformers' save_pretrained")
    weights: dict[str, torch.Tensor] = {}
    lm_head = None
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    name = key.removeprefix("transformer.")
                    if name.endswith((".attn.bias", ".attn.masked_bias")):
                        continue  # the causal mask, kept as a buffer by old transformers versions
                    if name == "lm_head.weight":
                        lm_head = f.get_tensor(key).float()
                        continue
                    weights[name] = f.get_tensor(key).float()
        except FileNotFoundError:
            raise ZaizaiError(f"{path} is listed in the index but missing; download it again") from None
        except (SafetensorError, OSError) as e:
            raise ZaizaiError(f"{path} is truncated or not a safetensors file ({e}); download it again") from None
    if "wte.weight" not in weights:
        raise ZaizaiError(f"{src}: the weights have no wte.weight; is this a GPT-2 checkpoint?")
    if lm_head is not None and not torch.equal(lm_head, weights["wte.weight"]):
        raise ZaizaiError(f"{src}: lm_head.weight differs from wte.weight; zaizai's GPT ties them")
    return weights


def _read_tokenizer(src: Path) -> tuple[Any, dict[str, Any]]:
    """The folder's tokenizer as a ``tokenizers.Tokenizer``, and the texts of its special roles
    (``bos``, ``eos``, ``unk``, ``cls`` ...) and its chat template from tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    roles: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (src / name).is_file():
            for key, value in _read_json_file(src / name).items():
                if isinstance(value, dict) and isinstance(value.get("content"), str):
                    value = value["content"]
                roles[key] = value
    if (src / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_file(str(src / "tokenizer.json")), roles
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
            raise ZaizaiError(f"{src}/tokenizer.json cannot be read ({e})") from None
    if (src / "vocab.txt").is_file():  # BERT-style WordPiece, as the Chinese GPT-2 checkpoints have
        lines = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
        vocab = {token: i for i, token in enumerate(lines)}  # a repeated line: the last id wins, as in transformers
        unk = roles.get("unk_token", "[UNK]")
        if unk not in vocab:
            raise ZaizaiError(f"{src}/vocab.txt has no {unk} token; is it a BERT vocabulary?")
        tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                    lowercase=bool(roles.get("do_lower_case", True)))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        roles.setdefault("cls_token", "[CLS]")
        roles["unk_token"] = unk
    elif (src / "vocab.json").is_file() and (src / "merges.txt").is_file():  # GPT-2's byte-level BPE
        tok = Tokenizer(models.BPE.from_file(str(src / "vocab.json"), str(src / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        roles.setdefault("bos_token", "<|endoftext|>")
    else:
        raise ZaizaiError(f"{src} has no tokenizer (tokenizer.json, vocab.txt, or vocab.json + merges.txt); "
                          "copy the model's tokenizer files into the folder")
    specials = [roles.get(k) for k in ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token",
                                       "bos_token", "eos_token")]
    tok.add_special_tokens([s for s in dict.fromkeys(specials) if isinstance(s, str) and tok.token_to_id(s) is not None])
    return tok, roles


def _zaizai_layout(raw: Any, roles: dict[str, Any]) -> tuple[Tokenizer, list[int]]:
    """Reorder ``raw``'s vocabulary so ids 0..5 hold tokens in zaizai's special roles (module doc).

    Returns the zaizai tokenizer and ``order``: for each new id, the old id it came from (-1: a new token).
    """
    from tokenizers import Tokenizer as RawTokenizer

    data = json.loads(raw.to_str())
    size = max(raw.get_vocab(with_added_tokens=True).values()) + 1
    old_tokens = [raw.id_to_token(i) for i in range(size)]  # None where no token has the id (never produced)
    old_id = {t: i for i, t in enumerate(old_tokens) if t is not None}

    def first(*candidates) -> int | None:
        for c in candidates:
            if isinstance(c, str) and c in old_id:
                return old_id[c]
        return None

    unk_of_model = (data.get("model") or {}).get("unk_token")
    wanted = [
        first(SPECIAL_TOKENS[0], roles.get("cls_token"), roles.get("bos_token"), roles.get("eos_token")),
        first(SPECIAL_TOKENS[1], unk_of_model, roles.get("unk_token")),
        *(first(name) for name in SPECIAL_TOKENS[2:]),
    ]
    slots: list[int] = []  # old id of each role, -1 for a new token
    for i in wanted:
        slots.append(i if i is not None and i not in slots else -1)
    taken = set(slots)
    order = slots + [i for i in range(size) if i not in taken and old_tokens[i] is not None]
    new_id = {old: new for new, old in enumerate(order) if old >= 0}
    slot_text = [old_tokens[o] if o >= 0 else SPECIAL_TOKENS[k] for k, o in enumerate(slots)]
    if len(set(slot_text)) < len(slot_text) or any(o < 0 and t in old_id for o, t in zip(slots, slot_text)):
        raise ZaizaiError("the tokenizer's special tokens clash with zaizai's markers; it cannot be laid out")

    model = data["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        model["vocab"] = {t: new_id[i] for t, i in vocab.items() if i in new_id}
        for k, o in enumerate(slots):
            if o < 0:
                model["vocab"][slot_text[k]] = k
    elif isinstance(vocab, list) and model.get("type") == "Unigram":  # [piece, score] in id order
        model["vocab"] = [[slot_text[k], 0.0] if o < 0 else vocab[o] for k, o in enumerate(order[:len(slots)])]
        model["vocab"] += [vocab[o] for o in order[len(slots):] if o < len(vocab)]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[model["unk_id"]]
    else:
        raise ZaizaiError(f"a {model.get('type')} tokenizer model is not supported; zaizai imports BPE, "
                          "WordPiece, WordLevel and Unigram vocabularies")
    added = []
    for entry in data.get("added_tokens") or []:
        entry = {**entry, "id": new_id[entry["id"]]}
        if entry["id"] < len(slots):
            entry["special"] = True
        added.append(entry)
    present = {e["id"] for e in added}
    for k, text in enumerate(slot_text):
        if k not in present:
            added.append({"id": k, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True})
    data["added_tokens"] = sorted(added, key=lambda e: e["id"])
    data["post_processor"] = None  # zaizai adds its own separators; never [CLS] ... [SEP] around each text
    data["truncation"] = data["padding"] = None
    try:
        new = RawTokenizer.from_str(json.dumps(data))
    except Exception as e:  # noqa: BLE001
        raise ZaizaiError(f"the tokenizer could not be laid out for zaizai ({e})") from None
    if [new.id_to_token(i) for i in range(len(order))] != [slot_text[k] if k < len(slots) else old_tokens[o]
                                                             for k, o in enumerate(order)]:
        raise ZaizaiError("the tokenizer could not be laid out for zaizai (its ids did not move as planned)")

    kind = tokenizer_type(data)
    return (BPETokenizer(new) if kind == "bpe" else HFTokenizer(new)), order


# --------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------


@contextmanager
def _new_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; when the block succeeds it becomes ``target``
    (an existing ``target`` is replaced only with ``overwrite``, and only then). On failure nothing changes."""
    if target.exists() and not target.is_dir():
        raise ZaizaiError(f"{target} is a file; give a folder path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ZaizaiError(f"{target} already exists and is not empty; choose another path or add --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZaizaiError(f"{path} is missing; give a folder saved by transformers' save_pretrained") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZaizaiError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ZaizaiError(f"{path} is not a JSON object")
    return data
