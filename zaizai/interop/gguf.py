"""Export a zaizai GPT as one GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs.

llama.cpp's architecture "gpt2" is our model exactly: learned positions, pre-LayerNorm blocks (eps 1e-5)
with biases, fused q|k|v, tanh-GELU MLP of width 4C, a final LayerNorm and the output layer tied to the
token embedding (src/models/gpt2.cpp in llama.cpp). Names and shapes follow llama.cpp's loader:

    token_embd.weight      (V, C)      transformer.wte.weight; no output.weight, so llama.cpp reuses it
    position_embd.weight   (T, C)      transformer.wpe.weight
    blk.{i}.attn_norm      (C,)        ln_1 weight and bias
    blk.{i}.attn_qkv       (3C, C)     attn.c_attn (q, k, v stacked by rows, heads in order within each)
    blk.{i}.attn_output    (C, C)      attn.c_proj
    blk.{i}.ffn_norm       (C,)        ln_2
    blk.{i}.ffn_up         (4C, C)     mlp.c_fc
    blk.{i}.ffn_down       (C, 4C)     mlp.c_proj
    output_norm            (C,)        transformer.ln_f

GGML lists dimensions innermost first: llama.cpp's {n_embd, n_vocab} is the numpy/torch shape (V, C), so
nn.Linear weights (out, in) go in as they are (Hugging Face's Conv1D weights would need a transpose).
llama.cpp requires every bias; a model trained with ``bias=False`` gets zero biases, which computes the
same thing. In an f16 file the 2-D matrices are float16 and the 1-D norms and biases stay float32, as
llama.cpp's own converter writes them.

A modern model is llama.cpp's "qwen3" (src/models/qwen3.cpp; convert_hf_to_gguf.py's Qwen3Model), or "llama"
without QK-norm: RMSNorm blocks, separate q/k/v, SwiGLU, grouped-query heads, names as the converter writes them:

    token_embd / output_norm / output (only when untied)       model.embed_tokens / model.norm / lm_head
    blk.{i}.attn_norm, ffn_norm                                 input_layernorm, post_attention_layernorm
    blk.{i}.attn_q, attn_k, attn_v, attn_output                 self_attn.{q,k,v,o}_proj
    blk.{i}.attn_q_norm, attn_k_norm (qwen3 only)              self_attn.{q,k}_norm
    blk.{i}.ffn_gate, ffn_up, ffn_down                          mlp.{gate,up,down}_proj

RoPE: llama.cpp rotates qwen3 in the "NEOX" layout (dims i and i + hs/2 form a pair), which is zaizai's and
Hugging Face's, so q and k are copied as they are. Its llama rotates neighbouring dims (2i, 2i + 1), so for
"llama" the rows of each q and k head are permuted into that order, as convert_hf_to_gguf.py's LlamaModel does.

Tokenizers (ids 0..5 are zaizai's special tokens, marked CONTROL; ``<|unk|>`` UNKNOWN):
* char (one token per character): llama.cpp's "t5" (Unigram) tokenizer with every character a token of
  equal score gives one token per known character and ``<|unk|>`` for an unknown one. It writes spaces
  as "▁" (U+2581), so the space token is stored as "▁" and decodes back to " ". Differences from zaizai:
  a run of several unknown characters becomes a single ``<|unk|>`` (zaizai: one per character), and a
  literal "▁" in text becomes the space token. A vocabulary containing "▁" or NUL cannot be expressed
  and is refused. (The "llama" SentencePiece tokenizer is no good: an unknown character falls back to
  ``<0xXX>`` byte tokens, which a character vocabulary does not have, and tokenizing throws.)
* bpe (byte-level BPE): llama.cpp's "gpt2" tokenizer with the same vocabulary and merges, so decoding is
  exact. llama.cpp splits text before the merges only with its built-in pre-tokenizers (one of the names
  of ``tokenizer.ggml.pre``), and none is zaizai's split; see :data:`BPE_PRE` for the closest one and
  what differs. A GPT-2 BPE imported from Hugging Face keeps GPT-2's split, which llama.cpp has exactly
  (:data:`GPT2_PRE`).
* other imported vocabularies (WordPiece, ...): refused; llama.cpp's versions of them normalise, split
  and decode text in their own ways.

``add_bos`` is on with ``<|endoftext|>`` as BOS, so llama.cpp starts a prompt as zaizai does (a new
document). EOS is ``<|end|>`` for chat models (plus a chat template) and ``<|endoftext|>`` otherwise;
llama.cpp stops at both anyway, since it treats any token named ``<|end|>`` or ``<|endoftext|>`` as an
end of generation. Chat templates are rendered text that llama.cpp tokenizes with special tokens on, so
there a user typing "<|user|>" does get the marker (zaizai's own chat keeps it as text).

Context: ``context_length`` is block_size, the size of the position table. zaizai slides its window when a
generation outgrows it; llama.cpp cannot (it rounds its context up to a multiple of 256 and has no position
past block_size), and aborts in ggml_get_rows once prompt + reply pass block_size tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ZaizaiError
from ..common.fileio import atomic_path
from ..common.outputs import check_output_file
from ..data.tokenizer import BPE_SPLIT_PATTERN, END_ID, EOT_ID, SPECIAL_TOKENS, UNK_ID, special_token_texts
from ..inference.loaded import load
from ..models.modern import swiglu_hidden
from .hf import LAYER_NORM_EPS, chat_template

DTYPES = ("f16", "f32")
ARCH = "gpt2"

# llama.cpp's pre-tokenizer for zaizai's byte-level BPE. zaizai cuts text into runs of at most 8 Han
# characters, 16 other letters/digits, 16 whitespace characters or 4 punctuation marks/symbols
# (BPE_SPLIT_PATTERN) and merges only inside a run; llama.cpp only has fixed splits. "superbpe" splits
# nothing but digit runs (into groups of three from the right; src/llama-vocab.cpp), and since no token
# of a zaizai vocabulary spans two kinds of run, merges cannot cross where zaizai would have cut either.
# What differs: a run longer than zaizai's limit stays whole, so merges may cross zaizai's cut (mostly
# 9+ Han characters in a row), and digits are grouped in threes from the right and apart from letters.
# On 22,935 held-out Tang poem lines and the 1,211 lines of the README and tutorials (an 8000-token BPE)
# 98.9% and 96.9% of lines tokenize identically, token counts within 0.1%; the other built-in names
# give 72-81% on the README lines. Its decoding is exact (no clean-up of spaces, unlike "gpt-2").
BPE_PRE = "superbpe"
# GPT-2's own pre-tokenizer (a GPT-2 BPE brought in with `zaizai import-hf`): llama.cpp's "gpt-2" splits the
# same way but cleans up spaces when decoding (" ," -> ","); "trillion" is the same split without that.
GPT2_PRE = "trillion"

# llama.cpp spells a space as this character in "t5" (and SentencePiece) vocabularies.
SPM_SPACE = "\u2581"


def export_gguf(model_dir, path, *, dtype: str = "f16", overwrite: bool = False, verbose: bool = True) -> Path:
    """zaizai model folder -> one GGUF file (llama.cpp architecture "gpt2", or "qwen3" / "llama" for a modern
    model), dtype "f32" or "f16".

    An existing ``path`` is replaced only with ``overwrite`` and only if it is a ``.gguf`` file; never a file of
    a model or data folder (``--to m1/last.safetensors`` would destroy the checkpoint)."""
    path = Path(path)
    if path.is_dir():
        raise ZaizaiError(f"{path} is a folder; give the GGUF file to write, e.g. {path / 'model.gguf'}")
    check_output_file(path, overwrite=overwrite, suffixes=(".gguf",))
    try:
        import gguf
    except ImportError:
        raise ZaizaiError("GGUF export needs the gguf package; install it with `pip install gguf`") from None

    kind = str(dtype).lower()
    if kind not in DTYPES:
        raise ZaizaiError(f"unknown GGUF dtype {dtype!r}; choose f16 (half the size) or f32")
    if path.parent.exists() and not path.parent.is_dir():
        raise ZaizaiError(f"--to {path.parent} 是一个文件，不是文件夹 · is a file, not a folder; "
                          "give a path inside a folder")
    if not path.parent.is_dir():
        raise ZaizaiError(f"{path.parent} does not exist; create the folder first")

    bot = load(model_dir, device="cpu")
    cfg = bot.model_config
    if cfg.model not in ("gpt", "modern"):
        raise ZaizaiError(f"{model_dir} holds a {cfg.model} model; llama.cpp runs only transformer (gpt, modern) "
                          "models, so train one with --model gpt or --model modern to export it")
    arch = ARCH if cfg.model == "gpt" else modern_arch(cfg)
    vocab = _vocab(bot.tokenizer, chat=bot.is_chat_model)
    float_type = np.float16 if kind == "f16" else np.float32
    state = bot.model.state_dict()
    tensors = _tensors(state, cfg, float_type) if cfg.model == "gpt" else _modern_tensors(state, cfg, float_type)

    try:
        with atomic_path(path) as tmp:
            writer = gguf.GGUFWriter(tmp, arch)
            try:
                _write(writer, gguf, bot, kind, vocab, tensors)
            finally:
                writer.close()
    except OSError as err:
        raise ZaizaiError(f"cannot write {path}: {err.strerror or err}") from None
    if verbose:
        size = path.stat().st_size / 1e6
        print(f"已写入 wrote {path} ({size:.1f} MB, llama.cpp {arch}, {kind}, {cfg.vocab_size:,} tokens, "
              f"{vocab['note']})")
        print(f"note: llama.cpp has no positions past the model's {cfg.block_size}-token context and aborts "
              f"there; keep prompt + reply within {cfg.block_size} tokens (llama-cli -n)")
    return path


def _write(writer, gguf, bot, kind: str, vocab: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Header, metadata and tensors; the keys are those llama.cpp's loaders read (llama_model::load_hparams;
    for qwen3 / llama what convert_hf_to_gguf.py's TextModel.set_gguf_parameters writes)."""
    cfg = bot.model_config
    writer.add_name(Path(bot.path).parent.name or "zaizai")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd if cfg.model == "gpt" else swiglu_hidden(cfg))
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)  # gpt: head_count_kv defaults to it, plain multi-head attention
    if cfg.model == "gpt":
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
    else:
        head_size = cfg.n_embd // cfg.n_head
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_key_length(head_size)
        writer.add_value_length(head_size)
        writer.add_rope_dimension_count(head_size)  # the whole head turns
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    _add_vocab(writer, vocab)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()


