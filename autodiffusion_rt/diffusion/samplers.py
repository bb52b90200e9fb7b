"""Samplers over arbitrary timestep lists, as one linear update per step.

Every sampler here (DDIM with eta, DDPM ancestral, DPM-Solver++(2M), iPNDM,
UniPC) is, for a fixed schedule and timestep list, the same affine update with
per-step scalar constants::

    x0     = x0_from_x * x + x0_from_eps * eps
    x_prev = c_x * x + c_eps * eps + c_noise * noise
             + c_prev_x0 * x0_{i-1} + c_prev_x0_2 * x0_{i-2} + c_prev_x0_3 * x0_{i-3}
             + c_prev_eps1 * eps_{i-1} + c_prev_eps2 * eps_{i-2} + c_prev_eps3 * eps_{i-3}

``eps`` is the model's noise prediction at (x, t_i), ``x0_{i-k}`` the x0 of
earlier steps (the state DPM-Solver++(2M) and UniPC carry; with x0 clipping,
the clipped x0), ``eps_{i-k}`` the eps of earlier steps (the state iPNDM
carries; with x0 clipping, the eps consistent with the clipped x0) and
``noise`` a standard normal draw (coefficient 0 on deterministic steps); every
coefficient is 0 where a sampler does not read that term. The last step goes
to clean data (alpha_bar = 1 "at t = -1"), so its x_prev is the final sample.

This is the contract the ONNX export and Triton kernels depend on: the
coefficients of a whole schedule are computed once, in float64, by
:func:`compute_coefficients`; :func:`step_update` is the only place the update
arithmetic lives; :func:`sample_loop` is the only loop. A per-step engine can
fold its row of constants into its graph.

Learned variance (guided-diffusion's ``learn_sigma`` models, DDPM only): the
model also outputs v in [-1, 1] and the noise scale of a step is
``exp(0.5 * (frac * max_log + (1 - frac) * min_log))``, frac = (v + 1) / 2,
with max_log = log(beta) of the respaced chain and min_log the clipped log
posterior variance (guided-diffusion's ``p_mean_variance``, LEARNED_RANGE).
Such a row carries the two constants and ``learned_variance=True``; its
``c_noise`` is the fixed-small scale, kept only as the "this step draws noise"
flag. The mean is the same affine update. The model stacks [eps, v] along
channels; :func:`split_learned_variance` is the one reader of that layout.

Noise rule (determinism across backends): step i draws noise iff
``c_noise[i] != 0``, one standard normal per sample from that sample's own
generator (:class:`~autodiffusion_rt.diffusion.noise.SampleNoise`), in step
order, right after the model call of that step. :func:`draw_step_noise`
replays exactly these draws.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from autodiffusion_rt.diffusion.noise import SampleNoise
from autodiffusion_rt.diffusion.schedules import NoiseSchedule, check_alphas_cumprod, validate_timesteps
from autodiffusion_rt.errors import SamplingError
from autodiffusion_rt.utils import kernel_hook

__all__ = [
    "SAMPLERS",
    "EpsFn",
    "SamplerCoefficients",
    "StepCoefficients",
    "UNIPC_ORDERS",
    "X0_HISTORY",
    "compute_coefficients",
    "draw_step_noise",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_ipndm",
    "sample_loop",
    "sample_unipc",
    "split_learned_variance",
    "step_from_output",
    "step_update",
]

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "ipndm", "unipc", "unipc3")
#: How many earlier eps values iPNDM (4th-order Adams-Bashforth) reads at most.
EPS_HISTORY = 3
#: How many earlier x0 values a step reads at most (UniPC-3's corrector: x0_{i-1}, x0_{i-2}, x0_{i-3}).
X0_HISTORY = 3
#: UniPC's solver order per sampler name.
UNIPC_ORDERS = {"unipc": 2, "unipc3": 3}

#: eps_fn(x, t, i) -> eps: the model's noise prediction for x at timestep t,
#: which is step i of the schedule (so a caller can pick a per-step subnetwork).
EpsFn = Callable[[torch.Tensor, int, int], torch.Tensor]


class StepCoefficients(NamedTuple):
    """The six constants of one step, as python floats (foldable into a graph), and the x0 clip."""

    x0_from_x: float
    x0_from_eps: float
    c_x: float
    c_eps: float
    c_prev_x0: float
    c_noise: float
    clip_x0: bool = False
    c_prev_eps1: float = 0.0  # eps of step i-1 (iPNDM)
    c_prev_eps2: float = 0.0
    c_prev_eps3: float = 0.0
    # guided-diffusion's learned range (DDPM on learn_sigma models): the noise scale comes from the model's v.
    learned_variance: bool = False
    min_log: float = 0.0
    max_log: float = 0.0
    c_prev_x0_2: float = 0.0  # x0 of step i-2 (UniPC)
    c_prev_x0_3: float = 0.0

    @property
    def prev_eps_coefficients(self) -> tuple[float, float, float]:
        return (self.c_prev_eps1, self.c_prev_eps2, self.c_prev_eps3)

    @property
    def prev_x0_coefficients(self) -> tuple[float, float, float]:
        return (self.c_prev_x0, self.c_prev_x0_2, self.c_prev_x0_3)

    @property
    def x0_history(self) -> int:
        """How many earlier x0 values this step reads (1 for DPM-Solver++(2M), up to 3 for UniPC)."""
        c = self.prev_x0_coefficients
        return max((k + 1 for k in range(X0_HISTORY) if c[k] != 0.0), default=0)

    @property
    def eps_history(self) -> int:
        """How many earlier eps values this step reads (0 for every sampler but iPNDM)."""
        c = self.prev_eps_coefficients
        return max((k + 1 for k in range(EPS_HISTORY) if c[k] != 0.0), default=0)


_COEFF_NAMES = StepCoefficients._fields[:6]
_PREV_EPS_NAMES = StepCoefficients._fields[7:10]


@dataclass(frozen=True, eq=False)
class SamplerCoefficients:
    """Per-step constants of one sampler over one timestep list (float64, length N).

    ``eq=False`` because numpy arrays have no single truth value under ``==``.
    """

    sampler: str
    timesteps: tuple[int, ...]
    x0_from_x: np.ndarray
    x0_from_eps: np.ndarray
    c_x: np.ndarray
    c_eps: np.ndarray
    c_prev_x0: np.ndarray
    c_noise: np.ndarray
    eta: float = 0.0
    clip_denoised: bool = True
    c_prev_eps: np.ndarray | None = None  # (N, 3): weights of eps_{i-1}, eps_{i-2}, eps_{i-3}; None = zeros
    c_older_x0: np.ndarray | None = None  # (N, 2): weights of x0_{i-2}, x0_{i-3} (UniPC); None = zeros
    min_log: np.ndarray | None = None  # learned variance only (see the module docstring)
    max_log: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        n = len(self.timesteps)
        hist = np.zeros((n, EPS_HISTORY)) if self.c_prev_eps is None else np.array(self.c_prev_eps, dtype=np.float64)
        if hist.shape != (n, EPS_HISTORY) or not np.all(np.isfinite(hist)):
            raise SamplingError(
                f"{self.sampler} coefficients: c_prev_eps has shape {hist.shape}; "
                f"expected ({n}, {EPS_HISTORY}) finite numbers"
            )
        hist.setflags(write=False)
        object.__setattr__(self, "c_prev_eps", hist)
        older = np.zeros((n, X0_HISTORY - 1)) if self.c_older_x0 is None else np.array(self.c_older_x0, np.float64)
        if older.shape != (n, X0_HISTORY - 1) or not np.all(np.isfinite(older)):
            raise SamplingError(
                f"{self.sampler} coefficients: c_older_x0 has shape {older.shape}; "
                f"expected ({n}, {X0_HISTORY - 1}) finite numbers"
            )
        older.setflags(write=False)
        object.__setattr__(self, "c_older_x0", older)
        for name in _COEFF_NAMES:
            arr = np.array(getattr(self, name), dtype=np.float64)
            if arr.shape != (n,) or not np.all(np.isfinite(arr)):
                raise SamplingError(
                    f"{self.sampler} coefficients: {name} has shape {arr.shape} or non-finite "
                    f"values; expected {n} finite numbers, one per timestep"
                )
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if (self.min_log is None) != (self.max_log is None):
            raise SamplingError("learned variance needs both min_log and max_log (or neither)")
        for name in ("min_log", "max_log"):
            if getattr(self, name) is not None:
                arr = np.array(getattr(self, name), dtype=np.float64)
                if arr.shape != (n,) or not np.all(np.isfinite(arr)):
                    raise SamplingError(f"{self.sampler} coefficients: {name} must hold {n} finite numbers")
                arr.setflags(write=False)
                object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def learned_variance(self) -> bool:
        """Does the model's variance output set the noise scale (eps_fn then returns [eps, v])?"""
        return self.min_log is not None

    def row(self, i: int) -> StepCoefficients:
        """Step i's constants as python floats."""
        base = [float(getattr(self, name)[i]) for name in _COEFF_NAMES]
        hist = [float(v) for v in self.c_prev_eps[i]]
        older = dict(zip(("c_prev_x0_2", "c_prev_x0_3"), (float(v) for v in self.c_older_x0[i])))
        if self.min_log is None:
            return StepCoefficients(*base, self.clip_denoised, *hist, **older)
        return StepCoefficients(
            *base,
            self.clip_denoised,
            *hist,
            learned_variance=True,
            min_log=float(self.min_log[i]),
            max_log=float(self.max_log[i]),
            **older,
        )

    @property
    def stochastic_steps(self) -> np.ndarray:
        """Bool per step: does this step draw noise (c_noise != 0)?"""
        return self.c_noise != 0

    @property
    def uses_prev_x0(self) -> bool:
        """Does any step read an earlier step's x0 (multistep state)?"""
        return bool(np.any(self.c_prev_x0 != 0) or np.any(self.c_older_x0 != 0))

    @property
    def uses_eps_history(self) -> bool:
        """Does any step read earlier steps' eps (iPNDM)?"""
        return bool(np.any(self.c_prev_eps != 0))


