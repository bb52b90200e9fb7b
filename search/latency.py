"""Latency as the search's compute: a per-layer table measured on the engines ``build`` makes, and its predictor.

``--compute latency`` (the default) measures, once per (backend, precision, batch, threads, CPU model) and
model, the latency of each skippable layer and of the fixed part of a step, and caches the table as JSON beside
the teacher (``--teacher-cache``; written atomically; reused only when every field of its key matches).

The measurement (:func:`measure_table`): a *measurement plan* of L + 2 steps (the full model, each of the
L skippable layers skipped alone, then every one of them skipped) is built with ``autodiffusion-rt build``'s own code
(:func:`export.build.build_engines`: backend ``auto`` is OpenVINO where its CPU plugin loads, bf16 on a CPU with
native bf16, else onnxruntime; ``torch`` runs the plan on the PyTorch model) and loaded with
:meth:`Runtime.load <autodiffusion_rt.runtime.Runtime.load>`. Each round walks the L + 2 steps in order,
timing every step as the runtime runs it (its engine call and its NaN check), times the full step once more
right after itself, then times one whole request (``Runtime.sample``); the medians over the rounds give

* the fixed part of a step = the step with every skippable layer skipped (measured, not derived);
* a layer's cost = its saving (the full step - the step with that layer skipped alone, clamped at 0), scaled so
  that the costs add up to the full step - the fixed part: skipping one layer alone saves more than its share
  (the rest of the step runs less well), so the bare savings add up to more than the whole step; when no
  single skip saves anything measurable (a tiny model's layers within the timer's noise), the full step -
  the fixed part is spread evenly, so the prediction stays exact at both ends;
* the reuse saving = the full step after another subnetwork - the same step right after itself: OpenVINO
  compiles one shared subnetwork per distinct keep set, and a step that runs the one its predecessor ran finds
  it warm (the onnxruntime engines are one per step: no reuse);
* the request's own overhead (x_T draws, copies, the clamp) = the whole request - the sum of its steps.

A plan's predicted per-request latency (:meth:`LatencyTable.predict_ms`) is the overhead plus, per step, the
fixed part and the costs of the layers the step keeps, less the reuse saving for each step that repeats its
predecessor's keep set on a shared-subnetwork backend: built from these measurements only, never fitted on a
plan it is checked on (``scripts/latency_check.py`` compares it with ``benchmark.py``). The search's space adds
the per-layer costs alone (the reuse saving depends on neighbouring steps, which the space does not see).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from autodiffusion_rt.utils import write_json

from .errors import SearchError

LATENCY_FORMAT = "autodiffusion-rt-latency-table"
LATENCY_VERSION = 2  # 2: the fixed part measured, the reuse saving
#: The fields a table's key must match, the five the brief names first.
KEY_FIELDS = ("backend", "precision", "batch", "threads", "cpu", "model_fingerprint", "versions")
#: Rounds of the measurement walk (each times every step once, then one whole request), after WARMUP_ROUNDS.
ROUNDS = 25
WARMUP_ROUNDS = 3
COMPUTE_CHOICES = ("latency", "macs")
#: Backends whose steps with the same keep set run one shared compiled subnetwork (export/openvino_build.py).
SHARED_SUBNETWORK_BACKENDS = ("openvino",)
NS_PER_MS = 1_000_000


def cpu_model() -> str:
    """The CPU's model string (``model name`` in /proc/cpuinfo; the platform's processor elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model name")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def resolve_key(model, backend: str = "auto", precision: str = "auto", batch: int = 1, threads: int = 1) -> dict:
    """The table's key for ``model`` on this machine: backend and precision as ``build`` resolves ``auto``."""
    from autodiffusion_rt.errors import Error

    if not (isinstance(batch, int) and batch >= 1 and isinstance(threads, int) and threads >= 1):
        raise SearchError(f"--latency-batch {batch!r} / --latency-threads {threads!r}: must be positive integers")
    if backend == "torch":
        precision = "fp32" if precision == "auto" else precision
    else:
        try:
            from export.build import default_backend, default_precision

            backend = default_backend() if backend == "auto" else backend
            precision = default_precision(backend) if precision == "auto" else precision
        except (ImportError, Error):  # no ONNX exporter here: the PyTorch model is what runs
            backend, precision = "torch", "fp32"
    from autodiffusion_rt.runtime.platform import library_versions

    return {
        "backend": backend,
        "precision": precision,
        "batch": batch,
        "threads": threads,
        "cpu": cpu_model(),
        "model_fingerprint": model.fingerprint,
        "versions": {k: v for k, v in library_versions(None if backend == "torch" else backend).items() if v},
    }


