"""Sampler coefficients, the shared loop, determinism, and agreement with references."""

import math

import numpy as np
import pytest
import torch

from autodiffusion_rt.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    SampleNoise,
    SamplerCoefficients,
    StepCoefficients,
    compute_coefficients,
    draw_step_noise,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_ipndm,
    sample_loop,
    sample_unipc,
    step_update,
    uniform_timesteps,
)
from autodiffusion_rt.errors import SamplingError, TimestepsError

SHAPE = (2, 3, 8, 8)
DATA_VAR = 0.5  # variance of the toy Gaussian "dataset" the eps functions denoise


@pytest.fixture(scope="module", params=["linear", "cosine"])
def schedule(request):
    return NoiseSchedule.named(request.param)


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.named("linear")


def make_eps_fn(acp, lib=torch):
    """A smooth, deterministic stand-in for a trained model.

    The first term is the exact eps-prediction for Gaussian data N(0, DATA_VAR),
    so trajectories stay bounded like real ones; the second is a nonlinear
    perturbation scaled by sqrt(a) so that x0 = (x - sqrt(1-a) eps)/sqrt(a)
    stays O(1) even at the noisiest steps.
    """

    def eps_fn(x, t, i):
        a = float(acp[t])
        return math.sqrt(1 - a) * x / (a * DATA_VAR + 1 - a) + 0.1 * math.sqrt(a) * lib.sin(3 * x + t / 100)

    return eps_fn


