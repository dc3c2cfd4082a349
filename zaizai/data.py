"""Token bins: turn text into ``train.bin`` / ``val.bin`` once, then sample batches from them.

``prepare`` reads the user's text, splits it into documents, holds out whole documents for
validation, builds the character tokenizer from the training split and writes::

    out_dir/
      train.bin       doc EOT doc EOT ...  raw little-endian uint16 (uint32 for > 65,535 tokens)
      val.bin         the same for the validation documents
      tokenizer.json  the CharTokenizer
      meta.json       sizes, dtype, split settings and sources (written last: its presence
                      means the folder is complete)

``TokenData`` opens such a folder with read-only memory maps, so training touches only the
pages it samples, and several processes (data-parallel ranks, loader workers) can share it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import numbers
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .corpus import (
    PathLike,
    check_encoding,
    decode_text,
    list_text_files,
    read_file_bytes,
    split_documents,
)
from .errors import ZaizaiError
from .tokenizer import EOT_ID, UNK_ID, CharTokenizer, load_tokenizer, write_atomic

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
META_VERSION = 1
IGNORE_INDEX = -1  # target value the models' loss skips (padding of the last eval window)

_PROGRESS_MIN_FILES = 20  # show a progress bar when reading at least this many files


def _bin_file(split: str) -> str:
    return f"{split}.bin"


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


def prepare(
    paths: PathLike | Iterable[PathLike],
    out_dir: PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 1337,
    encoding: str = "utf-8",
    verbose: bool = True,
) -> dict[str, Any]:
    """Turn text files (or folders of ``*.txt``) into token bins in ``out_dir``; return the meta.

    The validation split is ``val_fraction`` of the documents, chosen by a seeded permutation
    (same seed, same split) and kept in their original order. A corpus with a single document
    falls back to holding out its last lines (its last characters, if it is a single line).
    The tokenizer sees only the training split, so validation characters it never saw become
    ``<|unk|>``, as they would in new text.
    """
    # numbers.Real / Integral also admit numpy scalars; bools are refused as typos.
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not (
        0 < val_fraction < 1
    ):
        raise ZaizaiError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ZaizaiError(f"--seed must be a whole number >= 0, got {seed!r}")
    val_fraction, seed = float(val_fraction), int(seed)  # plain types for meta.json
    encoding = check_encoding(encoding)
    files = list_text_files(paths)
    out_dir = Path(out_dir)
    outputs = [out_dir / name for name in (*map(_bin_file, SPLITS), TOKENIZER_FILE, META_FILE)]
    _refuse_overwriting_inputs(files, outputs)

    # Read every file: documents never span two files.
    documents: list[str] = []
    sources: list[dict[str, Any]] = []
    n_chars = 0
    head = ""  # the corpus' first 100 characters, for the printout
    progress = tqdm(
        files, desc="读取 reading", unit="file", disable=not verbose or len(files) < _PROGRESS_MIN_FILES
    )
    for path in progress:
        raw = read_file_bytes(path)
        text = decode_text(raw, encoding, name=path)
        sources.append(
            {"path": path.as_posix(), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        )
        documents.extend(split_documents(text))
        n_chars += len(text)
        head += text[: 100 - len(head)]
    if not documents:
        where = files[0] if len(files) == 1 else f"{len(files)} files"
        raise ZaizaiError(f"the corpus is empty or only whitespace ({where}); put some text in it")

    train_docs, val_docs, split_by, note = _hold_out(documents, val_fraction, seed)
    tokenizer = CharTokenizer.from_text(train_docs)
    train_ids = _encode_documents(tokenizer, train_docs)
    val_ids = _encode_documents(tokenizer, val_docs)

    meta: dict[str, Any] = {
        "version": META_VERSION,
        "tokenizer": tokenizer.type,
        "tokenizer_file": TOKENIZER_FILE,
        "vocab_size": tokenizer.vocab_size,
        "dtype": tokenizer.dtype.name,
        "val_fraction": val_fraction,
        "seed": seed,
        "encoding": encoding,
        "split_by": split_by,
        "splits": {
            name: {
                "tokens": int(ids.size),
                # characters the tokens stand for, each document separator counting as one, so
                # bits per character stays comparable across tokenizers
                "chars": sum(map(len, docs)) + len(docs),
                "documents": len(docs),
                "unknown": int(np.count_nonzero(ids == UNK_ID)),
            }
            for name, docs, ids in (("train", train_docs, train_ids), ("val", val_docs, val_ids))
        },
        "sources": sources,
        "created_by": f"zaizai {_zaizai_version()}",
    }

    _write_folder(out_dir, tokenizer, {"train": train_ids, "val": val_ids}, meta)
    if verbose:
        if note:
            print(note)
        _print_summary(meta, n_chars, head, outputs)
    return meta


def _hold_out(
    documents: list[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str], str, str | None]:
    """Split documents into (train, val, split_by, note for the user or None).

    Whole documents go to one side; both sides get at least one; each keeps the original order.
    """
    n = len(documents)
    if n >= 2:
        n_val = min(max(round(n * val_fraction), 1), n - 1)
        chosen = np.random.default_rng(seed).permutation(n)[:n_val]
        is_val = np.zeros(n, dtype=bool)
        is_val[chosen] = True
        train = [doc for doc, v in zip(documents, is_val) if not v]
        val = [doc for doc, v in zip(documents, is_val) if v]
        return train, val, "documents", None

    # One document (no blank lines anywhere): hold out its last lines, or failing that (one
    # long line) its last characters.
    (document,) = documents
    lines = document.split("\n")
    if len(lines) >= 2:
        n_val = min(max(round(len(lines) * val_fraction), 1), len(lines) - 1)
        note = (
            f"只有一个文档（没有空行），验证集取最后 {n_val:,} 行 only one document (no blank lines): "
            f"holding out its last {n_val:,} of {len(lines):,} lines for validation"
        )
        return ["\n".join(lines[:-n_val])], ["\n".join(lines[-n_val:])], "lines", note
    if len(document) >= 2:
        n_val = min(max(round(len(document) * val_fraction), 1), len(document) - 1)
        note = (
            f"只有一行文字，验证集取最后 {n_val:,} 个字符 only one line of text: "
            f"holding out its last {n_val:,} of {len(document):,} characters for validation"
        )
        return [document[:-n_val]], [document[-n_val:]], "characters", note
    raise ZaizaiError("the corpus is a single character; it needs more text to train on")


def _write_folder(
    out_dir: Path, tokenizer: CharTokenizer, ids: dict[str, np.ndarray], meta: dict[str, Any]
) -> None:
    """Write the bins, the tokenizer and then meta.json, each atomically."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # meta.json marks a complete folder: remove the old one first, so a crash part way
        # through leaves "not prepared" rather than new bins described by old metadata.
        (out_dir / META_FILE).unlink(missing_ok=True)
        little_endian = tokenizer.dtype.newbyteorder("<")
        for split in SPLITS:
            write_atomic(out_dir / _bin_file(split), ids[split].astype(little_endian, copy=False))
        tokenizer.save(out_dir / TOKENIZER_FILE)
        meta_json = json.dumps(meta, ensure_ascii=False, indent=2) + "\n"
        write_atomic(out_dir / META_FILE, meta_json.encode("utf-8"))
    except (FileExistsError, NotADirectoryError):
        raise ZaizaiError(f"{out_dir}: exists and is not a folder; choose another output folder") from None
    except OSError as err:
        raise ZaizaiError(f"{out_dir}: cannot write there ({err.strerror or err})") from None


