"""The search's machinery behind ``python -m search.run`` (:mod:`search.run` is its command line).

It is its own module so the multi-NFE driver (:mod:`search.pareto`) and the CLI
both build on it without importing each other.

With no arguments: the embedded MNIST model at NFE 4, the mnist extractor,
the defaults of :class:`SearchOptions`; writes ``plans/embedded-mnist-nfe4.json``, its report
(``.report.md`` / ``.report.json``) and its checkpoint (``.search-state.json``).

A search runs in stages, one function each: :func:`prepare` (every input checked), then under the
``--out`` lock :func:`_teacher_and_dp`, :func:`_evolve`, :func:`_select_on_holdout`,
:func:`_search_summary`, :func:`_write_plans` and :func:`_write_report`.
"""

from __future__ import annotations

import math
import platform
import sys
import warnings
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from autodiffusion_rt.errors import Error
from autodiffusion_rt.registry import DEFAULT_MODEL

from .errors import SearchError


# The defaults are sized so that the default run, its held-out selection and its report take <= 5 minutes on the
# project's 2-core CPU when idle (embedded model, NFE 4), --fast and --method dp <= 60 s: search/README.md,
# "Defaults and their arithmetic", counts the cost phase by phase.
@dataclass
class SearchOptions:
    """Every setting of one search; the field defaults are the default run's (the one home of DEFAULTS)."""

    model: str = DEFAULT_MODEL
    model_options: dict = field(default_factory=dict)
    nfe: int = 4
    sampler: str = "ddim"
    eta: float = 0.0
    extractor: Optional[str] = None  # mnist for the embedded model, inception otherwise
    reference: Optional[str] = None  # mnist for the embedded model; required otherwise
    num_samples: int = 64
    population: int = 16
    generations: int = 3
    topk: int = 4
    mutants: int = 8
    crossovers: int = 4
    mutation_prob: float = 0.25
    # The full model's MACs: stage 2 may skip layers only where that does not cost fitness (skipping at equal
    # compute is --multi-objective --nfe 3-8, search/pareto.py).
    budget_fraction: Optional[float] = 1.0
    budget_macs: Optional[int] = None
    multi_objective: bool = False
    # What the budget and the Pareto front count (search/latency.py): the engines' predicted milliseconds per
    # request, from a per-layer table measured once per (backend, precision, batch, threads, CPU), or MACs.
    compute: str = "latency"
    latency_backend: str = "auto"  # as `autodiffusion-rt build --backend auto` resolves it
    latency_precision: str = "auto"
    latency_batch: int = 1  # images per request: the service's batch-1 latency
    latency_threads: int = 1  # engine threads: `autodiffusion-rt serve`'s default
    seed: int = 0
    out: Optional[str] = None
    checkpoint: Optional[str] = None
    resume: bool = False
    report: bool = True
    report_samples: int = 250
    report_seed: Optional[int] = None  # default: seed + 1
    report_extractors: Optional[list] = None  # default: [extractor]
    batch_size: int = 128
    cache_mb: int = 1024
    share: bool = True  # prefix sharing (off only to measure what it saves)
    device: str = "cpu"  # where the model runs (cuda on GPU machines)
    quiet: bool = False
    wait_lock: bool = False  # another search writing the same --out: wait for it (else an error)
    method: str = "evo"  # evo: evolution seeded with the DP schedules; dp: the DP schedule alone
    objective: str = "trajectory"  # fid | trajectory | trajectory-features (search/fitness.py)
    grid_points: int = 40  # the DP's coarse grid = the teacher's DDIM schedule
    grid_spacing: str = "quadratic"
    dp_paths: int = 4  # DP schedules seeded into generation 0
    teacher_cache: Optional[str] = None  # default: .teacher-cache next to --out
    holdout_samples: int = 400  # fresh samples per (top-k schedule, sampler) pair; 0: no held-out selection
    holdout_seed: Optional[int] = None  # default: seed + 2 (neither the search's nor the report's)
    holdout_topk: int = 2
    # pairs the held-out samples cannot tell from the best are measured again on this many samples; 0: off
    holdout_confirm_samples: int = 1000
    holdout_confirm_seed: Optional[int] = None  # default: seed + 3
    holdout_uniform: tuple = ("linear", "quadratic")  # uniform schedules re-ranked beside the searched ones
    holdout_front: int = 6  # --multi-objective: front members re-ranked on held-out samples, spread over MACs
    # every re-ranked schedule is tried with each (deterministic runs): the plan is the best (schedule, sampler) pair
    holdout_samplers: tuple = ("ddim", "dpmpp_2m", "ipndm", "unipc", "unipc3")
    # grid points of the per-layer skip sensitivity table (0: off); computed only when skipping is asked for
    sensitivity_points: int = 8
    sensitivity_samples: int = 32
    executor: str = "local"  # or "ray": one evaluator replica per Ray worker
    ray_address: Optional[str] = None  # None: start Ray in this process
    workers: Optional[int] = None  # Ray workers (default: one per CPU of the cluster)

    def resolved(self) -> "SearchOptions":
        """A copy with every default that depends on other settings filled in (out, checkpoint, seeds, ...)."""
        options = replace(self)
        embedded = options.model.startswith("embedded:")
        if options.extractor is None:
            options.extractor = "mnist" if embedded else "inception"
        if options.reference is None and options.model == DEFAULT_MODEL:
            options.reference = "mnist"
        if options.out is None:
            kind, _, where = options.model.partition(":")
            name = where if embedded else Path(options.model.split(":", 1)[-1]).stem
            sampler = "" if options.sampler == "ddim" else "-" + options.sampler
            options.out = f"plans/{kind}-{name}-nfe{options.nfe}{sampler}.json"
        if options.checkpoint is None:
            options.checkpoint = str(output_stem(options.out)) + ".search-state.json"
        if options.report_seed is None:
            options.report_seed = options.seed + 1
        if options.report_extractors is None:
            options.report_extractors = [options.extractor]
        if options.holdout_seed is None:
            options.holdout_seed = options.seed + 2
        if options.holdout_confirm_seed is None:
            options.holdout_confirm_seed = options.seed + 3
        if options.teacher_cache is None:
            options.teacher_cache = str(Path(options.out).parent / ".teacher-cache")
        return options


