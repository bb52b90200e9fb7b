"""The runtime: walk a plan's schedule, one engine per step.

``Runtime.load(DIR)`` reads an engine dir written by ``autodiffusion-rt build``
(only its ``manifest.json`` and engine files: the core never imports the
exporter); ``Runtime.from_plan(plan)`` runs a plan on the PyTorch model, the
reference every backend is compared with. Both sample exactly like
:func:`autodiffusion_rt.sample`: x_T, labels and every step's noise come from
each sample's own generator (:class:`~autodiffusion_rt.diffusion.SampleNoise`,
through :func:`~autodiffusion_rt.sampling.initial_state`), drawn as each chunk
runs, so the same plan and seed give the same images on every backend, within
float tolerance, whatever the chunk size or the requests batched together.

Engines are loaded once. Sampling runs through per-batch-size ping-pong
buffers kept between calls, so switching engines along the schedule allocates
nothing in the steady state (beyond the seeded draws themselves).

The engine dir (``manifest.json``, format ``autodiffusion-rt-engines`` v1)::

    {
      "format": "autodiffusion-rt-engines", "version": 1, "complete": true,
      "created": ISO time, "backend": "onnxruntime" | "tensorrt",
      "precision": "fp32" | "fp16" | "int8", "batch": {"min": 1, "opt": int, "max": int},
      "opset": int, "label_mode": null | "table" | "graph",
      "plan": {plan.json}, "plan_sha256": sha256 of the canonical plan JSON,
      "model": {"spec", "name", "fingerprint", "image_shape", "num_classes", "learn_sigma"},
      "versions": {"autodiffusion_rt", "torch", "onnx", "onnxruntime", "tensorrt", "compute_capability"},
      "int8": {"fid_fp32", "limit", "steps": [{"int8", "fid"}], "samples", ...},   # int8 builds only
      "weights": "embedded" | "stripped",       # tensorrt builds: stripped engines are refitted from onnx/ at load
      "steps": [{
        "index", "timestep", "skip": [layer ids], "coefficients": {six floats},
        "precision",                           # int8 builds: "int8" for the steps that passed the FID check
        "macs_per_sample",                     # the registry's MACs of the kept subnetwork
        "inputs": [{"name", "dtype", "shape"}], "outputs": [...],   # "batch" = dynamic dim
        "onnx":   {"file", "sha256", "bytes", "key", "nodes", "macs_per_sample", "max_abs_diff", "seconds"},
        "engine": {"file", "sha256", "bytes", "record": {...}, "seconds"}
      }, ...]
    }

File paths are relative to the dir. ``engine.record`` holds what decides reuse
(ONNX hash, backend, precision, batch profile, library versions, compute
capability); the exporter rebuilds an engine whose record differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..diffusion import SampleNoise, SamplerCoefficients
from ..errors import EngineError, PlanError
from ..plan import Plan
from ..sampling import check_finite, check_labels, check_n, initial_state, sample_rows
from ..utils import sha256_file
from .device import DeviceResidentWalk, CudaRuntimeMemory, OrtValueMemory, plan_step_buffers, slot_spec
from .engines import (
    NOISE,
    X,
    X0,
    X_PREV,
    Y,
    Engine,
    OnnxRuntimeEngine,
    SharedDeviceMemory,
    TensorRTEngine,
    TensorSpec,
    TorchStepEngine,
    cpu_isa,
    cuda_check,
    cuda_compute_capability,
    import_cudart,
    import_onnxruntime,
    import_tensorrt,
    onnxruntime_providers,
    shared_initializers,
    step_io,
)

__all__ = [
    "BACKENDS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ModelInfo",
    "Runtime",
    "coefficients_for_plan",
    "library_versions",
    "load_plan_model",
    "plan_sha256",
    "read_manifest",
    "sample_from_engines",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "autodiffusion-rt-engines"
MANIFEST_VERSION = 1
BACKENDS = ("torch", "onnxruntime", "tensorrt")
_COEFF_NAMES = ("x0_from_x", "x0_from_eps", "c_x", "c_eps", "c_prev_x0", "c_noise")


@dataclass(frozen=True)
class ModelInfo:
    """What sampling needs to know about the model when only engines are loaded."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: Optional[int]


