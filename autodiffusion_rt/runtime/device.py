"""Which buffer each step reads and writes, and the device-resident walk of a request.

:func:`plan_step_buffers` is the one place that decides how a schedule's
steps share buffers: x ping-pongs between two slots, the x0 history
(DPM-Solver++(2M), UniPC) and the eps history (iPNDM) rotate through a ring
each, labels and noise have one slot each. Which
slot a step touches depends only on its index, so every backend binds step
``i`` once per batch size and a request only refills x_T, the labels and the
noise. The host path (:meth:`Runtime._workspace`) and the device path below
both follow it.

:class:`DeviceResidentWalk` keeps a whole request on a device: the slots are
device memory, x_T and the labels are copied in once, each stochastic step's
noise (drawn per sample on the host, :class:`~autodiffusion_rt.diffusion.SampleNoise`)
is copied in just before its step, every step is enqueued in order, and the
result is copied out once, followed by one synchronize. Two kinds of device
memory plug into it:

* :class:`CudaRuntimeMemory`: cuda-python device pointers and one CUDA stream
  (the native TensorRT engines, :meth:`TensorRTEngine.bind_device`);
* :class:`OrtValueMemory`: onnxruntime ``OrtValue`` tensors on ``"cuda"`` (the
  CUDA and TensorRT execution providers, bound through IOBinding) or on
  ``"cpu"`` (the same walk, runnable without a GPU).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..diffusion.step_io import EPS, NOISE, PREV_EPS, PREV_X0S, X0, X_PREV, X, Y
from ..errors import EngineError
from .platform import cuda_check

__all__ = [
    "CudaRuntimeMemory",
    "DeviceResidentWalk",
    "OrtValueMemory",
    "StepBuffers",
    "plan_step_buffers",
]

#: A slot: (kind, index); kind is x, x0 or eps (the history rings), y or noise.
Slot = tuple


@dataclass(frozen=True)
class StepBuffers:
    """Step ``i``'s tensors mapped to slots; ``result`` is the slot that holds x after every step."""

    inputs: dict
    outputs: dict

    @property
    def stochastic(self) -> bool:
        return NOISE in self.inputs


def plan_step_buffers(
    steps_io: Sequence[tuple[Sequence[str], Sequence[str]]], noise_per_step: bool = False
) -> tuple[list[StepBuffers], Slot, list[Slot]]:
    """``[(input names, output names)]`` per step -> (per-step slot maps, the result slot, every slot used).

    A step writes x_prev into the x slot it does not read, and x0 / eps into
    a slot of their ring that no pending history entry uses: no step ever
    reads and writes one slot.
    ``noise_per_step``: each stochastic step reads its own noise slot (all of
    a request's noise is on the device before a whole-schedule CUDA graph
    starts); otherwise one noise slot, refilled before each stochastic step.
    """
    cur = 0  # which slot holds x
    # per ring (output name -> the input names that read it): the slots of the previous steps, most recent first
    rings = {X0: PREV_X0S, EPS: PREV_EPS}
    histories: dict[str, list[Slot]] = {kind: [] for kind in rings}
    out: list[StepBuffers] = []
    used: list[Slot] = [(X, 0), (X, 1)]
    for ins, outs in steps_io:
        feeds = {X: (X, cur)}
        if Y in ins:
            feeds[Y] = (Y, 0)
        if NOISE in ins:
            feeds[NOISE] = (NOISE, len(out) if noise_per_step else 0)
        for kind, names in rings.items():
            feeds.update((name, slot) for name, slot in zip(names, histories[kind]) if name in ins)
        writes = {X_PREV: (X, 1 - cur)}
        for kind, names in rings.items():
            if kind in outs:
                history = histories[kind]
                writes[kind] = next((kind, k) for k in range(len(names) + 1) if (kind, k) not in history)
                histories[kind] = [writes[kind]] + history[: len(names) - 1]
        out.append(StepBuffers(feeds, writes))
        used += [s for s in (*feeds.values(), *writes.values()) if s not in used]
        cur = 1 - cur
    return out, (X, cur), used


