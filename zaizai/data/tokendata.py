"""A prepared data folder: its files, its ``meta.json`` and :class:`TokenData`, which reads it.

``zaizai prepare`` (:mod:`zaizai.data.preparation`) writes one of two kinds of folder. Plain text
(``"kind": "plain"``, pretraining)::

    out_dir/
      train.bin       doc EOT doc EOT ...  raw little-endian uint16 (uint32 for > 65,535 tokens)
      val.bin         the same for the validation documents
      tokenizer.json  the tokenizer (char or bpe), a Hugging Face tokenizer.json
      tokenizer_config.json  settings for transformers' AutoTokenizer
      meta.json       sizes, dtype, split settings and sources (written last: its presence
                      means the folder is complete)

Dialogues (``"kind": "dialogue"``): besides ``tokenizer.json`` and ``meta.json``::

      train.bin             the rendered dialogues end to end: EOT <|user|> ... <|end|> EOT ...
      train_roles.bin       uint8, one per token: what that token is as a target (0 the opening
                            EOT, 1 prompt text or a role marker, 2 an assistant reply or its END)
      train_dialogues.npy   int64 (n_dialogues, 2): start and length of each dialogue in train.bin
      train_turns.npy       int64 (n_messages,): position of every message's role marker
      val.bin, val_roles.bin, val_dialogues.npy, val_turns.npy   the same for validation
      val.jsonl             the validation dialogues' original text, one ``{"messages": [...]}`` a
                            line, in the order of val_dialogues.npy (the bins lose characters the
                            tokenizer never saw; evaluation scores replies against this text)

``TokenData`` opens such a folder with read-only memory maps, so training touches only the
pages it samples, and several processes (data-parallel ranks, loader workers) can share it.
Plain data is sampled as random windows (:meth:`TokenData.get_batch`); dialogue data as rows of
whole dialogues packed together with loss masks (:meth:`TokenData.get_dialogue_batch`); the
batches themselves are cut by :mod:`zaizai.data.windows`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common.errors import ZaizaiError
from .corpus import PathLike
from .dialogue import loss_mask
from .windows import (
    assemble_rows,
    check_sizes,
    chunks_with_targets,
    cut_dialogues,
    eval_windows,
    random_rows,
    random_windows,
    rows_in_order,
)
from .tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:  # only in annotations: `zaizai prepare` imports this module and must not load torch
    import torch

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPLITS = ("train", "val")
KINDS = ("plain", "dialogue")
META_VERSION = 1


def bin_file(split: str) -> str:
    return f"{split}.bin"


def dialogue_files(split: str) -> tuple[str, str, str]:
    """Roles, dialogue table and turn starts of a dialogue split."""
    return f"{split}_roles.bin", f"{split}_dialogues.npy", f"{split}_turns.npy"


def dialogue_text_file(split: str) -> str:
    """The original text of a dialogue split's conversations (written for ``val`` only)."""
    return f"{split}.jsonl"


def output_names(kind: str) -> list[str]:
    """Every file of a folder of ``kind``, in the order they are written (meta.json last)."""
    names = [bin_file(split) for split in SPLITS]
    if kind == "dialogue":
        names += [name for split in SPLITS for name in dialogue_files(split)]
        names.append(dialogue_text_file("val"))
    return [*names, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, META_FILE]


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
    except (OSError, UnicodeDecodeError, ValueError) as err:  # ValueError: JSONDecodeError, a 5000-digit number
        raise ZaizaiError(f"{path} is damaged ({err}); run `zaizai prepare` again") from None
    except RecursionError:
        raise ZaizaiError(f"{path} is damaged (nested too deeply); run `zaizai prepare` again") from None

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
            and _count(meta["vocab_size"]) and meta["vocab_size"] >= 1
            and meta["vocab_size"] <= np.iinfo(meta["dtype"]).max + 1
            and isinstance(meta["tokenizer_file"], str)
            and all(_count(meta["splits"][s][k]) for s in SPLITS for k in counts)
        )
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise damaged
    return meta


