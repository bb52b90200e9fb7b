"""The diffusers adapter on a real (small, random) UNet2DModel saved with save_pretrained; references are diffusers' own code."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from conftest import search_build_tiny_extractor  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from autodiffusion_rt import load_model  # noqa: E402
from autodiffusion_rt.diffusion import compute_coefficients, sample_loop, step_update  # noqa: E402
from autodiffusion_rt.errors import Error, ModelSpecError  # noqa: E402
from autodiffusion_rt.plan import Plan  # noqa: E402
from autodiffusion_rt.sampling import initial_state, make_eps_fn, sample  # noqa: E402

# google/ddpm-cifar10-32's block layout (DownBlock2D, AttnDownBlock2D, DownBlock2D, DownBlock2D / mirrored up), small channels.
CIFAR_LAYOUT = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=8,
)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def save(directory, prediction_type="epsilon", hub=True, **overrides):
    torch.manual_seed(0)
    unet = UNet2DModel(**{**CIFAR_LAYOUT, **overrides})
    with torch.no_grad():  # diffusers zero-inits nothing here, but keep outputs small and every weight random
        for p in unet.parameters():
            p.mul_(0.5)
    sched = DDPMScheduler(**SCHEDULER, prediction_type=prediction_type)
    if hub:
        unet.save_pretrained(directory / "unet")
        sched.save_pretrained(directory / "scheduler")
    else:
        unet.save_pretrained(directory)
        sched.save_pretrained(directory)
    return unet.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddpm_cifar_layout")
    unet = save(d)
    return d, unet, load_model(f"diffusers:{d}")


def test_hub_and_top_level_layouts_load_and_keeping_every_layer_equals_diffusers_forward(saved, tmp_path):
    d, unet, model = saved
    top = load_model(f"diffusers:{save(tmp_path / 'top', hub=False) and tmp_path / 'top'}")
    assert top.fingerprint == model.fingerprint
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 500, 3])
    with torch.no_grad():
        want = unet(x, t).sample
        got = model.unet(x, t)
        got_top = top.unet(x, t, keep=model.unet.layer_ids)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_top, want, atol=1e-5)
    assert model.image_shape == (3, 16, 16) and model.num_classes is None and model.num_timesteps == 1000
    # the schedule is the one diffusers' scheduler uses
    acp = DDPMScheduler(**SCHEDULER).alphas_cumprod.double().numpy()
    assert np.allclose(model.schedule.alphas_cumprod, acp, rtol=1e-6)


class _ShortcutOnly(torch.nn.Module):
    """Hand-built skipped resnet: what ResnetBlock2D computes without its body."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, temb=None, *a, **kw):
        sc = self.block.conv_shortcut(x) if self.block.conv_shortcut is not None else x
        return sc / self.block.output_scale_factor


class _Identity(torch.nn.Module):
    def forward(self, x, *a, **kw):
        return x


@pytest.mark.parametrize("layer_id", ["down_blocks.0.resnets.1", "up_blocks.1.resnets.0", "down_blocks.1.attentions.1",
                                      "mid_block.attentions.0", "mid_block.resnets.1"])
def test_a_skipped_layer_matches_diffusers_forward_with_that_layer_replaced_by_hand(saved, layer_id):
    """What would catch this: a skipped resnet that drops its 1x1 shortcut (up_blocks.1.resnets.0 changes channels), a
    wrong attention index in the mid block, or long skip connections popped in the wrong order."""
    import copy

    d, unet, model = saved
    ref = copy.deepcopy(unet)
    parent_path, _, idx = layer_id.rpartition(".")
    parent = ref.get_submodule(parent_path)
    parent[int(idx)] = _ShortcutOnly(parent[int(idx)]) if ".resnets." in layer_id else _Identity()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([700, 20])
    with torch.no_grad():
        want = ref(x, t).sample
        got = model.unet(x, t, keep=model.unet.layer_ids - {layer_id})
        full = model.unet(x, t)
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - full).abs().max() > 1e-4  # the layer mattered (10x the tolerance)


def test_macs_match_the_flop_counter_in_total_and_per_layer(saved):
    """Fitting a layer's MACs to itself is impossible here: the reference is torch's FLOP counter on diffusers' modules."""
    _, _, model = saved
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])

    def counted(keep=None):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
            model.unet(x, t, keep=keep)
        return c.get_total_flops() / 2

    full = counted()
    assert full == model.unet.macs()
    ids = model.unet.layer_ids
    kinds = {layer.kind for layer in model.layers}
    assert kinds == {"res", "attn"} and len(model.layers) == 4 * 2 + 2 + 3 + 4 * 3 + 3  # resnets + attentions: down, mid, up
    for layer in model.layers[::3] + (model.layers[3],):  # every third, plus an attention
        assert full - counted(ids - {layer.id}) == layer.macs == model.unet.macs() - model.unet.macs(ids - {layer.id})


