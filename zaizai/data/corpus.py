"""Read and validate a user's text, and split it into documents or dialogues.

The first arrow of the pipeline: files on disk -> clean Python strings -> documents or dialogues.

- Encodings: UTF-8 by default. A UTF-8 byte-order mark is stripped; a UTF-16 one (what Windows
  Notepad calls "Unicode") is recognised and decoded as UTF-16. Anything else that is not valid
  UTF-8 is refused with one line naming the file and the byte offset, and suggesting
  ``--encoding gbk`` (what Chinese Windows saves "ANSI" text as); a file that ends in the middle
  of a character (cut short) is told apart. ``errors="replace"`` (``--errors replace``) turns
  bytes that do not decode into U+FFFD instead, ``"ignore"`` drops them; either way they are counted.
- Line endings: CRLF and lone CR become LF, so a corpus means the same on every OS.
- Documents: blocks of lines separated by blank lines (the articles' layout: one dialogue per
  block). A line holding only whitespace counts as blank.
- Dialogues (``--format text | jsonl | lccc``) are parsed from the decoded text by
  :mod:`zaizai.data.formats`.

Input files are only ever read, never written.
"""

from __future__ import annotations

import codecs
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from ..common.errors import ZaizaiError

PathLike = str | os.PathLike[str]

_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# A line break followed by one or more whitespace-only lines, each with its own line break.
# (Python's \s is Unicode-aware: it covers full-width spaces, like str.isspace.)
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")
# Encodings a user can name on the command line, for error messages.
_ENCODING_HINT = "utf-8, gbk, gb18030 or big5"
NUL_SHARE_LIMIT = 0.01  # more NUL characters than this share of a text: refused, not dropped
ERRORS = ("strict", "replace", "ignore")  # what to do with bytes that do not decode (--errors)

# Python's "replace" and "ignore", counting what they replace or drop (in this thread).
_undecodable = threading.local()


def _counting(replacement: str):
    def handler(err: UnicodeError) -> tuple[str, int]:
        _undecodable.count += 1
        return replacement, err.end  # type: ignore[attr-defined]

    return handler


codecs.register_error("zaizai-replace", _counting("\ufffd"))
codecs.register_error("zaizai-ignore", _counting(""))


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


def check_errors(errors: str) -> str:
    """``errors`` if it is one of :data:`ERRORS`, else a ZaizaiError."""
    if errors not in ERRORS:
        raise ZaizaiError(f"--errors must be one of {', '.join(ERRORS)}, got {errors!r}")
    return errors


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


def decode_text(
    raw: bytes, encoding: str = "utf-8", *, name: PathLike = "<text>", errors: str = "strict"
) -> str:
    """Decode the bytes of one file, strip its byte-order mark and normalise line endings to LF.

    ``name`` is only used in error messages. Byte offsets in those messages count from the start
    of the file, byte-order mark included, so a hex editor finds the exact spot. ``errors``:
    ``"strict"`` refuses bytes that do not decode, ``"replace"`` turns them into U+FFFD,
    ``"ignore"`` drops them.
    """
    return decode_counting(raw, encoding, name=name, errors=errors).text


class Decoded(NamedTuple):
    """Decoded text, how many characters did not decode (replaced or dropped) and how many NULs were dropped."""

    text: str
    undecodable: int
    nuls: int


def decode_counting(
    raw: bytes, encoding: str = "utf-8", *, name: PathLike = "<text>", errors: str = "strict", offset: int = 0
) -> Decoded:
    """:func:`decode_text`, also returning how many characters did not decode (replaced or
    dropped; 0 with ``errors="strict"``, which raises instead) and how many NUL characters were
    dropped (see :func:`drop_nuls`).

    ``raw`` starts at byte ``offset`` of the file: 0 for a whole file (its byte-order mark is
    handled), more for a later piece of :func:`iter_file_pieces`.
    """
    encoding, errors = check_encoding(encoding), check_errors(errors)
    if offset:  # a later piece: no byte-order mark
        codec = "utf-8" if _is_utf8(encoding) else encoding
        text, bad = _decode_or_explain(raw, codec, name, errors, offset=offset)
    elif _is_utf8(encoding) and raw.startswith(_UTF16_BOMS):
        # Notepad's "Unicode": the BOM is a far stronger signal than the default flag.
        text, bad = _decode_or_explain(raw, "utf-16", name, errors, offset=0)
    elif _is_utf8(encoding):
        bom = len(_UTF8_BOM) if raw.startswith(_UTF8_BOM) else 0
        text, bad = _decode_or_explain(raw[bom:], "utf-8", name, errors, offset=bom, whole=raw)
    else:
        text, bad = _decode_or_explain(raw, encoding, name, errors, offset=0)
    if not offset:
        text = text.removeprefix("\ufeff")  # a BOM some codecs (utf-16-le, gb18030) leave as text
    if "\r" in text:  # CRLF (Windows) and lone CR (classic Mac) line endings
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, nuls = drop_nuls(text, name)
    return Decoded(text, bad, nuls)


