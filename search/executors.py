"""Executors: where candidates are evaluated. The search only ever calls :meth:`Executor.evaluate`.

The search hands an executor a batch of *new* candidates (it memoizes what it
has seen) and gets their FIDs back in the same order. An executor owns one or
more :class:`~search.fitness.FitnessEvaluator`s; each shares prefixes within
the batch it gets, so a distributed executor should split a batch along shared
prefixes (:func:`split_by_prefix`) rather than round-robin.

A distributed (Ray) executor needs only: build evaluators from a picklable
:class:`~search.fitness.FitnessSpec` on its workers, send them the groups of
:func:`split_by_prefix`, and sum their counters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

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
