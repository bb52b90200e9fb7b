"""The native TensorRT backend.

TensorRT cannot run on the machines this project is tested on (no GPU, no
TensorRT wheels). So:

* the real runs are in ``tests/test_gpu_smoke.py``; they skip unless
  ``tensorrt`` and an NVIDIA GPU are present;
* the ``..._against_stand_in_module_not_a_real_run`` tests here put a fake
  ``tensorrt`` module and a fake cuda-python runtime in ``sys.modules``. The
  fakes check how our code calls the API (argument types, call order, the 10.x
  vs 11.x differences, shared scratch memory, CUDA graph capture, one
  synchronize per request, refits). They catch misuse of the API; they say
  nothing about TensorRT's numerics, speed or engine sizes, so no test here
  compares images with torch (tests/test_runtime.py does, on onnxruntime).
"""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from conftest import core_engine_model, core_plan

from autodiffusion_rt.errors import BackendUnavailableError, EngineError
from autodiffusion_rt.runtime import Manifest, Runtime
from export.build import build_engines

pytestmark = [pytest.mark.usefixtures("one_thread_per_module"), pytest.mark.slow]  # slow: the whole module (minutes)


@pytest.fixture(scope="module")
def model():
    return core_engine_model(0, num_classes=3)


@pytest.fixture(scope="module")
def onnx_dir(model, tmp_path_factory):
    """An onnxruntime build of the plan: its verified ONNX files are reused by the TensorRT builds below."""
    d = tmp_path_factory.mktemp("onnx") / "e"
    build_engines(make_plan(model), d, model=model, max_batch=4, progress=False, backend="onnxruntime")
    return d


@pytest.fixture
def engine_dir(onnx_dir, tmp_path):
    import shutil

    d = tmp_path / "e"
    shutil.copytree(onnx_dir, d)
    return d


def make_plan(model, sampler="dpmpp_2m"):
    ids = sorted(model.unet.layer_ids)
    return core_plan(model, [300, 200, 100], sampler, skip=[[], ids[:4], []])


# ------------------------------------------------------------------ the fakes
class _Member:
    def __init__(self, owner, name, value):
        self.owner, self.name, self.value = owner, name, value

    def __int__(self):
        return self.value

    def __repr__(self):
        return f"{self.owner}.{self.name}"


def _enum(owner, *names):
    return types.SimpleNamespace(**{n: _Member(owner, n, i) for i, n in enumerate(names)})


def _need(cond, what):
    if not cond:
        raise TypeError(f"fake tensorrt: API misuse: {what}")


def _is_shape(s, rank):
    return isinstance(s, (tuple, list)) and len(s) == rank and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in s)


