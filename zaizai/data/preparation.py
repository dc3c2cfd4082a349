"""Token bins: turn text into ``train.bin`` / ``val.bin`` once, then sample batches from them.

``prepare`` reads the user's files and writes one of two kinds of data folder.

Plain text (``"kind": "plain"``, pretraining): the text is split into documents, whole documents
are held out for validation, the character tokenizer is built from the training split, and::

    out_dir/
      train.bin       doc EOT doc EOT ...  raw little-endian uint16 (uint32 for > 65,535 tokens)
      val.bin         the same for the validation documents
      tokenizer.json  the tokenizer (char or bpe), a Hugging Face tokenizer.json
      tokenizer_config.json  settings for transformers' AutoTokenizer
      meta.json       sizes, dtype, split settings and sources (written last: its presence
                      means the folder is complete)

Dialogues (``"kind": "dialogue"``, ``--format text | jsonl | lccc``): whole dialogues are held
out, each is rendered by :func:`zaizai.data.dialogue.render_dialogues` (the rendering chat uses), and
besides ``tokenizer.json`` and ``meta.json``::

      train.bin             the rendered dialogues end to end: EOT <|user|> ... <|end|> EOT ...
      train_roles.bin       uint8, one per token: what that token is as a target (0 the opening
                            EOT, 1 prompt text or a role marker, 2 an assistant reply or its END)
      train_dialogues.npy   int64 (n_dialogues, 2): start and length of each dialogue in train.bin
      train_turns.npy       int64 (n_messages,): position of every message's role marker
      val.bin, val_roles.bin, val_dialogues.npy, val_turns.npy   the same for validation

``TokenData`` opens such a folder with read-only memory maps, so training touches only the
pages it samples, and several processes (data-parallel ranks, loader workers) can share it.
Plain data is sampled as random windows (:meth:`TokenData.get_batch`); dialogue data as rows of
whole dialogues packed together with loss masks (:meth:`TokenData.get_dialogue_batch`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import math
import numbers
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .corpus import (
    FOLDER_SUFFIXES,
    TXT_HINT,
    PathLike,
    Problems,
    check_encoding,
    check_format,
    decode_piece,
    decode_text,
    iter_file_pieces,
    list_text_files,
    parse_dialogues,
    read_file_bytes,
    resolve_format,
    split_documents,
)
from .dialogue import (
    ASSISTANT,
    ASSISTANT_TARGET,
    PROMPT,
    Dialogues,
    loss_mask,
    render_dialogues,
)
from ..common.errors import ZaizaiError
from .tokenizer import (
    EOT_ID,
    UNK_ID,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    hf_tokenizer_config,
    load_tokenizer,
    write_atomic,
)

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
NEW_TOKENIZERS = ("char", "bpe")  # what --tokenizer builds when it does not name a file or folder
SPLITS = ("train", "val")
KINDS = ("plain", "dialogue")
META_VERSION = 1
from ..common.ids import IGNORE_INDEX

_PROGRESS_MIN_FILES = 20  # show a progress bar when reading at least this many files


def _bin_file(split: str) -> str:
    return f"{split}.bin"


def _dialogue_files(split: str) -> tuple[str, str, str]:
    """Roles, dialogue table and turn starts of a dialogue split."""
    return f"{split}_roles.bin", f"{split}_dialogues.npy", f"{split}_turns.npy"


def _output_names(kind: str) -> list[str]:
    names = [_bin_file(split) for split in SPLITS]
    if kind == "dialogue":
        names += [name for split in SPLITS for name in _dialogue_files(split)]
    return [*names, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, META_FILE]


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


def prepare(
    paths: PathLike | Iterable[PathLike],
    out_dir: PathLike,
    *,
    format: str = "auto",
    tokenizer: PathLike | None = None,
    vocab_size: int = 8000,
    skip_bad: bool = False,
    val_fraction: float = 0.1,
    seed: int = 1337,
    encoding: str = "utf-8",
    verbose: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Turn text files (or folders of them) into token bins in ``out_dir``; return the meta.

    ``format``: ``"plain"`` text to pretrain on, dialogues in the articles' ``"text"`` layout (a
    block of lines is a dialogue, one turn per line, the user first), ``"jsonl"`` (OpenAI-style
    ``{"messages": [...]}`` per line) or ``"lccc"`` (JSON lists of utterances, or
    ``{"train": [...], "valid": [...]}``). ``"auto"`` goes by the suffix: ``.jsonl`` -> jsonl,
    ``.json`` -> lccc, anything else (``.txt``) -> plain; files of different formats are refused.
    A folder stands for its files of the format (``.txt`` for plain and text, ``.jsonl``,
    ``.json``); under auto for its ``.txt`` files, or if it has none its ``.jsonl``, else ``.json``.

    ``tokenizer``: ``"char"`` (the default: one token per character) or ``"bpe"`` (a byte-level
    BPE of ``vocab_size`` tokens, plain text only for now) builds a new tokenizer from the
    training split. Anything else names a ``tokenizer.json`` (or a folder holding one: a data
    folder or a trained model's) to reuse, so a pretrained model can be fine-tuned on the new
    data; an existing file or folder wins over the names. Characters a reused char tokenizer
    lacks become ``<|unk|>`` (counted).

    Plain text is streamed, so a corpus of any size prepares in bounded memory: each file is
    read in pieces of about 16 MB cut at empty lines (documents never span pieces), decoded,
    split and encoded by ``workers`` processes (default: up to 4 CPU cores; one for a corpus of
    a single piece), and the ids are appended to the bins. The files are read three times:
    to count documents (which fixes the split), to build the tokenizer from the training
    documents (a BPE from an even sample of them of about ``BPE_SAMPLE_CHARS`` characters, as
    its trainer's memory grows with the text), and to encode. Dialogues are still read into
    memory.

    ``skip_bad``: skip malformed dialogues (counted) instead of stopping at the first with
    ``file:line: what is wrong``.

    The validation split is ``val_fraction`` of the documents (dialogues), chosen by a seeded
    permutation (same seed, same split) and kept in their original order; an LCCC file's own
    "valid" list is used as given instead. A plain corpus with a single document falls back to
    holding out its last lines (its last characters, if it is a single line). A new tokenizer
    sees only the training split, so validation characters it never saw become ``<|unk|>``, as
    they would in new text.
    """
    # numbers.Real / Integral also admit numpy scalars; bools are refused as typos.
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not (
        0 < val_fraction < 1
    ):
        raise ZaizaiError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ZaizaiError(f"--seed must be a whole number >= 0, got {seed!r}")
    val_fraction, seed = float(val_fraction), int(seed)  # plain types for meta.json
    check_format(format)
    encoding = check_encoding(encoding)
    files = list_text_files(paths, FOLDER_SUFFIXES[format])
    resolved = resolve_format(files, format)
    kind = "plain" if resolved == "plain" else "dialogue"
    out_dir = Path(out_dir)
    outputs = [out_dir / name for name in _output_names(kind)]
    _refuse_overwriting_inputs(files, outputs)
    new_kind = "char" if tokenizer is None else None
    if tokenizer is not None and str(tokenizer) in NEW_TOKENIZERS and not Path(tokenizer).exists():
        new_kind = str(tokenizer)
    reused, reused_from = _reused_tokenizer(tokenizer) if new_kind is None else (None, None)

    def build_tokenizer(training_texts: Iterable[str]) -> Tokenizer:
        if reused is not None:
            return reused
        if new_kind == "bpe":
            return BPETokenizer.train(training_texts, vocab_size, verbose=verbose)
        return CharTokenizer.from_text(training_texts)

    notes: list[str] = []
    if format == "auto" and resolved == "plain" and any(p.suffix.lower() == ".txt" for p in files):
        notes.append(TXT_HINT)
    sources: list[dict[str, Any]] = []
    if kind == "plain":
        built = _build_plain_streaming(
            files, encoding, out_dir, val_fraction, seed, build_tokenizer, new_kind, notes, sources,
            verbose, workers,
        )
    else:
        texts = _read_files(files, encoding, sources, verbose)
        built = _build_dialogues(texts, files, resolved, skip_bad, val_fraction, seed, build_tokenizer, notes)
    tok, arrays, split_by, split_info, summary = built

    meta: dict[str, Any] = {
        "version": META_VERSION,
        "kind": kind,
        "format": resolved,
        "tokenizer": tok.type,
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_from": reused_from,
        "vocab_size": tok.vocab_size,
        "dtype": tok.dtype.name,
        "val_fraction": val_fraction,
        "seed": seed,
        "encoding": encoding,
        "split_by": split_by,
        "splits": split_info,
        "sources": sources,
        "created_by": f"zaizai {_zaizai_version()}",
    }
    _write_folder(out_dir, kind, tok, arrays, meta)
    if verbose:
        for note in notes:
            print(note)
        summary(meta)
        print(f"已写入 wrote: {', '.join(str(p) for p in outputs)}")
    return meta