# -- tensors ---------------------------------------------------------------------------------------------------


def _tensors(state: dict[str, Any], cfg, float_type) -> dict[str, np.ndarray]:
    """GGUF name -> numpy array in write order; matrices in ``float_type``, 1-D tensors float32."""
    C = cfg.n_embd

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        t = state.get(name)
        if t is None:  # bias=False: llama.cpp's gpt2 graph needs the bias, and zero adds nothing
            return np.zeros(shape, dtype=np.float32)
        a = t.detach().to("cpu").float().numpy()
        if a.shape != shape:
            raise ZaizaiError(f"checkpoint tensor {name} has shape {a.shape}, expected {shape}; "
                              "the checkpoint does not match its config")
        return a.astype(float_type if a.ndim > 1 else np.float32)

    out = {
        "token_embd.weight": get("transformer.wte.weight", (cfg.vocab_size, C)),
        "position_embd.weight": get("transformer.wpe.weight", (cfg.block_size, C)),
    }
    parts = [  # (gguf name, zaizai name, rows of the weight or None for a norm)
        ("attn_norm", "ln_1", None), ("attn_qkv", "attn.c_attn", 3 * C), ("attn_output", "attn.c_proj", C),
        ("ffn_norm", "ln_2", None), ("ffn_up", "mlp.c_fc", 4 * C), ("ffn_down", "mlp.c_proj", C),
    ]
    for i in range(cfg.n_layer):
        for gname, zname, rows in parts:
            prefix = f"transformer.h.{i}.{zname}"
            cols = 4 * C if zname == "mlp.c_proj" else C
            out[f"blk.{i}.{gname}.weight"] = get(f"{prefix}.weight", (C,) if rows is None else (rows, cols))
            out[f"blk.{i}.{gname}.bias"] = get(f"{prefix}.bias", (C if rows is None else rows,))
    out["output_norm.weight"] = get("transformer.ln_f.weight", (C,))
    out["output_norm.bias"] = get("transformer.ln_f.bias", (C,))
    return out


