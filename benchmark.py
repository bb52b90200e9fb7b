"""Latency, throughput and memory of a plan, side by side with what a user would otherwise run, in one run.

    python benchmark.py --plan plan.json [--batch-sizes 1,16,64] [--configs ...] [--engines-dir DIR] [--json OUT]
    python benchmark.py --tiny ...          (a random-weight tiny model and plan: a smoke test of the tool)
    python benchmark.py --serve http://127.0.0.1:8000 [...]   (load test of a running service:
                        autodiffusion_rt/serve/loadtest.py)

Every configuration runs in its own process (torch's and the engines' worker
threads never share a process, and each process's resident memory is its
own), one after the other on an otherwise idle machine:

* ``ddim-full``: the full model with DDIM over ``--full-steps`` uniform steps, torch eager (the usual way);
* ``torch-fp32``, ``torch-bf16``, ``torch-compile``: the plan's timesteps (and skips) as K UNet calls in
  torch eager, in torch eager under ``torch.autocast("cpu", torch.bfloat16)``, and with the UNet through
  ``torch.compile`` (default mode);
* ``onnxruntime-fp32``, ``openvino-fp32``, ``openvino-bf16``: the plan's engines, built into
  ``--engines-dir`` (a temp dir by default; a kept dir is reused by the next run) with ``autodiffusion-rt
  build``'s code, bf16 with its FID gate where the model has reference images;
* ``engines``: an engine dir given with ``--engines``.

Per configuration and batch size: the end-to-end time of sampling ``n``
images (p50/p90/p99 over ``--latency-runs`` requests at batch 1, ``--repeats``
otherwise, after ``--warmup``), images/s, the speedup over ``torch-fp32`` and
over ``ddim-full``, the achieved GFLOP/s (2 x MACs) against float32 and bf16
matrix-product peaks measured in the same run, and the resident memory the
configuration added to its process. Ratios are comparable only within one
run: a loaded machine changes absolute times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from autodiffusion_rt.errors import Error
from autodiffusion_rt.utils import positive_ints, print_report

__all__ = ["CONFIGS", "check_counts", "format_report", "main", "plot_report", "resident_mb", "run"]

#: What can be measured, in the order the report shows it.
CONFIGS = (
    "ddim-full",
    "torch-fp32",
    "torch-bf16",
    "torch-compile",
    "onnxruntime-fp32",
    "openvino-fp32",
    "openvino-bf16",
    "engines",
)
#: The configurations a run measures by default (``engines`` only with ``--engines``).
DEFAULT_CONFIGS = tuple(c for c in CONFIGS if c != "engines")
ENGINE_BUILDS = {
    "onnxruntime-fp32": ("onnxruntime", "fp32"),
    "openvino-fp32": ("openvino", "fp32"),
    "openvino-bf16": ("openvino", "bf16"),
}
BASELINE = "torch-fp32"


class BenchmarkError(Error):
    """A benchmark option out of range (counts, batch sizes, threads)."""


def check_counts(args) -> None:
    """Every count and size option, before any model is loaded: the report must never record a bad value."""
    from autodiffusion_rt.limits import check_limit

    for option, value, low in (
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
        ("--latency-runs", args.latency_runs, 1),
        ("--full-steps", args.full_steps, 1),
        ("--threads", args.threads, 1),
        ("--gate-samples", args.gate_samples, 2),
    ):
        if value < low:
            raise BenchmarkError(f"{option} {value} must be an integer >= {low}")
    check_limit("batch", max(args.batch_sizes), "--batch-sizes", error=BenchmarkError)


# ----------------------------------------------------------- in a worker process
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


def _times(fn, runs: int, warmup: int) -> list[float]:
    """Wall times of ``fn()`` in milliseconds, ``runs`` of them after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(max(1, runs)):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _sampler_for(spec: dict):
    """The configuration's ``sample(n)``, loaded; what it loads is what its resident memory counts."""
    import torch

    from autodiffusion_rt import sample
    from autodiffusion_rt.diffusion import uniform_timesteps
    from autodiffusion_rt.plan import Plan
    from autodiffusion_rt.runtime import Runtime

    config = spec["config"]
    if spec.get("engines"):
        rt = Runtime.load(spec["engines"], threads=spec["threads"], share_weights=spec.get("share_weights", True))
        return lambda n: rt.sample(n, seed=0), rt.backend_name
    plan = Plan.load(spec["plan"])
    model = _load_model(spec, plan)
    if config == "ddim-full":
        ts = uniform_timesteps(model.num_timesteps, spec["full_steps"])
        return lambda n: sample(model, ts, "ddim", n, 0), f"torch {torch.__version__} eager"
    if config == "torch-compile":
        model.unet.forward = torch.compile(model.unet.forward)  # the module keeps its attributes (layers, MACs)
    rt = Runtime.from_plan(plan, model=model)
    if config == "torch-bf16":

        def run(n):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return rt.sample(n, seed=0)

        return run, f"torch {torch.__version__} eager, bf16 autocast"
    return lambda n: rt.sample(
        n, seed=0
    ), f"torch {torch.__version__} {'compile' if config == 'torch-compile' else 'eager'}"