def _alphas_cumprod(schedule) -> np.ndarray:
    if isinstance(schedule, NoiseSchedule):
        return schedule.alphas_cumprod  # validated on construction
    acp = np.asarray(schedule, dtype=np.float64)
    if acp.ndim != 1 or acp.size == 0:
        raise SamplingError(f"alphas_cumprod has shape {acp.shape}; pass a NoiseSchedule or a non-empty 1-D array")
    check_alphas_cumprod(
        acp,
        "",
        "pass the cumulative product of (1 - betas) of the training schedule "
        "(samplers need 0 < alpha_bar < 1, strictly decreasing)",
    )
    return acp


def _ddim(a, a_prev, x0_from_x, x0_from_eps, eta):
    # x_prev = sqrt(a_prev)*x0 + sqrt(1 - a_prev - sigma^2)*eps + sigma*z
    # (Song et al. 2021, eq. 12). x0 clipping (the default) is not in these
    # coefficients: step_update clamps x0 and continues with the eps consistent
    # with it, so the per-step constants stay fixed and the engines fold them.
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    # >= 0 in exact arithmetic for eta <= 1; clamp rounding noise.
    direction = np.sqrt(np.maximum(1 - a_prev - sigma**2, 0.0))
    sqrt_a_prev = np.sqrt(a_prev)
    c_x = sqrt_a_prev * x0_from_x
    c_eps = sqrt_a_prev * x0_from_eps + direction
    return c_x, c_eps, np.zeros_like(a), sigma


