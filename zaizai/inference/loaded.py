"""A trained model ready to use: ``zaizai.load(out_dir)`` -> :class:`Zaizai` with ``generate``/``stream`` (text)
and ``stream_ids``/``stream_text`` (token ids in, e.g. a rendered conversation)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TextIO

import torch

from ..common.device import resolve_device
from ..common.errors import ZaizaiError
from ..data.tokendata import trained_exchanges
from ..data.tokenizer import EOT_ID, load_tokenizer
from ..models import ModelConfig, build_model
from ..models.compiled import round_weights
from ..training.checkpoint import find_checkpoint, load_checkpoint
from .generate import generate_ids
from .prompt import text_ids
from .sampling import SamplingConfig
from .text import IncrementalDecoder, decode_stream


WEIGHTS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}  # compile_decoding's weights


def check_weights(compile: bool, weights: str) -> None:
    """``weights`` (of sample, chat and serve) is a known type, and a 16-bit one goes with ``compile``."""
    if weights not in WEIGHTS:
        raise ZaizaiError(f"unknown weights type '{weights}'; choose {', '.join(WEIGHTS)}")
    if weights != "float32" and not compile:
        raise ZaizaiError(f"--weights {weights} needs --compile: only the compiled decode step reads 16-bit weights")


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
        self.compile = False  # a lone generation steps through a compiled decode step (see compile_decoding)

    def __repr__(self) -> str:
        c = self.model_config
        return (f"Zaizai({c.model}, {self.num_params() / 1e6:.2f}M params, vocab {c.vocab_size}, "
                f"block {c.block_size}, step {self.state.get('step')}, from {self.path})")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def unknown_chars(self, text: str) -> list[str]:
        """Characters of ``text`` the tokenizer does not know (they become the unknown token)."""
        return self.tokenizer.unknown_chars(text)

    @cached_property
    def trained_exchanges(self) -> int | None:
        """The most user -> assistant exchanges in one of the dialogues it was trained on, read from the
        meta.json of the data folder its train config names (``zaizai prepare`` counts them); None if it is
        not a chat model or that is unknown (folder moved or gone, prepared by an older zaizai): then chat
        keeps the whole history, as before (see :func:`zaizai.inference.prompt.history_limit`)."""
        data_dir = self.train_config.get("data_dir")
        if not self.is_chat_model or not data_dir:
            return None
        return trained_exchanges(data_dir, vocab_size=self.model_config.vocab_size)

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
        ids = text_ids(self.tokenizer, prompt)  # whole: the engine slides its window over a longer prompt
        stop_ids = {EOT_ID} if stop_at_eot else None
        decoder = IncrementalDecoder(self.tokenizer, special_text={EOT_ID: "\n\n"})
        yield from decode_stream(self.stream_ids(ids, sampling, stop_ids), decoder, stop)

    def generate(self, prompt: str = "", **kwargs) -> str:
        """The whole continuation of ``prompt`` as one string (see :meth:`stream` for the options)."""
        return "".join(self.stream(prompt, **kwargs))

    def compile_decoding(self, say: TextIO | None = None, weights: str = "float32") -> bool:
        """Step a lone generation through a compiled decode step from now on (gpt and modern on CPU:
        :mod:`zaizai.models.compiled`), compiled here, so that the first reply does not wait for it (20-30 s the
        first time for a model of this shape; later runs load it from the cache, ~/.cache/zaizai). False, and
        nothing changes, for a model or device it does not apply to. Where compiling fails, one line on stderr says
        so and generation goes on without it. ``say``: where to write a line saying what happens (``zaizai chat
        --compile``). ``weights``: float16 or bfloat16 rounds the model's matrices to that type for good (every
        later step, compiled or not, computes with the rounded values), and the compiled step reads them at that
        size: half the bytes, arithmetic in float32 (:func:`~zaizai.models.compiled.round_weights`)."""
        check_weights(True, weights)
        if self.model_config.model not in ("gpt", "modern") or self.device.type != "cpu":
            if say is not None:
                print("注意 note: --compile applies to gpt and modern models on CPU; decoding as usual", file=say)
            return False
        if say is not None:
            print("编译解码步骤 compiling the decode step (~20-30 s the first time for a model of this shape; then "
                  "loaded from the cache) ...", file=say, flush=True)
        if WEIGHTS[weights] is not None:
            round_weights(self.model, WEIGHTS[weights])
        self.compile = True
        for _ in self.stream_ids([0, 0], SamplingConfig(max_new_tokens=3, temperature=0)):
            pass
        return True

    def stream_ids(self, ids: list[int], sampling: SamplingConfig | None = None,
                   stop_ids: set[int] | None = None) -> Iterator[int]:
        """Yield the ids that continue ``ids`` (already tokenized, e.g. a rendered conversation), one by one;
        a stop id ends the stream and is not yielded."""
        return generate_ids(self.model, ids, sampling or SamplingConfig(), stop_ids=stop_ids, device=self.device,
                            compile=self.compile)

    def stream_text(self, ids: list[int], sampling: SamplingConfig | None = None, stop_ids: set[int] | None = None,
                    stop: list[str] | None = None) -> Iterator[str]:
        """:meth:`stream_ids` decoded into text pieces as they come; special tokens show as nothing, and
        ``stop`` strings end the text (not included)."""
        decoder = IncrementalDecoder(self.tokenizer)
        yield from decode_stream(self.stream_ids(ids, sampling, stop_ids), decoder, stop)


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
