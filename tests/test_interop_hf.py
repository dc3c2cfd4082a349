"""Hugging Face interop: `zaizai export --format hf` loads in transformers and computes the same thing;
`zaizai import-hf` brings a local GPT-2 (BERT-style Chinese vocabulary or GPT-2 byte-level BPE) into zaizai."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import zaizai
from zaizai.data.dialogue import render_conversation
from zaizai.common.errors import ZaizaiError
from zaizai.interop.hf import chat_template, export_hf, import_hf
from zaizai.data.tokenizer import END_ID, EOT_ID
from util import TINY, greedy_pair, run_cli, write_corpus, write_pairs


PAIRS = [("你好", "你好，我是崽崽。"), ("今天天气怎么样？", "晴天，适合出去走走。"), ("晚安", "晚安，做个好梦。"),
         ("谢谢", "不客气。"), ("你是谁", "我是崽崽，一个小模型。")] * 8
TEXTS = ["你好", "床前明月光，疑是地上霜。", "Hello, zaizai! 123", "未见过的字：鑫🙂", "<|user|>不是标记", ""]


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    """Small trained models: char and BPE chat gpts, a plain BPE gpt, a plain char gpt without biases, an rnn."""
    tmp = tmp_path_factory.mktemp("hf")
    zaizai.prepare([write_pairs(tmp / "d.jsonl", PAIRS)], tmp / "chat_data", verbose=False)
    zaizai.train(tmp / "chat_data", tmp / "chat", max_iters=60, verbose=False, **{**TINY, "block_size": 32})
    zaizai.prepare([tmp / "d.jsonl"], tmp / "bpechat_data", tokenizer="bpe", vocab_size=300, verbose=False)
    zaizai.train(tmp / "bpechat_data", tmp / "bpechat", max_iters=10, verbose=False, **{**TINY, "block_size": 64})
    corpus = write_corpus(tmp / "corpus.txt")
    zaizai.prepare([corpus], tmp / "bpe_data", tokenizer="bpe", vocab_size=300, verbose=False)
    zaizai.train(tmp / "bpe_data", tmp / "bpe", max_iters=30, verbose=False, **TINY)
    zaizai.prepare([corpus], tmp / "char_data", verbose=False)
    zaizai.train(tmp / "char_data", tmp / "nobias", max_iters=30, bias=False, verbose=False, **TINY)
    zaizai.train(tmp / "char_data", tmp / "rnn", model="rnn", max_iters=2, verbose=False,
                 **{**TINY, "preset": None})
    return tmp


@pytest.mark.parametrize("name", ["chat", "bpe", "nobias"])
def test_exported_model_equals_zaizai_in_transformers(models, name, tmp_path):
    bot = zaizai.load(models / name)
    export_hf(models / name, tmp_path / "hf", verbose=False)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")

    for text in TEXTS[:4]:  # same ids (an unknown character is <|unk|> in both)
        assert tok(text, add_special_tokens=False).input_ids == bot.tokenizer.encode(text)
    ids = ([EOT_ID] + bot.tokenizer.encode("床前明月光，你好"))[: bot.model_config.block_size]
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (hf(x).logits - bot.model(x)[0]).abs().max().item()
    assert diff < 1e-4

    # greedy generation: transformers stops at the eos ids its generation_config names, zaizai at the same
    chat = name == "chat"
    prompt = (render_conversation(bot.tokenizer, [{"role": "user", "content": "你好"}], add_generation_prompt=True)[0]
              if chat else [EOT_ID] + bot.tokenizer.encode("床前"))
    out, ours = greedy_pair(bot, hf, prompt, chat)
    assert out == ours and len(ours) >= 3
    if chat:
        assert tok.decode(out) == "你好，我是崽崽。" == bot.tokenizer.decode(ours)


@pytest.mark.parametrize("name", ["chat", "bpechat"])
def test_chat_template_renders_as_zaizai(models, tmp_path, name):
    bot = zaizai.load(models / name)
    export_hf(models / name, tmp_path / "hf", verbose=False)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversations = [
        [{"role": "user", "content": "你好"}],
        [{"role": "system", "content": "你是崽崽"}, {"role": "user", "content": "你好"},
         {"role": "assistant", "content": "你好。"}, {"role": "user", "content": "今天天气怎么样？"}],
        [{"role": "user", "content": "晚安"}, {"role": "assistant", "content": "晚安，做个好梦。"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            ids, _ = render_conversation(bot.tokenizer, messages, add_generation_prompt=gen)
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert text == bot.tokenizer.decode(ids)
            assert tok(text, add_special_tokens=False).input_ids == ids
    with pytest.raises(Exception, match="roles system, user and assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == [END_ID, EOT_ID]


def test_export_refuses_rnn_and_keeps_existing_folders(models, tmp_path):
    with pytest.raises(ZaizaiError, match="rnn model"):
        export_hf(models / "rnn", tmp_path / "x", verbose=False)
    assert not (tmp_path / "x").exists()
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    r = run_cli("export", models / "bpe", "--format", "hf", "--to", target)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert (target / "mine.txt").read_text() == "keep me"
    r = run_cli("export", models / "bpe", "--format", "hf", "--to", target, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (target / "mine.txt").exists() and (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


@pytest.mark.parametrize("name", ["chat", "bpe"])
def test_the_exported_readme_snippet_runs(models, tmp_path, name):
    import contextlib
    import io
    import re

    export_hf(models / name, tmp_path / "hf", verbose=False)
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    folder = str(tmp_path / "hf")
    code, n = re.subn(r"^PATH = .*$", f"PATH = {folder!r}", code, flags=re.M)  # the placeholder -> this folder
    assert n == 1
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    reply = printed.getvalue().strip()
    if name == "chat":  # greedy: the reply it was trained on, the new tokens only, without special tokens
        assert reply == "你好，我是崽崽。"
    else:
        assert reply and "<|" not in reply and not reply.startswith("床前明月光")


# ---------------------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------------------

BERT_VOCAB = (["[PAD]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
              + list("，。！？的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你会生天好明月光床前")
              + ["hello", "world", "##s", "zai", "##zai", "好"])  # a repeated line, as some vocab.txt files have


def _random_gpt2(folder: Path, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)  # safetensors
    return model


@pytest.fixture(scope="module")
def bert_gpt2(tmp_path_factory, one_thread):
    """A random GPT-2 with a BERT-style Chinese vocabulary (vocab.txt), as the Chinese GPT-2 checkpoints
    have, and three padding rows in its embedding that no token maps to."""
    folder = tmp_path_factory.mktemp("bert") / "gpt2-chinese"
    model = _random_gpt2(folder, len(BERT_VOCAB) + 3)
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    (folder / "tokenizer.json").unlink()  # as the checkpoints ship: vocab.txt and its config only
    return folder, model, transformers.BertTokenizerFast.from_pretrained(folder)


def test_import_bert_vocabulary_gpt2_computes_the_same(bert_gpt2, tmp_path):
    folder, hf, hf_tok = bert_gpt2
    import_hf(folder, tmp_path / "z", verbose=False)
    bot = zaizai.load(tmp_path / "z")
    tok = bot.tokenizer
    assert tok.type == "hf" and [tok.hf.id_to_token(i) for i in range(2)] == ["[CLS]", "[UNK]"]
    old_of_new = {i: hf_tok.convert_tokens_to_ids(tok.hf.id_to_token(i)) for i in range(tok.vocab_size)}
    text = "床前明月光，你好 hello worlds 鑫"
    old_ids = hf_tok(text, add_special_tokens=False).input_ids
    assert [old_of_new[i] for i in tok.encode(text)] == old_ids
    assert tok.unknown_chars(text) == ["鑫"]
    assert tok.decode(tok.encode("床前明月光，你好")) == "床前明月光，你好"  # no spaces between Chinese

    new_ids = [0] + tok.encode(text)  # [CLS] opens a text, as in the checkpoints' pre-training
    with torch.no_grad():
        ours = bot.model(torch.tensor([new_ids]))[0][0]
        theirs = hf(torch.tensor([[hf_tok.cls_token_id] + old_ids])).logits[0]
    known = [i for i in range(tok.vocab_size) if tok.hf.id_to_token(i) in hf_tok.get_vocab()]
    assert len(known) == len(set(BERT_VOCAB))  # 4 new markers; 3 padding rows and the repeat's first row dropped
    diff = (ours[:, known] - theirs[:, [old_of_new[i] for i in known]]).abs().max().item()
    assert diff < 1e-4

    # it samples and chats (completion mode: it has not seen zaizai's turn markers yet)
    assert isinstance(bot.generate("今天", max_new_tokens=5, seed=1), str)
    r = run_cli("chat", tmp_path / "z", "--message", "你好", "--max-new-tokens", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "completion" in r.stderr


def test_import_reads_sharded_weights_and_replaces_only_with_overwrite(bert_gpt2, tmp_path):
    folder, hf, _ = bert_gpt2
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="50KB")  # model-0000k-of-0000n.safetensors + index
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            (sharded / name).write_bytes((folder / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    import_hf(folder, tmp_path / "one", verbose=False)
    r = run_cli("import-hf", sharded, "--out", tmp_path / "one")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = run_cli("import-hf", sharded, "--out", tmp_path / "one", "--overwrite")
    assert r.returncode == 0, r.stderr
    a = zaizai.load(tmp_path / "one")
    assert a.state["imported_from"] == "sharded"  # replaced by the sharded import; only the folder's name is kept
    import_hf(folder, tmp_path / "two", verbose=False)
    b = zaizai.load(tmp_path / "two")
    assert all(torch.equal(t, b.model.state_dict()[k]) for k, t in a.model.state_dict().items())


def test_imported_model_fine_tunes_on_dialogues_and_chats(bert_gpt2, tmp_path):
    folder, _, _ = bert_gpt2
    import_hf(folder, tmp_path / "base", verbose=False)
    zaizai.prepare([write_pairs(tmp_path / "d.jsonl", PAIRS)], tmp_path / "sft", tokenizer=tmp_path / "base",
                   verbose=False)
    result = zaizai.train(tmp_path / "sft", tmp_path / "chat", init_from=str(tmp_path / "base"), max_iters=40,
                          lr=3e-3, batch_size=8, eval_interval=20, eval_iters=2, warmup_iters=2, threads=1,
                          verbose=False)
    evals = [json.loads(line) for line in (tmp_path / "chat" / "metrics.jsonl").read_text().splitlines()]
    assert result.step == 40 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    bot = zaizai.load(tmp_path / "chat")
    assert bot.is_chat_model and bot.model_config.n_embd == 32
    r = run_cli("chat", tmp_path / "chat", "--message", "你好", "--temperature", "0", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert "completion" not in r.stderr


def test_import_gpt2_byte_level_bpe(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, zaizai says hello", "床前明月光，疑是地上霜"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    folder = tmp_path / "gpt2"
    folder.mkdir()
    bpe.save_model(str(folder))  # vocab.json + merges.txt, GPT-2's own files
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(folder)
    hf = _random_gpt2(folder, hf_tok.vocab_size, seed=1)
    import_hf(folder, tmp_path / "z", verbose=False)
    bot = zaizai.load(tmp_path / "z")
    assert bot.tokenizer.type == "bpe" and bot.tokenizer.hf.id_to_token(0) == "<|endoftext|>"
    old_of_new = {i: hf_tok.convert_tokens_to_ids(bot.tokenizer.hf.id_to_token(i)) for i in range(6, bot.tokenizer.vocab_size)}
    old_of_new[0] = hf_tok.convert_tokens_to_ids("<|endoftext|>")
    for text in ["hello world", "床前明月光", "🙂 new"]:
        ids = bot.tokenizer.encode(text)
        assert [old_of_new[i] for i in ids] == hf_tok(text).input_ids
        assert bot.tokenizer.decode(ids) == text
    ids = [0] + bot.tokenizer.encode("hello 床前")
    with torch.no_grad():
        ours = bot.model(torch.tensor([ids]))[0][0]
        theirs = hf(torch.tensor([[old_of_new[i] for i in ids]])).logits[0]
    cols = sorted(old_of_new)
    assert (ours[:, cols] - theirs[:, [old_of_new[i] for i in cols]]).abs().max().item() < 1e-4


def test_export_then_import_is_the_same_chat_model(models, tmp_path):
    export_hf(models / "chat", tmp_path / "hf", verbose=False)
    import_hf(tmp_path / "hf", tmp_path / "back", verbose=False)
    a, b = zaizai.load(models / "chat"), zaizai.load(tmp_path / "back")
    assert b.is_chat_model
    assert all(torch.equal(t, b.model.state_dict()[k]) for k, t in a.model.state_dict().items())
    assert b.tokenizer.encode("床前明月光，鑫") == a.tokenizer.encode("床前明月光，鑫")
    r = run_cli("chat", tmp_path / "back", "--message", "你好", "--temperature", "0")
    assert r.returncode == 0 and "你好，我是崽崽。" in r.stdout, r.stderr


def test_export_then_import_keeps_a_plain_model_plain(models, tmp_path):
    """Only a chat model's export has the chat template; import-hf reads a model as chat only from it."""
    export_hf(models / "bpe", tmp_path / "hf", verbose=False)
    assert "chat_template" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text("utf-8"))
    import_hf(tmp_path / "hf", tmp_path / "back", verbose=False)
    assert not zaizai.load(tmp_path / "back").is_chat_model
    # a plain model an older zaizai exported with the template (eos <|endoftext|>) comes back plain too
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text("utf-8"))
    config["chat_template"] = chat_template()  # zaizai's markers, as every zaizai export has
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    import_hf(tmp_path / "hf", tmp_path / "back2", verbose=False)
    assert not zaizai.load(tmp_path / "back2").is_chat_model


@pytest.mark.parametrize("damage, message", [
    ("pickle", "never loads"),
    ("model_type", "import-hf reads GPT-2"),
    ("activation", "activation_function 'relu'"),
    ("no_tokenizer", "has no tokenizer"),
    ("truncated", "truncated"),
])
def test_import_refuses_what_it_cannot_use(bert_gpt2, tmp_path, damage, message):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(bert_gpt2[0], src)
    config = json.loads((src / "config.json").read_text())
    if damage == "pickle":
        (src / "model.safetensors").rename(src / "pytorch_model.bin")
    elif damage == "model_type":
        config["model_type"] = "bert"
    elif damage == "activation":
        config["activation_function"] = "relu"
    elif damage == "no_tokenizer":
        (src / "vocab.txt").unlink()
    elif damage == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    (src / "config.json").write_text(json.dumps(config))
    r = run_cli("import-hf", src, "--out", tmp_path / "out")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
