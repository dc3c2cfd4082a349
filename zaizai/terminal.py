"""Chat in the terminal: the prompt loop with line editing, and the /commands of `zaizai chat` and the demo."""

from __future__ import annotations

import sys
from typing import Iterable

from .common.errors import ZaizaiError

CHAT_HELP = """命令 commands:
  /reset                 清空对话历史 forget the conversation
  /history               显示对话历史 show the conversation so far
  /set NAME VALUE        改采样参数 change a sampling option: temperature, top_k, top_p,
                         repetition_penalty, no_repeat_ngram_size, max_new_tokens, seed
  /settings              显示当前参数 show the sampling options
  /quit                  退出 leave (Ctrl-D works too)"""


def chat_in_terminal(session) -> int:
    """Talk with ``session`` (a :class:`ChatSession`) at the terminal until /quit, Ctrl-D or Ctrl-C; returns 0."""
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    print(f"崽崽 zaizai · {session.bot}\n输入 /help 看命令 · type /help for commands, /quit to leave")
    while True:
        try:
            line = input("\n你 you> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if run_command(session, line):
                return 0
            continue
        print("崽崽> ", end="", flush=True)
        try:
            for piece in session.send(line):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [停止 stopped]", end="")
        print()


def chat_from_lines(session, lines: Iterable[str]) -> int:
    """Scripted chat (``--message`` or lines on stdin): one reply line on stdout per message; lines starting with
    "/" are the interactive /commands and never reach the model. Returns 0."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            # Command feedback goes to stderr: scripts read the replies from stdout, one line per message.
            if run_command(session, line, out=sys.stderr):
                return 0
            continue
        print(session.say(line), flush=True)
    return 0


def run_command(session, line: str, out=None) -> bool:
    """Run a chat /command typed as ``line``, printing its feedback to ``out`` (stdout by default); True means
    quit."""
    def say(text) -> None:
        print(text, file=out or sys.stdout, flush=True)

    name, *rest = line[1:].split() or [""]
    if name in ("quit", "exit", "q"):
        return True
    if name == "help":
        say(CHAT_HELP)
    elif name == "reset":
        session.reset()
        say("(已清空 history cleared)")
    elif name == "history":
        for m in session.history or []:
            say(f"{'你 you' if m['role'] == 'user' else '崽崽'}: {m['content']}")
        if not session.history:
            say("(空 empty)")
    elif name == "settings":
        say(session.sampling)
    elif name == "set" and len(rest) == 2:
        try:
            session.set(rest[0], rest[1])
            say(f"({rest[0]} = {rest[1]})")
        except ZaizaiError as e:
            say(f"错误 error: {e}")
    else:
        say(f"未知命令 unknown command: {line} (try /help)")
    return False
