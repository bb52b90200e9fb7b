"""The native TensorRT backend: a serialized engine per step run with ``execute_async_v3`` on a cuda-python stream.

The step engines share one device scratch buffer (:class:`SharedDeviceMemory`)
and may replay as CUDA graphs. tensorrt and cuda-python are imported lazily:
their absence is a :class:`~autodiffusion_rt.errors.BackendUnavailableError`
when this backend is asked for.
"""

from __future__ import annotations

import importlib
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ...diffusion.step_io import TensorSpec
from ...errors import BackendUnavailableError, EngineError
from ..platform import cuda_check, cuda_compute_capability, import_cudart
from .base import Engine, LoadedEngines, step_specs

__all__ = ["SharedDeviceMemory", "TensorRTEngine", "import_tensorrt", "load_engines", "tensorrt_major"]


def import_tensorrt():
    """The tensorrt module (10.x or 11.x), or a BackendUnavailableError that says what to install."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        raise BackendUnavailableError(
            "the tensorrt backend needs NVIDIA TensorRT 10 or 11 and an NVIDIA GPU: pip install tensorrt cuda-python "
            "(from NVIDIA's package index); or build with --backend onnxruntime"
        ) from None
    major = tensorrt_major(trt)
    try:
        minor = int(str(trt.__version__).split(".")[1])
    except (IndexError, ValueError):
        minor = 0
    if (major, minor) < (10, 1):
        # device_memory_size_v2 and set_device_memory (the shared scratch buffer) arrived in 10.1.
        raise BackendUnavailableError(
            f"tensorrt {getattr(trt, '__version__', '?')} is too old: this backend needs TensorRT 10.1 or newer "
            "(pip install -U tensorrt)"
        )
    return trt


def tensorrt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        raise BackendUnavailableError("cannot read tensorrt.__version__: reinstall tensorrt") from None


class SharedDeviceMemory:
    """One device scratch buffer for every step engine (they never run at once).

    TensorRT contexts are created with the USER_MANAGED allocation strategy and
    pointed at this buffer; it grows to the largest ``device_memory_size_v2``
    of the engines attached to it.
    """

    def __init__(self, cudart):
        self.cudart = cudart
        self.ptr = 0
        self.size = 0
        self._contexts: list = []

    def attach(self, context, size: int) -> None:
        if size > self.size:
            self._grow(size)
        self._contexts.append(context)
        context.set_device_memory(self.ptr, self.size)

    def _grow(self, size: int) -> None:
        if self.ptr:
            cuda_check(self.cudart, self.cudart.cudaFree(self.ptr), "cudaFree")
        self.ptr = int(cuda_check(self.cudart, self.cudart.cudaMalloc(size), f"cudaMalloc({size})"))
        self.size = size
        for ctx in self._contexts:  # re-point the contexts attached before the buffer moved
            ctx.set_device_memory(self.ptr, self.size)

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
        self.ptr, self.size, self._contexts = 0, 0, []


_TRT_TO_NUMPY = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32", "BOOL": "bool"}


class TensorRTEngine(Engine):
    """A serialized TensorRT engine (``.plan``) run with ``execute_async_v3``.

    ``run``: host arrays are copied to per-batch-size device buffers (kept,
    so their addresses are stable for CUDA graphs), the engine runs on
    ``stream``, and outputs are copied back. :meth:`bind_device`: the step
    runs on the caller's device buffers, enqueued only (the runtime's
    device-resident walk). ``scratch`` is shared by every step engine.
    """

    backend = "tensorrt"

    def __init__(
        self,
        engine_bytes: bytes,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        max_batch: Optional[int],
        *,
        runtime,
        scratch: SharedDeviceMemory,
        stream,
        cudart,
        trt,
        name: str = "tensorrt step",
        cuda_graph: bool = False,
        refit_onnx: Optional[Path] = None,
        logger=None,
    ):
        super().__init__(name, inputs, outputs, max_batch)
        self.trt, self.cudart, self.stream, self.scratch = trt, cudart, stream, scratch
        self.stream_handle = int(stream)  # TensorRT takes the cudaStream_t as an integer handle
        self.engine = runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise EngineError(
                f"{name}: TensorRT could not deserialize the engine "
                "(built by another TensorRT version or GPU?); rebuild it"
            )
        if refit_onnx is not None:  # a weight-stripped engine: its weights come from the step's ONNX file
            self._refit(refit_onnx, logger if logger is not None else trt.Logger(trt.Logger.WARNING))
        names = [self.engine.get_tensor_name(k) for k in range(self.engine.num_io_tensors)]
        want = set(self.input_names) | set(self.output_names)
        if set(names) != want:
            raise EngineError(
                f"{name}: engine tensors {sorted(names)} do not match the manifest's {sorted(want)}; rebuild it"
            )
        for spec in (*self.inputs, *self.outputs):
            mode = self.engine.get_tensor_mode(spec.name)
            expected = trt.TensorIOMode.INPUT if spec.name in self.input_names else trt.TensorIOMode.OUTPUT
            if mode != expected:
                raise EngineError(f"{name}: tensor {spec.name!r} is {mode} in the engine; rebuild it")
            dtype = _TRT_TO_NUMPY.get(getattr(self.engine.get_tensor_dtype(spec.name), "name", ""), None)
            if dtype != spec.dtype:
                raise EngineError(
                    f"{name}: tensor {spec.name!r} is {dtype} in the engine, {spec.dtype} in the manifest; rebuild it"
                )
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise EngineError(f"{name}: TensorRT could not create an execution context (out of GPU memory?)")
        scratch.attach(self.context, int(self.engine.device_memory_size_v2))
        self.cuda_graph = bool(cuda_graph)
        # Bounded LRUs: a server sees many batch sizes; keep the last few, free the rest.
        self._buffers: "OrderedDict[int, dict[str, int]]" = OrderedDict()  # batch -> name -> device pointer
        self._graphs: "OrderedDict[tuple, Any]" = OrderedDict()  # (shapes, addresses, scratch) -> graph exec

    MAX_CACHED_BATCHES = 4

    def _refit(self, onnx_path: Path, logger) -> None:
        """Fill a weight-stripped engine from ``onnx_path`` (before any context exists)."""
        trt = self.trt
        rebuild = "rebuild the engine dir with 'autodiffusion-rt build PLAN --backend tensorrt --out DIR'"
        refitter = trt.Refitter(self.engine, logger)
        parser = trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(onnx_path)):
            errors = [str(parser.get_error(k)) for k in range(parser.num_errors)]
            raise EngineError(
                f"{self.name}: TensorRT cannot refit the weight-stripped engine from {onnx_path} "
                f"({'; '.join(errors) or 'no details'}); {rebuild}"
            )
        missing = list(refitter.get_missing_weights())
        if missing:
            raise EngineError(
                f"{self.name}: {onnx_path} lacks {len(missing)} of the engine's weights "
                f"(first: {missing[0]!r}); {rebuild}"
            )
        if not refitter.refit_cuda_engine():
            raise EngineError(f"{self.name}: TensorRT's refit_cuda_engine failed for {onnx_path}; {rebuild}")

    def _device_buffers(self, batch: int) -> dict[str, int]:
        bufs = self._buffers.get(batch)
        if bufs is not None:
            self._buffers.move_to_end(batch)
            return bufs
        bufs = {}
        for spec in (*self.inputs, *self.outputs):
            nbytes = math.prod(spec.concrete(batch)) * np.dtype(spec.dtype).itemsize
            bufs[spec.name] = int(cuda_check(self.cudart, self.cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))
        self._buffers[batch] = bufs
        while len(self._buffers) > self.MAX_CACHED_BATCHES:
            old_batch, old = self._buffers.popitem(last=False)
            for key in [k for k in self._graphs if k[0] == old_batch]:  # graphs that use the freed buffers
                self.cudart.cudaGraphExecDestroy(self._graphs.pop(key))
            cuda_check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            for ptr in old.values():
                self.cudart.cudaFree(ptr)
        return bufs

    def _bind(self, batch: int, bufs: Mapping[str, int]) -> None:
        for spec in self.inputs:
            if not self.context.set_input_shape(spec.name, spec.concrete(batch)):
                raise EngineError(f"{self.name}: TensorRT rejected shape {spec.concrete(batch)} for {spec.name!r}")
        for name, ptr in bufs.items():
            if not self.context.set_tensor_address(name, ptr):
                raise EngineError(f"{self.name}: TensorRT rejected the address of {name!r}")
        # The scratch buffer may have moved (a larger engine attached later): point at it again.
        self.context.set_device_memory(self.scratch.ptr, self.scratch.size)

    def bind_device(self, tensors: Mapping[str, int], batch: int):
        """A runner that enqueues this step on the stream, reading and writing the device pointers ``tensors``.

        For the runtime's device-resident walk: ``tensors`` maps every input
        and output name to a device buffer of the step's shape at ``batch``;
        the runner sets shapes and addresses (the context is shared by every
        batch size) and enqueues, with no copy and no synchronize.
        """
        missing = [n for n in (*self.input_names, *self.output_names) if n not in tensors]
        if missing:
            raise EngineError(f"{self.name}: no device buffer for {missing}")
        if self.max_batch is not None and batch > self.max_batch:
            raise EngineError(f"{self.name}: batch {batch} is above the engine's maximum {self.max_batch}")
        bufs = {n: int(tensors[n]) for n in (*self.input_names, *self.output_names)}

        def step():
            self._bind(batch, bufs)
            self._enqueue(batch, bufs)

        return step

    def _enqueue(self, batch: int, bufs: Mapping[str, int]) -> None:
        if not self.cuda_graph:
            if not self.context.execute_async_v3(self.stream_handle):
                raise EngineError(f"{self.name}: TensorRT execute_async_v3 failed")
            return
        cu = self.cudart
        # A graph replays the shapes and addresses it was captured with: key it by all of them.
        key = (batch, tuple(s.concrete(batch) for s in self.inputs), tuple(sorted(bufs.items())), self.scratch.ptr)
        graph_exec = self._graphs.get(key)
        if graph_exec is None:
            # One plain run first (TensorRT may allocate lazily), then capture.
            if not self.context.execute_async_v3(self.stream_handle):
                raise EngineError(f"{self.name}: TensorRT execute_async_v3 failed")
            cuda_check(
                cu,
                cu.cudaStreamBeginCapture(self.stream, cu.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
                "cudaStreamBeginCapture",
            )
            ok = False
            try:
                ok = bool(self.context.execute_async_v3(self.stream_handle))
            finally:
                # Always end the capture, or the stream stays capturing and every later call fails.
                err, graph = cu.cudaStreamEndCapture(self.stream)
            if not ok or int(err) != 0:
                if int(err) == 0 and graph is not None:
                    cu.cudaGraphDestroy(graph)
                self.cuda_graph = False  # run this engine without graphs from now on
                raise EngineError(
                    f"{self.name}: TensorRT execute_async_v3 failed inside CUDA graph capture "
                    f"({'enqueue failed' if not ok else getattr(err, 'name', err)}); load without cuda_graph"
                )
            graph_exec = cuda_check(cu, cu.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            cuda_check(cu, cu.cudaGraphDestroy(graph), "cudaGraphDestroy")
            self._graphs[key] = graph_exec
            while len(self._graphs) > self.MAX_CACHED_BATCHES:
                cu.cudaGraphExecDestroy(self._graphs.popitem(last=False)[1])
            return  # the capture run did not execute; the plain run above produced the outputs
        self._graphs.move_to_end(key)
        cuda_check(cu, cu.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    def _run(self, feeds, out, batch):
        cu = self.cudart
        h2d, d2h = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        bufs = self._device_buffers(batch)
        self._bind(batch, bufs)  # cheap: shapes and addresses for this batch size
        for spec in self.inputs:
            arr = feeds[spec.name]
            cuda_check(
                cu,
                cu.cudaMemcpyAsync(bufs[spec.name], arr.ctypes.data, arr.nbytes, h2d, self.stream),
                "cudaMemcpyAsync",
            )
        self._enqueue(batch, bufs)
        result = {}
        for spec in self.outputs:
            arr = out[spec.name] if out is not None and spec.name in out else np.empty(spec.concrete(batch), spec.dtype)
            cuda_check(
                cu,
                cu.cudaMemcpyAsync(arr.ctypes.data, bufs[spec.name], arr.nbytes, d2h, self.stream),
                "cudaMemcpyAsync",
            )
            result[spec.name] = arr
        cuda_check(cu, cu.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return result

    def close(self) -> None:
        cu = self.cudart
        for g in self._graphs.values():
            cu.cudaGraphExecDestroy(g)
        for bufs in self._buffers.values():
            for ptr in bufs.values():
                cu.cudaFree(ptr)
        self._graphs, self._buffers = {}, {}
        self.context = None
        self.engine = None


def load_engines(
    m,
    plan=None,
    coeffs=None,
    *,
    check_versions: bool = True,
    cuda_graph: "bool | str" = False,
    device_resident: Optional[bool] = None,
    **_,
) -> LoadedEngines:
    """The step engines of a tensorrt engine dir's manifest ``m`` on this machine's GPU."""
    from ..device import CudaRuntimeMemory, DeviceResidentWalk

    trt = import_tensorrt()
    cudart = import_cudart()
    cc = cuda_compute_capability()
    if cc is None:
        raise EngineError(
            "the tensorrt backend needs an NVIDIA GPU and driver, and none was found; "
            "use an onnxruntime or openvino engine dir on this machine"
        )
    if check_versions:
        m.check_version("tensorrt", trt.__version__)
        m.check_version("compute_capability", cc, what="GPU compute capability")
    steps, max_batch = m["steps"], int(m["batch"]["max"])
    files = [m.step_file(i, "engine") for i in range(len(steps))]
    # Weight-stripped engines are refitted from their step's ONNX file, checked like every file.
    refits = [
        m.step_file(i, "onnx") if (s["engine"].get("record") or {}).get("weights") == "stripped" else None
        for i, s in enumerate(steps)
    ]
    logger = trt.Logger(trt.Logger.WARNING)
    trt_runtime = trt.Runtime(logger)
    stream = cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
    scratch = SharedDeviceMemory(cudart)
    engines = []
    try:
        for i, (step, f) in enumerate(zip(steps, files)):
            ins, outs = step_specs(step)
            engines.append(
                TensorRTEngine(
                    f.read_bytes(),
                    ins,
                    outs,
                    max_batch,
                    runtime=trt_runtime,
                    scratch=scratch,
                    stream=stream,
                    cudart=cudart,
                    trt=trt,
                    cuda_graph=cuda_graph in (True, "step"),
                    name=f"step {i} (t={step['timestep']}, tensorrt)",
                    refit_onnx=refits[i],
                    logger=logger,
                )
            )
    except BaseException:
        for e in engines:
            e.close()
        scratch.free()
        cudart.cudaStreamDestroy(stream)
        raise
    walk = None
    if device_resident is None or device_resident:
        image_shape = tuple(int(s) for s in m["model"]["image_shape"])
        walk = DeviceResidentWalk(
            engines, image_shape, CudaRuntimeMemory(cudart, stream), schedule_graph=cuda_graph == "schedule"
        )
    # trt_runtime and logger must outlive the engines; then the scratch buffer and the stream go.
    keep_alive = (trt_runtime, logger)
    return LoadedEngines(
        engines,
        f"tensorrt {trt.__version__}",
        walk,
        (lambda: keep_alive, scratch.free, lambda: cudart.cudaStreamDestroy(stream)),
    )
