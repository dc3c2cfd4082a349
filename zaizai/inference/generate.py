"""Generation: a streaming token generator on the model's decoder.

:func:`generate_ids` continues a list of token ids one token at a time and yields each as it is chosen. It is a
batch of one (:class:`zaizai.inference.batch.Batch`): the same code that serves many sequences at once, so a
request gives the same tokens alone or in a batch. Underneath, per model (:mod:`zaizai.models.decode`):

- ``gpt`` and ``modern``: a preallocated KV cache (modern: of its key/value heads only). The prompt goes through
  the model's forward pass in one call (prefill); each new token then costs one position through every layer,
  on a decode step written for it (plain matrix products over the cache). When the cache is full (block_size
  tokens), the window slides: the last 3/4 of block_size tokens are run through again as a fresh prefill, and
  generation goes on from there (modern: its rotary positions count from 0 again).
- ``rnn``: the hidden state is carried from step to step; no context limit.
- ``bigram``: no cache; only the last token matters.

Then the logits of the last position go through the sampling steps of :mod:`zaizai.inference.sampling`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..common.errors import ZaizaiError
from .batch import Batch
from .sampling import SamplingConfig


def generate_ids(model, ids: list[int], cfg: SamplingConfig, stop_ids: set[int] | None = None,
                 device: torch.device | str | None = None, compile: bool = False) -> Iterator[int]:
    """Yield new token ids one by one, continuing ``ids``; stops after ``cfg.max_new_tokens`` or at a stop id
    (which is not yielded).

    With a seed, the same call gives the same tokens. Stop ids are never penalised or banned: ending a turn
    is not a repetition, however many turns the context already holds. ``device``: where the model is
    (by default, where its parameters are). ``compile``: step through a compiled decode step (gpt and modern on
    CPU; :mod:`zaizai.models.compiled`). The model is put in eval mode; torch runs in inference mode
    inside each step only, never while the caller holds control. Raises ZaizaiError for bad options or ids,
    and if the model's scores become nan/inf.
    """
    batch = Batch(model, device, compile=compile)
    seq = batch.add(ids, cfg, stop_ids)
    while batch:
        for _, token in batch.step():
            if token is not None:
                yield token
    if seq.error:
        raise ZaizaiError(seq.error)
