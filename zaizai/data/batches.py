"""Batches for training and evaluation, from a prepared data folder (cut by :mod:`zaizai.data.windows`)."""

from __future__ import annotations

import numpy as np

from .tokendata import TokenData


class Batches:
    """Training/evaluation batches for a model: plain token windows, or packed dialogues with loss masks.

    Dialogue data is packed several conversations to a row with ``segments`` telling them apart for models
    that can keep them apart (``packed``: the model's ``supports_segments``); other models get one conversation
    per row.
    """

    def __init__(self, data: TokenData, block_size: int, *, packed: bool, loss_on: str = "assistant"):
        self.data = data
        self.block_size = block_size
        self.loss_on = loss_on
        self.dialogue = data.kind == "dialogue"
        self.packed = self.dialogue and packed

    def get(self, split: str, batch_size: int, rng: np.random.Generator):
        """(x, y, segments or None) for one random batch."""
        if self.dialogue:
            x, y, seg = self.data.get_dialogue_batch(split, batch_size, self.block_size, rng, loss_on=self.loss_on,
                                                     packed=self.packed)
            return x, y, (seg if self.packed else None)
        x, y = self.data.get_batch(split, batch_size, self.block_size, rng)
        return x, y, None

    def whole_split(self, split: str, batch_size: int):
        """Batches covering every target of ``split`` once."""
        if self.dialogue:
            for x, y, seg in self.data.iter_dialogue_eval_batches(split, self.block_size, batch_size,
                                                                  loss_on=self.loss_on, packed=self.packed):
                yield x, y, (seg if self.packed else None)
        else:
            for x, y in self.data.iter_eval_windows(split, self.block_size, batch_size):
                yield x, y, None
