"""Read and validate a user's text, and split it into documents or dialogues.

The first arrow of the pipeline: files on disk -> clean Python strings -> documents or dialogues.

- Encodings: UTF-8 by default. A UTF-8 byte-order mark is stripped; a UTF-16 one (what Windows
  Notepad calls "Unicode") is recognised and decoded as UTF-16. Anything else that is not valid
  UTF-8 is refused with one line naming the file and the byte offset, and suggesting
  ``--encoding gbk`` (what Chinese Windows saves "ANSI" text as).
- Line endings: CRLF and lone CR become LF, so a corpus means the same on every OS.
- Documents: blocks of lines separated by blank lines (the articles' layout: one dialogue per
  block). A line holding only whitespace counts as blank.
- Dialogues (``--format text | jsonl | lccc``): parsed and checked into :class:`Dialogues`; a
  malformed dialogue is reported as ``file:line: what is wrong`` (or counted and skipped).

Input files are only ever read, never written.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dialogue import ASSISTANT, ROLES, USER, Dialogues, render_text_layout_turns
from ..common.errors import ZaizaiError

PathLike = str | os.PathLike[str]

_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# A line break followed by one or more whitespace-only lines, each with its own line break.
# (Python's \s is Unicode-aware: it covers full-width spaces, like str.isspace.)
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")
# Encodings a user can name on the command line, for error messages.
_ENCODING_HINT = "utf-8, gbk, gb18030 or big5"


def check_encoding(encoding: str) -> str:
    """Return the canonical name of a text encoding (``"UTF8"`` -> ``"utf-8"``).

    Raises ZaizaiError for names Python does not know, and for codecs that do not turn bytes into
    text (``base64``, ``zlib``, ...).
    """
    try:
        name = codecs.lookup(encoding).name
        b"a".decode(encoding)  # LookupError for bytes-to-bytes codecs such as base64
    except (LookupError, TypeError):
        raise ZaizaiError(
            f"unknown text encoding {encoding!r}; use a name such as {_ENCODING_HINT}"
        ) from None
    except UnicodeDecodeError:
        pass  # a real text codec that wants more than one byte (utf-16, utf-32)
    return name


def _is_utf8(encoding_name: str) -> bool:
    return encoding_name in ("utf-8", "utf-8-sig")


def list_text_files(
    paths: PathLike | Iterable[PathLike], suffixes: Iterable[str] = (".txt",)
) -> list[Path]:
    """Expand files and folders into the list of files to read.

    A folder stands for its files (recursively, sorted by path) with the first of ``suffixes``
    that it has any of: ``*.txt`` by default; with ``(".txt", ".jsonl", ".json")`` its ``.txt``
    files if it has some, else its ``.jsonl`` files, else its ``.json`` files. Suffixes match
    whatever their case. A file is taken as given whatever its suffix. A file named twice is
    read once.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    suffixes = tuple(s.lower() for s in suffixes)
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
            in_folder = next(
                ([p for p in candidates if p.suffix.lower() == suffix] for suffix in suffixes
                 if any(p.suffix.lower() == suffix for p in candidates)),
                [],
            )
            if not in_folder:
                kinds = " or ".join(suffixes)
                raise ZaizaiError(f"{path}: folder has no {kinds} files; put your text in {kinds} files")
            found.extend(in_folder)
        elif path.is_file():
            found.append(path)
        else:
            raise ZaizaiError(f"{path}: no such file or folder; check the path")
    if not found:
        raise ZaizaiError("no input files given; name a text file or a folder of .txt files")

    seen: set[Path] = set()
    unique = []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def decode_text(raw: bytes, encoding: str = "utf-8", *, name: PathLike = "<text>") -> str:
    """Decode the bytes of one file, strip its byte-order mark and normalise line endings to LF.

    ``name`` is only used in error messages. Byte offsets in those messages count from the start
    of the file, byte-order mark included, so a hex editor finds the exact spot.
    """
    encoding = check_encoding(encoding)
    if _is_utf8(encoding) and raw.startswith(_UTF16_BOMS):
        # Notepad's "Unicode": the BOM is a far stronger signal than the default flag.
        text = _decode_or_explain(raw, "utf-16", name, offset=0)
    elif _is_utf8(encoding):
        bom = len(_UTF8_BOM) if raw.startswith(_UTF8_BOM) else 0
        text = _decode_or_explain(raw[bom:], "utf-8", name, offset=bom, whole=raw)
    else:
        text = _decode_or_explain(raw, encoding, name, offset=0)
    text = text.removeprefix("\ufeff")  # a BOM some codecs (utf-16-le, gb18030) leave as text
    if "\r" in text:  # CRLF (Windows) and lone CR (classic Mac) line endings
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _decode_or_explain(
    data: bytes, encoding: str, name: PathLike, *, offset: int, whole: bytes | None = None
) -> str:
    """``data.decode(encoding)``, turning a decode error into a one-line ZaizaiError."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        where = offset + err.start
        if _is_utf8(encoding):
            head = (whole if whole is not None else data)[:4096]
            if head.count(0) > len(head) // 8:
                # Many NUL bytes: UTF-16 saved without a byte-order mark.
                hint = "it looks like UTF-16 without a byte-order mark: try --encoding utf-16"
            else:
                hint = "if it was saved on Chinese Windows try --encoding gbk"
            raise ZaizaiError(f"{name}: not valid UTF-8 at byte {where}; {hint}") from None
        raise ZaizaiError(
            f"{name}: not valid {encoding} at byte {where}; check --encoding "
            f"(common ones: {_ENCODING_HINT})"
        ) from None


def read_file_bytes(path: Path) -> bytes:
    """The raw bytes of ``path``, with OS errors turned into a ZaizaiError."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise ZaizaiError(f"{path}: cannot read it ({err.strerror or err})") from None


