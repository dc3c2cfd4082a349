"""Plain text -> token bins: documents, the held-out split, the tokenizer and ``doc EOT doc EOT ...``.

A corpus is streamed (:func:`build_plain_streaming`), so any size prepares in bounded memory: each
file is read in pieces of about ``PIECE_BYTES`` cut at empty lines (documents never span pieces),
the pieces are decoded, split and encoded by worker processes, and the ids are appended to partial
bins. The files are read three times: to count documents (which fixes the split), to build the
tokenizer from the training documents, and to encode. A corpus of a single document has nothing to
stream between: :func:`build_plain` holds out its last lines (or characters) in memory.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..common.errors import ZaizaiError
from .building import (
    TRAIN_CHUNK_CHARS,
    Built,
    TokenizerChoice,
    output_errors,
    read_files,
    text_chunks,
    validation_mask,
    where,
)
from .corpus import decode_counting, iter_file_pieces, split_documents, split_segments
from .tokendata import SPLITS, bin_file
from .tokenizer import EOT_ID, UNK_ID, CharTokenizer, Tokenizer, code_points, release_freed_memory

# Bytes read at a time (cut at an empty line): bounds prepare's memory. A worker holds a piece several times
# over while it encodes it (bytes, text, documents, chunks, ids: about 30 MB for 4 MB of Chinese), and up to
# four workers run at once, each with two pieces queued for it.
PIECE_BYTES = 4 << 20
# The BPE trainer's memory grows with the distinct pieces it sees (~0.3 KB per character of
# them), so it learns from an even sample of the training documents of about this many characters.
BPE_SAMPLE_CHARS = 2_000_000
ENCODE_CHUNK_CHARS = 4096  # a BPE encodes a long document in chunks of at most this many characters
# ... and about this many characters at a time (tokenizers' encodings take ~100 bytes per token, so the batch
# bounds a worker's memory: about 40 MB for random Chinese characters, 1.6 tokens each)
ENCODE_BATCH_CHARS = 1 << 18
_COUNTS = ("tokens", "chars", "documents", "unknown")  # the size of a split in meta.json


# -- work on one piece (in worker processes, or inline) ------------------------------------------

# The tokenizer reaches the workers through this global, set by the pool's initializer
# (inherited with fork, never pickled per task).
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _scan_piece(task) -> tuple[int, int, str, int, int]:
    """Pass 1: (segments, characters, first 100 characters, characters that did not decode, NULs dropped)
    of a piece: its documents, the first and last perhaps parts of documents cut across pieces."""
    path, offset, raw, encoding, errors, head_open, tail_open = task
    text, bad, nuls = decode_counting(raw, encoding, name=path, errors=errors, offset=offset)
    return len(split_segments(text, head_open, tail_open)), len(text), text[:100], bad, nuls


def _piece_split(task) -> tuple[tuple[list[str], bool], tuple[list[str], bool]]:
    """A piece's training and validation segments, each with whether an EOT follows its last segment
    (every other segment ends a document, or the training text of a single long document)."""
    path, offset, raw, encoding, errors, head_open, tail_open, is_val, eot_last, cut_at = task
    text = decode_counting(raw, encoding, name=path, errors=errors, offset=offset).text
    segments = split_segments(text, head_open, tail_open)
    if cut_at is not None and len(segments) == 1:  # the piece where a single long document's validation part starts
        (segment,) = segments
        return ([segment[:cut_at]], True), ([segment[cut_at:]], eot_last)
    assert len(segments) == len(is_val), "a piece splits the same way on every pass"
    train = [doc for doc, v in zip(segments, is_val) if not v]
    val = [doc for doc, v in zip(segments, is_val) if v]
    last_is_val = bool(is_val[-1]) if len(is_val) else False
    return (train, eot_last or last_is_val), (val, eot_last or not last_is_val)


def _piece_code_points(task) -> np.ndarray:
    """Pass 2 (char): the distinct code points of a piece's training documents."""
    (train, _), _ = _piece_split(task)
    return np.unique(code_points("".join(train)))


