"""Fused kernels for the sampler hot path: Triton and their torch references.

* :func:`fused_step_update` -- the whole sampler step (see
  ``autodiffusion_rt.diffusion.samplers``) in one pass over memory.
* :func:`timestep_embedding` -- ADM's sinusoidal timestep embedding.
* :mod:`kernels.reference` -- the plain-torch computations they must match.

The core reaches this package only through :func:`fast_step_update` and
:func:`fast_timestep_embedding`, which return the Triton implementation when it
can run on the given tensors and None otherwise. Importing this package never
imports triton: the Triton module is loaded on first use, so a machine without
triton (or a GPU) pays nothing. ``AUTODIFFUSION_RT_KERNELS=0`` forces the torch
path everywhere.
"""

from kernels.dispatch import (
    ENV_VAR,
    fast_step_update,
    fast_timestep_embedding,
    kernels_enabled,
    load_triton_kernels,
)

__all__ = [
    "ENV_VAR",
    "fast_step_update",
    "fast_timestep_embedding",
    "fused_step_update",
    "kernels_enabled",
    "load_triton_kernels",
    "timestep_embedding",
]


def __getattr__(name):
    # The Triton entry points, loaded (with triton) only when asked for.
    if name in ("fused_step_update", "timestep_embedding"):
        from kernels import triton_kernels

        return getattr(triton_kernels, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
