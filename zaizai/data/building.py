"""What the builders of ``prepare`` share: the tokenizer choice, the result they hand back, reading
the input files, the seeded validation split, and errors while writing the output folder.

:mod:`zaizai.data.build_plain` and :mod:`zaizai.data.build_dialogues` each return a :class:`Built`;
:func:`zaizai.data.preparation.prepare` writes it into the folder and prints its summary.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..common.errors import ZaizaiError
from .corpus import decode_counting, read_file_bytes
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer

_PROGRESS_MIN_FILES = 20  # show a progress bar when reading at least this many files


@dataclass(frozen=True)
class TokenizerChoice:
    """The tokenizer to end up with: ``reused`` as it is, or a ``new`` one ("char" or "bpe" of
    ``vocab_size`` tokens) built from the training split."""

    new: str | None = "char"
    vocab_size: int = 8000
    reused: Tokenizer | None = None
    verbose: bool = False  # show the BPE trainer's progress

    def build(self, training_texts: Iterable[str]) -> Tokenizer:
        if self.reused is not None:
            return self.reused
        if self.new == "bpe":  # long texts in short chunks: the trainer's memory grows with its longest text
            chunks = (chunk for text in training_texts for chunk in text_chunks(text, TRAIN_CHUNK_CHARS))
            return BPETokenizer.train(chunks, self.vocab_size, verbose=self.verbose)
        return CharTokenizer.from_text(training_texts)


TRAIN_CHUNK_CHARS = 4096  # the BPE trainer sees texts at most this long
_CHUNK_ENDS = re.compile(r"[\s。！？；，、：.!?;,:]")  # where a long text is best cut


def text_chunks(text: str, limit: int) -> Iterator[str]:
    """``text`` in chunks of at most ``limit`` characters (``text`` itself if it is no longer), each
    cut after whitespace or punctuation in its last eighth where there is some. Joined they give ``text``."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        last = None
        for last in _CHUNK_ENDS.finditer(text, end - max(limit // 8, 1), end):
            pass
        cut = last.end() if last is not None else end
        yield text[start:cut]
        start = cut
    if start == 0 or start < len(text):
        yield text[start:]


@dataclass
class Built:
    """What a builder hands back: the tokenizer, the arrays to write, and what to tell the user."""

    tokenizer: Tokenizer
    # By file name, train.bin first. A Path is a finished partial bin (streamed prepare) to
    # rename into place.
    arrays: dict[str, np.ndarray | Path]
    split_by: str  # what was held out whole: documents, lines, characters, dialogues or given
    splits: dict[str, dict[str, int]]  # sizes of each split, for meta.json
    sources: list[dict[str, Any]]  # path, bytes and sha256 of every input file
    notes: list[str] = field(default_factory=list)  # printed before the summary
    preview: str = ""  # the corpus' first 100 characters, or the first training dialogue
    n_chars: int = 0  # characters read (plain text)


def read_files(
    files: list[Path], encoding: str, verbose: bool, errors: str = "strict"
) -> Iterator[tuple[Path, str, dict[str, Any]]]:
    """Yield ``(path, text, source)`` file by file (one text in memory at a time); ``source`` is
    the file's entry in meta.json's "sources" (with ``errors`` other than strict, also how many
    characters did not decode: "undecodable"; if any NUL characters were dropped, how many: "nul")."""
    progress = tqdm(
        files, desc="读取 reading", unit="file", disable=not verbose or len(files) < _PROGRESS_MIN_FILES
    )
    for path in progress:
        raw = read_file_bytes(path)
        source = {"path": path.as_posix(), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        text, bad, nuls = decode_counting(raw, encoding, name=path, errors=errors)
        if errors != "strict":
            source["undecodable"] = bad
        if nuls:
            source["nul"] = nuls
        yield path, text, source


def validation_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which of ``n >= 2`` items go to validation: a seeded choice, at least one on each side."""
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    chosen = np.random.default_rng(seed).permutation(n)[:n_val]
    is_val = np.zeros(n, dtype=bool)
    is_val[chosen] = True
    return is_val


def where(files: list[Path]) -> str:
    """The input files, for a message."""
    return str(files[0]) if len(files) == 1 else f"{len(files)} files"


@contextmanager
def output_errors(out_dir: Path):
    """Turn OS errors while writing into ``out_dir`` into a ZaizaiError the user can act on."""
    try:
        yield
    except (FileExistsError, NotADirectoryError):
        raise ZaizaiError(f"{out_dir}: exists and is not a folder; choose another output folder") from None
    except OSError as err:
        raise ZaizaiError(f"{out_dir}: cannot write there ({err.strerror or err})") from None