# Encodings where the bytes b"\n\n" always are two line feeds (never part of a multi-byte
# character), so a file can be cut there into pieces that decode on their own.
_CUTTABLE_ENCODINGS = {
    "utf-8", "utf-8-sig", "ascii", "latin-1", "iso8859-1", "cp1252", "gbk", "gb2312", "gb18030",
    "big5", "big5hkscs", "cp936", "cp950", "shift_jis", "cp932", "euc_jp", "euc_kr", "cp949",
}
_PIECE_CUTS = (b"\r\n\r\n", b"\n\n")  # an empty line: always a document border


def iter_file_pieces(path: Path, encoding: str = "utf-8", piece_bytes: int = 16 << 20):
    """Read a file as ``(offset, raw bytes)`` pieces of about ``piece_bytes`` that each end at an
    empty line (or at the end of the file), so that whole documents never span two pieces.

    Each piece decodes on its own (:func:`decode_piece`). A piece grows past ``piece_bytes`` when
    no empty line follows (one huge document); files in encodings that cannot be cut safely
    (UTF-16/32, or a UTF-16 byte-order mark) come as one piece.
    """
    try:
        with open(path, "rb") as f:
            first = f.read(piece_bytes)
            cuttable = codecs.lookup(encoding).name in _CUTTABLE_ENCODINGS and not first.startswith(_UTF16_BOMS)
            if not cuttable:
                yield 0, first + f.read()
                return
            offset, pending, chunk = 0, b"", first
            while chunk:
                pending += chunk
                cut = _last_cut(pending)
                if cut:
                    yield offset, pending[:cut]
                    offset, pending = offset + cut, pending[cut:]
                chunk = f.read(piece_bytes)
            if pending:
                yield offset, pending
    except OSError as err:
        raise ZaizaiError(f"{path}: cannot read it ({err.strerror or err})") from None


def _last_cut(data: bytes) -> int:
    """Position just after the last empty line in ``data``, or 0 if there is none."""
    return max((i + len(cut) for cut in _PIECE_CUTS if (i := data.rfind(cut)) >= 0), default=0)


