"""The search's machinery behind ``python -m search.run`` (:mod:`search.run` is its command line).

It is its own module so the multi-NFE driver (:mod:`search.pareto`) and the CLI
both build on it without importing each other.

With no arguments: the embedded MNIST model at NFE 4, the mnist extractor,
the defaults below; writes ``plans/embedded-mnist-nfe4.json``, its report
(``.report.md`` / ``.report.json``) and its checkpoint (``.search-state.json``).

Default cost on the project's 2-core CPU (embedded model, NFE 4), measured:
see the comment above SearchOptions and search/README.md.
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

# Defaults sized so that the default run, its held-out selection and its report take <= 5 minutes on the
# project's 2-core CPU when idle (embedded model, NFE 4); --fast and --method dp <= 60 s. The cost is
# counted in sample-NFEs (one model call on one sample; about 4 ms each at 2 threads, batch ~100), per
# phase (counted on the test model with these presets; search/README.md "Defaults" has the table):
#   teacher     grid points x N                              40 x 64               ~  2.6 k
#   search      2 stages x (population + generations x (population - top-k)) candidates
#               x NFE x N x (1 - prefix sharing)            2 x (16 + 3 x 12) x 4 x 64 x ~0.67
#   held-out    (top-k + stage 1 + DP, + 2 other samplers) x NFE x 1000 samples
#   report      rows (plan, DP, stage 1, 9 baselines) x NFE x 400 samples
# The trajectory objective compares each sample with its own teacher image, so it needs far fewer
# samples than FID (no small-N bias); --objective fid wants --num-samples >= 128 (the 64-d mnist features).
# AutoDiffusion's own settings (population 50, 10 generations, top-k 10, 25 mutants, 15 crossovers) are
# --paper-settings, for GPUs.
# The budget defaults to the full model's MACs: stage 2 may skip layers only where that does not cost
# fitness (skipping at equal compute is --multi-objective --nfe 3-8, search/pareto.py).
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
    budget_fraction: Optional[float] = 1.0
    budget_macs: Optional[int] = None
    multi_objective: bool = False
    seed: int = 0
    out: Optional[str] = None
    checkpoint: Optional[str] = None
    resume: bool = False
    report: bool = True
    report_samples: int = 400
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
    holdout_samples: int = 1000  # fresh samples per top-k candidate; 0: no held-out selection
    holdout_seed: Optional[int] = None  # default: seed + 2 (neither the search's nor the report's)
    holdout_topk: int = 2
    holdout_front: int = 6  # --multi-objective: front members re-ranked on held-out samples, spread over MACs
    holdout_samplers: tuple = ("ddim", "dpmpp_2m", "ipndm")  # the winner's schedule is tried with each (deterministic runs)
    sensitivity_points: int = 8  # grid points of the per-layer skip sensitivity table (0: off); computed only when skipping is asked for
    sensitivity_samples: int = 32
    executor: str = "local"  # or "ray": one evaluator replica per Ray worker
    ray_address: Optional[str] = None  # None: start Ray in this process
    workers: Optional[int] = None  # Ray workers (default: one per CPU of the cluster)

    def resolved(self) -> "SearchOptions":
        o = replace(self)
        embedded = o.model.startswith("embedded:")
        if o.extractor is None:
            o.extractor = "mnist" if embedded else "inception"
        if o.reference is None and o.model == DEFAULT_MODEL:
            o.reference = "mnist"
        if o.out is None:
            name = o.model.split(":", 1)[1] if embedded else Path(o.model.split(":", 1)[-1]).stem
            o.out = f"plans/{o.model.split(':')[0]}-{name}-nfe{o.nfe}{'' if o.sampler == 'ddim' else '-' + o.sampler}.json"
        if o.checkpoint is None:
            o.checkpoint = str(_stem(o.out)) + ".search-state.json"
        if o.report_seed is None:
            o.report_seed = o.seed + 1
        if o.report_extractors is None:
            o.report_extractors = [o.extractor]
        if o.holdout_seed is None:
            o.holdout_seed = o.seed + 2
        if o.teacher_cache is None:
            o.teacher_cache = str(Path(o.out).parent / ".teacher-cache")
        return o


# The settings the presets below and the command line tune, at their defaults (SearchOptions' own: one home).
DEFAULTS = {f.name: f.default for f in fields(SearchOptions) if f.default is not MISSING}
# --multi-objective: generation 0 of NSGA-II also holds the best DP schedule skipping, by the sensitivity
# table, what costs least per MAC saved until it uses these fractions of the budget.
MO_SEED_FRACTIONS = (0.85, 0.7, 0.55)
# --fast: a smoke-test preset (<= 60 s on the embedded model).
FAST = dict(num_samples=32, population=8, generations=2, topk=3, mutants=3, crossovers=2, report_samples=128,
            grid_points=20, holdout_samples=200, holdout_topk=1)
# --method dp: no evolution; its report (10 rows) is the cost, so fewer samples per row (<= 60 s).
DP_METHOD = dict(report_samples=250)
# --paper-settings: AutoDiffusion's evolution parameters.
PAPER = dict(population=50, generations=10, topk=10, mutants=25, crossovers=15, mutation_prob=0.25)


def _stem(out: str | Path) -> Path:
    p = Path(out)
    return p.with_name(p.name[: -len(".json")]) if p.name.endswith(".json") else p


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


def prepare(options: SearchOptions, model=None, extractor=None, ref_stats=None) -> Prepared:
    """Resolve and validate every input; raise SearchError (or another Error) naming the bad one.

    ``model``, ``extractor``, ``ref_stats``: objects to use instead of loading
    them from the options (tests, notebooks).
    """
    from autodiffusion_rt.diffusion import SAMPLERS
    from autodiffusion_rt.metrics import EXTRACTOR_NAMES, get_extractor

    from .evolution import EvolutionSettings
    from .space import SearchSpace

    from autodiffusion_rt.diffusion import check_seed

    o = options.resolved()
    try:
        o.seed = check_seed(o.seed, "--seed")
        o.report_seed = check_seed(o.report_seed, "--report-seed")
    except Error as e:
        raise SearchError(str(e)) from None
    for name in ("batch_size", "cache_mb", "report_samples"):
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "cache_mb" else 1):
            raise SearchError(f"--{name.replace('_', '-')} {v!r}: must be an integer >= {0 if name == 'cache_mb' else 1}")
    for name in ("eta", "mutation_prob"):
        v = getattr(o, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise SearchError(f"--{name.replace('_', '-')} {v!r}: must be a finite number")
    if o.budget_fraction is not None and not math.isfinite(o.budget_fraction):
        raise SearchError(f"--budget-fraction {o.budget_fraction}: must lie in (0, 1]")
    if Path(o.out).resolve() == Path(o.checkpoint).resolve():
        raise SearchError(f"--checkpoint {o.checkpoint} is the plan path --out: pass another path (or leave --checkpoint out)")
    if o.sampler not in SAMPLERS:
        raise SearchError(f"--sampler {o.sampler!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    if not (0.0 <= o.eta <= 1.0) or (o.sampler != "ddim" and o.eta != 0.0):
        raise SearchError(f"--eta {o.eta}: DDIM's eta lies in [0, 1], and other samplers take none (leave it 0)")
    if isinstance(o.nfe, bool) or not isinstance(o.nfe, int) or o.nfe < 1:
        raise SearchError(f"--nfe {o.nfe!r} is out of range: choose 1 <= NFE <= the model's number of training timesteps (e.g. 4)")
    if isinstance(o.num_samples, bool) or not isinstance(o.num_samples, int) or o.num_samples < 2:
        raise SearchError(f"--num-samples {o.num_samples!r}: FID needs at least 2 samples (and more than the feature size for a stable one)")
    if o.report and o.report_samples < 2:
        raise SearchError(f"--report-samples {o.report_samples!r}: FID needs at least 2 samples")
    from .fitness import OBJECTIVES

    if o.method not in ("evo", "dp"):
        raise SearchError(f"--method {o.method!r} is unknown: choose evo (evolution seeded with DP schedules) or dp (the DP schedule alone)")
    if o.objective not in OBJECTIVES:
        raise SearchError(f"--objective {o.objective!r} is unknown: choose one of {', '.join(OBJECTIVES)}")
    if isinstance(o.holdout_samples, bool) or not isinstance(o.holdout_samples, int) or o.holdout_samples == 1 or o.holdout_samples < 0:
        raise SearchError(f"--holdout-samples {o.holdout_samples!r}: 0 (no held-out selection) or at least 2 (FID needs 2; >= 1000 recommended)")
    if o.holdout_topk < 1 or o.dp_paths < 0:
        raise SearchError(f"--holdout-topk {o.holdout_topk} / --dp-paths {o.dp_paths}: need holdout-topk >= 1 and dp-paths >= 0")
    if isinstance(o.holdout_front, bool) or not isinstance(o.holdout_front, int) or o.holdout_front < 2:
        raise SearchError(f"--holdout-front {o.holdout_front!r}: need at least 2 front members (its two ends), e.g. 6")
    if o.holdout_seed in (o.seed,) and o.holdout_samples:
        raise SearchError(f"--holdout-seed {o.holdout_seed} equals --seed: held-out selection needs samples the search did not see")
    if o.budget_macs is not None and o.budget_macs <= 0:
        raise SearchError(f"--budget-macs {o.budget_macs}: must be a positive number of MACs per sample")
    if o.budget_fraction is not None and not 0.0 < o.budget_fraction <= 1.0:
        raise SearchError(f"--budget-fraction {o.budget_fraction}: must lie in (0, 1] (1 = the full model's MACs at this NFE)")
    if o.device != "cpu":
        import torch

        try:
            dev = torch.device(o.device)
        except RuntimeError:
            raise SearchError(f"--device {o.device!r} is not a torch device: use cpu or cuda (cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SearchError(f"--device {o.device}: no CUDA device is visible here; use --device cpu")
    if o.executor not in ("local", "ray"):
        raise SearchError(f"--executor {o.executor!r} is unknown: choose local or ray")
    if o.workers is not None and (isinstance(o.workers, bool) or not isinstance(o.workers, int) or o.workers < 1):
        raise SearchError(f"--workers {o.workers!r}: need a positive number of Ray workers")
    if o.executor == "ray":
        from .executors import _ray

        _ray()  # missing Ray: say what to install now, not after loading everything
    settings = EvolutionSettings(
        population=o.population, generations=o.generations, topk=o.topk, mutants=o.mutants,
        crossovers=o.crossovers, mutation_prob=o.mutation_prob, multi_objective=o.multi_objective,
    ).check()

    # Outputs first: a search must not run for an hour and then fail to save.
    out = Path(o.out)
    _check_writable(out, "plan file")
    _check_writable(Path(o.checkpoint), "checkpoint file")

    if extractor is None:
        if o.extractor not in EXTRACTOR_NAMES:
            raise SearchError(f"--extractor {o.extractor!r} is unknown: choose one of {', '.join(EXTRACTOR_NAMES)}")
        extractor = get_extractor(o.extractor)
    for name in o.report_extractors or []:
        if name not in EXTRACTOR_NAMES and name != getattr(extractor, "name", None):
            raise SearchError(f"--report-extractor {name!r} is unknown: choose one of {', '.join(EXTRACTOR_NAMES)}")

    if model is None:
        from autodiffusion_rt.models import load_model

        model = load_model(o.model, **o.model_options)
    T = model.num_timesteps
    if isinstance(o.nfe, bool) or not isinstance(o.nfe, int) or not 1 <= o.nfe <= T:
        raise SearchError(f"--nfe {o.nfe!r} is out of range: choose 1 <= NFE <= {T} (the number of training timesteps of {model.name})")
    extractor.check_shape(model.image_shape)  # e.g. the mnist extractor on 64x64 colour images

    if ref_stats is None:
        if o.reference is None:
            raise SearchError(
                f"{model.name} has no reference statistics: pass --reference with real images of its data "
                "(an image folder, an .npz of uint8 images such as an ADM reference batch) or statistics made by "
                f"`autodiffusion-rt fid-stats SOURCE --extractor {extractor.name} --out stats.npz`"
            )
        from autodiffusion_rt.metrics import resolve_reference

        ref_stats, ref_description = resolve_reference(o.reference, extractor, progress=not o.quiet)
    else:
        ref_description = ref_stats.dataset
    if o.objective == "fid" and o.num_samples <= extractor.feature_dim and not o.quiet:
        warnings.warn(
            f"--num-samples {o.num_samples} <= the {extractor.feature_dim}-d features of the {extractor.name!r} extractor: "
            "the FID covariance is rank-deficient, so the fitness is biased (the ranking is still comparable within this run)",
            stacklevel=2,
        )

    layer_macs = {layer.id: layer.macs for layer in model.unet.layers}
    full_step = model.unet.macs()
    full = full_step * o.nfe
    if o.budget_macs is not None:
        budget = int(o.budget_macs)
    elif o.budget_fraction is not None:
        budget = int(math.floor(o.budget_fraction * full))
    else:
        budget = None
    space1 = SearchSpace(T, o.nfe, layer_macs, full_step, budget_macs=None, allow_skip=False)
    space2 = SearchSpace(T, o.nfe, layer_macs, full_step, budget_macs=budget, allow_skip=True)

    run_settings = {
        "model": model.name,
        "model_fingerprint": model.fingerprint,
        "nfe": o.nfe,
        "sampler": o.sampler,
        "eta": o.eta,
        "extractor": extractor.name,
        "extractor_fingerprint": extractor.fingerprint,
        "reference": ref_stats.dataset,
        "num_samples": o.num_samples,
        "seed": o.seed,
        "budget_macs": budget,
        "objective": o.objective,
        "grid_points": o.grid_points,
        "grid_spacing": o.grid_spacing,
        "dp_paths": o.dp_paths if o.method == "evo" else None,
        "sensitivity_points": o.sensitivity_points,
        **settings.as_dict(),
    }
    return Prepared(o, model, extractor, ref_stats, ref_description, space1, space2, settings, run_settings)


def run_search(options: SearchOptions, model=None, extractor=None, ref_stats=None, executor=None, stop_after: Optional[int] = None):
    """Run (or resume) a search and write its outputs. Returns (SearchResult, Plan, Report | None).

    ``stop_after``: stop after that many generations (tests of resuming); returns None then.
    """
    from autodiffusion_rt.plan import Fitness, Plan

    from .checkpoint import load_state, save_state
    from .evolution import Search
    from .executors import LocalExecutor
    from .fitness import FitnessEvaluator

    p = prepare(options, model, extractor, ref_stats)
    o = p.options
    out = Path(o.out)
    made = _make_parents([out, Path(o.checkpoint)])
    try:
        with _out_lock(out, o.wait_lock, o.quiet):
            return _run_locked(p, executor, stop_after, Fitness, Plan, load_state, save_state, Search, LocalExecutor, FitnessEvaluator)
    except BaseException:
        for d in reversed(made):  # a failed search leaves no empty folders behind
            try:
                d.rmdir()
            except OSError:
                pass
        raise


def _make_parents(paths) -> list[Path]:
    """Create the missing parent dirs of ``paths``; return the ones made (outermost first)."""
    made = []
    for path in paths:
        missing = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                from autodiffusion_rt.utils import path_error

                raise SearchError(path_error(e, d, "pass --out with a path in a writable folder", "create")) from None
            made.append(d)
    return made


def _out_lock(out: Path, wait: bool, quiet: bool):
    """One search per --out: a second one waits (--wait-lock) or fails naming the path."""
    import contextlib

    from autodiffusion_rt.utils import LockBusy, file_lock

    lock = out.with_name(f".{out.name}.lock")

    @contextlib.contextmanager
    def held():
        try:
            with file_lock(lock, wait=wait, remove=True,
                           on_wait=None if quiet else lambda: print(f"waiting for the other search writing {out} to finish", file=sys.stderr)):
                yield
        except LockBusy:
            raise SearchError(
                f"another search is writing --out {out} (it holds {lock}): wait for it, pass --wait-lock to wait "
                "automatically, or pass another --out"
            ) from None

    return held()


def _run_locked(p, executor, stop_after, Fitness, Plan, load_state, save_state, Search, LocalExecutor, FitnessEvaluator):
    from autodiffusion_rt.utils import remove_stale_temps

    o = p.options
    state = None
    ckpt = Path(o.checkpoint)
    stem = _stem(o.out)  # under the --out lock: a temp file beside an output is a search killed while writing it
    remove_stale_temps(o.out, ckpt, f"{stem}.pareto.json", f"{stem}.report.md", f"{stem}.report.json")
    if o.resume:
        state = load_state(ckpt, p.run_settings)
        state.check_candidates(p.model.num_timesteps, o.nfe, p.model.unet.layer_ids, str(ckpt))
        if not o.quiet:
            print(f"resuming {ckpt}: stage {state.stage}, {state.generation + 1} generation(s) done", file=sys.stderr)
    elif ckpt.exists() and not o.quiet:
        print(f"starting a new search; it replaces the checkpoint {ckpt} (pass --resume to continue that one instead)", file=sys.stderr)
    teacher = dp = None
    if o.method == "dp" or o.objective != "fid" or o.dp_paths:
        from .dp import compute_teacher, dp_schedules, teacher_grid

        grid = teacher_grid(p.model.num_timesteps, o.grid_points, o.grid_spacing, p.model.schedule)
        teacher = compute_teacher(p.model, o.seed, o.num_samples, grid, batch_size=o.batch_size,
                                  cache_dir=Path(o.teacher_cache), progress=not o.quiet)
        if o.method == "dp" or o.dp_paths:
            dp = dp_schedules(p.model, teacher, o.nfe, k=max(1, o.dp_paths))
            if not o.quiet:
                print(f"DP over {len(grid)} grid points ({'cached teacher' if teacher.cached else f'teacher {teacher.seconds:.0f} s'}, "
                      f"solve {dp.solve_seconds:.2f} s): {list(dp.paths[0][1])}", file=sys.stderr)
    if o.method == "dp":
        return _run_dp(p, dp)
    own_executor = executor is None
    if executor is None:
        evaluator = FitnessEvaluator(
            p.model, o.sampler, o.eta, o.num_samples, o.seed, p.extractor, p.ref_stats,
            batch_size=o.batch_size, cache_bytes=o.cache_mb << 20, share=o.share, device=o.device,
            objective=o.objective, target=None if teacher is None else teacher.final,
        )
        if o.executor == "ray":
            from .executors import RayExecutor

            executor = RayExecutor(evaluator, workers=o.workers, address=o.ray_address)
        else:
            executor = LocalExecutor(evaluator)
    from .space import Candidate

    dp_seeds = [Candidate.full(ts) for _, ts in dp.paths[: o.dp_paths]] if dp is not None and o.dp_paths else []
    sensitivity = None
    budget = p.space2.budget_macs
    if teacher is not None and o.sensitivity_points and (o.multi_objective or (budget is not None and budget < p.space2.full_macs)):
        # Where skipping is asked for: which layers cost least at which noise level, and DP schedules
        # that meet the budget by skipping exactly those (stage 2's generation 0; stage 1 drops the skips).
        from .dp import cheapest_skips, skip_sensitivity

        sensitivity = skip_sensitivity(p.model, teacher, o.sensitivity_points, o.sensitivity_samples, o.batch_size,
                                       cache_dir=Path(o.teacher_cache))
        full_step = p.model.unet.macs()
        p.space2.set_skip_guide(sensitivity)  # stage 2's skip mutations and budget repairs favour the cheap layer-steps
        full_seeds = list(dp_seeds)
        dp_seeds += [Candidate(c.timesteps, cheapest_skips(sensitivity, c.timesteps, full_step, budget)) for c in full_seeds]
        if o.multi_objective and full_seeds:
            # NSGA-II starts with the best DP schedule at several compute levels below the budget, not only at it.
            top = min(budget, p.space2.full_macs) if budget is not None else p.space2.full_macs
            dp_seeds += [Candidate(full_seeds[0].timesteps, cheapest_skips(sensitivity, full_seeds[0].timesteps, full_step, int(f * top)))
                         for f in MO_SEED_FRACTIONS]
    search = Search(
        p.space1, p.space2, p.settings, executor, o.seed, run_settings=p.run_settings, state=state,
        on_generation=lambda st: save_state(st, ckpt), quiet=o.quiet, seeds=dp_seeds,
    )
    try:
        result = search.run(stop_after=stop_after)
    finally:
        executor_summary = executor.summary()
        if own_executor:
            executor.close()
    if result is None:
        return None
    selection = pareto_fids = search_front = None
    if o.holdout_samples and not o.multi_objective:
        selection = _holdout_select(p, search, result, dp_seeds)
    elif o.holdout_samples:
        # The front (at most --holdout-front members, from the best to the cheapest), re-ranked on fresh samples:
        # every plan of the set carries its held-out FID.
        from .evolution import non_dominated, spread

        result.pareto = spread(result.pareto, o.holdout_front)
        fids = _holdout_fids(p, [s.candidate for s in result.pareto])
        # The front on fresh samples: members another member beats on held-out FID and MACs are dropped.
        keep = sorted(non_dominated(range(len(result.pareto)), lambda i: (fids[i], result.pareto[i].macs)))
        search_front = [{"timesteps": list(s.candidate.timesteps), "skipped_layer_steps": s.candidate.num_skipped,
                                                  "search_fitness": s.fid, "holdout_fid": f, "macs_per_sample": s.macs} for s, f in zip(result.pareto, fids)]
        result.pareto = [result.pareto[i] for i in keep]
        pareto_fids = [fids[i] for i in keep]
        table = [{"timesteps": list(s.candidate.timesteps), "skipped_layer_steps": s.candidate.num_skipped, "search_fitness": s.fid,
                  "holdout_fid": f, "macs_per_sample": s.macs} for s, f in zip(result.pareto, pareto_fids)]
        i = min(range(len(table)), key=lambda i: (pareto_fids[i], result.pareto[i].macs))
        result.best = result.pareto[i]
        selection = {"table": table, "fid": pareto_fids[i], "samples": o.holdout_samples, "seed": o.holdout_seed}

    c = result.counters
    naive, calls = c.get("naive_unet_calls", 0), c.get("unet_calls", 0)
    search_summary = {
        "wall_seconds": round(result.wall_seconds, 1),
        "requested": result.requested,
        "evaluated": result.evaluated,
        "memo_hits": result.requested - result.evaluated,
        "memo_saved_evaluations": result.memo_saved,
        "redrawn_duplicates": sum(h.get("redrawn", 0) for h in result.history),
        "unet_calls": calls,
        "naive_unet_calls": naive,
        "sharing_saved_fraction": (1 - calls / naive) if naive else 0.0,
        "unet_seconds": round(c.get("unet_seconds", 0.0), 1),
        "fid_seconds": round(c.get("fid_seconds", 0.0), 1),
        "seconds_per_unet_call": (c.get("unet_seconds", 0.0) / calls) if calls else None,
        **executor_summary,
    }
    if dp is not None:
        search_summary["dp"] = dp.summary()
    if teacher is not None:
        search_summary["teacher"] = {"grid_points": len(teacher.grid), "seconds": round(teacher.seconds, 1), "cached": teacher.cached}
    if selection is not None:
        search_summary["holdout"] = selection["table"]
        search_summary["holdout_settings"] = {"samples": o.holdout_samples, "seed": o.holdout_seed,
                                              "extractor": p.extractor.name}
    if sensitivity is not None:
        search_summary["skip_sensitivity"] = sensitivity
    if search_front is not None:
        search_summary["pareto_search_front"] = search_front
    plan = _make_plan(p, result.best, result, search_summary, Fitness, Plan, selection)
    plan.save(o.out)
    if not o.quiet:
        print(f"plan written to {o.out}: timesteps {list(plan.timesteps)}, {result.best.candidate.num_skipped} skipped layer-steps, "
              f"{o.objective} {result.best.fid:.4g} ({p.extractor.name}, {o.num_samples} samples)"
              + (f", held-out FID {plan.fitness.fid:.3f} ({p.extractor.name} features, {plan.fitness.num_samples} "
                 f"samples, seed {plan.fitness.seed}; the report's rows use other samples)" if selection else "") + ", "
              f"{plan.macs_per_sample / plan.full_macs_per_sample:.3f} of the full model's MACs", file=sys.stderr)
    if o.multi_objective:
        plans = [_make_plan(p, s, result, search_summary, Fitness, Plan,
                            None if pareto_fids is None else dict(selection, fid=pareto_fids[i])) for i, s in enumerate(result.pareto)]
        save_plan_set(plans, _stem(o.out).with_name(_stem(o.out).name + ".pareto.json"))

    report = None
    if o.report:
        from .report import baseline_rows, make_report

        rows = [("searched plan", plan.sampler, result.best.candidate)]
        if dp is not None and Candidate.full(dp.paths[0][1]) != result.best.candidate:
            rows.append(("DP schedule (GITS-style)", o.sampler, Candidate.full(dp.paths[0][1])))
        if result.stage1_best.candidate != result.best.candidate:
            rows.append(("searched, stage 1 (full model)", o.sampler, result.stage1_best.candidate))
        rows += baseline_rows(p.model.num_timesteps, o.nfe, p.model.schedule)
        refs, exts = {}, []
        for name in o.report_extractors:
            if name == p.extractor.name:
                refs[name] = p.ref_stats
                exts.append(p.extractor)
            else:
                from autodiffusion_rt.metrics import resolve_reference

                refs[name] = resolve_reference(o.reference, name, progress=not o.quiet)[0]
                exts.append(name)
        report = make_report(p.model, rows, exts, refs, o.report_samples, o.report_seed, o.eta, o.batch_size, o.quiet, device=o.device)
        report.search = search_summary
        report.save_and_show(_stem(o.out), o.quiet)
    return result, plan, report


def _holdout_select(p: Prepared, search, result, dp_seeds) -> dict:
    """Re-rank the search's top-k (and stage 1's best and the DP schedule) by FID on fresh samples; the best wins.

    The candidates were ranked on the search's samples (seed ``--seed``); they are judged here on
    ``--holdout-samples`` samples of ``--holdout-seed``, so the chosen plan is never chosen on the samples that selected it.
    """
    o = p.options
    memo = search.state.memo
    s2 = search.spaces[2]
    ranked = [c for c in search.state.population if math.isfinite(memo.get(c, math.inf))][: o.holdout_topk]
    extra = [result.stage1_best.candidate] + [c for c in dp_seeds[:1] if s2.is_valid(c)]
    cands = list(dict.fromkeys(ranked + extra))
    fids = _holdout_fids(p, cands)
    table = [{"timesteps": list(c.timesteps), "skipped_layer_steps": c.num_skipped, "search_fitness": memo.get(c),
              "holdout_fid": f, "macs_per_sample": s2.macs(c)} for c, f in zip(cands, fids)]
    best = min(range(len(cands)), key=lambda i: (fids[i], s2.macs(cands[i]), cands[i]))
    from .evolution import Scored

    result.best = Scored(cands[best], memo.get(cands[best], math.inf), s2.macs(cands[best]))
    for row in table:
        row["sampler"] = o.sampler
    chosen = {"table": table, "fid": fids[best], "samples": o.holdout_samples, "seed": o.holdout_seed, "sampler": o.sampler}
    # The sampler is part of the plan: the winner's schedule is also tried with the other deterministic samplers.
    others = [sm for sm in o.holdout_samplers if sm != o.sampler] if o.eta == 0.0 else []
    for sm in others:
        f = _holdout_fids(p, [cands[best]], sampler=sm)[0]
        table.append({**table[best], "sampler": sm, "search_fitness": None, "holdout_fid": f})
        if f < chosen["fid"]:
            chosen.update(fid=f, sampler=sm)
    return chosen


def _holdout_fids(p: Prepared, cands, sampler: Optional[str] = None) -> list[float]:
    """FID of each candidate on --holdout-samples samples of --holdout-seed (prefixes shared)."""
    from tqdm.auto import tqdm

    from .fitness import FitnessEvaluator

    o = p.options
    sampler = sampler or o.sampler
    ev = FitnessEvaluator(p.model, sampler, o.eta if sampler == "ddim" else 0.0, o.holdout_samples, o.holdout_seed, p.extractor, p.ref_stats,
                          batch_size=o.batch_size, cache_bytes=o.cache_mb << 20, device=o.device)
    bar = tqdm(total=0, desc=f"held-out FID ({o.holdout_samples} samples, seed {o.holdout_seed})", disable=o.quiet, unit="step")
    try:
        return ev.evaluate(list(cands), progress=bar)
    finally:
        bar.close()


def _run_dp(p: Prepared, dp):
    """--method dp: the cheapest DP schedule is the plan (no FID was used to choose it); report it."""
    from autodiffusion_rt.plan import Plan

    import autodiffusion_rt
    import torch

    from .report import baseline_rows, make_report
    from .space import Candidate

    o = p.options
    cand = Candidate.full(dp.paths[0][1])
    summary = {"method": "dp", "dp": dp.summary()}
    provenance = {
        "tool": "python -m search.run --method dp",
        "search": {k: v for k, v in p.run_settings.items() if k not in ("model", "model_fingerprint")},
        "reference": o.reference,
        "model_options": o.model_options,
        "summary": summary,
        "versions": {"autodiffusion-rt": autodiffusion_rt.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    plan = Plan.for_model(p.model, cand.timesteps, o.sampler, o.eta, cand.skip, spec=o.model, provenance=provenance)
    plan.save(o.out)
    if not o.quiet:
        print(f"plan written to {o.out}: DP timesteps {list(plan.timesteps)} (trajectory cost {dp.paths[0][0]:.4f})", file=sys.stderr)
    report = None
    if o.report:
        rows = [("DP schedule (GITS-style)", o.sampler, cand)] + baseline_rows(p.model.num_timesteps, o.nfe, p.model.schedule)
        report = make_report(p.model, rows, [p.extractor], {p.extractor.name: p.ref_stats}, o.report_samples, o.report_seed, o.eta, o.batch_size, o.quiet, device=o.device)
        report.search = summary
        report.save_and_show(_stem(o.out), o.quiet)
    return dp, plan, report


def _make_plan(p: Prepared, scored, result, summary: dict, Fitness, Plan, selection: Optional[dict] = None):
    import torch

    import autodiffusion_rt

    o = p.options
    if selection is not None:
        # The plan's FID is the held-out one it was chosen on (fresh samples), not the search's fitness.
        fitness = Fitness(float(selection["fid"]), p.extractor.name, selection["samples"], o.holdout_seed, p.ref_stats.dataset)
    elif o.objective == "fid":
        fitness = Fitness(float(scored.fid), p.extractor.name, o.num_samples, o.seed, p.ref_stats.dataset)
    else:
        fitness = None  # a trajectory distance is not an FID
    provenance = {
        "tool": "python -m search.run",
        "search": {k: v for k, v in p.run_settings.items() if k not in ("model", "model_fingerprint")},
        "reference": o.reference,
        "model_options": o.model_options,
        "stage1_best": result.stage1_best.candidate.to_json(),
        "stage1_fid": result.stage1_best.fid,
        "baselines_in_run": {k: {"timesteps": list(v.candidate.timesteps), "fid": v.fid} for k, v in result.baselines.items()},
        "summary": summary,
        "versions": {"autodiffusion-rt": autodiffusion_rt.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    sampler = (selection or {}).get("sampler", o.sampler)
    eta = o.eta if sampler == "ddim" else 0.0
    return Plan.for_model(p.model, scored.candidate.timesteps, sampler, eta, scored.candidate.skip, spec=o.model, fitness=fitness, provenance=provenance)


PLAN_SET_FORMAT = "autodiffusion-rt-plan-set"


def save_plan_set(plans, path: Path) -> Path:
    """The Pareto set: {"format", "version", "plans": [plan, ...]} (each a full plan), written atomically."""
    import json

    from autodiffusion_rt.utils import atomic_write

    path = Path(path)
    with atomic_write(path, "w") as f:
        json.dump({"format": PLAN_SET_FORMAT, "version": 1, "plans": [pl.to_dict() for pl in plans]}, f, indent=2)
        f.write("\n")
    return path


def load_plan_set(path: str | Path) -> list:
    """Read a Pareto set; every plan is validated like a plan.json (the bad field is named)."""
    import json

    from autodiffusion_rt.errors import PlanError
    from autodiffusion_rt.plan import Plan

    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"cannot read the plan set {path}: {e}") from None
    if not isinstance(d, dict) or d.get("format") != PLAN_SET_FORMAT or d.get("version") != 1:
        raise PlanError(f"{path}: field 'format'/'version' must be {PLAN_SET_FORMAT!r} version 1")
    if not isinstance(d.get("plans"), list) or not d["plans"]:
        raise PlanError(f"{path}: field 'plans' must be a non-empty list of plans")
    return [Plan.from_dict(pd, f"{path} plans[{i}]") for i, pd in enumerate(d["plans"])]


# ---------------------------------------------------------------------- CLI
