"""Step i of a plan as a static module (kept layers, folded timestep, fused update), or a subnetwork shared by steps.

:class:`StepModule` maps the step's inputs to its outputs as
:mod:`autodiffusion_rt.diffusion.step_io` names them (the one statement of that contract):

* the layers the plan skips at this step are not called, so tracing leaves them
  out of the graph (their weights are not exported);
* the timestep is a constant: the timestep embedding and every kept ResBlock's
  embedding projection are computed once, in float32, and stored as buffers
  (the ONNX exporter folds them into initializers);
* a class-conditional model keeps its label input, in one of two forms
  (``label_mode``):

  - ``"table"``: a per-class table of every kept block's projection
    (num_classes x total projection width), gathered by label: no embedding
    MLP in the graph at all. The default when the table is small
    (:data:`TABLE_MAX_BYTES`), as for the embedded MNIST model (10 classes).
  - ``"graph"``: the constant time embedding plus ``label_emb(y)``, then each
    kept block's SiLU + Linear, in the graph. Used when the table would be
    large (ADM ImageNet: 1000 classes x ~40k projection values = 160 MB per step);

* the sampler update of the step is :func:`autodiffusion_rt.diffusion.step_from_output`
  with the step's row of constants, the one place that sequence lives.

With ``dtype=torch.float16`` the UNet body runs in half precision (convolution
weights and activations; GroupNorm, softmax and the folded projections stay
float32 as in ADM's fp16 mode) between float32 inputs and outputs, and the
update stays in float32: the ONNX types then carry the precision, as strongly
typed TensorRT networks need.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from autodiffusion_rt.diffusion import SamplerCoefficients, step_from_output
from autodiffusion_rt.diffusion.step_io import (
    BATCH,
    EMB,
    EPS,
    NOISE,
    OUT,
    PREV_EPS,
    PREV_X0S,
    X0,
    X_PREV,
    TensorSpec,
    X,
    Y,
    step_tensors,
)
from autodiffusion_rt.errors import EngineError
from autodiffusion_rt.registry import LABEL_MODES

__all__ = [
    "LABEL_MODES",
    "TABLE_MAX_BYTES",
    "StepModule",
    "SubnetModule",
    "resolve_label_mode",
    "step_embeddings",
    "step_modules",
    "subnet_io",
]

#: Largest per-class projection table (bytes, float32) that ``label_mode="auto"`` folds.
TABLE_MAX_BYTES = 16 << 20


def projection_table_bytes(model, keep: Optional[frozenset] = None) -> int:
    """Size of the per-class projection table of ``keep`` (float32 bytes)."""
    if model.num_classes is None:
        return 0
    width = sum(b.projection_width for b in model.unet.projected_blocks(keep))
    return model.num_classes * width * 4


def resolve_label_mode(model, label_mode: str = "auto", keep: Optional[frozenset] = None) -> Optional[str]:
    """None for an unconditional model; else ``table`` or ``graph``."""
    if model.num_classes is None:
        return None
    if label_mode not in LABEL_MODES:
        raise EngineError(f"label_mode={label_mode!r}: choose one of {', '.join(LABEL_MODES)}")
    if label_mode != "auto":
        return label_mode
    return "table" if projection_table_bytes(model, keep) <= TABLE_MAX_BYTES else "graph"


class StepModule(nn.Module):
    """Step ``i`` of a schedule with the layers in ``keep`` (see the module docstring)."""

    def __init__(
        self,
        model,
        coeffs: SamplerCoefficients,
        i: int,
        keep: Optional[frozenset],
        label_mode: str = "auto",
        dtype: torch.dtype = torch.float32,
        unet=None,
    ):
        super().__init__()
        if not 0 <= i < len(coeffs):
            raise EngineError(f"step {i} is outside the schedule's {len(coeffs)} steps")
        self.keep = model.unet.check_keep(keep)
        self.index = i
        self.label = f"step {i}"
        self.timestep = coeffs.timesteps[i]
        self.row = coeffs.row(i)
        self.conditional = model.num_classes is not None
        self.label_mode = resolve_label_mode(model, label_mode, self.keep)
        self.channels = model.image_shape[0]
        self._to_eps = model.eps_from_output  # learn_sigma split, v-prediction (constants for this timestep)
        self.dtype = dtype
        inputs, outputs = step_tensors(coeffs, i, model.image_shape, self.conditional)
        self.input_names = tuple(s.name for s in inputs)
        self.output_names = tuple(s.name for s in outputs)
        self.input_specs, self.output_specs = inputs, outputs
        # The UNet the body runs in (shared, not copied; a shared half-precision
        # copy for fp16). Tracing exports only the weights the kept layers use.
        self.unet = unet if unet is not None else model.unet
        src = model.unet  # projections are always computed from the float32 weights
        blocks = src.projected_blocks(self.keep)
        self.block_ids = [b.layer_id for b in blocks]
        with torch.no_grad():
            t = torch.tensor([self.timestep])
            emb_t = src.time_embedding(t)  # [1, D]
            if not self.conditional:
                projections = [b.project(emb_t) for b in blocks]  # [1, C, 1, 1] each
                for k, p in enumerate(projections):
                    self.register_buffer(f"proj_{k}", p, persistent=False)
            elif self.label_mode == "table":
                emb_all = emb_t + src.label_emb.weight  # [K, D]: every class's embedding
                table = (
                    torch.cat([b.project(emb_all)[:, :, 0, 0] for b in blocks], dim=1)
                    if blocks
                    else torch.zeros(src.num_classes, 0)
                )
                self.register_buffer("proj_table", table, persistent=False)
                self.widths = [b.projection_width for b in blocks]
            else:
                self.register_buffer("emb_t", emb_t, persistent=False)

    def projections(self, y: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.conditional:
            return {bid: getattr(self, f"proj_{k}") for k, bid in enumerate(self.block_ids)}
        if self.label_mode == "table":
            rows = self.proj_table[y]  # [B, W]
            out, start = {}, 0
            for bid, w in zip(self.block_ids, self.widths):
                out[bid] = rows[:, start : start + w, None, None]
                start += w
            return out
        emb = self.emb_t + self.unet.label_emb(y)
        return {bid: b.project(emb) for bid, b in zip(self.block_ids, self.unet.projected_blocks(self.keep))}

    def eps(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """eps (the first C channels of a learn_sigma model), or [eps, v] on a learned-variance step."""
        h = x.to(self.dtype)
        out = self.unet.forward_projected(h, self.projections(y), self.keep).float()
        return self._to_eps(out, x, self.timestep, self.row.learned_variance)

    def forward(self, *args: torch.Tensor):
        """Positional inputs in ``input_names`` order; returns outputs in ``output_names`` order."""
        if len(args) != len(self.input_names):
            raise EngineError(f"step {self.index} takes {list(self.input_names)}, got {len(args)} tensors")
        feeds = dict(zip(self.input_names, args))
        x = feeds[X]
        x0s = tuple(feeds[n] for n in PREV_X0S if n in feeds)
        history = tuple(feeds[n] for n in PREV_EPS if n in feeds)
        x_prev, x0s, history = step_from_output(self.row, x, self.eps(x, feeds.get(Y)), x0s, feeds.get(NOISE), history)
        values = {X_PREV: x_prev, X0: x0s[0], EPS: history[0]}
        outs = tuple(values[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def example_inputs(self, batch: int, seed: int = 0, num_classes: Optional[int] = None) -> tuple[torch.Tensor, ...]:
        """Random inputs in ``input_names`` order (for tracing and verification)."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for spec in self.input_specs:
            shape = spec.concrete(batch)
            if spec.name == Y:
                out.append(torch.randint(num_classes or 1, shape, generator=g))
            else:
                out.append(torch.randn(shape, generator=g))
        return tuple(out)