def decode_piece(raw: bytes, encoding: str, name: PathLike, offset: int) -> str:
    """Decode a piece of :func:`iter_file_pieces` as :func:`decode_text` decodes a whole file."""
    if offset == 0:
        return decode_text(raw, encoding, name=name)
    enc = "utf-8" if _is_utf8(check_encoding(encoding)) else encoding
    text = _decode_or_explain(raw, enc, name, offset=offset)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def read_texts(
    paths: PathLike | Iterable[PathLike], encoding: str = "utf-8"
) -> list[tuple[Path, str]]:
    """Read text files and folders of ``*.txt`` files into ``[(path, text), ...]``.

    Each text has its byte-order mark removed and LF line endings. Raises ZaizaiError for a
    missing path, a folder without ``.txt`` files, an unknown encoding, or bytes that are not
    valid in ``encoding`` (naming the file and byte offset).
    """
    check_encoding(encoding)  # fail before touching any file
    return [
        (path, decode_text(read_file_bytes(path), encoding, name=path))
        for path in list_text_files(paths)
    ]


def split_documents(text: str) -> list[str]:
    """Split LF-ended text into documents at blank lines.

    A blank line is one that is empty or holds only whitespace (full-width spaces included).
    Several blank lines in a row count as one separator. Each document keeps its inner newlines
    and each line's own spacing, but has no leading or trailing blank lines and no final newline.
    Empty or whitespace-only text gives ``[]``.
    """
    # With a newline added at both ends every line of ``text`` sits between two newlines, so
    # each run of blank lines - even at the very start or end - is one _BLANK_LINES match. The
    # pieces between matches are the documents; only the first and last still carry one of the
    # added newlines (or are empty, when the text starts or ends with blank lines).
    pieces = _BLANK_LINES.split(f"\n{text}\n")
    pieces[0] = pieces[0][1:]
    pieces[-1] = pieces[-1][:-1]
    return [piece for piece in pieces if piece]


# ---------------------------------------------------------------------------------------------
# dialogues: the three conversation layouts
# ---------------------------------------------------------------------------------------------

# plain: pretraining text (documents). text: the articles' dialogue layout (one turn per line,
# blank line between dialogues). jsonl: {"messages": [...]} per line. lccc: JSON lists of utterances.
FORMATS = ("auto", "plain", "text", "jsonl", "lccc")
DIALOGUE_FORMATS = ("text", "jsonl", "lccc")
# What --format auto makes of a suffix; anything else is plain text. A .txt file stays plain: Tang
# poems are blocks of lines too, so dialogues in the text layout cannot be told apart safely.
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "lccc"}
# The files a folder stands for (auto: its .txt files, or if none its .jsonl, or else its .json).
FOLDER_SUFFIXES = {
    "auto": (".txt", ".jsonl", ".json"),
    "plain": (".txt",),
    "text": (".txt",),
    "jsonl": (".jsonl",),
    "lccc": (".json",),
}
TXT_HINT = (
    "把 .txt 当作普通文本 treating .txt as plain text; for dialogues in the articles' layout "
    "(one turn per line) add --format text"
)
_SKIP_HINT = "fix it, or add --skip-bad to skip malformed dialogues"


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise ZaizaiError(f"unknown --format {format!r}; use one of {', '.join(FORMATS)}")
    return format


def resolve_format(files: list[Path], format: str = "auto") -> str:
    """The one layout of ``files``: ``format`` itself, or under ``"auto"`` the one their suffixes say.

    ``.jsonl`` -> jsonl, ``.json`` -> lccc, anything else (``.txt``) -> plain. Files of different
    layouts cannot be prepared together: ZaizaiError.
    """
    check_format(format)
    if format != "auto":
        return format
    by_format: dict[str, Path] = {}
    for path in files:
        by_format.setdefault(SUFFIX_FORMATS.get(path.suffix.lower(), "plain"), path)
    if len(by_format) > 1:
        examples = ", ".join(f"{path.name} ({fmt})" for fmt, path in by_format.items())
        raise ZaizaiError(
            f"the input files mix formats: {examples}; prepare one format at a time, "
            "or name it with --format"
        )
    return next(iter(by_format), "plain")


