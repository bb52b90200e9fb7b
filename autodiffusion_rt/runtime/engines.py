"""Engines: one sampler step each, named inputs in, named outputs out.

Every engine runs one step of a plan, the UNet subnetwork of that step with the
sampler update fused in::

    x [, y] [, noise] [, prev_x0] [, prev_eps1 .. prev_eps3]  ->  x_prev [, x0] [, eps]

``y`` (int64 labels) only for class-conditional models, ``noise`` only on
stochastic steps (``c_noise != 0``), ``prev_x0`` only where the step reads the
previous step's x0 (DPM-Solver++(2M) second-order steps), ``x0`` only where the
*next* step reads it; ``prev_epsK`` (the eps of step i-K) only where the step
reads iPNDM's eps history, ``eps`` (the eps the update used) only where one of
the next three steps reads it. :func:`~autodiffusion_rt.diffusion.step_io.step_io` is
the one place that decides this; the exporter and every backend follow it. Inputs and outputs are float32 (labels
int64) whatever the engine's internal precision, batch-first, with a dynamic
batch dimension up to the engine's ``max_batch``.

Backends:

* :class:`TorchStepEngine`: the plan on the PyTorch model (``model.eps`` with
  the step's keep set, then :func:`step_update`): the reference.
* :class:`OnnxRuntimeEngine`: an ONNX file in an onnxruntime session (CPU, CUDA
  or TensorRT execution provider).
* :class:`TensorRTEngine`: a serialized TensorRT engine run with
  ``execute_async_v3`` on a cuda-python stream, its scratch memory shared with
  the other steps (:class:`SharedDeviceMemory`), optionally through a CUDA graph.

tensorrt, cuda-python and onnxruntime are imported inside their backend, so a
missing one is a :class:`BackendUnavailableError` when asked for, never an
import error of this module.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, MutableMapping, Optional, Sequence

import numpy as np
import torch

from ..diffusion import StepCoefficients, split_learned_variance, step_update
from ..diffusion.step_io import BATCH, EPS, NOISE, PREV_EPS, PREV_X0, X, X0, X_PREV, Y, TensorSpec, step_io
from ..errors import BackendUnavailableError, EngineError
from ..sampling import eps_in_chunks

__all__ = [
    "BATCH",
    "Engine",
    "NOISE",
    "OnnxRuntimeEngine",
    "PREV_X0",
    "PREV_EPS",
    "EPS",
    "SharedDeviceMemory",
    "TensorRTEngine",
    "TensorSpec",
    "TorchStepEngine",
    "X",
    "X0",
    "X_PREV",
    "Y",
    "cpu_isa",
    "cuda_compute_capability",
    "import_onnxruntime",
    "import_tensorrt",
    "onnxruntime_providers",
    "ort_session_options",
    "shared_initializers",
    "step_io",
]

# ---------------------------------------------------------------------- base
class Engine(ABC):
    """One step: ``run(feeds, out=None) -> {output name: array}``.

    ``feeds`` maps every input name to a C-contiguous numpy array of the spec's
    dtype and shape (the batch dimension free up to ``max_batch``). ``out``,
    when given, maps output names to preallocated arrays the engine writes
    into (the runtime's ping-pong buffers), so the steady state allocates
    nothing; without it the engine returns fresh arrays.
    """

    backend = "abstract"

    def __init__(self, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch: Optional[int]):
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
                raise EngineError(f"{self.name}: input {spec.name!r} must be a {len(spec.shape)}-d numpy array {spec.shape}, got {_describe(arr)}")
            if batch is None:
                batch = arr.shape[0]
            expected = spec.concrete(batch)
            if arr.shape != expected or arr.dtype != np.dtype(spec.dtype) or not arr.flags.c_contiguous:
                raise EngineError(
                    f"{self.name}: input {spec.name!r} is {_describe(arr)}; expected a C-contiguous "
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
                    raise EngineError(f"{self.name}: output buffer {name!r} is {_describe(arr)}; expected {spec.dtype} {spec.concrete(batch)}")
        return batch

    def run(self, feeds: Mapping[str, np.ndarray], out: Optional[MutableMapping[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
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
    def _run(self, feeds: Mapping[str, np.ndarray], out: Optional[MutableMapping[str, np.ndarray]], batch: int) -> dict[str, np.ndarray]:
        ...

    def close(self) -> None:
        """Release what the engine holds (sessions, device memory)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, inputs={list(self.input_names)}, outputs={list(self.output_names)})"


