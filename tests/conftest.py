"""Shared test fixtures. Fixture names are prefixed by the area that owns them."""

from __future__ import annotations

import pytest
import torch

# A tiny class-conditional ADM UNet (1x8x8, random weights); well under 1 ms per sample per call on a CPU.
SEARCH_TINY_CONFIG = dict(
    image_size=8,
    in_channels=1,
    model_channels=32,
    out_channels=1,
    num_res_blocks=1,
    attention_resolutions=(2,),
    dropout=0.0,
    channel_mult=(1, 1),
    conv_resample=False,
    num_classes=10,
    num_heads=2,
    use_scale_shift_norm=True,
    resblock_updown=False,
)
SEARCH_TINY_DIFFUSION = dict(noise_schedule="cosine", diffusion_steps=1000, learn_sigma=False)


def search_build_tiny_model(seed: int = 0, config: dict | None = None, diffusion: dict | None = None):
    """A DiffusionModel whose eps is the exact denoiser of Gaussian data N(-0.7, 0.3) plus 0.3 sqrt(alpha_bar) x a random UNet.

    Random weights alone give eps that blow x0 up and every sample saturates
    to +-1, so every schedule would look alike; the analytic term keeps samples
    in range and makes the schedule matter, the UNet term (zero-initialised
    layers re-drawn) makes every layer and skip set matter.
    """
    from autodiffusion_rt.models import ADMUNet, DiffusionModel, model_from_weights

    cfg = dict(SEARCH_TINY_CONFIG if config is None else config)
    torch.manual_seed(seed)
    unet = ADMUNet(**cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in unet.state_dict().items():
        if v.is_floating_point() and v.numel() and not v.any():
            v = torch.randn(v.shape, generator=g) * 0.05
        state[k] = v.clone()
    base = model_from_weights("tiny:search", cfg, dict(SEARCH_TINY_DIFFUSION if diffusion is None else diffusion), state, source="<random>")
    acp = torch.tensor(base.schedule.alphas_cumprod, dtype=torch.float32)

    class _TinyModel(DiffusionModel):
        def eps(self, x, t, y=None, keep=None):
            a = acp[t].view(-1, 1, 1, 1)
            analytic = (1 - a).sqrt() * (x - a.sqrt() * -0.7) / (a * 0.3 + 1 - a)
            return analytic + 0.3 * a.sqrt() * super().eps(x, t, y, keep)

    return _TinyModel(**{k: getattr(base, k) for k in ("name", "unet", "schedule", "config", "fingerprint", "learn_sigma", "metadata")})


@pytest.fixture(scope="session")
def search_tiny_model():
    return search_build_tiny_model()


def search_build_tiny_extractor(dim: int = 16, seed: int = 0, channels: int = 1, pool: int = 7, label: str = "search-tiny"):
    """A fixed random-projection feature extractor (dim-d) for ``channels``-channel images: FID in microseconds, no assets.

    Average-pools to ``pool`` x ``pool``, then a seeded random linear map and tanh.
    """
    from autodiffusion_rt.metrics.extractors import FeatureExtractor, weights_fingerprint

    inputs = channels * pool * pool

    class _TinyExtractor(FeatureExtractor):
        name = label
        preprocessing = "pool4_linear_tanh_v1"
        default_batch_size = 1000

        def __init__(self):
            super().__init__()
            self.feature_dim = dim

        def _load(self):
            net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(pool), torch.nn.Flatten(), torch.nn.Linear(inputs, dim), torch.nn.Tanh())
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                net[2].weight.copy_(torch.randn(dim, inputs, generator=g) / 7)
                net[2].bias.zero_()
            return net.eval(), weights_fingerprint(net.state_dict())

        def check_shape(self, chw):
            from autodiffusion_rt.errors import DataError

            if chw[0] != channels or min(chw[1:]) < pool:
                raise DataError(f"the {label} extractor reads {channels}-channel images of at least {pool}x{pool}, got {tuple(chw)}")

        def preprocess(self, images):
            return images.clamp(-1, 1)

        def _forward(self, net, x):
            return net(x)

    return _TinyExtractor()