# ------------------------------------------------------------------ helpers
def plan_sha256(plan: Plan) -> str:
    """sha256 of the plan's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def library_versions(backend: Optional[str] = None) -> dict:
    """Versions that matter for engine reuse; the compute capability only when the backend is tensorrt."""
    import importlib

    from .. import __version__

    out: dict[str, Optional[str]] = {"autodiffusion_rt": __version__, "torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "tensorrt"):
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception:
            out[name] = None
    out["compute_capability"] = cuda_compute_capability() if backend == "tensorrt" else None
    return out


def coefficients_for_plan(plan: Plan) -> SamplerCoefficients:
    """The plan's sampler coefficients from its recorded noise schedule (no weights needed)."""
    diffusion = plan.model_config.get("diffusion") if isinstance(plan.model_config, dict) else None
    if not isinstance(diffusion, dict) or "noise_schedule" not in diffusion:
        raise PlanError(
            "the plan's model.config has no 'diffusion' settings (noise_schedule, diffusion_steps): "
            "re-create the plan with Plan.for_model"
        )
    from ..models.loading import diffusion_schedule

    return plan.coefficients(diffusion_schedule(diffusion))


def load_plan_model(plan: Plan, model=None):
    """The DiffusionModel a plan was made for (checked against its fingerprint).

    ``embedded:NAME`` specs load as usual; ``adm:PATH`` checkpoints are rebuilt
    from the architecture the plan records, so no preset or options are needed.
    """
    if model is None:
        from ..models import load_model
        from ..models import loading

        spec = plan.model_spec
        if spec.startswith("adm:"):
            cfg = plan.model_config
            path = Path(spec[4:]).expanduser()
            state_dict = loading._read_checkpoint(path)
            unet_kwargs = dict(cfg["unet"])
            for key in ("attention_resolutions", "channel_mult"):
                if key in unet_kwargs:
                    unet_kwargs[key] = tuple(unet_kwargs[key])
            model = loading._build(spec, unet_kwargs, cfg["diffusion"], state_dict, str(path), {})
        else:
            model = load_model(spec)
    plan.check_model(model)
    return model


