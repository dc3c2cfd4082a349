"""The vocabulary of an imported Hugging Face GPT-2: read it from the folder and lay it out for zaizai.

zaizai needs ids 0..5 in the roles of its special tokens (document separator, unknown, system, user, assistant,
end of turn). :func:`zaizai_layout` reorders the vocabulary so that tokens it already has in those roles take
those ids (``<|endoftext|>`` or ``[CLS]`` -> 0, ``[UNK]`` -> 1, zaizai's own markers in a model zaizai
exported), roles it lacks get new tokens, and every other token keeps its relative order after them.

Only the keys this module uses are read from tokenizer_config.json / special_tokens_map.json, and each must have
the type transformers gives it (a token's text, or ``{"content": text}``; ``do_lower_case`` a bool).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..common.errors import ZaizaiError
from ..data.tokenizer import SPECIAL_TOKENS, BPETokenizer, HFTokenizer, Tokenizer, tokenizer_type
from .hf_read import ROLE_KEYS, read_source_json, show, source_file


def _roles(src: Path) -> dict[str, Any]:
    """The special roles' texts, ``do_lower_case`` and ``chat_template`` from the folder's tokenizer configs."""
    roles: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if source_file(src, name) is None:
            continue
        for key, value in read_source_json(src, name).items():
            if key in ROLE_KEYS:
                if isinstance(value, dict):
                    value = value.get("content")
                    if not isinstance(value, str):
                        raise ZaizaiError(f"{src / name}: {key} has no text content ({show(value)}); "
                                          "the file is damaged")
                if value is not None and not isinstance(value, str):
                    raise ZaizaiError(f"{src / name}: {key} is {show(value)}, not a token's text; the file is damaged")
                if value is not None:
                    roles[key] = value
            elif key == "do_lower_case":
                if not isinstance(value, bool):
                    raise ZaizaiError(f"{src / name}: do_lower_case is {show(value)}, not true or false")
                roles[key] = value
            elif key == "chat_template":
                roles[key] = value  # only ever compared with zaizai's own template
    return roles


def read_tokenizer(src: Path) -> tuple[Any, dict[str, Any]]:
    """The folder's tokenizer as a ``tokenizers.Tokenizer``, and the texts of its special roles
    (``bos``, ``eos``, ``unk``, ``cls`` ...) and its chat template from tokenizer_config.json."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    roles = _roles(src)
    if (path := source_file(src, "tokenizer.json")) is not None:
        try:
            return RawTokenizer.from_file(str(path)), roles
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
            raise ZaizaiError(f"{path} cannot be read ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if (path := source_file(src, "vocab.txt")) is not None:  # BERT-style WordPiece, as the Chinese GPT-2s have
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError) as e:
            raise ZaizaiError(f"{path} cannot be read as UTF-8 text ({e}); download it again") from None
        vocab = {token: i for i, token in enumerate(lines)}  # a repeated line: the last id wins, as in transformers
        unk = roles.get("unk_token", "[UNK]")
        if unk not in vocab:
            raise ZaizaiError(f"{path} has no {unk} token; is it a BERT vocabulary?")
        tok = RawTokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                    lowercase=roles.get("do_lower_case", True))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        roles.setdefault("cls_token", "[CLS]")
        roles["unk_token"] = unk
    elif (vocab_json := source_file(src, "vocab.json")) and (merges := source_file(src, "merges.txt")):
        try:  # GPT-2's byte-level BPE
            tok = RawTokenizer(models.BPE.from_file(str(vocab_json), str(merges)))
        except Exception as e:  # noqa: BLE001
            raise ZaizaiError(f"{vocab_json} and merges.txt cannot be read ({e}); download them again") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        roles.setdefault("bos_token", "<|endoftext|>")
    else:
        raise ZaizaiError(f"{src} has no tokenizer (tokenizer.json, vocab.txt, or vocab.json + merges.txt); "
                          "copy the model's tokenizer files into the folder")
    specials = [roles.get(k) for k in ROLE_KEYS]
    tok.add_special_tokens([s for s in dict.fromkeys(specials)
                            if isinstance(s, str) and tok.token_to_id(s) is not None])
    return tok, roles


