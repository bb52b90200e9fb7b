"""Per-step subnetworks, ONNX export, the engine dir and its cache (real onnxruntime, real ONNX files)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import core_engine_model, core_plan, quick_first

from autodiffusion_rt.diffusion import compute_coefficients, step_update
from autodiffusion_rt.errors import BackendUnavailableError, EngineError, Error
from autodiffusion_rt.models.unet import ResBlock
from autodiffusion_rt.plan import Plan
from autodiffusion_rt.runtime import Manifest, Runtime
from export import build as build_mod
from export.build import build_engines
from export.onnx_export import export_step_onnx
from export.subnet import StepModule, step_modules

TIMESTEPS = [300, 200, 100]

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def uncond(engine_uncond_model):
    return engine_uncond_model


@pytest.fixture(scope="module")
def cond(engine_cond_model):
    return engine_cond_model


def plan_for(model, sampler="ddim", skip=None, timesteps=TIMESTEPS, eta=0.0):
    return core_plan(model, timesteps, sampler, eta, skip)


def ids(model):
    return sorted(model.unet.layer_ids)


def reference_step(model, plan, i, inputs):
    """model.eps over the keep set, then step_update: the unfolded computation."""
    coeffs = compute_coefficients(plan.sampler, model.schedule, plan.timesteps, plan.eta)
    keep = plan.keep_sets(model)[i]
    mod = StepModule(model, coeffs, i, keep)
    feeds = dict(zip(mod.input_names, inputs))
    t = torch.full((feeds["x"].shape[0],), plan.timesteps[i])
    with torch.no_grad():
        eps = model.eps(feeds["x"], t, feeds.get("y"), keep)
    return step_update(coeffs.row(i), feeds["x"], eps, feeds.get("prev_x0"), feeds.get("noise"))


# ---------------------------------------------------------------- step module
@pytest.mark.parametrize("label_mode", ["table", "graph"])
def test_step_module_equals_unfolded_model_and_update(cond, label_mode):
    model = cond
    plan = plan_for(model, "dpmpp_2m", skip=[[], ids(model)[:4], [ids(model)[-1]]])
    for mod in step_modules(model, plan, label_mode=label_mode):
        assert mod.label_mode == label_mode
        inputs = mod.example_inputs(3, seed=mod.index, num_classes=3)
        with torch.no_grad():
            out = mod(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        x_prev, x0 = reference_step(model, plan, mod.index, inputs)
        assert torch.allclose(out[0], x_prev, atol=1e-5, rtol=1e-5)
        if "x0" in mod.output_names:
            assert torch.allclose(out[1], x0, atol=1e-5, rtol=1e-5)


def test_step_io_follows_the_sampler():
    model = core_engine_model(2, learn_sigma=True)
    # DPM-Solver++(2M): first order at the first and the last step (to sigma = 0), second order between
    dpm = step_modules(model, plan_for(model, "dpmpp_2m", timesteps=[400, 300, 200, 100]))
    assert [m.input_names for m in dpm] == [("x",), ("x", "prev_x0"), ("x", "prev_x0"), ("x",)]
    assert [m.output_names for m in dpm] == [("x_prev", "x0"), ("x_prev", "x0"), ("x_prev",), ("x_prev",)]
    ddpm = step_modules(model, plan_for(model, "ddpm"))
    assert [m.input_names for m in ddpm] == [("x", "noise"), ("x", "noise"), ("x",)]  # last step: no noise
    # learn_sigma: the module returns eps only (the first C channels)
    plan = plan_for(model, "ddim")
    mod = step_modules(model, plan)[0]
    inputs = mod.example_inputs(2)
    with torch.no_grad():
        assert torch.allclose(mod(*inputs), reference_step(model, plan, 0, inputs)[0], atol=1e-5)


# ---------------------------------------------------------------- ONNX export
def test_skipped_layers_give_fewer_nodes_and_macs(uncond, tmp_path):
    model = uncond
    skip = [layer.id for layer in model.layers if layer.kind == "attn"] + ["input_blocks.3.0", "output_blocks.1.0"]
    plan = plan_for(model, "ddim", skip=[[], skip, []])
    full, pruned = step_modules(model, plan)[:2]
    a = export_step_onnx(full, tmp_path / "full.onnx")
    b = export_step_onnx(pruned, tmp_path / "pruned.onnx")
    assert b.nodes < a.nodes and b.macs_per_sample < a.macs_per_sample
    assert not any(n.op_type == "Einsum" for n in onnx.load(str(b.path)).graph.node)  # attention is gone

    def size(p):
        return sum(int(np.prod(t.dims)) for t in onnx.load(str(p)).graph.initializer)

    assert size(b.path) < size(a.path)  # the skipped layers' weights are not exported
    # The graph's MACs are the registry's minus the folded embedding MLPs (time_embed, emb_layers).
    unet = model.unet
    te = sum(lin.in_features * lin.out_features for lin in (unet.time_embed[0], unet.time_embed[2]))
    for res, keep in ((a, None), (b, plan.keep_sets(model)[1])):
        kept = [m for m in unet.modules() if isinstance(m, ResBlock) and (keep is None or m.layer_id in keep)]
        emb = sum(m.emb_layers[1].in_features * m.emb_layers[1].out_features for m in kept)
        assert res.macs_per_sample == unet.macs(keep) - te - emb


def test_onnx_file_is_checked_opset17_dynamic_batch_and_matches_torch(cond, tmp_path):
    import onnxruntime as ort

    plan = plan_for(cond, "ddim", eta=0.5)  # stochastic: a noise input
    mod = step_modules(cond, plan)[0]
    res = export_step_onnx(mod, tmp_path / "s.onnx", num_classes=3)
    m = onnx.load(str(res.path))
    onnx.checker.check_model(m, full_check=True)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in m.graph.input] == ["x", "y", "noise"]
    for vi in (*m.graph.input, *m.graph.output):
        assert vi.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert res.max_abs_diff <= 1e-4
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    inputs = mod.example_inputs(5, seed=9, num_classes=3)
    got = sess.run(None, {n: t.numpy() for n, t in zip(mod.input_names, inputs)})[0]
    want = reference_step(cond, plan, 0, inputs)[0].numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert list(tmp_path.iterdir()) == [res.path]  # no temporaries left


def test_label_modes_table_folds_the_embedding_mlp(cond, tmp_path):
    plan = plan_for(cond, "ddim")
    ops = {}
    for mode in ("table", "graph"):
        mod = step_modules(cond, plan, label_mode=mode)[1]
        res = export_step_onnx(mod, tmp_path / f"{mode}.onnx", num_classes=3)
        ops[mode] = [n.op_type for n in onnx.load(str(res.path)).graph.node]
    # Attention's products are MatMuls in both; the label path adds matrix products only in "graph"
    # mode (label_emb -> SiLU -> Linear), while "table" gathers the folded projections.
    products = {mode: sum(op in ("Gemm", "MatMul") for op in o) for mode, o in ops.items()}
    assert "Gather" in ops["table"]
    assert products["graph"] > products["table"]


def test_fp16_export_is_float16_typed_with_float32_io(uncond, tmp_path):
    mod = step_modules(uncond, plan_for(uncond), dtype=torch.float16)[0]
    res = export_step_onnx(mod, tmp_path / "h.onnx")
    m = onnx.load(str(res.path))
    f16 = onnx.TensorProto.FLOAT16
    assert any(t.data_type == f16 for t in m.graph.initializer)
    assert all(vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for vi in (*m.graph.input, *m.graph.output))
    assert 0 < res.max_abs_diff < 0.1


def test_simplify_with_onnxslim(uncond, built, tmp_path):
    pytest.importorskip("onnxslim")
    mod = step_modules(uncond, plan_for(uncond))[0]  # the same graph as the built dir's step 0
    plain = Manifest.read(built[1])["steps"][0]["onnx"]
    slim = export_step_onnx(mod, tmp_path / "b.onnx", simplify=True)
    assert slim.nodes < plain["nodes"]
    assert slim.macs_per_sample == plain["macs_per_sample"]
    assert slim.max_abs_diff <= 1e-4


# ------------------------------------------------------------ build and cache
def steps_status(report):
    return [(s["onnx"], s["engine"]) for s in report.steps]


@pytest.fixture(scope="module")
def built(uncond, tmp_path_factory):
    """An engine dir for a 3-step DDIM plan, built once; tests copy it before changing anything."""
    d = tmp_path_factory.mktemp("built") / "engines"
    plan = plan_for(uncond, "ddim", skip=[[], ids(uncond)[:3], []])
    report = build_engines(plan, d, model=uncond, max_batch=4, progress=False, backend="onnxruntime")
    return plan, d, report


def copy_dir(src, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(src, dst)
    return dst


def test_build_writes_manifest_and_files(built, uncond):
    plan, d, report = built
    assert steps_status(report) == [("exported", "built")] * 3
    m = Manifest.read(d)
    assert m["backend"] == "onnxruntime" and m["precision"] == "fp32" and m["batch"] == {"min": 1, "opt": 4, "max": 4}
    assert m["model"]["fingerprint"] == uncond.fingerprint and m["versions"]["onnxruntime"]
    for s in m["steps"]:
        assert (d / s["onnx"]["file"]).is_file() and (d / s["engine"]["file"]).is_file()
        assert s["onnx"]["max_abs_diff"] <= 1e-4
    # the plan's skipped step has the smaller graph
    assert m["steps"][1]["onnx"]["nodes"] < m["steps"][0]["onnx"]["nodes"]
    assert m["steps"][1]["onnx"]["macs_per_sample"] < m["steps"][0]["onnx"]["macs_per_sample"]
    assert not [p for p in d.rglob(".*") if p.is_file()]  # no temporaries


def test_second_build_reuses_every_engine(built, uncond, tmp_path):
    plan, src, _ = built
    d = copy_dir(src, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*.onnx")}
    report = build_engines(plan, d, model=uncond, max_batch=4, progress=False, backend="onnxruntime")
    assert steps_status(report) == [("reused", "reused")] * 3
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*.onnx")} == before


def test_changed_plan_rebuilds_only_the_changed_steps(built, uncond, tmp_path):
    plan, src, _ = built
    d = copy_dir(src, tmp_path)
    changed = plan_for(uncond, "ddim", skip=[[], ids(uncond)[:3], [ids(uncond)[5]]])
    report = build_engines(changed, d, model=uncond, max_batch=4, progress=False, backend="onnxruntime")
    assert steps_status(report) == [("reused", "reused"), ("reused", "reused"), ("exported", "built")]
    m = Manifest.read(d)
    # the old step-2 files are gone, the new ones named by the manifest are there
    files = {p.relative_to(d).as_posix() for p in d.rglob("step*")}
    assert files == {s[k]["file"] for s in m["steps"] for k in ("onnx", "engine")}
    Runtime.load(d, plan=changed).close()


@pytest.mark.slow
def test_dpm_timestep_change_rebuilds_the_steps_whose_constants_move(uncond, tmp_path):
    # DPM-Solver++(2M): step i's constants depend on t_i, t_{i+1} (and t_{i-1} when second order);
    # the final step (x_prev = x0) only on its own timestep.
    a = build_engines(plan_for(uncond, "dpmpp_2m", timesteps=[400, 300, 100]), tmp_path / "e", model=uncond, max_batch=2, progress=False, backend="onnxruntime")
    assert steps_status(a) == [("exported", "built")] * 3
    b = build_engines(plan_for(uncond, "dpmpp_2m", timesteps=[400, 250, 100]), tmp_path / "e", model=uncond, max_batch=2, progress=False, backend="onnxruntime")
    assert steps_status(b) == [("exported", "built"), ("exported", "built"), ("reused", "reused")]


def test_truncated_engine_is_rebuilt_with_a_warning(built, uncond, tmp_path):
    plan, src, _ = built
    d = copy_dir(src, tmp_path)
    engine = d / Manifest.read(d)["steps"][1]["engine"]["file"]
    engine.write_bytes(engine.read_bytes()[:100])
    with pytest.raises(EngineError, match="corrupted or truncated"):
        Runtime.load(d)  # never loaded
    with pytest.warns(UserWarning, match="corrupted or truncated"):
        report = build_engines(plan, d, model=uncond, max_batch=4, progress=False, backend="onnxruntime")
    assert steps_status(report) == [("reused", "reused"), ("reused", "built"), ("reused", "reused")]
    Runtime.load(d).close()


def test_corrupted_onnx_is_exported_again(built, uncond, tmp_path):
    plan, src, _ = built
    d = copy_dir(src, tmp_path)
    f = d / Manifest.read(d)["steps"][0]["onnx"]["file"]
    f.write_bytes(b"\0" * 64)
    with pytest.warns(UserWarning, match="corrupted or truncated"):
        report = build_engines(plan, d, model=uncond, max_batch=4, progress=False, backend="onnxruntime")
    assert steps_status(report)[0][0] == "exported"
    assert steps_status(report)[1:] == [("reused", "reused")] * 2


def test_changed_versions_or_batch_profile_rebuild_engines_not_exports(built, uncond, tmp_path, monkeypatch):
    plan, src, _ = built
    d = copy_dir(src, tmp_path)
    report = build_engines(plan, d, model=uncond, max_batch=8, progress=False, backend="onnxruntime")
    assert steps_status(report) == [("reused", "built")] * 3
    real = build_mod.library_versions
    monkeypatch.setattr(build_mod, "library_versions", lambda backend=None: {**real(backend), "onnxruntime": "0.0.1"})
    report = build_engines(plan, d, model=uncond, max_batch=8, progress=False, backend="onnxruntime")
    assert steps_status(report) == [("reused", "built")] * 3


@pytest.mark.parametrize("change", quick_first(["prediction_type", "num_heads"]))
def test_what_the_network_predicts_is_part_of_the_cache_key(built, uncond, tmp_path, change):
    """The same weights read as v-prediction (or with other attention heads) compute another step: every
    step is exported again, and the engines give what the changed model gives, not the cached ones.
    What would catch this: a key made of the weights' fingerprint alone reuses all three steps."""
    import dataclasses

    from autodiffusion_rt.models import model_from_weights

    old_plan, src, _ = built
    d = copy_dir(src, tmp_path)
    plan = old_plan
    if change == "prediction_type":
        other = dataclasses.replace(uncond, prediction_type="v_prediction")
    else:  # same parameter shapes, so the same fingerprint; attention splits channels into 1 head, not 2
        other = model_from_weights(uncond.name, {**uncond.config["unet"], "num_heads": 1}, uncond.config["diffusion"],
                                   uncond.unet.state_dict(), source="test")
        assert other.fingerprint == uncond.fingerprint
        plan = Plan.for_model(other, plan.timesteps, sampler=plan.sampler, skip=plan.skip, spec=plan.model_spec)
    report = build_engines(plan, d, model=other, max_batch=4, progress=False, backend="onnxruntime")
    assert steps_status(report) == [("exported", "built")] * 3
    with Runtime.load(d) as rt, Runtime.from_plan(plan, model=other) as ref, Runtime.from_plan(old_plan, model=uncond) as old:
        got, want, before = rt.sample(3, seed=4, clip=False), ref.sample(3, seed=4, clip=False), old.sample(3, seed=4, clip=False)
    assert float((got - want).abs().max()) < 1e-3 < float((before - want).abs().max())


