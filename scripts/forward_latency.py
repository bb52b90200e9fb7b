"""Forward-pass latency of two or more models, measured in one run: the "no slower than" check.

    python scripts/forward_latency.py --models embedded:mnist,ckpt:old.pt --batch-sizes 1,256 --threads 2

For each batch size the models are timed in alternating rounds (so a change in the
machine's load hits all of them alike), each round the median of ``--repeats``
forward passes at a mid-schedule timestep with labels; the table gives the median
over rounds and every model's ratio to the first one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import autodiffusion_rt as ad  # noqa: E402
from benchmark import _times  # noqa: E402  (the benchmark's one timing helper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="comma-separated model specs; ratios are to the first")
    p.add_argument("--batch-sizes", default="1,256")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = args.models.split(",")
    models = [ad.load_model(s) for s in specs]
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        gen = torch.Generator().manual_seed(0)
        feeds = [
            (
                torch.randn(bs, m.unet.in_channels, m.unet.image_size, m.unet.image_size, generator=gen),
                torch.full((bs,), m.num_timesteps // 2),
                torch.arange(bs) % m.unet.num_classes if m.unet.num_classes else None,
            )
            for m in models
        ]
        medians = [[] for _ in models]
        with torch.inference_mode():
            for _ in range(args.rounds):
                for k, m in enumerate(models):
                    xb, tb, yb = feeds[k]
                    medians[k].append(statistics.median(_times(lambda: m.unet(xb, tb, yb), args.repeats, warmup=1)))
        ms = [statistics.median(v) for v in medians]
        for spec, m, t in zip(specs, models, ms):
            rows.append(
                {
                    "model": spec,
                    "batch": bs,
                    "ms": round(t, 2),
                    "ratio_to_first": round(t / ms[0], 3),
                    "macs_per_sample": m.unet.macs(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print("\n| model | batch | forward ms (median) | ratio to first | MACs/sample |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['ms']} | {r['ratio_to_first']:.2f}x "
            f"| {r['macs_per_sample'] / 1e6:.1f} M |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