def _reused_tokenizer(path: PathLike) -> tuple[Tokenizer, str]:
    """Load the tokenizer to reuse: a tokenizer.json, or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise ZaizaiError(
                f"--tokenizer {path}: the folder has no {TOKENIZER_FILE}; name a tokenizer.json, "
                "or a folder made by `zaizai prepare` or `zaizai train`"
            )
        path = path / TOKENIZER_FILE
    elif not path.is_file():
        raise ZaizaiError(
            f"--tokenizer {path}: no such file or folder; check the path, or build a new tokenizer "
            f"with --tokenizer {' or '.join(NEW_TOKENIZERS)}"
        )
    return load_tokenizer(path), path.as_posix()


def _read_files(
    files: list[Path], encoding: str, sources: list[dict[str, Any]], verbose: bool
) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, text)`` file by file (one text in memory at a time), recording ``sources``."""
    progress = tqdm(
        files, desc="读取 reading", unit="file", disable=not verbose or len(files) < _PROGRESS_MIN_FILES
    )
    for path in progress:
        raw = read_file_bytes(path)
        sources.append(
            {"path": path.as_posix(), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        )
        yield path, decode_text(raw, encoding, name=path)


# -- plain text, streamed ------------------------------------------------------------------------

PIECE_BYTES = 16 << 20  # bytes read at a time (cut at an empty line): bounds prepare's memory
# The BPE trainer's memory grows with the distinct pieces it sees (~0.3 KB per character of
# them), so it learns from an even sample of the training documents of about this many characters.
BPE_SAMPLE_CHARS = 2_000_000


def _file_pieces(files: list[Path], encoding: str, piece_bytes: int, progress=None):
    """Every piece of every file, in order: ``(path, offset, raw bytes)``."""
    for path in files:
        for offset, raw in iter_file_pieces(path, encoding, piece_bytes):
            yield path, offset, raw
            if progress is not None:
                progress.update(len(raw))


def _piece_documents(path: Path, offset: int, raw: bytes, encoding: str) -> list[str]:
    return split_documents(decode_piece(raw, encoding, path, offset))


# The functions below run in worker processes (or inline); the tokenizer reaches them through
# this global, set by the pool's initializer (inherited with fork, never pickled per task).
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _scan_piece(task) -> tuple[int, int, str]:
    """Pass 1: (documents, characters, first 100 characters) of a piece."""
    path, offset, raw, encoding = task
    text = decode_piece(raw, encoding, path, offset)
    return len(split_documents(text)), len(text), text[:100]


def _piece_split(task) -> tuple[list[str], list[str]]:
    path, offset, raw, encoding, is_val = task
    documents = _piece_documents(path, offset, raw, encoding)
    assert len(documents) == len(is_val), "a piece splits the same way on every pass"
    train = [doc for doc, v in zip(documents, is_val) if not v]
    val = [doc for doc, v in zip(documents, is_val) if v]
    return train, val


def _piece_code_points(task) -> np.ndarray:
    """Pass 2 (char): the distinct code points of a piece's training documents."""
    train, _ = _piece_split(task)
    return np.unique(_code_points_of("".join(train)))


def _piece_train_documents(task) -> list[str]:
    """Pass 2 (bpe): a piece's training documents, for the trainer."""
    return _piece_split(task)[0]


def _piece_encoded(task) -> dict[str, tuple[bytes, int, int, int]]:
    """Pass 3: per split, (ids as little-endian bytes, characters, documents, unknown ids)."""
    out = {}
    for name, docs in zip(SPLITS, _piece_split(task)):
        ids = _encode_documents(_worker_tokenizer, docs)
        little_endian = ids.astype(ids.dtype.newbyteorder("<"), copy=False)
        out[name] = (
            little_endian.tobytes(),
            sum(map(len, docs)) + len(docs),
            len(docs),
            int(np.count_nonzero(ids == UNK_ID)),
        )
    return out


def _code_points_of(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class _Workers:
    """``map`` over tasks in worker processes (fork) or inline, in order, with only a few tasks
    in flight so that reading never runs ahead of the workers (memory stays bounded)."""

    def __init__(self, n: int, tokenizer: Tokenizer | None = None):
        import multiprocessing
        import os

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


def _build_plain_streaming(
    files, encoding, out_dir, val_fraction, seed, build_tokenizer, new_kind, notes, sources, verbose, workers
):
    """Plain text in three streamed passes (see :func:`prepare`); bins are written to partial
    files in ``out_dir`` that :func:`_write_folder` renames into place. Returns as _build_plain
    does, with paths instead of arrays."""
    import os

    total_bytes = 0
    for path in files:
        try:
            total_bytes += path.stat().st_size
        except OSError as err:
            raise ZaizaiError(f"{path}: cannot read it ({err.strerror or err})") from None
    if workers is None:
        workers = min(os.cpu_count() or 1, 4)
    if total_bytes <= PIECE_BYTES:
        workers = 1  # one piece: processes would only cost their start-up

    def bar(desc: str):
        return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not verbose or total_bytes < PIECE_BYTES)

    # Pass 1: count documents and characters; checksums for meta.json.
    hashes = {path: hashlib.sha256() for path in files}
    sizes = dict.fromkeys(files, 0)
    piece_docs: list[int] = []
    n_chars, head = 0, ""

    def scan_tasks(progress):
        for path, offset, raw in _file_pieces(files, encoding, PIECE_BYTES, progress):
            hashes[path].update(raw)
            sizes[path] += len(raw)
            yield path, offset, raw, encoding

    with bar("扫描 scanning") as progress, _Workers(workers) as pool:
        for n_docs, chars, first in pool.map(_scan_piece, scan_tasks(progress)):
            piece_docs.append(n_docs)
            n_chars += chars
            head += first[: 100 - len(head)]
    sources.extend(
        {"path": path.as_posix(), "bytes": sizes[path], "sha256": hashes[path].hexdigest()} for path in files
    )
    n_documents = sum(piece_docs)
    if n_documents < 2:  # nothing to stream: hold out lines or characters, in memory
        sources.clear()
        return _build_plain(_read_files(files, encoding, sources, verbose), files, val_fraction, seed,
                            build_tokenizer, notes)

    is_val = _validation_mask(n_documents, val_fraction, seed)
    starts = np.concatenate([[0], np.cumsum(piece_docs)])

    def split_tasks(progress):
        for i, (path, offset, raw) in enumerate(_file_pieces(files, encoding, PIECE_BYTES, progress)):
            yield path, offset, raw, encoding, is_val[starts[i] : starts[i + 1]]

    # Pass 2: the tokenizer, from the training documents only.
    if new_kind == "char":
        seen = np.zeros(0x110000, dtype=bool)
        with bar("词表 vocabulary") as progress, _Workers(workers) as pool:
            for code_points in pool.map(_piece_code_points, split_tasks(progress)):
                seen[code_points] = True
        tok = CharTokenizer(chr(cp) for cp in np.flatnonzero(seen))
    elif new_kind == "bpe":
        with _Workers(workers) as pool:

            stride = max(1, math.ceil(n_chars * (1 - val_fraction) / BPE_SAMPLE_CHARS))

            def training_documents():
                k = 0
                for documents in pool.map(_piece_train_documents, split_tasks(None)):
                    for document in documents:
                        if k % stride == 0:
                            yield document
                        k += 1

            tok = build_tokenizer(training_documents())
    else:
        tok = build_tokenizer(())  # the reused one

    # Pass 3: encode and append to partial bins.
    counts = {name: {"tokens": 0, "chars": 0, "documents": 0, "unknown": 0} for name in SPLITS}
    partial = {name: out_dir / f".{_bin_file(name)}.partial" for name in SPLITS}
    try:
        with _output_errors(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            handles = {name: open(partial[name], "wb") for name in SPLITS}  # noqa: SIM115 - closed below
            try:
                with bar("编码 encoding") as progress, _Workers(workers, tok) as pool:
                    for result in pool.map(_piece_encoded, split_tasks(progress)):
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

    summary = functools.partial(_print_plain_summary, n_chars=n_chars, head=head)

    split_info = {name: {k: counts[name][k] for k in ("tokens", "chars", "documents", "unknown")} for name in SPLITS}
    return tok, {_bin_file(name): partial[name] for name in SPLITS}, "documents", split_info, summary


def _where(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{len(files)} files"


# -- plain text ---------------------------------------------------------------------------------


def _build_plain(texts, files, val_fraction, seed, build_tokenizer, notes):
    """Documents -> split -> tokenizer -> bins. Returns (tokenizer, arrays by file name, split_by,
    split sizes, a function printing the summary)."""
    # Read every file: documents never span two files.
    documents: list[str] = []
    n_chars = 0
    head = ""  # the corpus' first 100 characters, for the printout
    for _, text in texts:
        documents.extend(split_documents(text))
        n_chars += len(text)
        head += text[: 100 - len(head)]
    if not documents:
        raise ZaizaiError(f"the corpus is empty or only whitespace ({_where(files)}); put some text in it")

    train_docs, val_docs, split_by, note = _hold_out(documents, val_fraction, seed)
    if note:
        notes.append(note)
    tok = build_tokenizer(train_docs)
    ids = {"train": _encode_documents(tok, train_docs), "val": _encode_documents(tok, val_docs)}
    split_info = {
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

    summary = functools.partial(_print_plain_summary, n_chars=n_chars, head=head)

    return tok, {_bin_file(name): ids[name] for name in SPLITS}, split_by, split_info, summary


def _reused_note(meta: dict[str, Any]) -> str:
    return f" (reused {meta['tokenizer_from']})" if meta["tokenizer_from"] else ""


def _print_plain_summary(meta: dict[str, Any], *, n_chars: int, head: str) -> None:
    """What the articles print: character count, vocabulary, the first characters, split sizes."""
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"字符数 characters: {n_chars:,}")
    print(f"词表大小 vocab size: {meta['vocab_size']:,}" + _reused_note(meta))
    print("前 100 个字符 first 100 characters:")
    print(head)
    print(f"训练集 train: {train['tokens']:,} tokens ({train['documents']:,} documents)")
    print(f"验证集 val: {val['tokens']:,} tokens ({val['documents']:,} documents)")
    _print_unknown(meta)


def _print_unknown(meta: dict[str, Any]) -> None:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    if train["unknown"]:
        print(
            f"复用的词表里没有的字符 characters the reused tokenizer lacks: {train['unknown']:,} "
            "in train (-> <|unk|>)"
        )
    if val["unknown"]:
        unseen = "the tokenizer lacks" if meta["tokenizer_from"] else "unseen in train"
        print(f"验证集里训练集没有的字符 val characters {unseen}: {val['unknown']:,} (-> <|unk|>)")


def _validation_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which of ``n >= 2`` items go to validation: a seeded choice, at least one on each side."""
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    chosen = np.random.default_rng(seed).permutation(n)[:n_val]
    is_val = np.zeros(n, dtype=bool)
    is_val[chosen] = True
    return is_val


def _hold_out(
    documents: list[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str], str, str | None]:
    """Split documents into (train, val, split_by, note for the user or None).

    Whole documents go to one side; both sides get at least one; each keeps the original order.
    """
    n = len(documents)
    if n >= 2:
        is_val = _validation_mask(n, val_fraction, seed)
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


def _encode_documents(tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
    """Encode documents into one array ``doc0 EOT doc1 EOT ...``.

    Char: one vectorised pass over the documents joined by a newline, then the separators'
    positions (known from the documents' lengths) are overwritten with EOT. BPE: each document
    on its own (a merge must not cross a document border), a batch at a time.
    """
    if not documents:
        return np.zeros(0, dtype=tokenizer.dtype)
    if tokenizer.type != "char":
        eot = np.array([EOT_ID], dtype=tokenizer.dtype)
        pieces: list[np.ndarray] = []
        for start in range(0, len(documents), 1024):
            for ids in tokenizer.encode_batch(documents[start : start + 1024]):
                pieces += [ids, eot]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=tokenizer.dtype)
    ids = tokenizer.encode_array("\n".join(documents) + "\n")
    lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    ids[np.cumsum(lengths + 1) - 1] = EOT_ID
    return ids


# -- dialogues ----------------------------------------------------------------------------------


def _build_dialogues(texts, files, format, skip_bad, val_fraction, seed, build_tokenizer, notes):
    """Dialogues -> split -> tokenizer -> rendered bins and tables. Returns as _build_plain does."""
    problems = Problems(skip_bad)
    pool = Dialogues()
    given_val: Dialogues | None = None
    ignored: dict[str, int] = {}
    for path, text in texts:
        parsed = parse_dialogues(text, format, path, problems)
        pool.extend(parsed.dialogues)
        if parsed.valid is not None:
            given_val = given_val if given_val is not None else Dialogues()
            given_val.extend(parsed.valid)
        for key, count in parsed.ignored.items():
            ignored[key] = ignored.get(key, 0) + count
    if problems.count:
        notes.append(
            f"跳过了 {problems.count:,} 个格式不对的对话 skipped {problems.count:,} malformed "
            f"dialogue(s) (--skip-bad); the first: {problems.first}"
        )
    for key, count in ignored.items():
        notes.append(f"忽略 ignored the {key!r} list ({count:,} dialogues)")
    if not len(pool):
        raise ZaizaiError(f"no dialogues found in {_where(files)}; check the file and --format {format}")

    if given_val is not None and len(given_val):
        train, val, split_by = pool, given_val, "given"
        notes.append(
            f"验证集用文件自带的 valid 列表 using the files' own \"valid\" list for validation "
            f"({len(val):,} dialogues)"
        )
    elif len(pool) >= 2:
        is_val = _validation_mask(len(pool), val_fraction, seed)
        train, val = pool.select(np.flatnonzero(~is_val)), pool.select(np.flatnonzero(is_val))
        split_by = "dialogues"
    else:
        raise ZaizaiError(
            f"only one dialogue in {_where(files)}; at least two are needed (one is held out for validation)"
        )

    tok = build_tokenizer(train.contents)
    arrays: dict[str, np.ndarray] = {}
    split_info: dict[str, dict[str, int]] = {}
    for name, dialogues in (("train", train), ("val", val)):
        rendered = render_dialogues(tok, dialogues)
        roles_bin, dialogues_npy, turns_npy = _dialogue_files(name)
        arrays[_bin_file(name)] = rendered.ids
        arrays[roles_bin] = rendered.roles
        arrays[dialogues_npy] = np.stack([rendered.starts, rendered.lengths], axis=1)
        arrays[turns_npy] = rendered.turn_starts
        split_info[name] = _dialogue_counts(dialogues, rendered)
    first_dialogue = tok.decode(arrays["train.bin"][: min(int(arrays["train_dialogues.npy"][0, 1]), 301)])

    def summary(meta: dict[str, Any]) -> None:
        print(f"对话格式 format: {meta['format']} · {len(files):,} file(s)")
        print(f"词表大小 vocab size: {meta['vocab_size']:,}" + _reused_note(meta))
        print("第一个训练对话 first training dialogue:")
        print(first_dialogue if len(first_dialogue) <= 300 else first_dialogue[:300] + " ...")
        for name, label in (("train", "训练集 train"), ("val", "验证集 val")):
            info = meta["splits"][name]
            share = info["assistant_tokens"] / info["tokens"] if info["tokens"] else 0.0
            print(
                f"{label}: {info['dialogues']:,} dialogues · {info['turns']:,} turns · "
                f"{info['tokens']:,} tokens · {share:.1%} assistant"
            )
        _print_unknown(meta)

    return tok, arrays, split_by, split_info, summary


def _dialogue_counts(dialogues: Dialogues, rendered) -> dict[str, int]:
    """Sizes of a rendered dialogue split; "chars" and "assistant_chars" feed bits_per_char."""
    roles = np.frombuffer(bytes(dialogues.roles), dtype=np.uint8)
    text_lengths = np.fromiter(map(len, dialogues.contents), dtype=np.int64, count=dialogues.n_messages)
    is_assistant = roles == ASSISTANT
    return {
        "tokens": int(rendered.ids.size),
        "dialogues": len(dialogues),
        "turns": dialogues.n_messages,
        # targets with loss_on="all" (role >= 1) and loss_on="assistant" (role 2)
        "loss_tokens": int(np.count_nonzero(rendered.roles >= PROMPT)),
        "assistant_tokens": int(np.count_nonzero(rendered.roles == ASSISTANT_TARGET)),
        # characters those targets stand for: the messages' text, plus one per <|end|>
        "chars": int(text_lengths.sum()) + dialogues.n_messages,
        "assistant_chars": int(text_lengths[is_assistant].sum()) + int(is_assistant.sum()),
        "unknown": int(np.count_nonzero(rendered.ids == UNK_ID)),
    }


# -- writing ------------------------------------------------------------------------------------


def _write_folder(
    out_dir: Path, kind: str, tokenizer: Tokenizer, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> None:
    """Write the bins (and dialogue tables), the tokenizer and then meta.json, each atomically.

    An ``arrays`` value may be the path of a finished partial bin (streamed prepare): it is
    renamed into place, or removed if writing fails."""
    try:
        with _output_errors(out_dir):
            _write_files(out_dir, kind, tokenizer, arrays, meta)
    finally:
        for array in arrays.values():
            if isinstance(array, Path) and array.is_file():
                array.unlink()


@contextmanager
def _output_errors(out_dir: Path):
    """Turn OS errors while writing into ``out_dir`` into a ZaizaiError the user can act on."""
    try:
        yield
    except (FileExistsError, NotADirectoryError):
        raise ZaizaiError(f"{out_dir}: exists and is not a folder; choose another output folder") from None
    except OSError as err:
        raise ZaizaiError(f"{out_dir}: cannot write there ({err.strerror or err})") from None


def _write_files(
    out_dir: Path, kind: str, tokenizer: Tokenizer, arrays: dict[str, Any], meta: dict[str, Any]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json marks a complete folder: remove the old one first, so a crash part way
    # through leaves "not prepared" rather than new bins described by old metadata.
    (out_dir / META_FILE).unlink(missing_ok=True)
    if kind == "plain":  # leftovers of dialogue data prepared here before
        for name in set(_output_names("dialogue")) - set(_output_names("plain")):
            (out_dir / name).unlink(missing_ok=True)
    little_endian = tokenizer.dtype.newbyteorder("<")
    for name, array in arrays.items():  # train.bin first: its name is in every folder
        if isinstance(array, Path):  # a finished partial file of the streamed prepare
            os.replace(array, out_dir / name)
            continue
        if name.endswith(".npy"):
            data: Any = _npy_bytes(array.astype("<i8", copy=False))
        elif name.endswith("_roles.bin"):
            data = np.ascontiguousarray(array, dtype=np.uint8)
        else:
            data = array.astype(little_endian, copy=False)
        write_atomic(out_dir / name, data)
    tokenizer.save(out_dir / TOKENIZER_FILE)
    config = json.dumps(hf_tokenizer_config(tokenizer), ensure_ascii=False, indent=2) + "\n"
    write_atomic(out_dir / TOKENIZER_CONFIG_FILE, config.encode("utf-8"))
    meta_json = json.dumps(meta, ensure_ascii=False, indent=2) + "\n"
    write_atomic(out_dir / META_FILE, meta_json.encode("utf-8"))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


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
    kind = meta.setdefault("kind", "plain")  # folders prepared before dialogues existed
    counts = ("tokens", "chars")
    if kind == "dialogue":
        counts += ("dialogues", "turns", "loss_tokens", "assistant_tokens", "assistant_chars")
    try:
        ok = (
            kind in KINDS
            and meta["dtype"] in ("uint16", "uint32")
            and isinstance(meta["vocab_size"], int)
            and isinstance(meta["tokenizer_file"], str)
            and all(isinstance(meta["splits"][s][k], int) for s in SPLITS for k in counts)
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

    Plain data (``kind == "plain"``) is sampled with :meth:`get_batch` and
    :meth:`iter_eval_windows`; dialogue data (``kind == "dialogue"``) with
    :meth:`get_dialogue_batch` and :meth:`iter_dialogue_eval_batches`.
    """

    def __init__(self, data_dir: PathLike):
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        self._tokenizer: Tokenizer | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._chunks: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._with_targets: dict[tuple[str, int, str], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        state["_arrays"] = {}  # a pickled memmap would be a full in-memory copy
        state["_chunks"] = {}
        state["_with_targets"] = {}
        return state

    def __repr__(self) -> str:
        return f"TokenData({str(self.data_dir)!r}, kind={self.kind!r}, vocab_size={self.meta['vocab_size']})"

    @property
    def kind(self) -> str:
        """``"plain"`` (text, sampled as windows) or ``"dialogue"`` (conversations with loss masks)."""
        return self.meta["kind"]

    @property
    def tokenizer(self) -> Tokenizer:
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
            dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            self._arrays[name] = self._open_bin(_bin_file(name), dtype, self.meta["splits"][name]["tokens"])
        return self._arrays[name]

    def _open_bin(self, file: str, dtype: np.dtype, count: int) -> np.ndarray:
        path = self.data_dir / file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ZaizaiError(f"{path} is missing; run `zaizai prepare` again") from None
        if size != count * dtype.itemsize:
            raise ZaizaiError(
                f"{path} does not match {META_FILE} ({size:,} bytes, expected {count:,} tokens of "
                f"{dtype.itemsize} bytes); run `zaizai prepare` again"
            )
        if count == 0:
            return np.empty(0, dtype=dtype)  # mmap refuses empty files
        return np.memmap(path, dtype=dtype, mode="r")

    def num_tokens(self, split: str) -> int:
        return len(self.split(split))

    # -- plain text: windows ---------------------------------------------------------------------

    def _require_plain(self, method: str, instead: str) -> None:
        if self.kind != "plain":
            raise ZaizaiError(
                f"{self.data_dir} holds dialogue data, which {method} cannot sample (it would mix "
                f"conversations and ignore the loss mask); use {instead}"
            )

    def get_batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``batch_size`` random windows: inputs x and next-token targets y, both (B, T).

        int64 CPU tensors; ``y[b, t] == x[b, t + 1]`` and ``y[b, -1]`` is the token after the window.
        Plain data only (dialogue data: :meth:`get_dialogue_batch`).
        """
        self._require_plain("get_batch", "get_dialogue_batch")
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
        Plain data only (dialogue data: :meth:`iter_dialogue_eval_batches`).
        """
        self._require_plain("iter_eval_windows", "iter_dialogue_eval_batches")
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

    # -- dialogues: packed chunks with loss masks ----------------------------------------------

    def _require_dialogue(self, method: str) -> None:
        if self.kind != "dialogue":
            raise ZaizaiError(
                f"{self.data_dir} holds plain text, not dialogues, so {method} has nothing to do; "
                "prepare dialogues with `zaizai prepare --format text|jsonl|lccc`"
            )

    def roles(self, split: str) -> np.ndarray:
        """uint8 role class of every token of a dialogue split (see :mod:`zaizai.data.dialogue`)."""
        self._require_dialogue("roles")
        _check_split(split)
        key = f"{split}_roles"
        if key not in self._arrays:
            self._arrays[key] = self._open_bin(
                _dialogue_files(split)[0], np.dtype(np.uint8), self.meta["splits"][split]["tokens"]
            )
        return self._arrays[key]

    def dialogues(self, split: str) -> np.ndarray:
        """int64 (n_dialogues, 2): start and length of each dialogue in the split's bin."""
        self._require_dialogue("dialogues")
        return self._open_table(split, 1, (self.meta["splits"][split]["dialogues"], 2))

    def turn_starts(self, split: str) -> np.ndarray:
        """int64 (n_messages,): position of every message's role marker in the split's bin."""
        self._require_dialogue("turn_starts")
        return self._open_table(split, 2, (self.meta["splits"][split]["turns"],))

    def _open_table(self, split: str, which: int, shape: tuple[int, ...]) -> np.ndarray:
        _check_split(split)
        path = self.data_dir / _dialogue_files(split)[which]
        if path.name not in self._arrays:
            try:
                table = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise ZaizaiError(f"{path} is missing; run `zaizai prepare` again") from None
            except (OSError, ValueError) as err:
                raise ZaizaiError(f"{path} is damaged ({err}); run `zaizai prepare` again") from None
            if table.shape != shape or table.dtype != np.int64:
                raise ZaizaiError(f"{path} does not match {META_FILE}; run `zaizai prepare` again")
            self._arrays[path.name] = table
        return self._arrays[path.name]

    def dialogue_chunks(self, split: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The pieces a split's dialogues are cut into for ``block_size``: (starts, lengths), int64.

        A piece is at most ``block_size + 1`` tokens (``block_size`` inputs and their targets).
        A dialogue that fits is one piece. A longer one is cut at turn starts: each piece runs
        from one turn's role marker up to and including the marker of the last turn that still
        fits, and the next piece starts at that marker, so every target of the dialogue is a
        target of exactly one piece and a piece that starts mid-dialogue starts with its role
        marker. A turn too long for a block by itself is cut wherever the block ends (again
        sharing one token, so no target is lost). Computed once per split and block size.
        """
        self._require_dialogue("dialogue_chunks")
        _check_sizes(1, block_size)
        key = (split, block_size)
        if key not in self._chunks:
            self._chunks[key] = _cut_dialogues(self.dialogues(split), self.turn_starts(split), block_size)
        return self._chunks[key]

    def _chunks_with_targets(self, split: str, block_size: int, loss_on: str) -> np.ndarray:
        """Indices of the chunks that hold at least one target the loss counts under ``loss_on``."""
        key = (split, block_size, loss_on)
        if key not in self._with_targets:
            starts, lengths = self.dialogue_chunks(split, block_size)
            counted = np.append(loss_mask(np.asarray(self.roles(split)), loss_on), False)
            if len(starts):
                # A chunk's targets are its tokens after the first: counted[start + 1 : start + length]
                # (the even slices between these bounds; the odd ones are discarded).
                bounds = np.stack([starts + 1, starts + lengths], axis=1).reshape(-1)
                has_target = np.logical_or.reduceat(counted, bounds)[::2]
            else:
                has_target = np.zeros(0, dtype=bool)
            self._with_targets[key] = np.flatnonzero(has_target)
        return self._with_targets[key]

    def get_dialogue_batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        rng: np.random.Generator,
        *,
        loss_on: str = "assistant",
        packed: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample a batch of dialogue chunks: ``(x, y, segments)``, int64 (B, T) CPU tensors.

        Chunks (see :meth:`dialogue_chunks`) holding at least one counted target are drawn at
        random. With ``packed``, each row takes drawn chunks one after another until the next
        would not fit (that one starts the next row); without, one chunk per row (for models
        that cannot keep segments apart, such as the rnn).

        ``segments[b, t]`` numbers the chunk position t belongs to within row b (0, 1, ...);
        padding is -1. ``x`` padding is EOT. ``y[b, t]`` is the next token of the same chunk,
        or -1 (IGNORE_INDEX) where that target is padding, not counted by ``loss_on``
        (``"assistant"``: replies and their ``<|end|>`` only; ``"all"``: every token after the
        opening EOT), or would be the first token of another chunk (never predicted).
        """
        self._require_dialogue("get_dialogue_batch")
        _check_sizes(batch_size, block_size)
        loss_mask(np.zeros(0, dtype=np.uint8), loss_on)  # check loss_on early
        starts, lengths = self.dialogue_chunks(split, block_size)
        pool = self._chunks_with_targets(split, block_size, loss_on)
        if pool.size == 0:
            what = "assistant replies" if loss_on == "assistant" else "tokens"
            raise ZaizaiError(f"the {split} split has no {what} to learn from; check the data or --loss-on")
        slots = lengths - 1  # a chunk of L tokens fills L - 1 positions: inputs and their targets
        draws = _Draws(rng, pool, batch_size)
        rows: list[list[int]] = []
        pending: int | None = None
        for _ in range(batch_size):
            row: list[int] = []
            room = block_size
            while room > 0 and (packed or not row):
                if pending is None:
                    pending = draws.next()
                if slots[pending] > room:
                    break
                row.append(pending)
                room -= int(slots[pending])
                pending = None
            rows.append(row)
        return self._assemble(split, rows, starts, lengths, block_size, loss_on)

    def iter_dialogue_eval_batches(
        self,
        split: str,
        block_size: int,
        batch_size: int,
        *,
        loss_on: str = "assistant",
        packed: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Cover a whole dialogue split, ``batch_size`` rows at a time: ``(x, y, segments)``.

        Every chunk that holds a counted target appears exactly once, in order, packed into rows
        (first fit in order) or one per row; as chunks never share a target, every counted
        target of the split is a target exactly once and the mean loss over them is the loss of
        the whole split. Deterministic. Tensors as in :meth:`get_dialogue_batch`; the last batch
        may have fewer rows.
        """
        self._require_dialogue("iter_dialogue_eval_batches")
        _check_sizes(batch_size, block_size)
        loss_mask(np.zeros(0, dtype=np.uint8), loss_on)
        starts, lengths = self.dialogue_chunks(split, block_size)
        rows: list[list[int]] = []
        row: list[int] = []
        room = block_size
        for chunk in self._chunks_with_targets(split, block_size, loss_on).tolist():
            need = int(lengths[chunk]) - 1
            if row and (not packed or need > room):
                rows.append(row)
                row, room = [], block_size
                if len(rows) == batch_size:
                    yield self._assemble(split, rows, starts, lengths, block_size, loss_on)
                    rows = []
            row.append(chunk)
            room -= need
        if row:
            rows.append(row)
        if rows:
            yield self._assemble(split, rows, starts, lengths, block_size, loss_on)

    def _assemble(
        self,
        split: str,
        rows: list[list[int]],
        starts: np.ndarray,
        lengths: np.ndarray,
        block_size: int,
        loss_on: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lay the chunks of each row side by side into (x, y, segments) tensors of (B, T)."""
        n_rows = len(rows)
        x = np.full((n_rows, block_size), EOT_ID, dtype=np.int64)
        y = np.full((n_rows, block_size), IGNORE_INDEX, dtype=np.int64)
        segments = np.full((n_rows, block_size), -1, dtype=np.int64)
        chunks = np.fromiter((c for row in rows for c in row), dtype=np.int64)
        if chunks.size:
            row_of = np.repeat(np.arange(n_rows), [len(row) for row in rows])
            segment_of = np.concatenate([np.arange(len(row)) for row in rows])
            width = lengths[chunks] - 1  # positions each chunk fills
            # Column where each chunk begins: the widths of the chunks before it in its row.
            before = np.cumsum(width) - width
            row_first = np.searchsorted(row_of, row_of)  # index of its row's first chunk
            column = before - before[row_first]
            offset = np.arange(int(width.sum())) - np.repeat(before, width)  # 0.. within a chunk
            source = np.repeat(starts[chunks], width) + offset  # token positions in the bin
            flat = np.repeat(row_of * block_size + column, width) + offset
            ids, roles = self.split(split), self.roles(split)
            targets = np.asarray(ids[source + 1], dtype=np.int64)
            counted = loss_mask(np.asarray(roles[source + 1]), loss_on)
            x.reshape(-1)[flat] = ids[source]
            y.reshape(-1)[flat] = np.where(counted, targets, IGNORE_INDEX)
            segments.reshape(-1)[flat] = np.repeat(segment_of, width)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(segments)

    # -- bits per character --------------------------------------------------------------------

    def bits_per_char(self, split: str, loss_nats: float, *, loss_on: str = "assistant") -> float:
        """Convert a mean loss per token (nats) into bits per character of the original text.

        Plain data: characters of the split's text, each document separator counting as one.
        Dialogue data: the characters the counted targets stand for, that is the text of the
        messages whose tokens are targets plus one per ``<|end|>`` (role markers stand for no
        character; their bits are charged to the text). ``loss_on="assistant"`` counts the
        replies (and the bits per character equal the loss over ln 2 for the char tokenizer),
        ``"all"`` every message.
        """
        _check_split(split)
        info = self.meta["splits"][split]
        if self.kind == "dialogue":
            loss_mask(np.zeros(0, dtype=np.uint8), loss_on)
            if loss_on == "assistant":
                tokens, chars = info["assistant_tokens"], info["assistant_chars"]
            else:
                tokens, chars = info["loss_tokens"], info["chars"]
        else:
            tokens, chars = info["tokens"], info["chars"]
        return loss_nats / math.log(2) * tokens / chars if chars else float("nan")


class _Draws:
    """Random chunk indices from ``pool``, drawn from ``rng`` a block at a time."""

    def __init__(self, rng: np.random.Generator, pool: np.ndarray, batch_size: int):
        self.rng, self.pool = rng, pool
        self.block = max(64, 4 * batch_size)
        self.buffer: list[int] = []

    def next(self) -> int:
        if not self.buffer:
            self.buffer = self.pool[self.rng.integers(0, len(self.pool), size=self.block)].tolist()[::-1]
        return self.buffer.pop()


def _cut_dialogues(
    dialogues: np.ndarray, turn_starts: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pieces of at most ``block_size + 1`` tokens (see :meth:`TokenData.dialogue_chunks`)."""
    starts = np.asarray(dialogues[:, 0], dtype=np.int64)
    lengths = np.asarray(dialogues[:, 1], dtype=np.int64)
    fits = lengths <= block_size + 1
    piece_starts, piece_lengths = [starts[fits]], [lengths[fits]]
    turns = np.asarray(turn_starts, dtype=np.int64)
    cut_starts: list[int] = []
    cut_lengths: list[int] = []
    for start, length in zip(starts[~fits].tolist(), lengths[~fits].tolist()):
        end = start + length  # one past the dialogue's last token
        inner = turns[np.searchsorted(turns, start) : np.searchsorted(turns, end)]
        position = start
        while position < end - 1:
            limit = position + block_size  # the furthest token this piece may hold
            if limit >= end - 1:
                cut = end - 1
            else:
                # Cut at the last turn start that still fits, unless the turn starting there
                # is itself too long for a block (it will be cut anyway: fill this piece).
                k = int(np.searchsorted(inner, limit, side="right")) - 1
                cut = limit
                if k >= 0 and inner[k] > position:
                    after = int(inner[k + 1]) if k + 1 < len(inner) else end - 1
                    if after - int(inner[k]) <= block_size:
                        cut = int(inner[k])
            cut_starts.append(position)
            cut_lengths.append(cut - position + 1)
            position = cut
    piece_starts.append(np.asarray(cut_starts, dtype=np.int64))
    piece_lengths.append(np.asarray(cut_lengths, dtype=np.int64))
    all_starts, all_lengths = np.concatenate(piece_starts), np.concatenate(piece_lengths)
    order = np.argsort(all_starts, kind="stable")
    return all_starts[order], all_lengths[order]


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise ZaizaiError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")


def _check_sizes(batch_size: int, block_size: int) -> None:
    if batch_size < 1:
        raise ZaizaiError(f"--batch-size must be at least 1, got {batch_size}")
    if block_size < 1:
        raise ZaizaiError(f"--block-size must be at least 1, got {block_size}")
