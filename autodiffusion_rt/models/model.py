"""The model every part of the project samples from: a skippable UNet, its noise schedule, its identity.

Made by :mod:`.loading` (checkpoints, the embedded model) and :mod:`.diffusers_adapter`
(diffusers directories); read by the samplers, the search, the exporter and the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..diffusion import NoiseSchedule, split_learned_variance
from .adapter import Layer, SkippableUNet

__all__ = ["DiffusionModel", "eps_from_output"]


@dataclass(eq=False)
class DiffusionModel:
    """A pretrained diffusion UNet with everything a sampler needs."""

    name: str
    unet: SkippableUNet
    schedule: NoiseSchedule
    config: dict  # {"unet": ADMUNet kwargs, "diffusion": {...}}
    fingerprint: str
    learn_sigma: bool = False
    metadata: dict = field(default_factory=dict)
    prediction_type: str = "epsilon"  # or "v_prediction" (diffusers models)

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.unet.layers

    @property
    def num_classes(self) -> Optional[int]:
        return self.unet.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.unet.in_channels, self.unet.image_size, self.unet.image_size)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def eps(self, x: torch.Tensor, t: torch.Tensor, y=None, keep=None, variance: bool = False) -> torch.Tensor:
        """The noise prediction (the first C channels of a learn_sigma model; converted from v).

        ``variance=True`` on a learn_sigma model: [eps, v] stacked along channels, v the
        variance interpolation a learned-variance DDPM step reads.
        """
        return self.eps_from_output(self.unet(x, t, y, keep), x, t, variance)

    def eps_from_output(self, out: torch.Tensor, x: torch.Tensor, t, variance: bool = False) -> torch.Tensor:
        """The network's raw output at (x, t) -> eps (or [eps, v], see :meth:`eps`).

        ``t``: a python int (folded as constants) or a tensor. v-prediction
        (v = sqrt(a) eps - sqrt(1-a) x0, x = sqrt(a) x0 + sqrt(1-a) eps) gives
        eps = sqrt(a) v + sqrt(1-a) x.
        """
        alpha_bar = None
        if self.prediction_type != "epsilon":
            acp = self.schedule.alphas_cumprod
            if isinstance(t, int):
                alpha_bar = float(acp[t])
            else:
                # a copy: acp is read-only
                alpha_bar = torch.tensor(acp, dtype=torch.float64, device=x.device)[t.long()].view(-1, 1, 1, 1)
        return eps_from_output(out, x, self.learn_sigma, self.prediction_type, alpha_bar, variance)


def eps_from_output(
    out: torch.Tensor, x: torch.Tensor, learn_sigma: bool, prediction_type: str, alpha_bar=None, variance: bool = False
) -> torch.Tensor:
    """A network's raw output -> eps (or [eps, v] with ``variance`` on a learn_sigma model).

    ``alpha_bar`` (a float, or a tensor broadcasting over x) is read only for
    v-prediction: v = sqrt(a) eps - sqrt(1-a) x0 and x = sqrt(a) x0 + sqrt(1-a) eps
    give eps = sqrt(a) v + sqrt(1-a) x.
    """
    if learn_sigma:
        if variance:
            return out
        out, _ = split_learned_variance(out, x.shape[1])
    if prediction_type == "epsilon":
        return out
    if isinstance(alpha_bar, float):
        return math.sqrt(alpha_bar) * out + math.sqrt(1 - alpha_bar) * x
    return (alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * x).to(out.dtype)
