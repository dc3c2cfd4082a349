"""Continuous batching in the server: a request's text is the same alone and in a batch, a client that goes away
frees its row before the next step and a cancelled waiting request its queue place at once, and a generation whose
scores (or whose sampling) become nan/inf fails alone while the others complete."""

import asyncio
import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from test_server import LiveServer, PacedBatch, assert_openai_error, bot, paced, wait_for  # noqa: E402,F401
from zaizai.inference import prompt  # noqa: E402
from zaizai.inference.sampling import SamplingConfig  # noqa: E402
from zaizai.serve.app import create_app  # noqa: E402
from zaizai.serve.scheduler import Generation, Job, QueueFull, Scheduler, Submission  # noqa: E402

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def user(text):
    return [{"role": "user", "content": text}]


def ask(url: str, path: str, body: dict) -> dict:
    """One request, whole or streamed: its status, text, finish reason, completion tokens and error (if any)."""
    r = httpx.post(url + path, json=body, timeout=60)
    if r.status_code != 200:
        return {"status": r.status_code, "error": r.json()["error"]}
    if not body.get("stream"):
        data = r.json()
        choice = data["choices"][0]
        return {"status": 200, "text": choice["message"]["content"] if path == CHAT else choice["text"],
                "finish": choice["finish_reason"], "tokens": data["usage"]["completion_tokens"]}
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    if "error" in chunks[-1]:
        return {"status": 200, "error": chunks[-1]["error"], "chunks": len(chunks) - 1}
    pieces = [c["choices"][0]["delta"].get("content") or "" if path == CHAT else c["choices"][0]["text"]
              for c in chunks if c["choices"]]
    return {"status": 200, "text": "".join(pieces), "finish": chunks[-1]["choices"][0]["finish_reason"]}


def together(live: LiveServer, requests: list[tuple[str, dict]]) -> list[dict]:
    """Send ``requests`` at once to ``live``, a server made by :func:`gated`: its worker's first step waits until
    all of them are in (running or waiting), so that they all run in one batch from its second step on."""
    live.gate.set()
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: ask(live.url, *r), requests))
    wait_for(lambda: live.stats["active"] == 0)
    return answers


def gated(bot, n: int, **kwargs) -> LiveServer:
    """A live server whose worker, once ``gate`` is set, holds its next step until ``n`` requests are in."""
    gate = threading.Event()
    app = create_app(bot, **kwargs)
    scheduler = app.state.scheduler

    def pace(batch):
        if gate.is_set():
            wait_for(lambda: len(batch) + scheduler.stats()["waiting"] >= n)
            gate.clear()

    live = LiveServer(paced(app, pace))
    live.gate = gate
    return live


REQUESTS = [
    (CHAT, {"messages": user("你好"), "temperature": 0, "max_tokens": 12}),
    (CHAT, {"messages": user("你会什么"), "temperature": 0.9, "top_p": 0.95, "seed": 3, "max_tokens": 12,
            "stream": True}),
    (TEXT, {"prompt": "早上", "temperature": 0, "max_tokens": 10, "ignore_eos": True, "stream": True}),
    (TEXT, {"prompt": "你好，我是", "temperature": 1.0, "top_k": 20, "repetition_penalty": 1.3, "seed": 11,
            "max_tokens": 14, "ignore_eos": True}),
    (CHAT, {"messages": user("你好"), "temperature": 0.7, "seed": 5, "max_tokens": 40, "ignore_eos": True,
            "stop": ["。"]}),
    (TEXT, {"prompt": "你好，我是崽崽。你好", "temperature": 0, "max_tokens": 30, "ignore_eos": True}),
]


def test_a_requests_text_is_the_same_alone_and_in_a_batch(bot):
    live = gated(bot, len(REQUESTS))
    try:
        alone = [ask(live.url, path, body) for path, body in REQUESTS]
        assert live.stats["peak_batch"] == 1
        batched = together(live, REQUESTS)
        stats = live.stats
    finally:
        live.stop()
    assert all(a["status"] == 200 and a["text"] for a in alone), alone
    assert batched == alone
    assert stats["peak_batch"] >= len(REQUESTS) - 1 and stats["completed"] == 2 * len(REQUESTS)
    assert stats["failed"] == stats["cancelled"] == stats["active"] == stats["waiting"] == 0


def poisoned(bot, position: int):
    """A copy of ``bot`` whose position ``position`` embeds as nan: a sequence that reaches it gets nan scores,
    one that stays before it is untouched."""
    other = copy.deepcopy(bot)
    with torch.no_grad():
        other.model.transformer.wpe.weight[position] = float("nan")
    return other


