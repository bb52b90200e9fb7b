"""The largest things the project builds from a file or an option, checked before anything is allocated.

A number read from a file (a checkpoint's config, a diffusers ``config.json``,
a scheduler's ``num_train_timesteps``, an ``.npz`` header, a PNG's size) or
given as an option (a batch size) goes straight to allocation unless it is
checked first. Each limit below is that check's bound. The defaults keep what
one file or option can make the process allocate near 4 GiB and admit every
model the README names (the ADM ImageNet 64/128/256 presets, the
google/ddpm-cifar10-32 layout, the embedded MNIST model), with room to spare.

Users with bigger models raise a limit with its environment variable
(``AUTODIFFUSION_RT_MAX_<NAME>``, e.g. ``AUTODIFFUSION_RT_MAX_CHANNELS=8192``);
the error names the field, the value and that variable.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import Error

__all__ = ["LIMITS", "Limit", "LimitError", "check_array_header", "check_limit", "check_model_bytes", "limit"]

GiB = 1 << 30


class LimitError(Error):
    """A size read from a file or an option is above its limit (raise the limit with its environment variable)."""


@dataclass(frozen=True)
class Limit:
    name: str
    default: int
    what: str  # what the number counts, for the error

    @property
    def env(self) -> str:
        return f"AUTODIFFUSION_RT_MAX_{self.name.upper()}"

    def value(self) -> int:
        text = os.environ.get(self.env)
        if text is None or not text.strip():
            return self.default
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            value = 0
        if value < 1:
            raise LimitError(
                f"{self.env}={text!r} must be a positive integer (the largest {self.what}; default {self.default:,})"
            )
        return value


_LIMITS = (
    # The widest layer: ADM ImageNet-256 is 256 x 4 = 1024, diffusers cifar10 256. A 3x3 conv 4096 -> 4096 is 0.6 GB.
    Limit("channels", 4096, "channels in one layer"),
    # Resolution levels x res blocks per level: ADM ImageNet-64 is 4 x 3, the 512 default 7 x 2.
    Limit("layers", 64, "resolution levels x res blocks per level"),
    # The model's parameters (float32, counted on the meta device, before any weight is allocated).
    Limit("model_bytes", 4 * GiB, "bytes of model parameters (float32)"),
    # The training schedule: 1,000 everywhere; a schedule is a few float64 arrays of this length.
    Limit("timesteps", 100_000, "training timesteps"),
    # Image side: ADM goes to 512; one 1024x1024 activation of 128 channels is already 0.5 GiB.
    Limit("image_size", 1024, "pixels per image side"),
    # Images per batch (train, benchmark, engine and serve batches): ADM-64 activations at 1024 are ~3 GiB.
    Limit("batch", 1024, "images per batch"),
    # One array in an .npz (its shape and dtype read from the .npy header before loading).
    Limit("array_bytes", 4 * GiB, "bytes in one .npz array"),
    # One PNG/JPEG decoded (PIL's own bomb check is 2 x 89 Mpx and a traceback): 8192 x 8192.
    Limit("image_pixels", 8192 * 8192, "pixels in one image file"),
    # JSON files and bodies (plans, manifests, configs, search states): nesting, integer digits, file size.
    Limit("json_depth", 64, "levels of JSON nesting"),
    Limit("json_int_digits", 64, "digits in a JSON integer"),  # a search state holds 128-bit RNG words (39)
    Limit("json_bytes", 256 << 20, "bytes in a JSON file"),
)
LIMITS = {lim.name: lim for lim in _LIMITS}


def limit(name: str) -> int:
    """The current value of limit ``name`` (its environment variable, else its default)."""
    return LIMITS[name].value()


def check_limit(name: str, value, field: str, source: str = "", error: type = LimitError) -> int:
    """``value`` (an int) if it is at most limit ``name``; else ``error`` naming ``source``, ``field``, the value
    and the variable that raises the limit."""
    lim = LIMITS[name]
    bound = lim.value()
    if value > bound:
        where = f"{source}: " if source else ""
        raise error(
            f"{where}{field}={value:,} is above the limit of {bound:,} {lim.what}; "
            f"if it really is this large, raise the limit with {lim.env}={_suggest(value)}"
        )
    return value


def _suggest(value) -> int:
    try:
        return int(value)
    except (OverflowError, ValueError):
        return 0


def check_model_bytes(build, source: str, error: type = LimitError) -> None:
    """Build the module ``build()`` returns on the meta device (no memory) and check its parameter bytes."""
    import torch

    with torch.device("meta"):
        module = build()
    n = sum(math.prod(p.shape) for p in module.parameters()) + sum(math.prod(b.shape) for b in module.buffers())
    check_limit("model_bytes", 4 * n, "parameters (float32 bytes)", source, error)


def check_array_header(fileobj, field: str, source: str, error: type = LimitError) -> tuple:
    """(shape, dtype) of the ``.npy`` at ``fileobj``'s position, read from its header; its size checked against
    the limit."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(fileobj)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fileobj)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fileobj)
    except ValueError as e:
        raise error(f"{source}: {field} has no valid .npy header ({e})") from None
    nbytes = math.prod(shape) * dtype.itemsize
    check_limit("array_bytes", nbytes, f"{field} (shape {tuple(shape)}, {dtype}) bytes", source, error)
    return tuple(shape), dtype


def check_npz_arrays(path, error: type = LimitError, names=None) -> None:
    """The arrays ``names`` (default: all) of the ``.npz`` at ``path``, their sizes read from their headers: call it
    before ``np.load`` reads them."""
    import zipfile

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, ValueError):
        return  # not a zip: np.load gives its own error
    with zf:
        for info in zf.infolist():
            if info.filename.endswith(".npy") and (names is None or info.filename[:-4] in names):
                with zf.open(info) as f:
                    check_array_header(f, info.filename[:-4], str(path), error)
