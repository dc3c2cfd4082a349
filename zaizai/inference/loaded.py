"""A trained model ready to use: ``zaizai.load(out_dir)`` -> :class:`Zaizai` with ``generate``/``stream`` (text)
and ``stream_ids``/``stream_text`` (token ids in, e.g. a rendered conversation)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..training.checkpoint import find_checkpoint, load_checkpoint
from ..common.device import resolve_device
from ..common.errors import ZaizaiError
from .generate import SamplingConfig, generate_ids
from ..models import ModelConfig, build_model
from ..data.tokenizer import EOT_ID, load_tokenizer


class Zaizai:
    """A model, its tokenizer and its configs, loaded from a training output folder."""

    def __init__(self, model, tokenizer, model_config: ModelConfig, train_config: dict, state: dict,
                 device: torch.device, path: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.train_config = train_config
        self.state = state
        self.device = device
        self.path = path

    def __repr__(self) -> str:
        c = self.model_config
        return (f"Zaizai({c.model}, {self.num_params() / 1e6:.2f}M params, vocab {c.vocab_size}, "
                f"block {c.block_size}, step {self.state.get('step')}, from {self.path})")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def unknown_chars(self, text: str) -> list[str]:
        """Characters of ``text`` the tokenizer does not know (they become the unknown token)."""
        return self.tokenizer.unknown_chars(text)

    @property
    def is_chat_model(self) -> bool:
        """True when the model was trained on dialogues (its checkpoint says so), so it knows the turn markers."""
        return self.state.get("data_kind") == "dialogue"

    def stream(self, prompt: str = "", *, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
               seed: int | None = None, stop: list[str] | None = None, stop_at_eot: bool = False) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece as it is generated.

        The prompt starts a new document (as after a blank line in the corpus). The end-of-document token
        is shown as a blank line, or ends the text with ``stop_at_eot``. ``stop`` strings end it too
        (not included in the output). The sampling options are those of :class:`SamplingConfig`.
        """
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty,
                                  no_repeat_ngram_size=no_repeat_ngram_size, seed=seed)
        ids = [EOT_ID] + list(self.tokenizer.encode(prompt))
        stop_ids = {EOT_ID} if stop_at_eot else None
        decoder = IncrementalDecoder(self.tokenizer, special_text={EOT_ID: "\n\n"})
        yield from decode_stream(self.stream_ids(ids, sampling, stop_ids), decoder, stop)

    def generate(self, prompt: str = "", **kwargs) -> str:
        """The whole continuation of ``prompt`` as one string (see :meth:`stream` for the options)."""
        return "".join(self.stream(prompt, **kwargs))

    def stream_ids(self, ids: list[int], sampling: SamplingConfig | None = None,
                   stop_ids: set[int] | None = None) -> Iterator[int]:
        """Yield the ids that continue ``ids`` (already tokenized, e.g. a rendered conversation), one by one;
        a stop id ends the stream and is not yielded."""
        return generate_ids(self.model, ids, sampling or SamplingConfig(), stop_ids=stop_ids, device=self.device)

    def stream_text(self, ids: list[int], sampling: SamplingConfig | None = None, stop_ids: set[int] | None = None,
                    stop: list[str] | None = None) -> Iterator[str]:
        """:meth:`stream_ids` decoded into text pieces as they come; special tokens show as nothing, and
        ``stop`` strings end the text (not included)."""
        decoder = IncrementalDecoder(self.tokenizer)
        yield from decode_stream(self.stream_ids(ids, sampling, stop_ids), decoder, stop)


class IncrementalDecoder:
    """Turns token ids into text one id at a time, for streaming.

    ``push(id)`` returns the new text (possibly "" while a character is incomplete, which a byte-level
    tokenizer can produce; the char tokenizer never does) and ``flush()`` whatever is left at the end.
    Special tokens render as ``special_text[id]``, "" by default. Each push decodes only a few recent ids,
    so a long stream costs O(1) per token.
    """

    def __init__(self, tokenizer, special_text: dict[int, str] | None = None):
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.special_ids.values())
        self.special_text = special_text or {}
        self.ids: list[int] = []  # plain (non-special) ids since the last special token
        self.prefix = 0  # ids[prefix:read] decode to text already returned, kept as left context
        self.read = 0

    def push(self, token: int) -> str:
        if token in self.special_ids:
            return self.flush() + self.special_text.get(token, "")
        self.ids.append(token)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next id
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])[len(done):]
        self.ids, self.prefix, self.read = [], 0, 0
        return text


def decode_stream(tokens: Iterator[int], decoder: IncrementalDecoder, stop: list[str] | None = None) -> Iterator[str]:
    """Decode ``tokens`` into text pieces; the first of the ``stop`` strings to appear ends the text there.

    Text that could still grow into a stop string is held back until it cannot, so a stop string is never
    partly shown. Ending early closes ``tokens`` (no further forward passes).
    """
    stops = [s for s in (stop or []) if s]
    pending = ""  # decoded but not yet yielded: at most the longest stop string's length - 1 between tokens
    try:
        for token in tokens:
            pending += decoder.push(token)
            hold = 0
            if stops:
                hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
                if hits:
                    if min(hits) > 0:
                        yield pending[:min(hits)]
                    return
                hold = _longest_stop_prefix(pending, stops)
            if len(pending) > hold:
                yield pending[:len(pending) - hold]
                pending = pending[len(pending) - hold:]
        pending += decoder.flush()
        if pending:
            yield pending
    finally:
        if hasattr(tokens, "close"):
            tokens.close()


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (and not a whole one)."""
    for n in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


def load(path: str | Path, which: str = "auto", device: str = "auto") -> Zaizai:
    """Load a trained model from a ``zaizai train`` output folder (``best`` if it exists, else ``last``)."""
    path = Path(path)
    ckpt_path = find_checkpoint(path, which)
    ckpt = load_checkpoint(ckpt_path, with_optimizer=False)
    folder = ckpt_path.parent
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise ZaizaiError(f"{folder} has no tokenizer.json next to the checkpoint; copy it from the data folder")
    tokenizer = load_tokenizer(tok_path)
    mcfg = ModelConfig.from_dict(ckpt.model_config)
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise ZaizaiError(f"tokenizer.json in {folder} has {tokenizer.vocab_size} tokens but the model expects "
                          f"{mcfg.vocab_size}; the folder mixes files of different runs")
    dev = resolve_device(device)
    model = build_model(mcfg)
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as e:
        raise ZaizaiError(f"{ckpt_path} does not fit its own config ({str(e).splitlines()[0]})") from None
    model.to(dev).eval()
    return Zaizai(model, tokenizer, mcfg, ckpt.train_config, ckpt.state, dev, ckpt_path)
