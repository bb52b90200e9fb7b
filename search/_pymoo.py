"""pymoo adapters: candidates as pymoo's object-typed decision variable, our operators as its operators.

Each individual's X is a one-element object array holding a Candidate. The
operators call the search space's mutation, crossover and repair with the
random Generator pymoo hands them, so NSGA-II's offspring obey the same
invariants as the single-objective search's (and its randomness is pymoo's
own seeded state, which the checkpoint stores as data: :func:`nsga2_state` /
:func:`restore_nsga2`, JSON only, never a pickle).
"""

from __future__ import annotations

import numpy as np
from pymoo.core.crossover import Crossover
from pymoo.core.duplicate import ElementwiseDuplicateElimination
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling


class CandidateProblem(Problem):
    """Two objectives (FID, MACs) and one constraint (MACs - budget <= 0); evaluated outside pymoo (ask/tell)."""

    def __init__(self):
        super().__init__(n_var=1, n_obj=2, n_ieq_constr=1, vtype=object)

    def _evaluate(self, X, out, *args, **kwargs):  # pragma: no cover - the search evaluates through StaticProblem
        raise NotImplementedError("candidates are evaluated by the search's executor (ask/tell)")


class FixedSampling(Sampling):
    """The initial population the search made (uniform schedules, their mutants, random candidates)."""

    def __init__(self, candidates):
        super().__init__()
        self.candidates = list(candidates)

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        X = np.empty((len(self.candidates), 1), dtype=object)
        for i, c in enumerate(self.candidates):
            X[i, 0] = c
        return X


class CandidateCrossover(Crossover):
    def __init__(self, space, prob: float):
        super().__init__(n_parents=2, n_offsprings=1, prob=prob)
        self.space = space

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        _, n_matings, _ = X.shape
        Y = np.empty((1, n_matings, 1), dtype=object)
        for k in range(n_matings):
            Y[0, k, 0] = self.space.crossover(X[0, k, 0], X[1, k, 0], random_state)
        return Y


class CandidateMutation(Mutation):
    def __init__(self, space, gene_prob: float):
        super().__init__(prob=1.0)
        self.space = space
        self.gene_prob = gene_prob

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        Y = np.empty_like(X)
        for i in range(len(X)):
            Y[i, 0] = self.space.mutate(X[i, 0], random_state, self.gene_prob)
        return Y


class SameCandidate(ElementwiseDuplicateElimination):
    def is_equal(self, a, b):
        return a.X[0] == b.X[0]


# Individual fields NSGA-II reads after a generation: design, objectives, constraints, violation.
_ARRAYS = ("F", "G", "H")


def _plain(v):
    """numpy scalars and arrays as JSON values (floats keep their exact repr through json)."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (int, str)) or v is None:
        return v
    raise TypeError(f"cannot store {type(v).__name__} in the NSGA-II state")


def nsga2_state(algo) -> dict:
    """Where a set-up NSGA-II is, as JSON data: its population, counters and random state."""
    pop = []
    for ind in algo.pop:
        pop.append(
            {
                "X": ind.X[0].to_json(),
                **{k: _plain(getattr(ind, k)) for k in _ARRAYS},
                "CV": _plain(ind._CV),  # the cached value; the property would compute one
                "evaluated": sorted(ind.evaluated or ()),
                "data": {k: _plain(v) for k, v in ind.data.items()},
            }
        )
    return {
        "n_iter": int(algo.n_iter),
        "n_eval": int(algo.evaluator.n_eval),
        "random_state": algo.random_state.bit_generator.state,
        "pop": pop,
    }


def restore_nsga2(algo, state: dict, candidate_from_json):
    """Put ``algo`` (set up like the saved one, not yet run) where :func:`nsga2_state` found it.

    Raises KeyError/TypeError/ValueError on a malformed state (the checkpoint loader names the field).
    """
    from pymoo.core.individual import Individual
    from pymoo.core.population import Population

    inds = []
    for d in state["pop"]:
        ind = Individual()
        X = np.empty(1, dtype=object)
        X[0] = candidate_from_json(d["X"])
        ind.X = X
        for k in _ARRAYS:
            setattr(ind, k, np.asarray(d[k], dtype=float))
        ind._CV = None if d["CV"] is None else np.asarray(d["CV"], dtype=float)
        ind.evaluated = set(d["evaluated"])
        ind.data = dict(d["data"])
        inds.append(ind)
    if not inds:
        raise ValueError("an empty population")
    algo.pop = Population.create(*inds)
    algo.n_iter = int(state["n_iter"])
    algo.evaluator.n_eval = int(state["n_eval"])
    algo.random_state.bit_generator.state = state["random_state"]
    algo.is_initialized = True
    algo.start_time = 0.0
    algo._set_optimum()
    algo.termination.update(algo)
    return algo