# The settings the presets below and the command line tune, at their defaults (SearchOptions' own: one home).
DEFAULTS = {f.name: f.default for f in fields(SearchOptions) if f.default is not MISSING}
# --multi-objective: generation 0 of NSGA-II also holds the best DP schedule skipping, by the sensitivity
# table, what costs least per MAC saved until it uses these fractions of the budget.
MO_SEED_FRACTIONS = (0.85, 0.7, 0.55)
# --fast: a smoke-test preset (<= 60 s on the embedded model).
FAST = dict(
    num_samples=32,
    population=8,
    generations=2,
    topk=3,
    mutants=3,
    crossovers=2,
    report_samples=100,
    grid_points=20,
    holdout_samples=100,
    holdout_topk=1,
    holdout_confirm_samples=0,
    compute="macs",  # a smoke test: no engine build for the latency table
)
# --method dp: no evolution; its report (10 rows) is the cost, so fewer samples per row (<= 60 s).
DP_METHOD = dict(report_samples=150)
# --paper-settings: AutoDiffusion's evolution parameters.
PAPER = dict(population=50, generations=10, topk=10, mutants=25, crossovers=15, mutation_prob=0.25)


def output_stem(out: str | Path) -> Path:
    """``--out`` without ``.json``: the outputs beside the plan are named ``STEM.report.md``, ``STEM.pareto.json``..."""
    path = Path(out)
    return path.with_name(path.name[: -len(".json")]) if path.name.endswith(".json") else path


def _check_writable(path: Path, what: str) -> None:
    """Fail now, not after an hour of search, when ``path`` cannot be written (creates no folder)."""
    from autodiffusion_rt.utils import check_writable

    check_writable(path, f"the {what}", "pass --out (or --checkpoint) with a path in a writable folder", SearchError)


@dataclass
class Prepared:
    """Everything resolved and checked before the search starts."""

    options: SearchOptions
    model: object
    extractor: object
    ref_stats: object
    ref_description: str
    space1: object
    space2: object
    settings: object
    run_settings: dict
    latency: Optional[object] = None  # search.latency.LatencyTable with --compute latency


@dataclass
class Evolved:
    """What the evolution hands the later stages."""

    search: object  # evolution.Search: its final state (population, memo) and spaces
    result: object  # evolution.SearchResult
    dp_seeds: list  # the DP schedules generation 0 held (full model, then with the cheapest skips)
    sensitivity: Optional[dict]  # the per-layer skip sensitivity table, when skipping was asked for
    executor_summary: dict


@dataclass
class HeldOut:
    """The held-out re-ranking (``--holdout-samples`` samples of ``--holdout-seed``): its rows and its choice."""

    table: list  # one row per candidate (and sampler) re-ranked: _holdout_row
    fid: float  # the chosen plan's held-out FID (its confirmation FID when the choice was confirmed)
    sampler: str  # the chosen plan's sampler
    num_samples: int = 0  # the samples and seed of that FID
    seed: int = 0
    front_fids: Optional[list] = None  # --multi-objective: the held-out FID of each kept front member
    search_front: Optional[list] = None  # --multi-objective: the rows of every front member re-ranked, kept or not


def prepare(options: SearchOptions, model=None, extractor=None, ref_stats=None) -> Prepared:
    """Resolve and validate every input; raise SearchError (or another Error) naming the bad one.

    ``model``, ``extractor``, ``ref_stats``: objects to use instead of loading
    them from the options (tests, notebooks).
    """
    from .evolution import EvolutionSettings

    options = options.resolved()
    _check_values(options)
    _check_choices(options)
    settings = EvolutionSettings(
        population=options.population,
        generations=options.generations,
        topk=options.topk,
        mutants=options.mutants,
        crossovers=options.crossovers,
        mutation_prob=options.mutation_prob,
        multi_objective=options.multi_objective,
    ).check()
    # Outputs first: a search must not run for an hour and then fail to save.
    _check_writable(Path(options.out), "plan file")
    _check_writable(Path(options.checkpoint), "checkpoint file")
    extractor = _load_extractor(options, extractor)
    model = _load_model(options, model, extractor)
    ref_stats, ref_description = _load_reference(options, model, extractor, ref_stats)
    if options.objective == "fid" and options.num_samples <= extractor.feature_dim and not options.quiet:
        warnings.warn(
            f"--num-samples {options.num_samples} <= the {extractor.feature_dim}-d features of the {extractor.name!r} "
            "extractor: the FID covariance is rank-deficient, so the fitness is biased (the ranking is still "
            "comparable within this run)",
            stacklevel=2,
        )
    latency = _latency_table(options, model)
    space1, space2 = _search_spaces(options, model, latency)
    run_settings = {
        "model": model.name,
        "model_fingerprint": model.fingerprint,
        "nfe": options.nfe,
        "sampler": options.sampler,
        "eta": options.eta,
        "extractor": extractor.name,
        "extractor_fingerprint": extractor.fingerprint,
        "reference": ref_stats.dataset,
        "num_samples": options.num_samples,
        "seed": options.seed,
        "budget_macs": space2.budget_macs,
        "objective": options.objective,
        "grid_points": options.grid_points,
        "grid_spacing": options.grid_spacing,
        "dp_paths": options.dp_paths if options.method == "evo" else None,
        "sensitivity_points": options.sensitivity_points,
        **settings.as_dict(),
    }
    if latency is not None:  # the costs in the checkpoint are this table's
        run_settings.update(compute="latency", latency_table=_table_digest(latency))
    return Prepared(
        options, model, extractor, ref_stats, ref_description, space1, space2, settings, run_settings, latency
    )


def _latency_table(options: SearchOptions, model):
    """--compute latency: the cached (or newly measured) per-layer latency table; None with --compute macs or
    --method dp (which uses no compute)."""
    if options.compute != "latency" or options.method == "dp":
        return None
    from .latency import load_or_measure, resolve_key

    key = resolve_key(
        model, options.latency_backend, options.latency_precision, options.latency_batch, options.latency_threads
    )
    table = load_or_measure(model, key, Path(options.teacher_cache), progress=not options.quiet)
    if not options.quiet:
        print(
            f"latency table ({table.describe()}): full step {table.full_step_ms:.3f} ms, fixed part "
            f"{table.fixed_ms:.3f} ms, request overhead {table.request_ms:.3f} ms, "
            f"reuse saving {table.reuse_ms:.3f} ms",
            file=sys.stderr,
        )
    return table


