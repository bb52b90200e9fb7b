"""Latency and throughput, side by side, measured in one run.

    python benchmark.py --plan plan.json [--engines DIR] [--batch-sizes 1,16,256]
                        [--e2e-batch-sizes 1,16] [--repeats 5] [--full-steps 50] [--json OUT]
    python benchmark.py --serve http://127.0.0.1:8000 [...]   (load test of a running service:
                        autodiffusion_rt/serve/loadtest.py)

Torch is timed first, before any onnxruntime session exists, so the engines'
worker threads never disturb the baselines. Batch-1 requests are timed
``--latency-runs`` times (p50/p90/p99); each row also gives the achieved
GFLOP/s (2 x MACs) beside a float32 matmul peak measured in the same run, the
end-to-end / sum-of-steps ratio (the runtime's overhead), and each engine
dir's resident memory (a fresh process per configuration). ``--int8-engines``
adds the rows of an int8 build; ``--json`` and ``--plot PNG`` save the report.

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

import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from autodiffusion_rt.utils import positive_ints, print_report

# numpy and torch are imported inside the functions: main() parses its arguments first, so --help and a usage
# error answer before torch loads.

__all__ = ["format_report", "main", "matmul_peak_gflops", "plot_report", "resident_mb", "run"]


def _times(fn, repeats: int, warmup: int) -> list[float]:
    """Wall times of ``fn()`` in milliseconds, ``repeats`` of them after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def _time(fn, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    return statistics.median(_times(fn, repeats, warmup))


def _percentiles(times: Sequence[float]) -> dict:
    import numpy as np

    q = np.percentile(np.asarray(times), [50, 90, 99])
    return {"p50": round(float(q[0]), 3), "p90": round(float(q[1]), 3), "p99": round(float(q[2]), 3), "runs": len(times)}


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """float32 GFLOP/s of an n x n matrix product on torch's threads: the machine's practical peak, now."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = _time(lambda: a @ b, repeats, 1)
    return 2 * n**3 / (ms / 1e3) / 1e9


def resident_mb(engines, threads: Optional[int], batch: int, share_weights: bool = True) -> float:
    """Resident memory (MB) a loaded onnxruntime runtime adds, after sampling ``batch`` images: in a fresh process."""
    import subprocess

    code = ("import sys, torch, onnxruntime, numpy\n"
            "rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) / 1024\n"
            "from autodiffusion_rt.runtime import Runtime\n"
            "r0 = rss()\n"
            f"rt = Runtime.load({str(engines)!r}, threads={threads!r}, share_weights={bool(share_weights)!r})\n"
            f"rt.sample(1, seed=0); rt.sample({int(batch)}, seed=0)\n"
            "print(rss() - r0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return float("nan")
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def _feeds(engine, batch: int, num_classes: Optional[int], seed: int = 0) -> dict:
    import numpy as np

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
    import torch

    from autodiffusion_rt.models import ADMUNet, model_from_weights
    from autodiffusion_rt.plan import Plan

    cfg = dict(image_size=28, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
               attention_resolutions=(2, 4), channel_mult=(1, 1, 2), conv_resample=False, num_classes=10,
               num_heads=4, use_scale_shift_norm=True)
    torch.manual_seed(0)
    unet = ADMUNet(**cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model = model_from_weights("tiny:benchmark", cfg, dict(noise_schedule="cosine", diffusion_steps=1000, learn_sigma=False),
                               unet.state_dict(), source="random")
    ids = sorted(model.unet.layer_ids)
    attn = [layer.id for layer in model.layers if layer.kind == "attn"]
    skip = [[], attn, sorted(set(attn + ids[:2])), sorted(set(attn + ids[-3:]))]
    return model, Plan.for_model(model, [999, 700, 400, 120], sampler="dpmpp_2m", skip=skip, spec="tiny:benchmark")


def run(plan_path=None, *, engines=None, int8_engines=None, model=None, plan=None, batch_sizes: Sequence[int] = (1, 16, 256),
        e2e_batch_sizes: Sequence[int] = (1, 16), repeats: int = 5, warmup: int = 1, full_steps: int = 50,
        latency_runs: int = 30, threads: Optional[int] = None, memory: bool = True, progress: bool = False,
        device: str = "cpu") -> dict:
    """Measure everything; return a JSON-able report (see :func:`format_report`).

    Every torch measurement runs before any onnxruntime session exists, so no
    engine's worker threads disturb the baselines; the engines are then
    timed with torch idle. ``device``: where the torch baselines run (the
    model is moved there for them and back afterwards). ``progress``: say on
    stderr what is being timed, as it starts (the whole run takes minutes).
    """
    import numpy as np
    import torch

    from autodiffusion_rt import sample
    from autodiffusion_rt.diffusion import uniform_timesteps
    from autodiffusion_rt.plan import Plan
    from autodiffusion_rt.models import load_model_for_plan
    from autodiffusion_rt.runtime import Runtime, library_versions
    from autodiffusion_rt.runtime.engines import cpu_isa
    from autodiffusion_rt.sampling import check_device

    started = time.perf_counter()

    def say(what: str) -> None:
        if progress:
            print(f"benchmark [{time.perf_counter() - started:6.0f} s] {what}", file=sys.stderr, flush=True)

    if threads:
        torch.set_num_threads(int(threads))
    if plan is None:
        plan = Plan.load(plan_path)
    model = load_model_for_plan(plan, model)
    tmp = None
    try:
        if engines is None:
            from export.build import build_engines

            say("building the plan's engines in a temporary dir (onnxruntime, fp32)")
            tmp = tempfile.TemporaryDirectory(prefix="adrt-bench-")
            engines = Path(tmp.name) / "engines"
            build_engines(plan, engines, model=model, max_batch=max([*batch_sizes, *e2e_batch_sizes]), progress=progress)
        macs = float(plan.macs_per_sample)
        report = {
            "plan": {"timesteps": list(plan.timesteps), "sampler": plan.sampler, "skip": [list(s) for s in plan.skip],
                     "macs_per_sample": plan.macs_per_sample, "model": model.name},
            "engines": {"dir": str(engines), "int8_dir": None if int8_engines is None else str(int8_engines)},
            "machine": {"python": platform.python_version(), "threads": torch.get_num_threads(), "isa": cpu_isa(),
                        "processor": platform.processor() or platform.machine(), **library_versions("onnxruntime")},
            "settings": {"repeats": repeats, "warmup": warmup, "full_steps": full_steps, "latency_runs": latency_runs},
            "matmul_peak_gflops": None,
            "per_step": [],
            "end_to_end": [],
            "memory": [],
            "notes": [],
        }
        say("timing a float32 matmul (the machine's peak now)")
        report["matmul_peak_gflops"] = round(matmul_peak_gflops(), 2)
        full_ts = uniform_timesteps(model.num_timesteps, full_steps)
        feeds_for = {}
        # ------------------------------------------------ torch first, alone
        dev = check_device(None, device)
        report["settings"]["torch_device"] = str(dev)

        def synced(fn):  # CUDA runs asynchronously: a timed call ends when its kernels have
            return fn if dev.type != "cuda" else (lambda: (fn(), torch.cuda.synchronize(dev)))

        model.unet.to(dev)
        try:
            torch_rt = Runtime.from_plan(plan, model=model, device=dev)
            torch_step = {}
            for b in batch_sizes:
                say(f"per-step latency, torch eager, batch {b}: {plan.nfe} steps x {repeats} runs")
                for i, te in enumerate(torch_rt.engines):
                    feeds_for[i, b] = _feeds(te, b, model.num_classes, seed=i)
                    torch_step[i, b] = _time(synced(lambda: te.run(feeds_for[i, b])), repeats, warmup)
            e2e: dict = {}
            for n in e2e_batch_sizes:
                runs = latency_runs if n == 1 else repeats
                say(f"end-to-end, batch {n}: the full model (DDIM-{full_steps}), the plan on torch eager ({runs} runs)")
                e2e["full", n] = _times(synced(lambda: sample(model, full_ts, "ddim", n, 0, device=dev)),
                                        max(1, min(runs, 10) if n == 1 else repeats // 2), 0)
                e2e["plan torch", n] = _times(synced(lambda: torch_rt.sample(n, seed=0)), runs, warmup)
            torch_rt.close()
        finally:
            model.unet.to("cpu")
        # ------------------------------------------------ then the engines
        configs = [("onnxruntime fp32", engines)] + ([("onnxruntime int8", int8_engines)] if int8_engines is not None else [])
        for label, d in configs:
            say(f"{label}: loading the engines")
            rt = Runtime.load(d, plan=plan, threads=threads)
            if d == engines:
                report["engines"].update(backend=rt.backend_name, max_batch=rt.max_batch)
            precisions = [s.get("precision", rt.manifest["precision"]) for s in rt.manifest["steps"]]
            for b in batch_sizes:
                if rt.max_batch is not None and b > rt.max_batch:
                    report["notes"].append(f"batch {b} skipped for {label}: the engines take at most {rt.max_batch}")
                    continue
                say(f"per-step latency, {label}, batch {b}: {plan.nfe} steps x {repeats} runs")
                for i, oe in enumerate(rt.engines):
                    out = {s.name: np.empty(s.concrete(b), s.dtype) for s in oe.outputs}
                    step = oe.bind(feeds_for[i, b], out)
                    o_ms = _time(step, repeats, warmup)
                    t_ms = torch_step[i, b]
                    report["per_step"].append({
                        "engines": label, "step": i, "timestep": plan.timesteps[i], "batch": b, "precision": precisions[i],
                        "skipped_layers": len(plan.skip[i]), "torch_ms": round(t_ms, 3), "onnxruntime_ms": round(o_ms, 3),
                        "speedup": round(t_ms / o_ms, 3), "gflops": round(2 * macs / plan.nfe * b / (o_ms / 1e3) / 1e9, 2),
                    })
            for n in e2e_batch_sizes:
                runs = latency_runs if n == 1 else repeats
                say(f"end-to-end, {label}, batch {n}: {runs} runs")
                e2e[label, n] = _times(lambda: rt.sample(n, seed=0), runs, warmup)
            rt.close()
            if memory:
                say(f"{label}: resident memory (a fresh process)")
                report["memory"].append({"engines": label, "nfe": plan.nfe, "batch": max(e2e_batch_sizes),
                                         "resident_mb": resident_mb(d, threads, max(e2e_batch_sizes))})
        for n in e2e_batch_sizes:
            base = statistics.median(e2e["full", n])
            on = "" if dev.type == "cpu" else f" on {dev}"
            methods = [(f"full model, DDIM-{full_steps}, torch eager{on}", "full", full_steps), (f"plan, torch eager{on}", "plan torch", plan.nfe)]
            methods += [(f"plan, {label}", label, plan.nfe) for label, _ in configs]
            for method, key, nfe in methods:
                times = e2e[key, n]
                ms = statistics.median(times)
                row = {"method": method, "batch": n, "nfe": nfe, "ms": round(ms, 3), **_percentiles(times),
                       "images_per_s": round(n / (ms / 1e3), 2), "speedup_vs_full": round(base / ms, 2),
                       "gflops": round(2 * (macs if key != "full" else float(model.unet.macs(None)) * full_steps) * n / (ms / 1e3) / 1e9, 2)}
                if key in dict(configs):
                    steps_sum = sum(r["onnxruntime_ms"] for r in report["per_step"] if r["engines"] == key and r["batch"] == n)
                    if steps_sum:
                        row["sum_of_steps_ms"] = round(steps_sum, 3)
                        row["overhead_ratio"] = round(ms / steps_sum, 3)
                report["end_to_end"].append(row)
        say("done")
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def plot_report(report: dict, path) -> None:
    """A PNG: end-to-end latency per method and batch, log scale (needs matplotlib: pip install autodiffusion-rt[plot])."""
    from autodiffusion_rt.utils import import_pyplot

    plt = import_pyplot()
    rows = report["end_to_end"]
    batches = sorted({r["batch"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        ms = [next((r["ms"] for r in rows if r["batch"] == b and r["method"] == m), 0) for m in methods]
        bars = ax.barh(methods, ms)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor log ticks' labels overlap on short ranges
        ax.bar_label(bars, labels=[f"{v:,.0f} ms" if v else "" for v in ms], padding=2, fontsize=8)
        ax.set_xlim(right=max(ms) * 3)  # room for the last label
        ax.set_xlabel("ms per request (median)")
        ax.set_title(f"batch {b}")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


def format_report(report: dict) -> str:
    """The two tables as text."""
    p = report["plan"]
    lines = [
        f"plan: {p['sampler']} over {p['timesteps']} on {p['model']}, {p['macs_per_sample'] / 1e6:.1f} MMACs per sample in all",
        f"engines: {report['engines'].get('backend')} (max batch {report['engines'].get('max_batch')}), "
        f"torch {report['machine']['torch']} with {report['machine']['threads']} threads, CPU {report['machine']['isa']}",
        f"matmul peak (float32, this run): {report['matmul_peak_gflops']:.1f} GFLOP/s",
        "",
        "per-step latency (ms, median)",
        f"{'engines':<17} {'step':>4} {'t':>5} {'prec':>5} {'batch':>6} {'torch eager':>12} {'onnxruntime':>12} {'ratio':>7} {'GFLOP/s':>8}",
    ]
    for r in report["per_step"]:
        lines.append(f"{r['engines']:<17} {r['step']:>4} {r['timestep']:>5} {r['precision']:>5} {r['batch']:>6} "
                     f"{r['torch_ms']:>12.2f} {r['onnxruntime_ms']:>12.2f} {r['speedup']:>6.2f}x {r['gflops']:>8.1f}")
    lines += ["", "end-to-end sampling (ms)",
              f"{'method':<34} {'nfe':>4} {'batch':>6} {'p50':>9} {'p90':>9} {'p99':>9} {'runs':>4} {'img/s':>8} {'vs full':>8} "
              f"{'GFLOP/s':>8} {'/sum of steps':>13}"]
    for r in report["end_to_end"]:
        lines.append(f"{r['method']:<34} {r['nfe']:>4} {r['batch']:>6} {r['p50']:>9.1f} {r['p90']:>9.1f} {r['p99']:>9.1f} {r['runs']:>4} "
                     f"{r['images_per_s']:>8.1f} {r['speedup_vs_full']:>7.2f}x {r['gflops']:>8.1f} "
                     f"{(format(r['overhead_ratio'], '.3f') + 'x') if 'overhead_ratio' in r else '':>13}")
    if report.get("memory"):
        lines += ["", "resident memory of a loaded runtime (MB added to the process, fresh process each)"]
        for r in report["memory"]:
            lines.append(f"{r['engines']:<17} nfe {r['nfe']:>3} after sampling batch {r['batch']:>4}: {r['resident_mb']:>8.1f} MB")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--serve" or a.startswith("--serve=") for a in argv):  # load test of a running service: its own options
        from autodiffusion_rt.serve.loadtest import main as serve_main

        return serve_main(argv)
    from autodiffusion_rt.cli import OneLineParser

    ap = OneLineParser(prog="python benchmark.py", description="autodiffusion-rt latency and throughput, side by "
                       "side: per-step and end-to-end, torch eager against the plan's engines. With --serve URL "
                       "instead: a load test of a running service ('python benchmark.py --serve URL --help').")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="plan.json to benchmark")
    src.add_argument("--tiny", action="store_true", help="a random tiny model and plan (smoke test of this tool)")
    ap.add_argument("--engines", default=None, help="engine dir built from the plan (default: build one in a temp dir)")
    ap.add_argument("--batch-sizes", type=positive_ints, default=[1, 16, 256], help="per-step table batch sizes (default 1,16,256)")
    ap.add_argument("--e2e-batch-sizes", type=positive_ints, default=[1, 16], help="end-to-end batch sizes (default 1,16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    ap.add_argument("--full-steps", type=int, default=50, help="steps of the full-model DDIM baseline (default 50)")
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="torch device of the torch baselines: cpu (default), cuda, cuda:N")
    ap.add_argument("--int8-engines", default=None, help="an engine dir built with --precision int8: adds its rows")
    ap.add_argument("--latency-runs", type=int, default=30, help="timed batch-1 requests for p50/p90/p99 (default 30)")
    ap.add_argument("--no-memory", action="store_true", help="skip the resident-memory measurement (one process per config)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON ('-' for stdout)")
    ap.add_argument("--plot", default=None, metavar="PNG", help="also plot end-to-end latency to a PNG (needs matplotlib)")
    ap.add_argument("--serve", default=None, metavar="URL",
                    help="load-test a running service instead (its own options: --serve URL --help)")
    ap.add_argument("--quiet", action="store_true", help="print only the report (no messages on what is being timed)")
    args = ap.parse_args(argv)
    from autodiffusion_rt.cli import run_command

    return run_command("benchmark", lambda: _benchmark_command(args))


def _benchmark_command(args) -> None:
    model, plan = _tiny_plan() if args.tiny else (None, None)  # --tiny and --plan exclude each other
    report = run(args.plan, plan=plan, model=model, engines=args.engines, int8_engines=args.int8_engines,
                 batch_sizes=args.batch_sizes, latency_runs=args.latency_runs, memory=not args.no_memory,
                 e2e_batch_sizes=args.e2e_batch_sizes, repeats=args.repeats, warmup=args.warmup,
                 full_steps=args.full_steps, threads=args.threads, progress=not args.quiet, device=args.device)
    print_report(report, format_report, args.json)
    if args.plot:
        plot_report(report, args.plot)


if __name__ == "__main__":
    raise SystemExit(main())
