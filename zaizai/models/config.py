"""The model config: one dataclass for every architecture; fields a model does not use are ignored."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..common.errors import ZaizaiError

MODEL_NAMES = ("bigram", "rnn", "gpt", "modern")  # the registry (zaizai.models) maps each name to its class


@dataclass
class ModelConfig:
    model: str = "gpt"          # registry name: bigram | rnn | gpt | modern
    vocab_size: int = 0         # set from the tokenizer
    block_size: int = 128       # longest context the model sees
    n_layer: int = 4            # transformer blocks (gpt) or GRU layers (rnn)
    n_head: int = 4             # attention heads (gpt, modern)
    n_embd: int = 128           # embedding / hidden width (gpt, rnn)
    dropout: float = 0.0
    bias: bool = True           # biases in Linear and LayerNorm, as GPT-2 has (modern has none)
    # modern (Qwen3-style) only; the defaults leave every other model, and its checkpoints, as they were
    n_kv_head: int = 0          # key/value heads for grouped-query attention; 0 = n_head (plain multi-head)
    rope_theta: float = 10000.0  # RoPE base: the slowest rotation's period grows with it
    ffn_hidden: int = 0         # SwiGLU inner width; 0 = 8/3 n_embd rounded up to a multiple of 64
    tie_embeddings: bool = True  # the output layer is the token embedding (as Qwen3's small models)
    qk_norm: bool = True        # RMSNorm over each head's queries and keys (Qwen3); off: a Llama block
    rms_norm_eps: float = 1e-6  # RMSNorm's epsilon (Qwen3 1e-6; most Llama checkpoints 1e-5)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` when it is 0."""
        return self.n_kv_head or self.n_head

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
        if self.model == "modern":
            self._validate_modern()
        if self.model in ("gpt", "modern") and self.n_embd % self.n_head != 0:
            raise ZaizaiError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )

    def _validate_modern(self) -> None:
        if self.n_kv_head < 0 or self.n_head % self.kv_heads != 0:
            raise ZaizaiError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}) for "
                              f"grouped-query attention; try n_kv_head={_divisor_below(self.n_head, self.n_kv_head)} "
                              "(0 = one per head)")
        if self.rope_theta <= 1.0:
            raise ZaizaiError(f"rope_theta must be greater than 1, got {self.rope_theta} (10000 is usual)")
        if not 0.0 < self.rms_norm_eps < 1.0:
            raise ZaizaiError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps} (1e-6 is usual)")
        if self.ffn_hidden < 0:
            raise ZaizaiError(f"ffn_hidden must not be negative (0 = automatic), got {self.ffn_hidden}")
        if self.n_embd % self.n_head == 0 and (self.n_embd // self.n_head) % 2:
            raise ZaizaiError(f"the head size n_embd / n_head = {self.n_embd // self.n_head} must be even for "
                              f"rotary embeddings; try n_embd={self.n_embd + self.n_head}")


def _divisor_below(n: int, k: int) -> int:
    """The largest divisor of ``n`` not above ``k`` (at least 1)."""
    return max((d for d in range(1, max(1, min(n, k)) + 1) if n % d == 0), default=1)
