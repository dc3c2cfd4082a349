"""``prepare``: turn the user's text into a data folder once, for every training run after.

It reads the files, builds the token bins of plain text (:mod:`zaizai.data.build_plain`) or of
dialogues (:mod:`zaizai.data.build_dialogues`), then writes the folder described in
:mod:`zaizai.data.tokendata`: the bins (and dialogue tables), ``tokenizer.json``,
``tokenizer_config.json`` and, last, ``meta.json``, each atomically, so that a crash leaves the
old folder or no ``meta.json`` (not prepared), never bins described by the wrong metadata.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ZaizaiError
from ..common.fileio import atomic_write
from ..common.outputs import DATA, check_output_folder
from .build_dialogues import build_dialogues
from .build_plain import build_plain_streaming
from .building import Built, TokenizerChoice, output_errors, read_files
from .corpus import PathLike, check_encoding, check_errors, list_text_files
from .formats import FOLDER_SUFFIXES, TXT_HINT, check_format, resolve_format
from .tokendata import META_FILE, META_VERSION, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, check_val_split, output_names
from .tokenizer import Tokenizer, hf_tokenizer_config, load_tokenizer

NEW_TOKENIZERS = ("char", "bpe")  # what --tokenizer builds when it does not name a file or folder
SHORT_VAL_TOKENS = 64  # a validation split this short does not fill one block of the smallest presets


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
    errors: str = "strict",
    verbose: bool = True,
    workers: int | None = None,
    overwrite: bool = False,
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
    BPE of ``vocab_size`` tokens, for plain text and dialogues alike) builds a new tokenizer from
    the training split. Anything else names a ``tokenizer.json`` (or a folder holding one: a data
    folder or a trained model's) to reuse, so a pretrained model can be fine-tuned on the new
    data; an existing file or folder wins over the names. Characters a reused char tokenizer
    lacks become ``<|unk|>`` (counted).

    Plain text is streamed in bounded memory whatever its size or shape: each file is read in
    pieces of about 4 MB cut at empty lines (or, inside a longer document, after a character
    that is not whitespace), decoded, split and encoded by ``workers`` processes (default: up to 4
    cores; one for a single piece). The files are read three times: to count documents (which
    fixes the split), to build the tokenizer from the training documents (a BPE from an even
    sample of about ``build_plain.BPE_SAMPLE_CHARS`` characters, in short chunks), and to encode.
    Dialogues are still read into memory.

    ``errors``: bytes not valid in ``encoding`` are refused (``"strict"``, naming the byte), made
    U+FFFD (``"replace"``) or dropped (``"ignore"``), counted in meta.json's "sources". ``skip_bad``:
    skip malformed dialogues (counted) instead of stopping at the first with ``file:line: what``.
    ``overwrite``: needed to replace a data folder (or fill a non-empty one); a model folder is never
    written over. Checked before anything is read; a failed prepare leaves an old folder as it was.

    The validation split is ``val_fraction`` of the documents (dialogues), chosen by a seeded
    permutation (same seed, same split) and kept in their original order; an LCCC file's own
    "valid" list is used as given instead. A plain corpus with a single document falls back to
    holding out its last lines (its last characters, if it is a single line). A new tokenizer
    sees only the training split, so validation characters it never saw become ``<|unk|>``, as
    they would in new text.
    """
    check_output_folder(out_dir, DATA, overwrite=overwrite)
    val_fraction, seed = _check_split_options(val_fraction, seed)
    check_format(format)
    encoding, errors = check_encoding(encoding), check_errors(errors)
    files = list_text_files(paths, FOLDER_SUFFIXES[format])
    resolved = resolve_format(files, format)
    kind = "plain" if resolved == "plain" else "dialogue"
    out_dir = Path(out_dir)
    outputs = [out_dir / name for name in output_names(kind)]
    _refuse_overwriting_inputs(files, outputs)
    choice, reused_from = _tokenizer_choice(tokenizer, vocab_size, verbose)

    if kind == "plain":
        built = build_plain_streaming(files, out_dir, encoding=encoding, val_fraction=val_fraction, seed=seed,
                                      tokenizer=choice, workers=workers, verbose=verbose, errors=errors)
    else:
        built = build_dialogues(read_files(files, encoding, verbose, errors), files, format=resolved,
                                skip_bad=skip_bad, val_fraction=val_fraction, seed=seed, tokenizer=choice)

    meta: dict[str, Any] = {
        "version": META_VERSION,
        "kind": kind,
        "format": resolved,
        "tokenizer": built.tokenizer.type,
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_from": reused_from,
        "vocab_size": built.tokenizer.vocab_size,
        "dtype": built.tokenizer.dtype.name,
        "val_fraction": val_fraction,
        "seed": seed,
        "encoding": encoding,
        **({"errors": errors} if errors != "strict" else {}),
        "split_by": built.split_by,
        "splits": built.splits,
        "sources": built.sources,
        "created_by": f"zaizai {_zaizai_version()}",
    }
    _check_val(out_dir, meta, built)
    _write_folder(out_dir, kind, built.tokenizer, built.arrays, meta)
    if verbose:
        txt_hint = format == "auto" and resolved == "plain" and any(p.suffix.lower() == ".txt" for p in files)
        _print_summary(meta, built, files, outputs, [TXT_HINT] if txt_hint else [])
    return meta


