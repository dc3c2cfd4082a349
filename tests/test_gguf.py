"""GGUF export: the file's metadata and tensors read back with gguf's own reader, tokenizer mappings, refusals,
atomic replacement, and (where llama-cpp-python is installed) llama.cpp running the file like zaizai."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from util import LINES, TINY, run_cli, write_corpus, write_pairs

import zaizai
from zaizai.data.dialogue import render_conversation
from zaizai.common.errors import ZaizaiError
from zaizai.inference.sampling import SamplingConfig
from zaizai.interop import gguf as zgguf
from zaizai.interop.gguf import export_gguf
from zaizai.data.tokenizer import (
    END_ID,
    EOT_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    USER_ID,
    CharTokenizer,
)


MODEL = dict(TINY, block_size=32, n_layer=2, n_head=2, n_embd=32)
CONVERSATION = [{"role": "system", "content": "你是崽崽"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好，我是崽崽"}, {"role": "user", "content": "有什么问题吗？"}]


def _train(tmp: Path, name: str, *, tokenizer: str = "char", corpus: Path | None = None, **options) -> Path:
    corpus = corpus or write_corpus(tmp / f"{name}.txt")
    extra = {"tokenizer": "bpe", "vocab_size": 300} if tokenizer == "bpe" else {}
    zaizai.prepare([corpus], tmp / f"{name}-data", verbose=False, **extra)
    zaizai.train(tmp / f"{name}-data", tmp / name, verbose=False, **{**MODEL, "max_iters": 30, **options})
    return tmp / name


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    """Trained once for the file: char (with a space in its vocabulary), bpe, chat, bias-free and rnn models."""
    tmp = tmp_path_factory.mktemp("gguf")
    spaced = tmp / "spaced.txt"
    spaced.write_text(write_corpus(tmp / "plain.txt").read_text(encoding="utf-8").replace("明月", "明 月"),
                      encoding="utf-8")
    chat = write_pairs(tmp / "chat.jsonl", list(zip(LINES[::2], LINES[1::2])) * 10)
    return {
        "char": _train(tmp, "char", corpus=spaced),
        "bpe": _train(tmp, "bpe", tokenizer="bpe"),
        "chat": _train(tmp, "chat", corpus=chat),
        "nobias": _train(tmp, "nobias", bias=False),
        "rnn": _train(tmp, "rnn", model="rnn", max_iters=2),
    }


def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def _expected_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """GGUF name -> the checkpoint's value, written out here independently of gguf.py's table."""
    bot = zaizai.load(model_dir, device="cpu")
    sd = {k: v.numpy() for k, v in bot.model.state_dict().items()}
    C = bot.model_config.n_embd

    def get(name, n):  # a missing bias is written as zeros
        return sd.get(name, np.zeros(n, dtype=np.float32))

    out = {"token_embd.weight": sd["transformer.wte.weight"], "position_embd.weight": sd["transformer.wpe.weight"],
           "output_norm.weight": sd["transformer.ln_f.weight"], "output_norm.bias": get("transformer.ln_f.bias", C)}
    for i in range(bot.model_config.n_layer):
        h = f"transformer.h.{i}."
        for g, z, n in [("attn_norm", "ln_1", C), ("attn_qkv", "attn.c_attn", 3 * C), ("attn_output", "attn.c_proj", C),
                        ("ffn_norm", "ln_2", C), ("ffn_up", "mlp.c_fc", 4 * C), ("ffn_down", "mlp.c_proj", C)]:
            out[f"blk.{i}.{g}.weight"] = sd[h + z + ".weight"]
            out[f"blk.{i}.{g}.bias"] = get(h + z + ".bias", n)
    return out


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_metadata_and_every_tensor_read_back(models, tmp_path, dtype):
    path = export_gguf(models["char"], tmp_path / "m.gguf", dtype=dtype, verbose=False)
    fields, tensors = _fields(path)
    cfg = zaizai.load(models["char"], device="cpu").model_config
    assert fields["general.architecture"] == "gpt2"
    assert fields["general.file_type"] == {"f32": 0, "f16": 1}[dtype]
    assert fields["gpt2.context_length"] == cfg.block_size
    assert fields["gpt2.embedding_length"] == cfg.n_embd
    assert fields["gpt2.feed_forward_length"] == 4 * cfg.n_embd
    assert fields["gpt2.block_count"] == cfg.n_layer
    assert fields["gpt2.attention.head_count"] == cfg.n_head
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)

    expected = _expected_tensors(models["char"])
    assert set(tensors) == set(expected)  # no output.weight: llama.cpp ties it to token_embd itself
    for name, want in expected.items():
        t = tensors[name]
        assert [int(n) for n in t.shape] == list(want.shape[::-1]), name  # GGML lists dims innermost first
        if want.ndim == 1 or dtype == "f32":  # norms and biases stay float32 in an f16 file
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(np.asarray(t.data), want, err_msg=name)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            np.testing.assert_array_equal(np.asarray(t.data), want.astype(np.float16), err_msg=name)


def test_cli_export_with_dtype(models, tmp_path):
    for dtype, file_type in (("f32", 0), (None, 1)):  # f16 by default
        path = tmp_path / f"{dtype}.gguf"
        r = run_cli("export", models["char"], "--format", "gguf", "--to", path, *(["--dtype", dtype] if dtype else []))
        assert r.returncode == 0, r.stderr
        assert _fields(path)[0]["general.file_type"] == file_type
    r = run_cli("export", models["rnn"], "--format", "gguf", "--to", tmp_path / "rnn.gguf")
    assert r.returncode == 2 and "rnn model" in r.stderr and "Traceback" not in r.stderr


def test_char_tokenizer_is_a_t5_vocabulary_of_single_characters(models, tmp_path):
    path = export_gguf(models["char"], tmp_path / "m.gguf", dtype="f32", verbose=False)
    fields, _ = _fields(path)
    tok = zaizai.load(models["char"], device="cpu").tokenizer
    assert " " in tok.chars  # the fixture's vocabulary has a space, which llama.cpp spells "▁"
    assert fields["tokenizer.ggml.model"] == "t5"
    assert fields["tokenizer.ggml.tokens"] == [*SPECIAL_TOKENS, *("▁" if c == " " else c for c in tok.chars)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:6] == [3, 2, 3, 3, 3, 3] and set(types[6:]) == {1}  # CONTROL, UNKNOWN for <|unk|>, NORMAL
    assert fields["tokenizer.ggml.scores"] == [0.0] * tok.vocab_size
    assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.remove_extra_whitespaces"] is False
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (EOT_ID, EOT_ID, UNK_ID)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.chat_template" not in fields


def test_bpe_tokenizer_keeps_vocabulary_and_merges(models, tmp_path):
    path = export_gguf(models["bpe"], tmp_path / "m.gguf", verbose=False)
    fields, _ = _fields(path)
    data = json.loads(zaizai.load(models["bpe"], device="cpu").tokenizer.hf.to_str())
    vocab = data["model"]["vocab"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "superbpe"
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    assert len(fields["tokenizer.ggml.merges"]) > 10
    assert fields["tokenizer.ggml.token_type"][:7] == [3, 2, 3, 3, 3, 3, 1]


def _gpt2_split_copy(model_dir: Path, to: Path) -> Path:
    """The BPE model with GPT-2's own pre-tokenizer, as a GPT-2 imported from Hugging Face has."""
    shutil.copytree(model_dir, to)
    data = json.loads((to / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (to / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return to


def test_an_imported_gpt2_bpe_keeps_gpt2s_split_and_other_splits_are_refused(models, tmp_path):
    gpt2 = _gpt2_split_copy(models["bpe"], tmp_path / "gpt2")
    fields, _ = _fields(export_gguf(gpt2, tmp_path / "m.gguf", verbose=False))
    assert fields["tokenizer.ggml.pre"] == "trillion"  # GPT-2's regex, without "gpt-2"'s space clean-up
    for pre in ({"type": "Whitespace"}, {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, None):
        with pytest.raises(ZaizaiError, match="none of llama.cpp's pre-tokenizers"):
            zgguf._bpe_pre(pre)


def test_chat_model_stops_at_end_and_has_the_training_layout_as_template(models, tmp_path):
    import jinja2

    path = export_gguf(models["chat"], tmp_path / "m.gguf", verbose=False)
    fields, _ = _fields(path)
    assert fields["tokenizer.ggml.eos_token_id"] == END_ID and fields["tokenizer.ggml.eot_token_id"] == END_ID
    template = jinja2.Environment().from_string(fields["tokenizer.chat_template"])
    tok = zaizai.load(models["chat"], device="cpu").tokenizer
    for prompt in (False, True):
        ids, _ = render_conversation(tok, CONVERSATION, add_generation_prompt=prompt)
        assert template.render(messages=CONVERSATION, add_generation_prompt=prompt) == tok.decode(ids)


def test_bias_free_model_gets_zero_biases(models, tmp_path):
    _, tensors = _fields(export_gguf(models["nobias"], tmp_path / "m.gguf", verbose=False))
    assert not np.asarray(tensors["blk.1.ffn_up.bias"].data).any()
    assert not np.asarray(tensors["output_norm.bias"].data).any()
    assert np.asarray(tensors["output_norm.weight"].data).any()


def test_what_llama_cpp_cannot_run_is_refused(models, tmp_path):
    with pytest.raises(ZaizaiError, match="rnn model; llama.cpp runs only transformer"):
        export_gguf(models["rnn"], tmp_path / "m.gguf", verbose=False)
    with pytest.raises(ZaizaiError, match="unknown GGUF dtype 'q4'"):
        export_gguf(models["char"], tmp_path / "m.gguf", dtype="q4", verbose=False)
    with pytest.raises(ZaizaiError, match="is a folder"):
        export_gguf(models["char"], tmp_path, verbose=False)
    with pytest.raises(ZaizaiError, match="does not exist; create the folder"):
        export_gguf(models["char"], tmp_path / "nope" / "m.gguf", verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZaizaiError, match="no checkpoint"):
        export_gguf(tmp_path / "empty", tmp_path / "m.gguf", verbose=False)
    with pytest.raises(ZaizaiError, match="U\\+2581"):  # llama.cpp's space; it would collide with " "
        zgguf._vocab(CharTokenizer(["a", " ", "▁"]), chat=False)

    class WordPiece:  # an imported vocabulary that is not a byte-level BPE
        type = "hf"

    with pytest.raises(ZaizaiError, match="no tokenizer that works like this model's imported Hugging Face"):
        zgguf._vocab(WordPiece(), chat=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_an_existing_file_is_replaced_only_by_a_complete_export(models, tmp_path, monkeypatch):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with pytest.raises(ZaizaiError):
        export_gguf(models["rnn"], target, verbose=False)

    def disk_full(self, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
        with pytest.raises(ZaizaiError, match="cannot write .*No space left"):
            export_gguf(models["char"], target, overwrite=True, verbose=False)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left behind
    with pytest.raises(ZaizaiError, match="--overwrite"):
        export_gguf(models["char"], target, verbose=False)
    assert target.read_bytes() == b"old"
    assert export_gguf(models["char"], target, overwrite=True, verbose=False) == target
    assert _fields(target)[0]["general.architecture"] == "gpt2"


@pytest.mark.parametrize("name", ["last.safetensors", "tokenizer.json", "config.json", "metrics.jsonl", "notes.txt"])
def test_never_written_over_a_model_folders_own_files_or_other_files(models, tmp_path, name):
    """The audit's case: `export m1 --format gguf --to m1/last.safetensors` replaced the checkpoint."""
    model = tmp_path / "m1"
    shutil.copytree(models["char"], model)
    (model / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    for overwrite in (False, True):  # an existing file that is no GGUF is never replaced, even with --overwrite
        with pytest.raises(ZaizaiError):
            export_gguf(model, model / name, overwrite=overwrite, verbose=False)
    r = run_cli("export", model, "--format", "gguf", "--to", model / name)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    assert zaizai.load(model).model_config.n_embd == MODEL["n_embd"]
    with pytest.raises(ZaizaiError, match="folder"):
        export_gguf(model, model, overwrite=True, verbose=False)


# -- llama.cpp runs the file -----------------------------------------------------------------------------------


def _detokenize(llm, ids: list[int], special: bool = False) -> str:
    """llama.cpp's own llama_detokenize (llama-cpp-python's detokenize joins pieces and skips its clean-up)."""
    import ctypes

    import llama_cpp

    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    buf = ctypes.create_string_buffer(64 * len(ids) + 64)
    n = llama_cpp.llama_detokenize(llama_cpp.llama_model_get_vocab(llm.model), tokens, len(ids), buf, len(buf),
                                   False, special)
    assert n >= 0
    return buf.raw[:n].decode("utf-8")


def _greedy_llama(llm, ids: list[int], n: int, stop: set[int]) -> list[int]:
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token in stop or len(out) == n:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("kind,dtype,atol", [("char", "f32", 0.01), ("char", "f16", 0.03),
                                             ("bpe", "f32", 0.01), ("bpe", "f16", 0.03),
                                             ("nobias", "f16", 0.03)])
def test_llama_cpp_gives_zaizais_logits_tokens_and_greedy_text(models, tmp_path, kind, dtype, atol):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(models[kind], tmp_path / "m.gguf", dtype=dtype, verbose=False)
    bot = zaizai.load(models[kind], device="cpu")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=bot.model_config.block_size, logits_all=True, n_threads=1,
                          verbose=False)
    text = "床前明 月光，疑是地上霜。\n举头"
    ids = bot.tokenizer.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    assert llm.tokenize(text.encode())[0] == EOT_ID  # a prompt starts a new document, as in zaizai
    prompt = [EOT_ID, *ids]
    assert _detokenize(llm, prompt, special=True) == bot.tokenizer.decode(prompt)

    llm.eval(prompt)
    with torch.no_grad():
        want = bot.model(torch.tensor([prompt]))[0][0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[: len(prompt)]), want, atol=atol, rtol=0)

    prompt = prompt[: bot.model_config.block_size // 2]  # room for a reply (a BPE prompt may fill the context)
    n = bot.model_config.block_size - len(prompt)  # llama.cpp has no positions past block_size
    ours = list(bot.stream_ids(prompt, SamplingConfig(temperature=0, max_new_tokens=n), stop_ids={EOT_ID}))
    llm.reset()
    theirs = _greedy_llama(llm, prompt, n, stop={EOT_ID})
    if theirs != ours:  # allowed only where two tokens' logits were too close to call at this precision
        k = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
        with torch.no_grad():
            logits = bot.model(torch.tensor([prompt + ours[:k]]))[0][0, -1]
        assert logits[ours[k]] - logits[theirs[k]] < 2 * atol, (ours, theirs)


def test_llama_cpp_splits_like_an_imported_gpt2_bpe(models, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    gpt2 = _gpt2_split_copy(models["bpe"], tmp_path / "gpt2")
    tok = zaizai.load(gpt2, device="cpu").tokenizer
    llm = llama_cpp.Llama(model_path=str(export_gguf(gpt2, tmp_path / "m.gguf", verbose=False)), vocab_only=True,
                          verbose=False)
    for text in ["Hello , world ! It's  fine .  \n\n  x", "床前明月光疑是地上霜 2024年 ok", " a  b   c"]:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert ids == tok.encode(text)
        assert _detokenize(llm, ids) == text


def test_llama_cpp_char_tokenizer_unknowns_and_chat_prompt(models, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(models["chat"], tmp_path / "m.gguf", verbose=False)
    bot = zaizai.load(models["chat"], device="cpu")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=bot.model_config.block_size, n_threads=1, verbose=False)
    # One unknown character is <|unk|> in both; a run of them is one <|unk|> in llama.cpp (zaizai: one each).
    assert llm.tokenize("你x好".encode(), add_bos=False, special=False) == bot.tokenizer.encode("你x好")
    assert llm.tokenize("你xy好".encode(), add_bos=False, special=False) == bot.tokenizer.encode("你x好")
    # Marker look-alikes are text unless special tokens are asked for, as a chat template's output is read.
    assert USER_ID not in llm.tokenize(b"<|user|>", add_bos=False, special=False)
    ids, _ = render_conversation(bot.tokenizer, CONVERSATION, add_generation_prompt=True)
    rendered = bot.tokenizer.decode(ids)
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids
    assert llm.token_eos() == END_ID