def _piece_train_documents(task) -> list[str]:
    """Pass 2 (bpe): a piece's training documents, for the trainer."""
    return _piece_split(task)[0][0]


def _piece_encoded(task) -> dict[str, tuple[bytes, int, int, int]]:
    """Pass 3: per split, (ids as little-endian bytes, characters, documents, unknown ids)."""
    out = {}
    for name, (docs, eot_last) in zip(SPLITS, _piece_split(task)):
        ids = _encode_documents(_worker_tokenizer, docs, eot_last=eot_last)
        little_endian = ids.astype(ids.dtype.newbyteorder("<"), copy=False)
        ended = len(docs) - (0 if eot_last or not docs else 1)  # documents ended (EOTs written) here
        out[name] = (
            little_endian.tobytes(),
            sum(map(len, docs)) + ended,
            ended,
            int(np.count_nonzero(ids == UNK_ID)),
        )
    return out


class _Workers:
    """``map`` over tasks in worker processes (fork) or inline, in order, with only a few tasks
    in flight so that reading never runs ahead of the workers (memory stays bounded)."""

    def __init__(self, n: int, tokenizer: Tokenizer | None = None):
        import multiprocessing

        self.pool = None
        if n > 1 and "fork" in multiprocessing.get_all_start_methods():
            # tokenizers warns (and turns its threads off) in a child forked after it used them
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                self.pool = multiprocessing.get_context("fork").Pool(n, _init_worker, (tokenizer,))
            finally:
                if saved is None:
                    del os.environ["TOKENIZERS_PARALLELISM"]
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
            self.window = 2 * n
        else:
            _init_worker(tokenizer)

    def map(self, fn, tasks):
        if self.pool is None:
            yield from map(fn, tasks)
            return
        pending = []
        for task in tasks:
            pending.append(self.pool.apply_async(fn, (task,)))
            if len(pending) >= self.window:
                yield pending.pop(0).get()
        for result in pending:
            yield result.get()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# -- plain text, streamed ------------------------------------------------------------------------


