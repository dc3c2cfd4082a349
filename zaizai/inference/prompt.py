"""Prompts: text or a conversation as token ids, fitted so that prompt + reply fit the model's block_size.

Two kinds of prompt, one rule each:

- plain text starts a new document: ``<|endoftext|>`` then the text's tokens (as after a blank line in the
  corpus). Cut to fit, it keeps that opening token and the end of the text (the most recent words).
- a conversation is rendered by :func:`zaizai.data.dialogue.render_conversation` (the rendering the trainer
  used) with the generation prompt; to fit, the oldest exchanges are dropped, then the end of the last
  message is kept. Before that, it keeps no more earlier exchanges than the model learned to follow
  (:func:`history_limit`): a model trained on one-exchange dialogues (the articles' corpora) has never
  seen a second turn, and answers well only a message on its own. Chat, the HTTP API and the page all
  build their prompts here, so they keep the same history.

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


def history_limit(bot, setting: int | None = None) -> int | None:
    """How many earlier exchanges a prompt for ``bot`` keeps: ``setting`` when given (``--history N``),
    else one less than the most exchanges in one of its training dialogues (0 for the articles'
    one-question-one-answer corpora), else None: all that fit. None is also the answer when the training
    data's turn count is unknown (its folder gone or prepared before zaizai counted turns): chat then keeps
    the full history, as it always did."""
    if setting is not None:
        return setting
    trained = getattr(bot, "trained_exchanges", None)
    return trained - 1 if trained else None


def fit_conversation(tokenizer, messages: list[dict], block_size: int, reply_budget: int,
                     max_history: int | None = None) -> tuple[list[int], int]:
    """Render ``messages`` with the generation prompt so that prompt + ``reply_budget`` fit ``block_size``.

    The leading system messages and the last message are always kept; of the messages in between, at
    most the last ``max_history`` exchanges (``2 * max_history`` messages; None: all) are kept, and then
    the oldest exchanges (a user message and the reply to it) are dropped until it fits. If the last
    message alone is still too long, its end (the most recent words) is kept, after its role marker.
    Returns ``(ids, dropped_messages)``. The prompt can only be longer than the budget when the system
    messages alone are.
    """
    budget = block_size - reply_budget
    n_system = 0
    while n_system < len(messages) - 1 and messages[n_system]["role"] == "system":
        n_system += 1
    system, history, last = messages[:n_system], messages[n_system:-1], messages[-1:]
    windowed = 0 if max_history is None else max(0, len(history) - 2 * max_history)
    history = history[windowed:]

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
    return ids, windowed + dropped