def _ddpm(a, a_prev, x0_from_x, x0_from_eps):
    # Ancestral step from the posterior q(x_prev | x_t, x0) of the respaced
    # chain (Ho et al. 2020, eqs. 6-7; guided-diffusion's respacing): the beta
    # of a jump t -> t_prev is 1 - a/a_prev. Variance is "fixed small", the
    # posterior variance itself. At the final step a_prev = 1, so beta = 1 - a,
    # coef1 = 1, coef2 = 0, variance = 0: x_prev = x0, no noise.
    beta = 1 - a / a_prev
    coef1 = np.sqrt(a_prev) * beta / (1 - a)
    coef2 = np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
    variance = beta * (1 - a_prev) / (1 - a)
    c_x = coef1 * x0_from_x + coef2
    c_eps = coef1 * x0_from_eps
    c_noise = np.sqrt(variance)
    c_noise[-1] = 0.0  # already exactly 0; said explicitly because it is the rule
    return c_x, c_eps, np.zeros_like(a), c_noise


def _ddpm_learned_range(a, a_prev):
    # guided-diffusion's GaussianDiffusion on the respaced chain (respaced index k = N-1-i):
    # max_log = log(beta_k); min_log = posterior_log_variance_clipped, whose entry at k = 0
    # (our last step, variance 0) is replaced by the entry at k = 1. That step draws no noise.
    beta = 1 - a / a_prev
    variance = beta * (1 - a_prev) / (1 - a)
    min_var = variance.copy()
    if len(a) > 1:
        min_var[-1] = variance[-2]
    else:
        min_var[-1] = beta[-1]  # a one-step chain has no k = 1; its step draws no noise anyway
    return np.log(min_var), np.log(beta)


