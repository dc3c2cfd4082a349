"""Evaluation: whole-split loss and its conversions, BLEU / distinct-n on worked examples, dialogue metrics,
the report card, the attention picture, the model comparison and the CLI's errors."""

import json
import math

import pytest

import zaizai
from zaizai.data.tokendata import TokenData
from zaizai.common.errors import ZaizaiError
from zaizai.evals.evaluation import (GREEDY, SAMPLED, bleu, dialogue_metrics, dialogue_pairs, distinct_n, evaluate,
                                    format_dialogue, generate_replies, generate_reply, has_repeated_ngram,
                                    held_out_conversations, load_eval, split_messages, split_sizes)
from util import TINY, prepared, run_cli
from test_chat import write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    data = prepared(tmp)
    zaizai.train(data, tmp / "out", max_iters=20, verbose=False, **TINY)
    return tmp / "out", data


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    zaizai.prepare([write_jsonl(tmp / "chat.jsonl")], tmp / "data", val_fraction=0.3, seed=0, verbose=False)
    zaizai.train(tmp / "data", tmp / "out", max_iters=40, verbose=False, **dict(TINY, block_size=32, lr=1e-2))
    return tmp / "out", tmp / "data"


# --- text metrics -------------------------------------------------------------------------------------------


def test_bleu_of_a_reply_equal_to_its_reference_is_100():
    refs = ["今天天气很好，我们去公园吧。", "我是崽崽，很高兴认识你。"]
    for order in (2, 4):
        score, signature = bleu(refs, refs, order)
        assert score == pytest.approx(100.0)
        assert "tok:zh" in signature


def test_bleu_worked_examples():
    # hypothesis longer than the reference: no brevity penalty; 1-grams 4/7, 2-grams 3/6 match
    score, _ = bleu(["我爱北京天安门"], ["我爱北京"], 2)
    assert score == pytest.approx(100 * math.sqrt(4 / 7 * 3 / 6), abs=1e-6)
    # hypothesis shorter: every n-gram matches, brevity penalty exp(1 - 7/4)
    score, _ = bleu(["我爱北京"], ["我爱北京天安门"], 2)
    assert score == pytest.approx(100 * math.exp(1 - 7 / 4), abs=1e-6)
    score, _ = bleu(["完全不同"], ["我爱北京"], 4)
    assert score == 0.0


def test_distinct_n_on_known_lists():
    assert distinct_n(["ab", "ab"], 1) == 0.5
    assert distinct_n(["ab", "ab"], 2) == 0.5
    assert distinct_n(["你好你好"], 1) == 0.5
    assert distinct_n(["你好你好"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["你好", "我是崽崽"], 1) == pytest.approx(5 / 6)
    assert distinct_n([], 2) == 0.0 and distinct_n(["一"], 2) == 0.0
    assert has_repeated_ngram("哈哈哈哈", 3) and not has_repeated_ngram("床前明月光", 3)


# --- whole-split loss ---------------------------------------------------------------------------------------


def test_eval_numbers_are_consistent(plain_model):
    out, data = plain_model
    result = evaluate(out, verbose=False)
    m = result["loss"]
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))["splits"]["val"]
    assert m["tokens"] == meta["tokens"] and m["chars"] == meta["chars"]
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert m["bits_per_char"] == pytest.approx(m["loss"] / math.log(2) * m["tokens"] / m["chars"])
    # the corpus is CJK (3 bytes) and punctuation, with one-byte document separators
    assert 2 * m["chars"] < m["bytes"] <= 3 * m["chars"]
    assert m["bits_per_byte"] == pytest.approx(m["loss"] * m["tokens"] / math.log(2) / m["bytes"])
    assert 0 < m["loss"] < math.log(TokenData(data).tokenizer.vocab_size) + 1
    assert load_eval(out)["loss"]["loss"] == pytest.approx(m["loss"])
    assert "dialogue" not in result


def test_split_sizes_of_dialogues_match_the_meta(chat_model):
    _, data_dir = chat_model
    data = TokenData(data_dir)
    info = data.meta["splits"]["val"]
    sizes = split_sizes(data, "val", "assistant")
    assert (sizes["tokens"], sizes["chars"]) == (info["assistant_tokens"], info["assistant_chars"])
    sizes = split_sizes(data, "val", "all")
    assert (sizes["tokens"], sizes["chars"]) == (info["loss_tokens"], info["chars"])


