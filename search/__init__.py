"""The search: ``python -m search.run``.

A training-free, two-stage evolutionary search (AutoDiffusion) over timestep
schedules and per-step layer skipping, judged by FID and MACs, that writes a
``plan.json`` (:class:`autodiffusion_rt.plan.Plan`).

Modules: :mod:`~search.space` (candidates, repair, mutation, crossover),
:mod:`~search.fitness` (FID with common random numbers, memo, prefix sharing),
:mod:`~search.executors` (where candidates are evaluated),
:mod:`~search.evolution` (the two stages, NSGA-II), :mod:`~search.checkpoint`
(resumable state), :mod:`~search.report`, :mod:`~search.pipeline` (the machinery),
:mod:`~search.pareto` (NFE ranges), :mod:`~search.run` (the CLI).
"""

from .errors import SearchError

__all__ = ["Candidate", "SearchError", "SearchSpace"]


def __getattr__(name: str):
    """``Candidate`` and ``SearchSpace`` on first use (PEP 562): ``python -m search.run --help`` needs no torch."""
    if name in ("Candidate", "SearchSpace"):
        from . import space

        return getattr(space, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
