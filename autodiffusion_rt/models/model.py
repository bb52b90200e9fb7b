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

__all__ = ["DiffusionModel"]


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
        if self.learn_sigma:
            if variance:
                return out
            out, _ = split_learned_variance(out, x.shape[1])
        if self.prediction_type == "epsilon":
            return out
        acp = self.schedule.alphas_cumprod
        if isinstance(t, int):
            a = float(acp[t])
            return math.sqrt(a) * out + math.sqrt(1 - a) * x
        # torch.tensor copies: the schedule's array is read-only, which torch.as_tensor warns about
        a = torch.tensor(acp, dtype=torch.float64, device=x.device)[t.long()].view(-1, 1, 1, 1)
        return (a.sqrt() * out + (1 - a).sqrt() * x).to(out.dtype)
