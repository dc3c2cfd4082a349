"""The model config: one dataclass for every architecture; fields a model does not use are ignored."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..common.errors import ZaizaiError

MODEL_NAMES = ("bigram", "rnn", "gpt")  # the registry (zaizai.models) maps each name to its class


@dataclass
class ModelConfig:
    model: str = "gpt"          # registry name: bigram | rnn | gpt
    vocab_size: int = 0         # set from the tokenizer
    block_size: int = 128       # longest context the model sees
    n_layer: int = 4            # transformer blocks (gpt) or GRU layers (rnn)
    n_head: int = 4             # attention heads (gpt)
    n_embd: int = 128           # embedding / hidden width (gpt, rnn)
    dropout: float = 0.0
    bias: bool = True           # biases in Linear and LayerNorm, as GPT-2 has

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ZaizaiError(f"unknown model '{self.model}'; choose one of: {', '.join(sorted(MODEL_NAMES))}")
        if self.vocab_size < 2:
            raise ZaizaiError(f"vocab_size must be at least 2, got {self.vocab_size}")
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ZaizaiError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ZaizaiError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.model == "gpt" and self.n_embd % self.n_head != 0:
            raise ZaizaiError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
