"""Evaluate a trained model: loss, perplexity and bits per character / per UTF-8 byte over the whole
validation split, and for chat models reply metrics on held-out dialogues (BLEU-2/4, distinct-n, length,
repetition) under fixed, printed decoding settings.

``evaluate(out_dir)`` does both and writes ``eval.json`` next to the checkpoint; the pieces
(:func:`split_loss`, :func:`bleu`, :func:`distinct_n`, :func:`dialogue_pairs` ...) are usable on their own.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ZaizaiError
from ..common.fileio import atomic_write_text
from ..data.batches import Batches
from ..data.dialogue import ROLES, ROLE_MARKER_IDS, loss_mask
from ..data.tokendata import TokenData, dialogue_text_file
from ..data.tokenizer import END_ID, EOT_ID, UNK_ID
from ..inference.batch import Batch
from ..inference.chat import ChatSession
from ..inference.loaded import load
from ..inference.prompt import text_ids
from ..inference.sampling import SamplingConfig
from ..inference.text import IncrementalDecoder, decode_stream
from ..training.evaluation import evaluate_split

EVAL_JSON = "eval.json"
LN2 = math.log(2)
# Bytes an unknown character is taken to stand for (its text is gone from the bins; most are CJK, 3 bytes).
UNK_BYTES = 3
REPEAT_N = 3  # a reply "repeats itself" when one character n-gram of this size occurs twice in it

# The two decoding settings of the dialogue metrics: greedy, and sampled as in CDial-GPT.
GREEDY = SamplingConfig(max_new_tokens=64, temperature=0.0)
SAMPLED = SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9)
GENERATE_ROWS = 32  # replies generated side by side (one batch, one decode step for all)


# --- text metrics -------------------------------------------------------------------------------------------


def bleu(hypotheses: list[str], references: list[str], max_ngram_order: int = 4) -> tuple[float, str]:
    """Corpus BLEU (0-100) of ``hypotheses`` against one reference each, sacrebleu with ``tokenize='zh'``
    (Chinese split into characters); returns (score, sacrebleu signature)."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError("one reference per hypothesis")
    metric = BLEU(tokenize="zh", max_ngram_order=max_ngram_order)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def _char_ngrams(text: str, n: int) -> list[str]:
    chars = [c for c in text if not c.isspace()]
    return ["".join(chars[i:i + n]) for i in range(len(chars) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Corpus-level distinct-n over characters: distinct n-grams / all n-grams of all texts (0 if none)."""
    grams = [g for t in texts for g in _char_ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def has_repeated_ngram(text: str, n: int = REPEAT_N) -> bool:
    """True when some character n-gram occurs more than once in ``text``."""
    grams = _char_ngrams(text, n)
    return len(set(grams)) < len(grams)


# --- whole-split loss ---------------------------------------------------------------------------------------


def split_sizes(data, split: str, loss_on: str = "assistant") -> dict[str, int]:
    """Counted targets of ``split`` and the characters and UTF-8 bytes they stand for.

    Conventions as :meth:`TokenData.bits_per_char`: a document separator (plain) or ``<|end|>`` (dialogue)
    counts as one character and one byte, role markers as none; an unknown character as ``UNK_BYTES``.
    """

    tok = data.tokenizer
    ids = np.asarray(data.split(split)).astype(np.int64)
    if data.kind == "dialogue":
        ids = ids[loss_mask(np.asarray(data.roles(split)), loss_on)]
    counts = np.bincount(ids, minlength=tok.vocab_size)
    chars = bytes_ = int(counts[EOT_ID] + counts[END_ID])
    chars, bytes_ = chars + int(counts[UNK_ID]), bytes_ + UNK_BYTES * int(counts[UNK_ID])
    special = np.asarray(sorted(tok.special_ids.values()), dtype=np.int64)
    if tok.type == "char":  # one character per id: a table of lengths
        byte_len = np.zeros(tok.vocab_size, dtype=np.int64)
        for i in range(len(special), tok.vocab_size):
            byte_len[i] = len(tok.decode([i]).encode("utf-8"))
        text = counts.copy()
        text[special] = 0
        chars, bytes_ = chars + int(text.sum()), bytes_ + int(counts @ byte_len)
    else:  # a subword's characters depend on its neighbours: decode the text between special tokens
        for piece in np.split(ids, np.flatnonzero(np.isin(ids, special))):
            piece = piece[1:] if piece.size and piece[0] in special else piece
            if piece.size:
                text = tok.decode(piece)
                chars, bytes_ = chars + len(text), bytes_ + len(text.encode("utf-8"))
    return {"tokens": int(ids.size), "chars": chars, "bytes": bytes_}


def split_loss(bot, data, split: str = "val", batch_size: int = 16) -> dict[str, Any]:
    """Loss (nats/token), perplexity, bits per character and per UTF-8 byte over the whole ``split``."""

    if data.tokenizer != bot.tokenizer:
        raise ZaizaiError(f"{data.data_dir} was not prepared with this model's tokenizer; pass the --data folder "
                          "the model was trained on")
    if data.num_tokens(split) < 2:
        raise ZaizaiError(f"the {split} split of {data.data_dir} is empty; prepare with a --val-fraction > 0")
    loss_on = bot.train_config.get("loss_on", "assistant")
    batches = Batches(data, bot.model_config.block_size, packed=bool(getattr(bot.model, "supports_segments", False)),
                      loss_on=loss_on)
    loss = evaluate_split(bot.model, batches, split, batch_size, bot.device)
    sizes = split_sizes(data, split, loss_on)
    nats = loss * sizes["tokens"]
    return {
        "split": split,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_char": data.bits_per_char(split, loss, loss_on=loss_on),
        "bits_per_byte": nats / LN2 / sizes["bytes"] if sizes["bytes"] else float("nan"),
        "loss_on": loss_on if data.kind == "dialogue" else None,
        **sizes,
    }


# --- dialogue metrics ---------------------------------------------------------------------------------------


@dataclass
class Pair:
    context: list[dict]   # the messages before the reply; the last one is the user's
    reference: str


def split_messages(data, split: str) -> list[list[dict]]:
    """The conversations of a dialogue split as message lists, in their original text where the folder keeps
    it (``val.jsonl``), else decoded from the token ids (see :func:`held_out_conversations`)."""
    return held_out_conversations(data, split)[0]


def held_out_conversations(data, split: str) -> tuple[list[list[dict]], str | None]:
    """(conversations, note): the original text from the folder's ``val.jsonl`` when it matches the bins;
    otherwise the text decoded from the token ids, where characters unseen in training are U+FFFD, and a
    one-line note saying so (None when the original text was used)."""
    bodies = list(_message_bodies(data, split))
    path = Path(data.data_dir) / dialogue_text_file(split)
    if not path.is_file():
        return _decoded(data.tokenizer, bodies), (
            f"注意 note: 数据文件夹没有验证集原文 the data folder has no {path.name} (prepared by an older zaizai): "
            "references are decoded from token ids, characters unseen in training show as \ufffd; run "
            "zaizai prepare again to score against the original text")
    original = _read_jsonl_messages(path)
    if original is None or not _same_conversations(data.tokenizer, original, bodies):
        return _decoded(data.tokenizer, bodies), (
            f"注意 note: 数据文件夹的 {path.name} 与 token 文件不符 the data folder's {path.name} does not match its "
            "token bins: references are decoded from token ids; run zaizai prepare again")
    return original, None


def decoded_messages(data, split: str) -> list[list[dict]]:
    """The conversations of a dialogue split decoded from its token ids (unknown characters become U+FFFD)."""
    return _decoded(data.tokenizer, _message_bodies(data, split))


def _message_bodies(data, split: str):
    """Per conversation: the role of each message and the token ids of its text, as (role, ids) pairs."""
    role_of = {marker: role for marker, role in zip(ROLE_MARKER_IDS, ROLES)}
    ids = np.asarray(data.split(split))
    turns = np.asarray(data.turn_starts(split))
    for start, length in np.asarray(data.dialogues(split)):
        inside = turns[(turns >= start) & (turns < start + length)]
        messages = []
        for j, marker in enumerate(inside):
            end = inside[j + 1] if j + 1 < len(inside) else start + length
            # the text is between the role marker and <|end|>
            messages.append((role_of[int(ids[marker])], np.asarray(ids[marker + 1:end - 1], dtype=np.int64)))
        yield messages


def _decoded(tokenizer, conversations) -> list[list[dict]]:
    out = []
    for messages in conversations:
        out.append([])
        for role, body in messages:
            pieces = np.split(body, np.flatnonzero(body == UNK_ID))
            text = "\ufffd".join(tokenizer.decode(p[1:] if k else p) for k, p in enumerate(pieces))
            out[-1].append({"role": role, "content": text})
    return out


def _read_jsonl_messages(path: Path) -> list[list[dict]] | None:
    """The conversations of a ``val.jsonl`` written by prepare; None if it cannot be read as one."""
    try:
        # split on "\n" only: JSON escapes it inside strings, not other line separators such as U+2028
        lines = path.read_text(encoding="utf-8").split("\n")
        conversations = [json.loads(line)["messages"] for line in lines if line]
        if all(isinstance(m, dict) and isinstance(m.get("content"), str) for c in conversations for m in c):
            return [[{"role": m.get("role"), "content": m["content"]} for m in c] for c in conversations]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        pass
    return None


def _same_conversations(tokenizer, original: list[list[dict]], bodies: list) -> bool:
    """True when ``original`` is the text the split's bins were rendered from (same roles, same token ids)."""
    if len(original) != len(bodies):
        return False
    for conversation, messages in zip(original, bodies):
        if [m["role"] for m in conversation] != [role for role, _ in messages]:
            return False
        for m, (_, body) in zip(conversation, messages):
            if not np.array_equal(tokenizer.encode_array(m["content"]), body):
                return False
    return True


def dialogue_pairs(data, split: str = "val", max_pairs: int = 200, seed: int = 0,
                   conversations: list[list[dict]] | None = None) -> list[Pair]:
    """(context -> reference reply) pairs: every assistant turn that answers a user message, with all the
    messages before it; at most ``max_pairs``, chosen with ``seed`` (the same pairs every time).
    ``conversations``: the split's, if already read (:func:`split_messages`)."""
    pairs = []
    for messages in split_messages(data, split) if conversations is None else conversations:
        for k in range(1, len(messages)):
            if messages[k]["role"] == "assistant" and messages[k - 1]["role"] == "user":
                pairs.append(Pair(messages[:k], messages[k]["content"]))
    if len(pairs) > max_pairs:
        chosen = sorted(random.Random(seed).sample(range(len(pairs)), max_pairs))
        pairs = [pairs[i] for i in chosen]
    return pairs


def _session(bot, context: list[dict], sampling: SamplingConfig) -> ChatSession:
    """A chat session holding the messages of ``context`` before its last one (a system message as such)."""
    system = context[0]["content"] if context and context[0]["role"] == "system" else None
    session = ChatSession(bot, system=system, sampling=sampling)
    session.history = [m for m in context[1 if system else 0:-1]]
    return session


def generate_reply(bot, context: list[dict], sampling: SamplingConfig) -> str:
    """The model's reply to ``context`` as ChatSession would give it (same rendering, same history cropping)."""
    return _session(bot, context, sampling).say(context[-1]["content"] or " ").strip()


def _reply_request(bot, context: list[dict], sampling: SamplingConfig):
    """What :func:`generate_reply` runs, as (ids, sampling, stop ids, text decoder): ChatSession.send's prompt
    and options (a chat model: the rendered conversation; plain text: the message continued as a document)."""
    session = _session(bot, context, sampling)
    text = (context[-1]["content"] or " ").strip()
    if not text:
        raise ZaizaiError("empty message; type something to say")
    sampling = replace(sampling, max_new_tokens=session.reply_budget())
    if bot.is_chat_model:
        return session.prompt_ids(text), sampling, {END_ID, EOT_ID}, IncrementalDecoder(bot.tokenizer)
    return (text_ids(bot.tokenizer, text), sampling, {EOT_ID},
            IncrementalDecoder(bot.tokenizer, special_text={EOT_ID: "\n\n"}))


def generate_replies(bot, contexts: list[list[dict]], samplings: list[SamplingConfig], rows: int = GENERATE_ROWS,
                     progress=None) -> list[str]:
    """:func:`generate_reply` for each context with its sampling options, up to ``rows`` at a time in one
    :class:`Batch` (a finished reply's row goes to the next context): the same replies (each has its own
    sampling state and seed; greedy gives the same text), many times faster. ``progress``: a tqdm bar to
    advance by one per finished reply."""
    requests = [_reply_request(bot, c, s) for c, s in zip(contexts, samplings, strict=True)]
    replies: list[str | None] = [None] * len(requests)
    batch = Batch(bot.model, bot.device, rows=max(1, min(rows, len(requests))))
    running: list[tuple[int, object]] = []  # (index, sequence)
    queue = iter(enumerate(requests))
    while True:
        jobs = []  # free rows take the next contexts, their prompts prefilled together
        while len(running) + len(jobs) < rows and (job := next(queue, None)) is not None:
            jobs.append(job)
        seqs = batch.add_many([(ids, sampling, stop_ids) for _, (ids, sampling, stop_ids, _) in jobs])
        running += [(k, seq) for (k, _), seq in zip(jobs, seqs)]
        if not running:
            return replies
        batch.step()
        for k, seq in [item for item in running if item[1].done]:
            running.remove((k, seq))
            if seq.error:
                raise ZaizaiError(seq.error)
            replies[k] = "".join(decode_stream(iter(seq.tokens), requests[k][3])).strip()
            if progress is not None:
                progress.update(1)


def dialogue_metrics(bot, data, split: str = "val", max_pairs: int = 200, seed: int = 0,
                     settings: dict[str, SamplingConfig] | None = None, samples: int = 5,
                     verbose: bool = False, rows: int = GENERATE_ROWS) -> dict[str, Any]:
    """Generate a reply for each held-out pair under each decoding setting, ``rows`` pairs at a time in one
    batch (:func:`generate_replies`); score them."""
    conversations, note = held_out_conversations(data, split)
    pairs = dialogue_pairs(data, split, max_pairs, seed, conversations=conversations)
    if not pairs:
        raise ZaizaiError(f"the {split} split has no user -> assistant exchanges to score")
    settings = settings or {"greedy": GREEDY, "sampled": SAMPLED}
    references = [p.reference for p in pairs]
    results: dict[str, Any] = {"pairs": len(pairs), "pair_seed": seed, "repeat_n": REPEAT_N,
                               "references_from": "token ids" if note else dialogue_text_file(split), "runs": {}}
    if note:
        results["references_note"] = note
    for name, base in settings.items():
        # Seeded per pair: a reply does not depend on which pairs came before it or ran beside it.
        samplings = [base if base.temperature == 0 else replace(base, seed=seed * 1_000_003 + k)
                     for k in range(len(pairs))]
        progress = None
        if verbose:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(pairs), desc=f"生成 generate ({name})", leave=False)
        try:
            replies = generate_replies(bot, [p.context for p in pairs], samplings, rows, progress)
        finally:
            if progress is not None:
                progress.close()
        bleu2, signature2 = bleu(replies, references, 2)
        bleu4, signature4 = bleu(replies, references, 4)
        results["runs"][name] = {
            "decoding": {k: v for k, v in asdict(base).items() if k != "seed"},
            "bleu2": bleu2,
            "bleu4": bleu4,
            "bleu_signature": {"bleu2": signature2, "bleu4": signature4},
            "distinct1": distinct_n(replies, 1),
            "distinct2": distinct_n(replies, 2),
            "avg_reply_chars": float(np.mean([len(r) for r in replies])),
            "repeated_ngram_share": float(np.mean([has_repeated_ngram(r) for r in replies])),
            "samples": [{"context": pairs[k].context, "reference": references[k], "reply": replies[k]}
                        for k in range(min(samples, len(pairs)))],
        }
    results["reference"] = {
        "distinct1": distinct_n(references, 1),
        "distinct2": distinct_n(references, 2),
        "avg_reply_chars": float(np.mean([len(r) for r in references])),
    }
    return results


# --- the whole evaluation -----------------------------------------------------------------------------------


def resolve_data_dir(bot, data_dir: str | Path | None) -> Path:
    """``data_dir``, or the data folder saved in the model's train config; a clear error if it is gone."""
    if data_dir is None:
        saved = bot.train_config.get("data_dir")
        if not saved:
            raise ZaizaiError(f"{bot.path.parent} does not say which data it was trained on; pass --data DATA_DIR")
        data_dir = Path(saved)
        if not data_dir.is_absolute() and not (data_dir / "meta.json").is_file():
            # a relative path is relative to where training ran; try the folders around the model too
            for base in Path(bot.path).resolve().parents:
                if (base / data_dir / "meta.json").is_file():
                    data_dir = base / data_dir
                    break
        if not (data_dir / "meta.json").is_file():
            raise ZaizaiError(f"the model was trained on {data_dir}, which no longer holds prepared data; "
                              "pass --data DATA_DIR (a folder made by `zaizai prepare` with its tokenizer)")
    if not (Path(data_dir) / "meta.json").is_file():
        raise ZaizaiError(f"{data_dir} is not a prepared data folder (no meta.json); run `zaizai prepare` first")
    return Path(data_dir)


def evaluate(out_dir: str | Path, data_dir: str | Path | None = None, *, which: str = "auto",
             device: str = "auto", max_pairs: int = 200, seed: int = 0, dialogue: bool = True,
             batch_size: int = 16, verbose: bool = True, save: bool = True) -> dict[str, Any]:
    """Evaluate the model in ``out_dir`` on the validation split of its data; write ``eval.json``."""

    bot = load(out_dir, which=which, device=device)
    data = TokenData(resolve_data_dir(bot, data_dir))
    say = print if verbose else (lambda *a, **k: None)
    result: dict[str, Any] = {"checkpoint": str(bot.path), "data_dir": str(data.data_dir), "kind": data.kind,
                              "step": bot.state.get("step")}
    result["loss"] = split_loss(bot, data, "val", batch_size)
    say(format_loss(result["loss"]))
    if data.kind == "dialogue" and dialogue:
        if not bot.is_chat_model:
            say("注意 note: the model was trained on plain text; its replies are continuations")
        result["dialogue"] = dialogue_metrics(bot, data, "val", max_pairs, seed, verbose=verbose)
        say(format_dialogue(result["dialogue"]))
    if save:
        path = Path(out_dir) / EVAL_JSON
        atomic_write_text(path, json.dumps(result, ensure_ascii=False, indent=2))
        say(f"已写入 written: {path}")
    return result


def load_eval(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / EVAL_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


# --- printing -----------------------------------------------------------------------------------------------


def format_loss(m: dict) -> str:
    what = f" ({m['loss_on']} targets)" if m.get("loss_on") else ""
    return (f"整个{'验证集' if m['split'] == 'val' else m['split']} whole {m['split']} split{what}: "
            f"{m['tokens']:,} tokens · {m['chars']:,} chars · {m['bytes']:,} bytes\n"
            f"  loss {m['loss']:.4f} nats/token · perplexity {m['perplexity']:.2f} · "
            f"{m['bits_per_char']:.4f} bits/char · {m['bits_per_byte']:.4f} bits/byte")


def format_dialogue(d: dict, max_chars: int = 40) -> str:
    """The dialogue metrics as Markdown (also read in a terminal): a table of the scores, the decoding settings
    and the sacrebleu signature as a list, then a table of sample exchanges; blank lines keep them apart."""
    lines = [f"对话指标 dialogue metrics: {d['pairs']} held-out (context -> reply) pairs (chosen with seed "
             f"{d['pair_seed']})", ""]
    if d.get("references_note"):
        lines += [md_text(d["references_note"]), ""]
    lines += ["| decoding | BLEU-2 | BLEU-4 | distinct-1 | distinct-2 | avg chars | repeated "
              f"{d['repeat_n']}-gram |", "|---|---|---|---|---|---|---|"]
    for name, r in d["runs"].items():
        lines.append(f"| {md_text(name)} | {r['bleu2']:.2f} | {r['bleu4']:.2f} | {r['distinct1']:.3f} | "
                     f"{r['distinct2']:.3f} | {r['avg_reply_chars']:.1f} | {r['repeated_ngram_share']:.1%} |")
    ref = d["reference"]
    lines += [f"| (references) | | | {ref['distinct1']:.3f} | {ref['distinct2']:.3f} | "
              f"{ref['avg_reply_chars']:.1f} | |", ""]
    for name, r in d["runs"].items():
        settings = ", ".join(f"{k}={v}" for k, v in r["decoding"].items())
        lines.append(f"- {md_text(name)}: {md_code(settings)}")
    first = next(iter(d["runs"].values()))
    lines += [f"- sacrebleu signature (max_ngram_order 2 and 4): {md_code(first['bleu_signature']['bleu4'])}", ""]
    lines.append(sample_table(d, max_chars))
    return "\n".join(lines)


# Characters that Markdown reads as syntax inside a line: escaped with a backslash, so text shows as it is.
_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|~&"})


def md_text(text: str) -> str:
    """``text`` as one line of literal Markdown text (line breaks become " / "; safe inside a table cell)."""
    return " / ".join(text.splitlines()).translate(_MD_SPECIAL)


def md_code(text: str) -> str:
    """``text`` as an inline code span, shown exactly (``|`` included; not for table cells, which split at any
    unescaped ``|``)."""
    text = " ".join(text.splitlines())
    fence = "`" * (1 + max(map(len, re.findall("`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _short(text: str, n: int) -> str:
    text = " ".join(text.splitlines())
    return md_text(text if len(text) <= n else text[:n - 1] + "…")


def sample_table(d: dict, max_chars: int = 40) -> str:
    """A markdown table of sample exchanges: the last user message, the reference and each run's reply."""
    names = list(d["runs"])
    lines = ["| 用户 user | 参考 reference | " + " | ".join(md_text(n) for n in names) + " |",
             "|---" * (2 + len(names)) + "|"]
    first = d["runs"][names[0]]["samples"]
    for k, s in enumerate(first):
        replies = [_short(d["runs"][n]["samples"][k]["reply"], max_chars) for n in names]
        lines.append(f"| {_short(s['context'][-1]['content'], max_chars)} | {_short(s['reference'], max_chars)} | "
                     + " | ".join(replies) + " |")
    return "\n".join(lines)
