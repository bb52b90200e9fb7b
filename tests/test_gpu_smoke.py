"""Every GPU path, checked the first time a CUDA device is there: ``python -m pytest -q tests/test_gpu_smoke.py``.

Skipped without CUDA (this file has never run on a GPU: written against the
real APIs, it is the checklist for the first machine that has one).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from autodiffusion_rt.plan import Plan  # noqa: E402
from autodiffusion_rt.runtime import Runtime  # noqa: E402
from conftest import core_random_model  # noqa: E402


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
    from autodiffusion_rt.runtime.engines import cuda_compute_capability, import_cudart, import_tensorrt

    cudart = import_cudart()
    assert import_tensorrt() is trt and cuda_compute_capability() is not None
    print("tensorrt", trt.__version__, "cuda-python", cudart, "cc", cuda_compute_capability(), "torch", torch.version.cuda)


def test_cuda_python_copy_and_graph_round_trip():
    import numpy as np

    from autodiffusion_rt.runtime.engines import cuda_check, import_cudart

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


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engines_with_and_without_cuda_graphs(model_and_plan, tmp_path, precision):
    _optional("tensorrt")
    from export.build import build_engines

    model, plan = model_and_plan
    d = tmp_path / "trt"
    build_engines(plan, d, backend="tensorrt", precision=precision, model=model, max_batch=10, progress=False)
    with Runtime.load(d, cuda_graph=False) as plain, Runtime.load(d, cuda_graph=True) as graphs, \
            Runtime.from_plan(plan, model=model) as ref:
        for n in (8, 2, 8, 2, 10):  # graphs per batch, replayed after other batch sizes
            a, b = plain.sample(n, seed=n, clip=False), graphs.sample(n, seed=n, clip=False)
            assert torch.equal(a, b)
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
    build_engines(plan, d, model=model, max_batch=8, progress=False)
    with Runtime.load(d, providers=[provider]) as rt, Runtime.from_plan(plan, model=model) as ref:
        assert all(e.providers[0] == name for e in rt.engines)
        a, b = rt.sample(4, seed=1, clip=False), ref.sample(4, seed=1, clip=False)
        assert (a - b).abs().max() <= 1e-3 * max(1.0, b.abs().max().item())


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
