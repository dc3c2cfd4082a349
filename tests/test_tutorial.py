"""The tutorial runs: every python block of docs/tutorial.md, in order, in one namespace, in a fresh folder.

Each block's printed output must equal the ```text block that follows it, unless that text block is marked
``<!-- example-output -->`` (outputs that vary between machines: losses after training, sampled text; those blocks
``assert`` what matters themselves). A python block marked ``<!-- needs-cjk-font -->`` is skipped when no font with
Chinese glyphs is installed. The English version must hold the same code and the same exact outputs.
"""

from __future__ import annotations

import contextlib
import io
import re
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
    for block in parse(ZH):
        if block.needs_font and not font:
            continue
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(block.code, f"{ZH.name}:{block.line}", "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as e:  # say which block, with what it printed so far
            raise AssertionError(f"the block at {ZH.name}:{block.line} failed: {e!r}\n{out.getvalue()}") from e
        if block.expected is not None and block.exact:
            assert out.getvalue().rstrip("\n") == block.expected.rstrip("\n"), f"output of {ZH.name}:{block.line}"
    if font:
        assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "chat" / "eval.json").is_file()
