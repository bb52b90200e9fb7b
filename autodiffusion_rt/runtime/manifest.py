"""The engine dir's ``manifest.json``: the one place it is written, read and checked.

``autodiffusion-rt build`` (:mod:`export.build`) makes a :class:`Manifest` with
:meth:`Manifest.new` and writes it last, atomically; :class:`~autodiffusion_rt.runtime.Runtime`
reads it with :meth:`Manifest.read` and checks it against its plan with
:meth:`Manifest.check_plan` before loading a single engine. Format
``autodiffusion-rt-engines`` v1::

    {
      "format": "autodiffusion-rt-engines", "version": 1, "complete": true,
      "created": ISO time, "backend": "onnxruntime" | "openvino" | "tensorrt",
      "precision": "fp32" | "fp16" | "int8" | "bf16", "batch": {"min": 1, "opt": int, "max": int},
      "opset": int, "simplify": bool, "label_mode": null | "table" | "graph",
      "plan": {plan.json}, "plan_sha256": Plan.sha256(),
      "model": {"spec", "name", "fingerprint", "image_shape", "num_classes", "learn_sigma", "prediction_type"},
      "versions": {"autodiffusion_rt", "torch", "onnx", "onnxruntime", "openvino", "tensorrt", "compute_capability"},
      "int8": {"fid_fp32", "limit", "steps": [{"int8", "fid"}], "samples", ...},   # int8 builds only
      "bf16": {"checked": bool, "fid_fp32", "limit", "steps": [...], "samples", "seed", "extractor"} # openvino bf16
      "embeddings": {"file", "sha256"},        # openvino: embeddings.npz, each step's time embedding + the labels'

      "weights": "embedded" | "stripped",       # tensorrt builds: stripped engines are refitted from onnx/ at load
      "steps": [{
        "index", "timestep", "skip": [layer ids], "coefficients": {StepCoefficients fields},
        "precision",                           # int8 / bf16 builds: the low precision for the steps that passed
                                               # the FID check, fp32 for the others
        "subnet",                              # openvino: the index of the step's shared subnetwork
        "macs_per_sample",                     # the registry's MACs of the kept subnetwork
        "label_mode",
        "inputs": [{"name", "dtype", "shape"}], "outputs": [...],   # "batch" = dynamic dim (diffusion.step_io)
        "onnx":   {"file", "sha256", "bytes", "key", "nodes", "macs_per_sample", "max_abs_diff", "seconds", ...},
        "engine": {"file", "sha256", "bytes", "record": {...}, "seconds"}
      }, ...]
    }

An openvino dir's steps share files: the steps that skip the same layers
name the same subnetwork ONNX file and compiled blob (one per precision).
File paths are relative to the dir. ``onnx.key`` and ``engine.record`` hold
what decides reuse (:mod:`export.cache`); the exporter rebuilds a step whose
key or record differs.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..diffusion import SamplerCoefficients, StepCoefficients
from ..diffusion.step_io import TensorSpec, step_tensors
from ..errors import EngineError, PlanError
from ..limits import check_limit
from ..plan import Plan
from ..records import loads_json, read_json, schema, validate
from ..registry import BUILD_PRECISIONS
from ..utils import sha256_file, write_json
from .platform import library_versions

__all__ = [
    "ENGINE_BACKENDS",
    "ENGINE_PRECISIONS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "Manifest",
    "library_versions",
    "model_entry",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "autodiffusion-rt-engines"
MANIFEST_VERSION = 1
#: The backends an engine dir is built for, and the precisions its engines run at.
ENGINE_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
ENGINE_PRECISIONS = BUILD_PRECISIONS  # what build writes is what a manifest may say
#: The fields that change how the engines run and are not re-derived from the plan or the engine files:
#: covered by the manifest's own hash (``settings_sha256``), so an edit is refused, never obeyed.
HASHED = ("backend", "precision", "batch", "opset", "label_mode", "model", "weights")
SETTINGS_HASH = "settings_sha256"


def settings_sha256(data: Mapping) -> str:
    """sha256 of the manifest's :data:`HASHED` fields (canonical JSON)."""
    import hashlib

    text = json.dumps({k: data.get(k) for k in HASHED}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def model_entry(model, spec: str) -> dict:
    """The manifest's ``model``: what sampling needs to know when only engines are loaded, and the model's identity."""
    return {
        "spec": spec,
        "name": model.name,
        "fingerprint": model.fingerprint,
        "image_shape": list(model.image_shape),
        "num_classes": model.num_classes,
        "learn_sigma": bool(model.learn_sigma),
        "prediction_type": model.prediction_type,
    }


class Manifest(Mapping):
    """An engine dir's manifest: read-only mapping access to its JSON object, plus writing and checks."""

    def __init__(self, engine_dir, data: dict):
        self.engine_dir = Path(engine_dir)
        self.data = data

    @property
    def path(self) -> Path:
        return self.engine_dir / MANIFEST_NAME

    # Mapping: ``manifest["steps"]`` reads the JSON object.
    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return (
            f"Manifest({str(self.engine_dir)!r}, {self.data.get('backend')}, {len(self.data.get('steps') or [])} steps)"
        )

    # ------------------------------------------------------------ writing
    @classmethod
    def new(
        cls,
        engine_dir,
        *,
        plan: Plan,
        model,
        backend: str,
        precision: str,
        batch: dict,
        opset: int,
        simplify: bool,
        label_mode: Optional[str],
        versions: dict,
        steps: list,
        int8: Optional[dict] = None,
        weights: Optional[str] = None,
        bf16: Optional[dict] = None,
        embeddings: Optional[dict] = None,
    ) -> "Manifest":
        """A complete manifest for ``steps`` (built by :func:`export.build.build_engines`), as JSON data.

        ``weights``: TensorRT's "embedded" or "stripped" (refitted from the steps' ONNX files at load).
        """
        data = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "complete": True,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backend": backend,
            "precision": precision,
            "batch": batch,
            "opset": opset,
            "simplify": bool(simplify),
            "label_mode": label_mode,
            "plan": plan.to_dict(),
            "plan_sha256": plan.sha256(),
            "model": model_entry(model, plan.model_spec),
            "versions": versions,
            "steps": steps,
        }
        if weights is not None:
            data["weights"] = weights
        for key, value in (("int8", int8), ("bf16", bf16), ("embeddings", embeddings)):
            if value is not None:
                data[key] = value
        data = json.loads(json.dumps(data))
        data[SETTINGS_HASH] = settings_sha256(data)
        return cls(engine_dir, data)

    def same_build(self, other: Optional["Manifest"]) -> bool:
        """Whether ``other`` records the same build (everything but the creation time)."""
        if other is None:
            return False
        return {k: v for k, v in self.data.items() if k != "created"} == {
            k: v for k, v in other.data.items() if k != "created"
        }

    def write(self) -> None:
        """Write ``DIR/manifest.json`` atomically (a reader sees the old manifest or the new one, never half of one)."""
        write_json(self.path, self.data)

    # ------------------------------------------------------------ reading
    @classmethod
    def previous(cls, engine_dir) -> Optional["Manifest"]:
        """The manifest a previous build left, for reusing its files; None (with a warning when unreadable)
        if there is none."""
        path = Path(engine_dir) / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            m = loads_json(path.read_bytes())
            if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or m.get("version") != MANIFEST_VERSION:
                raise ValueError(f"not a version-{MANIFEST_VERSION} engine manifest")
            if not isinstance(m.get("steps"), list):
                raise ValueError("no steps")
            return cls(engine_dir, m)
        except (OSError, ValueError) as e:
            warnings.warn(f"{path} is unreadable ({e}); rebuilding every step")
            return None

    @classmethod
    def read(cls, engine_dir) -> "Manifest":
        """Read ``DIR/manifest.json`` and check its shape (not the files it names; see :meth:`check_plan`)."""
        engine_dir = Path(engine_dir)
        path = engine_dir / MANIFEST_NAME
        rebuild = f"rebuild with 'autodiffusion-rt build PLAN --out {engine_dir}'"
        if not engine_dir.is_dir():
            raise EngineError(
                f"engine dir {engine_dir} does not exist: "
                f"build it with 'autodiffusion-rt build PLAN --out {engine_dir}'"
            )
        if not path.is_file():
            raise EngineError(
                f"{path} is missing: {engine_dir} is not an engine dir, or its build did not finish; "
                f"run 'autodiffusion-rt build PLAN --out {engine_dir}'"
            )
        try:
            m = read_json(path, EngineError, f"it is corrupted; {rebuild}")
        except OSError as e:
            raise EngineError(f"cannot read {path}: {e.strerror or e}; check its permissions") from None

        def bad(field: str, why: str):
            raise EngineError(f"{path}: field {field!r} {why}; {rebuild}")

        _check_header(m, bad)
        model = validate(schema("ManifestModel"), m["model"], f"{path} (model)", EngineError, rebuild)
        if m.get(SETTINGS_HASH) != settings_sha256(m):
            bad(SETTINGS_HASH, f"does not match the manifest's settings ({', '.join(HASHED)}): edited by hand?")
        check_limit("batch", m["batch"]["max"], "batch.max", str(path), EngineError)
        for side in model.image_shape[1:]:
            check_limit("image_size", side, "model.image_shape", str(path), EngineError)
        if min(model.image_shape) < 1:
            bad("model.image_shape", f"must be 3 positive integers [C, H, W], got {model.image_shape}")
        if not isinstance(m.get("steps"), list) or not m["steps"]:
            bad("steps", "must be a non-empty list")
        for i, step in enumerate(m["steps"]):
            _check_step(step, f"steps[{i}]", bad)
        return cls(engine_dir, m)

    # ------------------------------------------------------------ checks
    def check_plan(self, expected: Optional[Plan] = None) -> tuple[Plan, SamplerCoefficients]:
        """The manifest's plan and its coefficients, checked against its hash, its steps, and the caller's plan."""
        m, path = self.data, self.path
        try:
            plan = Plan.from_dict(m["plan"], f"{path} (plan)")
        except PlanError as e:
            raise EngineError(f"{e}; rebuild the engine dir") from None
        rebuild = f"rebuild with 'autodiffusion-rt build PLAN --out {self.engine_dir}'"
        if m.get("plan_sha256") != plan.sha256():
            raise EngineError(
                f"{path}: the manifest does not match its plan (plan_sha256 differs: edited by hand?); {rebuild}"
            )
        if expected is not None and expected.sha256() != plan.sha256():
            raise EngineError(
                f"{path} was built from a different plan (timesteps {list(plan.timesteps)}, "
                f"sampler {plan.sampler}) than the "
                f"one given (timesteps {list(expected.timesteps)}, sampler {expected.sampler}); {rebuild}"
            )
        model = m["model"]
        if model.get("fingerprint") != plan.model_fingerprint:
            raise EngineError(
                f"{path}: model fingerprint {str(model.get('fingerprint'))[:12]}... "
                f"does not match the plan's; {rebuild}"
            )
        if len(m["steps"]) != plan.nfe:
            raise EngineError(
                f"{path}: the manifest has {len(m['steps'])} steps but its plan has {plan.nfe} timesteps; {rebuild}"
            )
        coeffs = _plan_coefficients(plan)
        image_shape = tuple(model.get("image_shape") or ())
        if len(image_shape) != 3:
            raise EngineError(
                f"{path}: model.image_shape must be [C, H, W], got {model.get('image_shape')!r}; {rebuild}"
            )
        conditional = model.get("num_classes") is not None
        for i, step in enumerate(m["steps"]):
            if (
                step.get("index") != i
                or step.get("timestep") != plan.timesteps[i]
                or sorted(step["skip"]) != sorted(plan.skip[i])
            ):
                raise EngineError(
                    f"{path}: step {i} (timestep {step.get('timestep')}, skip {step.get('skip')}) "
                    "does not match the plan's "
                    f"(timestep {plan.timesteps[i]}, skip {list(plan.skip[i])}); {rebuild}"
                )
            _check_coefficients(step["coefficients"], coeffs.row(i), f"{path}: step {i}", rebuild)
            ins, outs = step_tensors(coeffs, i, image_shape, conditional)
            try:
                got_in = tuple(TensorSpec.from_dict(d) for d in step["inputs"])
                got_out = tuple(TensorSpec.from_dict(d) for d in step["outputs"])
            except (KeyError, TypeError):
                raise EngineError(f"{path}: step {i} inputs/outputs are malformed; {rebuild}") from None
            if got_in != ins or got_out != outs:
                raise EngineError(
                    f"{path}: step {i} inputs/outputs {got_in} -> {got_out} do not match the plan's sampler; {rebuild}"
                )
        return plan, coeffs

    def step_file(self, i: int, key: str) -> Path:
        """Step ``i``'s ``onnx`` or ``engine`` file, checked against its recorded sha256."""
        entry = self.data["steps"][i][key]
        what = f"step {i} {'engine' if key == 'engine' else 'ONNX'}"
        path = self.engine_dir / entry["file"]
        if not path.is_file():
            raise EngineError(
                f"{what} file {path} is missing; rebuild with 'autodiffusion-rt build PLAN --out {self.engine_dir}'"
            )
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise EngineError(
                f"{what} file {path} is corrupted or truncated "
                f"(sha256 {digest[:12]}... != recorded {entry['sha256'][:12]}...); "
                f"rebuild with 'autodiffusion-rt build PLAN --out {self.engine_dir}' "
                "(it rebuilds only the damaged steps)"
            )
        return path

    def embeddings(self) -> dict:
        """An openvino dir's ``time`` [steps, D] and ``label`` [K, D] embeddings, checked against their sha256
        and the plan."""
        entry = self.data.get("embeddings") or {}
        rebuild = f"rebuild with 'autodiffusion-rt build PLAN --out {self.engine_dir}'"
        path = self.engine_dir / str(entry.get("file"))
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            raise EngineError(f"{path} is missing or corrupted (sha256 mismatch); {rebuild}")
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as z:
                tables = {k: np.ascontiguousarray(z[k], dtype=np.float32) for k in z.files}
        except (OSError, ValueError) as e:
            raise EngineError(f"{path} is not a readable .npz ({e}); {rebuild}") from None
        time = tables.get("time")
        classes = self.data["model"].get("num_classes")
        if time is None or time.ndim != 2 or time.shape[0] != len(self.data["steps"]):
            raise EngineError(f"{path}: 'time' must hold one embedding per step ({len(self.data['steps'])}); {rebuild}")
        label = tables.get("label")
        if (classes is None) != (label is None) or (label is not None and label.shape != (classes, time.shape[1])):
            raise EngineError(f"{path}: 'label' must be [{classes}, {time.shape[1]}] for this model; {rebuild}")
        return tables

    def check_version(self, key: str, installed: Any, what: Optional[str] = None) -> None:
        """Refuse engines built with another version of ``key`` (a library, or the GPU's compute capability)."""
        recorded = self.data["versions"].get(key)
        if recorded != installed:
            raise EngineError(
                f"{self.engine_dir} was built with {what or key} {recorded} but {installed} is installed: rebuild with "
                f"'autodiffusion-rt build PLAN --out {self.engine_dir}' (or install {what or key} {recorded})"
            )


