"""The OpenVINO backend (CPU): one compiled subnetwork per distinct set of kept layers, shared by its steps.

OpenVINO shares nothing between compiled models (each holds its own repacked
weights), so an engine dir built for it holds one graph per distinct keep set
(:class:`export.subnet.SubnetModule`: ``x, emb -> out``), not one per step: a
plan whose steps skip the same layers runs one compiled model. What the steps
differ in is held here: each step's embedding (its timestep's, plus the
label's; ``embeddings.npz``) and its sampler update, computed in float32 torch
on the model's output (:func:`~.base.update_step`), so only the UNet body runs
in bf16. Each compiled model is cached as OpenVINO's exported blob, keyed by
the ONNX file, the OpenVINO version, the precision and the CPU's instruction
set; a blob that is stale or does not match its sha256 is recompiled from the
verified ONNX file, never imported.
"""

from __future__ import annotations

import importlib
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from ...diffusion.step_io import X, Y
from ...errors import BackendUnavailableError, EngineError
from ...models.model import eps_from_output
from ...utils import sha256_file
from ..platform import cpu_isa, has_native_bf16
from .base import Engine, LoadedEngines, step_specs, update_step

__all__ = [
    "OV_PRECISIONS",
    "CompiledSubnet",
    "OpenVINOStepEngine",
    "blob_record",
    "check_precision",
    "compile_subnet",
    "default_precision",
    "import_openvino",
    "static_batches",
    "subnet_from_entry",
    "load_engines",
    "subnet_engines",
]

#: The precisions an OpenVINO engine runs at, and OpenVINO's name for each.
OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def import_openvino():
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise BackendUnavailableError(
            "the openvino backend needs the openvino package: pip install openvino "
            "(or build with --backend onnxruntime)"
        ) from None


def default_precision() -> str:
    """bf16 on a CPU that multiplies bf16 in hardware (AVX-512 BF16, AMX), fp32 elsewhere."""
    return "bf16" if has_native_bf16() else "fp32"


def check_precision(precision: str) -> None:
    """Refuse a precision OpenVINO does not run; warn when bf16 would be emulated (slower than fp32)."""
    if precision not in OV_PRECISIONS:
        raise EngineError(f"precision={precision!r} is not an OpenVINO precision: choose {' or '.join(OV_PRECISIONS)}")
    if precision == "bf16" and not has_native_bf16():
        warnings.warn(
            f"this CPU ({cpu_isa()}) has no native bf16 arithmetic (avx512_bf16 or amx_bf16): OpenVINO "
            "emulates it, usually slower than fp32; build with --precision fp32",
            stacklevel=3,
        )