class FakeDevice:
    """Fake cuda-python runtime: 'device' memory is host memory, pointers are real addresses."""

    def __init__(self, cc=(8, 9)):
        self.allocs: dict[int, np.ndarray] = {}
        self.cc = cc
        self.capturing = None
        self.launches = 0
        self.module = self._module()

    def _module(self):
        dev = self
        m = types.ModuleType("cuda.bindings.runtime")
        m.cudaError_t = types.SimpleNamespace(cudaSuccess=0)
        m.cudaMemcpyKind = _enum("cudaMemcpyKind", "cudaMemcpyHostToHost", "cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost")
        m.cudaStreamCaptureMode = _enum("cudaStreamCaptureMode", "cudaStreamCaptureModeGlobal")
        m.cudaDeviceAttr = _enum("cudaDeviceAttr", "cudaDevAttrComputeCapabilityMajor", "cudaDevAttrComputeCapabilityMinor")

        class Stream:
            def __int__(self):
                return 0x5EED

        m.cudaGetDeviceCount = lambda: (0, 1)

        def get_attr(attr, device):
            _need(isinstance(device, int), "device must be an int")
            return (0, dev.cc[0] if attr.name.endswith("Major") else dev.cc[1])

        def malloc(size):
            _need(isinstance(size, int) and size > 0, f"cudaMalloc size {size!r}")
            buf = np.zeros(size + 256, np.uint8)
            ptr = (buf.ctypes.data + 255) // 256 * 256
            dev.allocs[ptr] = buf
            return (0, ptr)

        def free(ptr):
            _need(ptr in dev.allocs, f"cudaFree of {ptr!r}, not a live allocation")
            del dev.allocs[ptr]
            return (0,)

        def memcpy(dst, src, count, kind, stream):
            _need(isinstance(stream, Stream), "memcpy on something that is not a cudaStream_t")
            _need(dev.capturing is None, "memcpy inside a graph capture")
            if kind is m.cudaMemcpyKind.cudaMemcpyHostToDevice:
                _need(dev.owns(dst, count), "H2D destination is not device memory")
            elif kind is m.cudaMemcpyKind.cudaMemcpyDeviceToHost:
                _need(dev.owns(src, count), "D2H source is not device memory")
            else:
                raise TypeError(f"unexpected memcpy kind {kind}")
            ctypes.memmove(dst, src, count)
            return (0,)

        def begin(stream, mode):
            _need(isinstance(stream, Stream) and mode is m.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal, "capture args")
            dev.capturing = []
            return (0,)

        def end(stream):
            ops, dev.capturing = dev.capturing, None
            _need(ops is not None, "EndCapture without BeginCapture")
            return (0, ("graph", ops))

        def instantiate(graph, flags):
            _need(isinstance(graph, tuple) and graph[0] == "graph" and flags == 0, "cudaGraphInstantiate args")
            return (0, ("exec", graph[1]))

        def launch(graph_exec, stream):
            _need(isinstance(graph_exec, tuple) and graph_exec[0] == "exec", "cudaGraphLaunch of a non-executable graph")
            dev.launches += 1
            for op in graph_exec[1]:
                op()
            return (0,)

        m.cudaDeviceGetAttribute = get_attr
        m.cudaMalloc, m.cudaFree, m.cudaMemcpyAsync = malloc, free, memcpy
        m.cudaStreamCreate = lambda: (0, Stream())
        m.cudaStreamDestroy = lambda s: (0,)
        m.cudaStreamSynchronize = lambda s: (0,)
        m.cudaStreamBeginCapture, m.cudaStreamEndCapture = begin, end
        m.cudaGraphInstantiate, m.cudaGraphLaunch = instantiate, launch
        m.cudaGraphDestroy = lambda g: (0,)
        m.cudaGraphExecDestroy = lambda g: (0,)
        return m

    def owns(self, ptr, nbytes):
        for base, buf in self.allocs.items():
            if base <= ptr and ptr + nbytes <= base + buf.size - (base - buf.ctypes.data):
                return True
        return False


HEADER = b"FAKE-TRT-ENGINE\n"
STRIPPED = b"FAKE-TRT-STRIPPED-ENGINE\n"


def _has_data(init) -> bool:
    return bool(init.raw_data or init.float_data or init.int64_data or init.int32_data) or int(np.prod(init.dims)) == 0