def _count(value: Any) -> bool:
    """Whether a meta.json value is a whole number >= 0 (true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_val_split(data_dir: PathLike, meta: dict[str, Any]) -> None:
    """Refuse a folder whose validation split has nothing to evaluate (found before training, not at its
    first evaluation)."""
    val = meta["splits"]["val"]
    empty = val["dialogues"] == 0 if meta["kind"] == "dialogue" else val["tokens"] < 2
    if empty:
        raise ZaizaiError(f"{data_dir}: the validation split is empty ({val['tokens']} tokens), so training "
                          "could not be evaluated; run `zaizai prepare` again with more text or a larger "
                          "--val-fraction")


def trained_exchanges(data_dir: PathLike, vocab_size: int | None = None) -> int | None:
    """The most user -> assistant exchanges in one training dialogue of ``data_dir`` (meta.json's
    ``splits.train.max_exchanges``), or None when that is unknown: not a dialogue folder, prepared before
    zaizai counted them, gone or unreadable, or (``vocab_size`` given) prepared with another tokenizer."""
    try:
        meta = load_meta(data_dir)
    except ZaizaiError:
        return None
    count = meta["splits"]["train"].get("max_exchanges")
    if meta["kind"] != "dialogue" or not isinstance(count, int) or (vocab_size not in (None, meta["vocab_size"])):
        return None
    return count


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
        check_val_split(self.data_dir, self.meta)
        self._checked: set[str] = set()  # files whose values were checked (kept when pickled: checked once)
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
            self._arrays[name] = self._open_bin(bin_file(name), dtype, self.meta["splits"][name]["tokens"])
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
        array = np.memmap(path, dtype=dtype, mode="r")
        if file not in self._checked:  # every id a token of the vocabulary (every role a role): one pass
            limit = 3 if file.endswith("_roles.bin") else self.meta["vocab_size"]
            if any(int(array[i : i + _SCAN].max()) >= limit for i in range(0, count, _SCAN)):
                raise ZaizaiError(f"{path} holds values out of range (>= {limit}): the data folder is damaged; "
                                  "run `zaizai prepare` again")
            self._checked.add(file)
        return array

    @property
    def val_tokens(self) -> int:
        """Tokens in the validation split (at least 2: :func:`check_val_split` refused the folder otherwise)."""
        return self.meta["splits"]["val"]["tokens"]

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
        check_sizes(batch_size, block_size)
        return random_windows(data, batch_size, block_size, rng, split=split)

    def iter_eval_windows(
        self, split: str, block_size: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Cover a whole split with consecutive, non-overlapping windows, ``batch_size`` at a time.

        Every token but the first is a target exactly once, so the mean loss over all targets
        is the loss on the whole split. Yields int64 (B', T) pairs with B' <= batch_size; the
        final window is padded (x with EOT, y with IGNORE_INDEX, which the loss skips).
        Plain data only (dialogue data: :meth:`iter_dialogue_eval_batches`).
        """
        self._require_plain("iter_eval_windows", "iter_dialogue_eval_batches")
        data = self.split(split)
        check_sizes(batch_size, block_size)
        yield from eval_windows(data, block_size, batch_size)

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
                dialogue_files(split)[0], np.dtype(np.uint8), self.meta["splits"][split]["tokens"]
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
        path = self.data_dir / dialogue_files(split)[which]
        if path.name not in self._arrays:
            try:
                table = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise ZaizaiError(f"{path} is missing; run `zaizai prepare` again") from None
            except (OSError, ValueError) as err:
                raise ZaizaiError(f"{path} is damaged ({err}); run `zaizai prepare` again") from None
            n_tokens = self.num_tokens(split)
            if table.shape != shape or table.dtype != np.int64 or not _table_in_range(table, which, n_tokens):
                raise ZaizaiError(f"{path} does not match {META_FILE}: the data folder is damaged; "
                                  "run `zaizai prepare` again")
            self._arrays[path.name] = table
        return self._arrays[path.name]

    def dialogue_chunks(self, split: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The pieces a split's dialogues are cut into for ``block_size``: (starts, lengths), int64.

        A piece is at most ``block_size + 1`` tokens (``block_size`` inputs and their targets);
        see :func:`zaizai.data.windows.cut_dialogues` for where a longer dialogue is cut.
        Computed once per split and block size.
        """
        self._require_dialogue("dialogue_chunks")
        check_sizes(1, block_size)
        key = (split, block_size)
        if key not in self._chunks:
            self._chunks[key] = cut_dialogues(self.dialogues(split), self.turn_starts(split), block_size)
        return self._chunks[key]

    def _chunks_with_targets(self, split: str, block_size: int, loss_on: str) -> np.ndarray:
        """Indices of the chunks that hold at least one target the loss counts under ``loss_on``."""
        key = (split, block_size, loss_on)
        if key not in self._with_targets:
            starts, lengths = self.dialogue_chunks(split, block_size)
            self._with_targets[key] = chunks_with_targets(self.roles(split), starts, lengths, loss_on)
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
        or IGNORE_INDEX where that target is padding, not counted by ``loss_on``
        (``"assistant"``: replies and their ``<|end|>`` only; ``"all"``: every token after the
        opening EOT), or would be the first token of another chunk (never predicted).
        """
        self._require_dialogue("get_dialogue_batch")
        check_sizes(batch_size, block_size)
        loss_mask(np.zeros(0, dtype=np.uint8), loss_on)  # check loss_on early
        starts, lengths = self.dialogue_chunks(split, block_size)
        pool = self._chunks_with_targets(split, block_size, loss_on)
        if pool.size == 0:
            what = "assistant replies" if loss_on == "assistant" else "tokens"
            raise ZaizaiError(f"the {split} split has no {what} to learn from; check the data or --loss-on")
        rows = random_rows(lengths - 1, pool, batch_size, block_size, rng, packed=packed)
        return assemble_rows(self.split(split), self.roles(split), rows, starts, lengths, block_size, loss_on)

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
        check_sizes(batch_size, block_size)
        loss_mask(np.zeros(0, dtype=np.uint8), loss_on)
        starts, lengths = self.dialogue_chunks(split, block_size)
        chunks = self._chunks_with_targets(split, block_size, loss_on)
        for rows in rows_in_order(lengths - 1, chunks, batch_size, block_size, packed=packed):
            yield assemble_rows(self.split(split), self.roles(split), rows, starts, lengths, block_size, loss_on)

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


_SCAN = 1 << 24  # ids checked at a time


def _table_in_range(table: np.ndarray, which: int, n_tokens: int) -> bool:
    """Whether a dialogue table fits its bin: dialogues (which 1) in order, each of at least one token and
    inside the bin; turn starts (which 2) in order and inside the bin."""
    if which == 1:
        starts, lengths = table[:, 0], table[:, 1]
        return bool(np.all(starts >= 0) and np.all(lengths >= 1) and np.all(starts <= n_tokens - lengths)
                    and np.all(starts[1:] >= starts[:-1] + lengths[:-1]))
    return bool(np.all(table >= 0) and np.all(table < n_tokens) and np.all(table[1:] > table[:-1]))


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise ZaizaiError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
