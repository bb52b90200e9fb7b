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

from autodiffusion_rt.registry import BUILD_BACKENDS, EXTRACTORS, SAMPLERS, SPACINGS, model_spec_help, one_of

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
    """The command line, in groups; a flag not given is None, so SearchOptions supplies its default."""
    from autodiffusion_rt.cli import OneLineParser

    p = OneLineParser(
        prog="python -m search.run",
        description="Two-stage evolutionary search of timesteps and per-step layer skipping (AutoDiffusion), "
        "judged by FID and compute (predicted latency or MACs).",
    )
    _model_flags(p)
    _evolution_flags(p)
    _dp_and_holdout_flags(p)
    _output_flags(p)
    _running_flags(p)
    return p


def _model_flags(parser) -> None:
    """The model, its sampler and what judges a schedule."""
    d = DEFAULTS
    group = parser.add_argument_group("model and sampler")
    group.add_argument("--model", help=model_spec_help(d["model"]))
    group.add_argument("--preset", help="ADM preset for adm: specs (e.g. imagenet64-cond)")
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="guided-diffusion flag for adm: specs, repeatable",
    )
    group.add_argument(
        "--nfe",
        help=f"number of sampling steps (default {d['nfe']}); with --multi-objective a "
        "range (3-8) or list (3,4,6): the fronts with and without layer skipping across NFE "
        "(search/pareto.py)",
    )
    group.add_argument("--sampler", choices=SAMPLERS, help=f"{one_of(SAMPLERS)} (default {d['sampler']})")
    group.add_argument("--eta", type=float, help=f"DDIM eta (default {d['eta']}: deterministic)")
    group.add_argument(
        "--extractor",
        choices=EXTRACTORS,
        help=f"FID features: {one_of(EXTRACTORS)} (default: mnist for the embedded model, inception otherwise)",
    )
    group.add_argument(
        "--reference",
        help="real data for FID: mnist, an image folder, an .npz of images, or a "
        "statistics .npz (default: mnist for the embedded model)",
    )
    group.add_argument(
        "--objective",
        help="search fitness: trajectory (distance to a high-NFE teacher's images "
        f"from the same x_T), trajectory-features, or fid (default {d['objective']})",
    )


def _evolution_flags(parser) -> None:
    """The evolution, its budget and presets."""
    d = DEFAULTS
    group = parser.add_argument_group("evolution")
    group.add_argument(
        "--method",
        choices=("evo", "dp"),
        help="evo: evolution whose generation 0 holds the DP "
        f"schedules; dp: the DP schedule alone, in seconds (default {d['method']})",
    )
    group.add_argument(
        "--num-samples",
        type=int,
        help=f"samples per candidate (default {d['num_samples']}; --fast {FAST['num_samples']})",
    )
    group.add_argument("--population", type=int, help=f"population size (default {d['population']})")
    group.add_argument(
        "--generations",
        type=int,
        help=f"generations per stage after the initial population (default {d['generations']})",
    )
    group.add_argument("--topk", type=int, help=f"elites kept each generation (default {d['topk']})")
    group.add_argument("--mutants", type=int, help=f"mutants per generation (default {d['mutants']})")
    group.add_argument("--crossovers", type=int, help=f"crossover children per generation (default {d['crossovers']})")
    group.add_argument(
        "--mutation-prob", type=float, help=f"per-step mutation probability (default {d['mutation_prob']})"
    )
    budget = group.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-fraction",
        type=float,
        help="stage 2 compute budget (--compute: predicted latency or MACs) as a fraction of the full model's at "
        f"this NFE (default {d['budget_fraction']})",
    )
    budget.add_argument(
        "--budget-macs", type=float, help="stage 2 MACs budget per sample, absolute (all steps; with --compute macs)"
    )
    group.add_argument(
        "--multi-objective",
        action="store_true",
        default=None,
        help="stage 2 with pymoo's NSGA-II on (FID, compute); also writes the Pareto set",
    )
    _compute_flags(group)
    group.add_argument("--seed", type=int, help=f"seed of the search and of the samples' noise (default {d['seed']})")
    preset = group.add_mutually_exclusive_group()
    preset.add_argument(
        "--fast",
        action="store_true",
        help="a small preset for smoke tests: " + ", ".join(f"{k}={v}" for k, v in FAST.items()),
    )
    preset.add_argument(
        "--paper-settings",
        action="store_true",
        help="AutoDiffusion's evolution settings: " + ", ".join(f"{k}={v}" for k, v in PAPER.items()),
    )


def _compute_flags(group) -> None:
    """What the budget and the Pareto front count: the engines' predicted latency (search/latency.py) or MACs."""
    from .latency import COMPUTE_CHOICES

    d = DEFAULTS
    group.add_argument(
        "--compute",
        choices=COMPUTE_CHOICES,
        help="what the budget and the front count: latency (per request, predicted from a per-layer table measured "
        "once on the engines `autodiffusion-rt build` makes and cached beside the teacher) or macs "
        f"(default {d['compute']}; --fast {FAST['compute']})",
    )
    group.add_argument(
        "--latency-backend",
        choices=("auto", *BUILD_BACKENDS, "torch"),
        help=f"engines the latency table is measured on (default {d['latency_backend']}: as build chooses)",
    )
    group.add_argument(
        "--latency-precision",
        help=f"their precision: auto, fp32, bf16 (openvino), fp16 (tensorrt) (default {d['latency_precision']}: "
        "as build chooses)",
    )
    group.add_argument(
        "--latency-batch", type=int, help=f"images per request the table is measured at (default {d['latency_batch']})"
    )
    group.add_argument(
        "--latency-threads",
        type=int,
        help=f"engine threads the table is measured with (default {d['latency_threads']}: serve's default)",
    )