def make_fake_tensorrt(version: str, device: FakeDevice, log: dict):
    """A stand-in ``tensorrt`` module with the 10.x or 11.x API surface this project uses."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": "W", "VERBOSE": "V", "ERROR": "E", "INFO": "I",
                                      "__init__": lambda self, sev="W": _need(sev in "WVEI", "Logger severity")})
    trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", *(["EXPLICIT_BATCH", "STRONGLY_TYPED"] if major == 10 else ["STRONGLY_TYPED"]))
    # 11.x removed the precision flags: asking for FP16 there is an AttributeError, as in the real module.
    refit_flags = ["REFIT", "REFIT_IDENTICAL", "STRIP_PLAN"]
    trt.BuilderFlag = _enum("BuilderFlag", *(["FP16", "BF16", "TF32", *refit_flags] if major == 10 else ["TF32", *refit_flags]))
    trt.MemoryPoolType = _enum("MemoryPoolType", "WORKSPACE")
    trt.TensorIOMode = _enum("TensorIOMode", "NONE", "INPUT", "OUTPUT")
    trt.DataType = _enum("DataType", "FLOAT", "HALF", "INT8", "INT32", "BOOL", "INT64")
    trt.ExecutionContextAllocationStrategy = _enum("ExecutionContextAllocationStrategy", "STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED")
    onnx_to_trt = {onnx.TensorProto.FLOAT: trt.DataType.FLOAT, onnx.TensorProto.INT64: trt.DataType.INT64}

    def io_of(model):
        def shape(vi):
            return tuple(-1 if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim)

        ins = [(vi.name, onnx_to_trt[vi.type.tensor_type.elem_type], shape(vi)) for vi in model.graph.input]
        outs = [(vi.name, onnx_to_trt[vi.type.tensor_type.elem_type], shape(vi)) for vi in model.graph.output]
        return ins, outs

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, None

        @property
        def num_inputs(self):
            _need(self.inputs is not None, "network used before parsing")
            return len(self.inputs)

        def get_input(self, k):
            name, dtype, shape = self.inputs[k]
            return types.SimpleNamespace(name=name, dtype=dtype, shape=shape)

    class OnnxParser:
        def __init__(self, network, logger):
            _need(isinstance(network, Network) and isinstance(logger, trt.Logger), "OnnxParser(network, logger)")
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            _need(isinstance(path, str), "parse_from_file takes a str path")
            model = onnx.load(path)
            self.network.inputs, _ = io_of(model)
            self.network.onnx_bytes = model.SerializeToString()
            self.network.float16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
            return True

        def get_error(self, k):
            raise AssertionError("no errors")

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            _need(isinstance(name, str) and all(isinstance(s, tuple) for s in (lo, opt, hi)), "set_shape(name, min, opt, max) with tuples")
            _need(len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi)), f"profile {lo} {opt} {hi}")
            self.shapes[name] = (lo, opt, hi)

    class TimingCache:
        def __init__(self, n):
            self.n = n

        def serialize(self):
            return b"FAKE-CACHE %d" % self.n

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache, self.pool = [], [], None, None

        def set_memory_pool_limit(self, pool, size):
            _need(pool is trt.MemoryPoolType.WORKSPACE and isinstance(size, int), "set_memory_pool_limit(MemoryPoolType, int)")
            self.pool = size

        def set_flag(self, flag):
            _need(isinstance(flag, _Member) and flag.owner == "BuilderFlag", "set_flag takes a BuilderFlag")
            self.flags.append(flag.name)

        def clear_flag(self, flag):
            _need(isinstance(flag, _Member) and flag.owner == "BuilderFlag", "clear_flag takes a BuilderFlag")
            self.flags.append(f"-{flag.name}")

        def add_optimization_profile(self, profile):
            _need(isinstance(profile, Profile), "add_optimization_profile takes a profile")
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            _need(isinstance(data, (bytes, bytearray, memoryview)), "create_timing_cache takes bytes")
            data = bytes(data)
            if data and not data.startswith(b"FAKE-CACHE"):
                return None
            return TimingCache(int(data.split()[1]) if data else 0)

        def set_timing_cache(self, cache, ignore_mismatch):
            _need(isinstance(cache, TimingCache) and isinstance(ignore_mismatch, bool), "set_timing_cache(cache, bool)")
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            _need(isinstance(logger, trt.Logger), "Builder(logger)")

        def create_network(self, flags):
            _need(isinstance(flags, int), "create_network takes int flags")
            if major >= 11:
                _need(flags == 0, "11.x: strongly typed is always on; no creation flags")
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            _need(network.inputs is not None, "build before parse")
            _need(len(config.profiles) == 1, "one optimization profile")
            prof = config.profiles[0].shapes
            _need(set(prof) == {n for n, _, _ in network.inputs}, "the profile must cover every input")
            for name, _, shape in network.inputs:
                for s in prof[name]:
                    _need(_is_shape(s, len(shape)) and all(d == -1 or d == e for d, e in zip(shape, s)), f"profile shape {s} for {shape}")
            _need(config.cache is not None, "build without a timing cache")
            config.cache.n += 1
            log["builds"].append({"flags": list(config.flags), "network_flags": network.flags, "float16": network.float16,
                                  "profile": prof, "pool": config.pool})
            if "STRIP_PLAN" in config.flags:
                _need("REFIT_IDENTICAL" in config.flags or "REFIT" in config.flags, "STRIP_PLAN needs a refit flag")
                model = onnx.load_from_string(network.onnx_bytes)
                for init in model.graph.initializer:  # the weights leave the plan: shapes stay, data goes
                    if int(np.prod(init.dims)) >= 16:
                        for field in ("raw_data", "float_data", "int64_data", "int32_data"):
                            init.ClearField(field)
                return STRIPPED + model.SerializeToString()
            return HEADER + network.onnx_bytes

    class Engine:
        def __init__(self, onnx_bytes, stripped=False):
            model = onnx.load_from_string(onnx_bytes)
            self.inputs, self.outputs = io_of(model)
            self.model, self.session = model, None
            # stripped: the initializers without data, filled by a refit
            self.missing = {i.name for i in model.graph.initializer if stripped and not _has_data(i)}
            if not self.missing:
                self._load()
            self.device_memory_size_v2 = 4096 + len(onnx_bytes) % 8192  # differs per engine
            self.num_io_tensors = len(self.inputs) + len(self.outputs)

        def _load(self):
            import onnxruntime as ort

            self.session = ort.InferenceSession(self.model.SerializeToString(), providers=["CPUExecutionProvider"])

        def _io(self):
            return self.inputs + self.outputs

        def get_tensor_name(self, k):
            return self._io()[k][0]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in [n for n, _, _ in self.inputs] else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return next(d for n, d, _ in self._io() if n == name)

        def create_execution_context(self, strategy=None):
            _need(strategy is trt.ExecutionContextAllocationStrategy.USER_MANAGED, "shared scratch needs USER_MANAGED contexts")
            _need(self.session is not None, "execution context of a weight-stripped engine before its refit")
            ctx = Context(self)
            log["contexts"].append(ctx)
            return ctx

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None

        def set_device_memory(self, memory, size):
            _need(isinstance(memory, int) and isinstance(size, int), "set_device_memory(int ptr, int size)")
            _need(size >= self.engine.device_memory_size_v2 and device.owns(memory, size), "scratch smaller than device_memory_size_v2")
            self.memory = (memory, size)

        def set_input_shape(self, name, shape):
            _need(name in [n for n, _, _ in self.engine.inputs], f"set_input_shape on non-input {name!r}")
            _need(_is_shape(tuple(shape), len(next(s for n, _, s in self.engine.inputs if n == name))), f"shape {shape!r}")
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, memory):
            _need(isinstance(memory, int), "set_tensor_address takes an int pointer")
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            _need(isinstance(stream_handle, int) and not isinstance(stream_handle, bool), "execute_async_v3 takes the stream as an int handle")
            _need(self.memory is not None, "execute without device memory (USER_MANAGED)")
            _need(set(self.shapes) == {n for n, _, _ in self.engine.inputs}, "execute before every input shape is set")
            _need(set(self.addresses) == {n for n, _, _ in self.engine._io()}, "execute before every tensor address is set")
            snapshot = (dict(self.shapes), dict(self.addresses))
            op = lambda: self._compute(*snapshot)  # noqa: E731
            if device.capturing is not None:
                device.capturing.append(op)
            else:
                op()
            return True

        def _compute(self, shapes, addresses):
            batch = next(iter(shapes.values()))[0]
            feeds = {}
            for name, dtype, _ in self.engine.inputs:
                np_dtype = np.int64 if dtype is trt.DataType.INT64 else np.float32
                n = int(np.prod(shapes[name]))
                _need(device.owns(addresses[name], n * np.dtype(np_dtype).itemsize), f"input {name} address is not device memory")
                feeds[name] = np.frombuffer((ctypes.c_byte * (n * np.dtype(np_dtype).itemsize)).from_address(addresses[name]), np_dtype).reshape(shapes[name]).copy()
            outs = self.engine.session.run(None, feeds)
            for (name, _, _), value in zip(self.engine.outputs, outs):
                _need(value.shape[0] == batch and device.owns(addresses[name], value.nbytes), f"output {name} buffer")
                ctypes.memmove(addresses[name], np.ascontiguousarray(value).ctypes.data, value.nbytes)

    class Runtime:
        def __init__(self, logger):
            _need(isinstance(logger, trt.Logger), "Runtime(logger)")

        def deserialize_cuda_engine(self, data):
            _need(isinstance(data, (bytes, bytearray, memoryview)), "deserialize_cuda_engine takes bytes")
            data = bytes(data)
            if data.startswith(STRIPPED):
                return Engine(data[len(STRIPPED):], stripped=True)
            return Engine(data[len(HEADER):]) if data.startswith(HEADER) else None

    class Refitter:
        def __init__(self, engine, logger):
            _need(isinstance(engine, Engine) and isinstance(logger, trt.Logger), "Refitter(engine, logger)")
            self.engine, self.pending = engine, {}
            log["refits"].append(self)

        def get_missing_weights(self):
            return sorted(self.engine.missing - set(self.pending))

        def refit_cuda_engine(self):
            if self.get_missing_weights():
                return False
            for init in self.engine.model.graph.initializer:
                if init.name in self.pending:
                    init.CopyFrom(self.pending[init.name])
            self.engine.missing = set()
            self.engine._load()
            return True

    class OnnxParserRefitter:
        def __init__(self, refitter, logger):
            _need(isinstance(refitter, Refitter) and isinstance(logger, trt.Logger), "OnnxParserRefitter(refitter, logger)")
            self.refitter, self.num_errors = refitter, 0

        def refit_from_file(self, path):
            _need(isinstance(path, str), "refit_from_file takes a str path")
            model = onnx.load(path)
            want = self.refitter.engine.model
            if [n.op_type for n in model.graph.node] != [n.op_type for n in want.graph.node]:
                self.num_errors = 1
                return False
            dims = {i.name: tuple(i.dims) for i in want.graph.initializer}
            for init in model.graph.initializer:
                if init.name in self.refitter.engine.missing and dims.get(init.name) == tuple(init.dims):
                    self.refitter.pending[init.name] = init
            return True

        def get_error(self, k):
            return "the ONNX graph differs from the engine's network"

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    trt.Refitter, trt.OnnxParserRefitter = Refitter, OnnxParserRefitter
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    """install(version, cc) puts the stand-ins in sys.modules; returns (device, log)."""

    def install(version="10.8.0", cc=(8, 9)):
        device = FakeDevice(cc)
        log = {"builds": [], "contexts": [], "refits": []}
        monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(version, device, log))
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", device.module)
        monkeypatch.setitem(sys.modules, "cuda.cudart", device.module)
        return device, log

    return install


@pytest.mark.parametrize("version, precision", [("10.8.0", "fp32"), ("10.8.0", "fp16"), ("11.4.0", "fp32"), ("11.4.0", "fp16")])
def test_tensorrt_api_usage_against_stand_in_module_not_a_real_run(fake_trt, model, engine_dir, version, precision):
    device, log = fake_trt(version)
    plan = make_plan(model)
    d = engine_dir  # holds an onnxruntime build of the plan
    report = build_engines(plan, d, backend="tensorrt", precision=precision, model=model, max_batch=4,
                           workspace_bytes=1 << 20, progress=False)
    assert [s["engine"] for s in report.steps] == ["built"] * 3
    # the float32 ONNX files are shared with the onnxruntime build; strongly typed fp16 needs float16 graphs
    strongly_typed_fp16 = version.startswith("11") and precision == "fp16"
    assert [s["onnx"] for s in report.steps] == ["exported" if strongly_typed_fp16 else "reused"] * 3
    m = Manifest.read(d)
    assert m["backend"] == "tensorrt" and m["versions"]["tensorrt"] == version and m["versions"]["compute_capability"] == "8.9"
    assert all(s["engine"]["file"].endswith(".plan") and (d / s["engine"]["file"]).is_file() for s in m["steps"])
    assert (d / "timing.cache").read_bytes() == b"FAKE-CACHE 3"  # one cache, extended by every step's build
    for b in log["builds"]:
        assert b["pool"] == 1 << 20 and b["network_flags"] == 0
        assert all(p[0][0] == 1 and p[1][0] == 4 and p[2][0] == 4 for p in b["profile"].values())
        # fp32 clears TF32 (on by default: it would round matmul inputs to 10 mantissa bits)
        no_tf32 = ["-TF32"] if precision == "fp32" else []
        if version.startswith("10"):  # weakly typed: the builder flag sets the precision, the ONNX stays float32
            assert b["flags"] == (["FP16"] if precision == "fp16" else no_tf32) and not b["float16"]
        else:  # strongly typed: no precision flags, the ONNX types carry it
            assert b["flags"] == no_tf32 and b["float16"] == (precision == "fp16")

    with Runtime.load(d, cuda_graph=False) as rt:
        assert rt.backend == "tensorrt"
        # one scratch buffer, as large as the largest engine needs, shared by every context
        memories = {c.memory for c in log["contexts"]}
        assert len(memories) == 1
        assert next(iter(memories))[1] == max(c.engine.device_memory_size_v2 for c in log["contexts"])
    assert not device.allocs  # closing the runtime frees every device buffer


def test_tensorrt_cuda_graphs_against_stand_in_module_not_a_real_run(fake_trt, model, engine_dir):
    device, log = fake_trt("10.8.0")
    plan = make_plan(model)
    build_engines(plan, engine_dir, backend="tensorrt", model=model, max_batch=4, progress=False)
    with Runtime.load(engine_dir, cuda_graph=True) as rt:
        first = rt.sample(3, seed=5)
        assert device.launches == 0  # the first call runs plainly and captures one graph per step
        second = rt.sample(3, seed=5)
        assert device.launches == plan.nfe  # the second replays them
        assert torch.equal(first, second)


def test_tensorrt_cache_and_versions_against_stand_in_module_not_a_real_run(fake_trt, model, engine_dir):
    plan = make_plan(model)
    fake_trt("10.8.0", cc=(8, 9))
    d = engine_dir
    build_engines(plan, d, backend="tensorrt", model=model, max_batch=2, progress=False)
    again = build_engines(plan, d, backend="tensorrt", model=model, max_batch=2, progress=False)
    assert [(s["onnx"], s["engine"]) for s in again.steps] == [("reused", "reused")] * 3
    # another GPU: the recorded engines are refused at load time, and rebuilt (not re-exported) by build
    fake_trt("10.8.0", cc=(9, 0))
    with pytest.raises(EngineError, match="GPU compute capability 8.9 but 9.0"):
        Runtime.load(d)
    rebuilt = build_engines(plan, d, backend="tensorrt", model=model, max_batch=2, progress=False)
    assert [(s["onnx"], s["engine"]) for s in rebuilt.steps] == [("reused", "built")] * 3
    # another TensorRT
    fake_trt("10.9.1", cc=(9, 0))
    with pytest.raises(EngineError, match="built with tensorrt 10.8.0 but 10.9.1"):
        Runtime.load(d)
    # an unreadable timing cache is replaced, with a warning
    (d / "timing.cache").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="timing cache"):
        build_engines(plan, d, backend="tensorrt", model=model, max_batch=2, progress=False)
    Runtime.load(d).close()


def test_tensorrt_too_old_or_without_gpu_against_stand_in_module_not_a_real_run(fake_trt, model, tmp_path, monkeypatch):
    plan = make_plan(model, "ddim")
    for old in ("8.6.1", "10.0.1"):  # 10.0 lacks device_memory_size_v2 / set_device_memory
        fake_trt(old)
        with pytest.raises(BackendUnavailableError, match=r"TensorRT 10\.1 or newer"):
            build_engines(plan, tmp_path / "e", backend="tensorrt", model=model, progress=False)
    device, _ = fake_trt("10.8.0")
    device.module.cudaGetDeviceCount = lambda: (100, 0)  # cudaErrorNoDevice
    with pytest.raises(BackendUnavailableError, match="NVIDIA GPU"):
        build_engines(plan, tmp_path / "e", backend="tensorrt", model=model, progress=False)
    device.module.cudaGetDeviceCount = lambda: (999, 0)  # cudaErrorUnknown: a broken driver is not "no GPU"
    with pytest.raises(EngineError, match="cudaGetDeviceCount failed"):
        build_engines(plan, tmp_path / "e", backend="tensorrt", model=model, progress=False)
    assert not (tmp_path / "e").exists()


def _record_cuda_calls(device: FakeDevice, names=("cudaMalloc", "cudaFree", "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaGraphLaunch")):
    """Log every call of ``names`` on the fake cuda-python module, in order: [(name, args)]."""
    calls = []
    for name in names:
        def logged(*args, _f=getattr(device.module, name), _name=name):
            calls.append((_name, args))
            return _f(*args)

        setattr(device.module, name, logged)
    return calls


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])
@pytest.mark.parametrize("cuda_graph", [False, True, "schedule"])
def test_mock_gpu_one_synchronize_per_request_against_stand_in_module_not_a_real_run(fake_trt, model, engine_dir, sampler, cuda_graph):
    """The device-resident walk on the fake cuda-python: call order only, and images equal to the per-step path's."""
    device, _ = fake_trt("10.8.0")
    plan = make_plan(model, sampler)
    build_engines(plan, engine_dir, backend="tensorrt", model=model, max_batch=4, progress=False)
    stochastic = sum(any(d["name"] == "noise" for d in s["inputs"]) for s in Manifest.read(engine_dir)["steps"])
    assert (stochastic > 0) == (sampler == "ddpm")
    with Runtime.load(engine_dir, cuda_graph=cuda_graph is True, device_resident=False) as per_step:
        assert per_step._device_walk is None
        want = [per_step.sample(3, seed=5, clip=False, return_labels=True) for _ in range(2)]
    calls = _record_cuda_calls(device)
    with Runtime.load(engine_dir, cuda_graph=cuda_graph) as rt:
        walk = rt._device_walk
        destinations = []
        for k in range(2):
            del calls[:]
            images, labels = rt.sample(3, seed=5, clip=False, return_labels=True)
            names = [name for name, _ in calls]
            # one wait per request, at its very end, after the one copy out
            assert names.count("cudaStreamSynchronize") == 1 and names[-1] == "cudaStreamSynchronize"
            copies = [args for name, args in calls if name == "cudaMemcpyAsync"]
            kinds = [args[3].name for args in copies]
            # x_T and the labels in, each stochastic step's noise in, the result out: nothing else crosses
            assert kinds == ["cudaMemcpyHostToDevice"] * (2 + stochastic) + ["cudaMemcpyDeviceToHost"]
            assert names[-2] == "cudaMemcpyAsync" and kinds[-1] == "cudaMemcpyDeviceToHost"
            destinations.append([args[0] for args in copies[:-1]])
            mallocs = names.count("cudaMalloc")
            # buffers: one per slot of the schedule (shared by every step), made by the first request only
            assert mallocs == (len(walk.slots) if k == 0 else 0) and "cudaFree" not in names
            assert len(walk.slots) < sum(len(e.input_names) + len(e.output_names) for e in rt.engines)
            if cuda_graph:  # captured, then replayed: one graph per step, or one for the whole schedule
                assert names.count("cudaGraphLaunch") == (0 if k == 0 else plan.nfe if cuda_graph is True else 1)
            assert torch.equal(images, want[k][0]) and torch.equal(labels, want[k][1])
        assert destinations[0] == destinations[1]
    assert not device.allocs  # closing the runtime frees the walk's buffers too


