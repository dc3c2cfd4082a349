"""The modern (Qwen3-style) model to and from other tools: `export --format hf` is a Qwen3ForCausalLM (a
LlamaForCausalLM without QK-norm) that transformers runs like zaizai, `--format gguf` llama.cpp's qwen3 (llama)
that llama-cpp-python runs like zaizai, and `import-hf` brings a local Qwen3 or Llama into zaizai."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from util import TINY, greedy_pair, run_cli, write_corpus, write_pairs

import zaizai
from zaizai.common.errors import ZaizaiError
from zaizai.data.dialogue import render_conversation
from zaizai.data.tokenizer import END_ID, EOT_ID
from zaizai.inference.sampling import SamplingConfig
from zaizai.interop import hf
from zaizai.interop.gguf import export_gguf
from zaizai.interop.hf import export_hf, import_hf
from zaizai.models.modern import swiglu_hidden

PAIRS = [("你好", "你好，我是崽崽。"), ("今天天气怎么样？", "晴天，适合出去走走。"), ("晚安", "晚安，做个好梦。"),
         ("谢谢", "不客气。"), ("你是谁", "我是崽崽，一个小模型。")] * 8
MODERN = dict(TINY, model="modern", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, preset=None)


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    """Small trained modern models: a char chat model (GQA, rope_theta 500), a plain BPE one with an untied
    output layer, and a Llama-style one (no QK-norm, eps 1e-5)."""
    tmp = tmp_path_factory.mktemp("modern")
    zaizai.prepare([write_pairs(tmp / "d.jsonl", PAIRS)], tmp / "chat_data", verbose=False)
    zaizai.train(tmp / "chat_data", tmp / "chat", max_iters=80, rope_theta=500.0, verbose=False, **MODERN)
    corpus = write_corpus(tmp / "corpus.txt")
    zaizai.prepare([corpus], tmp / "bpe_data", tokenizer="bpe", vocab_size=300, verbose=False)
    zaizai.train(tmp / "bpe_data", tmp / "bpe", max_iters=40, tie_embeddings=False, verbose=False, **MODERN)
    zaizai.prepare([corpus], tmp / "char_data", verbose=False)
    zaizai.train(tmp / "char_data", tmp / "llama", max_iters=40, qk_norm=False, rms_norm_eps=1e-5,
                 verbose=False, **{**MODERN, "n_kv_head": 0})
    return tmp


def _greedy(bot, ids, n, stop):
    return list(bot.stream_ids(ids, SamplingConfig(temperature=0.0, max_new_tokens=n), stop_ids=stop))


def _prompt(bot, chat: bool) -> list[int]:
    if chat:
        return render_conversation(bot.tokenizer, [{"role": "user", "content": "你好"}], add_generation_prompt=True)[0]
    return [EOT_ID] + bot.tokenizer.encode("床前")


# -- export to transformers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, arch", [("chat", "Qwen3ForCausalLM"), ("bpe", "Qwen3ForCausalLM"),
                                        ("llama", "LlamaForCausalLM")])
def test_exported_modern_model_equals_zaizai_in_transformers(models, tmp_path, monkeypatch, name, arch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bot = zaizai.load(models / name)
    c = bot.model_config
    export_hf(models / name, tmp_path / "hf", verbose=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == arch
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["head_dim"], config["tie_word_embeddings"]) == \
        (c.kv_heads, c.n_embd // c.n_head, c.tie_embeddings)
    assert model.config.rope_parameters["rope_theta"] == c.rope_theta and model.config.rms_norm_eps == c.rms_norm_eps

    for text in ["你好", "床前明月光，疑是地上霜。", "未见过的字：鑫"]:
        assert tok(text, add_special_tokens=False).input_ids == bot.tokenizer.encode(text)
    ids = ([EOT_ID] + bot.tokenizer.encode("床前明月光，你好，今天天气怎么样？"))[: c.block_size]
    with torch.no_grad():
        assert (model(torch.tensor([ids])).logits - bot.model(torch.tensor([ids]))[0]).abs().max().item() < 1e-4

    chat = bot.is_chat_model
    prompt = _prompt(bot, chat)
    out, ours = greedy_pair(bot, model, prompt, chat)
    assert out == ours and len(ours) >= 3


@pytest.mark.parametrize("name", ["chat", "llama"])
def test_the_exported_readme_snippet_runs(models, tmp_path, name):
    export_hf(models / name, tmp_path / "hf", verbose=False)
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "AutoModelForCausalLM" in card and "GPT2" not in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code, n = re.subn(r"^PATH = .*$", f"PATH = {str(tmp_path / 'hf')!r}", code, flags=re.M)
    assert n == 1
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    bot = zaizai.load(models / name)
    chat = bot.is_chat_model
    prompt = _prompt(bot, chat) if chat else [EOT_ID] + bot.tokenizer.encode("床前明月光")  # the card's prompt
    ours = _greedy(bot, prompt, min(50, bot.model_config.block_size - len(prompt)), {END_ID, EOT_ID})
    assert printed.getvalue().strip() == bot.tokenizer.decode(ours).strip()


def test_export_then_import_is_the_same_modern_model(models, tmp_path):
    for name in ("chat", "bpe", "llama"):
        export_hf(models / name, tmp_path / f"hf-{name}", verbose=False)
        import_hf(tmp_path / f"hf-{name}", tmp_path / f"back-{name}", verbose=False)
        a, b = zaizai.load(models / name), zaizai.load(tmp_path / f"back-{name}")
        assert b.is_chat_model == a.is_chat_model == (name == "chat")  # a plain model stays plain
        same = {**a.model_config.to_dict(), "bias": False, "ffn_hidden": swiglu_hidden(a.model_config)}
        assert b.model_config.to_dict() == same  # what modern ignores or derives, written out
        assert all(torch.equal(t, b.model.state_dict()[k]) for k, t in a.model.state_dict().items())
        assert b.tokenizer.encode("床前明月光，鑫") == a.tokenizer.encode("床前明月光，鑫")


# -- export to GGUF ------------------------------------------------------------------------------------------


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("name, arch", [("chat", "qwen3"), ("bpe", "qwen3"), ("llama", "llama")])
def test_gguf_metadata_and_tensors(models, tmp_path, name, arch):
    fields, tensors = _fields(export_gguf(models / name, tmp_path / "m.gguf", dtype="f32", verbose=False))
    bot = zaizai.load(models / name, device="cpu")
    c, sd = bot.model_config, {k: v.numpy() for k, v in bot.model.state_dict().items()}
    hs = c.n_embd // c.n_head
    assert fields["general.architecture"] == arch
    assert (fields[f"{arch}.context_length"], fields[f"{arch}.embedding_length"], fields[f"{arch}.block_count"],
            fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"],
            fields[f"{arch}.attention.key_length"], fields[f"{arch}.feed_forward_length"]) == \
        (c.block_size, c.n_embd, c.n_layer, c.n_head, c.kv_heads, hs, sd["model.layers.0.mlp.up_proj.weight"].shape[0])
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert ("output.weight" in tensors) == (not c.tie_embeddings)
    assert ("blk.1.attn_q_norm.weight" in tensors) == c.qk_norm
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ffn_gate.weight"].data),
                                  sd["model.layers.1.mlp.gate_proj.weight"])
    q = np.asarray(tensors["blk.0.attn_q.weight"].data)
    want = sd["model.layers.0.self_attn.q_proj.weight"]
    if arch == "llama":  # llama.cpp's llama pairs dims (2i, 2i + 1): head rows interleaved from the two halves
        want = want.reshape(c.n_head, 2, hs // 2, c.n_embd).transpose(0, 2, 1, 3).reshape(want.shape)
    np.testing.assert_array_equal(q, want)


@pytest.mark.parametrize("name, dtype, atol", [("chat", "f32", 0.01), ("chat", "f16", 0.03), ("bpe", "f16", 0.03),
                                               ("llama", "f32", 0.01)])
def test_llama_cpp_gives_zaizais_logits_and_greedy_tokens(models, tmp_path, name, dtype, atol):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(models / name, tmp_path / "m.gguf", dtype=dtype, verbose=False)
    bot = zaizai.load(models / name, device="cpu")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=bot.model_config.block_size, logits_all=True, n_threads=1,
                          verbose=False)
    chat = bot.is_chat_model
    prompt = _prompt(bot, chat) if chat else [EOT_ID] + bot.tokenizer.encode("床前明月光，疑是地上霜。")
    if not chat:
        assert llm.tokenize("床前明月光，疑是地上霜。".encode()) == prompt  # BOS, then zaizai's ids
    llm.eval(prompt)
    with torch.no_grad():
        want = bot.model(torch.tensor([prompt]))[0][0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[: len(prompt)]), want, atol=atol, rtol=0)

    stop = {END_ID, EOT_ID} if chat else {EOT_ID}
    n = bot.model_config.block_size - len(prompt)
    ours = _greedy(bot, prompt, n, stop)
    llm.reset()
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token in stop or len(theirs) == n:
            break
        theirs.append(token)
    if theirs != ours:  # allowed only where two tokens' logits were too close to call at this precision
        k = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
        with torch.no_grad():
            logits = bot.model(torch.tensor([prompt + ours[:k]]))[0][0, -1]
        assert logits[ours[k]] - logits[theirs[k]] < 2 * atol, (ours, theirs)
    assert len(ours) >= 3


# -- import a Qwen3 or Llama -------------------------------------------------------------------------------


def _tokenizer(folder: Path, kind: str):
    """A byte-level BPE (Qwen's kind) or a SentencePiece-style BPE (Llama's kind), saved as transformers does."""
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer

    texts = ["hello world, zaizai says hello", "床前明月光，疑是地上霜", "今天天气怎么样？晴天。"] * 20
    if kind == "qwen3":
        raw = ByteLevelBPETokenizer()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        raw.train_from_iterator(texts, vocab_size=300, special_tokens=specials, show_progress=False)
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                                   pad_token="<|endoftext|>")
    else:
        raw = SentencePieceBPETokenizer()
        raw.train_from_iterator(texts, vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                                   unk_token="<unk>")
    tok.save_pretrained(folder)
    return transformers.PreTrainedTokenizerFast.from_pretrained(folder)


def _random_model(folder: Path, kind: str, *, tied: bool, **config):
    """A tiny random Qwen3 / Llama made from its config (offline), saved with its tokenizer, and 5 padding rows
    in its embedding that no token maps to."""
    tok = _tokenizer(folder, kind)
    torch.manual_seed(0)
    cls, model_cls = ((transformers.Qwen3Config, transformers.Qwen3ForCausalLM) if kind == "qwen3"
                      else (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    options = dict(vocab_size=len(tok) + 5, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                   tie_word_embeddings=tied, initializer_range=0.3)
    model = model_cls(cls(**{**options, **config})).eval()
    model.save_pretrained(folder)
    return model, tok


@pytest.mark.parametrize("kind, tied, config", [
    ("qwen3", True, dict(rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    ("qwen3", False, {}),
    ("llama", False, dict(rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    ("llama", True, dict(num_key_value_heads=4)),
])
def test_import_a_qwen3_or_llama_computes_the_same(tmp_path, one_thread, kind, tied, config):
    folder = tmp_path / kind
    model, hf_tok = _random_model(folder, kind, tied=tied, **config)
    import_hf(folder, tmp_path / "z", verbose=False)
    bot = zaizai.load(tmp_path / "z")
    c = bot.model_config
    assert (c.model, c.qk_norm, c.tie_embeddings, c.kv_heads) == ("modern", kind == "qwen3", tied,
                                                                 model.config.num_key_value_heads)
    tok = bot.tokenizer
    vocab = hf_tok.get_vocab()
    old_of_new = {i: vocab[t] for i in range(tok.vocab_size) if (t := tok.hf.id_to_token(i)) in vocab}
    assert len(old_of_new) == len(vocab) and c.vocab_size == len(vocab) + 6 - len(set(old_of_new) & set(range(6)))
    text = "hello 床前明月光"
    ids = tok.encode(text)
    assert [old_of_new[i] for i in ids] == hf_tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        ours = bot.model(torch.tensor([ids]))[0][0]
        theirs = model(torch.tensor([[old_of_new[i] for i in ids]])).logits[0]
    cols = sorted(old_of_new)
    assert (ours[:, cols] - theirs[:, [old_of_new[i] for i in cols]]).abs().max().item() < 1e-4
    assert isinstance(bot.generate("今天", max_new_tokens=5, seed=1), str)


@pytest.fixture
def no_model_building(monkeypatch):
    def build(cfg):
        raise AssertionError(f"a model was built before the shapes were checked: {cfg}")

    monkeypatch.setattr(hf, "build_model", build)


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("qwen3") / "qwen3"
    _random_model(folder, "qwen3", tied=True)
    return folder


@pytest.mark.parametrize("changes, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope scaling is not supported"),
    ({"head_dim": 16}, "head_dim 16 with hidden_size 32 and 4 heads"),
    ({"head_dim": None}, "head_dim 128"),  # transformers' Qwen3Config default
    ({"attention_bias": True}, "no biases"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"num_key_value_heads": 3}, "does not divide"),
    ({"max_position_embeddings": 10 ** 9}, "at most 131072"),
    ({"num_hidden_layers": 10 ** 8}, "layers"),
    ({"intermediate_size": 10 ** 6}, "mlp.gate_proj.weight"),
    ({"vocab_size": 10 ** 9}, "embed_tokens"),
    ({"tie_word_embeddings": False}, "lm_head.weight is missing"),
    ({"hidden_size": "32"}, "hidden_size is '32'"),
    ({"rms_norm_eps": True}, "rms_norm_eps"),
    ({"model_type": "mistral"}, "import-hf reads GPT-2, Qwen3 and Llama"),
])
def test_import_refuses_what_the_modern_block_cannot_compute(qwen3_folder, tmp_path, no_model_building,
                                                              changes, match):
    src = tmp_path / "src"
    shutil.copytree(qwen3_folder, src)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZaizaiError, match=re.escape(match)) as err:
        import_hf(src, tmp_path / "out", verbose=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_tied_lm_head_that_differs_is_refused(qwen3_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(qwen3_folder, src)
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ZaizaiError, match="lm_head.weight differs"):
        import_hf(src, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


# -- small fixes -----------------------------------------------------------------------------------------------


def test_importing_a_zaizai_model_folder_says_what_it_is(models, tmp_path):
    """It said "holds a None model": a zaizai model folder has no model_type."""
    r = run_cli("import-hf", models / "chat", "--out", tmp_path / "x")
    assert r.returncode == 2 and "is a zaizai model folder already" in r.stderr and "None" not in r.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(ZaizaiError, match="has no model_type"):
        import_hf(tmp_path / "other", tmp_path / "y", verbose=False)


def test_gguf_into_a_path_under_a_file_says_it_is_a_file(models, tmp_path):
    """It said "does not exist" for --to FILE/m.gguf where FILE is a regular file."""
    (tmp_path / "file").write_text("x")
    r = run_cli("export", models / "chat", "--format", "gguf", "--to", tmp_path / "file" / "m.gguf")
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and "does not exist" not in r.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_hf_export_removes_what_a_killed_export_left(models, tmp_path):
    stale = tmp_path / ".hf.4999999.0123abcd.tmp"  # no such process id: its writer is gone
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    export_hf(models / "chat", tmp_path / "hf", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_the_new_config_fields_are_checked_and_old_configs_keep_qwen3s_block():
    from zaizai.models import ModelConfig

    with pytest.raises(ZaizaiError, match="rms_norm_eps must be in"):
        ModelConfig(model="modern", vocab_size=10, rms_norm_eps=0.0).validate()
    old = ModelConfig.from_dict(dict(model="modern", vocab_size=10, n_head=4, n_embd=32))  # saved before the fields
    assert old.qk_norm and old.rms_norm_eps == 1e-6
