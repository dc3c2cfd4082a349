"""Training end to end: each model learns, checkpoints load, resume is exact, bad runs stop cleanly."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import zaizai
from zaizai.training.checkpoint import BEST, LAST, load_checkpoint
from zaizai.common.errors import ZaizaiError
from zaizai.common.ids import IGNORE_INDEX
from util import TINY, prepared, write_pairs


@pytest.fixture
def data_dir(tmp_path):
    return prepared(tmp_path)


@pytest.mark.parametrize("model", ["bigram", "rnn", "gpt"])
def test_each_model_trains_resumes_and_samples(tmp_path, data_dir, model):
    out = tmp_path / f"out-{model}"
    # a bigram table learns slowly at a transformer's learning rate
    opts = dict(TINY, lr=0.05) if model == "bigram" else TINY
    first = zaizai.train(data_dir, out, model=model, max_iters=30, verbose=False, **opts)
    assert first.step == 30 and first.stopped_by == "max_iters"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.15    # it learns
    assert records[-1]["val_bpc"] == pytest.approx(records[-1]["val_loss"] / math.log(2), rel=0.05)
    for key in ("tokens", "lr", "tokens_per_second", "elapsed", "train_bpc"):
        assert key in records[-1]
    assert (out / LAST).is_file() and (out / BEST).is_file() and (out / "tokenizer.json").is_file()
    assert (out / "tokenizer_config.json").is_file()   # transformers' AutoTokenizer loads OUT_DIR as is
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first.full_val_loss is not None and math.isfinite(first.full_val_loss)

    second = zaizai.train(out_dir=out, resume=True, max_iters=40, verbose=False)
    assert second.step == 40
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-2:] == [35, 40]

    bot = zaizai.load(out)
    text = bot.generate("床前", max_new_tokens=20, temperature=0.8, seed=3)
    assert text == bot.generate("床前", max_new_tokens=20, temperature=0.8, seed=3)
    assert len(text) > 0


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, data_dir):
    opts = dict(TINY, model="gpt", max_iters=20, dropout=0.1, grad_accum=2, verbose=False)
    zaizai.train(data_dir, tmp_path / "a", **opts)
    stopped = zaizai.train(data_dir, tmp_path / "b", on_step=lambda s: s["step"] == 10, **opts)
    assert stopped.stopped_by == "interrupt" and stopped.step == 10
    zaizai.train(out_dir=tmp_path / "b", resume=True, verbose=False)

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in map(json.loads, lines)]

    assert losses("a") == losses("b")
    a = load_checkpoint(tmp_path / "a" / LAST).model_state
    b = load_checkpoint(tmp_path / "b" / LAST).model_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_a_run_without_being_told(tmp_path, data_dir):
    out = tmp_path / "out"
    zaizai.train(data_dir, out, max_iters=5, verbose=False, **TINY)
    before = (out / LAST).read_bytes()
    with pytest.raises(ZaizaiError, match="already holds a trained model.*--resume.*--overwrite"):
        zaizai.train(data_dir, out, max_iters=5, verbose=False, **TINY)
    assert (out / LAST).read_bytes() == before
    zaizai.train(data_dir, out, max_iters=5, overwrite=True, verbose=False, **TINY)


def test_resume_needs_a_checkpoint_and_keeps_the_shape(tmp_path, data_dir):
    with pytest.raises(ZaizaiError, match="nothing to resume"):
        zaizai.train(data_dir, tmp_path / "none", resume=True, max_iters=5, verbose=False)
    out = tmp_path / "out"
    zaizai.train(data_dir, out, max_iters=5, verbose=False, **TINY)
    with pytest.raises(ZaizaiError, match="cannot change n_embd when resuming"):
        zaizai.train(out_dir=out, resume=True, n_embd=64, max_iters=10, verbose=False)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    from zaizai.models.gpt import GPT

    out = tmp_path / "out"
    real_forward = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 12:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    with pytest.raises(ZaizaiError, match="loss became nan at step 12.*last good checkpoint.*lower --lr"):
        zaizai.train(data_dir, out, max_iters=50, verbose=False, **TINY)
    ckpt = load_checkpoint(out / LAST)
    assert ckpt.state["step"] == 10
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())


def test_max_time_stops_the_run(tmp_path, data_dir):
    result = zaizai.train(data_dir, tmp_path / "out", max_time=1.0, verbose=False, **TINY)
    assert result.stopped_by == "max_time" and result.step > 0
    assert load_checkpoint(tmp_path / "out" / LAST).state["step"] == result.step


def test_train_step_accumulates_micro_batches_like_one_big_batch(data_dir):
    """The trainer's own step: grad_accum=2 over two halves of 8 sequences moves the weights as one batch of 8.

    Plain SGD, whose step is proportional to the gradient: Adam's first step barely depends on its scale, so it
    would hide a missing ``loss / grad_accum``.
    """
    from zaizai.data.batches import Batches
    from zaizai.data.tokendata import TokenData
    from zaizai.models import ModelConfig, build_model
    from zaizai.training.loop import train_step

    data = TokenData(data_dir)
    x, y, _ = Batches(data, 16, packed=True).get("train", 8, np.random.default_rng(0))

    def one_step(micro_batches, grad_accum):
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=data.tokenizer.vocab_size, block_size=16, n_layer=1,
                                        n_head=2, n_embd=32))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loss = train_step(model, optimizer, micro_batches, lr=1.0, grad_accum=grad_accum, device=torch.device("cpu"))
        return loss, model, optimizer

    big_loss, big, _ = one_step([(x, y, None)], grad_accum=1)
    loss, accumulated, optimizer = one_step([(x[:4], y[:4], None), (x[4:], y[4:], None)], grad_accum=2)
    assert loss == pytest.approx(big_loss, abs=1e-6)
    assert optimizer.param_groups[0]["lr"] == 1.0
    assert all(p.grad is None for p in accumulated.parameters())  # zeroed for the next step
    for (name, a), b in zip(big.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)


def test_train_step_with_a_nan_loss_leaves_the_weights_alone():
    from zaizai.models import ModelConfig, build_model
    from zaizai.training.loop import train_step

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 20, (2, 8))
    y = torch.full_like(x, IGNORE_INDEX)  # no target at all: a nan mean loss
    loss = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), [(x, y, None)], lr=1.0, grad_accum=1,
                      device=torch.device("cpu"))
    assert math.isnan(loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_truncated_and_foreign_checkpoints_give_clear_errors(tmp_path, data_dir):
    from safetensors.torch import save_file

    out = tmp_path / "out"
    zaizai.train(data_dir, out, max_iters=5, verbose=False, **TINY)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / LAST).write_bytes((out / LAST).read_bytes()[:100])
    with pytest.raises(ZaizaiError, match="truncated or not a checkpoint"):
        zaizai.load(broken)
    save_file({"w": torch.zeros(2)}, str(broken / LAST))
    with pytest.raises(ZaizaiError, match="not a zaizai checkpoint"):
        zaizai.load(broken)
    with pytest.raises(ZaizaiError, match="does not exist"):
        zaizai.load(tmp_path / "nowhere")
    with pytest.raises(ZaizaiError, match="no checkpoint"):
        zaizai.load(tmp_path)


def test_pretrain_then_fine_tune_on_dialogues_keeps_the_tokenizer(tmp_path, data_dir):
    from zaizai.data.tokenizer import load_tokenizer

    base = tmp_path / "base"
    zaizai.train(data_dir, base, max_iters=10, verbose=False, **TINY)
    dialogues = write_pairs(tmp_path / "chat.jsonl", [("床前", "明月光"), ("举头", "望明月"), ("低头", "思故乡")] * 5)
    zaizai.prepare([dialogues], tmp_path / "sft", tokenizer=base, verbose=False)
    assert load_tokenizer(tmp_path / "sft" / "tokenizer.json") == load_tokenizer(base / "tokenizer.json")
    # a vanishing learning rate: the fine-tuned weights must be the pretrained ones
    result = zaizai.train(tmp_path / "sft", tmp_path / "chat", init_from=str(base), max_iters=1, lr=1e-12,
                          warmup_iters=0, eval_interval=1, verbose=False, preset="tiny", batch_size=4, threads=1)
    assert result.step == 1
    before = load_checkpoint(base / BEST).model_state
    after = load_checkpoint(tmp_path / "chat" / LAST).model_state
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert zaizai.load(tmp_path / "chat").is_chat_model

    zaizai.prepare([dialogues], tmp_path / "own", verbose=False)   # a tokenizer of its own
    with pytest.raises(ZaizaiError, match="--tokenizer"):
        zaizai.train(tmp_path / "own", tmp_path / "chat2", init_from=str(base), max_iters=1, verbose=False)


def test_compile_trains_and_saves_plain_weight_names(tmp_path, data_dir):
    """--compile is opt-in; it must train and write the same checkpoint layout (no torch.compile prefixes)."""
    out = tmp_path / "out"
    result = zaizai.train(data_dir, out, max_iters=6, compile=True, verbose=False, **TINY)
    assert result.step == 6 and math.isfinite(result.val_loss)
    names = set(load_checkpoint(out / LAST).model_state)
    assert "transformer.wte.weight" in names and not any("_orig_mod" in n for n in names)


def test_train_out_is_a_model_folder_checked_before_any_work(tmp_path, data_dir):
    """Never into a data folder (not even with --overwrite); any other non-empty folder needs --overwrite;
    and the refusal comes before the data is read (a missing data folder is not what it complains about)."""
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    for overwrite in (False, True):
        with pytest.raises(ZaizaiError, match="already is a data folder.*choose another --out"):
            zaizai.train(tmp_path / "no-such-data", data_dir, max_iters=2, overwrite=overwrite, verbose=False, **TINY)
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(ZaizaiError, match="already exists.*--overwrite"):
        zaizai.train(tmp_path / "no-such-data", mine, max_iters=2, verbose=False, **TINY)
    zaizai.train(data_dir, mine, max_iters=2, overwrite=True, verbose=False, **TINY)
    assert (mine / "notes.txt").read_text() == "my notes" and (mine / LAST).is_file()
    with pytest.raises(ZaizaiError, match="is a file; give a folder"):
        zaizai.train(data_dir, mine / "notes.txt", max_iters=2, verbose=False, **TINY)
    with pytest.raises(ZaizaiError, match="cannot create --out"):     # a traceback before
        zaizai.train(data_dir, mine / "notes.txt" / "sub", max_iters=2, verbose=False, **TINY)


def test_a_run_killed_before_its_first_checkpoint_starts_again_without_overwrite(tmp_path, data_dir):
    out = tmp_path / "out"
    zaizai.train(data_dir, out, max_iters=2, verbose=False, **TINY)
    for name in (LAST, BEST, "metrics.jsonl", "loss.png"):   # what a kill during the first steps leaves
        (out / name).unlink()
    (out / f".{LAST}.999999999.0123abcd.tmp").write_bytes(b"half")
    assert zaizai.train(data_dir, out, max_iters=2, verbose=False, **TINY).step == 2
    (out / "config.json").write_text('{"not": "a run config"}')   # someone else's config.json: not ours
    for name in (LAST, BEST, "metrics.jsonl", "loss.png"):
        (out / name).unlink()
    with pytest.raises(ZaizaiError, match="already exists.*--overwrite"):
        zaizai.train(data_dir, out, max_iters=2, verbose=False, **TINY)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="POSIX process ids")
def test_starting_or_resuming_removes_the_temporaries_of_killed_writers_only(tmp_path, data_dir):
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    zaizai.train(data_dir, out, max_iters=5, verbose=False, **TINY)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [out / f".{LAST}.{dead.pid}.0123abcd.tmp", out / f".metrics.jsonl.{dead.pid}.89abcdef.tmp"]
    for path in stale:
        path.write_bytes(b"left by a kill")
    live = out / f".{BEST}.{os.getppid()}.00ff00ff.tmp"   # a live process's: never touched
    live.write_bytes(b"being written")
    zaizai.train(out_dir=out, resume=True, max_iters=10, verbose=False)
    assert not any(p.exists() for p in stale) and live.read_bytes() == b"being written"
    stale[0].write_bytes(b"again")
    zaizai.train(data_dir, out, max_iters=5, overwrite=True, verbose=False, **TINY)
    assert not stale[0].exists() and live.exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") and p != live]


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    first = zaizai.train(data_dir, out, max_iters=10, verbose=False, **TINY)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    for _ in range(3):
        again = zaizai.train(out_dir=out, resume=True, verbose=True)
        assert again.step == 10 and again.stopped_by == "max_iters"
        assert again.val_loss == first.val_loss and again.full_val_loss == first.full_val_loss
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files     # no metrics record appended, no rewrite
    assert "nothing to do" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]
    longer = zaizai.train(out_dir=out, resume=True, max_iters=15, verbose=False)   # more steps: it trains
    assert longer.step == 15
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [5, 10, 15]


def test_a_run_killed_after_its_last_checkpoint_finishes_with_exactly_one_final_record(tmp_path, data_dir,
                                                                                       monkeypatch):
    """Killed after saving step 10's checkpoint and record but during the final pass over the val split:
    the resume does that pass and no second record of step 10."""
    import zaizai.training.loop as loop

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "evaluate_split_until", killed)
        with pytest.raises(KeyboardInterrupt):
            zaizai.train(data_dir, out, max_iters=10, verbose=False, **TINY)
    assert "full_val_loss" not in load_checkpoint(out / LAST).state
    result = zaizai.train(out_dir=out, resume=True, verbose=False)
    assert result.step == 10 and result.full_val_loss is not None
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [5, 10]
    assert load_checkpoint(out / LAST).state["full_val_loss"] == result.full_val_loss


def test_a_nan_loss_before_any_checkpoint_does_not_promise_one(tmp_path, data_dir, monkeypatch):
    from zaizai.models.gpt import GPT

    real_forward = GPT.forward

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        return logits, (loss * float("nan") if targets is not None and self.training else loss)

    monkeypatch.setattr(GPT, "forward", forward)
    with pytest.raises(ZaizaiError, match="loss became nan at step 0.*no checkpoint was saved yet") as info:
        zaizai.train(data_dir, tmp_path / "out", max_iters=50, verbose=False, **TINY)
    assert "last good checkpoint" not in str(info.value) and "--resume" not in str(info.value)


def test_a_kill_between_a_checkpoint_and_its_record_loses_no_record(tmp_path, data_dir, monkeypatch):
    """Killed after step 10's checkpoint was written but before its metrics line: the resume evaluates step 10
    again (same weights, same batches, same losses) instead of leaving a hole in metrics.jsonl."""
    import zaizai.training.loop as loop

    opts = dict(TINY, max_iters=15, dropout=0.1, verbose=False)
    zaizai.train(data_dir, tmp_path / "a", **opts)
    real_append = loop.append_metrics

    def append(out, record):
        if record["step"] == 10:
            raise KeyboardInterrupt  # SIGKILL, as far as the files can tell
        real_append(out, record)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "append_metrics", append)
        with pytest.raises(KeyboardInterrupt):
            zaizai.train(data_dir, tmp_path / "b", **opts)
    assert load_checkpoint(tmp_path / "b" / LAST).state["step"] == 10
    zaizai.train(out_dir=tmp_path / "b", resume=True, verbose=False)

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in map(json.loads, lines)]

    assert [step for step, _, _ in losses("b")] == [5, 10, 15]
    assert losses("a") == losses("b")


def test_a_kill_between_the_first_best_and_last_checkpoints_says_to_start_over(tmp_path, data_dir):
    out = tmp_path / "out"
    zaizai.train(data_dir, out, max_iters=5, verbose=False, **TINY)
    (out / LAST).unlink()
    with pytest.raises(ZaizaiError, match="nothing to resume.*--overwrite instead of --resume"):
        zaizai.train(out_dir=out, resume=True, verbose=False)
    with pytest.raises(ZaizaiError, match=f"holds {BEST} but no {LAST} to resume from; add --overwrite"):
        zaizai.train(data_dir, out, max_iters=5, verbose=False, **TINY)
    assert zaizai.train(data_dir, out, max_iters=5, overwrite=True, verbose=False, **TINY).step == 5


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_resume_refuses_another_optimizer_or_model_and_resume_with_overwrite(tmp_path, data_dir):
    out = tmp_path / "out"
    zaizai.train(data_dir, out, max_iters=5, verbose=False, **TINY)
    before = _files(out)
    for change, message in ((dict(optimizer="muon"), "cannot change optimizer when resuming \\(the run has adamw\\)"),
                            (dict(model="modern"), "cannot change model when resuming \\(the run has gpt\\)")):
        with pytest.raises(ZaizaiError, match=message + ".*start fresh with --overwrite") as info:
            zaizai.train(out_dir=out, resume=True, max_iters=10, verbose=False, **change)
        assert "\n" not in str(info.value)
    # a finished run used to answer "nothing to do" before the contradiction was seen
    with pytest.raises(ZaizaiError, match="--resume continues the run in .*--overwrite starts it over; pick one"):
        zaizai.train(data_dir, out, resume=True, overwrite=True, verbose=False)
    assert _files(out) == before


@pytest.mark.parametrize("options, message", [
    (dict(block_size=100_000, max_iters=1), "training split has only .* tokens, fewer than block_size"),
    (dict(model="modern", n_head=4, n_kv_head=3, n_embd=32, max_iters=1), "n_head \\(4\\) must be a multiple of "
                                                                          "n_kv_head \\(3\\)"),
    (dict(max_time=1e-4), "--max-time 0.0001 s is used up before the first step"),
])
def test_a_run_that_cannot_fit_is_one_line_and_writes_nothing(tmp_path, data_dir, options, message):
    with pytest.raises(ZaizaiError, match=message) as info:
        zaizai.train(data_dir, tmp_path / "out", verbose=False, **{**TINY, "preset": None, **options})
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_auto_without_max_time_picks_by_corpus_size_and_times_nothing(tmp_path, data_dir, monkeypatch, capsys):
    import zaizai.training.autopreset as auto

    monkeypatch.setattr(auto, "time_candidate", lambda *a: pytest.fail("an iteration-bound run timed a model"))
    result = zaizai.train(data_dir, tmp_path / "a", max_iters=2, threads=1, batch_size=4, eval_iters=1)
    saved = json.loads((tmp_path / "a" / "config.json").read_text(encoding="utf-8"))
    assert result.step == 2 and saved["train"]["preset"] == "auto" and saved["train"]["optimizer"] == "muon"
    assert saved["model"]["model"] == "modern" and saved["model"]["n_layer"] == 2      # a tiny corpus: the smallest
    assert "auto preset: 2x128" in capsys.readouterr().out
    monkeypatch.setattr(auto, "MIN_TOKENS_PER_PARAM", 1e-6)                          # as if the corpus were large
    zaizai.train(data_dir, tmp_path / "b", max_iters=1, threads=1, block_size=16, batch_size=2, eval_iters=1,
                 verbose=False)
    saved = json.loads((tmp_path / "b" / "config.json").read_text(encoding="utf-8"))
    assert (saved["model"]["n_layer"], saved["model"]["n_embd"], saved["model"]["block_size"]) == (6, 256, 16)


def test_auto_with_max_time_chooses_from_bucketed_speeds_and_resume_keeps_the_choice(tmp_path, data_dir,
                                                                                      monkeypatch, capsys):
    import zaizai.training.autopreset as auto
    from zaizai.training.config import AUTO_CANDIDATES

    assert auto.bucket(1050) == auto.bucket(1100) == 2 ** 10.0625 and auto.bucket(1200) == 2 ** 10.1875
    assert auto.bucket(2 ** 10.0625) == 2 ** 10.0625 and auto.bucket(0) == 0.0  # the middle is its own bucket
    monkeypatch.setattr(auto, "MIN_TOKENS_PER_PARAM", 1e-6)   # as if the corpus were large: every candidate fits
    monkeypatch.setattr(auto, "MAX_EPOCHS", 1e6)              # and a long run would not run out of new text
    timed = []

    def speeds(fast):  # tokens/s by n_layer x n_embd; noise within a bucket changes nothing
        def time_candidate(mcfg, table, device, amp_dtype, deadline, rows):
            assert rows == 2  # the run's own batch is timed (--batch-size 2), not a smaller one
            timed.append(mcfg.n_layer * 1000 + mcfg.n_embd)
            return fast[(mcfg.n_layer, mcfg.n_embd)] * (1 + 0.01 * len(timed))
        return time_candidate

    choices = []
    for fast in ({(2, 128): 1e6, (4, 128): 9e5, (4, 192): 8e5, (6, 256): 1e3},       # the big one is slow here
                 {(2, 128): 1e6, (4, 128): 9e5, (4, 192): 8e5, (6, 256): 1e3},       # again: the same choice
                 {(2, 128): 3e4, (4, 128): 20, (4, 192): 20, (6, 256): 20}):         # a slow machine: the small one
        monkeypatch.setattr(auto, "time_candidate", speeds(fast))
        out = tmp_path / f"run{len(choices)}"
        zaizai.train(data_dir, out, max_time=30.0, max_iters=1, threads=1, block_size=16, batch_size=2, eval_iters=1,
                     verbose=False)
        model = json.loads((out / "config.json").read_text(encoding="utf-8"))["model"]
        choices.append((model["n_layer"], model["n_embd"]))
    # each candidate timed twice, in turn; the slow machine: after 4x128 the next candidate would not be timed
    # within 5% of the budget (predicted), and only 2x128 fits a second time
    assert len(timed) == 2 * 2 * len(AUTO_CANDIDATES) + 3
    assert choices[0] == choices[1] == (4, 192) and choices[2] == (2, 128)
    monkeypatch.setattr(auto, "time_candidate", lambda *a: pytest.fail("resume measured again"))
    resumed = zaizai.train(out_dir=tmp_path / "run0", resume=True, max_iters=2, verbose=False)
    assert resumed.step == 2
    assert load_checkpoint(tmp_path / "run0" / LAST).model_config["n_embd"] == 192


def test_auto_times_candidates_in_turn_and_keeps_each_ones_fastest(monkeypatch):
    """A slow moment of the machine during one candidate's timing does not decide the choice: while the
    allowance lasts each timed candidate is timed again, after the others, and its fastest counts."""
    import zaizai.training.autopreset as auto

    speeds = {"a": iter([5_000.0, 8_000.0]), "b": iter([4_000.0, 3_900.0])}  # a's first timing was a slow moment
    monkeypatch.setattr(auto, "time_candidate", lambda mcfg, *a, **k: next(speeds[mcfg.name]))
    cands = [auto.Candidate(name, SimpleNamespace(name=name, block_size=64), {}, params=1, flops=1.0,
                            tokens_per_step=64, rows=1) for name in "ab"]
    auto._measure(cands, torch.device("cpu"), None, allowance=60.0)
    assert [c.speed for c in cands] == [auto.bucket(8_000), auto.bucket(4_000)]
    assert auto.bucket(8_000) / auto.bucket(5_000) > 1.5 and auto.bucket(4_000) != auto.bucket(5_000)


def test_auto_with_another_model_is_the_cpu_preset(tmp_path, data_dir):
    from zaizai.training.config import PRESETS

    zaizai.train(data_dir, tmp_path / "gpt", model="gpt", max_iters=1, threads=1, verbose=False)
    saved = json.loads((tmp_path / "gpt" / "config.json").read_text(encoding="utf-8"))
    assert saved["train"]["preset"] == "cpu" and saved["train"]["optimizer"] == "adamw"
    for key, value in PRESETS["cpu"].items():
        assert saved["model" if key in saved["model"] else "train"][key] == value
