"""Noise schedules, timestep validation and the baseline timestep lists."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autodiffusion_rt.diffusion import NoiseSchedule, uniform_timesteps, validate_timesteps
from autodiffusion_rt.errors import Error, SamplingError, TimestepsError

# --- schedules -----------------------------------------------------------------


def _reference_cumprod(betas):
    # Plain python running product, independent of np.cumprod.
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return np.array(out)


@pytest.mark.parametrize("T", [1000, 4000, 100, 21])
def test_linear_matches_guided_diffusion(T):
    sched = NoiseSchedule.named("linear", T)
    # guided-diffusion: scale = 1000 / T; linspace(scale * 1e-4, scale * 0.02, T).
    start, end = 1000 / T * 1e-4, 1000 / T * 0.02
    expected = [start + i * (end - start) / (T - 1) for i in range(T)]
    assert sched.name == "linear"
    assert sched.num_timesteps == T
    assert sched.betas.dtype == np.float64 and sched.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(sched.betas, expected, rtol=1e-13, atol=0)
    assert sched.betas[0] == pytest.approx(1e-4 * 1000 / T, rel=1e-15)
    assert sched.betas[-1] == pytest.approx(0.02 * 1000 / T, rel=1e-15)
    np.testing.assert_allclose(sched.alphas_cumprod, _reference_cumprod(expected), rtol=1e-12, atol=0)


@pytest.mark.parametrize("T", [1000, 4000, 50, 1])
def test_cosine_matches_guided_diffusion(T):
    sched = NoiseSchedule.named("cosine", T)

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    raw = np.array([1 - alpha_bar((i + 1) / T) / alpha_bar(i / T) for i in range(T)])
    np.testing.assert_allclose(sched.betas, np.minimum(raw, 0.999), rtol=1e-13, atol=0)
    # The clip at 0.999 is active at the very end (alpha_bar(1) = cos(pi/2)^2 ~ 0).
    assert sched.betas[-1] == 0.999
    assert raw[-1] > 0.999
    assert np.all(sched.betas <= 0.999)
    np.testing.assert_allclose(sched.alphas_cumprod, _reference_cumprod(sched.betas), rtol=1e-12, atol=0)
    if T > 1:
        # Away from the clip, alpha_bar_t follows the continuous curve ratio.
        np.testing.assert_allclose(
            sched.alphas_cumprod[: T // 2],
            [alpha_bar((i + 1) / T) / alpha_bar(0) for i in range(T // 2)],
            rtol=1e-12,
        )


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_invariants(name):
    sched = NoiseSchedule.named(name)
    acp = sched.alphas_cumprod
    assert np.all(np.diff(acp) < 0), "alphas_cumprod must strictly decrease"
    assert np.all((acp > 0) & (acp < 1))
    assert np.all((sched.betas > 0) & (sched.betas < 1))
    with pytest.raises(ValueError):
        sched.betas[0] = 0.5  # frozen: plans and engines derive from these arrays
    with pytest.raises(ValueError):
        sched.alphas_cumprod[0] = 0.5
    assert "num_timesteps=1000" in repr(sched)


def test_from_betas_copies_and_derives_cumprod():
    betas = np.array([0.1, 0.2, 0.3])
    sched = NoiseSchedule.from_betas("custom", betas)
    betas[0] = 0.9  # caller's array must not leak into the schedule
    np.testing.assert_allclose(sched.alphas_cumprod, [0.9, 0.72, 0.504], rtol=1e-15)
    assert sched.betas[0] == 0.1


def test_schedule_errors():
    with pytest.raises(SamplingError, match=r"'quadratic'.*linear, cosine"):
        NoiseSchedule.named("quadratic")
    with pytest.raises(SamplingError, match=r"num_timesteps > 20.*got 20"):
        NoiseSchedule.named("linear", 20)
    with pytest.raises(SamplingError, match=r"num_timesteps=0"):
        NoiseSchedule.named("cosine", 0)
    with pytest.raises(SamplingError, match=r"num_timesteps=10.5"):
        NoiseSchedule.named("cosine", 10.5)
    with pytest.raises(SamplingError, match=r"betas\[1\] = 1\.0"):
        NoiseSchedule.from_betas("bad", [0.1, 1.0])
    with pytest.raises(SamplingError, match=r"shape"):
        NoiseSchedule.from_betas("bad", [])
    with pytest.raises(SamplingError, match=r"same length"):
        NoiseSchedule("bad", betas=[0.1, 0.2], alphas_cumprod=[0.9])
    with pytest.raises(SamplingError, match=r"not strictly decreasing"):
        NoiseSchedule("bad", betas=[0.1, 0.2], alphas_cumprod=[0.9, 0.95])
    assert issubclass(SamplingError, Error)


# --- validate_timesteps --------------------------------------------------------


def test_validate_accepts_int_like_sequences():
    assert validate_timesteps([999, 500, 0], 1000) == [999, 500, 0]
    out = validate_timesteps(np.array([9, 4, 1], dtype=np.int32), 10)
    assert out == [9, 4, 1] and all(type(t) is int for t in out)
    assert validate_timesteps((np.int64(5), 3), 10) == [5, 3]
    assert validate_timesteps(torch.tensor([7, 2]), 10) == [7, 2]
    assert validate_timesteps(range(9, -1, -3), 10) == [9, 6, 3, 0]


@pytest.mark.parametrize(
    "timesteps, pattern",
    [
        ([], r"timesteps is empty"),
        ([999, 2.0], r"timesteps\[1\] = 2\.0 is a float, not an integer.*write 2"),
        ([999, 2.5], r"timesteps\[1\] = 2\.5 is a float, not an integer"),
        (np.array([9.0, 3.0]), r"timesteps\[0\] = .*float64, not an integer"),
        ([True, 0], r"timesteps\[0\] = True is a bool"),
        (["5"], r"timesteps\[0\] = '5' is a str"),
        ([999, 1000], r"timesteps\[1\] = 1000 is out of range.*\[0, 1000\)"),
        ([999, -1], r"timesteps\[1\] = -1 is out of range.*\[0, 1000\)"),
        ([999, 500, 999], r"timestep 999 appears twice \(positions 0 and 2\)"),
        ([500, 600, 100], r"not strictly descending at position 1: 500 then 600.*\[600, 500, 100\]"),
        ("999", r"is not a sequence"),
        (999, r"is not a sequence"),
    ],
)
def test_validate_errors(timesteps, pattern):
    with pytest.raises(TimestepsError, match=pattern):
        validate_timesteps(timesteps, 1000)


def test_validate_error_kinds_have_distinct_messages():
    bad = [[], [1.5], [1000], [3, 3], [3, 4]]
    messages = set()
    for ts in bad:
        with pytest.raises(TimestepsError) as info:
            validate_timesteps(ts, 1000)
        messages.add(str(info.value).split(";")[0].split(":")[0])
    assert len(messages) == len(bad)


def test_validate_bad_num_timesteps():
    with pytest.raises(TimestepsError, match=r"num_timesteps=0"):
        validate_timesteps([0], 0)


# --- uniform_timesteps ---------------------------------------------------------


def test_uniform_known_values():
    assert uniform_timesteps(1000, 4) == [999, 749, 499, 249]
    # round half to even, like numpy: 562.5 -> 562, 62.5 -> 62.
    assert uniform_timesteps(1000, 4, "quadratic") == [999, 561, 249, 61]
    assert uniform_timesteps(1000, 1) == [999]
    assert uniform_timesteps(1000, 1, "quadratic") == [999]
    assert uniform_timesteps(1000, 10) == list(range(999, 0, -100))
    assert uniform_timesteps(10, 10) == list(range(9, -1, -1))
    assert uniform_timesteps(10, 10, "quadratic") == list(range(9, -1, -1))


def test_uniform_quadratic_repairs_collisions():
    # Raw values for T=10, n=8 are [9, 7, 5, 3, 1, 0, 0, -1]: the tail collides
    # and runs below 0, so it becomes the consecutive run down to 0.
    assert uniform_timesteps(10, 8, "quadratic") == [9, 7, 5, 4, 3, 2, 1, 0]
    # T=1000, n=50: raw ends [..., 5, 3, 1, -1]; only the last value moves.
    ts = uniform_timesteps(1000, 50, "quadratic")
    assert ts[:3] == [999, 959, 921] and ts[-4:] == [5, 3, 1, 0]


def test_uniform_errors():
    with pytest.raises(TimestepsError, match=r"n=0 .*1 <= n <= 1000"):
        uniform_timesteps(1000, 0)
    with pytest.raises(TimestepsError, match=r"n=1001 .*1 <= n <= 1000"):
        uniform_timesteps(1000, 1001)
    with pytest.raises(TimestepsError, match=r"'cubic'.*linear, quadratic, logsnr, karras"):
        uniform_timesteps(1000, 4, "cubic")
    with pytest.raises(TimestepsError, match=r"n=4.0 is not an integer"):
        uniform_timesteps(1000, 4.0)


def _round_half_even(num: int, den: int) -> int:
    # round(num / den) with ties to even, in integers only.
    q, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and q % 2 == 1):
        q += 1
    return q


def test_uniform_linear_matches_diffusers_trailing_for_common_n():
    # diffusers' timestep_spacing="trailing" is np.arange(T, 0, -T/n).round() - 1.
    # In float it can round an exact .5 tie the other way (e.g. T=1000, n=48);
    # ours is exact, so compare only common step counts without such ties.
    T = 1000
    for n in [1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 25, 50, 100, 250]:
        expected = (np.arange(T, 0, -T / n).round().astype(np.int64) - 1).tolist()
        assert uniform_timesteps(T, n) == expected


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(1, 1200).flatmap(lambda T: st.tuples(st.just(T), st.integers(1, T))))
def test_uniform_properties(T_n):
    T, n = T_n
    for spacing in ("linear", "quadratic"):
        ts = uniform_timesteps(T, n, spacing)
        assert len(ts) == n and ts[0] == T - 1
        assert validate_timesteps(ts, T) == ts  # strictly descending, in range
        if n == T:
            assert ts == list(range(T - 1, -1, -1))
    # linear: t_i = round(T - i*T/n) - 1 = round(T*(n-i)/n) - 1, exactly.
    assert uniform_timesteps(T, n) == [_round_half_even(T * (n - i), n) - 1 for i in range(n)]
    # quadratic: the raw value, except where the repair moved it.
    raw = [_round_half_even(T * (n - i) ** 2, n * n) - 1 for i in range(n)]
    quad = uniform_timesteps(T, n, "quadratic")
    for i, (q, r) in enumerate(zip(quad, raw)):
        if q != r:
            # moved: pushed below a colliding predecessor, or lifted off the floor
            assert (i > 0 and r >= quad[i - 1]) or q == n - 1 - i


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("n", [4, 6, 10])
def test_uniform_logsnr_is_nearest_to_evenly_spaced_log_snr(name, n):
    """Independent float64 reference: lambda = log(sqrt(a)/sqrt(1-a)) computed with math per timestep;
    each chosen t is the integer timestep nearest to its target (no neighbour is closer).
    What would catch this: spacing in t instead of lambda, a reversed lambda axis, an off-by-one target."""
    sched = NoiseSchedule.named(name, 1000)
    ts = uniform_timesteps(1000, n, "logsnr", sched)
    lam = [math.log(math.sqrt(a) / math.sqrt(1 - a)) for a in sched.alphas_cumprod]
    targets = [lam[999] + i * (lam[0] - lam[999]) / n for i in range(n)]
    assert ts[0] == 999 and ts == sorted(set(ts), reverse=True) and len(ts) == n
    for prev, t, target in zip(ts, ts[1:], targets[1:]):
        nearest = min(range(1000), key=lambda u: abs(lam[u] - target))
        # the nearest timestep, or, when that one is taken (the cosine schedule's lambda plunges in its last
        # few timesteps), the one just below its predecessor
        assert t == nearest or (nearest >= prev and t == prev - 1)


def test_uniform_logsnr_needs_the_schedule():
    with pytest.raises(TimestepsError, match="logsnr spacing needs the model's schedule"):
        uniform_timesteps(1000, 4, "logsnr")


def _karras_reference(acp, n, rho=7.0):
    """EDM eq. 5 in python floats, each sigma mapped to t by interpolating t linearly in log-sigma (diffusers'
    _sigma_to_t), rounded half to even, then repaired to strictly descending (a collision moves below its
    predecessor, a value is lifted when the remaining steps would run below 0)."""
    log_sigma = [0.5 * (math.log(1 - a) - math.log(a)) for a in acp]
    smax, smin = math.exp(log_sigma[-1]), math.exp(log_sigma[0])
    out = []
    for i in range(n):
        frac = i / (n - 1) if n > 1 else 0.0
        ls = rho * math.log(smax ** (1 / rho) + frac * (smin ** (1 / rho) - smax ** (1 / rho)))
        lo = max(k for k in range(len(acp) - 1) if log_sigma[k] <= ls) if ls >= log_sigma[0] else 0
        w = min(max((ls - log_sigma[lo]) / (log_sigma[lo + 1] - log_sigma[lo]), 0.0), 1.0)
        t = round(lo + w)
        if out:
            t = min(t, out[-1] - 1)
        out.append(max(t, n - 1 - i))
    return out


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 10, 50])
def test_uniform_karras_equals_the_float64_edm_formula(name, n):
    """What would catch this: rho applied to t instead of sigma, sigma_min/max swapped, interpolation in sigma
    instead of log-sigma, floor instead of round, a missing repair (duplicates on the cosine schedule)."""
    sched = NoiseSchedule.named(name, 1000)
    ts = uniform_timesteps(1000, n, "karras", sched)
    assert ts == _karras_reference(list(sched.alphas_cumprod), n)
    assert ts[0] == 999 and len(ts) == n and ts == sorted(set(ts), reverse=True)
    if n > 1:
        assert ts[-1] == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_uniform_karras_equals_diffusers_karras_timesteps_where_they_are_distinct(name):
    diffusers = pytest.importorskip("diffusers")
    sched = NoiseSchedule.named(name, 1000)
    compared = 0
    for n in (2, 3, 4, 5, 6, 8, 10, 20):
        ref = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, trained_betas=sched.betas, use_karras_sigmas=True
        )
        ref.set_timesteps(n)
        want = [int(t) for t in ref.timesteps]
        if len(set(want)) == n:  # diffusers keeps duplicates (cosine's crowded top); ours are repaired
            assert uniform_timesteps(1000, n, "karras", sched.alphas_cumprod) == want
            compared += 1
    assert compared >= (6 if name == "linear" else 1)


def test_uniform_karras_needs_the_schedule():
    with pytest.raises(TimestepsError, match="karras spacing needs the model's schedule"):
        uniform_timesteps(1000, 4, "karras")
