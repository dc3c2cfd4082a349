"""Conversations: what a dialogue is, and the one way it becomes token ids.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.
:func:`render_conversation` turns one into ids and a per-token role class; ``zaizai prepare`` (through
:func:`render_dialogues`, the same code for many conversations at once) and the chat session both use
it, so what a model sees when chatting is exactly what it was trained on. The layout::

    <|endoftext|> <|user|> 你 好 <|end|> <|assistant|> 你 好 ！ <|end|> <|user|> ... <|end|>

one ``<|endoftext|>`` opening the conversation, then per message its role marker, its text's
tokens (one per character with the char tokenizer), and ``<|end|>``. Before the model answers, chat appends ``<|assistant|>`` (the
generation prompt) and stops at the ``<|end|>`` the model writes. Markers are only ever added here:
the text of a message is encoded as text, so a user who types "<|assistant|>" sends those thirteen
characters, never a turn marker.

``roles[i]`` says what the *target* ``ids[i]`` (predicted from ``ids[:i]``) is, which is what the
loss mask needs:

    0  NOT_A_TARGET  the opening <|endoftext|> (nothing precedes it)
    1  PROMPT        a system or user message's text and <|end|>, and every role marker
    2  ASSISTANT     an assistant message's text and its <|end|> (so the model learns to stop)

Training on the replies only ("--loss-on assistant") keeps targets with role 2; "--loss-on all"
keeps every role >= 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.errors import ZaizaiError
from .tokenizer import ASSISTANT_ID, END_ID, EOT_ID, SYSTEM_ID, USER_ID

ROLES: tuple[str, ...] = ("system", "user", "assistant")
SYSTEM, USER, ASSISTANT = range(len(ROLES))  # role codes, as stored in Dialogues.roles
ROLE_MARKER_IDS: tuple[int, ...] = (SYSTEM_ID, USER_ID, ASSISTANT_ID)  # indexed by role code

# Classes of roles[i] (see the module docstring).
NOT_A_TARGET, PROMPT, ASSISTANT_TARGET = 0, 1, 2
LOSS_ON = ("assistant", "all")


def loss_mask(roles: np.ndarray, loss_on: str) -> np.ndarray:
    """Boolean mask of the targets the loss counts: role 2 (``"assistant"``) or role >= 1 (``"all"``)."""
    if loss_on == "assistant":
        return roles == ASSISTANT_TARGET
    if loss_on == "all":
        return roles >= PROMPT
    raise ZaizaiError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")


# ---------------------------------------------------------------------------------------------
# many conversations, stored flat
# ---------------------------------------------------------------------------------------------


@dataclass
class Dialogues:
    """Many conversations in three flat lists (compact enough for millions of dialogues).

    ``contents[j]`` and ``roles[j]`` (a role code: 0 system, 1 user, 2 assistant) describe message
    ``j``; the messages of dialogue ``d`` are the next ``sizes[d]`` after those of dialogues ``< d``.
    """

    contents: list[str] = field(default_factory=list)
    roles: bytearray = field(default_factory=bytearray)
    sizes: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def n_messages(self) -> int:
        return len(self.contents)

    def add(self, messages: Sequence[dict[str, str]]) -> None:
        """Append one conversation given as message dicts (assumed valid, see :func:`check_messages`)."""
        for message in messages:
            self.contents.append(message["content"])
            self.roles.append(ROLES.index(message["role"]))
        self.sizes.append(len(messages))

    def add_codes(self, contents: Sequence[str], roles: Sequence[int]) -> None:
        """Append one conversation given as its messages' texts and role codes."""
        self.contents.extend(contents)
        self.roles.extend(roles)
        self.sizes.append(len(contents))

    def extend(self, other: Dialogues) -> None:
        self.contents.extend(other.contents)
        self.roles.extend(other.roles)
        self.sizes.extend(other.sizes)

    def messages(self, index: int) -> list[dict[str, str]]:
        """Dialogue ``index`` as a list of message dicts."""
        first = int(np.sum(self.sizes[:index], dtype=np.int64))
        return [
            {"role": ROLES[self.roles[j]], "content": self.contents[j]}
            for j in range(first, first + self.sizes[index])
        ]

    def __iter__(self):
        first = 0
        for size in self.sizes:
            yield [
                {"role": ROLES[self.roles[j]], "content": self.contents[j]}
                for j in range(first, first + size)
            ]
            first += size

    def select(self, indices: Iterable[int]) -> Dialogues:
        """A new Dialogues holding the dialogues at ``indices``, in that order."""
        starts = _group_starts(self.sizes)
        out = Dialogues()
        for d in indices:
            lo, hi = int(starts[d]), int(starts[d + 1])
            out.contents.extend(self.contents[lo:hi])
            out.roles.extend(self.roles[lo:hi])
            out.sizes.append(hi - lo)
        return out

    @classmethod
    def from_conversations(cls, conversations: Iterable[Sequence[dict[str, str]]]) -> Dialogues:
        out = cls()
        for messages in conversations:
            check_messages(messages)
            out.add(messages)
        return out


