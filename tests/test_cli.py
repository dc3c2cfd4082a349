"""The command line: one-line errors without tracebacks, streaming samples, flags and config files."""

import json
import os

import pytest

from util import TINY, run_cli, write_corpus
from zaizai.common.errors import ZaizaiError


def tiny_flags(**extra):
    flags = []
    for key, value in {**TINY, **extra}.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(tmp / "corpus.txt")
    r = run_cli("prepare", corpus, "--out", tmp / "data")
    assert r.returncode == 0, r.stderr
    assert "字符数" in r.stdout and "词表大小" in r.stdout
    r = run_cli("train", tmp / "data", "--out", tmp / "out", "--max-iters", "20", *tiny_flags())
    assert r.returncode == 0, r.stderr
    return tmp


def test_sample_streams_and_repeats_with_a_seed(trained):
    args = ("sample", trained / "out", "--prompt", "床前", "--max-new-tokens", "30", "--temperature", "0.8",
            "--top-k", "50", "--top-p", "0.95", "--seed", "1")
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("床前") and len(a.stdout) > 5
    c = run_cli(*args[:-1], "2")
    assert c.returncode == 0 and c.stdout.startswith("床前")
    assert c.stdout != a.stdout  # another seed, another text


def test_config_file_with_flag_override(trained):
    cfg = trained / "run.toml"
    cfg.write_text("max_iters = 6\nlr = 0.002\n[model]\nn_embd = 48\n", encoding="utf-8")
    r = run_cli("train", trained / "data", "--out", trained / "out2", "--config", cfg, "--lr", "0.004",
                "--n-layer", "1", "--n-head", "2", "--block-size", "16", "--batch-size", "4", "--eval-interval", "3")
    assert r.returncode == 0, r.stderr
    saved = json.loads((trained / "out2" / "config.json").read_text(encoding="utf-8"))
    assert saved["model"]["n_embd"] == 48 and saved["train"]["lr"] == 0.004 and saved["train"]["max_iters"] == 6


@pytest.mark.parametrize("args, message", [
    (["train", "{data}", "--out", "{tmp}/x", "--n-embd", "30", "--n-head", "4", "--max-iters", "1"],
     "n_embd (30) must be divisible by n_head (4)"),
    (["train", "{data}", "--out", "{tmp}/x", "--max-iters", "0"], "give a stopping point"),
    (["train", "{tmp}/nowhere", "--out", "{tmp}/x", "--max-iters", "1"], "zaizai prepare"),
    (["train", "{data}", "--out", "{tmp}/x", "--model", "lstm", "--max-iters", "1"], "unknown model 'lstm'"),
    (["sample", "{tmp}/nowhere"], "does not exist"),
    (["train", "{data}", "--out", "{tmp}/out", "--max-iters", "1"], "already holds a trained model"),
])
def test_user_errors_are_one_line_without_traceback(trained, args, message):
    args = [a.format(data=trained / "data", tmp=trained) for a in args]
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert message in r.stderr
    assert r.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("flags, message", [
    (["--block-size", "100000", "--max-iters", "1"], "fewer than block_size + 1 = 100001"),
    (["--max-time", "0.0001"], "--max-time 0.0001 s is used up before the first step"),
    (["--model", "modern", "--n-head", "4", "--n-kv-head", "3", "--max-iters", "1"],
     "n_head (4) must be a multiple of n_kv_head (3)"),
    (["--optimizer", "sgd", "--max-iters", "1"], "--optimizer must be one of adamw | muon"),
])
def test_a_run_that_cannot_fit_is_one_line_exit_2_and_writes_nothing(trained, tmp_path, flags, message):
    r = run_cli("train", trained / "data", "--out", tmp_path / "unfit", "--threads", "1", *flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr and r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "unfit").exists()


