"""Batches cut from token arrays: windows of plain text, and dialogue chunks packed into rows.

Plain text is one long array ``doc EOT doc EOT ...``: training samples random windows
(:func:`random_windows`), evaluation covers it with consecutive ones (:func:`eval_windows`).

Dialogues are cut into chunks of at most ``block_size + 1`` tokens (:func:`cut_dialogues`), and a
row of a batch holds one or several whole chunks side by side (:func:`assemble_rows`), with
``segments`` telling them apart and the targets the loss does not count set to IGNORE_INDEX.
:class:`zaizai.data.tokendata.TokenData` calls these with its memory maps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..common.errors import ZaizaiError
from ..common.ids import IGNORE_INDEX
from .dialogue import loss_mask
from .tokenizer import EOT_ID

if TYPE_CHECKING:  # torch only where tensors are made: `zaizai prepare` imports this module and never needs it
    import torch

NO_SEGMENT = -1  # segments value of padding (the models' convention)


def check_sizes(batch_size: int, block_size: int) -> None:
    if batch_size < 1:
        raise ZaizaiError(f"--batch-size must be at least 1, got {batch_size}")
    if block_size < 1:
        raise ZaizaiError(f"--block-size must be at least 1, got {block_size}")


# -- plain text: windows -----------------------------------------------------------------------


def random_windows(
    data: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator, *, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``data``: inputs x and next-token targets y, int64 (B, T)."""
    import torch

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


def eval_windows(
    data: np.ndarray, block_size: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive, non-overlapping windows covering ``data``, ``batch_size`` at a time.

    Every token but the first is a target exactly once. The final window is padded: x with EOT,
    y with IGNORE_INDEX.
    """
    import torch

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


# -- dialogues: chunks ---------------------------------------------------------------------------


def cut_dialogues(
    dialogues: np.ndarray, turn_starts: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut dialogues into pieces of at most ``block_size + 1`` tokens: (starts, lengths), int64.

    ``dialogues``: (n, 2) start and length of each; ``turn_starts``: every message's role marker.
    A dialogue that fits is one piece. A longer one is cut at turn starts: each piece runs from
    one turn's role marker up to and including the marker of the last turn that still fits, and
    the next piece starts at that marker, so every target of the dialogue is a target of exactly
    one piece and a piece that starts mid-dialogue starts with its role marker. A turn too long
    for a block by itself is cut wherever the block ends (again sharing one token, so no target
    is lost). Pieces come in the order of their starts.
    """
    starts = np.asarray(dialogues[:, 0], dtype=np.int64)
    lengths = np.asarray(dialogues[:, 1], dtype=np.int64)
    fits = lengths <= block_size + 1
    turns = np.asarray(turn_starts, dtype=np.int64)
    cut_starts: list[int] = []
    cut_lengths: list[int] = []
    for start, length in zip(starts[~fits].tolist(), lengths[~fits].tolist()):
        end = start + length  # one past the dialogue's last token
        inner = turns[np.searchsorted(turns, start) : np.searchsorted(turns, end)]
        position = start
        while position < end - 1:
            cut = _next_cut(position, end, inner, block_size)
            cut_starts.append(position)
            cut_lengths.append(cut - position + 1)
            position = cut
    all_starts = np.concatenate([starts[fits], np.asarray(cut_starts, dtype=np.int64)])
    all_lengths = np.concatenate([lengths[fits], np.asarray(cut_lengths, dtype=np.int64)])
    order = np.argsort(all_starts, kind="stable")
    return all_starts[order], all_lengths[order]


def _next_cut(position: int, end: int, inner: np.ndarray, block_size: int) -> int:
    """The last token of the piece starting at ``position`` of a dialogue ending before ``end``."""
    limit = position + block_size  # the furthest token this piece may hold
    if limit >= end - 1:
        return end - 1
    # Cut at the last turn start that still fits, unless the turn starting there is itself too
    # long for a block (it will be cut anyway: fill this piece).
    k = int(np.searchsorted(inner, limit, side="right")) - 1
    if k >= 0 and inner[k] > position:
        after = int(inner[k + 1]) if k + 1 < len(inner) else end - 1
        if after - int(inner[k]) <= block_size:
            return int(inner[k])
    return limit


def chunks_with_targets(roles: np.ndarray, starts: np.ndarray, lengths: np.ndarray, loss_on: str) -> np.ndarray:
    """Indices of the chunks that hold at least one target the loss counts under ``loss_on``."""
    counted = np.append(loss_mask(np.asarray(roles), loss_on), False)
    if not len(starts):
        return np.flatnonzero(np.zeros(0, dtype=bool))
    # A chunk's targets are its tokens after the first: counted[start + 1 : start + length]
    # (the even slices between these bounds; the odd ones are discarded).
    bounds = np.stack([starts + 1, starts + lengths], axis=1).reshape(-1)
    return np.flatnonzero(np.logical_or.reduceat(counted, bounds)[::2])


# -- dialogues: rows -----------------------------------------------------------------------------


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


def random_rows(
    slots: np.ndarray, pool: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator,
    *, packed: bool,
) -> list[list[int]]:
    """``batch_size`` rows of chunks drawn at random from ``pool`` (chunk indices).

    ``slots[c]``: positions chunk c fills (its length - 1). Packed, a row takes drawn chunks one
    after another until the next would not fit (that one starts the next row); else one per row.
    """
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
    return rows


def rows_in_order(
    slots: np.ndarray, chunks: np.ndarray, batch_size: int, block_size: int, *, packed: bool
) -> Iterator[list[list[int]]]:
    """``chunks`` in order, packed into rows (first fit in order) or one per row, ``batch_size``
    rows at a time (the last batch may have fewer)."""
    rows: list[list[int]] = []
    row: list[int] = []
    room = block_size
    for chunk in chunks.tolist():
        need = int(slots[chunk])
        if row and (not packed or need > room):
            rows.append(row)
            row, room = [], block_size
            if len(rows) == batch_size:
                yield rows
                rows = []
        row.append(chunk)
        room -= need
    if row:
        rows.append(row)
    if rows:
        yield rows


def assemble_rows(
    ids: np.ndarray,
    roles: np.ndarray,
    rows: list[list[int]],
    starts: np.ndarray,
    lengths: np.ndarray,
    block_size: int,
    loss_on: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay the chunks of each row side by side into (x, y, segments) int64 tensors of (B, T).

    Padding: x EOT, y IGNORE_INDEX, segments NO_SEGMENT; targets ``loss_on`` does not count are
    IGNORE_INDEX too.
    """
    import torch

    n_rows = len(rows)
    x = np.full((n_rows, block_size), EOT_ID, dtype=np.int64)
    y = np.full((n_rows, block_size), IGNORE_INDEX, dtype=np.int64)
    segments = np.full((n_rows, block_size), NO_SEGMENT, dtype=np.int64)
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
        targets = np.asarray(ids[source + 1], dtype=np.int64)
        counted = loss_mask(np.asarray(roles[source + 1]), loss_on)
        x.reshape(-1)[flat] = ids[source]
        y.reshape(-1)[flat] = np.where(counted, targets, IGNORE_INDEX)
        segments.reshape(-1)[flat] = np.repeat(segment_of, width)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(segments)