class Problems:
    """Where malformed dialogues go: raise at the first (default), or count them (``skip_bad``)."""

    def __init__(self, skip_bad: bool = False):
        self.skip_bad = skip_bad
        self.count = 0
        self.first: str | None = None  # the first one skipped, to show the user

    def report(self, where: str, what: str) -> None:
        message = f"{where}: {what}"
        if not self.skip_bad:
            raise ZaizaiError(f"{message}; {_SKIP_HINT}")
        self.count += 1
        if self.first is None:
            self.first = message


@dataclass
class ParsedDialogues:
    """The dialogues of one file. ``valid`` holds an LCCC file's own validation list, if it has one."""

    dialogues: Dialogues
    valid: Dialogues | None = None
    ignored: dict[str, int] = field(default_factory=dict)  # lists left out, e.g. {"test": 1000}


def parse_dialogues(text: str, format: str, name: PathLike, problems: Problems) -> ParsedDialogues:
    """Parse the decoded text of one file in a dialogue ``format`` (text, jsonl or lccc).

    Malformed dialogues go to ``problems`` as ``file:line: what is wrong``.
    """
    if format == "text":
        return ParsedDialogues(parse_text_layout(text, name, problems))
    if format == "jsonl":
        return ParsedDialogues(parse_jsonl(text, name, problems))
    if format == "lccc":
        return parse_lccc(text, name, problems)
    raise ValueError(f"not a dialogue format: {format!r}")


def parse_text_layout(text: str, name: PathLike, problems: Problems) -> Dialogues:
    """The articles' layout: a block of lines is a dialogue, each line a turn, the first the user's.

    Blocks are separated by blank (or whitespace-only) lines, as documents are.
    """
    dialogues = Dialogues()
    block: list[str] = []
    first_line = 0

    def flush() -> None:
        if len(block) < 2:
            problems.report(
                f"{name}:{first_line}",
                "a dialogue needs at least two lines (the user's turn, then the reply); "
                "separate dialogues by a blank line",
            )
        else:
            dialogues.add(render_text_layout_turns(block))

    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            if not block:
                first_line = number
            block.append(line)
        elif block:
            flush()
            block = []
    if block:
        flush()
    return dialogues


def parse_jsonl(text: str, name: PathLike, problems: Problems) -> Dialogues:
    """One OpenAI-style ``{"messages": [{"role": ..., "content": ...}, ...]}`` object per line.

    Blank lines are skipped. Keys other than "messages" (and than "role"/"content" in a message)
    are ignored.
    """
    dialogues = Dialogues()
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.report(where, f"not valid JSON ({err.msg} at column {err.colno})")
            continue
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list):
            problems.report(where, 'expected an object {"messages": [{"role": ..., "content": ...}, ...]}')
            continue
        problem = training_messages_problem(messages)
        if problem:
            problems.report(where, problem)
            continue
        dialogues.add(messages)
    return dialogues


