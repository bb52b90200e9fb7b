"""The plan: everything needed to reproduce a searched sampler, nothing else.

``plan.json`` is the one contract between search, build and run::

    {
      "format": "autodiffusion-rt-plan", "version": 2,
      "model":    {"spec", "name", "config", "fingerprint"},
      "sampler":  {"kind": "ddim" | "ddpm" | "dpmpp_2m" | "ipndm" | "unipc" | "unipc3", "eta": float,
                   "clip_denoised": bool,       # x0 clipped to [-1, 1] at every step
                   "noise": "per-sample-v1"},   # the draw order (diffusion/noise.py)
      "timesteps": [int, ...],            # strictly descending, in [0, T)
      "skip":     [[layer id, ...], ...],  # layers skipped at each step
      "fitness":  null | {"fid", "extractor", "num_samples", "seed", "reference"},
      "compute":  {"macs_per_sample", "full_macs_per_sample",
                   "predicted_latency_ms"?, "full_predicted_latency_ms"?,   # optional: search/latency.py's
                   "latency_key"?: {"backend", "precision", "batch", "threads", "cpu"}},  # prediction, its table's key
      "provenance": {...}                  # free-form: search settings, wall time, versions
    }

Loading validates every field and names the first bad one; saving is atomic.
A plan without the optional latency fields (made before they existed, or with
``--compute macs``) loads, and saves byte-for-byte as before.
Version 1 plans (before ``clip_denoised`` and ``noise`` were recorded) still
load: they were made with x0 clipping on, and their stochastic steps now draw
in the per-sample order (deterministic samplers give the same images).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .diffusion import DRAW_ORDER, SAMPLERS, compute_coefficients, validate_timesteps
from .errors import Error, PlanError
from .records import read_json
from .utils import path_error, write_json

PLAN_FORMAT = "autodiffusion-rt-plan"
PLAN_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Fitness:
    fid: float
    extractor: str
    num_samples: int
    seed: int
    reference: str


@dataclass(frozen=True)
class PredictedLatency:
    """A plan's per-request latency as search/latency.py's table predicts it, the full model's, and the table's key
    (backend, precision, batch, threads, cpu): the ms hold only on engines built for that key."""

    ms: float
    full_ms: float
    key: dict


LATENCY_KEY_FIELDS = {"backend": str, "precision": str, "batch": int, "threads": int, "cpu": str}


@dataclass(frozen=True)
class Plan:
    model_spec: str
    model_name: str
    model_config: dict
    model_fingerprint: str
    sampler: str
    eta: float
    timesteps: tuple[int, ...]
    skip: tuple[tuple[str, ...], ...]
    macs_per_sample: int
    full_macs_per_sample: int
    fitness: Optional[Fitness] = None
    provenance: dict = field(default_factory=dict)
    clip_denoised: bool = True
    noise: str = DRAW_ORDER
    predicted_latency: Optional[PredictedLatency] = None

    # ------------------------------------------------------------- construction
    @classmethod
    def for_model(
        cls,
        model,
        timesteps: Sequence[int],
        sampler: str = "ddim",
        eta: float = 0.0,
        skip: Optional[Sequence[Sequence[str]]] = None,
        spec: Optional[str] = None,
        fitness: Optional[Fitness] = None,
        provenance: Optional[dict] = None,
        clip_denoised: bool = True,
        predicted_latency: Optional[PredictedLatency] = None,
    ) -> "Plan":
        """A plan for ``model`` (a DiffusionModel); MACs come from its layer registry."""
        ts = tuple(validate_timesteps(timesteps, model.num_timesteps))
        skip = tuple(tuple(sorted(s)) for s in (skip if skip is not None else [()] * len(ts)))
        for i, s in enumerate(skip):
            if len(set(s)) != len(s):
                raise PlanError(f"skip[{i}] lists a layer twice: {list(s)}; give each skipped layer once")
        if len(skip) != len(ts):
            raise PlanError(f"skip has {len(skip)} entries for {len(ts)} timesteps: give one skip set per step")
        all_ids = model.unet.layer_ids
        macs = sum(model.unet.macs(all_ids - set(s)) for s in skip)
        plan = cls(
            model_spec=spec or model.name,
            model_name=model.name,
            model_config=_jsonable(model.config),
            model_fingerprint=model.fingerprint,
            sampler=sampler,
            eta=float(eta),
            timesteps=ts,
            skip=skip,
            macs_per_sample=int(macs),
            full_macs_per_sample=int(model.unet.macs() * len(ts)),
            fitness=fitness,
            provenance=dict(provenance or {}),
            clip_denoised=bool(clip_denoised),
            predicted_latency=predicted_latency,
        )
        plan.check_model(model)
        return plan

    # ------------------------------------------------------------------ queries
    @property
    def nfe(self) -> int:
        return len(self.timesteps)

    def coefficients(self, schedule):
        """The sampler's per-step constants over this plan's timesteps, for ``schedule``."""
        diffusion = self.model_config.get("diffusion") if isinstance(self.model_config, dict) else None
        learned = bool(isinstance(diffusion, dict) and diffusion.get("learn_sigma", False))
        return compute_coefficients(self.sampler, schedule, self.timesteps, self.eta, self.clip_denoised, learned)

    def sha256(self) -> str:
        """sha256 of the plan's canonical JSON (sorted keys, no spaces): its identity in an engine dir."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def keep_sets(self, model) -> list[frozenset[str]]:
        """The layer ids that run at each step.

        The one place ``skip`` becomes ``keep``: plan.json stores what each step skips (short, and readable
        beside the layer table); everything downstream (the UNet, the exporter, the engines) takes the kept set.
        """
        self.check_model(model)
        return [frozenset(model.unet.layer_ids - set(s)) for s in self.skip]

    def check_model(self, model) -> None:
        """Refuse a model whose weights or layers differ from the ones this plan was made for."""
        if model.fingerprint != self.model_fingerprint:
            raise PlanError(
                f"the plan was made for weights {self.model_fingerprint[:12]}... ({self.model_spec}) but the model "
                f"{model.name} has {model.fingerprint[:12]}...: load the model the plan was searched on"
            )
        where = _first_difference(self.model_config, _jsonable(model.config), "model.config")
        if where is not None:
            field_name, ours, theirs = where
            raise PlanError(
                f"the plan's {field_name} is {ours!r} but {model.name} has {theirs!r}: the plan was edited or made for "
                "another model; restore the plan or search again for this model (its timesteps were chosen for "
                f"{ours!r}, so it cannot simply be rebuilt)"
            )
        unknown = sorted({i for s in self.skip for i in s} - model.unet.layer_ids)
        if unknown:
            raise PlanError(f"the plan skips unknown layer id(s) {unknown[:5]} for {model.name}")
        validate_timesteps(self.timesteps, model.num_timesteps)

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {
                "spec": self.model_spec,
                "name": self.model_name,
                "config": self.model_config,
                "fingerprint": self.model_fingerprint,
            },
            "sampler": {
                "kind": self.sampler,
                "eta": self.eta,
                "clip_denoised": self.clip_denoised,
                "noise": self.noise,
            },
            "timesteps": list(self.timesteps),
            "skip": [list(s) for s in self.skip],
            "fitness": asdict(self.fitness) if self.fitness else None,
            "compute": self._compute_dict(),
            "provenance": self.provenance,
        }

    def _compute_dict(self) -> dict:
        compute = {"macs_per_sample": self.macs_per_sample, "full_macs_per_sample": self.full_macs_per_sample}
        if self.predicted_latency is not None:  # absent: the dict (and the plan's sha256) as before the field
            lat = self.predicted_latency
            compute.update(predicted_latency_ms=lat.ms, full_predicted_latency_ms=lat.full_ms, latency_key=lat.key)
        return compute

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, self.to_dict())
        except OSError as e:
            raise PlanError(path_error(e, path, "save the plan to a writable path with free space")) from None
        return path

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> "Plan":
        v = _Validator(source)
        v.check(isinstance(d, dict), "", "the plan must be a JSON object")
        v.check(d.get("format") == PLAN_FORMAT, "format", f"must be {PLAN_FORMAT!r}, got {d.get('format')!r}")
        v.check(
            d.get("version") in READABLE_VERSIONS,
            "version",
            f"must be one of {list(READABLE_VERSIONS)} (what this autodiffusion-rt reads), got {d.get('version')!r}",
        )
        model = v.obj(d, "model")
        for key in ("spec", "name", "fingerprint"):
            v.check(isinstance(model.get(key), str) and model.get(key), f"model.{key}", "must be a non-empty string")
        v.check(isinstance(model.get("config"), dict), "model.config", "must be an object")
        sampler = v.obj(d, "sampler")
        v.check(
            sampler.get("kind") in SAMPLERS,
            "sampler.kind",
            f"must be one of {list(SAMPLERS)}, got {sampler.get('kind')!r}",
        )
        eta = sampler.get("eta", 0.0)
        v.check(_is_real(eta) and 0.0 <= eta <= 1.0, "sampler.eta", f"must be a number in [0, 1], got {eta!r}")
        old = d.get("version") == 1
        clip = sampler.get("clip_denoised", True if old else None)
        v.check(isinstance(clip, bool), "sampler.clip_denoised", f"must be true or false, got {clip!r}")
        noise = sampler.get("noise", DRAW_ORDER if old else None)
        v.check(
            noise == DRAW_ORDER,
            "sampler.noise",
            f"must be {DRAW_ORDER!r} (the draw order this autodiffusion-rt implements), got {noise!r}",
        )
        ts = v.timesteps(d, model["config"])
        skip = v.skip(d, len(ts))
        compute = v.compute(d)
        predicted = v.predicted_latency(compute)
        fitness = v.fitness(d)
        prov = d.get("provenance", {})
        v.check(isinstance(prov, dict), "provenance", "must be an object")
        return cls(
            model_spec=model["spec"],
            model_name=model["name"],
            model_config=model["config"],
            model_fingerprint=model["fingerprint"],
            sampler=sampler["kind"],
            eta=float(eta),
            timesteps=tuple(int(t) for t in ts),
            skip=tuple(tuple(s) for s in skip),
            macs_per_sample=int(compute["macs_per_sample"]),
            full_macs_per_sample=int(compute["full_macs_per_sample"]),
            fitness=fitness,
            provenance=prov,
            clip_denoised=clip,
            noise=noise,
            predicted_latency=predicted,
        )

    @classmethod
    def load(cls, path: "str | Path | Plan") -> "Plan":
        """Read and validate a plan.json (data only); a Plan passes through, so every API takes either."""
        if isinstance(path, Plan):
            return path
        if not isinstance(path, (str, os.PathLike)):
            raise PlanError(
                f"expected a Plan or the path of a plan.json, got {type(path).__name__}: load it with Plan.load(path)"
            )
        path = Path(path)
        if path.is_dir():
            hint = (
                " (an engine dir: its plan is in manifest.json; pass the dir as --engines)"
                if (path / "manifest.json").is_file()
                else ""
            )
            raise PlanError(f"plan {path} is a directory, not a plan file{hint}: pass the plan.json the search wrote")
        if not path.is_file():
            raise PlanError(
                f"plan file not found: {path}: pass the plan.json the search wrote (python -m search.run --out PATH)"
            )
        try:
            # data only: a plan file can never run code
            d = read_json(path, PlanError, "was it truncated? re-run the search or restore it")
        except OSError as e:
            raise PlanError(path_error(e, path, "check the file's permissions", action="read")) from None
        return cls.from_dict(d, str(path))