def read_manifest(engine_dir) -> dict:
    """Read and check the shape of ``DIR/manifest.json`` (not the files it names)."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_NAME
    if not engine_dir.is_dir():
        raise EngineError(f"engine dir {engine_dir} does not exist: build it with 'autodiffusion-rt build PLAN --out {engine_dir}'")
    if not path.is_file():
        raise EngineError(
            f"{path} is missing: {engine_dir} is not an engine dir, or its build did not finish; "
            f"run 'autodiffusion-rt build PLAN --out {engine_dir}'"
        )
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}): it is corrupted; rebuild with 'autodiffusion-rt build PLAN --out {engine_dir}'") from None

    def bad(field: str, why: str):
        raise EngineError(f"{path}: field {field!r} {why}; rebuild with 'autodiffusion-rt build PLAN --out {engine_dir}'")

    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        bad("format", f"must be {MANIFEST_FORMAT!r}, got {m.get('format') if isinstance(m, dict) else type(m).__name__!r}")
    if m.get("version") != MANIFEST_VERSION:
        bad("version", f"must be {MANIFEST_VERSION} (this autodiffusion-rt reads version {MANIFEST_VERSION}), got {m.get('version')!r}")
    if m.get("complete") is not True:
        bad("complete", "is not true: the build did not finish")
    if m.get("backend") not in ("onnxruntime", "tensorrt"):
        bad("backend", f"must be 'onnxruntime' or 'tensorrt', got {m.get('backend')!r}")
    if m.get("precision") not in ("fp32", "fp16", "int8"):
        bad("precision", f"must be 'fp32', 'fp16' or 'int8', got {m.get('precision')!r}")
    batch = m.get("batch")
    if not (isinstance(batch, dict) and all(isinstance(batch.get(k), int) and batch.get(k) >= 1 for k in ("min", "opt", "max"))
            and batch["min"] <= batch["opt"] <= batch["max"]):
        bad("batch", f"must be {{'min', 'opt', 'max'}} with 1 <= min <= opt <= max, got {batch!r}")
    for key in ("plan", "model", "versions"):
        if not isinstance(m.get(key), dict):
            bad(key, "must be an object")
    if not isinstance(m.get("steps"), list) or not m["steps"]:
        bad("steps", "must be a non-empty list")
    for i, step in enumerate(m["steps"]):
        if not isinstance(step, dict):
            bad(f"steps[{i}]", "must be an object")
        for key in ("onnx", "engine", "coefficients"):
            if not isinstance(step.get(key), dict):
                bad(f"steps[{i}].{key}", "must be an object")
        for key in ("inputs", "outputs", "skip"):
            if not isinstance(step.get(key), list):
                bad(f"steps[{i}].{key}", "must be a list")
        for key in ("onnx", "engine"):
            f = step[key]
            if not (isinstance(f.get("file"), str) and isinstance(f.get("sha256"), str)):
                bad(f"steps[{i}].{key}", "must name a file and its sha256")
            if Path(f["file"]).is_absolute() or ".." in Path(f["file"]).parts:
                bad(f"steps[{i}].{key}.file", f"must be a path inside the engine dir, got {f['file']!r}")
    return m


def _check_manifest_plan(m: dict, path: Path, expected: Optional[Plan]) -> tuple[Plan, SamplerCoefficients]:
    """The manifest's plan, checked against its hash, its steps, and the caller's plan."""
    try:
        plan = Plan.from_dict(m["plan"], f"{path} (plan)")
    except PlanError as e:
        raise EngineError(f"{e}; rebuild the engine dir") from None
    rebuild = f"rebuild with 'autodiffusion-rt build PLAN --out {path.parent}'"
    if m.get("plan_sha256") != plan_sha256(plan):
        raise EngineError(f"{path}: the manifest does not match its plan (plan_sha256 differs: edited by hand?); {rebuild}")
    if expected is not None and plan_sha256(expected) != plan_sha256(plan):
        raise EngineError(
            f"{path} was built from a different plan (timesteps {list(plan.timesteps)}, sampler {plan.sampler}) than the "
            f"one given (timesteps {list(expected.timesteps)}, sampler {expected.sampler}); {rebuild}"
        )
    model = m["model"]
    if model.get("fingerprint") != plan.model_fingerprint:
        raise EngineError(f"{path}: model fingerprint {str(model.get('fingerprint'))[:12]}... does not match the plan's; {rebuild}")
    if len(m["steps"]) != plan.nfe:
        raise EngineError(f"{path}: the manifest has {len(m['steps'])} steps but its plan has {plan.nfe} timesteps; {rebuild}")
    coeffs = coefficients_for_plan(plan)
    image_shape = tuple(model.get("image_shape") or ())
    if len(image_shape) != 3:
        raise EngineError(f"{path}: model.image_shape must be [C, H, W], got {model.get('image_shape')!r}; {rebuild}")
    conditional = model.get("num_classes") is not None
    for i, step in enumerate(m["steps"]):
        if step.get("index") != i or step.get("timestep") != plan.timesteps[i] or sorted(step["skip"]) != sorted(plan.skip[i]):
            raise EngineError(
                f"{path}: step {i} (timestep {step.get('timestep')}, skip {step.get('skip')}) does not match the plan's "
                f"(timestep {plan.timesteps[i]}, skip {list(plan.skip[i])}); {rebuild}"
            )
        row = coeffs.row(i)
        for name in _COEFF_NAMES:
            got = step["coefficients"].get(name)
            want = getattr(row, name)
            if not isinstance(got, (int, float)) or not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
                raise EngineError(f"{path}: step {i} coefficient {name}={got!r} does not match the plan's sampler ({want!r}); {rebuild}")
        for name in ("c_prev_eps1", "c_prev_eps2", "c_prev_eps3"):  # iPNDM's history weights; 0 in manifests without them
            got = step["coefficients"].get(name, 0.0)
            if not isinstance(got, (int, float)) or not math.isclose(got, getattr(row, name), rel_tol=1e-9, abs_tol=1e-12):
                raise EngineError(f"{path}: step {i} coefficient {name}={got!r} does not match the plan's sampler ({getattr(row, name)!r}); {rebuild}")
        for name, want in row._asdict().items():  # flags beside the six constants (clip_x0)
            if name not in _COEFF_NAMES and isinstance(want, bool) and step["coefficients"].get(name, False) != want:
                raise EngineError(
                    f"{path}: step {i} was built with {name}={step['coefficients'].get(name, False)!r} but the sampler now "
                    f"uses {name}={want!r}; {rebuild}"
                )
        ins, outs = step_io(coeffs, i, image_shape, conditional)
        try:
            got_in = tuple(TensorSpec.from_dict(d) for d in step["inputs"])
            got_out = tuple(TensorSpec.from_dict(d) for d in step["outputs"])
        except (KeyError, TypeError):
            raise EngineError(f"{path}: step {i} inputs/outputs are malformed; {rebuild}") from None
        if got_in != ins or got_out != outs:
            raise EngineError(f"{path}: step {i} inputs/outputs {got_in} -> {got_out} do not match the plan's sampler; {rebuild}")
    return plan, coeffs


def _verified_file(engine_dir: Path, entry: dict, what: str) -> Path:
    path = engine_dir / entry["file"]
    if not path.is_file():
        raise EngineError(f"{what} file {path} is missing; rebuild with 'autodiffusion-rt build PLAN --out {engine_dir}'")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise EngineError(
            f"{what} file {path} is corrupted or truncated (sha256 {digest[:12]}... != recorded {entry['sha256'][:12]}...); "
            f"rebuild with 'autodiffusion-rt build PLAN --out {engine_dir}' (it rebuilds only the damaged steps)"
        )
    return path


# ------------------------------------------------------------------ runtime
class Runtime:
    """A plan's steps as engines, walked in order; ``sample(n, seed, labels)`` gives images in [-1, 1]."""

    def __init__(self, engines: Sequence[Engine], plan: Plan, coeffs: SamplerCoefficients, info: ModelInfo,
                 backend: str, max_batch: Optional[int] = None, *, backend_name: Optional[str] = None,
                 engine_dir: Optional[Path] = None, manifest: Optional[dict] = None, resources: Sequence = ()):
        if len(engines) != len(coeffs):
            raise EngineError(f"{len(engines)} engines for {len(coeffs)} steps")
        self.engines = list(engines)
        self.plan = plan
        self.coeffs = coeffs
        self.info = info
        self.backend = backend
        self.backend_name = backend_name or backend
        self.max_batch = max_batch
        self.engine_dir = engine_dir
        self.manifest = manifest
        self._resources = list(resources)  # closed with the runtime (scratch memory, stream)
        self._workspaces: "OrderedDict[int, dict]" = OrderedDict()
        self._lock = threading.Lock()  # one sampling call at a time: the workspaces are shared
        self._device_walk: Optional[DeviceResidentWalk] = None  # set by load() for GPU backends

    # ------------------------------------------------------------ creation
    @classmethod
    def from_plan(cls, plan: Plan, backend: str = "torch", *, model=None, batch_size: int = 256, device=None) -> "Runtime":
        """Run ``plan`` on the PyTorch model (the reference); the model is loaded from the plan when not given.

        ``device``: where the model runs (default cpu); a model loaded here is
        moved there, a given one must already be there. Images come back on
        the host, equal to the CPU's up to float rounding.
        """
        if backend != "torch":
            raise EngineError(
                f"Runtime.from_plan runs a plan on PyTorch (backend='torch'), got backend={backend!r}: for onnxruntime "
                "or tensorrt build an engine dir first ('autodiffusion-rt build PLAN --backend "
                f"{backend} --out DIR') and use Runtime.load(DIR)"
            )
        plan = Plan.load(plan)  # a Plan or a path
        loaded = model is None
        model = load_plan_model(plan, model)
        if loaded and device is not None:
            from ..sampling import check_device

            model.unet.to(check_device(None, device))  # a bad or absent device is a SamplingError, not torch's
        coeffs = plan.coefficients(model.schedule)
        keeps = plan.keep_sets(model)
        conditional = model.num_classes is not None
        engines = []
        for i, t in enumerate(plan.timesteps):
            ins, outs = step_io(coeffs, i, model.image_shape, conditional)
            engines.append(TorchStepEngine(model, coeffs.row(i), t, keeps[i], ins, outs, name=f"step {i} (t={t}, torch)",
                                           batch_size=batch_size, device=device))
        info = ModelInfo(model.name, tuple(model.image_shape), model.num_classes)
        dev = engines[0].device if engines else None
        return cls(engines, plan, coeffs, info, "torch", None, backend_name="torch" if dev is None or dev.type == "cpu" else f"torch/{dev}")

    @classmethod
    def load(cls, engine_dir, backend: str = "auto", *, plan: Optional[Plan] = None, model=None,
             providers: Optional[Sequence[str]] = None, threads: Optional[int] = None,
             check_versions: bool = True, cuda_graph: "bool | str" = False, share_weights: bool = True,
             spinning: bool = True, device_resident: Optional[bool] = None) -> "Runtime":
        """Load an engine dir built by ``autodiffusion-rt build``.

        ``backend``: ``auto`` (what the dir was built for), ``onnxruntime``,
        ``tensorrt``, or ``torch`` (the dir's plan on the PyTorch model; needs
        the model's weights). ``plan``: refuse the dir unless it was built from
        this plan. ``providers``: onnxruntime execution providers (cpu, cuda,
        tensorrt), best first; default: the best installed. Every engine file
        is checked against its recorded sha256 and, unless
        ``check_versions=False``, the libraries against the recorded versions.
        ``share_weights``: the onnxruntime step sessions read one copy of the
        tensors their files have in common. ``spinning=False``: onnxruntime's
        workers sleep instead of spinning while they wait for work.
        ``cuda_graph`` (TensorRT): ``True`` or ``"step"`` replays each step as
        its own CUDA graph; ``"schedule"`` replays the whole schedule as one
        graph per batch size (needs the device-resident walk).
        ``device_resident``: keep each request's state on the device from x_T
        to the result (one copy in, one out; for TensorRT one synchronize per
        request) instead of copying to and from the host at every step.
        Default: on for TensorRT and onnxruntime's CUDA/TensorRT providers;
        ``True`` on onnxruntime's CPU provider runs the same walk on CPU OrtValues.
        """
        engine_dir = Path(engine_dir)
        plan = None if plan is None else Plan.load(plan)  # a Plan or a path
        m = read_manifest(engine_dir)
        path = engine_dir / MANIFEST_NAME
        the_plan, coeffs = _check_manifest_plan(m, path, plan)
        if backend not in ("auto", *BACKENDS):
            raise EngineError(f"unknown backend {backend!r}: choose auto, {', '.join(BACKENDS)}")
        chosen = m["backend"] if backend == "auto" else backend
        if cuda_graph not in (False, True, "step", "schedule"):
            raise EngineError(f"cuda_graph={cuda_graph!r}: pass False, True (or 'step': a graph per step) or 'schedule' (one per batch size)")
        if cuda_graph == "schedule" and device_resident is False:
            raise EngineError("cuda_graph='schedule' replays a whole request on the device: drop device_resident=False, or use cuda_graph='step'")
        if chosen == "torch":
            rt = cls.from_plan(the_plan, "torch", model=model)
            rt.engine_dir, rt.manifest = engine_dir, m
            return rt
        if chosen == "tensorrt" and m["backend"] != "tensorrt":
            raise EngineError(
                f"{engine_dir} holds {m['backend']} engines, not TensorRT ones: rebuild with "
                f"'autodiffusion-rt build PLAN --backend tensorrt --out DIR', or load it with backend='auto'"
            )
        info_d = m["model"]
        info = ModelInfo(str(info_d.get("name", the_plan.model_name)), tuple(int(s) for s in info_d["image_shape"]),
                         None if info_d.get("num_classes") is None else int(info_d["num_classes"]))
        max_batch = int(m["batch"]["max"])
        if chosen == "onnxruntime":
            ort = import_onnxruntime()
            # One provider list per step: the TensorRT provider's shape profile names this step's inputs.
            provs = [onnxruntime_providers(providers, cache_dir=engine_dir / "ort_trt_cache", fp16=m["precision"] == "fp16",
                                           profile=_profile(step, m["batch"])) for step in m["steps"]]
            on_cpu = _provider_name(provs[0][0]) == "CPUExecutionProvider"
            # The engines are graphs optimized for onnxruntime's CPU provider (laid out for this CPU's
            # vector width); a GPU provider, or a tensorrt dir, runs the verified portable ONNX exports.
            key = "engine" if m["backend"] == "onnxruntime" and on_cpu else "onnx"
            if check_versions and key == "engine":
                _check_version(m, "onnxruntime", ort.__version__, engine_dir)
            levels = []
            for i, s in enumerate(m["steps"]):
                record = s["engine"].get("record") or {}
                level = record.get("optimization") if key == "engine" else None
                if level in ("extended", "all") and record.get("isa") != cpu_isa():
                    raise EngineError(
                        f"{engine_dir}: step {i}'s engine was optimized for CPU {record.get('isa')!r} and this one is "
                        f"{cpu_isa()!r} (onnxruntime's layouts follow the vector width); rebuild with "
                        f"'autodiffusion-rt build PLAN --out {engine_dir}' on this machine"
                    )
                levels.append("none" if level in ("basic", "extended", "all") else "all")
            files = [_verified_file(engine_dir, s[key], f"step {i} {'engine' if key == 'engine' else 'ONNX'}") for i, s in enumerate(m["steps"])]
            shared = shared_initializers(files) if share_weights else [{} for _ in files]
            engines = []
            for i, (step, f) in enumerate(zip(m["steps"], files)):
                ins = [TensorSpec.from_dict(d) for d in step["inputs"]]
                outs = [TensorSpec.from_dict(d) for d in step["outputs"]]
                engines.append(OnnxRuntimeEngine(f, ins, outs, max_batch, providers=provs[i], threads=threads,
                                                 name=f"step {i} (t={step['timestep']}, onnxruntime)", optimization=levels[i],
                                                 initializers=shared[i], spinning=spinning))
            used = engines[0].providers[0] if engines else "?"
            rt = cls(engines, the_plan, coeffs, info, "onnxruntime", max_batch,
                     backend_name=f"onnxruntime/{used}", engine_dir=engine_dir, manifest=m)
            on_gpu = used in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
            if device_resident or (device_resident is None and on_gpu):
                rt._device_walk = DeviceResidentWalk(engines, info.image_shape, OrtValueMemory(ort, "cuda" if on_gpu else "cpu"))
            return rt
        # native TensorRT
        trt = import_tensorrt()
        cudart = import_cudart()
        cc = cuda_compute_capability()
        if cc is None:
            raise EngineError("the tensorrt backend needs an NVIDIA GPU and driver, and none was found; use an onnxruntime engine dir on this machine")
        if check_versions:
            _check_version(m, "tensorrt", trt.__version__, engine_dir)
            _check_version(m, "compute_capability", cc, engine_dir, what="GPU compute capability")
        files = [_verified_file(engine_dir, s["engine"], f"step {i} engine") for i, s in enumerate(m["steps"])]
        # Weight-stripped engines are refitted from their step's ONNX file, checked like every file.
        refits = [_verified_file(engine_dir, s["onnx"], f"step {i} ONNX (the weights of its stripped engine)")
                  if (s["engine"].get("record") or {}).get("weights") == "stripped" else None for i, s in enumerate(m["steps"])]
        logger = trt.Logger(trt.Logger.WARNING)
        trt_runtime = trt.Runtime(logger)
        stream = cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        scratch = SharedDeviceMemory(cudart)
        engines = []
        try:
            for i, (step, f) in enumerate(zip(m["steps"], files)):
                ins = [TensorSpec.from_dict(d) for d in step["inputs"]]
                outs = [TensorSpec.from_dict(d) for d in step["outputs"]]
                engines.append(TensorRTEngine(f.read_bytes(), ins, outs, max_batch, runtime=trt_runtime, scratch=scratch,
                                              stream=stream, cudart=cudart, trt=trt, cuda_graph=cuda_graph in (True, "step"),
                                              name=f"step {i} (t={step['timestep']}, tensorrt)", refit_onnx=refits[i], logger=logger))
        except BaseException:
            for e in engines:
                e.close()
            scratch.free()
            cudart.cudaStreamDestroy(stream)
            raise
        rt = cls(engines, the_plan, coeffs, info, "tensorrt", max_batch, backend_name=f"tensorrt {trt.__version__}",
                 engine_dir=engine_dir, manifest=m, resources=[(trt_runtime, logger), _Closer(scratch.free), _Closer(lambda: cudart.cudaStreamDestroy(stream))])
        if device_resident is None or device_resident:
            rt._device_walk = DeviceResidentWalk(engines, info.image_shape, CudaRuntimeMemory(cudart, stream),
                                                 schedule_graph=cuda_graph == "schedule")
        return rt

    # ------------------------------------------------------------ sampling
    @property
    def num_steps(self) -> int:
        return len(self.coeffs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.info.image_shape

    @property
    def num_classes(self) -> Optional[int]:
        return self.info.num_classes

    def sample(self, n: int, seed: int = 0, labels=None, *, return_labels: bool = False, progress: bool = False,
               clip: bool = True, first: int = 0):
        """``n`` images in [-1, 1] (NCHW float32), equal to :func:`autodiffusion_rt.sample`'s for the same seed.

        Runs in chunks of at most the engines' maximum batch; every sample's
        draws come from its own generator, so chunking does not change the images.
        ``clip=False`` returns the final step's output before the clamp to [-1, 1].
        ``first``: samples ``first .. first + n - 1`` of ``seed`` (a chunk of a larger request).
        """
        n = check_n(n)
        out, y = self._sample_rows(sample_rows(seed, n, first), check_labels(self.info, labels, n), progress)
        if clip:
            out.clamp_(-1, 1)
        return (out, y) if return_labels else out

    def sample_requests(self, requests: Sequence[tuple[int, int, Any]]) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Several requests ``(n, seed, labels)`` run as one batch; per request ``(images, labels)``.

        Each request's images equal ``sample(n, seed, labels)`` called alone:
        what a dynamic batcher needs to merge concurrent requests.
        """
        ns = [check_n(n) for n, _, _ in requests]
        noise = SampleNoise.for_requests([(seed, n) for n, (_, seed, _) in zip(ns, requests)])
        given = [check_labels(self.info, labels, n) for n, (_, _, labels) in zip(ns, requests)]
        labels = None
        if self.info.num_classes is not None:
            # Rows with no label given draw theirs (marked -1 here) from their own generators.
            labels = torch.cat([torch.full((n,), -1, dtype=torch.long) if g is None else g for n, g in zip(ns, given)])
        out, y = self._sample_rows(noise, labels, False)
        out.clamp_(-1, 1)
        results, s = [], 0
        for n in ns:
            results.append((out[s:s + n], None if y is None else y[s:s + n]))
            s += n
        return results

    def _sample_rows(self, noise: SampleNoise, labels, progress: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        n = len(noise)
        chunk = self.max_batch or n
        out = torch.empty((n, *self.info.image_shape))
        ys = []
        with self._lock:
            if not self.engines:
                raise EngineError("this Runtime is closed")
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                rows = noise[s:e]
                x, y = self._initial_rows(rows, None if labels is None else labels[s:e])
                out[s:e] = self._run_chunk(x, y, rows, progress)
                ys.append(y)
        y = None if self.info.num_classes is None else torch.cat(ys)
        return out, y

    def _initial_rows(self, rows: SampleNoise, labels: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x_T and labels for these rows, in the draw order; a label of -1 is drawn (after x_T)."""
        if labels is None or bool((labels >= 0).all()):
            x, y, _ = initial_state(self.info, len(rows), 0, labels, noise=rows)
            return x, y
        x = rows.randn(self.info.image_shape)
        y = labels.clone()
        drawn = y < 0
        y[drawn] = rows.randint(self.info.num_classes, where=drawn)
        return x, y

    def _workspace(self, batch: int) -> dict:
        """Per-batch-size buffers and every step bound to them (validated here, once).

        Which buffer a step reads and writes depends only on its index
        (:func:`~autodiffusion_rt.runtime.device.plan_step_buffers`: x and x0
        ping-pong, iPNDM's eps history rotates through a ring), so step ``i``
        is bound once to fixed arrays (an onnxruntime IO binding by address)
        and a request only refills x_T, the labels and each step's noise in place.
        """
        ws = self._workspaces.get(batch)
        if ws is not None:
            self._workspaces.move_to_end(batch)
            return ws
        plan, result, slots = plan_step_buffers([(e.input_names, e.output_names) for e in self.engines])
        bufs = {slot: np.empty(*slot_spec(slot, batch, self.info.image_shape)) for slot in slots}
        ws = {X: [bufs[(X, 0)], bufs[(X, 1)]], X0: [bufs.get((X0, 0)), bufs.get((X0, 1))],
              Y: bufs.get((Y, 0)), NOISE: bufs.get((NOISE, 0))}
        steps = []
        for i, (eng, sb) in enumerate(zip(self.engines, plan)):
            feeds = {name: bufs[slot] for name, slot in sb.inputs.items()}
            out = {name: bufs[slot] for name, slot in sb.outputs.items()}
            steps.append((eng.bind(feeds, out), sb.stochastic, out[X_PREV], i, eng.name))
        ws["steps"], ws["result"] = steps, bufs[result]
        self._workspaces[batch] = ws
        while len(self._workspaces) > 4:  # keep a few batch sizes, not every one ever seen
            self._workspaces.popitem(last=False)
        return ws

    def _run_chunk(self, x: torch.Tensor, y: Optional[torch.Tensor], rows: SampleNoise, progress: bool = False) -> torch.Tensor:
        if self._device_walk is not None:
            return self._run_chunk_on_device(x, y, rows, progress)
        ws = self._workspace(x.shape[0])
        np.copyto(ws[X][0], x.numpy())
        if y is not None:
            np.copyto(ws[Y], y.numpy())
        noise = None if ws[NOISE] is None else torch.from_numpy(ws[NOISE])
        steps = ws["steps"]
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"sample ({self.backend_name})")
        for run, stochastic, output, i, name in steps:
            if stochastic:
                # Drawn per step, per sample, straight into the workspace: O(chunk) memory.
                rows.randn(self.info.image_shape, out=noise)
            run()
            check_finite(output, i, int(self.coeffs.timesteps[i]), name)
        return torch.from_numpy(ws["result"].copy())

    # ------------------------------------------------- device-resident walk
    def _run_chunk_on_device(self, x: torch.Tensor, y: Optional[torch.Tensor], rows: SampleNoise, progress: bool) -> torch.Tensor:
        """One chunk kept on the device from x_T to x_0 (:class:`~autodiffusion_rt.runtime.device.DeviceResidentWalk`).

        Nothing comes back between steps, so only the result is checked for
        NaN/inf (a NaN carries through the remaining steps).
        """
        bar = None
        if progress:
            from tqdm import tqdm

            bar = lambda runners: tqdm(runners, desc=f"sample ({self.backend_name}, on device)")  # noqa: E731
        out = self._device_walk.run(x.numpy(), None if y is None else y.numpy(), rows, bar)
        last = len(self.engines) - 1
        check_finite(out, last, int(self.coeffs.timesteps[last]), f"{self.backend_name} (device-resident: checked after the last step)")
        return torch.from_numpy(out)

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the engines and their memory; the runtime cannot sample afterwards."""
        with self._lock:
            if self._device_walk is not None:
                self._device_walk.close()  # its buffers first: the stream and engines they use go next
                self._device_walk = None
            for e in self.engines:
                e.close()
            for r in reversed(self._resources):
                if isinstance(r, _Closer):
                    r()
            self.engines = []
            self._resources = []
            self._workspaces.clear()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Runtime({self.backend_name}, {self.num_steps} steps, timesteps={list(self.plan.timesteps)}, max_batch={self.max_batch})"


class _Closer:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else str(provider)


def _profile(step: dict, batch: dict) -> dict:
    return {
        d["name"]: tuple(TensorSpec.from_dict(d).concrete(batch[k]) for k in ("min", "opt", "max"))
        for d in step["inputs"]
    }


def _check_version(m: dict, key: str, installed: Any, engine_dir: Path, what: Optional[str] = None) -> None:
    recorded = m["versions"].get(key)
    if recorded != installed:
        raise EngineError(
            f"{engine_dir} was built with {what or key} {recorded} but {installed} is installed: rebuild with "
            f"'autodiffusion-rt build PLAN --out {engine_dir}' (or install {what or key} {recorded})"
        )


def sample_from_engines(engine_dir, n: int, seed: int = 0, labels=None, backend: str = "auto"):
    """``(images, labels)`` from an engine dir: what ``autodiffusion-rt sample --engines DIR`` runs."""
    with Runtime.load(engine_dir, backend=backend) as rt:
        return rt.sample(n, seed=seed, labels=labels, return_labels=True)
