"""The command line: one-line errors without tracebacks, streaming samples, flags and config files."""

import json

import pytest

from util import TINY, run_cli, write_corpus


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
    (["sample", "{tmp}/out", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["train", "{data}", "--out", "{tmp}/out", "--max-iters", "1"], "already holds a trained model"),
])
def test_user_errors_are_one_line_without_traceback(trained, args, message):
    args = [a.format(data=trained / "data", tmp=trained) for a in args]
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert message in r.stderr
    assert r.stderr.strip().count("\n") == 0


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
    chat = run_cli("chat", "--help").stdout
    for shown in ("(default 0.7)", "(default 0.9)", "(default 1.1)", "(default 100)"):
        assert shown in chat
    sample = " ".join(run_cli("sample", "--help").stdout.split())
    assert "0 = greedy (default 0.8)" in sample and "(default 200)" in sample
    train = " ".join(run_cli("train", "--help").stdout.split())
    min_lr = train[train.index("--min-lr FLOAT final"):][:110]
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