class _Validator:
    """Checks a plan dict's fields one by one; the first bad one is a PlanError naming it."""

    def __init__(self, source: str):
        self.source = source

    def check(self, ok: bool, where: str, message: str) -> None:
        if not ok:
            raise PlanError(f"{self.source}: field {where!r} {message}" if where else f"{self.source}: {message}")

    def obj(self, d: dict, key: str) -> dict:
        self.check(isinstance(d.get(key), dict), key, f"must be an object, got {type(d.get(key)).__name__}")
        return d[key]

    def timesteps(self, d: dict, config: dict) -> list:
        """The plan's timesteps: integers, valid for the model's T (its config's diffusion_steps, else 1000)."""
        ts = d.get("timesteps")
        self.check(
            isinstance(ts, list) and all(_is_int(t) for t in ts), "timesteps", f"must be a list of integers, got {ts!r}"
        )
        T = (
            config.get("diffusion", {}).get("diffusion_steps", 1000)
            if isinstance(config.get("diffusion"), dict)
            else 1000
        )
        try:
            validate_timesteps(ts, T)
        except Error as e:
            raise PlanError(f"{self.source}: field 'timesteps': {e}") from None
        return ts

    def skip(self, d: dict, num_steps: int) -> list:
        """The layers skipped at each step: one list of distinct layer ids per timestep."""
        skip = d.get("skip")
        self.check(
            isinstance(skip, list) and all(isinstance(s, list) and all(isinstance(i, str) for i in s) for s in skip),
            "skip",
            "must be a list (one per step) of lists of layer ids",
        )
        self.check(len(skip) == num_steps, "skip", f"has {len(skip)} entries for {num_steps} timesteps")
        for i, s in enumerate(skip):
            self.check(len(set(s)) == len(s), f"skip[{i}]", f"lists a layer twice: {s}")
        return skip

    def compute(self, d: dict) -> dict:
        """The plan's MACs per sample, and the full model's: positive integers."""
        compute = self.obj(d, "compute")
        for key in ("macs_per_sample", "full_macs_per_sample"):
            self.check(
                _is_int(compute.get(key)) and compute.get(key) > 0,
                f"compute.{key}",
                f"must be a positive integer, got {compute.get(key)!r}",
            )
        return compute

    def fitness(self, d: dict) -> Optional[Fitness]:
        """The searched FID and how it was measured (null: not measured)."""
        if d.get("fitness") is None:
            return None
        fd = self.obj(d, "fitness")
        self.check(
            _is_real(fd.get("fid")) and math.isfinite(fd["fid"]) and fd["fid"] >= 0,
            "fitness.fid",
            f"must be a finite number >= 0, got {fd.get('fid')!r}",
        )
        self.check(isinstance(fd.get("extractor"), str), "fitness.extractor", "must be a string")
        self.check(
            _is_int(fd.get("num_samples")) and fd["num_samples"] > 0,
            "fitness.num_samples",
            "must be a positive integer",
        )
        self.check(_is_int(fd.get("seed")), "fitness.seed", "must be an integer")
        self.check(isinstance(fd.get("reference"), str), "fitness.reference", "must be a string")
        return Fitness(float(fd["fid"]), fd["extractor"], int(fd["num_samples"]), int(fd["seed"]), fd["reference"])

    def predicted_latency(self, compute: dict) -> Optional[PredictedLatency]:
        """compute's optional latency fields (all three, or none), each checked."""
        names = ("predicted_latency_ms", "full_predicted_latency_ms", "latency_key")
        if all(compute.get(k) is None for k in names):
            return None
        for k in names[:2]:
            x = compute.get(k)
            self.check(
                _is_real(x) and math.isfinite(x) and x > 0, f"compute.{k}", f"must be a positive number, got {x!r}"
            )
        key = compute.get("latency_key")
        self.check(isinstance(key, dict) and set(key) == set(LATENCY_KEY_FIELDS), "compute.latency_key",
                f"must be an object with exactly {', '.join(LATENCY_KEY_FIELDS)}")
        for k, kind in LATENCY_KEY_FIELDS.items():
            ok = _is_int(key[k]) and key[k] > 0 if kind is int else isinstance(key[k], str) and key[k]
            self.check(ok, f"compute.latency_key.{k}", f"must be a {'positive integer' if kind is int else 'string'}")
        return PredictedLatency(float(compute[names[0]]), float(compute[names[1]]), dict(key))


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _first_difference(a, b, where: str):
    """(field, a's value, b's value) of the first place two JSON values differ; None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}.{key}", a.get(key, "<missing>"), b.get(key, "<missing>")
            d = _first_difference(a[key], b[key], f"{where}.{key}")
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}[{i}]")
            if d is not None:
                return d
        return None
    same = a == b and type(a) is type(b) or (_is_real(a) and _is_real(b) and a == b)
    return None if same else (where, a, b)


def _jsonable(x):
    return json.loads(json.dumps(x, default=list))
