"""How well does each search objective rank candidates like FID on fresh samples?

For >= 30 NFE-k candidate schedules (the uniform baselines, the DP schedules,
random schedules and mutants of them), measure each objective the search can
use on the search's samples (seed --seed, --num-samples of them):

* ``fid``: FID of the N samples (the old fitness),
* ``trajectory``: mean per-sample RMS distance to the teacher's images (pixels),
* ``trajectory-features``: the same in the extractor's feature space,
* ``dp-cost``: the DP's summed local-error cost of the schedule on the teacher grid (grid schedules only),

and the FID of --fresh-samples samples of another seed; print Spearman's rho of each objective
with the fresh FID (and write them as JSON). Example (about 30 min on the 2-core CPU)::

    OMP_NUM_THREADS=1 python scripts/rank_correlation.py --candidates 30 --fresh-samples 2000 --out rank.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:mnist")
    p.add_argument("--nfe", type=int, default=4)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--num-samples", type=int, default=128, help="the search's samples per candidate")
    p.add_argument("--fresh-samples", type=int, default=2000, help="samples of the fresh FID (ground truth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh-seed", type=int, default=1000)
    p.add_argument("--grid-points", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--teacher-cache", default="plans/.teacher-cache")
    p.add_argument("--out", default=None, help="write the measurements as JSON")
    args = p.parse_args(argv)

    from pathlib import Path

    from scipy.stats import spearmanr

    from autodiffusion_rt.diffusion import uniform_timesteps
    from autodiffusion_rt.metrics import get_extractor, resolve_reference
    from autodiffusion_rt.models import load_model
    from search.dp import best_paths, compute_teacher, cost_matrix, teacher_grid
    from search.fitness import FitnessEvaluator
    from search.space import Candidate, SearchSpace

    t0 = time.perf_counter()
    model = load_model(args.model)
    ext = get_extractor("mnist")
    ref, _ = resolve_reference("mnist", ext)
    T = model.num_timesteps
    grid = teacher_grid(T, args.grid_points, "quadratic", model.schedule)
    teacher = compute_teacher(
        model, args.seed, args.num_samples, grid, batch_size=args.batch_size, cache_dir=Path(args.teacher_cache)
    )
    C = cost_matrix(model, teacher)
    index = {t: g for g, t in enumerate(grid)}

    def dp_cost(ts):
        if not all(t in index for t in ts):
            return None
        nodes = [index[t] for t in ts] + [len(grid)]
        return float(sum(C[a, b] for a, b in zip(nodes, nodes[1:])))

    rng = np.random.default_rng(args.seed)
    space = SearchSpace(
        T, args.nfe, {layer.id: layer.macs for layer in model.unet.layers}, model.unet.macs(), allow_skip=False
    )
    cands = [
        Candidate.full(uniform_timesteps(T, args.nfe, sp, model.schedule)) for sp in ("linear", "quadratic", "logsnr")
    ]
    cands += [Candidate.full(tuple(grid[n] for n in nodes)) for _, nodes in best_paths(C, args.nfe, 4)]
    # Random grid schedules starting at T-1 (so dp-cost is defined for many), mutants and random schedules.
    while len(cands) < args.candidates:
        kind = len(cands) % 3
        if kind == 0:
            mid = sorted(rng.choice(np.arange(1, len(grid)), size=args.nfe - 1, replace=False))
            c = Candidate.full((grid[0],) + tuple(grid[m] for m in mid))
        elif kind == 1:
            c = space.mutate(cands[int(rng.integers(len(cands)))], rng, 0.5)
        else:
            c = space.random(rng)
        if c not in cands:
            cands.append(c)
    cands = cands[: args.candidates]

    # One set of samples on the search's seed, every objective computed from the same images.
    ev = FitnessEvaluator(
        model,
        args.sampler,
        0.0,
        args.num_samples,
        args.seed,
        ext,
        ref,
        batch_size=args.batch_size,
        objective="trajectory",
        target=teacher.final,
    )
    images = ev.samples(cands)
    scores: dict[str, list] = {"fid": [ev.fid_of(x) for x in images]}
    for objective in ("trajectory", "trajectory-features"):
        ev.objective = objective
        scores[objective] = [ev.distance_of(x) for x in images]
    print(f"search-seed objectives: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    scores["dp-cost"] = [dp_cost(c.timesteps) for c in cands]
    fresh = FitnessEvaluator(
        model, args.sampler, 0.0, args.fresh_samples, args.fresh_seed, ext, ref, batch_size=args.batch_size
    )
    truth = fresh.evaluate(cands)
    print(f"fresh FID: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    result = {
        "model": args.model,
        "fingerprint": model.fingerprint,
        "nfe": args.nfe,
        "sampler": args.sampler,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "fresh_samples": args.fresh_samples,
        "fresh_seed": args.fresh_seed,
        "grid_points": args.grid_points,
        "candidates": [list(c.timesteps) for c in cands],
        "fresh_fid": truth,
        "objectives": scores,
        "spearman": {},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(
        f"{len(cands)} candidates, NFE {args.nfe}, {args.sampler}; "
        f"Spearman rho with FID on {args.fresh_samples} fresh samples (seed {args.fresh_seed}):"
    )
    for name, vals in scores.items():
        pairs = [(v, f) for v, f in zip(vals, truth) if v is not None and np.isfinite(v) and np.isfinite(f)]
        rho = (
            float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
            if len(pairs) >= 3
            else float("nan")
        )
        result["spearman"][name] = {"rho": rho, "n": len(pairs)}
        print(f"  {name:22s} rho = {rho:+.3f}  over {len(pairs)} candidates")
    if args.out:
        from autodiffusion_rt.utils import atomic_write

        with atomic_write(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
