"""The compiled decode step (--compile): the same logits as the eager step, one compilation for every cache length
and row count, the same greedy text, and the eager step where compiling fails."""

from __future__ import annotations

import shutil

import pytest
import torch

from zaizai.common.errors import ZaizaiError
from zaizai.inference.generate import generate_ids
from zaizai.inference.sampling import SamplingConfig
from zaizai.models import compiled
from zaizai.models.decode import decoder_for
from util import decode_model as make, decode_prompt as prompt, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
# Inductor compiles C++: without a compiler, --compile says so and steps eagerly (the fallback test needs none)
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="no C++ compiler here for torch.compile's CPU kernels")

KINDS = [  # (model, options): GPT-2; Qwen3-style with grouped-query attention; Llama-style (no QK-norm)
    ("gpt", {}),
    ("modern", dict(n_head=4, n_kv_head=2)),
    ("modern", dict(n_head=2, qk_norm=False)),
]


def greedy_steps_equal(fast, eager, ids: list[int], n: int) -> None:
    """Prefill row 0 of a compiled and an eager decoder with ``ids``, then n greedy steps: equal logits each time."""
    a, b = fast.prefill(0, ids), eager.prefill(0, ids)
    for _ in range(n):
        token = b.argmax().view(1)
        a, b = fast.step(token), eager.step(token)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("name, options", KINDS)
@torch.inference_mode()
def test_compiled_steps_equal_the_eager_ones_compiled_once_for_every_length_and_row_count(name, options):
    model = make(name, **options)
    fast, eager = decoder_for(model, 1, compile=True), decoder_for(model, 1)
    assert fast.compiled is not None and eager.compiled is None
    ids = prompt(5)
    greedy_steps_equal(fast, eager, ids, 15)
    runner, packages = fast.compiled.runner, dict(compiled._COMPILED)  # the first compiled step loaded it
    fast._room(5)  # a server's cache grows: the rows' views keep their strides, nothing compiles again
    eager._room(5)
    greedy_steps_equal(fast, eager, ids[:3], 3)
    assert fast.compiled.runner is runner and compiled._COMPILED == packages
    assert fast.compiled.steps == 15 + 3  # every step: row 0 alone, at least MIN_PAST tokens before it
    assert fast.lengths == eager.lengths
    torch.testing.assert_close(fast.kv[:, :, 0], eager.kv[:, :, 0], rtol=1e-5, atol=1e-4)  # it wrote row 0's cache
    for d in (fast, eager):  # a second row joins: the eager step of both rows reads what the compiled steps wrote
        d.prefill(1, prompt(4, seed=1))
    torch.testing.assert_close(fast.step([7, 8]), eager.step([7, 8]), rtol=1e-5, atol=1e-4)
    assert fast.compiled.steps == 18 and fast.positions[:2].tolist() == eager.positions[:2].tolist()


@needs_compiler
@torch.inference_mode()
def test_with_16_bit_weights_the_compiled_steps_write_the_cache_the_eager_steps_read():
    """16-bit weights: the compiled step reads a 16-bit copy of row 0's cache and writes the new keys and values into
    it and into the decoder's own cache, rounded as the eager step rounds them: a row that joins later steps
    eagerly beside it with the same logits as an eager decoder's."""
    model = make("modern", n_head=4, n_kv_head=2)
    compiled.round_weights(model, torch.float16)
    fast, eager = decoder_for(model, 1, compile=True), decoder_for(model, 1)
    greedy_steps_equal(fast, eager, prompt(5), 6)
    assert fast.compiled.steps == 6 and fast.compiled.mirrored == 11
    torch.testing.assert_close(fast.kv[:, :, 0, :, :11], eager.kv[:, :, 0, :, :11], rtol=1e-5, atol=1e-4)
    for d in (fast, eager):
        d.prefill(1, prompt(4, seed=1))
    torch.testing.assert_close(fast.step([7, 8]), eager.step([7, 8]), rtol=1e-5, atol=1e-4)
    assert fast.compiled.steps == 6


@needs_compiler
@torch.inference_mode()
def test_several_rows_and_a_full_row_step_as_before():
    model = make()
    fast, eager = decoder_for(model, 2, compile=True), decoder_for(model, 2)
    for d in (fast, eager):
        d.prefill_many([0, 1], [prompt(4), prompt(7, seed=1)])
    steps = fast.compiled.steps
    torch.testing.assert_close(fast.step(torch.tensor([7, 8])), eager.step(torch.tensor([7, 8])), rtol=1e-5, atol=1e-4)
    assert fast.compiled.steps == steps  # two rows: the eager step
    for d in (fast, eager):
        d.release(1)
        d.prefill(0, prompt(24))  # block_size tokens: the row is full
    for d in (fast, eager):
        with pytest.raises(ZaizaiError, match="full"):
            d.step(torch.tensor([7]))


