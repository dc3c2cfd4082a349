"""The generation worker: one thread owns a :class:`~zaizai.inference.batch.Batch` and does continuous batching.

Every generation runs in one worker thread (:class:`Scheduler`), never on the event loop. The worker owns one
batch: each decode step advances every running generation by one token in a single forward pass of the model (rows
of different lengths side by side). Between steps, waiting requests join (their prompts are prefilled together, one
pass through the model for all, then they take part in the next step), finished ones leave, and cancelled ones (a
client that went away) are taken out before the next step, their row freed. Each generation keeps its own sampling
options and seed, so its text is the same whether it ran alone or in a batch (greedy: exactly).

At most ``max_active`` generations run at once, ``max_waiting`` more wait in a queue; one more raises
:class:`QueueFull` (the app answers 429). A generation whose scores (or whose draw) become nan/inf fails
alone (:class:`GenerationFailed`: the app answers 500, or an error event in a stream); the others go on.

:class:`Submission` is a request's side on the event loop: it submits a :class:`Generation` and hands its text
pieces over; closing it (or the client going away) cancels the generation.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..common.errors import ZaizaiError
from ..inference.batch import ERROR, LENGTH, Batch
from ..inference.text import IncrementalDecoder, TextPieces

DISCONNECT_POLL_S = 0.25


class QueueFull(Exception):
    """Raised by :meth:`Scheduler.submit` when ``max_active + max_waiting`` jobs are already in."""


class GenerationFailed(Exception):
    """A generation that ended in an error of its own (its scores became nan/inf); the rest of the batch went on."""


# --- one request's generation -----------------------------------------------------------------------------------


class Generation:
    """One request's generation: its prompt ids, sampling options, stop ids and strings; then its text decoder,
    token count and why it ended."""

    def __init__(self, bot, ids: list[int], sampling, stop_ids: set[int], stop: list[str]):
        self.ids, self.sampling, self.stop_ids = ids, sampling, stop_ids
        self.text = TextPieces(IncrementalDecoder(bot.tokenizer), stop)
        self.completion_tokens = 0
        self.ended: str | None = None  # "stop" or "length" once it has ended well
        self.cancelled = threading.Event()  # set when its request is gone: no further step for it

    @property
    def finish_reason(self) -> str:
        return self.ended or "stop"

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.ids), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.ids) + self.completion_tokens}


@dataclass(eq=False)
class Job:
    """A generation and ``emit``, which hands each event to the event loop: ("started", None) once its prompt is
    in the batch, ("piece", text), then ("done", None) or ("error", exception)."""

    generation: Generation
    emit: Callable[[tuple], None]


# --- the worker ---------------------------------------------------------------------------------------------------


class Scheduler:
    """One thread, one batch of up to ``max_active`` generations, ``max_waiting`` more queued (see the module
    docstring). The batch is made at the first request (:meth:`new_batch`), on the model of ``bot``."""

    def __init__(self, bot=None, max_active: int = 32, max_waiting: int = 64):
        if max_active < 1 or max_waiting < 0:
            raise ZaizaiError("--max-active must be >= 1 and --max-waiting >= 0")
        self.bot, self.max_active, self.max_waiting = bot, max_active, max_waiting
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.waiting: deque[Job] = deque()
        self.closed = False
        self.batch = None
        self.running: dict = {}  # a Sequence of the batch -> its job (only the worker touches it)
        self.active = self.completed = self.cancelled = self.failed = 0
        self.steps = 0      # decode steps run
        self.peak = 0       # the most generations one step advanced
        self.thread = threading.Thread(target=self._run, name="zaizai-generate", daemon=True)
        self.thread.start()

    def new_batch(self) -> Batch:
        # its rows grow as generations join, up to max_active; a lone one steps compiled with --compile
        return Batch(self.bot.model, self.bot.device, compile=self.bot.compile)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.closed:
                raise ZaizaiError("the server is shutting down")
            if self.active + len(self.waiting) >= self.max_active + self.max_waiting:
                raise QueueFull
            self.waiting.append(job)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """The request is gone: a waiting job leaves the queue now, a running one the batch before the next step
        (no-op for a job that has ended)."""
        job.generation.cancelled.set()
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
                self.cancelled += 1

    def stats(self) -> dict:
        with self.lock:
            return {"active": self.active, "waiting": len(self.waiting), "completed": self.completed,
                    "cancelled": self.cancelled, "failed": self.failed, "steps": self.steps,
                    "peak_batch": self.peak, "max_active": self.max_active}

    def close(self) -> None:
        """End the worker: generations still running or waiting get an error."""
        with self.lock:
            self.closed = True
            self.wake.notify()

    def _end(self, job: Job, outcome: str, event: tuple | None = None) -> None:
        with self.lock:
            self.active -= 1
            setattr(self, outcome, getattr(self, outcome) + 1)
        if event is not None:
            emit(job, event)

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                break
            self._start(jobs)
            self._drop_cancelled()
            if self.running:
                self._step()
        gone = ZaizaiError("the server is shutting down; try again when it is back")
        for job in list(self.running.values()):
            self._end(job, "failed", ("error", gone))
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
            self.failed += len(waiting)
        for job in waiting:
            emit(job, ("error", gone))

    def _take(self) -> list[Job] | None:
        """The waiting jobs that fit in the batch (waiting for one while none runs); None once closed."""
        with self.wake:
            while not (self.closed or self.waiting or self.running):
                self.wake.wait()
            if self.closed:
                return None
            room = self.max_active - len(self.running)
            jobs = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            self.active += len(jobs)
            return jobs

    def _start(self, jobs: list[Job]) -> None:
        """Prefill the jobs' prompts, all in one pass: they join the batch, and the next step gives their first
        tokens. A job cancelled meanwhile, or one the model cannot take, ends alone: each is checked here, once
        (:meth:`Batch.add_many` takes the checked requests as they are)."""
        ready = []  # (job, its request as the batch checked it)
        for job in jobs:
            g = job.generation
            if g.cancelled.is_set():
                self._end(job, "cancelled")
                continue
            try:
                if self.batch is None:
                    self.batch = self.new_batch()
                request = self.batch.check(g.ids, g.sampling, g.stop_ids)
            except Exception as e:  # noqa: BLE001 (handed to the request, which answers it)
                self._end(job, "failed", ("error", e))
                continue
            ready.append((job, request))
        if not ready:
            return
        try:
            seqs = self.batch.add_many([request for _, request in ready])
        except Exception as e:  # noqa: BLE001 (the prefill itself failed: none of them joined)
            for job, _ in ready:
                self._end(job, "failed", ("error", e))
            return
        for (job, _), seq in zip(ready, seqs):
            emit(job, ("started", None))
            self.running[seq] = job

    def _drop_cancelled(self) -> None:
        for seq, job in list(self.running.items()):
            if job.generation.cancelled.is_set():
                self.batch.cancel(seq)
                del self.running[seq]
                self._end(job, "cancelled")

    def _step(self) -> None:
        """One token for every running generation; those that ended leave."""
        try:
            events = self.batch.step()
        except Exception as e:  # noqa: BLE001 (a step that fails takes its batch with it: start a new one)
            error = GenerationFailed(f"generation failed: {type(e).__name__}: {e}")
            for job in self.running.values():
                self._end(job, "failed", ("error", error))
            self.running, self.batch = {}, None
            return
        with self.lock:
            self.steps += 1
            self.peak = max(self.peak, len(events))
        for seq, token in events:
            job = self.running[seq]
            g = job.generation
            if token is not None:
                g.completion_tokens += 1
                text = g.text.push(token)
                if text:
                    emit(job, ("piece", text))
            if g.text.stopped:  # a stop string: the text ends before it
                if not seq.done:
                    self.batch.cancel(seq)
                self._finish(seq, job, "stop")
            elif seq.done:
                if seq.finish_reason == ERROR:
                    del self.running[seq]
                    self._end(job, "failed", ("error", GenerationFailed(seq.error)))
                else:
                    self._finish(seq, job, "length" if seq.finish_reason == LENGTH else "stop")

    def _finish(self, seq, job: Job, reason: str) -> None:
        del self.running[seq]
        g = job.generation
        text = g.text.finish()
        if text:
            emit(job, ("piece", text))
        g.ended = reason
        self._end(job, "completed", ("done", None))


def emit(job: Job, event: tuple) -> None:
    try:
        job.emit(event)
    except RuntimeError:  # the event loop is closed (the server stopped): nobody is listening
        pass


# --- a request's side, on the event loop --------------------------------------------------------------------------


class Submission:
    """``generation`` submitted to ``scheduler`` (:class:`QueueFull` raised here, before anything is sent), seen
    from the event loop. With ``request``, the client going away ends it (the worker drops it before its next
    step); :meth:`close` ends it too (a no-op once it has ended)."""

    def __init__(self, scheduler: Scheduler, generation: Generation, request=None):
        loop = asyncio.get_running_loop()
        self.scheduler = scheduler
        self.events: asyncio.Queue = asyncio.Queue()
        self.job = Job(generation, lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event))
        scheduler.submit(self.job)
        self.watcher = None
        if request is not None:  # nothing is written meanwhile: listen for the client going away
            self.watcher = asyncio.ensure_future(watch_disconnect(request.receive, self.events))

    async def started(self) -> bool:
        """Wait until its prompt is in the batch: True, or False when the client left first; raises its error."""
        kind, value = await self.events.get()
        if kind == "error":
            raise value
        return kind == "started"

    async def next_piece(self) -> str | None:
        """Its next piece of text; None at its end (or when the client left); raises its error."""
        while True:
            kind, value = await self.events.get()
            if kind == "piece":
                return value
            if kind == "error":
                raise value
            if kind in ("done", "gone"):
                return None

    async def text(self) -> str:
        pieces = []
        while (piece := await self.next_piece()) is not None:
            pieces.append(piece)
        return "".join(pieces)

    def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None

    def close(self) -> None:
        self.scheduler.cancel(self.job)
        self.stop_watching()


async def watch_disconnect(receive, events: asyncio.Queue) -> None:
    """Put ("gone", None) in ``events`` when the client disconnects. Once a request's body is read, an ASGI
    server's ``receive()`` returns only when the client has gone (http.disconnect): no polling, no delay. (One that
    answers at once with something else is asked again every 0.25 s.)"""
    while (await receive())["type"] != "http.disconnect":
        await asyncio.sleep(DISCONNECT_POLL_S)
    events.put_nowait(("gone", None))
