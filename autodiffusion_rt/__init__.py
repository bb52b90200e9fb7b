"""autodiffusion-rt: fast sampling for pretrained diffusion UNets, without retraining.

Public entry points: :func:`load_model`, :func:`sample`, :class:`ADMUNet`.

They are imported on first use (PEP 562), so that ``import autodiffusion_rt.cli``
and ``autodiffusion-rt --help`` do not pay for torch.
"""

from .errors import Error

__version__ = "0.1.0"

__all__ = ["ADMUNet", "DiffusionModel", "Error", "load_model", "sample", "__version__"]

from .utils import lazy_exports

# public name -> the submodule that defines it
__getattr__, __dir__ = lazy_exports(
    __name__, {"ADMUNet": ".models", "DiffusionModel": ".models", "load_model": ".models", "sample": ".sampling"}
)