def _load_model(spec: dict, plan):
    if spec.get("tiny"):
        return _tiny_plan()[0]
    from autodiffusion_rt.models import load_model_for_plan

    return load_model_for_plan(plan)


def _matmul_peaks(n: int = 1024) -> dict:
    """float32 and bf16 GFLOP/s of an n x n matrix product on this process's threads: the machine's peaks, now."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        ms = statistics.median(_times(lambda: a @ b, 5, 2))
        out[name] = round(2 * n**3 / (ms / 1e3) / 1e9, 2)
    return out


def _worker(spec: dict) -> dict:
    """One configuration at every batch size, in this process (``--worker``)."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["config"] == "peaks":
        return _matmul_peaks()
    rss0 = _rss_mb()
    run, name = _sampler_for(spec)
    rows = []
    for n in spec["batch_sizes"]:
        runs = spec["latency_runs"] if n == 1 else spec["repeats"]
        if spec["config"] == "ddim-full":
            runs = max(1, min(runs, 3))  # 50 full-model calls a run: a few runs say enough
        times = _times(lambda: run(n), runs, spec["warmup"])
        rows.append({"batch": n, "times_ms": [round(t, 3) for t in times]})
    return {"backend": name, "rows": rows, "resident_mb": round(_rss_mb() - rss0, 1)}


# ------------------------------------------------------------ in the parent
def _in_process(spec: dict, say) -> dict:
    """Run one configuration in a fresh process; its report, or the error it ended with."""
    say(f"timing {spec['config']} (batch {', '.join(map(str, spec.get('batch_sizes', [])))}) in its own process")
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def resident_mb(engines, threads: int, batch: int, share_weights: bool = True) -> float:
    """Resident memory (MB) a loaded engine dir adds to a fresh process after sampling ``batch`` images."""
    spec = {
        "config": "engines",
        "engines": str(engines),
        "threads": threads,
        "batch_sizes": [batch],
        "repeats": 1,
        "latency_runs": 1,
        "warmup": 0,
        "share_weights": share_weights,
    }
    return _in_process(spec, lambda *_: None).get("resident_mb", float("nan"))


def _percentiles(times: Sequence[float]) -> dict:
    import numpy as np

    q = np.percentile(np.asarray(times), [50, 90, 99])
    return {
        "p50": round(float(q[0]), 3),
        "p90": round(float(q[1]), 3),
        "p99": round(float(q[2]), 3),
        "runs": len(times),
    }


