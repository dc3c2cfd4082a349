"""The decoders' common part (:class:`Decoder`: rows, their lengths, a window) and the decoders of models that
have no KV cache of the decoder's own: :class:`RNNDecoder` (a hidden state per row), :class:`StatelessDecoder`
(bigram: the last token only) and :class:`CacheDecoder` (any model with a cache: its own forward pass, row by row).
:func:`zaizai.models.decode.decoder_for` picks one; see :mod:`zaizai.models.decode`."""

from __future__ import annotations

import torch

from ..common.errors import ZaizaiError
from .rnn import RNNLM, RNNState


class Decoder:
    """What every decoder has: rows in use, their lengths, and a window (the most tokens a row holds; None: no
    limit)."""

    window: int | None = None
    # after a step of one row, where the step found them (the compiled step): (2,) int64, the greedy token (the
    # logits' argmax) and 1 if the logits are all finite, else 0; None otherwise
    choice: torch.Tensor | None = None

    def __init__(self, model, rows: int, device: torch.device):
        self.model = model
        self.device = device
        self.vocab_size = model.config.vocab_size
        self.capacity = 0
        self.lengths: list[int] = []  # tokens in each row's cache
        self._grow(max(1, rows))

    def _grow(self, rows: int) -> None:
        self.lengths += [0] * (rows - self.capacity)
        self.capacity = rows

    def _room(self, row: int) -> None:
        if row >= self.capacity:
            self._grow(max(row + 1, 2 * self.capacity))

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)

    def full(self, row: int) -> bool:
        """The row has no room for another token: its sequence has to start a new window."""
        return self.window is not None and self.lengths[row] >= self.window

    def prefill_many(self, rows: list[int], prompts: list[list[int]]) -> list[torch.Tensor | None]:
        """:meth:`prefill` of each of ``rows`` from its prompt: the next-token logits (V,) of each (None: no ids).
        Here one at a time; a KV decoder runs all the prompts' tokens through its layers in one pass."""
        return [self.prefill(row, ids) for row, ids in zip(rows, prompts, strict=True)]

    def release(self, row: int) -> None:
        """The row's sequence has left."""
        self.lengths[row] = 0



class RNNDecoder(Decoder):
    """Rows of GRU hidden states, (n_layer, rows, C); no window: a state summarises any length."""

    def __init__(self, model: RNNLM, rows: int, device: torch.device):
        self.hidden = None
        super().__init__(model, rows, device)

    def _grow(self, rows: int) -> None:
        cfg = self.model.config
        hidden = torch.zeros(cfg.n_layer, rows, cfg.n_embd, device=self.device, dtype=self.model.wte.weight.dtype)
        if self.hidden is not None:
            hidden[:, :self.capacity] = self.hidden
        self.hidden = hidden
        super()._grow(rows)

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor | None:
        self._room(row)
        self.hidden[:, row] = 0
        self.lengths[row] = len(ids)
        if not ids:
            return None
        state = RNNState()
        logits, _ = self.model(self._ids(ids), cache=state, last_only=True)  # (1, 1, V)
        self.hidden[:, row] = state.hidden[:, 0]
        return logits[0, -1]

    def move(self, src: int, dst: int) -> None:
        self.hidden[:, dst] = self.hidden[:, src]
        self.lengths[dst] = self.lengths[src]
        self.release(src)

    def step(self, tokens: torch.Tensor | list[int]) -> torch.Tensor:
        n = len(tokens)
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        state = RNNState()
        state.hidden = self.hidden[:, :n].contiguous()  # (n_layer, n, C)
        logits, _ = self.model(tokens.view(n, 1), cache=state, last_only=True)  # (n, 1, V)
        self.hidden[:, :n] = state.hidden
        for i in range(n):
            self.lengths[i] += 1
        return logits[:, 0]


class StatelessDecoder(Decoder):
    """A model that needs no cache (bigram): the next token depends on the last one only."""

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor | None:
        self._room(row)
        self.lengths[row] = len(ids)
        if not ids:
            return None
        logits, _ = self.model(self._ids(ids[-1:]), last_only=True)  # (1, 1, V)
        return logits[0, -1]

    def move(self, src: int, dst: int) -> None:
        self.lengths[dst] = self.lengths[src]
        self.release(src)

    def step(self, tokens: torch.Tensor | list[int]) -> torch.Tensor:
        n = len(tokens)
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        logits, _ = self.model(tokens.view(n, 1), last_only=True)  # (n, 1, V)
        for i in range(n):
            self.lengths[i] += 1
        return logits[:, 0]


class CacheDecoder(Decoder):
    """Any model with a cache (``model.new_cache``): one cache per row, each step the model's own forward pass
    row by row. Correct for every model, batched for none: a model gets its own decoder to share the step."""

    def __init__(self, model, rows: int, device: torch.device):
        self.caches: list = []
        super().__init__(model, rows, device)
        self.window = getattr(self.caches[0], "max_len", None)  # a KV cache's length; None for a recurrent state

    def _grow(self, rows: int) -> None:
        self.caches += [self.model.new_cache(1, self.device) for _ in range(rows - self.capacity)]
        super()._grow(rows)

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor | None:
        if self.window is not None and len(ids) > self.window:
            raise ZaizaiError(f"a row holds {self.window} tokens (block_size), not {len(ids)}; crop the prompt")
        self._room(row)
        self.caches[row].reset()
        self.lengths[row] = len(ids)
        if not ids:
            return None
        logits, _ = self.model(self._ids(ids), cache=self.caches[row], last_only=True)  # (1, 1, V)
        return logits[0, -1]

    def move(self, src: int, dst: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], self.caches[dst]  # no copy: the rows trade caches
        self.lengths[dst] = self.lengths[src]
        self.release(src)

    def step(self, tokens: torch.Tensor | list[int]) -> torch.Tensor:
        n = len(tokens)
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        logits = [self.model(tokens[i].view(1, 1), cache=self.caches[i], last_only=True)[0][0, -1] for i in range(n)]
        for i in range(n):
            self.lengths[i] += 1
        return torch.stack(logits)  # (n, V)
