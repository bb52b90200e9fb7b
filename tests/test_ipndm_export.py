"""iPNDM through the per-step contract: its eps history in step I/O, exported steps vs torch, runtime vs sample()."""

from __future__ import annotations

import pytest
import torch
from conftest import core_plan

from autodiffusion_rt import sample
from autodiffusion_rt.runtime import Runtime
from export.build import build_engines
from export.subnet import step_modules

# Five steps: orders 1, 2, 3, 4, 4, so every history input (1, 2 and 3 steps back) is exercised.
TIMESTEPS = [400, 300, 220, 150, 80]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def model(engine_uncond_model):
    return engine_uncond_model


def plan_for(model, skip=None):
    return core_plan(model, TIMESTEPS, "ipndm", skip=skip)


def test_step_io_carries_the_eps_history(model):
    mods = step_modules(model, plan_for(model))
    assert [m.input_names for m in mods] == [
        ("x",), ("x", "prev_eps1"), ("x", "prev_eps1", "prev_eps2"),
        ("x", "prev_eps1", "prev_eps2", "prev_eps3"), ("x", "prev_eps1", "prev_eps2", "prev_eps3"),
    ]
    # Every step but the last is read by a later one; the last step's eps is read by nobody.
    assert [m.output_names for m in mods] == [("x_prev", "eps")] * 4 + [("x_prev",)]


def test_torch_runtime_is_sample_exactly(model):
    """The runtime's eps ring feeds each step the same history sample_loop keeps (bit-exact on torch)."""
    ids = sorted(model.unet.layer_ids)
    plan = plan_for(model, skip=[[], ids[:3], [], [ids[-1]], []])
    with Runtime.from_plan(plan, model=model) as rt:
        images = rt.sample(5, seed=3)
    want = sample(model, plan.timesteps, "ipndm", 5, 3, keep=plan.keep_sets(model))
    assert torch.equal(images, want)


@pytest.mark.slow  # exports every step; test_export covers export quickly
def test_exported_onnx_steps_match_torch(model, tmp_path):
    """What would catch this: a history input wired to the wrong step, a missing eps output,
    an eps output that is the raw instead of the clip-consistent eps (differs where x0 is clipped)."""
    plan = plan_for(model)
    build_engines(plan, tmp_path / "e", model=model, max_batch=4, progress=False, backend="onnxruntime")
    with Runtime.load(tmp_path / "e", threads=1) as rt, Runtime.from_plan(plan, model=model) as ref:
        a, b = rt.sample(6, seed=7), ref.sample(6, seed=7)  # 6 > max_batch: two chunks
        assert (a - b).abs().max() <= 1e-3
        assert (b.abs() < 1).float().mean() > 0.3
        raw_a, raw_b = rt.sample(6, seed=7, clip=False), ref.sample(6, seed=7, clip=False)
        assert (raw_a - raw_b).abs().max() <= 1e-4 * max(1.0, raw_b.abs().max().item())