@needs_compiler
@pytest.mark.parametrize("name, options", KINDS[:2])
def test_generation_gives_the_same_text_compiled_past_the_window(name, options):
    model = make(name, **options)
    for seed, cfg in enumerate([SamplingConfig(max_new_tokens=40, temperature=0),
                                SamplingConfig(max_new_tokens=40, temperature=0.8, top_k=20, seed=3)]):
        ids = prompt(10, seed=seed)  # 10 + 40 tokens: the 24-token window slides twice
        assert list(generate_ids(model, ids, cfg, compile=True)) == list(generate_ids(model, ids, cfg))


@needs_compiler
def test_the_compiled_step_gives_the_greedy_token_and_says_when_the_logits_are_not_finite():
    from zaizai.inference.batch import Batch

    batch = Batch(make(), compile=True)
    seq = batch.add(prompt(5), SamplingConfig(max_new_tokens=10, temperature=0))
    tokens = [batch.step()[0][1] for _ in range(4)]
    with torch.inference_mode():
        batch.step()  # the pending token through the compiled step: its argmax and finiteness come with the logits
        assert batch.decoder.compiled.steps == 4 and seq.finite and seq.best == int(seq.logits.argmax())
        batch.decoder.kv[:, :, 0, :, 1] = float("nan")  # row 0's cache broken: the next step's logits are nan
    assert batch.step() == [(seq, None)] and seq.finish_reason == "error" and "nan/inf" in seq.error
    assert tokens == list(generate_ids(make(), prompt(5), SamplingConfig(max_new_tokens=4, temperature=0)))