def x_init(dtype=torch.float64, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rng_arrays(seed, n):
    r = np.random.default_rng(seed)
    return [r.standard_normal(SHAPE) for _ in range(n)]


TIMESTEP_LISTS = [
    [999],
    [999, 10],
    [999, 749, 499, 249],
    [999, 900, 700, 400, 150, 20],
    [700, 650, 300, 299, 5, 0],
]


# --- coefficients vs independent float64 formulas ------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("ts", TIMESTEP_LISTS)
def test_ddim_step_matches_closed_form(schedule, ts, eta):
    acp = schedule.alphas_cumprod
    coeffs = compute_coefficients("ddim", schedule, ts, eta=eta, clip_denoised=False)
    x, eps, z = rng_arrays(1, 3)
    for i, t in enumerate(ts):
        a = acp[t]
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else 1.0
        # Song et al. 2021, eq. 12 and 16, evaluated directly.
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
        row = coeffs.row(i)
        assert row.c_noise == pytest.approx(sigma, rel=1e-12, abs=0)
        noise = torch.from_numpy(z) if row.c_noise else None
        got_prev, got_x0 = step_update(row, torch.from_numpy(x), torch.from_numpy(eps), noise=noise)
        scale = 1 + np.abs(x0).max()
        np.testing.assert_allclose(got_x0.numpy(), x0, rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(got_prev.numpy(), expected, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("ts", TIMESTEP_LISTS + [uniform_timesteps(1000, 50, "quadratic")])
def test_ddpm_step_matches_respaced_posterior(schedule, ts):
    # guided-diffusion's respacing: new betas from consecutive kept alpha_bars,
    # then the usual DDPM posterior of that shorter chain (ascending index k).
    acp = schedule.alphas_cumprod
    kept, last, new_betas = set(ts), 1.0, []
    for t, a in enumerate(acp):
        if t in kept:
            new_betas.append(1 - a / last)
            last = a
    new_betas = np.array(new_betas)
    new_acp = np.cumprod(1 - new_betas)
    new_acp_prev = np.append(1.0, new_acp[:-1])
    variance = new_betas * (1 - new_acp_prev) / (1 - new_acp)
    coef1 = new_betas * np.sqrt(new_acp_prev) / (1 - new_acp)
    coef2 = (1 - new_acp_prev) * np.sqrt(1 - new_betas) / (1 - new_acp)

    coeffs = compute_coefficients("ddpm", schedule, ts, clip_denoised=False)
    x, eps, z = rng_arrays(2, 3)
    n = len(ts)
    for i in range(n):
        k = n - 1 - i
        x0 = np.sqrt(1 / new_acp[k]) * x - np.sqrt(1 / new_acp[k] - 1) * eps
        expected = coef1[k] * x0 + coef2[k] * x + (k != 0) * np.sqrt(variance[k]) * z
        row = coeffs.row(i)
        assert (row.c_noise != 0) == (k != 0)
        noise = torch.from_numpy(z) if row.c_noise else None
        got, _ = step_update(row, torch.from_numpy(x), torch.from_numpy(eps), noise=noise)
        # rtol 1e-7, not 1e-9: the reference's cumprod(1 - (1 - a/last)) loses
        # digits where alpha_bar is tiny (cosine t=999: a = 2.4e-9 -> ~4e-8).
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-9 * (1 + np.abs(x0).max()))


def dpmpp_2m_reference(acp, ts, x, eps_np):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) on numpy float64, step by step."""
    alpha, sigma = np.sqrt(acp), np.sqrt(1 - acp)
    lam = np.log(alpha) - np.log(sigma)
    x0_prev = None
    for i, s in enumerate(ts):
        x0 = (x - sigma[s] * eps_np(x, s, i)) / alpha[s]
        if i == len(ts) - 1:
            return x0  # the final step lands on sigma = 0
        t = ts[i + 1]
        h = lam[t] - lam[s]
        if x0_prev is None:
            d = x0
        else:
            r = (lam[s] - lam[ts[i - 1]]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = sigma[t] / sigma[s] * x - alpha[t] * (np.exp(-h) - 1) * d
        x0_prev = x0


@pytest.mark.parametrize("ts", TIMESTEP_LISTS + [uniform_timesteps(1000, 20)])
def test_dpmpp_2m_trajectory_matches_reference(schedule, ts):
    acp = schedule.alphas_cumprod
    x = x_init()
    expected = dpmpp_2m_reference(acp, ts, x.numpy(), make_eps_fn(acp, np))
    got = sample_dpmpp_2m(make_eps_fn(acp), x, schedule, ts, clip_denoised=False)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


def test_dpmpp_2m_structure_and_first_order_equals_ddim(schedule):
    ts = [999, 900, 700, 400, 150, 20]
    dpm = compute_coefficients("dpmpp_2m", schedule, ts, clip_denoised=False)
    ddim = compute_coefficients("ddim", schedule, ts, clip_denoised=False)
    # Step 0 (no history) and the final step are first order, i.e. DDIM(eta=0).
    for i in (0, len(ts) - 1):
        np.testing.assert_allclose(dpm.row(i), ddim.row(i), rtol=1e-12, atol=1e-12)
    assert dpm.c_prev_x0[0] == 0 and dpm.c_prev_x0[-1] == 0
    assert np.all(dpm.c_prev_x0[1:-1] != 0)
    assert dpm.uses_prev_x0 and not dpm.stochastic_steps.any()
    # Two steps: nothing second order is left.
    assert not compute_coefficients("dpmpp_2m", schedule, [999, 10], clip_denoised=False).uses_prev_x0


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ipndm", "unipc", "unipc3"])
@pytest.mark.parametrize("ts", [[999, 765, 499, 284, 91], [804, 409], [999]])
def test_every_multistep_first_step_is_ddims_to_the_bit(schedule, sampler, ts):
    # The search shares a step's model call between candidates whose rows are equal (search/fitness.py): the first
    # step of every sampler must be DDIM's row exactly, not to rounding. The samplers' own formulas are checked
    # against float64 references and diffusers above and below.
    ddim = compute_coefficients("ddim", schedule, ts)
    assert compute_coefficients(sampler, schedule, ts).row(0) == ddim.row(0)


def ipndm_reference(acp, ts, x, eps_np, clip=False):
    """iPNDM as zju-pi/diff-sampler's ipndm_sampler writes it, in EDM's variables, numpy float64:
    y = x / sqrt(a), sigma = sqrt((1 - a) / a); d = (y - denoised) / sigma; order min(4, i + 1);
    y_next = y + (sigma_next - sigma) * AB-combination of d's; the last step goes to sigma = 0."""
    sig = lambda a: math.sqrt((1 - a) / a)  # noqa: E731
    y = x / math.sqrt(acp[ts[0]])
    buf = []
    for i, t in enumerate(ts):
        a = acp[t]
        s_cur = sig(a)
        s_next = sig(acp[ts[i + 1]]) if i + 1 < len(ts) else 0.0
        eps = eps_np(y * math.sqrt(a), t, i)
        denoised = y - s_cur * eps
        if clip:
            denoised = np.clip(denoised, -1, 1)
        d = (y - denoised) / s_cur
        order = min(4, i + 1)
        if order == 1:
            comb = d
        elif order == 2:
            comb = (3 * d - buf[-1]) / 2
        elif order == 3:
            comb = (23 * d - 16 * buf[-1] + 5 * buf[-2]) / 12
        else:
            comb = (55 * d - 59 * buf[-1] + 37 * buf[-2] - 9 * buf[-3]) / 24
        y = y + (s_next - s_cur) * comb
        buf = (buf + [d])[-3:]
    return y  # sigma = 0: y is x


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("ts", TIMESTEP_LISTS + [uniform_timesteps(1000, 10)])
def test_ipndm_trajectory_matches_float64_reference(schedule, ts, clip):
    """What would catch this: a wrong AB weight or warm-start order, history in the wrong order or not shifted,
    the history holding the raw instead of the clip-consistent eps, a final step not landing on sigma = 0."""
    acp = schedule.alphas_cumprod
    x = x_init() * (2.0 if clip else 1.0)
    eps_np = make_eps_fn(acp, np)
    expected = ipndm_reference(acp, ts, x.numpy(), lambda xx, t, i: eps_np(xx, t, i) * (1.5 if clip else 1.0), clip)
    eps_t = make_eps_fn(acp)
    got = sample_ipndm(lambda xx, t, i: eps_t(xx, t, i) * (1.5 if clip else 1.0), x, schedule, ts, clip_denoised=clip)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-9)