def _print_summary(meta: dict[str, Any], n_chars: int, head: str, outputs: list[Path]) -> None:
    """What the articles print: character count, vocabulary, the first characters, split sizes."""
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"字符数 characters: {n_chars:,}")
    print(f"词表大小 vocab size: {meta['vocab_size']:,}")
    print("前 100 个字符 first 100 characters:")
    print(head)
    print(f"训练集 train: {train['tokens']:,} tokens ({train['documents']:,} documents)")
    print(f"验证集 val: {val['tokens']:,} tokens ({val['documents']:,} documents)")
    if val["unknown"]:
        print(f"验证集里训练集没有的字符 val characters unseen in train: {val['unknown']:,} (-> <|unk|>)")
    print(f"已写入 wrote: {', '.join(str(p) for p in outputs)}")


def _encode_documents(tokenizer: CharTokenizer, documents: list[str]) -> np.ndarray:
    """Encode documents into one array ``doc0 EOT doc1 EOT ...``.

    One vectorised pass over the documents joined by a newline, then the separators' positions
    (known from the documents' lengths) are overwritten with EOT.
    """
    ids = tokenizer.encode_array("\n".join(documents) + "\n")
    lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    ids[np.cumsum(lengths + 1) - 1] = EOT_ID
    return ids


def _refuse_overwriting_inputs(inputs: list[Path], outputs: list[Path]) -> None:
    clash = {p.resolve() for p in inputs} & {p.resolve() for p in outputs}
    if clash:
        raise ZaizaiError(
            f"{sorted(clash)[0]} is both an input and an output; choose another output folder"
        )


