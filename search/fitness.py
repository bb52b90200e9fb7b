"""Fitness: the FID of N samples of a candidate, or their distance to a teacher's, computed as cheaply as it can
be exactly.

Objectives (``objective``): ``fid`` is the FID of the N samples against the
reference statistics; ``trajectory`` is trajectory fidelity, the mean
per-sample RMS distance (pixels) between the candidate's final images and a
high-NFE teacher's final images from the same x_T (:mod:`search.dp`);
``trajectory-features`` the same distance in the extractor's feature space.
The trajectory objectives compare each sample with its own target, so they
do not suffer FID's small-N bias and variance.

Common random numbers. Every candidate starts from the same x_T (and labels),
drawn by :func:`autodiffusion_rt.sampling.initial_state` from ``seed``, and
its k-th stochastic step uses the k-th noise draw of the same generator. That
is exactly what :func:`autodiffusion_rt.sample` draws for that seed, so a
candidate's images here are ``sample(model, timesteps, sampler, N, seed, eta,
keep, batch_size=...)``, bit for bit, and FID differences between candidates
are differences of schedule, not of noise.

Prefix sharing. Sampler step i maps (x_i, the earlier x0s and eps) to (x_{i+1}, x0_i, eps_i) with
the model's eps at (x_i, t_i, keep_i), the constants ``row_i`` of
:func:`compute_coefficients` and, on a stochastic step, the next noise draw.
So the state after k steps is a function of x_T and the k triples (t_i,
skip_i, row_i), i < k, and nothing else. The rows carry every dependence on
the rest of the list: DDIM's row i depends on t_i and t_{i+1} (it jumps to
t_{i+1}); DPM-Solver++(2M)'s also on t_{i-1} (through h_{i-1}); the last
row of any sampler goes to clean data. Two candidates therefore share the
computation of their first k steps exactly when those k triples are equal, and
we key states by them, not by timesteps alone. The eps of a state at (t,
keep) is shared further, by every child that only differs in its row (e.g.
two DDIM candidates with equal t_0 but different t_1). The key holds no
sampler: candidates of different samplers (``samples(..., samplers=)``) share
the steps whose rows are equal. Every deterministic sampler's first step is
DDIM's, so at NFE 4 the four distinct samplers of one schedule (UniPC-3 is
UniPC-2 there) need 2 + 4 x 2 = 10 model calls, not 16.

The work is a trie walked breadth first: at depth d, one model call per
distinct (state, t, skip set), one update per distinct row. Each model call
runs on one state's N samples in the same fixed chunks as ``sample()``, so a
sample's result never depends on what else is in the batch; that is what
makes sharing bit-exact (and a resumed search identical to an uninterrupted
one). States of earlier calls are kept in an LRU cache (``cache_bytes``) so
a mutant of an elite starts where the elite's shared prefix ended.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from autodiffusion_rt.diffusion import compute_coefficients, step_from_output
from autodiffusion_rt.errors import DataError
from autodiffusion_rt.sampling import eps_in_chunks, initial_state

from .space import Candidate

StepKey = tuple  # (t, skip tuple, StepCoefficients)
OBJECTIVES = ("fid", "trajectory", "trajectory-features")


@dataclass
class _State:
    x: torch.Tensor
    prev_x0s: tuple  # the x0 history (DPM-Solver++(2M), UniPC), most recent first
    noise_used: int  # how many noise draws the path to here consumed
    prev_eps: tuple = ()  # iPNDM's eps history, most recent first

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, *self.prev_x0s, *self.prev_eps))


@dataclass
class EvalCounters:
    """What the evaluator did, for the search report."""

    candidates: int = 0  # candidates evaluated (each: N samples + one FID)
    naive_unet_calls: int = 0  # model calls without any sharing: sum of NFE
    unet_calls: int = 0  # model calls actually run (each on N samples)
    cache_hits: int = 0  # candidates that started from a cached intermediate state
    failed: int = 0  # candidates whose samples diverged (FID = inf)
    unet_seconds: float = 0.0
    update_seconds: float = 0.0
    fid_seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def add(self, other: "EvalCounters") -> None:
        for k, v in other.__dict__.items():
            setattr(self, k, getattr(self, k) + v)


def _reads_history(keys: list[StepKey]) -> tuple[bool, bool]:
    """Does a step of these keys read earlier x0s (DPM-Solver++(2M), UniPC), earlier eps (iPNDM)?"""
    return any(row.x0_history for _, _, row in keys), any(row.eps_history for _, _, row in keys)


def _has_history(state: _State, reads: tuple[bool, bool]) -> bool:
    """Can a candidate that ``reads`` (:func:`_reads_history`) continue from ``state`` (a cached state keeps only
    the histories its own candidates read)?"""
    x0, eps = reads
    return bool(state.prev_x0s or not x0) and bool(state.prev_eps or not eps)


class FitnessEvaluator:
    """FID of candidates' samples against reference statistics, with common random numbers.

    ``model``: a DiffusionModel; ``extractor``: a FeatureExtractor (or name);
    ``ref_stats``: FeatureStats from the same extractor; ``batch_size``: the
    model's chunk size (as ``sample(batch_size=...)``); ``cache_bytes``: the
    memory for intermediate states kept between calls (0 disables it);
    ``share=False`` computes every candidate on its own (for measuring). ``eta``
    applies to the ddim candidates only (:meth:`samples` may run each candidate
    under its own sampler).
    """

    def __init__(
        self,
        model,
        sampler: str,
        eta: float,
        num_samples: int,
        seed: int,
        extractor,
        ref_stats,
        batch_size: int = 256,
        cache_bytes: int = 1 << 30,
        share: bool = True,
        device: str = "cpu",
        objective: str = "fid",
        target: Optional[torch.Tensor] = None,
    ):
        from autodiffusion_rt.metrics import get_extractor

        if objective not in OBJECTIVES:
            raise DataError(f"objective {objective!r} is unknown: choose one of {', '.join(OBJECTIVES)}")
        if objective != "fid" and (target is None or target.shape[0] != int(num_samples)):
            raise DataError(f"the {objective} objective needs the teacher's {num_samples} final images as target")
        self.objective = objective
        self.target = None if target is None else target.cpu()
        self._target_features = None

        self.model = model
        self.sampler = sampler
        self.eta = float(eta)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.extractor = get_extractor(extractor)
        self.ref_stats = ref_stats
        self.batch_size = int(batch_size)
        self.cache_bytes = int(cache_bytes) if share else 0
        self.share = bool(share)
        self.counters = EvalCounters()
        # Drawn on the CPU in the documented order (as sample() does), then moved: the same
        # numbers on every device.
        self.device = torch.device(device)
        x_T, y, self._sample_noise = initial_state(model, self.num_samples, self.seed)
        self._x_T = x_T.to(self.device)
        self._y = None if y is None else y.to(self.device)
        if self.device.type != "cpu":
            model.unet.to(self.device)
        self._noise: list[torch.Tensor] = []
        self._cache: OrderedDict[tuple, _State] = OrderedDict()
        self._cache_used = 0
        self._all_ids = model.unet.layer_ids

    # ----------------------------------------------------------------- samples
    def _noise_draw(self, k: int) -> torch.Tensor:
        # The k-th stochastic draw of every sample's generator, as sample_loop makes it: the same for everyone.
        while len(self._noise) <= k:
            x = self._x_T
            self._noise.append(self._sample_noise.randn(x.shape[1:], dtype=x.dtype).to(self.device))
        return self._noise[k]

    def _step_keys(self, cand: Candidate, sampler: str) -> list[StepKey]:
        # Keyed by the rows, not the sampler: steps of two samplers with equal rows (every sampler's first step is
        # DDIM's) share their model call and their state.
        coeffs = compute_coefficients(
            sampler,
            self.model.schedule,
            cand.timesteps,
            self.eta if sampler == "ddim" else 0.0,
            learned_variance=self.model.learn_sigma,
        )
        return [(t, s, coeffs.row(i)) for i, (t, s) in enumerate(cand.genes)]

    def _keys(self, candidates: Sequence[Candidate], samplers: Optional[Sequence[str]]) -> list[list[StepKey]]:
        if samplers is None:
            samplers = [self.sampler] * len(candidates)
        elif len(samplers) != len(candidates):
            raise DataError(f"{len(samplers)} samplers for {len(candidates)} candidates: pass one per candidate")
        return [self._step_keys(c, sm) for c, sm in zip(candidates, samplers)]

    def _keep(self, skip: tuple[str, ...]):
        return None if not skip else frozenset(self._all_ids - set(skip))

    def _cache_put(self, key: tuple, state: _State) -> None:
        if self.cache_bytes <= 0 or key in self._cache:
            return
        self._cache[key] = state
        self._cache_used += state.nbytes
        while self._cache_used > self.cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cache_used -= old.nbytes

    def _cache_get(self, key: tuple) -> Optional[_State]:
        state = self._cache.get(key)
        if state is not None:
            self._cache.move_to_end(key)
        return state

    def plan_calls(self, candidates: Sequence[Candidate], samplers: Optional[Sequence[str]] = None) -> int:
        """How many model calls :meth:`samples` will run for these candidates (for progress bars)."""
        keys = self._keys(candidates, samplers)
        return len(self._plan(keys, [_reads_history(ks) for ks in keys])[1])

    def _plan(self, keys: list[list[StepKey]], reads: list[tuple[bool, bool]]):
        """(each candidate's first step to run: after its longest cached prefix whose state keeps the histories
        it ``reads``; the set of model calls the walk will make)."""
        starts = []
        for ks, needs in zip(keys, reads):
            start = 0
            if self.share:
                for d in range(len(ks) - 1, 0, -1):
                    state = self._cache.get(tuple(ks[:d]))
                    if state is not None and _has_history(state, needs):
                        start = d
                        break
            starts.append(start)
        calls = set()
        for ks, start in zip(keys, starts):
            for d in range(start, len(ks)):
                call = (tuple(ks[:d]), ks[d][0], ks[d][1], ks[d][2].learned_variance)
                calls.add(call if self.share else (id(ks), d))
        return starts, calls

    @torch.inference_mode()
    def samples(
        self,
        candidates: Sequence[Candidate],
        on_call: Optional[Callable[[], None]] = None,
        samplers: Optional[Sequence[str]] = None,
    ) -> list[torch.Tensor]:
        """Each candidate's N final samples (clamped to [-1, 1]), sharing every common prefix. ``samplers``: one
        per candidate; default: the evaluator's sampler for all."""
        keys = self._keys(candidates, samplers)
        if not self.share:
            out = []
            for ks in keys:
                out.extend(self._samples_shared([ks], on_call, use_cache=False))
            return out
        return self._samples_shared(keys, on_call, use_cache=True)

    def _samples_shared(self, keys: list[list[StepKey]], on_call, use_cache: bool) -> list[torch.Tensor]:
        reads = [_reads_history(ks) for ks in keys]
        starts = self._plan(keys, reads)[0] if use_cache else [0] * len(keys)
        root = _State(self._x_T, (), 0)
        # Where each candidate starts: the root, or a cached state (fetched now: later puts may evict it).
        entry: dict[tuple, _State] = {}
        for ks, start in zip(keys, starts):
            prefix = tuple(ks[:start])
            entry[prefix] = root if start == 0 else self._cache_get(prefix)
            if start:
                self.counters.cache_hits += 1
        states: dict[tuple, _State] = {}
        finals: list[Optional[torch.Tensor]] = [None] * len(keys)
        self.counters.naive_unet_calls += sum(len(ks) for ks in keys)
        for d in range(max(len(ks) for ks in keys)):
            # node -> (t, skip, learned variance) -> row -> candidate indices
            groups: dict[tuple, dict[tuple, dict]] = {}
            for j, (ks, start) in enumerate(zip(keys, starts)):
                if start <= d < len(ks):
                    t, skip, row = ks[d]
                    call = (t, skip, row.learned_variance)
                    groups.setdefault(tuple(ks[:d]), {}).setdefault(call, {}).setdefault(row, []).append(j)
            next_states: dict[tuple, _State] = {}
            for node, by_call in groups.items():
                st = states[node] if node in states else entry[node]
                for (t, skip, variance), by_row in by_call.items():
                    t0 = time.perf_counter()
                    eps = self._eps(st.x, t, self._keep(skip), variance)
                    t1 = time.perf_counter()
                    self.counters.unet_calls += 1
                    self.counters.unet_seconds += t1 - t0
                    for row, js in by_row.items():
                        noise = self._noise_draw(st.noise_used) if row.c_noise != 0.0 else None
                        x_prev, x0s, history = step_from_output(row, st.x, eps, st.prev_x0s, noise, st.prev_eps)
                        # A state keeps the histories a later step of one of its candidates reads (memory).
                        x0s = x0s if any(reads[j][0] for j in js) else ()
                        history = history if any(reads[j][1] for j in js) else ()
                        child = _State(x_prev, x0s, st.noise_used + (noise is not None), history)
                        child_key = node + ((t, skip, row),)
                        for j in js:
                            if d == len(keys[j]) - 1:
                                finals[j] = x_prev.clamp(-1, 1)
                        if any(d < len(keys[j]) - 1 for j in js):
                            next_states[child_key] = child
                            if use_cache:
                                self._cache_put(child_key, child)
                    self.counters.update_seconds += time.perf_counter() - t1
                    if on_call is not None:
                        on_call()
            states = next_states
        return finals  # type: ignore[return-value]

    def _eps(self, x: torch.Tensor, t: int, keep, variance: bool) -> torch.Tensor:
        """eps, or [eps, v] when ``variance`` (the rows are learned-variance steps; one model call serves every row)."""
        # sample()'s own chunking: what makes shared results bit-identical to it.
        return eps_in_chunks(self.model, x, t, self._y, keep, self.batch_size, variance)

    # ---------------------------------------------------------------------- FID
    def fid_of(self, images: torch.Tensor) -> float:
        """FID of one candidate's images; inf when the samples diverged (NaN/inf)."""
        from autodiffusion_rt.metrics import FIDWarning, fid

        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # Warned once for the whole search (see run.py), not once per candidate.
                warnings.simplefilter("ignore", FIDWarning)
                value = fid(images.cpu(), self.ref_stats, self.extractor)
        except DataError:
            self.counters.failed += 1
            value = math.inf
        self.counters.fid_seconds += time.perf_counter() - t0
        return value if math.isfinite(value) else math.inf

    def distance_of(self, images: torch.Tensor) -> float:
        """Mean per-sample RMS distance to the teacher's images (pixels, or extractor features); inf if diverged."""
        t0 = time.perf_counter()
        images = images.cpu()
        if not torch.isfinite(images).all():
            self.counters.failed += 1
            return math.inf
        if self.objective == "trajectory":
            a, b = images, self.target
        else:
            if self._target_features is None:
                self._target_features = torch.as_tensor(self.extractor.features(self.target))
            a, b = torch.as_tensor(self.extractor.features(images)), self._target_features
        d = (a.double() - b.double()).flatten(1)
        value = float(d.pow(2).mean(1).sqrt().mean())
        self.counters.fid_seconds += time.perf_counter() - t0
        return value if math.isfinite(value) else math.inf

    def evaluate(self, candidates: Sequence[Candidate], progress=None) -> list[float]:
        """FID of each candidate. ``progress``: a tqdm-like bar; its total is set to the work planned."""
        if not candidates:
            return []
        if progress is not None:
            progress.reset(total=self.plan_calls(candidates) + len(candidates))
        images = self.samples(candidates, on_call=(lambda: progress.update(1)) if progress is not None else None)
        out = []
        for img in images:
            out.append(self.fid_of(img) if self.objective == "fid" else self.distance_of(img))
            if progress is not None:
                progress.update(1)
        self.counters.candidates += len(candidates)
        return out