def _dpmpp_2m(a, x0_from_x, x0_from_eps):
    # DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, in
    # lambda = log(alpha/sigma), alpha = sqrt(a), sigma = sqrt(1 - a).
    # Step i (s -> t, h = lambda_t - lambda_s, phi = e^{-h} - 1 < 0):
    #   first order:  x_t = sigma_t/sigma_s x - alpha_t phi x0
    #   second order: x_t = sigma_t/sigma_s x - alpha_t phi ((1 + 1/(2r)) x0 - 1/(2r) prev_x0),
    #                 r = h_prev / h,
    # with x0 = x0_from_x x + x0_from_eps eps expanded into the linear form.
    # Step 0 is first order (no history). The final step, to sigma = 0
    # (lambda = +inf), is first order and reduces to x_prev = x0; this is what
    # diffusers' DPMSolverMultistepScheduler does for any number of steps with
    # final_sigmas_type="zero" (its "< 15 steps" lower_order_final rule only
    # affects third order and final_sigmas_type="sigma_min"). A second-order
    # final step would divide by h = inf.
    n = a.shape[0]
    alpha, sigma = np.sqrt(a), np.sqrt(1 - a)
    lam = 0.5 * (np.log(a) - np.log1p(-a))
    c_x, c_eps, c_prev = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        if i == n - 1:
            c_x[i], c_eps[i] = x0_from_x[i], x0_from_eps[i]
            continue
        h = lam[i + 1] - lam[i]
        phi = math.expm1(-h)
        if i == 0:
            w_x0, w_prev = -alpha[i + 1] * phi, 0.0
        else:
            half_inv_r = 0.5 * h / (lam[i] - lam[i - 1])
            w_x0 = -alpha[i + 1] * phi * (1 + half_inv_r)
            w_prev = alpha[i + 1] * phi * half_inv_r
        c_x[i] = sigma[i + 1] / sigma[i] + w_x0 * x0_from_x[i]
        c_eps[i] = w_x0 * x0_from_eps[i]
        c_prev[i] = w_prev
    return c_x, c_eps, c_prev, np.zeros(n)


# Adams-Bashforth weights of iPNDM (Zhang & Chen 2023, "improved PNDM"; as in zju-pi/diff-sampler):
# order k uses eps_i, eps_{i-1}, ..., eps_{i-k+1}; step i has order min(4, i + 1) (lower-order warm start).
_IPNDM_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _ipndm(a, a_prev):
    # In EDM's variables y = x / sqrt(a), s = sqrt((1 - a) / a), the probability-flow ODE is
    # dy/ds = eps; iPNDM steps it with fixed Adams-Bashforth weights:
    #   y_next = y + (s_next - s) * sum_k w_k eps_{i-k}.
    # Back in x = sqrt(a) y: x_prev = sqrt(a_prev / a) x + sqrt(a_prev) (s_prev - s) sum_k w_k eps_{i-k}.
    # The final step goes to s = 0, a = 1. Order 1 is exactly DDIM (eta = 0).
    n = a.shape[0]
    s, s_prev = np.sqrt((1 - a) / a), np.sqrt((1 - a_prev) / a_prev)
    scale = np.sqrt(a_prev) * (s_prev - s)
    c_x = np.sqrt(a_prev / a)
    c_eps, hist = np.zeros(n), np.zeros((n, EPS_HISTORY))
    for i in range(n):
        w = _IPNDM_WEIGHTS[min(4, i + 1)]
        c_eps[i] = scale[i] * w[0]
        for k, wk in enumerate(w[1:]):
            hist[i, k] = scale[i] * wk
    return c_x, c_eps, hist


def _unipc_rhos(rks: list[float], hh: float, order: int, corrector: bool) -> np.ndarray:
    # diffusers' UniPC bh2 (B(h) = e^hh - 1): R = [rks^0 .. rks^(order-1)] with rks = [r_1 .. r_{order-1}, 1],
    # b_k = (k! phi_{k+1}(hh) scaled) / B(h); the predictor solves the leading (order-1) system (order 2: 0.5),
    # the corrector the whole one (order 1: 0.5).
    r = np.array([*rks, 1.0])
    h_phi_k, factorial, b = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / math.expm1(hh))
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = np.stack([r ** (k - 1) for k in range(1, order + 1)]), np.array(b)
    if corrector:
        return np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    if order == 1:
        return np.zeros(0)
    return np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])


def _unipc_interval(lam, alpha, i: int, order: int, corrector: bool) -> np.ndarray:
    # UniP (corrector=False) or UniC on the interval t_i -> t_{i+1}, as weights w over (x0_{i+1}, x0_i, x0_{i-1}, ...)
    # of the part that is not sigma_{i+1}/sigma_i times the sample: -alpha h_phi_1 x0_i - alpha B(h) (sum_k rho_k D_k
    # [+ rho_c (x0_{i+1} - x0_i)]), D_k = (x0_{i-k} - x0_i) / r_k, r_k = (lambda_{i-k} - lambda_i) / h.
    h = lam[i + 1] - lam[i]
    hh = -h
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)]
    rhos = _unipc_rhos(rks, hh, order, corrector)
    w = np.zeros(X0_HISTORY + 2)
    w[1] = -alpha[i + 1] * math.expm1(hh)
    scale = -alpha[i + 1] * math.expm1(hh)  # -alpha B(h), bh2
    for k, rk in enumerate(rks, start=1):
        w[1 + k] += scale * rhos[k - 1] / rk
        w[1] -= scale * rhos[k - 1] / rk
    if corrector:
        w[0] += scale * rhos[-1]
        w[1] -= scale * rhos[-1]
    return w


