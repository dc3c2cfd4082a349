"""The benches' own plumbing, without the long measurements: bench/llama_run.py (llama.cpp in a child process,
shared by bench/gguf_speed.py and bench/generate_speed.py) and bench/train_speed.py --mode preset."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from util import TINY, write_corpus

import zaizai

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench(monkeypatch):
    """Import a bench script as its own folder would (its sibling modules on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        return importlib.import_module(name)

    yield load
    for name in ("llama_run", "train_speed", "gguf_speed", "generate_speed", "corpus"):
        sys.modules.pop(name, None)


def test_llama_run_in_a_child_process_gives_the_same_greedy_tokens(bench, tmp_path, one_thread):
    pytest.importorskip("llama_cpp")
    from zaizai.interop.gguf import export_gguf

    llama_run = bench("llama_run")
    zaizai.prepare([write_corpus(tmp_path / "c.txt")], tmp_path / "data", verbose=False)
    zaizai.train(tmp_path / "data", tmp_path / "m", max_iters=2, verbose=False, **TINY)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="f32", verbose=False)
    prompt = [0] + zaizai.load(tmp_path / "m").tokenizer.encode("床前明月光")
    with llama_run.LlamaRun(tmp_path / "m.gguf", 1, n_ctx=64, in_process=True) as here:
        seconds, expected = here.generate(prompt, 10)
    assert seconds > 0 and len(expected) == 10
    runner = llama_run.LlamaRun(tmp_path / "m.gguf", 1, n_ctx=64)
    child = runner.child
    assert child is not None and runner.llm is None  # llama.cpp lives in the child, not beside torch
    for _ in range(2):  # every call starts from an empty KV cache
        seconds, tokens = runner.generate(prompt, 10)
        assert seconds > 0 and tokens == expected
    runner.close()
    assert child.returncode == 0


def test_llama_run_says_when_the_child_cannot_load(bench, tmp_path):
    pytest.importorskip("llama_cpp")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match="child process ended"):
        bench("llama_run").LlamaRun(tmp_path / "bad.gguf", 1, n_ctx=64)


def test_train_speed_preset_mode_runs_the_default_auto_preset_next_to_nanogpts(bench, monkeypatch, capsys):
    train_speed = bench("train_speed")
    calls = []

    def fake_train(data, out, *, preset, max_time, verbose):
        calls.append(preset)
        out.mkdir()
        model = {"model": "modern" if preset == "auto" else "gpt", "n_layer": 4, "n_embd": 128}
        train = {"optimizer": "muon" if preset == "auto" else "adamw", "dtype": "float32"}
        (out / "config.json").write_text(json.dumps({"model": model, "train": train}), encoding="utf-8")
        return SimpleNamespace(step=10, tokens_seen=1000, elapsed=1.0, full_val_loss=5.0, full_val_share=1.0)

    monkeypatch.setattr(zaizai, "prepare", lambda *a, **k: None)
    monkeypatch.setattr(zaizai, "train", fake_train)
    assert train_speed.main(["--mode", "preset", "--max-time", "1", "--quiet"]) == 0
    assert calls == ["auto", "nanogpt-cpu"]
    table = capsys.readouterr().out.split("val nats/char")[-1]
    assert "zaizai default (auto preset)" in table and "modern 4x128 muon" in table and "nanogpt-cpu" in table
    calls.clear()
    train_speed.main(["--mode", "preset", "--preset", "cpu", "--no-peer", "--quiet"])
    assert calls == ["cpu"]


def test_llama_in_process_flag_runs_llama_cpp_in_this_process(bench, monkeypatch, tmp_path):
    """bench/generate_speed.py --llama-in-process: the flag parses (off by default), load_llama hands it to
    LlamaRun, and LlamaRun(in_process=True) loads llama.cpp here, with no child process (llama.cpp itself and the
    GGUF export are stand-ins: nothing is run)."""
    generate_speed = bench("generate_speed")
    assert generate_speed.parse_args([]).llama_in_process is False
    assert generate_speed.parse_args(["--llama-in-process", "--sizes", "small"]).llama_in_process is True

    llama_run = bench("llama_run")
    monkeypatch.setattr(llama_run, "load", lambda path, threads, n_ctx: ("llama", str(path), threads, n_ctx))
    monkeypatch.setattr(llama_run.subprocess, "Popen", lambda *a, **k: pytest.fail("started a child process"))
    here = llama_run.LlamaRun(tmp_path / "m.gguf", 2, n_ctx=64, in_process=True)
    assert here.llm == ("llama", str(tmp_path / "m.gguf"), 2, 64) and here.child is None
    here.llm = None  # (the stand-in has no close)

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: load_llama gives no llama.cpp run without it")
    from zaizai.interop import gguf

    made = []
    monkeypatch.setattr(gguf, "export_gguf", lambda *a, **k: None)
    monkeypatch.setattr(generate_speed, "LlamaRun", lambda path, threads, n_ctx, in_process: made.append(in_process))
    for argv in (["--llama-in-process"], []):
        generate_speed.load_llama(tmp_path / "4x128", tmp_path, 1, generate_speed.parse_args(argv).llama_in_process)
    assert made == [True, False]


def test_generate_speed_compile_and_weights_flags_add_compiled_lines(bench, capsys, one_thread):
    """bench/generate_speed.py --compile --weights float16: zaizai measured again with its compiled decode step, and
    with that step on float16 weights, next to the same transformers runs. The compiled step's greedy tokens are
    transformers'; the float16 line is a copy of the model rounded to float16 (the original is left as it was)."""
    import copy

    import torch

    from util import decode_model, decode_prompt
    from zaizai.models.compiled import round_weights

    generate_speed = bench("generate_speed")
    assert generate_speed.parse_args([]).compile is False and generate_speed.parse_args([]).weights == "float32"
    with pytest.raises(SystemExit):  # a bfloat16 model rounded to float16: no such thing to measure
        generate_speed.parse_args(["--dtype", "bfloat16", "--weights", "float16"])
    args = generate_speed.parse_args(["--compile", "--weights", "float16", "--rounds", "1", "--new-tokens", "6"])
    ours = decode_model(n_layer=2, n_head=2, block_size=32)
    hf = generate_speed.hf_copy(ours, torch.float32)
    half = copy.deepcopy(ours)
    round_weights(half, torch.float16)
    variants = {"zaizai": (ours, False), "compiled": (ours, True), "compiled f16": (half, True)}
    m = generate_speed.measure(variants, hf, None, decode_prompt(8), args)
    assert m["compiled"]["tokens"] == m["zaizai"]["tokens"] == m["hf"]["tokens"]
    assert len(m["compiled f16"]["tokens"]) == 6 and not hasattr(ours, "weights_dtype")
    generate_speed.print_size("2L/32d", m, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2L/32d") and lines[1].startswith("  compiled ") and lines[1].split()[-1] == "yes"
    assert lines[2].startswith("  compiled f16")


def test_gguf_speed_flags_parse(bench):
    """bench/gguf_speed.py: --llama-in-process and --compile are off unless given; --weights float16 needs
    --compile."""
    gguf_speed = bench("gguf_speed")
    plain = gguf_speed.parse_args([])
    assert plain.llama_in_process is False and plain.compile is False and plain.threads == 2
    both = gguf_speed.parse_args(["--llama-in-process", "--compile", "--threads", "1", "--weights", "float16"])
    assert both.llama_in_process is True and both.compile is True and both.threads == 1
    assert plain.weights == "float32" and both.weights == "float16"
    with pytest.raises(SystemExit):
        gguf_speed.parse_args(["--weights", "float16"])  # without --compile
