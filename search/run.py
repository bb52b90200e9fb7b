"""``python -m search.run``: search a timestep schedule and per-step layer skipping; write a plan.

With no arguments: the embedded MNIST model at NFE 4, the mnist extractor,
the defaults of :class:`search.pipeline.SearchOptions`; writes ``plans/embedded-mnist-nfe4.json``,
its report (``.report.md`` / ``.report.json``) and its checkpoint
(``.search-state.json``). The machinery lives in :mod:`search.pipeline`; this
module is the command line (and re-exports the names scripts use).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import fields
from typing import Optional, Sequence

from .errors import SearchError
from .pipeline import (  # noqa: F401  (re-exported: the public names of python -m search.run)
    DEFAULT_MODEL,
    DEFAULTS,
    DP_METHOD,
    FAST,
    PAPER,
    SearchOptions,
    load_plan_set,
    prepare,
    run_search,
    save_plan_set,
)

# Flags whose destination is a SearchOptions field; they default to None (not given), so every default is
# SearchOptions' own and the help texts read it from DEFAULTS.
_FIELDS = {f.name for f in fields(SearchOptions)}


def build_parser() -> argparse.ArgumentParser:
    from autodiffusion_rt.cli import OneLineParser

    p = OneLineParser(
        prog="python -m search.run",
        description="Two-stage evolutionary search of timesteps and per-step layer skipping (AutoDiffusion), "
                    "judged by FID and MACs.",
    )
    d, fast = DEFAULTS, FAST
    p.add_argument("--model", help=f"model spec: embedded:mnist or adm:PATH (default: {d['model']})")
    p.add_argument("--preset", help="ADM preset for adm: specs (e.g. imagenet64-cond)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="guided-diffusion flag for adm: specs, repeatable")
    p.add_argument("--nfe", help=f"number of sampling steps (default {d['nfe']}); with --multi-objective a range "
                   "(3-8) or list (3,4,6): the fronts with and without layer skipping across NFE (search/pareto.py)")
    p.add_argument("--sampler", help=f"ddim, ddpm, dpmpp_2m or ipndm (default {d['sampler']})")
    p.add_argument("--eta", type=float, help=f"DDIM eta (default {d['eta']}: deterministic)")
    p.add_argument("--extractor", help="FID features: mnist or inception (default: mnist for the embedded model, "
                   "inception otherwise)")
    p.add_argument("--reference", help="real data for FID: mnist, an image folder, an .npz of images, or a "
                   "statistics .npz (default: mnist for the embedded model)")
    p.add_argument("--num-samples", type=int,
                   help=f"samples per candidate (default {d['num_samples']}; --fast {fast['num_samples']})")
    p.add_argument("--population", type=int, help=f"population size (default {d['population']})")
    p.add_argument("--generations", type=int,
                   help=f"generations per stage after the initial population (default {d['generations']})")
    p.add_argument("--topk", type=int, help=f"elites kept each generation (default {d['topk']})")
    p.add_argument("--mutants", type=int, help=f"mutants per generation (default {d['mutants']})")
    p.add_argument("--crossovers", type=int, help=f"crossover children per generation (default {d['crossovers']})")
    p.add_argument("--mutation-prob", type=float,
                   help=f"per-step mutation probability (default {d['mutation_prob']})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-fraction", type=float, help="stage 2 MACs budget as a fraction of the full model "
                        f"at this NFE (default {d['budget_fraction']})")
    budget.add_argument("--budget-macs", type=float, help="stage 2 MACs budget per sample, absolute (all steps)")
    p.add_argument("--multi-objective", action="store_true", default=None,
                   help="stage 2 with pymoo's NSGA-II on (FID, MACs); also writes the Pareto set")
    p.add_argument("--seed", type=int, help=f"seed of the search and of the samples' noise (default {d['seed']})")
    p.add_argument("--out", help="plan path (default plans/embedded-mnist-nfe4.json for the default model)")
    p.add_argument("--checkpoint", help="search state path (default: next to --out, .search-state.json)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the search saved in the checkpoint (same settings)")
    p.add_argument("--wait-lock", action="store_true", default=None,
                   help="if another search is writing the same --out, wait for it (default: fail)")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--fast", action="store_true",
                        help="a small preset for smoke tests: " + ", ".join(f"{k}={v}" for k, v in FAST.items()))
    preset.add_argument("--paper-settings", action="store_true", help="AutoDiffusion's evolution settings: "
                        + ", ".join(f"{k}={v}" for k, v in PAPER.items()))
    p.add_argument("--no-report", dest="report", action="store_false", default=None,
                   help="skip the comparison report")
    p.add_argument("--report-samples", type=int, help=f"samples per report row (default {d['report_samples']}; "
                   f"--method dp {DP_METHOD['report_samples']}; --fast {fast['report_samples']})")
    p.add_argument("--report-seed", type=int,
                   help="seed of the report rows (default: --seed + 1, noise the plan was not selected on)")
    p.add_argument("--report-extractor", dest="report_extractors", action="append",
                   help="extractor(s) for the report, repeatable (default: --extractor)")
    p.add_argument("--batch-size", type=int, help=f"model batch size (default {d['batch_size']})")
    p.add_argument("--cache-mb", type=int,
                   help=f"memory for shared intermediate states (default {d['cache_mb']} MB)")
    p.add_argument("--no-prefix-sharing", dest="share", action="store_false", default=None,
                   help="evaluate every candidate on its own (to measure what sharing saves)")
    p.add_argument("--device", help=f"where the model runs: cpu or cuda[:N] (default {d['device']})")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--method", choices=("evo", "dp"), help="evo: evolution whose generation 0 holds the DP schedules; "
                   f"dp: the DP schedule alone, in seconds (default {d['method']})")
    p.add_argument("--objective", help="search fitness: trajectory (distance to a high-NFE teacher's images from the "
                   f"same x_T), trajectory-features, or fid (default {d['objective']})")
    p.add_argument("--grid-points", type=int, help="DP grid = the teacher's DDIM schedule "
                   f"(default {d['grid_points']}; --fast {fast['grid_points']})")
    p.add_argument("--grid-spacing", help=f"DP grid spacing: quadratic, linear or logsnr (default {d['grid_spacing']})")
    p.add_argument("--dp-paths", type=int,
                   help=f"DP schedules seeded into generation 0 (default {d['dp_paths']}; 0: none)")
    p.add_argument("--teacher-cache",
                   help="folder for cached teacher trajectories (default: .teacher-cache next to --out)")
    p.add_argument("--holdout-samples", type=int, help="fresh samples for re-ranking the top-k by FID before "
                   f"choosing (default {d['holdout_samples']}; 0: off)")
    p.add_argument("--holdout-seed", type=int, help="seed of the held-out samples (default: --seed + 2)")
    p.add_argument("--holdout-topk", type=int,
                   help=f"candidates re-ranked on held-out samples (default {d['holdout_topk']})")
    p.add_argument("--holdout-front", type=int, help="with --multi-objective: front members re-ranked on held-out "
                   f"samples, evenly spread from the best to the cheapest (default {d['holdout_front']})")
    p.add_argument("--sensitivity-points", type=int, help="timesteps of the per-layer skip sensitivity table, "
                   f"computed when skipping is asked for (default {d['sensitivity_points']}; 0: off)")
    p.add_argument("--executor", choices=("local", "ray"), help="where candidates are evaluated: here, or on Ray "
                   f"workers (pip install ray; default {d['executor']})")
    p.add_argument("--ray-address", help="an existing Ray cluster for --executor ray (e.g. auto, ray://HOST:10001; "
                   "default: start Ray here)")
    p.add_argument("--workers", type=int, help="Ray workers (default: one per CPU of the cluster)")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bars or messages")
    return p


def options_from_args(args) -> SearchOptions:
    """SearchOptions' defaults, then the preset (--fast, --paper-settings, --method dp's), then every flag given."""
    values = dict(DEFAULTS)
    if args.fast:
        values.update(FAST)
    if args.paper_settings:
        values.update(PAPER)
    if (args.method or values["method"]) == "dp":
        values.update({k: min(v, values[k]) for k, v in DP_METHOD.items()})
    values.update({k: v for k, v in vars(args).items() if k in _FIELDS and v is not None})
    if args.nfe is not None:
        from .pareto import parse_nfe

        values["nfe"] = parse_nfe(args.nfe)[0]  # a range or list is search.pareto's (see _search)
    if args.budget_macs is not None:
        if not math.isfinite(args.budget_macs) or args.budget_macs <= 0:
            raise SearchError(f"--budget-macs {args.budget_macs}: must be a positive number of MACs per sample")
        values.update(budget_macs=int(args.budget_macs), budget_fraction=None)
    if args.option or args.preset:
        from autodiffusion_rt.cli import parse_options

        values["model_options"] = parse_options(args.option)
        if args.preset:
            values["model_options"]["preset"] = args.preset
    return SearchOptions(**values)


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
            raise SearchError(f"--nfe {args.nfe}: several NFEs need --multi-objective (the fronts across NFE); "
                              "or give one NFE")
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
