"""One step module -> one verified ONNX file.

:func:`export_step_onnx` traces a :class:`~export.subnet.StepModule` with the
TorchScript exporter (``dynamo=False``: much faster here, and the graphs are
plain ONNX), opset 17+, a dynamic batch dimension on every input and output.
The file is checked with ``onnx.checker``, optionally simplified with onnxslim
(constant folding, dead-node elimination), run in onnxruntime at two batch
sizes neither of which was traced, and compared with the torch module: max abs
difference at most 1e-4 in fp32 (2e-2 in fp16) for outputs of magnitude up to
1, relative to the output's magnitude beyond that, plus an allowance for the
ill-conditioned first steps of a schedule (see :func:`verify_onnx`).
Only a file that passes is renamed into place; nothing half-written is left.

:func:`graph_stats` counts nodes and MACs per sample of an ONNX file (Conv,
Gemm, MatMul, Einsum; shapes measured by running the graph at batch 1).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from autodiffusion_rt.diffusion.step_io import BATCH, PREV_X0S, TensorSpec
from autodiffusion_rt.errors import BackendUnavailableError, EngineError
from autodiffusion_rt.registry import DEFAULT_OPSET
from autodiffusion_rt.runtime.backends.ort_backend import import_onnxruntime, ort_session_options
from autodiffusion_rt.utils import sha256_file

__all__ = ["DEFAULT_OPSET", "OnnxExport", "export_step_onnx", "graph_stats", "onnx_macs", "verify_onnx"]

FP32_TOL = 1e-4  # max |onnx - torch| <= tol * max(1, max |torch|) + cond_tol * term size (see verify_onnx)
FP16_TOL = 2e-2
FP32_COND_TOL = 1e-6  # ~16 float32 ulps of the largest term
FP16_COND_TOL = 1e-2


@dataclass
class OnnxExport:
    """What :func:`export_step_onnx` wrote."""

    path: Path
    sha256: str
    bytes: int
    nodes: int
    macs_per_sample: int
    max_abs_diff: float
    max_scaled_diff: float  # max abs diff / max(1, max |output|)
    seconds: float
    term_scales: tuple[float, ...] = ()  # per output: size of the terms it is summed from (verification inputs)
    inputs: tuple[TensorSpec, ...] = field(default_factory=tuple)
    outputs: tuple[TensorSpec, ...] = field(default_factory=tuple)


def import_onnx():
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError("ONNX export needs the onnx package: pip install onnx") from None
    return onnx


def temp_beside(path: Path, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


def ort_session(path_or_bytes, optimization: str = "basic"):
    ort = import_onnxruntime()
    # as many threads as torch: no oversubscription of a busy machine
    so = ort_session_options(threads=torch.get_num_threads(), optimization=optimization)
    src = str(path_or_bytes) if isinstance(path_or_bytes, (str, Path)) else path_or_bytes
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def verify_onnx(
    path,
    reference,
    example_inputs: dict[int, tuple],
    input_names,
    tol: float,
    output_names: Sequence[str] = (),
    label: Optional[str] = None,
    cond_tol: float = 0.0,
) -> tuple[float, float]:
    """Run ``path`` in onnxruntime on each batch's inputs and compare with the torch reference.

    ``reference(*inputs) -> (outputs, scales)``. Each output must satisfy
    ``max |onnx - torch| <= tol * max(1, max |torch|) + cond_tol * scale``:
    ``tol`` absolute for outputs of magnitude up to 1 and relative beyond, plus
    an allowance for ill-conditioned arithmetic, ``scale`` being the size of
    the terms the output is computed from. At the first steps of a cosine
    schedule x_prev = c_x x + c_eps eps with c_x ~ -c_eps ~ 8e3: float32
    rounding alone (torch on 1 vs 2 threads) moves x_prev by ~1e-3 there,
    while the graph is right. Returns (max abs difference, max difference
    relative to ``max(1, |output|)``); raises EngineError above the bound.
    """
    label = label or Path(path).name
    try:
        sess = ort_session(path)
    except Exception as e:
        raise EngineError(
            f"onnxruntime cannot load the exported {label}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    worst_abs = worst_scaled = 0.0
    for batch, inputs in example_inputs.items():
        want, scales = reference(*inputs)
        got = sess.run(None, {n: t.numpy() for n, t in zip(input_names, inputs)})
        for k, (g, w) in enumerate(zip(got, want)):
            name = output_names[k] if k < len(output_names) else f"output {k}"
            if g.shape != w.shape:
                raise EngineError(f"{label}: {name} has shape {g.shape} at batch {batch}, the torch module {w.shape}")
            diff = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0
            scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
            if not math.isfinite(diff):
                raise EngineError(f"{label}: non-finite {name} at batch {batch}")
            worst_abs = max(worst_abs, diff)
            worst_scaled = max(worst_scaled, diff / scale)
            bound = tol * scale + cond_tol * (scales[k] if k < len(scales) else 0.0)
            if diff > bound:
                raise EngineError(
                    f"{label}: onnxruntime's {name} differs from the torch module by {diff:.3g} at batch {batch} "
                    f"(> {bound:.3g} = {tol:g} x max(1, |{name}|) + {cond_tol:g} x the size of its terms); "
                    "the export is wrong: report it with the plan"
                )
    return worst_abs, worst_scaled


def _term_scales(module, inputs) -> tuple[float, ...]:
    """Size of the terms each output of the step is summed from (see :func:`verify_onnx`)."""
    feeds = dict(zip(module.input_names, inputs))
    with torch.no_grad():
        eps = module.eps(feeds["x"], feeds.get("y"))
    mx = lambda t: float(t.abs().max()) if t is not None and t.numel() else 0.0  # noqa: E731
    row = module.row
    ax, ae = mx(feeds["x"]), mx(eps) + mx(feeds["x"])  # with clip_x0, eps is re-derived from x and x0
    x0 = abs(row.x0_from_x) * ax + abs(row.x0_from_eps) * ae
    x_prev = (
        abs(row.c_x) * ax
        + abs(row.c_eps) * ae
        + sum(abs(c) * mx(feeds.get(name)) for c, name in zip(row.prev_x0_coefficients, PREV_X0S))
        + abs(row.c_noise) * mx(feeds.get("noise"))
        + sum(abs(c) * mx(feeds.get(f"prev_eps{k + 1}")) for k, c in enumerate(row.prev_eps_coefficients))
    )
    # the clip-consistent eps is re-derived from x and x0
    eps_out = ae + (abs(row.x0_from_x) * ax + x0) / abs(row.x0_from_eps)
    return tuple(x0 if n == "x0" else eps_out if n == "eps" else x_prev for n in module.output_names)


def _simplify(path: Path) -> None:
    try:
        import onnxslim
    except ImportError:
        raise BackendUnavailableError(
            "--simplify needs onnxslim: pip install onnxslim (or build without --simplify)"
        ) from None
    onnx = import_onnx()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = onnxslim.slim(str(path))
    if model is None:
        raise EngineError(f"onnxslim could not simplify {path.name}; build without --simplify")
    onnx.save(model, str(path))


def export_step_onnx(
    module,
    path,
    *,
    opset: int = DEFAULT_OPSET,
    simplify: bool = False,
    num_classes: Optional[int] = None,
    tol: Optional[float] = None,
    trace_batch: int = 2,
    verify_batches: tuple[int, ...] = (1, 3),
) -> OnnxExport:
    """Export, check, (simplify,) verify and atomically write one step module to ``path``."""
    onnx = import_onnx()
    if opset < 17:
        raise EngineError(f"opset {opset} is too old: use 17 or newer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = temp_beside(path, ".onnx.tmp")
    try:
        _trace(module, tmp, opset, module.example_inputs(trace_batch, seed=0, num_classes=num_classes))
        if simplify:
            _simplify(tmp)
        _keep_declared_inputs(tmp, module.input_specs)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            raise EngineError(f"onnx.checker rejects the export of {module.label}: {str(e).splitlines()[0]}") from None
        if tol is None:
            tol = FP32_TOL if module.dtype == torch.float32 else FP16_TOL
        examples = {b: module.example_inputs(b, seed=b, num_classes=num_classes) for b in verify_batches}
        diff, scaled, seen_scales = _verify_export(module, tmp, examples, tol, label=f"{module.label} ({path.name})")
        nodes, macs = graph_stats(tmp)
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    term_scales = tuple(max(sc[k] for sc in seen_scales) for k in range(len(module.output_names)))
    return OnnxExport(
        path=path,
        sha256=digest,
        bytes=size,
        nodes=nodes,
        macs_per_sample=macs,
        max_abs_diff=diff,
        max_scaled_diff=scaled,
        seconds=time.perf_counter() - start,
        term_scales=term_scales,
        inputs=tuple(module.input_specs),
        outputs=tuple(module.output_specs),
    )


def _trace(module, tmp: Path, opset: int, args) -> None:
    """The TorchScript exporter's graph of ``module`` on ``args``, the batch axis dynamic, written to ``tmp``."""
    names_in, names_out = list(module.input_names), list(module.output_names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes={n: {0: BATCH} for n in names_in + names_out},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _keep_declared_inputs(path: Path, specs) -> None:
    """Put back, in the contract's order, the inputs the exporter dropped because the graph reads none of them (a
    step that skips every ResBlock reads no embedding or label): an engine's inputs are the step contract
    (diffusion.step_io), whatever its layers use, so every runtime feeds every step alike."""
    onnx = import_onnx()
    model = onnx.load(str(path))
    present = {i.name: i for i in model.graph.input}
    if all(s.name in present for s in specs):
        return
    declared = {s.name for s in specs}
    inputs = [
        present.get(s.name)
        or onnx.helper.make_tensor_value_info(
            s.name,
            onnx.helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype)),
            [d if d == BATCH else int(d) for d in s.shape],
        )
        for s in specs
    ] + [i for name, i in present.items() if name not in declared]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(path))


