"""Dialogues -> token bins: parse every file, hold out whole dialogues, build the tokenizer, render.

Each split is rendered by :func:`zaizai.data.dialogue.render_dialogues` (the rendering chat uses)
into its bin, the role of every token, the table of dialogues and the start of every turn (the
files are listed in :mod:`zaizai.data.tokendata`); the validation dialogues are also kept as text
(``val.jsonl``), the references evaluation scores against. Dialogues are read into memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ZaizaiError
from .building import Built, TokenizerChoice, validation_mask, where
from .dialogue import ASSISTANT, ASSISTANT_TARGET, PROMPT, USER, Dialogues, Rendered, render_dialogues
from .formats import Problems, parse_dialogues
from .tokendata import bin_file, dialogue_files, dialogue_text_file
from .tokenizer import UNK_ID, Tokenizer

_PREVIEW_TOKENS = 301  # of the first training dialogue, for the printout (300 characters and a " ...")


def build_dialogues(
    texts: Iterable[tuple[Path, str, dict[str, Any]]], files: list[Path], *, format: str, skip_bad: bool,
    val_fraction: float, seed: int, tokenizer: TokenizerChoice,
) -> Built:
    """Dialogues -> split -> tokenizer -> rendered bins and tables. ``texts``: as
    :func:`zaizai.data.building.read_files` yields."""
    sources: list[dict[str, Any]] = []
    notes: list[str] = []
    problems = Problems(skip_bad)
    pool = Dialogues()
    given_val: Dialogues | None = None
    ignored: dict[str, int] = {}
    for path, text, source in texts:
        sources.append(source)
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
        raise ZaizaiError(f"no dialogues found in {where(files)}; check the file and --format {format}")

    if given_val is not None and len(given_val):
        train, val, split_by = pool, given_val, "given"
        notes.append(
            f"验证集用文件自带的 valid 列表 using the files' own \"valid\" list for validation "
            f"({len(val):,} dialogues)"
        )
    elif len(pool) >= 2:
        is_val = validation_mask(len(pool), val_fraction, seed)
        train, val = pool.select(np.flatnonzero(~is_val)), pool.select(np.flatnonzero(is_val))
        split_by = "dialogues"
    else:
        raise ZaizaiError(
            f"only one dialogue in {where(files)}; at least two are needed (one is held out for validation)"
        )
    return _render_splits(tokenizer.build(train.contents), train, val, split_by, sources, notes)


def _render_splits(
    tok: Tokenizer, train: Dialogues, val: Dialogues, split_by: str, sources: list[dict[str, Any]],
    notes: list[str],
) -> Built:
    arrays: dict[str, Any] = {}
    splits: dict[str, dict[str, int]] = {}
    for name, dialogues in (("train", train), ("val", val)):
        rendered = render_dialogues(tok, dialogues)
        roles_bin, dialogues_npy, turns_npy = dialogue_files(name)
        arrays[bin_file(name)] = rendered.ids
        arrays[roles_bin] = rendered.roles
        arrays[dialogues_npy] = np.stack([rendered.starts, rendered.lengths], axis=1)
        arrays[turns_npy] = rendered.turn_starts
        splits[name] = _dialogue_counts(dialogues, rendered)
    arrays[dialogue_text_file("val")] = _jsonl_bytes(val)
    first_length = int(arrays[dialogue_files("train")[1]][0, 1])
    preview = tok.decode(arrays[bin_file("train")][: min(first_length, _PREVIEW_TOKENS)])
    return Built(tok, arrays, split_by, splits, sources, notes=notes, preview=preview)


def _jsonl_bytes(dialogues: Dialogues) -> np.ndarray:
    """One ``{"messages": [...]}`` line per dialogue, UTF-8, as bytes (uint8) written as they are."""
    text = "".join(json.dumps({"messages": messages}, ensure_ascii=False) + "\n" for messages in dialogues)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _dialogue_counts(dialogues: Dialogues, rendered: Rendered) -> dict[str, int]:
    """Sizes of a rendered dialogue split; "chars" and "assistant_chars" feed bits_per_char."""
    roles = np.frombuffer(bytes(dialogues.roles), dtype=np.uint8)
    exchanges = _exchanges_per_dialogue(dialogues, roles)
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
        # how many turns the model learns to follow: chat keeps no more history than this (zaizai.inference.prompt)
        "max_exchanges": int(exchanges.max()) if exchanges.size else 0,
        "median_exchanges": float(np.median(exchanges)) if exchanges.size else 0.0,
    }


def _exchanges_per_dialogue(dialogues: Dialogues, roles: np.ndarray) -> np.ndarray:
    """The user -> assistant exchanges of each dialogue: its assistant messages that answer a user message."""
    sizes = np.asarray(dialogues.sizes, dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    answers = np.zeros(roles.size + 1, dtype=np.int64)  # one spare, so that reduceat may start at the end
    answers[1:-1] = (roles[1:] == ASSISTANT) & (roles[:-1] == USER)
    answers[starts] = 0  # a dialogue's first message answers nothing
    counts = np.add.reduceat(answers, starts) if sizes.size else sizes
    counts[sizes == 0] = 0
    return counts