def _check_val(out_dir: Path, meta: dict[str, Any], built: Built) -> None:
    """Refuse an empty validation split before writing anything (removing the streamed partial bins); note
    one shorter than a block."""
    try:
        check_val_split(out_dir, meta)
    except ZaizaiError:
        for array in built.arrays.values():
            if isinstance(array, Path):
                array.unlink(missing_ok=True)
        raise
    tokens = meta["splits"]["val"]["tokens"]
    if tokens <= SHORT_VAL_TOKENS:
        built.notes.append(f"注意：验证集只有 {tokens:,} 个 token，验证损失会很不稳 · note: the validation "
                           f"split has only {tokens:,} tokens (not one block of {SHORT_VAL_TOKENS}), so its loss "
                           "says little; add text or raise --val-fraction")


def _check_split_options(val_fraction: float, seed: int) -> tuple[float, int]:
    """``val_fraction`` and ``seed`` checked, as plain types for meta.json."""
    # numbers.Real / Integral also admit numpy scalars; bools are refused as typos.
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not (
        0 < val_fraction < 1
    ):
        raise ZaizaiError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ZaizaiError(f"--seed must be a whole number >= 0, got {seed!r}")
    return float(val_fraction), int(seed)


def _tokenizer_choice(tokenizer: PathLike | None, vocab_size: int, verbose: bool) -> tuple[TokenizerChoice, str | None]:
    """What ``--tokenizer`` asks for, and the path of the tokenizer it reuses (None for a new one)."""
    if tokenizer is None:
        return TokenizerChoice("char", vocab_size, verbose=verbose), None
    if str(tokenizer) in NEW_TOKENIZERS and not Path(tokenizer).exists():
        return TokenizerChoice(str(tokenizer), vocab_size, verbose=verbose), None
    reused, reused_from = _reused_tokenizer(tokenizer)
    return TokenizerChoice(None, vocab_size, reused, verbose), reused_from


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


# -- what prepare prints ---------------------------------------------------------------------------


