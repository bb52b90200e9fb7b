"""Feature extractors behind one interface.

An extractor has a ``name``, a ``feature_dim``, a ``preprocessing`` id (a
string that changes whenever what the network sees for a given image
changes) and a ``fingerprint`` of its weights. ``features(images)`` maps
images to an (N, D) float64 array. The network is loaded once, on first use,
and kept: :func:`get_extractor` returns the same object on every call, so a
search that evaluates thousands of candidates pays for loading once.

Images are NCHW float tensors in [-1, 1] (values outside are clipped, as
saving to PNG would), or, at the edges, uint8 numpy arrays NHWC / NHW as read
from PNG folders and .npz files (converted batch by batch, never all at once).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..data import from_uint8
from ..errors import DataError
from ..utils import weights_fingerprint

__all__ = [
    "EXTRACTOR_NAMES",
    "FeatureExtractor",
    "InceptionExtractor",
    "MnistExtractor",
    "get_extractor",
    "check_images",
    "weights_fingerprint",
]


def check_images(images) -> torch.Tensor | np.ndarray:
    """Validate an image set; returns a float tensor (NCHW) or a uint8 numpy array (NHWC).

    Raises :class:`DataError` naming the problem: empty sets, wrong dtypes,
    wrong layouts, NaN/inf values, or a [0, 255] range passed as float.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise DataError(
                f"numpy image arrays must be uint8 NHWC (as saved in .npz files), got dtype {images.dtype}: "
                "pass float images as a torch tensor NCHW in [-1, 1]"
            )
        a = images[..., None] if images.ndim == 3 else images
        if a.ndim != 4 or a.shape[-1] not in (1, 3):
            raise DataError(f"uint8 image arrays must be NHWC with 1 or 3 channels (or NHW), got shape {images.shape}")
        if a.shape[0] == 0:
            raise DataError(
                "the image set is empty (0 images): FID needs at least 2 images, "
                "and more than the feature size for a full-rank covariance"
            )
        return a
    if not isinstance(images, torch.Tensor):
        raise DataError(
            f"images must be a torch tensor NCHW in [-1, 1] (or a uint8 numpy array NHWC), got {type(images).__name__}"
        )
    if not images.is_floating_point():
        raise DataError(
            f"image tensors must be floating point NCHW in [-1, 1], got dtype {images.dtype}: "
            "convert uint8 NHWC arrays with autodiffusion_rt.data.from_uint8"
        )
    if images.ndim != 4:
        raise DataError(
            f"images must be 4-D NCHW, got shape {tuple(images.shape)}: "
            "add the missing batch or channel axis (e.g. x.unsqueeze(1) for N x H x W)"
        )
    if images.shape[1] not in (1, 3):
        hint = " (it looks like NHWC: use x.permute(0, 3, 1, 2))" if images.shape[-1] in (1, 3) else ""
        raise DataError(f"images must be NCHW with 1 or 3 channels, got shape {tuple(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise DataError(
            "the image set is empty (0 images): FID needs at least 2 images, "
            "and more than the feature size for a full-rank covariance"
        )
    finite = torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise DataError(
            f"{bad} of {images.shape[0]} images contain NaN or inf values: the sampler diverged; "
            "such images have no FID"
        )
    lo, hi = float(images.min()), float(images.max())
    if lo >= 0 and hi > 2:
        raise DataError(
            f"images range over [{lo:g}, {hi:g}], which looks like [0, 255]: "
            "images must be in [-1, 1] (use x / 127.5 - 1)"
        )
    return images


