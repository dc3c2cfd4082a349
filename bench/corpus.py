"""The text a benchmark runs on: ``--corpus PATH``, or the demo corpus the repository makes itself.

    --corpus ../shared/corpora/tang.txt.xz   # how the README's figures were made (4.5M characters of Tang poetry)
    (no --corpus)                            # the built-in demo corpus: runs from a clone alone

``PATH`` is a UTF-8 text file (``.txt``), an xz-compressed one (``.xz``, read with lzma), or a folder whose
``.txt`` files are read in name order and joined with an empty line (so each stays its own document).
The demo corpus is chatterbot-corpus's Chinese conversations plus 崽崽's introduction
(:func:`zaizai.demo.demo_dialogues`), written as text: one dialogue per block, one turn per line, an empty
line between dialogues. The vocabulary size a benchmark uses is the char tokenizer's: the corpus's distinct
characters + 6 special tokens.
"""

from __future__ import annotations

import argparse
import lzma
from dataclasses import dataclass
from pathlib import Path

N_SPECIAL_TOKENS = 6  # the char tokenizer's special tokens, on top of the corpus's distinct characters
DEMO_NAME = "demo"


@dataclass
class Corpus:
    name: str  # the file's or folder's name, or "demo"
    text: str

    @property
    def vocab_size(self) -> int:
        return len(set(self.text)) + N_SPECIAL_TOKENS

    def header(self) -> str:
        """One line naming the corpus, e.g. ``corpus: tang.txt.xz, 4,520,000 chars, vocab 9,706``."""
        source = " (built in: chatterbot-corpus Chinese + 崽崽's introduction)" if self.name == DEMO_NAME else ""
        return f"corpus: {self.name}{source}, {len(self.text):,} chars, vocab {self.vocab_size:,}"

    def write(self, folder: Path) -> Path:
        """The text as a plain ``.txt`` file in ``folder`` (for ``zaizai.prepare``); its path."""
        stem = self.name.split(".")[0] or "corpus"
        path = Path(folder) / f"{stem}.txt"
        path.write_text(self.text, encoding="utf-8")
        return path


def add_corpus_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus", default=None, metavar="PATH",
        help="a UTF-8 .txt file, a .txt.xz file or a folder of .txt files (default: the built-in demo corpus; "
             "the README's figures: ../shared/corpora/tang.txt.xz)",
    )


def read_text(path: Path) -> str:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise SystemExit(f"--corpus {path}: the folder has no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8").strip("\n") for f in files)
    if not path.is_file():
        raise SystemExit(f"--corpus {path}: no such file or folder")
    # Text mode on both paths, so line endings are read the same way from .txt and .xz
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def demo_text() -> str:
    from zaizai.demo import demo_dialogues

    dialogues = demo_dialogues()
    return "\n\n".join("\n".join(message["content"] for message in messages) for messages in dialogues) + "\n"


def load_corpus(path: str | Path | None) -> Corpus:
    """The corpus at ``path`` (``--corpus``), or the demo corpus when it is None."""
    if path is None:
        return Corpus(DEMO_NAME, demo_text())
    path = Path(path)
    return Corpus(path.name, read_text(path))
