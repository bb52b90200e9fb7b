"""ctypes access to the CMake-built libraries of ``kernels/csrc`` (C ABI in adrt_kernels.h).

Build them first (pip does not)::

    cmake -S . -B build && cmake --build build

then ``NativeLibrary("build/libadrt_kernels_cpu.so")`` (host tensors) or
``NativeLibrary("build/libadrt_kernels_cuda.so")`` (CUDA tensors, launched on
torch's current stream).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from autodiffusion_rt.diffusion.samplers import StepCoefficients
from autodiffusion_rt.errors import SamplingError

__all__ = ["DEVICE_CPU", "DEVICE_CUDA", "DTYPE_CODES", "ERRORS", "NativeLibrary"]

#: torch dtype -> the ADRT_* dtype code of adrt_kernels.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DEVICE_CPU, DEVICE_CUDA = 0, 1
#: Negative return codes of adrt_kernels.h (positive ones are cudaError_t values).
ERRORS = {
    -1: "unsupported dtype",
    -2: "negative element count",
    -3: "NULL x, eps, x_prev or x0",
    -4: "c_prev_x0 != 0 but prev_x0 is NULL",
    -5: "c_noise != 0 but noise is NULL",
}

_c_float = ctypes.c_float


class NativeLibrary:
    """One loaded adrt_kernels library (CPU or CUDA, as it reports)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path} does not exist; build it with `cmake -S . -B build && cmake --build build`"
            )
        self._lib = ctypes.CDLL(str(self.path))
        fn = self._lib.adrt_fused_step_update
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 6 + [_c_float] * 6 + [ctypes.c_void_p]
        self._update = fn
        self._lib.adrt_library_device.restype = ctypes.c_int
        self._lib.adrt_library_device.argtypes = []
        self.device_kind = self._lib.adrt_library_device()

    def raw_update(self, dtype_code, n, x, eps, prev_x0, noise, x_prev, x0, coeffs, stream=None) -> int:
        """The C function as is (pointers as ints or None); returns its status code."""
        return self._update(dtype_code, n, x, eps, prev_x0, noise, x_prev, x0, *coeffs, stream)

    def fused_step_update(self, coeffs_row, x, eps, prev_x0=None, noise=None):
        """Same contract as ``step_update``, on contiguous same-shape, same-dtype tensors."""
        row = StepCoefficients(*(float(v) for v in coeffs_row))
        if row.clip_x0:
            raise SamplingError("this row clips x0 (clip_denoised), which the fused kernel does not do: use step_update")
        want = "cuda" if self.device_kind == DEVICE_CUDA else "cpu"
        operands = {"x": x, "eps": eps}
        if row.c_prev_x0 != 0.0:
            if prev_x0 is None:
                raise SamplingError("this step is second order and needs prev_x0; pass the previous step's x0")
            operands["prev_x0"] = prev_x0
        if row.c_noise != 0.0:
            if noise is None:
                raise SamplingError("this step is stochastic (c_noise != 0) and needs noise shaped like x")
            operands["noise"] = noise
        for name, t in operands.items():
            if t.device.type != want or t.dtype != x.dtype or t.shape != x.shape or not t.is_contiguous():
                raise ValueError(
                    f"{name}: {t.dtype} {tuple(t.shape)} on {t.device}; this library takes contiguous {want} "
                    f"tensors of one dtype and shape (x: {x.dtype} {tuple(x.shape)})"
                )
        if x.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
        x_prev, x0 = torch.empty_like(x), torch.empty_like(x)
        stream = torch.cuda.current_stream(x.device).cuda_stream if want == "cuda" else None
        ptr = lambda name: operands[name].data_ptr() if name in operands else None  # noqa: E731
        status = self.raw_update(
            DTYPE_CODES[x.dtype], x.numel(), ptr("x"), ptr("eps"), ptr("prev_x0"), ptr("noise"),
            x_prev.data_ptr(), x0.data_ptr(), tuple(row)[:6], stream,
        )
        if status != 0:
            what = ERRORS.get(status, f"CUDA error {status}")
            raise RuntimeError(f"adrt_fused_step_update failed ({what}) in {self.path}")
        return x_prev, x0
