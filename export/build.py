"""Plan -> engine dir: verified ONNX files, their engines, and ``manifest.json``.

:func:`build_engines` is what ``autodiffusion-rt build`` runs. For each step it
reuses what the previous build left when the cache rules allow
(:mod:`export.cache`), otherwise exports the step module to ONNX and compiles
the engine:

* ``onnxruntime``: the engine is the ONNX graph after onnxruntime's offline
  basic optimizations (constant folding, redundant-node removal: portable
  across its CPU, CUDA and TensorRT providers), checked and verified against
  the exported graph;
* ``tensorrt``: a serialized TensorRT engine per step (:mod:`export.tensorrt_build`),
  a shared timing cache in the dir;
* ``openvino``: one ONNX graph and one compiled blob per distinct subnetwork
  (the steps that skip the same layers share it), bf16 behind a FID gate
  (:mod:`export.openvino_build`).

Every file is written atomically under a content-derived name, the manifest
last (atomically), and only then are files the new manifest no longer names
deleted: a build interrupted at any point leaves the previous engine dir
usable, or a dir without a manifest that ``Runtime.load`` reports as
unfinished, never a half-valid one. Layout::

    DIR/manifest.json
    DIR/onnx/stepNN-<key>.onnx        verified export of step NN
    DIR/engines/stepNN-<key>.onnx     onnxruntime engine  (.plan for TensorRT; .blob for OpenVINO, named
                                      after the first step of its subnetwork, with embeddings-<hash>.npz)
    DIR/timing.cache                  TensorRT timing cache (tensorrt backend)
    DIR/build-progress.json           the steps a running (or killed) build finished; gone once its manifest is
                                      written (the next build reuses them: a kill -9 loses no finished step)
    DIR/ort_trt_cache/                onnxruntime TensorRT provider caches (at run time)
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from autodiffusion_rt.diffusion.step_io import shape_profile, step_tensors
from autodiffusion_rt.errors import BackendUnavailableError, EngineError
from autodiffusion_rt.models import load_model_for_plan
from autodiffusion_rt.plan import Plan
from autodiffusion_rt.runtime.backends.ort_backend import import_onnxruntime, ort_session_options
from autodiffusion_rt.runtime.backends.trt_backend import import_tensorrt
from autodiffusion_rt.runtime.manifest import MANIFEST_NAME, Manifest
from autodiffusion_rt.runtime.platform import cpu_isa, cuda_compute_capability, library_versions
from autodiffusion_rt.utils import locked_output_dir, path_error

from .cache import (
    PROGRESS_NAME,
    canonical_hash,
    engine_record,
    onnx_key,
    read_progress,
    remove_unreferenced,
    step_file,
    write_progress,
)
from .context import BUILD_BACKENDS, BUILD_PRECISIONS, BuildContext, BuildSettings, export_entry, fid_gate, file_entry
from .onnx_export import DEFAULT_OPSET, FP32_COND_TOL, FP32_TOL, import_onnx, ort_session, temp_beside
from .subnet import StepModule, half_unet, resolve_label_mode

__all__ = [
    "BUILD_BACKENDS",
    "BuildReport",
    "BuildSettings",
    "build_engines",
    "default_backend",
    "default_precision",
    "optimize_for_onnxruntime",
]

#: The level onnxruntime engines are saved at: the one the CPU provider runs at, so loading optimizes nothing.
ORT_ENGINE_LEVEL = "all"
#: The lock file that keeps two builds out of one dir.
LOCK_NAME = ".build.lock"


@dataclass
class BuildReport:
    """What a build did, step by step (``onnx``/``engine``: exported/built, reused, or rebuilt after corruption)."""

    engine_dir: Path
    manifest: Manifest
    steps: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, what: str, status: str) -> int:
        return sum(1 for s in self.steps if s[what] == status)

    def summary(self) -> str:
        n, m = len(self.steps), self.manifest
        if m["backend"] == "openvino":  # the steps share their subnetworks' files: count those
            done = {(s["subnet"], s["onnx"], s["engine"]) for s in self.steps}
            files = f"{len({s['subnet'] for s in self.steps})} shared subnetworks"
        else:
            done, files = {(s["index"], s["onnx"], s["engine"]) for s in self.steps}, f"{n} step engines"
        count = lambda k, what: sum(1 for d in done if d[k] == what)  # noqa: E731
        return (
            f"{self.engine_dir}: {n} steps, {files} ({m['backend']}, {m['precision']}, batch <= {m['batch']['max']}); "
            f"ONNX {count(1, 'exported')} exported, {count(1, 'reused')} reused; engines {count(2, 'built')} built, "
            f"{count(2, 'reused')} reused; {self.seconds:.1f} s"
        )


def optimize_for_onnxruntime(
    onnx_path, engine_path, *, check_batch: int = 2, term_scales=None, level: str = "all", verify: bool = True
) -> dict:
    """The onnxruntime engine: ``onnx_path`` optimized offline at ``level``, checked and verified, written atomically.

    ``all`` (the level onnxruntime's CPU provider runs at) includes the
    layout transformation to NCHWc blocks sized for this CPU's vector
    instructions: the file then runs only on that instruction set
    (:func:`~autodiffusion_rt.runtime.platform.cpu_isa`, in the engine record)
    and the runtime loads it without optimizing again.

    The optimized graph must reproduce the exported one within the export's
    bound (:func:`export.onnx_export.verify_onnx`; ``term_scales`` from the
    export's record): fusions change float32 rounding, which the first steps
    of a schedule amplify.
    """
    ort = import_onnxruntime()
    onnx = import_onnx()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = temp_beside(engine_path, ".onnx.tmp")
    try:
        so = ort_session_options(threads=torch.get_num_threads(), optimization=level, optimized_model_path=tmp)
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        if level == "basic":  # higher levels add onnxruntime's own operator domains, unknown to the checker
            try:
                onnx.checker.check_model(str(tmp))
            except Exception as e:
                raise EngineError(
                    f"onnxruntime's optimized graph for {onnx_path.name} fails onnx.checker: {str(e).splitlines()[0]}"
                ) from None
        if not verify:  # int8: onnxruntime's QDQ fusions round differently by design; the FID check judges it
            ort_session(tmp, "none")
            os.replace(tmp, engine_path)
            return {"seconds": time.perf_counter() - start}
        src, opt = ort_session(onnx_path, "none"), ort_session(tmp, "none")
        rng = np.random.default_rng(0)
        feeds = {}
        for i in src.get_inputs():
            shape = [check_batch if not isinstance(d, int) else d for d in i.shape]
            feeds[i.name] = (
                rng.integers(0, 1, shape).astype(np.int64)
                if "int64" in i.type
                else rng.standard_normal(shape).astype(np.float32)
            )
        scales = list(term_scales or [])
        for k, (a, b) in enumerate(zip(src.run(None, feeds), opt.run(None, feeds))):
            diff = float(np.max(np.abs(a.astype(np.float64) - b)))
            bound = FP32_TOL * max(1.0, float(np.max(np.abs(a)))) + FP32_COND_TOL * (
                scales[k] if k < len(scales) else 0.0
            )
            if not diff <= bound:
                raise EngineError(
                    f"onnxruntime's optimized graph for {onnx_path.name} differs from it by {diff:.3g} (> {bound:.3g})"
                )
        os.replace(tmp, engine_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return {"seconds": time.perf_counter() - start}


def _batch_profile(max_batch: int, opt_batch: Optional[int]) -> dict:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise EngineError(f"max_batch={max_batch!r}: pass a positive integer (--max-batch N)")
    opt = opt_batch if opt_batch is not None else min(max_batch, 16)
    if isinstance(opt, bool) or not isinstance(opt, int) or not 1 <= opt <= max_batch:
        raise EngineError(f"opt_batch={opt_batch!r} must be an integer in [1, max_batch={max_batch}]")
    return {"min": 1, "opt": opt, "max": max_batch}


def default_backend() -> str:
    """The fastest engines for this machine: TensorRT on an NVIDIA GPU, OpenVINO on a CPU it compiles for,
    else onnxruntime."""
    try:
        import_tensorrt()
        if cuda_compute_capability() is not None:
            return "tensorrt"
    except BackendUnavailableError:
        pass
    try:
        from autodiffusion_rt.runtime.backends.ov_backend import import_openvino

        if "CPU" in import_openvino().Core().available_devices:
            return "openvino"
    except Exception:  # not installed, or its CPU plugin does not load here
        pass
    return "onnxruntime"


def default_precision(backend: str) -> str:
    """bf16 for OpenVINO on a CPU with native bf16, fp32 everywhere else."""
    if backend == "openvino":
        from autodiffusion_rt.runtime.backends.ov_backend import default_precision as ov_default

        return ov_default()
    return "fp32"


def build_engines(
    plan: Plan,
    out_dir,
    *,
    backend: str = "auto",
    precision: str = "auto",
    max_batch: int = 64,
    opt_batch: Optional[int] = None,
    model=None,
    label_mode: str = "auto",
    simplify: bool = False,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    workspace_bytes: Optional[int] = None,
    progress: bool = True,
    wait_lock: bool = False,
    int8_fid_samples: int = 2000,
    int8_max_fid_rise: float = 0.05,
    int8_calibration_samples: int = 64,
    fid_extractor="mnist",
    fid_reference="mnist",
    strip_weights: bool = False,
) -> BuildReport:
    """Build (or update) the engine dir ``out_dir`` for ``plan`` (a Plan or a plan.json path); see the module docstring.

    ``backend``/``precision`` ``"auto"``: :func:`default_backend`, :func:`default_precision`.
    ``model``: the plan's DiffusionModel (loaded from the plan's spec when None).
    ``force``: export and compile every step again. One build at a
    time per dir (an fcntl lock on ``DIR/.build.lock``): another build of the
    same dir waits when ``wait_lock``, else this is an EngineError. A dir that
    is already up to date is left untouched (it may be read-only).

    Low precision passes a FID gate (``int8_fid_samples`` samples, seed 0,
    ``fid_extractor`` against ``fid_reference``: a dataset name or
    FeatureStats, or None for no gate): a step stays in int8
    (onnxruntime, quantized by :mod:`export.quantize` on
    ``int8_calibration_samples`` of the plan's own trajectory) or bf16
    (OpenVINO) only if the plan's FID rises by at most ``int8_max_fid_rise``
    over fp32; the others run fp32. The manifest's ``int8`` / ``bf16`` entry
    and each step's ``precision`` say which. A bf16 build for a model the
    reference cannot judge (another image shape) is recorded as not checked.

    ``strip_weights`` (tensorrt): weight-stripped engines, refitted at load
    from the step's ONNX file in the dir; recorded in each engine's record
    (so it is part of the cache key) and in the manifest's ``weights``.
    """
    start = time.perf_counter()
    plan = _checked_plan(plan)
    if backend not in ("auto", *BUILD_BACKENDS):
        raise EngineError(f"backend={backend!r}: choose auto or one of {', '.join(BUILD_BACKENDS)}")
    backend = default_backend() if backend == "auto" else backend
    if precision not in ("auto", *BUILD_PRECISIONS):
        raise EngineError(f"precision={precision!r}: choose auto or one of {', '.join(BUILD_PRECISIONS)}")
    settings = BuildSettings(
        backend=backend,
        precision=default_precision(backend) if precision == "auto" else precision,
        batch=_batch_profile(max_batch, opt_batch),
        label_mode=label_mode,
        simplify=simplify,
        opset=opset,
        force=force,
        workspace_bytes=workspace_bytes,
        progress=progress,
        strip_weights=bool(strip_weights),
        fid_samples=int8_fid_samples,
        max_fid_rise=int8_max_fid_rise,
        fid_extractor=fid_extractor,
        fid_reference=fid_reference,
        int8_calibration_samples=int8_calibration_samples,
    )
    settings.check()
    return _build_in_dir(_new_context(plan, Path(out_dir), settings, model, start), wait_lock)


def _checked_plan(plan) -> Plan:
    """``plan`` (a Plan or a plan.json path) as a Plan that loads back from its own dict (the manifest embeds it)."""
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    if not isinstance(plan, Plan):
        raise EngineError(f"expected a Plan, got {type(plan).__name__}: load it with Plan.load(path)")
    # the manifest embeds the plan: it must load back (PlanError names the field)
    Plan.from_dict(plan.to_dict(), "plan")
    return plan


def _new_context(plan: Plan, out_dir: Path, settings: BuildSettings, model, start: float) -> BuildContext:
    """The build's context: the output dir probed, the libraries imported, the model loaded, the steps laid out."""
    if out_dir.exists() and not out_dir.is_dir():
        raise EngineError(f"--out {out_dir} is a file; pass a directory")
    writable = _probe_dir(out_dir)
    import_onnx()
    import_onnxruntime()  # verification runs every export in onnxruntime, whatever the backend
    ctx = BuildContext(
        plan=plan, out_dir=out_dir, settings=settings, writable=writable, start=start, **_backend_tools(settings)
    )
    ctx.model = load_model_for_plan(plan, model)
    if settings.precision == "int8":  # the FID check's extractor must read these images: say so before any work
        from autodiffusion_rt.metrics import get_extractor

        get_extractor(settings.fid_extractor).check_shape(tuple(ctx.model.image_shape))
    ctx.coeffs = plan.coefficients(ctx.model.schedule)
    ctx.keeps = plan.keep_sets(ctx.model)
    return ctx


def _build_in_dir(ctx: BuildContext, wait_lock: bool) -> BuildReport:
    """Create the dir (and its parents) if needed, build under its lock; a failed first build leaves nothing behind."""
    out_dir, lock = ctx.out_dir, ctx.out_dir / LOCK_NAME
    busy = (
        f"another build is writing {out_dir} (it holds {lock}): wait for it, pass --wait-lock to wait "
        "automatically, or build into another --out"
    )
    try:
        with locked_output_dir(
            lock,
            [out_dir] if ctx.writable else [],
            error=EngineError,
            busy=busy,
            fix="pass --out with a writable directory",
            wait=wait_lock,
            discard=True,
            on_wait=lambda: print(f"waiting for the other build of {out_dir} to finish", file=sys.stderr),
        ):
            return _build_locked(ctx)
    except OSError as e:
        raise EngineError(path_error(e, out_dir, "free some space or pass --out with a writable directory")) from None


def _backend_tools(settings: BuildSettings) -> dict:
    """The backend's modules and the ONNX dtype, imported and checked before any model is loaded."""
    trt = None
    if settings.backend == "tensorrt":
        trt = import_tensorrt()
        if cuda_compute_capability() is None:
            raise BackendUnavailableError(
                "TensorRT builds engines on an NVIDIA GPU and none was found (no driver, or cuda-python missing: "
                "pip install cuda-python); build with --backend openvino or onnxruntime on this machine"
            )
    if settings.backend == "openvino":
        from autodiffusion_rt.runtime.backends.ov_backend import check_precision, import_openvino

        import_openvino()
        check_precision(settings.precision)
    from .tensorrt_build import onnx_dtype_for

    low = settings.precision in ("int8", "bf16")  # the graph stays float32; the backend lowers it
    onnx_dtype = onnx_dtype_for("fp32" if low else settings.precision, settings.backend, trt)
    onnxslim = None
    if settings.simplify:
        try:
            import onnxslim
        except ImportError:
            raise BackendUnavailableError(
                "--simplify needs onnxslim: pip install onnxslim (or build without --simplify)"
            ) from None
    return {"trt": trt, "onnx_dtype": onnx_dtype, "onnxslim": onnxslim}


def _probe_dir(out_dir: Path) -> bool:
    """Whether ``out_dir`` (or the folder that would hold it) takes new files; a path under a file is an error."""
    from autodiffusion_rt.utils import check_writable

    try:
        check_writable(out_dir, "the engine dir", "pass --out with a writable directory", EngineError, directory=True)
    except EngineError:
        if out_dir.is_dir() and (out_dir / MANIFEST_NAME).is_file():
            return False  # maybe already up to date: refused later only if something must be written
        raise
    return True


def _build_locked(ctx: BuildContext) -> BuildReport:
    """Under the dir's lock: read what the last build left, build every step, gate low precision, write the manifest."""
    _read_previous(ctx)
    s = ctx.settings
    if s.backend == "openvino":
        from .openvino_build import build_openvino_steps

        steps, report_steps, extra = build_openvino_steps(ctx)
    else:
        steps, report_steps, extra = _build_steps(ctx)
    conditional = ctx.model.num_classes is not None
    manifest = Manifest.new(
        ctx.out_dir,
        plan=ctx.plan,
        model=ctx.model,
        backend=s.backend,
        precision=s.precision,
        batch=s.batch,
        opset=s.opset,
        simplify=s.simplify,
        label_mode=s.label_mode if conditional and s.backend != "openvino" else None,
        versions=ctx.versions,
        steps=steps,
        weights=("stripped" if s.strip_weights else "embedded") if s.backend == "tensorrt" else None,
        **extra,
    )
    if manifest.same_build(ctx.old):
        manifest = ctx.old  # up to date: not rewritten (the dir may be read-only, and its date stays the build's)
    else:
        ctx.need_write("its manifest")
        manifest.write()
    if ctx.writable:
        engines = [st["engine"] for st in steps]
        referenced = [st["onnx"]["file"] for st in steps] + [e["file"] for e in engines]
        referenced += [e["file"] for entry in engines for e in entry.get("static", {}).values()]
        referenced += [extra["embeddings"]["file"]] if "embeddings" in extra else []
        remove_unreferenced(ctx.out_dir, referenced)  # under the build lock: any other temp file is a dead build's
        with contextlib.suppress(FileNotFoundError):
            (ctx.out_dir / PROGRESS_NAME).unlink()  # the manifest now records every step
    return BuildReport(ctx.out_dir, manifest, report_steps, time.perf_counter() - ctx.start)


def _read_previous(ctx: BuildContext) -> None:
    """The versions this build records and the files the previous build (and a killed one's journal) left to reuse."""
    ctx.versions = library_versions(ctx.settings.backend)
    ctx.isa = cpu_isa()
    if ctx.onnxslim is not None:
        ctx.versions["onnxslim"] = getattr(ctx.onnxslim, "__version__", None)
    ctx.old = Manifest.previous(ctx.out_dir)
    old_steps = [st for st in (ctx.old or {}).get("steps", []) if isinstance(st, dict)]
    ctx.old_onnx = {st["onnx"].get("key"): st["onnx"] for st in old_steps if isinstance(st.get("onnx"), dict)}
    engines = [st["engine"] for st in old_steps if isinstance(st.get("engine"), dict)]
    static = [e for entry in engines if isinstance(entry.get("static"), dict) for e in entry["static"].values()]
    ctx.old_engines = {canonical_hash(e.get("record")): e for e in [*engines, *static] if isinstance(e, dict)}
    ctx.named = {st["onnx"].get("file") for st in old_steps if isinstance(st.get("onnx"), dict)}
    ctx.named |= {e.get("file") for e in [*engines, *static] if isinstance(e, dict)}
    for st in read_progress(ctx.out_dir):  # the steps a killed build finished: reused like the manifest's, if intact
        ctx.old_onnx.setdefault(st["onnx"].get("key"), st["onnx"])
        ctx.old_engines.setdefault(canonical_hash(st["engine"].get("record")), st["engine"])


def _build_steps(ctx: BuildContext) -> tuple[list, list, dict]:
    """onnxruntime and TensorRT: one exported, verified graph and one engine per step; int8's gate on top."""
    s = ctx.settings
    steps, report_steps, int8_entries = [], [], []
    calibration = None
    if s.precision == "int8":
        from .quantize import trajectory_feeds

        calibration = trajectory_feeds(
            ctx.plan, ctx.model, s.int8_calibration_samples, seed=1, batch=min(s.batch["max"], 16)
        )
    from tqdm import tqdm

    bar = tqdm(total=len(ctx.coeffs), desc=f"build {s.backend} {s.precision}", disable=not s.progress, unit="step")
    try:
        for i, t in enumerate(ctx.coeffs.timesteps):
            step, status = _build_step(ctx, i)
            if calibration is not None:
                int8_entries.append(_int8_engine(ctx, i, step["onnx"], calibration[i]))
            steps.append(step)
            report_steps.append(status)
            if ctx.writable and (status["onnx"] == "exported" or status["engine"] == "built"):
                write_progress(ctx.out_dir, steps)  # a kill from here on loses no finished step
            bar.set_postfix_str(f"step {i} (t={t}): onnx {status['onnx']}, engine {status['engine']}")
            bar.update(1)
    finally:
        bar.close()
    int8_report = None
    if calibration is not None:
        int8_report = _select_int8(ctx, steps, int8_entries)
    for step in steps:
        step["precision"] = (
            "int8"
            if int8_report is not None and int8_report["steps"][step["index"]]["int8"]
            else ("fp32" if s.precision == "int8" else s.precision)
        )
    return steps, report_steps, {"int8": int8_report}


def _build_step(ctx: BuildContext, i: int) -> tuple[dict, dict]:
    """Step i's manifest entry (its ONNX export and engine, made or reused) and what was done."""
    s, model, t = ctx.settings, ctx.model, int(ctx.coeffs.timesteps[i])
    keep, row = ctx.keeps[i], ctx.coeffs.row(i)
    ins, outs = step_tensors(ctx.coeffs, i, model.image_shape, model.num_classes is not None)
    mode = resolve_label_mode(model, s.label_mode, keep)
    key = onnx_key(
        model=model,
        timestep=t,
        row=row,
        keep=keep,
        inputs=ins,
        outputs=outs,
        label_mode=mode,
        onnx_dtype=ctx.onnx_dtype,
        opset=s.opset,
        simplify=s.simplify,
        versions=ctx.versions,
    )
    status = {"index": i, "timestep": t}
    onnx_entry = ctx.reuse("onnx", key, f"exporting step {i} again")
    status["onnx"] = "reused" if onnx_entry is not None else "exported"
    if onnx_entry is None:
        onnx_entry = _export_step(ctx, i, keep, mode, key)
    engine_entry, status["engine"] = _step_engine(ctx, i, onnx_entry, ins)
    step = {
        "index": i,
        "timestep": t,
        "skip": list(ctx.plan.skip[i]),
        "coefficients": row._asdict(),
        "macs_per_sample": int(model.unet.macs(keep)),
        "label_mode": mode,
        "inputs": [sp.to_dict() for sp in ins],
        "outputs": [sp.to_dict() for sp in outs],
        "onnx": onnx_entry,
        "engine": engine_entry,
    }
    return step, status


def _export_step(ctx: BuildContext, i: int, keep, label_mode: str, key: str) -> dict:
    """Step i's module exported to ONNX and verified, under its cache key: its manifest entry."""
    ctx.need_write(f"step {i}'s ONNX file")
    half = _half_unet(ctx) if ctx.onnx_dtype == "float16" else None
    module = StepModule(
        ctx.model,
        ctx.coeffs,
        i,
        keep,
        label_mode=label_mode,
        dtype=torch.float16 if ctx.onnx_dtype == "float16" else torch.float32,
        unet=half,
    ).eval()
    return export_entry(ctx, step_file("onnx", i, key, ".onnx", ctx.named), module, key)


def _step_engine(ctx: BuildContext, i: int, onnx_entry: dict, ins) -> tuple[dict, str]:
    """Step i's engine entry, reused when the last build made it from the same record, else built:
    (entry, "reused" or "built")."""
    from .tensorrt_build import build_tensorrt_engine

    s = ctx.settings
    record = engine_record(
        onnx_sha256=onnx_entry["sha256"],
        backend=s.backend,
        precision="fp32" if s.precision == "int8" else s.precision,
        onnx_dtype=ctx.onnx_dtype,
        batch=s.batch,
        versions=ctx.versions,
        strip_weights=s.strip_weights,
        **({"isa": ctx.isa, "optimization": ORT_ENGINE_LEVEL} if s.backend == "onnxruntime" else {}),
    )
    digest = canonical_hash(record)
    engine_entry = ctx.reuse("engine", digest, f"rebuilding step {i}'s engine")
    if engine_entry is not None:
        return engine_entry, "reused"
    ctx.need_write(f"step {i}'s engine")
    rel = step_file("engines", i, digest, ".plan" if s.backend == "tensorrt" else ".onnx", ctx.named)
    target = ctx.out_dir / rel
    if s.backend == "onnxruntime":
        info = optimize_for_onnxruntime(
            ctx.out_dir / onnx_entry["file"],
            target,
            term_scales=onnx_entry.get("term_scales"),
            level=ORT_ENGINE_LEVEL,
        )
    else:
        info = build_tensorrt_engine(
            ctx.out_dir / onnx_entry["file"],
            target,
            precision=s.precision,
            profile=shape_profile(ins, s.batch),
            timing_cache=ctx.out_dir / "timing.cache",
            workspace_bytes=s.workspace_bytes,
            onnx_dtype=ctx.onnx_dtype,
            trt=ctx.trt,
            strip_weights=s.strip_weights,
        )
    return file_entry(ctx.out_dir, rel, record=record, seconds=info["seconds"]), "built"


def _half_unet(ctx: BuildContext):
    """The float16 copy of the UNet every fp16 step module shares (made once per build)."""
    if ctx.half_unet is None:
        ctx.half_unet = half_unet(ctx.model)
    return ctx.half_unet


def _int8_engine(ctx: BuildContext, i: int, onnx_entry: dict, feeds) -> dict:
    """Step i's int8 engine entry (quantized and optimized now, or reused by its record)."""
    from .quantize import quantize_step

    s = ctx.settings
    settings = {
        "calibration_samples": s.int8_calibration_samples,
        "calibration_seed": 1,
        "method": "minmax-qdq-u8s8-per-channel",
    }
    record = engine_record(
        onnx_sha256=onnx_entry["sha256"],
        backend="onnxruntime",
        precision="int8",
        onnx_dtype="float32",
        batch=s.batch,
        versions=ctx.versions,
        isa=ctx.isa,
        optimization=ORT_ENGINE_LEVEL,
        int8=settings,
    )
    digest = canonical_hash(record)
    prev = ctx.reuse("engine", digest, f"quantizing step {i} again")
    if prev is not None:
        return prev
    start = time.perf_counter()
    rel = step_file("engines", i, digest, ".onnx", ctx.named)
    target = ctx.out_dir / rel
    qdq = target.with_name(f".{target.name}.qdq")
    try:
        quantize_step(ctx.out_dir / onnx_entry["file"], qdq, feeds)
        optimize_for_onnxruntime(qdq, target, level=ORT_ENGINE_LEVEL, verify=False)
    finally:
        with contextlib.suppress(FileNotFoundError):
            qdq.unlink()
    return file_entry(ctx.out_dir, rel, record=record, seconds=time.perf_counter() - start)


def _select_int8(ctx: BuildContext, steps: list, int8_entries: list) -> dict:
    """Run the FID gate over onnxruntime engines; swap the kept steps' engines to int8."""
    from autodiffusion_rt.runtime import Runtime
    from autodiffusion_rt.runtime.backends.base import step_specs
    from autodiffusion_rt.runtime.backends.ort_backend import OnnxRuntimeEngine
    from autodiffusion_rt.runtime.runtime import ModelInfo

    model, max_batch = ctx.model, ctx.settings.batch["max"]
    info = ModelInfo(model.name, tuple(model.image_shape), model.num_classes)
    loaded: dict = {}

    def engine(i: int, int8: bool):
        if (i, int8) not in loaded:
            entry = int8_entries[i] if int8 else steps[i]["engine"]
            ins, outs = step_specs(steps[i])
            loaded[i, int8] = OnnxRuntimeEngine(
                ctx.out_dir / entry["file"],
                ins,
                outs,
                max_batch,
                threads=torch.get_num_threads(),
                optimization="none",
                name=f"step {i} ({'int8' if int8 else 'fp32'})",
            )
        return loaded[i, int8]

    def make_runtime(mask):
        return Runtime(
            [engine(i, bool(q)) for i, q in enumerate(mask)], ctx.plan, ctx.coeffs, info, "onnxruntime", max_batch
        )

    report = fid_gate(ctx, make_runtime, "int8")
    for i, decision in enumerate(report["steps"]):
        if decision["int8"]:
            steps[i]["engine"] = int8_entries[i]
    for e in loaded.values():
        e.close()
    return report
