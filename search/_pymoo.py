"""pymoo adapters: candidates as pymoo's object-typed decision variable, our operators as its operators.

Each individual's X is a one-element object array holding a Candidate. The
operators call the search space's mutation, crossover and repair with the
random Generator pymoo hands them, so NSGA-II's offspring obey the same
invariants as the single-objective search's (and its randomness is pymoo's
own seeded state, which the checkpoint pickles).
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
