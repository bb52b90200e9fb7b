"""The torch backend: a plan's step on the PyTorch model, the reference every compiled engine is compared with."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from ...diffusion import StepCoefficients
from ...diffusion.step_io import TensorSpec, X, Y
from ...sampling import eps_in_chunks
from .base import Engine, update_step

__all__ = ["TorchStepEngine"]


class TorchStepEngine(Engine):
    """Step i of a plan on the PyTorch model: ``model.eps`` over the keep set, then ``step_update``.

    This is the reference: it shares nothing with the exporter's folded graph,
    so agreement between it and a compiled engine checks the folding too.
    ``device``: where the model runs (its weights must be there; default
    cpu); feeds and outputs stay host numpy arrays.
    """

    backend = "torch"

    def __init__(
        self,
        model,
        row: StepCoefficients,
        timestep: int,
        keep: Optional[Iterable[str]],
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        name: str = "torch step",
        batch_size: int = 256,
        device=None,
    ):
        from ...sampling import check_device

        super().__init__(name, inputs, outputs, max_batch=None)
        self.device = check_device(model, device)
        self.model = model
        self.row = row
        self.timestep = int(timestep)
        self.keep = None if keep is None else frozenset(keep)
        self.batch_size = int(batch_size)

    @torch.inference_mode()
    def _run(self, feeds, out, batch):
        dev = self.device
        x = torch.from_numpy(feeds[X]).to(dev)
        y = torch.from_numpy(feeds[Y]).to(dev) if Y in feeds else None
        # sample()'s chunking, so results are bit-identical to it.
        eps = eps_in_chunks(self.model, x, self.timestep, y, self.keep, self.batch_size, self.row.learned_variance)
        return update_step(self, self.row, x, eps, feeds, out, dev)
