"""Predicted vs measured latency: search/latency.py's per-layer table against benchmark.py, plan by plan.

    python scripts/latency_check.py --plan plans/embedded-mnist-nfe4.json [--others 5] [--pareto SET.json]
        [--passes 3] [--latency-runs 30] [--warmup 5] [--gate-fid-samples 2000] [--engines-dir DIR]
        [--cached-table [--teacher-cache plans/.teacher-cache]] [--json OUT.json]

The plans: the chosen plan (``--plan``, a plan the search wrote with ``--compute latency``) and ``--others``
more: the members of ``--pareto`` (a plan set, e.g. ``STEM.pareto.json``) first, then the chosen plan's
timesteps with random skip sets of the search space (each layer-step skipped at rates from 0.1 to 0.8; seeded).
Each is built with ``autodiffusion-rt build`` (the table's backend and precision, ``--max-batch`` its batch;
in ``--engines-dir`` when given, where an up-to-date build is reused) and timed with benchmark.py's own worker
(``engines`` configuration, its own process: ``Runtime.load`` with the table's threads, ``sample(batch)`` per
request, p50 over ``--latency-runs`` after ``--warmup``), once per pass: ``--passes`` rounds over all the plans
in turn, the measured latency being the median of a plan's passes. On this machine the p50 of one process
moved by up to 54% between passes a minute apart (the same engines dir, every other job paused), so one
process per plan cannot test a 15% prediction; interleaving also spreads a drift of the machine over all. The
prediction comes from the plan's key's table measured again at the start and at the end of this run, the mean
of the two (``search.latency``'s ``measure_table``; with ``--cached-table``, the table the search cached beside
the teacher): the machine's own speed drifted by 37% over a day here (the chosen plan: 11.8 ms, then 16.1 ms),
which a table measured hours before cannot know, and by 12% within one 9-minute check. Either way the table is
built from per-layer measurements of the measurement plan only, never fitted on these plans.

Each pass also times every plan in this process (the same engines, ``Runtime.load``, request and timer as the
worker): the *in this process* column, a second measurement of the same engines in the same minutes. Where the
two measured columns disagree by more than the prediction misses, the machine moved under the check, not the
predictor: here they differed by up to 21% for one plan (2026-12-07, 22:07, idle).

Run it on an idle machine: a loaded one moves every measured time, the table's too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark import _in_process, _sampler_for, _times  # noqa: E402  (benchmark.py's worker and timer)


def _others(plan, model, count: int, pareto, seed: int) -> list:
    """Up to ``count`` other plans: the plan set's members (not the chosen plan), then random skip sets."""
    import numpy as np

    from autodiffusion_rt.plan import Plan

    out = [p for p in _load_set(pareto) if p.skip != plan.skip][:count]
    rng = np.random.default_rng(seed)
    ids = sorted(model.unet.layer_ids)
    rates = np.linspace(0.1, 0.8, max(1, count - len(out)))
    for rate in rates[: count - len(out)]:
        skip = [[lid for lid in ids if rng.random() < rate] for _ in plan.timesteps]
        out.append(Plan.for_model(model, plan.timesteps, plan.sampler, plan.eta, skip, spec=plan.model_spec))
    return out


def _load_set(path) -> list:
    if path is None:
        return []
    from search.run import load_plan_set

    return load_plan_set(path)


def _build(plan_path: Path, out: Path, key: dict, gate_samples: int) -> None:
    cmd = [
        "autodiffusion-rt", "build", str(plan_path), "--out", str(out), "--backend", key["backend"],
        "--precision", key["precision"], "--max-batch", str(key["batch"]), "--gate-fid-samples", str(gate_samples),
        "--quiet",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"latency_check: building {plan_path} failed: {tail}")


def _spec(engines: Path, key: dict, runs: int, warmup: int) -> dict:
    """benchmark.py's ``engines`` configuration for one engine dir at the table's batch and threads."""
    return {
        "config": "engines", "engines": str(engines), "threads": key["threads"], "batch_sizes": [key["batch"]],
        "repeats": runs, "latency_runs": runs, "warmup": warmup,
    }


def _measure(engines: Path, key: dict, runs: int, warmup: int) -> float:
    """p50 ms of one request, timed by benchmark.py's worker in its own process."""
    got = _in_process(_spec(engines, key, runs, warmup), lambda *_: None)
    if "error" in got:
        raise SystemExit(f"latency_check: timing {engines} failed: {got['error']}")
    return statistics.median(got["rows"][0]["times_ms"])