def modern_arch(cfg) -> str:
    """llama.cpp's architecture for a modern model: "qwen3" with QK-norm, "llama" without."""
    return "qwen3" if cfg.qk_norm else "llama"


def _interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows (heads * hs, C) from the "rotate half" layout (pairs i, i + hs/2) to llama.cpp's llama layout
    (pairs 2i, 2i + 1): convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _modern_tensors(state: dict[str, Any], cfg, float_type) -> dict[str, np.ndarray]:
    """GGUF name -> numpy array for llama.cpp's qwen3 / llama (module doc); matrices ``float_type``, norms float32."""
    C, hs, H = cfg.n_embd, cfg.n_embd // cfg.n_head, swiglu_hidden(cfg)
    q, kv = cfg.n_head * hs, cfg.kv_heads * hs

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        a = state[name].detach().to("cpu").float().numpy()
        if a.shape != shape:
            raise ZaizaiError(f"checkpoint tensor {name} has shape {a.shape}, expected {shape}; "
                              "the checkpoint does not match its config")
        return a.astype(float_type if a.ndim > 1 else np.float32)

    out = {"token_embd.weight": get("model.embed_tokens.weight", (cfg.vocab_size, C)),
           "output_norm.weight": get("model.norm.weight", (C,))}
    if not cfg.tie_embeddings:  # without it llama.cpp uses token_embd, as a tied model does
        out["output.weight"] = get("lm_head.weight", (cfg.vocab_size, C))
    parts = [("attn_norm", "input_layernorm", (C,)), ("attn_q", "self_attn.q_proj", (q, C)),
             ("attn_k", "self_attn.k_proj", (kv, C)), ("attn_v", "self_attn.v_proj", (kv, C)),
             ("attn_output", "self_attn.o_proj", (C, q)), ("ffn_norm", "post_attention_layernorm", (C,)),
             ("ffn_gate", "mlp.gate_proj", (H, C)), ("ffn_up", "mlp.up_proj", (H, C)),
             ("ffn_down", "mlp.down_proj", (C, H))]
    if cfg.qk_norm:
        parts += [("attn_q_norm", "self_attn.q_norm", (hs,)), ("attn_k_norm", "self_attn.k_norm", (hs,))]
    for i in range(cfg.n_layer):
        for gname, zname, shape in parts:
            out[f"blk.{i}.{gname}.weight"] = get(f"model.layers.{i}.{zname}.weight", shape)
        if not cfg.qk_norm:  # llama.cpp's llama: neighbouring dims form a rotation pair
            out[f"blk.{i}.attn_q.weight"] = _interleaved(out[f"blk.{i}.attn_q.weight"], cfg.n_head)
            out[f"blk.{i}.attn_k.weight"] = _interleaved(out[f"blk.{i}.attn_k.weight"], cfg.kv_heads)
    return out


