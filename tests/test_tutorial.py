"""The tutorial runs: every python block of docs/tutorial.md, in order, in one namespace, in a fresh folder.

The tutorial tells the reader to paste the blocks into the interactive Python prompt, so the blocks run the way
that prompt reads them: line by line through ``code.InteractiveConsole`` (a top-level line right after an indented
block, with no blank line between, is a SyntaxError there although ``exec`` accepts it), bare expressions echo their
value, and every block must end complete (the prompt must not be left waiting with ``...`` for more input).

Each block's printed output must equal the ```text block that follows it, unless that text block is marked
``<!-- example-output -->`` (outputs that vary between machines: losses after training, sampled text; those blocks
``assert`` what matters themselves). A python block marked ``<!-- needs-cjk-font -->`` is skipped when no font with
Chinese glyphs is installed. The English version must hold the same code and the same exact outputs.
"""

from __future__ import annotations

import code
import contextlib
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
ZH = DOCS / "tutorial.md"
EN = DOCS / "tutorial.en.md"

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
EXAMPLE = "<!-- example-output -->"
NEEDS_FONT = "<!-- needs-cjk-font -->"


@dataclass
class Block:
    code: str
    line: int                      # where the block starts in the file (1-based)
    expected: str | None = None    # the ```text block right after it, if any
    exact: bool = True             # False: an example output, not compared
    needs_font: bool = False


def parse(path: Path) -> list[Block]:
    """The python blocks of a markdown file with the text block after each (only comments and a marker between)."""
    text = path.read_text(encoding="utf-8")
    fences = list(FENCE.finditer(text))
    blocks: list[Block] = []
    for i, fence in enumerate(fences):
        if fence.group(1) != "python":
            continue
        before = text[fences[i - 1].end() if i else 0:fence.start()]
        block = Block(fence.group(2), text.count("\n", 0, fence.start()) + 1,
                      needs_font=before.rstrip().endswith(NEEDS_FONT))
        if i + 1 < len(fences) and fences[i + 1].group(1) == "text":
            between = text[fence.end():fences[i + 1].start()]
            # Only blank lines, the marker and the one italic caption may separate a block from its output.
            lines = [ln.strip() for ln in between.splitlines() if ln.strip()]
            if all(ln == EXAMPLE or (ln.startswith("*") and ln.endswith("*")) for ln in lines):
                block.expected = fences[i + 1].group(2)
                block.exact = EXAMPLE not in lines
        blocks.append(block)
    return blocks


class Repl(code.InteractiveConsole):
    """The interactive prompt, except that a syntax error or an exception is raised instead of printed."""

    def showsyntaxerror(self, filename=None, **kwargs):
        raise  # noqa: PLE0704 - called inside runsource's ``except SyntaxError``: re-raise it

    def runcode(self, code_obj):
        exec(code_obj, self.locals)  # noqa: S102 - our own docs


def paste(repl: Repl, block: Block, name: str) -> None:
    """Feed a block to the prompt line by line, as pasting it does; it must end with nothing left pending."""
    repl.filename = f"{name}:{block.line}"
    more = False
    for number, line in enumerate(block.code.splitlines(), block.line + 1):
        try:
            more = repl.push(line)
        except SyntaxError as e:
            raise AssertionError(f"{name}:{number} is a syntax error at the Python prompt: {line!r} ({e.msg}); "
                                 "an indented block needs a blank line before the next top-level line") from e
    assert not more, (f"the block at {name}:{block.line} leaves the Python prompt waiting for more input; "
                      "end it with a blank line after an indented block (or close what is open)")


def echo_into(namespace: dict):
    """The prompt's echo of a bare expression (sys.displayhook), keeping ``_`` in the namespace, not in builtins."""
    def echo(value):
        if value is not None:
            namespace["_"] = value
            print(repr(value))
    return echo


def test_the_prompt_check_catches_what_exec_lets_through(monkeypatch):
    """A top-level line straight after an indented block runs under exec but not at the prompt."""
    monkeypatch.setattr(sys, "displayhook", echo_into({}))
    bad = Block("for i in range(2):\n    print(i)\nprint('done')\n", 1)
    exec(compile(bad.code, "bad", "exec"), {})  # noqa: S102 - fine for exec
    for block in (bad, Block("for i in range(2):\n    print(i)\n", 1), Block("print(1,\n", 1)):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                paste(Repl({}), block, "bad.md")
        except AssertionError:
            continue
        raise AssertionError(f"not caught: {block.code!r}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        paste(Repl({}), Block("for i in range(2):\n    print(i)\n\nprint('done')\n1 + 1\n", 1), "good.md")
    assert out.getvalue() == "0\n1\ndone\n2\n"


def have_cjk_font() -> bool:
    from zaizai.evals.attention import find_cjk_font
    from zaizai.common.errors import ZaizaiError

    try:
        find_cjk_font()
    except ZaizaiError:
        return False
    return True


def test_both_versions_hold_the_same_code_and_outputs():
    zh, en = parse(ZH), parse(EN)
    assert [b.code for b in zh] == [b.code for b in en], "docs/tutorial.md and tutorial.en.md must share their code"
    assert [(b.expected, b.exact) for b in zh if b.exact] == [(b.expected, b.exact) for b in en if b.exact]
    assert [b.needs_font for b in zh] == [b.needs_font for b in en]
    assert len(zh) >= 20 and sum(b.expected is not None and b.exact for b in zh) >= 12


def test_tutorial_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    font = have_cjk_font()
    namespace: dict = {"__name__": "__tutorial__"}
    repl = Repl(namespace)
    monkeypatch.setattr(sys, "displayhook", echo_into(namespace))
    for block in parse(ZH):
        if block.needs_font and not font:
            continue
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                paste(repl, block, ZH.name)
        except AssertionError:
            raise
        except Exception as e:  # say which block, with what it printed so far
            raise AssertionError(f"the block at {ZH.name}:{block.line} failed: {e!r}\n{out.getvalue()}") from e
        if block.expected is not None and block.exact:
            assert out.getvalue().rstrip("\n") == block.expected.rstrip("\n"), f"output of {ZH.name}:{block.line}"
    if font:
        assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "chat" / "eval.json").is_file()