def _zaizai_version() -> str:
    try:
        return importlib.metadata.version("zaizai")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# reading a prepared folder
# ---------------------------------------------------------------------------------------------


def load_meta(data_dir: PathLike) -> dict[str, Any]:
    """Read and check ``data_dir/meta.json``; ZaizaiError if the folder is not prepared data."""
    data_dir = Path(data_dir)
    first = f"run `zaizai prepare YOUR_TEXT --out {data_dir}` first"
    if not data_dir.is_dir():
        raise ZaizaiError(f"{data_dir}: no such folder; {first}")
    path = data_dir / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZaizaiError(f"{data_dir} is not a prepared data folder (no {META_FILE}); {first}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ZaizaiError(f"{path} is damaged ({err}); run `zaizai prepare` again") from None

    damaged = ZaizaiError(f"{path} is not zaizai data metadata; run `zaizai prepare` again")
    if not isinstance(meta, dict):
        raise damaged
    if meta.get("version") != META_VERSION:
        raise ZaizaiError(
            f"{path} has format version {meta.get('version')!r}, this zaizai reads version "
            f"{META_VERSION}; run `zaizai prepare` again"
        )
    try:
        ok = (
            meta["dtype"] in ("uint16", "uint32")
            and isinstance(meta["vocab_size"], int)
            and isinstance(meta["tokenizer_file"], str)
            and all(
                isinstance(meta["splits"][s][k], int) for s in SPLITS for k in ("tokens", "chars")
            )
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise damaged
    return meta


class TokenData:
    """A prepared data folder: its metadata, tokenizer and token bins.

    The bins are opened lazily as read-only memory maps. Pickling (to start another process)
    carries only the folder's path and metadata; each process maps the files itself.
    """

    def __init__(self, data_dir: PathLike):
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        self._tokenizer: CharTokenizer | None = None
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        state["_arrays"] = {}  # a pickled memmap would be a full in-memory copy
        return state

    def __repr__(self) -> str:
        return f"TokenData({str(self.data_dir)!r}, vocab_size={self.meta['vocab_size']})"

    @property
    def tokenizer(self) -> CharTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.data_dir / self.meta["tokenizer_file"])
            if self._tokenizer.vocab_size != self.meta["vocab_size"]:
                raise ZaizaiError(
                    f"{self.data_dir}: tokenizer and {META_FILE} disagree on the vocabulary size; "
                    "run `zaizai prepare` again"
                )
        return self._tokenizer

    @property
    def train(self) -> np.ndarray:
        return self.split("train")

    @property
    def val(self) -> np.ndarray:
        return self.split("val")

    def split(self, name: str) -> np.ndarray:
        """The token ids of split ``name`` as a read-only 1-D memory map (opened on first use)."""
        _check_split(name)
        if name not in self._arrays:
            self._arrays[name] = self._open(name)
        return self._arrays[name]

    def _open(self, name: str) -> np.ndarray:
        path = self.data_dir / _bin_file(name)
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        tokens = self.meta["splits"][name]["tokens"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ZaizaiError(f"{path} is missing; run `zaizai prepare` again") from None
        if size != tokens * dtype.itemsize:
            raise ZaizaiError(
                f"{path} does not match {META_FILE} ({size:,} bytes, expected {tokens:,} tokens of "
                f"{dtype.itemsize} bytes); run `zaizai prepare` again"
            )
        if tokens == 0:
            return np.empty(0, dtype=dtype)  # mmap refuses empty files
        return np.memmap(path, dtype=dtype, mode="r")

    def num_tokens(self, split: str) -> int:
        return len(self.split(split))

    def get_batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``batch_size`` random windows: inputs x and next-token targets y, both (B, T).

        int64 CPU tensors; ``y[b, t] == x[b, t + 1]`` and ``y[b, -1]`` is the token after the window.
        """
        data = self.split(split)
        _check_sizes(batch_size, block_size)
        n = len(data)
        if n < block_size + 1:
            raise ZaizaiError(
                f"the {split} split has only {n:,} tokens, fewer than block size {block_size} + 1; "
                f"use a smaller --block-size (at most {max(n - 1, 1)}) or more text"
            )
        starts = rng.integers(0, n - block_size, size=batch_size)  # last valid start: n - T - 1
        # (n - T, T + 1) view of every window without copying; indexing reads just the B rows.
        windows = np.lib.stride_tricks.sliding_window_view(data, block_size + 1)[starts]
        windows = windows.astype(np.int64)  # (B, T + 1)
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))  # (B, T)
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))  # (B, T)
        return x, y

    def iter_eval_windows(
        self, split: str, block_size: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Cover a whole split with consecutive, non-overlapping windows, ``batch_size`` at a time.

        Every token but the first is a target exactly once, so the mean loss over all targets
        is the loss on the whole split. Yields int64 (B', T) pairs with B' <= batch_size; the
        final window is padded (x with EOT, y with IGNORE_INDEX = -1, which the loss skips).
        """
        data = self.split(split)
        _check_sizes(batch_size, block_size)
        n_targets = len(data) - 1
        n_windows = math.ceil(n_targets / block_size) if n_targets > 0 else 0
        for first in range(0, n_windows, batch_size):
            count = min(batch_size, n_windows - first)
            start = first * block_size
            # Consecutive windows are one contiguous run of tokens: reshape it into rows.
            chunk = np.asarray(data[start : start + count * block_size + 1], dtype=np.int64)
            real = len(chunk) - 1  # targets available (< count * T only in the final batch)
            x = np.full(count * block_size, EOT_ID, dtype=np.int64)
            y = np.full(count * block_size, IGNORE_INDEX, dtype=np.int64)
            x[:real] = chunk[:-1]
            y[:real] = chunk[1:]
            yield (
                torch.from_numpy(x.reshape(count, block_size)),
                torch.from_numpy(y.reshape(count, block_size)),
            )

    def bits_per_char(self, split: str, loss_nats: float) -> float:
        """Convert a mean loss per token (nats) into bits per character of the original text."""
        _check_split(split)
        info = self.meta["splits"][split]
        return loss_nats / math.log(2) * info["tokens"] / info["chars"]


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise ZaizaiError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")


def _check_sizes(batch_size: int, block_size: int) -> None:
    if batch_size < 1:
        raise ZaizaiError(f"--batch-size must be at least 1, got {batch_size}")
    if block_size < 1:
        raise ZaizaiError(f"--block-size must be at least 1, got {block_size}")