def training_messages_problem(messages: list[Any]) -> str | None:
    """What is wrong with a training conversation, or None.

    Each message needs a role (system, user, assistant) and non-empty string content; a system
    message may only come first; user and assistant alternate; at least one reply (assistant)
    gives the model something to learn.
    """
    if not messages:
        return "the conversation has no messages"
    previous = None
    for k, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            return f'message {k} is not an object {{"role": ..., "content": ...}}'
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {k} has role {role!r}; use {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {k}: content must be a string, got {_json_type(content)}"
        if not content.strip():
            return f"message {k} ({role}) is empty"
        if role == "system" and k != 1:
            return f"message {k}: a system message may only come first"
        if role == previous:
            return f"messages {k - 1} and {k} are both {role}; user and assistant must take turns"
        previous = role
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant message: nothing for the model to learn to reply"
    return None


_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_LCCC_KEYS = ("train", "valid")
_LCCC_IGNORED_KEYS = ("test",)


def parse_lccc(text: str, name: PathLike, problems: Problems) -> ParsedDialogues:
    """LCCC-style JSON: a list of dialogues, each a list of utterances (user first, then taking turns).

    Or an object ``{"train": [...], "valid": [...]}``, whose "valid" list becomes the validation
    split; a "test" list is left out. The top level is scanned one dialogue at a time, so a
    malformed dialogue is reported with the line it starts on. Broken JSON syntax cannot be
    skipped (nothing after it can be trusted): it always stops with its line and column.
    """
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    train, valid = Dialogues(), None
    ignored: dict[str, int] = {}

    def fail(pos: int, what: str) -> ZaizaiError:
        return ZaizaiError(f"{name}:{lines.line_of(pos)}: {what}; fix the file")

    def skip_space(pos: int) -> int:
        return _WHITESPACE.match(text, pos).end()

    def decode(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise ZaizaiError(
                f"{name}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); fix the file"
            ) from None

    def scan_list(pos: int, into: Dialogues | None) -> int:
        """Read the list of dialogues that starts at text[pos]; return the position after it."""
        if text[pos : pos + 1] != "[":
            raise fail(pos, "expected a list of dialogues")
        pos = skip_space(pos + 1)
        if text[pos : pos + 1] == "]":
            return pos + 1
        while True:
            item, end = decode(pos)
            if into is not None:
                problem = _lccc_dialogue_problem(item)
                if problem:
                    problems.report(f"{name}:{lines.line_of(pos)}", problem)
                else:
                    into.add_codes(item, _alternating_roles(len(item)))
            pos = skip_space(end)
            if text[pos : pos + 1] == ",":
                pos = skip_space(pos + 1)
            elif text[pos : pos + 1] == "]":
                return pos + 1
            else:
                raise fail(pos, "not valid JSON (expected ',' or ']' after a dialogue)")

    pos = skip_space(0)
    top = text[pos : pos + 1]
    if top == "[":
        pos = scan_list(pos, train)
    elif top == "{":
        pos = skip_space(pos + 1)
        while text[pos : pos + 1] != "}":
            key, end = decode(pos)
            pos = skip_space(end)
            if not isinstance(key, str) or text[pos : pos + 1] != ":":
                raise fail(pos, "not valid JSON (expected a key and ':')")
            pos = skip_space(pos + 1)
            if key == "train":
                pos = scan_list(pos, train)
            elif key == "valid":
                valid = valid if valid is not None else Dialogues()
                pos = scan_list(pos, valid)
            elif key in _LCCC_IGNORED_KEYS:
                value, pos = decode(pos)
                ignored[key] = ignored.get(key, 0) + (len(value) if isinstance(value, list) else 1)
            else:
                raise fail(pos, f'unexpected key {key!r}; an LCCC object holds "train" and "valid" lists')
            pos = skip_space(pos)
            if text[pos : pos + 1] == ",":
                pos = skip_space(pos + 1)
            elif text[pos : pos + 1] != "}":
                raise fail(pos, "not valid JSON (expected ',' or '}')")
        pos += 1
    else:
        raise fail(pos, 'expected a JSON list of dialogues, or {"train": [...], "valid": [...]}')
    if skip_space(pos) != len(text):
        raise fail(skip_space(pos), "not valid JSON (extra data after the end)")
    return ParsedDialogues(train, valid, ignored)


def _lccc_dialogue_problem(item: Any) -> str | None:
    if not isinstance(item, list):
        return f"a dialogue must be a list of utterances (strings), got {_json_type(item)}"
    if len(item) < 2:
        return "a dialogue needs at least two utterances (the user's, then the reply)"
    for k, utterance in enumerate(item, 1):
        if not isinstance(utterance, str):
            return f"utterance {k} must be a string, got {_json_type(utterance)}"
        if not utterance.strip():
            return f"utterance {k} is empty"
    return None


def _alternating_roles(n: int) -> list[int]:
    return [USER if k % 2 == 0 else ASSISTANT for k in range(n)]


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


class _LineCounter:
    """Line numbers of positions in a text, for positions asked for in increasing order (cheap)."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.line = 1

    def line_of(self, pos: int) -> int:
        if pos < self.pos:  # out of order: count from the start
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line
