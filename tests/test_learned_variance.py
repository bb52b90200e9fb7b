"""guided-diffusion's learned variance (learn_sigma models, DDPM): the step against guided-diffusion's own formulas.

The reference below is written from guided-diffusion (gaussian_diffusion.py: GaussianDiffusion.__init__,
p_mean_variance with ModelVarType.LEARNED_RANGE, p_sample; respace.py: SpacedDiffusion's betas), in float64,
independently of autodiffusion_rt's coefficient code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CORE_TINY_CONFIG, core_random_model

from autodiffusion_rt.diffusion import NoiseSchedule, compute_coefficients, step_update
from autodiffusion_rt.plan import Plan
from autodiffusion_rt.sampling import initial_state, sample


class GuidedDiffusionReference:
    """SpacedDiffusion(use_timesteps) with LEARNED_RANGE variance, float64 numpy."""

    def __init__(self, alphas_cumprod: np.ndarray, use_timesteps):
        self.timesteps = sorted(use_timesteps)  # respaced index k -> original t
        last, betas = 1.0, []
        for t in self.timesteps:
            betas.append(1 - alphas_cumprod[t] / last)
            last = alphas_cumprod[t]
        self.betas = np.array(betas, dtype=np.float64)
        alphas = 1.0 - self.betas
        self.acp = np.cumprod(alphas)
        self.acp_prev = np.append(1.0, self.acp[:-1])
        self.posterior_variance = self.betas * (1.0 - self.acp_prev) / (1.0 - self.acp)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.coef1 = self.betas * np.sqrt(self.acp_prev) / (1.0 - self.acp)
        self.coef2 = (1.0 - self.acp_prev) * np.sqrt(alphas) / (1.0 - self.acp)

    def p_sample(self, k: int, x, model_output, noise, clip_denoised=True):
        c = x.shape[1]
        eps, v = model_output[:, :c], model_output[:, c:]
        min_log = self.posterior_log_variance_clipped[k]
        max_log = np.log(self.betas[k])
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = np.sqrt(1.0 / self.acp[k]) * x - np.sqrt(1.0 / self.acp[k] - 1) * eps
        if clip_denoised:
            x0 = np.clip(x0, -1, 1)
        mean = self.coef1[k] * x0 + self.coef2[k] * x
        nonzero = float(k != 0)
        return mean + nonzero * np.exp(0.5 * log_var) * noise


@pytest.mark.parametrize("timesteps", [[999, 740, 420, 130, 0], [999, 500, 37], [999, 1]])
@pytest.mark.parametrize("clip", [True, False])
def test_learned_variance_step_matches_guided_diffusion_in_float64(timesteps, clip):
    """What would catch this: max_log taken from the full chain's beta_t instead of the respaced one, the unclipped
    log posterior variance, frac = v instead of (v + 1) / 2, or noise added at the last step."""
    schedule = NoiseSchedule.named("cosine", 1000)
    ref = GuidedDiffusionReference(schedule.alphas_cumprod, timesteps)
    coeffs = compute_coefficients("ddpm", schedule, timesteps, clip_denoised=clip, learned_variance=True)
    assert coeffs.learned_variance
    rng = np.random.default_rng(0)
    n = len(timesteps)
    for i in range(n):
        x = rng.standard_normal((4, 3, 5, 5))
        out = np.concatenate([rng.standard_normal((4, 3, 5, 5)), rng.uniform(-1, 1, (4, 3, 5, 5))], axis=1)
        noise = rng.standard_normal((4, 3, 5, 5))
        want = ref.p_sample(n - 1 - i, x, out, noise, clip)
        row = coeffs.row(i)
        T = torch.from_numpy
        got, _ = step_update(row, T(x), T(out[:, :3]), None, T(noise) if row.c_noise != 0 else None, var_v=T(out[:, 3:]))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-10)  # unclipped x0 at t=999 reaches 1e4
    # without learned variance the same rows are fixed-small: the variance output changes the images
    fixed = compute_coefficients("ddpm", schedule, timesteps, clip_denoised=clip)
    assert not fixed.learned_variance and np.array_equal(fixed.c_x, coeffs.c_x)


def learn_sigma_model(seed=0, num_classes=None):
    cfg = {**CORE_TINY_CONFIG, "out_channels": 2 * CORE_TINY_CONFIG["in_channels"], "num_classes": num_classes}
    return core_random_model(cfg, dict(noise_schedule="cosine", diffusion_steps=1000, learn_sigma=True), seed=seed, scale=0.05)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return learn_sigma_model()


TIMESTEPS = [999, 600, 250, 0]


def reference_samples(model, n, seed):
    """guided-diffusion's p_sample loop in float64 on the raw UNet outputs, with the documented per-sample draws."""
    ref = GuidedDiffusionReference(model.schedule.alphas_cumprod, TIMESTEPS)
    x, y, noise = initial_state(model, n, seed)
    xs = x.double().numpy()
    for i, t in enumerate(TIMESTEPS):
        with torch.no_grad():
            out = model.unet(torch.from_numpy(xs).float(), torch.full((n,), t), y).double().numpy()
        z = noise.randn(model.image_shape).double().numpy() if i < len(TIMESTEPS) - 1 else 0.0
        xs = ref.p_sample(len(TIMESTEPS) - 1 - i, xs, out, z)
    return torch.from_numpy(xs).float().clamp(-1, 1)


