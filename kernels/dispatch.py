"""When may a Triton kernel replace the torch code? The core's only door into kernels.

:func:`fast_step_update` and :func:`fast_timestep_embedding` take exactly the
arguments of the functions they can replace and return the Triton
implementation, or None when the torch path must run. None is returned for
anything the kernels do not cover -- rather than an error -- so the torch code
stays the one place that validates input and raises:

* ``AUTODIFFUSION_RT_KERNELS=0`` (also false/off/no);
* triton missing or failing to import;
* a device Triton cannot run on: CUDA tensors need a working CUDA runtime;
  CPU tensors run only under the Triton interpreter (``TRITON_INTERPRET=1``
  set before :mod:`kernels.triton_kernels` was imported), which is for tests;
* autograd (the kernels have no backward), tracing or ONNX export (the exported
  graph must keep the plain torch ops), torch.compile, tensor subclasses;
* shapes, dtypes or layouts the kernels do not take (broadcasting,
  non-contiguous memory), or a missing prev_x0 / noise the step needs.
"""

from __future__ import annotations

import functools
import numbers
import os

import torch

ENV_VAR = "AUTODIFFUSION_RT_KERNELS"

_UPDATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TIMESTEP_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
)


def kernels_enabled() -> bool:
    """False when ``AUTODIFFUSION_RT_KERNELS`` says 0/false/off/no."""
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("0", "false", "off", "no")


@functools.lru_cache(maxsize=None)
def load_triton_kernels():
    """The :mod:`kernels.triton_kernels` module, or None when triton cannot be imported."""
    try:
        from kernels import triton_kernels
    except Exception:  # ImportError, or a broken triton install raising anything on import
        return None
    return triton_kernels


def _runnable_on(device: torch.device):
    """The Triton module if its kernels can run on ``device`` now, else None."""
    if not kernels_enabled() or device.type not in ("cuda", "cpu"):
        return None
    ops = load_triton_kernels()
    if ops is None:
        return None
    if ops.INTERPRETED:
        # The interpreter executes on host copies of the tensors: CPU always works,
        # CUDA tensors only if a CUDA runtime can copy them.
        return ops if device.type == "cpu" or torch.cuda.is_available() else None
    return ops if device.type == "cuda" and torch.cuda.is_available() else None


def _capturing_graph(tensors) -> bool:
    # A custom kernel would be opaque to (or break) each of these.
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _row_floats(coeffs_row):
    """The six constants of a row (clipped or not); None for a row the kernel does not cover."""
    try:
        values = tuple(float(v) for v in coeffs_row)
    except (TypeError, ValueError):
        return None
    if len(values) > 6:  # StepCoefficients: clip_x0, then iPNDM's eps history and the learned variance
        if values[6] != 0.0 and values[1] == 0.0:  # a clip needs x0_from_eps to re-derive eps
            return None
        if any(values[7:]):  # an eps history or a noise scale read from the model's v: not in the kernel
            return None
        values = values[:6]
    return values if len(values) == 6 else None


def fast_step_update(coeffs_row, x, eps, prev_x0=None, noise=None):
    """Triton ``fused_step_update`` if it can replace ``step_update(...)`` on these arguments, else None."""
    row = _row_floats(coeffs_row)
    if row is None:
        return None
    needed = [x, eps]
    if row[4] != 0.0:  # c_prev_x0: same rule as step_update (terms with coefficient 0 are left out)
        needed.append(prev_x0)
    if row[5] != 0.0:  # c_noise
        needed.append(noise)
    if any(type(t) is not torch.Tensor for t in needed):  # also None: step_update raises the error
        return None
    if any(
        t.shape != x.shape or t.device != x.device or t.dtype not in _UPDATE_DTYPES or not t.is_contiguous()
        for t in needed
    ):
        return None
    if _capturing_graph(needed):
        return None
    ops = _runnable_on(x.device)
    return ops.fused_step_update if ops is not None else None


def fast_timestep_embedding(t, dim, max_period=10000.0):
    """Triton ``timestep_embedding`` if it can replace the torch one on these arguments, else None."""
    if type(t) is not torch.Tensor or t.ndim != 1 or t.dtype not in _TIMESTEP_DTYPES or not t.is_contiguous():
        return None
    # dim < 2 stays torch's: for dim=1 the torch version returns (N, 0), not a zero column.
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        return None
    if isinstance(max_period, bool) or not isinstance(max_period, numbers.Real):
        return None
    if _capturing_graph([t]):
        return None
    ops = _runnable_on(t.device)
    return ops.timestep_embedding if ops is not None else None
