"""FID of the embedded model's usual samplers, the table in the FID issue's note.

    python scripts/fid_table.py --n 2000 --extractors mnist
    python scripts/fid_table.py --n 2000 --extractors mnist,inception --inception-rows ddim:4,ddim:50

Each row samples ``--n`` images once (seed ``--seed``, uniform linear timesteps)
and scores them with every extractor against the statistics of all 5,000
embedded MNIST digits (the Inception extractor only on ``--inception-rows``: it
runs at a few images per second on a CPU). DDPM rows use ``--ddpm-n`` samples. The real-vs-real row is two disjoint halves of the
digits (2,500 each), one scored against the other's statistics.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import autodiffusion_rt as ad
from autodiffusion_rt.data import load_mnist
from autodiffusion_rt.diffusion import uniform_timesteps
from autodiffusion_rt.metrics import compute_stats, frechet_distance, get_extractor, reference_stats

DEFAULT_ROWS = "ddim:4,ddim:6,ddim:10,ddim:20,ddim:50,dpmpp_2m:4,dpmpp_2m:6,dpmpp_2m:10,ddpm:1000"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:mnist")
    p.add_argument("--rows", default=DEFAULT_ROWS, help="sampler:steps, comma-separated, plus 'real' (default: all)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extractors", default="mnist")
    p.add_argument("--inception-rows", default="ddim:4,ddim:50", help="rows scored with inception when it is an extractor")
    p.add_argument("--ddpm-n", type=int, default=1000, help="samples for ddpm rows (default: %(default)s)")
    p.add_argument("--no-real", action="store_true", help="skip the real-vs-real row")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()

    model = ad.load_model(args.model)
    extractors = [get_extractor(name) for name in args.extractors.split(",")]
    refs = {e.name: reference_stats("mnist", e) for e in extractors}
    rows = []

    def score(label: str, images: torch.Tensor, seconds: float, spec: str) -> None:
        row = {"row": label, "n": len(images), "sample_s": round(seconds, 1)}
        for e in extractors:
            if e.name == "inception" and spec not in args.inception_rows.split(","):
                continue
            t0 = time.time()
            row[f"fid_{e.name}"] = round(float(frechet_distance(compute_stats(images, e), refs[e.name])), 3)
            row[f"fid_{e.name}_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not args.no_real:
        x, _ = load_mnist("all")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
        a, b = x[perm[: len(x) // 2]], x[perm[len(x) // 2 :]]
        row = {"row": "real vs real (disjoint halves)", "n": len(a), "sample_s": 0.0}
        for e in extractors:
            t0 = time.time()
            row[f"fid_{e.name}"] = round(float(frechet_distance(compute_stats(a, e), compute_stats(b, e))), 3)
            row[f"fid_{e.name}_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for spec in args.rows.split(","):
        sampler, steps = spec.split(":")
        ts = uniform_timesteps(model.num_timesteps, int(steps), "linear")
        t0 = time.time()
        n = args.ddpm_n if sampler == "ddpm" else args.n
        images = ad.sample(model, ts, sampler=sampler, n=n, seed=args.seed)
        score(f"{sampler}-{steps}", images, time.time() - t0, spec)

    names = [e.name for e in extractors]
    print("\n| row | n | " + " | ".join(f"FID ({n})" for n in names) + " | sampling s |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for r in rows:
        print(f"| {r['row']} | {r['n']} | " + " | ".join(f"{r['fid_' + n]:.2f}" if "fid_" + n in r else "" for n in names) + f" | {r['sample_s']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