def ov_config(precision: str, threads: Optional[int]) -> dict:
    """The compile (and import) properties: the precision must be given on import too, or OpenVINO picks its own."""
    config = {"INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def static_batches(batch: Mapping) -> tuple[int, ...]:
    """The batch sizes a subnetwork is also compiled for with static shapes: 1, the dir's opt and max batch.

    OpenVINO runs static shapes faster than a dynamic batch (measured: 1.4-2x
    on the embedded model's step, bf16); other batch sizes run the dynamic one.
    """
    return tuple(sorted({1, int(batch["opt"]), int(batch["max"])}))


def blob_record(onnx_sha256: str, precision: str, batch: Optional[int] = None) -> dict:
    """What a compiled blob depends on besides its bytes: reused only when all of it matches this machine.

    ``batch``: the static batch size it was compiled for (None: a dynamic batch).
    """
    ov = import_openvino()
    return {
        "backend": "openvino",
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "openvino": str(ov.__version__),
        "isa": cpu_isa(),
        "batch": batch,
    }


def compile_subnet(onnx_path, precision: str, threads: Optional[int] = None, batch: Optional[int] = None):
    """Compile a subnetwork's ONNX file for this CPU at ``precision`` (static ``batch``, or a dynamic one)."""
    ov = import_openvino()
    try:
        core = ov.Core()
        model = core.read_model(str(onnx_path))
        if batch is not None:
            model.reshape({p.get_any_name(): [int(batch), *list(p.get_partial_shape())[1:]] for p in model.inputs})
        return core.compile_model(model, "CPU", ov_config(precision, threads))
    except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
        raise EngineError(
            f"OpenVINO cannot compile {onnx_path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            "build with --backend onnxruntime"
        ) from None


class CompiledSubnet:
    """A subnetwork's compiled variants (static batch sizes, and a dynamic batch), each loaded on its first use.

    One infer request per variant: the steps that share a subnetwork never
    run at once. ``variants`` maps a static batch size, or None for the
    dynamic one, to a no-argument loader of the compiled model.
    """

    def __init__(self, variants: Mapping[Optional[int], Callable], precision: str):
        self.variants = dict(variants)
        self.precision = precision
        self._requests: dict = {}

    def infer(self, x: np.ndarray, emb: np.ndarray) -> np.ndarray:
        """The raw output for ``x``, ``emb``: a view of the request's output, valid until its next call."""
        key = x.shape[0] if x.shape[0] in self.variants else None
        request = self._requests.get(key)
        if request is None:
            request = self._requests[key] = self.variants[key]().create_infer_request()
        request.infer({0: x, 1: emb}, share_inputs=True)
        return request.get_output_tensor(0).data


class OpenVINOStepEngine(Engine):
    """Step i of a plan: its shared subnetwork on the step's embedding, then the sampler update in float32."""

    backend = "openvino"

    def __init__(
        self,
        subnet: CompiledSubnet,
        row,
        time_emb: np.ndarray,
        label_emb: Optional[np.ndarray],
        inputs,
        outputs,
        max_batch: int,
        *,
        learn_sigma: bool,
        prediction_type: str,
        alpha_bar: Optional[float],
        name: str,
    ):
        super().__init__(name, inputs, outputs, max_batch)
        self.subnet = subnet
        self.row = row
        self.time_emb = np.ascontiguousarray(time_emb, dtype=np.float32)[None]  # [1, D]
        self.label_emb = label_emb
        self.learn_sigma, self.prediction_type, self.alpha_bar = learn_sigma, prediction_type, alpha_bar
        self._emb: dict[int, np.ndarray] = {}  # batch -> the unconditional embedding, broadcast once

    def embedding(self, y: Optional[np.ndarray], batch: int) -> np.ndarray:
        if self.label_emb is not None:
            return self.time_emb + self.label_emb[y]
        emb = self._emb.get(batch)
        if emb is None:
            emb = self._emb[batch] = np.ascontiguousarray(
                np.broadcast_to(self.time_emb, (batch, self.time_emb.shape[1]))
            )
            while len(self._emb) > 4:  # a server sees many batch sizes: keep the last few
                self._emb.pop(next(iter(self._emb)))
        return emb

    @torch.inference_mode()
    def _run(self, feeds, out, batch):
        raw = self.subnet.infer(feeds[X], self.embedding(feeds.get(Y), batch))
        x = torch.from_numpy(feeds[X])
        model_out = eps_from_output(
            torch.from_numpy(raw),
            x,
            self.learn_sigma,
            self.prediction_type,
            self.alpha_bar,
            variance=self.row.learned_variance,
        )
        return update_step(self, self.row, x, model_out, feeds, out)

    def close(self) -> None:
        self.subnet = None


def subnet_from_entry(engine_dir: Path, entry: Mapping, onnx: Callable[[], Path], onnx_sha256: str, precision: str,
                      threads: Optional[int] = None, what: str = "a subnetwork") -> CompiledSubnet:
    """A subnetwork from its manifest ``engine`` entry (the dynamic blob, and ``static``: batch -> blob entry).

    Each blob is checked now (its record against this machine, its sha256)
    and imported on first use; one that is stale, missing or corrupted is
    compiled from the verified ONNX file (``onnx()``) instead, with a warning,
    never imported.
    """
    entries = {None: entry, **{int(b): e for b, e in (entry.get("static") or {}).items()}}
    variants = {}
    for batch, e in entries.items():
        path = engine_dir / str(e.get("file"))
        record = e.get("record") or {}
        want = blob_record(onnx_sha256, precision, batch)
        stale = [k for k in want if record.get(k) != want[k]]
        why = None
        if stale:
            why = "built for " + ", ".join(f"{k} {record.get(k)!r} (here {want[k]!r})" for k in stale)
        elif not path.is_file():
            why = "missing"
        elif sha256_file(path) != e.get("sha256"):
            why = "corrupted (sha256 mismatch)"
        if why is not None:
            warnings.warn(f"{path} is {why}: compiling {what} from its ONNX file instead; 'autodiffusion-rt build "
                          f"PLAN --out {engine_dir}' caches it again", stacklevel=3)
        variants[batch] = partial(_import_or_compile, None if why else path, onnx, precision, threads, batch)
    return CompiledSubnet(variants, precision)


def _import_or_compile(blob: Optional[Path], onnx: Callable[[], Path], precision: str, threads: Optional[int],
                       batch: Optional[int]):
    if blob is not None:
        try:
            return import_openvino().Core().import_model(blob.read_bytes(), "CPU", ov_config(precision, threads))
        except Exception as e:  # a blob that passed its checks and still does not import: compile
            warnings.warn(f"{blob} does not import ({type(e).__name__}): compiling its subnetwork from ONNX instead")
    return compile_subnet(onnx(), precision, threads, batch)


def subnet_engines(
    steps,
    subnets,
    tables: dict,
    coeffs,
    *,
    max_batch: int,
    learn_sigma: bool,
    prediction_type: str,
    alphas_cumprod=None,
) -> list[OpenVINOStepEngine]:
    """One step engine per manifest step entry, step i running ``subnets[i]`` (shared between steps)."""
    engines = []
    for i, (step, subnet) in enumerate(zip(steps, subnets)):
        ins, outs = step_specs(step)
        t = int(step["timestep"])
        engines.append(
            OpenVINOStepEngine(
                subnet,
                coeffs.row(i),
                tables["time"][i],
                tables.get("label"),
                ins,
                outs,
                max_batch,
                learn_sigma=learn_sigma,
                prediction_type=prediction_type,
                alpha_bar=None if prediction_type == "epsilon" else float(alphas_cumprod[t]),
                name=f"step {i} (t={t}, openvino {subnet.precision})",
            )
        )
    return engines


def load_engines(m, plan, coeffs, *, threads: Optional[int] = None, **_) -> LoadedEngines:
    """The step engines of an openvino engine dir's manifest ``m``: one compiled model per distinct subnetwork file.

    A blob built by another OpenVINO or for another CPU is recompiled from its
    ONNX file (with a warning), whatever ``check_versions`` says: the ONNX
    file is the portable source of truth.
    """
    from ...models.loading import diffusion_schedule

    ov = import_openvino()
    steps = m["steps"]
    prediction_type = str(m["model"].get("prediction_type") or "epsilon")
    # alpha_bar is read only to turn a v-prediction into eps
    acp = diffusion_schedule(plan.model_config["diffusion"]).alphas_cumprod if prediction_type != "epsilon" else None
    compiled: dict[tuple[str, str], CompiledSubnet] = {}
    subnets = []
    for i, step in enumerate(steps):
        precision = step.get("precision", m["precision"])
        key = (step["engine"]["file"], precision)
        if key not in compiled:
            compiled[key] = subnet_from_entry(m.engine_dir, step["engine"], partial(m.step_file, i, "onnx"),
                                              step["onnx"]["sha256"], precision, threads,
                                              what=f"step {i}'s subnetwork")
        subnets.append(compiled[key])
    engines = subnet_engines(
        steps,
        subnets,
        m.embeddings(),
        coeffs,
        max_batch=int(m["batch"]["max"]),
        learn_sigma=bool(m["model"].get("learn_sigma")),
        prediction_type=prediction_type,
        alphas_cumprod=acp,
    )
    kinds = sorted({p for _, p in compiled})
    return LoadedEngines(engines, f"openvino {ov.__version__} {'+'.join(kinds)}")
