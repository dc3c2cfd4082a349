"""A trained model ready to use: ``zaizai.load(out_dir)`` -> :class:`Zaizai` with ``generate``/``stream``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import find_checkpoint, load_checkpoint
from .device import resolve_device
from .errors import ZaizaiError
from .generate import SamplingConfig, generate_ids
from .models import ModelConfig, build_model
from .tokenizer import EOT_ID, UNK_ID, load_tokenizer


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
        return sorted({ch for ch, i in zip(text, self.tokenizer.encode(text)) if i == UNK_ID})

    def stream(self, prompt: str = "", *, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
               stop_at_eot: bool = False) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece as it is generated.

        The prompt starts a new document (as after a blank line in the corpus). The end-of-document token
        is shown as a blank line, or ends the text with ``stop_at_eot``. ``stop`` strings end it too
        (not included in the output).
        """
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
        ids = [EOT_ID] + list(self.tokenizer.encode(prompt))
        stop_ids = {EOT_ID} if stop_at_eot else None
        text = ""
        emitted = 0
        for token in generate_ids(self.model, ids, cfg, stop_ids=stop_ids, device=self.device):
            text += "\n\n" if token == EOT_ID else self.tokenizer.decode([token])
            if stop:
                hits = [text.find(s) for s in stop if s and s in text]
                if hits:
                    cut = min(hits)
                    if cut > emitted:
                        yield text[emitted:cut]
                    return
                # hold back a tail that could still become a stop string
                safe = len(text) - max(len(s) - 1 for s in stop)
            else:
                safe = len(text)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        if len(text) > emitted:
            yield text[emitted:]

    def generate(self, prompt: str = "", **kwargs) -> str:
        """The whole continuation of ``prompt`` as one string (see :meth:`stream` for the options)."""
        return "".join(self.stream(prompt, **kwargs))


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