def _verify_export(module, tmp: Path, examples: dict, tol: float, label: str):
    """:func:`verify_onnx` of the export against the module itself: (max abs diff, max scaled diff, the term
    scales seen per call)."""
    seen_scales: list[tuple[float, ...]] = []

    def reference(*inputs):
        with torch.no_grad():
            out = module(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        # a step's update can be ill-conditioned (see verify_onnx); a subnetwork's output is plain
        seen_scales.append(_term_scales(module, inputs) if hasattr(module, "row") else (0.0,) * len(out))
        return tuple(o.numpy() for o in out), seen_scales[-1]

    diff, scaled = verify_onnx(
        tmp,
        reference,
        examples,
        list(module.input_names),
        tol,
        list(module.output_names),
        label=label,
        cond_tol=FP32_COND_TOL if module.dtype == torch.float32 else FP16_COND_TOL,
    )
    return diff, scaled, seen_scales


# ------------------------------------------------------------------ stats
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")


def graph_stats(path) -> tuple[int, int]:
    """(number of nodes, MACs per sample) of an ONNX file."""
    onnx = import_onnx()
    model = onnx.load(str(path))
    return len(model.graph.node), onnx_macs(model)


def onnx_macs(model) -> int:
    """MACs per sample of Conv / Gemm / MatMul / Einsum nodes, with shapes measured at batch 1.

    Static shape inference cannot see through the exporter's Shape -> Reshape
    chains (GroupNorm, attention), so the graph is run once at batch 1 with the
    operands of every such node exposed as outputs.
    """
    onnx = import_onnx()
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = [n for n in m.graph.node if n.op_type in _MAC_OPS]
    if not nodes:
        return 0
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    consts = {}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = tuple(a.t.dims)
    present = {o.name for o in m.graph.output}
    wanted = []
    for n in nodes:
        for name in [*n.input[:2], n.output[0]]:
            if name and name not in inits and name not in consts and name not in wanted:
                wanted.append(name)
    for name in wanted:
        if name not in present:
            m.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = ort_session(m.SerializeToString(), optimization="none")
    feeds = {}
    for i in sess.get_inputs():
        shape = [1 if not isinstance(d, int) else d for d in i.shape]
        feeds[i.name] = np.zeros(
            shape, np.int64 if "int64" in i.type else (np.float16 if "float16" in i.type else np.float32)
        )
    outs = sess.run(None, feeds)
    shapes = {o.name: tuple(v.shape) for o, v in zip(sess.get_outputs(), outs)}
    shapes.update(inits)
    shapes.update(consts)
    total = 0
    for n in nodes:
        a = shapes[n.input[0]]
        b = shapes[n.input[1]] if len(n.input) > 1 else ()
        out = shapes[n.output[0]]
        if n.op_type in ("Conv", "ConvTranspose"):
            if n.op_type == "Conv":  # weight [M, C/g, k...]: each output element takes C/g * prod(k)
                total += math.prod(out) * math.prod(b[1:])
            else:  # weight [C, M/g, k...]: each input element scatters into M/g * prod(k)
                total += math.prod(a) * math.prod(b[1:])
        elif n.op_type == "Gemm":
            attrs = {x.name: x for x in n.attribute}
            k = a[0] if ("transA" in attrs and attrs["transA"].i) else a[-1]
            total += math.prod(out) * k
        elif n.op_type == "MatMul":
            total += math.prod(out) * a[-1]
        else:  # Einsum: every index combination is one multiply-add
            eq = next(x.s for x in n.attribute if x.name == "equation").decode().replace(" ", "")
            lhs = eq.split("->")[0].split(",")
            sizes: dict[str, int] = {}
            for term, shape in zip(lhs, [shapes[i] for i in n.input]):
                for ch, d in zip(term, shape):
                    sizes[ch] = d
            total += math.prod(sizes.values())
    return int(total)
