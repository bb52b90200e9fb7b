"""autodiffusion-rt: fast sampling for pretrained diffusion UNets, without retraining.

Public entry points: :func:`load_model`, :func:`sample`, :class:`ADMUNet`.
"""

from .errors import Error

__version__ = "0.1.0"

__all__ = ["ADMUNet", "DiffusionModel", "Error", "load_model", "sample", "__version__"]


def __getattr__(name: str):
    # Imported on first use (they import torch, ~1.5 s): the command line starts, and takes its signals, at once.
    if name in ("ADMUNet", "DiffusionModel", "load_model"):
        from . import models

        return getattr(models, name)
    if name == "sample":
        from .sampling import sample

        return sample
    raise AttributeError(f"module 'autodiffusion_rt' has no attribute {name!r}")