def _plan_coefficients(plan: Plan) -> SamplerCoefficients:
    """The plan's sampler coefficients from the noise schedule its model config records (no weights needed)."""
    diffusion = plan.model_config.get("diffusion") if isinstance(plan.model_config, dict) else None
    if not isinstance(diffusion, dict) or "noise_schedule" not in diffusion:
        raise PlanError(
            "the plan's model.config has no 'diffusion' settings (noise_schedule, diffusion_steps): "
            "re-create the plan with Plan.for_model"
        )
    from ..models.loading import diffusion_schedule

    return plan.coefficients(diffusion_schedule(diffusion))


def _check_coefficients(recorded: dict, row: StepCoefficients, where: str, rebuild: str) -> None:
    """Every field of the step's row against the manifest's (a field a manifest lacks counts as its default)."""
    for name, want in row._asdict().items():
        got = recorded.get(name, StepCoefficients._field_defaults.get(name))
        if isinstance(want, bool):
            if got != want:
                raise EngineError(
                    f"{where} was built with {name}={got!r} but the sampler now uses {name}={want!r}; {rebuild}"
                )
        elif (
            isinstance(got, bool)
            or not isinstance(got, (int, float))
            or not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
        ):
            raise EngineError(
                f"{where} coefficient {name}={got!r} does not match the plan's sampler ({want!r}); {rebuild}"
            )


