"""Executors: where candidates are evaluated. The search only ever calls :meth:`Executor.evaluate`.

The search hands an executor a batch of *new* candidates (it memoizes what it
has seen) and gets their FIDs back in the same order. An executor owns one or
more :class:`~search.fitness.FitnessEvaluator`s; each shares prefixes within
the batch it gets, so a distributed executor should split a batch along shared
prefixes (:func:`split_by_prefix`) rather than round-robin.

:class:`RayExecutor` runs one evaluator replica per Ray worker (an actor):
the evaluator built here (model, its x_T, labels and per-sample noise
generators, extractor and reference statistics) is put in Ray's object store
once and each worker unpickles its own copy; a batch is split along shared
prefixes over the workers; a worker that dies is replaced (from the same
stored evaluator) and its group re-run. A candidate's FID depends on nothing
but the candidate (see :mod:`search.fitness`), so the results are those of the
local executor, bit for bit, whatever the split.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from typing import Optional, Sequence

from .errors import SearchError
from .fitness import EvalCounters, FitnessEvaluator
from .space import Candidate


class Executor(ABC):
    """Evaluates batches of candidates; returns one FID per candidate, in order."""

    @abstractmethod
    def evaluate(self, candidates: Sequence[Candidate], progress=None) -> list[float]:
        """FIDs of ``candidates``. ``progress``: an optional tqdm-like bar (reset/update)."""

    @property
    @abstractmethod
    def counters(self) -> EvalCounters:
        """What the evaluations cost (model calls, seconds), summed over workers."""

    def close(self) -> None:
        """Release workers; the local executor has none."""

    def summary(self) -> dict:
        """For the search report: which executor, how many workers, the speedup against one worker."""
        return {"executor": "local", "workers": 1}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalExecutor(Executor):
    """Evaluates in this process with one evaluator (its model calls use torch's threads)."""

    def __init__(self, evaluator: FitnessEvaluator):
        self.evaluator = evaluator

    def evaluate(self, candidates: Sequence[Candidate], progress=None) -> list[float]:
        return self.evaluator.evaluate(list(candidates), progress=progress)

    @property
    def counters(self) -> EvalCounters:
        return self.evaluator.counters


def split_by_prefix(candidates: Sequence[Candidate], parts: int) -> list[list[int]]:
    """Indices of ``candidates`` in at most ``parts`` groups, keeping candidates with the same first step together.

    Groups are balanced greedily by size, largest first; deterministic.
    """
    by_first: dict[tuple, list[int]] = {}
    for i, c in enumerate(candidates):
        by_first.setdefault(c.genes[0], []).append(i)
    groups: list[list[int]] = [[] for _ in range(max(1, min(parts, len(by_first))))]
    for members in sorted(by_first.values(), key=lambda m: (-len(m), m[0])):
        min(groups, key=len).extend(members)
    return [sorted(g) for g in groups if g]


def _ray():
    try:
        import ray
    except ImportError:
        raise SearchError(
            "--executor ray needs Ray: pip install 'ray' (or pip install 'autodiffusion-rt[ray]'); "
            "--executor local needs nothing"
        ) from None
    return ray


class _Worker:
    """A Ray actor holding one evaluator replica."""

    def __init__(self, evaluator, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.evaluator = evaluator

    def evaluate(self, candidates):
        t0 = time.perf_counter()
        fids = self.evaluator.evaluate(list(candidates))
        return fids, time.perf_counter() - t0, copy.copy(self.evaluator.counters)

    def pid(self) -> int:
        import os

        return os.getpid()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves them itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise SearchError(
            f"cannot reach the Ray cluster at --ray-address {address!r}: {e.strerror or e}; "
            "start it (ray start --head) or fix the address, or use --executor local"
        ) from None


class RayExecutor(Executor):
    """Evaluates on ``workers`` Ray actors (see the module docstring).

    ``address``: an existing Ray cluster ("auto", "ray://host:10001", "host:6379");
    None starts Ray in this process (its CPUs, or ``num_cpus``). ``max_retries``:
    how many times one group is re-run on a fresh worker before giving up.
    """

    def __init__(
        self,
        evaluator: FitnessEvaluator,
        workers: Optional[int] = None,
        address: Optional[str] = None,
        num_cpus: Optional[int] = None,
        threads_per_worker: int = 1,
        max_retries: int = 3,
    ):
        ray = _ray()
        self._ray = ray
        self._started_ray = False
        if address is not None:
            _check_reachable(address)
        if not ray.is_initialized():
            try:
                if address is None:
                    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
                    self._started_ray = True
                else:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
                raise SearchError(
                    f"cannot connect to {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                    "check --ray-address (e.g. 'auto' or 'ray://HOST:10001') or use --executor local"
                ) from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.num_workers = int(workers) if workers else max(1, cpus // max(1, threads_per_worker))
        if self.num_workers < 1:
            raise SearchError(f"--workers {workers}: need at least one worker")
        self._actor_cls = ray.remote(num_cpus=threads_per_worker, max_restarts=0)(_Worker)
        self._threads = threads_per_worker
        self._evaluator_ref = ray.put(evaluator)  # shipped once: model, noise, extractor, reference
        self.workers = [self._new_worker() for _ in range(self.num_workers)]
        self._worker_counters: list[EvalCounters] = [EvalCounters() for _ in self.workers]
        self._retired = EvalCounters()  # counters of workers that died
        self.max_retries = int(max_retries)
        self.replaced = 0
        self.busy_seconds = 0.0
        self.wall_seconds = 0.0

    def _new_worker(self):
        return self._actor_cls.remote(self._evaluator_ref, self._threads)

    def _submit(self, slot: int, candidates: list):
        return self.workers[slot].evaluate.remote(candidates)

    def evaluate(self, candidates: Sequence[Candidate], progress=None) -> list[float]:
        candidates = list(candidates)
        if not candidates:
            return []
        t0 = time.perf_counter()
        groups = split_by_prefix(candidates, self.num_workers)
        if progress is not None:
            progress.reset(total=len(candidates))
        pending = {slot: (g, self._submit(slot, [candidates[i] for i in g]), 0) for slot, g in enumerate(groups)}
        out: list[Optional[float]] = [None] * len(candidates)
        ray = self._ray
        while pending:
            refs = {ref: slot for slot, (_, ref, _) in pending.items()}
            ready, _ = ray.wait(list(refs), num_returns=1)
            slot = refs[ready[0]]
            group, ref, tries = pending.pop(slot)
            try:
                fids, seconds, counters = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError):
                if tries >= self.max_retries:
                    raise SearchError(
                        f"a Ray worker died {tries + 1} times on the same {len(group)} candidate(s); "
                        "check the workers' memory and logs, or use --executor local"
                    ) from None
                self._retired.add(self._worker_counters[slot])
                self._worker_counters[slot] = EvalCounters()
                self.workers[slot] = self._new_worker()
                self.replaced += 1
                pending[slot] = (group, self._submit(slot, [candidates[i] for i in group]), tries + 1)
                continue
            self._worker_counters[slot] = counters
            self.busy_seconds += seconds
            for i, f in zip(group, fids):
                out[i] = f
            if progress is not None:
                progress.update(len(group))
        self.wall_seconds += time.perf_counter() - t0
        return out  # type: ignore[return-value]

    @property
    def counters(self) -> EvalCounters:
        total = EvalCounters()
        total.add(self._retired)
        for c in self._worker_counters:
            total.add(c)
        return total

    def summary(self) -> dict:
        # One worker would have needed the sum of the workers' busy times (the same candidates, the same work).
        return {
            "executor": "ray",
            "workers": self.num_workers,
            "workers_replaced": self.replaced,
            "worker_busy_seconds": round(self.busy_seconds, 2),
            "evaluate_wall_seconds": round(self.wall_seconds, 2),
            "speedup_vs_one_worker": round(self.busy_seconds / self.wall_seconds, 2) if self.wall_seconds else None,
        }

    def close(self) -> None:
        for w in self.workers:
            try:
                self._ray.kill(w)
            except Exception:  # already dead
                pass
        self.workers = []
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False
