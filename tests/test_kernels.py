"""kernels/: Triton kernels (under the interpreter) and the core's dispatch hooks.

No GPU runs anywhere in this file. The Triton tests (``test_interp_*``) need
``TRITON_INTERPRET=1`` before ``kernels.triton_kernels`` is imported, so
``test_triton_suite_runs_in_a_subprocess`` starts a child pytest on this file
with that environment; in the parent process they skip. Run them directly
with ``TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -k interp``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autodiffusion_rt import utils as utils_module
from autodiffusion_rt.diffusion import NoiseSchedule, StepCoefficients, compute_coefficients, step_update
from autodiffusion_rt.errors import SamplingError
from autodiffusion_rt.models import unet as unet_module
from kernels import dispatch
from kernels.reference import (
    step_update_float64,
    step_update_magnitude,
    timestep_embedding,
    timestep_embedding_float64,
)

REPO = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
interp_only = pytest.mark.skipif(
    not (HAVE_TRITON and IN_INTERPRETER),
    reason="Triton interpreter tests run in the child process of test_triton_suite_runs_in_a_subprocess",
)

# float32 evaluation of a sum of products: a few roundings of 2**-24, relative to sum |term|.
F32_REL = 4e-7
ULP_HALF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # half an ulp, relative
TINY = {torch.float32: 0.0, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}  # half the smallest subnormal


def _rows():
    """Real coefficient rows of every sampler, chosen to cover the optional terms."""
    linear = NoiseSchedule.named("linear")
    ts = [999, 700, 400, 100, 0]
    return {
        "ddim": compute_coefficients("ddim", linear, ts, clip_denoised=False).row(1),  # no prev_x0, no noise
        "ddim_eta": compute_coefficients("ddim", linear, ts, eta=0.5, clip_denoised=False).row(1),  # noise
        "ddpm_t999": compute_coefficients("ddpm", linear, ts, clip_denoised=False).row(0),  # noise; |coefficients| ~ 150
        "dpmpp_2m": compute_coefficients("dpmpp_2m", linear, ts, clip_denoised=False).row(2),  # prev_x0
        "all_terms": StepCoefficients(1.5, -0.5, 0.9, 0.1, -0.2, 0.3),
    }


ROWS = _rows()
SHAPES = {"1": (1,), "7": (7,), "1000": (1000,), "1025": (1025,), "5x3x28x28": (5, 3, 28, 28)}


def _operands(row, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, eps, prev, noise = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    return (
        x,
        eps,
        prev if row.c_prev_x0 != 0.0 else None,
        noise if row.c_noise != 0.0 else None,
    )


def _check_update(got, row, x, eps, prev, noise, ulps=1):
    """Max abs error of (x_prev, x0) against float64, asserting the float32-compute bound.

    ``ulps`` half-ulps of output rounding: 1 for round-to-nearest, 2 for truncation.
    """
    ref = step_update_float64(row, x, eps, prev, noise)
    mag = step_update_magnitude(row, x, eps, prev, noise)
    errs = []
    for out, r, s in zip(got, ref, mag):
        assert out.shape == x.shape
        err = (out.double() - r).abs()
        bound = ulps * ULP_HALF[out.dtype] * r.abs() + F32_REL * s + ulps * TINY[out.dtype]
        worst = int(torch.argmax(err - bound))
        assert bool((err <= bound).all()), f"error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"
        errs.append(float(err.max()))
    return errs


# --- Triton kernels, under the interpreter (child process) -------------------

@interp_only
@pytest.mark.parametrize("sampler, i", [("ddim", 0), ("ddim", 3), ("ddpm", 0), ("dpmpp_2m", 2)])
def test_interp_fused_step_update_with_x0_clip_equals_step_update(ops, sampler, i):
    """The clip (clip_denoised, on by default) inside the kernel equals step_update's.

    Reference: step_update itself evaluated in float64 (pure torch arithmetic). Inputs are
    scaled so that many x0 fall outside [-1, 1]. What would catch this: a kernel without the
    clamp (x0 outside [-1, 1]), or one that clamps x0 but keeps the model's eps for x_prev.
    """
    row = compute_coefficients(sampler, NoiseSchedule.named("linear"), [999, 700, 400, 100, 0]).row(i)
    assert row.clip_x0
    x, eps, prev, noise = _operands(row, (3, 1, 28, 28), torch.float32, seed=i)
    eps = eps * 3
    got_prev, got_x0 = ops.fused_step_update(row, x, eps, prev, noise)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    want_prev, want_x0 = step_update(row, x.double(), eps.double(), d(prev), d(noise))
    assert bool((got_x0.abs() <= 1).all()) and float((want_x0.abs() == 1).double().mean()) > 0.05
    mag = (abs(row.c_x) * x.abs().double() + abs(row.c_eps) * (abs(row.x0_from_x) * x.abs().double() + 1) / abs(row.x0_from_eps)
           + (abs(row.c_prev_x0) * prev.abs().double() if prev is not None else 0) + (abs(row.c_noise) * noise.abs().double() if noise is not None else 0))
    assert bool(((got_x0.double() - want_x0).abs() <= 1e-6 * (1 + abs(row.x0_from_x) * x.abs().double())).all())
    assert bool(((got_prev.double() - want_prev).abs() <= 4 * F32_REL * mag + 1e-7).all())
    # and the dispatch hook now offers the kernel for clipped rows (the default sampler setting)
    from kernels.dispatch import fast_step_update

    assert fast_step_update(row, x, eps, prev, noise) is ops.fused_step_update



@pytest.fixture(scope="module")
def ops():
    from kernels import triton_kernels

    assert triton_kernels.INTERPRETED, "kernels.triton_kernels was imported before TRITON_INTERPRET=1 was set"
    return triton_kernels


@interp_only
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("name", list(ROWS))
def test_interp_fused_step_update_float32_matches_float64_reference(ops, name, shape):
    row = ROWS[name]
    x, eps, prev, noise = _operands(row, shape, torch.float32)
    got = ops.fused_step_update(row, x, eps, prev, noise)
    assert all(t.dtype == torch.float32 for t in got)
    err_prev, err_x0 = _check_update(got, row, x, eps, prev, noise)
    print(f"fp32 {name} {shape}: max abs err x_prev {err_prev:.2e} x0 {err_x0:.2e}")
    # And against the float32 torch path itself (what it replaces on the GPU).
    for out, want, s in zip(got, step_update(row, x, eps, prev, noise), step_update_magnitude(row, x, eps, prev, noise)):
        assert bool(((out.double() - want.double()).abs() <= 2 * F32_REL * s).all())


@interp_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1000,), (5, 3, 28, 28)], ids=["1000", "5x3x28x28"])
@pytest.mark.parametrize("name", list(ROWS))
def test_interp_fused_step_update_half_precision(ops, name, shape, dtype):
    row = ROWS[name]
    x, eps, prev, noise = _operands(row, shape, dtype)
    got = ops.fused_step_update(row, x, eps, prev, noise)
    assert all(t.dtype == dtype for t in got)
    # Triton 3.8's interpreter truncates float32 -> bfloat16 (GPUs round to nearest even):
    # allow a whole ulp there, and skip the comparison with eager torch, which rounds.
    truncating = dtype == torch.bfloat16 and ops.INTERPRETED
    errs = _check_update(got, row, x, eps, prev, noise, ulps=2 if truncating else 1)
    # One rounding per output (fp32 compute) is never worse than eager torch's rounding per op.
    eager = [(t.double() - r).abs().max() for t, r in zip(step_update(row, x, eps, prev, noise),
                                                          step_update_float64(row, x, eps, prev, noise))]
    if not truncating:
        assert errs[0] <= eager[0] and errs[1] <= eager[1]
    print(f"{dtype} {name} {shape}: max abs err {errs} (eager torch {[float(e) for e in eager]})")


@interp_only
def test_interp_fused_step_update_masks_the_tail(ops):
    # Direct launch on outputs with room past n: nothing beyond n may be written.
    n, block = 1000 + 37, ops.UPDATE_BLOCK
    x, eps = torch.randn(n), torch.randn(n)
    x_prev = torch.full((2 * block,), 7.0)
    x0 = torch.full((2 * block,), 7.0)
    ops._fused_step_update_kernel[(2,)](
        x, eps, x, x, x_prev, x0, n, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0,
        HAS_PREV_X0=False, HAS_NOISE=False, CLIP_X0=False, BLOCK=block,
    )
    assert torch.equal(x0[:n], 2.0 * x + 3.0 * eps) and torch.equal(x_prev[:n], 4.0 * x + 5.0 * eps)
    assert bool((x0[n:] == 7.0).all()) and bool((x_prev[n:] == 7.0).all())


@interp_only
def test_interp_fused_step_update_contract(ops):
    row = ROWS["all_terms"]
    x, eps, prev, noise = _operands(row, (3, 5), torch.float32)
    # Coefficient 0: the tensor is not read (NaN must not leak), as in step_update.
    no_prev = row._replace(c_prev_x0=0.0)
    got = ops.fused_step_update(no_prev, x, eps, torch.full_like(x, float("nan")), noise)
    assert not torch.isnan(got[0]).any()
    _check_update(got, no_prev, x, eps, None, noise)
    with pytest.raises(SamplingError, match="prev_x0"):
        ops.fused_step_update(row, x, eps, None, noise)
    with pytest.raises(SamplingError, match="noise"):
        ops.fused_step_update(row, x, eps, prev, None)
    with pytest.raises(ValueError, match="broadcast"):
        ops.fused_step_update(row, x, eps[:1], prev, noise)
    with pytest.raises(ValueError, match="contiguous"):
        ops.fused_step_update(row, x.t().contiguous().t(), eps, prev, noise)
    # Mixed dtypes: outputs promote like torch (x0 from x, eps; x_prev from all four).
    got = ops.fused_step_update(row, x.half(), eps.half(), prev, noise.half())
    want = step_update(row, x.half(), eps.half(), prev, noise.half())
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32, torch.float16]
    # Empty input: no launch, right shapes.
    e = torch.empty(0, 4)
    assert [t.shape for t in ops.fused_step_update(row, e, e, e, e)] == [e.shape, e.shape]


@interp_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf/NaN patterns, as intended
@pytest.mark.parametrize("dtype", [torch.float16])  # bfloat16: the interpreter truncates (see above)
def test_interp_update_rounds_like_torch_on_every_16bit_pattern(ops, dtype):
    # Every bit pattern (subnormals, inf, NaN), scaled so results round, overflow and underflow.
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    neg_zero = torch.full_like(x, -0.0)  # b * eps = -0.0 leaves a * x unchanged, signed zeros too
    for a in (1.0, 0.1, 3.0, 1e-3):
        row = StepCoefficients(a, 0.0, a, 0.0, 0.0, 0.0)
        x_prev, x0 = ops.fused_step_update(row, x, neg_zero)
        want = (x.float() * torch.tensor(a, dtype=torch.float32)).to(dtype)
        for got in (x_prev, x0):
            assert torch.equal(got.view(torch.int16)[~want.isnan()], want.view(torch.int16)[~want.isnan()])
            assert torch.equal(got.isnan(), want.isnan())


T_VALUES = {
    "float32": torch.tensor([0.0, 1.0, 0.5, 17.25, 123.456, 999.0, 4000.75]),
    "int64": torch.tensor([0, 1, 250, 999]),
    "float64": torch.tensor([0.1, 3.3, 999.9], dtype=torch.float64),
}


def _check_embedding(out, t, dim, max_period):
    ref = timestep_embedding_float64(t, dim, max_period)
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(float(max_period), dtype=torch.float64))
                      * torch.arange(half, dtype=torch.float64) / half)
    args = (t.double()[:, None] * freqs[None]).abs()
    # float32 args carry ~2e-6 relative error (exp of a rounded exponent, then t * freq).
    bound = 1e-6 + 3e-6 * torch.cat([args, args, torch.zeros(len(t), dim - 2 * half, dtype=torch.float64)], 1)
    assert out.shape == (len(t), dim) and out.dtype == torch.float32
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err {float(err.max()):.3g}"
    if dim % 2:
        assert bool((out[:, -1] == 0).all())
    return float(err.max()) if err.numel() else 0.0


@interp_only
@pytest.mark.parametrize("max_period", [10000.0, 100.0])
@pytest.mark.parametrize("dim", [32, 33, 128, 2, 1, 0])
@pytest.mark.parametrize("tname", list(T_VALUES))
def test_interp_timestep_embedding_matches_float64_reference(ops, tname, dim, max_period):
    t = T_VALUES[tname]
    got = ops.timestep_embedding(t, dim, max_period)
    err = _check_embedding(got, t, dim, max_period)
    # The torch version meets the same bound (so it is fair), except at dim=1 where it
    # returns (N, 0): its pad is zeros_like(emb[:, :1]) of an empty emb. The hook leaves
    # dim < 2 to torch, so both paths always agree in shape.
    torch_err = _check_embedding(timestep_embedding(t, dim, max_period), t, dim, max_period) if dim != 1 else 0.0
    print(f"embedding t={tname} dim={dim} P={max_period}: max abs err {err:.2e} (torch fp32 {torch_err:.2e})")


@interp_only
def test_interp_timestep_embedding_writes_only_its_rows(ops):
    t, dim = torch.tensor([3.0, 500.5]), 33
    out = torch.full((len(t) * dim + 64,), float("nan"))  # NaN: an unwritten pad column would show
    ops._timestep_embedding_kernel[(len(t), 1)](t, out, dim, dim // 2, -9.210340371976184, BLOCK=16, ODD_DIM=True)
    torch.testing.assert_close(out[: len(t) * dim].view(len(t), dim), timestep_embedding(t, dim), rtol=0, atol=1e-5)
    assert bool(out[len(t) * dim:].isnan().all())


@interp_only
def test_interp_hooks_offer_triton_for_cpu_tensors_only_under_the_interpreter(ops, monkeypatch):
    row = ROWS["all_terms"]
    x, eps, prev, noise = _operands(row, (4, 4), torch.float32)
    assert dispatch.fast_step_update(row, x, eps, prev, noise) is ops.fused_step_update
    t = torch.tensor([1.0, 2.0])
    assert dispatch.fast_timestep_embedding(t, 8) is ops.timestep_embedding
    # Declined: the torch code must run (and validate) instead.
    assert dispatch.fast_step_update(row, x, eps, None, noise) is None  # missing prev_x0
    assert dispatch.fast_step_update(row, x, eps[:1], prev, noise) is None  # broadcasting
    assert dispatch.fast_step_update(row, x.double(), eps.double(), prev.double(), noise.double()) is None
    assert dispatch.fast_step_update(row, x.t(), eps, prev, noise) is None  # non-contiguous
    assert dispatch.fast_step_update(row, x.requires_grad_(), eps, prev, noise) is None  # autograd
    with torch.no_grad():
        assert dispatch.fast_step_update(row, x, eps, prev, noise) is ops.fused_step_update
    assert dispatch.fast_timestep_embedding(t[:, None], 8) is None
    assert dispatch.fast_timestep_embedding(t, 1) is None  # torch's own (N, 0) quirk stays torch's
    monkeypatch.setenv("AUTODIFFUSION_RT_KERNELS", "0")
    assert dispatch.fast_step_update(row, eps, eps, prev, noise) is None
    assert dispatch.fast_timestep_embedding(t, 8) is None


@pytest.mark.slow
def test_triton_suite_runs_in_a_subprocess():
    """Runs the test_interp_* tests above in a child with TRITON_INTERPRET=1 (CPU tensors, no GPU)."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    if IN_INTERPRETER:
        pytest.skip("already under the interpreter: the test_interp_* tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp", str(Path(__file__))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 80 and "skipped" not in summary, tail


# --- the core's hooks: which path runs (no GPU: fake devices and fake kernels) -----


class _FakeCudaTensor(torch.Tensor):
    """A CPU tensor that claims to be on CUDA, so the core's CUDA branch runs without a GPU."""

    @property
    def is_cuda(self):
        return True


class _RecordingKernels:
    """Stands in for the kernels package: records hook calls, offers a marker implementation."""

    def __init__(self, offer=True):
        self.calls, self.offer = [], offer

    def _hook(self, name):
        def hook(*args):
            self.calls.append((name, args))
            return (lambda *a: ("kernel", name, a)) if self.offer else None

        return hook

    @property
    def fast_step_update(self):
        return self._hook("fast_step_update")

    @property
    def fast_timestep_embedding(self):
        return self._hook("fast_timestep_embedding")


@pytest.fixture
def fake_kernels(monkeypatch):
    fake = _RecordingKernels()
    monkeypatch.delenv("AUTODIFFUSION_RT_KERNELS", raising=False)
    monkeypatch.setattr(utils_module, "_kernels_package", lambda: fake)
    return fake


def test_cpu_tensors_never_reach_the_kernel_hooks(fake_kernels):
    row = ROWS["all_terms"]
    x, eps, prev, noise = _operands(row, (2, 3), torch.float32)
    x_prev, x0 = step_update(row, x, eps, prev, noise)
    assert torch.equal(x0, row.x0_from_x * x + row.x0_from_eps * eps)
    t = torch.tensor([5.0, 7.5])
    assert unet_module.timestep_embedding(t, 16).shape == (2, 16)
    assert fake_kernels.calls == []


def test_fake_cuda_tensors_go_through_the_hooks_no_gpu(fake_kernels):
    row = ROWS["all_terms"]
    x, eps, prev, noise = _operands(row, (2, 3), torch.float32)
    xc = x.as_subclass(_FakeCudaTensor)
    assert step_update(row, xc, eps, prev, noise) == ("kernel", "fast_step_update", (row, xc, eps, prev, noise))
    tc = torch.tensor([5.0]).as_subclass(_FakeCudaTensor)
    assert unet_module.timestep_embedding(tc, 16, 100.0) == ("kernel", "fast_timestep_embedding", (tc, 16, 100.0))
    assert [name for name, _ in fake_kernels.calls] == ["fast_step_update", "fast_timestep_embedding"]


def test_fake_cuda_tensors_take_the_torch_path_when_the_hook_declines_no_gpu(fake_kernels):
    fake_kernels.offer = False
    row = ROWS["all_terms"]
    x, eps, prev, noise = _operands(row, (2, 3), torch.float32)
    x_prev, _ = step_update(row, x.as_subclass(_FakeCudaTensor), eps, prev, noise)
    torch.testing.assert_close(x_prev.as_subclass(torch.Tensor), step_update(row, x, eps, prev, noise)[0])
    assert len(fake_kernels.calls) == 1


def test_env_var_forces_the_torch_path_no_gpu(fake_kernels, monkeypatch):
    monkeypatch.setenv("AUTODIFFUSION_RT_KERNELS", "0")
    row = ROWS["all_terms"]
    x, eps, prev, noise = _operands(row, (2, 3), torch.float32)
    x_prev, _ = step_update(row, x.as_subclass(_FakeCudaTensor), eps, prev, noise)
    assert isinstance(x_prev, torch.Tensor)
    assert unet_module.timestep_embedding(torch.tensor([5.0]).as_subclass(_FakeCudaTensor), 16).shape == (1, 16)
    assert fake_kernels.calls == []


def test_missing_kernels_package_means_torch_path_no_gpu(monkeypatch):
    monkeypatch.setattr(utils_module, "_kernels_package", lambda: None)
    row = ROWS["all_terms"]
    x, eps, prev, noise = _operands(row, (2, 3), torch.float32)
    x_prev, _ = step_update(row, x.as_subclass(_FakeCudaTensor), eps, prev, noise)
    torch.testing.assert_close(x_prev.as_subclass(torch.Tensor), step_update(row, x, eps, prev, noise)[0])


def test_real_hooks_decline_plain_cpu_tensors():
    if IN_INTERPRETER:
        pytest.skip("under the interpreter the hooks accept CPU tensors (test_interp_hooks_...)")
    row = ROWS["all_terms"]
    x, eps, prev, noise = _operands(row, (2, 3), torch.float32)
    ops = dispatch.load_triton_kernels()
    assert ops is None or not ops.INTERPRETED
    assert dispatch.fast_step_update(row, x, eps, prev, noise) is None
    assert dispatch.fast_timestep_embedding(torch.tensor([1.0]), 8) is None
    # Tensor subclasses (fakes, tracers) are never handed to a kernel either.
    assert dispatch.fast_step_update(row, x.as_subclass(_FakeCudaTensor), eps, prev, noise) is None
