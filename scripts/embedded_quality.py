"""Quality of the embedded model: the figures the embedded-model issue asks for.

    python scripts/embedded_quality.py --n 1000 --seed 2026
    python scripts/embedded_quality.py --model ckpt:path/to/embedded_mnist.pt --checks ddim50,ddim10

Labels cycle 0-9. For each check it reports, on fresh samples of ``--seed``:

* conditional accuracy: the project's MNIST classifier (98.6% on held-out real
  digits) agrees with the requested label;
* failed images: the mean of the 3-pixel border, on a [0, 1] scale, is above
  0.15 (a gray-background blob; 0% of the 5,000 real digits are);
* mnist FID against all 5,000 embedded digits.

Checks: ``ddim50``, ``ddim10`` (FID <= 6 target), ``ddpm1000`` (accuracy target;
``--ddpm-n`` samples, 1,000 by default, since it costs 1,000 model calls).

DDPM-1000 on 1,000 samples is about an hour of CPU, so ``--cache-dir DIR`` keeps
every chunk of ``--chunk`` samples there (written to a temporary file and
renamed): a run that is stopped resumes at the chunk it was on. Chunks are the
same images one call would give (per-sample noise), so the result does not
depend on where it stopped. ``--compile`` runs the UNet through torch.compile
(the same function up to float rounding; ~20% faster here).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import autodiffusion_rt as ad
from autodiffusion_rt.diffusion import uniform_timesteps
from autodiffusion_rt.metrics import compute_stats, frechet_distance, get_extractor, reference_stats
from autodiffusion_rt.metrics.mnist_classifier import accuracy, gray_border_fraction, load_classifier
from autodiffusion_rt.utils import atomic_write

CHECKS = {"ddim50": ("ddim", 50), "ddim10": ("ddim", 10), "ddpm1000": ("ddpm", 1000)}


def sample_in_chunks(
    model,
    sampler: str,
    steps: int,
    n: int,
    seed: int,
    labels: torch.Tensor | None,
    cache_dir: Path | None,
    chunk: int,
    spacing: str = "linear",
    plan=None,
    quiet: bool = False,
) -> torch.Tensor:
    """``ad.sample`` of ``n`` images (uniform timesteps, ``spacing``), ``chunk`` at a time, each kept in ``cache_dir``.

    ``labels`` None: drawn from ``seed`` per sample, as ``ad.sample`` draws them.
    A cached chunk is used only when it was made by the same model, sampler,
    seed, sample range and labels. ``plan`` (an autodiffusion_rt Plan): its
    timesteps, sampler, eta and skipped layers instead (same noise per seed). A line per chunk sampled unless
    ``quiet``.
    """
    ts = uniform_timesteps(model.num_timesteps, steps, spacing, model.schedule) if plan is None else plan.timesteps
    keep, eta = (None, 0.0) if plan is None else (plan.keep_sets(model), plan.eta)
    name = f"{sampler}{steps}{'' if spacing == 'linear' else '-' + spacing}"
    if plan is not None:
        name = f"plan{plan.sha256()[:12]}"
    parts = []
    for first in range(0, n, chunk):
        k = min(chunk, n - first)
        want = None if labels is None else labels[first : first + k]
        drawn = "-drawn" if want is None else ""
        path = (
            None
            if cache_dir is None
            else cache_dir
            / f"{model.fingerprint[:16]}-{name}-seed{seed}-{first}+{k}{drawn}.pt"
        )
        if path is not None and path.exists():
            saved = torch.load(path, weights_only=True)
            if want is None or torch.equal(saved["labels"], want):
                parts.append(saved["images"])
                continue
        images, got = ad.sample(
            model, ts, sampler, n=k, seed=seed, eta=eta, keep=keep, labels=want, first=first, batch_size=chunk,
            return_labels=True,
        )
        if path is not None:
            with atomic_write(path, "wb") as f:
                torch.save({"images": images, "labels": got}, f)
        if not quiet:
            print(f"  {name}: samples {first}..{first + k - 1} done", flush=True)
        parts.append(images)
    return torch.cat(parts)


def quality(images: torch.Tensor, labels: torch.Tensor, classifier, extractor, ref) -> dict:
    return {
        "accuracy": round(accuracy(classifier, images, labels), 4),
        "failed": round(gray_border_fraction(images), 4),
        "fid_mnist": round(float(frechet_distance(compute_stats(images, extractor), ref)), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:mnist")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, from {list(CHECKS)}")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--ddpm-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--cache-dir", type=Path, default=None, help="keep finished chunks here; a rerun resumes from them")
    p.add_argument("--chunk", type=int, default=100, help="samples per chunk (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="run the UNet through torch.compile")
    args = p.parse_args()
    if args.chunk < 1:
        p.error(f"--chunk must be >= 1, got {args.chunk}")
    if args.cache_dir is not None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)

    model = ad.load_model(args.model)
    if args.compile:
        model.unet.forward = torch.compile(model.unet.forward)
    classifier, _ = load_classifier()
    extractor = get_extractor("mnist")
    ref = reference_stats("mnist", extractor)
    results = {
        "model": args.model,
        "fingerprint": model.fingerprint,
        "seed": args.seed,
        "macs_per_sample": model.unet.macs(),
    }
    for name in args.checks.split(","):
        sampler, steps = CHECKS[name]
        n = args.ddpm_n if sampler == "ddpm" else args.n
        labels = torch.arange(n) % 10
        t0 = time.time()
        images = sample_in_chunks(model, sampler, steps, n, args.seed, labels, args.cache_dir, args.chunk)
        results[name] = {
            "n": n,
            **quality(images, labels, classifier, extractor, ref),
            "seconds": round(time.time() - t0, 1),
        }
        print(json.dumps({name: results[name]}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