def _describe(arr: Any) -> str:
    if isinstance(arr, np.ndarray):
        return f"{arr.dtype} {tuple(arr.shape)}{'' if arr.flags.c_contiguous else ' (not contiguous)'}"
    return type(arr).__name__


def _fill(out: Optional[MutableMapping[str, np.ndarray]], name: str, value: np.ndarray) -> np.ndarray:
    if out is not None and name in out:
        np.copyto(out[name], value)
        return out[name]
    return value


# --------------------------------------------------------------------- torch
class TorchStepEngine(Engine):
    """Step i of a plan on the PyTorch model: ``model.eps`` over the keep set, then ``step_update``.

    This is the reference: it shares nothing with the exporter's folded graph,
    so agreement between it and a compiled engine checks the folding too.
    ``device``: where the model runs (its weights must be there; default
    cpu); feeds and outputs stay host numpy arrays.
    """

    backend = "torch"

    def __init__(self, model, row: StepCoefficients, timestep: int, keep: Optional[Iterable[str]],
                 inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], name: str = "torch step",
                 batch_size: int = 256, device=None):
        from ..sampling import check_device

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
        var_v = None
        if self.row.learned_variance:
            eps, var_v = split_learned_variance(eps, x.shape[1])
        noise = torch.from_numpy(feeds[NOISE]).to(dev) if NOISE in feeds else None
        prev = torch.from_numpy(feeds[PREV_X0]).to(dev) if PREV_X0 in feeds else None
        history = [torch.from_numpy(feeds[n]).to(dev) for n in PREV_EPS if n in feeds]
        if EPS in self.output_names:  # iPNDM: the eps this step used is a later step's history
            x_prev, x0, eps_used = step_update(self.row, x, eps, prev, noise, prev_eps=history, return_eps=True, var_v=var_v)
        else:
            x_prev, x0 = step_update(self.row, x, eps, prev, noise, prev_eps=history, var_v=var_v)
        result = {X_PREV: _fill(out, X_PREV, x_prev.cpu().numpy())}
        if X0 in self.output_names:
            result[X0] = _fill(out, X0, x0.cpu().numpy())
        if EPS in self.output_names:
            result[EPS] = _fill(out, EPS, eps_used.cpu().numpy())
        return result


# --------------------------------------------------------------- onnxruntime
def import_onnxruntime():
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise BackendUnavailableError(
            "the onnxruntime backend needs the onnxruntime package: pip install onnxruntime "
            "(or onnxruntime-gpu for the CUDA and TensorRT execution providers)"
        ) from None


_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def onnxruntime_providers(
    requested: Optional[Sequence[str]] = None,
    *,
    cache_dir: Optional[Path] = None,
    fp16: bool = False,
    profile: Optional[Mapping[str, tuple]] = None,
) -> list:
    """The provider list for an onnxruntime session.

    ``requested``: provider names or aliases (cpu, cuda, tensorrt), best first;
    None picks TensorRT > CUDA > CPU among those installed. The TensorRT
    provider gets its engine and timing caches inside ``cache_dir`` and an
    explicit shape profile (``{input: (min, opt, max) shapes}``).
    """
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if requested is None:
        names = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    else:
        if isinstance(requested, str):
            requested = [requested]
        names = [_PROVIDER_ALIASES.get(str(p).lower(), str(p)) for p in requested]
        missing = [p for p in names if p not in available]
        if missing:
            hint = "pip install onnxruntime-gpu (with CUDA, and TensorRT for its provider)" if any(
                p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in missing) else "check the provider name"
            raise BackendUnavailableError(
                f"onnxruntime execution provider(s) {missing} are not available (installed: {available}): {hint}"
            )
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")  # the fallback for nodes the others do not take
    providers: list = []
    for name in names:
        if name == "TensorrtExecutionProvider":
            opts: dict[str, Any] = {"trt_fp16_enable": bool(fp16)}
            if cache_dir is not None:
                cache_dir = Path(cache_dir)
                cache_dir.mkdir(parents=True, exist_ok=True)
                opts.update(
                    trt_engine_cache_enable=True,
                    trt_engine_cache_path=str(cache_dir),
                    trt_timing_cache_enable=True,
                    trt_timing_cache_path=str(cache_dir),
                )
            if profile:
                for k, idx in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1), ("trt_profile_max_shapes", 2)):
                    opts[k] = ",".join(f"{n}:{'x'.join(str(d) for d in shapes[idx])}" for n, shapes in profile.items())
            providers.append((name, opts))
        else:
            providers.append(name)
    return providers


