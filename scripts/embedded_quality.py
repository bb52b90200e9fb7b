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
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import autodiffusion_rt as ad
from autodiffusion_rt.diffusion import uniform_timesteps
from autodiffusion_rt.metrics import compute_stats, frechet_distance, get_extractor, reference_stats
from autodiffusion_rt.metrics.mnist_classifier import accuracy, gray_border_fraction, load_classifier

CHECKS = {"ddim50": ("ddim", 50), "ddim10": ("ddim", 10), "ddpm1000": ("ddpm", 1000)}
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
    args = p.parse_args()

    model = ad.load_model(args.model)
    classifier, _ = load_classifier()
    extractor = get_extractor("mnist")
    ref = reference_stats("mnist", extractor)
    results = {"model": args.model, "fingerprint": model.fingerprint, "seed": args.seed, "macs_per_sample": model.unet.macs()}
    for name in args.checks.split(","):
        sampler, steps = CHECKS[name]
        n = args.ddpm_n if sampler == "ddpm" else args.n
        labels = torch.arange(n) % 10
        t0 = time.time()
        images = ad.sample(model, uniform_timesteps(model.num_timesteps, steps), sampler, n=n, seed=args.seed, labels=labels)
        results[name] = {"n": n, **quality(images, labels, classifier, extractor, ref), "seconds": round(time.time() - t0, 1)}
        print(json.dumps({name: results[name]}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