def half_unet(model):
    """A copy of the model's UNet with float16 convolutions (shared by every fp16 step module).

    As guided-diffusion's ``convert_to_fp16``: only the convolutions change
    precision; normalisation (computed in float32 by GroupNorm32), the
    embedding layers and attention's softmax stay float32.
    """
    unet = copy.deepcopy(model.unet).eval().requires_grad_(False)
    for m in unet.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            m.half()
    return unet


def step_modules(
    model, plan, label_mode: str = "auto", dtype: torch.dtype = torch.float32, steps: Optional[Sequence[int]] = None
) -> list[StepModule]:
    """The step modules of ``plan`` (all steps, or those in ``steps``)."""
    plan.check_model(model)
    coeffs = plan.coefficients(model.schedule)
    keeps = plan.keep_sets(model)
    unet = half_unet(model) if dtype == torch.float16 else None
    idx = range(len(coeffs)) if steps is None else steps
    return [StepModule(model, coeffs, i, keeps[i], label_mode=label_mode, dtype=dtype, unet=unet).eval() for i in idx]


class SubnetModule(nn.Module):
    """The UNet body of one keep set, shared by every step that skips the same layers: ``x, emb -> out``.

    What differs between those steps stays outside the graph, so one engine
    (one copy of the weights) serves them all: the embedding ``emb`` (the
    step's timestep embedding plus, for a class-conditional model, the label's;
    :func:`step_embeddings`) is an input, and the raw output (eps, [eps, v] for
    a learned-variance model, or v) goes to the sampler update, which the
    runtime computes in float32 (:func:`autodiffusion_rt.diffusion.step_from_output`).
    """

    def __init__(self, model, keep: Optional[frozenset], index: int = 0):
        super().__init__()
        self.unet = model.unet
        self.keep = model.unet.check_keep(keep)
        self.index = index
        self.label = f"subnet {index}"
        self.dtype = torch.float32
        self.input_specs, self.output_specs = subnet_io(model)
        self.input_names = tuple(s.name for s in self.input_specs)
        self.output_names = tuple(s.name for s in self.output_specs)
        self.emb_dim = self.input_specs[1].shape[1]

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.unet.forward_projected(x, self.unet.block_projections(emb, self.keep), self.keep)

    def example_inputs(self, batch: int, seed: int = 0, num_classes: Optional[int] = None) -> tuple[torch.Tensor, ...]:
        """Random ``x`` and ``emb`` (for tracing and verification)."""
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(spec.concrete(batch), generator=g) for spec in self.input_specs)


def subnet_io(model) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """A shared subnetwork's inputs (``x``, ``emb``) and output (``out``: the UNet's raw output)."""
    with torch.no_grad():
        emb_dim = int(model.unet.time_embedding(torch.zeros(1, dtype=torch.long)).shape[1])
    c, h, w = (int(s) for s in model.image_shape)
    out_c = 2 * c if model.learn_sigma else c
    return (
        (TensorSpec(X, "float32", (BATCH, c, h, w)), TensorSpec(EMB, "float32", (BATCH, emb_dim))),
        (TensorSpec(OUT, "float32", (BATCH, out_c, h, w)),),
    )


def step_embeddings(model, timesteps: Sequence[int]) -> dict[str, np.ndarray]:
    """What a shared subnetwork's steps differ in, computed once in float32: ``time`` [steps, D] and ``label`` [K, D].

    Step i's embedding for label y is ``time[i] + label[y]`` (``label`` only for a class-conditional model).
    """
    with torch.no_grad():
        time = model.unet.time_embedding(torch.tensor([int(t) for t in timesteps]))
        out = {"time": time.float().numpy().copy()}
        if model.num_classes is not None:
            out["label"] = model.unet.label_emb.weight.detach().float().numpy().copy()
    return out
