"""UniPC through the per-step contract: its x0 history in step I/O, exported steps vs torch, runtime vs sample()."""

from __future__ import annotations

import pytest
import torch
from conftest import core_plan

from autodiffusion_rt import sample
from autodiffusion_rt.runtime import Runtime
from export.build import build_engines
from export.subnet import step_modules

# Six steps from t = 999 (what users run; x0 clipping on, the default; then low noise, so the random-weight
# model's images are not all clamped): UniPC-3's predictor orders 1, 2, 3, 3, 2, 1
# and its corrector (steps 1-5) reach x0 1, 2, 3, 3 steps back, so every history input is exercised.
TIMESTEPS = [999, 400, 330, 260, 190, 120]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def model(engine_cond_model):
    return engine_cond_model


def plan_for(model, sampler="unipc3"):
    ids = sorted(model.unet.layer_ids)
    return core_plan(model, TIMESTEPS, sampler, skip=[[], ids[:3], [], [ids[-1]], ids[:2], []])


def test_step_io_carries_the_x0_history(model):
    mods = step_modules(model, plan_for(model))
    x0s = ("prev_x0", "prev_x0_2", "prev_x0_3")
    assert [m.input_names for m in mods] == [
        ("x", "y"), ("x", "y", *x0s[:1]), ("x", "y", *x0s[:2]), ("x", "y", *x0s), ("x", "y", *x0s), ("x", "y"),
    ]
    # Every step but the last two is read by a later one (the last step is x0 alone: it reads nothing).
    assert [m.output_names for m in mods] == [("x_prev", "x0")] * 4 + [("x_prev",)] * 2


@pytest.mark.parametrize("sampler", ["unipc", "unipc3"])
def test_torch_runtime_is_sample_exactly(model, sampler):
    """The runtime's x0 ring feeds each step the same history sample_loop keeps (bit-exact on torch)."""
    plan = plan_for(model, sampler)
    with Runtime.from_plan(plan, model=model) as rt:
        images = rt.sample(5, seed=3)
    want = sample(model, plan.timesteps, sampler, 5, 3, keep=plan.keep_sets(model))
    assert torch.equal(images, want)


def _assert_engines_equal_torch(d, plan, model):
    labels = [0, 1, 2, 1, 0, 2]
    with Runtime.load(d, threads=1) as rt, Runtime.from_plan(plan, model=model) as ref:
        raw_a = rt.sample(6, seed=7, labels=labels, clip=False)  # 6 > max_batch 4: two chunks
        raw_b = ref.sample(6, seed=7, labels=labels, clip=False)
        assert (raw_a - raw_b).abs().max() <= 1e-4 * max(1.0, raw_b.abs().max().item())
        assert (raw_a.clamp(-1, 1) - raw_b.clamp(-1, 1)).abs().max() <= 1e-3
        assert (raw_b.abs() < 1).float().mean() > 0.05  # not every pixel saturated


@pytest.mark.slow
def test_exported_onnx_steps_match_torch(model, tmp_path):
    """What would catch this: an x0 history input wired to the wrong step, a missing x0 output, the raw instead
    of the clipped x0 carried (from t = 999 the clip is active)."""
    plan = plan_for(model)
    build_engines(plan, tmp_path / "e", model=model, max_batch=4, progress=False, backend="onnxruntime")
    _assert_engines_equal_torch(tmp_path / "e", plan, model)


@pytest.mark.slow
def test_openvino_fp32_engines_match_torch(model, tmp_path):
    pytest.importorskip("openvino")
    plan = plan_for(model)
    build_engines(plan, tmp_path / "e", model=model, backend="openvino", precision="fp32", max_batch=4, progress=False)
    _assert_engines_equal_torch(tmp_path / "e", plan, model)
