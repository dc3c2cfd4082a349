"""The input formats of ``zaizai prepare``, and the parsers of the three dialogue layouts.

``plain`` is pretraining text (documents, see :mod:`zaizai.data.corpus`). Dialogues come in the
articles' ``text`` layout (one turn per line, a blank line between dialogues), as ``jsonl``
(``{"messages": [...]}`` per line) or as ``lccc`` (JSON lists of utterances). Each parser takes the
decoded text of one file and returns :class:`Dialogues`; a malformed dialogue is reported as
``file:line: what is wrong`` (or counted and skipped, with ``--skip-bad``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import ZaizaiError
from .corpus import PathLike
from .dialogue import ASSISTANT, ROLES, USER, Dialogues, render_text_layout_turns

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
        except RecursionError:  # [[[[...]]]] thousands deep: valid JSON no dialogue needs
            problems.report(where, _TOO_DEEP)
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


_TOO_DEEP = "JSON nested too deeply (lists or objects inside each other thousands of times)"
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_LCCC_IGNORED_KEYS = ("test",)


def parse_lccc(text: str, name: PathLike, problems: Problems) -> ParsedDialogues:
    """LCCC-style JSON: a list of dialogues, each a list of utterances (user first, then taking turns).

    Or an object ``{"train": [...], "valid": [...]}``, whose "valid" list becomes the validation
    split; a "test" list is left out. The top level is scanned one dialogue at a time, so a
    malformed dialogue is reported with the line it starts on. Broken JSON syntax cannot be
    skipped (nothing after it can be trusted): it always stops with its line and column.
    """
    scan = _LcccScanner(text, name, problems)
    parsed = ParsedDialogues(Dialogues())
    pos = scan.skip_space(0)
    top = text[pos : pos + 1]
    if top == "[":
        pos = scan.dialogue_list(pos, parsed.dialogues)
    elif top == "{":
        pos = scan.split_object(pos, parsed)
    else:
        raise scan.fail(pos, 'expected a JSON list of dialogues, or {"train": [...], "valid": [...]}')
    if scan.skip_space(pos) != len(text):
        raise scan.fail(scan.skip_space(pos), "not valid JSON (extra data after the end)")
    return parsed


class _LcccScanner:
    """Walks the top levels of an LCCC file by hand, decoding one dialogue (or key) at a time."""

    def __init__(self, text: str, name: PathLike, problems: Problems):
        self.text, self.name, self.problems = text, name, problems
        self.decoder = json.JSONDecoder()
        self.lines = _LineCounter(text)

    def fail(self, pos: int, what: str) -> ZaizaiError:
        return ZaizaiError(f"{self.name}:{self.lines.line_of(pos)}: {what}; fix the file")

    def skip_space(self, pos: int) -> int:
        return _WHITESPACE.match(self.text, pos).end()

    def decode(self, pos: int) -> tuple[Any, int]:
        try:
            return self.decoder.raw_decode(self.text, pos)
        except json.JSONDecodeError as err:
            raise ZaizaiError(
                f"{self.name}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); fix the file"
            ) from None
        except RecursionError:  # where the value ends is unknown, so it cannot be skipped
            raise ZaizaiError(f"{self.name}:{self.lines.line_of(pos)}: {_TOO_DEEP}; fix the file") from None

    def dialogue_list(self, pos: int, into: Dialogues) -> int:
        """Read the list of dialogues that starts at text[pos]; return the position after it."""
        text = self.text
        if text[pos : pos + 1] != "[":
            raise self.fail(pos, "expected a list of dialogues")
        pos = self.skip_space(pos + 1)
        if text[pos : pos + 1] == "]":
            return pos + 1
        while True:
            item, end = self.decode(pos)
            problem = _lccc_dialogue_problem(item)
            if problem:
                self.problems.report(f"{self.name}:{self.lines.line_of(pos)}", problem)
            else:
                into.add_codes(item, _alternating_roles(len(item)))
            pos = self.skip_space(end)
            if text[pos : pos + 1] == ",":
                pos = self.skip_space(pos + 1)
            elif text[pos : pos + 1] == "]":
                return pos + 1
            else:
                raise self.fail(pos, "not valid JSON (expected ',' or ']' after a dialogue)")

    def split_object(self, pos: int, parsed: ParsedDialogues) -> int:
        """Read ``{"train": [...], "valid": [...]}`` at text[pos] into ``parsed``; return the position after it."""
        text = self.text
        pos = self.skip_space(pos + 1)
        while text[pos : pos + 1] != "}":
            key, end = self.decode(pos)
            pos = self.skip_space(end)
            if not isinstance(key, str) or text[pos : pos + 1] != ":":
                raise self.fail(pos, "not valid JSON (expected a key and ':')")
            pos = self.skip_space(pos + 1)
            if key == "train":
                pos = self.dialogue_list(pos, parsed.dialogues)
            elif key == "valid":
                parsed.valid = parsed.valid if parsed.valid is not None else Dialogues()
                pos = self.dialogue_list(pos, parsed.valid)
            elif key in _LCCC_IGNORED_KEYS:
                value, pos = self.decode(pos)
                parsed.ignored[key] = parsed.ignored.get(key, 0) + (len(value) if isinstance(value, list) else 1)
            else:
                raise self.fail(pos, f'unexpected key {key!r}; an LCCC object holds "train" and "valid" lists')
            pos = self.skip_space(pos)
            if text[pos : pos + 1] == ",":
                pos = self.skip_space(pos + 1)
            elif text[pos : pos + 1] != "}":
                raise self.fail(pos, "not valid JSON (expected ',' or '}')")
        return pos + 1


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