_ORT_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC", "none": "ORT_DISABLE_ALL"}


def ort_session_options(*, threads: Optional[int] = None, optimization: str = "all", spinning: bool = True,
                        optimized_model_path=None):
    """The one place onnxruntime SessionOptions are made (engines, build, export checks).

    Each session keeps its own intra-op pool: onnxruntime's global pools are a
    process-wide switch in its Python API (``set_global_thread_pool_sizes``
    makes every later per-session-threads session fail, including the ones
    ``onnxruntime.quantization`` creates), so a library cannot turn them on.
    What the shared pool would buy, no pool spinning while another step runs,
    comes from ``session.force_spinning_stop``: a step's workers stop spinning
    when its run ends. ``spinning=False`` also turns spinning off during runs
    (for timing another library beside the engines).
    """
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[optimization])
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


_ENV_ARENA = []


def use_shared_cpu_arena(so) -> None:
    """Make a session allocate its CPU tensors from one arena registered once in onnxruntime's environment.

    Each session otherwise keeps its own arena grown to its largest batch's
    activations: K steps held K arenas (a loaded NFE-10 runtime of the
    embedded model took ~390 MB instead of ~95 MB). The steps of a runtime
    never run at once, so one arena serves them all.
    """
    if not _ENV_ARENA:
        ort = import_onnxruntime()
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _ENV_ARENA.append(info)
    so.add_session_config_entry("session.use_env_allocators", "1")


def release_freed_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    onnxruntime parses every weight of an engine file into the heap before the
    shared OrtValues replace them; glibc keeps the freed pages resident, so
    without this each step session still cost about one copy of the weights in
    resident memory (a 40 M-parameter ADM: +29 MB per step, +6 MB with it).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): no such call
        trim = None
    if trim is not None:
        trim(0)


def cpu_isa() -> str:
    """The CPU's architecture and the vector extensions onnxruntime's kernels and layouts depend on.

    A graph saved after onnxruntime's layout optimization (NCHWc blocks of 8
    for AVX2, 16 for AVX-512) runs only on the instruction set it was saved
    on, so this goes into every onnxruntime engine's cache record.
    """
    import platform

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")
    return f"{platform.machine()}:" + ",".join(f for f in wanted if f in flags)


def shared_initializers(paths: Sequence) -> list[dict]:
    """For each ONNX file, ``{initializer name: OrtValue}`` of the tensors it has in common with another file.

    Tensors are matched by content (dtype, shape, bytes), not by name, so the
    generated names of an optimized graph (``reorder_token_N``) do not matter:
    every file's initializer is replaced by one OrtValue that all the step
    sessions read (``SessionOptions.add_initializer``): one copy of the weights.
    """
    import hashlib

    onnx = importlib.import_module("onnx")
    from onnx import numpy_helper

    ort = import_onnxruntime()
    by_content: dict[tuple, list] = {}
    for k, path in enumerate(paths):
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.size < 16:  # scalars and tiny shape tensors: not worth a shared value
                continue
            key = (arr.dtype.str, arr.shape, hashlib.sha256(np.ascontiguousarray(arr).tobytes()).digest())
            by_content.setdefault(key, [None, []])
            if by_content[key][0] is None:
                by_content[key][0] = np.ascontiguousarray(arr)
            by_content[key][1].append((k, init.name))
    out: list[dict] = [{} for _ in paths]
    for arr, users in by_content.values():
        if len({k for k, _ in users}) < 2:
            continue
        value = ort.OrtValue.ortvalue_from_numpy(arr)  # holds arr; the sessions read its memory
        for k, name in users:
            out[k][name] = value
    return out


