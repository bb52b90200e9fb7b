"""The one interface every skippable UNet satisfies (the ADM UNet and the diffusers adapter).

Search, export and the runtime only use this interface, so a new architecture
is one adapter class, never a special case downstream:

* ``image_size``, ``in_channels``, ``out_channels``, ``num_classes`` (None when
  unconditional; a conditional model also has ``label_emb``, an ``nn.Embedding``
  added to the time embedding);
* ``layers`` / ``layer_ids``: the registry of skippable layers (:class:`Layer`),
  with the MACs per sample that skipping each saves; ``macs(keep)``;
  ``check_keep(keep)``;
* the timestep path split in two so an exporter can fold it for a fixed step:
  ``time_embedding(t)`` (no labels), ``embed(t, y)`` (plus labels),
  ``projected_blocks(keep)`` (the running blocks that read the embedding, each
  with ``layer_id``, ``project(emb)`` -> [B, W, 1, 1] and ``projection_width``),
  ``block_projections(emb, keep)`` and ``forward_projected(x, projections, keep)``;
* ``forward(x, t, y=None, keep=None)``: the raw network output.

A subclass sets ``self._layers`` and ``self._fixed_macs`` (the MACs that run
whatever is skipped) with :meth:`_set_registry` and implements
``time_embedding``, ``projected_blocks`` and ``forward_projected``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from ..errors import LayerError, SamplingError


@dataclass(frozen=True)
class Layer:
    """One skippable layer of the registry."""

    id: str
    kind: str  # "res" or "attn"
    resolution: int  # spatial size (height) of the layer's input
    channels: int  # output channels
    macs: int  # MACs per sample saved by skipping it (its cost minus its skip path)


class SkippableUNet(nn.Module):
    """Base of the adapters: the registry, keep checks, MACs and the unfolded forward."""

    num_classes: Optional[int] = None
    _layers: tuple[Layer, ...] = ()
    _fixed_macs: int = 0
    layer_ids: frozenset = frozenset()

    def _set_registry(self, layers: Iterable[Layer], fixed_macs: int) -> None:
        self._layers = tuple(layers)
        self._fixed_macs = int(fixed_macs)
        self.layer_ids = frozenset(layer.id for layer in self._layers)

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The skippable layers in execution order."""
        return self._layers

    def macs(self, keep: Optional[Iterable[str]] = None) -> int:
        """MACs per sample of the subnetwork running ``keep`` (all layers when None)."""
        keep = self.check_keep(keep)
        return self._fixed_macs + sum(layer.macs for layer in self._layers if keep is None or layer.id in keep)

    def check_keep(self, keep: Optional[Iterable[str]]) -> Optional[frozenset[str]]:
        """Validate a keep set; None means every layer runs."""
        if keep is None:
            return None
        keep = frozenset(keep)
        unknown = keep - self.layer_ids
        if unknown:
            raise LayerError(
                f"unknown layer id(s) {sorted(unknown)}: valid ids are listed by 'autodiffusion-rt info' "
                f"(e.g. {sorted(self.layer_ids)[:3]})"
            )
        return keep

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def projected_blocks(self, keep: Optional[frozenset[str]] = None) -> list[nn.Module]:
        raise NotImplementedError

    def forward_projected(
        self, x: torch.Tensor, projections: Mapping[str, torch.Tensor], keep: Optional[frozenset[str]] = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The timestep (plus class) embedding every projected block reads."""
        emb = self.time_embedding(t)
        if self.num_classes is None and y is not None:
            raise SamplingError("this model is unconditional: it takes no labels y")
        if self.num_classes is not None:
            if y is None:
                raise SamplingError(f"this model is class-conditional ({self.num_classes} classes): pass labels y")
            emb = emb + self.label_emb(y)
        return emb

    def block_projections(self, emb: torch.Tensor, keep: Optional[frozenset[str]] = None) -> dict[str, torch.Tensor]:
        """Each running block's projection of ``emb``, by layer id."""
        return {b.layer_id: b.project(emb) for b in self.projected_blocks(keep)}

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, keep: Optional[Iterable[str]] = None
    ) -> torch.Tensor:
        """Predict from noisy ``x`` at timesteps ``t`` (labels ``y``), running the layers in ``keep``."""
        keep = self.check_keep(keep)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, y)
        return self.forward_projected(x, self.block_projections(emb, keep), keep)
