"""autodiffusion-rt: fast sampling for pretrained diffusion UNets, without retraining.

Public entry points: :func:`load_model`, :func:`sample`, :class:`ADMUNet`.
"""

from .errors import Error
from .models import ADMUNet, DiffusionModel, load_model
from .sampling import sample

__version__ = "0.1.0"

__all__ = ["ADMUNet", "DiffusionModel", "Error", "load_model", "sample", "__version__"]