class OnnxRuntimeEngine(Engine):
    """An ONNX file in an onnxruntime session; with ``out`` buffers it runs through an IO binding.

    ``optimization``: the graph optimization level at load ("none" for an
    engine the build already optimized). ``initializers``: ``{name: OrtValue}``
    replacing the file's own tensors (:func:`shared_initializers`).
    """

    backend = "onnxruntime"

    def __init__(self, path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch: Optional[int],
                 providers: Optional[list] = None, threads: Optional[int] = None, name: Optional[str] = None,
                 optimization: str = "all", initializers: Optional[Mapping[str, Any]] = None, spinning: bool = True):
        super().__init__(name or Path(path).name, inputs, outputs, max_batch)
        ort = import_onnxruntime()
        self.path = Path(path)
        so = ort_session_options(threads=threads, optimization=optimization, spinning=spinning)
        use_shared_cpu_arena(so)
        self._initializers = dict(initializers or {})  # kept alive as long as the session
        if self._initializers:
            # Prepacked copies of shared weights would be one per session again.
            so.add_session_config_entry("session.disable_prepacking", "1")
            for init_name, value in self._initializers.items():
                so.add_initializer(init_name, value)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(
                f"onnxruntime cannot load {self.path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                "rebuild the engine dir with 'autodiffusion-rt build PLAN --out DIR'"
            ) from None
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if sorted(got_in) != sorted(self.input_names) or sorted(got_out) != sorted(self.output_names):
            raise EngineError(
                f"{self.path} has inputs {got_in} and outputs {got_out} but the manifest says "
                f"{list(self.input_names)} -> {list(self.output_names)}: the engine dir is inconsistent; rebuild it"
            )
        self.providers = self.session.get_providers()
        self._ort = ort
        if self._initializers:
            release_freed_heap()  # the file's own copies of the shared weights were parsed, then dropped

    def bind(self, feeds, out):
        """An IO binding of host arrays by address: each call is ``run_with_iobinding`` and nothing else."""
        batch = self.check_feeds(feeds, out)
        if any(n not in out for n in self.output_names):
            return super().bind(feeds, out)
        b = self.session.io_binding()
        for name, arr in feeds.items():
            b.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        for name in self.output_names:
            arr = out[name]
            b.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        arrays = (dict(feeds), dict(out))  # the binding holds raw addresses: keep the arrays alive with it
        run = self.session.run_with_iobinding

        def step():
            run(b)
            return arrays[1]

        del batch
        return step

    def bind_device(self, tensors: Mapping[str, Any], batch: int):
        """Bind OrtValues (the device-resident walk's, on any device) to this step; return its runner.

        ``tensors`` maps every input and output name to an OrtValue of the
        step's shape at ``batch``; the runner is one ``run_with_iobinding``.
        """
        b = self.session.io_binding()
        for name in self.input_names:
            b.bind_ortvalue_input(name, tensors[name])
        for name in self.output_names:
            b.bind_ortvalue_output(name, tensors[name])
        values = dict(tensors)  # the binding refers to their memory: keep them alive with it
        run = self.session.run_with_iobinding

        def step():
            run(b)
            return values

        return step

    def _run(self, feeds, out, batch):
        if out is None or any(n not in out for n in self.output_names):
            values = self.session.run(list(self.output_names), dict(feeds))
            return {n: _fill(out, n, v) for n, v in zip(self.output_names, values)}
        return self.bind(feeds, out)()

    def close(self) -> None:
        self.session = None
        self._initializers = {}


# ------------------------------------------------------------------ tensorrt
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


def import_cudart():
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (12.6+) or the older ``cuda.cudart``."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailableError("the tensorrt backend needs cuda-python: pip install cuda-python")