def _unipc(a, x0_from_x, x0_from_eps, order: int):
    # UniPC (Zhao et al. 2023) with B(h) = e^h - 1 (bh2), data prediction, as diffusers' UniPCMultistepScheduler
    # (lower_order_final=True, no disabled corrector). Step i predicts x_{i+1} from the corrected sample x_i^c;
    # x_i^c corrects the input x_i with x0_i (UniC, every step but the first). Predictor i-1 and corrector i act on
    # the same interval with the same sigma_i/sigma_{i-1} times x_{i-1}^c, so x_i^c - x_i depends on x0s only:
    #   x_i^c = x_i + G_i . (x0_i, x0_{i-1}, ..), x_{i+1} = (sigma_{i+1}/sigma_i) x_i^c + P_i . (x0_i, ..),
    # i.e. one affine step in (x_i, eps_i) and the earlier x0s: no corrected sample needs carrying.
    # Orders: predictor q_i = min(order, n - i, i + 1) (warm-up, lower order at the end); corrector i uses q_{i-1}.
    n = a.shape[0]
    alpha, sigma = np.sqrt(a), np.sqrt(1 - a)
    lam = 0.5 * (np.log(a) - np.log1p(-a))
    c_x, c_eps, c_prev, older = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros((n, X0_HISTORY - 1))
    for i in range(n):
        if i == n - 1:  # order 1 to sigma = 0: x_prev = x0_i
            c_x[i], c_eps[i] = x0_from_x[i], x0_from_eps[i]
            continue
        q = min(order, n - i, i + 1)
        ratio = sigma[i + 1] / sigma[i]
        w = _unipc_interval(lam, alpha, i, q, corrector=False)[1:]  # over (x0_i, x0_{i-1}, ...)
        if i > 0:
            q_before = min(order, n - i + 1, i)
            full_c = _unipc_interval(lam, alpha, i - 1, q_before, corrector=True)
            full_p = _unipc_interval(lam, alpha, i - 1, q_before, corrector=False)
            w = w + ratio * (full_c - full_p)[: X0_HISTORY + 1]  # (x0_i, x0_{i-1}, ..) = (x0_{i+1}, x0_i, ..) of i-1
        c_x[i] = ratio + w[0] * x0_from_x[i]
        c_eps[i] = w[0] * x0_from_eps[i]
        c_prev[i] = w[1]
        older[i] = w[2 : X0_HISTORY + 1]
    return c_x, c_eps, c_prev, older


