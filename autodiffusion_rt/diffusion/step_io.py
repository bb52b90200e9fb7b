"""The named inputs and outputs of one sampler step: the contract between the exporter and every engine.

A step of a plan maps::

    x [, y] [, noise] [, prev_x0 [, prev_x0_2 [, prev_x0_3]]] [, prev_eps1 .. prev_eps3]  ->  x_prev [, x0] [, eps]

``prev_x0``, ``prev_x0_2``, ``prev_x0_3`` are the x0 of steps i-1, i-2, i-3
(DPM-Solver++(2M) reads the first, UniPC up to all three); ``prev_eps1..3``
the eps of steps i-1..i-3 (iPNDM). A step outputs ``x0`` / ``eps`` when a
later step reads them.

Which of them a step has follows from the sampler's coefficients alone
(:func:`step_tensors`), so the exporter (``export/``), the engines and the engine
dir's manifest (``autodiffusion_rt.runtime``) all derive them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from autodiffusion_rt.diffusion.samplers import SamplerCoefficients

__all__ = [
    "BATCH",
    "EMB",
    "EPS",
    "NOISE",
    "OUT",
    "PREV_EPS",
    "PREV_X0",
    "PREV_X0S",
    "TensorSpec",
    "X",
    "X0",
    "X_PREV",
    "Y",
    "shape_profile",
    "step_tensors",
]

# The names every backend uses.
X, Y, NOISE = "x", "y", "noise"
PREV_X0S = ("prev_x0", "prev_x0_2", "prev_x0_3")  # x0 of steps i-1, i-2, i-3 (DPM-Solver++(2M), UniPC)
PREV_X0 = PREV_X0S[0]
X_PREV, X0, EPS = "x_prev", "x0", "eps"
EMB, OUT = "emb", "out"  # a shared subnetwork's embedding input and raw UNet output (export.subnet.SubnetModule)
PREV_EPS = ("prev_eps1", "prev_eps2", "prev_eps3")  # eps of steps i-1, i-2, i-3 (iPNDM)
BATCH = "batch"  # the symbolic batch dimension


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: numpy dtype name and shape, ``"batch"`` for the dynamic dimension."""

    name: str
    dtype: str
    shape: tuple

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TensorSpec":
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if s == BATCH else int(s) for s in self.shape)


def step_tensors(
    coeffs: SamplerCoefficients, i: int, image_shape: Sequence[int], conditional: bool
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The inputs and outputs of step ``i`` of a schedule (see the module docstring)."""
    img = (BATCH, *(int(s) for s in image_shape))
    row = coeffs.row(i)
    inputs = [TensorSpec(X, "float32", img)]
    if conditional:
        inputs.append(TensorSpec(Y, "int64", (BATCH,)))
    if row.c_noise != 0.0:
        inputs.append(TensorSpec(NOISE, "float32", img))
    inputs += [TensorSpec(name, "float32", img) for name in PREV_X0S[: row.x0_history]]
    inputs += [TensorSpec(name, "float32", img) for name in PREV_EPS[: row.eps_history]]
    outputs = [TensorSpec(X_PREV, "float32", img)]
    later = [coeffs.row(j) for j in range(i + 1, min(i + 1 + len(PREV_X0S), len(coeffs)))]
    if any(r.x0_history >= j for j, r in enumerate(later, start=1)):
        outputs.append(TensorSpec(X0, "float32", img))
    if any(r.eps_history >= j for j, r in enumerate(later, start=1)):
        outputs.append(TensorSpec(EPS, "float32", img))
    return tuple(inputs), tuple(outputs)


def shape_profile(specs: Sequence[TensorSpec], batch: Mapping[str, int]) -> dict[str, tuple]:
    """``{name: (min, opt, max) shapes}`` of ``specs`` at the engine dir's ``batch`` sizes (TensorRT's profile)."""
    return {s.name: tuple(s.concrete(batch[k]) for k in ("min", "opt", "max")) for s in specs}