def test_pairs_come_from_the_held_out_dialogues(chat_model):
    _, data_dir = chat_model
    data = TokenData(data_dir)
    conversations = split_messages(data, "val")
    assert len(conversations) == data.meta["splits"]["val"]["dialogues"]
    assert all(m["role"] in ("user", "assistant") and m["content"] for c in conversations for m in c)
    pairs = dialogue_pairs(data, "val", max_pairs=1000)
    assert all(p.context[-1]["role"] == "user" for p in pairs)
    assert {p.reference for p in pairs} <= {"你好，我是崽崽。", "我会聊天。", "早上好！", "我是崽崽。", "再见！",
                                            "晚安，做个好梦。"}
    few = dialogue_pairs(data, "val", max_pairs=3, seed=1)
    assert len(few) == 3 and few == dialogue_pairs(data, "val", max_pairs=3, seed=1)


def test_dialogue_metrics_and_report(chat_model):
    out, _ = chat_model
    result = evaluate(out, max_pairs=6, verbose=False)
    d = result["dialogue"]
    assert d["pairs"] == 6 and set(d["runs"]) == {"greedy", "sampled"}
    for run in d["runs"].values():
        assert 0 <= run["bleu4"] <= run["bleu2"] + 1e-9 <= 100
        assert 0 <= run["distinct1"] <= 1 and 0 <= run["distinct2"] <= 1
        assert "tok:zh" in run["bleu_signature"]["bleu4"]
        assert run["samples"] and run["samples"][0]["reference"]
    assert d["runs"]["greedy"]["decoding"]["temperature"] == 0.0
    assert d["runs"]["sampled"]["decoding"]["top_p"] == 0.9
    # seeded: the same numbers again
    again = evaluate(out, max_pairs=6, verbose=False, save=False)["dialogue"]
    assert again["runs"]["sampled"]["bleu2"] == d["runs"]["sampled"]["bleu2"]

    from zaizai.evals.report import write_report

    report = write_report(out, verbose=False)
    text = report.read_text(encoding="utf-8")
    for needle in ("参数 parameters", "tokens seen", "bits/char", "bits/byte", "BLEU-2", "loss.png", "崽崽:"):
        assert needle in text
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)


def _markdown_tables(text):
    """Each table of ``text`` parsed as CommonMark + GFM tables: (header cells, body rows), as rendered text."""
    from markdown_it import MarkdownIt

    tables, rows, row, in_cell = [], None, None, False
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        if token.type == "table_open":
            rows = []
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close":
            rows.append(row)
        elif token.type == "table_close":
            tables.append((rows[0], rows[1:]))
            rows = None
        elif token.type == "inline" and rows is not None:
            row.append("".join(child.content for child in token.children
                               if child.type in ("text", "code_inline")))
    return tables


def _dialogue_results(reply, reference, context):
    """A dialogue-metrics dict as eval.json holds it, with one sample exchange."""
    sample = {"context": [{"role": "user", "content": context}], "reference": reference, "reply": reply}
    run = {"decoding": {"max_new_tokens": 64, "temperature": 0.0}, "bleu2": 1.0, "bleu4": 0.5, "distinct1": 0.5,
           "distinct2": 0.5, "avg_reply_chars": 3.0, "repeated_ngram_share": 0.0, "samples": [sample],
           "bleu_signature": {"bleu2": "nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:2.4.0",
                              "bleu4": "nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:2.4.0"}}
    return {"pairs": 1, "pair_seed": 0, "repeat_n": 3, "runs": {"greedy": run, "sampled": dict(run)},
            "reference": {"distinct1": 0.5, "distinct2": 0.5, "avg_reply_chars": 3.0}}


def test_dialogue_metrics_are_markdown_whose_cells_show_the_text_as_it_is():
    from markdown_it import MarkdownIt

    reply, reference, context = "a|b *星* `c` <br> \\|", "你好|再见_x_", "问\n行 [x](y)"
    text = format_dialogue(_dialogue_results(reply, reference, context))
    (header, rows), (sample_header, samples) = _markdown_tables(text)
    assert header == ["decoding", "BLEU-2", "BLEU-4", "distinct-1", "distinct-2", "avg chars", "repeated 3-gram"]
    assert [r[0] for r in rows] == ["greedy", "sampled", "(references)"] and all(len(r) == 7 for r in rows)
    assert sample_header == ["用户 user", "参考 reference", "greedy", "sampled"]
    assert samples == [["问 行 [x](y)", reference, reply, reply]]  # one row, every cell the text itself
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert "<code>nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:2.4.0</code>" in html


