"""Noise schedules and timestep lists.

A :class:`NoiseSchedule` is the training-time forward process of a pretrained
model (its betas and their cumulative product). Samplers never run all of its
steps: they walk a short, strictly descending list of integer timesteps (indices
into the schedule). :func:`validate_timesteps` is the one gate every such list
passes, and :func:`uniform_timesteps` gives the baseline lists the project's
search is compared against.

Everything here is numpy float64 and exact integer arithmetic: the schedule is
the ground truth that sampler coefficients, plans and engines are derived from.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

import numpy as np

from autodiffusion_rt.errors import SamplingError, TimestepsError
from autodiffusion_rt.registry import SPACINGS  # the one list of names: the CLI's help reads it without torch

__all__ = [
    "SCHEDULE_NAMES",
    "SPACINGS",
    "NoiseSchedule",
    "uniform_timesteps",
    "validate_timesteps",
]

SCHEDULE_NAMES = ("linear", "cosine")


def _check_num_timesteps(num_timesteps, error=SamplingError) -> int:
    if isinstance(num_timesteps, (bool, np.bool_)) or not isinstance(num_timesteps, numbers.Integral):
        raise error(
            f"num_timesteps={num_timesteps!r} is not an integer; pass the number of "
            "training timesteps of the model, e.g. 1000"
        )
    if num_timesteps < 1:
        raise error(f"num_timesteps={num_timesteps} must be >= 1; pass e.g. 1000")
    return int(num_timesteps)


def check_open_unit_interval(values: np.ndarray, what: str, fix: str) -> None:
    """Refuse the first entry of a 1-D float array that is not finite and strictly inside (0, 1).

    ``what`` names the array in the message (``what[i] = v is outside (0, 1); fix``).
    """
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0) & (values < 1)))
    if bad.size:
        i = int(bad[0])
        raise SamplingError(f"{what}[{i}] = {float(values[i])!r} is outside (0, 1); {fix}")


def check_alphas_cumprod(acp: np.ndarray, where: str, fix: str) -> None:
    """Refuse alpha_bar values that are not finite, strictly inside (0, 1) and strictly decreasing.

    The message names the first bad entry, after ``where`` (e.g. ``"schedule 'x': "``), and ends with ``fix``.
    """
    check_open_unit_interval(acp, f"{where}alphas_cumprod", fix)
    rising = np.flatnonzero(np.diff(acp) >= 0)
    if rising.size:
        i = int(rising[0])
        raise SamplingError(
            f"{where}alphas_cumprod is not strictly decreasing at t={i}->{i + 1} "
            f"({float(acp[i])!r} -> {float(acp[i + 1])!r}); {fix}"
        )


def _linear_betas(num_timesteps: int) -> np.ndarray:
    # guided-diffusion's "linear": Ho et al.'s 1e-4..0.02 over 1000 steps,
    # rescaled so that other step counts keep the same total noise.
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal's cosine schedule, discretised as in guided-diffusion's
    # betas_for_alpha_bar; the clip keeps the last betas (alpha_bar -> 0) < 1.
    betas = [
        min(1 - _cosine_alpha_bar((i + 1) / num_timesteps) / _cosine_alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving forward process.

    ``alphas_cumprod[t]`` is alpha_bar_t, the signal fraction of x_t =
    sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps, for t in [0, T).
    Both arrays are float64, read-only, and 0 < beta < 1 holds everywhere, so
    0 < alpha_bar < 1 and it strictly decreases. (Zero-terminal-SNR schedules
    with alpha_bar = 0 are not supported: eps-prediction cannot recover x0 there.)

    ``eq=False``: comparing numpy arrays with ``==`` has no single truth value;
    compare ``name`` and the arrays explicitly.
    """

    name: str
    betas: np.ndarray
    alphas_cumprod: np.ndarray | None = None  # None: cumprod(1 - betas)

    def __post_init__(self):
        betas = np.array(self.betas, dtype=np.float64)  # copy: we freeze it below
        if betas.ndim != 1 or betas.size == 0:
            raise SamplingError(f"schedule {self.name!r}: betas has shape {betas.shape}; pass a non-empty 1-D array")
        check_open_unit_interval(betas, f"schedule {self.name!r}: betas", "every beta must be strictly between 0 and 1")
        if self.alphas_cumprod is None:
            acp = np.cumprod(1.0 - betas)
        else:
            acp = np.array(self.alphas_cumprod, dtype=np.float64)
        if acp.shape != betas.shape:
            raise SamplingError(
                f"schedule {self.name!r}: alphas_cumprod has shape {acp.shape} but betas has "
                f"{betas.shape}; pass arrays of the same length (or use NoiseSchedule.from_betas)"
            )
        check_alphas_cumprod(
            acp, f"schedule {self.name!r}: ", "use NoiseSchedule.from_betas to derive it from the betas"
        )
        betas.setflags(write=False)
        acp.setflags(write=False)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", acp)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, name: str, betas) -> "NoiseSchedule":
        """A schedule from its betas; alphas_cumprod = cumprod(1 - betas) in float64."""
        return cls(name=name, betas=betas)

    @classmethod
    def named(cls, name: str, num_timesteps: int = 1000) -> "NoiseSchedule":
        """The "linear" or "cosine" schedule, exactly as openai/guided-diffusion's
        ``get_named_beta_schedule`` defines them."""
        num_timesteps = _check_num_timesteps(num_timesteps)
        if name == "linear":
            if num_timesteps <= 20:
                # scale * 0.02 = 20 / T: the last beta would reach 1 or more.
                raise SamplingError(
                    f"the linear schedule needs num_timesteps > 20 (its last beta is 20/T), "
                    f"got {num_timesteps}; use more timesteps or the cosine schedule"
                )
            betas = _linear_betas(num_timesteps)
        elif name == "cosine":
            betas = _cosine_betas(num_timesteps)
        else:
            raise SamplingError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
        return cls.from_betas(name, betas)

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, num_timesteps={self.num_timesteps})"