def check_messages(messages: Any) -> None:
    """Check the shape of a conversation: a list of dicts with a known role and string content.

    Only what rendering needs; the order rules for training data are checked by the readers in
    :mod:`zaizai.data.formats`. Raises ZaizaiError.
    """
    if not isinstance(messages, (list, tuple)):
        raise ZaizaiError(f"a conversation is a list of messages, got {type(messages).__name__}")
    for k, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ZaizaiError(f"message {k} is not an object with \"role\" and \"content\"")
        if message.get("role") not in ROLES:
            raise ZaizaiError(f"message {k} has role {message.get('role')!r}; use {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            kind = type(message.get("content")).__name__
            raise ZaizaiError(f"message {k}: content must be a string, got {kind}")


def render_text_layout_turns(lines: Sequence[str]) -> list[dict[str, str]]:
    """One dialogue in the articles' text layout -> messages.

    Each line is one turn (surrounding whitespace removed); the first line is the user's, and
    speakers alternate: user, assistant, user, ...
    """
    return [
        {"role": "user" if k % 2 == 0 else "assistant", "content": line.strip()}
        for k, line in enumerate(lines)
    ]


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """Many rendered conversations laid end to end.

    ``ids`` and ``roles`` (uint8, see the module docstring) have one entry per token;
    dialogue ``d`` is ``ids[starts[d] : starts[d] + lengths[d]]``; ``turn_starts`` holds the position
    of every message's role marker, in order.
    """

    ids: np.ndarray
    roles: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    turn_starts: np.ndarray


def render_dialogues(tokenizer, dialogues: Dialogues, *, add_generation_prompt: bool = False) -> Rendered:
    """Render every conversation of ``dialogues`` (the layout of :func:`render_conversation`).

    Vectorised for a whole corpus: the messages' texts are encoded (the char tokenizer in one pass
    over all of them, a subword tokenizer message by message, so no token spans two messages), then
    each token is put in place by position arithmetic.
    """
    n_dialogues = len(dialogues)
    sizes = np.asarray(dialogues.sizes, dtype=np.int64)
    codes = np.frombuffer(bytes(dialogues.roles), dtype=np.uint8).astype(np.int64)
    content_ids, text_lengths = _encode_messages(tokenizer, dialogues.contents)

    extra = 2 if add_generation_prompt else 1  # opening EOT (+ the generation prompt) per dialogue
    message_tokens = text_lengths + 2  # marker, text, END
    tokens_before = np.concatenate([[0], np.cumsum(message_tokens)])  # before message j, j = 0..n
    first_message = _group_starts(sizes)
    per_dialogue = tokens_before[first_message[1:]] - tokens_before[first_message[:-1]] + extra
    starts = _exclusive_cumsum(per_dialogue)
    total = int(per_dialogue.sum())

    dialogue_of_message = np.repeat(np.arange(n_dialogues, dtype=np.int64), sizes)
    # Tokens before message j: those of earlier messages, plus one EOT for each dialogue up to and
    # including its own, plus the generation prompts of earlier dialogues.
    markers = (
        tokens_before[:-1]
        + (dialogue_of_message + 1)
        + (dialogue_of_message if add_generation_prompt else 0)
    )
    ends = markers + 1 + text_lengths
    is_assistant = codes == ASSISTANT

    ids = np.empty(total, dtype=tokenizer.dtype)
    roles = np.empty(total, dtype=np.uint8)
    is_text = np.ones(total, dtype=bool)
    ids[starts] = EOT_ID
    roles[starts] = NOT_A_TARGET
    ids[markers] = np.asarray(ROLE_MARKER_IDS, dtype=np.int64)[codes]
    roles[markers] = PROMPT
    message_class = np.where(is_assistant, ASSISTANT_TARGET, PROMPT).astype(np.uint8)
    ids[ends] = END_ID
    roles[ends] = message_class
    is_text[starts] = is_text[markers] = is_text[ends] = False
    if add_generation_prompt:
        prompts = starts + per_dialogue - 1
        ids[prompts] = ASSISTANT_ID
        roles[prompts] = PROMPT
        is_text[prompts] = False
    ids[is_text] = content_ids  # texts are in message order, as are the text positions
    roles[is_text] = np.repeat(message_class, text_lengths)
    return Rendered(ids=ids, roles=roles, starts=starts, lengths=per_dialogue, turn_starts=markers)


def render_conversation(
    tokenizer, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Render one conversation to ``(ids, roles)``, two lists of the same length.

    ``ids``: ``<|endoftext|>``, then for each message its role marker, its text and ``<|end|>``;
    with ``add_generation_prompt`` a final ``<|assistant|>`` (what chat feeds the model before it
    answers). ``roles[i]`` classifies target ``ids[i]``: 0 the opening EOT, 1 system/user text and
    every role marker, 2 an assistant message's text and its ``<|end|>``.

    The messages need a known role and string content (ZaizaiError otherwise); their order is
    not checked here. Text that looks like a marker stays text.
    """
    check_messages(messages)
    dialogues = Dialogues()
    dialogues.add(messages)
    rendered = render_dialogues(tokenizer, dialogues, add_generation_prompt=add_generation_prompt)
    return rendered.ids.tolist(), rendered.roles.tolist()


def _encode_messages(tokenizer, contents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All messages' token ids laid end to end, and each message's token count (int64)."""
    if tokenizer.type == "char":  # one token per character
        lengths = np.fromiter(map(len, contents), dtype=np.int64, count=len(contents))
        return tokenizer.encode_array("".join(contents)), lengths
    pieces = [ids for start in range(0, len(contents), 4096)
              for ids in tokenizer.encode_batch(contents[start:start + 4096])]
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=tokenizer.dtype)), lengths


def _exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(values), dtype=np.int64)
    np.cumsum(values[:-1], out=out[1:])
    return out


def _group_starts(sizes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Index of each group's first element, then the total (``len(sizes) + 1`` int64 values)."""
    return np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))]).astype(np.int64)
