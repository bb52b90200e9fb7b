"""``python -m search.run``: search a timestep schedule and per-step layer skipping; write a plan.

With no arguments: the embedded MNIST model at NFE 4, the mnist extractor,
the defaults in :mod:`search.pipeline`; writes ``plans/embedded-mnist-nfe4.json``,
its report (``.report.md`` / ``.report.json``) and its checkpoint
(``.search-state.json``). The machinery lives in :mod:`search.pipeline`; this
module is the command line (and re-exports the names scripts use).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

from autodiffusion_rt.registry import EXTRACTORS, SAMPLERS, SPACINGS, model_spec_help, one_of

from .errors import SearchError
from .pipeline import (  # noqa: F401  (re-exported: the public names of python -m search.run)
    DEFAULT_MODEL, DEFAULTS, DP_METHOD, FAST, PAPER, SearchOptions, load_plan_set, prepare, run_search, save_plan_set,
)


def build_parser() -> argparse.ArgumentParser:
    from autodiffusion_rt.cli import OneLineParser

    p = OneLineParser(
        prog="python -m search.run",
        description="Two-stage evolutionary search of timesteps and per-step layer skipping (AutoDiffusion), judged by FID and MACs.",
    )
    d = DEFAULTS
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_spec_help(DEFAULT_MODEL))
    p.add_argument("--preset", default=None, help="ADM preset for adm: specs (e.g. imagenet64-cond)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="guided-diffusion flag for adm: specs, repeatable")
    p.add_argument("--nfe", default=None, help=f"number of sampling steps (default {d['nfe']}); with --multi-objective a range "
                   "(3-8) or list (3,4,6): the fronts with and without layer skipping across NFE (search/pareto.py)")
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help=f"{one_of(SAMPLERS)} (default {d['sampler']})")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--extractor", default=None, choices=EXTRACTORS,
                   help=f"FID features: {one_of(EXTRACTORS)} (default: mnist for the embedded model, "
                   "inception otherwise)")
    p.add_argument("--reference", default=None, help="real data for FID: mnist, an image folder, an .npz of images, or a statistics .npz (default: mnist for the embedded model)")
    p.add_argument("--num-samples", type=int, default=None, help=f"samples per candidate (default {d['num_samples']}; --fast {FAST['num_samples']})")
    p.add_argument("--population", type=int, default=None, help=f"population size (default {d['population']})")
    p.add_argument("--generations", type=int, default=None, help=f"generations per stage after the initial population (default {d['generations']})")
    p.add_argument("--topk", type=int, default=None, help=f"elites kept each generation (default {d['topk']})")
    p.add_argument("--mutants", type=int, default=None, help=f"mutants per generation (default {d['mutants']})")
    p.add_argument("--crossovers", type=int, default=None, help=f"crossover children per generation (default {d['crossovers']})")
    p.add_argument("--mutation-prob", type=float, default=None, help=f"per-step mutation probability (default {d['mutation_prob']})")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--budget-fraction", type=float, default=None, help=f"stage 2 MACs budget as a fraction of the full model at this NFE (default {d['budget_fraction']})")
    b.add_argument("--budget-macs", type=float, default=None, help="stage 2 MACs budget per sample, absolute (all steps)")
    p.add_argument("--multi-objective", action="store_true", help="stage 2 with pymoo's NSGA-II on (FID, MACs); also writes the Pareto set")
    p.add_argument("--seed", type=int, default=None, help="seed of the search and of the samples' noise (default 0)")
    p.add_argument("--out", default=None, help="plan path (default: plans/KIND-NAME-nfeN[-SAMPLER].json, e.g. "
                   f"plans/embedded-mnist-nfe{d['nfe']}.json for the default model and NFE, -nfe6.json with --nfe 6)")
    p.add_argument("--checkpoint", default=None, help="search state path (default: next to --out, .search-state.json)")
    p.add_argument("--resume", action="store_true", help="continue the search saved in the checkpoint (same settings)")
    p.add_argument("--wait-lock", action="store_true", help="if another search is writing the same --out, wait for it (default: fail)")
    pre = p.add_mutually_exclusive_group()
    pre.add_argument("--fast", action="store_true", help="a small preset for smoke tests: " + ", ".join(f"{k}={v}" for k, v in FAST.items()))
    pre.add_argument("--paper-settings", action="store_true", help="AutoDiffusion's evolution settings: " + ", ".join(f"{k}={v}" for k, v in PAPER.items()))
    p.add_argument("--no-report", action="store_true", help="skip the comparison report")
    p.add_argument("--report-samples", type=int, default=None, help=f"samples per report row (default {d['report_samples']}; --method dp {DP_METHOD['report_samples']}; --fast {FAST['report_samples']})")
    p.add_argument("--report-seed", type=int, default=None, help="seed of the report rows (default: --seed + 1, noise the plan was not selected on)")
    p.add_argument("--report-extractor", action="append", default=None, choices=EXTRACTORS,
                   help="extractor(s) for the report, repeatable (default: --extractor)")
    p.add_argument("--batch-size", type=int, default=None, help=f"model batch size (default {d['batch_size']})")
    p.add_argument("--cache-mb", type=int, default=1024, help="memory for shared intermediate states (default %(default)s MB)")
    p.add_argument("--no-prefix-sharing", action="store_true", help="evaluate every candidate on its own (to measure what sharing saves)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda[:N] (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--method", choices=("evo", "dp"), default=None, help="evo: evolution whose generation 0 holds the DP schedules (default); dp: the DP schedule alone, in seconds")
    p.add_argument("--objective", default=None, help="search fitness: trajectory (distance to a high-NFE teacher's images from the same x_T; default), trajectory-features, or fid")
    p.add_argument("--grid-points", type=int, default=None, help=f"DP grid = the teacher's DDIM schedule (default {d['grid_points']}; --fast {FAST['grid_points']})")
    p.add_argument("--grid-spacing", default="quadratic", choices=SPACINGS,
                   help=f"DP grid spacing: {one_of(SPACINGS)} (default %(default)s)")
    p.add_argument("--dp-paths", type=int, default=None, help=f"DP schedules seeded into generation 0 (default {d['dp_paths']}; 0: none)")
    p.add_argument("--teacher-cache", default=None, help="folder for cached teacher trajectories (default: .teacher-cache next to --out)")
    p.add_argument("--holdout-samples", type=int, default=None, help=f"fresh samples for re-ranking the top-k by FID before choosing (default {d['holdout_samples']}; 0: off)")
    p.add_argument("--holdout-seed", type=int, default=None, help="seed of the held-out samples (default: --seed + 2)")
    p.add_argument("--holdout-topk", type=int, default=None, help=f"candidates re-ranked on held-out samples (default {d['holdout_topk']})")
    p.add_argument("--holdout-front", type=int, default=None, help=f"with --multi-objective: front members re-ranked on held-out samples, "
                   f"evenly spread from the best to the cheapest (default {d['holdout_front']})")
    p.add_argument("--sensitivity-points", type=int, default=8, help="timesteps of the per-layer skip sensitivity table, computed when skipping is asked for (default %(default)s; 0: off)")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="where candidates are evaluated: here, or on Ray workers (pip install ray)")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster for --executor ray (e.g. auto, ray://HOST:10001; default: start Ray here)")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per CPU of the cluster)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    return p


def options_from_args(args) -> SearchOptions:
    values = dict(DEFAULTS)
    if args.fast:
        values.update(FAST)
    if args.paper_settings:
        values.update(PAPER)
    if (args.method or values["method"]) == "dp":
        values.update({k: min(v, values[k]) for k, v in DP_METHOD.items()})
    if args.nfe is not None:
        from .pareto import parse_nfe

        values["nfe"] = parse_nfe(args.nfe)[0]
    for key in ("sampler", "eta", "num_samples", "population", "generations", "topk", "mutants", "crossovers",
                "mutation_prob", "report_samples", "batch_size", "seed", "method", "objective", "grid_points", "dp_paths",
                "holdout_samples", "holdout_topk", "holdout_front"):
        v = getattr(args, key)
        if v is not None:
            values[key] = v
    budget_fraction = values["budget_fraction"]
    budget_macs = None
    if args.budget_macs is not None:
        if not math.isfinite(args.budget_macs) or args.budget_macs <= 0:
            raise SearchError(f"--budget-macs {args.budget_macs}: must be a positive number of MACs per sample")
        budget_macs, budget_fraction = int(args.budget_macs), None
    elif args.budget_fraction is not None:
        budget_fraction = args.budget_fraction
    model_options = {}
    if args.option or args.preset:
        from autodiffusion_rt.cli import parse_options

        model_options = parse_options(args.option)
        if args.preset:
            model_options["preset"] = args.preset
    return SearchOptions(
        model=args.model, model_options=model_options, nfe=values["nfe"], sampler=values["sampler"], eta=values["eta"],
        extractor=args.extractor, reference=args.reference, num_samples=values["num_samples"],
        population=values["population"], generations=values["generations"], topk=values["topk"],
        mutants=values["mutants"], crossovers=values["crossovers"], mutation_prob=values["mutation_prob"],
        budget_fraction=budget_fraction, budget_macs=budget_macs, multi_objective=args.multi_objective,
        seed=values["seed"], out=args.out, checkpoint=args.checkpoint, resume=args.resume, report=not args.no_report,
        report_samples=values["report_samples"], report_seed=args.report_seed, report_extractors=args.report_extractor,
        batch_size=values["batch_size"], cache_mb=args.cache_mb, share=not args.no_prefix_sharing, quiet=args.quiet,
        device=args.device, wait_lock=args.wait_lock, method=values["method"], objective=values["objective"], grid_points=values["grid_points"],
        grid_spacing=args.grid_spacing, dp_paths=values["dp_paths"], teacher_cache=args.teacher_cache,
        holdout_samples=values["holdout_samples"], holdout_seed=args.holdout_seed, holdout_topk=values["holdout_topk"], holdout_front=values["holdout_front"],
        sensitivity_points=args.sensitivity_points,
        executor=args.executor, ray_address=args.ray_address, workers=args.workers,
    )


def _search(args) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise SearchError(f"--threads {args.threads}: must be a positive integer")
        import torch

        torch.set_num_threads(args.threads)
    nfes = None
    if args.nfe is not None:
        from .pareto import parse_nfe, run_pareto

        nfes = parse_nfe(args.nfe)
    if nfes is not None and len(nfes) > 1:
        if not args.multi_objective:
            raise SearchError(f"--nfe {args.nfe}: several NFEs need --multi-objective (the fronts across NFE); or give one NFE")
        run_pareto(options_from_args(args), nfes)
    else:
        run_search(options_from_args(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from autodiffusion_rt.cli import run_command
    from autodiffusion_rt.utils import plain_warnings

    args = build_parser().parse_args(argv)
    plain_warnings()
    return run_command("search.run", lambda: _search(args),
                       interrupted="interrupted; continue with --resume (the last finished generation is saved)")


if __name__ == "__main__":
    sys.exit(main())