def compute_coefficients(
    sampler: str,
    alphas_cumprod,
    timesteps: Sequence[int],
    eta: float = 0.0,
    clip_denoised: bool = True,
    learned_variance: bool = False,
) -> SamplerCoefficients:
    """All per-step constants of ``sampler`` over ``timesteps``, in float64.

    ``learned_variance`` (a learn_sigma model): DDPM then takes its noise scale
    from the model's v output (see the module docstring); the deterministic
    samplers ignore the variance, as guided-diffusion's DDIM does.

    ``alphas_cumprod`` is a :class:`NoiseSchedule` or its alphas_cumprod array;
    ``timesteps`` must pass :func:`validate_timesteps`. ``eta`` (DDIM only, in
    [0, 1]) scales DDIM's noise: 0 is deterministic DDIM, 1 has DDPM's variance.
    ``clip_denoised`` (guided-diffusion's default) clips each step's x0 to the
    data range [-1, 1] and uses the eps consistent with it: near t = T-1 the
    cosine schedule's x0 = (x - sqrt(1-a) eps) / sqrt(a) multiplies eps errors
    by ~1e4, and the clip is what keeps few-step sampling stable.
    """
    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    acp = _alphas_cumprod(alphas_cumprod)
    ts = validate_timesteps(timesteps, acp.shape[0])
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta):
        raise SamplingError(f"eta={eta!r} is not a finite number; pass e.g. eta=0.0")
    eta = float(eta)
    if sampler == "ddim" and not 0.0 <= eta <= 1.0:
        raise SamplingError(
            f"eta={eta} is outside [0, 1]; DDIM's eta must lie in [0, 1] (0 = deterministic, 1 = DDPM-like noise)"
        )
    if sampler != "ddim" and eta != 0.0:
        raise SamplingError(f"eta={eta} only applies to the ddim sampler; leave eta=0 for {sampler}")

    a = acp[ts]
    a_prev = np.append(a[1:], 1.0)  # the final step goes to clean data
    # eps-prediction: x = sqrt(a) x0 + sqrt(1 - a) eps, solved for x0.
    x0_from_x = 1 / np.sqrt(a)
    x0_from_eps = -np.sqrt(1 - a) / np.sqrt(a)
    if sampler == "ddim":
        c_x, c_eps, c_prev, c_noise = _ddim(a, a_prev, x0_from_x, x0_from_eps, eta)
    elif sampler == "ddpm":
        c_x, c_eps, c_prev, c_noise = _ddpm(a, a_prev, x0_from_x, x0_from_eps)
    elif sampler == "dpmpp_2m":
        c_x, c_eps, c_prev, c_noise = _dpmpp_2m(a, x0_from_x, x0_from_eps)
    elif sampler in UNIPC_ORDERS:
        c_x, c_eps, c_prev, older = _unipc(a, x0_from_x, x0_from_eps, UNIPC_ORDERS[sampler])
        c_noise = np.zeros_like(a)
    else:
        c_x, c_eps, hist = _ipndm(a, a_prev)
        c_prev, c_noise = np.zeros_like(a), np.zeros_like(a)
    if sampler not in ("ddim", "ddpm"):
        # A multistep sampler's first step is first order, which is deterministic DDIM: take DDIM's own constants,
        # equal to the bit, so that the search shares that step's model call between samplers (search/fitness.py).
        ddim_x, ddim_eps, _, _ = _ddim(a[:1], a_prev[:1], x0_from_x[:1], x0_from_eps[:1], 0.0)
        c_x, c_eps = np.array(c_x, dtype=np.float64), np.array(c_eps, dtype=np.float64)
        c_x[0], c_eps[0] = ddim_x[0], ddim_eps[0]
    min_log = max_log = None
    if learned_variance and sampler == "ddpm":
        min_log, max_log = _ddpm_learned_range(a, a_prev)
    return SamplerCoefficients(
        sampler=sampler,
        timesteps=tuple(ts),
        x0_from_x=x0_from_x,
        x0_from_eps=x0_from_eps,
        c_x=c_x,
        c_eps=c_eps,
        c_prev_x0=c_prev,
        c_noise=c_noise,
        eta=eta,
        clip_denoised=bool(clip_denoised),
        c_prev_eps=hist if sampler == "ipndm" else None,
        c_older_x0=older if sampler in UNIPC_ORDERS else None,
        min_log=min_log,
        max_log=max_log,
    )