def _print_summary(meta: dict[str, Any], built: Built, files: list[Path], outputs: list[Path],
                   hints: list[str]) -> None:
    """What the articles print: notes, sizes, vocabulary, the first text, split sizes, the files written."""
    for note in [*hints, *built.notes]:
        print(note)
    n_files = len(files)
    reused = f" (reused {meta['tokenizer_from']})" if meta["tokenizer_from"] else ""
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    if meta["kind"] == "plain":
        print(f"字符数 characters: {built.n_chars:,}")
        print(f"词表大小 vocab size: {meta['vocab_size']:,}" + reused)
        print("前 100 个字符 first 100 characters:")
        print(built.preview)
        print(f"训练集 train: {train['tokens']:,} tokens ({train['documents']:,} documents)")
        print(f"验证集 val: {val['tokens']:,} tokens ({val['documents']:,} documents)")
    else:
        print(f"对话格式 format: {meta['format']} · {n_files:,} file(s)")
        print(f"词表大小 vocab size: {meta['vocab_size']:,}" + reused)
        print("第一个训练对话 first training dialogue:")
        print(built.preview if len(built.preview) <= 300 else built.preview[:300] + " ...")
        for info, label in ((train, "训练集 train"), (val, "验证集 val")):
            share = info["assistant_tokens"] / info["tokens"] if info["tokens"] else 0.0
            print(
                f"{label}: {info['dialogues']:,} dialogues · {info['turns']:,} turns · "
                f"{info['tokens']:,} tokens · {share:.1%} assistant"
            )
    if train["unknown"]:
        print(
            f"复用的词表里没有的字符 characters the reused tokenizer lacks: {train['unknown']:,} "
            "in train (-> <|unk|>)"
        )
    if val["unknown"]:
        unseen = "the tokenizer lacks" if meta["tokenizer_from"] else "unseen in train"
        print(f"验证集里训练集没有的字符 val characters {unseen}: {val['unknown']:,} (-> <|unk|>)")
    nuls = sum(source.get("nul", 0) for source in meta["sources"])
    if nuls:
        print(f"丢弃了 {nuls:,} 个 NUL 字符 dropped {nuls:,} NUL character(s) (\\x00, never text) from the input")
    if meta.get("errors", "strict") != "strict":  # --errors replace or ignore: say how much it changed
        bad = sum(source["undecodable"] for source in meta["sources"])
        if meta["errors"] == "replace":
            print(f"替换了 {bad:,} 个无法解码的字符 replaced {bad:,} undecodable character(s) with U+FFFD")
        else:
            print(f"丢弃了 {bad:,} 个无法解码的字符 dropped {bad:,} undecodable character(s) (--errors ignore)")
    print(f"已写入 wrote: {', '.join(str(p) for p in outputs)}")


# -- writing ------------------------------------------------------------------------------------


def _write_folder(
    out_dir: Path, kind: str, tokenizer: Tokenizer, arrays: dict[str, np.ndarray | Path], meta: dict[str, Any]
) -> None:
    """Write the bins (and dialogue tables), the tokenizer and then meta.json, each atomically.

    An ``arrays`` value may be the path of a finished partial bin (streamed prepare): it is
    renamed into place, or removed if writing fails."""
    try:
        with output_errors(out_dir):
            _write_files(out_dir, kind, tokenizer, arrays, meta)
    finally:
        for array in arrays.values():
            if isinstance(array, Path) and array.is_file():
                array.unlink()


def _write_files(
    out_dir: Path, kind: str, tokenizer: Tokenizer, arrays: dict[str, np.ndarray | Path], meta: dict[str, Any]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json marks a complete folder: remove the old one first, so a crash part way
    # through leaves "not prepared" rather than new bins described by old metadata.
    (out_dir / META_FILE).unlink(missing_ok=True)
    if kind == "plain":  # leftovers of dialogue data prepared here before
        for name in set(output_names("dialogue")) - set(output_names("plain")):
            (out_dir / name).unlink(missing_ok=True)
    little_endian = tokenizer.dtype.newbyteorder("<")
    for name, array in arrays.items():  # train.bin first: its name is in every folder
        if isinstance(array, Path):  # a finished partial file of the streamed prepare
            os.replace(array, out_dir / name)
            continue
        if name.endswith(".npy"):
            data: Any = _npy_bytes(array.astype("<i8", copy=False))
        elif name.endswith(("_roles.bin", ".jsonl")):  # one byte each: role codes, UTF-8 text
            data = np.ascontiguousarray(array, dtype=np.uint8)
        else:
            data = array.astype(little_endian, copy=False)
        atomic_write(out_dir / name, data)
    tokenizer.save(out_dir / TOKENIZER_FILE)
    config = json.dumps(hf_tokenizer_config(tokenizer), ensure_ascii=False, indent=2) + "\n"
    atomic_write(out_dir / TOKENIZER_CONFIG_FILE, config.encode("utf-8"))
    meta_json = json.dumps(meta, ensure_ascii=False, indent=2) + "\n"
    atomic_write(out_dir / META_FILE, meta_json.encode("utf-8"))


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
