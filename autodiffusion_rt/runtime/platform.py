"""What this machine is: the environment probes the backends and the exporter key their engines by.

The CPU's instruction set (:func:`cpu_isa`, and whether it has native bf16
arithmetic, :func:`has_native_bf16`), the GPU's compute capability
(:func:`cuda_compute_capability`, through cuda-python), and the library
versions an engine dir records (:func:`library_versions`). cuda-python is
imported lazily: its absence means "no GPU", never an import error.
"""

from __future__ import annotations

import functools
import importlib
import platform
from typing import Optional

from ..errors import BackendUnavailableError, EngineError

__all__ = [
    "cpu_flags",
    "cpu_isa",
    "cuda_check",
    "cuda_compute_capability",
    "has_native_bf16",
    "import_cudart",
    "library_versions",
]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isa() -> str:
    """The CPU's architecture and the vector extensions onnxruntime's kernels and layouts depend on.

    A graph saved after onnxruntime's layout optimization (NCHWc blocks of 8
    for AVX2, 16 for AVX-512) runs only on the instruction set it was saved
    on, so this goes into every onnxruntime engine's cache record.
    """
    flags = cpu_flags()
    wanted = (
        "sse4_1",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
        "asimd",
        "asimddp",
        "sve",
        "i8mm",
    )
    return f"{platform.machine()}:" + ",".join(f for f in wanted if f in flags)


def has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX): where bf16 engines pay."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def import_cudart():
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (12.6+) or the older ``cuda.cudart``."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailableError("the tensorrt backend needs cuda-python: pip install cuda-python")


def cuda_check(cudart, result, what: str):
    """Unwrap a cuda-python ``(err, *values)`` tuple, raising EngineError on failure."""
    if not isinstance(result, tuple):
        result = (result,)
    err = result[0]
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise EngineError(f"CUDA call {what} failed: {name}; is an NVIDIA GPU with a working driver present?")
    rest = result[1:]
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def cuda_compute_capability(device: int = 0) -> Optional[str]:
    """``"major.minor"`` of the GPU, or None when cuda-python, a driver or a GPU is missing.

    Only "there is no GPU" answers None; any other CUDA error (a broken
    driver, a device in a bad state) is raised, not mistaken for no GPU.
    """
    try:
        cudart = import_cudart()
    except BackendUnavailableError:
        return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0:
        # cudaErrorNoDevice (100), cudaErrorInsufficientDriver (35): no usable GPU here
        if int(err) in (100, 35) or getattr(err, "name", "") in ("cudaErrorNoDevice", "cudaErrorInsufficientDriver"):
            return None
        cuda_check(cudart, (err,), "cudaGetDeviceCount")
    if count < 1:
        return None
    attr = cudart.cudaDeviceAttr
    major = cuda_check(
        cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute"
    )
    minor = cuda_check(
        cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute"
    )
    return f"{major}.{minor}"


def library_versions(backend: Optional[str] = None) -> dict:
    """Versions that matter for engine reuse; the compute capability only when the backend is tensorrt."""
    import torch

    from .. import __version__

    out: dict[str, Optional[str]] = {"autodiffusion_rt": __version__, "torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "openvino", "tensorrt"):
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception:
            out[name] = None
    out["compute_capability"] = cuda_compute_capability() if backend == "tensorrt" else None
    return out
