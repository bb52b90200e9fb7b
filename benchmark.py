"""Latency and throughput, side by side, measured in one run.

    python benchmark.py --plan plan.json [--engines DIR] [--batch-sizes 1,16,256]
                        [--e2e-batch-sizes 1,16] [--repeats 5] [--full-steps 50] [--json OUT]
    python benchmark.py --serve http://127.0.0.1:8000 [...]   (load test of a running service:
                        autodiffusion_rt/serve/loadtest.py)

Two tables:

* **per-step latency**: every step of the plan at each batch size, the plan's
  subnetwork plus its fused sampler update, on torch eager (the reference
  engine) and on the onnxruntime engine, median of ``--repeats`` timed runs
  after ``--warmup``, and the ratio torch / onnxruntime;
* **end-to-end**: sampling ``n`` images with the full model and DDIM over
  ``--full-steps`` uniform steps on torch eager (the usual way), the plan on
  torch eager, and the plan's onnxruntime engines; latency, images/s, and the
  speedup over the full-model baseline.

Without ``--engines`` the plan is built into a temporary dir first
(onnxruntime, fp32, max batch = the largest batch asked for). ``--tiny`` runs
on a small random-weight model and plan instead of a plan file (a smoke test
of the tool, not a meaningful figure). Ratios are only comparable within one
run: the machine's load changes absolute times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["format_report", "main", "run"]


def _time(fn, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _feeds(engine, batch: int, num_classes: Optional[int], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in engine.inputs:
        shape = spec.concrete(batch)
        if spec.dtype == "int64":
            feeds[spec.name] = rng.integers(0, num_classes or 1, shape).astype(np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _tiny_plan():
    """A random-weight tiny ADM model and a 4-step plan with layers skipped (for --tiny)."""
    from autodiffusion_rt.models.loading import _build
    from autodiffusion_rt.models.unet import ADMUNet
    from autodiffusion_rt.plan import Plan

    cfg = dict(image_size=28, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
               attention_resolutions=(2, 4), channel_mult=(1, 1, 2), conv_resample=False, num_classes=10,
               num_heads=4, use_scale_shift_norm=True)
    torch.manual_seed(0)
    unet = ADMUNet(**cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model = _build("tiny:benchmark", cfg, dict(noise_schedule="cosine", diffusion_steps=1000, learn_sigma=False),
                   unet.state_dict(), "random", {})
    ids = sorted(model.unet.layer_ids)
    attn = [layer.id for layer in model.layers if layer.kind == "attn"]
    skip = [[], attn, sorted(set(attn + ids[:2])), sorted(set(attn + ids[-3:]))]
    return model, Plan.for_model(model, [999, 700, 400, 120], sampler="dpmpp_2m", skip=skip, spec="tiny:benchmark")


def run(plan_path=None, *, engines=None, model=None, plan=None, batch_sizes: Sequence[int] = (1, 16, 256),
        e2e_batch_sizes: Sequence[int] = (1, 16), repeats: int = 5, warmup: int = 1, full_steps: int = 50,
        threads: Optional[int] = None, progress: bool = False) -> dict:
    """Measure everything; return a JSON-able report (see :func:`format_report`)."""
    from autodiffusion_rt import sample
    from autodiffusion_rt.diffusion import uniform_timesteps
    from autodiffusion_rt.plan import Plan
    from autodiffusion_rt.runtime import Runtime, library_versions, load_plan_model

    if threads:
        torch.set_num_threads(int(threads))
    if plan is None:
        plan = Plan.load(plan_path)
    model = load_plan_model(plan, model)
    tmp = None
    try:
        if engines is None:
            from export.build import build_engines

            tmp = tempfile.TemporaryDirectory(prefix="adrt-bench-")
            engines = Path(tmp.name) / "engines"
            build_engines(plan, engines, model=model, max_batch=max([*batch_sizes, *e2e_batch_sizes]), progress=progress)
        ort_rt = Runtime.load(engines, plan=plan, threads=threads)
        torch_rt = Runtime.from_plan(plan, model=model)
        report = {
            "plan": {"timesteps": list(plan.timesteps), "sampler": plan.sampler, "skip": [list(s) for s in plan.skip],
                     "macs_per_sample": plan.macs_per_sample, "model": model.name},
            "engines": {"dir": str(engines), "backend": ort_rt.backend_name, "max_batch": ort_rt.max_batch},
            "machine": {"python": platform.python_version(), "threads": torch.get_num_threads(),
                        "processor": platform.processor() or platform.machine(), **library_versions("onnxruntime")},
            "settings": {"repeats": repeats, "warmup": warmup, "full_steps": full_steps},
            "per_step": [],
            "end_to_end": [],
            "notes": [],
        }
        # ---------------------------------------------------------- per step
        for b in batch_sizes:
            if ort_rt.max_batch is not None and b > ort_rt.max_batch:
                report["notes"].append(f"batch {b} skipped in the per-step table: the engines take at most {ort_rt.max_batch}")
                continue
            for i, (te, oe) in enumerate(zip(torch_rt.engines, ort_rt.engines)):
                feeds = _feeds(oe, b, model.num_classes, seed=i)
                out = {s.name: np.empty(s.concrete(b), s.dtype) for s in oe.outputs}
                t_ms = _time(lambda: te.run(feeds), repeats, warmup)
                o_ms = _time(lambda: oe.run(feeds, out), repeats, warmup)
                report["per_step"].append({
                    "step": i, "timestep": plan.timesteps[i], "batch": b, "skipped_layers": len(plan.skip[i]),
                    "torch_ms": round(t_ms, 3), "onnxruntime_ms": round(o_ms, 3), "speedup": round(t_ms / o_ms, 3),
                })
        # -------------------------------------------------------- end to end
        full_ts = uniform_timesteps(model.num_timesteps, full_steps)
        for n in e2e_batch_sizes:
            base = _time(lambda: sample(model, full_ts, "ddim", n, 0), max(1, repeats // 2), 0)
            rows = [("full model, DDIM-%d, torch eager" % full_steps, base, full_steps)]
            rows.append(("plan, torch eager", _time(lambda: torch_rt.sample(n, seed=0), repeats, warmup), plan.nfe))
            rows.append(("plan, onnxruntime", _time(lambda: ort_rt.sample(n, seed=0), repeats, warmup), plan.nfe))
            for method, ms, nfe in rows:
                report["end_to_end"].append({
                    "method": method, "batch": n, "nfe": nfe, "ms": round(ms, 3),
                    "images_per_s": round(n / (ms / 1e3), 2), "speedup_vs_full": round(base / ms, 2),
                })
        ort_rt.close()
        torch_rt.close()
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_report(report: dict) -> str:
    """The two tables as text."""
    p = report["plan"]
    lines = [
        f"plan: {p['sampler']} over {p['timesteps']} on {p['model']}, {p['macs_per_sample'] / 1e6:.1f} MMACs per sample in all",
        f"engines: {report['engines']['backend']} (max batch {report['engines']['max_batch']}), "
        f"torch {report['machine']['torch']} with {report['machine']['threads']} threads",
        "",
        "per-step latency (ms, median)",
        f"{'step':>4} {'t':>5} {'skip':>4} {'batch':>6} {'torch eager':>12} {'onnxruntime':>12} {'ratio':>7}",
    ]
    for r in report["per_step"]:
        lines.append(f"{r['step']:>4} {r['timestep']:>5} {r['skipped_layers']:>4} {r['batch']:>6} "
                     f"{r['torch_ms']:>12.2f} {r['onnxruntime_ms']:>12.2f} {r['speedup']:>6.2f}x")
    lines += ["", "end-to-end sampling (ms, median)",
              f"{'method':<34} {'nfe':>4} {'batch':>6} {'ms':>10} {'img/s':>9} {'vs full':>8}"]
    for r in report["end_to_end"]:
        lines.append(f"{r['method']:<34} {r['nfe']:>4} {r['batch']:>6} {r['ms']:>10.1f} {r['images_per_s']:>9.1f} {r['speedup_vs_full']:>7.2f}x")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,16,256")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--serve" or a.startswith("--serve=") for a in argv):  # load test of a running service: its own options
        from autodiffusion_rt.serve.loadtest import main as serve_main

        return serve_main(argv)
    ap = argparse.ArgumentParser(description="autodiffusion-rt latency and throughput, side by side.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="plan.json to benchmark")
    src.add_argument("--tiny", action="store_true", help="a random tiny model and plan (smoke test of this tool)")
    ap.add_argument("--engines", default=None, help="engine dir built from the plan (default: build one in a temp dir)")
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 16, 256], help="per-step table batch sizes (default 1,16,256)")
    ap.add_argument("--e2e-batch-sizes", type=_ints, default=[1, 16], help="end-to-end batch sizes (default 1,16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    ap.add_argument("--full-steps", type=int, default=50, help="steps of the full-model DDIM baseline (default 50)")
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's choice)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON ('-' for stdout)")
    args = ap.parse_args(argv)
    from autodiffusion_rt.errors import Error

    try:
        if args.tiny:
            model, plan = _tiny_plan()
            report = run(plan=plan, model=model, engines=args.engines, batch_sizes=args.batch_sizes,
                         e2e_batch_sizes=args.e2e_batch_sizes, repeats=args.repeats, warmup=args.warmup,
                         full_steps=args.full_steps, threads=args.threads, progress=True)
        else:
            report = run(args.plan, engines=args.engines, batch_sizes=args.batch_sizes,
                         e2e_batch_sizes=args.e2e_batch_sizes, repeats=args.repeats, warmup=args.warmup,
                         full_steps=args.full_steps, threads=args.threads, progress=True)
    except Error as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
