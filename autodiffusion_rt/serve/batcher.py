"""Dynamic batching: one thread per plan, the one consumer of that plan's engines.

Requests queue in FIFO order. A request that arrives while the engines are
idle and nothing is queued starts at once: waiting could only add its wait to
its latency, since no one else is there to merge with. Otherwise (a batch is
running, or others are waiting) the oldest request waits up to ``max_wait_s``
after its arrival for more (or until ``max_batch`` images are queued); most of
that wait overlaps the running batch. Then the FIFO prefix that fits in
``max_batch`` images runs as one :meth:`Runtime.sample_requests` call: each
request gets exactly the images ``Runtime.sample(n, seed, labels)`` gives
alone. A request larger than ``max_batch`` runs alone (the runtime chunks it
to its engines' maximum).

The queue is bounded in images: :meth:`Batcher.submit` refuses at once (429,
with a Retry-After estimated from the recent throughput) when it is full.
A request whose deadline passes before its batch starts is dropped without
running (:meth:`Batcher.cancel`, or found expired when the batch is cut).
Plans never wait on each other: each has its own thread and engines.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from .schemas import RequestError

__all__ = ["Batcher", "Job"]

log = logging.getLogger("autodiffusion_rt.serve")


@dataclass(eq=False)
class Job:
    """One request in a batcher: its future gets ``(images, labels)`` or a :class:`RequestError`."""

    n: int
    seed: int
    labels: Optional[list]
    deadline: float  # time.monotonic() by which its batch must have started
    enqueued: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    state: str = "queued"  # queued -> running -> done, or queued -> dropped
    merge: bool = True  # wait up to max_wait for others: False when it arrived to idle engines and an empty queue


class Batcher:
    """Merge queued requests for one plan's runtime into batches, on a dedicated thread."""

    def __init__(self, name: str, runtime, *, max_batch: int, max_wait_s: float, queue_images: int, metrics=None):
        self.name = name
        self.runtime = runtime
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.queue_images = int(queue_images)
        self.metrics = metrics
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._queued_images = 0
        self._closing = False
        self._running = False  # a batch is on the engines
        self._images_per_s = 0.0  # EWMA of batch throughput, for Retry-After
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self.warmed = threading.Event()  # set once the thread has run its warm-up batch
        self.error: Optional[str] = None  # why the thread died, if it did

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    @property
    def serving(self) -> bool:
        """Whether a batch can run now: the thread is alive and has run its warm-up batch."""
        return self.warmed.is_set() and self._thread.is_alive() and self.error is None

    def wait_warm(self, timeout: Optional[float] = None) -> None:
        """Block until the warm-up batch ran; raise RuntimeError (with the reason) if the thread died instead."""
        while not self.warmed.wait(0.05 if timeout is None else min(timeout, 0.05)):
            if not self._thread.is_alive():
                why = self.error or "no reason given"
                raise RuntimeError(f"the batcher of plan {self.name!r} stopped before serving: {why}")
            if timeout is not None:
                timeout -= 0.05
                if timeout <= 0:
                    raise RuntimeError(f"the batcher of plan {self.name!r} did not warm up in time")

    @property
    def queued_images(self) -> int:
        return self._queued_images

    # ------------------------------------------------------------ producers (the event loop)
    def submit(self, n: int, seed: int, labels, deadline: float) -> Job:
        """Queue a request; a 429 :class:`RequestError` at once when the queue has no room for its ``n`` images."""
        job = Job(n, seed, labels, deadline)
        with self._cond:
            if self._closing:
                raise RequestError(
                    503, None, "the server is shutting down: retry on another instance", {"Retry-After": "1"}
                )
            if self._queued_images + n > self.queue_images:
                wait = self._queued_images / self._images_per_s if self._images_per_s > 0 else 1.0
                raise RequestError(
                    429,
                    None,
                    f"the queue for plan {self.name!r} is full "
                    f"({self._queued_images} of {self.queue_images} images waiting): "
                    "retry after the Retry-After seconds",
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
            job.merge = self._running or bool(self._queue)
            self._queue.append(job)
            self._queued_images += n
            self._gauge()
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str = "deadline") -> bool:
        """Drop ``job`` if its batch has not started (True); False when it is already running or done."""
        with self._cond:
            if job.state != "queued":
                return False
            self._queue.remove(job)
            self._drop(job, reason)
            self._gauge()
            self._cond.notify()
            return True

    def close(self, timeout: Optional[float] = None) -> None:
        """Take no more requests, run the queued ones (no more waiting for merges), then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------ the consumer thread
    def _drop(self, job: Job, reason: str) -> None:
        job.state = "dropped"
        self._queued_images -= job.n
        if self.metrics is not None:
            self.metrics.dropped.labels(self.name, reason).inc()
        _settle(
            job.future,
            exception=RequestError(
                504,
                None,
                f"the request's deadline passed before its batch started ({reason}): "
                "it was not run; retry later or ask for fewer images",
            ),
        )

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_images.labels(self.name).set(self._queued_images)

    def _next_batch(self) -> Optional[list[Job]]:
        """Wait for work, then cut the next batch (None: closed and drained)."""
        with self._cond:
            while True:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return None
                head = self._queue[0]
                flush_at = head.enqueued + self.max_wait_s
                while head.merge and self._queue and not self._closing and self._queued_images < self.max_batch:
                    remaining = flush_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch, images, now = [], 0, time.monotonic()
                while self._queue:
                    job = self._queue[0]
                    if job.deadline <= now:
                        self._queue.popleft()
                        self._drop(job, "deadline")
                        continue
                    if batch and images + job.n > self.max_batch:
                        break
                    self._queue.popleft()
                    self._queued_images -= job.n
                    job.state = "running"
                    batch.append(job)
                    images += job.n
                self._gauge()
                if batch:
                    self._running = True
                    if self.metrics is not None:
                        self.metrics.running_images.labels(self.name).set(images)
                    return batch

    def _idle(self) -> None:
        with self._cond:
            self._running = False
        if self.metrics is not None:
            self.metrics.running_images.labels(self.name).set(0)

    def _run(self) -> None:
        """The thread: one warm-up batch (it runs the engines from now on), then the loop; a death is logged."""
        try:
            self.runtime.sample_requests([(1, 0, None)])
            self.warmed.set()
            self._loop()
        except BaseException as e:  # the loop never raises by design: anything here is a bug, and /readyz must say so
            self.error = f"{type(e).__name__}: {e}"
            log.critical(
                "plan %s: the batcher thread died (%s): /readyz now answers 503", self.name, self.error, exc_info=True
            )
            with self._cond:
                self._closing = True
                while self._queue:
                    job = self._queue.popleft()
                    self._queued_images -= job.n
                    stopped = RequestError(503, None, f"the batcher of plan {self.name!r} stopped: {self.error}")
                    _settle(job.future, exception=stopped)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            start = time.perf_counter()
            try:
                results = self.runtime.sample_requests([(j.n, j.seed, j.labels) for j in batch])
            except Exception as e:  # a failed batch fails its requests, never the thread
                log.exception("plan %s: a batch of %d requests failed", self.name, len(batch))
                self._idle()
                for j in batch:
                    j.state = "done"
                    _settle(j.future, exception=e)
                continue
            self._idle()
            images = sum(j.n for j in batch)
            rate = images / max(time.perf_counter() - start, 1e-6)
            self._images_per_s = rate if self._images_per_s == 0 else 0.8 * self._images_per_s + 0.2 * rate
            if self.metrics is not None:
                self.metrics.record_batch(self.name, images, len(batch))
            for j, result in zip(batch, results):
                j.state = "done"
                _settle(j.future, result=result)


def _settle(future: concurrent.futures.Future, result=None, exception: Optional[BaseException] = None) -> None:
    """Resolve a job's future unless its waiter cancelled it."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
