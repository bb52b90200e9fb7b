"""The report: a searched plan against the usual samplers at the same NFE.

Rows: the plan; stage 1's plan (full model) when stage 2 changed it; every
deterministic sampler (``SAMPLER_LABELS``) with uniform timesteps at each spacing
(:func:`baseline_rows`). Every row is sampled from the same seed (the same x_T,
labels and noise draws) and the same number of samples, and judged by the
same extractor(s) against the same reference statistics. The default report
seed differs from the search's, so the plan is judged on noise it was not
selected on.

Each FID comes with its uncertainty over the choice of samples: the standard
deviation of the FID over ``BOOTSTRAP_ROUNDS`` resamples (with replacement) of
the row's feature vectors. The rows share their noise, so the resamples are
paired (the same indices for every row): a row that beats the plan is reported
with the difference in units of the paired difference's spread, so a reader
sees whether it is noise.

``python -m search.report PLAN.json --extractor inception --num-samples 2000``
reports an existing plan (e.g. with another extractor) without searching again.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from autodiffusion_rt.errors import Error
from autodiffusion_rt.registry import EXTRACTORS, one_of
from autodiffusion_rt.utils import atomic_write, write_json

if TYPE_CHECKING:  # imported where used: python -m search.report parses its arguments before torch loads
    from .space import Candidate

REPORT_FORMAT = "autodiffusion-rt-search-report"
#: Resamples behind each FID's ± sd; at most this feature size (a resample costs a sqrtm of that size).
BOOTSTRAP_ROUNDS = 30
BOOTSTRAP_MAX_DIM = 256
# The rows sampled together hold their states at once (breadth first): at most this much of them, by estimate.
GROUP_STATE_BYTES = 4 << 30
#: The method of the report's first row when it is the plan (the row compared with the baselines).
PLAN_ROW = "searched plan"


@dataclass
class Row:
    method: str
    sampler: str
    candidate: Candidate
    macs: int
    fid: dict = field(default_factory=dict)  # extractor name -> FID
    fid_sd: dict = field(default_factory=dict)  # extractor name -> bootstrap standard deviation of the FID
    boot: dict = field(default_factory=dict, repr=False)  # extractor name -> the resampled FIDs (paired across rows)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "sampler": self.sampler,
            "nfe": self.candidate.nfe,
            "timesteps": list(self.candidate.timesteps),
            "skip": [list(s) for s in self.candidate.skip],
            "skipped_layer_steps": self.candidate.num_skipped,
            "macs_per_sample": self.macs,
            "fid": self.fid,
            "fid_bootstrap_sd": self.fid_sd,
        }


@dataclass
class Report:
    model: str
    nfe: int
    num_samples: int
    seed: int
    eta: float
    references: dict  # extractor -> reference dataset id
    full_macs: int
    rows: list
    seconds: float = 0.0
    search: dict = field(default_factory=dict)  # wall time, evaluations, savings (filled by run.py)
    bootstrap_rounds: int = 0
    comparison: list = field(default_factory=list)  # sentences: the plan against the best uniform row, per extractor
    # --compute latency: search.latency.latency_rows (the table's key, each row's predicted ms)
    latency: Optional[dict] = None

    def to_json(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "model": self.model,
            "nfe": self.nfe,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "eta": self.eta,
            "references": self.references,
            "full_macs_per_sample": self.full_macs,
            "rows": [r.to_json() for r in self.rows],
            "seconds": round(self.seconds, 1),
            "search": self.search,
            "bootstrap_rounds": self.bootstrap_rounds,
            "comparison": self.comparison,
            **({"latency": self.latency} if self.latency else {}),
        }

    def table(self) -> str:
        exts = list(self.references)
        sd = " ± sd" if self.bootstrap_rounds else ""
        head = ["method", "sampler", "NFE", "timesteps", "skipped layer-steps", "MMACs/sample", "vs full"] + [
            f"FID{sd} ({e} features, n={self.num_samples}, seed {self.seed})" for e in exts
        ]
        lines = [
            f"{self.model}, NFE {self.nfe}: {self.num_samples} samples per row, seed {self.seed}; "
            + "; ".join(f"{e} reference {r}" for e, r in self.references.items()),
            "",
            (
                f"Every row is sampled from the same noise (seed {self.seed}), so the rows compare like for like. "
                f"± sd: the standard deviation of the FID over {self.bootstrap_rounds} bootstrap resamples of the "
                "row's samples (the same resamples for every row). "
                if self.bootstrap_rounds
                else ""
            )
            + f"An FID of {self.num_samples} samples is biased upward by a few samples' worth: compare rows within "
            "this table, not with FIDs of another n or seed.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        for r in self.rows:
            cells = [
                r.method,
                r.sampler,
                str(r.candidate.nfe),
                ",".join(map(str, r.candidate.timesteps)),
                str(r.candidate.num_skipped),
                f"{r.macs / 1e6:.1f}",
                f"{r.macs / self.full_macs:.3f}",
            ] + [_fid_cell(r, e) for e in exts]
            lines.append("| " + " | ".join(cells) + " |")
        if self.comparison:
            lines += [""] + self.comparison
        if self.latency:
            lines += ["", _latency_section(self.latency)]
        if self.search:
            s = self.search
            lines += ["", _search_summary(s)]
        return "\n".join(lines) + "\n"

    def save(self, stem: Path) -> tuple[Path, Path]:
        """Write ``stem.report.md`` and ``stem.report.json`` atomically."""
        md, js = Path(f"{stem}.report.md"), Path(f"{stem}.report.json")
        md.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(md, "w") as f:
            f.write(self.table())
        write_json(js, self.to_json())
        return md, js

    def save_and_show(self, stem: Path, quiet: bool = False) -> Path:
        """:meth:`save`, then (unless ``quiet``) the table on stdout and where it was written on stderr:
        how a search ends."""
        md, _ = self.save(stem)
        if not quiet:
            print(self.table())
            print(f"report written to {md}", file=sys.stderr)
        return md


def _fid_cell(row: Row, ext: str) -> str:
    if ext not in row.fid:
        return "-"
    sd = row.fid_sd.get(ext)
    return f"{row.fid[ext]:.3f}" + (f" ± {sd:.3f}" if sd is not None and math.isfinite(sd) else "")


def compare_plan(rows: Sequence[Row], ext: str) -> Optional[str]:
    """One sentence: is the searched plan (the first row) the best row by ``ext``'s FID, and by how much against
    the paired bootstrap spread of the difference to the closest other row (None without a plan row)."""
    if not rows or rows[0].method != PLAN_ROW or ext not in rows[0].fid or len(rows) < 2:
        return None
    plan = rows[0]
    # A baseline row of the plan's own schedule with equal FIDs made the plan's images (held-out selection can
    # choose a uniform schedule): it is the plan, not a rival.
    same = [r for r in rows[1:] if r.candidate == plan.candidate and r.fid == plan.fid]
    rivals = [r for r in rows[1:] if not any(r is s for s in same)]
    if not rivals:
        return None
    other = min(rivals, key=lambda r: r.fid.get(ext, math.inf))
    gap = other.fid.get(ext, math.inf) - plan.fid[ext]
    text = (
        f"The searched plan is the row {same[0].method} ({same[0].sampler}): no searched schedule beat that "
        "uniform schedule on the held-out samples. "
        if same
        else ""
    )
    if gap > 0:
        text += (
            f"The searched plan is the best row by FID ({ext}): {gap:.3f} below the next best, "
            f"{other.method} ({other.sampler})"
        )
    else:
        text += f"{other.method} ({other.sampler}) beats the searched plan by {-gap:.3f} FID ({ext})"
    spread = paired_sd(plan, other, ext)
    if spread is None or not math.isfinite(gap):
        return text + " (no bootstrap spread to judge it by)."
    ratio = abs(gap) / spread if spread > 0 else math.inf
    if ratio < 2:
        verdict = "within the noise of the samples (under 2 sd): a tie on these samples"
    elif gap > 0:
        verdict = "more than the noise of the samples"
    else:
        verdict = "more than the noise of the samples: at this NFE that uniform schedule is better on these samples"
    return text + f", {ratio:.1f} times the paired bootstrap sd of the difference ({spread:.3f}): {verdict}."


def paired_sd(a: Row, b: Row, ext: str) -> Optional[float]:
    """The standard deviation of ``a``'s FID minus ``b``'s over their paired bootstrap resamples (rows from the same
    noise and the same resample indices); None without at least 2 usable resamples."""
    import numpy as np

    x, y = a.boot.get(ext), b.boot.get(ext)
    diff = np.zeros(0) if x is None or y is None else (x - y)[np.isfinite(x - y)]
    return float(np.std(diff, ddof=1)) if len(diff) >= 2 else None


def _latency_section(lat: dict) -> str:
    """Predicted latency per request of each row, on the table's engines (scripts/latency_check.py measures it).

    Rows that skip nothing at the same NFE share one prediction: they are one line, not a column of equal figures.
    """
    k = lat["key"]
    out = (
        f"Predicted latency per request ({k['backend']} {k['precision']} engines, batch {k['batch']}, "
        f"{k['threads']} thread(s), {k['cpu']}; search/latency.py's per-layer table; measured against "
        "benchmark.py by scripts/latency_check.py)"
    )
    common = Counter(f"{r['predicted_ms']:.2f}" for r in lat["rows"]).most_common(1)[0][0]
    differ = [r for r in lat["rows"] if f"{r['predicted_ms']:.2f}" != common]
    others = "every row" if not differ else "every other row"
    out += f": {others}, {common} ms."
    if differ:
        out += "\n\n| method | sampler | predicted ms |\n|---|---|---|\n"
        out += "".join(f"| {r['method']} | {r['sampler']} | {r['predicted_ms']:.2f} |\n" for r in differ)
    return out.rstrip("\n")


def _search_summary(s: dict) -> str:
    parts = [f"search: {s.get('wall_seconds', 0):.0f} s wall"]
    if "evaluated" in s:
        parts.append(
            f"{s['evaluated']} candidates evaluated ({s.get('requested', 0)} requested, "
            f"{s.get('memo_hits', 0)} memo hits; "
            f"the memo saved {s.get('memo_saved_evaluations', s.get('memo_hits', 0))} "
            "evaluations counting elites re-ranked)"
        )
    if "unet_calls" in s:
        parts.append(
            f"{s['unet_calls']} model calls of N samples instead of {s['naive_unet_calls']} without prefix sharing "
            f"({s.get('sharing_saved_fraction', 0):.1%} saved)"
        )
    if s.get("executor") == "ray":
        speedup = s.get("speedup_vs_one_worker")
        parts.append(
            f"Ray: {s['workers']} workers ({s.get('workers_replaced', 0)} replaced), "
            f"speedup against one worker {speedup if speedup is not None else 'n/a'}x "
            f"({s.get('worker_busy_seconds', 0)} s of worker time in {s.get('evaluate_wall_seconds', 0)} s)"
        )
    elif "workers" in s:
        parts.append(f"executor: {s['executor']}, {s['workers']} worker")
    out = "; ".join(parts)
    if s.get("dp"):
        d = s["dp"]
        out += (
            f"\n\nDP schedule optimizer: {d['grid_points']}-point grid, teacher {d['teacher_seconds']} s"
            f"{' (cached)' if d.get('teacher_cached') else ''}, cost matrix {d['matrix_seconds']} s, "
            f"solve {d['solve_seconds']} s; " + "; ".join(f"{p['timesteps']} cost {p['cost']:.4f}" for p in d["paths"])
        )
    if s.get("skip_sensitivity"):
        t = s["skip_sensitivity"]
        out += (
            f"\n\nSkip sensitivity (trajectory cost of one step with one layer skipped, {t['num_samples']} samples; "
            "teacher's own step = 0): the three cheapest and the costliest layer per timestep:\n\n"
            "| t | cheapest | costliest |\n|---|---|---|\n"
        )
        for ts, costs in zip(t["timesteps"], t["cost"]):
            order = sorted(range(len(costs)), key=lambda k: costs[k])
            cheap = ", ".join(f"{t['layers'][k]} {costs[k]:.3g}" for k in order[:3])
            out += f"| {ts} | {cheap} | {t['layers'][order[-1]]} {costs[order[-1]]:.3g} |\n"
    if s.get("holdout"):
        hs = s.get("holdout_settings", {})
        held = (
            f"held-out FID ({hs.get('extractor', '?')} features, n={hs.get('samples', '?')}, "
            f"seed {hs.get('seed', '?')})"
        )
        out += (
            "\n\nHeld-out selection (the search's top-k, stage 1's best, the DP schedule and the uniform "
            "schedules, under every deterministic sampler, re-ranked by FID on fresh samples; lowest wins). "
            "These FIDs use other samples (another n and seed) than the table above, so they differ from its "
            "figures; within each table the rows share their samples and compare like for like:\n\n"
        )
        confirm = any("confirm_fid" in h for h in s["holdout"])
        if confirm:
            out += (
                f"The pairs within {hs.get('confirm_sd', 2):g} paired-bootstrap sd of the best there were measured "
                f"again on {hs.get('confirm_samples', '?')} samples of seed {hs.get('confirm_seed', '?')}; the "
                "lowest confirmation FID won, and rows within that many sd of it went to the cheaper request.\n\n"
            )
        head = f"| timesteps | sampler | skipped layer-steps | search fitness | {held} |"
        if confirm:
            head += f" confirmation FID (n={hs.get('confirm_samples', '?')}, seed {hs.get('confirm_seed', '?')}) |"
        out += head + "\n" + "|---" * head.count(" |") + "|\n"
        for h in s["holdout"]:
            sf = h.get("search_fitness")
            out += (
                f"| {','.join(map(str, h['timesteps']))} | {h.get('sampler', '-')} | {h['skipped_layer_steps']} | "
                f"{'-' if sf is None else f'{sf:.4g}'} | {h['holdout_fid']:.3f} |"
            )
            if confirm:
                out += f" {h['confirm_fid']:.3f} |" if "confirm_fid" in h else " - |"
            out += "\n"
    return out


def baseline_rows(num_timesteps: int, nfe: int, schedule=None) -> list[tuple[str, str, Candidate]]:
    """Every uniform baseline at this NFE: each sampler with linear, quadratic and (given the schedule)
    log-SNR and Karras spacing."""
    from autodiffusion_rt.diffusion import uniform_timesteps

    from .space import Candidate

    spacings = ["linear", "quadratic"] + (["logsnr", "karras"] if schedule is not None else [])
    cands = {sp: Candidate.full(uniform_timesteps(num_timesteps, nfe, sp, schedule)) for sp in spacings}
    rows = []
    for label, sampler in SAMPLER_LABELS:
        rows += [(f"{label} uniform ({sp})", sampler, cands[sp]) for sp in spacings]
    return rows


#: The deterministic samplers every baseline table has a row of, at every spacing (the "best uniform" field).
SAMPLER_LABELS = [
    ("DDIM", "ddim"),
    ("DPM-Solver++(2M)", "dpmpp_2m"),
    ("iPNDM", "ipndm"),
    ("UniPC-2", "unipc"),
    ("UniPC-3", "unipc3"),
]


def make_report(
    model,
    rows: Sequence[tuple[str, str, Candidate]],
    extractors: Sequence[str],
    references: dict,
    num_samples: int,
    seed: int,
    eta: float = 0.0,
    batch_size: int = 256,
    quiet: bool = False,
    device: str = "cpu",
    label: str = "report",
) -> Report:
    """Sample every row once (same seed, same N) and judge it with every extractor.

    ``rows``: (method, sampler, candidate); ``extractors``: names or FeatureExtractor
    objects; ``references``: extractor name -> FeatureStats. ``eta`` applies to ddim rows only. A first row
    named ``PLAN_ROW`` is the plan: an extractor that cannot judge its images is an error (a baseline's
    diverged images get inf). ``label`` names the progress bar.
    Stages: group the rows (:func:`_sample_groups`), sample each group with its shared prefixes (across
    samplers too: every sampler's first step is DDIM's), judge each row (:func:`_judge_row`), compare the plan
    with the best baseline. Rows that run the same steps (UniPC-3 and UniPC-2 up to 4 steps; every multistep
    sampler and DDIM at 2) make the same images: they are sampled and judged once.
    """
    from tqdm.auto import tqdm

    from autodiffusion_rt.metrics import bootstrap_indices, get_extractor

    t0 = time.perf_counter()
    exts = [get_extractor(e) for e in extractors]
    nfe = rows[0][2].nfe
    first: dict = {}  # the steps a row runs -> the first row that runs them
    same = [first.setdefault((sampler_steps(model, sm, eta, c), c.skip), j) for j, (_, sm, c) in enumerate(rows)]
    unique = [j for j in range(len(rows)) if same[j] == j]
    ev, groups = _sample_groups(
        model, rows, unique, exts[0], references[exts[0].name], num_samples, seed, eta, batch_size, device
    )
    # The bar moves per model call over the N samples (a step of a row) and per FID: the units that take time.
    bar = tqdm(
        total=sum(ev.plan_calls([c for _, c in runs], [sm for sm, _ in runs]) for _, runs in groups)
        + len(unique) * len(exts),
        desc=f"{label} NFE {nfe} ({len(rows)} rows x {num_samples} samples)",
        disable=quiet,
        unit="step",
    )
    indices = bootstrap_indices(num_samples, BOOTSTRAP_ROUNDS, seed) if num_samples >= 2 else None
    out_rows: list = [None] * len(rows)
    try:
        for js, runs in groups:
            samples = ev.samples([c for _, c in runs], lambda: bar.update(1), [sm for sm, _ in runs])
            imgs = dict(zip(runs, samples))
            for j in js:
                is_plan = j == 0 and rows[0][0] == PLAN_ROW
                images = imgs[(rows[j][1], rows[j][2])]
                out_rows[j] = _judge_row(model, rows[j], images, exts, references, indices, is_plan, bar)
            del imgs
    finally:
        bar.close()
    for j, k in enumerate(same):
        if k != j:  # the same images as row k: its figures under this row's labels
            method, sampler, cand = rows[j]
            twin = out_rows[k]
            out_rows[j] = Row(method, sampler, cand, twin.macs, dict(twin.fid), dict(twin.fid_sd), dict(twin.boot))
    comparison = [c for c in (compare_plan(out_rows, ext.name) for ext in exts) if c]
    return Report(
        model=model.name,
        nfe=nfe,
        num_samples=num_samples,
        seed=seed,
        eta=eta,
        references={ext.name: references[ext.name].dataset for ext in exts},
        full_macs=model.unet.macs() * nfe,
        rows=out_rows,
        seconds=time.perf_counter() - t0,
        bootstrap_rounds=BOOTSTRAP_ROUNDS if indices is not None and any(r.fid_sd for r in out_rows) else 0,
        comparison=comparison,
    )


def sampler_steps(model, sampler: str, eta: float, candidate) -> tuple:
    """The per-step constants ``sampler`` runs on ``candidate``'s timesteps (hashable; equal constants and equal
    skips: equal images). ``eta`` applies to ddim only."""
    from autodiffusion_rt.diffusion import compute_coefficients

    eta = eta if sampler == "ddim" else 0.0
    coeffs = compute_coefficients(sampler, model.schedule, candidate.timesteps, eta, learned_variance=model.learn_sigma)
    return tuple(coeffs.row(i) for i in range(len(coeffs)))


def _sample_groups(model, rows, which, extractor, reference, num_samples, seed, eta, batch_size, device) -> tuple:
    """``(evaluator, [(row indices, distinct (sampler, candidate) runs)])`` for the rows ``which``. The rows of a
    group are sampled together, sharing their common steps, across samplers too (bit-exact, see search/fitness.py);
    a group holds as many rows as their states fit in ``GROUP_STATE_BYTES``, in order of schedule (so that the
    rows of one schedule share a group).
    """
    from .fitness import FitnessEvaluator

    # The evaluator gives exactly sample()'s images for (N, seed); its extractor is unused here.
    ev = FitnessEvaluator(
        model, "ddim", eta, num_samples, seed, extractor, reference, batch_size=batch_size, cache_bytes=0, device=device
    )
    # A row's states: x and up to three earlier x0s or eps, in float32.
    row_bytes = 4 * 4 * num_samples * math.prod(model.image_shape)
    per_group = max(1, GROUP_STATE_BYTES // row_bytes)
    order = sorted(which, key=lambda j: (rows[j][2].timesteps, rows[j][2].skip))
    groups = []
    for k in range(0, len(order), per_group):
        js = order[k : k + per_group]
        groups.append((js, list(dict.fromkeys((rows[j][1], rows[j][2]) for j in js))))
    return ev, groups


def _judge_row(model, row_spec, images, exts, references, indices, is_plan: bool, bar) -> Row:
    """One row's FID (and bootstrap spread) under every extractor; a baseline that diverged gets inf."""
    import warnings

    import numpy as np

    from autodiffusion_rt.metrics import FIDWarning, fid_with_bootstrap

    method, sampler, cand = row_spec
    layer_macs = {layer.id: layer.macs for layer in model.unet.layers}
    full_step = model.unet.macs()
    row = Row(method, sampler, cand, sum(full_step - sum(layer_macs[i] for i in s) for s in cand.skip))
    for ext in exts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FIDWarning)
            try:
                value, boot = fid_with_bootstrap(
                    images.cpu(), references[ext.name], ext, indices if ext.feature_dim <= BOOTSTRAP_MAX_DIM else None
                )
            except Error as e:
                if is_plan:  # the plan's own row: the reference or extractor does not fit its model
                    raise Error(
                        f"cannot judge the plan's images ({model.name}, {tuple(model.image_shape)}) "
                        f"with extractor {ext.name} against reference {references[ext.name].dataset!r}: {e}; "
                        "pass --reference/--extractor made for this model"
                    ) from None
                value, boot = float("inf"), np.zeros(0)  # a baseline that diverged
        row.fid[ext.name] = float(value)
        if np.isfinite(boot).sum() >= max(2, len(boot) // 2):  # most resamples usable: a spread
            row.boot[ext.name] = boot
            row.fid_sd[ext.name] = float(np.nanstd(boot, ddof=1))
        bar.update(1)
    return row


def plan_rows(plan, model) -> list[tuple[str, str, Candidate]]:
    """The plan's row, its stage-1 row (from provenance) when different, then the baselines."""
    from .space import Candidate

    cand = Candidate(plan.timesteps, plan.skip)
    rows = [(PLAN_ROW, plan.sampler, cand)]
    s1 = (plan.provenance or {}).get("stage1_best")
    if s1:
        c1 = Candidate.from_json(s1)
        if c1 != cand:
            rows.append(("searched, stage 1 (full model)", plan.sampler, c1))
    return rows + baseline_rows(model.num_timesteps, plan.nfe, model.schedule)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from autodiffusion_rt.cli import OneLineParser

    p = OneLineParser(
        prog="python -m search.report",
        description="Report a plan against the uniform samplers ("
        + ", ".join(label for label, _ in SAMPLER_LABELS)
        + "; linear, quadratic, log-SNR and Karras spacing) at its NFE: FID with its "
        "bootstrap spread for every row, all rows from the same noise.",
    )
    p.add_argument("plan", help="a plan.json written by python -m search.run")
    p.add_argument(
        "--extractor",
        action="append",
        default=None,
        choices=EXTRACTORS,
        help=f"{one_of(EXTRACTORS)}, repeatable (default: the plan's)",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="reference data or statistics (default: the search's reference, 'mnist' for the embedded model)",
    )
    p.add_argument("--num-samples", type=int, default=2000, help="samples per row (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=None, help="default: the search seed + 1 (noise the plan was not selected on)"
    )
    p.add_argument("--batch-size", type=int, default=256, help="model batch size (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda[:N]")
    p.add_argument(
        "--out",
        default=None,
        help="report stem (writes STEM.report.md/.json; default: next to the plan, named after the extractors)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table on stdout")
    args = p.parse_args(argv)
    from autodiffusion_rt.cli import run_command

    return run_command("search.report", lambda: _report_command(args))


def _report_command(args) -> None:
    from autodiffusion_rt.diffusion import check_seed
    from autodiffusion_rt.limits import check_limit
    from autodiffusion_rt.metrics import get_extractor, resolve_reference
    from autodiffusion_rt.models import load_model_for_plan
    from autodiffusion_rt.plan import Plan

    # Options first, before the model and the reference are loaded.
    if args.num_samples < 2:
        raise Error(f"--num-samples {args.num_samples}: FID needs at least 2 samples (and more than the feature size)")
    if args.batch_size < 1:
        raise Error(f"--batch-size {args.batch_size}: must be a positive integer")
    check_limit("batch", args.batch_size, "--batch-size")
    if args.seed is not None:
        check_seed(args.seed, "--seed")
    plan = Plan.load(args.plan)
    model = load_model_for_plan(plan)
    extractors = args.extractor or [plan.fitness.extractor if plan.fitness else "mnist"]
    for name in extractors:  # the plan's model must make images the extractor takes, or every FID would be inf
        try:
            get_extractor(name).check_shape(tuple(model.image_shape))
        except Error as e:
            raise Error(
                f"{args.plan} is a plan for {model.name} (images {tuple(model.image_shape)}), which extractor "
                f"{name!r} cannot judge: {e}; pass --extractor/--reference made for this model"
            ) from None
    reference = args.reference or (plan.provenance or {}).get("reference") or "mnist"
    refs = {e: resolve_reference(reference, e, progress=not args.quiet)[0] for e in extractors}
    seed = args.seed if args.seed is not None else (plan.fitness.seed + 1 if plan.fitness else 1)
    rep = make_report(
        model,
        plan_rows(plan, model),
        extractors,
        refs,
        args.num_samples,
        seed,
        plan.eta,
        args.batch_size,
        args.quiet,
        device=args.device,
    )
    stem = Path(args.out) if args.out else Path(args.plan).parent / (Path(args.plan).stem + "." + "-".join(extractors))
    rep.save_and_show(stem, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