class _Stream:
    """A plain corpus read piece by piece, in three passes (see the module doc)."""

    def __init__(self, files: list[Path], encoding: str, errors: str, workers: int | None, verbose: bool):
        self.files, self.encoding, self.errors, self.verbose = files, encoding, errors, verbose
        self.total_bytes = 0
        for path in files:
            try:
                self.total_bytes += path.stat().st_size
            except OSError as err:
                raise ZaizaiError(f"{path}: cannot read it ({err.strerror or err})") from None
        self.workers = min(os.cpu_count() or 1, 4) if workers is None else workers
        if self.total_bytes <= PIECE_BYTES:
            self.workers = 1  # one piece: processes would only cost their start-up
        # from pass 1, per piece: its segments (documents, or parts of one cut across pieces), whether it
        # starts inside a document (the previous piece's last one) and whether it ends inside one
        self.piece_segments: list[int] = []
        self.head_open: list[bool] = []
        self.tail_open: list[bool] = []
        self.piece_chars: list[int] = []
        self.is_val = np.zeros(0, dtype=bool)  # per document, once the split is chosen
        self.val_from: tuple[int, int] | None = None  # a single long document: (piece, character) where val starts

    def bar(self, desc: str):
        return tqdm(total=self.total_bytes, desc=desc, unit="B", unit_scale=True,
                    disable=not self.verbose or self.total_bytes < PIECE_BYTES)

    def pieces(self, progress=None) -> Iterator[tuple[Path, int, bytes, bool, bool]]:
        """Every piece of every file, in order: ``(path, offset, raw bytes, head_open, tail_open)``."""
        for path in self.files:
            head_open = False
            for offset, raw, tail_open in iter_file_pieces(path, self.encoding, PIECE_BYTES):
                yield path, offset, raw, head_open, tail_open
                head_open = tail_open
                if progress is not None:
                    progress.update(len(raw))

    @property
    def n_documents(self) -> int:
        return sum(self.piece_segments) - sum(self.head_open)

    def scan(self) -> tuple[int, str, list[dict[str, Any]]]:
        """Pass 1: count segments per piece; return (characters, first 100 of them, sources)."""
        hashes = {path: hashlib.sha256() for path in self.files}
        sizes = dict.fromkeys(self.files, 0)
        n_chars, head, paths = 0, "", []
        undecodable = dict.fromkeys(self.files, 0)
        nuls = dict.fromkeys(self.files, 0)

        def tasks(progress):
            for path, offset, raw, head_open, tail_open in self.pieces(progress):
                hashes[path].update(raw)
                sizes[path] += len(raw)
                paths.append(path)
                self.head_open.append(head_open)
                self.tail_open.append(tail_open)
                yield path, offset, raw, self.encoding, self.errors, head_open, tail_open

        with self.bar("扫描 scanning") as progress, _Workers(self.workers) as pool:
            for i, (n_segments, chars, first, bad, nul) in enumerate(pool.map(_scan_piece, tasks(progress))):
                self.piece_segments.append(n_segments)
                self.piece_chars.append(chars)
                n_chars += chars
                head += first[: 100 - len(head)]
                undecodable[paths[i]] += bad
                nuls[paths[i]] += nul
        sources = [{"path": path.as_posix(), "bytes": sizes[path], "sha256": hashes[path].hexdigest()}
                   for path in self.files]
        for source, path in zip(sources, self.files):
            if self.errors != "strict":
                source["undecodable"] = undecodable[path]
            if nuls[path]:
                source["nul"] = nuls[path]
        return n_chars, head, sources

    def hold_out_tail(self, val_fraction: float) -> str:
        """A single document cut across pieces: hold out its last ``val_fraction`` of characters (the
        validation part starts inside a piece); return the note for the user."""
        chars = np.asarray(self.piece_chars, dtype=np.int64)
        total = int(chars.sum())
        n_val = min(max(round(total * val_fraction), 1), total - 1)
        ends = np.cumsum(chars)
        piece = int(np.searchsorted(ends, total - n_val, side="right"))  # the piece holding the first val character
        self.val_from = (piece, total - n_val - int(ends[piece] - chars[piece]))
        return (f"只有一个很长的文档（没有空行），验证集取最后 {n_val:,} 个字符 only one long document "
                f"(no blank lines): holding out its last {n_val:,} of {total:,} characters for validation")

    def split_tasks(self, progress=None):
        """Every piece with the validation flags of its segments, whether an EOT follows its last one, and
        (a single long document) where in it validation starts."""
        first_doc = 0  # the document of the piece's first segment
        for i, (path, offset, raw, head_open, tail_open) in enumerate(self.pieces(progress)):
            n = self.piece_segments[i]
            first_doc -= head_open
            is_val, eot_last, cut_at = self.is_val[first_doc : first_doc + n], not tail_open, None
            if self.val_from is not None:  # one long document
                is_val = np.full(n, i > self.val_from[0])
                cut_at = self.val_from[1] if i == self.val_from[0] else None
            first_doc += n
            yield path, offset, raw, self.encoding, self.errors, head_open, tail_open, is_val, eot_last, cut_at

    def tokenizer(self, choice: TokenizerChoice, train_chars: float) -> Tokenizer:
        """Pass 2: the tokenizer, from the training documents only."""
        if choice.new == "char":
            seen = np.zeros(0x110000, dtype=bool)
            with self.bar("词表 vocabulary") as progress, _Workers(self.workers) as pool:
                for piece_code_points in pool.map(_piece_code_points, self.split_tasks(progress)):
                    seen[piece_code_points] = True
            return CharTokenizer(chr(cp) for cp in np.flatnonzero(seen))
        if choice.new != "bpe":
            return choice.build(())  # the reused one
        with _Workers(self.workers) as pool:
            documents = (doc for docs in pool.map(_piece_train_documents, self.split_tasks()) for doc in docs)
            sample = list(bpe_sample(documents, train_chars))  # a few MB
        # the workers are gone before the trainer starts: its memory (~0.3 KB per character of the sample, for
        # text of few repeats) is then the only large thing, and it is handed back when it is done
        return choice.build(sample)

    def encode(self, tok: Tokenizer, out_dir: Path) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
        """Pass 3: encode into partial bins in ``out_dir``; return them and the splits' sizes.
        The partial bins are removed if anything fails."""
        counts = {name: dict.fromkeys(_COUNTS, 0) for name in SPLITS}
        partial = {name: out_dir / f".{bin_file(name)}.partial" for name in SPLITS}
        release_freed_memory()  # the workers fork from this process: as small as it can be
        try:
            with output_errors(out_dir):
                out_dir.mkdir(parents=True, exist_ok=True)
                handles = {name: open(partial[name], "wb") for name in SPLITS}  # noqa: SIM115 - closed below
                try:
                    with self.bar("编码 encoding") as progress, _Workers(self.workers, tok) as pool:
                        for result in pool.map(_piece_encoded, self.split_tasks(progress)):
                            for name, (data, chars, docs, unknown) in result.items():
                                handles[name].write(data)
                                info = counts[name]
                                info["tokens"] += len(data) // tok.dtype.itemsize
                                info["chars"] += chars
                                info["documents"] += docs
                                info["unknown"] += unknown
                    for handle in handles.values():
                        handle.flush()
                        os.fsync(handle.fileno())
                finally:
                    for handle in handles.values():
                        handle.close()
        except BaseException:
            for path in partial.values():
                if path.is_file():
                    path.unlink()
            raise
        return partial, counts


