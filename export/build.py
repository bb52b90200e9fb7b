"""Plan -> engine dir: one verified ONNX file and one engine per step, and ``manifest.json``.

:func:`build_engines` is what ``autodiffusion-rt build`` runs. For each step it
reuses what the previous build left when the cache rules allow
(:mod:`export.cache`), otherwise exports the step module to ONNX and compiles
the engine:

* ``onnxruntime``: the engine is the ONNX graph after onnxruntime's offline
  basic optimizations (constant folding, redundant-node removal: portable
  across its CPU, CUDA and TensorRT providers), checked and verified against
  the exported graph;
* ``tensorrt``: a serialized TensorRT engine per step (:mod:`export.tensorrt_build`),
  a shared timing cache in the dir.

Every file is written atomically under a content-derived name, the manifest
last (atomically), and only then are files the new manifest no longer names
deleted: a build interrupted at any point leaves the previous engine dir
usable, or a dir without a manifest that ``Runtime.load`` reports as
unfinished, never a half-valid one. Layout::

    DIR/manifest.json
    DIR/onnx/stepNN-<key>.onnx        verified export of step NN
    DIR/engines/stepNN-<key>.onnx     onnxruntime engine  (or .plan for TensorRT)
    DIR/timing.cache                  TensorRT timing cache (tensorrt backend)
    DIR/build-progress.json           the steps a running (or killed) build finished; gone once its manifest is
                                      written (the next build reuses them: a kill -9 loses no finished step)
    DIR/ort_trt_cache/                onnxruntime TensorRT provider caches (at run time)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from autodiffusion_rt.diffusion.step_io import step_io
from autodiffusion_rt.errors import BackendUnavailableError, EngineError
from autodiffusion_rt.models import load_model_for_plan
from autodiffusion_rt.plan import Plan
from autodiffusion_rt.runtime.engines import cpu_isa, cuda_compute_capability, import_onnxruntime, import_tensorrt, ort_session_options
from autodiffusion_rt.runtime.manifest import MANIFEST_NAME, Manifest, library_versions
from autodiffusion_rt.utils import LockBusy, file_lock, path_error, set_default_mode, sha256_file

from .cache import engine_record, canonical_hash, file_state, onnx_key, remove_unreferenced
from .cache import PROGRESS_NAME, read_progress, step_file, write_progress
from .onnx_export import DEFAULT_OPSET, FP32_COND_TOL, FP32_TOL, _ort_session, _temp_beside, export_step_onnx, import_onnx
from .subnet import LABEL_MODES, StepModule, half_unet, resolve_label_mode

__all__ = ["BUILD_BACKENDS", "BuildReport", "build_engines", "optimize_for_onnxruntime"]

BUILD_BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
#: The level onnxruntime engines are saved at: the one the CPU provider runs at, so loading optimizes nothing.
ORT_ENGINE_LEVEL = "all"


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
        n = len(self.steps)
        return (
            f"{self.engine_dir}: {n} step engines ({self.manifest['backend']}, {self.manifest['precision']}, "
            f"batch <= {self.manifest['batch']['max']}); ONNX {self.count('onnx', 'exported')} exported, "
            f"{self.count('onnx', 'reused')} reused; engines {self.count('engine', 'built')} built, "
            f"{self.count('engine', 'reused')} reused; {self.seconds:.1f} s"
        )


def optimize_for_onnxruntime(onnx_path, engine_path, *, check_batch: int = 2, term_scales=None, level: str = "all",
                             verify: bool = True) -> dict:
    """The onnxruntime engine: ``onnx_path`` optimized offline at ``level``, checked and verified, written atomically.

    ``all`` (the level onnxruntime's CPU provider runs at) includes the
    layout transformation to NCHWc blocks sized for this CPU's vector
    instructions: the file then runs only on that instruction set
    (:func:`~autodiffusion_rt.runtime.engines.cpu_isa`, in the engine record)
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
    tmp = _temp_beside(engine_path, ".onnx.tmp")
    try:
        so = ort_session_options(threads=torch.get_num_threads(), optimization=level, optimized_model_path=tmp)
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        if level == "basic":  # higher levels add onnxruntime's own operator domains, unknown to the checker
            try:
                onnx.checker.check_model(str(tmp))
            except Exception as e:
                raise EngineError(f"onnxruntime's optimized graph for {onnx_path.name} fails onnx.checker: {str(e).splitlines()[0]}") from None
        if not verify:  # int8: onnxruntime's QDQ fusions round differently by design; the FID check judges it
            _ort_session(tmp, "none")
            os.replace(tmp, engine_path)
            return {"seconds": time.perf_counter() - start}
        src, opt = _ort_session(onnx_path, "none"), _ort_session(tmp, "none")
        rng = np.random.default_rng(0)
        feeds = {}
        for i in src.get_inputs():
            shape = [check_batch if not isinstance(d, int) else d for d in i.shape]
            feeds[i.name] = rng.integers(0, 1, shape).astype(np.int64) if "int64" in i.type else rng.standard_normal(shape).astype(np.float32)
        scales = list(term_scales or [])
        for k, (a, b) in enumerate(zip(src.run(None, feeds), opt.run(None, feeds))):
            diff = float(np.max(np.abs(a.astype(np.float64) - b)))
            bound = FP32_TOL * max(1.0, float(np.max(np.abs(a)))) + FP32_COND_TOL * (scales[k] if k < len(scales) else 0.0)
            if not diff <= bound:
                raise EngineError(f"onnxruntime's optimized graph for {onnx_path.name} differs from it by {diff:.3g} (> {bound:.3g})")
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


def build_engines(
    plan: Plan,
    out_dir,
    *,
    backend: str = "onnxruntime",
    precision: str = "fp32",
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

    ``model``: the plan's DiffusionModel (loaded from the plan's spec when
    None). ``force``: export and compile every step again. One build at a
    time per dir (an fcntl lock on ``DIR/.build.lock``): another build of the
    same dir waits when ``wait_lock``, else this is an EngineError. A dir that
    is already up to date is left untouched (it may be read-only).

    ``precision="int8"`` (onnxruntime): every step is also quantized
    (:mod:`export.quantize`, calibrated on ``int8_calibration_samples`` of the
    plan's own trajectory) and kept in int8 only if the plan's FID on
    ``int8_fid_samples`` samples (``fid_extractor`` against ``fid_reference``:
    a dataset name or FeatureStats) rises by at most ``int8_max_fid_rise``
    over fp32; the manifest's ``int8`` entry and each step's ``precision`` say
    which steps passed.

    ``strip_weights`` (tensorrt): weight-stripped engines, refitted at load
    from the step's ONNX file in the dir; recorded in each engine's record
    (so it is part of the cache key) and in the manifest's ``weights``.
    """
    start = time.perf_counter()
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    if not isinstance(plan, Plan):
        raise EngineError(f"expected a Plan, got {type(plan).__name__}: load it with Plan.load(path)")
    Plan.from_dict(plan.to_dict(), "plan")  # the manifest embeds the plan: it must load back (PlanError names the field)
    if backend not in BUILD_BACKENDS:
        raise EngineError(f"backend={backend!r}: choose one of {', '.join(BUILD_BACKENDS)}")
    if precision not in PRECISIONS:
        raise EngineError(f"precision={precision!r}: choose fp32, fp16 or int8")
    if strip_weights and backend != "tensorrt":
        raise EngineError(f"strip_weights is for TensorRT engines (refitted at load), not {backend}: drop --strip-weights "
                          "or build with --backend tensorrt")
    if precision == "int8" and backend != "onnxruntime":
        raise EngineError("precision='int8' is built for onnxruntime (static QDQ quantization): use --backend onnxruntime")
    if precision == "int8":
        for name, value in (("int8_fid_samples", int8_fid_samples), ("int8_calibration_samples", int8_calibration_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise EngineError(f"{name}={value!r}: pass an integer >= 2")
    if label_mode not in LABEL_MODES:
        raise EngineError(f"label_mode={label_mode!r}: choose one of {', '.join(LABEL_MODES)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 17:
        raise EngineError(f"opset={opset!r}: use 17 or newer")
    batch = _batch_profile(max_batch, opt_batch)
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes < 1):
        raise EngineError(f"workspace_bytes={workspace_bytes!r}: pass a positive integer (--workspace-mb N)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EngineError(f"--out {out_dir} is a file; pass a directory")
    writable = _probe_dir(out_dir)
    import_onnx()
    import_onnxruntime()  # verification runs every export in onnxruntime, whatever the backend
    trt = None
    if backend == "tensorrt":
        trt = import_tensorrt()
        if cuda_compute_capability() is None:
            raise BackendUnavailableError(
                "TensorRT builds engines on an NVIDIA GPU and none was found (no driver, or cuda-python missing: "
                "pip install cuda-python); build with --backend onnxruntime on this machine"
            )
    from .tensorrt_build import onnx_dtype_for

    onnx_dtype = onnx_dtype_for("fp32" if precision == "int8" else precision, backend, trt)
    onnxslim = None
    if simplify:
        try:
            import onnxslim
        except ImportError:
            raise BackendUnavailableError("--simplify needs onnxslim: pip install onnxslim (or build without --simplify)") from None

    model = load_model_for_plan(plan, model)
    if precision == "int8":  # the FID check's extractor must read these images: say so before any work
        from autodiffusion_rt.metrics import get_extractor

        get_extractor(fid_extractor).check_shape(tuple(model.image_shape))
    coeffs = plan.coefficients(model.schedule)
    keeps = plan.keep_sets(model)
    made = []
    if writable:
        made = [d for d in [out_dir, *out_dir.parents] if not d.exists()][::-1]
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EngineError(path_error(e, out_dir, "pass --out with a writable directory", "create")) from None
    try:
        try:
            with file_lock(out_dir / LOCK_NAME, wait=wait_lock, remove=True,
                           on_wait=lambda: print(f"waiting for the other build of {out_dir} to finish", file=sys.stderr)):
                int8 = dict(int8_fid_samples=int8_fid_samples, int8_max_fid_rise=int8_max_fid_rise, fid_extractor=fid_extractor,
                            fid_reference=fid_reference, int8_calibration_samples=int8_calibration_samples, max_batch=max_batch)
                return _build_locked(plan, out_dir, model, coeffs, keeps, backend, precision, batch, label_mode, simplify,
                                     opset, force, workspace_bytes, progress, writable, trt, onnx_dtype, onnxslim, start,
                                     strip_weights=bool(strip_weights), **int8)
        except LockBusy:
            raise EngineError(
                f"another build is writing {out_dir} (it holds {out_dir / LOCK_NAME}): wait for it, pass --wait-lock to "
                "wait automatically, or build into another --out"
            ) from None
        except OSError as e:
            raise EngineError(path_error(e, out_dir, "free some space or pass --out with a writable directory")) from None
    except BaseException:
        # A failed first build leaves nothing behind: the dir it created holds only its own files.
        if out_dir in made:
            shutil.rmtree(out_dir, ignore_errors=True)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


LOCK_NAME = ".build.lock"


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


def _build_locked(plan, out_dir, model, coeffs, keeps, backend, precision, batch, label_mode, simplify, opset, force,
                  workspace_bytes, progress, writable, trt, onnx_dtype, onnxslim, start, *, int8_fid_samples, int8_max_fid_rise,
                  fid_extractor, fid_reference, int8_calibration_samples, max_batch, strip_weights=False) -> BuildReport:
    from .tensorrt_build import build_tensorrt_engine

    conditional = model.num_classes is not None

    def need_write(what: str):
        if not writable:
            raise EngineError(
                f"cannot write the engine dir {out_dir}: it is read-only, and {what} must be (re)built; "
                "make it writable or pass --out with a writable directory"
            )

    versions = library_versions(backend)
    isa = cpu_isa()
    if onnxslim is not None:
        versions["onnxslim"] = getattr(onnxslim, "__version__", None)
    old = Manifest.previous(out_dir)
    old_onnx = {s["onnx"].get("key"): s["onnx"] for s in (old or {}).get("steps", []) if isinstance(s, dict) and isinstance(s.get("onnx"), dict)}
    old_engines = {canonical_hash(s["engine"].get("record")): s["engine"] for s in (old or {}).get("steps", [])
                   if isinstance(s, dict) and isinstance(s.get("engine"), dict)}
    named = {s[k].get("file") for s in (old or {}).get("steps", []) if isinstance(s, dict) for k in ("onnx", "engine") if isinstance(s.get(k), dict)}
    for s in read_progress(out_dir):  # the steps a killed build finished: reused like the manifest's, if their hashes match
        old_onnx.setdefault(s["onnx"].get("key"), s["onnx"])
        old_engines.setdefault(canonical_hash(s["engine"].get("record")), s["engine"])
    half = None
    steps, report_steps, int8_entries = [], [], []
    calibration = None
    if precision == "int8":
        from .quantize import trajectory_feeds

        int8_settings = {"calibration_samples": int8_calibration_samples, "calibration_seed": 1, "method": "minmax-qdq-u8s8-per-channel"}
        calibration = trajectory_feeds(plan, model, int8_calibration_samples, seed=1, batch=min(max_batch, 16))
    from tqdm import tqdm

    bar = tqdm(total=len(coeffs), desc=f"build {backend} {precision}", disable=not progress, unit="step")
    try:
        for i, t in enumerate(coeffs.timesteps):
            keep = keeps[i]
            row = coeffs.row(i)
            ins, outs = step_io(coeffs, i, model.image_shape, conditional)
            mode = resolve_label_mode(model, label_mode, keep)
            key = onnx_key(
                model=model, timestep=t, row=row, keep=keep, inputs=ins, outputs=outs,
                label_mode=mode, onnx_dtype=onnx_dtype, opset=opset, simplify=simplify, versions=versions,
            )
            status = {"index": i, "timestep": t}
            # ---------------------------------------------------------- ONNX
            onnx_rel = step_file("onnx", i, key, ".onnx", named)
            onnx_entry = _reusable(out_dir, old_onnx.get(key), force, f"exporting step {i} again")
            if onnx_entry is not None:
                status["onnx"] = "reused"
            else:
                need_write(f"step {i}'s ONNX file")
                if onnx_dtype == "float16" and half is None:
                    half = half_unet(model)
                module = StepModule(model, coeffs, i, keep, label_mode=mode,
                                    dtype=torch.float16 if onnx_dtype == "float16" else torch.float32, unet=half).eval()
                res = export_step_onnx(module, out_dir / onnx_rel, opset=opset, simplify=simplify, num_classes=model.num_classes)
                set_default_mode(out_dir / onnx_rel)  # 0644 like the manifest: a service account loads it
                onnx_entry = {
                    "file": onnx_rel, "sha256": res.sha256, "bytes": res.bytes, "key": key, "nodes": res.nodes,
                    "macs_per_sample": res.macs_per_sample, "max_abs_diff": res.max_abs_diff,
                    "max_scaled_diff": res.max_scaled_diff, "term_scales": list(res.term_scales),
                    "dtype": onnx_dtype, "seconds": round(res.seconds, 3),
                }
                status["onnx"] = "exported"
            # -------------------------------------------------------- engine
            record = engine_record(onnx_sha256=onnx_entry["sha256"], backend=backend,
                                   precision="fp32" if precision == "int8" else precision,
                                   onnx_dtype=onnx_dtype, batch=batch, versions=versions, strip_weights=strip_weights,
                                   **({"isa": isa, "optimization": ORT_ENGINE_LEVEL} if backend == "onnxruntime" else {}))
            digest = canonical_hash(record)
            ext = ".plan" if backend == "tensorrt" else ".onnx"
            engine_rel = step_file("engines", i, digest, ext, named)
            engine_entry = _reusable(out_dir, old_engines.get(digest), force, f"rebuilding step {i}'s engine")
            if engine_entry is not None:
                status["engine"] = "reused"
            else:
                need_write(f"step {i}'s engine")
                target = out_dir / engine_rel
                if backend == "onnxruntime":
                    info = optimize_for_onnxruntime(out_dir / onnx_entry["file"], target, term_scales=onnx_entry.get("term_scales"),
                                                    level=ORT_ENGINE_LEVEL)
                else:
                    profile = {s.name: tuple(s.concrete(batch[k]) for k in ("min", "opt", "max")) for s in ins}
                    info = build_tensorrt_engine(out_dir / onnx_entry["file"], target, precision=precision, profile=profile,
                                                 timing_cache=out_dir / "timing.cache", workspace_bytes=workspace_bytes,
                                                 onnx_dtype=onnx_dtype, trt=trt, strip_weights=strip_weights)
                set_default_mode(target)
                engine_entry = {"file": engine_rel, "sha256": sha256_file(target), "bytes": target.stat().st_size,
                                "record": record, "seconds": round(info["seconds"], 3)}
                status["engine"] = "built"
            if calibration is not None:
                int8_entries.append(_int8_engine(out_dir, i, onnx_entry, calibration[i], versions, isa, batch,
                                                 int8_settings, old_engines, force, named))
            steps.append({
                "index": i,
                "timestep": int(t),
                "skip": list(plan.skip[i]),
                "coefficients": row._asdict(),
                "macs_per_sample": int(model.unet.macs(keep)),
                "label_mode": mode,
                "inputs": [s.to_dict() for s in ins],
                "outputs": [s.to_dict() for s in outs],
                "onnx": onnx_entry,
                "engine": engine_entry,
            })
            report_steps.append(status)
            if writable and (status["onnx"] == "exported" or status["engine"] == "built"):
                write_progress(out_dir, steps)  # a kill from here on loses no finished step
            bar.set_postfix_str(f"step {i} (t={t}): onnx {status['onnx']}, engine {status['engine']}")
            bar.update(1)
    finally:
        bar.close()
    int8_report = None
    if calibration is not None:
        int8_report = _select_int8(plan, model, coeffs, out_dir, steps, int8_entries, batch["max"], int8_fid_samples,
                                   int8_max_fid_rise, fid_extractor, fid_reference, progress)
    for step in steps:
        step["precision"] = "int8" if int8_report is not None and int8_report["steps"][step["index"]]["int8"] else (
            "fp32" if precision == "int8" else precision)
    manifest = Manifest.new(out_dir, plan=plan, model=model, backend=backend, precision=precision, batch=batch, opset=opset,
                            simplify=simplify, label_mode=label_mode if conditional else None, versions=versions, steps=steps,
                            int8=int8_report,
                            weights=("stripped" if strip_weights else "embedded") if backend == "tensorrt" else None)
    if manifest.same_build(old):
        manifest = old  # up to date: not rewritten (the dir may be read-only, and its date stays the build's)
    else:
        need_write("its manifest")
        manifest.write()
    if writable:
        referenced = [s["onnx"]["file"] for s in steps] + [s["engine"]["file"] for s in steps]
        remove_unreferenced(out_dir, referenced)  # under the build lock: any other temp file is a dead build's
        with contextlib.suppress(FileNotFoundError):
            (out_dir / PROGRESS_NAME).unlink()  # the manifest now records every step
    return BuildReport(out_dir, manifest, report_steps, time.perf_counter() - start)


def _reusable(out_dir: Path, prev: Optional[dict], force: bool, then: str) -> Optional[dict]:
    """The previous build's entry for a file when it may be reused: named by the same key and still intact.

    A file that no longer hashes to its recorded sha256 is never reused: a warning says so and ``then``.
    """
    if prev is None or force:
        return None
    state = file_state(out_dir / prev["file"], prev.get("sha256"))
    if state == "corrupt":
        warnings.warn(f"{out_dir / prev['file']} is corrupted or truncated (sha256 mismatch); {then}")
    return dict(prev) if state == "ok" else None


def _int8_engine(out_dir: Path, i: int, onnx_entry: dict, feeds, versions: dict, isa: str, batch: dict,
                 settings: dict, old_engines: dict, force: bool, named: set) -> dict:
    """Step i's int8 engine entry (quantized and optimized now, or reused by its record)."""
    from .quantize import quantize_step

    record = engine_record(onnx_sha256=onnx_entry["sha256"], backend="onnxruntime", precision="int8", onnx_dtype="float32",
                           batch=batch, versions=versions, isa=isa, optimization=ORT_ENGINE_LEVEL, int8=settings)
    digest = canonical_hash(record)
    rel = step_file("engines", i, digest, ".onnx", named)
    prev = _reusable(out_dir, old_engines.get(digest), force, f"quantizing step {i} again")
    if prev is not None:
        return prev
    start = time.perf_counter()
    target = out_dir / rel
    qdq = target.with_name(f".{target.name}.qdq")
    try:
        quantize_step(out_dir / onnx_entry["file"], qdq, feeds)
        optimize_for_onnxruntime(qdq, target, level=ORT_ENGINE_LEVEL, verify=False)
    finally:
        with contextlib.suppress(FileNotFoundError):
            qdq.unlink()
    return {"file": rel, "sha256": sha256_file(target), "bytes": target.stat().st_size, "record": record,
            "seconds": round(time.perf_counter() - start, 3)}


def _select_int8(plan, model, coeffs, out_dir: Path, steps: list, int8_entries: list, max_batch: int, n: int,
                 max_fid_rise: float, extractor, reference, progress: bool) -> dict:
    """Run the FID check (:func:`export.quantize.select_int8_steps`); swap the kept steps' engines to int8."""
    from autodiffusion_rt.metrics import fid, get_extractor, reference_stats
    from autodiffusion_rt.runtime import Runtime
    from autodiffusion_rt.diffusion.step_io import TensorSpec
    from autodiffusion_rt.runtime.engines import OnnxRuntimeEngine
    from autodiffusion_rt.runtime.runtime import ModelInfo

    from .quantize import select_int8_steps

    ext = get_extractor(extractor)
    ref = reference if not isinstance(reference, str) else reference_stats(reference, ext)
    info = ModelInfo(model.name, tuple(model.image_shape), model.num_classes)
    loaded: dict = {}

    def engine(i: int, int8: bool):
        if (i, int8) not in loaded:
            entry = int8_entries[i] if int8 else steps[i]["engine"]
            ins = [TensorSpec.from_dict(d) for d in steps[i]["inputs"]]
            outs = [TensorSpec.from_dict(d) for d in steps[i]["outputs"]]
            loaded[i, int8] = OnnxRuntimeEngine(out_dir / entry["file"], ins, outs, max_batch, threads=torch.get_num_threads(),
                                                optimization="none", name=f"step {i} ({'int8' if int8 else 'fp32'})")
        return loaded[i, int8]

    def fid_of_steps(mask) -> float:
        rt = Runtime([engine(i, bool(q)) for i, q in enumerate(mask)], plan, coeffs, info, "onnxruntime", max_batch)
        return fid(rt.sample(n, seed=0), ref, ext)

    say = None
    if progress:
        from tqdm import tqdm

        say = tqdm.write
    report = select_int8_steps(fid_of_steps, len(steps), max_fid_rise, progress=say)
    report.update(samples=n, seed=0, extractor=ext.name, max_fid_rise=float(max_fid_rise))
    for i, decision in enumerate(report["steps"]):
        if decision["int8"]:
            steps[i]["engine"] = int8_entries[i]
    for e in loaded.values():
        e.close()
    return report
