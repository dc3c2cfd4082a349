"""Continuous batching: many generations, each with its own sampling options and seed, one decode step for all.

    batch = Batch(model)
    a = batch.add(ids, SamplingConfig(temperature=0))             # joins now: its prompt is prefilled
    b = batch.add(other_ids, SamplingConfig(temperature=0.8, seed=1), stop_ids={END_ID})
    c, d = batch.add_many([(ids_c, cfg_c, None), (ids_d, cfg_d, {END_ID})])  # prompts prefilled together
    while batch:
        for seq, token in batch.step():   # one token for every sequence in the batch; None: it has ended
            ...                           # seq.finish_reason: "stop", "length" or "error" (seq.error says why)
    batch.cancel(a)                       # leaves at once (a client that went away)

Sequences join (:meth:`Batch.add`, or several at once with :meth:`Batch.add_many`: all their prompts' tokens
through the model's layers in one pass, ~3x faster for 32 short chat prompts than one by one) and leave (they
finish, or :meth:`Batch.cancel`) between steps; each :meth:`Batch.step` samples one token for every sequence,
each from its own logits with its own :class:`SamplingConfig` and seeded generator, and hands them back at once;
the new tokens go through one forward step of the model's decoder (:mod:`zaizai.models.decode`), rows of
different lengths side by side, when the batch next needs logits (the next step, or a join): a token reaches the
caller a decode step sooner (the first one too), and the work done is the same. If that decode step fails, the
batch fails from then on (every later step and join raises): its sequences have no logits to go on from. A
sequence's tokens are the same alone or in a batch: its sampling state is its own, and its logits differ from the
alone ones by float rounding only (greedy decoding gives the same text unless two tokens tie to ~1e-6). Where the
decoder's step finds the logits' argmax and finiteness itself (the compiled step of a lone sequence), a greedy
sequence without penalties takes them from it instead of computing them again.

A sequence whose logits stop being finite (nan/inf: broken weights, an overflow), or whose draw cannot be made
(finite scores so large that its temperature takes them to inf), ends with ``finish_reason == "error"`` and
``seq.error`` saying why; the others go on. The batch is not thread-safe: one thread adds, steps and cancels.

Windows: a KV cache holds block_size tokens. When a sequence's row is full, the row starts over from the last
3/4 of block_size tokens (run through again as a prefill) and generation goes on from there. Keeping 3/4 (rather
than 1/2) keeps most of the context after a slide, at the cost of a re-prefill every block_size/4 tokens; a
prefill runs many positions in one matrix multiply, so it costs a few decode steps, not hundreds.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..common.errors import ZaizaiError
from ..models.decode import decoder_for
from .sampling import NGramBlocker, SamplingConfig, apply_repetition_penalty, draw_cumulative, next_token_probs

STOP, LENGTH, ERROR, CANCELLED = "stop", "length", "error", "cancelled"  # why a sequence ended


class Checked(NamedTuple):
    """A request :meth:`Batch.check` has taken: its ids as ints, options and stop ids. :meth:`Batch.add_many`
    takes it as it is, without checking it again (a caller that checks each request first, so that a bad one
    fails alone, checks it once)."""

    ids: list[int]
    cfg: SamplingConfig
    stop_ids: set[int]


class Sequence:
    """One generation in a batch: its options and sampling state, the tokens so far, and why it ended."""

    def __init__(self, ids: list[int], cfg: SamplingConfig, stop_ids: set[int], vocab_size: int,
                 device: torch.device):
        self.prompt = ids
        self.cfg = cfg
        self.stop_ids = stop_ids
        self.tokens: list[int] = []  # generated so far (stop ids are not included)
        self.finish_reason: str | None = None  # STOP, LENGTH, ERROR or CANCELLED once it has ended
        self.error: str | None = None  # what went wrong, with ERROR
        self.generator = None
        if cfg.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(cfg.seed)
        self.blocker = NGramBlocker(cfg.no_repeat_ngram_size, ids) if cfg.no_repeat_ngram_size > 0 else None
        self.seen = None  # (V,) bool: tokens in the context, for the repetition penalty
        if cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(ids, device=device)] = True
            # stop ids are never penalised: ending a turn is not a repetition, however many turns came before
            self.seen[torch.tensor([i for i in stop_ids if 0 <= i < vocab_size], dtype=torch.long, device=device)] = False
        self.window: list[int] | None = None  # the tokens in its row of a bounded (KV) cache, to slide it
        self.logits: torch.Tensor | None = None  # (V,) the next token's logits
        self.finite = True  # whether those logits are all finite
        self.best: int | None = None  # their argmax, where the decoder found it (None: not known)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error, self.logits = reason, error, None

    def choose(self) -> int | None:
        """The next token, after the penalties and the sampling options; None (and ERROR) for logits that are
        not finite, or finite ones the draw cannot use (so large that the temperature takes them to inf)."""
        if not self.finite:
            self._finish(ERROR, f"the model's next-token scores became nan/inf after {len(self.tokens)} tokens; "
                                "the weights may be broken (try another checkpoint)")
            return None
        cfg = self.cfg
        if cfg.temperature == 0 and self.best is not None and self.seen is None and self.blocker is None:
            return self.best  # the decoder's own argmax of these logits
        logits = self.logits.unsqueeze(0)  # (1, V)
        if self.seen is not None:
            logits = apply_repetition_penalty(logits.float(), self.seen, cfg.repetition_penalty)
        if self.blocker is not None:
            banned = self.blocker.banned() - self.stop_ids
            if banned:
                index = torch.tensor(sorted(banned), device=logits.device)
                logits = logits.float().index_fill(1, index, float("-inf"))
        if cfg.temperature == 0:
            return int(logits.argmax())
        # sample_next's draw, with the probabilities checked first: finite scores so large that the temperature
        # takes them to inf give nan probabilities, which no draw can take from
        cdf = next_token_probs(logits, cfg).cumsum(-1)  # (1, V): the draw's running sums, made once
        total = float(cdf[0, -1])  # nan/inf if any probability is, 0 if none is left
        if not 0 < total < math.inf:
            self._finish(ERROR, f"the next-token probabilities became nan/inf after {len(self.tokens)} tokens (scores "
                                f"too large for temperature {cfg.temperature}); try a higher temperature or another "
                                "checkpoint")
            return None
        return int(draw_cumulative(cdf, self.generator))

    def accept(self, token: int) -> None:
        """``token`` is part of the text now: remember it for the penalties."""
        self.tokens.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.blocker is not None:
            self.blocker.extend((token,))


class Batch:
    """The sequences being generated, one row each in the model's decoder; see the module docstring."""

    def __init__(self, model, device: torch.device | str | None = None, rows: int = 1, compile: bool = False):
        """``rows``: sequences it has room for at first (it grows); ``compile``: a lone sequence steps through a
        compiled step (gpt and modern on CPU; :mod:`zaizai.models.compiled`)."""
        model.eval()
        self.model = model
        self.device = next(model.parameters()).device if device is None else torch.device(device)
        self.vocab_size = model.config.vocab_size
        with torch.inference_mode():
            self.decoder = decoder_for(model, rows, self.device, compile)
        self.window = self.decoder.window  # tokens a row holds; None: no limit (a recurrent state)
        self.keep = None if self.window is None else max(1, self.window * 3 // 4)  # kept when a window slides
        self.sequences: list[Sequence] = []  # sequences[i] is in the decoder's row i
        self.pending = False  # whether every sequence's last token is still to go through the decoder
        self.failed: str | None = None  # why a decode step failed (the batch cannot go on)

    def __len__(self) -> int:
        return len(self.sequences)

    def add(self, ids: list[int], cfg: SamplingConfig, stop_ids: set[int] | None = None) -> Sequence:
        """Start generating after ``ids`` with ``cfg``: the prompt runs through the model now (its last
        block_size tokens for a GPT), and the next :meth:`step` gives its first token. ``stop_ids``: tokens
        that end it (not yielded, never penalised). Raises ZaizaiError for options or ids the model cannot take."""
        return self.add_many([(ids, cfg, stop_ids)])[0]

    def add_many(self, requests: list[tuple[list[int], SamplingConfig, set[int] | None] | Checked]) -> list[Sequence]:
        """:meth:`add` of each ``(ids, cfg, stop_ids)``, their prompts prefilled together (one pass through the
        model's layers for all of them: many short prompts join several times faster than one by one); the
        same sequences, in order. Raises ZaizaiError, and none joins, if one of them cannot be taken. A
        :class:`Checked` request (what :meth:`check` returned) is taken as it is, not checked again."""
        checked = [r if isinstance(r, Checked) else self.check(*r) for r in requests]
        prompts = [r.ids for r in checked]
        with torch.inference_mode():
            self._catch_up()  # the rows in use take their last tokens before new rows join
            seqs = [Sequence(r.ids, r.cfg, r.stop_ids, self.vocab_size, self.device) for r in checked]
            if self.window is not None:
                prompts = [ids[-self.window:] for ids in prompts]
                for seq, ids in zip(seqs, prompts):
                    seq.window = list(ids)
            first = len(self.sequences)
            logits = self.decoder.prefill_many(list(range(first, first + len(seqs))), prompts)
            finite = torch.isfinite(torch.stack(logits)).all(dim=1).tolist() if seqs else []
            for seq, row_logits, ok in zip(seqs, logits, finite):
                seq.logits, seq.finite = row_logits, ok
        self.sequences += seqs
        return seqs

    def check(self, ids: list[int], cfg: SamplingConfig, stop_ids: set[int] | None = None) -> Checked:
        """The request as :meth:`add_many` takes it without checking it again (ids as ints), once this batch can
        take ``ids`` with ``cfg`` (what :meth:`add` checks first): raises ZaizaiError for options or ids the model
        cannot take."""
        cfg.validate()
        ids = [int(i) for i in ids]
        if not ids:
            raise ZaizaiError("generation needs at least one token to start from (e.g. the end-of-text token 0)")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ZaizaiError(f"token ids must be in [0, {self.vocab_size}); the prompt does not fit this model")
        return Checked(ids, cfg, set(stop_ids or ()))

    def cancel(self, seq: Sequence) -> None:
        """Take ``seq`` out of the batch now (its row is free for the next one); no-op if it has ended."""
        if seq in self.sequences:
            seq._finish(CANCELLED)
            with torch.inference_mode():
                self._remove(self.sequences.index(seq))

    def _remove(self, row: int) -> None:
        last = len(self.sequences) - 1
        if row != last:  # the last row's sequence fills the gap: rows in use stay 0 .. n-1
            self.decoder.move(last, row)
            self.sequences[row] = self.sequences[last]
        else:
            self.decoder.release(row)
        self.sequences.pop()

    def step(self) -> list[tuple[Sequence, int | None]]:
        """One token for every sequence: ``(seq, token)``, or ``(seq, None)`` when it ended without one (a stop
        id, or an error). A sequence whose token was its last (max_new_tokens) has ``seq.done`` set."""
        events = []
        with torch.inference_mode():
            self._catch_up()
            for seq in self.sequences:
                token = seq.choose()
                if token is None or token in seq.stop_ids:
                    if token is not None:
                        seq._finish(STOP)
                    events.append((seq, None))
                    continue
                seq.accept(token)
                events.append((seq, token))
                if len(seq.tokens) == seq.cfg.max_new_tokens:
                    seq._finish(LENGTH)
            for row in reversed(range(len(self.sequences))):
                if self.sequences[row].done:
                    self._remove(row)
        self.pending = True
        return events

    def _catch_up(self) -> None:
        """The last step's tokens through the decoder, if they have not gone yet. Raises ZaizaiError once a decode
        step has failed (then, and at every later call)."""
        if self.failed is not None:
            raise ZaizaiError(f"this batch cannot go on: its decode step failed ({self.failed})")
        pending, self.pending = self.pending, False
        if pending and self.sequences:
            try:
                self._advance()
            except Exception as e:
                self.failed = f"{type(e).__name__}: {e}"
                raise

    def _advance(self) -> None:
        """Feed every sequence's new token through one decoder step; each gets its next logits."""
        tokens = [seq.tokens[-1] for seq in self.sequences]
        full = [row for row, seq in enumerate(self.sequences) if seq.window is not None and self.decoder.full(row)]
        for row in full:  # start the row over from the last keep - 1 tokens; the new one follows
            seq = self.sequences[row]
            seq.window = seq.window[len(seq.window) - self.keep + 1:]
        if full:
            self.decoder.prefill_many(full, [self.sequences[row].window for row in full])
        for seq, token in zip(self.sequences, tokens):
            if seq.window is not None:
                seq.window.append(token)
        logits = self.decoder.step(tokens)  # (n, V)
        if self.decoder.choice is not None:  # one row, its argmax and finiteness found by the step itself
            best, ok = self.decoder.choice.tolist()
            self.sequences[0].logits, self.sequences[0].finite, self.sequences[0].best = logits[0], ok == 1, best
            return
        finite = (logits.abs().amax(dim=1) < math.inf).tolist()  # nan too is not < inf (3x faster than isfinite)
        for seq, row_logits, ok in zip(self.sequences, logits, finite):
            seq.logits, seq.finite, seq.best = row_logits, ok, None
