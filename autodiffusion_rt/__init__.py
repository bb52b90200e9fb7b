"""autodiffusion-rt: fast sampling for pretrained diffusion UNets, without retraining.

Public entry points: :func:`load_model`, :func:`sample`, :class:`ADMUNet`.

They are imported on first use (PEP 562), so that ``import autodiffusion_rt.cli``
and ``autodiffusion-rt --help`` do not pay for torch.
"""

from .errors import Error

__version__ = "0.1.0"

__all__ = ["ADMUNet", "DiffusionModel", "Error", "load_model", "sample", "__version__"]

# public name -> the submodule that defines it
_LAZY = {"ADMUNet": ".models", "DiffusionModel": ".models", "load_model": ".models", "sample": ".sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
