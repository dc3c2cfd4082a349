"""Hostile and damaged inputs for the interop and report commands: each ends in one clear error line and
writes nothing. ``import-hf`` reads only files inside the source folder and checks every size in config.json
against the tensor shapes in the safetensors headers before it builds (allocates) a model."""

from __future__ import annotations

import ast
import json
import os
import resource
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from util import TINY, run_cli, write_corpus

import zaizai
from zaizai.common.errors import ZaizaiError
from zaizai.evals.report import write_report
from zaizai.interop import hf
from zaizai.interop.hf import import_hf

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("，。的一是不了人我你好明月光床前")
C, T, L = 8, 8, 1  # n_embd, n_positions, n_layer of the tiny GPT-2 below


def hf_tensors(vocab_size: int = len(VOCAB), seed: int = 0) -> dict[str, torch.Tensor]:
    """A random GPT-2 state under transformers' names (Conv1D weights are (in, out))."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    t = {"transformer.wte.weight": r(vocab_size, C), "transformer.wpe.weight": r(T, C),
         "transformer.ln_f.weight": torch.ones(C), "transformer.ln_f.bias": torch.zeros(C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        t |= {p + "ln_1.weight": torch.ones(C), p + "ln_1.bias": torch.zeros(C),
              p + "ln_2.weight": torch.ones(C), p + "ln_2.bias": torch.zeros(C),
              p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
              p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
              p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
              p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C)}
    return t


CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": len(VOCAB), "n_positions": T,
          "n_ctx": T, "n_embd": C, "n_layer": L, "n_head": 2, "n_inner": None, "activation_function": "gelu_new",
          "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}


def make_hf(folder: Path, *, config: dict | None = None, sharded: bool = False) -> Path:
    """A small valid GPT-2 folder written without transformers: config.json, safetensors, vocab.txt."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"unk_token": "[UNK]", "cls_token": "[CLS]",
                                                              "pad_token": None, "do_lower_case": True}))
    tensors = hf_tensors()
    if not sharded:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def refused(src: Path, out: Path, match: str | None = None) -> ZaizaiError:
    """import_hf(src, out) raises one ZaizaiError line and leaves nothing behind next to ``out``."""
    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(ZaizaiError, match=match) as info:
        import_hf(src, out, verbose=False)
    assert "\n" not in str(info.value)
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == before
    return info.value


@pytest.fixture
def no_model_building(monkeypatch):
    """Building a model for a hostile folder means allocating what its config asks for: fail instead."""
    def build(cfg):
        raise AssertionError(f"a model was built before the shapes were checked: {cfg}")

    monkeypatch.setattr(hf, "build_model", build)


def test_the_tiny_folder_imports_and_computes_like_its_weights(tmp_path):
    for sharded in (False, True):
        src = make_hf(tmp_path / f"src{sharded}", sharded=sharded)
        import_hf(src, tmp_path / f"z{sharded}", verbose=False)
        bot = zaizai.load(tmp_path / f"z{sharded}")
        assert bot.model_config.n_embd == C and bot.model_config.block_size == T
        wpe = hf_tensors()["transformer.wpe.weight"]
        assert torch.equal(bot.model.state_dict()["transformer.wpe.weight"], wpe)