@pytest.fixture(scope="session")
def search_tiny_extractor():
    return search_build_tiny_extractor()


@pytest.fixture(scope="session")
def search_tiny_ref_stats(search_tiny_extractor):
    """Statistics of the embedded MNIST digits under the tiny extractor."""
    from autodiffusion_rt.data import load_mnist
    from autodiffusion_rt.metrics import compute_stats

    return compute_stats(load_mnist("all")[0][:1000], search_tiny_extractor, dataset="mnist:first1000")


@pytest.fixture
def search_single_thread():
    """Run a test on one torch thread (tiny models gain nothing from more; a busy machine loses a lot)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- core fixtures
CORE_TINY_CONFIG = dict(
    image_size=8, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
    attention_resolutions=(2,), channel_mult=(1, 2), num_classes=None, num_heads=2,
    use_scale_shift_norm=True, conv_resample=True,
)
CORE_TINY_DIFFUSION = dict(noise_schedule="linear", diffusion_steps=1000, learn_sigma=False)


def core_random_model(config: dict = CORE_TINY_CONFIG, diffusion: dict = CORE_TINY_DIFFUSION, seed: int = 0, scale: float = 0.1):
    """A DiffusionModel with every weight random (ADM zero-inits output convs, which would hide errors)."""
    from autodiffusion_rt.models import ADMUNet, model_from_weights

    torch.manual_seed(seed)
    unet = ADMUNet(**config)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model_from_weights(f"random:{seed}", config, diffusion, unet.state_dict(), source="test")


@pytest.fixture(scope="session")
def tiny_model():
    return core_random_model()


@pytest.fixture(scope="session")
def tiny_cond_model():
    return core_random_model({**CORE_TINY_CONFIG, "num_classes": 3, "resblock_updown": True}, seed=1)


@pytest.fixture(scope="session")
def embedded_model():
    from autodiffusion_rt import load_model

    return load_model("embedded:mnist")


@pytest.fixture(scope="module")
def one_thread_per_module():
    """torch on one thread for a module's tests: the test machine is shared with long jobs, and
    one thread avoids oversubscription (exports run ~5x faster)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------- engine fixtures
def core_engine_model(seed: int = 0, learn_sigma: bool = False, **overrides):
    """The tiny ADM model the export, runtime and TensorRT tests build engines for: every kind of layer
    (channel-changing ResBlocks, resampling, attention), exported in well under a second; weights random at 0.05."""
    cfg = {**CORE_TINY_CONFIG, **overrides}
    if learn_sigma:
        cfg["out_channels"] = 2 * cfg["in_channels"]
    return core_random_model(cfg, {**CORE_TINY_DIFFUSION, "learn_sigma": learn_sigma}, seed=seed, scale=0.05)


def core_plan(model, timesteps, sampler: str = "ddim", eta: float = 0.0, skip=None):
    """A plan for a test model, its spec naming the model (test models are not loadable specs)."""
    from autodiffusion_rt.plan import Plan

    return Plan.for_model(model, timesteps, sampler=sampler, eta=eta, skip=skip, spec=f"test:{model.name}")


@pytest.fixture(scope="session")
def engine_uncond_model():
    return core_engine_model(0)


@pytest.fixture(scope="session")
def engine_cond_model():
    return core_engine_model(1, num_classes=3, resblock_updown=True)


@pytest.fixture
def tensorrt_absent():
    """Skip the test where tensorrt imports: it tests the error its absence gives."""
    import importlib

    try:
        importlib.import_module("tensorrt")
    except Exception:
        return  # absent (or a stub that cannot load): the case under test
    pytest.skip("tensorrt is installed here")


def quick_first(cases):
    """A parametrize table whose first case stays in the quick subset (``-m "not slow"``) and whose other cases are
    marked slow (each starts a process that imports torch, or builds engines again); CI runs them all."""
    cases = list(cases)
    return [cases[0], *(pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow) for c in cases[1:])]