class FeatureExtractor(ABC):
    """A feature network for FID: name, feature size, preprocessing id, weights fingerprint, ``features()``."""

    name: str
    feature_dim: int
    preprocessing: str
    default_batch_size: int = 500

    def __init__(self) -> None:
        self._net = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()

    # --- subclasses -----------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> tuple[torch.nn.Module, str]:
        """(network in eval mode, weights fingerprint)."""

    @abstractmethod
    def check_shape(self, chw: tuple[int, int, int]) -> None:
        """Raise DataError when images of this (C, H, W) cannot be used."""

    @abstractmethod
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """NCHW float [-1, 1] batch -> the network's input."""

    @abstractmethod
    def _forward(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Network input batch -> (B, feature_dim) features."""

    # --- shared ---------------------------------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        """The network, loaded on first use and kept."""
        if self._net is None:
            with self._lock:
                if self._net is None:
                    net, fp = self._load()
                    self._fingerprint = fp
                    self._net = net
        return self._net

    @property
    def fingerprint(self) -> str:
        """Short hash of the network's weights (loads the network)."""
        self.net
        return self._fingerprint

    @property
    def key(self) -> tuple[str, str, str]:
        """(name, preprocessing, fingerprint): what reference statistics must have been computed with."""
        return self.name, self.preprocessing, self.fingerprint

    def _batches(self, images, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, images.shape[0], batch_size):
            chunk = images[i : i + batch_size]
            yield from_uint8(chunk) if isinstance(chunk, np.ndarray) else chunk.detach().to("cpu", torch.float32)

    def features(self, images, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """(N, feature_dim) float64 features of N images (NCHW float in [-1, 1], or uint8 NHWC numpy)."""
        images = check_images(images)
        n = images.shape[0]
        chw = (
            (images.shape[3], images.shape[1], images.shape[2])
            if isinstance(images, np.ndarray)
            else tuple(images.shape[1:])
        )
        self.check_shape(chw)
        batch_size = self.default_batch_size if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        net = self.net
        out = np.empty((n, self.feature_dim), dtype=np.float64)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"{self.name} features", unit="img")
        try:
            with torch.inference_mode():
                i = 0
                for batch in self._batches(images, batch_size):
                    f = self._forward(net, self.preprocess(batch))
                    out[i : i + len(batch)] = f.double().numpy()
                    i += len(batch)
                    if bar is not None:
                        bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        return out

    def __getstate__(self) -> dict:
        # picklable for worker processes: the network is reloaded there on first use
        state = self.__dict__.copy()
        state["_net"] = None
        state["_fingerprint"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        fp = self._fingerprint or "not loaded"
        return (
            f"{type(self).__name__}(name={self.name!r}, feature_dim={self.feature_dim}, "
            f"preprocessing={self.preprocessing!r}, fingerprint={fp!r})"
        )


def _quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the 8-bit level the image would have in a PNG, back in [-1, 1] (as data.to_uint8 / from_uint8)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class MnistExtractor(FeatureExtractor):
    """Penultimate layer (64-d) of the project's small MNIST classifier; 1x28x28 digits only."""

    name = "mnist"
    default_batch_size = 256  # a batch's activations stay in cache; larger batches were slower here
    # 8-bit quantization as in a saved PNG, then the classifier's own input range [-1, 1]; 1x28x28 only.
    preprocessing = "u8-quantize_gray-1x28x28_range-m1p1_v1"

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        from .mnist_classifier import DEFAULT_WEIGHTS, FEATURE_DIM

        self.weights = Path(weights) if weights is not None else DEFAULT_WEIGHTS
        self.feature_dim = FEATURE_DIM
        self.meta: dict = {}

    def _load(self):
        from .mnist_classifier import load_classifier

        model, meta = load_classifier(self.weights)
        if model.config["feature_dim"] != self.feature_dim:
            self.feature_dim = int(model.config["feature_dim"])
        self.meta = meta
        for p in model.parameters():
            p.requires_grad_(False)
        return model, weights_fingerprint(model.state_dict())

    def check_shape(self, chw):
        if tuple(chw) != (1, 28, 28):
            raise DataError(
                f"the 'mnist' extractor reads 1x28x28 grayscale digits, got images of shape {tuple(chw)} (C, H, W): "
                "use --extractor inception for other image sizes or colour images"
            )

    def preprocess(self, images):
        return _quantize(images)

    def _forward(self, net, x):
        return net.features(x)


class InceptionExtractor(FeatureExtractor):
    """The TF FID Inception network (2015-12-05 weights) in pytorch-fid's FIDInceptionV3; 2048-d pool-3 features."""

    name = "inception"
    feature_dim = 2048
    default_batch_size = 50
    # 8-bit quantization, gray -> RGB, TF1 resize_bilinear (no half-pixel centres) to 299x299, x/128 - 1.
    preprocessing = "u8-quantize_gray-to-rgb_tf1-bilinear-299_range-x/128-1_v1"

    def __init__(self) -> None:
        super().__init__()
        self.source: str | None = None

    def _load(self):
        from .inception import build_fid_inception

        net, source = build_fid_inception()
        self.source = source
        return net, weights_fingerprint(net.state_dict())

    def check_shape(self, chw):
        c, h, w = chw
        if c not in (1, 3) or h < 1 or w < 1:
            raise DataError(f"the 'inception' extractor reads 1- or 3-channel images, got shape {tuple(chw)} (C, H, W)")

    def preprocess(self, images):
        from .inception import tf_fid_input

        return tf_fid_input(images)

    def _forward(self, net, x):
        return net(x)[0].flatten(1)


_FACTORIES = {"mnist": MnistExtractor, "inception": InceptionExtractor}
EXTRACTOR_NAMES = tuple(_FACTORIES)
_instances: dict[tuple[str, str | None], FeatureExtractor] = {}
_instances_lock = threading.Lock()


def get_extractor(name: str | FeatureExtractor = "mnist", weights: str | Path | None = None) -> FeatureExtractor:
    """The extractor called ``name`` (``mnist`` or ``inception``), one shared instance per (name, weights).

    ``weights`` (``mnist`` only) selects another classifier file than the packaged one.
    """
    if isinstance(name, FeatureExtractor):
        return name
    if name not in _FACTORIES:
        raise DataError(f"unknown feature extractor {name!r}: use one of {', '.join(EXTRACTOR_NAMES)}")
    if weights is not None and name != "mnist":
        raise DataError(f"the {name!r} extractor takes no weights file (got {weights}); only 'mnist' does")
    key = (name, str(Path(weights).resolve()) if weights is not None else None)
    with _instances_lock:
        if key not in _instances:
            _instances[key] = _FACTORIES[name](weights) if weights is not None else _FACTORIES[name]()
        return _instances[key]
