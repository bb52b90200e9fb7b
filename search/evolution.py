"""Two-stage evolutionary search (AutoDiffusion's scheme), resumable generation by generation.

Stage 1 searches timesteps with the full model; stage 2 searches timesteps and
per-step skip sets jointly under the compute budget, starting from stage 1's
best. A stage is generation 0 (the initial population) followed by
``generations`` rounds of offspring::

    elites    = the top-k of everything this stage has evaluated (kept as they are)
    offspring = ``mutants`` mutants and ``crossovers`` crossover children of elites,
                and random candidates up to the population size
    evaluate the offspring that are new (the memo has every FID measured so far),
    then rank elites and offspring together

so every evaluated candidate is ranked, including the last generation's, and
the best never gets worse: the uniform schedules of generation 0 bound the
result from above. Stage 2 can instead run pymoo's NSGA-II on (FID, MACs)
with the MACs budget as a constraint; its result is then a Pareto set.

All randomness comes from one numpy Generator (and NSGA-II's own, seeded from
it); both are part of the checkpoint, so a resumed search is the same search.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from .checkpoint import SearchState
from .errors import SearchError
from .executors import Executor
from .space import MAX_TRIES, Candidate, SearchSpace

# pymoo needs finite objectives; a diverged candidate (FID inf) gets this instead.
FID_INFEASIBLE = 1e12


@dataclass(frozen=True)
class EvolutionSettings:
    population: int = 50
    generations: int = 10  # per stage, after the initial population
    topk: int = 10
    mutants: int = 25
    crossovers: int = 15
    mutation_prob: float = 0.25
    multi_objective: bool = False

    def check(self) -> "EvolutionSettings":
        for name in ("population", "topk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SearchError(f"--{name} {v!r}: must be a positive integer")
        for name in ("generations", "mutants", "crossovers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SearchError(f"--{name} {v!r}: must be an integer >= 0")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise SearchError(f"--mutation-prob {self.mutation_prob!r}: must lie in [0, 1]")
        if self.topk > self.population:
            raise SearchError(
                f"--topk {self.topk} is larger than --population {self.population}: keep at most the population"
            )
        if self.topk + self.mutants + self.crossovers > self.population:
            raise SearchError(
                f"--topk {self.topk} + --mutants {self.mutants} + --crossovers {self.crossovers} = "
                f"{self.topk + self.mutants + self.crossovers} exceeds --population {self.population}: "
                "raise --population or lower the others"
            )
        if self.multi_objective and self.mutants + self.crossovers < 1:
            raise SearchError("--multi-objective needs --mutants + --crossovers >= 1 offspring per generation")
        return self

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Scored:
    candidate: Candidate
    fid: float
    macs: int


@dataclass
class SearchResult:
    best: Scored
    stage1_best: Scored
    baselines: dict  # "uniform-linear" / "uniform-quadratic" -> Scored (full model, this run's sampler)
    pareto: list  # [Scored], non-dominated in (FID, MACs) within the budget, by FID
    history: list
    counters: dict
    wall_seconds: float

    @property
    def evaluated(self) -> int:
        return sum(h["new"] for h in self.history)

    @property
    def requested(self) -> int:
        return sum(h["requested"] for h in self.history)

    @property
    def memo_saved(self) -> int:
        """Evaluations the memo saved: repeated candidates plus elites re-ranked every generation."""
        return sum(h["memo_hits"] + h.get("elites_kept", 0) for h in self.history)


def _unique(cands: Sequence[Candidate]) -> list[Candidate]:
    return list(dict.fromkeys(cands))


class Search:
    """One two-stage search. ``on_generation(state)`` runs after every generation (the checkpoint hook)."""

    def __init__(
        self,
        space1: SearchSpace,
        space2: SearchSpace,
        settings: EvolutionSettings,
        executor: Executor,
        seed: int,
        run_settings: Optional[dict] = None,
        state: Optional[SearchState] = None,
        on_generation: Optional[Callable[[SearchState], None]] = None,
        quiet: bool = False,
        seeds: Sequence[Candidate] = (),
    ):
        self.spaces = {1: space1, 2: space2}
        # Extra members of generation 0 in both stages (the DP schedules): the evolution starts from them.
        self.extra_seeds = list(seeds)
        self.settings = settings.check()
        self.executor = executor
        self.on_generation = on_generation
        self.quiet = quiet
        if state is None:
            rng = np.random.default_rng(seed)
            state = SearchState(settings=dict(run_settings or {}), rng_state=rng.bit_generator.state)
        self.state = state
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state.rng_state
        self._algo = None  # the live NSGA-II object (restored from the state's data on resume)
        self._redrawn = 0  # children redrawn this generation because they had been evaluated already
        self._session_start = time.perf_counter()
        self._prior_elapsed = float(state.elapsed)
        self._prior_counters = dict(state.counters)
        self._counters_at_start = dict(executor.counters.as_dict())

    # ------------------------------------------------------------------ driver
    def run(self, stop_after: Optional[int] = None) -> Optional[SearchResult]:
        """Run to the end (or for ``stop_after`` generations, for tests); the result when done."""
        done_now = 0
        while not self.state.done:
            if stop_after is not None and done_now >= stop_after:
                return None
            self.step()
            done_now += 1
        return self.result()

    def step(self) -> None:
        """One generation, then the checkpoint hook."""
        st = self.state
        space = self.spaces[st.stage]
        t0 = time.perf_counter()
        self._redrawn = 0
        if st.stage == 2 and self.settings.multi_objective:
            record = self._generation_nsga2(space)
        else:
            record = self._generation_single(space)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        record["redrawn"] = self._redrawn
        st.history.append(record)
        if st.generation >= self.settings.generations:
            if st.stage == 1:
                st.stage1_ranked = list(st.population)
                st.stage, st.generation, st.population = 2, -1, []
            else:
                st.done = True
        st.rng_state = self.rng.bit_generator.state
        st.elapsed = self.elapsed
        st.counters = self.counters
        if self.on_generation is not None:
            self.on_generation(st)

    @property
    def elapsed(self) -> float:
        """Seconds over every session of this search (earlier sessions from the checkpoint)."""
        return self._prior_elapsed + time.perf_counter() - self._session_start

    @property
    def counters(self) -> dict:
        """Evaluation counters over every session."""
        now = self.executor.counters.as_dict()
        out = dict(self._prior_counters)
        for k, v in now.items():
            out[k] = out.get(k, 0) + v - self._counters_at_start.get(k, 0)
        return out

    # ------------------------------------------------------------- evaluation
    def _evaluate(self, cands: Sequence[Candidate], desc: str) -> dict:
        memo = self.state.memo
        new = [c for c in _unique(cands) if c not in memo]
        bar = tqdm(total=0, desc=desc, unit="step", disable=self.quiet, leave=True, dynamic_ncols=True)
        try:
            fids = self.executor.evaluate(new, progress=bar) if new else []
            for c, f in zip(new, fids):
                memo[c] = float(f)
            best = min((memo[c] for c in self.state.population + list(cands)), default=math.inf)
            bar.set_postfix(best_fid=f"{best:.3f}", new=len(new), memo_hits=len(cands) - len(new))
        finally:
            bar.close()
        return {"requested": len(cands), "new": len(new), "memo_hits": len(cands) - len(new)}

    def _rank(self, space: SearchSpace, cands: Sequence[Candidate]) -> list[Candidate]:
        memo = self.state.memo
        return sorted(_unique(cands), key=lambda c: (memo[c], space.macs(c), c))

    def _novel(self, make: Callable[[], Candidate], seen: set) -> Candidate:
        # Redraw a child already evaluated (or already made this generation): evaluations are the budget.
        for _ in range(MAX_TRIES):
            child = make()
            if child not in seen:
                break
            self._redrawn += 1
        seen.add(child)
        return child

    # ------------------------------------------------------ initial population
    def _seeds(self, space: SearchSpace) -> list[Candidate]:
        st = self.state
        seeds = [space.uniform("linear", self.rng), space.uniform("quadratic", self.rng)]
        if self.extra_seeds:
            seeds = [space.repair(c.genes, self.rng) for c in self.extra_seeds] + seeds
        if st.stage == 2:
            # Stage 1's best, repaired to the budget (unchanged when the full model fits it).
            elites = [space.repair(c.genes, self.rng) for c in st.stage1_ranked[: self.settings.topk]]
            seeds = elites + seeds
        return _unique(seeds)

    def _initial(self, space: SearchSpace) -> list[Candidate]:
        s = self.settings
        seeds = self._seeds(space)[: s.population]
        seen = set(self.state.memo) | set(seeds)
        out = list(seeds)
        for _ in range(min(s.mutants, s.population - len(out))):
            out.append(
                self._novel(
                    lambda: space.mutate(seeds[int(self.rng.integers(len(seeds)))], self.rng, s.mutation_prob), seen
                )
            )
        while len(out) < s.population:
            out.append(self._novel(lambda: space.random(self.rng), seen))
        return out

    # ------------------------------------------------------- single objective
    def _offspring(self, space: SearchSpace, elites: list[Candidate]) -> list[Candidate]:
        s, rng = self.settings, self.rng
        seen = set(self.state.memo) | set(elites)
        out = []
        for _ in range(s.mutants):
            out.append(
                self._novel(lambda: space.mutate(elites[int(rng.integers(len(elites)))], rng, s.mutation_prob), seen)
            )
        for _ in range(s.crossovers):
            if len(elites) < 2:
                make = lambda: space.mutate(elites[0], rng, s.mutation_prob)  # noqa: E731
            else:

                def make():
                    i, j = rng.choice(len(elites), size=2, replace=False)
                    return space.crossover(elites[int(i)], elites[int(j)], rng)

            out.append(self._novel(make, seen))
        while len(elites) + len(out) < s.population:
            out.append(self._novel(lambda: space.random(rng), seen))
        return out

    def _generation_single(self, space: SearchSpace) -> dict:
        st = self.state
        g = st.generation + 1
        if g == 0:
            elites, children = [], self._initial(space)
        else:
            elites = self._rank(space, st.population)[: self.settings.topk]
            children = self._offspring(space, elites)
        record = self._evaluate(children, self._desc(g))
        record["elites_kept"] = len(elites)  # ranked again from the memo, not re-evaluated
        st.population = self._rank(space, elites + children)
        st.generation = g
        return self._record(record, space, st.population)

    def _desc(self, g: int) -> str:
        return f"stage {self.state.stage} gen {g}/{self.settings.generations}"

    def _record(self, record: dict, space: SearchSpace, population: list[Candidate]) -> dict:
        memo = self.state.memo
        best = population[0]
        fids = [memo[c] for c in population if math.isfinite(memo[c])]
        record.update(
            stage=self.state.stage,
            generation=self.state.generation,
            best_fid=memo[best],
            best_macs=space.macs(best),
            best=best.to_json(),
            median_fid=float(np.median(fids)) if fids else math.inf,
        )
        return record

    # ---------------------------------------------------------------- NSGA-II
    def _generation_nsga2(self, space: SearchSpace) -> dict:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        st = self.state
        if self._algo is None:
            self._algo = self._resume_nsga2(space, st.nsga2) if st.nsga2 is not None else self._make_nsga2(space)
        algo = self._algo
        pop = algo.ask()
        cands = [x[0] for x in pop.get("X")]
        g = st.generation + 1
        record = self._evaluate(cands, self._desc(g) + " (NSGA-II)")
        memo = st.memo
        budget = space.budget_macs
        F = np.array([[min(memo[c], FID_INFEASIBLE), space.macs(c)] for c in cands], dtype=float)
        G = np.array([[(space.macs(c) - budget) if budget is not None else -1.0] for c in cands], dtype=float)
        Evaluator().eval(StaticProblem(algo.problem, F=F, G=G), pop)
        algo.tell(infills=pop)
        st.population = self._rank(space, [x[0] for x in algo.pop.get("X")])
        st.generation = g
        from ._pymoo import nsga2_state

        st.nsga2 = nsga2_state(algo)
        return self._record(record, space, st.population)

    def _make_nsga2(self, space: SearchSpace, initial=None, seed=None):
        from pymoo.algorithms.moo.nsga2 import NSGA2

        from ._pymoo import CandidateCrossover, CandidateMutation, CandidateProblem, FixedSampling, SameCandidate

        s = self.settings
        initial = self._initial(space) if initial is None else initial
        n_off = s.mutants + s.crossovers
        algo = NSGA2(
            pop_size=s.population,
            n_offsprings=n_off,
            sampling=FixedSampling(initial),
            crossover=CandidateCrossover(space, prob=s.crossovers / n_off),
            mutation=CandidateMutation(space, s.mutation_prob),
            eliminate_duplicates=SameCandidate(),
            seed=int(self.rng.integers(2**31 - 1)) if seed is None else seed,
        )
        algo.setup(CandidateProblem(), termination=("n_gen", s.generations + 1))
        return algo

    def _resume_nsga2(self, space: SearchSpace, saved: dict):
        # Rebuilt from data (no draws from self.rng: the saved random state replaces the seed).
        from ._pymoo import restore_nsga2

        return restore_nsga2(self._make_nsga2(space, initial=[], seed=0), saved, Candidate.from_json)

    # ----------------------------------------------------------------- result
    def result(self) -> SearchResult:
        st = self.state
        if not st.done:
            raise SearchError("the search has not finished: run it to the end first")
        memo = st.memo
        s1, s2 = self.spaces[1], self.spaces[2]

        def scored(space, c):
            return Scored(c, memo[c], space.macs(c))

        pareto = self.pareto_front()
        if self.settings.multi_objective:
            best = min(pareto, key=lambda p: (p.fid, p.macs, p.candidate))
        else:
            best = scored(s2, st.population[0])
        baselines = {}
        for spacing in ("linear", "quadratic"):
            c = s1.uniform(spacing)
            if c in memo:
                baselines[f"uniform-{spacing}"] = scored(s1, c)
        return SearchResult(
            best=best,
            stage1_best=scored(s1, st.stage1_ranked[0]),
            baselines=baselines,
            pareto=pareto,
            history=list(st.history),
            counters=self.counters,
            wall_seconds=self.elapsed,
        )

    def pareto_front(self) -> list[Scored]:
        """Candidates evaluated so far that fit stage 2's budget and that no other beats on both FID and MACs."""
        s2 = self.spaces[2]
        pts = [Scored(c, f, s2.macs(c)) for c, f in self.state.memo.items() if math.isfinite(f) and s2.is_valid(c)]
        return non_dominated(pts, lambda p: (p.fid, p.macs), tiebreak=lambda p: p.candidate)


def non_dominated(items: Sequence, objectives: Callable, tiebreak: Optional[Callable] = None) -> list:
    """The items no other item beats on both objectives (two, both minimised), ordered by the first.

    ``objectives(item)`` -> (a, b). Of items with equal objectives only the first (by ``tiebreak``,
    else input order) is kept. Non-finite objectives are dropped.
    """
    keyed = [(objectives(it), k, it) for k, it in enumerate(items)]
    keyed = [(o, k, it) for o, k, it in keyed if math.isfinite(o[0]) and math.isfinite(o[1])]
    keyed.sort(key=lambda e: (e[0], tiebreak(e[2]) if tiebreak is not None else e[1]))
    front, best_b = [], math.inf
    for (a, b), _, it in keyed:  # by the first objective ascending: keep each that beats every better one on the second
        if b < best_b:
            front.append(it)
            best_b = b
    return front


def spread(front: Sequence, k: int) -> list:
    """At most ``k`` members of a front ordered by its first objective, evenly spaced along it (both ends kept)."""
    if len(front) <= k:
        return list(front)
    picks = sorted({int(round(x)) for x in np.linspace(0, len(front) - 1, k)})
    return [front[i] for i in picks]
