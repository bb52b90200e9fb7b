"""The plain-torch computations the kernels must reproduce.

The reference of the update is the core's own :func:`step_update` (the one
place the sampler arithmetic lives) and that of the embedding is the UNet's
:func:`timestep_embedding`; both are re-exported here so the kernels and their
tests name one source of truth. The float64 versions are what the tests
measure errors against: the same formulas, evaluated with float64 constants
and float64 arithmetic on the (upcast) inputs.
"""

from __future__ import annotations

import math

import torch

from autodiffusion_rt.diffusion.samplers import StepCoefficients, step_update
from autodiffusion_rt.models.unet import timestep_embedding

__all__ = [
    "step_update",
    "step_update_float64",
    "step_update_magnitude",
    "timestep_embedding",
    "timestep_embedding_float64",
]


def _f64(t):
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def step_update_float64(coeffs_row, x, eps, prev_x0=None, noise=None):
    """(x_prev, x0) of :func:`step_update` in float64, on the CPU."""
    row = StepCoefficients(*(float(v) for v in coeffs_row))
    return step_update(row, _f64(x), _f64(eps), _f64(prev_x0), _f64(noise))


def step_update_magnitude(coeffs_row, x, eps, prev_x0=None, noise=None):
    """(S_prev, S_0): elementwise sum of |term| of each output, in float64.

    The scale a float32 evaluation's rounding error is proportional to (the
    terms may cancel, so |output| alone would be too strict a scale).
    """
    row = StepCoefficients(*(float(v) for v in coeffs_row))
    x, eps = _f64(x).abs(), _f64(eps).abs()
    s0 = abs(row.x0_from_x) * x + abs(row.x0_from_eps) * eps
    s_prev = abs(row.c_x) * x + abs(row.c_eps) * eps
    if row.c_prev_x0 != 0.0:
        s_prev = s_prev + abs(row.c_prev_x0) * _f64(prev_x0).abs()
    if row.c_noise != 0.0:
        s_prev = s_prev + abs(row.c_noise) * _f64(noise).abs()
    return s_prev, s0


def timestep_embedding_float64(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM's embedding [cos | sin] (+ a zero column if dim is odd) in float64, on the CPU.

    ``t`` is taken as given (not first rounded to float32 as the float32 path does).
    """
    half = dim // 2
    t = _f64(t)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
