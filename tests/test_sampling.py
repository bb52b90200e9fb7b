"""``autodiffusion_rt.sample``: the public entry point, its draw order and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autodiffusion_rt as ad
from autodiffusion_rt.diffusion import SampleNoise
from autodiffusion_rt.errors import LayerError, SamplingError, TimestepsError
from autodiffusion_rt.sampling import initial_state

TS = [999, 600, 250, 40]


def linear_alphas_cumprod(steps: int = 1000) -> np.ndarray:
    """guided-diffusion's get_named_beta_schedule("linear"), in float64."""
    scale = 1000 / steps
    return np.cumprod(1.0 - np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64))


def guided_diffusion_loop(sampler: str, eps_of, x, noise, acp, ts, eta: float = 0.0) -> list[np.ndarray]:
    """Each step's output, written from guided-diffusion's formulas in float64 with ``clip_denoised=True``.

    ``eps_of(x, t)``: the model's eps as float64. DDIM: ``ddim_sample``; DDPM: ``p_sample`` on the respaced
    chain (betas from consecutive kept alpha_bars, fixed-small variance = the posterior variance);
    DPM-Solver++(2M): Lu et al. 2022, Alg. 2 on the clipped x0, first order at the first and last step.
    The last step lands on alpha_bar = 1. Stochastic steps take the next per-sample draw (``noise``).
    """
    outs, x0_prev = [], None
    for i, t in enumerate(ts):
        a_t = acp[t]
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = eps_of(x, t)
        x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1, 1)  # pred_xstart, clipped
        if sampler == "ddim":
            eps = (x / np.sqrt(a_t) - x0) / np.sqrt(1 / a_t - 1)  # _predict_eps_from_xstart
            sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
            x = x0 * np.sqrt(a_prev) + np.sqrt(1 - a_prev - sigma**2) * eps
        elif sampler == "ddpm":
            beta = 1 - a_t / a_prev
            coef1 = beta * np.sqrt(a_prev) / (1 - a_t)
            coef2 = (1 - a_prev) * np.sqrt(1 - beta) / (1 - a_t)
            sigma = np.sqrt(beta * (1 - a_prev) / (1 - a_t))
            x = coef1 * x0 + coef2 * x
        else:
            sigma = 0.0
            if i + 1 == len(ts):
                x = x0
            else:
                def lam(a):  # log(alpha / sigma)
                    return 0.5 * np.log(a / (1 - a))
                h = lam(a_prev) - lam(a_t)
                d = x0
                if x0_prev is not None:  # second order after the first step (the last step is x0 itself)
                    r = (lam(a_t) - lam(acp[ts[i - 1]])) / h
                    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
                x = np.sqrt((1 - a_prev) / (1 - a_t)) * x - np.sqrt(a_prev) * np.expm1(-h) * d
        if sigma != 0:
            x = x + sigma * noise.randn(x.shape[1:]).double().numpy()  # drawn in float32, as sample() draws
        x0_prev = x0
        outs.append(x)
    return outs


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 0.8), ("ddpm", 0.0), ("dpmpp_2m", 0.0)])
def test_sample_follows_guided_diffusions_clipped_samplers_in_float64(tiny_cond_model, sampler, eta):
    """Every step of ``sample()`` (clipping on, as in production) against a float64 loop written from
    guided-diffusion's formulas, from the documented initial state (x_T, labels, per-sample noise).
    What would catch this: a wrong coefficient, a clip applied to x instead of x0, noise drawn on the last
    step or in another order; each moves some step by far more than float32 rounding."""
    m = tiny_cond_model
    acp = linear_alphas_cumprod()
    steps = []
    out, y = ad.sample(m, TS, sampler=sampler, n=5, seed=7, eta=eta, return_labels=True,
                       callback=lambda info: steps.append(info["x_prev"].double().numpy()))
    x, y0, noise = initial_state(m, 5, 7)
    assert torch.equal(y, y0)

    def eps_of(x64, t):
        with torch.no_grad():
            return m.eps(torch.from_numpy(x64).float(), torch.full((5,), t), y0).double().numpy()

    expected = guided_diffusion_loop(sampler, eps_of, x.double().numpy(), noise, acp, TS, eta)
    assert len(steps) == len(expected)
    for i, (got, want) in enumerate(zip(steps, expected)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()), err_msg=f"step {i}")
    np.testing.assert_allclose(out.double().numpy(), np.clip(expected[-1], -1, 1), rtol=0, atol=1e-4)


def test_labels_drawn_from_the_seed_cover_the_classes_and_given_labels_are_used(tiny_cond_model):
    _, y = ad.sample(tiny_cond_model, [500, 100], n=60, seed=0, return_labels=True)
    assert set(y.tolist()) == {0, 1, 2}
    a = ad.sample(tiny_cond_model, [500, 100], n=4, seed=0, labels=[0, 0, 0, 0])
    b = ad.sample(tiny_cond_model, [500, 100], n=4, seed=0, labels=[2, 2, 2, 2])
    assert not torch.allclose(a, b)
    assert torch.equal(a, ad.sample(tiny_cond_model, [500, 100], n=4, seed=0, labels=0))


