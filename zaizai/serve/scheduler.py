"""The generation worker: one thread runs every generation, never the event loop.

Generation is CPU/GPU-bound PyTorch, so it runs in one worker thread (:class:`Scheduler`). The worker
interleaves up to ``max_active`` generations token by token (round robin: a new request gets its first token
after one step of each running one, not after they all finish); further requests wait in a bounded queue,
and a full queue raises :class:`QueueFull` (the app answers 429). :func:`run_job` hands a request's pieces
to the event loop; a client that disconnects (streamed or not) stops its generation before its next token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..common.errors import ZaizaiError
from ..inference.text import IncrementalDecoder, decode_stream


DISCONNECT_POLL_S = 0.25


class QueueFull(Exception):
    """Raised by :meth:`Scheduler.submit` when ``max_active + max_waiting`` jobs are already in."""


@dataclass
class Job:
    """One generation: ``make_stream()`` (called in the worker) gives the text pieces; ``emit`` hands each
    event to the event loop: ("piece", text), ("done", None) or ("error", exception)."""

    make_stream: Callable[[], Iterator[str]]
    emit: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    stream: Iterator[str] | None = None


class Scheduler:
    """One thread that runs generations, up to ``max_active`` interleaved, ``max_waiting`` more queued."""

    def __init__(self, max_active: int = 4, max_waiting: int = 64):
        if max_active < 1 or max_waiting < 0:
            raise ZaizaiError("--max-active must be >= 1 and --max-waiting >= 0")
        self.max_active, self.max_waiting = max_active, max_waiting
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.admitted = 0            # jobs submitted and not finished (active + waiting)
        self.active = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.thread = threading.Thread(target=self._run, name="zaizai-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.admitted >= self.max_active + self.max_waiting:
                raise QueueFull
            self.admitted += 1
        self.jobs.put(job)

    def stats(self) -> dict:
        with self.lock:
            return {"active": self.active, "waiting": self.admitted - self.active, "completed": self.completed,
                    "cancelled": self.cancelled, "failed": self.failed}

    def close(self) -> None:
        self.jobs.put(None)

    def _finish(self, job: Job, outcome: str, event: tuple | None = None, was_active: bool = True) -> None:
        if job.stream is not None and hasattr(job.stream, "close"):
            job.stream.close()  # ends the token generator too: no further forward passes
        with self.lock:
            self.admitted -= 1
            self.active -= was_active
            setattr(self, outcome, getattr(self, outcome) + 1)
        if event is not None:
            job.emit(event)

    def _run(self) -> None:
        running: deque[Job] = deque()
        while True:
            while len(running) < self.max_active:  # admit waiting jobs (block only when idle)
                try:
                    job = self.jobs.get(block=not running)
                except queue.Empty:
                    break
                if job is None:
                    return
                if job.cancelled.is_set():
                    self._finish(job, "cancelled", was_active=False)
                    continue
                with self.lock:
                    self.active += 1
                try:
                    job.stream = job.make_stream()
                except Exception as e:  # noqa: BLE001 (handed to the request, which answers it)
                    self._finish(job, "failed", ("error", e))
                    continue
                running.append(job)
            if not running:
                continue
            job = running.popleft()
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                continue
            try:
                piece = next(job.stream)
            except StopIteration:  # (cancelled: stopped by its Generation within the piece)
                self._finish(job, "cancelled" if job.cancelled.is_set() else "completed", ("done", None))
                continue
            except Exception as e:  # noqa: BLE001
                self._finish(job, "failed", ("error", e))
                continue
            job.emit(("piece", piece))
            running.append(job)


# --- one request's generation -----------------------------------------------------------------------------------


class Generation:
    """The text of one request as it is generated, with token counts and why it ended."""

    def __init__(self, bot, ids: list[int], sampling, stop_ids: set[int], stop: list[str]):
        self.bot, self.ids, self.sampling, self.stop_ids, self.stop = bot, ids, sampling, stop_ids, stop
        self.completion_tokens = 0
        self.exhausted = False  # the token generator ran to its end (max_tokens or a stop id)
        # set when the request is gone: no further token, even within a piece of text (tokens that show no text,
        # such as special ones, make no piece, and the worker looks at its jobs only between pieces)
        self.cancelled = threading.Event()

    def _counted(self) -> Iterator[int]:
        for token in self.bot.stream_ids(self.ids, self.sampling, self.stop_ids):
            if self.cancelled.is_set():
                return
            self.completion_tokens += 1
            yield token
        self.exhausted = True

    def stream(self) -> Iterator[str]:
        return decode_stream(self._counted(), IncrementalDecoder(self.bot.tokenizer), self.stop)

    @property
    def finish_reason(self) -> str:
        hit_length = self.exhausted and self.completion_tokens >= self.sampling.max_new_tokens
        return "length" if hit_length else "stop"

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.ids), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.ids) + self.completion_tokens}


async def run_job(scheduler: Scheduler, generation: Generation, request=None):
    """Submit ``generation`` and yield its text pieces on the event loop; cancelling (or closing) this
    generator, or the client of ``request`` going away, stops the generation before its next token."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(generation.stream, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
              cancelled=generation.cancelled)
    scheduler.submit(job)  # QueueFull -> 429 before anything is sent
    # not streamed: nothing is written until the end, so listen for the client going away meanwhile
    watcher = None if request is None else asyncio.ensure_future(watch_disconnect(request.receive, events))
    try:
        while True:
            kind, value = await events.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:  # "done", or "gone" (the client left)
                return
    finally:
        job.cancelled.set()  # the worker drops the job at its next turn: no further token, its slot freed
        if watcher is not None:
            watcher.cancel()


async def watch_disconnect(receive, events: asyncio.Queue) -> None:
    """Put ("gone", None) in ``events`` when the client disconnects. Once a request's body is read, an ASGI
    server's ``receive()`` returns only when the client has gone (http.disconnect): no polling, no delay. (One that
    answers at once with something else is asked again every 0.25 s.)"""
    while (await receive())["type"] != "http.disconnect":
        await asyncio.sleep(DISCONNECT_POLL_S)
    events.put_nowait(("gone", None))


async def anext_or_none(agen):
    """The next item of an async generator, or None at its end."""
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None
