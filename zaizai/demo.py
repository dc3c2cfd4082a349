"""The built-in demo: a small chat corpus -> a small gpt trained on the CPU in minutes -> a few exchanges.

The corpus is the Chinese part of the ``chatterbot-corpus`` package (BSD licence; YAML files of short
conversations) plus a few lines that give the bot its name, 崽崽. It is written in the articles' text
layout: one dialogue per block, one turn per line, a blank line between dialogues.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from .checkpoint import LAST
from .errors import ZaizaiError

DEMO_PROMPTS = ["你好", "你是谁", "早上好", "你喜欢什么", "再见"]


def chatterbot_dialogues(language: str = "chinese") -> list[list[str]]:
    """All conversations of chatterbot-corpus's ``language`` folder, as lists of turns."""
    import yaml

    try:
        root = resources.files("chatterbot_corpus") / "data" / language
    except ModuleNotFoundError:
        raise ZaizaiError("the chatterbot-corpus package is missing; run `make setup` "
                          "(or pip install chatterbot-corpus)") from None
    dialogues = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yml"):
            continue
        doc = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [" ".join(str(t).split()) for t in conv if t is not None]
            turns = [t for t in turns if t]
            if len(turns) >= 2:
                dialogues.append(turns)
    return dialogues


def build_demo_corpus(path: Path) -> Path:
    """Write the demo corpus (text layout) to ``path``."""
    blocks = ["\n".join(turns) for turns in chatterbot_dialogues()]
    intro = resources.files("zaizai") / "resources" / "zaizai_intro.txt"
    blocks.extend(b.strip() for b in intro.read_text(encoding="utf-8").split("\n\n") if b.strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def reply(bot, history: list[str], **sampling) -> str:
    """The model's next line after the dialogue lines in ``history`` (text layout: one turn per line)."""
    prompt = "\n".join(history) + "\n"
    text = bot.generate(prompt, stop=["\n"], stop_at_eot=True, max_new_tokens=60, **sampling)
    return text.strip()


def run_demo(out: str | Path = "demo", max_time: float = 150.0, retrain: bool = False) -> int:
    from .data import prepare
    from .pipeline import load
    from .trainer import train

    out = Path(out)
    model_dir = out / "model"
    if retrain or not (model_dir / LAST).is_file():
        corpus = build_demo_corpus(out / "corpus.txt")
        print(f"== 1/3 语料 corpus: {corpus} (chatterbot-corpus 中文对话 + 崽崽的自我介绍)")
        prepare([corpus], out / "data", val_fraction=0.05, seed=1)
        print(f"\n== 2/3 训练 train: a small gpt on the CPU for {max_time:.0f} s")
        train(out / "data", model_dir, preset="demo", max_time=max_time, overwrite=True)
    else:
        print(f"== 已有模型 using the demo model in {model_dir} (add --retrain to train again)")
    # The demo wants the model that learned the dialogues by heart: the last one, not the best-on-val.
    bot = load(model_dir, which="last")
    print("\n== 3/3 对话 exchanges (greedy):")
    for prompt in DEMO_PROMPTS:
        print(f"  你 you: {prompt}\n  崽崽:   {reply(bot, [prompt], temperature=0)}")
    if not sys.stdin.isatty():
        print(f"\n接着聊 to chat: zaizai sample {model_dir} --prompt '你好' (interactive chat: run `make demo` in a terminal)")
        return 0
    print("\n和崽崽聊天 chat with zaizai (empty line or Ctrl-D to quit):")
    history: list[str] = []
    while True:
        try:
            line = input("你 you: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            return 0
        history.append(line)
        answer = reply(bot, history[-6:], temperature=0.7, top_p=0.9)
        history.append(answer)
        print(f"崽崽: {answer}")