def test_ipndm_structure(schedule):
    ts = [999, 900, 700, 400, 150, 20]
    ip = compute_coefficients("ipndm", schedule, ts, clip_denoised=False)
    ddim = compute_coefficients("ddim", schedule, ts, clip_denoised=False)
    np.testing.assert_allclose(ip.row(0), ddim.row(0), rtol=1e-12, atol=1e-12)  # order 1 = DDIM
    assert [ip.row(i).eps_history for i in range(len(ts))] == [0, 1, 2, 3, 3, 3]
    assert ip.uses_eps_history and not ip.uses_prev_x0 and not ip.stochastic_steps.any()
    with pytest.raises(SamplingError, match=r"reads the eps of the 2 previous step"):
        step_update(ip.row(2), x_init(), x_init(), prev_eps=[x_init()])


# (iPNDM's final step is multistep too: it lands on sigma = 0 through its history, checked against its reference.)
@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmpp_2m", 0.0)])
def test_final_step_is_x0(schedule, sampler, eta):
    """The last step lands on x0 = (x - sqrt(1 - a) eps) / sqrt(a) (float64, from alpha_bar at t = 3) whatever the
    carried state: no noise, no previous x0."""
    c = compute_coefficients(sampler, schedule, [999, 500, 3], eta=eta, clip_denoised=False)
    a = schedule.alphas_cumprod[3]
    x, eps, prev_x0 = rng_arrays(4, 3)
    want = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    last = c.row(-1)
    assert last.c_noise == 0
    got_prev, got_x0 = step_update(last, *map(torch.from_numpy, (x, eps, prev_x0)))
    scale = 1 + np.abs(want).max()
    np.testing.assert_allclose(got_x0.numpy(), want, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(got_prev.numpy(), want, rtol=0, atol=1e-12 * scale)


def test_coefficients_object(linear):
    c = compute_coefficients("ddpm", linear, np.array([999, 500, 0]), clip_denoised=False)
    assert isinstance(c, SamplerCoefficients)
    assert c.sampler == "ddpm" and c.timesteps == (999, 500, 0) and len(c) == c.num_steps == 3
    assert all(getattr(c, f).dtype == np.float64 for f in StepCoefficients._fields[:6])
    row = c.row(1)
    assert isinstance(row, StepCoefficients) and all(type(v) is float for v in row[:6]) and row.clip_x0 is False
    assert c.stochastic_steps.tolist() == [True, True, False]
    assert not c.uses_prev_x0
    with pytest.raises(ValueError):
        c.c_x[0] = 1.0  # read-only: engines fold these
    # A raw alphas_cumprod array works like the schedule.
    c2 = compute_coefficients("ddpm", linear.alphas_cumprod, [999, 500, 0], clip_denoised=False)
    np.testing.assert_array_equal(c.c_noise, c2.c_noise)


# --- whole trajectories ----------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, ts, atol",
    [
        # float64: coefficients agree to ~1e-15 relative and the chain contracts.
        (torch.float64, list(range(999, -1, -1)), 1e-9),
        (torch.float64, uniform_timesteps(1000, 25, "quadratic"), 1e-9),
        # float32: different (equal-in-exact-arithmetic) coefficients round
        # differently, ~1e-7 relative per step; over 1000 steps well below 1e-4.
        (torch.float32, list(range(999, -1, -1)), 1e-4),
    ],
)
def test_ddim_eta1_equals_ddpm(schedule, dtype, ts, atol):
    eps_fn = make_eps_fn(schedule.alphas_cumprod)
    x = x_init(dtype)
    ddim = sample_ddim(eps_fn, x, schedule, ts, eta=1.0, noise=SampleNoise(7, SHAPE[0]), clip_denoised=False)
    ddpm = sample_ddpm(eps_fn, x, schedule, ts, noise=SampleNoise(7, SHAPE[0]), clip_denoised=False)
    assert ddim.dtype == dtype and torch.isfinite(ddim).all()
    assert (ddim - ddpm).abs().max().item() < atol
    # Sanity: the noise matters, so the agreement is not vacuous.
    other = sample_ddpm(eps_fn, x, schedule, ts, noise=SampleNoise(8, SHAPE[0]), clip_denoised=False)
    assert (other - ddpm).abs().max().item() > 1e-2