def test_a_generation_whose_scores_become_nan_fails_alone(bot):
    long = "你好，我是崽崽。你好，我是"
    n = len(prompt.fit_text(bot.tokenizer, long, bot.model_config.block_size, 10))
    short = {"prompt": "早上", "temperature": 0, "max_tokens": 8, "ignore_eos": True}
    assert 3 + 8 < n + 3 < bot.model_config.block_size  # the short one never reaches the poisoned position
    clean = LiveServer(create_app(bot))
    try:
        expected = ask(clean.url, TEXT, short)
    finally:
        clean.stop()
    nan = {"prompt": long, "temperature": 0, "max_tokens": 10, "ignore_eos": True}
    live = gated(poisoned(bot, n + 3), 3)  # the long prompt's 4th token is fed at n + 3: its scores are nan
    try:
        streamed, whole, fine = together(live, [(TEXT, {**nan, "stream": True}), (TEXT, nan), (TEXT, short)])
        stats = live.stats
    finally:
        live.stop()
    assert streamed["error"]["code"] == "generation_failed" and streamed["error"]["type"] == "server_error"
    assert streamed["chunks"] >= 1 and "nan/inf after 4 tokens" in streamed["error"]["message"]  # in the stream
    assert whole == {"status": 500, "error": {"message": streamed["error"]["message"], "type": "server_error",
                                              "param": None, "code": "generation_failed"}}
    assert fine == expected and fine["tokens"] == 8
    assert stats["failed"] == 2 and stats["completed"] == 1 and stats["peak_batch"] == 3


def test_a_generation_whose_sampling_overflows_fails_alone(bot):
    """Finite scores so large that a small temperature takes them to inf: the draw has no probabilities (the
    sampler raises); that generation fails, a greedy one in the same batch completes with its usual text."""
    body = {"messages": user("你好"), "max_tokens": 8, "ignore_eos": True}
    clean = LiveServer(create_app(bot))
    try:
        expected = ask(clean.url, CHAT, {**body, "temperature": 0})
    finally:
        clean.stop()
    huge = copy.deepcopy(bot)
    with torch.no_grad():
        ids = torch.tensor([prompt.fit_text(bot.tokenizer, "你好，我是崽崽。", 32, 8)])
        scale = 1e36 / huge.model(ids)[0].abs().max().item()  # the largest score about 1e36: finite, / 1e-3 not
        huge.model.transformer.ln_f.weight.mul_(scale)
        huge.model.transformer.ln_f.bias.mul_(scale)
    live = gated(huge, 2)
    try:
        overflow, greedy = together(live, [(CHAT, {**body, "temperature": 1e-3}), (CHAT, {**body, "temperature": 0})])
    finally:
        live.stop()
    assert overflow["status"] == 500 and overflow["error"]["code"] == "generation_failed"
    assert greedy == expected


def test_a_failing_step_fails_its_batch_and_the_next_request_gets_a_new_one(bot):
    app = create_app(bot)
    failures = []

    def pace(batch):
        if not failures:
            failures.append(1)
            raise RuntimeError("out of memory")

    live = LiveServer(paced(app, pace))
    try:
        first = ask(live.url, CHAT, {"messages": user("你好"), "max_tokens": 4, "stream": True})
        second = ask(live.url, CHAT, {"messages": user("你好"), "max_tokens": 4})
    finally:
        live.stop()
    assert first["error"]["code"] == "generation_failed" and "out of memory" in first["error"]["message"]
    assert second["status"] == 200 and second["tokens"] > 0


# --- the worker itself ----------------------------------------------------------------------------------------------


def generation(bot, text: str = "你好", max_new_tokens: int = 2000) -> Generation:
    ids = prompt.fit_text(bot.tokenizer, text, bot.model_config.block_size, 8)
    return Generation(bot, ids, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0), set(), [])


def test_a_cancelled_generation_leaves_the_batch_before_the_next_step(bot):
    """A client that goes away (its submission closed) after 3 tokens: at most the step then under way gives it
    another token; its row is freed and counted at once, and the other generation runs on to its end."""
    scheduler = Scheduler(bot, max_active=4)
    paced_batches = []
    scheduler.new_batch = lambda: paced_batches.append(PacedBatch(bot.model, bot.device)) or paced_batches[-1]

    async def main():
        gone = Submission(scheduler, generation(bot))
        other = Submission(scheduler, generation(bot, "早上", 40))
        deadline = time.time() + 10
        while gone.job.generation.completion_tokens < 3:
            assert time.time() < deadline
            await asyncio.sleep(0.005)
        made = gone.job.generation.completion_tokens
        gone.close()
        while scheduler.stats()["cancelled"] == 0:
            assert time.time() < deadline, "the row was not freed"
            await asyncio.sleep(0.005)
        assert gone.job.generation.completion_tokens <= made + 1
        text = await other.text()
        return text, other.job.generation

    try:
        text, other = asyncio.run(main())
    finally:
        scheduler.close()
    stats = scheduler.stats()
    assert text and other.completion_tokens == 40 and other.finish_reason == "length"
    assert stats["cancelled"] == 1 and stats["completed"] == 1 and stats["active"] == stats["waiting"] == 0
    assert paced_batches[0].rows[-1] == 1  # the last steps ran the other one alone