def build_plain_streaming(
    files: list[Path], out_dir: Path, *, encoding: str, val_fraction: float, seed: int,
    tokenizer: TokenizerChoice, workers: int | None, verbose: bool, errors: str = "strict",
) -> Built:
    """Plain text in three streamed passes (see the module doc). The bins are partial files in
    ``out_dir`` that the writer renames into place. ``errors``: for bytes that do not decode
    (strict, replace or ignore)."""
    stream = _Stream(files, encoding, errors, workers, verbose)
    n_chars, head, sources = stream.scan()
    n_documents = stream.n_documents
    notes, split_by = [], "documents"
    if n_documents < 2 and sum(stream.piece_segments) < 2:  # one piece: hold out lines or characters, in memory
        return build_plain(read_files(files, encoding, verbose, errors), files, val_fraction=val_fraction, seed=seed,
                           tokenizer=tokenizer)
    if n_documents < 2:  # one document in several pieces: hold out its last pieces
        notes, split_by = [stream.hold_out_tail(val_fraction)], "characters"
    else:
        stream.is_val = validation_mask(n_documents, val_fraction, seed)
    tok = stream.tokenizer(tokenizer, train_chars=n_chars * (1 - val_fraction))
    partial, counts = stream.encode(tok, out_dir)
    return Built(tok, {bin_file(name): partial[name] for name in SPLITS}, split_by, counts, sources,
                 notes=notes, preview=head, n_chars=n_chars)


def bpe_sample(documents: Iterable[str], total_chars: float) -> Iterator[str]:
    """An even sample of about ``BPE_SAMPLE_CHARS`` characters of ``documents`` (of about ``total_chars``
    in all), for the BPE trainer: every k-th chunk of at most ``TRAIN_CHUNK_CHARS``."""
    stride = max(1, math.ceil(total_chars / BPE_SAMPLE_CHARS))
    k = 0
    for document in documents:
        for chunk in text_chunks(document, TRAIN_CHUNK_CHARS):
            if k % stride == 0:
                yield chunk
            k += 1


# -- plain text, in memory -----------------------------------------------------------------------