# -- weight_map and links ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3, None, ["model-00001-of-00002.safetensors"], {"a": 1}, True])
def test_a_weight_map_value_that_is_not_a_file_name_is_refused(tmp_path, value):
    src = make_hf(tmp_path / "src", sharded=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.wpe.weight"] = value
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(src, tmp_path / "out", "weight_map")


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlinked_shard", "symlinked_single", "nul"])
def test_weights_outside_the_folder_are_never_read(tmp_path, how, monkeypatch):
    outside = make_hf(tmp_path / "elsewhere")  # a valid file: only its place is wrong
    src = make_hf(tmp_path / "src", sharded=how != "symlinked_single")
    target = outside / "model.safetensors"
    if how == "symlinked_single":
        (src / "model.safetensors").unlink()
        (src / "model.safetensors").symlink_to(target)
    else:
        index = json.loads((src / "model.safetensors.index.json").read_text())
        name = {"absolute": str(target), "dotdot": "../elsewhere/model.safetensors", "nul": "a\0b",
                "symlinked_shard": "link.safetensors"}[how]
        if how == "symlinked_shard":
            (src / name).symlink_to(target)
        index["weight_map"] = {k: name for k in index["weight_map"]}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    opened = []
    real_open = __import__("safetensors").safe_open
    monkeypatch.setattr("safetensors.safe_open", lambda path, **kw: opened.append(str(path)) or real_open(path, **kw))
    refused(src, tmp_path / "out", "outside|not a file name")
    assert not any("elsewhere" in Path(p).resolve().as_posix() for p in opened)


def test_a_hugging_face_cache_snapshot_with_links_into_blobs_imports(tmp_path):
    """transformers' cache keeps files in blobs/ and links to them from snapshots/<commit>/: that is fine."""
    made = make_hf(tmp_path / "made")
    blobs, snap = tmp_path / "hub" / "models--x--y" / "blobs", tmp_path / "hub" / "models--x--y" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for k, f in enumerate(sorted(made.iterdir())):
        shutil.copy(f, blobs / f"blob{k}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{k}")
    import_hf(snap, tmp_path / "z", verbose=False)
    assert zaizai.load(tmp_path / "z").model_config.n_embd == C


# -- config.json values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, match", [
    ("layer_norm_epsilon", "abc", "layer_norm_epsilon"),
    ("layer_norm_epsilon", float("nan"), "layer_norm_epsilon"),
    ("n_positions", True, "n_positions"),
    ("n_embd", "8", "n_embd"),
    ("n_layer", 1.0, "n_layer"),
    ("n_head", 0, "n_head"),
    ("vocab_size", -3, "vocab_size"),
    ("n_inner", "x", "n_inner"),
    ("activation_function", ["gelu"], "activation_function"),
    ("model_type", {"a": [1]}, "import-hf reads GPT-2"),
])
def test_config_values_of_the_wrong_type_are_refused(tmp_path, no_model_building, key, value, match):
    src = make_hf(tmp_path / "src", config={**CONFIG, key: value})
    refused(src, tmp_path / "out", match)


@pytest.mark.parametrize("changes, match", [
    ({"n_positions": 10 ** 8, "n_ctx": 10 ** 8}, "wpe"),
    ({"n_embd": 10 ** 8, "n_head": 1}, "wte"),
    ({"vocab_size": 10 ** 9}, "wte"),
    ({"n_layer": 10 ** 8}, "layers"),
    ({"n_layer": 2}, "layers"),
])
def test_sizes_the_weights_on_disk_do_not_hold_are_refused_before_building(tmp_path, no_model_building,
                                                                          changes, match):
    src = make_hf(tmp_path / "src", config={**CONFIG, **changes})
    assert sum(f.stat().st_size for f in src.iterdir()) < 10 ** 6
    refused(src, tmp_path / "out", match)


def test_a_huge_config_fails_cleanly_under_a_memory_limit(tmp_path):
    """The audit's case through the CLI: n_positions 1e8 in a folder of a few kB asked for gigabytes."""
    src = make_hf(tmp_path / "src", config={**CONFIG, "n_positions": 10 ** 8, "n_ctx": 10 ** 8})

    def limit():  # no more than 1.5 GB of data: wpe alone would be 3.2 GB
        resource.setrlimit(resource.RLIMIT_DATA, (3 * 2 ** 29, 3 * 2 ** 29))

    r = run_cli("import-hf", src, "--out", tmp_path / "out", preexec_fn=limit)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_with_ids_far_past_the_embeddings_is_refused_at_once(tmp_path, no_model_building):
    from tokenizers import Tokenizer, models

    src = make_hf(tmp_path / "src")
    wordlevel = models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]")
    Tokenizer(wordlevel).save(str(src / "tokenizer.json"))
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["vocab"]["远"] = 4_000_000_000  # listing 4e9 ids one by one would take hours
    (src / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    refused(src, tmp_path / "out", "do not belong together")


@pytest.mark.parametrize("content", [
    {"unk_token": ["[UNK]"]},
    {"unk_token": {"content": {"nested": True}}},
    {"cls_token": 5},
    {"do_lower_case": "yes"},
])
def test_a_garbage_tokenizer_config_is_refused(tmp_path, content):
    src = make_hf(tmp_path / "src")
    (src / "tokenizer_config.json").write_text(json.dumps(content))
    refused(src, tmp_path / "out", "tokenizer_config.json")


@pytest.mark.parametrize("name, data", [
    ("config.json", b"{" * 100_000),
    ("config.json", b"[1, 2]"),
    ("config.json", b"\xff\xfe garbage"),
    ("tokenizer_config.json", b"[" * 100_000),
    ("vocab.txt", b"\xff\xfe\xfd"),
    ("model.safetensors", b"\x00" * 64),
])
def test_damaged_files_are_refused(tmp_path, name, data):
    src = make_hf(tmp_path / "src")
    (src / name).write_bytes(data)
    refused(src, tmp_path / "out")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                               max_size=3), max_leaves=6)


FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=60, **FUZZ)
@given(key=st.sampled_from(sorted(CONFIG) + ["hidden_size", "num_hidden_layers", "scale_attn_weights"]),
       value=JSON | st.integers(0, 2 ** 40))
def test_fuzzed_config_values_import_or_fail_in_one_line(tmp_path_factory, key, value):
    tmp = tmp_path_factory.mktemp("fuzz")
    src = make_hf(tmp / "src", config={**CONFIG, key: value})
    try:
        import_hf(src, tmp / "out", verbose=False)
    except ZaizaiError as e:
        assert "\n" not in str(e) and not (tmp / "out").exists()
    else:  # only values that change nothing the weights hold import
        assert zaizai.load(tmp / "out").model_config.n_embd == C
    shutil.rmtree(tmp)


@settings(max_examples=30, **FUZZ)
@given(key=st.sampled_from(["unk_token", "cls_token", "bos_token", "eos_token", "pad_token", "do_lower_case",
                            "chat_template", "model_max_length"]), value=JSON)
def test_fuzzed_tokenizer_config_values_import_or_fail_in_one_line(tmp_path_factory, key, value):
    tmp = tmp_path_factory.mktemp("fuzz")
    src = make_hf(tmp / "src")
    (src / "tokenizer_config.json").write_text(json.dumps({"unk_token": "[UNK]", key: value}))
    try:
        import_hf(src, tmp / "out", verbose=False)
    except ZaizaiError as e:
        assert "\n" not in str(e) and not (tmp / "out").exists()
    shutil.rmtree(tmp)


# -- what import-hf writes and prints ------------------------------------------------------------------------


def test_only_the_folder_name_is_stored_and_printed_commands_are_quoted(tmp_path, capsys):
    name = "it's \"my\" $(touch pwned) model"
    src = make_hf(tmp_path / "secret-home" / name)
    out = tmp_path / "out dir;rm -rf x"
    import_hf(src, out, verbose=True)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["imported_from"] == name
    assert zaizai.load(out).state["imported_from"] == name
    assert "secret-home" not in (out / "config.json").read_text(encoding="utf-8")
    printed = capsys.readouterr().out
    commands = [line.split("try: ", 1)[1] for line in printed.splitlines() if "try: " in line]
    for command in commands[0].split("  ·  ")[0:1]:
        assert shlex.split(command)[:3] == ["zaizai", "sample", str(out)]

    (src / "model.safetensors").rename(src / "pytorch_model.bin")  # the pickle message suggests a command
    message = str(refused(src, tmp_path / "out2", "never loads"))
    argv = shlex.split(message.split("transformers: ", 1)[1].split(" (writes", 1)[0])
    assert argv[:2] == ["python", "-c"]
    calls = [n for n in ast.walk(ast.parse(argv[2])) if isinstance(n, ast.Call)]
    assert {a.value for c in calls for a in c.args} == {str(src)}