def slot_spec(slot: Slot, batch: int, image_shape: Sequence[int]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a slot: int64 labels, float32 images."""
    if slot[0] == Y:
        return (batch,), np.dtype(np.int64)
    return (batch, *(int(s) for s in image_shape)), np.dtype(np.float32)


# ------------------------------------------------------------------ memories
class CudaRuntimeMemory:
    """Device buffers and async copies on one CUDA stream, through cuda-python.

    Uploads read pageable numpy memory: CUDA stages a pageable source before
    ``cudaMemcpyAsync`` returns, so the host noise buffer can be redrawn for
    the next step while the device still runs this one.
    """

    def __init__(self, cudart, stream):
        self.cudart, self.stream = cudart, stream
        self.synchronizations = 0

    def alloc(self, shape, dtype) -> int:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        return int(cuda_check(self.cudart, self.cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self.cudart.cudaFree(ptr)

    def upload(self, ptr: int, host: np.ndarray) -> None:
        cu = self.cudart
        cuda_check(
            cu,
            cu.cudaMemcpyAsync(
                ptr, host.ctypes.data, host.nbytes, cu.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            ),
            "cudaMemcpyAsync (host to device)",
        )

    def download(self, host: np.ndarray, ptr: int) -> None:
        cu = self.cudart
        cuda_check(
            cu,
            cu.cudaMemcpyAsync(
                host.ctypes.data, ptr, host.nbytes, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
            ),
            "cudaMemcpyAsync (device to host)",
        )

    def synchronize(self) -> None:
        cuda_check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def capture(self, enqueue: Callable[[], object]):
        """The work ``enqueue()`` puts on the stream, captured (not run) as an executable CUDA graph."""
        cu = self.cudart
        cuda_check(
            cu,
            cu.cudaStreamBeginCapture(self.stream, cu.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
            "cudaStreamBeginCapture",
        )
        try:
            enqueue()
        except BaseException:
            # Always end the capture, or the stream stays capturing and every later call on it fails.
            err, graph = cu.cudaStreamEndCapture(self.stream)
            if int(err) == 0 and graph is not None:
                cu.cudaGraphDestroy(graph)
            raise
        err, graph = cu.cudaStreamEndCapture(self.stream)
        if int(err) != 0:
            cuda_check(cu, (err,), "cudaStreamEndCapture")
        try:
            return cuda_check(cu, cu.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            cu.cudaGraphDestroy(graph)

    def launch_graph(self, graph_exec) -> None:
        cuda_check(self.cudart, self.cudart.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    def destroy_graph(self, graph_exec) -> None:
        self.cudart.cudaGraphExecDestroy(graph_exec)


class OrtValueMemory:
    """onnxruntime OrtValues on ``device`` ("cuda" for the GPU providers, "cpu" to run the same walk anywhere).

    onnxruntime's copies (``update_inplace``, ``numpy``) are synchronous and
    each session run ends with its provider's stream synchronized, so there is
    nothing left to wait for at the end of a request.
    """

    def __init__(self, ort, device: str = "cuda", device_id: int = 0):
        self.ort, self.device, self.device_id = ort, device, int(device_id)

    def alloc(self, shape, dtype):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(
            list(shape), np.dtype(dtype).type, self.device, self.device_id
        )

    def free(self, value) -> None:
        pass  # the OrtValue frees its memory when the last reference goes

    def upload(self, value, host: np.ndarray) -> None:
        value.update_inplace(host)

    def download(self, host: np.ndarray, value) -> None:
        np.copyto(host, value.numpy())

    def synchronize(self) -> None:
        pass


# ---------------------------------------------------------------------- walk
class DeviceResidentWalk:
    """A request's state on the device from x_T to the result: ``run(x, y, rows) -> x_0`` (host numpy).

    Each engine's ``bind_device({tensor name: handle}, batch)`` binds its step
    to the device tensors and returns a runner that enqueues the step (no
    copies, no synchronize). Buffers are per batch size, in an LRU of
    ``max_batches`` entries, shared by every step and every request of that
    batch size.

    ``schedule_graph`` (CUDA memory only): the whole schedule is one CUDA
    graph per batch size, captured after the first request of that size ran
    plainly and launched by every later one. Each stochastic step then has its
    own device noise slot, filled before the launch: a graph cannot capture
    a copy from pageable host memory.
    """

    def __init__(
        self, engines: Sequence, image_shape: Sequence[int], memory, max_batches: int = 4, schedule_graph: bool = False
    ):
        self.engines = list(engines)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.memory = memory
        self.max_batches = int(max_batches)
        if schedule_graph and not hasattr(memory, "capture"):
            raise EngineError(f"a whole-schedule CUDA graph needs CUDA device memory, not {type(memory).__name__}")
        self.schedule_graph = bool(schedule_graph)
        self.steps, self.result_slot, self.slots = plan_step_buffers(
            [(e.input_names, e.output_names) for e in self.engines], noise_per_step=self.schedule_graph
        )
        self._workspaces: "OrderedDict[int, dict]" = OrderedDict()

    def _workspace(self, batch: int) -> dict:
        ws = self._workspaces.get(batch)
        if ws is not None:
            self._workspaces.move_to_end(batch)
            return ws
        handles = {}
        try:
            for slot in self.slots:
                handles[slot] = self.memory.alloc(*slot_spec(slot, batch, self.image_shape))
            runners = []
            for eng, sb in zip(self.engines, self.steps):
                tensors = {name: handles[slot] for name, slot in (*sb.inputs.items(), *sb.outputs.items())}
                runners.append((eng.bind_device(tensors, batch), sb.stochastic))
        except BaseException:
            for h in handles.values():
                self.memory.free(h)
            raise
        shape = (batch, *self.image_shape)
        noise = np.empty(shape, np.float32)
        ws = {"handles": handles, "runners": runners, "noise": noise, "noise_t": torch.from_numpy(noise), "graph": None}
        self._workspaces[batch] = ws
        while len(self._workspaces) > self.max_batches:
            self._free(self._workspaces.popitem(last=False)[1])
        return ws

    def _free(self, ws: dict) -> None:
        if ws.get("graph") is not None:
            self.memory.destroy_graph(ws.pop("graph"))
        for h in ws["handles"].values():
            self.memory.free(h)
        ws["handles"], ws["runners"] = {}, []

    def run(self, x: np.ndarray, y: Optional[np.ndarray], rows, progress: Optional[Callable] = None) -> np.ndarray:
        """x_T (and labels) in, the last step's x out; ``rows`` draws each stochastic step's noise, in step order."""
        batch = x.shape[0]
        ws = self._workspace(batch)
        h = ws["handles"]
        mem = self.memory
        mem.upload(h[(X, 0)], np.ascontiguousarray(x, np.float32))
        if (Y, 0) in h:
            if y is None:
                raise EngineError("the engines take class labels but none were given")
            mem.upload(h[(Y, 0)], np.ascontiguousarray(y, np.int64))
        if self.schedule_graph:
            self._run_schedule_graph(ws, rows)
        else:
            runners = ws["runners"] if progress is None else progress(ws["runners"])
            for run, stochastic in runners:
                if stochastic:
                    # Drawn while the device runs the previous steps; O(chunk) host memory.
                    rows.randn(self.image_shape, out=ws["noise_t"])
                    mem.upload(h[(NOISE, 0)], ws["noise"])
                run()
        result = np.empty((batch, *self.image_shape), np.float32)
        mem.download(result, h[self.result_slot])
        mem.synchronize()  # the one wait of the request
        return result

    def _run_schedule_graph(self, ws: dict, rows) -> None:
        h, mem = ws["handles"], self.memory
        for i, (_, stochastic) in enumerate(ws["runners"]):
            if stochastic:  # every step's noise in its own slot, in the draw order, before the graph runs
                rows.randn(self.image_shape, out=ws["noise_t"])
                mem.upload(h[(NOISE, i)], ws["noise"])
        if ws["graph"] is not None:
            mem.launch_graph(ws["graph"])
            return
        # First request of this batch size: a plain run (TensorRT may allocate lazily), then the capture,
        # which records the steps without running them.
        for run, _ in ws["runners"]:
            run()
        if ws.get("no_graph"):
            return
        try:
            ws["graph"] = mem.capture(lambda: [run() for run, _ in ws["runners"]])
        except EngineError as e:
            ws["no_graph"] = True  # this request's images came from the plain run; later ones run step by step too
            warnings.warn(f"the whole-schedule CUDA graph could not be captured ({e}); running the steps one by one")

    def close(self) -> None:
        while self._workspaces:
            self._free(self._workspaces.popitem(last=False)[1])
