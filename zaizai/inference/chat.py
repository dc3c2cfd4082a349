"""A conversation with a trained model: history kept within a token budget, replies streamed.

The prompt is rendered by :func:`zaizai.data.dialogue.render_conversation`, the very function that rendered the
training data, so what the model sees when chatting is exactly what it learned from. When the history grows,
the oldest turns are dropped so that the prompt plus the reply budget fits in the model's block_size
(:func:`zaizai.inference.prompt.fit_conversation`, as the server does). It also keeps no more earlier
exchanges than the model was trained to follow (:func:`zaizai.inference.prompt.history_limit`, or
``keep_history=N``): a model trained on one-exchange dialogues answers each message on its own, while
``history`` (and ``/history``) still holds the whole conversation.

A model trained on plain text (not dialogues) works in completion mode: each message is continued as text.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Iterator

from ..common.errors import ZaizaiError
from ..data.tokenizer import END_ID, EOT_ID
from . import prompt
from .sampling import SamplingConfig


class ChatSession:
    """Multi-turn chat with a loaded model (see :func:`zaizai.load`)."""

    def __init__(self, bot, *, system: str | None = None, sampling: SamplingConfig | None = None,
                 keep_history: int | None = None):
        if keep_history is not None and keep_history < 0:
            raise ZaizaiError(f"--history must be 0 or more earlier exchanges, got {keep_history}")
        self.bot = bot
        self.history_setting = keep_history  # --history N; None: as the model was trained (prompt.history_limit)
        self.max_history = prompt.history_limit(bot, keep_history)  # earlier exchanges fed to the model; None: all
        self.system = system or None
        self.sampling = sampling or SamplingConfig(max_new_tokens=100, temperature=0.7, top_p=0.9,
                                                   repetition_penalty=1.1)
        self.history: list[dict] = []   # user/assistant messages, oldest first
        self.dropped_turns = 0          # how many old messages the last prompt had to leave out

    @property
    def is_chat_model(self) -> bool:
        return self.bot.is_chat_model

    def history_note(self) -> str | None:
        """What to tell the user once, at the start: that each message is answered on its own, when the
        model was trained on one-exchange dialogues (and no ``keep_history`` was asked for); else None."""
        if self.history_setting is not None or self.max_history != 0 or not self.is_chat_model:
            return None
        return ("注意 note: 这个模型只在单轮对话上训练过，每句话单独回答 — "
                "trained on one exchange per dialogue: each message is answered on its own; "
                "--history N to keep N earlier exchanges")

    def reset(self) -> None:
        self.history.clear()
        self.dropped_turns = 0

    def set(self, name: str, value: str) -> None:
        """Change a sampling option by name, e.g. ``set("temperature", "0.7")``."""
        name = name.replace("-", "_")
        kinds = {f.name: type(f.default) for f in fields(SamplingConfig)}
        if name == "seed":
            new = replace(self.sampling, seed=None if value.lower() in ("none", "off", "") else int(value))
        elif name in kinds:
            try:
                new = replace(self.sampling, **{name: kinds[name](value)})
            except ValueError:
                raise ZaizaiError(f"{name} expects a {kinds[name].__name__}, got {value!r}") from None
        else:
            raise ZaizaiError(f"unknown option '{name}'; options: {', '.join(kinds)}")
        new.validate()
        self.sampling = new

    def reply_budget(self) -> int:
        """New tokens a reply may use: the sampling setting, at most half the context."""
        return max(1, prompt.reply_budget(self.sampling.max_new_tokens, self.bot.model_config.block_size))

    def prompt_ids(self, user_text: str) -> list[int]:
        """The rendered prompt for ``user_text`` after the history, oldest turns dropped to fit the budget."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = system + list(self.history) + [{"role": "user", "content": user_text}]
        ids, self.dropped_turns = prompt.fit_conversation(self.bot.tokenizer, messages,
                                                          self.bot.model_config.block_size, self.reply_budget(),
                                                          self.max_history)
        return ids

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to ``user_text`` piece by piece; the exchange joins the history at the end."""
        user_text = user_text.strip()
        if not user_text:
            raise ZaizaiError("empty message; type something to say")
        sampling = replace(self.sampling, max_new_tokens=self.reply_budget())
        pieces: list[str] = []
        if self.is_chat_model:
            ids = self.prompt_ids(user_text)
            stream = self.bot.stream_text(ids, sampling, stop_ids={END_ID, EOT_ID})
        else:  # completion mode: continue the text
            stream = self.bot.stream(user_text, max_new_tokens=sampling.max_new_tokens,
                                     temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                     repetition_penalty=sampling.repetition_penalty,
                                     no_repeat_ngram_size=sampling.no_repeat_ngram_size, seed=sampling.seed,
                                     stop_at_eot=True)
        for piece in stream:
            pieces.append(piece)
            yield piece
        reply = "".join(pieces).strip()
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    def say(self, user_text: str) -> str:
        """The whole reply to ``user_text``."""
        return "".join(self.send(user_text))
