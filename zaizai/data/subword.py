"""The token id layout every zaizai tokenizer shares, and the subword tokenizers run by Hugging Face
``tokenizers``: :class:`HFTokenizer` (any vocabulary laid out with zaizai's special ids, e.g. one imported
with a model) and :class:`BPETokenizer`, zaizai's own byte-level BPE, which adds training.

:mod:`zaizai.data.tokenizer` holds the character tokenizer and loading, and re-exports everything here; import
from there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ZaizaiError
from ..common.fileio import atomic_write

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|unk|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
EOT_ID, UNK_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = range(len(SPECIAL_TOKENS))


def storage_dtype(vocab_size: int) -> np.dtype:
    """The unsigned integer type token ids are stored in: uint16 while they fit, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def id_list(ids: Any, vocab_size: int) -> list[int]:
    """``ids`` (an int, a list, a 1-D numpy array or torch tensor on any device) as a list of ints,
    checked to lie in the vocabulary."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = [ids] if isinstance(ids, int) else list(ids)
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise ZaizaiError(
            f"token id {bad} is outside the vocabulary (size {vocab_size}); "
            "the model and the tokenizer do not belong together"
        )
    return ids


class HFTokenizer:
    """Any Hugging Face ``tokenizers.Tokenizer`` whose ids 0..5 are special tokens in zaizai's roles.

    This is what zaizai runs a subword vocabulary with: its own byte-level BPE (:class:`BPETokenizer`,
    which adds training) and vocabularies imported with a Hugging Face model (``zaizai import-hf``:
    a GPT-2 byte-level BPE, a BERT-style WordPiece as the Chinese GPT-2 checkpoints use, ...). Those
    are laid out on import so that ids 0..5 play the roles of ``SPECIAL_TOKENS`` (document separator,
    unknown, system, user, assistant, end of turn), whatever their text is (``[CLS]`` may be id 0).

    Special tokens never come out of ``encode``: text that looks like a marker stays text. Other
    special tokens of an imported vocabulary (``[SEP]``, ``[PAD]``) are in ``special_ids`` too, so
    streaming shows them as nothing.
    """

    def __init__(self, hf_tokenizer: Any):
        """``hf_tokenizer``: a ``tokenizers.Tokenizer`` whose ids 0..5 are special added tokens."""
        self.hf = hf_tokenizer
        self.hf.encode_special_tokens = True  # marker look-alikes in text stay text
        added = self.hf.get_added_tokens_decoder()
        for i, name in enumerate(SPECIAL_TOKENS):
            if i not in added or not added[i].special:
                raise ValueError(f"id {i} ({name}'s role) is not a special token")
        self.special_ids: dict[str, int] = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
        for i, token in added.items():
            if token.special and i >= len(SPECIAL_TOKENS):
                self.special_ids.setdefault(token.content, i)
        self._decoder_type = type(self.hf.decoder).__name__ if self.hf.decoder is not None else None
        self.type = "bpe" if self._decoder_type == "ByteLevel" else "hf"
        self.dtype: np.dtype = storage_dtype(self.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=self.dtype)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encode several texts at once (in parallel threads inside ``tokenizers``)."""
        encodings = self.hf.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encodings]

    def unknown_chars(self, text: str) -> list[str]:
        """The characters of ``text`` that encode to the unknown token (none for a byte-level BPE)."""
        enc = self.hf.encode(text, add_special_tokens=False)
        return sorted({ch for i, (a, b) in zip(enc.ids, enc.offsets) if i == UNK_ID for ch in text[a:b]})

    def decode(self, ids: Any) -> str:
        """Ids back to text; special ids decode to their token text. An incomplete UTF-8 sequence
        (a prefix of a character's bytes) decodes to U+FFFD. A WordPiece vocabulary puts spaces
        between all pieces; the ones next to a CJK character are dropped (Chinese has none)."""
        text = self.hf.decode(id_list(ids, self.vocab_size), skip_special_tokens=False)
        if self._decoder_type == "WordPiece":
            text = _CJK_SPACE.sub("", text)
        return text

    def token_to_id(self, token: str) -> int:
        """The id of a special token name (zaizai's, like ``<|user|>``, or the vocabulary's own), or
        of a token as the vocabulary spells it."""
        i = self.special_ids.get(token)
        if i is None:
            i = self.hf.token_to_id(token)
        if i is None:
            raise ZaizaiError(f"{token!r} is not a token of this vocabulary")
        return i

    def id_to_token(self, token_id: int) -> str:
        """One id's text (a special marker, or the text it stands for; U+FFFD for part of a
        character)."""
        if not 0 <= token_id < self.vocab_size:
            raise ZaizaiError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self.decode([token_id])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the Hugging Face ``tokenizer.json``, atomically."""
        atomic_write(Path(path), (self.hf.to_str(pretty=True) + "\n").encode("utf-8"))

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and self.hf.to_str() == other.hf.to_str()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(type={self.type!r}, vocab_size={self.vocab_size})"


# A space that WordPiece decoding puts next to a CJK character or full-width punctuation.
_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_SPACE = re.compile(f"(?<=[{_CJK}]) (?=\\S)|(?<=\\S) (?=[{_CJK}])")


# Pieces the BPE sees before its byte mapping (module doc). Together the alternatives match any
# character; ``isolated`` keeps whatever they do not match too, so no text is ever dropped.
BPE_SPLIT_PATTERN = r"\p{Han}{1,8}|[^\p{Han}\s\p{P}\p{S}]{1,16}|\s{1,16}|[\p{P}\p{S}]{1,4}"
MIN_BPE_VOCAB = len(SPECIAL_TOKENS) + 256  # the specials and every byte


class BPETokenizer(HFTokenizer):
    """zaizai's byte-level BPE, trained with Hugging Face ``tokenizers``; lossless for any Unicode text.

    Ids 0..5 are the special tokens (as for :class:`CharTokenizer`), then the 256 bytes, then
    the merges. There is no ``<|unk|>`` in practice: every byte has a token.
    """

    def __init__(self, hf_tokenizer: Any):
        super().__init__(hf_tokenizer)
        if self.type != "bpe":
            raise ValueError("not a byte-level BPE")

    @staticmethod
    def _empty() -> Any:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        hf = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(BPE_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        return hf

    @classmethod
    def train(
        cls, texts: str | Iterable[str], vocab_size: int = 8000, *, min_frequency: int = 2,
        verbose: bool = False,
    ) -> BPETokenizer:
        """Learn merges from ``texts`` (a string or an iterable of documents) up to ``vocab_size``."""
        from tokenizers import pre_tokenizers, trainers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
            MIN_BPE_VOCAB <= vocab_size <= 2**32 - 1
        ):
            raise ZaizaiError(
                f"--vocab-size must be a whole number of at least {MIN_BPE_VOCAB} (the {len(SPECIAL_TOKENS)} "
                f"special tokens and 256 bytes), got {vocab_size!r}; 8000 is a good start for Chinese"
            )
        if isinstance(texts, str):
            texts = [texts]
        hf = cls._empty()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=verbose,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        del trainer  # it keeps every distinct word it saw (hundreds of MB for a sample of random text)
        release_freed_memory()
        return cls(hf)


def release_freed_memory() -> None:
    """Hand freed memory back to the system (glibc's malloc_trim; elsewhere nothing): the BPE trainer frees
    hundreds of MB that the C allocator would keep, and so would every worker process forked afterwards."""
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not Linux with glibc
        pass