def test_report_is_markdown_with_tables_lists_and_the_signature_intact(chat_model):
    from markdown_it import MarkdownIt

    from zaizai.evals.report import write_report

    out, _ = chat_model
    text = write_report(out, max_pairs=6, verbose=False).read_text(encoding="utf-8")
    signature = load_eval(out)["dialogue"]["runs"]["greedy"]["bleu_signature"]["bleu4"]
    tables = _markdown_tables(text)
    headers = [header for header, _ in tables]
    assert headers[0] == ["split", "tokens", "chars", "documents / dialogues", "unknown"]
    assert headers[1] == ["loss (nats/token)", "perplexity", "bits/char", "bits/byte"]
    header, rows = tables[2]
    assert header[:3] == ["decoding", "BLEU-2", "BLEU-4"] and len(header) == 7
    assert [r[0] for r in rows] == ["greedy", "sampled", "(references)"] and all(len(r) == 7 for r in rows)
    assert headers[3] == ["用户 user", "参考 reference", "greedy", "sampled"] and len(tables) == 4
    cells = [cell for _, body in tables for row in body for cell in row]
    # the sampling settings and the signature are not table rows
    assert not any("max_new_tokens" in c or "nrefs" in c or "sacrebleu" in c for c in cells)
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert "|" in signature and f"<code>{signature}</code>" in html
    assert "<code>max_new_tokens=64, temperature=0.0" in html
    assert html.count("<li>你 you:") == 3  # the chat samples are a list


def _contexts(data_dir):
    """The held-out pairs' contexts, and a few with a system message and earlier turns (a cropped history)."""
    contexts = [p.context for p in dialogue_pairs(TokenData(data_dir), "val", max_pairs=1000)]
    long = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，我是崽崽。"}] * 3
    contexts += [[{"role": "system", "content": "你是崽崽"}, {"role": "user", "content": "早上好"}],
                 long + [{"role": "user", "content": "再见"}], [{"role": "user", "content": "晚安"}]]
    return contexts


@pytest.mark.parametrize("model", ["chat_model", "plain_model"])
def test_replies_generated_in_a_batch_equal_those_generated_one_at_a_time(model, request, chat_model):
    """Eval's batched generation (rows joining as others finish) gives each pair the reply the one-at-a-time
    path (ChatSession) gives: greedy, and sampled with each pair's own seed; chat and plain-text models."""
    from dataclasses import replace

    from zaizai.inference.loaded import load

    bot = load(request.getfixturevalue(model)[0], device="cpu")
    contexts = _contexts(chat_model[1])  # the plain-text model continues each message as a document
    assert len(contexts) > 4
    for samplings in ([GREEDY] * len(contexts), [replace(SAMPLED, seed=k) for k in range(len(contexts))]):
        alone = [generate_reply(bot, c, s) for c, s in zip(contexts, samplings)]
        ticks = []
        progress = type("Bar", (), {"update": lambda self, n: ticks.append(n)})()
        assert generate_replies(bot, contexts, samplings, rows=4, progress=progress) == alone
        assert len(ticks) == len(contexts) and len(set(alone)) > 1


def _unseen_character_data(tmp_path):
    """Dialogue data whose validation reply holds a character (龘) that the training dialogues do not."""
    train = [["你好", "你好，我是崽崽。"], ["你是谁", "我是崽崽。"], ["再见", "再见！"]] * 4
    valid = [["你好", "我是龘龘。"], ["再见", "龘再见！"]]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"train": train, "valid": valid}, ensure_ascii=False), encoding="utf-8")
    zaizai.prepare([path], tmp_path / "data", verbose=False)
    return TokenData(tmp_path / "data"), valid