def drop_nuls(text: str, name: PathLike = "<text>") -> tuple[str, int]:
    """``text`` without NUL characters (U+0000), and how many there were.

    A NUL is never meant as a character of a text to learn (it would silently become one of the
    vocabulary): a few are junk and are dropped (prepare says how many); many (over
    :data:`NUL_SHARE_LIMIT` of the text) mean UTF-16 read as UTF-8, or not text at all: refused.
    """
    if "\x00" not in text:
        return text, 0
    nuls = text.count("\x00")
    if nuls > NUL_SHARE_LIMIT * len(text):
        raise ZaizaiError(
            f"{name}: {nuls / len(text):.0%} of the characters are NUL bytes (\\x00): it is probably UTF-16 "
            "text (try --encoding utf-16) or not a text file at all"
        )
    return text.replace("\x00", ""), nuls


def _decode_or_explain(
    data: bytes, encoding: str, name: PathLike, errors: str, *, offset: int, whole: bytes | None = None
) -> tuple[str, int]:
    """``data.decode(encoding, errors)`` and the number of characters replaced or dropped; a
    decode error with ``errors="strict"`` becomes a one-line ZaizaiError."""
    try:
        return data.decode(encoding), 0
    except UnicodeDecodeError as err:
        if errors != "strict":
            _undecodable.count = 0
            text = data.decode(encoding, f"zaizai-{errors}")
            return text, _undecodable.count
        raise _explain(err, data, encoding, name, offset, whole) from None


def _explain(
    err: UnicodeDecodeError, data: bytes, encoding: str, name: PathLike, offset: int, whole: bytes | None
) -> ZaizaiError:
    """The one-line error for bytes that do not decode, with what to try."""
    where = offset + err.start
    if _is_utf8(encoding):
        head = (whole if whole is not None else data)[:4096]
        if head.count(0) > len(head) // 8:
            # Many NUL bytes: UTF-16 saved without a byte-order mark.
            return ZaizaiError(f"{name}: not valid UTF-8 at byte {where}; it looks like UTF-16 without a "
                               "byte-order mark: try --encoding utf-16")
    if _ends_mid_character(err, data, encoding):
        return ZaizaiError(
            f"{name}: the file ends in the middle of a character at byte {where} (truncated?); "
            "add --errors replace (keeps a U+FFFD in its place) or --errors ignore (drops it) to go on"
        )
    if _is_utf8(encoding):
        return ZaizaiError(f"{name}: not valid UTF-8 at byte {where}; if it was saved on Chinese Windows "
                           "try --encoding gbk, or add --errors replace to go on (bad bytes -> U+FFFD)")
    return ZaizaiError(
        f"{name}: not valid {encoding} at byte {where}; check --encoding (common ones: {_ENCODING_HINT}), "
        "or add --errors replace to go on (bad bytes -> U+FFFD)"
    )


def _ends_mid_character(err: UnicodeDecodeError, data: bytes, encoding: str) -> bool:
    """Whether the bytes that failed are the start of a character cut off by the end of ``data``."""
    if err.end != len(data):
        return False
    try:
        return codecs.getincrementaldecoder(encoding)().decode(data[err.start :], final=False) == ""
    except UnicodeDecodeError:
        return False


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
    """Read a file as ``(offset, raw bytes, cut_inside)`` pieces of about ``piece_bytes``, so that
    memory stays bounded whatever the file's shape.

    A piece ends at the last empty line of what was read (a document border: ``cut_inside`` is
    False), or at the end of the file. Where a document runs on for more than ``piece_bytes`` with
    no empty line (one long line, say), the piece is cut inside it (``cut_inside`` True, and the next
    piece continues that document): at a character border right after a character that is not
    whitespace, preferably at the end of a line or after punctuation (see :func:`split_segments`,
    which puts such a document back together exactly). Each piece decodes on its own
    (:func:`decode_counting` with the piece's offset), and only the last can end in the middle of a
    character. Files in encodings that cannot be cut safely (UTF-16/32, or a UTF-16 byte-order
    mark) come as one piece.
    """
    try:
        with open(path, "rb") as f:
            first = f.read(piece_bytes)
            cuttable = codecs.lookup(encoding).name in _CUTTABLE_ENCODINGS and not first.startswith(_UTF16_BOMS)
            if not cuttable:
                yield 0, first + f.read(), False
                return
            offset, pending, chunk = 0, b"", first
            while chunk:
                pending += chunk
                chunk = f.read(piece_bytes)
                while len(pending) >= piece_bytes or (pending and not chunk):
                    cut, inside = _last_cut(pending), False
                    if not cut and chunk:
                        cut, inside = _inside_cut(pending, piece_bytes, encoding), True
                    if not cut:
                        break  # the end of the file comes next
                    yield offset, pending[:cut], inside
                    offset, pending = offset + cut, pending[cut:]
            if pending:
                yield offset, pending, False
    except OSError as err:
        raise ZaizaiError(f"{path}: cannot read it ({err.strerror or err})") from None


