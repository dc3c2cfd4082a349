"""Small helpers shared by the training/CLI tests: a tiny corpus and tiny model options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LINES = ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡", "你好，我是崽崽", "有什么问题吗？",
         "春眠不觉晓", "处处闻啼鸟", "夜来风雨声", "花落知多少", "白日依山尽", "黄河入海流"]

# A model small enough that a few dozen steps take about a second on 2 cores.
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_interval=5, eval_iters=2,
            warmup_iters=2, lr=3e-3, dropout=0.0, threads=1, preset="tiny")


def write_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A deterministic corpus in the articles' layout: blocks of lines separated by blank lines."""
    import random

    rng = random.Random(seed)
    blocks = ["\n".join(rng.sample(LINES, k=rng.randint(2, 4))) for _ in range(n_docs)]
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def prepared(tmp_path: Path) -> Path:
    """A corpus prepared into ``tmp_path/data``."""
    import zaizai

    corpus = write_corpus(tmp_path / "corpus.txt")
    zaizai.prepare([corpus], tmp_path / "data", verbose=False)
    return tmp_path / "data"


def run_cli(*args, input: str | None = None, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Run ``python -m zaizai ARGS`` and capture its output as text."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "zaizai", *map(str, args)], input=input, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout, env=env, **popen)


def write_dialogues(path: Path, dialogues) -> Path:
    """A JSONL file of OpenAI-style conversations; ``dialogues``: lists of (user, assistant) exchanges."""
    import json

    lines = []
    for exchanges in dialogues:
        messages = []
        for user, assistant in exchanges:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_pairs(path: Path, pairs) -> Path:
    """A JSONL file of one-exchange conversations, one per (user, assistant) pair."""
    return write_dialogues(path, [[pair] for pair in pairs])


# --- generation tests (test_engine, test_batch_decode) -----------------------------------------------------------

DECODE_VOCAB = 61  # the vocabulary of decode_model and decode_prompt


def decode_model(name: str = "gpt", **overrides):
    """A small seeded model of kind ``name`` in eval mode, block_size 24 unless overridden, its matrices 8x larger
    than at initialisation: confident, varied predictions (greedy texts differ from prompt to prompt)."""
    import torch

    from zaizai.models import ModelConfig, build_model

    cfg = dict(model=name, vocab_size=DECODE_VOCAB, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return model


def decode_prompt(n: int, seed: int = 0) -> list[int]:
    """``n`` seeded token ids of decode_model's vocabulary, none of them special (6 and above)."""
    import torch

    return torch.randint(6, DECODE_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_pair(bot, hf_model, prompt: list[int], chat: bool) -> tuple[list[int], list[int]]:
    """Greedy continuations of ``prompt`` to the end of the context: (transformers' ``generate()``, zaizai's),
    both stopping at the ids a chat (or plain) model stops at, the stop id itself left out."""
    import torch

    from zaizai.data.tokenizer import END_ID, EOT_ID
    from zaizai.inference.sampling import SamplingConfig

    stop = {END_ID, EOT_ID} if chat else {EOT_ID}
    n = bot.model_config.block_size - len(prompt)
    ours = list(bot.stream_ids(prompt, SamplingConfig(temperature=0.0, max_new_tokens=n), stop_ids=stop))
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    if out and out[-1] in stop:
        out = out[:-1]  # transformers keeps the eos token it stopped at
    return out, ours