@pytest.fixture(scope="module")
def diffusers_dpm():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DPMSolverMultistepScheduler


# Cosine lists start at <= 990: at t = 999 the cosine schedule's clipped last
# beta leaves alpha_bar = 2.4e-9, and x0 = (x - sigma eps) / 2.5e-5 carries a
# float32 error of ~1e-3 in ANY float32 implementation (ours in float32 vs
# float64 differs by as much), which is not what this test is about.
DPM_CASES = [
    ("linear", [999, 749, 499, 249]),
    ("linear", [999, 900, 700, 400, 150, 20]),
    ("linear", uniform_timesteps(1000, 10, "quadratic")),
    ("linear", uniform_timesteps(1000, 20)),  # >= 15 steps: diffusers' other branch
    ("linear", [500, 10]),
    ("linear", [999]),
    ("cosine", [990, 749, 499, 249]),
    ("cosine", [980, 900, 700, 400, 150, 20]),
    ("cosine", [990, 850, 650, 500, 380, 260, 160, 80, 30, 5]),
    ("cosine", uniform_timesteps(991, 20)),
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside diffusers
@pytest.mark.parametrize("name, ts", DPM_CASES, ids=[f"{n}-{len(t)}" for n, t in DPM_CASES])
def test_dpmpp_2m_matches_diffusers(diffusers_dpm, name, ts):
    sched = NoiseSchedule.named(name)
    eps_fn = make_eps_fn(sched.alphas_cumprod)
    ref = diffusers_dpm(
        num_train_timesteps=sched.num_timesteps,
        trained_betas=sched.betas,
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    ref.set_timesteps(timesteps=ts)
    assert ref.timesteps.tolist() == ts
    x = x_init(torch.float32)
    xr = x.clone()
    for i, t in enumerate(ref.timesteps):
        xr = ref.step(eps_fn(xr, int(t), i), t, xr).prev_sample
    ours = sample_dpmpp_2m(eps_fn, x, sched, ts, clip_denoised=False)
    assert (ours - xr).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def diffusers_unipc():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UniPCMultistepScheduler


def _linear_map_eps_fn(acp):
    """A fixed deterministic fake model: a channel-mixing linear map of x plus a t-dependent offset."""
    mix = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.3

    def eps_fn(x, t, i):
        a = float(acp[t])
        mixed = torch.einsum("ij,bjhw->bihw", mix.to(x.dtype), x)
        return math.sqrt(1 - a) * x / (a * DATA_VAR + 1 - a) + 0.1 * math.sqrt(a) * mixed + 0.05 * t / 1000

    return eps_fn


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside diffusers
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [4, 6, 10])
def test_unipc_matches_diffusers_on_its_own_timesteps(diffusers_unipc, order, spacing, n):
    """diffusers' UniPCMultistepScheduler (bh2, predict_x0, lower_order_final, corrector on) on the timesteps it
    chooses itself, the same fake model outputs, no clipping. What would catch this: the corrector left out
    or applied to the final step, the predictor reading the uncorrected sample, the wrong warm-up order."""
    sched = NoiseSchedule.named("linear")
    eps_fn = _linear_map_eps_fn(sched.alphas_cumprod)
    ref = diffusers_unipc(
        num_train_timesteps=1000, trained_betas=sched.betas, solver_order=order, solver_type="bh2",
        predict_x0=True, lower_order_final=True, timestep_spacing=spacing,
    )
    ref.set_timesteps(n)
    ts = [int(t) for t in ref.timesteps]
    x = x_init(torch.float32)
    xr = x.clone()
    for i, t in enumerate(ref.timesteps):
        xr = ref.step(eps_fn(xr, int(t), i), t, xr).prev_sample
    ours = sample_unipc(eps_fn, x.double(), sched, ts, order=order, clip_denoised=False)
    assert (ours - xr.double()).abs().max().item() < 1e-4


def test_unipc_structure(linear):
    """Order 2 reads x0 of steps i-1, i-2 (its corrector reaches one further back than its predictor), order 3
    also x0 of step i-3; the warm-up starts at first order; the final step is x0; order 3 differs from 2."""
    ts = [999, 900, 700, 400, 150, 20]
    two, three = (compute_coefficients(s, linear, ts) for s in ("unipc", "unipc3"))
    assert [two.row(i).x0_history for i in range(6)] == [0, 1, 2, 2, 2, 0]
    assert [three.row(i).x0_history for i in range(6)] == [0, 1, 2, 3, 3, 0]
    first = compute_coefficients("dpmpp_2m", linear, ts).row(0)
    assert two.row(0) == first and three.row(0) == first  # step 0: first order, no corrector, as DPM-Solver++
    for c in (two, three):
        last = c.row(5)
        assert (last.c_x, last.c_eps) == (last.x0_from_x, last.x0_from_eps)
    assert not np.allclose(two.c_older_x0, three.c_older_x0)
    with pytest.raises(SamplingError, match=r"reads the x0 of the 2 previous step\(s\); pass older_x0"):
        step_update(two.row(2), x_init(), x_init(), x_init())


# --- the loop: callbacks, noise, determinism -----------------------------------------


def test_loop_calls_eps_fn_and_callback_in_order(linear):
    ts = [999, 600, 200, 0]
    calls, seen = [], []

    def eps_fn(x, t, i):
        calls.append((t, i))
        return 0.5 * x

    coeffs = compute_coefficients("dpmpp_2m", linear, ts, clip_denoised=False)
    out = sample_loop(eps_fn, x_init(), coeffs, callback=seen.append, progress=True)
    assert calls == [(t, i) for i, t in enumerate(ts)]
    assert [(d["i"], d["t"]) for d in seen] == [(i, t) for i, t in enumerate(ts)]
    assert set(seen[0]) == {"i", "t", "x", "x0", "x_prev"}
    assert torch.equal(seen[1]["x"], seen[0]["x_prev"])
    assert torch.equal(out, seen[-1]["x_prev"]) and torch.equal(out, seen[-1]["x0"])


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_same_seed_same_samples(linear, sampler, eta):
    eps_fn = make_eps_fn(linear.alphas_cumprod)
    coeffs = compute_coefficients(sampler, linear, uniform_timesteps(1000, 10), eta=eta, clip_denoised=False)
    x = x_init(torch.float32)
    a = sample_loop(eps_fn, x, coeffs, noise=SampleNoise(3, SHAPE[0]))
    b = sample_loop(eps_fn, x, coeffs, noise=SampleNoise(3, SHAPE[0]))
    c = sample_loop(eps_fn, x, coeffs, noise=SampleNoise(4, SHAPE[0]))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draw_step_noise_reproduces_sample_loop(linear, dtype):
    eps_fn = make_eps_fn(linear.alphas_cumprod)
    coeffs = compute_coefficients("ddim", linear, [999, 800, 500, 200, 0], eta=0.7, clip_denoised=False)
    x = x_init(dtype)
    noises = draw_step_noise(coeffs, SampleNoise(11, SHAPE[0]), SHAPE[1:], dtype=dtype)
    assert [n is not None for n in noises] == coeffs.stochastic_steps.tolist() == [True] * 4 + [False]
    # Replay the loop by hand with the pre-drawn noise, as another backend would.
    xi, prev_x0 = x, None
    for i, t in enumerate(coeffs.timesteps):
        xi, prev_x0 = step_update(coeffs.row(i), xi, eps_fn(xi, t, i), prev_x0, noises[i])
    loop = sample_loop(eps_fn, x, coeffs, noise=SampleNoise(11, SHAPE[0]))
    assert torch.equal(xi, loop)


def test_deterministic_samplers_leave_the_noise_untouched(linear):
    noise = SampleNoise(5, SHAPE[0])
    states = [g.get_state() for g in noise.generators]
    eps_fn = make_eps_fn(linear.alphas_cumprod)
    sample_ddim(eps_fn, x_init(), linear, [999, 500, 0], noise=noise, clip_denoised=False)
    sample_dpmpp_2m(eps_fn, x_init(), linear, [999, 500, 0], noise=noise, clip_denoised=False)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(noise.generators, states))
    assert draw_step_noise(compute_coefficients("ddim", linear, [999, 0], clip_denoised=False), noise, SHAPE[1:]) == [None, None]