def _dp_and_holdout_flags(parser) -> None:
    """The DP schedules' teacher and the held-out re-ranking."""
    d = DEFAULTS
    group = parser.add_argument_group("DP schedules and held-out selection")
    group.add_argument(
        "--grid-points",
        type=int,
        help=f"DP grid = the teacher's DDIM schedule (default {d['grid_points']}; --fast {FAST['grid_points']})",
    )
    group.add_argument(
        "--grid-spacing", choices=SPACINGS, help=f"DP grid spacing: {one_of(SPACINGS)} (default {d['grid_spacing']})"
    )
    group.add_argument(
        "--dp-paths", type=int, help=f"DP schedules seeded into generation 0 (default {d['dp_paths']}; 0: none)"
    )
    group.add_argument(
        "--teacher-cache", help="folder for cached teacher trajectories (default: .teacher-cache next to --out)"
    )
    group.add_argument(
        "--sensitivity-points",
        type=int,
        help="timesteps of the per-layer skip sensitivity table, "
        f"computed when skipping is asked for (default {d['sensitivity_points']}; 0: off)",
    )
    group.add_argument(
        "--holdout-samples",
        type=int,
        help="fresh samples per (schedule, sampler) pair when re-ranking the top-k by FID before choosing "
        f"(default {d['holdout_samples']}; 0: off)",
    )
    group.add_argument("--holdout-seed", type=int, help="seed of the held-out samples (default: --seed + 2)")
    group.add_argument(
        "--holdout-topk", type=int, help=f"candidates re-ranked on held-out samples (default {d['holdout_topk']})"
    )
    group.add_argument(
        "--holdout-confirm-samples",
        type=int,
        help="samples on which the pairs the held-out samples cannot tell apart (within 2 paired-bootstrap sd "
        f"of the best) are measured again; the lowest FID there wins, its ties the cheaper request "
        f"(default {d['holdout_confirm_samples']}; "
        f"--fast {FAST['holdout_confirm_samples']}; 0: off)",
    )
    group.add_argument(
        "--holdout-confirm-seed", type=int, help="seed of the confirmation samples (default: --seed + 3)"
    )
    group.add_argument(
        "--holdout-front",
        type=int,
        help="with --multi-objective: front members re-ranked on held-out "
        f"samples, evenly spread from the best to the cheapest (default {d['holdout_front']})",
    )


def _output_flags(parser) -> None:
    """Where the plan, its checkpoint and its report go."""
    d = DEFAULTS
    group = parser.add_argument_group("outputs and report")
    group.add_argument(
        "--out",
        help="plan path (default: plans/KIND-NAME-nfeN[-SAMPLER].json, e.g. "
        f"plans/embedded-mnist-nfe{d['nfe']}.json for the default model and NFE, -nfe6.json with --nfe 6)",
    )
    group.add_argument("--checkpoint", help="search state path (default: next to --out, .search-state.json)")
    group.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the search saved in the checkpoint (same settings)",
    )
    group.add_argument(
        "--wait-lock",
        action="store_true",
        default=None,
        help="if another search is writing the same --out, wait for it (default: fail)",
    )
    group.add_argument(
        "--no-report", dest="report", action="store_false", default=None, help="skip the comparison report"
    )
    group.add_argument(
        "--report-samples",
        type=int,
        help=f"samples per report row (default {d['report_samples']}; "
        f"--method dp {DP_METHOD['report_samples']}; --fast {FAST['report_samples']})",
    )
    group.add_argument(
        "--report-seed",
        type=int,
        help="seed of the report rows (default: --seed + 1, noise the plan was not selected on)",
    )
    group.add_argument(
        "--report-extractor",
        dest="report_extractors",
        action="append",
        choices=EXTRACTORS,
        help="extractor(s) for the report, repeatable (default: --extractor)",
    )


def _running_flags(parser) -> None:
    """Where and how the model runs."""
    d = DEFAULTS
    group = parser.add_argument_group("running")
    group.add_argument("--batch-size", type=int, help=f"model batch size (default {d['batch_size']})")
    group.add_argument(
        "--cache-mb", type=int, help=f"memory for shared intermediate states (default {d['cache_mb']} MB)"
    )
    group.add_argument(
        "--no-prefix-sharing",
        dest="share",
        action="store_false",
        default=None,
        help="evaluate every candidate on its own (to measure what sharing saves)",
    )
    group.add_argument("--device", help=f"where the model runs: cpu or cuda[:N] (default {d['device']})")
    group.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    group.add_argument(
        "--executor",
        choices=("local", "ray"),
        help=f"where candidates are evaluated: here, or on Ray workers (pip install ray; default {d['executor']})",
    )
    group.add_argument(
        "--ray-address",
        help="an existing Ray cluster for --executor ray (e.g. auto, ray://HOST:10001; default: start Ray here)",
    )
    group.add_argument("--workers", type=int, help="Ray workers (default: one per CPU of the cluster)")
    group.add_argument("--quiet", action="store_true", default=None, help="no progress bars or messages")


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
            raise SearchError(
                f"--nfe {args.nfe}: several NFEs need --multi-objective (the fronts across NFE); or give one NFE"
            )
        run_pareto(options_from_args(args), nfes)
    else:
        run_search(options_from_args(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from autodiffusion_rt.cli import run_command
    from autodiffusion_rt.utils import plain_warnings

    args = build_parser().parse_args(argv)
    plain_warnings()
    return run_command(
        "search.run",
        lambda: _search(args),
        interrupted="interrupted; continue with --resume (the last finished generation is saved)",
    )


if __name__ == "__main__":
    sys.exit(main())
