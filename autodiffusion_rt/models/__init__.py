"""Models: the skippable-UNet interface, the ADM UNet, the diffusers adapter, loading, the embedded default."""

from .adapter import Layer, SkippableUNet
from .loading import ADM_PRESETS, load_model, load_model_for_plan, model_from_weights, weights_fingerprint
from .model import DiffusionModel
from .unet import ADMUNet

__all__ = ["ADMUNet", "ADM_PRESETS", "DiffusionModel", "Layer", "SkippableUNet", "load_model", "load_model_for_plan",
           "model_from_weights", "weights_fingerprint"]