def test_a_stochastic_step_without_per_sample_noise_is_refused(linear):
    eps_fn = make_eps_fn(linear.alphas_cumprod)
    with pytest.raises(SamplingError, match="SampleNoise with one generator per sample"):
        sample_ddpm(eps_fn, x_init(), linear, [999, 500, 0], noise=SampleNoise(0, SHAPE[0] - 1))


def test_step_update_traces_to_a_constant_graph():
    row = StepCoefficients(1.5, -0.5, 0.9, 0.1, -0.2, 0.3)

    class Step(torch.nn.Module):
        def forward(self, x, eps, prev_x0, noise):
            return step_update(row, x, eps, prev_x0, noise)

    gm = torch.fx.symbolic_trace(Step())
    ops = {n.op for n in gm.graph.nodes}
    assert ops <= {"placeholder", "call_function", "output"}  # no module state, no tensors baked in
    args = [torch.randn(2, 3) for _ in range(4)]
    for got, want in zip(gm(*args), Step()(*args)):
        assert torch.equal(got, want)
    x, eps, prev_x0, noise = args
    assert torch.allclose(gm(*args)[0], 0.9 * x + 0.1 * eps - 0.2 * prev_x0 + 0.3 * noise)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter is deprecated
def test_step_update_exports_to_onnx():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import io

    row = StepCoefficients(1.5, -0.5, 0.9, 0.1, -0.2, 0.3)

    class Step(torch.nn.Module):
        def forward(self, x, eps, prev_x0, noise):
            return step_update(row, x, eps, prev_x0, noise)

    names = ["x", "eps", "prev_x0", "noise"]
    args = tuple(torch.randn(2, 3, 4, 4) for _ in names)
    buf = io.BytesIO()
    # dynamo=False: the TorchScript exporter takes 0.2 s here, the dynamo one ~6 s.
    torch.onnx.export(Step(), args, buf, input_names=names, output_names=["x_prev", "x0"], dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
    for g, want in zip(got, Step()(*args)):
        np.testing.assert_allclose(g, want.numpy(), rtol=1e-6, atol=1e-6)


# --- errors --------------------------------------------------------------------


def test_sampler_errors(linear):
    with pytest.raises(SamplingError, match=r"'euler'.*ddim, ddpm, dpmpp_2m, ipndm"):
        compute_coefficients("euler", linear, [999])
    assert SAMPLERS == ("ddim", "ddpm", "dpmpp_2m", "ipndm", "unipc", "unipc3")
    with pytest.raises(SamplingError, match=r"eta=1.5 is outside \[0, 1\]"):
        compute_coefficients("ddim", linear, [999], eta=1.5, clip_denoised=False)
    with pytest.raises(SamplingError, match=r"eta=0.5 only applies to the ddim"):
        compute_coefficients("ddpm", linear, [999], eta=0.5, clip_denoised=False)
    with pytest.raises(SamplingError, match=r"eta=nan"):
        compute_coefficients("ddim", linear, [999], eta=float("nan"), clip_denoised=False)
    with pytest.raises(TimestepsError, match=r"1000 is out of range"):
        compute_coefficients("ddim", linear, [1000], clip_denoised=False)
    with pytest.raises(SamplingError, match=r"alphas_cumprod\[1\] = 1.0"):
        compute_coefficients("ddim", [0.5, 1.0], [1, 0], clip_denoised=False)
    with pytest.raises(SamplingError, match=r"not strictly decreasing at t=1->2"):
        compute_coefficients("ddpm", [0.9, 0.5, 0.6], [2, 0], clip_denoised=False)


def test_loop_errors(linear):
    coeffs = compute_coefficients("dpmpp_2m", linear, [999, 500, 0], clip_denoised=False)
    with pytest.raises(SamplingError, match=r"eps_fn returned \(2, 6, 8, 8\) at step 0 \(t=999\)"):
        sample_loop(lambda x, t, i: torch.cat([x, x], 1), x_init(), coeffs)
    with pytest.raises(SamplingError, match=r"pass the result of compute_coefficients"):
        sample_loop(lambda x, t, i: x, x_init(), coeffs.row(0))
    x = x_init()
    with pytest.raises(SamplingError, match=r"needs prev_x0"):
        step_update(coeffs.row(1), x, x)
    with pytest.raises(SamplingError, match=r"needs noise"):
        step_update(compute_coefficients("ddpm", linear, [999, 0], clip_denoised=False).row(0), x, x)


def test_clip_denoised_matches_guided_diffusions_clipped_ddim_in_float64(linear):
    # guided-diffusion's DDIM with clip_denoised: x0 = clip(pred_xstart), eps recomputed from it,
    # then x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.
    ts = [999, 700, 300, 20]
    acp = linear.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 6, 6, generator=gen, dtype=torch.float64) * 1.5
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    z = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    coeffs = compute_coefficients("ddim", linear, ts, eta=0.5)
    assert coeffs.clip_denoised and coeffs.row(0).clip_x0
    for i, t in enumerate(ts):
        a = acp[t]
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else 1.0
        x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        e = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        sigma = 0.5 * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * e + sigma * z
        got, got_x0 = step_update(coeffs.row(i), x, eps, None, z if sigma else None)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        assert got_x0.abs().max() <= 1
    # unclipped, the same inputs leave [-1, 1] at t=999: the clip did something
    raw = step_update(compute_coefficients("ddim", linear, ts, clip_denoised=False).row(0), x, eps)[1]
    assert raw.abs().max() > 10
