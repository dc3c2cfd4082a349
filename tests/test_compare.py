"""`zaizai compare`: each model scored at its best checkpoint, and described by the shape it really has."""

import pytest

import zaizai
from util import TINY, prepared
from zaizai.data.tokendata import TokenData
from zaizai.evals.compare import compare
from zaizai.evals.evaluation import split_loss


def test_each_model_is_scored_on_its_best_checkpoint(tmp_path):
    data = prepared(tmp_path)
    options = {k: v for k, v in TINY.items() if k != "batch_size"}
    rows = compare(data, tmp_path / "cmp", max_time=1.5, models=("bigram", "gpt"), verbose=False,
                   **options)
    for row in rows:
        best = zaizai.load(row["out_dir"], which="best")
        expected = split_loss(best, TokenData(data), "val")
        assert row["val_loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert row["bits_per_char"] == pytest.approx(expected["bits_per_char"], rel=1e-6)


def test_a_bigram_run_is_not_described_with_layers_it_does_not_have(tmp_path, capsys):
    data = prepared(tmp_path)
    zaizai.train(data, tmp_path / "bigram", model="bigram", max_iters=2, **TINY)
    model_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("模型 model"))
    assert "vocab x vocab table" in model_line and "layers" not in model_line and "n_embd" not in model_line


def test_attention_labels_show_unknown_characters_apart_and_say_what_symbols_mean():
    from zaizai.data.tokenizer import EOT_ID, CharTokenizer
    from zaizai.evals.attention import label_key, token_labels

    tok = CharTokenizer.from_text("你好 \n")
    assert token_labels(tok, [EOT_ID] + tok.encode("你好 \n")) == ["⏎", "你", "好", "␣", "\\n"]
    labels = token_labels(tok, [EOT_ID] + tok.encode("你龘龘"))
    assert labels == ["⏎", "你", "□", "□"]
    assert label_key(labels) == "⏎ 文档开头 start · □ 词表外 unknown"


def test_report_asks_a_traditional_chinese_model_in_traditional_chinese():
    from zaizai.data.tokenizer import CharTokenizer
    from zaizai.evals.report import CHAT_QUESTIONS, chat_questions

    traditional = CharTokenizer.from_text("你好，我是崽崽。你是誰？我喜歡什麼都聊。")
    simplified = CharTokenizer.from_text("你好，我是崽崽。你是谁？我喜欢什么都聊。")
    assert chat_questions(traditional) == CHAT_QUESTIONS["traditional"]
    assert chat_questions(simplified) == CHAT_QUESTIONS["simplified"]
