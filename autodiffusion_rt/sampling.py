"""``autodiffusion_rt.sample``: images from a model over any timestep list.

Every random draw is per sample (:mod:`autodiffusion_rt.diffusion.noise`):
sample i of seed s has its own generator seeded from (s, i), which draws its
x_T, then its label (when the model is class-conditional and none is given),
then each stochastic step's noise. Every backend draws through
:func:`initial_state`, so the same plan and seed give the same images
everywhere, whatever the chunk size.
"""

from __future__ import annotations

import numbers
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from .diffusion import SAMPLERS, SampleNoise, check_seed, compute_coefficients, sample_loop, validate_timesteps
from .errors import SamplingError
from .models import DiffusionModel

# MAX_SAMPLES: the most samples one call makes (about 3 GB of 64x64 RGB float32); more: call again with ``first=``
# (the CLI streams an .npz that way), since a sample's images do not depend on the chunk it is made in.
from .registry import MAX_SAMPLES

KeepSpec = Union[None, Iterable[str], Sequence[Optional[Iterable[str]]]]


def check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise SamplingError(f"n={n!r}: the number of samples must be a positive integer")
    if n > MAX_SAMPLES:
        raise SamplingError(
            f"n={n} is above the limit of {MAX_SAMPLES:,} samples per call: sample in chunks "
            "(first=0, first=chunk, ...: the images are the same as one large call's)"
        )
    return int(n)


def check_finite(x, step: int, t: int, what: str = "the model") -> None:
    """Refuse a step output with NaN or inf: never let it reach a file as a black or saturated image."""
    x = torch.from_numpy(x) if not isinstance(x, torch.Tensor) else x
    ok = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        raise SamplingError(
            f"step {step} (t={t}) of {what} produced NaN/inf in {bad.numel()} of {x.shape[0]} samples (first: sample "
            f"{int(bad[0])} of the batch): the weights or engine are broken or the sampler diverged; no images were "
            "written. Check the model, rebuild the engines with --force, or try other timesteps"
        )


def check_labels(model: DiffusionModel, labels, n: int) -> Optional[torch.Tensor]:
    """Validate user labels (None means 'draw them') against the model."""
    if model.num_classes is None:
        if labels is not None:
            raise SamplingError(f"{model.name} is unconditional: it takes no labels (drop labels/--labels)")
        return None
    if labels is None:
        return None
    y = torch.as_tensor(labels)
    if y.ndim == 0:
        y = y.expand(n)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise SamplingError(f"labels must be integers in [0, {model.num_classes}), got dtype {y.dtype}")
    if y.shape != (n,):
        raise SamplingError(
            f"got {y.shape[0] if y.ndim == 1 else tuple(y.shape)} labels for n={n}: "
            "pass one label per sample (or one for all)"
        )
    bad = y[(y < 0) | (y >= model.num_classes)]
    if bad.numel():
        raise SamplingError(f"label {int(bad[0])} is out of range: {model.name} has classes 0..{model.num_classes - 1}")
    return y.long()


def check_device(model, device) -> torch.device:
    """The torch device to sample on (default cpu); the model's weights must already be on it.

    Every random draw stays on the CPU generators (:class:`SampleNoise`) and
    is moved, so the images are the same on any device up to float rounding.
    """
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise SamplingError(f"device={device!r} is not a torch device: pass 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SamplingError(
            f"device={device!r} but torch sees no CUDA device: pass device='cpu' (or install a CUDA build of torch)"
        )
    net = getattr(model, "unet", None)
    p = next(net.parameters(), None) if isinstance(net, torch.nn.Module) else None
    if p is not None and (p.device.type != dev.type or (dev.index is not None and p.device.index != dev.index)):
        raise SamplingError(
            f"the model's weights are on {p.device} but device={str(dev)!r}: move them first "
            f"(model.unet.to({str(dev)!r})) or pass device={str(p.device)!r}"
        )
    return dev


def sample_rows(seed, n, first: int = 0) -> SampleNoise:
    """The noise of samples ``first .. first + n - 1`` of ``seed`` (one chunk of a larger request)."""
    n = check_n(n)
    if isinstance(first, bool) or not isinstance(first, numbers.Integral) or first < 0:
        raise SamplingError(f"first={first!r}: the index of the first sample must be an integer >= 0")
    return SampleNoise(check_seed(seed), range(int(first), int(first) + n))


