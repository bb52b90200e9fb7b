"""The engine interface every backend implements: one sampler step, named inputs in, named outputs out.

The names, shapes and dtypes of a step's tensors are the contract of
:mod:`autodiffusion_rt.diffusion.step_io`; inputs and outputs are float32
(labels int64) whatever the engine's internal precision, batch-first, with a
dynamic batch dimension up to the engine's ``max_batch``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, MutableMapping, Optional, Sequence

import numpy as np
import torch

from ...diffusion import StepCoefficients, step_from_output
from ...diffusion.step_io import EPS, NOISE, PREV_EPS, PREV_X0S, X0, X_PREV, TensorSpec
from ...errors import EngineError

__all__ = ["Engine", "LoadedEngines", "describe_array", "fill_output", "step_specs", "update_step"]


class Engine(ABC):
    """One step: ``run(feeds, out=None) -> {output name: array}``.

    ``feeds`` maps every input name to a C-contiguous numpy array of the spec's
    dtype and shape (the batch dimension free up to ``max_batch``). ``out``,
    when given, maps output names to preallocated arrays the engine writes
    into (the runtime's ping-pong buffers), so the steady state allocates
    nothing; without it the engine returns fresh arrays.
    """

    backend = "abstract"

    def __init__(
        self, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch: Optional[int]
    ):
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.max_batch = max_batch
        self.input_names = tuple(s.name for s in self.inputs)
        self.output_names = tuple(s.name for s in self.outputs)

    def check_feeds(self, feeds: Mapping[str, np.ndarray], out: Optional[Mapping[str, np.ndarray]] = None) -> int:
        """Validate names, dtypes, shapes and the batch size; return the batch size."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise EngineError(
                f"{self.name}: inputs {sorted(feeds)} do not match the engine's {list(self.input_names)} "
                f"(missing {missing}, unexpected {extra})"
            )
        batch = None
        for spec in self.inputs:
            arr = feeds[spec.name]
            if not isinstance(arr, np.ndarray) or arr.ndim != len(spec.shape):
                raise EngineError(
                    f"{self.name}: input {spec.name!r} must be a {len(spec.shape)}-d numpy array {spec.shape}, "
                    f"got {describe_array(arr)}"
                )
            if batch is None:
                batch = arr.shape[0]
            expected = spec.concrete(batch)
            if arr.shape != expected or arr.dtype != np.dtype(spec.dtype) or not arr.flags.c_contiguous:
                raise EngineError(
                    f"{self.name}: input {spec.name!r} is {describe_array(arr)}; expected a C-contiguous "
                    f"{spec.dtype} array of shape {expected}"
                )
        if batch < 1:
            raise EngineError(f"{self.name}: empty batch; pass at least one sample")
        if self.max_batch is not None and batch > self.max_batch:
            raise EngineError(
                f"{self.name}: batch {batch} is above the engine's maximum {self.max_batch}; split the batch "
                f"(Runtime.sample does) or rebuild with --max-batch {batch}"
            )
        if out is not None:
            for name, arr in out.items():
                spec = next((s for s in self.outputs if s.name == name), None)
                if spec is None:
                    raise EngineError(f"{self.name}: no output named {name!r}; outputs are {list(self.output_names)}")
                if arr.shape != spec.concrete(batch) or arr.dtype != np.dtype(spec.dtype) or not arr.flags.c_contiguous:
                    raise EngineError(
                        f"{self.name}: output buffer {name!r} is {describe_array(arr)}; "
                        f"expected {spec.dtype} {spec.concrete(batch)}"
                    )
        return batch

    def run(
        self, feeds: Mapping[str, np.ndarray], out: Optional[MutableMapping[str, np.ndarray]] = None
    ) -> dict[str, np.ndarray]:
        batch = self.check_feeds(feeds, out)
        return self._run(feeds, out, batch)

    def bind(self, feeds: Mapping[str, np.ndarray], out: MutableMapping[str, np.ndarray]):
        """Validate ``feeds`` and ``out`` once; return a no-argument callable that runs the step on them.

        The runtime binds each step to its workspace buffers once per batch
        size and then only refills the buffers: no validation, lookup or
        allocation between steps. The callable reads the arrays' current
        contents at every call.
        """
        batch = self.check_feeds(feeds, out)
        feeds, out = dict(feeds), dict(out)
        return lambda: self._run(feeds, out, batch)

    @abstractmethod
    def _run(
        self, feeds: Mapping[str, np.ndarray], out: Optional[MutableMapping[str, np.ndarray]], batch: int
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        """Release what the engine holds (sessions, device memory)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, inputs={list(self.input_names)}, outputs={list(self.output_names)})"
        )


def describe_array(arr: Any) -> str:
    if isinstance(arr, np.ndarray):
        return f"{arr.dtype} {tuple(arr.shape)}{'' if arr.flags.c_contiguous else ' (not contiguous)'}"
    return type(arr).__name__


def fill_output(out: Optional[MutableMapping[str, np.ndarray]], name: str, value: np.ndarray) -> np.ndarray:
    if out is not None and name in out:
        np.copyto(out[name], value)
        return out[name]
    return value


def update_step(
    engine: Engine,
    row: StepCoefficients,
    x: torch.Tensor,
    model_out: torch.Tensor,
    feeds: Mapping[str, np.ndarray],
    out: Optional[MutableMapping[str, np.ndarray]],
    device=None,
) -> dict:
    """The sampler update of a step on the model's output, in float32 torch, for engines that do not fuse it.

    Reads the step's state inputs (noise, the x0 and eps histories) from
    ``feeds`` and writes the engine's outputs into ``out`` where given.
    """

    def tensor(name: str) -> Optional[torch.Tensor]:
        return torch.from_numpy(feeds[name]).to(device) if name in feeds else None

    x0s = tuple(tensor(n) for n in PREV_X0S if n in feeds)
    history = tuple(tensor(n) for n in PREV_EPS if n in feeds)
    x_prev, x0s, history = step_from_output(row, x, model_out, x0s, tensor(NOISE), history)
    values = {X_PREV: x_prev, X0: x0s[0], EPS: history[0]}  # EPS: the eps this step used, a later step's history
    return {name: fill_output(out, name, values[name].cpu().numpy()) for name in engine.output_names}


@dataclass
class LoadedEngines:
    """What a backend's ``load_engines`` hands the Runtime: the step engines and what lives as long as they do."""

    engines: list
    backend_name: str
    device_walk: Any = None  # a DeviceResidentWalk for backends that keep a request on the device
    resources: Sequence = field(default_factory=tuple)  # closed (callables) after the engines, in reverse order


def step_specs(step: Mapping) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A manifest step's input and output specs."""
    return [TensorSpec.from_dict(d) for d in step["inputs"]], [TensorSpec.from_dict(d) for d in step["outputs"]]