def _table_digest(table) -> str:
    import hashlib
    import json

    parts = {"request": table.request_ms, "fixed": table.fixed_ms, "layers": table.layer_ms, "key": table.key,
             "reuse": table.reuse_ms}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_values(options: SearchOptions) -> None:
    """The numeric settings, each in its range (before anything is loaded)."""
    from autodiffusion_rt.diffusion import check_seed

    try:
        options.seed = check_seed(options.seed, "--seed")
        options.report_seed = check_seed(options.report_seed, "--report-seed")
    except Error as e:
        raise SearchError(str(e)) from None
    for name, least in (("batch_size", 1), ("cache_mb", 0), ("report_samples", 1)):
        if not _is_int(getattr(options, name), least):
            raise SearchError(f"--{name.replace('_', '-')} {getattr(options, name)!r}: must be an integer >= {least}")
    from autodiffusion_rt.limits import check_limit

    check_limit("batch", options.batch_size, "--batch-size", error=SearchError)
    for name in ("eta", "mutation_prob"):
        value = getattr(options, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise SearchError(f"--{name.replace('_', '-')} {value!r}: must be a finite number")
    fraction = options.budget_fraction
    if fraction is not None and not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise SearchError(f"--budget-fraction {fraction}: must lie in (0, 1] (1 = the full model's MACs at this NFE)")
    if options.budget_macs is not None and options.budget_macs <= 0:
        raise SearchError(f"--budget-macs {options.budget_macs}: must be a positive number of MACs per sample")
    from .latency import COMPUTE_CHOICES

    if options.compute not in COMPUTE_CHOICES:
        raise SearchError(f"--compute {options.compute!r} is unknown: choose one of {', '.join(COMPUTE_CHOICES)}")
    if options.compute == "latency" and options.budget_macs is not None:
        raise SearchError(
            f"--budget-macs {options.budget_macs} counts MACs: add --compute macs, or give --budget-fraction "
            "(a fraction of the full model's predicted latency)"
        )
    for name in ("latency_batch", "latency_threads"):
        if not _is_int(getattr(options, name), 1):
            raise SearchError(f"--{name.replace('_', '-')} {getattr(options, name)!r}: must be an integer >= 1")
    if not _is_int(options.nfe, 1):
        raise SearchError(
            f"--nfe {options.nfe!r} is out of range: choose 1 <= NFE <= the model's number of "
            "training timesteps (e.g. 4)"
        )
    if not _is_int(options.num_samples, 2):
        raise SearchError(
            f"--num-samples {options.num_samples!r}: FID needs at least 2 samples (and more than the "
            "feature size for a stable one)"
        )
    if options.report and options.report_samples < 2:
        raise SearchError(f"--report-samples {options.report_samples!r}: FID needs at least 2 samples")
    if not _is_int(options.holdout_samples, 0) or options.holdout_samples == 1:
        raise SearchError(
            f"--holdout-samples {options.holdout_samples!r}: 0 (no held-out selection) or at least 2 "
            "(FID needs 2; >= 1000 recommended)"
        )
    if options.holdout_topk < 1 or options.dp_paths < 0:
        raise SearchError(
            f"--holdout-topk {options.holdout_topk} / --dp-paths {options.dp_paths}: need "
            "holdout-topk >= 1 and dp-paths >= 0"
        )
    if not _is_int(options.holdout_front, 2):
        raise SearchError(
            f"--holdout-front {options.holdout_front!r}: need at least 2 front members (its two ends), e.g. 6"
        )
    if options.holdout_seed == options.seed and options.holdout_samples:
        raise SearchError(
            f"--holdout-seed {options.holdout_seed} equals --seed: held-out selection needs samples the "
            "search did not see"
        )
    if not _is_int(options.holdout_confirm_samples, 0) or options.holdout_confirm_samples == 1:
        raise SearchError(
            f"--holdout-confirm-samples {options.holdout_confirm_samples!r}: 0 (no confirmation) or at least 2 "
            "(e.g. 1000)"
        )
    if options.holdout_confirm_samples and options.holdout_confirm_seed in (options.seed, options.holdout_seed):
        raise SearchError(
            f"--holdout-confirm-seed {options.holdout_confirm_seed} equals --seed or --holdout-seed: the "
            "confirmation needs samples neither the search nor the held-out ranking saw (e.g. --seed + 3)"
        )
    if options.workers is not None and not _is_int(options.workers, 1):
        raise SearchError(f"--workers {options.workers!r}: need a positive number of Ray workers")


def _check_choices(options: SearchOptions) -> None:
    """The named choices (sampler, method, objective, device, executor) and the output paths."""
    from autodiffusion_rt.diffusion import SAMPLERS

    from .fitness import OBJECTIVES

    if Path(options.out).resolve() == Path(options.checkpoint).resolve():
        raise SearchError(
            f"--checkpoint {options.checkpoint} is the plan path --out: pass another path (or leave --checkpoint out)"
        )
    if options.sampler not in SAMPLERS:
        raise SearchError(f"--sampler {options.sampler!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    if not (0.0 <= options.eta <= 1.0) or (options.sampler != "ddim" and options.eta != 0.0):
        raise SearchError(f"--eta {options.eta}: DDIM's eta lies in [0, 1], and other samplers take none (leave it 0)")
    if options.method not in ("evo", "dp"):
        raise SearchError(
            f"--method {options.method!r} is unknown: choose evo (evolution seeded with DP schedules) "
            "or dp (the DP schedule alone)"
        )
    if options.objective not in OBJECTIVES:
        raise SearchError(f"--objective {options.objective!r} is unknown: choose one of {', '.join(OBJECTIVES)}")
    if options.device != "cpu":
        import torch

        try:
            device = torch.device(options.device)
        except RuntimeError:
            raise SearchError(f"--device {options.device!r} is not a torch device: use cpu or cuda (cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SearchError(f"--device {options.device}: no CUDA device is visible here; use --device cpu")
    if options.executor not in ("local", "ray"):
        raise SearchError(f"--executor {options.executor!r} is unknown: choose local or ray")
    if options.executor == "ray":
        from .executors import _ray

        _ray()  # missing Ray: say what to install now, not after loading everything


def _load_extractor(options: SearchOptions, extractor):
    """The FID extractor (``extractor``, or the one --extractor names); the report's extractors are checked too."""
    from autodiffusion_rt.metrics import EXTRACTOR_NAMES, get_extractor

    if extractor is None:
        if options.extractor not in EXTRACTOR_NAMES:
            raise SearchError(
                f"--extractor {options.extractor!r} is unknown: choose one of {', '.join(EXTRACTOR_NAMES)}"
            )
        extractor = get_extractor(options.extractor)
    for name in options.report_extractors or []:
        if name not in EXTRACTOR_NAMES and name != getattr(extractor, "name", None):
            raise SearchError(f"--report-extractor {name!r} is unknown: choose one of {', '.join(EXTRACTOR_NAMES)}")
    return extractor


def _load_model(options: SearchOptions, model, extractor):
    """The model (``model``, or the one --model names), checked against --nfe and the extractor's image shape."""
    if model is None:
        from autodiffusion_rt.models import load_model

        model = load_model(options.model, **options.model_options)
    steps = model.num_timesteps
    if not 1 <= options.nfe <= steps:
        raise SearchError(
            f"--nfe {options.nfe!r} is out of range: choose 1 <= NFE <= {steps} (the number of "
            f"training timesteps of {model.name})"
        )
    extractor.check_shape(model.image_shape)  # e.g. the mnist extractor on 64x64 colour images
    return model


def _load_reference(options: SearchOptions, model, extractor, ref_stats):
    """(reference statistics, their description): ``ref_stats``, or --reference's in the extractor's features."""
    if ref_stats is not None:
        return ref_stats, ref_stats.dataset
    if options.reference is None:
        raise SearchError(
            f"{model.name} has no reference statistics: pass --reference with real images of its data "
            "(an image folder, an .npz of uint8 images such as an ADM reference batch) or statistics made by "
            f"`autodiffusion-rt fid-stats SOURCE --extractor {extractor.name} --out stats.npz`"
        )
    from autodiffusion_rt.metrics import resolve_reference

    return resolve_reference(options.reference, extractor, progress=not options.quiet)


def _search_spaces(options: SearchOptions, model, latency=None):
    """Stage 1's space (timesteps, full model) and stage 2's (timesteps and skipping, under the compute budget).

    With a latency table the spaces count integer nanoseconds of the steps (the request's fixed overhead is
    the same for every plan): --budget-fraction is then of the full model's predicted request latency.
    """
    from .space import SearchSpace

    layer_macs = {layer.id: layer.macs for layer in model.unet.layers}
    full_step = model.unet.macs()
    overhead, unit = 0, "MACs"
    if latency is not None:
        from .latency import NS_PER_MS

        layer_macs, full_step = latency.space_costs(list(layer_macs))
        overhead, unit = int(round(latency.request_ms * NS_PER_MS)), "ns"
    if options.budget_macs is not None:
        budget = int(options.budget_macs)
    elif options.budget_fraction is not None:
        budget = int(math.floor(options.budget_fraction * (full_step * options.nfe + overhead))) - overhead
    else:
        budget = None
    steps = model.num_timesteps
    return (
        SearchSpace(steps, options.nfe, layer_macs, full_step, budget_macs=None, allow_skip=False),
        SearchSpace(steps, options.nfe, layer_macs, full_step, budget_macs=budget, allow_skip=True, unit=unit),
    )


def run_search(
    options: SearchOptions, model=None, extractor=None, ref_stats=None, executor=None, stop_after: Optional[int] = None
):
    """Run (or resume) a search and write its outputs. Returns (SearchResult, Plan, Report | None).

    ``stop_after``: stop after that many generations (tests of resuming); returns None then.
    """
    from autodiffusion_rt.utils import locked_output_dir

    prepared = prepare(options, model, extractor, ref_stats)
    options = prepared.options
    out = Path(options.out)
    lock = out.with_name(f".{out.name}.lock")  # one search per --out
    busy = (
        f"another search is writing --out {out} (it holds {lock}): wait for it, pass --wait-lock to wait "
        "automatically, or pass another --out"
    )
    on_wait = (
        None
        if options.quiet
        else lambda: print(f"waiting for the other search writing {out} to finish", file=sys.stderr)
    )
    # A failed search leaves no empty folders behind (a checkpoint it wrote stays, for --resume).
    with locked_output_dir(
        lock,
        [out.parent, Path(options.checkpoint).parent],
        error=SearchError,
        busy=busy,
        fix="pass --out with a path in a writable folder",
        wait=options.wait_lock,
        on_wait=on_wait,
    ):
        return _run_locked(prepared, executor, stop_after)


def _run_locked(prepared: Prepared, executor, stop_after: Optional[int]):
    """The search's stages, holding the --out lock: teacher and DP, evolution, held-out selection, outputs."""
    state = _start_or_resume(prepared)
    teacher, dp = _teacher_and_dp(prepared)
    if prepared.options.method == "dp":
        return _run_dp(prepared, dp)
    evolved = _evolve(prepared, state, teacher, dp, executor, stop_after)
    if evolved is None:
        return None
    held_out = _select_on_holdout(prepared, evolved)
    summary = _search_summary(evolved, teacher, dp, held_out)
    _latency_columns(prepared, summary)
    if held_out is not None:  # the report names the held-out table's own samples beside it
        options = prepared.options
        summary["holdout_settings"] = {
            "samples": options.holdout_samples,
            "seed": options.holdout_seed,
            "extractor": prepared.extractor.name,
            "confirm_samples": options.holdout_confirm_samples,
            "confirm_seed": options.holdout_confirm_seed,
            "confirm_sd": CONFIRM_SD,
        }
    plan = _write_plans(prepared, evolved.result, summary, held_out)
    report = None
    if prepared.options.report:
        report = _write_report(
            prepared, _report_rows(prepared, evolved.result, plan, dp), summary, prepared.options.report_extractors
        )
    return evolved.result, plan, report


def _start_or_resume(prepared: Prepared):
    """Clear the temp files of a search killed mid-write; the checkpoint's state with --resume, else None."""
    from autodiffusion_rt.utils import remove_stale_temps

    from .checkpoint import load_state

    options = prepared.options
    checkpoint = Path(options.checkpoint)
    stem = output_stem(options.out)  # under the --out lock: a temp file beside an output is a search killed writing it
    remove_stale_temps(options.out, checkpoint, f"{stem}.pareto.json", f"{stem}.report.md", f"{stem}.report.json")
    if options.resume:
        state = load_state(checkpoint, prepared.run_settings)
        state.check_candidates(
            prepared.model.num_timesteps, options.nfe, prepared.model.unet.layer_ids, str(checkpoint)
        )
        if not options.quiet:
            print(
                f"resuming {checkpoint}: stage {state.stage}, {state.generation + 1} generation(s) done",
                file=sys.stderr,
            )
        return state
    if checkpoint.exists() and not options.quiet:
        print(
            f"starting a new search; it replaces the checkpoint {checkpoint} (pass --resume to continue that one "
            "instead)",
            file=sys.stderr,
        )
    return None


def _teacher_and_dp(prepared: Prepared):
    """(teacher trajectory, DP schedules), each None when neither the method, the objective nor the seeds need it."""
    options, model = prepared.options, prepared.model
    if not (options.method == "dp" or options.objective != "fid" or options.dp_paths):
        return None, None
    from .dp import compute_teacher, dp_schedules, teacher_grid

    grid = teacher_grid(model.num_timesteps, options.grid_points, options.grid_spacing, model.schedule)
    teacher = compute_teacher(
        model,
        options.seed,
        options.num_samples,
        grid,
        batch_size=options.batch_size,
        cache_dir=Path(options.teacher_cache),
        progress=not options.quiet,
    )
    if not (options.method == "dp" or options.dp_paths):
        return teacher, None
    dp = dp_schedules(model, teacher, options.nfe, k=max(1, options.dp_paths))
    if not options.quiet:
        source = "cached teacher" if teacher.cached else f"teacher {teacher.seconds:.0f} s"
        print(
            f"DP over {len(grid)} grid points ({source}, solve {dp.solve_seconds:.2f} s): {list(dp.paths[0][1])}",
            file=sys.stderr,
        )
    return teacher, dp


def _evolve(prepared: Prepared, state, teacher, dp, executor, stop_after: Optional[int]) -> Optional[Evolved]:
    """Stage 1 (timesteps) then stage 2 (timesteps and skipping), checkpointed after every generation.

    None when stopped after ``stop_after`` generations. ``executor``: None evaluates here (or on Ray, --executor).
    """
    from .checkpoint import save_state
    from .evolution import Search

    options = prepared.options
    own_executor = executor is None
    if own_executor:
        executor = _make_executor(prepared, teacher)
    dp_seeds, sensitivity = _dp_seeds(prepared, teacher, dp)
    checkpoint = Path(options.checkpoint)
    search = Search(
        prepared.space1,
        prepared.space2,
        prepared.settings,
        executor,
        options.seed,
        run_settings=prepared.run_settings,
        state=state,
        on_generation=lambda st: save_state(st, checkpoint),
        quiet=options.quiet,
        seeds=dp_seeds,
    )
    try:
        result = search.run(stop_after=stop_after)
    finally:
        executor_summary = executor.summary()
        if own_executor:
            executor.close()
    return None if result is None else Evolved(search, result, dp_seeds, sensitivity, executor_summary)


def _make_executor(prepared: Prepared, teacher):
    """The search's evaluator, here (LocalExecutor) or replicated on Ray workers (--executor ray)."""
    from .executors import LocalExecutor
    from .fitness import FitnessEvaluator

    options = prepared.options
    evaluator = FitnessEvaluator(
        prepared.model,
        options.sampler,
        options.eta,
        options.num_samples,
        options.seed,
        prepared.extractor,
        prepared.ref_stats,
        batch_size=options.batch_size,
        cache_bytes=options.cache_mb << 20,
        share=options.share,
        device=options.device,
        objective=options.objective,
        target=None if teacher is None else teacher.final,
    )
    if options.executor == "ray":
        from .executors import RayExecutor

        return RayExecutor(evaluator, workers=options.workers, address=options.ray_address)
    return LocalExecutor(evaluator)


def _dp_seeds(prepared: Prepared, teacher, dp):
    """(generation 0's DP schedules, the skip sensitivity table or None).

    Where skipping is asked for: which layers cost least at which noise level, and the DP schedules again,
    meeting the budget by skipping exactly those (stage 2's generation 0; stage 1 drops the skips).
    """
    from .space import Candidate

    options, space2 = prepared.options, prepared.space2
    seeds = [Candidate.full(ts) for _, ts in dp.paths[: options.dp_paths]] if dp is not None else []
    budget = space2.budget_macs
    skipping = options.multi_objective or (budget is not None and budget < space2.full_macs)
    if teacher is None or not options.sensitivity_points or not skipping:
        return seeds, None
    from .dp import cheapest_skips, skip_sensitivity

    sensitivity = skip_sensitivity(
        prepared.model,
        teacher,
        options.sensitivity_points,
        options.sensitivity_samples,
        options.batch_size,
        cache_dir=Path(options.teacher_cache),
    )
    full_step = space2.full_step_macs
    guide = _in_space_units(sensitivity, space2)
    space2.set_skip_guide(guide)  # stage 2's skip mutations and budget repairs favour the cheap layer-steps
    full_seeds = list(seeds)
    seeds += [Candidate(c.timesteps, cheapest_skips(guide, c.timesteps, full_step, budget)) for c in full_seeds]
    if options.multi_objective and full_seeds:
        # NSGA-II starts with the best DP schedule at several compute levels below the budget, not only at it.
        top = min(budget, space2.full_macs) if budget is not None else space2.full_macs
        best = full_seeds[0].timesteps
        seeds += [
            Candidate(best, cheapest_skips(guide, best, full_step, int(fraction * top)))
            for fraction in MO_SEED_FRACTIONS
        ]
    return seeds, sensitivity


def _in_space_units(sensitivity: dict, space) -> dict:
    """The sensitivity table with each layer's saving in the space's units (ns with --compute latency), so the
    guide and the seeds rank layer-steps by cost per ns saved, not per MAC."""
    return {**sensitivity, "macs": [space.layer_macs.get(lid, 0) for lid in sensitivity["layers"]]}


def _holdout_row(candidate, search_fitness, holdout_fid: float, macs: int) -> dict:
    """One row of the held-out table (the plan's provenance and the report show it)."""
    return {
        "timesteps": list(candidate.timesteps),
        "skipped_layer_steps": candidate.num_skipped,
        "search_fitness": search_fitness,
        "holdout_fid": holdout_fid,
        "macs_per_sample": macs,
    }


def _select_on_holdout(prepared: Prepared, evolved: Evolved) -> Optional[HeldOut]:
    """Re-rank on fresh samples (None with --holdout-samples 0); sets the result's best (and front) to the choice."""
    if not prepared.options.holdout_samples:
        return None
    return (_rerank_front if prepared.options.multi_objective else _rerank_top)(prepared, evolved)


def _rerank_top(prepared: Prepared, evolved: Evolved) -> HeldOut:
    """Re-rank every (schedule, sampler) pair of the search's top-k, stage 1's best, the DP schedule and the uniform
    schedules by FID on fresh samples, then confirm the close ones on more; the best pair wins.

    The schedules were ranked on the search's samples (seed ``--seed``) under ``--sampler``; they are judged here
    on ``--holdout-samples`` samples of ``--holdout-seed``, so the chosen plan is never chosen on the samples that
    selected it. Deterministic searches (eta 0) try each schedule with every ``holdout_samplers`` sampler too: a
    schedule found under one sampler may be better under another (its search fitness is then not measured: None).
    The uniform schedules (``holdout_uniform`` spacings) compete too, so the plan is never a searched schedule that
    a uniform one beats on these samples.

    Confirmation: the pairs within ``CONFIRM_SD`` paired-bootstrap sd of the best (at most ``CONFIRM_MOST``) are
    measured again on ``--holdout-confirm-samples`` samples of ``--holdout-confirm-seed``, and the lowest FID there
    wins (its ties: the cheapest). At 10 steps the good samplers differ by ~0.04 FID, while 400 samples' paired
    difference has an sd of ~0.045: one draw of 400 picks the worse one about 3 times in 10.
    """
    from .evolution import Scored

    options, result = prepared.options, evolved.result
    memo = evolved.search.state.memo
    space2 = evolved.search.spaces[2]
    evaluated = [c for c in evolved.search.state.population if math.isfinite(memo.get(c, math.inf))]
    ranked = evaluated[: options.holdout_topk]
    extra = [result.stage1_best.candidate] + [c for c in evolved.dp_seeds[:1] if space2.is_valid(c)]
    candidates = list(dict.fromkeys(ranked + extra + _uniform_candidates(prepared, space2)))
    samplers = [options.sampler]
    if options.eta == 0.0:
        samplers += [sm for sm in options.holdout_samplers if sm != options.sampler]
    # Samplers that run the same steps on these schedules (UniPC-3 is UniPC-2 at NFE <= 4; every multistep
    # sampler but iPNDM is DDIM at NFE 2) are measured once: the first of them in ``samplers`` stands for all.
    first_of: dict = {}
    for sampler in samplers:
        first_of.setdefault(_sampler_steps(prepared.model, sampler, options.eta, candidates), sampler)
    pairs = [(sm, c) for sm in first_of.values() for c in candidates]
    rows = _holdout_report(prepared, pairs, options.holdout_samples, options.holdout_seed, "held-out")
    name = prepared.extractor.name
    fids = {pair: row.fid[name] for pair, row in zip(pairs, rows)}
    # Lowest FID, then fewest MACs, then the earlier sampler: a tie goes to the search's own sampler.
    order = sorted(range(len(pairs)), key=lambda i: (rows[i].fid[name], space2.macs(pairs[i][1]), i))
    contenders = _contenders(order, rows, name)
    if len(contenders) > 1 and options.holdout_confirm_samples:
        best, confirmed = _confirm_close_pairs(prepared, space2, [pairs[i] for i in contenders])
        num_samples, seed = options.holdout_confirm_samples, options.holdout_confirm_seed
    else:
        best, confirmed = pairs[order[0]], {}
        num_samples, seed = options.holdout_samples, options.holdout_seed
    table = []
    for sampler in samplers:
        stand_in = first_of[_sampler_steps(prepared.model, sampler, options.eta, candidates)]
        for c in candidates:
            fitness = memo.get(c) if sampler == options.sampler else None
            row = {**_holdout_row(c, fitness, fids[(stand_in, c)], space2.macs(c)), "sampler": sampler}
            if (stand_in, c) in confirmed:
                row["confirm_fid"] = confirmed[(stand_in, c)]
            table.append(row)
    sampler, winner = best
    fid = confirmed.get(best, fids[best])
    result.best = Scored(winner, memo.get(winner, math.inf), space2.macs(winner))
    return HeldOut(table, fid, sampler, num_samples=num_samples, seed=seed)


#: Confirmation: pairs within this many paired-bootstrap sd of the held-out best, at most this many of them.
CONFIRM_SD = 2.0
CONFIRM_MOST = 8


def _contenders(order: list, rows: list, ext: str) -> list:
    """Indices (best first) of the pairs the held-out samples cannot tell from the best: within ``CONFIRM_SD``
    paired-bootstrap sd of its FID, at most ``CONFIRM_MOST``; without a bootstrap (large features), the best two."""
    best = rows[order[0]]
    if not math.isfinite(best.fid[ext]):
        return order[:1]
    if best.boot.get(ext) is None:
        return [i for i in order[:2] if math.isfinite(rows[i].fid[ext])]
    return [order[0]] + [i for i in order[1:] if _within_noise(rows[i], best, ext)][: CONFIRM_MOST - 1]


def _confirm_close_pairs(prepared: Prepared, space, pairs: list) -> tuple:
    """(the chosen pair, {pair: confirmation FID}): ``pairs`` measured on the confirmation samples."""
    options, name = prepared.options, prepared.extractor.name
    rows = _holdout_report(
        prepared, pairs, options.holdout_confirm_samples, options.holdout_confirm_seed, "confirm"
    )
    cost = _request_cost(prepared, space)
    best = pairs[_cheapest_tie(rows, [cost(c) for _, c in pairs], name)]
    return best, {pair: row.fid[name] for pair, row in zip(pairs, rows)}


def _cheapest_tie(rows: list, costs: list, ext: str) -> int:
    """The index of the confirmation's choice: the cheapest of the rows within ``CONFIRM_SD`` paired sd of the
    lowest FID (then the lower FID). A skipped layer whose engine switch costs more than it saves is not worth an
    FID difference the samples cannot show."""
    top = min(range(len(rows)), key=lambda k: (rows[k].fid[ext], k))
    ties = [k for k in range(len(rows)) if k == top or _within_noise(rows[k], rows[top], ext)]
    return min(ties, key=lambda k: (costs[k], rows[k].fid[ext], k))


def _within_noise(row, best, ext: str) -> bool:
    """Is ``row``'s FID within ``CONFIRM_SD`` paired-bootstrap sd of ``best``'s (False without a spread)?"""
    from .report import paired_sd

    gap, sd = row.fid[ext] - best.fid[ext], paired_sd(row, best, ext)
    return math.isfinite(gap) and sd is not None and gap < CONFIRM_SD * sd


def _request_cost(prepared: Prepared, space):
    """A candidate's cost per request: the latency table's predicted ms (engine switches included), else MACs."""
    if prepared.latency is not None:
        return lambda c: prepared.latency.predict_ms(c.skip)
    return space.macs


def _uniform_candidates(prepared: Prepared, space) -> list:
    """The uniform schedules (``holdout_uniform`` spacings) the search space holds, as full-model candidates."""
    from autodiffusion_rt.diffusion import uniform_timesteps

    from .space import Candidate

    model, nfe = prepared.model, prepared.options.nfe
    cands = [
        Candidate.full(uniform_timesteps(model.num_timesteps, nfe, sp, model.schedule))
        for sp in prepared.options.holdout_uniform
    ]
    return [c for c in cands if space.is_valid(c)]


def _holdout_report(prepared: Prepared, pairs: list, num_samples: int, seed: int, label: str) -> list:
    """The report's rows (FID and paired bootstrap) of (sampler, candidate) pairs on ``num_samples`` of ``seed``."""
    from .report import make_report

    options, ext = prepared.options, prepared.extractor
    rows = [(f"{label} {i}", sampler, c) for i, (sampler, c) in enumerate(pairs)]
    report = make_report(
        prepared.model,
        rows,
        [ext],
        {ext.name: prepared.ref_stats},
        num_samples,
        seed,
        options.eta,
        options.batch_size,
        options.quiet,
        device=options.device,
        label=label,
    )
    return report.rows


def _sampler_steps(model, sampler: str, eta: float, candidates) -> tuple:
    """The steps ``sampler`` runs on each candidate (hashable; equal: equal images)."""
    from .report import sampler_steps

    return tuple(sampler_steps(model, sampler, eta, c) for c in candidates)


def _rerank_front(prepared: Prepared, evolved: Evolved) -> HeldOut:
    """--multi-objective: the front (at most --holdout-front members, from the best to the cheapest) re-ranked on
    fresh samples; members another member beats there on FID and MACs are dropped, so every plan of the set
    carries its held-out FID."""
    from .evolution import non_dominated, spread

    options, result = prepared.options, evolved.result
    front = spread(result.pareto, options.holdout_front)
    fids = holdout_fids(prepared, [s.candidate for s in front])
    rows = [_holdout_row(s.candidate, s.fid, f, s.macs) for s, f in zip(front, fids)]
    keep = sorted(non_dominated(range(len(front)), lambda i: (fids[i], front[i].macs)))
    result.pareto = [front[i] for i in keep]
    kept_fids = [fids[i] for i in keep]
    best = min(range(len(keep)), key=lambda i: (kept_fids[i], result.pareto[i].macs))
    result.best = result.pareto[best]
    return HeldOut(
        [rows[i] for i in keep],
        kept_fids[best],
        options.sampler,
        options.holdout_samples,
        options.holdout_seed,
        front_fids=kept_fids,
        search_front=rows,
    )


def holdout_fids(prepared: Prepared, candidates, sampler: Optional[str] = None) -> list[float]:
    """FID of each candidate on --holdout-samples samples of --holdout-seed (prefixes shared)."""
    from tqdm.auto import tqdm

    from .fitness import FitnessEvaluator

    options = prepared.options
    sampler = sampler or options.sampler
    evaluator = FitnessEvaluator(
        prepared.model,
        sampler,
        options.eta if sampler == "ddim" else 0.0,
        options.holdout_samples,
        options.holdout_seed,
        prepared.extractor,
        prepared.ref_stats,
        batch_size=options.batch_size,
        cache_bytes=options.cache_mb << 20,
        device=options.device,
    )
    bar = tqdm(
        total=0,
        desc=f"held-out FID ({options.holdout_samples} samples, seed {options.holdout_seed})",
        disable=options.quiet,
        unit="step",
    )
    try:
        return evaluator.evaluate(list(candidates), progress=bar)
    finally:
        bar.close()


def _search_summary(evolved: Evolved, teacher, dp, held_out: Optional[HeldOut]) -> dict:
    """The search's counters and tables, as the plan's provenance and the report record them."""
    result = evolved.result
    counters = result.counters
    naive, calls = counters.get("naive_unet_calls", 0), counters.get("unet_calls", 0)
    summary = {
        "wall_seconds": round(result.wall_seconds, 1),
        "requested": result.requested,
        "evaluated": result.evaluated,
        "memo_hits": result.requested - result.evaluated,
        "memo_saved_evaluations": result.memo_saved,
        "redrawn_duplicates": sum(h.get("redrawn", 0) for h in result.history),
        "unet_calls": calls,
        "naive_unet_calls": naive,
        "sharing_saved_fraction": (1 - calls / naive) if naive else 0.0,
        "unet_seconds": round(counters.get("unet_seconds", 0.0), 1),
        "fid_seconds": round(counters.get("fid_seconds", 0.0), 1),
        "seconds_per_unet_call": (counters.get("unet_seconds", 0.0) / calls) if calls else None,
        **evolved.executor_summary,
    }
    if dp is not None:
        summary["dp"] = dp.summary()
    if teacher is not None:
        summary["teacher"] = {
            "grid_points": len(teacher.grid),
            "seconds": round(teacher.seconds, 1),
            "cached": teacher.cached,
        }
    if held_out is not None:
        summary["holdout"] = held_out.table
    if evolved.sensitivity is not None:
        summary["skip_sensitivity"] = evolved.sensitivity
    if held_out is not None and held_out.search_front is not None:
        summary["pareto_search_front"] = held_out.search_front
    return summary


def _latency_columns(prepared: Prepared, summary: dict) -> None:
    """--compute latency: the held-out rows' costs came from the space (ns of steps): record them as predicted ms
    per request (with the table's overhead) under their own name, and the table itself."""
    table = prepared.latency
    if table is None:
        return
    from .latency import NS_PER_MS

    for row in summary.get("holdout", []) + summary.get("pareto_search_front", []):
        if "macs_per_sample" in row:
            row["predicted_latency_ms"] = round(row.pop("macs_per_sample") / NS_PER_MS + table.request_ms, 4)
    summary["latency_table"] = table.to_json()


def _provenance(prepared: Prepared, tool: str, summary: dict, **extra) -> dict:
    """A searched plan's provenance: the tool, the run's settings, ``extra``, the summary and the versions."""
    import torch

    import autodiffusion_rt

    options = prepared.options
    return {
        "tool": tool,
        "search": {k: v for k, v in prepared.run_settings.items() if k not in ("model", "model_fingerprint")},
        "reference": options.reference,
        "model_options": options.model_options,
        **extra,
        "summary": summary,
        "versions": {
            "autodiffusion-rt": autodiffusion_rt.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def _write_plans(prepared: Prepared, result, summary: dict, held_out: Optional[HeldOut]):
    """Write the plan (and, with --multi-objective, the Pareto set beside it); say so on stderr. Returns the plan."""
    options = prepared.options
    provenance = _provenance(
        prepared,
        "python -m search.run",
        summary,
        stage1_best=result.stage1_best.candidate.to_json(),
        stage1_fid=result.stage1_best.fid,
        baselines_in_run={
            name: {"timesteps": list(scored.candidate.timesteps), "fid": scored.fid}
            for name, scored in result.baselines.items()
        },
    )
    held_fid, sampler = (held_out.fid, held_out.sampler) if held_out is not None else (None, options.sampler)
    held_at = (held_out.num_samples, held_out.seed) if held_out is not None else None
    plan = make_plan(prepared, result.best, provenance, held_fid, sampler, held_at)
    plan.save(options.out)
    if not options.quiet:
        fitness, held = plan.fitness, ""
        if held_out is not None:
            held = (
                f", held-out FID {fitness.fid:.3f} ({fitness.extractor} features, {fitness.num_samples} samples, "
                f"seed {fitness.seed}; the report's rows use other samples)"
            )
        scored = (
            f"{options.objective} {result.best.fid:.4g} ({prepared.extractor.name}, {options.num_samples} samples)"
            if math.isfinite(result.best.fid)
            else "a uniform schedule the search did not score"  # held-out selection's uniform candidates
        )
        print(
            f"plan written to {options.out}: timesteps {list(plan.timesteps)}, {result.best.candidate.num_skipped} "
            f"skipped layer-steps, {scored}{held}, {plan.macs_per_sample / plan.full_macs_per_sample:.3f} of the "
            "full model's MACs"
            + (
                ""
                if plan.predicted_latency is None
                else f", predicted {plan.predicted_latency.ms:.2f} ms per request "
                f"({plan.predicted_latency.ms / plan.predicted_latency.full_ms:.3f} of the full model's)"
            ),
            file=sys.stderr,
        )
    if options.multi_objective:
        fids = held_out.front_fids if held_out is not None else [None] * len(result.pareto)
        plans = [make_plan(prepared, s, provenance, f) for s, f in zip(result.pareto, fids)]
        stem = output_stem(options.out)
        save_plan_set(plans, stem.with_name(stem.name + ".pareto.json"))
    return plan


def make_plan(
    prepared: Prepared,
    scored,
    provenance: dict,
    holdout_fid: Optional[float] = None,
    sampler: Optional[str] = None,
    holdout_at: Optional[tuple] = None,
):
    """The plan of one scored candidate; its FID is the held-out one when given (else the search's, if an FID),
    measured on ``holdout_at`` = (samples, seed) (default: --holdout-samples of --holdout-seed)."""
    from autodiffusion_rt.plan import Fitness, Plan

    options, extractor, ref_stats = prepared.options, prepared.extractor, prepared.ref_stats
    if holdout_fid is not None:
        # The plan's FID is the held-out one it was chosen on (fresh samples), not the search's fitness.
        samples, seed = holdout_at or (options.holdout_samples, options.holdout_seed)
        fitness = Fitness(float(holdout_fid), extractor.name, samples, seed, ref_stats.dataset)
    elif options.objective == "fid":
        fitness = Fitness(float(scored.fid), extractor.name, options.num_samples, options.seed, ref_stats.dataset)
    else:
        fitness = None  # a trajectory distance is not an FID
    sampler = sampler or options.sampler
    eta = options.eta if sampler == "ddim" else 0.0
    return Plan.for_model(
        prepared.model,
        scored.candidate.timesteps,
        sampler,
        eta,
        scored.candidate.skip,
        spec=options.model,
        fitness=fitness,
        provenance=provenance,
        predicted_latency=predicted_latency(prepared.latency, scored.candidate.skip),
    )


def predicted_latency(table, skip_sets):
    """The plan's record of its predicted latency (None without a latency table)."""
    if table is None:
        return None
    from autodiffusion_rt.plan import PredictedLatency

    rec = table.record(skip_sets)
    return PredictedLatency(rec["ms"], rec["full_ms"], rec["key"])


def _report_rows(prepared: Prepared, result, plan, dp) -> list:
    """The report's rows: the plan, the DP schedule and stage 1's best where they differ, the baselines."""
    from .report import PLAN_ROW, baseline_rows
    from .space import Candidate

    options, model = prepared.options, prepared.model
    rows = [(PLAN_ROW, plan.sampler, result.best.candidate)]
    if dp is not None and Candidate.full(dp.paths[0][1]) != result.best.candidate:
        rows.append(("DP schedule (GITS-style)", options.sampler, Candidate.full(dp.paths[0][1])))
    if result.stage1_best.candidate != result.best.candidate:
        rows.append(("searched, stage 1 (full model)", options.sampler, result.stage1_best.candidate))
    return rows + baseline_rows(model.num_timesteps, options.nfe, model.schedule)


def _write_report(prepared: Prepared, rows: list, summary: dict, extractor_names: list):
    """The comparison report: every row on --report-samples samples of --report-seed; saved beside --out, shown."""
    from .report import make_report

    options = prepared.options
    refs, extractors = {}, []
    for name in extractor_names:
        if name == prepared.extractor.name:
            refs[name] = prepared.ref_stats
            extractors.append(prepared.extractor)
        else:
            from autodiffusion_rt.metrics import resolve_reference

            refs[name] = resolve_reference(options.reference, name, progress=not options.quiet)[0]
            extractors.append(name)
    report = make_report(
        prepared.model,
        rows,
        extractors,
        refs,
        options.report_samples,
        options.report_seed,
        options.eta,
        options.batch_size,
        options.quiet,
        device=options.device,
    )
    report.search = summary
    if prepared.latency is not None:
        from .latency import latency_rows

        report.latency = latency_rows(prepared.latency, rows)
    report.save_and_show(output_stem(options.out), options.quiet)
    return report


def _run_dp(prepared: Prepared, dp):
    """--method dp: the cheapest DP schedule is the plan (no FID was used to choose it); report it."""
    from autodiffusion_rt.plan import Plan

    from .report import baseline_rows
    from .space import Candidate

    options, model = prepared.options, prepared.model
    candidate = Candidate.full(dp.paths[0][1])
    summary = {"method": "dp", "dp": dp.summary()}
    provenance = _provenance(prepared, "python -m search.run --method dp", summary)
    plan = Plan.for_model(
        model,
        candidate.timesteps,
        options.sampler,
        options.eta,
        candidate.skip,
        spec=options.model,
        provenance=provenance,
    )
    plan.save(options.out)
    if not options.quiet:
        print(
            f"plan written to {options.out}: DP timesteps {list(plan.timesteps)} (trajectory cost "
            f"{dp.paths[0][0]:.4f})",
            file=sys.stderr,
        )
    report = None
    if options.report:
        rows = [("DP schedule (GITS-style)", options.sampler, candidate)]
        rows += baseline_rows(model.num_timesteps, options.nfe, model.schedule)
        report = _write_report(prepared, rows, summary, [prepared.extractor.name])
    return dp, plan, report


PLAN_SET_FORMAT = "autodiffusion-rt-plan-set"


def save_plan_set(plans, path: Path) -> Path:
    """The Pareto set: {"format", "version", "plans": [plan, ...]} (each a full plan), written atomically."""
    from autodiffusion_rt.utils import write_json

    path = Path(path)
    write_json(path, {"format": PLAN_SET_FORMAT, "version": 1, "plans": [pl.to_dict() for pl in plans]})
    return path


def load_plan_set(path: str | Path) -> list:
    """Read a Pareto set; every plan is validated like a plan.json (the bad field is named)."""

    from autodiffusion_rt.errors import PlanError
    from autodiffusion_rt.plan import Plan

    path = Path(path)
    from autodiffusion_rt.records import read_json

    try:
        d = read_json(path, PlanError)
    except OSError as e:
        raise PlanError(f"cannot read the plan set {path}: {e.strerror or e}") from None
    if not isinstance(d, dict) or d.get("format") != PLAN_SET_FORMAT or d.get("version") != 1:
        raise PlanError(f"{path}: field 'format'/'version' must be {PLAN_SET_FORMAT!r} version 1")
    if not isinstance(d.get("plans"), list) or not d["plans"]:
        raise PlanError(f"{path}: field 'plans' must be a non-empty list of plans")
    return [Plan.from_dict(pd, f"{path} plans[{i}]") for i, pd in enumerate(d["plans"])]