@dataclass
class LatencyTable:
    """Per-request latency parts (ms) for one key: the request overhead, a step's fixed part, each layer's cost."""

    key: dict
    request_ms: float
    fixed_ms: float
    layer_ms: dict  # layer id -> ms a step saves by skipping it
    measured: dict = field(default_factory=dict)  # the raw medians and how they were taken (for the record)
    reuse_ms: float = 0.0  # what a step saves when it runs the shared subnetwork its predecessor ran

    @property
    def full_step_ms(self) -> float:
        return self.fixed_ms + sum(self.layer_ms.values())

    def step_ms(self, skip: Sequence[str]) -> float:
        """One step that skips ``skip``: the fixed part and every kept layer."""
        skipped = set(skip)
        return self.fixed_ms + sum(ms for lid, ms in self.layer_ms.items() if lid not in skipped)

    def predict_ms(self, skip_sets: Sequence[Sequence[str]]) -> float:
        """Per-request latency of a plan whose steps skip ``skip_sets`` (one per step)."""
        total = self.request_ms + sum(self.step_ms(s) for s in skip_sets)
        if self.key.get("backend") in SHARED_SUBNETWORK_BACKENDS:
            total -= self.reuse_ms * sum(set(a) == set(b) for a, b in zip(skip_sets, skip_sets[1:]))
        return total

    def full_ms(self, nfe: int) -> float:
        """The full model's per-request latency at ``nfe`` steps."""
        return self.predict_ms([()] * nfe)

    def space_costs(self, layer_ids: Sequence[str]) -> tuple[dict, int]:
        """({layer id: ns}, a full step in ns): the search space's integer costs (exact sums, like MACs)."""
        layer_ns = {lid: int(round(self.layer_ms.get(lid, 0.0) * NS_PER_MS)) for lid in layer_ids}
        return layer_ns, int(round(self.fixed_ms * NS_PER_MS)) + sum(layer_ns.values())

    def record(self, skip_sets: Sequence[Sequence[str]]) -> dict:
        """What a plan records (``Plan.predicted_latency``): its ms, the full model's, and the key."""
        return {
            "ms": round(self.predict_ms(skip_sets), 4),
            "full_ms": round(self.full_ms(len(skip_sets)), 4),
            "key": {k: self.key[k] for k in ("backend", "precision", "batch", "threads", "cpu")},
        }

    def describe(self) -> str:
        k = self.key
        return f"{k['backend']} {k['precision']}, batch {k['batch']}, {k['threads']} thread(s), {k['cpu']}"

    def to_json(self) -> dict:
        return {
            "format": LATENCY_FORMAT,
            "version": LATENCY_VERSION,
            "key": self.key,
            "request_ms": self.request_ms,
            "fixed_ms": self.fixed_ms,
            "layer_ms": dict(self.layer_ms),
            "reuse_ms": self.reuse_ms,
            "measured": dict(self.measured),
        }

    @classmethod
    def from_json(cls, d, key: dict, layer_ids: Sequence[str]) -> Optional["LatencyTable"]:
        """The table in ``d`` if it is one for ``key`` and these layers, every value a finite ms >= 0; else None."""
        if not isinstance(d, dict) or d.get("format") != LATENCY_FORMAT or d.get("version") != LATENCY_VERSION:
            return None
        if d.get("key") != key:
            return None
        layers = d.get("layer_ms")
        if not isinstance(layers, dict) or sorted(layers) != sorted(layer_ids):
            return None
        values = [d.get("request_ms"), d.get("fixed_ms"), d.get("reuse_ms"), *layers.values()]
        if not all(_is_ms(v) for v in values):
            return None
        measured = d.get("measured") if isinstance(d.get("measured"), dict) else {}
        return cls(dict(key), float(d["request_ms"]), float(d["fixed_ms"]),
                   {lid: float(layers[lid]) for lid in layer_ids}, measured, float(d["reuse_ms"]))