# -- output folders --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("model")
    zaizai.prepare([write_corpus(tmp / "c.txt")], tmp / "data", verbose=False)
    zaizai.train(tmp / "data", tmp / "m", max_iters=4, verbose=False, **TINY)
    return tmp


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_import_never_replaces_a_data_folder_or_its_source(tmp_path, model):
    src = make_hf(tmp_path / "src")
    data = tmp_path / "data"
    shutil.copytree(model / "data", data)
    before = _snapshot(data)
    with pytest.raises(ZaizaiError, match="data folder"):
        import_hf(src, data, overwrite=True, verbose=False)
    assert _snapshot(data) == before
    with pytest.raises(ZaizaiError):
        import_hf(src, src, overwrite=True, verbose=False)
    assert (src / "model.safetensors").is_file()
    import_hf(src, tmp_path / "m", verbose=False)
    inner = make_hf(tmp_path / "m" / "src")  # a model folder holding the source: replacing it would delete it
    with pytest.raises(ZaizaiError, match="source"):
        import_hf(inner, tmp_path / "m", overwrite=True, verbose=False)
    assert (inner / "model.safetensors").is_file()


def test_export_hf_never_replaces_a_model_or_data_folder(tmp_path, model):
    from zaizai.interop.hf import export_hf

    other = tmp_path / "other"
    shutil.copytree(model / "m", other)
    for target, match in ((other, "model folder"), (model / "data", "data folder"), (model, "holds")):
        before = _snapshot(target)
        with pytest.raises(ZaizaiError, match=match):
            export_hf(model / "m", target, overwrite=True, verbose=False)
        assert _snapshot(target) == before
    assert zaizai.load(model / "m").model_config.n_embd == TINY["n_embd"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_export_and_import_into_a_read_only_folder_say_so(tmp_path, model):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ZaizaiError, match="cannot write"):
            hf.export_hf(model / "m", locked / "hf", verbose=False)
        with pytest.raises(ZaizaiError, match="cannot write"):
            import_hf(make_hf(tmp_path / "src"), locked / "z", verbose=False)
    finally:
        locked.chmod(0o700)


def test_a_read_only_target_is_one_line(tmp_path, model, monkeypatch):
    """As root chmod does not stop a write: make the rename fail instead, as a read-only folder would."""
    def denied(self, target):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "rename", denied)
    with pytest.raises(ZaizaiError, match="cannot write .*Permission denied"):
        hf.export_hf(model / "m", tmp_path / "hf", verbose=False)
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_exporting_a_damaged_checkpoint_is_one_line(tmp_path, model, damage):
    from zaizai.interop.gguf import export_gguf

    m = tmp_path / "m"
    shutil.copytree(model / "m", m)
    for ckpt in m.glob("*.safetensors"):
        data = ckpt.read_bytes()
        ckpt.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 999, "empty": b""}[damage])
    for export, to in ((hf.export_hf, tmp_path / "x"), (export_gguf, tmp_path / "x.gguf")):
        with pytest.raises(ZaizaiError) as info:
            export(m, to, verbose=False)
        assert "\n" not in str(info.value) and not to.exists()
    if damage == "truncated":
        r = run_cli("export", m, "--format", "gguf", "--to", tmp_path / "x.gguf")
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- report ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"model": {"model": "gpt", "n_la', "\x00\xff garbage", "[]", '{"model": null}',
                                  '{"model": {}, "train": []}'])
def test_report_with_a_damaged_config_is_one_line(tmp_path, model, text):
    m = tmp_path / "m"
    shutil.copytree(model / "m", m)
    (m / "config.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    with pytest.raises(ZaizaiError, match="config.json") as info:
        write_report(m, model / "data", device="cpu", max_pairs=2, verbose=False)
    assert "\n" not in str(info.value) and not (m / "report.md").exists()


def test_report_cli_with_a_truncated_config_is_one_line(tmp_path, model):
    m = tmp_path / "m"
    shutil.copytree(model / "m", m)
    data = (m / "config.json").read_bytes()
    (m / "config.json").write_bytes(data[: len(data) // 2])
    r = run_cli("report", m, "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "config.json" in r.stderr, r.stderr
