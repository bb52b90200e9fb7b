"""Teacher trajectories and a GITS-style dynamic-programming schedule optimizer.

GITS (Chen et al., ICML 2024, arXiv 2405.11326) observes that the error of a
few-step sampler is, to first order, the sum of the local errors of its steps,
and that each local error can be read off a single high-NFE "teacher"
trajectory: start every step from the teacher's state at t_i, take one sampler
step to t_j, compare with the teacher's state at t_j. Over a coarse grid of G
timesteps that is a (G+1) x (G+1) cost matrix (node G is clean data), built
from the teacher's own model calls alone (one sampler step from a known state
is a few multiply-adds), and the cheapest path from t = T-1 to clean data with
exactly NFE edges is a shortest-path problem solved by dynamic programming in
O(NFE G^2).

The teacher is DDIM over the grid itself (the grid is its schedule), from the
search's own x_T (same seed, same N: common random numbers), with the sampler's
x0 clipping. Its final images are also the trajectory-fidelity fitness's
target (:class:`search.fitness.FitnessEvaluator`, ``objective="trajectory"``).
It is computed once and cached on disk, keyed by everything it depends on.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from autodiffusion_rt.diffusion import compute_coefficients, sample_loop, step_update, uniform_timesteps
from autodiffusion_rt.records import loads_json
from autodiffusion_rt.sampling import initial_state, make_eps_fn
from autodiffusion_rt.utils import atomic_write, write_json

from .errors import SearchError

TEACHER_FORMAT = "autodiffusion-rt-teacher-v1"
GRID_SPACINGS = ("quadratic", "linear", "logsnr")


@dataclass
class Teacher:
    """A DDIM trajectory over ``grid`` from the search's x_T: states[g] is x at grid[g], final the clean sample."""

    key: dict  # what it was computed from (model fingerprint, seed, N, grid, clip)
    grid: tuple  # descending timesteps, grid[0] = T-1
    states: torch.Tensor  # (G, N, C, H, W): the input of each teacher step
    x0: torch.Tensor  # (G, N, C, H, W): each step's (clipped) x0 estimate
    final: torch.Tensor  # (N, C, H, W): the teacher's sample, clamped to [-1, 1]
    seconds: float = 0.0
    cached: bool = False


def teacher_grid(num_timesteps: int, points: int, spacing: str = "quadratic", schedule=None) -> list[int]:
    """The coarse grid: ``points`` descending timesteps from T-1 (quadratic spacing: denser at low noise)."""
    if spacing not in GRID_SPACINGS:
        raise SearchError(f"--grid-spacing {spacing!r} is unknown: choose one of {', '.join(GRID_SPACINGS)}")
    if isinstance(points, bool) or not isinstance(points, int) or not 2 <= points <= num_timesteps:
        raise SearchError(f"--grid-points {points!r} is out of range: choose 2 <= points <= {num_timesteps} (e.g. 40)")
    return uniform_timesteps(num_timesteps, points, spacing, schedule)


def teacher_key(model, seed: int, num_samples: int, grid, clip_denoised: bool = True) -> dict:
    return {
        "format": TEACHER_FORMAT,
        "model_fingerprint": model.fingerprint,
        "seed": int(seed),
        "num_samples": int(num_samples),
        "grid": [int(t) for t in grid],
        "sampler": "ddim",
        "clip_denoised": bool(clip_denoised),
    }


def _cache_path(cache_dir: Path, key: dict, kind: str = "teacher", suffix: str = ".pt") -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{kind}-{digest}{suffix}"


