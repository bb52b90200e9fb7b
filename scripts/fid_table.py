"""FID of the embedded model's usual samplers, the table in the FID issue's note.

    python scripts/fid_table.py --n 2000 --extractors mnist
    python scripts/fid_table.py --n 2000 --extractors mnist,inception --inception-rows ddim:4,ddim:50
    python scripts/fid_table.py --n 2000 --seed 7 --nfe 2,3,4,6,10 --json fid-seed7.json   # every baseline

A row is ``sampler:steps`` (uniform linear timesteps) or ``sampler:steps:spacing``
(linear, quadratic, logsnr or karras). ``--nfe`` replaces ``--rows`` with every
deterministic sampler (the report's: DDIM, DPM-Solver++(2M), iPNDM, UniPC-2, UniPC-3)
at every spacing at each of those NFEs, plus ``ddim:50`` (the "best uniform" field
of the search report, and its reference).

Each row samples ``--n`` images once (seed ``--seed``, uniform timesteps)
and scores them with every extractor against the statistics of all 5,000
embedded MNIST digits (the Inception extractor only on ``--inception-rows``: it
runs at a few images per second on a CPU). DDPM rows use ``--ddpm-n`` samples.
The real-vs-real row is two disjoint halves of the digits (2,500 each), one
scored against the other's statistics (with Inception only when ``real`` is
among ``--inception-rows``: 5,000 more Inception passes).

``--cache-dir DIR`` keeps every chunk of samples (see ``embedded_quality.py``) and
``--json`` is rewritten after each row; a rerun with the same ``--json`` keeps the
rows it already holds, so a long table survives being stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import autodiffusion_rt as ad
from autodiffusion_rt.data import load_mnist
from autodiffusion_rt.metrics import FIDWarning, compute_stats, frechet_distance, get_extractor, reference_stats
from autodiffusion_rt.plan import Plan
from autodiffusion_rt.utils import atomic_write
from embedded_quality import sample_in_chunks  # scripts/: the one chunked, cached sampler

DEFAULT_ROWS = "ddim:4,ddim:6,ddim:10,ddim:20,ddim:50,dpmpp_2m:4,dpmpp_2m:6,dpmpp_2m:10,ddpm:1000"


def baseline_specs(nfes: str) -> str:
    """Every (deterministic sampler, spacing) row at each NFE, as the search report's baselines, then ddim:50."""
    from autodiffusion_rt.registry import SPACINGS
    from search.report import SAMPLER_LABELS

    specs = [f"{sm}:{nfe}:{sp}" for nfe in nfes.split(",") for _, sm in SAMPLER_LABELS for sp in SPACINGS]
    return ",".join([*specs, "ddim:50"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:mnist")
    p.add_argument(
        "--rows", default=DEFAULT_ROWS, help="sampler:steps[:spacing], comma-separated, plus 'real' (default: all)"
    )
    p.add_argument("--nfe", default=None, help="e.g. 2,3,4,6,10: every sampler at every spacing at these NFEs")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extractors", default="mnist")
    p.add_argument(
        "--inception-rows", default="ddim:4,ddim:50", help="rows scored with inception when it is an extractor"
    )
    p.add_argument("--ddpm-n", type=int, default=1000, help="samples for ddpm rows (default: %(default)s)")
    p.add_argument("--plans", default="", help="plan.json files, comma-separated: a row each, from the same noise")
    p.add_argument("--no-real", action="store_true", help="skip the real-vs-real row")
    p.add_argument("--json", default=None, help="also write the rows here (rows already there are kept, not redone)")
    p.add_argument("--cache-dir", type=Path, default=None, help="keep sample chunks here; a rerun resumes from them")
    p.add_argument("--chunk", type=int, default=250, help="samples per chunk (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress: no feature bars, no line per sample chunk")
    args = p.parse_args(argv)
    if args.cache_dir is not None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
    inception_rows = args.inception_rows.split(",")
    if args.nfe:
        args.rows = baseline_specs(args.nfe)

    model = ad.load_model(args.model)
    extractors = [get_extractor(name) for name in args.extractors.split(",")]
    progress = not args.quiet  # Inception runs at a few images a second here: its passes take minutes
    for e in extractors:  # said once here, instead of a FIDWarning per row (the README's table says it too)
        small = sorted(n for n in {args.n, args.ddpm_n} if n <= e.feature_dim)
        if small:
            print(f"note: {e.name} features are {e.feature_dim}-d: rows of {' or '.join(map(str, small))} samples "
                  "have a rank-deficient covariance, so their FIDs are biased upward: compare them only with rows "
                  "of the same n", file=sys.stderr)
    refs = {e.name: reference_stats("mnist", e, progress=progress) for e in extractors}  # cached after the first run
    done = {}
    if args.json and Path(args.json).exists():
        done = {
            r["row"]: r
            for r in json.loads(Path(args.json).read_text())
            if r.get("seed", args.seed) == args.seed and r.get("model") == model.fingerprint
        }
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with atomic_write(args.json) as f:
                json.dump(rows, f, indent=1)

    def score(label: str, spec: str, images, reference) -> dict:
        """FID columns of ``images`` against ``reference(extractor)``, the inception one only for ``inception_rows``."""
        row = {"row": label, "model": model.fingerprint, "seed": args.seed}
        for e in extractors:
            if e.name == "inception" and spec not in inception_rows:
                continue
            t0 = time.time()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "only .* samples for", FIDWarning)  # the note above says it
                stats = compute_stats(images, e, progress=progress)
            row[f"fid_{e.name}"] = round(float(frechet_distance(stats, reference(e))), 3)
            row[f"fid_{e.name}_s"] = round(time.time() - t0, 1)
        return row

    def wanted(label: str, spec: str) -> bool:
        """True unless ``--json`` already holds this row with every column asked for."""
        old = done.get(label)
        need = [e.name for e in extractors if e.name != "inception" or spec in inception_rows]
        if old is not None and all(f"fid_{name}" in old for name in need):
            add(old)
            return False
        return True

    if not args.no_real and wanted("real vs real (disjoint halves)", "real"):
        x, _ = load_mnist("all")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
        a, b = x[perm[: len(x) // 2]], x[perm[len(x) // 2 :]]
        add(
            {
                **score("real vs real (disjoint halves)", "real", a, lambda e: compute_stats(b, e)),
                "n": len(a),
                "sample_s": 0.0,
            }
        )

    for spec in args.rows.split(","):
        sampler, steps, spacing = (spec.split(":") + ["linear"])[:3]
        label = f"{sampler}-{steps}" + ("" if spacing == "linear" else f"-{spacing}")
        if not wanted(label, spec):
            continue
        t0 = time.time()
        n = args.ddpm_n if sampler == "ddpm" else args.n
        images = sample_in_chunks(
            model, sampler, int(steps), n, args.seed, None, args.cache_dir, args.chunk, spacing, quiet=args.quiet
        )
        seconds = time.time() - t0
        add({**score(label, spec, images, lambda e: refs[e.name]), "n": n, "sample_s": round(seconds, 1)})

    for path in filter(None, args.plans.split(",")):
        plan = Plan.load(path)
        label = f"plan {Path(path).name} ({plan.sampler} {','.join(map(str, plan.timesteps))})"
        if not wanted(label, "plan"):
            continue
        t0 = time.time()
        steps, cache = len(plan.timesteps), args.cache_dir
        images = sample_in_chunks(
            model, plan.sampler, steps, args.n, args.seed, None, cache, args.chunk, plan=plan, quiet=args.quiet
        )
        seconds = round(time.time() - t0, 1)
        add({**score(label, "plan", images, lambda e: refs[e.name]), "n": args.n, "sample_s": seconds})

    names = [e.name for e in extractors]
    print("\n| row | n | " + " | ".join(f"FID ({n})" for n in names) + " | sampling s |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for r in rows:
        print(
            f"| {r['row']} | {r['n']} | "
            + " | ".join(f"{r['fid_' + n]:.2f}" if "fid_" + n in r else "" for n in names)
            + f" | {r['sample_s']} |"
        )


if __name__ == "__main__":
    main()
