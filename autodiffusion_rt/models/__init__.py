"""Models: the ADM UNet with layer skipping, checkpoint loading, the embedded default."""

from .loading import ADM_PRESETS, DiffusionModel, load_model, weights_fingerprint
from .unet import ADMUNet, Layer

__all__ = ["ADMUNet", "ADM_PRESETS", "DiffusionModel", "Layer", "load_model", "weights_fingerprint"]