def _unclamped(model, **kw) -> list[torch.Tensor]:
    """Each step's x_prev before the final clamp (random weights saturate the clamped output)."""
    steps = []
    ad.sample(model, TS, n=3, seed=1, callback=lambda s: steps.append(s["x_prev"].clone()), **kw)
    return steps


def test_keep_per_step_changes_only_the_steps_it_names(tiny_model):
    m = tiny_model
    attn = next(layer.id for layer in m.layers if layer.kind == "attn")
    full = _unclamped(m)
    same = _unclamped(m, keep=[None, None, None, m.unet.layer_ids])
    skipped_second = _unclamped(m, keep=[None, m.unet.layer_ids - {attn}, None, None])
    assert all(torch.equal(a, b) for a, b in zip(full, same))
    assert torch.equal(full[0], skipped_second[0])
    assert (full[1] - skipped_second[1]).abs().max() > 1e-3
    everywhere = _unclamped(m, keep=m.unet.layer_ids - {attn})
    assert (everywhere[0] - skipped_second[0]).abs().max() > 1e-3


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.6)])
def test_a_samples_images_do_not_depend_on_n_or_chunking(tiny_cond_model, sampler, eta):
    """Per-sample draws: sample i of seed s is the same in any n, any chunk size.

    What would catch this: one generator shared by the batch (the old draw order)
    makes the first 3 of n=7 differ from n=3 on every stochastic step.
    """
    m = tiny_cond_model
    seven, y7 = ad.sample(m, TS, sampler, n=7, seed=11, eta=eta, return_labels=True)
    three, y3 = ad.sample(m, TS, sampler, n=3, seed=11, eta=eta, return_labels=True, batch_size=2)
    torch.testing.assert_close(seven[:3], three, rtol=0, atol=1e-5)
    assert torch.equal(y7[:3], y3)
    other = ad.sample(m, TS, sampler, n=3, seed=12, eta=eta)
    assert (other - three).abs().max() > 1e-2


def test_per_sample_generators_are_unrelated_across_seeds_and_indices():
    from autodiffusion_rt.diffusion.noise import sample_generator_seed

    seeds = {sample_generator_seed(s, i) for s in range(30) for i in range(30)}
    assert len(seeds) == 900 and all(0 <= v < 2**63 for v in seeds)
    # (seed 0, index 1) and (seed 1, index 0) must not share a stream.
    a = SampleNoise(0, [1]).randn((16,))
    b = SampleNoise(1, [0]).randn((16,))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "3", True])
def test_seeds_outside_the_one_range_are_refused(tiny_model, seed):
    with pytest.raises(SamplingError, match=r"\[0, 2\^63\)"):
        ad.sample(tiny_model, TS, n=1, seed=seed)


def test_chunked_model_calls_give_the_same_images(tiny_model):
    a = ad.sample(tiny_model, TS, n=7, seed=2, batch_size=256)
    b = ad.sample(tiny_model, TS, n=7, seed=2, batch_size=3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "timesteps, pattern",
    [([], "empty"), ([5, 5], "appears twice"), ([3, 9], "descending"), ([1000, 3], "range"), ([-1], "range")],
)
def test_bad_timesteps(tiny_model, timesteps, pattern):
    with pytest.raises(TimestepsError, match=pattern):
        ad.sample(tiny_model, timesteps, n=1)


def test_bad_arguments_are_clear_errors(tiny_model, tiny_cond_model):
    for n in (0, -3, 2.5, True):
        with pytest.raises(SamplingError, match="n="):
            ad.sample(tiny_model, TS, n=n)
    with pytest.raises(SamplingError, match="unknown sampler"):
        ad.sample(tiny_model, TS, sampler="euler")
    with pytest.raises(SamplingError, match="unconditional"):
        ad.sample(tiny_model, TS, n=2, labels=[0, 1])
    with pytest.raises(SamplingError, match="out of range"):
        ad.sample(tiny_cond_model, TS, n=2, labels=[0, 3])
    with pytest.raises(SamplingError, match="3 labels for n=2"):
        ad.sample(tiny_cond_model, TS, n=2, labels=[0, 1, 2])
    with pytest.raises(LayerError, match="no.such.layer"):
        ad.sample(tiny_model, TS, n=1, keep={"no.such.layer"})
    with pytest.raises(SamplingError, match="2 entries for 4 timesteps"):
        ad.sample(tiny_model, TS, n=1, keep=[None, None])


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_device_cpu_equals_the_default_and_bad_devices_are_clear_errors(tiny_cond_model, sampler):
    m = tiny_cond_model
    a, ya = ad.sample(m, TS, sampler, n=3, seed=2, return_labels=True)
    b, yb = ad.sample(m, TS, sampler, n=3, seed=2, return_labels=True, device="cpu")
    assert torch.equal(a, b) and torch.equal(ya, yb) and b.device.type == "cpu"
    with pytest.raises(SamplingError, match=r"weights are on cpu but device='meta'.*model\.unet\.to"):
        ad.sample(m, TS, n=1, device="meta")
    with pytest.raises(SamplingError, match="'gpu0' is not a torch device"):
        ad.sample(m, TS, n=1, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SamplingError, match="no CUDA device: pass device='cpu'"):
            ad.sample(m, TS, n=1, device="cuda")