def test_sample_ddpm_uses_the_learned_variance(model):
    """Tolerance: the float32 affine update at t=999 of the cosine schedule (1/sqrt(alpha_bar) ~ 160, clipped x0)
    differs from the float64 reference by ~3e-3 on this step alone, with or without learned variance; the fixed-small
    variance differs by far more (asserted below)."""
    got = sample(model, TIMESTEPS, "ddpm", n=6, seed=4)
    want = reference_samples(model, 6, 4)
    assert (got - want).abs().max() < 1e-2
    # and it is not the fixed-small variance
    fixed = compute_coefficients("ddpm", model.schedule, TIMESTEPS)
    from autodiffusion_rt.diffusion import sample_loop
    from autodiffusion_rt.sampling import make_eps_fn

    x, y, noise = initial_state(model, 6, 4)
    small = sample_loop(make_eps_fn(model, y, [None] * 4), x, fixed, noise=noise).clamp(-1, 1)
    assert (small - got).abs().max() > 0.1


def test_search_fitness_samples_equal_sample_with_learned_variance(model):
    from conftest import search_build_tiny_extractor

    from search.fitness import FitnessEvaluator
    from search.space import Candidate

    ev = FitnessEvaluator(model, "ddpm", 0.0, 6, 4, search_build_tiny_extractor(), None, batch_size=4)
    cand = Candidate.full(TIMESTEPS)
    got = ev.samples([cand])[0]
    assert torch.equal(got, sample(model, TIMESTEPS, "ddpm", n=6, seed=4, batch_size=4))


def test_exported_learned_variance_step_runs_in_onnxruntime_and_matches_guided_diffusion(model, tmp_path):
    import onnxruntime as ort

    from export.onnx_export import export_step_onnx
    from export.subnet import step_modules

    plan = Plan.for_model(model, TIMESTEPS, sampler="ddpm", spec=model.name)
    ref = GuidedDiffusionReference(model.schedule.alphas_cumprod, TIMESTEPS)
    mods = step_modules(model, plan, steps=[1])
    mod = mods[0]
    res = export_step_onnx(mod, tmp_path / "s.onnx")
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    feeds = dict(zip(mod.input_names, mod.example_inputs(3, seed=1)))
    assert "noise" in feeds
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        out = model.unet(feeds["x"], torch.full((3,), TIMESTEPS[1])).double().numpy()
    want = ref.p_sample(len(TIMESTEPS) - 2, feeds["x"].double().numpy(), out, feeds["noise"].double().numpy())
    assert np.abs(got - want).max() <= 1e-4