def cuda_check(cudart, result, what: str):
    """Unwrap a cuda-python ``(err, *values)`` tuple, raising EngineError on failure."""
    if not isinstance(result, tuple):
        result = (result,)
    err = result[0]
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise EngineError(f"CUDA call {what} failed: {name}; is an NVIDIA GPU with a working driver present?")
    rest = result[1:]
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def cuda_compute_capability(device: int = 0) -> Optional[str]:
    """``"major.minor"`` of the GPU, or None when cuda-python, a driver or a GPU is missing.

    Only "there is no GPU" answers None; any other CUDA error (a broken
    driver, a device in a bad state) is raised, not mistaken for no GPU.
    """
    try:
        cudart = import_cudart()
    except BackendUnavailableError:
        return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0:
        # cudaErrorNoDevice (100), cudaErrorInsufficientDriver (35): no usable GPU here
        if int(err) in (100, 35) or getattr(err, "name", "") in ("cudaErrorNoDevice", "cudaErrorInsufficientDriver"):
            return None
        cuda_check(cudart, (err,), "cudaGetDeviceCount")
    if count < 1:
        return None
    attr = cudart.cudaDeviceAttr
    major = cuda_check(cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute")
    minor = cuda_check(cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute")
    return f"{major}.{minor}"


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

    def __init__(self, engine_bytes: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 max_batch: Optional[int], *, runtime, scratch: SharedDeviceMemory, stream, cudart, trt,
                 name: str = "tensorrt step", cuda_graph: bool = False, refit_onnx: Optional[Path] = None, logger=None):
        super().__init__(name, inputs, outputs, max_batch)
        self.trt, self.cudart, self.stream, self.scratch = trt, cudart, stream, scratch
        self.stream_handle = int(stream)  # TensorRT takes the cudaStream_t as an integer handle
        self.engine = runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise EngineError(f"{name}: TensorRT could not deserialize the engine (built by another TensorRT version or GPU?); rebuild it")
        if refit_onnx is not None:  # a weight-stripped engine: its weights come from the step's ONNX file
            self._refit(refit_onnx, logger if logger is not None else trt.Logger(trt.Logger.WARNING))
        names = [self.engine.get_tensor_name(k) for k in range(self.engine.num_io_tensors)]
        want = set(self.input_names) | set(self.output_names)
        if set(names) != want:
            raise EngineError(f"{name}: engine tensors {sorted(names)} do not match the manifest's {sorted(want)}; rebuild it")
        for spec in (*self.inputs, *self.outputs):
            mode = self.engine.get_tensor_mode(spec.name)
            expected = trt.TensorIOMode.INPUT if spec.name in self.input_names else trt.TensorIOMode.OUTPUT
            if mode != expected:
                raise EngineError(f"{name}: tensor {spec.name!r} is {mode} in the engine; rebuild it")
            dtype = _TRT_TO_NUMPY.get(getattr(self.engine.get_tensor_dtype(spec.name), "name", ""), None)
            if dtype != spec.dtype:
                raise EngineError(f"{name}: tensor {spec.name!r} is {dtype} in the engine, {spec.dtype} in the manifest; rebuild it")
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
            raise EngineError(f"{self.name}: TensorRT cannot refit the weight-stripped engine from {onnx_path} "
                              f"({'; '.join(errors) or 'no details'}); {rebuild}")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise EngineError(f"{self.name}: {onnx_path} lacks {len(missing)} of the engine's weights (first: {missing[0]!r}); {rebuild}")
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
            cuda_check(cu, cu.cudaStreamBeginCapture(self.stream, cu.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture")
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
                raise EngineError(f"{self.name}: TensorRT execute_async_v3 failed inside CUDA graph capture "
                                  f"({'enqueue failed' if not ok else getattr(err, 'name', err)}); load without cuda_graph")
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
            cuda_check(cu, cu.cudaMemcpyAsync(bufs[spec.name], arr.ctypes.data, arr.nbytes, h2d, self.stream), "cudaMemcpyAsync")
        self._enqueue(batch, bufs)
        result = {}
        for spec in self.outputs:
            arr = out[spec.name] if out is not None and spec.name in out else np.empty(spec.concrete(batch), spec.dtype)
            cuda_check(cu, cu.cudaMemcpyAsync(arr.ctypes.data, bufs[spec.name], arr.nbytes, d2h, self.stream), "cudaMemcpyAsync")
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