def _as_int(value, position: int) -> int:
    # bool is an Integral in Python, but True as a timestep is always a bug.
    if isinstance(value, (bool, np.bool_)):
        raise TimestepsError(f"timesteps[{position}] = {value!r} is a bool; timesteps must be integers")
    if isinstance(value, numbers.Integral):
        return int(value)
    # 0-d integer arrays/tensors (iterating a numpy or torch int array yields
    # these); never floats, not even 3.0: a plan stores indices, not times.
    if getattr(value, "ndim", None) == 0:
        dtype = getattr(value, "dtype", None)
        if isinstance(value, np.ndarray) and np.issubdtype(dtype, np.integer):
            return int(value)
        if str(dtype).startswith(("torch.int", "torch.uint")):  # duck-typed: no torch import here
            return int(value.item())
    hint = ""
    if isinstance(value, numbers.Real) and float(value).is_integer():
        hint = f" (write {int(value)})"
    raise TimestepsError(
        f"timesteps[{position}] = {value!r} is a {type(value).__name__}, not an integer; "
        f"timesteps are integer indices into the training schedule{hint}"
    )


def validate_timesteps(timesteps: Iterable[int], num_timesteps: int) -> list[int]:
    """Check a timestep list and return it as a list of python ints.

    A valid list is non-empty, all integers (python or numpy; not floats or
    bools), each in [0, num_timesteps), without duplicates, strictly descending.
    Each violation raises :class:`TimestepsError` with its own message naming
    the offending value(s).
    """
    num_timesteps = _check_num_timesteps(num_timesteps, TimestepsError)
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Iterable):
        raise TimestepsError(f"timesteps={timesteps!r} is not a sequence; pass a list of integers such as [999, 499]")
    items = list(timesteps)
    if not items:
        raise TimestepsError(f"timesteps is empty; pass at least one timestep, e.g. [{num_timesteps - 1}]")
    ts = [_as_int(v, i) for i, v in enumerate(items)]
    for i, t in enumerate(ts):
        if not 0 <= t < num_timesteps:
            raise TimestepsError(
                f"timesteps[{i}] = {t} is out of range; timesteps must lie in "
                f"[0, {num_timesteps}) for a {num_timesteps}-step schedule"
            )
    seen: dict[int, int] = {}
    for i, t in enumerate(ts):
        if t in seen:
            raise TimestepsError(
                f"timestep {t} appears twice (positions {seen[t]} and {i}); each timestep may appear once"
            )
        seen[t] = i
    for i in range(1, len(ts)):
        if ts[i] >= ts[i - 1]:
            raise TimestepsError(
                f"timesteps are not strictly descending at position {i}: "
                f"{ts[i - 1]} then {ts[i]}; sort them from noisiest to cleanest, e.g. "
                f"{sorted(ts, reverse=True)}"
            )
    return ts


