"""``autodiffusion_rt.sample``: the public entry point, its draw order and its errors."""

from __future__ import annotations

import pytest
import torch

import autodiffusion_rt as ad
from autodiffusion_rt.diffusion import SampleNoise, compute_coefficients, sample_loop
from autodiffusion_rt.errors import LayerError, SamplingError, TimestepsError
from autodiffusion_rt.sampling import initial_state

TS = [999, 600, 250, 40]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_sample_equals_the_plain_loop_from_the_documented_initial_state(tiny_cond_model, sampler):
    m = tiny_cond_model
    out, y = ad.sample(m, TS, sampler=sampler, n=5, seed=7, return_labels=True)
    x, y0, noise = initial_state(m, 5, 7)
    assert torch.equal(y, y0)
    coeffs = compute_coefficients(sampler, m.schedule, TS)
    ref = sample_loop(lambda x, t, i: m.eps(x, torch.full((5,), t), y0), x, coeffs, noise=noise).clamp(-1, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


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
    attn = next(l.id for l in m.layers if l.kind == "attn")
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
