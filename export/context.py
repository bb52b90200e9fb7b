"""What every stage of a build shares: its settings, its context, and the writing of step files.

:func:`export.build.build_engines` checks its options into :class:`BuildSettings`
and keeps one build's state in a :class:`BuildContext`; the per-backend stages
(:mod:`export.build` for onnxruntime and TensorRT, :mod:`export.openvino_build`)
read it and write their files through :func:`export_entry` and
:func:`file_entry`; a low-precision build is judged by :func:`fid_gate`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from autodiffusion_rt.errors import EngineError
from autodiffusion_rt.plan import Plan
from autodiffusion_rt.registry import BUILD_BACKENDS, BUILD_PRECISIONS, DEFAULT_OPSET, LABEL_MODES
from autodiffusion_rt.runtime.manifest import Manifest
from autodiffusion_rt.utils import set_default_mode, sha256_file

from .cache import file_state
from .onnx_export import export_step_onnx

__all__ = [
    "BUILD_BACKENDS",
    "BUILD_PRECISIONS",
    "BuildContext",
    "BuildSettings",
    "export_entry",
    "fid_gate",
    "file_entry",
    "reusable",
]

@dataclass
class BuildSettings:
    """What a build was asked for, checked once (:func:`build_engines`' options, resolved)."""

    backend: str
    precision: str
    batch: dict
    label_mode: str = "auto"
    simplify: bool = False
    opset: int = DEFAULT_OPSET
    force: bool = False
    workspace_bytes: Optional[int] = None
    progress: bool = True
    strip_weights: bool = False
    #: the FID gate of a low-precision build (int8, bf16): samples, allowed relative rise, features, reference
    fid_samples: int = 2000
    max_fid_rise: float = 0.05
    fid_extractor: Any = "mnist"
    fid_reference: Any = "mnist"
    int8_calibration_samples: int = 64

    def check(self) -> None:
        """Every option against the others; an EngineError naming the bad one."""
        if self.backend not in BUILD_BACKENDS:
            raise EngineError(f"backend={self.backend!r}: choose auto or one of {', '.join(BUILD_BACKENDS)}")
        allowed = {"onnxruntime": ("fp32", "fp16", "int8"), "openvino": ("fp32", "bf16"), "tensorrt": ("fp32", "fp16")}
        if self.precision not in allowed[self.backend]:
            raise EngineError(
                f"precision={self.precision!r} is not built for {self.backend}: choose "
                f"{' or '.join(allowed[self.backend])} (bf16 runs on openvino, int8 on onnxruntime)"
            )
        if self.strip_weights and self.backend != "tensorrt":
            raise EngineError(
                f"strip_weights is for TensorRT engines (refitted at load), not {self.backend}: drop "
                "--strip-weights or build with --backend tensorrt"
            )
        for name in ("fid_samples", "int8_calibration_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise EngineError(f"{name}={value!r}: pass an integer >= 2")
        rise = self.max_fid_rise
        if isinstance(rise, bool) or not isinstance(rise, (int, float)) or not -1 < rise < 1e12:
            raise EngineError(f"max_fid_rise={rise!r}: pass a relative FID rise above -1, such as 0.05")
        if self.label_mode not in LABEL_MODES:
            raise EngineError(f"label_mode={self.label_mode!r}: choose one of {', '.join(LABEL_MODES)}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < 17:
            raise EngineError(f"opset={self.opset!r}: use 17 or newer")
        wb = self.workspace_bytes
        if wb is not None and (isinstance(wb, bool) or not isinstance(wb, int) or wb < 1):
            raise EngineError(f"workspace_bytes={wb!r}: pass a positive integer (--workspace-mb N)")


@dataclass
class BuildContext:
    """One build's inputs and what it finds on disk: the state every stage of :func:`_build_locked` reads."""

    plan: Plan
    out_dir: Path
    settings: BuildSettings
    writable: bool
    start: float
    trt: Any = None
    onnx_dtype: str = "float32"
    onnxslim: Any = None
    model: Any = None
    coeffs: Any = None
    keeps: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    isa: str = ""
    old: Optional[Manifest] = None
    old_onnx: dict = field(default_factory=dict)  # ONNX key -> the previous build's entry
    old_engines: dict = field(default_factory=dict)  # engine record hash -> the previous build's entry
    named: set = field(default_factory=set)  # files the previous manifest names (never overwritten)
    half_unet: Any = None  # fp16 builds: the float16 UNet copy the step modules share
    gate_subnets: dict = field(default_factory=dict)  # openvino bf16 gate: blob file -> its imported subnetwork

    def need_write(self, what: str) -> None:
        if not self.writable:
            raise EngineError(
                f"cannot write the engine dir {self.out_dir}: it is read-only, and {what} must be (re)built; "
                "make it writable or pass --out with a writable directory"
            )

    def reuse(self, kind: str, key: str, then: str) -> Optional[dict]:
        """The previous build's ``onnx`` (by key) or ``engine`` (by record hash) entry, if still intact."""
        prev = (self.old_onnx if kind == "onnx" else self.old_engines).get(key)
        return reusable(self.out_dir, prev, self.settings.force, then)


def export_entry(ctx: BuildContext, rel: str, module, key: str) -> dict:
    """Export ``module`` (a step or a shared subnetwork) to ``DIR/rel``, verified; its manifest ``onnx`` entry."""
    res = export_step_onnx(
        module,
        ctx.out_dir / rel,
        opset=ctx.settings.opset,
        simplify=ctx.settings.simplify,
        num_classes=ctx.model.num_classes,
    )
    set_default_mode(ctx.out_dir / rel)  # 0644 like the manifest: a service account loads it
    return {
        "file": rel,
        "sha256": res.sha256,
        "bytes": res.bytes,
        "key": key,
        "nodes": res.nodes,
        "macs_per_sample": res.macs_per_sample,
        "max_abs_diff": res.max_abs_diff,
        "max_scaled_diff": res.max_scaled_diff,
        "term_scales": list(res.term_scales),
        "dtype": ctx.onnx_dtype,
        "seconds": round(res.seconds, 3),
    }


def file_entry(out_dir: Path, rel: str, **extra) -> dict:
    """A written engine file's manifest entry: its name, sha256 and size, then ``extra`` (record, seconds)."""
    target = out_dir / rel
    set_default_mode(target)
    entry = {"file": rel, "sha256": sha256_file(target), "bytes": target.stat().st_size, **extra}
    if "seconds" in entry:
        entry["seconds"] = round(entry["seconds"], 3)
    return entry


def reusable(out_dir: Path, prev: Optional[dict], force: bool, then: str) -> Optional[dict]:
    """The previous build's entry for a file when it may be reused: named by the same key and still intact.

    A file that no longer hashes to its recorded sha256 is never reused: a warning says so and ``then``.
    """
    if prev is None or force:
        return None
    state = file_state(out_dir / prev["file"], prev.get("sha256"))
    if state == "corrupt":
        warnings.warn(f"{out_dir / prev['file']} is corrupted or truncated (sha256 mismatch); {then}")
    return dict(prev) if state == "ok" else None


def fid_gate(ctx: BuildContext, make_runtime, kind: str) -> dict:
    """The low-precision FID gate (:func:`export.quantize.select_low_precision_steps`) for ``kind`` (int8, bf16).

    ``make_runtime(mask)``: a Runtime whose step i runs in ``kind`` where
    ``mask[i]``, fp32 elsewhere. The plan's FID on ``fid_samples`` samples of
    seed 0 (``fid_extractor`` against ``fid_reference``) may rise by at most
    ``max_fid_rise`` over fp32's; the report says which steps passed.
    """
    from autodiffusion_rt.metrics import fid, get_extractor, reference_stats

    from .quantize import select_low_precision_steps

    s = ctx.settings
    ext = get_extractor(s.fid_extractor)
    ref = s.fid_reference if not isinstance(s.fid_reference, str) else reference_stats(s.fid_reference, ext)

    def fid_of_steps(mask) -> float:
        rt = make_runtime(mask)
        return fid(rt.sample(s.fid_samples, seed=0), ref, ext)

    say = None
    if s.progress:
        from tqdm import tqdm

        say = tqdm.write
    # bf16 usually passes whole (one run); int8 is decided step by step as it always was
    report = select_low_precision_steps(
        fid_of_steps, len(ctx.coeffs), s.max_fid_rise, kind=kind, progress=say, try_all_first=kind == "bf16"
    )
    report.update(samples=s.fid_samples, seed=0, extractor=ext.name, max_fid_rise=float(s.max_fid_rise))
    return report