def uniform_timesteps(num_timesteps: int, n: int, spacing: str = "linear", alphas_cumprod=None) -> list[int]:
    """The baseline n-step timestep lists, strictly descending from T-1.

    ``linear`` is "trailing" spacing (Lin et al. 2023, Table 2; diffusers'
    ``timestep_spacing="trailing"``): t_i = round(T - i*T/n) - 1, i = 0..n-1.
    E.g. T=1000, n=4 -> [999, 749, 499, 249].

    ``quadratic`` spends more steps at low noise: t_i = round(T*((n-i)/n)**2) - 1,
    then repaired so that the list is strictly descending and >= 0: walking
    from t_0 = T-1 down, t_i = max(min(t_i, t_{i-1} - 1), n-1-i), i.e. a
    collision is pushed down below its predecessor, and a value is lifted when
    the remaining steps would otherwise run below 0. Collisions only happen in
    the low-noise tail, which thus becomes a run ..., 2, 1, 0; with n == T the
    list is every timestep. E.g. T=1000, n=4 -> [999, 561, 249, 61].

    These are the comparison baselines, so they are computed exactly: the
    fractions are rational (no float accumulation), and round() is Python's,
    i.e. half to even, like numpy's (562.5 -> 562). Do not change them.

    ``logsnr`` (needs ``alphas_cumprod``, a :class:`NoiseSchedule` or its array)
    is uniform in lambda = log(alpha/sigma) (DPM-Solver's "logSNR" time): n + 1
    targets evenly spaced from lambda(T-1) to lambda(0), the first n of them each
    mapped to the timestep whose lambda is nearest, then repaired to strictly
    descending like ``quadratic`` (a collision moves below its predecessor).

    ``karras`` (needs ``alphas_cumprod``) is EDM's rho = 7 spacing in sigma
    (Karras et al. 2022, eq. 5; k-diffusion's ``get_sigmas_karras``, diffusers'
    ``use_karras_sigmas=True``): sigma = sqrt((1 - a) / a), n sigmas from
    sigma(T-1) to sigma(0), each mapped to a timestep as diffusers' ``_sigma_to_t``
    does (linear interpolation of t in log-sigma, then round half to even), then
    repaired to strictly descending like ``logsnr``.
    """
    num_timesteps = _check_num_timesteps(num_timesteps, TimestepsError)
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TimestepsError(f"n={n!r} is not an integer; pass the number of sampling steps, e.g. 10")
    n = int(n)
    if not 1 <= n <= num_timesteps:
        raise TimestepsError(
            f"n={n} sampling steps is out of range; choose 1 <= n <= {num_timesteps} "
            f"(the schedule has {num_timesteps} timesteps)"
        )
    T = num_timesteps
    if spacing == "linear":
        # Values T*(n-i)/n are >= 1 apart, so rounding keeps them distinct.
        return [round(Fraction(T * (n - i), n)) - 1 for i in range(n)]
    if spacing == "quadratic":
        out: list[int] = []
        for i in range(n):
            t = round(Fraction(T * (n - i) ** 2, n * n)) - 1
            if out:
                t = min(t, out[-1] - 1)
            out.append(max(t, n - 1 - i))
        return out
    if spacing in ("logsnr", "karras"):
        acp = _schedule_array(alphas_cumprod, T, spacing)
        if spacing == "logsnr":
            lam = 0.5 * (np.log(acp) - np.log1p(-acp))  # increasing as t decreases
            targets = np.linspace(lam[T - 1], lam[0], n + 1)[:n]
            nearest = [T - 1] + [int(np.argmin(np.abs(lam - target))) for target in targets[1:]]
        else:
            nearest = _karras_timesteps(acp, n)
        return _descending_distinct(nearest)
    raise TimestepsError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")


def _schedule_array(alphas_cumprod, T: int, spacing: str) -> np.ndarray:
    if alphas_cumprod is None:
        raise TimestepsError(
            f"{spacing} spacing needs the model's schedule: pass alphas_cumprod (a NoiseSchedule or its array)"
        )
    acp = (
        alphas_cumprod.alphas_cumprod
        if isinstance(alphas_cumprod, NoiseSchedule)
        else np.asarray(alphas_cumprod, dtype=np.float64)
    )
    if acp.shape != (T,):
        raise TimestepsError(
            f"alphas_cumprod has shape {acp.shape}; {spacing} spacing needs one value per timestep ({T})"
        )
    return acp


def _karras_timesteps(acp: np.ndarray, n: int, rho: float = 7.0) -> list[int]:
    # EDM eq. 5 between the schedule's own sigma_max and sigma_min, then diffusers' _sigma_to_t:
    # t interpolated linearly in log-sigma between the two neighbouring timesteps, rounded half to even.
    log_sigma = 0.5 * (np.log1p(-acp) - np.log(acp))  # increasing in t
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = np.exp(log_sigma[0] / rho), np.exp(log_sigma[-1] / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    t = np.interp(np.log(sigmas), log_sigma, np.arange(acp.shape[0], dtype=np.float64))
    return [int(v) for v in np.round(t)]


def _descending_distinct(nearest: list[int]) -> list[int]:
    # A collision moves below its predecessor; a value is lifted when the remaining steps would run below 0.
    n, out = len(nearest), []
    for i, t in enumerate(nearest):
        if out:
            t = min(t, out[-1] - 1)
        out.append(max(t, n - 1 - i))
    return out