def zaizai_layout(raw: Any, roles: dict[str, Any], rows: int) -> tuple[Tokenizer, list[int]]:
    """Reorder ``raw``'s vocabulary so ids 0..5 hold tokens in zaizai's special roles (module doc); ``rows``:
    the embedding rows on disk, which every id must be below.

    Returns the zaizai tokenizer and ``order``: for each new id, the old id it came from (-1: a new token).
    """
    ids = raw.get_vocab(with_added_tokens=True).values()
    if not ids:
        raise ZaizaiError("the tokenizer has no tokens; copy the model's tokenizer files into the folder")
    size = max(ids) + 1
    if size > rows:  # checked before listing ids one by one: a hostile id of 4e9 would take hours
        raise ZaizaiError(f"the tokenizer has {size} tokens but the model only {rows} embeddings; they do not "
                          "belong together")
    try:
        return _layout(raw, roles, size)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ZaizaiError(f"the tokenizer could not be laid out for zaizai ({type(e).__name__}: {e})") from None


def _layout(raw: Any, roles: dict[str, Any], size: int) -> tuple[Tokenizer, list[int]]:
    from tokenizers import Tokenizer as RawTokenizer

    data = json.loads(raw.to_str())
    old_tokens = [raw.id_to_token(i) for i in range(size)]  # None where no token has the id (never produced)
    old_id = {t: i for i, t in enumerate(old_tokens) if t is not None}

    def first(*candidates) -> int | None:
        for c in candidates:
            if isinstance(c, str) and c in old_id:
                return old_id[c]
        return None

    unk_of_model = (data.get("model") or {}).get("unk_token")
    wanted = [
        first(SPECIAL_TOKENS[0], roles.get("cls_token"), roles.get("bos_token"), roles.get("eos_token")),
        first(SPECIAL_TOKENS[1], unk_of_model, roles.get("unk_token")),
        *(first(name) for name in SPECIAL_TOKENS[2:]),
    ]
    slots: list[int] = []  # old id of each role, -1 for a new token
    for i in wanted:
        slots.append(i if i is not None and i not in slots else -1)
    taken = set(slots)
    order = slots + [i for i in range(size) if i not in taken and old_tokens[i] is not None]
    new_id = {old: new for new, old in enumerate(order) if old >= 0}
    slot_text = [old_tokens[o] if o >= 0 else SPECIAL_TOKENS[k] for k, o in enumerate(slots)]
    if len(set(slot_text)) < len(slot_text) or any(o < 0 and t in old_id for o, t in zip(slots, slot_text)):
        raise ZaizaiError("the tokenizer's special tokens clash with zaizai's markers; it cannot be laid out")

    model = data["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        model["vocab"] = {t: new_id[i] for t, i in vocab.items() if i in new_id}
        for k, o in enumerate(slots):
            if o < 0:
                model["vocab"][slot_text[k]] = k
    elif isinstance(vocab, list) and model.get("type") == "Unigram":  # [piece, score] in id order
        model["vocab"] = [[slot_text[k], 0.0] if o < 0 else vocab[o] for k, o in enumerate(order[:len(slots)])]
        model["vocab"] += [vocab[o] for o in order[len(slots):] if o < len(vocab)]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[model["unk_id"]]
    else:
        raise ZaizaiError(f"a {model.get('type')} tokenizer model is not supported; zaizai imports BPE, "
                          "WordPiece, WordLevel and Unigram vocabularies")
    added = []
    for entry in data.get("added_tokens") or []:
        entry = {**entry, "id": new_id[entry["id"]]}
        if entry["id"] < len(slots):
            entry["special"] = True
        added.append(entry)
    present = {e["id"] for e in added}
    for k, text in enumerate(slot_text):
        if k not in present:
            added.append({"id": k, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True})
    data["added_tokens"] = sorted(added, key=lambda e: e["id"])
    data["post_processor"] = None  # zaizai adds its own separators; never [CLS] ... [SEP] around each text
    data["truncation"] = data["padding"] = None
    try:
        new = RawTokenizer.from_str(json.dumps(data))
    except Exception as e:  # noqa: BLE001
        raise ZaizaiError(f"the tokenizer could not be laid out for zaizai ({e})") from None
    if [new.id_to_token(i) for i in range(len(order))] != [slot_text[k] if k < len(slots) else old_tokens[o]
                                                             for k, o in enumerate(order)]:
        raise ZaizaiError("the tokenizer could not be laid out for zaizai (its ids did not move as planned)")

    kind = tokenizer_type(data)
    return (BPETokenizer(new) if kind == "bpe" else HFTokenizer(new)), order
