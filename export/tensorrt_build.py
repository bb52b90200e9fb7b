"""ONNX -> serialized TensorRT engine, with the TensorRT Python API (10.x and 11.x).

Kept thin and close to NVIDIA's own samples:

* the network comes from the ONNX parser;
* precision: TensorRT 10.x builds a weakly typed network from the float32
  ONNX and takes ``BuilderFlag.FP16`` for fp16; TensorRT 11.x removed the
  precision flags and every network is strongly typed, so fp16 must already
  be in the ONNX types (the exporter writes a float16 graph for it, see
  :func:`onnx_dtype_for`);
* one optimization profile covering the batch range (min, opt, max) for every
  input;
* a timing cache file that every step's build reads and extends (written
  atomically after each build), so later steps and rebuilds tune faster;
* the serialized engine is written atomically;
* ``strip_weights``: a weight-stripped engine (``BuilderFlag.STRIP_PLAN`` with
  ``REFIT_IDENTICAL``: optimized for exactly the ONNX file's weights), a
  fraction of the size; the runtime refits it from that ONNX file at load
  (:class:`~autodiffusion_rt.runtime.backends.trt_backend.TensorRTEngine`).

``tensorrt`` is imported here only when a build is asked for.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

from autodiffusion_rt.errors import EngineError
from autodiffusion_rt.runtime.backends.trt_backend import import_tensorrt, tensorrt_major
from autodiffusion_rt.utils import atomic_write

__all__ = ["build_tensorrt_engine", "onnx_dtype_for", "strongly_typed"]


def strongly_typed(trt) -> bool:
    """TensorRT 11+ networks are always strongly typed (precision from the ONNX types)."""
    return tensorrt_major(trt) >= 11


def onnx_dtype_for(precision: str, backend: str, trt=None) -> str:
    """The dtype the step's ONNX graph computes in: ``float16`` only where the types carry the precision.

    onnxruntime has no precision switch for its CPU and CUDA providers, so an
    fp16 build exports a float16 graph; TensorRT 11 (strongly typed) likewise;
    TensorRT 10 builds fp16 from the float32 graph with ``BuilderFlag.FP16``.
    """
    if precision == "fp32":
        return "float32"
    if backend == "tensorrt" and not strongly_typed(trt if trt is not None else import_tensorrt()):
        return "float32"
    return "float16"


def _parse(trt, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(k)) for k in range(parser.num_errors)]
        raise EngineError(f"TensorRT's ONNX parser rejects {onnx_path.name}: {'; '.join(errors) or 'no details'}")
    return parser


def _timing_cache(trt, config, path: Optional[Path]):
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if cache is None and data:
        warnings.warn(f"TensorRT cannot read the timing cache {path}; starting a new one")
        cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if data:
            warnings.warn(f"the timing cache {path} was made on another device or TensorRT; starting a new one")
            cache = config.create_timing_cache(b"")
            if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
                raise EngineError("TensorRT refused an empty timing cache")
        else:
            raise EngineError("TensorRT refused an empty timing cache")
    return cache


def _check_precision(trt, typed: bool, precision: str, onnx_dtype: str) -> None:
    """The precision asked for against what the ONNX graph's types allow (strongly typed: they decide it)."""
    if precision not in ("fp32", "fp16"):
        raise EngineError(f"precision={precision!r}: choose fp32 or fp16")
    if typed and precision == "fp16" and onnx_dtype != "float16":
        raise EngineError(
            f"TensorRT {trt.__version__} builds strongly typed networks: an fp16 engine needs a float16 ONNX graph "
            "(the build exports one when asked for --precision fp16)"
        )
    if typed and precision == "fp32" and onnx_dtype != "float32":
        raise EngineError("an fp32 TensorRT engine needs a float32 ONNX graph")


def _set_flags(trt, config, typed: bool, precision: str, workspace_bytes: Optional[int], strip_weights: bool) -> None:
    """The builder config's workspace limit, precision flags and weight stripping."""
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if precision == "fp16" and not typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default: "fp32" engines would round matmul/conv inputs to a 10-bit mantissa.
        config.clear_flag(trt.BuilderFlag.TF32)
    if strip_weights:
        # REFIT_IDENTICAL (not REFIT): the engine is refitted with the very weights it was built with, so
        # TensorRT may keep its weight-dependent optimizations; STRIP_PLAN leaves those weights out of the plan.
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)


def _add_profile(builder, network, config, profile: Mapping[str, Sequence[Sequence[int]]], onnx_path: Path) -> None:
    """One optimization profile: (min, opt, max) shapes for every network input, no more, no fewer."""
    opt_profile = builder.create_optimization_profile()
    names = {network.get_input(k).name for k in range(network.num_inputs)}
    if set(profile) != names:
        raise EngineError(
            f"{onnx_path.name}: the shape profile names {sorted(profile)} but the network's inputs are {sorted(names)}"
        )
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi))
    if config.add_optimization_profile(opt_profile) < 0:
        raise EngineError(f"{onnx_path.name}: TensorRT rejected the optimization profile {dict(profile)}")


def build_tensorrt_engine(
    onnx_path,
    engine_path,
    *,
    precision: str = "fp32",
    profile: Mapping[str, Sequence[Sequence[int]]],
    timing_cache=None,
    workspace_bytes: Optional[int] = None,
    onnx_dtype: str = "float32",
    verbose: bool = False,
    trt=None,
    strip_weights: bool = False,
) -> dict:
    """Build ``onnx_path`` into a serialized engine at ``engine_path``.

    ``profile``: ``{input name: (min shape, opt shape, max shape)}``.
    ``timing_cache``: a file read before and rewritten after the build.
    ``onnx_dtype``: the compute dtype of the ONNX graph (``float16`` for a
    strongly typed fp16 build). ``strip_weights``: leave the refittable
    weights out of the engine (they come back from ``onnx_path`` at load).
    Returns ``{"seconds", "bytes", "strongly_typed", "tensorrt"}``.
    """
    trt = trt if trt is not None else import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    typed = strongly_typed(trt)
    _check_precision(trt, typed, precision, onnx_dtype)
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # No creation flags: explicit batch is the only mode since 10.0, and 11.x
    # networks are always strongly typed (its STRONGLY_TYPED flag is a
    # deprecated no-op); 10.x stays weakly typed so BuilderFlag.FP16 applies.
    network = builder.create_network(0)
    parser = _parse(trt, network, logger, onnx_path)
    config = builder.create_builder_config()
    _set_flags(trt, config, typed, precision, workspace_bytes, strip_weights)
    _add_profile(builder, network, config, profile, onnx_path)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache = _timing_cache(trt, config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
    data = memoryview(serialized)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(engine_path, "wb") as f:
        f.write(data)
    if cache_path is not None:
        updated = config.get_timing_cache() or cache
        with atomic_write(cache_path, "wb") as f:
            f.write(memoryview(updated.serialize()))
    del parser
    return {
        "seconds": time.perf_counter() - start,
        "bytes": data.nbytes,
        "strongly_typed": typed,
        "tensorrt": str(trt.__version__),
    }