def split_learned_variance(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learn_sigma output, [eps, v] stacked along channels, -> (eps, v): its first ``channels`` channels and the rest.

    The one place the layout is read (guided-diffusion's ``th.split(model_output, C, dim=1)``):
    the UNet's raw output, and the [eps, v] an eps_fn returns for a learned-variance step.
    Slices, so it traces into an export as it does in eager torch.
    """
    return out[:, :channels], out[:, channels:]


def step_update(
    coeffs_row: StepCoefficients,
    x: torch.Tensor,
    eps: torch.Tensor,
    prev_x0: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    prev_eps: Sequence[torch.Tensor] | None = None,
    return_eps: bool = False,
    var_v: torch.Tensor | None = None,
    older_x0: Sequence[torch.Tensor] = (),
):
    """One sampler step: returns (x_prev, x0), or (x_prev, x0, eps) with ``return_eps``.

    ``prev_x0``: the x0 of step i-1; ``older_x0``: those of steps i-2, i-3
    (UniPC's state; as many as the row reads).

    ``prev_eps``: the eps of earlier steps, most recent first (iPNDM's state;
    as many as the row reads). The eps returned is the one the update used:
    with x0 clipping, the eps consistent with the clipped x0; it is what the
    next steps' ``prev_eps`` must hold. ``var_v``: the model's variance
    channels, for a learned-variance (guided-diffusion ``learn_sigma``) DDPM step.

    Pure torch arithmetic with python-float constants, so it traces into an
    ONNX graph with the constants folded. Terms whose coefficient is 0 are
    left out (decided on python floats, so tracing sees a fixed graph).
    Kept narrow on purpose: a fused kernel can replace exactly this function,
    and does for CUDA tensors when ``kernels`` offers one (CPU: always torch).
    """
    # Tracers (fx proxies, torch.compile/export) must see plain torch ops, not this lookup.
    if (
        isinstance(x, torch.Tensor)
        and x.is_cuda
        and not return_eps
        and coeffs_row.eps_history == 0
        and coeffs_row.x0_history <= 1
        and not coeffs_row.learned_variance
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and (fast := kernel_hook("fast_step_update"))
    ):
        impl = fast(coeffs_row, x, eps, prev_x0, noise)  # None: the kernel does not cover this call
        if impl is not None:
            return impl(coeffs_row, x, eps, prev_x0, noise)
    x0 = coeffs_row.x0_from_x * x + coeffs_row.x0_from_eps * eps
    if coeffs_row.clip_x0:
        # Clip x0 to the data range and continue with the eps that agrees with it
        # (x = sqrt(a) x0 + sqrt(1 - a) eps); the affine update below is unchanged.
        x0 = x0.clamp(-1.0, 1.0)
        eps = (coeffs_row.x0_from_x * x - x0) * (-1.0 / coeffs_row.x0_from_eps)
    x_prev = coeffs_row.c_x * x + coeffs_row.c_eps * eps
    if coeffs_row.c_prev_x0 != 0.0:
        if prev_x0 is None:
            raise SamplingError(
                "this step is second order and needs prev_x0 (the x0 of the previous step); "
                "pass the x0 returned by the previous step_update"
            )
        x_prev = x_prev + coeffs_row.c_prev_x0 * prev_x0
    x_prev = _add_history(x_prev, coeffs_row.x0_history - 1, coeffs_row.prev_x0_coefficients[1:], older_x0, "x0")
    if coeffs_row.c_noise != 0.0:
        if noise is None:
            raise SamplingError(
                "this step is stochastic (c_noise != 0) and needs noise; pass a standard "
                "normal tensor shaped like x (see draw_step_noise)"
            )
        if coeffs_row.learned_variance:
            if var_v is None:
                raise SamplingError(
                    "this step uses the model's learned variance and needs var_v (its second C channels)"
                )
            frac = (var_v + 1) * 0.5
            scale = torch.exp(0.5 * (frac * coeffs_row.max_log + (1 - frac) * coeffs_row.min_log))
            x_prev = x_prev + scale * noise
        else:
            x_prev = x_prev + coeffs_row.c_noise * noise
    x_prev = _add_history(x_prev, coeffs_row.eps_history, coeffs_row.prev_eps_coefficients, prev_eps, "eps")
    return (x_prev, x0, eps) if return_eps else (x_prev, x0)


def _add_history(x_prev, depth: int, weights, values, kind: str):
    # The multistep terms: iPNDM's earlier eps (kind "eps", passed as prev_eps), UniPC's x0 of steps i-2, i-3
    # (kind "x0", passed as older_x0). Terms with weight 0 are left out (a fixed graph when traced).
    if depth <= 0:
        return x_prev
    if values is None or len(values) < depth:
        sampler, arg, steps = ("iPNDM", "prev_eps", depth) if kind == "eps" else ("UniPC", "older_x0", depth + 1)
        raise SamplingError(
            f"this step is multistep ({sampler}) and reads the {kind} of the {steps} previous step(s); "
            f"pass {arg} (most recent first), got {0 if values is None else len(values)}"
        )
    for c, value in zip(weights, values):
        if c != 0.0:
            x_prev = x_prev + c * value
    return x_prev


def step_from_output(
    row: StepCoefficients,
    x: torch.Tensor,
    out: torch.Tensor,
    x0_history: Sequence[torch.Tensor] = (),
    noise: torch.Tensor | None = None,
    history: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The step sequence every path runs (sample_loop, the search, the engines, the exporter's graph), written once.

    ``out`` is the model's eps, or [eps, v] stacked along channels on a
    learned-variance step; ``x0_history`` the x0 of the previous steps and
    ``history`` their eps, both most recent first. Returns ``(x_prev,
    x0_history, history)`` with this step's x0 and the eps it used pushed on
    (at most ``X0_HISTORY`` / ``EPS_HISTORY`` kept): what the next step reads.
    This step's x0 is ``x0_history[0]``.
    """
    if isinstance(x0_history, torch.Tensor):
        raise SamplingError("x0_history is a tensor; pass a tuple of the previous steps' x0, most recent first")
    var_v = None
    if row.learned_variance:
        out, var_v = split_learned_variance(out, x.shape[1])
    prev_x0 = x0_history[0] if x0_history else None
    x_prev, x0, eps_used = step_update(
        row, x, out, prev_x0, noise, prev_eps=history, return_eps=True, var_v=var_v, older_x0=tuple(x0_history[1:])
    )
    return x_prev, (x0, *x0_history[: X0_HISTORY - 1]), (eps_used, *history[: EPS_HISTORY - 1])


def draw_step_noise(
    coeffs: SamplerCoefficients, noise: SampleNoise, shape: Sequence[int], *, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor | None]:
    """The noise :func:`sample_loop` would draw, per step (None where deterministic).

    ``shape`` is one sample's (C, H, W). Given ``noise`` in the same state as
    sample_loop's, the tensors are bit-identical to its draws. Holds all steps
    at once: for a fixed set of common random numbers (the search), not for
    streaming (the runtime draws step by step).
    """
    return [noise.randn(shape, dtype=dtype) if stochastic else None for stochastic in coeffs.stochastic_steps]


@torch.no_grad()
def sample_loop(
    eps_fn: EpsFn,
    x: torch.Tensor,
    coeffs: SamplerCoefficients,
    *,
    noise: SampleNoise | None = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Run every step of ``coeffs`` from x (at timesteps[0]) to a clean sample.

    ``eps_fn(x, t, i)`` must return the noise prediction, shaped like x, or,
    when ``coeffs.learned_variance``, [eps, v] stacked along channels. ``noise`` (one generator per
    sample) feeds the stochastic steps' draws (see the module's noise rule).
    ``callback({"i", "t", "x", "x0", "x_prev"})`` sees each step: x is the input
    of step i, x0 its denoised estimate, x_prev its output. Runs under no_grad.
    """
    if not isinstance(coeffs, SamplerCoefficients):
        raise SamplingError(f"coeffs is a {type(coeffs).__name__}; pass the result of compute_coefficients(...)")
    x0_history: tuple[torch.Tensor, ...] = ()  # most recent first
    history: tuple[torch.Tensor, ...] = ()
    for i in tqdm(range(len(coeffs)), disable=not progress, desc=coeffs.sampler):
        t = coeffs.timesteps[i]
        row = coeffs.row(i)
        out = eps_fn(x, t, i)
        want = (x.shape[0], 2 * x.shape[1], *x.shape[2:]) if row.learned_variance else tuple(x.shape)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SamplingError(
                f"eps_fn returned {got} at step {i} (t={t}) but x has shape {tuple(x.shape)}; "
                "eps_fn must return a noise prediction shaped like x ([eps, v] stacked along channels "
                "on a learned-variance step)"
            )
        z = None
        if row.c_noise != 0.0:
            if noise is None or len(noise) != x.shape[0]:
                raise SamplingError(
                    f"step {i} (t={t}) is stochastic and needs a SampleNoise with one generator per sample "
                    f"({x.shape[0]}), got {'none' if noise is None else len(noise)}"
                )
            z = noise.randn(x.shape[1:], dtype=x.dtype).to(x.device)  # drawn where the generators are, used where x is
        x_prev, x0_history, history = step_from_output(row, x, out, x0_history, z, history)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0_history[0], "x_prev": x_prev})
        x = x_prev
    return x


def sample_ddim(
    eps_fn: EpsFn, x: torch.Tensor, schedule, timesteps, eta: float = 0.0, clip_denoised: bool = True, **kw
) -> torch.Tensor:
    """DDIM (Song et al. 2021) over ``timesteps``; ``kw`` go to :func:`sample_loop`."""
    return sample_loop(eps_fn, x, compute_coefficients("ddim", schedule, timesteps, eta, clip_denoised), **kw)


def sample_ddpm(eps_fn: EpsFn, x: torch.Tensor, schedule, timesteps, clip_denoised: bool = True, **kw) -> torch.Tensor:
    """DDPM ancestral sampling (fixed-small variance) over the respaced ``timesteps``."""
    return sample_loop(eps_fn, x, compute_coefficients("ddpm", schedule, timesteps, 0.0, clip_denoised), **kw)


def sample_ipndm(eps_fn: EpsFn, x: torch.Tensor, schedule, timesteps, clip_denoised: bool = True, **kw) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023), 4th-order Adams-Bashforth on the probability-flow ODE, over ``timesteps``."""
    return sample_loop(eps_fn, x, compute_coefficients("ipndm", schedule, timesteps, 0.0, clip_denoised), **kw)


def sample_unipc(
    eps_fn: EpsFn, x: torch.Tensor, schedule, timesteps, order: int = 2, clip_denoised: bool = True, **kw
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023; bh2, data prediction, as diffusers' UniPCMultistepScheduler), order 2 or 3."""
    name = {order: sampler for sampler, order in UNIPC_ORDERS.items()}.get(order)
    if name is None:
        raise SamplingError(f"UniPC order={order!r}; choose one of {', '.join(map(str, UNIPC_ORDERS.values()))}")
    return sample_loop(eps_fn, x, compute_coefficients(name, schedule, timesteps, 0.0, clip_denoised), **kw)


def sample_dpmpp_2m(
    eps_fn: EpsFn, x: torch.Tensor, schedule, timesteps, clip_denoised: bool = True, **kw
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic, over ``timesteps``."""
    return sample_loop(eps_fn, x, compute_coefficients("dpmpp_2m", schedule, timesteps, 0.0, clip_denoised), **kw)
