"""Attention pictures: what each head of a gpt or modern model looks at, as a grid of heat maps (layers x heads).

The weights are those of the model's own forward pass: given a list, each attention layer computes
softmax(QK^T / sqrt(hs)) with the causal mask in its textbook form and appends the weights it used (for
modern, after QK-norm and rotary, with grouped key/value heads repeated, so there is one map per query head).

The picture is an output file like any other (zaizai/common/outputs.py): it never replaces a model or data
folder's own files, and an existing file only with ``overwrite``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..common.errors import ZaizaiError
from ..common.outputs import check_output_file
from ..data.tokenizer import EOT_ID, UNK_ID
from ..inference.loaded import load
from ..training.metrics import save_png

ATTENTION_MODELS = ("gpt", "modern")  # the models whose forward pass can hand back its attention weights

# Families that cover Chinese, most likely first (Linux, then macOS / Windows names).
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Serif CJK SC", "Source Han Sans SC", "Source Han Sans CN",
             "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "AR PL UMing CN", "SimHei", "Microsoft YaHei",
             "PingFang SC", "Heiti SC", "STHeiti", "Hiragino Sans GB", "Noto Sans SC")
FONT_HINT = ("no font with Chinese glyphs found; install one, e.g. `sudo apt-get install fonts-noto-cjk` (Debian/"
             "Ubuntu), `brew install --cask font-noto-sans-cjk` (macOS), then delete matplotlib's font cache "
             "(~/.cache/matplotlib)")


def find_cjk_font() -> str:
    """The family name of an installed font that has Chinese glyphs; ZaizaiError saying how to install one."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in installed:
            return name
    for f in font_manager.fontManager.ttflist:  # any other family that says it is CJK
        if any(key in f.name for key in ("CJK", "Han Sans", "WenQuanYi", "Hei", "Song", "Ming")):
            return f.name
    # matplotlib caches its font list, so a font installed after that cache was built is unknown to it:
    # scan the system's font files and add CJK ones to the live font manager (the one drawing uses).
    hints = ("cjk", "wqy", "wenquanyi", "sourcehan", "simhei", "simsun", "msyh", "yahei", "pingfang", "heiti")
    for path in sorted(font_manager.findSystemFonts()):
        if any(h in Path(path).name.lower().replace("-", "").replace("_", "") for h in hints):
            try:
                font_manager.fontManager.addfont(path)
            except (OSError, RuntimeError, ValueError):
                continue
    installed = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in installed:
            return name
    for name in installed:
        if any(key in name for key in ("CJK", "Han Sans", "WenQuanYi", "Hei")):
            return name
    raise ZaizaiError(FONT_HINT)


@torch.no_grad()
def attention_weights(model, ids: list[int]) -> torch.Tensor:
    """Attention weights of a gpt or modern model for one sequence: (n_layer, n_head, T, T), each row summing to 1.

    They come from the model's own forward pass (its ``attn_weights`` option), so they are the weights that
    produced its output, not a recomputation beside it.
    """
    name = getattr(getattr(model, "config", None), "model", None)
    if name not in ATTENTION_MODELS:
        raise ZaizaiError(f"attention pictures need a gpt or modern model, not {name or type(model).__name__.lower()}")
    T = len(ids)
    if not 0 < T <= model.config.block_size:
        raise ZaizaiError(f"the text is {T} tokens; give 1 to block_size ({model.config.block_size}) characters")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    weights: list[torch.Tensor] = []  # one (1, nh, T, T) per layer
    model(torch.tensor([ids], dtype=torch.long, device=device), attn_weights=weights)
    model.train(was_training)
    return torch.stack([w[0].float().cpu() for w in weights])  # (n_layer, nh, T, T)


def plot_attention(weights: torch.Tensor, labels: list[str], path: str | Path, title: str = "") -> Path:
    """Draw (n_layer, n_head, T, T) weights as a grid of heat maps with ``labels`` on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = find_cjk_font()
    n_layer, n_head, T, _ = weights.shape
    cell = max(2.2, 0.28 * T)
    fig, axes = plt.subplots(n_layer, n_head, figsize=(cell * n_head + 1, cell * n_layer + 0.8), squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels, fontfamily=font, fontsize=9)
            ax.set_yticklabels(labels, fontfamily=font, fontsize=9)
            ax.set_title(f"layer {layer} · head {head}", fontsize=9)
            if layer == n_layer - 1:
                ax.set_xlabel("key (attended to)", fontsize=8)
            if head == 0:
                ax.set_ylabel("query", fontsize=8)
    fig.suptitle(title, fontfamily=font)
    fig.tight_layout()
    path = Path(path)
    return save_png(fig, path)


SYMBOLS = {"⏎": "文档开头 start", "□": "词表外 unknown", "␣": "空格 space"}  # what label_key() explains


def label_key(labels: list[str]) -> str:
    """A short line explaining the symbols among ``labels`` (empty when there are none)."""
    return " · ".join(f"{sym} {meaning}" for sym, meaning in SYMBOLS.items() if sym in labels)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """One short axis label per token id: the text it stands for, or a symbol that :func:`label_key` explains."""
    labels = []
    for i in ids:
        if i == EOT_ID:
            labels.append("⏎")
        elif i == UNK_ID:
            labels.append("□")  # not "unk": two of them side by side would read as one word
        else:
            text = tokenizer.decode([i])
            labels.append({" ": "␣", "\n": "\\n"}.get(text, text if len(text) <= 2 else text[2:-2][:4]))
    return labels


def attention_picture(out_dir: str | Path, text: str, path: str | Path | None = None, *, which: str = "auto",
                      device: str = "cpu", overwrite: bool = False) -> Path:
    """Write ``attention.png`` (or ``path``): the attention of every layer and head of the model in ``out_dir``
    over ``text`` (after the start-of-document token, as generation sees it). An existing picture is replaced
    only with ``overwrite``; the model's own files (weights, tokenizer, config) never."""

    if not text:
        raise ZaizaiError("give some --text to look at")
    path = Path(path) if path else Path(out_dir) / "attention.png"
    check_output_file(path, overwrite=overwrite, flag="--png")  # before the work, and again just before writing
    find_cjk_font()  # fail before the work when no font can show the characters
    bot = load(out_dir, which=which, device=device)
    if bot.model_config.model not in ATTENTION_MODELS:
        raise ZaizaiError(f"attention pictures need a gpt or modern model; {out_dir} holds a "
                          f"{bot.model_config.model} model")
    ids = [EOT_ID] + bot.tokenizer.encode(text)
    ids = ids[-bot.model_config.block_size:]
    weights = attention_weights(bot.model, ids)
    labels = token_labels(bot.tokenizer, ids)
    check_output_file(path, overwrite=overwrite, flag="--png")
    return plot_attention(weights, labels, path, title=f"{Path(out_dir).resolve().name}: 注意力 attention · {text}\n{label_key(labels)}".strip())