def initial_state(
    model, n: int, seed: int, labels=None, *, noise: Optional[SampleNoise] = None, device=None
) -> tuple[torch.Tensor, Optional[torch.Tensor], SampleNoise]:
    """x_T, the labels and the per-sample noise source, drawn in the documented order.

    ``model``: anything with ``image_shape`` and ``num_classes``. ``noise``: the
    rows to draw for (default: samples 0..n-1 of ``seed``; the service passes
    several requests' rows stacked).
    """
    n = check_n(n)
    y = check_labels(model, labels, n)
    if noise is None:
        noise = SampleNoise(check_seed(seed), n, device=device)
    elif len(noise) != n:
        raise SamplingError(f"noise has {len(noise)} rows for n={n}: pass one row per sample")
    x = noise.randn(model.image_shape)
    if model.num_classes is not None and y is None:
        y = noise.randint(model.num_classes)
    return x, y, noise


def per_step_keep(model: DiffusionModel, keep: KeepSpec, num_steps: int) -> list[Optional[frozenset[str]]]:
    """None | one set of layer ids for every step | one entry per step -> a validated list per step."""
    if keep is None:
        return [None] * num_steps
    if isinstance(keep, str):
        raise SamplingError(f"keep={keep!r} is a string: pass a collection of layer ids (or one per step)")
    items = list(keep)
    if items and all(isinstance(k, str) for k in items):
        return [model.unet.check_keep(items)] * num_steps
    if len(items) != num_steps:
        raise SamplingError(
            f"keep has {len(items)} entries for {num_steps} timesteps: give one keep set per step, or one set for all"
        )
    return [model.unet.check_keep(k) for k in items]


def eps_in_chunks(
    model: DiffusionModel,
    x: torch.Tensor,
    t: int,
    y: Optional[torch.Tensor],
    keep,
    batch_size: int = 256,
    variance: bool = False,
) -> torch.Tensor:
    """``model.eps`` of ``x`` at timestep ``t`` over the layers in ``keep``, in fixed chunks of ``batch_size``.

    Every caller (``sample()``, the torch engine, the search's evaluator) chunks
    the same way, so a sample's eps never depends on the other samples of the
    batch and their results agree bit for bit. ``variance``: [eps, v] (a
    learned-variance DDPM; see ``DiffusionModel.eps``).
    """
    kw = {"variance": True} if variance else {}
    outs = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s : s + batch_size]
        tb = torch.full((xb.shape[0],), t, dtype=torch.long, device=xb.device)
        outs.append(model.eps(xb, tb, None if y is None else y[s : s + batch_size], keep, **kw))
    return torch.cat(outs)


def make_eps_fn(
    model: DiffusionModel, y: Optional[torch.Tensor], keeps: list, batch_size: int = 256, variance: bool = False
) -> Callable:
    """eps_fn(x, t, i) for :func:`sample_loop`: step i runs the layers in ``keeps[i]`` (:func:`eps_in_chunks`)."""

    def eps_fn(x: torch.Tensor, t: int, i: int) -> torch.Tensor:
        return eps_in_chunks(model, x, t, y, keeps[i], batch_size, variance)

    return eps_fn


@torch.inference_mode()
def sample(
    model: DiffusionModel,
    timesteps: Sequence[int],
    sampler: str = "ddim",
    n: int = 16,
    seed: int = 0,
    eta: float = 0.0,
    keep: KeepSpec = None,
    labels=None,
    progress: bool = False,
    callback: Optional[Callable[[dict], None]] = None,
    batch_size: int = 256,
    return_labels: bool = False,
    first: int = 0,
    device=None,
):
    """Sample ``n`` images in [-1, 1] (NCHW float32) over ``timesteps`` (strictly descending).

    ``keep``: the layer ids that run: None (all), one collection for every step,
    or one collection (or None) per step. ``labels``: class labels for a
    class-conditional model (drawn uniformly from ``seed`` when None).
    ``first``: return samples ``first .. first + n - 1`` of ``seed`` (the same
    images a larger call gives at those indices: how a large n is streamed in chunks).
    ``device``: where the model runs (default cpu; the model's weights must be
    there already); the images and labels are returned on it. The noise is
    drawn on the CPU and moved, so every device gives the same images up to
    float rounding.
    """
    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler!r}: choose one of {list(SAMPLERS)}")
    ts = validate_timesteps(timesteps, model.num_timesteps)
    keeps = per_step_keep(model, keep, len(ts))
    coeffs = compute_coefficients(sampler, model.schedule, ts, eta, learned_variance=model.learn_sigma)
    dev = check_device(model, device)
    x, y, noise = initial_state(model, n, seed, labels, noise=sample_rows(seed, n, first))
    x, y = x.to(dev), None if y is None else y.to(dev)

    def checked(info: dict) -> None:
        check_finite(info["x_prev"], info["i"], info["t"], model.name)
        if callback is not None:
            callback(info)

    out = sample_loop(
        make_eps_fn(model, y, keeps, batch_size, coeffs.learned_variance),
        x,
        coeffs,
        noise=noise,
        progress=progress,
        callback=checked,
    )
    out = out.clamp(-1, 1)
    return (out, y) if return_labels else out
