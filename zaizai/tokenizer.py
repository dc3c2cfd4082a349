"""The character tokenizer: one token per character, plus a few special tokens.

Ids are laid out as::

    0 <|endoftext|>   separates documents in the token bins
    1 <|unk|>         any character not seen in the training split
    2 <|system|>  3 <|user|>  4 <|assistant|>  5 <|end|>   reserved for dialogue training
    6 ...             the training split's characters, sorted by code point

The dialogue markers are reserved now so that dialogue training later never has to resize the
embedding table. Special tokens never come out of ``encode``: text that merely looks like a
marker (a user typing "<|user|>") is encoded character by character, so users cannot forge turns.

Saved as JSON: ``{"type": "char", "version": 1, "special_tokens": [...], "chars": [...]}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ZaizaiError
from .fileio import atomic_write as write_atomic

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|unk|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
EOT_ID, UNK_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = range(len(SPECIAL_TOKENS))

TOKENIZER_TYPES = ("char",)  # what load_tokenizer knows; BPE comes later
_FORMAT_VERSION = 1


def storage_dtype(vocab_size: int) -> np.dtype:
    """The unsigned integer type token ids are stored in: uint16 while they fit, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


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
        code_points = _code_points(text)
        if code_points.size == 0:
            return cls([])
        # Mark the code points that occur: an order of magnitude faster than set(text) on a corpus.
        seen = np.zeros(int(code_points.max()) + 1, dtype=bool)
        seen[code_points] = True
        return cls(chr(cp) for cp in np.flatnonzero(seen))

    # -- encoding and decoding -----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode_array(self, text: str) -> np.ndarray:
        """Encode ``text`` into a 1-D array of ids (dtype ``self.dtype``), one per character."""
        code_points = _code_points(text)
        return self._lut[np.minimum(code_points, len(self._lut) - 1)]

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` into a list of ids, one per character; unknown characters -> UNK_ID."""
        return self.encode_array(text).tolist()

    def decode(self, ids: Any) -> str:
        """Turn ids back into text. Special ids decode to their marker string.

        ``ids``: a list of ints, a 1-D numpy array or a 1-D torch tensor (on any device).
        """
        if hasattr(ids, "tolist"):  # numpy array or torch tensor
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ZaizaiError(
                f"token id {bad} is outside the vocabulary (size {self.vocab_size}); "
                "the model and the tokenizer do not belong together"
            )
        return "".join([self._itos[i] for i in ids])

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "version": _FORMAT_VERSION,
            "special_tokens": list(SPECIAL_TOKENS),
            "chars": list(self.chars),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "tokenizer") -> CharTokenizer:
        """Rebuild a tokenizer from ``to_dict()`` output; ZaizaiError if it is not one."""
        fix = "run `zaizai prepare` again to rebuild it"
        if not isinstance(data, dict) or data.get("type") != cls.type:
            raise ZaizaiError(f"{source} is not a zaizai character tokenizer; {fix}")
        if data.get("version") != _FORMAT_VERSION:
            raise ZaizaiError(
                f"{source} has tokenizer format version {data.get('version')!r}, this zaizai reads "
                f"version {_FORMAT_VERSION}; {fix}"
            )
        if data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise ZaizaiError(f"{source} has different special tokens than this zaizai; {fix}")
        chars = data.get("chars")
        if not isinstance(chars, list):
            raise ZaizaiError(f"{source} has no character list; {fix}")
        try:
            return cls(chars)
        except ValueError as err:
            raise ZaizaiError(f"{source} is damaged ({err}); {fix}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as UTF-8 JSON, atomically (a crash never leaves half a file)."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n"
        write_atomic(Path(path), text.encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CharTokenizer:
        return cls.from_dict(_read_json(Path(path)), source=str(path))

    # -- conveniences --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike[str]) -> CharTokenizer:
    """Load a saved tokenizer of any known type (only ``"char"`` for now)."""
    path = Path(path)
    data = _read_json(path)
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "char":
        return CharTokenizer.from_dict(data, source=str(path))
    if kind is None:
        raise ZaizaiError(f"{path} is not a zaizai tokenizer file; run `zaizai prepare` to make one")
    raise ZaizaiError(
        f"{path}: unknown tokenizer type {kind!r}; this zaizai knows {', '.join(TOKENIZER_TYPES)} "
        "(upgrade zaizai, or run `zaizai prepare` again)"
    )


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


def _code_points(text: str) -> np.ndarray:
    """Unicode code points of ``text`` as a uint32 array, without a Python loop.

    ``surrogatepass`` lets lone surrogates through as their own code point (they become UNK
    unless in the vocabulary) instead of raising.
    """
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


