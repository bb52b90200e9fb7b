"""int8 steps for onnxruntime: static QDQ quantization per step, kept only where FID allows.

:func:`quantize_step` quantizes one step's exported fp32 graph with
``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel int8
weights, uint8 activations: the u8s8 kernels that use AVX-512 VNNI / AVX-VNNI),
calibrated (min-max) on that step's own inputs along the plan's trajectory
(:func:`trajectory_feeds`: the plan run on the torch reference).

:func:`select_low_precision_steps` then decides step by step, in schedule order, which
int8 engines to keep: a step stays int8 only if the plan's FID with it (and
the steps already kept) is at most ``(1 + max_fid_rise)`` times the all-fp32
plan's FID, on the same ``n`` samples and seed. The build records every
decision and the FIDs in the manifest.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from autodiffusion_rt.errors import BackendUnavailableError, EngineError

__all__ = ["quantize_step", "select_low_precision_steps", "trajectory_feeds"]


def trajectory_feeds(plan, model, n: int, seed: int, batch: int) -> list[list[dict]]:
    """Per step, the feeds that step receives when the plan samples ``n`` images (torch reference), in batches."""
    from autodiffusion_rt.runtime import Runtime

    recorded: list[list[dict]] = []
    with Runtime.from_plan(plan, model=model) as rt:
        rt.max_batch = int(batch)
        for eng in rt.engines:
            seen: list[dict] = []
            recorded.append(seen)
            run = eng._run

            def recording_run(feeds, out, b, run=run, seen=seen):
                seen.append({k: np.array(v, copy=True) for k, v in feeds.items()})
                return run(feeds, out, b)

            eng._run = recording_run  # the runtime's bound steps look _run up at every call
        rt.sample(n, seed=seed)
    return recorded


@contextlib.contextmanager
def _calibration_threads(threads: int):
    # onnxruntime.quantization's calibration session takes the default thread count
    # (every core); on a shared machine that oversubscribes it like any other session.
    from onnxruntime.quantization import calibrate

    original = calibrate.CalibraterBase.create_inference_session

    def create_inference_session(self):
        import onnxruntime

        from autodiffusion_rt.runtime.backends.ort_backend import ort_session_options

        so = ort_session_options(threads=threads, optimization="none")
        self.infer_session = onnxruntime.InferenceSession(
            self.augmented_model_path, sess_options=so, providers=self.execution_providers
        )

    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        calibrate.CalibraterBase.create_inference_session = original


def quantize_step(onnx_path, out_path, feeds: Sequence[dict]) -> None:
    """Write the QDQ int8 version of one step's fp32 ONNX graph, calibrated on ``feeds`` (written atomically)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise BackendUnavailableError(
            "int8 builds need onnxruntime's quantization tools: pip install -U onnxruntime onnx"
        ) from None
    from .onnx_export import temp_beside

    if not feeds:
        raise EngineError(f"no calibration inputs for {Path(onnx_path).name}")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pre, tmp = temp_beside(out_path, ".pre.onnx.tmp"), temp_beside(out_path, ".onnx.tmp")
    try:
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        with _calibration_threads(torch.get_num_threads()):
            quantize_static(
                str(pre),
                str(tmp),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        tmp.replace(out_path)
    finally:
        for f in (pre, tmp):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


def select_low_precision_steps(
    fid_of_steps: Callable[[Sequence[bool]], float],
    nfe: int,
    max_fid_rise: float,
    kind: str = "int8",
    progress: Optional[Callable[[str], None]] = None,
    try_all_first: bool = False,
) -> dict:
    """Which steps may run in low precision (``kind``: int8, bf16): the plan's FID may rise at most ``max_fid_rise``.

    ``fid_of_steps(mask)`` samples the plan with the steps where ``mask`` is
    True in low precision and returns its FID. ``try_all_first``: every step
    low at once first (one sampling run when it passes); otherwise, or when
    that fails, greedy in schedule order: keep step i low if the FID with it
    stays within the limit. Returns ``{"fid_fp32", "limit", "steps": [{kind:
    bool, "fid": float}]}`` (``fid``: the trial that decided the step).
    """
    base = float(fid_of_steps([False] * nfe))
    limit = base * (1.0 + float(max_fid_rise))

    def within(score: float) -> bool:
        return bool(np.isfinite(score) and score <= limit)

    if try_all_first:
        score = float(fid_of_steps([True] * nfe))
        if progress is not None:
            progress(
                f"every step {kind}: FID {score:.3f} vs fp32 {base:.3f}, limit {limit:.3f}: "
                f"{'kept' if within(score) else 'trying step by step'}"
            )
        if within(score):
            return {
                "fid_fp32": round(base, 4),
                "limit": round(limit, 4),
                "fid": round(score, 4),
                "steps": [{kind: True, "fid": round(score, 4)} for _ in range(nfe)],
            }
    kept = [False] * nfe
    steps = []
    for i in range(nfe):
        trial = list(kept)
        trial[i] = True
        score = float(fid_of_steps(trial))
        ok = within(score)
        if ok:
            kept = trial
        steps.append({kind: ok, "fid": round(score, 4)})
        if progress is not None:
            progress(f"step {i}: {kind} FID {score:.3f} vs limit {limit:.3f}: {'kept' if ok else 'fp32'}")
    return {"fid_fp32": round(base, 4), "limit": round(limit, 4), "steps": steps}
