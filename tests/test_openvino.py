"""The OpenVINO backend: real OpenVINO (CPU) engines against the torch runtime, its bf16 gate and its blob cache."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import core_engine_model, core_plan

from autodiffusion_rt.errors import EngineError
from autodiffusion_rt.runtime import Runtime
from autodiffusion_rt.runtime.platform import has_native_bf16
from export.build import build_engines

ov = pytest.importorskip("openvino")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

#: bf16 keeps 8 significant bits: one rounding is at most 2^-8 relative. A subnetwork's output passes
#: through a few dozen roundings (inputs, weights and activations of each layer, accumulated in fp32);
#: 16 of them at full size bounds it, while a wrong graph or a wrong embedding misses by far more.
BF16_STEP_TOL = 16 * 2.0**-8


def plan_from_999(model, sampler: str, eta: float = 0.0):
    """What users run: t = 999 first (clipping on by default), steps that skip layers and steps that do not."""
    ids = sorted(model.unet.layer_ids)
    return core_plan(model, [999, 700, 400, 100], sampler, eta, [[], ids[:3], [], ids[:3]])


CASES = [("uncond", "ddim", 0.7), ("cond", "ddim", 0.0), ("cond", "ddpm", 0.0), ("uncond", "dpmpp_2m", 0.0),
         ("cond", "ipndm", 0.0), ("sigma", "ddpm", 0.0)]


@pytest.fixture(scope="module")
def models(engine_uncond_model, engine_cond_model):
    return {"uncond": engine_uncond_model, "cond": engine_cond_model, "sigma": core_engine_model(3, learn_sigma=True)}


@pytest.fixture(scope="module")
def fp32_dirs(models, tmp_path_factory):
    out = {}
    for kind, sampler, eta in CASES:
        plan = plan_from_999(models[kind], sampler, eta)
        d = tmp_path_factory.mktemp(f"ov-{kind}-{sampler}") / "engines"
        build_engines(plan, d, model=models[kind], backend="openvino", precision="fp32", max_batch=4, progress=False)
        out[kind, sampler] = (models[kind], plan, d)
    return out


@pytest.mark.slow  # OpenVINO compiles (the quick subset covers the build stage with onnxruntime)
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_openvino_fp32_images_equal_torch(fp32_dirs, case):
    """The tolerance the onnxruntime engines meet (tests/test_runtime.py), from t = 999 with clipping on."""
    model, plan, d = fp32_dirs[case[:2]]
    labels = [0, 1, 2, 1, 0, 2, 2] if model.num_classes else None
    with Runtime.load(d, threads=1) as rt, Runtime.from_plan(plan, model=model) as ref:
        assert rt.backend == "openvino" and rt.max_batch == 4
        raw = rt.sample(7, seed=11, labels=labels, clip=False)  # 7 > max_batch 4: two chunks
        want = ref.sample(7, seed=11, labels=labels, clip=False)
        assert (raw - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
        assert (raw.clamp(-1, 1) - want.clamp(-1, 1)).abs().max() <= 1e-3
        assert not torch.equal(rt.sample(7, seed=12, labels=labels), raw.clamp(-1, 1))  # the seed matters


@pytest.mark.slow  # OpenVINO compiles (the quick subset covers the build stage with onnxruntime)
def test_steps_that_skip_the_same_layers_share_one_compiled_subnetwork(fp32_dirs):
    model, plan, d = fp32_dirs["cond", "ddim"]
    m = json.loads((d / "manifest.json").read_text())
    assert [s["subnet"] for s in m["steps"]] == [0, 1, 0, 1]
    # each subnetwork also compiled for static batch sizes 1 and the max (faster than OpenVINO's dynamic batch)
    assert all(set(s["engine"]["static"]) == {"1", "4"} for s in m["steps"])
    assert len({s["engine"]["file"] for s in m["steps"]}) == 2 and len({s["onnx"]["file"] for s in m["steps"]}) == 2
    with Runtime.load(d) as rt:
        subnets = [e.subnet for e in rt.engines]
        assert subnets[0] is subnets[2] and subnets[1] is subnets[3] and subnets[0] is not subnets[1]


@pytest.mark.slow  # OpenVINO compiles (the quick subset covers the build stage with onnxruntime)
def test_images_do_not_depend_on_chunking_or_batching(fp32_dirs):
    _, _, d = fp32_dirs["uncond", "ddim"]  # stochastic: the step noise is drawn per sample
    with Runtime.load(d, threads=1) as rt:
        whole = rt.sample(6, seed=3)
        one_by_one = torch.cat([rt.sample(1, seed=3, first=k) for k in range(6)])
        merged = rt.sample_requests([(2, 3, None), (3, 9, None), (1, 3, None)])
    assert (whole - one_by_one).abs().max() <= 1e-5
    assert (merged[0][0] - whole[:2]).abs().max() <= 1e-5 and (merged[2][0] - whole[:1]).abs().max() <= 1e-5


@pytest.mark.slow  # OpenVINO compiles (the quick subset covers the build stage with onnxruntime)
def test_a_corrupt_or_stale_blob_is_recompiled_never_imported(fp32_dirs, tmp_path):
    model, plan, src = fp32_dirs["uncond", "dpmpp_2m"]
    d = tmp_path / "engines"
    shutil.copytree(src, d)
    with Runtime.load(d, threads=1) as rt:
        want = rt.sample(3, seed=5)
    m = json.loads((d / "manifest.json").read_text())
    blob = d / m["steps"][0]["engine"]["file"]
    blob.write_bytes(b"\0" * 64 + blob.read_bytes()[64:])  # same size, other bytes
    with pytest.warns(UserWarning, match="corrupted.*compiling step 0's subnetwork from its ONNX file"):
        rt = Runtime.load(d, threads=1)
    with rt:
        assert torch.equal(rt.sample(3, seed=5), want)
    # another OpenVINO (or CPU) recorded for a blob: recompiled, not imported
    for s in m["steps"]:
        s["engine"]["record"]["openvino"] = "2020.1"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="built for openvino '2020.1'"):
        Runtime.load(d, threads=1).close()
    # build puts both right: a blob is rebuilt whose record or bytes no longer match
    report = build_engines(plan, d, model=model, backend="openvino", precision="fp32", max_batch=4, progress=False)
    assert {s["engine"] for s in report.steps} == {"built"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Runtime.load(d, threads=1) as rt:
            assert torch.equal(rt.sample(3, seed=5), want)


@pytest.mark.slow  # OpenVINO compiles (the quick subset covers the build stage with onnxruntime)
def test_an_openvino_dir_refuses_other_backends(fp32_dirs):
    _, _, d = fp32_dirs["uncond", "ddim"]
    with pytest.raises(EngineError, match="holds openvino engines, not onnxruntime ones"):
        Runtime.load(d, backend="onnxruntime")
    with pytest.raises(EngineError, match="holds openvino engines, not tensorrt ones"):
        Runtime.load(d, backend="tensorrt")


@pytest.mark.slow  # OpenVINO compiles (the quick subset covers the build stage with onnxruntime)
def test_a_rebuild_reuses_every_file(fp32_dirs):
    model, plan, d = fp32_dirs["cond", "ipndm"]
    before = (d / "manifest.json").read_text()
    report = build_engines(plan, d, model=model, backend="openvino", precision="fp32", max_batch=4, progress=False)
    assert {s["onnx"] for s in report.steps} == {"reused"} and {s["engine"] for s in report.steps} == {"reused"}
    assert (d / "manifest.json").read_text() == before


# ------------------------------------------------------------------ bf16
bf16_only = pytest.mark.skipif(not has_native_bf16(), reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16)")


@pytest.mark.slow  # OpenVINO compiles (the quick subset covers the build stage with onnxruntime)
@bf16_only
def test_bf16_steps_stay_within_the_mantissa_bound_of_fp32(models, tmp_path, search_tiny_extractor, search_tiny_ref_stats):
    """Each bf16 step against its fp32 twin on the same inputs; and the gate keeps bf16 when the FID allows it."""
    model = models["uncond"]
    plan = plan_from_999(model, "dpmpp_2m")
    gate = dict(fid_extractor=search_tiny_extractor, fid_reference=search_tiny_ref_stats, int8_fid_samples=32)
    build_engines(plan, tmp_path / "fp32", model=model, backend="openvino", precision="fp32", max_batch=4, progress=False)
    m = build_engines(plan, tmp_path / "bf16", model=model, backend="openvino", precision="bf16", max_batch=4,
                      progress=False, int8_max_fid_rise=1e9, **gate).manifest
    assert m["bf16"]["checked"] and [s["precision"] for s in m["steps"]] == ["bf16"] * 4
    assert m["bf16"]["samples"] == 32 and m["bf16"]["extractor"] == search_tiny_extractor.name
    rng = np.random.default_rng(0)
    with Runtime.load(tmp_path / "fp32", threads=1) as f32, Runtime.load(tmp_path / "bf16", threads=1) as b16:
        worst = 0.0
        for e32, e16 in zip(f32.engines, b16.engines):
            x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
            emb = e32.embedding(None, 3)
            want = e32.subnet.infer(x, emb).copy()
            got = e16.subnet.infer(x, emb).copy()
            err = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
            assert err <= BF16_STEP_TOL
            worst = max(worst, err)
        assert worst > 0  # bf16 really ran: its rounding shows
        assert (b16.sample(4, seed=1) - f32.sample(4, seed=1)).abs().max() > 0


@pytest.mark.slow  # OpenVINO compiles (the quick subset covers the build stage with onnxruntime)
@bf16_only
def test_a_step_that_fails_the_bf16_gate_runs_fp32(models, tmp_path, search_tiny_extractor, search_tiny_ref_stats):
    """A case built to fail (the FID must fall by 99%): every step falls back to its fp32 subnetwork, bit for bit."""
    model = models["cond"]
    plan = plan_from_999(model, "ddim")
    gate = dict(fid_extractor=search_tiny_extractor, fid_reference=search_tiny_ref_stats, int8_fid_samples=32)
    rejected = build_engines(plan, tmp_path / "rejected", model=model, backend="openvino", precision="bf16",
                             max_batch=4, progress=False, int8_max_fid_rise=-0.99, **gate).manifest
    assert [s["precision"] for s in rejected["steps"]] == ["fp32"] * 4
    assert not any(s["bf16"] for s in rejected["bf16"]["steps"]) and rejected["bf16"]["fid_fp32"] > 0
    assert all(".blob" in s["engine"]["file"] and s["engine"]["record"]["precision"] == "fp32" for s in rejected["steps"])
    build_engines(plan, tmp_path / "fp32", model=model, backend="openvino", precision="fp32", max_batch=4, progress=False)
    with Runtime.load(tmp_path / "rejected", threads=1) as a, Runtime.load(tmp_path / "fp32", threads=1) as b:
        assert torch.equal(a.sample(5, seed=2), b.sample(5, seed=2))


@pytest.mark.slow  # OpenVINO compiles (the quick subset covers the build stage with onnxruntime)
def test_bf16_without_reference_images_is_built_unchecked_and_says_so(models, tmp_path, capsys):
    """The default gate reads MNIST digits (1x28x28); this 1x8x8 model has no reference: one line, and the manifest."""
    model = models["uncond"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an emulated-bf16 CPU warns about speed
        m = build_engines(plan_from_999(model, "ddim"), tmp_path / "e", model=model, backend="openvino",
                          precision="bf16", max_batch=2, progress=True).manifest
    assert m["bf16"]["checked"] is False and "cannot judge" in m["bf16"]["reason"]
    assert "bf16 was not quality-checked" in capsys.readouterr().out


def test_precision_follows_the_cpu(monkeypatch):
    """bf16 by default only where the CPU multiplies bf16 in hardware; asked for elsewhere, a warning names the cost."""
    from autodiffusion_rt.runtime.backends import ov_backend
    from export.build import default_precision

    monkeypatch.setattr(ov_backend, "has_native_bf16", lambda: False)
    assert default_precision("openvino") == "fp32" and default_precision("onnxruntime") == "fp32"
    with pytest.warns(UserWarning, match="no native bf16.*slower than fp32.*--precision fp32"):
        ov_backend.check_precision("bf16")
    monkeypatch.setattr(ov_backend, "has_native_bf16", lambda: True)
    assert default_precision("openvino") == "bf16"
    with pytest.raises(EngineError, match="precision='int8' is not an OpenVINO precision"):
        ov_backend.check_precision("int8")
