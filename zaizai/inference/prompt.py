"""Prompts: text or a conversation as token ids, fitted so that prompt + reply fit the model's block_size.

Two kinds of prompt, one rule each:

- plain text starts a new document: ``<|endoftext|>`` then the text's tokens (as after a blank line in the
  corpus). Cut to fit, it keeps that opening token and the end of the text (the most recent words).
- a conversation is rendered by :func:`zaizai.data.dialogue.render_conversation` (the rendering the trainer
  used) with the generation prompt; to fit, the oldest exchanges are dropped, then the end of the last
  message is kept.

The reply budget is what the caller asks for, at most half the context (:func:`reply_budget`), so a long
prompt always keeps half of block_size.
"""

from __future__ import annotations

from ..data.dialogue import render_conversation
from ..data.tokenizer import EOT_ID


def reply_budget(max_new_tokens: int, block_size: int) -> int:
    """Tokens to keep free for the reply: ``max_new_tokens``, at most half of ``block_size``."""
    return min(max_new_tokens, block_size // 2)


def text_ids(tokenizer, text: str) -> list[int]:
    """``text`` as the start of a new document: the end-of-text token, then its tokens (not cut)."""
    return [EOT_ID] + list(tokenizer.encode(text))


def fit_text(tokenizer, text: str, block_size: int, reply_budget: int) -> list[int]:
    """:func:`text_ids` cut so that prompt + ``reply_budget`` fit ``block_size``: the opening token and
    the end of the text are kept (at least the opening token)."""
    ids = text_ids(tokenizer, text)
    budget = max(1, block_size - reply_budget)
    return ids if len(ids) <= budget else [EOT_ID] + ids[len(ids) - budget + 1:]


def fit_conversation(tokenizer, messages: list[dict], block_size: int, reply_budget: int) -> tuple[list[int], int]:
    """Render ``messages`` with the generation prompt so that prompt + ``reply_budget`` fit ``block_size``.

    The leading system messages and the last message are always kept; the oldest exchanges in between
    (a user message and the reply to it) are dropped first. If the last message alone is still too long,
    its end (the most recent words) is kept, after its role marker. Returns ``(ids, dropped_messages)``.
    The prompt can only be longer than the budget when the system messages alone are.
    """
    budget = block_size - reply_budget
    n_system = 0
    while n_system < len(messages) - 1 and messages[n_system]["role"] == "system":
        n_system += 1
    system, history, last = messages[:n_system], messages[n_system:-1], messages[-1:]

    def render(dropped: int) -> list[int]:
        return render_conversation(tokenizer, system + history[dropped:] + last, add_generation_prompt=True)[0]

    # Drop whole exchanges (2 messages; the last cut may be 1): the smallest drop that fits, found by
    # bisection (the prompt only shrinks as more is dropped), so a long history costs O(log n) renderings.
    steps = (len(history) + 1) // 2
    lo, hi = 0, steps
    while lo < hi:
        mid = (lo + hi) // 2
        if len(render(min(2 * mid, len(history)))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    dropped = min(2 * lo, len(history))
    ids = render(dropped)
    if len(ids) > budget:
        # the message alone is too long: keep its end (the most recent words), and its role marker
        prefix, _ = render_conversation(tokenizer, system)
        keep = len(prefix) + 1  # ... up to and including the last message's role marker
        ids = ids[:keep] + ids[keep + len(ids) - budget:]
    return ids, dropped