@torch.inference_mode()
def compute_teacher(
    model,
    seed: int,
    num_samples: int,
    grid,
    *,
    batch_size: int = 128,
    clip_denoised: bool = True,
    cache_dir: Optional[Path] = None,
    progress: bool = False,
) -> Teacher:
    """The teacher trajectory (from the disk cache when it has this exact one)."""
    key = teacher_key(model, seed, num_samples, grid, clip_denoised)
    path = _cache_path(cache_dir, key) if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt or foreign file: recompute and overwrite it
            d = None
        if isinstance(d, dict) and d.get("key") == key:
            return Teacher(
                key, tuple(key["grid"]), d["states"], d["x0"], d["final"], float(d.get("seconds", 0.0)), cached=True
            )
    t0 = time.perf_counter()
    coeffs = compute_coefficients("ddim", model.schedule, list(grid), 0.0, clip_denoised)
    x, y, noise = initial_state(model, num_samples, seed)
    states, x0s = [], []

    def keep(info):
        states.append(info["x"])
        x0s.append(info["x0"])

    out = sample_loop(
        make_eps_fn(model, y, [None] * len(coeffs), batch_size),
        x,
        coeffs,
        noise=noise,
        progress=progress,
        callback=keep,
    )
    teacher = Teacher(
        key, tuple(key["grid"]), torch.stack(states), torch.stack(x0s), out.clamp(-1, 1), time.perf_counter() - t0
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            torch.save(
                {
                    "key": key,
                    "states": teacher.states,
                    "x0": teacher.x0,
                    "final": teacher.final,
                    "seconds": teacher.seconds,
                },
                f,
            )
    return teacher


def per_sample_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square difference of each sample (a vector of N), in float64."""
    d = (a.double() - b.double()).flatten(1)
    return d.pow(2).mean(1).sqrt()


@torch.inference_mode()
def cost_matrix(model, teacher: Teacher, clip_denoised: bool = True) -> np.ndarray:
    """C[i, j], i < j <= G: mean per-sample RMS error of one DDIM step from the teacher's state at grid[i]
    to grid[j] (j = G: clean data) against the teacher's state there (its final sample for j = G).
    inf below the diagonal."""
    G = len(teacher.grid)
    C = np.full((G + 1, G + 1), np.inf)
    for i in range(G):
        x_i = teacher.states[i]
        # The eps consistent with the teacher's (clipped) x0: the clip inside step_update then leaves it unchanged.
        head = compute_coefficients("ddim", model.schedule, [teacher.grid[i]], 0.0, clip_denoised).row(0)
        eps = (head.x0_from_x * x_i - teacher.x0[i]) * (-1.0 / head.x0_from_eps)
        for j in range(i + 1, G + 1):
            ts = [teacher.grid[i]] if j == G else [teacher.grid[i], teacher.grid[j]]
            row = compute_coefficients("ddim", model.schedule, ts, 0.0, clip_denoised).row(0)
            x_j, _ = step_update(row, x_i, eps)
            target = teacher.final if j == G else teacher.states[j]
            C[i, j] = float(per_sample_rms(x_j.clamp(-1, 1) if j == G else x_j, target).mean())
    return C


def best_paths(cost: np.ndarray, steps: int, k: int = 1) -> list[tuple[float, tuple[int, ...]]]:
    """The ``k`` cheapest paths 0 = n_0 < n_1 < ... < n_steps = M-1 through the M x M ``cost``
    (cost[i, j]: one edge i -> j; inf = not allowed), as (total cost, (n_0, ..., n_{steps-1})), cheapest first.

    Dynamic programming over (edges used, node), keeping the k best partial paths per state:
    O(steps M^2 k log k). Ties are broken by the node sequence, so the result is deterministic.
    """
    cost = np.asarray(cost, dtype=np.float64)
    M = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != M:
        raise SearchError(f"cost matrix has shape {cost.shape}; expected a square matrix")
    if not 1 <= steps <= M - 1:
        raise SearchError(
            f"{steps} steps cannot be laid on a grid of {M - 1} points: "
            f"choose 1 <= NFE <= {M - 1} or a finer --grid-points"
        )
    # best[j]: the k best (cost, path-to-j) using the current number of edges
    best: list[list[tuple[float, tuple[int, ...]]]] = [[] for _ in range(M)]
    best[0] = [(0.0, (0,))]
    for s in range(1, steps + 1):
        nxt: list[list] = [[] for _ in range(M)]
        # after s edges the node is >= s; it must leave room for the remaining steps - s edges
        last = M - 1 if s == steps else M - 1 - (steps - s)
        for j in range(s, last + 1):
            if s == steps and j != M - 1:
                continue
            cands = []
            for i in range(s - 1, j):
                c_ij = cost[i, j]
                if not math.isfinite(c_ij):
                    continue
                for c, path in best[i]:
                    cands.append((c + c_ij, path + (j,)))
            cands.sort()
            nxt[j] = cands[:k]
        best = nxt
    return [(c, path[:-1]) for c, path in best[M - 1]]


@dataclass
class DPResult:
    grid: tuple
    cost: np.ndarray
    paths: list  # [(cost, timesteps)], cheapest first
    teacher_seconds: float
    teacher_cached: bool
    solve_seconds: float
    matrix_seconds: float

    def summary(self) -> dict:
        return {
            "grid_points": len(self.grid),
            "teacher_seconds": round(self.teacher_seconds, 1),
            "teacher_cached": self.teacher_cached,
            "matrix_seconds": round(self.matrix_seconds, 2),
            "solve_seconds": round(self.solve_seconds, 3),
            "paths": [{"cost": c, "timesteps": list(ts)} for c, ts in self.paths],
        }


def dp_schedules(model, teacher: Teacher, nfe: int, k: int = 4, clip_denoised: bool = True) -> DPResult:
    """The ``k`` best NFE-step schedules on the teacher's grid (each starts at T-1)."""
    t0 = time.perf_counter()
    C = cost_matrix(model, teacher, clip_denoised)
    t1 = time.perf_counter()
    paths = best_paths(C, nfe, k)
    t2 = time.perf_counter()
    out = [(c, tuple(teacher.grid[n] for n in nodes)) for c, nodes in paths]
    return DPResult(teacher.grid, C, out, teacher.seconds, teacher.cached, t2 - t1, t1 - t0)


def skip_sensitivity(
    model,
    teacher: Teacher,
    points: Optional[int] = None,
    num_samples: Optional[int] = None,
    batch_size: int = 128,
    clip_denoised: bool = True,
    cache_dir: Optional[Path] = None,
) -> dict:
    """Per-layer, per-step sensitivity: the trajectory cost of skipping each layer alone at each step.

    For grid point g (every one, or ``points`` of them evenly picked) and layer L: one DDIM step from the
    teacher's state at grid[g] to grid[g+1] (clean data after the last point) with L skipped, its mean
    per-sample RMS distance to the teacher's next state. The full model's step is the teacher's own, so
    its cost is 0 and every entry is the damage skipping L alone does there. Returns
    {"timesteps": [...], "layers": [...], "macs": [...], "cost": [[per layer] per timestep]}.
    ``cache_dir``: keep it there as JSON, keyed by the teacher and the arguments (a search over several
    NFEs computes it once).
    """
    key = {
        **teacher.key,
        "table": "skip-sensitivity-v1",
        "points": points,
        "num_samples": num_samples,
        "clip_denoised": bool(clip_denoised),
        "layers": [layer.id for layer in model.unet.layers],
    }
    path = _cache_path(cache_dir, key, "sensitivity", ".json") if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            d = loads_json(path.read_bytes())
        except (OSError, ValueError):  # unreadable: recompute and overwrite it
            d = None
        if isinstance(d, dict) and d.get("key") == key and isinstance(d.get("table"), dict):
            return d["table"]
    table = _skip_sensitivity(model, teacher, points, num_samples, batch_size, clip_denoised)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "table": table}, indent=None)
    return table


