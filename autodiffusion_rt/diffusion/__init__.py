"""Noise schedules and samplers over arbitrary timestep lists."""

from autodiffusion_rt.diffusion.noise import DRAW_ORDER, MAX_SEED, SampleNoise, check_seed
from autodiffusion_rt.diffusion.samplers import (
    SAMPLERS,
    EpsFn,
    SamplerCoefficients,
    StepCoefficients,
    compute_coefficients,
    draw_step_noise,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_ipndm,
    sample_loop,
    step_update,
)
from autodiffusion_rt.diffusion.schedules import (
    SCHEDULE_NAMES,
    SPACINGS,
    NoiseSchedule,
    uniform_timesteps,
    validate_timesteps,
)

__all__ = [
    "DRAW_ORDER",
    "MAX_SEED",
    "SampleNoise",
    "check_seed",
    "SAMPLERS",
    "SCHEDULE_NAMES",
    "SPACINGS",
    "EpsFn",
    "NoiseSchedule",
    "SamplerCoefficients",
    "StepCoefficients",
    "compute_coefficients",
    "draw_step_noise",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_ipndm",
    "sample_loop",
    "step_update",
    "uniform_timesteps",
    "validate_timesteps",
]