def test_interrupted_build_leaves_the_old_dir_usable(built, uncond, tmp_path, monkeypatch):
    plan, src, _ = built
    d = copy_dir(src, tmp_path)
    before = Runtime.load(d).sample(3, seed=1)
    manifest_before = (d / "manifest.json").read_bytes()
    calls = []
    real = build_mod.optimize_for_onnxruntime

    def failing(onnx_path, engine_path, **kw):
        calls.append(engine_path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user hits ^C mid-build
        return real(onnx_path, engine_path, **kw)

    monkeypatch.setattr(build_mod, "optimize_for_onnxruntime", failing)
    changed = plan_for(uncond, "ddim", skip=[[ids(uncond)[0]], [ids(uncond)[1]], []])
    with pytest.raises(KeyboardInterrupt):
        build_engines(changed, d, model=uncond, max_batch=4, progress=False, backend="onnxruntime")
    assert (d / "manifest.json").read_bytes() == manifest_before
    assert not [p for p in d.rglob(".*") if p.is_file()]  # no half-written temporaries
    with Runtime.load(d, plan=plan) as rt:  # the old engines still load and give the same images
        assert torch.equal(rt.sample(3, seed=1), before)


def test_a_failed_fresh_build_leaves_nothing_behind(uncond, tmp_path, monkeypatch):
    """A first build that fails removes the dir it created (a kill -9 leaves a manifest marked unfinished instead)."""
    def failing(*a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_mod, "optimize_for_onnxruntime", failing)
    with pytest.raises(RuntimeError):
        build_engines(plan_for(uncond), tmp_path / "e", model=uncond, max_batch=2, progress=False, backend="onnxruntime")
    assert not (tmp_path / "e").exists()
    with pytest.raises(EngineError, match="does not exist"):
        Runtime.load(tmp_path / "e")


def test_build_rejects_bad_arguments(uncond, tmp_path):
    plan = plan_for(uncond)
    for kw, match in [
        (dict(backend="onnx"), "onnxruntime, openvino, tensorrt"),
        (dict(precision="int4"), "precision='int4'"),
        (dict(precision="bf16"), "bf16.*not built for onnxruntime"),
        (dict(precision="int8"), "mnist.*extractor reads 1x28x28"),  # the FID check's extractor, checked before any work
        (dict(max_batch=0), "max_batch"),
        (dict(max_batch=4, opt_batch=8), "opt_batch"),
        (dict(opset=13), "opset"),
        (dict(label_mode="lookup"), "label_mode"),
    ]:
        with pytest.raises(Error, match=match):
            build_engines(plan, tmp_path / "e", model=uncond, progress=False, **{"backend": "onnxruntime", **kw})
    assert not (tmp_path / "e").exists()
    other = core_engine_model(7)
    with pytest.raises(Error, match="weights"):
        build_engines(plan, tmp_path / "e", model=other, progress=False, backend="onnxruntime")
    with pytest.raises(Error, match="twice"):  # such a plan would not load back
        plan_for(uncond, skip=[["middle_block.1", "middle_block.1"], [], []])
    assert not (tmp_path / "e").exists()


def test_tensorrt_missing_says_what_to_install(tensorrt_absent, uncond, tmp_path):
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        build_engines(plan_for(uncond), tmp_path / "e", backend="tensorrt", model=uncond, progress=False)
    assert not (tmp_path / "e").exists()


def test_cli_build_from_a_checkpoint_plan(uncond, tmp_path, capsys):
    from export.cli import main

    ckpt = tmp_path / "ckpt.pt"
    torch.save(uncond.unet.state_dict(), ckpt)
    plan = plan_for(uncond, timesteps=[300])
    plan = Plan.from_dict({**plan.to_dict(), "model": {**plan.to_dict()["model"], "spec": f"adm:{ckpt}"}})
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "engines"
    assert main(["build", str(tmp_path / "plan.json"), "--out", str(out), "--max-batch", "2", "--quiet"]) == 0
    assert "1 exported" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["model"]["spec"] == f"adm:{ckpt}"
    # the torch backend reloads the checkpoint from the plan's recorded architecture
    with Runtime.load(out, backend="torch") as rt, Runtime.load(out) as ort_rt:
        assert (rt.sample(2, seed=0) - ort_rt.sample(2, seed=0)).abs().max() <= 1e-3
    assert main(["build", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "plan file not found" in capsys.readouterr().err


# --------------------------------------------------------------------- int8
@pytest.mark.slow
def test_int8_steps_are_kept_or_rejected_by_the_fid_check(uncond, tmp_path, search_tiny_extractor, search_tiny_ref_stats):
    """Real QDQ quantization, real onnxruntime int8 runs, real FID (tiny extractor) decide each step.

    A limit that tolerates any rise keeps every step in int8 (and those engines are QDQ graphs
    whose images differ from fp32); a limit no int8 step can meet (the FID must fall by 99%) is
    the case made to fail: every step is rejected and the runtime runs the fp32 engines, bit
    for bit the fp32 build's. What would catch this: a rejected step still pointing at its int8 file.
    """
    plan = Plan.for_model(uncond, [999, 600, 300], spec="test:int8")
    common = dict(model=uncond, max_batch=8, progress=False, backend="onnxruntime", precision="int8", int8_fid_samples=24,
                  int8_calibration_samples=8, fid_extractor=search_tiny_extractor, fid_reference=search_tiny_ref_stats)
    fp32_dir = tmp_path / "fp32"
    build_engines(plan, fp32_dir, model=uncond, max_batch=8, progress=False, backend="onnxruntime")
    kept = build_engines(plan, tmp_path / "kept", int8_max_fid_rise=1e9, **common).manifest
    assert kept["precision"] == "int8" and [s["precision"] for s in kept["steps"]] == ["int8"] * 3
    assert all(s["int8"] for s in kept["int8"]["steps"]) and kept["int8"]["fid_fp32"] > 0
    qdq_ops = {n.op_type for n in onnx.load(str(tmp_path / "kept" / kept["steps"][0]["engine"]["file"])).graph.node}
    assert qdq_ops & {"QLinearConv", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger", "ConvInteger"}
    rejected = build_engines(plan, tmp_path / "rejected", int8_max_fid_rise=-0.99, **common).manifest
    assert [s["precision"] for s in rejected["steps"]] == ["fp32"] * 3
    assert not any(s["int8"] for s in rejected["int8"]["steps"])
    assert all(s["fid"] > rejected["int8"]["limit"] for s in rejected["int8"]["steps"])
    with Runtime.load(fp32_dir, threads=1) as a, Runtime.load(tmp_path / "rejected", threads=1) as b, \
            Runtime.load(tmp_path / "kept", threads=1) as c:
        ref = a.sample(4, seed=3, clip=False)
        assert torch.equal(b.sample(4, seed=3, clip=False), ref)
        q = c.sample(4, seed=3, clip=False)
        assert not torch.equal(q, ref) and (q - ref).abs().mean() < 0.5  # int8: close, not equal
    with pytest.raises(EngineError, match="int8.*onnxruntime"):
        build_engines(plan, tmp_path / "x", model=uncond, precision="int8", backend="tensorrt", progress=False)


@pytest.mark.parametrize("backend", quick_first(["onnxruntime", "openvino"]))  # OpenVINO compiles: slow
def test_a_step_that_skips_every_resblock_keeps_the_step_contract(backend, tmp_path):
    """Such a step reads no timestep embedding or label, and the exporter drops an input nothing reads; every step
    must still take the contract's inputs (the runtimes feed them alike) and equal torch, from t = 999, clipping on."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    from autodiffusion_rt.runtime import Runtime

    model = core_engine_model(1, num_classes=3)  # class-conditional: y is an input of every step
    every_resblock = [layer.id for layer in model.unet.layers if "res" in layer.kind.lower()]
    assert every_resblock
    plan = core_plan(model, [999, 700, 400, 100], "ddim", 0.0, [[], every_resblock, [], every_resblock])
    build_engines(plan, tmp_path / "e", model=model, backend=backend, precision="fp32", max_batch=4, progress=False)
    labels = [0, 2, 1]
    with Runtime.load(tmp_path / "e", threads=1) as rt, Runtime.from_plan(plan, model=model) as ref:
        got, want = rt.sample(3, seed=4, labels=labels), ref.sample(3, seed=4, labels=labels)
    assert (got - want).abs().max() <= 1e-3