def _is_ms(v) -> bool:
    # a step of a diffusion model under an hour: anything else in the file is damage or a hostile edit
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v < 3.6e6


def cache_path(cache_dir, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"latency-{key['backend']}-{key['precision']}-{digest}.json"


def load_or_measure(
    model,
    key: dict,
    cache_dir,
    measure: Optional[Callable] = None,
    progress: bool = True,
) -> LatencyTable:
    """The cached table for ``key`` (every field equal), else a new measurement (``measure(model, key)``,
    default :func:`measure_table`) written there atomically. A damaged or foreign file is measured again
    and replaced, with a warning; an unwritable cache only costs the next search a measurement."""
    from autodiffusion_rt.records import read_json

    measure = measure or (lambda m, k: measure_table(m, k, progress=progress))
    layer_ids = [layer.id for layer in model.unet.layers]
    path = cache_path(cache_dir, key)
    if path.exists():
        try:
            table = LatencyTable.from_json(read_json(path, SearchError), key, layer_ids)
            why = "not a latency table for this key and model"
        except (OSError, SearchError) as e:
            table, why = None, str(e).splitlines()[0] if str(e) else type(e).__name__
        if table is not None:
            return table
        warnings.warn(f"latency table {path} is unusable ({why}): measuring again", stacklevel=2)
    table = measure(model, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, table.to_json())
    except OSError as e:
        warnings.warn(f"cannot cache the latency table at {path} ({e.strerror or e}): it is measured again next time",
                      stacklevel=2)
    return table


def measurement_plan(model):
    """The full model, each skippable layer skipped alone, then all of them: L + 2 steps (their timesteps do not
    matter)."""
    from autodiffusion_rt.plan import Plan

    ids = [layer.id for layer in model.unet.layers]
    skips = [()] + [(lid,) for lid in ids] + [tuple(ids)]
    step = max(1, (model.num_timesteps - 1) // max(1, len(skips)))
    timesteps = [model.num_timesteps - 1 - k * step for k in range(len(skips))]
    return Plan.for_model(model, timesteps, "ddim", 0.0, skips, provenance={"tool": "search.latency"})


def measure_table(model, key: dict, rounds: int = ROUNDS, progress: bool = True) -> LatencyTable:
    """Build the measurement plan's engines (``key``'s backend, precision and batch) and time them (see the module
    docstring)."""
    from autodiffusion_rt.runtime import Runtime

    start = time.perf_counter()
    plan = measurement_plan(model)
    if progress:
        print(f"measuring the latency table ({key['backend']} {key['precision']}, batch {key['batch']}, "
              f"{key['threads']} thread(s)): {plan.nfe} subnetworks", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="adrt-latency-") as d:
        if key["backend"] == "torch":
            rt = Runtime.from_plan(plan, model=model, batch_size=key["batch"])
        else:
            from export.build import build_engines

            build_engines(plan, d, model=model, backend=key["backend"], precision=key["precision"],
                          max_batch=key["batch"], fid_reference=None, progress=False)
            rt = Runtime.load(d, threads=key["threads"])
        built = time.perf_counter() - start
        with rt:
            step_ms, request_ms, repeat_ms = time_steps(rt, key["batch"], rounds, key["threads"])
    layer_ids = [layer.id for layer in model.unet.layers]  # the measurement plan's steps 1..L skip these, in order
    return table_from_rounds(key, layer_ids, step_ms, request_ms, {
        "rounds": rounds, "build_seconds": round(built, 1), "seconds": round(time.perf_counter() - start, 1),
    }, repeat_ms)


def time_steps(rt, batch: int, rounds: int, threads: int) -> tuple[list, list, list]:
    """(ms of each step in each round as the runtime walks them, ms of a whole request ``rt.sample(batch)`` in
    each round, ms of step 0 run again right after itself in each round).

    Each round walks every step once in the runtime's order (its engine on the runtime's own bound buffers,
    then the NaN check it runs; step 0 twice), then samples one whole request; ``rounds`` rounds after
    :data:`WARMUP_ROUNDS` untimed ones. Rounds keep the steps' timings paired: a load that comes and goes moves
    a whole round.
    """
    import torch

    from autodiffusion_rt.sampling import check_finite
    from benchmark import _times  # the project's one timer: benchmark.py's

    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the torch fallback's and the sampler update's threads
    try:
        rt.sample(batch)  # fills the workspace's buffers with a real trajectory
        steps = rt._workspace(batch)["steps"]  # the bound steps Runtime.sample walks
        per_step: list[list[float]] = [[] for _ in steps]
        requests: list[float] = []
        repeats: list[float] = []

        def run(st) -> float:
            return _times(lambda: (st.run(), check_finite(st.output, st.index, 0, st.name)), 1, 0)[0]

        for r in range(WARMUP_ROUNDS + rounds):
            walk = [run(st) for st in steps[:1]] + [run(steps[0])] + [run(st) for st in steps[1:]]
            request = _times(lambda: rt.sample(batch), 1, 0)[0]
            if r >= WARMUP_ROUNDS:
                for k, ms in enumerate([walk[0], *walk[2:]]):
                    per_step[k].append(ms)
                repeats.append(walk[1])
                requests.append(request)
    finally:
        torch.set_num_threads(before)
    return per_step, requests, repeats


def table_from_rounds(key: dict, layer_ids: Sequence[str], step_ms: Sequence[Sequence[float]],
                      request_ms: Sequence[float], info: dict, repeat_ms: Optional[Sequence[float]] = None
                      ) -> LatencyTable:
    """The table from the measurement walk's rounds (step 0: the full model; step 1 + k: layer k skipped alone;
    the last: every layer skipped; ``repeat_ms``: step 0 right after itself), every difference paired within its
    round: each step is the full step minus the median of its paired saving; the request overhead is the median
    of the request minus the sum of that round's steps; the reuse saving the median of step 0 minus its repeat."""
    full = statistics.median(step_ms[0])
    steps = [full] + [full - statistics.median(a - b for a, b in zip(step_ms[0], ms)) for ms in step_ms[1:]]
    overhead = statistics.median(r - sum(walk) for r, walk in zip(request_ms, zip(*step_ms)))
    reuse = statistics.median(a - b for a, b in zip(step_ms[0], repeat_ms)) if repeat_ms else 0.0
    return table_from_medians(key, layer_ids, steps, overhead, {
        **info, "step_ms_rounds": [[round(x, 4) for x in ms] for ms in step_ms],
        "request_ms_rounds": [round(x, 4) for x in request_ms],
        "repeat_ms_rounds": [round(x, 4) for x in repeat_ms or ()],
    }, reuse)


def table_from_medians(key: dict, layer_ids: Sequence[str], step_ms: Sequence[float], overhead_ms: float,
                       info: dict, reuse_ms: float = 0.0) -> LatencyTable:
    """The table from the full step (``step_ms[0]``), each step with layer k skipped alone (``step_ms[1 + k]``),
    the step with every layer skipped (``step_ms[-1]``: the fixed part), the request's own overhead and the reuse
    saving, each in ms. The layers' savings (clamped at 0) are scaled to add up to the full step minus the fixed
    part (see the module docstring); evenly when no single skip saves anything measurable."""
    full = float(step_ms[0])
    fixed = min(max(0.0, float(step_ms[-1])), full)
    savings = {lid: max(0.0, full - float(ms)) for lid, ms in zip(layer_ids, step_ms[1:-1])}
    total = sum(savings.values())
    if total == 0.0 and savings:  # no single skip saves measurably (layers within the timer's noise): the
        savings, total = dict.fromkeys(savings, 1.0), float(len(savings))  # all-skipped step's saving, evenly
    costs = {lid: (x * (full - fixed) / total if total else 0.0) for lid, x in savings.items()}
    measured = {
        **info, "full_step_ms": full, "all_skipped_step_ms": float(step_ms[-1]),
        "single_skip_step_ms": dict(zip(layer_ids, map(float, step_ms[1:-1]))),
    }
    return LatencyTable(dict(key), max(0.0, float(overhead_ms)), fixed, costs, measured,
                        min(max(0.0, float(reuse_ms)), full))


def latency_rows(table: Optional[LatencyTable], rows) -> Optional[dict]:
    """The report's latency section: the table's key and each (method, sampler, candidate) row's prediction."""
    if table is None:
        return None
    return {
        **table.record([()]),
        "rows": [{"method": m, "sampler": s, "predicted_ms": round(table.predict_ms(c.skip), 3)} for m, s, c in rows],
    }