def build_plain(
    texts: Iterable[tuple[Path, str, dict[str, Any]]], files: list[Path], *, val_fraction: float, seed: int,
    tokenizer: TokenizerChoice,
) -> Built:
    """Documents -> split -> tokenizer -> bins, all in memory. ``texts``: as :func:`read_files` yields."""
    # Read every file: documents never span two files.
    documents: list[str] = []
    sources: list[dict[str, Any]] = []
    n_chars = 0
    head = ""  # the corpus' first 100 characters, for the printout
    for _, text, source in texts:
        sources.append(source)
        documents.extend(split_documents(text))
        n_chars += len(text)
        head += text[: 100 - len(head)]
    if not documents:
        raise ZaizaiError(f"the corpus is empty or only whitespace ({where(files)}); put some text in it")

    train_docs, val_docs, split_by, note = _hold_out(documents, val_fraction, seed)
    tok = tokenizer.build(bpe_sample(train_docs, sum(map(len, train_docs))) if tokenizer.new == "bpe" else train_docs)
    ids = {"train": _encode_documents(tok, train_docs), "val": _encode_documents(tok, val_docs)}
    splits = {
        name: {
            "tokens": int(ids[name].size),
            # characters the tokens stand for, each document separator counting as one, so
            # bits per character stays comparable across tokenizers
            "chars": sum(map(len, docs)) + len(docs),
            "documents": len(docs),
            "unknown": int(np.count_nonzero(ids[name] == UNK_ID)),
        }
        for name, docs in (("train", train_docs), ("val", val_docs))
    }
    return Built(tok, {bin_file(name): ids[name] for name in SPLITS}, split_by, splits, sources,
                 notes=[note] if note else [], preview=head, n_chars=n_chars)


def _hold_out(documents: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str], str, str | None]:
    """Split documents into (train, val, split_by, note for the user or None).

    Whole documents go to one side; both sides get at least one; each keeps the original order.
    """
    n = len(documents)
    if n >= 2:
        is_val = validation_mask(n, val_fraction, seed)
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


def _encode_documents(tokenizer: Tokenizer, documents: list[str], *, eot_last: bool = True) -> np.ndarray:
    """Encode documents into one array ``doc0 EOT doc1 EOT ...`` (without the last EOT if not ``eot_last``:
    the last document runs on into the next piece).

    Char: one vectorised pass over the documents joined by a newline, then the separators'
    positions (known from the documents' lengths) are overwritten with EOT. BPE: each document
    on its own (a merge must not cross a document border), a long one in chunks of at most
    ``ENCODE_CHUNK_CHARS``, about ``ENCODE_BATCH_CHARS`` characters at a time (bounded memory).
    """
    if not documents:
        return np.zeros(0, dtype=tokenizer.dtype)
    if tokenizer.type != "char":
        eot = np.array([EOT_ID], dtype=tokenizer.dtype)
        pieces: list[np.ndarray] = []
        batch: list[str] = []
        ends: list[bool] = []  # whether an EOT follows each chunk of the batch
        batch_chars = 0
        for k, document in enumerate(documents):
            chunks = list(text_chunks(document, ENCODE_CHUNK_CHARS))
            for j, chunk in enumerate(chunks):
                batch.append(chunk)
                ends.append(j == len(chunks) - 1 and (eot_last or k < len(documents) - 1))
                batch_chars += len(chunk)
                if len(batch) >= 1024 or batch_chars >= ENCODE_BATCH_CHARS or (k, j) == (len(documents) - 1,
                                                                                        len(chunks) - 1):
                    for ids, end in zip(tokenizer.encode_batch(batch), ends):
                        pieces.extend((ids, eot) if end else (ids,))
                    batch, ends, batch_chars = [], [], 0
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=tokenizer.dtype)
    ids = tokenizer.encode_array("\n".join(documents) + "\n")
    lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    ids[np.cumsum(lengths + 1) - 1] = EOT_ID
    return ids if eot_last else ids[:-1]
