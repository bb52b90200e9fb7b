"""plan.json: round trip, validation of every field, atomic save, model identity."""

from __future__ import annotations

import copy
import json

import pytest

from autodiffusion_rt.diffusion import NoiseSchedule
from autodiffusion_rt.errors import PlanError
from autodiffusion_rt.plan import Fitness, Plan


@pytest.fixture()
def plan(tiny_model):
    attn = next(layer.id for layer in tiny_model.layers if layer.kind == "attn")
    res = next(layer.id for layer in tiny_model.layers if layer.kind == "res")
    return Plan.for_model(
        tiny_model, [999, 600, 300, 50], sampler="dpmpp_2m", skip=[[attn], [], [attn, res], []],
        fitness=Fitness(fid=12.5, extractor="mnist", num_samples=1000, seed=0, reference="mnist:all"),
        provenance={"search": {"population": 50}},
    )


def test_plan_round_trips_through_json(tmp_path, plan):
    path = plan.save(tmp_path / "p.json")
    loaded = Plan.load(path)
    assert loaded == plan
    d = json.loads(path.read_text())
    assert d["version"] == 2
    assert d["sampler"]["clip_denoised"] is True and d["sampler"]["noise"] == "per-sample-v1"


def test_version_1_plans_load_with_clipping_on(tmp_path, plan):
    """Plans written before clip_denoised/noise were recorded keep their meaning (clipping was on)."""
    d = plan.to_dict()
    d["version"] = 1
    del d["sampler"]["clip_denoised"], d["sampler"]["noise"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(d))
    old = Plan.load(path)
    assert old.clip_denoised is True and old.timesteps == plan.timesteps
    unclipped = Plan.from_dict({**plan.to_dict(), "sampler": {**plan.to_dict()["sampler"], "clip_denoised": False}})
    schedule = NoiseSchedule.named("linear")
    assert unclipped.coefficients(schedule).clip_denoised is False
    assert old.coefficients(schedule).clip_denoised is True


def _counted_macs(model, keep) -> float:
    """MACs per sample of one forward over ``keep``, counted by torch's FLOP counter (not the registry)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    unet = model.unet
    x = torch.randn(2, unet.in_channels, unet.image_size, unet.image_size)
    # The math attention backend: the counter has no formula for the fused CPU kernel.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        unet(x, torch.tensor([5, 900]), None, keep=keep)
    return counter.get_total_flops() / 2 / 2


def test_plan_macs_are_what_its_subnetworks_compute(tiny_model, plan):
    """The plan's MACs equal torch's FLOP count of each step's subnetwork, summed over the steps.
    What would catch this: MACs summed over the kept layers instead of the skipped ones, a step's skip set
    applied to another step, or a registry entry that disagrees with what the layer computes."""
    keeps = plan.keep_sets(tiny_model)
    assert keeps[1] == tiny_model.unet.layer_ids and len(keeps[2]) == len(tiny_model.layers) - 2
    per_step = [_counted_macs(tiny_model, keep) for keep in keeps]
    assert plan.macs_per_sample == sum(per_step)
    assert plan.full_macs_per_sample == 4 * _counted_macs(tiny_model, None) > plan.macs_per_sample
    assert per_step[0] < per_step[1] and per_step[2] < per_step[0]  # the skipped steps cost less


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.update(format="something"), "format"),
        (lambda d: d.update(version=3), "version"),
        (lambda d: d["sampler"].update(clip_denoised="yes"), "sampler.clip_denoised"),
        (lambda d: d["sampler"].update(noise="one-generator"), "sampler.noise"),
        (lambda d: d["model"].pop("fingerprint"), "model.fingerprint"),
        (lambda d: d["sampler"].update(kind="euler"), "sampler.kind"),
        (lambda d: d["sampler"].update(eta=2.0), "sampler.eta"),
        (lambda d: d.update(timesteps=[999, 999, 3, 1]), "timesteps"),
        (lambda d: d.update(timesteps=[10, 20, 30, 40]), "timesteps"),
        (lambda d: d.update(timesteps=[999.0, 600, 300, 50]), "timesteps"),
        (lambda d: d.update(skip=[[]]), "skip"),
        (lambda d: d["skip"].__setitem__(0, [1, 2]), "skip"),
        (lambda d: d["compute"].update(macs_per_sample=-5), "compute.macs_per_sample"),
        (lambda d: d["fitness"].update(fid="low"), "fitness.fid"),
        (lambda d: d["fitness"].update(num_samples=0), "fitness.num_samples"),
        (lambda d: d.pop("sampler"), "sampler"),
    ],
)
def test_a_wrong_field_is_refused_by_name(plan, mutate, field):
    d = copy.deepcopy(plan.to_dict())
    mutate(d)
    with pytest.raises(PlanError, match=f"'{field}'"):
        Plan.from_dict(d)


def test_truncated_plan_file_is_refused_and_save_is_atomic(tmp_path, plan, monkeypatch):
    path = plan.save(tmp_path / "p.json")
    good = path.read_text()
    (tmp_path / "cut.json").write_text(good[: len(good) // 2])
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "cut.json")
    # A failure while writing leaves the old plan intact and no temporary file behind.
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        plan.save(path)
    assert path.read_text() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.json", "p.json"]


def test_plan_refuses_another_model(plan, tiny_cond_model):
    with pytest.raises(PlanError, match="weights"):
        plan.keep_sets(tiny_cond_model)
