"""A sweep of bad command lines: every one ends in one clear line and a non-zero exit, never a traceback, and
never changes a file that was there before (the audit of issue 17 tried 185 such inputs).

Each case runs in-process through ``zaizai.cli.main``; argparse's own errors (SystemExit 2) count as clean.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import pytest

from util import TINY, write_corpus, write_pairs

from zaizai.cli import main

NUMBERS = dict(  # bad numbers by what a flag expects
    positive_int=["0", "-1", "abc", "1.5", "", "2**70", "1180591620717411303424"],
    nonneg_int=["-1", "abc", "1.5", "1e3"],
    nonneg_float=["nan", "inf", "-1", "abc", "1e400"],
    positive_float=["0", "nan", "-inf", "-0.5"],
    unit=["1", "-0.1", "nan", "inf"],
    seed=["-1", "2**70", "1180591620717411303424", "x"],
)

TRAIN = ["train", "{data}", "--out", "{scratch}/run"]
NUMERIC = [  # (command line before the flag, flag, kind of bad numbers)
    *[(TRAIN, f, "positive_int") for f in ("--block-size", "--n-layer", "--n-head", "--n-embd", "--batch-size",
                                           "--grad-accum", "--eval-iters")],
    *[(TRAIN, f, "nonneg_int") for f in ("--max-iters", "--warmup-iters", "--eval-interval", "--threads",
                                         "--n-kv-head", "--ffn-hidden")],
    *[(TRAIN, f, "nonneg_float") for f in ("--max-time", "--weight-decay", "--grad-clip")],
    *[(TRAIN, f, "positive_float") for f in ("--lr", "--rope-theta")],
    *[(TRAIN, f, "unit") for f in ("--dropout", "--beta1", "--beta2")],
    (TRAIN, "--min-lr", "unit"),  # nan, inf: not finite (1 and -0.1 are fine values: not in this list)
    (TRAIN, "--seed", "seed"),
    *[(["sample", "{model}"], *fk) for fk in (("--max-new-tokens", "positive_int"), ("--temperature", "nonneg_float"),
                                             ("--top-k", "nonneg_int"), ("--repetition-penalty", "positive_float"),
                                             ("--no-repeat-ngram-size", "nonneg_int"), ("--seed", "seed"))],
    *[(["chat", "{model}", "-m", "你好"], *fk) for fk in (("--max-new-tokens", "positive_int"),
                                                        ("--temperature", "nonneg_float"), ("--history", "nonneg_int"),
                                                        ("--seed", "seed"))],
    (["prepare", "{corpus}", "--out", "{scratch}/d"], "--vocab-size", "positive_int"),
    (["prepare", "{corpus}", "--out", "{scratch}/d"], "--seed", "seed"),
    (["demo", "--out", "{scratch}/demo"], "--max-time", "positive_float"),
    (["eval", "{model}"], "--max-pairs", "positive_int"),
    (["eval", "{model}"], "--seed", "seed"),
    (["report", "{model}"], "--max-pairs", "positive_int"),
    (["compare", "{data}", "--out", "{scratch}/cmp"], "--max-time", "positive_float"),
    (["compare", "{data}", "--out", "{scratch}/cmp"], "--threads", "nonneg_int"),
    *[(["serve", "{model}"], f, k) for f, k in (("--max-active", "positive_int"), ("--max-waiting", "nonneg_int"),
                                                ("--history", "nonneg_int"))],
]
MIN_LR_OK = {"1", "-0.1"}


def numeric_cases():
    for before, flag, kind in NUMERIC:
        for value in NUMBERS[kind]:
            if flag == "--min-lr" and value in MIN_LR_OK:
                continue
            yield pytest.param([*before, flag, value], id=f"{before[0]} {flag} {value or 'empty'}")
    for before, flag, values in [
        (["sample", "{model}"], "--top-p", ["0", "1.5", "nan", "-0.1"]),
        (["chat", "{model}", "-m", "你好"], "--top-p", ["0", "1.01"]),
        (["prepare", "{corpus}", "--out", "{scratch}/d"], "--val-fraction", ["0", "1", "nan", "-0.1", "1.5"]),
        (["serve", "{model}"], "--port", ["0", "-1", "65536", "http"]),
        (["serve", "{model}"], "--max-tokens", ["0", "4097", "-1"]),
    ]:
        for value in values:
            yield pytest.param([*before, flag, value], id=f"{before[0]} {flag} {value}")


def owner(who: str, what: str):
    return pytest.mark.xfail(strict=True, reason=f"owner: {who}: {what}")


PATHS = [  # (id, command line[, marks])
    # a model folder that is not there, is a file, is empty, is a data folder, or is damaged
    *[(f"{cmd} {name}", [cmd.split()[0], "{" + name + "}", *extra])
      for cmd, extra in (("sample", []), ("chat", ["-m", "你好"]), ("eval", []), ("report", []),
                         ("attention", ["--text", "你好"]), ("export hf", ["--format", "hf", "--to", "{scratch}/hf"]),
                         ("export gguf", ["--format", "gguf", "--to", "{scratch}/m.gguf"]))
      for name in ("nowhere", "empty_file", "garbage_file", "empty_dir", "data", "model_no_weights",
                   "model_garbage_weights")],
    # (the weights carry the model's config: only report reads config.json)
    *[(f"report {name}", ["report", "{" + name + "}"]) for name in ("model_cut_config", "model_garbage_config")],
    ("serve nowhere", ["serve", "{nowhere}"]),
    ("serve data", ["serve", "{data}"]),
    # a data folder that is not there, is a file, is empty, is a model folder, or is damaged
    *[(f"train {name}", ["train", "{" + name + "}", "--out", "{scratch}/run", "--max-iters", "1"])
      for name in ("nowhere", "empty_file", "garbage_file", "empty_dir", "model", "data_cut_meta",
                   "data_garbage_meta", "data_empty_meta", "data_no_bins")],
    *[(f"eval --data {name}", ["eval", "{model}", "--data", "{" + name + "}"])
      for name in ("nowhere", "empty_file", "empty_dir", "model", "data_cut_meta")],
    *[(f"compare {name}", ["compare", "{" + name + "}", "--out", "{scratch}/cmp", "--max-time", "1"])
      for name in ("nowhere", "empty_file", "empty_dir", "model")],
    ("compare --models lstm", ["compare", "{data}", "--out", "{scratch}/cmp", "--models", "lstm", "--max-time", "1"]),
    # config files
    *[(f"train --config {name}", ["train", "{data}", "--out", "{scratch}/run", "--config", "{" + name + "}"])
      for name in ("nowhere", "garbage_file", "bad_toml", "bad_json", "list_json", "empty_toml")],
    # outputs that must not be written: over the fixtures, under a file, the wrong kind of folder
    ("train --out model", ["train", "{data}", "--out", "{model}", "--max-iters", "1", *"--threads 1".split()]),
    ("train --out data", ["train", "{data}", "--out", "{data}", "--max-iters", "1"]),
    ("train --out a file", ["train", "{data}", "--out", "{corpus}", "--max-iters", "1"]),
    ("train --out under a file", ["train", "{data}", "--out", "{corpus}/run", "--max-iters", "1"]),
    ("train --resume nothing", ["train", "--out", "{scratch}/nothing", "--resume"]),
    ("train --resume --overwrite", ["train", "{data}", "--out", "{model}", "--resume", "--overwrite"]),
    ("train --init-from nowhere", ["train", "{data}", "--out", "{scratch}/run", "--init-from", "{nowhere}",
                                   "--max-iters", "1"]),
    ("train --init-from data", ["train", "{data}", "--out", "{scratch}/run", "--init-from", "{data}",
                                "--max-iters", "1"]),
    ("train --model lstm", ["train", "{data}", "--out", "{scratch}/run", "--model", "lstm", "--max-iters", "1"]),
    ("train no stop", ["train", "{data}", "--out", "{scratch}/run"]),
    ("train --loss-on none", ["train", "{data}", "--out", "{scratch}/run", "--loss-on", "none", "--max-iters", "1"]),
    ("train --dtype int8", ["train", "{data}", "--out", "{scratch}/run", "--dtype", "int8", "--max-iters", "1"]),
    ("train --device tpu", ["train", "{data}", "--out", "{scratch}/run", "--device", "tpu", "--max-iters", "1"]),
    ("train --preset huge", ["train", "{data}", "--out", "{scratch}/run", "--preset", "huge", "--max-iters", "1"]),
    ("train --n-embd 30 --n-head 4", ["train", "{data}", "--out", "{scratch}/run", "--n-embd", "30", "--n-head", "4",
                                      "--max-iters", "1"]),
    ("prepare --out model", ["prepare", "{corpus}", "--out", "{model}"]),
    ("prepare --out data", ["prepare", "{corpus}", "--out", "{data}"]),
    ("prepare --out model --overwrite", ["prepare", "{corpus}", "--out", "{model}", "--overwrite"]),
    ("prepare --out a file", ["prepare", "{corpus}", "--out", "{empty_file}"]),
    ("prepare --out under a file", ["prepare", "{corpus}", "--out", "{corpus}/d"]),
    ("prepare nowhere", ["prepare", "{nowhere}", "--out", "{scratch}/d"]),
    ("prepare empty file", ["prepare", "{empty_file}", "--out", "{scratch}/d"]),
    ("prepare garbage file", ["prepare", "{garbage_file}", "--out", "{scratch}/d"]),
    ("prepare empty dir", ["prepare", "{empty_dir}", "--out", "{scratch}/d"]),
    ("prepare --tokenizer nowhere", ["prepare", "{corpus}", "--out", "{scratch}/d", "--tokenizer", "{nowhere}"]),
    ("prepare --tokenizer garbage", ["prepare", "{corpus}", "--out", "{scratch}/d", "--tokenizer", "{garbage_file}"]),
    ("prepare --encoding klingon", ["prepare", "{corpus}", "--out", "{scratch}/d", "--encoding", "klingon"]),
    ("prepare --format jsonl of text", ["prepare", "{corpus}", "--out", "{scratch}/d", "--format", "jsonl"]),
    ("prepare --format lccc of garbage", ["prepare", "{garbage_file}", "--out", "{scratch}/d", "--format", "lccc"]),
    ("prepare jsonl garbage lines", ["prepare", "{bad_jsonl}", "--out", "{scratch}/d"]),
    ("prepare --format bogus", ["prepare", "{corpus}", "--out", "{scratch}/d", "--format", "bogus"]),
    ("export gguf over the checkpoint", ["export", "{model}", "--format", "gguf", "--to", "{model}/last.safetensors"]),
    ("export gguf --overwrite over the checkpoint", ["export", "{model}", "--format", "gguf", "--to",
                                                    "{model}/best.safetensors", "--overwrite"]),
    ("export gguf over a data file", ["export", "{model}", "--format", "gguf", "--to", "{data}/meta.json"]),
    ("export hf over the model", ["export", "{model}", "--format", "hf", "--to", "{model}"]),
    ("export hf over data", ["export", "{model}", "--format", "hf", "--to", "{data}"]),
    ("export hf under a file", ["export", "{model}", "--format", "hf", "--to", "{corpus}/hf"]),
    ("export gguf under a file", ["export", "{model}", "--format", "gguf", "--to", "{corpus}/m.gguf"]),
    ("export --format onnx", ["export", "{model}", "--format", "onnx", "--to", "{scratch}/x"]),
    ("export no --to", ["export", "{model}", "--format", "hf"]),
    *[(f"import-hf {name}", ["import-hf", "{" + name + "}", "--out", "{scratch}/imported"])
      for name in ("nowhere", "empty_file", "empty_dir", "model", "data", "hf_cut_config")],
    ("import-hf --out model", ["import-hf", "{model}", "--out", "{model}"]),
    ("attention --png under a file", ["attention", "{model}", "--text", "你好", "--png", "{corpus}/a.png"]),
    ("attention --png over the checkpoint", ["attention", "{model}", "--text", "你好", "--png",
                                            "{model}/last.safetensors"]),
    ("attention --png --overwrite over the checkpoint", ["attention", "{model}", "--text", "你好", "--png",
                                                        "{model}/best.safetensors", "--overwrite"]),
    ("attention --png --overwrite over the tokenizer", ["attention", "{model}", "--text", "你好", "--png",
                                                       "{model}/tokenizer.json", "--overwrite"]),
    ("attention --png --overwrite over data", ["attention", "{model}", "--text", "你好", "--png", "{data}/meta.json",
                                              "--overwrite"]),
    ("attention --png over an existing file", ["attention", "{model}", "--text", "你好", "--png", "{corpus}"]),
    ("attention --png a folder", ["attention", "{model}", "--text", "你好", "--png", "{empty_dir}", "--overwrite"]),
    ("attention no --text", ["attention", "{model}"]),
    ("sample --checkpoint first", ["sample", "{model}", "--checkpoint", "first"]),
    ("sample --device tpu", ["sample", "{model}", "--device", "tpu", "--max-new-tokens", "2"]),
    ("chat --device tpu", ["chat", "{model}", "--device", "tpu", "-m", "你好"]),
    ("eval --device tpu", ["eval", "{model}", "--device", "tpu"]),
    ("unknown command", ["fly"]),
    ("unknown flag", ["sample", "{model}", "--temprature", "1"]),
    ("no model folder", ["sample"]),
]


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    """Once per module: a corpus, a data folder, a tiny trained model, and damaged copies and odd files."""
    import zaizai

    tmp = tmp_path_factory.mktemp("sweep")
    corpus = write_corpus(tmp / "corpus.txt")
    zaizai.prepare([corpus], tmp / "data", verbose=False)
    zaizai.train(tmp / "data", tmp / "model", max_iters=2, verbose=False, **TINY)
    (tmp / "empty_file.txt").write_bytes(b"")
    (tmp / "garbage_file.bin").write_bytes(bytes(range(256)) * 8 + b"\xff\xfe\x00" * 100)
    (tmp / "empty_dir").mkdir()
    (tmp / "bad.toml").write_text("lr = = 3\n[model\n", encoding="utf-8")
    (tmp / "bad.json").write_text('{"lr": 0.1,', encoding="utf-8")
    (tmp / "list.json").write_text("[1, 2, 3]", encoding="utf-8")
    (tmp / "empty.toml").write_text("", encoding="utf-8")
    (tmp / "bad.jsonl").write_text('{"messages": 3}\nnot json\n', encoding="utf-8")
    write_pairs(tmp / "pairs.jsonl", [("你好", "你好，我是崽崽。")] * 3)
    damaged = {
        "model_cut_config": ("model", "config.json", lambda b: b[: len(b) // 2]),
        "model_garbage_config": ("model", "config.json", lambda b: b"\x00\xff garbage"),
        "model_garbage_weights": ("model", None, lambda b: b"\x00" * 64),
        "model_no_weights": ("model", None, None),
        "data_cut_meta": ("data", "meta.json", lambda b: b[: len(b) // 2]),
        "data_garbage_meta": ("data", "meta.json", lambda b: bytes(range(256))),
        "data_empty_meta": ("data", "meta.json", lambda b: b""),
        "data_no_bins": ("data", None, None),
        "hf_cut_config": ("model", "config.json", lambda b: b"{"),
    }
    for name, (source, file, change) in damaged.items():
        shutil.copytree(tmp / source, tmp / name)
        if file is not None:
            path = tmp / name / file
            path.write_bytes(change(path.read_bytes()))
        else:
            for path in (tmp / name).glob("*.safetensors" if source == "model" else "*.bin"):
                path.unlink() if change is None else path.write_bytes(change(path.read_bytes()))
    shutil.copytree(tmp, tmp.parent / f"{tmp.name}-pristine")
    return tmp


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def fill(argv: list[str], tmp: Path, scratch: Path) -> list[str]:
    names = {"corpus": tmp / "corpus.txt", "nowhere": tmp / "nowhere", "empty_file": tmp / "empty_file.txt",
             "garbage_file": tmp / "garbage_file.bin", "bad_toml": tmp / "bad.toml", "bad_json": tmp / "bad.json",
             "list_json": tmp / "list.json", "empty_toml": tmp / "empty.toml", "bad_jsonl": tmp / "bad.jsonl",
             "scratch": scratch}
    names.update({p.name: p for p in tmp.iterdir() if p.is_dir()})
    return [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]


def run_bad(argv, fixture_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder (out/, demo/) lands in the scratch folder
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    before = snapshot(fixture_dir)
    try:
        code = main(fill(argv, fixture_dir, tmp_path))
    except SystemExit as e:  # argparse: usage + one error line
        code = e.code
    finally:
        changed = snapshot(fixture_dir) != before
        if changed:  # put the fixtures back for the other cases, then fail
            shutil.rmtree(fixture_dir)
            shutil.copytree(fixture_dir.parent / f"{fixture_dir.name}-pristine", fixture_dir)
    err = capsys.readouterr().err
    assert isinstance(code, int) and code != 0, f"exit {code!r}: {err[-500:]}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines, "no message"
    assert lines[-1].startswith(("zaizai", "usage")), lines[-1]
    assert not changed, "a failing command changed the fixtures"


@pytest.mark.parametrize("argv", list(numeric_cases()))
def test_bad_numbers_are_one_line(argv, fixture_dir, tmp_path, capsys, monkeypatch):
    run_bad(argv, fixture_dir, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("argv", [pytest.param(argv, id=name, marks=rest) for name, argv, *rest in PATHS])
def test_bad_paths_are_one_line(argv, fixture_dir, tmp_path, capsys, monkeypatch):
    run_bad(argv, fixture_dir, tmp_path, capsys, monkeypatch)


def test_the_sweep_is_large():
    assert len(list(numeric_cases())) + len(PATHS) >= 150


def test_zero_or_negative_max_new_tokens_is_refused_everywhere(fixture_dir, capsys):
    """0 new tokens is no reply (chat made it one token): the flag, /set and the API's max_tokens all refuse it."""
    from zaizai.common.errors import ZaizaiError
    from zaizai.inference.chat import ChatSession
    from zaizai.inference.sampling import SamplingConfig

    for n in (0, -1):
        with pytest.raises(ZaizaiError, match=f"max_new_tokens .* must be >= 1, got {n}"):
            SamplingConfig(max_new_tokens=n).validate()
    session = ChatSession(zaizai_load(fixture_dir / "model"))
    for value in ("0", "-3"):
        with pytest.raises(ZaizaiError, match="must be >= 1"):
            session.set("max_new_tokens", value)
    assert session.sampling.max_new_tokens == 100  # unchanged
    # the chat command: one error line for the /set, the option unchanged
    assert main(["chat", str(fixture_dir / "model"), "-m", "/set max_new_tokens 0", "-m", "/settings"]) == 0
    captured = capsys.readouterr()
    assert "错误 error: max_new_tokens" in captured.err and "max_new_tokens=100" in captured.out + captured.err
    # the API: max_tokens / max_completion_tokens 0 fail the request schema (the server answers 400 naming the field)
    schemas = pytest.importorskip("zaizai.serve.schemas")
    from pydantic import ValidationError
    user = [{"role": "user", "content": "你好"}]
    for make in (lambda: schemas.ChatRequest(messages=user, max_tokens=0),
                 lambda: schemas.ChatRequest(messages=user, max_completion_tokens=0),
                 lambda: schemas.CompletionRequest(prompt="你好", max_tokens=0)):
        with pytest.raises(ValidationError, match="greater than or equal to 1"):
            make()


def zaizai_load(folder):
    from zaizai.inference.loaded import load

    return load(folder, device="cpu")
