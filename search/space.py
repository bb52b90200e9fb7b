"""The search space: candidates, and the operators that make new ones.

A candidate is a list of *genes*, one per sampling step, noisiest first. A gene
is a timestep (an integer index into the training schedule) and the set of
layer ids skipped at that step. The number of genes is the number of function
evaluations (NFE).

Invariants every operator restores through :meth:`SearchSpace.repair` (and
never leaves to the evaluator):

* exactly ``nfe`` genes; timesteps unique, in [0, T), strictly descending;
* skip sets hold only known layer ids (and are empty when skipping is off);
* the MACs per sample (summed over steps) are within the budget.

A skip set belongs to its gene, not to a position: when a mutated timestep
overtakes a neighbour and the genes are re-sorted, its skip set moves with it,
so a step keeps the architecture it was chosen with for its noise level.

Operators take a ``numpy.random.Generator`` and use nothing else, so a search
is a pure function of its seed (and resumable from a saved generator state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from autodiffusion_rt.diffusion import uniform_timesteps

from .errors import SearchError

# How many times an operator redraws before accepting a child it could not make
# new (the caller's memo then absorbs the duplicate at no cost).
MAX_TRIES = 20
# With a sensitivity table (SearchSpace.set_skip_guide): the share of every skip draw that stays uniform.
GUIDE_UNIFORM_SHARE = 0.2


@dataclass(frozen=True, order=True)
class Candidate:
    """An immutable, hashable sampling schedule: timesteps and per-step skip sets."""

    timesteps: tuple[int, ...]
    skip: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        object.__setattr__(self, "skip", tuple(tuple(sorted(set(s))) for s in self.skip))
        if len(self.skip) != len(self.timesteps):
            raise SearchError(f"candidate has {len(self.skip)} skip sets for {len(self.timesteps)} timesteps")

    @classmethod
    def full(cls, timesteps: Iterable[int]) -> "Candidate":
        """The full model (nothing skipped) over ``timesteps``."""
        ts = tuple(int(t) for t in timesteps)
        return cls(ts, ((),) * len(ts))

    @property
    def nfe(self) -> int:
        return len(self.timesteps)

    @property
    def genes(self) -> list[tuple[int, tuple[str, ...]]]:
        return list(zip(self.timesteps, self.skip))

    @property
    def num_skipped(self) -> int:
        return sum(len(s) for s in self.skip)

    def to_json(self) -> dict:
        return {"timesteps": list(self.timesteps), "skip": [list(s) for s in self.skip]}

    @classmethod
    def from_json(cls, d: dict) -> "Candidate":
        return cls(tuple(d["timesteps"]), tuple(tuple(s) for s in d["skip"]))

    def describe(self) -> str:
        skipped = self.num_skipped
        return f"{list(self.timesteps)}" + (f" skip {skipped} layer-steps" if skipped else "")


class SearchSpace:
    """Valid candidates for one model, NFE and compute budget, and the operators over them.

    ``layer_macs``: {layer id: MACs per sample saved by skipping it};
    ``full_step_macs``: MACs per sample of one full-model step;
    ``budget_macs``: the most MACs per sample a candidate may use over all its
    steps (None: no limit); ``allow_skip``: False in stage 1 (timesteps only).
    ``unit``: what the costs count: MACs, or ``ns`` (search/latency.py's integer nanoseconds of engine time per
    request); the space only adds them up, so every "macs" here is then nanoseconds.
    """

    def __init__(
        self,
        num_timesteps: int,
        nfe: int,
        layer_macs: dict[str, int],
        full_step_macs: int,
        budget_macs: Optional[int] = None,
        allow_skip: bool = False,
        local_scale: float = 0.5,
        unit: str = "MACs",
    ):
        if not isinstance(nfe, int) or isinstance(nfe, bool) or not 1 <= nfe <= num_timesteps:
            raise SearchError(
                f"NFE {nfe!r} is out of range: choose 1 <= NFE <= {num_timesteps} "
                "(the model's number of training timesteps)"
            )
        self.T = int(num_timesteps)
        self.nfe = nfe
        self.layer_macs = dict(layer_macs)
        self.layer_ids = tuple(self.layer_macs)  # registry order: deterministic iteration
        self._layer_index = {lid: k for k, lid in enumerate(self.layer_ids)}
        self.full_step_macs = int(full_step_macs)
        self.allow_skip = bool(allow_skip) and bool(self.layer_ids)
        self.local_scale = float(local_scale)
        self.budget_macs = None if budget_macs is None else int(budget_macs)
        self.unit = unit
        self._guide = None  # the sensitivity table's skip weights (set_skip_guide); None: uniform draws
        self.min_macs = nfe * (self.full_step_macs - sum(self.layer_macs.values()))
        if self.budget_macs is not None and self.budget_macs < self.full_macs:
            if not self.allow_skip or self.budget_macs < self.min_macs:
                need = self.min_macs if self.allow_skip else self.full_macs
                fix = (
                    f"--budget-macs to {need:,}"
                    if unit == "MACs"
                    else "use --compute macs (the table's request overhead counts here too)"
                )
                raise SearchError(
                    f"no candidate can meet the budget of {self.budget_macs:,} {unit} per sample at NFE {nfe}: even "
                    f"{'skipping every skippable layer at every step' if self.allow_skip else 'the full model'} needs "
                    f"{need:,} ({need / self.full_macs:.3f} of the full model); raise --budget-fraction to at least "
                    f"{math.ceil(need / self.full_macs * 1000) / 1000:.3f} or {fix}"
                )

    # ------------------------------------------------------------------ queries
    @property
    def full_macs(self) -> int:
        """MACs per sample of the full model at this NFE."""
        return self.nfe * self.full_step_macs

    def macs(self, cand: Candidate) -> int:
        """MACs per sample of ``cand`` (the same sum as Plan.for_model's)."""
        return sum(self.full_step_macs - sum(self.layer_macs[i] for i in s) for s in cand.skip)

    def is_valid(self, cand: Candidate) -> bool:
        try:
            self.check(cand)
        except SearchError:
            return False
        return True

    def check(self, cand: Candidate) -> Candidate:
        """Raise SearchError naming the first broken invariant."""
        ts = cand.timesteps
        if len(ts) != self.nfe:
            raise SearchError(f"candidate {list(ts)} has {len(ts)} steps, expected NFE {self.nfe}")
        if any(not 0 <= t < self.T for t in ts):
            raise SearchError(f"candidate {list(ts)} has a timestep outside [0, {self.T})")
        if any(a <= b for a, b in zip(ts, ts[1:])):
            raise SearchError(f"candidate {list(ts)} is not strictly descending (or repeats a timestep)")
        known = set(self.layer_ids)
        for i, s in enumerate(cand.skip):
            if s and not self.allow_skip:
                raise SearchError(f"candidate skips layers at step {i} but skipping is off in this stage")
            bad = set(s) - known
            if bad:
                raise SearchError(f"candidate skips unknown layer id(s) {sorted(bad)} at step {i}")
        if self.budget_macs is not None and self.macs(cand) > self.budget_macs:
            raise SearchError(
                f"candidate uses {self.macs(cand):,} MACs per sample, over the budget of {self.budget_macs:,}"
            )
        return cand

    # ---------------------------------------------------------------- guidance
    def set_skip_guide(self, table: Optional[dict], uniform_share: float = GUIDE_UNIFORM_SHARE) -> None:
        """Draw the layers that skip mutations and budget repair skip (or unskip) by a sensitivity table.

        ``table``: :func:`search.dp.skip_sensitivity`'s {"timesteps", "layers", "macs", "cost"}. A gene reads the
        row of the nearest timestep; a layer's score is its cost per MAC saved, s. Skipping draws a running layer
        with probability proportional to 1 / (s + d) (cheap per MAC saved: likely), unskipping a skipped one
        proportional to s + d, where d is 1% of the row's median score (a zero cost is not infinitely likely);
        ``uniform_share`` of every draw stays uniform so no layer is ruled out. None: uniform draws.
        """
        if table is None:
            self._guide = None
            return
        scores = []
        for row in table["cost"]:
            per_mac = {lid: float(c) / max(int(m), 1) for lid, m, c in zip(table["layers"], table["macs"], row)}
            known = [per_mac[lid] for lid in self.layer_ids if lid in per_mac and math.isfinite(per_mac[lid])]
            median = float(np.median(known)) if known else 1.0
            s = np.array(
                [
                    per_mac.get(lid, median) if math.isfinite(per_mac.get(lid, median)) else median
                    for lid in self.layer_ids
                ]
            )
            scores.append(s + 0.01 * median + 1e-300)
        self._guide = (np.asarray(table["timesteps"], dtype=float), scores, float(uniform_share))

    def _draw_layer(self, t: int, options: Sequence[str], skip: bool, rng: np.random.Generator) -> str:
        """One of ``options`` (layer ids) to skip (``skip``) or to run again at timestep ``t``."""
        return options[self._draw([(t, lid) for lid in options], skip, rng)]

    def _draw(self, pairs: Sequence[tuple[int, str]], skip: bool, rng: np.random.Generator) -> int:
        """The index of one (timestep, layer id) pair: uniform, or guided by the table (see set_skip_guide)."""
        if self._guide is None or len(pairs) == 1:
            return int(rng.integers(len(pairs)))
        ts, scores, share = self._guide
        rows = {t: scores[int(np.argmin(np.abs(ts - t)))] for t in {t for t, _ in pairs}}
        s = np.array([rows[t][self._layer_index[lid]] for t, lid in pairs])
        w = 1.0 / s if skip else s
        p = (1.0 - share) * w / w.sum() + share / len(pairs)
        return int(rng.choice(len(pairs), p=p / p.sum()))

    # ------------------------------------------------------------------- repair
    def repair(self, genes: Sequence[tuple[int, Iterable[str]]], rng: np.random.Generator) -> Candidate:
        """Any list of (timestep, skip set) -> a valid candidate, changing as little as it can.

        Out-of-range timesteps are clipped; a timestep that collides with one
        already kept moves to the nearest free value (its skip set with it);
        missing genes are drawn at random, extra ones dropped at random;
        unknown layer ids are dropped; then, while over budget, a random
        (step, layer) pair that still runs is skipped (drawn by the
        sensitivity table when one is set: :meth:`set_skip_guide`).
        """
        known = set(self.layer_ids)
        pending = [
            (min(max(int(t), 0), self.T - 1), frozenset(s) & known if self.allow_skip else frozenset())
            for t, s in genes
        ]
        if len(pending) > self.nfe:
            keep = sorted(rng.choice(len(pending), size=self.nfe, replace=False).tolist())
            pending = [pending[i] for i in keep]
        used: set[int] = set()
        out: list[tuple[int, frozenset]] = []
        for t, s in pending:
            if t in used:
                t = self._nearest_free(t, used, rng)
            used.add(t)
            out.append((t, s))
        while len(out) < self.nfe:
            t = self._random_free(used, rng)
            used.add(t)
            out.append((t, frozenset()))
        out.sort(key=lambda g: -g[0])  # skip sets travel with their timestep
        skips = [set(s) for _, s in out]
        if self.budget_macs is not None:
            self._fit_budget(out, skips, rng)
        return Candidate(tuple(t for t, _ in out), tuple(tuple(s) for s in skips))

    def _fit_budget(self, genes, skips: list[set], rng: np.random.Generator) -> None:
        total = sum(self.full_step_macs - sum(self.layer_macs[i] for i in s) for s in skips)
        while total > self.budget_macs:
            running = [(k, lid) for k in range(len(genes)) for lid in self.layer_ids if lid not in skips[k]]
            k, lid = running[self._draw([(genes[k][0], lid) for k, lid in running], True, rng)]
            skips[k].add(lid)
            total -= self.layer_macs[lid]

    def _nearest_free(self, t: int, used: set[int], rng: np.random.Generator) -> int:
        # Try t-1, t+1, t-2, t+2, ... (random side first) so a collision moves minimally.
        sign = 1 if rng.random() < 0.5 else -1
        for d in range(1, self.T):
            for c in (t + sign * d, t - sign * d):
                if 0 <= c < self.T and c not in used:
                    return c
        raise SearchError(f"no free timestep left in [0, {self.T}) for NFE {self.nfe}")

    def _random_free(self, used: set[int], rng: np.random.Generator) -> int:
        if len(used) >= self.T:
            raise SearchError(f"no free timestep left in [0, {self.T}) for NFE {self.nfe}")
        while True:  # used is small next to T in practice; the loop is short
            t = int(rng.integers(self.T))
            if t not in used:
                return t

    # -------------------------------------------------------------- generation
    def uniform(self, spacing: str = "linear", rng: Optional[np.random.Generator] = None) -> Candidate:
        """The uniform DDIM schedule (full model), repaired to the budget when there is one."""
        ts = uniform_timesteps(self.T, self.nfe, spacing)
        if self.budget_macs is None or self.full_macs <= self.budget_macs:
            return Candidate.full(ts)
        if rng is None:
            raise SearchError("a budget below the full model needs an rng to choose which layers to skip")
        return self.repair([(t, ()) for t in ts], rng)

    def random(self, rng: np.random.Generator) -> Candidate:
        """Uniformly random timesteps; in stage 2, each (step, layer) skipped with a random rate in [0, 0.5)."""
        ts = rng.choice(self.T, size=self.nfe, replace=False)
        rate = rng.random() * 0.5 if self.allow_skip else 0.0
        genes = []
        for t in ts:
            skip = [lid for lid in self.layer_ids if rng.random() < rate] if self.allow_skip else []
            genes.append((int(t), skip))
        return self.repair(genes, rng)

    def mutate(self, parent: Candidate, rng: np.random.Generator, prob: float) -> Candidate:
        """Each gene mutates with probability ``prob``; at least one always does, and the child differs from the parent.

        A mutating gene changes its timestep (stage 1; half the time in stage 2)
        or flips one random layer of its skip set. A new timestep is, with
        equal odds, anywhere unused in [0, T) (exploration) or a small move
        around the old one (refinement; scale ``local_scale`` times the gap to
        the neighbours).
        """
        for _ in range(MAX_TRIES):
            genes = [(t, set(s)) for t, s in parent.genes]
            which = [i for i in range(len(genes)) if rng.random() < prob]
            if not which:
                which = [int(rng.integers(len(genes)))]
            for i in which:
                if self.allow_skip and rng.random() < 0.5:
                    lid = self._flip_layer(genes[i][0], genes[i][1], rng)
                    genes[i][1].symmetric_difference_update({lid})
                else:
                    genes[i] = (self._new_timestep(genes, i, rng), genes[i][1])
            child = self.repair(genes, rng)
            if child != parent:
                return child
        return child  # pragma: no cover - only when the space has a single point

    def _flip_layer(self, t: int, skipped: set, rng: np.random.Generator) -> str:
        """The layer whose skip flag a mutation flips: uniform, or (guided) skip vs unskip as often as a uniform
        draw would choose each, then which layer by the sensitivity table."""
        if self._guide is None:
            return self.layer_ids[int(rng.integers(len(self.layer_ids)))]
        off = [lid for lid in self.layer_ids if lid in skipped]
        on = [lid for lid in self.layer_ids if lid not in skipped]
        unskip = bool(off) and (not on or rng.random() < len(off) / len(self.layer_ids))
        return self._draw_layer(t, off if unskip else on, not unskip, rng)

    def _new_timestep(self, genes, i: int, rng: np.random.Generator) -> int:
        used = {t for j, (t, _) in enumerate(genes) if j != i}
        t = genes[i][0]
        if len(used) + 1 >= self.T:
            return t
        if rng.random() < 0.5:
            while True:
                c = int(rng.integers(self.T))
                if c != t and c not in used:
                    return c
        hi = genes[i - 1][0] if i > 0 else self.T
        lo = genes[i + 1][0] if i + 1 < len(genes) else -1
        scale = max(1.0, self.local_scale * (hi - lo) / 2)
        for _ in range(MAX_TRIES):
            c = t + int(round(rng.normal(0.0, scale)))
            if c != t and 0 <= c < self.T and c not in used:
                return c
        return self._nearest_free(t, used | {t}, rng)

    def crossover(self, a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate:
        """Gene-wise uniform crossover; duplicates resolved, then the budget re-checked by repair.

        Genes are aligned by step. Each step takes one parent's gene; if that
        timestep is already in the child, it takes the other parent's; if both
        are taken, the gene keeps its skip set and moves to the nearest free
        timestep. The child differs from both parents when the parents allow it.
        """
        for _ in range(MAX_TRIES):
            genes: list[tuple[int, tuple[str, ...]]] = []
            taken: set[int] = set()
            for ga, gb in zip(a.genes, b.genes):
                first, second = (ga, gb) if rng.random() < 0.5 else (gb, ga)
                if first[0] not in taken:
                    g = first
                elif second[0] not in taken:
                    g = second
                else:
                    g = (self._nearest_free(first[0], taken, rng), first[1])
                taken.add(g[0])
                genes.append(g)
            child = self.repair(genes, rng)
            if child != a and child != b:
                return child
        return child


def candidate_key(cand: Candidate) -> str:
    """A stable string key (for JSON memo tables)."""
    return ";".join(f"{t}:{','.join(s)}" for t, s in cand.genes)