@torch.inference_mode()
def test_a_compiler_that_fails_is_said_once_and_the_eager_step_goes_on(monkeypatch, capsys, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setenv("ZAIZAI_CACHE_DIR", str(tmp_path))  # nothing compiled yet
    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)  # as without gcc
    monkeypatch.setattr(compiled, "_FAILED", [])
    model = make()
    fast, eager = decoder_for(model, 1, compile=True), decoder_for(model, 1)
    ids = prompt(6)
    fast.prefill(0, ids), eager.prefill(0, ids)
    for token in (9, 10, 11):
        torch.testing.assert_close(fast.step(torch.tensor([token])), eager.step(torch.tensor([token])))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not compile the decode step (InvalidCxxCompiler: No working C++" in err
    assert "C++ compiler" in err and fast.compiled.steps == 0
    assert fast.lengths == eager.lengths  # nothing was written by the failed call
    assert not list(tmp_path.rglob("*.pt2"))


def test_compile_applies_to_gpt_and_modern_on_cpu_only():
    assert decoder_for(make("rnn", n_layer=1), 1, compile=True).__class__.__name__ == "RNNDecoder"
    assert getattr(decoder_for(make("bigram"), 1, compile=True), "compiled", None) is None


@needs_compiler
def test_sample_and_chat_with_compile_write_the_same_text_and_serve_compiles_first(tmp_path, monkeypatch):
    from util import TINY, write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    assert run_cli("prepare", corpus, "--out", tmp_path / "data").returncode == 0
    flags = [f for k, v in TINY.items() for f in ("--" + k.replace("_", "-"), str(v))]
    r = run_cli("train", tmp_path / "data", "--out", tmp_path / "out", "--max-iters", "10", *flags)
    assert r.returncode == 0, r.stderr
    for args in (("sample", tmp_path / "out", "--prompt", "床前", "--max-new-tokens", "20", "--temperature", "0"),
                 ("chat", tmp_path / "out", "-m", "你好", "--max-new-tokens", "20", "--temperature", "0")):
        plain, fast = run_cli(*args), run_cli(*args, "--compile")
        assert fast.returncode == 0, fast.stderr
        assert "compiling the decode step" in fast.stderr and "could not compile" not in fast.stderr
        assert fast.stdout == plain.stdout and len(plain.stdout) > 2

    # serve --compile: compiled before the server listens, in a thread that has ended (see off_main_thread)
    import threading

    import uvicorn

    from zaizai.inference.loaded import Zaizai
    from zaizai.serve import app

    compiled_in = []
    real = Zaizai.compile_decoding

    def compile_decoding(bot, say=None, weights="float32"):  # records the thread it ran on, and whether it applied
        compiled_in.append(threading.current_thread() is threading.main_thread())
        compiled_in.append(real(bot, say=say, weights=weights))
        return compiled_in[-1]

    class NoServer:
        def __init__(self, config):
            pass

        def run(self):
            compiled_in.append("listening")

    monkeypatch.setattr(Zaizai, "compile_decoding", compile_decoding)
    monkeypatch.setattr(uvicorn, "Server", NoServer)
    app.serve(tmp_path / "out", port=8765, compile=True)
    assert compiled_in == [False, True, "listening"]


def test_compile_decoding_says_when_it_does_not_apply():
    import io

    bot = _bot(make("rnn", n_layer=1))
    said = io.StringIO()
    assert bot.compile_decoding(say=said) is False and bot.compile is False
    assert "applies to gpt and modern models on CPU" in said.getvalue()


def _steps_equal_eager(model) -> int:
    """3 greedy steps of a compiled and an eager decoder of ``model``: equal logits. -> the compiled steps that ran."""
    fast, eager = decoder_for(model, 1, compile=True), decoder_for(model, 1)
    greedy_steps_equal(fast, eager, prompt(4), 3)
    return fast.compiled.steps


@needs_compiler
@torch.inference_mode()
def test_each_model_shape_is_compiled_once_and_kept_on_disk_for_later_runs(monkeypatch, tmp_path):
    """The compiled step of a model shape is a package in the cache folder: a later process (here: the in-process
    table emptied) loads it without compiling; another shape gets a package of its own; a damaged package is
    compiled again; where the cache folder cannot be written, the step is compiled all the same. A package unused
    for KEEP_DAYS days is deleted when another is written; loading one marks it used."""
    import os
    import time

    monkeypatch.setenv("ZAIZAI_CACHE_DIR", str(tmp_path))
    (tmp_path / "compiled").mkdir()
    day = 86400
    for name, age in [("step-old.pt2", compiled.KEEP_DAYS + 1), ("step-recent.pt2", compiled.KEEP_DAYS - 1)]:
        (tmp_path / "compiled" / name).write_bytes(b"PK")
        os.utime(tmp_path / "compiled" / name, (time.time() - age * day,) * 2)
    monkeypatch.setattr(compiled, "_COMPILED", {})
    built, real, made = len(compiled.BUILT), compiled._build, {}

    def build(step, example):  # each shape's C++ compiled once: a second build gives its bytes
        key = compiled._package_key(step, compiled._nest(example, *step.shape)[2])
        made[key] = made.get(key) or real(step, example)
        return made[key]

    monkeypatch.setattr(compiled, "_build", build)
    assert _steps_equal_eager(make(n_embd=40)) == 3
    assert not (tmp_path / "compiled" / "step-old.pt2").exists()  # unused for too long: deleted
    (tmp_path / "compiled" / "step-recent.pt2").unlink()  # kept; out of the way now
    packages = sorted((tmp_path / "compiled").glob("step-*.pt2"))
    assert len(compiled.BUILT) == built + 1 and len(packages) == 1
    assert [type(run).__name__ for run in compiled._COMPILED.values()] == ["function"]  # called directly (_direct)
    monkeypatch.setattr(compiled, "_COMPILED", {})  # a new process
    os.utime(packages[0], (time.time() - 10 * day,) * 2)
    assert _steps_equal_eager(make(n_embd=40)) == 3 and len(compiled.BUILT) == built + 1  # loaded, not compiled
    assert time.time() - packages[0].stat().st_mtime < day  # and marked used
    assert _steps_equal_eager(make(n_embd=56)) == 3 and len(compiled.BUILT) == built + 2
    assert len(list((tmp_path / "compiled").glob("step-*.pt2"))) == 2
    packages[0].write_bytes(b"not a package")
    monkeypatch.setattr(compiled, "_COMPILED", {})
    assert _steps_equal_eager(make(n_embd=40)) == 3 and len(compiled.BUILT) == built + 3
    assert packages[0].read_bytes()[:2] == b"PK"  # a package (a zip file) again, in its place
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("ZAIZAI_CACHE_DIR", str(blocked))
    monkeypatch.setattr(compiled, "_COMPILED", {})
    assert _steps_equal_eager(make(n_embd=40)) == 3 and len(compiled.BUILT) == built + 4


def matrices(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_weights_rounds_the_matrices_only(dtype):
    model, plain = make("modern", n_head=4, n_kv_head=2), make("modern", n_head=4, n_kv_head=2)
    compiled.round_weights(model, dtype)
    assert model.weights_dtype == dtype and not hasattr(plain, "weights_dtype")
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.dtype == torch.float32
        if p.dim() == 2:
            assert torch.equal(p, q.to(dtype).float()), name
        else:
            assert torch.equal(p, q), name  # norms and biases as they were
    assert not all(torch.equal(p, q) for p, q in zip(matrices(model), matrices(plain)))


def test_flatten_lays_out_every_tensor_once_and_unflatten_gives_them_back():
    a, b, c = torch.randn(5, 3), torch.randn(7), torch.randn(2, 2).half()
    weights = (a, (b, True, a), c, 1e-5)
    buffers, layout = compiled.flatten(weights)
    assert [x.dtype for x in buffers] == [torch.float32, torch.float16]
    assert buffers[0].numel() == 2 * compiled.ALIGN and buffers[1].numel() == compiled.ALIGN  # a once: tied
    back = compiled.unflatten(buffers, layout)
    assert torch.equal(back[0], a) and torch.equal(back[1][0], b) and back[1][1] is True
    assert torch.equal(back[1][2], a) and torch.equal(back[2], c) and back[3] == 1e-5
    assert back[0].data_ptr() == back[1][2].data_ptr()  # views of one buffer


def test_flat_weights_are_made_once_per_model_and_again_after_a_change():
    model = make()
    first, second = decoder_for(model, 1, compile=True), decoder_for(model, 1, compile=True)
    assert first.compiled.buffers is second.compiled.buffers  # a Batch makes a decoder per generation
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(1.0)  # training, or a load, changes the weights
    third = decoder_for(model, 1, compile=True)
    assert third.compiled.buffers is not first.compiled.buffers
    assert torch.equal(compiled.unflatten(third.compiled.buffers, third.compiled.layout)[2],
                       model.transformer.ln_f.weight)


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_tied_embeddings_are_stored_once_in_the_flat_weights(dtype):
    model = make()  # GPT-2: the output layer's weight is the token embedding's
    assert model.lm_head.weight is model.transformer.wte.weight
    if dtype is not None:
        compiled.round_weights(model, dtype)
    buffers = decoder_for(model, 1, compile=True).compiled.buffers
    padded = sum(-(-p.numel() // compiled.ALIGN) * compiled.ALIGN for p in model.parameters())  # each once
    assert sum(b.numel() for b in buffers) == padded


@needs_compiler
@pytest.mark.parametrize("name, options", KINDS[:2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_a_16_bit_compiled_step_reads_half_the_bytes_and_gives_the_rounded_models_logits(name, options, dtype):
    """With round_weights, the compiled step keeps the matrices in 16 bits (the model's vectors in fp32) and
    computes in fp32: the logits of the eager step on the same, rounded, weights; the text is the same."""
    model = make(name, **options)
    compiled.round_weights(model, dtype)
    fast, eager = decoder_for(model, 1, compile=True), decoder_for(model, 1)
    sixteen = [b for b in fast.compiled.buffers if b.dtype == dtype]
    assert len(sixteen) == 1 and len(fast.compiled.buffers) == 2
    stored = {id(p): p.numel() for p in matrices(model)}  # tied embeddings once
    assert sum(stored.values()) <= sixteen[0].numel() < sum(stored.values()) + compiled.ALIGN * len(stored)
    greedy_steps_equal(fast, eager, prompt(5), 8)
    assert fast.compiled.steps == 8
    cfg = SamplingConfig(max_new_tokens=30, temperature=0)
    assert list(generate_ids(model, prompt(6), cfg, compile=True)) == list(generate_ids(model, prompt(6), cfg))


@needs_compiler
@pytest.mark.parametrize("name, options", KINDS[:2])
@torch.inference_mode()
def test_16_bit_keys_and_values_follow_row_0_through_moves_new_sequences_and_batched_steps(name, options):
    """With 16-bit weights the cache holds keys and values rounded to 16 bits (eager or compiled alike), and the
    compiled step reads row 0 from a 16-bit copy, brought up to date after eager steps and started over when row
    0 gets another sequence: every step's logits are the eager decoder's."""
    model = make(name, **options)
    compiled.round_weights(model, torch.float16)
    fast, eager = decoder_for(model, 2, compile=True), decoder_for(model, 2)

    def both(call, *args):
        a, b = getattr(fast, call)(*args), getattr(eager, call)(*args)
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)

    both("prefill_many", [0, 1], [prompt(4), prompt(7, seed=1)])
    assert torch.equal(eager.kv, eager.kv.half().float())  # rounded as written
    for token in (7, 8):
        both("step", torch.tensor([token, token + 1]))  # two rows: eager, row 0's copy falls behind
    for token in (9, 10):
        both("step", torch.tensor([token]))  # row 1 waits: row 0 alone, compiled, its copy caught up
    both("release", 0)
    both("move", 1, 0)  # row 1's sequence into row 0: the copy starts over
    for token in (11, 12, 13):
        both("step", torch.tensor([token]))
    both("prefill", 0, prompt(5, seed=2))  # a new sequence in row 0
    for token in (14, 15):
        both("step", torch.tensor([token]))
    assert fast.compiled.steps == 7 and fast.compiled.mirror.dtype == torch.float16
    torch.testing.assert_close(fast.kv[:, :, 0], eager.kv[:, :, 0], rtol=1e-5, atol=1e-4)


def _bot(model):
    from pathlib import Path

    from zaizai.inference.loaded import Zaizai

    return Zaizai(model, None, model.config, {}, {}, torch.device("cpu"), Path("."))


def test_compile_decoding_refuses_an_unknown_weights_type_and_rounds_nothing_where_it_does_not_apply():
    bot = _bot(make())
    with pytest.raises(ZaizaiError, match="unknown weights type 'int8'"):
        bot.compile_decoding(weights="int8")
    rnn = make("rnn", n_layer=1)
    before = [p.clone() for p in rnn.parameters()]
    assert _bot(rnn).compile_decoding(weights="float16") is False
    assert all(torch.equal(p, q) for p, q in zip(rnn.parameters(), before)) and not hasattr(rnn, "weights_dtype")


@needs_compiler
def test_compile_decoding_with_16_bit_weights_rounds_the_model_and_gives_its_text():
    model, rounded = make(), make()
    compiled.round_weights(rounded, torch.bfloat16)
    bot = _bot(model)
    assert bot.compile_decoding(weights="bfloat16") is True and model.weights_dtype == torch.bfloat16
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), rounded.parameters()))
    cfg = SamplingConfig(max_new_tokens=20, temperature=0)
    assert list(bot.stream_ids(prompt(6), cfg)) == list(generate_ids(rounded, prompt(6), cfg))


def test_a_loaded_package_is_called_on_its_inputs_in_the_order_its_own_call_lays_them_out():
    """_direct skips the package's per-call pytree lay-out: it gives the loader the tensors in the order that lay-out
    gives (token, span, each layer's keys and values read, then written, the weight buffers), a copy of the list
    (the loader empties it); without such a loader, the runner itself on the arguments again."""
    from torch.utils import _pytree

    class Loader:
        def boxed_run(self, flat):
            self.flat = list(flat)
            flat.clear()
            return ["logits", "choice"]

    class Runner:
        loader = Loader()

        def __call__(self, *args):
            self.args = args
            return ["called"]

    token, span = torch.tensor([5]), torch.empty(3)
    past = tuple((torch.zeros(2, 3, 4), torch.ones(2, 3, 4)) for _ in range(3))
    stored = tuple((torch.zeros(2, 3, 4), torch.ones(2, 3, 4)) for _ in range(3))
    buffers = (torch.zeros(8), torch.zeros(8, dtype=torch.float16))
    flat = compiled._flat(token, span, past, stored, buffers)
    call = compiled._direct(Runner(), flat, (3, 3))
    assert call(flat) == ["logits", "choice"] and call(flat) == ["logits", "choice"]  # flat is not emptied
    expected = _pytree.tree_leaves(((token, span, past, stored, buffers), {}))
    assert len(Runner.loader.flat) == 2 + 6 + 6 + 2 == len(expected) == len(flat)
    assert all(a is b for a, b in zip(Runner.loader.flat, expected))
    plain = Runner()
    plain.loader = None
    assert compiled._direct(plain, flat, (3, 3))(flat) == ["called"]
    assert [len(part) for part in plain.args] == [1, 3, 3, 3, 2] and plain.args[2][1][0] is past[1][0]


def test_the_cache_folder_is_zaizai_cache_dir_else_xdg_cache_home_else_the_home_folders(monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.delenv("ZAIZAI_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compiled.cache_dir() == tmp_path / "home" / ".cache" / "zaizai"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compiled.cache_dir() == tmp_path / "xdg" / "zaizai"
    monkeypatch.setenv("ZAIZAI_CACHE_DIR", str(tmp_path / "mine"))
    assert compiled.cache_dir() == Path(tmp_path / "mine")