def check(args) -> dict:
    """Build every plan, then time them in ``args.passes`` interleaved passes; the table of predicted vs measured
    ms (a JSON-able dict: each row's measured ms is the median of its passes, ``measured_passes_ms`` all of them)."""
    from autodiffusion_rt.models import load_model_for_plan
    from autodiffusion_rt.plan import Plan
    from search.latency import load_or_measure, measure_table, resolve_key

    plan = Plan.load(args.plan)
    if plan.predicted_latency is None:
        raise SystemExit(f"latency_check: {args.plan} records no predicted latency: search with --compute latency")
    model = load_model_for_plan(plan)
    k = plan.predicted_latency.key
    key = resolve_key(model, k["backend"], k["precision"], k["batch"], k["threads"])
    if key["cpu"] != k["cpu"]:
        print(f"note: the plan's table was measured on {k['cpu']!r}, this is {key['cpu']!r}", file=sys.stderr)
    if args.cached_table:
        tables = [load_or_measure(model, key, Path(args.teacher_cache or Path(args.plan).parent / ".teacher-cache"))]
    else:
        tables = [measure_table(model, key)]
    plans = [plan] + _others(plan, model, args.others, args.pareto, args.seed)
    with tempfile.TemporaryDirectory(prefix="adrt-latency-check-") as tmp:
        where = Path(args.engines_dir or tmp)
        for i, p in enumerate(plans):
            _build(p.save(where / f"plan{i}.json"), where / f"engines{i}", key, args.gate_fid_samples)
        here = [_sampler_for(_spec(where / f"engines{i}", key, 0, 0))[0] for i in range(len(plans))]
        passes, passes_here = [[] for _ in plans], [[] for _ in plans]
        for n in range(args.passes):
            for i in range(len(plans)):
                passes[i].append(_measure(where / f"engines{i}", key, args.latency_runs, args.warmup))
            for i, run in enumerate(here):
                passes_here[i].append(_time_here(run, key, args.latency_runs, args.warmup))
            print(f"pass {n + 1}/{args.passes}: {', '.join(f'{ms[-1]:.2f}' for ms in passes)} ms; in this process "
                  f"{', '.join(f'{ms[-1]:.2f}' for ms in passes_here)} ms", file=sys.stderr)
    if not args.cached_table:
        tables.append(measure_table(model, key))
    rows = []
    for i, (p, ms, ms_here) in enumerate(zip(plans, passes, passes_here)):
        predicted = statistics.mean(t.predict_ms(p.skip) for t in tables)
        measured, measured_here = statistics.median(ms), statistics.median(ms_here)
        rows.append({
            "plan": "chosen" if i == 0 else f"other {i}", "nfe": p.nfe, "skipped_layer_steps": sum(map(len, p.skip)),
            "macs_per_sample": p.macs_per_sample, "predicted_ms": round(predicted, 3),
            "predicted_by_table_ms": [round(t.predict_ms(p.skip), 3) for t in tables],
            "measured_ms": round(measured, 3), "measured_passes_ms": [round(x, 3) for x in ms],
            "error": round((predicted - measured) / measured, 4),
            "measured_here_ms": round(measured_here, 3), "measured_here_passes_ms": [round(x, 3) for x in ms_here],
            "error_here": round((predicted - measured_here) / measured_here, 4),
        })
    return {"key": tables[0].key, "tables": [t.to_json() for t in tables], "latency_runs": args.latency_runs,
            "warmup": args.warmup, "passes": args.passes, "rows": rows,
            "max_abs_error": max(abs(r["error"]) for r in rows),
            "max_abs_error_here": max(abs(r["error_here"]) for r in rows)}


def _time_here(run, key: dict, runs: int, warmup: int) -> float:
    """p50 ms of one request ``run(batch)`` in this process, on the worker's threads and timer."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(key["threads"])
    try:
        return statistics.median(_times(lambda: run(key["batch"]), runs, warmup))
    finally:
        torch.set_num_threads(before)


def _row_line(r: dict) -> str:
    spread = f"{min(r['measured_passes_ms']):.2f}-{max(r['measured_passes_ms']):.2f}"
    spread_here = f"{min(r['measured_here_passes_ms']):.2f}-{max(r['measured_here_passes_ms']):.2f}"
    return (f"| {r['plan']} | {r['nfe']} | {r['skipped_layer_steps']} | {r['macs_per_sample'] / 1e6:.1f} | "
            f"{r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | {spread} | {r['error']:+.1%} | "
            f"{r['measured_here_ms']:.2f} | {spread_here} | {r['error_here']:+.1%} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/latency_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="the chosen plan (searched with --compute latency)")
    p.add_argument("--others", type=int, default=5, help="other plans to check (default 5)")
    p.add_argument("--pareto", help="a plan set whose members are the first other plans (e.g. STEM.pareto.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random skip sets (default 0)")
    p.add_argument("--cached-table", action="store_true", help="predict from the table the search cached (default: "
                   "measure the table at the start and the end of this run, so that a drift of the machine's speed "
                   "since the search does not count as the predictor's error)")
    p.add_argument("--teacher-cache", help="with --cached-table: where it is (default: .teacher-cache beside --plan)")
    p.add_argument("--latency-runs", type=int, default=30, help="timed requests per plan (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests first (default 5)")
    p.add_argument("--passes", type=int, default=3, help="interleaved passes over all plans; the median is kept "
                   "(default 3)")
    p.add_argument("--engines-dir", help="build the plans here and reuse up-to-date builds (default: a temp dir)")
    p.add_argument("--gate-fid-samples", type=int, default=2000,
                   help="build's low-precision FID gate samples (default 2000, build's own)")
    p.add_argument("--json", help="write the table as JSON here")
    args = p.parse_args(argv)
    lowest = {"--others": (args.others, 0), "--latency-runs": (args.latency_runs, 1), "--passes": (args.passes, 1)}
    for option, (value, low) in lowest.items():
        if value < low:
            p.error(f"{option} {value}: give at least {low}")
    report = check(args)
    k = report["key"]
    print(f"{k['backend']} {k['precision']}, batch {k['batch']}, {k['threads']} thread(s), {k['cpu']}; "
          f"p50 of {args.latency_runs} requests after {args.warmup} warm-up, the median of {args.passes} "
          "interleaved passes\n")
    print("| plan | NFE | skipped layer-steps | MMACs | predicted ms | benchmark.py ms | passes' range | error | "
          "in this process ms | passes' range | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(_row_line(r))
    print(f"\nlargest error {report['max_abs_error']:.1%} against benchmark.py (target: within 15%), "
          f"{report['max_abs_error_here']:.1%} against this process")
    if args.json:
        from autodiffusion_rt.utils import atomic_write

        with atomic_write(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
