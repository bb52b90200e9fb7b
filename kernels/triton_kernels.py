"""Triton kernels: the fused sampler update and ADM's timestep embedding.

Importing this module imports triton. Whether the kernels are compiled for the
GPU or run by Triton's interpreter is decided when this module is imported
(triton reads ``TRITON_INTERPRET`` as ``@triton.jit`` decorates), and recorded
in :data:`INTERPRETED`.

Both kernels compute in float32 whatever the storage dtype, like the torch
float32 path they replace; on float16/bfloat16 data the fused update rounds
once per output instead of once per operation, so it is slightly more
accurate than the eager torch code, never less.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from autodiffusion_rt.errors import SamplingError

__all__ = ["INTERPRETED", "UPDATE_BLOCK", "fused_step_update", "timestep_embedding"]

#: Elements per program of the update: 4 warps x 32 lanes x 8 elements, so each
#: lane issues wide (16/32-byte) loads on the GPU.
UPDATE_BLOCK = 1024

_UPDATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _fused_step_update_kernel(
    x_ptr,
    eps_ptr,
    prev_x0_ptr,
    noise_ptr,
    x_prev_ptr,
    x0_ptr,
    n,
    x0_from_x,
    x0_from_eps,
    c_x,
    c_eps,
    c_prev_x0,
    c_noise,
    neg_inv_x0_from_eps,
    HAS_PREV_X0: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    CLIP_X0: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 offsets: a batch of large latents can pass 2**31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    eps = tl.load(eps_ptr + offs, mask=mask).to(tl.float32)
    # Same association order as step_update, so float32 results match it closely.
    x0 = x0_from_x * x + x0_from_eps * eps
    if CLIP_X0:
        # step_update's clip: x0 into [-1, 1], then the eps that agrees with it.
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        eps = (x0_from_x * x - x0) * neg_inv_x0_from_eps
    x_prev = c_x * x + c_eps * eps
    if HAS_PREV_X0:
        x_prev += c_prev_x0 * tl.load(prev_x0_ptr + offs, mask=mask).to(tl.float32)
    if HAS_NOISE:
        x_prev += c_noise * tl.load(noise_ptr + offs, mask=mask).to(tl.float32)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    tl.store(x_prev_ptr + offs, x_prev.to(x_prev_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _timestep_embedding_kernel(
    t_ptr,
    out_ptr,
    dim,
    half,
    neg_log_max_period,
    BLOCK: tl.constexpr,
    ODD_DIM: tl.constexpr,
):
    # Program (row, column block): BLOCK frequencies of one timestep.
    row = tl.program_id(0)
    col_block = tl.program_id(1)
    j = col_block * BLOCK + tl.arange(0, BLOCK)
    mask = j < half
    t = tl.load(t_ptr + row).to(tl.float32)
    # The torch reference's operation order: (-ln(P) * j) / half, then exp, then t * freq.
    freqs = tl.exp(j.to(tl.float32) * neg_log_max_period / half)
    args = t * freqs
    out_row = out_ptr + row.to(tl.int64) * dim
    tl.store(out_row + j, tl.cos(args), mask=mask)
    tl.store(out_row + half + j, tl.sin(args), mask=mask)
    if ODD_DIM:
        if col_block == 0:
            tl.store(out_row + 2 * half, 0.0)


def _kernel_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


#: True when Triton's interpreter runs these kernels (on host memory), False when compiled.
INTERPRETED = _kernel_interpreted(_fused_step_update_kernel)


def _device_guard(tensor: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _check_operands(names_tensors) -> None:
    first_name, first = names_tensors[0]
    for name, t in names_tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_step_update: {name} is a {type(t).__name__}; pass a torch.Tensor")
        if t.dtype not in _UPDATE_DTYPES:
            raise TypeError(f"fused_step_update: {name} has dtype {t.dtype}; use float32, float16 or bfloat16")
        if t.shape != first.shape or t.device != first.device:
            raise ValueError(
                f"fused_step_update: {name} is {tuple(t.shape)} on {t.device} but {first_name} is "
                f"{tuple(first.shape)} on {first.device}; the kernel does not broadcast: pass equal shapes"
            )
        if not t.is_contiguous():
            raise ValueError(f"fused_step_update: {name} is not contiguous; pass {name}.contiguous()")


def fused_step_update(coeffs_row, x, eps, prev_x0=None, noise=None):
    """:func:`autodiffusion_rt.diffusion.step_update` as one Triton kernel: returns (x_prev, x0).

    Same contract, the x0 clip included (``clip_x0``): a term whose coefficient is 0 is left out (its tensor is not
    read and may be None); a missing prev_x0 / noise that the step needs raises
    :class:`SamplingError`. Output dtypes follow torch promotion of the inputs
    that enter each output. Unlike step_update, operands must have x's shape
    (no broadcasting), one device, and contiguous memory.
    """
    # The six constants and the clip, in StepCoefficients' field order (read by position: this module
    # must not import the samplers, which reach it through kernel_hook); the kernel dispatcher never
    # hands over rows with an eps history or learned variance.
    x0_from_x, x0_from_eps, c_x, c_eps, c_prev_x0, c_noise = (float(v) for v in coeffs_row[:6])
    clip = bool(coeffs_row[6]) if len(coeffs_row) > 6 else False
    if clip and x0_from_eps == 0.0:
        raise SamplingError("this row clips x0 but its x0_from_eps is 0, so eps cannot be re-derived: use step_update")
    has_prev = c_prev_x0 != 0.0
    has_noise = c_noise != 0.0
    if has_prev and prev_x0 is None:
        raise SamplingError(
            "this step is second order and needs prev_x0 (the x0 of the previous step); "
            "pass the x0 returned by the previous step"
        )
    if has_noise and noise is None:
        raise SamplingError(
            "this step is stochastic (c_noise != 0) and needs noise; pass a standard normal "
            "tensor shaped like x (see draw_step_noise)"
        )
    operands = [("x", x), ("eps", eps)]
    operands += [("prev_x0", prev_x0)] if has_prev else []
    operands += [("noise", noise)] if has_noise else []
    _check_operands(operands)

    x0 = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, eps.dtype), device=x.device)
    x_prev_dtype = functools.reduce(torch.promote_types, (t.dtype for _, t in operands))
    x_prev = torch.empty(x.shape, dtype=x_prev_dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return x_prev, x0
    grid = (triton.cdiv(n, UPDATE_BLOCK),)
    with _device_guard(x):
        _fused_step_update_kernel[grid](
            x,
            eps,
            prev_x0 if has_prev else x,  # never read when the flag is off
            noise if has_noise else x,
            x_prev,
            x0,
            n,
            x0_from_x,
            x0_from_eps,
            c_x,
            c_eps,
            c_prev_x0,
            c_noise,
            (-1.0 / x0_from_eps) if clip else 0.0,
            HAS_PREV_X0=has_prev,
            HAS_NOISE=has_noise,
            CLIP_X0=clip,
            BLOCK=UPDATE_BLOCK,
            num_warps=4,
        )
    return x_prev, x0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM's sinusoidal embedding [cos | sin] (zero column if dim is odd), float32, shape (len(t), dim).

    ``t`` is a contiguous 1-D tensor of (possibly fractional) timesteps, any
    real dtype; like the torch version it is converted to float32 first.
    """
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"timestep_embedding: t is {got}; pass a 1-D tensor of timesteps")
    if not t.is_contiguous():
        raise ValueError("timestep_embedding: t is not contiguous; pass t.contiguous()")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"timestep_embedding: t has dtype {t.dtype}; pass real timesteps")
    dim = int(dim)
    half = dim // 2
    n = t.shape[0]
    if n == 0 or half == 0:
        return torch.zeros((n, dim), dtype=torch.float32, device=t.device)
    out = torch.empty((n, dim), dtype=torch.float32, device=t.device)
    block = min(triton.next_power_of_2(half), 1024)
    grid = (n, triton.cdiv(half, block))
    with _device_guard(t):
        _timestep_embedding_kernel[grid](
            t,
            out,
            dim,
            half,
            -math.log(max_period),
            BLOCK=block,
            ODD_DIM=bool(dim % 2),
            num_warps=4 if block >= 512 else 1,
        )
    return out