def test_references_are_the_original_text_of_unseen_characters(tmp_path, monkeypatch):
    import zaizai.evals.evaluation as evaluation

    data, valid = _unseen_character_data(tmp_path)
    assert data.meta["splits"]["val"]["unknown"] == 3
    assert split_messages(data, "val") == [[{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                                           for u, a in valid]
    # a model that answers with the original reference scores 100, and the reference is shown as it is
    answers = dict(valid)
    monkeypatch.setattr(evaluation, "generate_replies",
                        lambda bot, contexts, samplings, rows, progress: [answers[c[-1]["content"]] for c in contexts])
    d = dialogue_metrics(None, data, "val")
    assert d["references_from"] == "val.jsonl" and "references_note" not in d
    for run in d["runs"].values():
        assert run["bleu2"] == pytest.approx(100.0) and run["bleu4"] == pytest.approx(100.0)
        assert [s["reference"] for s in run["samples"]] == [a for _, a in valid]
    assert "龘" in format_dialogue(d) and "\ufffd" not in format_dialogue(d)


def test_folders_without_the_original_text_fall_back_to_the_token_ids_with_a_note(tmp_path):
    data, valid = _unseen_character_data(tmp_path)
    text_file = data.data_dir / "val.jsonl"
    original = text_file.read_text(encoding="utf-8")
    text_file.write_text(original.replace("龘再见", "再见"), encoding="utf-8")  # not what the bins hold
    conversations, note = held_out_conversations(data, "val")
    assert "does not match" in note and conversations[1][1]["content"] == "\ufffd再见！"
    text_file.unlink()  # prepared by an older zaizai
    conversations, note = held_out_conversations(data, "val")
    assert "val.jsonl" in note and "zaizai prepare" in note and "\n" not in note
    assert [m["content"] for m in conversations[0]] == ["你好", "我是\ufffd\ufffd。"]


def test_report_evaluates_when_there_is_no_eval_json(plain_model, tmp_path):
    import shutil

    out, _ = plain_model
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "eval.json").unlink(missing_ok=True)
    r = run_cli("report", copy)
    assert r.returncode == 0, r.stderr
    assert (copy / "eval.json").is_file()
    text = (copy / "report.md").read_text(encoding="utf-8")
    assert "perplexity" in text and "Continuations" in text


# --- attention ----------------------------------------------------------------------------------------------


def test_attention_weights_are_causal_distributions(plain_model):
    import torch

    from zaizai.evals.attention import attention_weights

    out, _ = plain_model
    bot = zaizai.load(out, device="cpu")
    w = attention_weights(bot.model, [0] + bot.tokenizer.encode("床前明月光"))
    assert w.shape == (TINY["n_layer"], TINY["n_head"], 6, 6)
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5)
    assert torch.all(w.triu(1) == 0)


def test_attention_picture_is_a_png(plain_model, tmp_path):
    from zaizai.evals.attention import find_cjk_font

    try:
        find_cjk_font()
    except ZaizaiError as e:
        pytest.skip(f"no CJK font on this machine ({e}); `make test` installs fonts-noto-cjk where it can")
    out, _ = plain_model
    png = tmp_path / "att.png"
    r = run_cli("attention", out, "--text", "你好，我是崽崽", "--png", png)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes().startswith(PNG_MAGIC)
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 100 and width > 100


# --- compare and CLI errors ---------------------------------------------------------------------------------


def test_compare_trains_each_model_and_plots(tmp_path):
    from zaizai.evals.compare import compare, format_table

    data = prepared(tmp_path)
    rows = compare(data, tmp_path / "cmp", max_time=1.0, models=("bigram", "gpt"), verbose=False, threads=1,
                   n_layer=1, n_embd=32, n_head=2, block_size=16, eval_interval=5, eval_iters=2)
    assert [r["model"] for r in rows] == ["bigram", "gpt"]
    for r in rows:
        assert r["steps"] > 0 and r["bits_per_char"] > 0 and (tmp_path / "cmp" / f"compare-{r['model']}").is_dir()
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(PNG_MAGIC)
    assert "bits/char" in format_table(rows)


def test_cli_errors(plain_model, tmp_path):
    import shutil

    out, data = plain_model
    r = run_cli("eval", tmp_path / "nothing")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_cli("eval", out, "--data", tmp_path)
    assert r.returncode == 2 and "meta.json" in r.stderr
    # a bigram model whose data folder is gone afterwards
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    zaizai.train(copy, tmp_path / "bigram", max_iters=2, verbose=False, **dict(TINY, model="bigram"))
    shutil.rmtree(copy)
    r = run_cli("eval", tmp_path / "bigram")
    assert r.returncode == 2 and "no longer holds prepared data" in r.stderr and "--data" in r.stderr
    r = run_cli("eval", tmp_path / "bigram", "--data", data)
    assert r.returncode == 0, r.stderr
    r = run_cli("attention", tmp_path / "bigram", "--text", "你好")
    assert r.returncode == 2 and "gpt" in r.stderr