def test_weight_stripped_engines_are_refitted_from_their_onnx_against_stand_in_module_not_a_real_run(fake_trt, model, engine_dir, tmp_path):
    _, log = fake_trt("10.8.0")
    plan = make_plan(model)
    embedded = build_engines(plan, engine_dir, backend="tensorrt", model=model, max_batch=4, progress=False)
    assert embedded.manifest["weights"] == "embedded" and all("weights" not in s["engine"]["record"] for s in embedded.manifest["steps"])
    with Runtime.load(engine_dir):
        pass
    assert not log["refits"]
    stripped = build_engines(plan, engine_dir, backend="tensorrt", model=model, max_batch=4, progress=False, strip_weights=True)
    # part of the cache key: every engine is rebuilt (the ONNX files are reused), and the next build reuses them
    assert [(s["onnx"], s["engine"]) for s in stripped.steps] == [("reused", "built")] * plan.nfe
    assert all({"STRIP_PLAN", "REFIT_IDENTICAL"} <= set(b["flags"]) for b in log["builds"][-plan.nfe:])
    m = Manifest.read(engine_dir)
    assert m["weights"] == "stripped" and all(s["engine"]["record"]["weights"] == "stripped" for s in m["steps"])
    with Runtime.load(engine_dir):
        assert len(log["refits"]) == plan.nfe  # each stripped engine refitted from its step's ONNX file at load
    again = build_engines(plan, engine_dir, backend="tensorrt", model=model, max_batch=4, progress=False, strip_weights=True)
    assert [s["engine"] for s in again.steps] == ["reused"] * plan.nfe
    # the refit's source is checked like any file of the dir
    onnx_file = engine_dir / m["steps"][1]["onnx"]["file"]
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    with pytest.raises(EngineError, match=r"step 1 ONNX file .* corrupted"):
        Runtime.load(engine_dir)
    with pytest.raises(EngineError, match="strip_weights is for TensorRT engines"):
        build_engines(plan, tmp_path / "ort", model=model, progress=False, backend="onnxruntime", strip_weights=True)