# -- tokenizer -------------------------------------------------------------------------------------------------


def _vocab(tokenizer, *, chat: bool) -> dict[str, Any]:
    """The tokenizer metadata llama.cpp reads, or ZaizaiError where llama.cpp cannot be faithful."""
    import gguf


    kind = getattr(tokenizer, "type", None)
    if kind == "char":
        vocab = _char_vocab(tokenizer)
    elif kind == "bpe":
        vocab = _bpe_vocab(tokenizer)
    else:
        what = "imported Hugging Face" if kind == "hf" else str(kind)
        raise ZaizaiError(f"llama.cpp has no tokenizer that works like this model's {what} tokenizer; GGUF export "
                          "supports the char tokenizer and byte-level BPEs (use --format hf for this one)")
    tokens = vocab["tokens"]
    if len(set(tokens)) != len(tokens):  # llama.cpp aborts on a repeated token text
        raise ZaizaiError("the tokenizer has two tokens with the same text; llama.cpp cannot load that")
    # CONTROL tokens never come out of tokenizing plain text and print only when asked for (special=True)
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for i in {*range(len(SPECIAL_TOKENS)), *tokenizer.special_ids.values()}:
        types[i] = int(gguf.TokenType.CONTROL)
    types[UNK_ID] = int(gguf.TokenType.UNKNOWN)
    vocab["types"] = types
    vocab["eos"] = END_ID if chat else EOT_ID
    vocab["chat_template"] = chat_template(special_token_texts(tokenizer)) if chat else None
    return vocab


