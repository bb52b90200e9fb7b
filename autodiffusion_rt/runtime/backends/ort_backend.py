"""The onnxruntime backend: a step's ONNX file in an onnxruntime session (CPU, CUDA or TensorRT provider).

The step sessions of a runtime share one copy of the weights their files have
in common (:func:`shared_initializers`) and one CPU arena
(:func:`use_shared_cpu_arena`); :func:`ort_session_options` is the one place
session options are made (engines, build, export checks).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ...diffusion.step_io import TensorSpec
from ...errors import BackendUnavailableError, EngineError
from ..platform import cpu_isa
from .base import Engine, LoadedEngines, fill_output, step_specs

__all__ = [
    "OnnxRuntimeEngine",
    "import_onnxruntime",
    "load_engines",
    "onnxruntime_providers",
    "ort_session_options",
    "shared_initializers",
]


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
        names = [
            p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
    else:
        if isinstance(requested, str):
            requested = [requested]
        names = [_PROVIDER_ALIASES.get(str(p).lower(), str(p)) for p in requested]
        missing = [p for p in names if p not in available]
        if missing:
            hint = (
                "pip install onnxruntime-gpu (with CUDA, and TensorRT for its provider)"
                if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in missing)
                else "check the provider name"
            )
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
                for k, idx in (
                    ("trt_profile_min_shapes", 0),
                    ("trt_profile_opt_shapes", 1),
                    ("trt_profile_max_shapes", 2),
                ):
                    opts[k] = ",".join(f"{n}:{'x'.join(str(d) for d in shapes[idx])}" for n, shapes in profile.items())
            providers.append((name, opts))
        else:
            providers.append(name)
    return providers


_ORT_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "none": "ORT_DISABLE_ALL",
}


def ort_session_options(
    *, threads: Optional[int] = None, optimization: str = "all", spinning: bool = True, optimized_model_path=None
):
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

    def __init__(
        self,
        path,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        max_batch: Optional[int],
        providers: Optional[list] = None,
        threads: Optional[int] = None,
        name: Optional[str] = None,
        optimization: str = "all",
        initializers: Optional[Mapping[str, Any]] = None,
        spinning: bool = True,
    ):
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
            return {n: fill_output(out, n, v) for n, v in zip(self.output_names, values)}
        return self.bind(feeds, out)()

    def close(self) -> None:
        self.session = None
        self._initializers = {}


def load_engines(
    m,
    plan=None,
    coeffs=None,
    *,
    providers: Optional[Sequence[str]] = None,
    threads: Optional[int] = None,
    check_versions: bool = True,
    share_weights: bool = True,
    spinning: bool = True,
    device_resident: Optional[bool] = None,
    **_,
) -> LoadedEngines:
    """The step engines of an onnxruntime (or, on a GPU provider, a tensorrt) engine dir's manifest ``m``."""
    from ...diffusion.step_io import shape_profile
    from ..device import DeviceResidentWalk, OrtValueMemory

    ort = import_onnxruntime()
    engine_dir, max_batch = m.engine_dir, int(m["batch"]["max"])
    # One provider list per step: the TensorRT provider's shape profile names this step's inputs.
    provs = [
        onnxruntime_providers(
            providers,
            cache_dir=engine_dir / "ort_trt_cache",
            fp16=m["precision"] == "fp16",
            profile=shape_profile(step_specs(step)[0], m["batch"]),
        )
        for step in m["steps"]
    ]
    first = provs[0][0]
    on_cpu = (first[0] if isinstance(first, tuple) else str(first)) == "CPUExecutionProvider"
    # The engines are graphs optimized for onnxruntime's CPU provider (laid out for this CPU's
    # vector width); a GPU provider, or a tensorrt dir, runs the verified portable ONNX exports.
    key = "engine" if m["backend"] == "onnxruntime" and on_cpu else "onnx"
    if check_versions and key == "engine":
        m.check_version("onnxruntime", ort.__version__)
    levels = []
    for i, s in enumerate(m["steps"]):
        record = s["engine"].get("record") or {}
        level = record.get("optimization") if key == "engine" else None
        if level in ("extended", "all") and record.get("isa") != cpu_isa():
            raise EngineError(
                f"{engine_dir}: step {i}'s engine was optimized for CPU {record.get('isa')!r} and this one is "
                f"{cpu_isa()!r} (onnxruntime's layouts follow the vector width); rebuild with "
                f"'autodiffusion-rt build PLAN --out {engine_dir}' on this machine"
            )
        levels.append("none" if level in ("basic", "extended", "all") else "all")
    files = [m.step_file(i, key) for i in range(len(m["steps"]))]
    shared = shared_initializers(files) if share_weights else [{} for _ in files]
    engines = []
    for i, (step, f) in enumerate(zip(m["steps"], files)):
        ins, outs = step_specs(step)
        engines.append(
            OnnxRuntimeEngine(
                f,
                ins,
                outs,
                max_batch,
                providers=provs[i],
                threads=threads,
                name=f"step {i} (t={step['timestep']}, onnxruntime)",
                optimization=levels[i],
                initializers=shared[i],
                spinning=spinning,
            )
        )
    used = engines[0].providers[0]
    on_gpu = used in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    walk = None
    if device_resident or (device_resident is None and on_gpu):
        image_shape = tuple(int(s) for s in m["model"]["image_shape"])
        walk = DeviceResidentWalk(engines, image_shape, OrtValueMemory(ort, "cuda" if on_gpu else "cpu"))
    return LoadedEngines(engines, f"onnxruntime/{used}", walk)