def _last_cut(data: bytes) -> int:
    """Position just after the last empty line in ``data``, or 0 if there is none."""
    return max((i + len(cut) for cut in _PIECE_CUTS if (i := data.rfind(cut)) >= 0), default=0)


_CUT_WINDOW = 64 << 10  # bytes before the limit where a cut inside a document is looked for
# Cuts inside a document, best first: just before a line break, after punctuation, after any character
# that is not whitespace. (\udc80-\udcff: bytes that did not decode, kept by "surrogateescape".)
_INSIDE_CUTS = (
    re.compile(r"[^\s\udc80-\udcff](?=\n)"),
    re.compile(r"[。！？；，、：.!?;,:)）」』”]"),
    re.compile(r"[^\s\udc80-\udcff]"),
)


def _inside_cut(data: bytes, limit: int, encoding: str) -> int:
    """A position in ``data`` at most ``limit`` (and near it) that is a character border right after a
    character that is not whitespace; 0 if there is none."""
    codec = codecs.lookup(encoding).name
    codec = "utf-8" if _is_utf8(codec) else codec
    start = max(0, limit - _CUT_WINDOW)
    if start:  # move to a character border
        if codec == "utf-8":
            while start < limit and 0x80 <= data[start] < 0xC0:
                start += 1
        else:
            decoder = codecs.getincrementaldecoder(codec)("surrogateescape")
            decoder.decode(data[:start])
            start -= len(decoder.getstate()[0])
    window = data[start:limit]
    text = codecs.getincrementaldecoder(codec)("surrogateescape").decode(window)
    for pattern in _INSIDE_CUTS:
        chars = max((match.end() for match in pattern.finditer(text)), default=0)
        if chars:
            break
    else:  # nothing but whitespace for a long way (a blank line cut in two might go unseen): cut anywhere
        chars = len(text)
    if not chars:
        return 0
    # the byte length of text[:chars]: the shortest prefix of the window that decodes to that many characters
    low, high = chars, len(window)
    while low < high:
        mid = (low + high) // 2
        if len(codecs.getincrementaldecoder(codec)("surrogateescape").decode(window[:mid])) >= chars:
            high = mid
        else:
            low = mid + 1
    return start + low


def read_texts(
    paths: PathLike | Iterable[PathLike], encoding: str = "utf-8", errors: str = "strict"
) -> list[tuple[Path, str]]:
    """Read text files and folders of ``*.txt`` files into ``[(path, text), ...]``.

    Each text has its byte-order mark removed and LF line endings. Raises ZaizaiError for a
    missing path, a folder without ``.txt`` files, an unknown encoding, or bytes that are not
    valid in ``encoding`` (naming the file and byte offset) unless ``errors`` is ``"replace"``
    (they become U+FFFD) or ``"ignore"`` (dropped).
    """
    check_encoding(encoding)  # fail before touching any file
    check_errors(errors)
    return [
        (path, decode_text(read_file_bytes(path), encoding, name=path, errors=errors))
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


_OPEN = "\x00"  # stands for the rest of a document cut off at a piece's end (never in a text: drop_nuls)


def split_segments(text: str, head_open: bool = False, tail_open: bool = False) -> list[str]:
    """:func:`split_documents` of a piece of text whose start (``head_open``) or end
    (``tail_open``) is a cut inside a document (see :func:`iter_file_pieces`).

    The first segment then continues the previous piece's last document and the last one runs on
    into the next piece: they always exist (perhaps empty), and joined end to end the segments of a
    document give exactly its text. A cut is always right after a character that is not whitespace,
    so no empty line runs across it."""
    segments = split_documents(f"{_OPEN if head_open else ''}{text}{_OPEN if tail_open else ''}")
    if head_open:
        segments[0] = segments[0][1:]
    if tail_open:
        segments[-1] = segments[-1][:-1]
    return segments
