"""Skipping at equal compute: the (MACs per image, FID) fronts with and without layer skipping, across NFE.

``python -m search.run --multi-objective --nfe 3-8`` answers what a user asks: for a given compute, is it
better to skip layers or to take fewer steps? For every NFE of the range it runs ``search.run``'s
multi-objective search (stage 1: timesteps with the full model, from the DP schedules; stage 2: NSGA-II on
(search fitness, MACs per image), seeded with the DP schedule skipping what the sensitivity table says is
cheapest at several compute levels), whose front is re-ranked by FID on fresh samples (``--holdout-samples``
of ``--holdout-seed``, a seed the search did not use). Then, on those held-out FIDs:

* the **no-skip front**: per NFE, the best full-model schedule (stage 1's best, the DP schedule and the
  full-model members of the NFE's front); the members no other NFE beats on both FID and MACs;
* the **skip front**: the non-dominated set of every NFE's front (a member may skip nothing);
* the **verdict**: the skip front *dominates the no-skip front at a compute level* (a no-skip point, NFE n
  with the full model) when a plan that skips layers has no more MACs and a lower FID. The question is
  whether that happens at >= 2 levels.

Choosing on the held-out samples favours the side with more candidates (the skip side), so every front
member is measured again on ``--report-samples`` of ``--report-seed`` (a third seed) and the verdict is
given on both. Each per-NFE search is an ordinary search (its plan, Pareto set, checkpoint; ``--resume``
continues the unfinished ones); the teacher is cached, so it is computed once for the range.

Outputs: ``--out`` (default ``plans/embedded-mnist-nfe3-8.json``) is the skip front as a plan set
(:func:`search.run.load_plan_set`), ``STEM.noskip.json`` the no-skip front, ``STEM.report.md`` /
``.report.json`` the table, the verdict and the sensitivity table, ``STEM.report.png`` the plot;
``STEM.nfeN.json`` (+ ``.pareto.json``, ``.search-state.json``) each NFE's own search.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from autodiffusion_rt.utils import atomic_write, write_json

from .errors import SearchError
from .evolution import non_dominated
from .space import Candidate

PARETO_REPORT_FORMAT = "autodiffusion-rt-pareto-report"
# Compute levels wanted for a "yes": the skip front must beat the no-skip front at this many.
LEVELS_WANTED = 2


def parse_nfe(text) -> list[int]:
    """``--nfe``: an integer (4), a range (3-8) or a list (3,4,6) -> the NFEs, ascending, unique."""
    s = str(text).strip()
    try:
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", s)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ValueError
            return list(range(lo, hi + 1))
        return sorted({int(v) for v in s.split(",")})
    except ValueError:
        raise SearchError(
            f"--nfe {text!r}: give an integer (4), a range (3-8, with --multi-objective) or a list (3,4,6)"
        ) from None


@dataclass
class FrontPoint:
    """One plan on a front: its candidate, MACs per image, held-out FID (and the search's fitness,
    the confirmation FID, the predicted ms per request with --compute latency)."""

    candidate: Candidate
    sampler: str
    macs: int
    holdout_fid: float
    search_fitness: Optional[float] = None
    confirm_fid: Optional[float] = None
    latency_ms: Optional[float] = None

    @property
    def cost(self) -> float:
        """The compute the fronts are drawn in: predicted ms with --compute latency, else MACs."""
        return self.macs if self.latency_ms is None else self.latency_ms

    @property
    def nfe(self) -> int:
        return self.candidate.nfe

    @property
    def skips(self) -> bool:
        return self.candidate.num_skipped > 0

    def to_json(self) -> dict:
        return {
            "nfe": self.nfe,
            "sampler": self.sampler,
            "timesteps": list(self.candidate.timesteps),
            "skip": [list(s) for s in self.candidate.skip],
            "skipped_layer_steps": self.candidate.num_skipped,
            "macs_per_sample": self.macs,
            "predicted_latency_ms": self.latency_ms,
            "holdout_fid": self.holdout_fid,
            "search_fitness": self.search_fitness,
            "confirm_fid": self.confirm_fid,
        }


def dominated_levels(noskip: list, skip: list, fid_of) -> list[tuple]:
    """The no-skip points a skipping plan beats:
    [(no-skip point, the best skipping point with <= its compute and a lower FID)]."""
    out = []
    for q in noskip:
        better = [p for p in skip if p.skips and p.cost <= q.cost and fid_of(p) is not None and fid_of(p) < fid_of(q)]
        if better:
            out.append((q, min(better, key=lambda p: (fid_of(p), p.cost))))
    return out


@dataclass
class ParetoReport:
    model: str
    sampler: str
    nfes: list
    extractor: str
    reference: str
    search_seed: int
    search_samples: int
    objective: str
    holdout_seed: int
    holdout_samples: int
    confirm_seed: Optional[int]
    confirm_samples: Optional[int]
    full_step_macs: int
    noskip_front: list
    skip_front: list
    noskip_per_nfe: list  # the best full-model plan of each NFE (before the front)
    sensitivity: Optional[dict] = None
    dp_costs: dict = field(default_factory=dict)  # NFE -> the cheapest DP schedule's trajectory cost
    seconds: float = 0.0
    latency: Optional[dict] = None  # --compute latency: the table (search.latency.LatencyTable.to_json())

    @property
    def unit(self) -> str:
        return "MACs" if self.latency is None else "predicted ms"

    def full_step_cost(self) -> float:
        """One full-model step in the fronts' compute."""
        if self.latency is None:
            return self.full_step_macs
        return self.latency["fixed_ms"] + sum(self.latency["layer_ms"].values())

    # ------------------------------------------------------------------ verdict
    def levels(self, which: str = "holdout") -> list[tuple]:
        fid_of = (lambda p: p.holdout_fid) if which == "holdout" else (lambda p: p.confirm_fid)
        return dominated_levels(self.noskip_front, self.skip_front, fid_of)

    def dominates(self, which: str = "holdout") -> bool:
        return len(self.levels(which)) >= LEVELS_WANTED

    def verdict(self) -> str:
        k = len(self.levels("holdout"))
        lines = []
        if k >= LEVELS_WANTED:
            lines.append(
                f"Yes: on held-out FID the front with skipping dominates the no-skip front at {k} of "
                f"{len(self.noskip_front)} compute levels (>= {LEVELS_WANTED} wanted)."
            )
        else:
            lines.append(
                f"No: on held-out FID the front with skipping dominates the no-skip front at {k} of "
                f"{len(self.noskip_front)} compute levels; >= {LEVELS_WANTED} were wanted. At equal compute, taking "
                "fewer steps with the full model is as good as or better than skipping layers on this model."
            )
        if self.confirm_seed is not None:
            c = len(self.levels("confirm"))
            lines.append(
                f"On the confirmation samples ({self.confirm_samples}, seed {self.confirm_seed}, "
                f"not used to choose): {c} level(s)"
                + (
                    " (the held-out verdict holds)."
                    if (c >= LEVELS_WANTED) == (k >= LEVELS_WANTED)
                    else " (this reverses the held-out verdict)."
                )
            )
        return " ".join(lines)

    def evidence(self) -> str:
        """First-order costs from the teacher of saving one full step's MACs: one step fewer, or the cheapest
        layer skips."""
        t = self.sensitivity
        if not t or not self.dp_costs:
            return ""
        pairs = sorted(
            (c / max(m, 1), c, m, lid, ts)
            for ts, row in zip(t["timesteps"], t["cost"])
            for lid, m, c in zip(t["layers"], t["macs"], row)
        )
        total = saved = used = 0
        for _, c, m, _, _ in pairs:  # the cheapest per MAC first, until one full step's MACs are saved
            if saved >= self.full_step_macs:
                break
            total, saved, used = total + c, saved + m, used + 1
        nfes = sorted(self.dp_costs)
        steps = "; ".join(f"{b} -> {a}: +{self.dp_costs[a] - self.dp_costs[b]:.4g}" for a, b in zip(nfes, nfes[1:]))
        out = [
            f"Saving one full step's MACs ({self.full_step_macs / 1e6:.1f} MMACs), "
            "to first order (trajectory costs from the teacher):",
            f"* one step fewer: the cheapest DP schedule's trajectory cost at NFE n -> n-1: {steps or 'one NFE only'};",
            f"* skipping instead the {used} layer-steps the sensitivity table rates cheapest per MAC saved "
            f"({saved / 1e6:.1f} MMACs; cheapest {pairs[0][3]} at t={pairs[0][4]}): "
            f"the sum of their single-skip costs is {total:.4g}.",
        ]
        return "\n".join(out) + "\n"

    def sensitivity_table(self) -> str:
        t = self.sensitivity
        if not t:
            return ""
        head = ["layer", "MMACs"] + [f"t={ts}" for ts in t["timesteps"]]
        lines = [
            "Skip sensitivity: trajectory cost of one teacher step with one layer skipped "
            f"({t['num_samples']} samples; "
            "the full step costs 0):",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        for k, (lid, m) in enumerate(zip(t["layers"], t["macs"])):
            lines.append(f"| {lid} | {m / 1e6:.1f} | " + " | ".join(f"{row[k]:.3g}" for row in t["cost"]) + " |")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ output
    def table(self) -> str:
        conf = self.confirm_seed is not None
        out = [
            f"{self.model}, {self.sampler}, NFE {self.nfes[0]}-{self.nfes[-1]}: "
            f"the ({self.unit} per image, FID) fronts with and without "
            f"layer skipping. Search: {self.objective} on {self.search_samples} samples of seed {self.search_seed}; "
            f"FID: {self.extractor} "
            f"features against {self.reference}, held-out {self.holdout_samples} samples of seed {self.holdout_seed}"
            + (f", confirmation {self.confirm_samples} samples of seed {self.confirm_seed}" if conf else "")
            + "."
            + (f" {_latency_note(self.latency)}" if self.latency else ""),
            "",
            self.verdict(),
            "",
        ]
        head = [
            "front",
            "NFE",
            "timesteps",
            "skipped layer-steps",
            "MMACs/image",
        ] + (["predicted ms"] if self.latency else []) + [
            "full steps of compute",
            "held-out FID",
        ] + (["confirm FID"] if conf else [])
        out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for name, pts in (("no skipping", self.noskip_front), ("with skipping", self.skip_front)):
            for p in sorted(pts, key=lambda p: p.cost):
                cells = [
                    name,
                    str(p.nfe),
                    ",".join(map(str, p.candidate.timesteps)),
                    str(p.candidate.num_skipped),
                    f"{p.macs / 1e6:.1f}",
                ] + ([_num(p.latency_ms)] if self.latency else []) + [
                    f"{p.cost / self.full_step_cost():.2f}",
                    f"{p.holdout_fid:.3f}",
                ] + ([_num(p.confirm_fid)] if conf else [])
                out.append("| " + " | ".join(cells) + " |")
        out += [
            "",
            f"Per compute level (a no-skip front point): the best plan that skips layers with no more {self.unit}.",
            "",
            f"| level (NFE, full model) | {self._cost_head()} | no-skip FID | best skipping plan "
            f"| its {self._cost_head()} | its FID | skip wins |"
            + (" confirm: no-skip / skip |" if conf else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if conf else ""),
        ]
        for q in sorted(self.noskip_front, key=lambda p: p.cost):
            cands = [p for p in self.skip_front if p.skips and p.cost <= q.cost]
            p = min(cands, key=lambda p: (p.holdout_fid, p.cost)) if cands else None
            row = [str(q.nfe), self._cost_cell(q), f"{q.holdout_fid:.3f}"]
            if p is None:
                row += ["none fits", "-", "-", "no"]
            else:
                row += [
                    f"NFE {p.nfe}, {p.candidate.num_skipped} skipped",
                    self._cost_cell(p),
                    f"{p.holdout_fid:.3f}",
                    "yes" if p.holdout_fid < q.holdout_fid else "no",
                ]
            if conf:
                row.append(f"{_num(q.confirm_fid)} / {_num(None if p is None else p.confirm_fid)}")
            out.append("| " + " | ".join(row) + " |")
        out += [
            "",
            "The best full-model plan of each NFE (held-out FID):",
            "",
            "| NFE | timesteps | held-out FID |",
            "|---|---|---|",
        ]
        out += [
            f"| {p.nfe} | {','.join(map(str, p.candidate.timesteps))} | {p.holdout_fid:.3f} |"
            for p in self.noskip_per_nfe
        ]
        for extra in (self.evidence(), self.sensitivity_table()):
            if extra:
                out += ["", extra]
        return "\n".join(out).rstrip() + "\n"

    def _cost_head(self) -> str:
        return "MMACs" if self.latency is None else "predicted ms"

    def _cost_cell(self, p: FrontPoint) -> str:
        return f"{p.macs / 1e6:.1f}" if self.latency is None else f"{p.latency_ms:.2f}"

    def to_json(self) -> dict:
        return {
            "format": PARETO_REPORT_FORMAT,
            "version": 1,
            "model": self.model,
            "sampler": self.sampler,
            "nfes": list(self.nfes),
            "extractor": self.extractor,
            "reference": self.reference,
            "search": {"seed": self.search_seed, "num_samples": self.search_samples, "objective": self.objective},
            "holdout": {"seed": self.holdout_seed, "num_samples": self.holdout_samples},
            "confirm": None
            if self.confirm_seed is None
            else {"seed": self.confirm_seed, "num_samples": self.confirm_samples},
            "full_step_macs": self.full_step_macs,
            "compute": "macs" if self.latency is None else "latency",
            "latency_table": self.latency,
            "noskip_front": [p.to_json() for p in sorted(self.noskip_front, key=lambda p: p.cost)],
            "skip_front": [p.to_json() for p in sorted(self.skip_front, key=lambda p: p.cost)],
            "noskip_per_nfe": [p.to_json() for p in self.noskip_per_nfe],
            "dominated_levels": {
                which: [{"noskip": q.to_json(), "by": p.to_json()} for q, p in self.levels(which)]
                for which in (("holdout", "confirm") if self.confirm_seed is not None else ("holdout",))
            },
            "skip_front_dominates": self.dominates("holdout"),
            "verdict": self.verdict(),
            "dp_costs": {str(k): v for k, v in self.dp_costs.items()},
            "skip_sensitivity": self.sensitivity,
            "seconds": round(self.seconds, 1),
        }

    def plot(self, path: Path) -> Path:
        from autodiffusion_rt.utils import import_pyplot

        plt = import_pyplot("the Pareto plot of --multi-objective --nfe A-B")
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        try:
            for name, pts, style in (
                ("no skipping (best schedule per NFE)", self.noskip_front, "o-"),
                ("with layer skipping", self.skip_front, "^-"),
            ):
                pts = sorted(pts, key=lambda p: p.cost)
                xs = [p.macs / 1e9 if self.latency is None else p.latency_ms for p in pts]
                ys = [p.holdout_fid for p in pts]
                ax.plot(xs, ys, style, drawstyle="steps-post", label=name)
                for p, x, y in zip(pts, xs, ys):
                    ax.annotate(
                        f"{p.nfe}" + (f"/{p.candidate.num_skipped}s" if p.skips else ""),
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                    )
            ax.set_yscale("log")  # heavy skipping costs ~100x the FID of the useful region; linear would flatten it
            unit = "GMACs per image" if self.latency is None else f"predicted ms per request ({_key(self.latency)})"
            ax.set_xlabel(unit)
            ax.set_ylabel(f"FID ({self.extractor}, {self.holdout_samples} held-out samples)")
            ax.set_title(
                f"{self.model} {self.sampler}: NFE {self.nfes[0]}-{self.nfes[-1]} (label: NFE/skipped layer-steps)",
                fontsize=9,
            )
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            with atomic_write(path, "wb") as f:
                fig.savefig(f, format="png")
        finally:
            plt.close(fig)
        return path

    def save(self, stem: Path) -> tuple[Path, Path, Path]:
        """Write ``stem.report.md``, ``stem.report.json`` and ``stem.report.png`` (each atomically)."""
        md, js, png = Path(f"{stem}.report.md"), Path(f"{stem}.report.json"), Path(f"{stem}.report.png")
        with atomic_write(md, "w") as f:
            f.write(self.table())
        write_json(js, self.to_json())
        self.plot(png)
        return md, js, png


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _key(table: dict) -> str:
    k = table["key"]
    return f"{k['backend']} {k['precision']}, batch {k['batch']}, {k['threads']} thread(s)"


def _latency_note(table: dict) -> str:
    return (
        f"Compute: predicted latency per request on {_key(table)} engines ({table['key']['cpu']}), "
        "from search/latency.py's per-layer table."
    )


def default_out(options, nfes: list[int]) -> str:
    """plans/embedded-mnist-nfe3-8.json for the range 3-8 (the single-NFE default name with the range in it)."""
    single = replace(options, nfe=nfes[0], out=None).resolved().out
    return single.replace(
        f"-nfe{nfes[0]}",
        f"-nfe{nfes[0]}-{nfes[-1]}"
        if nfes == list(range(nfes[0], nfes[-1] + 1))
        else "-nfe" + "_".join(map(str, nfes)),
        1,
    )


def run_pareto(options, nfes, model=None, extractor=None, ref_stats=None) -> ParetoReport:
    """One multi-objective search per NFE, both fronts re-ranked on held-out samples, the report (module docstring).

    Stages: :func:`_prepare_all` (every NFE's settings checked first), :func:`_search_one_nfe` per NFE,
    :func:`_fronts_report` (the fronts, their confirmation, the report), :func:`_write_outputs`.
    """
    t0 = time.perf_counter()
    nfes = sorted(set(int(n) for n in nfes))
    out, preps = _prepare_all(options, nfes, model, extractor, ref_stats)
    skip_points: list[FrontPoint] = []
    noskip_per_nfe: list[FrontPoint] = []
    summaries: dict = {}
    for n in nfes:
        resume = bool(options.resume) and Path(preps[n].options.checkpoint).exists()
        points, noskip, summaries[n] = _search_one_nfe(preps[n], replace(_per_nfe(options, out, n), resume=resume))
        skip_points += points
        noskip_per_nfe.append(noskip)
    report = _fronts_report(options, preps[nfes[0]], nfes, skip_points, noskip_per_nfe, summaries)
    report.seconds = time.perf_counter() - t0
    _write_outputs(options, preps[nfes[0]], report, out)
    return report


def _per_nfe(options, out: Path, n: int):
    """NFE n's own search: multi-objective, no report of its own, its outputs at STEM.nfeN.*."""
    from .pipeline import output_stem

    return replace(options, nfe=n, multi_objective=True, report=False, out=f"{output_stem(out)}.nfe{n}.json")


def _prepare_all(options, nfes: list, model, extractor, ref_stats) -> tuple[Path, dict]:
    """(--out, {NFE: its prepared search}): every setting and output checked before the first search starts."""
    from .pipeline import prepare

    if len(nfes) < 2:
        raise SearchError(f"--nfe {nfes}: the fronts across NFE need at least two NFEs (e.g. --nfe 3-8)")
    if not options.holdout_samples:
        raise SearchError(
            "--holdout-samples 0: the fronts across NFE are compared on FID of fresh samples; give >= 2 "
            "(1000 recommended)"
        )
    if options.checkpoint is not None:
        raise SearchError(
            f"--checkpoint {options.checkpoint}: with an NFE range each NFE keeps its own checkpoint "
            "next to --out; leave --checkpoint out"
        )
    out = Path(options.out if options.out is not None else default_out(options, nfes))
    first = prepare(_per_nfe(options, out, nfes[0]), model, extractor, ref_stats)
    model, extractor, ref_stats = first.model, first.extractor, first.ref_stats
    preps = {n: prepare(_per_nfe(options, out, n), model, extractor, ref_stats) for n in nfes}
    resolved = first.options
    if resolved.holdout_seed == resolved.seed:
        raise SearchError(
            f"--holdout-seed {resolved.holdout_seed} equals --seed: the fronts must be re-ranked on "
            "samples the search did not see"
        )
    return out, preps


def _fronts_report(options, first, nfes: list, skip_points: list, noskip_per_nfe: list, summaries: dict):
    """Both fronts from every NFE's points, confirmed on a third seed (with --report), as a ParetoReport."""
    dp_costs = {n: s["dp"]["paths"][0]["cost"] for n, s in summaries.items() if s.get("dp")}
    sensitivity = next((s["skip_sensitivity"] for s in summaries.values() if s.get("skip_sensitivity")), None)

    def front(points):
        return non_dominated(
            points, lambda p: (p.holdout_fid, p.cost), tiebreak=lambda p: (p.candidate.num_skipped, p.candidate)
        )

    noskip_front, skip_front = front(noskip_per_nfe), front(skip_points)
    resolved = first.options
    # A third seed, used by neither the search nor the choice: the verdict without selection bias.
    confirm_seed, confirm_samples = (resolved.report_seed, resolved.report_samples) if options.report else (None, None)
    if options.report:
        _confirm(first, noskip_front + skip_front)
    return ParetoReport(
        model=first.model.name,
        sampler=options.sampler,
        nfes=nfes,
        extractor=first.extractor.name,
        reference=first.ref_stats.dataset,
        search_seed=resolved.seed,
        search_samples=resolved.num_samples,
        objective=resolved.objective,
        holdout_seed=resolved.holdout_seed,
        holdout_samples=resolved.holdout_samples,
        confirm_seed=confirm_seed,
        confirm_samples=confirm_samples,
        full_step_macs=first.model.unet.macs(),
        noskip_front=noskip_front,
        skip_front=skip_front,
        noskip_per_nfe=noskip_per_nfe,
        sensitivity=sensitivity,
        dp_costs=dp_costs,
        latency=None if first.latency is None else first.latency.to_json(),
    )


def _write_outputs(options, first, report: ParetoReport, out: Path) -> None:
    """The skip front (--out), the no-skip front (STEM.noskip.json) and the report (STEM.report.*)."""
    from .pipeline import output_stem

    stem = output_stem(out)
    tool = "python -m search.run --multi-objective --nfe " + ",".join(map(str, report.nfes))
    _save_front(first, report.skip_front, out, tool)
    _save_front(first, report.noskip_front, Path(f"{stem}.noskip.json"), tool)
    md, _, png = report.save(stem)
    if not options.quiet:
        print(report.table())
        print(f"fronts written to {out} and {stem}.noskip.json; report {md}, plot {png}", file=sys.stderr)


def _search_one_nfe(prepared, options) -> tuple[list, "FrontPoint", dict]:
    """One NFE's multi-objective search: (its front's points, its best full-model schedule, its search summary).

    The best full-model schedule is the best by held-out FID of stage 1's best, the DP schedule and the front's
    full-model members (those not re-ranked yet are, here).
    """
    from .pipeline import holdout_fids, load_plan_set, output_stem, run_search

    if not options.quiet:
        print(f"NFE {options.nfe}: multi-objective search -> {prepared.options.out}", file=sys.stderr)
    result, plan, _ = run_search(options, prepared.model, prepared.extractor, prepared.ref_stats)
    summary = plan.provenance["summary"]
    stem = output_stem(prepared.options.out)
    plans = load_plan_set(stem.with_name(stem.name + ".pareto.json"))
    # the space's cost is ns with --compute latency: MACs and predicted ms come from each plan's own record
    points = [
        FrontPoint(s.candidate, pl.sampler, pl.macs_per_sample, pl.fitness.fid, s.fid, latency_ms=_plan_ms(pl))
        for s, pl in zip(result.pareto, plans)
    ]
    full_members = [h for h in summary.get("pareto_search_front", []) if h["skipped_layer_steps"] == 0]
    known = {Candidate.full(h["timesteps"]): h["holdout_fid"] for h in full_members}
    search_fit = {Candidate.full(h["timesteps"]): h["search_fitness"] for h in full_members}
    full = [result.stage1_best.candidate]
    search_fit.setdefault(result.stage1_best.candidate, result.stage1_best.fid)
    if summary.get("dp"):
        full.append(Candidate.full(summary["dp"]["paths"][0]["timesteps"]))
    full = list(dict.fromkeys(full + list(known)))
    need = [c for c in full if c not in known]
    known.update(zip(need, holdout_fids(prepared, need) if need else []))
    best = min(full, key=lambda c: (known[c], c))
    table = prepared.latency
    noskip = FrontPoint(
        best,
        options.sampler,
        prepared.model.unet.macs() * options.nfe,
        known[best],
        search_fit.get(best),
        latency_ms=None if table is None else round(table.predict_ms(best.skip), 4),
    )
    return points, noskip, summary


def _plan_ms(plan) -> Optional[float]:
    return None if plan.predicted_latency is None else plan.predicted_latency.ms


def _confirm(prepared, points: list) -> None:
    """Measure every front member again on --report-samples samples of --report-seed (sets its confirm_fid)."""
    from .report import make_report

    options, extractor = prepared.options, prepared.extractor
    members = list(dict.fromkeys((p.sampler, p.candidate) for p in points))
    rows = [(f"NFE {c.nfe}", sampler, c) for sampler, c in members]
    report = make_report(
        prepared.model,
        rows,
        [extractor],
        {extractor.name: prepared.ref_stats},
        options.report_samples,
        options.report_seed,
        options.eta,
        options.batch_size,
        options.quiet,
        device=options.device,
    )
    fids = {(sampler, c): r.fid[extractor.name] for (_, sampler, c), r in zip(rows, report.rows)}
    for p in points:
        p.confirm_fid = fids[(p.sampler, p.candidate)]


def _save_front(prepared, points: list, path: Path, tool: str) -> Path:
    """A front as a plan set, by cost; each plan's FID is its held-out one."""
    from .pipeline import make_plan, save_plan_set

    options = prepared.options
    plans = []
    for p in sorted(points, key=lambda p: p.cost):
        provenance = {
            "tool": tool,
            "reference": options.reference,
            "model_options": options.model_options,
            "search_fitness": p.search_fitness,
            "confirm_fid": p.confirm_fid,
        }
        plans.append(make_plan(prepared, p, provenance, p.holdout_fid, p.sampler))
    return save_plan_set(plans, path)
