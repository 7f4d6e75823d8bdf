"""A small request scheduler: one worker thread owns the model; requests wait in a bounded queue.

- Non-streaming requests with the same generation settings are batched: the worker takes the oldest one,
  gathers the other compatible waiting requests (and, for up to `batch_wait_s`, new arrivals) up to
  `max_batch_size`, and answers all of them with one `SphinxChat.generate_full` call.
- A streaming request runs alone: its text deltas are handed to the event loop as they come, then the answer's
  `Generation` (exact token counts and finish_reason, from `SphinxChat.stream`'s `.result`); setting its
  `cancel` event (the client left) stops the generation and frees the worker for the next request.
- The queue is bounded: a full queue raises `QueueFull` (the server answers 429); a closed scheduler raises
  `ShuttingDown` (503); a request that waited longer than `queue_timeout_s` is failed with 503 (overloaded).
- A waiting request whose client left is dropped without running. A request already inside a running batch
  finishes with its batch (its answer is discarded): a batch cannot lose one row half way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sphinx_mllm.inference.chat import Generation, GenerationConfig, SphinxChat
from sphinx_mllm.serving.protocol import APIError
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

logger = get_logger(__name__)

STREAM_END = object()  # put on a stream's queue after its last delta


class QueueFull(Exception):
    """The waiting queue is at its bound."""


class ShuttingDown(Exception):
    """The scheduler no longer accepts work."""


@dataclass(eq=False)
class Job:
    """One request. Non-streaming jobs resolve `future`; streaming jobs feed `deltas` (text, then the answer's
    `Generation` when the stream reports one, then `STREAM_END`; or an `APIError`)."""

    conversation: list[dict[str, Any]]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    future: asyncio.Future[Generation] | None = None
    deltas: asyncio.Queue[Any] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)

    @classmethod
    def create(cls, conversation: list[dict[str, Any]], config: GenerationConfig, stream: bool) -> Job:
        loop = asyncio.get_running_loop()
        if stream:
            return cls(conversation, config, loop, stream=True, deltas=asyncio.Queue())
        return cls(conversation, config, loop, future=loop.create_future())

    # -- called from the worker thread ---------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self.loop.call_soon_threadsafe(fn, *args)

    def resolve(self, result: Generation) -> None:
        self._call(_set_future, self.future, result, None)

    def fail(self, error: BaseException) -> None:
        if self.stream:
            self._call(self.deltas.put_nowait, error)  # type: ignore[union-attr]
        else:
            self._call(_set_future, self.future, None, error)

    def send(self, item: Any) -> None:
        self._call(self.deltas.put_nowait, item)  # type: ignore[union-attr]


def _set_future(future: asyncio.Future[Generation], value: Generation | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)  # type: ignore[arg-type]


class Scheduler:
    """Owns the worker thread; `submit` from the event loop, results come back on it."""

    def __init__(self, chat: SphinxChat, max_batch_size: int = 8, batch_wait_s: float = 0.01, max_queue: int = 32,
                 queue_timeout_s: float = 120.0) -> None:
        self.chat = chat
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._running: list[Job] = []
        self._thread: threading.Thread | None = None
        self.stats = collections.Counter[str]()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="sphinx-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work, fail what waits (503), cancel running streams, and join the worker."""
        with self._cond:
            self._closing = True
            waiting, self._queue = list(self._queue), collections.deque()
            for job in self._running:
                job.cancel.set()
            self._cond.notify_all()
        for job in waiting:
            job.fail(APIError(503, "the server is shutting down", code="shutting_down"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    def snapshot(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._queue), "running": len(self._running), **self.stats}

    # -- called from the event loop -----------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                self.stats["refused_shutdown"] += 1
                raise ShuttingDown
            if len(self._queue) >= self.max_queue:
                self.stats["refused_full"] += 1
                raise QueueFull
            self._queue.append(job)
            self._cond.notify_all()

    def withdraw(self, job: Job) -> bool:
        """Cancel a job; True if it had not started (it is dropped from the queue)."""
        job.cancel.set()
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self.stats["cancelled_waiting"] += 1
            return True

    # -- the worker -----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                if batch[0].stream:
                    self._run_stream(batch[0])
                else:
                    self._run_batch(batch)
            finally:
                with self._cond:
                    self._running = []

    def _next_batch(self) -> list[Job] | None:
        """Block until work arrives; -> the jobs to run now (one stream, or a batch), None when closing."""
        with self._cond:
            while True:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return None
                job = self._queue.popleft()
                if job.cancel.is_set():
                    continue
                if time.monotonic() - job.enqueued > self.queue_timeout_s:
                    self.stats["expired"] += 1
                    job.fail(APIError(503, "the server is overloaded: the request waited too long to start; retry "
                                           "later", code="overloaded", headers={"Retry-After": "1"}))
                    continue
                batch = [job]
                if not job.stream:
                    self._gather(batch)
                self._running = batch
                return batch

    def _gather(self, batch: list[Job]) -> None:
        """Add waiting compatible jobs to `batch` (lock held), waiting up to `batch_wait_s` for more."""
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size and not self._closing:
            for other in list(self._queue):
                if len(batch) >= self.max_batch_size:
                    break
                if not other.stream and other.config == batch[0].config and not other.cancel.is_set():
                    self._queue.remove(other)
                    batch.append(other)
            remaining = deadline - time.monotonic()
            if len(batch) >= self.max_batch_size or remaining <= 0:
                return
            self._cond.wait(remaining)

    def _run_batch(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancel.is_set()]
        if not live:
            return
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(live))
        try:
            results = self.chat.generate_full([j.conversation for j in live], live[0].config)
        except SphinxError as exc:
            if len(live) > 1:  # find which request was bad: answer the others one by one
                for job in live:
                    self._run_batch([job])
                return
            live[0].fail(APIError(400, str(exc), code="invalid_request"))
            return
        except Exception as exc:  # one failed batch must not stop the server
            logger.exception("generation failed for a batch of %d", len(live))
            for job in live:
                job.fail(APIError(500, f"generation failed: {type(exc).__name__}", code="generation_failed"))
            return
        self.stats["served"] += len(live)
        for job, result in zip(live, results):
            job.resolve(result)

    def _run_stream(self, job: Job) -> None:
        self.stats["streams"] += 1
        deltas: Iterator[str] | None = None
        try:
            deltas = self.chat.stream(job.conversation, job.config, cancel=job.cancel)
            for delta in deltas:
                if job.cancel.is_set():
                    break
                if delta:
                    job.send(delta)
        except SphinxError as exc:
            job.fail(APIError(400, str(exc), code="invalid_request"))
            return
        except Exception as exc:  # reported to the client, the worker goes on
            logger.exception("streaming generation failed")
            job.fail(APIError(500, f"generation failed: {type(exc).__name__}", code="generation_failed"))
            return
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()  # stops and joins the generation thread now, not at garbage collection
        if job.cancel.is_set():
            self.stats["cancelled_running"] += 1
        else:
            self.stats["served"] += 1
            result = getattr(deltas, "result", None)  # a stream of SphinxChat.stream reports its Generation
            if isinstance(result, Generation):
                job.send(result)
        job.send(STREAM_END)