def _char_vocab(tokenizer) -> dict[str, Any]:
    chars = list(tokenizer.chars)
    for bad, what in ((SPM_SPACE, "the character ▁ (U+2581), which llama.cpp uses to write spaces"),
                      ("\x00", "the NUL character, which llama.cpp cannot store in a vocabulary")):
        if bad in chars:
            raise ZaizaiError(f"the model's vocabulary has {what}; remove it from the corpus, then prepare "
                              "and train again to export to GGUF")
    for ch in chars:
        try:
            ch.encode("utf-8")
        except UnicodeEncodeError:
            raise ZaizaiError(f"the model's vocabulary has {ch!r}, which is not valid Unicode text; "
                              "prepare and train again from a clean corpus") from None
    tokens = [*SPECIAL_TOKENS, *(SPM_SPACE if ch == " " else ch for ch in chars)]
    return {
        "model": "t5", "tokens": tokens, "scores": [0.0] * len(tokens),
        "note": "char tokenizer as llama.cpp t5; a run of unknown characters becomes one <|unk|>",
    }


def _bpe_vocab(tokenizer) -> dict[str, Any]:
    """zaizai's BPE, or an imported GPT-2 byte-level BPE, as llama.cpp's "gpt2" tokenizer."""
    data = json.loads(tokenizer.hf.to_str())
    model = data.get("model") or {}
    if (data.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges")
            or any(not t.get("special") for t in data.get("added_tokens", []))):
        raise ZaizaiError("this BPE tokenizer has options llama.cpp does not reproduce (a normalizer, dropout, "
                          "word prefixes or added tokens that are not special); it cannot be exported to GGUF")
    pre = _bpe_pre(data.get("pre_tokenizer"))
    tokens = [tokenizer.hf.id_to_token(i) for i in range(tokenizer.vocab_size)]
    if None in tokens:
        raise ZaizaiError("the BPE vocabulary's ids are not 0..n-1; run `zaizai prepare` again")
    # tokenizer.json lists a merge as "a b" or ["a", "b"]; GGUF as "a b" (byte-level tokens have no spaces)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges,
        "note": f"byte-level BPE as llama.cpp gpt2 with pre-tokenizer {pre}",
    }


def _bpe_pre(pre: Any) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE's Hugging Face pre_tokenizer."""
    def byte_level(p: Any, regex: bool) -> bool:
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and not p.get("add_prefix_space") \
            and bool(p.get("use_regex")) == regex

    zaizai_split = {"type": "Split", "pattern": {"Regex": BPE_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False}
    if (isinstance(pre, dict) and pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2
            and pre["pretokenizers"][0] == zaizai_split and byte_level(pre["pretokenizers"][1], regex=False)):
        return BPE_PRE
    if byte_level(pre, regex=True):  # GPT-2's own split, imported with a Hugging Face GPT-2
        return GPT2_PRE
    raise ZaizaiError("this BPE tokenizer splits text in a way none of llama.cpp's pre-tokenizers does; "
                      "it cannot be exported to GGUF")


def _add_vocab(writer, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    else:  # the t5 tokenizer: no text rewriting at all (no leading space, no space folding)
        writer.add_add_space_prefix(False)
        writer.add_remove_extra_whitespaces(False)
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(vocab["eos"])
    writer.add_eot_token_id(vocab["eos"])
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])


__all__ = ["BPE_PRE", "DTYPES", "GPT2_PRE", "export_gguf"]
