"""The built-in demo: a small chat corpus -> a small gpt trained on the CPU in minutes -> a chat.

The corpus is the Chinese part of the ``chatterbot-corpus`` package (BSD licence; YAML files of short
conversations, the first turn the user's) plus a few dialogues that give the bot its name, 崽崽. It is
written as JSONL chat messages, prepared as dialogue data (loss on the assistant's turns), trained with the
``demo`` preset, and then the demo shows a few exchanges and, on a terminal, opens the chat.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from .common.errors import ZaizaiError
from .data.preparation import prepare
from .inference.chat import ChatSession
from .inference.loaded import load
from .inference.sampling import SamplingConfig
from .terminal import chat_in_terminal
from .training.checkpoint import LAST
from .training.loop import train

DEMO_PROMPTS = ["你好", "你是谁", "你叫什么名字", "谢谢", "再见"]
# What a first-time user should not meet in the demo bot's answers: chatterbot-corpus's politics and gossip files,
# and conversations about addicts, drunks, killers and guns (its bot profile answers 你是个瘾君子 with 这是千真万确的).
SKIPPED_FILES = ("politics.yml", "gossip.yml")
SKIPPED_WORDS = ("瘾君子", "酒鬼", "杀人", "杀手", "枪", "傻瓜", "蠢")


def chatterbot_dialogues(language: str = "chinese") -> list[list[str]]:
    """The conversations of chatterbot-corpus's ``language`` folder, as lists of turns, without SKIPPED_FILES and
    without any conversation that has one of SKIPPED_WORDS."""
    import yaml

    try:
        root = resources.files("chatterbot_corpus") / "data" / language
    except ModuleNotFoundError:
        raise ZaizaiError("the chatterbot-corpus package is missing; run `make setup` "
                          "(or pip install chatterbot-corpus)") from None
    dialogues = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yml") or entry.name in SKIPPED_FILES:
            continue
        doc = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [" ".join(str(t).split()) for t in conv if t is not None]
            turns = [t for t in turns if t]
            if len(turns) >= 2 and not any(word in turn for turn in turns for word in SKIPPED_WORDS):
                dialogues.append(turns)
    return dialogues


def demo_dialogues() -> list[list[dict]]:
    """The demo conversations as chat messages: chatterbot-corpus's Chinese plus 崽崽's self-introduction."""
    convs = chatterbot_dialogues()
    intro = resources.files("zaizai") / "resources" / "zaizai_intro.txt"
    convs += [b.strip().splitlines() for b in intro.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    return [[{"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i, turn in enumerate(turns)]
            for turns in convs]


def build_demo_corpus(path: Path) -> Path:
    """Write the demo corpus as JSONL (one ``{"messages": [...]}`` per line) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": messages}, ensure_ascii=False) for messages in demo_dialogues()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_demo(out: str | Path = "demo", max_time: float = 60.0, retrain: bool = False) -> int:
    out = Path(out)
    model_dir = out / "model"
    if retrain or not (model_dir / LAST).is_file():
        corpus = build_demo_corpus(out / "corpus.jsonl")
        print(f"== 1/3 语料 corpus: {corpus} (chatterbot-corpus 中文对话 + 崽崽的自我介绍)")
        prepare([corpus], out / "data", val_fraction=0.05, seed=1, overwrite=True)
        print(f"\n== 2/3 训练 train: a small gpt on the CPU for {max_time:.0f} s")
        train(out / "data", model_dir, preset="demo", max_time=max_time, overwrite=True)
    else:
        print(f"== 已有模型 using the demo model in {model_dir} (add --retrain to train again)")
    # The demo wants the model that learned the dialogues by heart: the last one, not the best-on-val.
    bot = load(model_dir, which="last")
    print("\n== 3/3 对话 exchanges (greedy):")
    for prompt in DEMO_PROMPTS:
        session = ChatSession(bot, sampling=SamplingConfig(max_new_tokens=60, temperature=0))
        print(f"  你 you: {prompt}\n  崽崽:   {session.say(prompt)}")
    if not sys.stdin.isatty():
        print(f"\n接着聊 to chat: zaizai chat {model_dir}   (或 or: zaizai chat {model_dir} --message 你好)")
        return 0
    print()
    return chat_in_terminal(ChatSession(bot))