def test_non_utf8_corpus_is_refused_with_the_file_and_offset(tmp_path):
    bad = tmp_path / "gbk.txt"
    bad.write_bytes("你好，崽崽\n\n早上好\n".encode("gbk"))
    r = run_cli("prepare", bad, "--out", tmp_path / "data")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "gbk.txt" in r.stderr and "byte 0" in r.stderr and "--encoding gbk" in r.stderr
    assert not (tmp_path / "data" / "train.bin").exists()
    ok = run_cli("prepare", bad, "--out", tmp_path / "data", "--encoding", "gbk", "--val-fraction", "0.5")
    assert ok.returncode == 0, ok.stderr


def test_help_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for command in ("prepare", "train", "sample", "chat", "demo", "eval", "serve", "export", "import-hf"):
        assert command in r.stdout


@pytest.mark.parametrize("command", ["", "prepare", "train", "sample", "chat", "demo", "eval", "report", "attention",
                                     "compare", "export", "import-hf", "serve"])
def test_help_does_not_import_torch(command):
    """`zaizai CMD --help` answers at once: building the parser must not import torch (seconds on a laptop)."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom zaizai.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main({[command, '--help'] if command else ['--help']!r})\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_help_shows_the_defaults_each_command_really_uses():
    chat = " ".join(run_cli("chat", "--help").stdout.split())
    for shown in ("(default 0.7)", "(default 0.9)", "(default 1.1)", "(default 100)"):
        assert shown in chat
    sample = " ".join(run_cli("sample", "--help").stdout.split())
    assert "0 = greedy (default 0.8)" in sample and "(default 200)" in sample
    train = " ".join(run_cli("train", "--help").stdout.split())
    min_lr = train[train.rindex("--min-lr FLOAT"):][:110]  # the help line, not the usage
    assert min_lr.count("default") == 1 and "lr/10" in min_lr


def test_every_command_is_explained_in_chinese_first():
    listing = run_cli("--help").stdout
    for command, chinese in (("prepare", "准备数据"), ("train", "训练"), ("chat", "聊天"), ("eval", "评估"),
                             ("export", "导出"), ("import-hf", "导入")):
        assert chinese in listing.split(command, 1)[1], command


def test_a_terminal_hears_from_zaizai_before_pytorch_is_loaded():
    import io

    from zaizai.cli import starting_note

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, pipe = Terminal(), io.StringIO()
    starting_note(terminal)
    starting_note(pipe)
    assert "starting" in terminal.getvalue() and pipe.getvalue() == ""


def test_every_option_of_every_command_is_explained_in_chinese():
    import argparse
    import re

    from zaizai.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, p in [("zaizai", parser), *sub.choices.items()]
               for a in p._actions if not isinstance(a, argparse._SubParsersAction)
               if not re.search(r"[\u4e00-\u9fff]", a.help or "")]
    assert not missing, missing


def in_process(argv, capsys):
    """``zaizai.cli.main(argv)`` -> (exit code, stderr); argparse's SystemExit counts as an exit code."""
    from zaizai.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # would end the whole test session
        pytest.fail("Ctrl-C escaped zaizai.cli.main")
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["train", "d", "--max-time", "nan"], "--max-time"),
    (["train", "d", "--max-time", "inf"], "--max-time"),
    (["train", "d", "--seed", str(2**70)], "--seed"),
    (["eval", "m", "--max-pairs", "-1"], "--max-pairs"),
    (["sample", "m", "--temperature", "nan"], "--temperature"),
    (["sample", "m", "--top-p", "1.5"], "--top-p"),
    (["sample", "m", "--top-k", "-3"], "--top-k"),
    (["chat", "m", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_bad_numbers_are_refused_by_argparse_in_one_line(argv, flag, capsys):
    code, err = in_process(argv, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"zaizai {argv[0]}: error: argument {flag}: ")


@pytest.mark.parametrize("error, words", [
    (PermissionError(13, "Permission denied", "/ro/hf/config.json"), "cannot write or read /ro/hf/config.json"),
    (OSError(28, "No space left on device", "/full/hf"), "cannot write /full/hf: No space left on device"),
    (NotADirectoryError(20, "Not a directory", "/a/file/hf"), "cannot access /a/file/hf"),
])
def test_a_refused_write_is_one_line_not_a_traceback(monkeypatch, capsys, error, words):
    def export_hf(*args, **kwargs):
        raise error

    monkeypatch.setattr("zaizai.interop.hf.export_hf", export_hf)
    code, err = in_process(["export", "m", "--format", "hf", "--to", "/ro/hf"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("zaizai: ") and words in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        code, err = in_process(["prepare", write_corpus(tmp_path / "c.txt"), "--out", tmp_path / "ro" / "d"], capsys)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert code == 2 and "cannot write" in err and err.strip().count("\n") == 0


class Interrupt:
    """A meta-path finder that presses Ctrl-C while ``name`` is imported (as a slow `import torch` might see)."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


@pytest.mark.parametrize("where", ["parser", "lazy import"])
def test_ctrl_c_during_startup_is_one_line_and_exit_130(monkeypatch, capsys, where):
    import sys

    if where == "parser":
        def build_parser():
            raise KeyboardInterrupt

        monkeypatch.setattr("zaizai.cli.build_parser", build_parser)
    else:
        monkeypatch.delitem(sys.modules, "zaizai.inference.loaded", raising=False)
        monkeypatch.setattr(sys, "meta_path", [Interrupt("zaizai.inference.loaded"), *sys.meta_path])
    code, err = in_process(["sample", "m"], capsys)
    assert code == 130 and err.strip() == "zaizai: 已中断 interrupted"


@pytest.mark.parametrize("argv", [["sample", "m", "--weights", "float16"], ["chat", "m", "--weights", "bfloat16"]])
def test_16_bit_weights_without_compile_are_refused_before_the_model_loads(argv, capsys):
    code, err = in_process(argv, capsys)  # no folder m: a load would say so instead
    assert code == 2 and err.count("\n") == 1 and f"--weights {argv[-1]} needs --compile" in err


def test_serve_refuses_16_bit_weights_without_compile_before_loading(tmp_path):
    from zaizai.serve.app import serve

    with pytest.raises(ZaizaiError, match="--weights float16 needs --compile"):
        serve(tmp_path / "missing", weights="float16")


def test_new_flags_reach_the_library(monkeypatch, capsys):
    seen = {}

    def record(name):
        def fake(*args, **kwargs):
            seen[name] = kwargs

        return fake

    monkeypatch.setattr("zaizai.serve.app.serve", record("serve"))
    monkeypatch.setattr("zaizai.interop.gguf.export_gguf", record("gguf"))
    monkeypatch.setattr("zaizai.data.preparation.prepare", record("prepare"))
    assert in_process(["serve", "m", "--allowed-host", "a.example", "--allowed-host", "b.example",
                       "--api-key-file", "key.txt"], capsys)[0] == 0
    assert seen["serve"]["allowed_hosts"] == ["a.example", "b.example"] and seen["serve"]["api_key_file"] == "key.txt"
    assert seen["serve"]["compile"] is False
    assert in_process(["serve", "m", "--compile"], capsys)[0] == 0
    assert seen["serve"]["compile"] is True and seen["serve"]["weights"] == "float32"
    assert in_process(["serve", "m", "--compile", "--weights", "bfloat16"], capsys)[0] == 0
    assert seen["serve"]["weights"] == "bfloat16"
    assert in_process(["serve", "m"], capsys)[0] == 0
    assert seen["serve"]["allowed_hosts"] == [] and seen["serve"]["api_key_file"] is None
    assert in_process(["export", "m", "--format", "gguf", "--to", "m.gguf", "--overwrite"], capsys)[0] == 0
    assert seen["gguf"]["overwrite"] is True
    assert in_process(["prepare", "c.txt", "--out", "d"], capsys)[0] == 0
    assert seen["prepare"]["overwrite"] is False
    serve_help = " ".join(run_cli("serve", "--help").stdout.split())
    assert "ps" in serve_help and "ZAIZAI_API_KEY" in serve_help and "--api-key-file" in serve_help
