"""Tokenizers: the character tokenizer (one token per character) and a byte-level BPE.

Ids are laid out as::

    0 <|endoftext|>   separates documents in the token bins
    1 <|unk|>         any character not seen in the training split
    2 <|system|>  3 <|user|>  4 <|assistant|>  5 <|end|>   reserved for dialogue training
    6 ...             the training split's characters, sorted by code point

The dialogue markers are reserved now so that dialogue training later never has to resize the
embedding table. Special tokens never come out of ``encode``: text that merely looks like a
marker (a user typing "<|user|>") is encoded character by character, so users cannot forge turns.

Both share those six special tokens (ids 0..5) and are saved as a Hugging Face ``tokenizer.json``
that ``tokenizers.Tokenizer.from_file`` and transformers' ``AutoTokenizer`` load and that gives
the same ids as zaizai (for text without marker look-alikes; see below):

* char: a BPE model with no merges and ``<|unk|>`` as unknown token, no pre-tokenizer and a
  ``Fuse`` decoder. Every character is its own word piece, found in the vocabulary or unknown,
  exactly as ``CharTokenizer`` maps it. zaizai itself keeps its vectorised lookup table.
* bpe: a byte-level BPE (``ByteLevel`` pre-tokenizer and decoder, all 256 bytes in the
  vocabulary, so any Unicode string round-trips). Before the byte mapping, text is split into
  short pieces (runs of at most 8 Han characters, 16 other letters or digits or spaces, 4
  punctuation marks): Chinese has no spaces, and whole lines as pre-tokens would make training
  memory grow with the corpus.

Hugging Face matches special tokens in the text by default; zaizai never does (it sets
``encode_special_tokens``), and ``tokenizer_config.json`` written next to a prepared folder's
tokenizer asks transformers for the same (``split_special_tokens``).

The type is read from the file's structure, since ``Tokenizer.from_file`` refuses extra keys.

This module holds the character tokenizer, the files and loading; the id layout and the tokenizers
run by Hugging Face ``tokenizers`` (:class:`HFTokenizer`, :class:`BPETokenizer`) live in
:mod:`zaizai.data.subword` and are re-exported here: import every tokenizer name from this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ZaizaiError
from ..common.fileio import atomic_write
from .subword import (  # noqa: F401 - re-exported: every tokenizer name is imported from this module
    ASSISTANT_ID,
    BPE_SPLIT_PATTERN,
    END_ID,
    EOT_ID,
    MIN_BPE_VOCAB,
    SPECIAL_TOKENS,
    SYSTEM_ID,
    UNK_ID,
    USER_ID,
    BPETokenizer,
    HFTokenizer,
    id_list,
    release_freed_memory,
    storage_dtype,
)


def code_points(text: str) -> np.ndarray:
    """Unicode code points of ``text`` as a uint32 array, without a Python loop.

    ``surrogatepass`` lets lone surrogates through as their own code point (they become UNK
    unless in the vocabulary) instead of raising.
    """
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class CharTokenizer:
    """Maps each known character to one id; everything else to ``<|unk|>``.

    ``encode_array`` is vectorised: a lookup table indexed by Unicode code point turns a whole
    corpus into ids in a few numpy operations (hundreds of MB/s), instead of a dict lookup per
    character.
    """

    type = "char"

    def __init__(self, chars: Iterable[str]):
        """``chars``: the vocabulary's characters in id order (ids start after the specials)."""
        self.chars: tuple[str, ...] = tuple(chars)
        for ch in self.chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(f"a CharTokenizer vocabulary entry must be one character, got {ch!r}")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("a CharTokenizer vocabulary has repeated characters")

        self._itos: list[str] = [*SPECIAL_TOKENS, *self.chars]
        n_special = len(SPECIAL_TOKENS)
        self._stoi: dict[str, int] = {ch: n_special + i for i, ch in enumerate(self.chars)}
        self.special_ids: dict[str, int] = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
        self.dtype: np.dtype = storage_dtype(self.vocab_size)

        # Lookup table: lut[code point] = id. Its last slot is UNK, and code points are clipped
        # into range before indexing, so any character beyond the table also maps to UNK.
        top = max((ord(ch) for ch in self.chars), default=0)
        self._lut = np.full(top + 2, UNK_ID, dtype=self.dtype)
        for ch, i in self._stoi.items():
            self._lut[ord(ch)] = i

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> CharTokenizer:
        """Build the vocabulary from the distinct characters of a text (or of several texts)."""
        if not isinstance(text, str):
            text = "".join(text)
        points = code_points(text)
        if points.size == 0:
            return cls([])
        # Mark the code points that occur: an order of magnitude faster than set(text) on a corpus.
        seen = np.zeros(int(points.max()) + 1, dtype=bool)
        seen[points] = True
        return cls(chr(cp) for cp in np.flatnonzero(seen))

    # -- encoding and decoding -----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode_array(self, text: str) -> np.ndarray:
        """Encode ``text`` into a 1-D array of ids (dtype ``self.dtype``), one per character."""
        points = code_points(text)
        return self._lut[np.minimum(points, len(self._lut) - 1)]

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` into a list of ids, one per character; unknown characters -> UNK_ID."""
        return self.encode_array(text).tolist()

    def unknown_chars(self, text: str) -> list[str]:
        """The characters of ``text`` outside the vocabulary (they encode to ``<|unk|>``)."""
        return sorted({ch for ch, i in zip(text, self.encode_array(text).tolist()) if i == UNK_ID})

    def decode(self, ids: Any) -> str:
        """Turn ids back into text. Special ids decode to their marker string.

        ``ids``: a list of ints, a 1-D numpy array or a 1-D torch tensor (on any device).
        """
        return "".join([self._itos[i] for i in id_list(ids, self.vocab_size)])

    def token_to_id(self, token: str) -> int:
        """The id of a special token name (``"<|user|>"``) or of a single known character."""
        if token in self.special_ids:
            return self.special_ids[token]
        if token in self._stoi:
            return self._stoi[token]
        raise ZaizaiError(f"{token!r} is not a token of this vocabulary")

    def id_to_token(self, token_id: int) -> str:
        """The text of one id: a character, or a special token's marker string."""
        if not 0 <= token_id < self.vocab_size:
            raise ZaizaiError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self._itos[token_id]

    # -- saving and loading --------------------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``tokenizer.json`` content: a BPE without merges (see the module doc)."""
        vocab = {token: i for i, token in enumerate(self._itos)}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": _hf_added_tokens(),
            "normalizer": None,
            "pre_tokenizer": None,
            "post_processor": None,
            "decoder": {"type": "Fuse"},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": SPECIAL_TOKENS[UNK_ID],
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": vocab,
                "merges": [],
            },
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], *, source: str = "tokenizer") -> CharTokenizer:
        """Rebuild from ``to_hf_dict()`` output (a ``tokenizer.json`` zaizai wrote)."""
        itos = _hf_vocab_in_id_order(data, source)
        try:
            return cls(itos[len(SPECIAL_TOKENS):])
        except ValueError as err:
            raise ZaizaiError(f"{source} is damaged ({err}); run `zaizai prepare` again") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as a Hugging Face ``tokenizer.json``, atomically."""
        text = json.dumps(self.to_hf_dict(), ensure_ascii=False, indent=1) + "\n"
        atomic_write(Path(path), text.encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CharTokenizer:
        tok = load_tokenizer(path)
        if not isinstance(tok, cls):
            raise ZaizaiError(f"{path} is a {tok.type} tokenizer, not a character tokenizer")
        return tok

    # -- conveniences --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


Tokenizer = CharTokenizer | HFTokenizer


def hf_tokenizer_config(tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """``tokenizer_config.json`` for transformers: no marker matching in text, no space cleanup.
    The special tokens' texts are ``tokenizer``'s (an imported vocabulary may call id 0 ``[CLS]``)."""
    names = list(SPECIAL_TOKENS) if tokenizer is None else special_token_texts(tokenizer)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": names[EOT_ID],
        "unk_token": names[UNK_ID],
        "additional_special_tokens": names[SYSTEM_ID:],
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }


def special_token_texts(tokenizer: Tokenizer) -> list[str]:
    """The texts of ids 0..5 in ``tokenizer``'s vocabulary (zaizai's markers, or an imported
    vocabulary's own tokens in those roles, such as ``[CLS]`` and ``[UNK]``)."""
    if isinstance(tokenizer, HFTokenizer):
        return [tokenizer.hf.id_to_token(i) for i in range(len(SPECIAL_TOKENS))]
    return list(SPECIAL_TOKENS)


def tokenizer_type(data: Any) -> str | None:
    """"char", "bpe" or "hf" for a parsed tokenizer file zaizai can read, else None.

    "char": zaizai's character vocabulary; "bpe": a byte-level BPE; "hf": another Hugging Face
    tokenizer (imported with a model, e.g. a WordPiece), run through :class:`HFTokenizer`.
    """
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), (dict, list)):
        return None
    if model.get("type") == "BPE" and data.get("pre_tokenizer") is None and not model.get("merges"):
        return "char"
    if model.get("type") == "BPE" and (data.get("decoder") or {}).get("type") == "ByteLevel":
        return "bpe"
    return "hf" if isinstance(data.get("added_tokens"), list) else None


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a saved tokenizer of any known type (char, bpe or hf; see the module doc)."""
    path = Path(path)
    data = _read_json(path)
    kind = tokenizer_type(data)
    if kind == "char":
        return CharTokenizer.from_hf_dict(data, source=str(path))
    if kind in ("bpe", "hf"):
        from tokenizers import Tokenizer as RawTokenizer

        try:
            raw = RawTokenizer.from_str(json.dumps(data))
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
            raise ZaizaiError(f"{path} is damaged ({err}); run `zaizai prepare` again") from None
        try:
            return BPETokenizer(raw) if kind == "bpe" else HFTokenizer(raw)
        except ValueError as err:
            raise ZaizaiError(
                f"{path} is not laid out for zaizai ({err}); make it with `zaizai prepare` or "
                "bring a Hugging Face model in with `zaizai import-hf`"
            ) from None
    raise ZaizaiError(f"{path} is not a zaizai tokenizer file; run `zaizai prepare` to make one")


def _hf_added_tokens() -> list[dict[str, Any]]:
    return [
        {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, name in enumerate(SPECIAL_TOKENS)
    ]


def _hf_vocab_in_id_order(data: dict[str, Any], source: str) -> list[str]:
    fix = "run `zaizai prepare` again to rebuild it"
    vocab = data["model"].get("vocab")
    if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))):
        raise ZaizaiError(f"{source} is damaged (its vocabulary ids are not 0..n-1); {fix}")
    itos = sorted(vocab, key=vocab.__getitem__)
    if itos[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
        raise ZaizaiError(f"{source} has different special tokens than this zaizai; {fix}")
    return itos


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ZaizaiError(f"{path}: no such tokenizer file; run `zaizai prepare` first") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ZaizaiError(
            f"{path} is not valid JSON ({err}); it is damaged: run `zaizai prepare` again"
        ) from None
    except OSError as err:
        raise ZaizaiError(f"{path}: cannot read it ({err.strerror or err})") from None