@pytest.mark.slow  # exports; test_export covers export quickly
def test_per_step_onnx_export_runs_in_onnxruntime_and_matches_torch(saved, tmp_path):
    import onnxruntime as ort

    from export.onnx_export import export_step_onnx
    from export.subnet import step_modules

    _, _, model = saved
    skip = [[], sorted(model.unet.layer_ids)[:4], ["mid_block.attentions.0", "up_blocks.2.resnets.0"]]
    plan = Plan.for_model(model, [999, 600, 200], sampler="dpmpp_2m", skip=skip, spec=model.name)
    coeffs = plan.coefficients(model.schedule)
    keeps = plan.keep_sets(model)
    for i, mod in enumerate(step_modules(model, plan)):
        res = export_step_onnx(mod, tmp_path / f"s{i}.onnx")
        sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
        inputs = mod.example_inputs(2, seed=i)
        feeds = dict(zip(mod.input_names, inputs))
        got = sess.run(None, {n: v.numpy() for n, v in feeds.items()})[0]
        with torch.no_grad():  # unfolded reference: diffusers' forward (keep-all steps) or the keep-set forward, then the update
            eps = model.eps(feeds["x"], torch.full((2,), plan.timesteps[i]), None, keeps[i])
            if i == 0:
                assert torch.allclose(eps, saved[1](feeds["x"], plan.timesteps[i]).sample, atol=1e-5)
        want = step_update(coeffs.row(i), feeds["x"], eps, feeds.get("prev_x0"), feeds.get("noise"))[0].numpy()
        assert np.abs(got - want).max() <= 1e-4


@pytest.mark.slow  # builds engines; test_export/test_serve cover the runtime
def test_runtime_on_built_engines_equals_sample(saved, tmp_path):
    from autodiffusion_rt.runtime import Runtime
    from export.build import build_engines

    _, _, model = saved
    skip = [[], ["down_blocks.1.attentions.0", "up_blocks.3.resnets.2"]]
    plan = Plan.for_model(model, [999, 400], sampler="ddim", skip=skip, spec=model.name)
    build_engines(plan, tmp_path / "e", model=model, max_batch=4, progress=False, backend="onnxruntime")
    rt = Runtime.load(tmp_path / "e", model=model)
    try:
        got = rt.sample(3, seed=5)
    finally:
        rt.close()
    want = sample(model, plan.timesteps, "ddim", n=3, seed=5, keep=plan.keep_sets(model))
    assert torch.allclose(got, want, atol=1e-4)


