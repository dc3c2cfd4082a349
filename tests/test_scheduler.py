"""The generation worker's admission, without a server: each waiting request is checked once, a bad one fails
alone and the others join in one prefill and run to their end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from zaizai.inference.batch import Batch
from zaizai.inference.sampling import SamplingConfig
from zaizai.serve.scheduler import Generation, Job, Scheduler
from util import DECODE_VOCAB as VOCAB, decode_model, decode_prompt as prompt

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingBatch(Batch):
    """A batch that records the ids of every check and the size of every add_many."""

    def __init__(self, model, device):
        super().__init__(model, device)
        self.checked: list[list[int]] = []
        self.admitted: list[int] = []

    def check(self, ids, cfg, *rest):
        self.checked.append(list(ids))
        return super().check(ids, cfg, *rest)

    def add_many(self, requests):
        self.admitted.append(len(requests))
        return super().add_many(requests)


def test_each_request_is_checked_once_and_a_bad_one_fails_alone():
    tokenizer = SimpleNamespace(special_ids={}, decode=lambda ids: "".join(chr(0x4E00 + i) for i in ids))
    bot = SimpleNamespace(model=decode_model(), device=torch.device("cpu"), tokenizer=tokenizer)
    scheduler = Scheduler(bot, max_active=4)
    scheduler.close()  # no worker thread: this test runs the worker's steps itself, one after another
    scheduler.thread.join(10)
    assert not scheduler.thread.is_alive()
    batches = []
    scheduler.new_batch = lambda: batches.append(CountingBatch(bot.model, bot.device)) or batches[-1]
    good = [prompt(4, seed=1), prompt(7, seed=2)]
    requests = [Generation(bot, good[0], SamplingConfig(max_new_tokens=3, temperature=0), set(), []),
                Generation(bot, [VOCAB], SamplingConfig(max_new_tokens=3), set(), []),  # not in the vocabulary
                Generation(bot, good[1], SamplingConfig(max_new_tokens=5, temperature=0.8, seed=1), set(), [])]
    events: list[list] = [[], [], []]
    jobs = [Job(g, events[k].append) for k, g in enumerate(requests)]
    with scheduler.lock:
        scheduler.active += len(jobs)  # what taking them from the queue counts
    scheduler._start(jobs)
    while scheduler.running:
        scheduler._step()
    batch, = batches
    assert batch.checked == [good[0], [VOCAB], good[1]]  # once each (add_many took them as checked)
    assert batch.admitted == [2]  # the good ones in one prefill
    assert [e[0] for e in events[1]] == ["error"] and "token ids must be in" in str(events[1][0][1])
    for k in (0, 2):
        assert events[k][0] == ("started", None) and events[k][-1] == ("done", None)
    assert [g.completion_tokens for g in requests] == [3, 0, 5]
    stats = scheduler.stats()
    assert stats["completed"] == 2 and stats["failed"] == 1 and stats["active"] == 0


@pytest.mark.parametrize("compile", [False, True])
def test_the_worker_batch_steps_compiled_as_the_bot_says(compile):
    """`zaizai serve --compile` turns the bot's compile on: the worker's batches then step a lone generation
    through the compiled step (zaizai.models.compiled); without it, never."""
    bot = SimpleNamespace(model=decode_model(), device=torch.device("cpu"), compile=compile)
    scheduler = Scheduler(bot, max_active=2)
    scheduler.close()
    scheduler.thread.join(10)
    assert (scheduler.new_batch().decoder.compiled is not None) is compile