@torch.inference_mode()
def _skip_sensitivity(model, teacher: Teacher, points, num_samples, batch_size: int, clip_denoised: bool) -> dict:
    from autodiffusion_rt.sampling import make_eps_fn

    G = len(teacher.grid)
    idx = (
        list(range(G))
        if points is None or points >= G
        else sorted({int(round(k)) for k in np.linspace(0, G - 1, points)})
    )
    n = teacher.states.shape[1] if num_samples is None else min(int(num_samples), teacher.states.shape[1])
    layers = list(model.unet.layers)
    all_ids = model.unet.layer_ids
    _, y, _ = initial_state(model, teacher.states.shape[1], teacher.key["seed"])
    y = None if y is None else y[:n]
    table = []
    for g in idx:
        ts = [teacher.grid[g]] if g == G - 1 else [teacher.grid[g], teacher.grid[g + 1]]
        row = compute_coefficients("ddim", model.schedule, ts, 0.0, clip_denoised).row(0)
        x = teacher.states[g][:n]
        target = (teacher.final if g == G - 1 else teacher.states[g + 1])[:n]
        costs = []
        for layer in layers:
            eps = make_eps_fn(model, y, [all_ids - {layer.id}], batch_size)(x, teacher.grid[g], 0)
            x_next, _ = step_update(row, x, eps)
            costs.append(float(per_sample_rms(x_next.clamp(-1, 1) if g == G - 1 else x_next, target).mean()))
        table.append(costs)
    return {
        "timesteps": [teacher.grid[g] for g in idx],
        "layers": [layer.id for layer in layers],
        "macs": [int(layer.macs) for layer in layers],
        "cost": table,
        "num_samples": n,
    }


def cheapest_skips(table: dict, timesteps, full_step_macs: int, budget_macs: Optional[int]) -> tuple:
    """Skip sets for ``timesteps`` that meet ``budget_macs`` by skipping the (step, layer) pairs the
    sensitivity table says cost least per MAC saved (each step reads the table's nearest timestep)."""
    nfe = len(timesteps)
    skips: list[list[str]] = [[] for _ in range(nfe)]
    if budget_macs is None or full_step_macs * nfe <= budget_macs:
        return tuple(tuple(s) for s in skips)
    rows = [min(range(len(table["timesteps"])), key=lambda r: abs(table["timesteps"][r] - t)) for t in timesteps]
    pairs = sorted(
        (
            (table["cost"][rows[i]][k] / max(table["macs"][k], 1), i, lid)
            for i in range(nfe)
            for k, lid in enumerate(table["layers"])
        ),
    )
    macs = {lid: m for lid, m in zip(table["layers"], table["macs"])}
    total = full_step_macs * nfe
    for _, i, lid in pairs:
        if total <= budget_macs:
            break
        skips[i].append(lid)
        total -= macs[lid]
    return tuple(tuple(sorted(s)) for s in skips)