class AdmittingBatch(PacedBatch):
    """A paced batch that records how many sequences each :meth:`add_many` call brought in."""

    def __init__(self, model, device, pace):
        super().__init__(model, device, pace)
        self.admitted: list[int] = []

    def add_many(self, requests):
        self.admitted.append(len(requests))
        return super().add_many(requests)


def test_waiting_requests_join_in_one_prefill_and_a_bad_one_fails_alone(bot):
    """Requests that came in during a step join together (one prefill for all); one whose prompt the model cannot
    take fails alone, the others run to their end."""
    hold = threading.Event()
    scheduler = Scheduler(bot, max_active=8)
    batches = []
    scheduler.new_batch = lambda: batches.append(AdmittingBatch(bot.model, bot.device, lambda b: hold.wait(10))) \
        or batches[-1]
    events: dict[str, list[str]] = {}

    def job(g: Generation, name: str) -> Job:
        return Job(g, lambda event: events.setdefault(name, []).append(event[0]))

    bad = Generation(bot, [bot.model_config.vocab_size], SamplingConfig(max_new_tokens=3), set(), [])
    jobs = [job(generation(bot, "你好", 5), "first"), job(generation(bot, "早上", 6), "a"),
            job(bad, "bad"), job(generation(bot, "你会什么", 7), "b")]
    try:
        scheduler.submit(jobs[0])
        wait_for(lambda: batches and len(batches[0]) == 1)  # the first runs, its step held: the others wait
        for j in jobs[1:]:
            scheduler.submit(j)
        hold.set()
        wait_for(lambda: scheduler.stats()["active"] == 0 and "done" in events.get("b", []))
    finally:
        scheduler.close()
    assert batches[0].admitted == [1, 2]
    assert events["bad"] == ["error"] and all(events[k][0] == "started" and events[k][-1] == "done"
                                              for k in ("first", "a", "b"))
    assert [j.generation.completion_tokens for j in jobs] == [5, 6, 0, 7]
    stats = scheduler.stats()
    assert stats["completed"] == 3 and stats["failed"] == 1


def test_a_cancelled_waiting_request_frees_its_place_in_the_queue_at_once(bot):
    scheduler = Scheduler(bot, max_active=1, max_waiting=1)
    scheduler.new_batch = lambda: PacedBatch(bot.model, bot.device)
    jobs = [Job(generation(bot), lambda event: None) for _ in range(3)]
    try:
        scheduler.submit(jobs[0])  # runs (or waits: then the queue is full all the same)
        scheduler.submit(jobs[1])
        with pytest.raises(QueueFull):
            scheduler.submit(jobs[2])
        scheduler.cancel(jobs[1])
        assert scheduler.stats()["cancelled"] == 1
        scheduler.submit(jobs[2])  # its place is free: no step, no wait
    finally:
        for job in jobs:
            scheduler.cancel(job)
        scheduler.close()


def test_the_worker_needs_no_model_until_the_first_request():
    scheduler = Scheduler(None)
    try:
        assert scheduler.batch is None and scheduler.stats()["max_active"] == 32
    finally:
        scheduler.close()


def test_the_model_loads_in_a_thread_that_ends_and_its_errors_reach_the_caller():
    """serve() loads the model off the main thread (so that only the generation thread runs OpenMP work):
    the value comes back, an error is raised in the caller as it was, and the loading thread is gone."""
    from zaizai.common.errors import ZaizaiError
    from zaizai.serve.app import off_main_thread

    names = []

    def work(x, *, y):
        names.append(threading.current_thread().name)
        return x + y

    assert off_main_thread(work, 2, y=3) == 5
    assert names == ["zaizai-load"]
    assert "zaizai-load" not in [t.name for t in threading.enumerate()]

    def broken():
        raise ZaizaiError("no checkpoint in out/")

    with pytest.raises(ZaizaiError, match="no checkpoint in out/"):
        off_main_thread(broken)