def _check_header(m, bad: Callable[[str, str], None]) -> None:
    """The manifest's header: format, version, completeness, backend, precision, batch range, the objects it holds."""
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        bad(
            "format",
            f"must be {MANIFEST_FORMAT!r}, got {m.get('format') if isinstance(m, dict) else type(m).__name__!r}",
        )
    if m.get("version") != MANIFEST_VERSION:
        bad(
            "version",
            f"must be {MANIFEST_VERSION} (this autodiffusion-rt reads version {MANIFEST_VERSION}), "
            f"got {m.get('version')!r}",
        )
    if m.get("complete") is not True:
        bad("complete", "is not true: the build did not finish")
    if m.get("backend") not in ENGINE_BACKENDS:
        bad("backend", f"must be one of {', '.join(ENGINE_BACKENDS)}, got {m.get('backend')!r}")
    if m.get("precision") not in ENGINE_PRECISIONS:
        bad("precision", f"must be one of {', '.join(ENGINE_PRECISIONS)}, got {m.get('precision')!r}")
    if m["backend"] == "openvino":
        emb = m.get("embeddings")
        if not (isinstance(emb, dict) and isinstance(emb.get("file"), str) and isinstance(emb.get("sha256"), str)):
            bad("embeddings", "must name the embeddings file and its sha256 (an openvino dir)")
    batch = m.get("batch")
    if not (
        isinstance(batch, dict)
        and all(isinstance(batch.get(k), int) and batch.get(k) >= 1 for k in ("min", "opt", "max"))
        and batch["min"] <= batch["opt"] <= batch["max"]
    ):
        bad("batch", f"must be {{'min', 'opt', 'max'}} with 1 <= min <= opt <= max, got {batch!r}")
    for key in ("plan", "model", "versions"):
        if not isinstance(m.get(key), dict):
            bad(key, "must be an object")


def _check_step(step, where: str, bad: Callable[[str, str], None]) -> None:
    """One step's entry: its objects and lists, and every file it names (with its sha256) inside the dir."""
    if not isinstance(step, dict):
        bad(where, "must be an object")
    for key in ("onnx", "engine", "coefficients"):
        if not isinstance(step.get(key), dict):
            bad(f"{where}.{key}", "must be an object")
    for key in ("inputs", "outputs", "skip"):
        if not isinstance(step.get(key), list):
            bad(f"{where}.{key}", "must be a list")
    static = step["engine"].get("static", {})  # openvino: blobs compiled for static batch sizes
    if not isinstance(static, dict):
        bad(f"{where}.engine.static", "must map batch sizes to files")
    files = [(key, step[key]) for key in ("onnx", "engine")]
    files += [(f"engine.static.{b}", f if isinstance(f, dict) else {}) for b, f in static.items()]
    for key, f in files:
        if not (isinstance(f.get("file"), str) and isinstance(f.get("sha256"), str)):
            bad(f"{where}.{key}", "must name a file and its sha256")
        if Path(f["file"]).is_absolute() or ".." in Path(f["file"]).parts:
            bad(f"{where}.{key}.file", f"must be a path inside the engine dir, got {f['file']!r}")