def test_v_prediction_samples_the_same_images_as_the_equivalent_eps_computation(tmp_path):
    """The same weights read as v: our sampler (x0 clipping on, from t=999) against the float64 eps = sqrt(a) v + sqrt(1-a) x
    applied around the raw diffusers UNet, and (clipping off) against diffusers' DDIMScheduler with prediction_type=v_prediction."""
    unet = save(tmp_path, prediction_type="v_prediction")
    model = load_model(f"diffusers:{tmp_path}")
    assert model.prediction_type == "v_prediction"
    acp = DDPMScheduler(**SCHEDULER).alphas_cumprod.double()
    ts = [999, 749, 499, 249]

    def eps_fn(x, t, i):
        with torch.no_grad():
            v = unet(x, t).sample.double()
        a = acp[t]
        return (a.sqrt() * v + (1 - a).sqrt() * x.double()).float()

    x, _, noise = initial_state(model, 4, 3)
    want = sample_loop(eps_fn, x.clone(), compute_coefficients("ddim", model.schedule, ts, 0.0, True), noise=noise).clamp(-1, 1)
    got = sample(model, ts, "ddim", n=4, seed=3)
    assert torch.allclose(got, want, atol=1e-4)
    # diffusers' DDIM loop (trailing spacing gives exactly these timesteps; set_alpha_to_one: the last step to clean data)
    s = DDIMScheduler(**SCHEDULER, prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == ts
    xd = x.clone()
    with torch.no_grad():
        for t in s.timesteps:
            xd = s.step(unet(xd, t).sample, t, xd).prev_sample
    ours = sample_loop(make_eps_fn(model, None, [None] * 4), x.clone(), compute_coefficients("ddim", model.schedule, ts, 0.0, False))
    assert torch.allclose(ours, xd, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_export_diffusers_settings_reproduce_the_plan_in_diffusers_pipeline_loop(saved, tmp_path, sampler, capsys):
    from autodiffusion_rt.cli import main
    from autodiffusion_rt.models.diffusers_adapter import diffusers_scheduler

    _, unet, model = saved
    ts = [999, 700, 420, 130, 15]
    plan = Plan.for_model(model, ts, sampler=sampler, spec=model.name, clip_denoised=False)
    plan.save(tmp_path / "plan.json")
    assert main(["export-diffusers", str(tmp_path / "plan.json"), "--out", str(tmp_path / "sched")]) == 0
    settings = json.loads((tmp_path / "sched" / "scheduler_config.json").read_text())
    s = DPMSolverMultistepScheduler.from_pretrained(str(tmp_path / "sched"))
    assert s.config.solver_order == settings["solver_order"]
    s.set_timesteps(timesteps=ts)
    assert diffusers_scheduler(plan).config.solver_order == s.config.solver_order
    x, _, _ = initial_state(model, 2, 7)
    xd = x.clone()
    with torch.no_grad():
        for t in s.timesteps:  # DDPMPipeline's loop
            xd = s.step(unet(xd, t).sample, t, xd).prev_sample
    ours = sample_loop(make_eps_fn(model, None, [None] * len(ts)), x.clone(), plan.coefficients(model.schedule))
    assert torch.allclose(ours, xd, atol=1e-4)
    assert "DPMSolverMultistepScheduler" in capsys.readouterr().out


@pytest.mark.slow  # a search; test_search_run's stay quick
def test_fast_search_runs_on_the_diffusers_model_and_its_plan_samples(saved, tmp_path):
    from autodiffusion_rt.metrics import compute_stats
    from search.run import build_parser, options_from_args, run_search

    _, _, model = saved
    extractor = search_build_tiny_extractor(dim=8, channels=3, pool=4, label="rgb-tiny")
    real = torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = compute_stats(real, extractor, dataset="uniform-noise")
    args = build_parser().parse_args(["--fast", "--model", model.name, "--nfe", "3", "--num-samples", "16",
                                      "--report-samples", "16", "--out", str(tmp_path / "plan.json"), "--quiet"])
    options = replace(options_from_args(args), report_extractors=[extractor.name])
    _, plan, _ = run_search(options, model=model, extractor=extractor, ref_stats=ref)
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.model_spec == model.name and len(loaded.timesteps) == 3 and loaded.timesteps[0] <= 999
    loaded.check_model(load_model(model.name))  # the plan refers to this diffusers directory's weights
    images = sample(model, loaded.timesteps, loaded.sampler, n=2, seed=0, keep=loaded.keep_sets(model))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


# ------------------------------------------------------------------ bad input
def test_directory_without_expected_files_names_what_is_missing(saved, tmp_path):
    d, _, _ = saved
    with pytest.raises(ModelSpecError, match="not found"):
        load_model(f"diffusers:{tmp_path / 'nope'}")
    broken = tmp_path / "b"
    shutil.copytree(d, broken)
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelSpecError, match=r"missing .*scheduler_config\.json"):
        load_model(f"diffusers:{broken}")
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelSpecError, match=r"missing .*unet.config\.json"):
        load_model(f"diffusers:{broken}")
    weights = next((d / "unet").glob("diffusion_pytorch_model.*"))
    only_config = tmp_path / "c"
    (only_config / "unet").mkdir(parents=True)
    shutil.copy(d / "unet" / "config.json", only_config / "unet")
    shutil.copytree(d / "scheduler", only_config / "scheduler")
    with pytest.raises(ModelSpecError, match=r"missing .*diffusion_pytorch_model\.safetensors"):
        load_model(f"diffusers:{only_config}")
    assert weights.exists()


@pytest.mark.parametrize("change, needle", [
    ({"_class_name": "UNet2DConditionModel"}, r"UNet class 'UNet2DConditionModel' is not supported.*UNet2DModel"),
    ({"down_block_types": ["SkipDownBlock2D", "DownBlock2D"]}, r"'SkipDownBlock2D'.*\['DownBlock2D', 'AttnDownBlock2D'\]"),
    ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, r"'UNetMidBlock2DCrossAttn'.*UNetMidBlock2D"),
])
def test_unsupported_class_or_block_type_names_the_supported_ones(saved, tmp_path, change, needle):
    d, _, _ = saved
    bad = tmp_path / "m"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ModelSpecError, match=needle):
        load_model(f"diffusers:{bad}")


def test_unknown_prediction_type_is_refused(saved, tmp_path):
    d, _, _ = saved
    bad = tmp_path / "m"
    shutil.copytree(d, bad)
    f = bad / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ModelSpecError, match=r"prediction_type='sample'.*\['epsilon', 'v_prediction'\]"):
        load_model(f"diffusers:{bad}")


def test_cli_prints_one_line_for_a_bad_directory(tmp_path, capsys):
    from autodiffusion_rt.cli import main

    assert main(["info", "--model", f"diffusers:{tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    assert issubclass(ModelSpecError, Error)
