"""Every GPU path, checked the first time a CUDA device is there: ``python -m pytest -q tests/test_gpu_smoke.py``.

Skipped without CUDA (this file has never run on a GPU: written against the
real APIs, it is the checklist for the first machine that has one).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from conftest import core_random_model  # noqa: E402

from autodiffusion_rt.plan import Plan  # noqa: E402
from autodiffusion_rt.runtime import Runtime  # noqa: E402


def _optional(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} is not installed")


@pytest.fixture(scope="module")
def model_and_plan():
    model = core_random_model(seed=3, scale=0.05)
    return model, Plan.for_model(model, [999, 749, 499, 249], spec="test:gpu")


def test_versions():
    trt, cudart = _optional("tensorrt"), None
    from autodiffusion_rt.runtime.backends.trt_backend import import_tensorrt
    from autodiffusion_rt.runtime.platform import cuda_compute_capability, import_cudart

    cudart = import_cudart()
    assert import_tensorrt() is trt and cuda_compute_capability() is not None
    print("tensorrt", trt.__version__, "cuda-python", cudart, "cc", cuda_compute_capability(), "torch", torch.version.cuda)


def test_cuda_python_copy_and_graph_round_trip():
    import numpy as np

    from autodiffusion_rt.runtime.platform import cuda_check, import_cudart

    cu = import_cudart()
    stream = cuda_check(cu, cu.cudaStreamCreate(), "cudaStreamCreate")
    a = np.arange(1024, dtype=np.float32)
    b = np.zeros_like(a)
    ptr = cuda_check(cu, cu.cudaMalloc(a.nbytes), "cudaMalloc")
    cuda_check(cu, cu.cudaStreamBeginCapture(stream, cu.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal), "begin")
    cuda_check(cu, cu.cudaMemsetAsync(ptr, 0, a.nbytes, stream), "cudaMemsetAsync")
    graph = cuda_check(cu, cu.cudaStreamEndCapture(stream), "end")
    exec_ = cuda_check(cu, cu.cudaGraphInstantiate(graph, 0), "instantiate")
    cuda_check(cu, cu.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, cu.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "h2d")
    cuda_check(cu, cu.cudaMemcpyAsync(b.ctypes.data, ptr, a.nbytes, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "d2h")
    cuda_check(cu, cu.cudaStreamSynchronize(stream), "sync")
    assert np.array_equal(a, b)
    cuda_check(cu, cu.cudaGraphLaunch(exec_, stream), "launch")  # the graph zeroes the buffer
    cuda_check(cu, cu.cudaMemcpyAsync(b.ctypes.data, ptr, a.nbytes, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "d2h")
    cuda_check(cu, cu.cudaStreamSynchronize(stream), "sync")
    assert not b.any()
    cu.cudaGraphExecDestroy(exec_), cu.cudaGraphDestroy(graph), cu.cudaFree(ptr), cu.cudaStreamDestroy(stream)


@pytest.mark.parametrize("precision, sampler", [("fp32", "ddim"), ("fp16", "ddim"), ("fp32", "ddpm")])
def test_tensorrt_engines_with_and_without_cuda_graphs(model_and_plan, tmp_path, precision, sampler):
    _optional("tensorrt")
    from export.build import build_engines

    model, plan = model_and_plan
    if sampler != plan.sampler:  # ddpm: every step but the last takes noise, copied in during the request
        plan = Plan.for_model(model, list(plan.timesteps), sampler=sampler, spec="test:gpu")
    d = tmp_path / "trt"
    build_engines(plan, d, backend="tensorrt", precision=precision, model=model, max_batch=10, progress=False)
    with Runtime.load(d, cuda_graph=False) as plain, Runtime.load(d, cuda_graph=True) as graphs, \
            Runtime.load(d, cuda_graph=False, device_resident=False) as per_step, \
            Runtime.load(d, cuda_graph=True, device_resident=False) as per_step_graphs, \
            Runtime.load(d, cuda_graph="schedule") as schedule_graphs, \
            Runtime.from_plan(plan, model=model) as ref:
        assert plain._device_walk is not None and per_step._device_walk is None  # device-resident is the default
        for n in (8, 2, 8, 2, 10):  # graphs per batch, replayed after other batch sizes
            a, b = plain.sample(n, seed=n, clip=False), graphs.sample(n, seed=n, clip=False)
            assert torch.equal(a, b)
            # the device-resident walk (one synchronize per request) == a host round trip per step, same engines
            assert torch.equal(a, per_step.sample(n, seed=n, clip=False))
            assert torch.equal(a, per_step_graphs.sample(n, seed=n, clip=False))
            # one graph for the whole schedule per batch size, replayed after other batch sizes' graphs
            assert torch.equal(a, schedule_graphs.sample(n, seed=n, clip=False))
            want = ref.sample(n, seed=n, clip=False)
            tol = 1e-3 if precision == "fp32" else 5e-2
            assert (a - want).abs().max() <= tol * max(1.0, want.abs().max().item())
    again = build_engines(plan, d, backend="tensorrt", precision=precision, model=model, max_batch=10, progress=False)
    assert [s["engine"] for s in again.steps] == ["reused"] * plan.nfe


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_onnxruntime_gpu_providers_are_the_ones_used(model_and_plan, tmp_path, provider):
    ort = _optional("onnxruntime")
    name = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    if name not in ort.get_available_providers():
        pytest.skip(f"{name} is not available (onnxruntime-gpu)")
    from export.build import build_engines

    model, plan = model_and_plan
    d = tmp_path / "ort"
    build_engines(plan, d, model=model, max_batch=8, progress=False, backend="onnxruntime")
    with Runtime.load(d, providers=[provider]) as rt, Runtime.load(d, providers=[provider], device_resident=False) as per_step, \
            Runtime.from_plan(plan, model=model) as ref:
        assert all(e.providers[0] == name for e in rt.engines)
        # on a GPU provider the state stays in CUDA OrtValues bound through IOBinding
        assert rt._device_walk is not None and rt._device_walk.memory.device == "cuda" and per_step._device_walk is None
        for n in (4, 7, 4):
            a, b = rt.sample(n, seed=1, clip=False), ref.sample(n, seed=1, clip=False)
            assert (a - b).abs().max() <= 1e-3 * max(1.0, b.abs().max().item())
            c = per_step.sample(n, seed=1, clip=False)  # other sessions: cuDNN may pick other kernels
            assert (a - c).abs().max() <= 1e-5 * max(1.0, c.abs().max().item())


def test_weight_stripped_tensorrt_engines_equal_the_embedded_ones(model_and_plan, tmp_path):
    _optional("tensorrt")
    from export.build import build_engines

    model, plan = model_and_plan
    d = tmp_path / "trt"
    embedded = build_engines(plan, d, backend="tensorrt", model=model, max_batch=8, progress=False)
    with Runtime.load(d) as rt:
        want = rt.sample(6, seed=3, clip=False)
    stripped = build_engines(plan, d, backend="tensorrt", model=model, max_batch=8, progress=False, strip_weights=True)
    for a, b in zip(embedded.manifest["steps"], stripped.manifest["steps"]):
        print("engine bytes embedded", a["engine"]["bytes"], "stripped", b["engine"]["bytes"])
        assert b["engine"]["bytes"] < a["engine"]["bytes"]
    with Runtime.load(d) as rt:  # refitted from the ONNX files with REFIT_IDENTICAL: the same engines
        got = rt.sample(6, seed=3, clip=False)
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


def test_torch_on_cuda_equals_cpu(model_and_plan):
    from autodiffusion_rt import sample

    model, plan = model_and_plan
    with Runtime.from_plan(plan, model=model) as rt:
        want_rt = rt.sample(5, seed=7, clip=False)
    want = {s: sample(model, plan.timesteps, s, 5, 7) for s in ("ddpm", "dpmpp_2m")}
    model.unet.cuda()
    try:
        # stochastic (noise drawn on the CPU generators, moved) and multistep
        got = {s: sample(model, plan.timesteps, s, 5, 7, device="cuda") for s in want}
        with Runtime.from_plan(plan, model=model, device="cuda") as rt:
            got_rt = rt.sample(5, seed=7, clip=False)
    finally:
        model.unet.cpu()
    for s in want:
        assert got[s].is_cuda and (got[s].cpu() - want[s]).abs().max() <= 1e-3
    assert (got_rt - want_rt).abs().max() <= 1e-3 * max(1.0, want_rt.abs().max().item())


def test_triton_update_with_clip_on_cuda_equals_step_update():
    _optional("triton")
    from autodiffusion_rt.diffusion import NoiseSchedule, compute_coefficients, step_update
    from kernels import triton_kernels

    row = compute_coefficients("ddim", NoiseSchedule.named("linear"), [999, 500, 0], eta=0.5).row(0)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(4, 3, 64, 64, generator=g) for _ in range(3))
    got = triton_kernels.fused_step_update(row, x.cuda(), (3 * eps).cuda(), None, noise.cuda())
    want = step_update(row, x.double(), 3 * eps.double(), None, noise.double())
    for a, b in zip(got, want):
        assert (a.cpu().double() - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())


def test_device_path_on_torch(model_and_plan):
    from autodiffusion_rt import sample

    model, plan = model_and_plan
    a = sample(model, plan.timesteps, "ddim", 4, 0)
    model.unet.cuda()
    try:
        with torch.no_grad():
            x = torch.randn(2, *model.image_shape, device="cuda")
            eps = model.eps(x, torch.full((2,), 999, device="cuda"))
        assert eps.is_cuda and eps.shape == x.shape
    finally:
        model.unet.cpu()
    assert a.shape == (4, *model.image_shape)