def _build(plan, model, config: str, engines_dir: Path, max_batch: int, gate_samples: int, progress: bool) -> Path:
    from export.build import build_engines

    backend, precision = ENGINE_BUILDS[config]
    d = engines_dir / config
    build_engines(
        plan,
        d,
        model=model,
        backend=backend,
        precision=precision,
        max_batch=max_batch,
        progress=progress,
        int8_fid_samples=gate_samples,
    )
    return d


def run(
    plan_path=None,
    *,
    tiny: bool = False,
    configs: Sequence[str] = DEFAULT_CONFIGS,
    engines=None,
    engines_dir=None,
    batch_sizes: Sequence[int] = (1, 16),
    repeats: int = 5,
    warmup: int = 1,
    latency_runs: int = 15,
    full_steps: int = 50,
    threads: int = 2,
    gate_samples: int = 2000,
    progress: bool = True,
) -> dict:
    """Measure every configuration (see the module docstring); a JSON-able report."""
    from autodiffusion_rt.plan import Plan
    from autodiffusion_rt.runtime import library_versions
    from autodiffusion_rt.runtime.platform import cpu_isa

    say = print if progress else (lambda *a, **k: None)
    configs = [c for c in CONFIGS if c in set(configs) | ({"engines"} if engines else set())]
    tmp = None
    try:
        if tiny:
            model, plan = _tiny_plan()
            tmp = tempfile.TemporaryDirectory(prefix="adrt-bench-")
            plan_path = plan.save(Path(tmp.name) / "plan.json")
        else:
            plan = Plan.load(plan_path)
            model = None
        if engines_dir is None:
            tmp = tmp or tempfile.TemporaryDirectory(prefix="adrt-bench-")
        engines_dir = Path(tmp.name if engines_dir is None else engines_dir)
        dirs = {"engines": engines}
        builds = [c for c in configs if c in ENGINE_BUILDS]
        if builds:
            from autodiffusion_rt.models import load_model_for_plan

            model = load_model_for_plan(plan, model)
            for c in builds:
                say(f"building the plan's {c} engines in {engines_dir / c}")
                dirs[c] = _build(plan, model, c, Path(engines_dir), max(batch_sizes), gate_samples, progress)
        base = {
            "plan": str(plan_path),
            "tiny": tiny,
            "threads": threads,
            "repeats": repeats,
            "warmup": warmup,
            "latency_runs": latency_runs,
            "full_steps": full_steps,
            "batch_sizes": list(batch_sizes),
        }
        peaks = _in_process({**base, "config": "peaks"}, say)
        measured = {
            c: _in_process({**base, "config": c, "engines": str(dirs[c]) if dirs.get(c) else None}, say)
            for c in configs
        }
        full_macs = _full_macs(plan, model, tiny)
        return _report(
            plan,
            configs,
            measured,
            peaks,
            full_macs,
            base,
            machine={
                "python": platform.python_version(),
                "isa": cpu_isa(),
                "processor": platform.processor() or platform.machine(),
                **library_versions("openvino"),
            },
            engines={c: str(d) for c, d in dirs.items() if d},
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


def _full_macs(plan, model, tiny: bool) -> int:
    if model is None:
        from autodiffusion_rt.models import load_model_for_plan

        model = _tiny_plan()[0] if tiny else load_model_for_plan(plan)
    return int(model.unet.macs(None))


def _report(plan, configs, measured, peaks, full_macs, settings, machine, engines) -> dict:
    rows, notes = [], []
    for c in configs:
        m = measured[c]
        if "error" in m:
            notes.append(f"{c} failed: {m['error']}")
            continue
        for r in m["rows"]:
            ms = statistics.median(r["times_ms"])
            macs = full_macs * settings["full_steps"] if c == "ddim-full" else plan.macs_per_sample
            gflops = 2 * macs * r["batch"] / (ms / 1e3) / 1e9
            rows.append(
                {
                    "config": c,
                    "backend": m["backend"],
                    "batch": r["batch"],
                    "nfe": settings["full_steps"] if c == "ddim-full" else plan.nfe,
                    "ms": round(ms, 3),
                    **_percentiles(r["times_ms"]),
                    "images_per_s": round(r["batch"] / (ms / 1e3), 2),
                    "gflops": round(gflops, 2),
                    "resident_mb": m["resident_mb"],
                }
            )
    for r in rows:
        for key, ref in (("vs_torch_fp32", BASELINE), ("vs_ddim_full", "ddim-full")):
            base = next((b["ms"] for b in rows if b["config"] == ref and b["batch"] == r["batch"]), None)
            r[key] = round(base / r["ms"], 2) if base else None
    return {
        "plan": {
            "timesteps": list(plan.timesteps),
            "sampler": plan.sampler,
            "skip": [list(s) for s in plan.skip],
            "macs_per_sample": plan.macs_per_sample,
            "model": plan.model_name,
        },
        "settings": settings,
        "machine": machine,
        "engines": engines,
        "matmul_peak_gflops": peaks,
        "rows": rows,
        "notes": notes,
    }


def _tiny_plan():
    """A random-weight tiny ADM model and a 4-step plan with layers skipped (for --tiny)."""
    import torch

    from autodiffusion_rt.models import ADMUNet, model_from_weights
    from autodiffusion_rt.models.train import EMBEDDED_MNIST_CONFIG
    from autodiffusion_rt.plan import Plan

    cfg = dict(EMBEDDED_MNIST_CONFIG)  # the embedded model's architecture, random weights
    torch.manual_seed(0)
    unet = ADMUNet(**cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model = model_from_weights(
        "tiny:benchmark",
        cfg,
        dict(noise_schedule="cosine", diffusion_steps=1000, learn_sigma=False),
        unet.state_dict(),
        source="random",
    )
    ids = sorted(model.unet.layer_ids)
    attn = [layer.id for layer in model.layers if layer.kind == "attn"]
    skip = [[], attn, sorted(set(attn + ids[:2])), sorted(set(attn + ids[-3:]))]
    return model, Plan.for_model(model, [999, 700, 400, 120], sampler="dpmpp_2m", skip=skip, spec="tiny:benchmark")


def format_report(report: dict) -> str:
    """The table as text."""
    p, peaks = report["plan"], report["matmul_peak_gflops"]
    lines = [
        f"plan: {p['sampler']} over {p['timesteps']} on {p['model']}, "
        f"{p['macs_per_sample'] / 1e6:.1f} MMACs per sample in all",
        f"machine: {report['machine']['processor']}, {report['settings']['threads']} threads, "
        f"CPU {report['machine']['isa']}",
        f"matmul peaks (this run): fp32 {peaks.get('fp32', float('nan')):.1f} GFLOP/s, "
        f"bf16 {peaks.get('bf16', float('nan')):.1f} GFLOP/s",
        "",
        f"{'configuration':<18} {'nfe':>4} {'batch':>5} {'p50 ms':>9} {'p90':>9} {'p99':>9} {'runs':>4} {'img/s':>8} "
        f"{'vs torch':>8} {'vs DDIM':>8} {'GFLOP/s':>8} {'%fp32':>6} {'%bf16':>6} {'RSS MB':>7}",
    ]
    for r in report["rows"]:
        pct = lambda k: f"{100 * r['gflops'] / peaks[k]:.0f}" if peaks.get(k) else ""  # noqa: E731
        ratio = lambda k: f"{r[k]:.2f}x" if r.get(k) else ""  # noqa: E731
        lines.append(
            f"{r['config']:<18} {r['nfe']:>4} {r['batch']:>5} {r['p50']:>9.1f} {r['p90']:>9.1f} {r['p99']:>9.1f} "
            f"{r['runs']:>4} {r['images_per_s']:>8.1f} {ratio('vs_torch_fp32'):>8} {ratio('vs_ddim_full'):>8} "
            f"{r['gflops']:>8.1f} {pct('fp32'):>6} {pct('bf16'):>6} {r['resident_mb']:>7.0f}"
        )
    lines.append("")
    lines += [f"{c}: {name}" for c, name in sorted({(r["config"], r["backend"]) for r in report["rows"]})]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    """A PNG: median latency per configuration and batch, log scale
    (needs matplotlib: pip install autodiffusion-rt[plot])."""
    from autodiffusion_rt.utils import import_pyplot

    plt = import_pyplot()
    rows = report["rows"]
    batches = sorted({r["batch"] for r in rows})
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        ms = [next((r["ms"] for r in rows if r["batch"] == b and r["config"] == c), 0) for c in configs]
        bars = ax.barh(configs, ms)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor log ticks' labels overlap on short ranges
        ax.bar_label(bars, labels=[f"{v:,.0f} ms" if v else "" for v in ms], padding=2, fontsize=8)
        ax.set_xlim(right=max(ms) * 3)  # room for the last label
        ax.set_xlabel("ms per request (median)")
        ax.set_title(f"batch {b}")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


def _configs(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown configuration(s) {bad}: choose from {', '.join(CONFIGS)}")
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # one configuration, in a process of its own (see _in_process)
        print(json.dumps(_worker(json.loads(argv[1]))))
        return 0
    if any(a == "--serve" or a.startswith("--serve=") for a in argv):  # load test of a running service: its own options
        from autodiffusion_rt.serve.loadtest import main as serve_main

        return serve_main(argv)
    from autodiffusion_rt.cli import OneLineParser  # light: parsing happens before torch is imported

    ap = OneLineParser(
        prog="python benchmark.py",
        description="autodiffusion-rt latency, throughput and memory, "
        "side by side. (--serve URL load-tests a running service instead: --serve URL --help)",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="plan.json to benchmark")
    src.add_argument("--tiny", action="store_true", help="a random tiny model and plan (smoke test of this tool)")
    ap.add_argument(
        "--configs",
        type=_configs,
        default=list(DEFAULT_CONFIGS),
        help=f"what to measure, comma-separated from {', '.join(CONFIGS)} (default: all but engines)",
    )
    ap.add_argument("--engines", default=None, help="an engine dir built from the plan: adds its 'engines' rows")
    ap.add_argument(
        "--engines-dir", default=None, help="where the plan's engines are built (kept and reused; default: a temp dir)"
    )
    ap.add_argument("--batch-sizes", type=positive_ints, default=[1, 16], help="images per request (default 1,16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed requests per batch size above 1 (default 5)")
    ap.add_argument("--latency-runs", type=int, default=15, help="timed batch-1 requests for p50/p90/p99 (default 15)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests first (default 1)")
    ap.add_argument("--full-steps", type=int, default=50, help="steps of the ddim-full baseline (default 50)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every configuration (default 2)")
    ap.add_argument(
        "--gate-samples",
        type=int,
        default=2000,
        help="samples of the bf16 build's FID gate (default 2000, as autodiffusion-rt build)",
    )
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON ('-' for stdout)")
    ap.add_argument("--plot", default=None, metavar="PNG", help="also plot the latencies to a PNG (needs matplotlib)")
    ap.add_argument("--quiet", action="store_true", help="do not say what is being timed")
    args = ap.parse_args(argv)
    from autodiffusion_rt.cli import run_command

    return run_command("benchmark", lambda: _benchmark_command(args))


def _benchmark_command(args) -> None:
    check_counts(args)
    report = run(
        args.plan,
        tiny=args.tiny,
        configs=args.configs,
        engines=args.engines,
        engines_dir=args.engines_dir,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        warmup=args.warmup,
        latency_runs=args.latency_runs,
        full_steps=args.full_steps,
        threads=args.threads,
        gate_samples=args.gate_samples,
        progress=not args.quiet,
    )
    print_report(report, format_report, args.json)
    if args.plot:
        plot_report(report, args.plot)


if __name__ == "__main__":
    raise SystemExit(main())
