"""Noise schedules and samplers over arbitrary timestep lists.

Each module's ``__all__`` is the one list of its public names; the package re-exports them.
"""

from autodiffusion_rt.diffusion import noise, samplers, schedules
from autodiffusion_rt.diffusion.noise import *  # noqa: F401,F403
from autodiffusion_rt.diffusion.samplers import *  # noqa: F401,F403
from autodiffusion_rt.diffusion.schedules import *  # noqa: F401,F403

__all__ = [*noise.__all__, *samplers.__all__, *schedules.__all__]
