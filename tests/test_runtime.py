"""The runtime: torch reference vs onnxruntime engines, and every kind of bad engine dir."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import core_plan

from autodiffusion_rt import sample
from autodiffusion_rt.errors import BackendUnavailableError, EngineError, Error, SamplingError
from autodiffusion_rt.plan import Plan
from autodiffusion_rt.runtime import Runtime, sample_from_engines
from autodiffusion_rt.runtime.manifest import MANIFEST_NAME
from export.build import build_engines

# Low-noise timesteps keep random-weight samples mostly inside [-1, 1], so the clamped
# images still say something (from t=999 nearly every pixel saturates).
TIMESTEPS = [300, 200, 100]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def models(engine_uncond_model, engine_cond_model):
    return {"uncond": engine_uncond_model, "cond": engine_cond_model}


def make_plan(model, sampler="ddim", eta=0.0):
    ids = sorted(model.unet.layer_ids)
    skip = [[], ids[:4], [ids[-1]]]  # one full step, two with layers skipped
    return core_plan(model, TIMESTEPS, sampler, eta, skip)


# DDIM (stochastic, eta > 0: the engines take noise) and DPM-Solver++(2M) (carries x0), both models.
CASES = [("uncond", "ddim", 0.7), ("uncond", "dpmpp_2m", 0.0), ("cond", "ddim", 0.0), ("cond", "dpmpp_2m", 0.0)]


@pytest.fixture(scope="module")
def engine_dirs(models, tmp_path_factory):
    """One onnxruntime engine dir per case (built once for the module)."""
    out = {}
    for kind, sampler, eta in CASES:
        model = models[kind]
        plan = make_plan(model, sampler, eta)
        d = tmp_path_factory.mktemp(f"{kind}-{sampler}-{eta}") / "engines"
        build_engines(plan, d, model=model, max_batch=4, progress=False, backend="onnxruntime")
        out[(kind, sampler, eta)] = (model, plan, d)
    return out


def test_torch_runtime_is_sample_exactly(models):
    model = models["cond"]
    plan = make_plan(model, "ddim", eta=0.7)  # stochastic steps: the noise draws must line up too
    with Runtime.from_plan(plan, model=model) as rt:
        images, labels = rt.sample(5, seed=3, return_labels=True)
    want, want_labels = sample(model, plan.timesteps, "ddim", 5, 3, 0.7, keep=plan.keep_sets(model), return_labels=True)
    assert torch.equal(images, want) and torch.equal(labels, want_labels)


def test_torch_runtime_on_device_cpu_equals_the_default(models):
    model = models["cond"]
    plan = make_plan(model, "ddim", eta=0.7)
    with Runtime.from_plan(plan, model=model) as a, Runtime.from_plan(plan, model=model, device="cpu") as b:
        assert all(e.device == torch.device("cpu") for e in b.engines)
        assert torch.equal(a.sample(3, seed=1, clip=False), b.sample(3, seed=1, clip=False))
    with pytest.raises(SamplingError, match="weights are on cpu but device='meta'"):
        Runtime.from_plan(plan, model=model, device="meta")


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.slow
def test_onnxruntime_images_equal_torch(engine_dirs, case):
    model, plan, d = engine_dirs[case]
    labels = [0, 1, 2, 1, 0, 2, 2] if model.num_classes else None
    with Runtime.load(d, threads=1) as rt, Runtime.from_plan(plan, model=model) as ref:
        assert rt.backend == "onnxruntime" and rt.max_batch == 4
        a = rt.sample(7, seed=11, labels=labels)  # 7 > max_batch 4: run in two chunks
        b = ref.sample(7, seed=11, labels=labels)
        assert a.shape == (7, 1, 8, 8)
        assert (a - b).abs().max() <= 1e-3
        inside = (b.abs() < 1).float().mean()
        assert inside > 0.3  # the comparison is not all clamped pixels
        raw_a, raw_b = rt.sample(7, seed=11, labels=labels, clip=False), ref.sample(7, seed=11, labels=labels, clip=False)
        assert (raw_a - raw_b).abs().max() <= 1e-4 * max(1.0, raw_b.abs().max().item())
        assert not torch.equal(rt.sample(7, seed=12, labels=labels), a)  # the seed matters


@pytest.mark.slow
def test_merged_requests_get_exactly_their_own_images(engine_dirs):
    """What a dynamic batcher relies on: requests run as one batch equal each run alone.

    The stochastic case (ddim eta 0.7) draws step noise: a shared generator would fail this.
    """
    cases = [
        (("uncond", "ddim", 0.7), [(3, 5, None), (2, 9, None), (1, 5, None), (2, 2**63 - 1, None)]),
        (("cond", "ddim", 0.0), [(3, 5, None), (2, 9, [1, 1]), (1, 5, 2), (2, 7, None)]),  # drawn and given labels mixed
    ]
    for case, requests in cases:
        _, _, d = engine_dirs[case]
        with Runtime.load(d, threads=1) as rt:
            merged = rt.sample_requests(requests)  # 8 rows > max_batch 4: chunks cut across requests
            for (n, seed, labels), (images, y) in zip(requests, merged):
                alone, y_alone = rt.sample(n, seed=seed, labels=labels, return_labels=True)
                assert torch.equal(images, alone)
                assert (y is None and y_alone is None) or torch.equal(y, y_alone)
            # one image of a request is the same whatever n it was asked with
            assert torch.equal(rt.sample(1, seed=5), merged[0][0][:1])


@pytest.mark.slow
def test_labels_drawn_from_the_seed_match_and_are_validated(engine_dirs):
    model, plan, d = engine_dirs[("cond", "ddim", 0.0)]
    with Runtime.load(d, threads=1) as rt, Runtime.from_plan(plan, model=model) as ref:
        a, ya = rt.sample(3, seed=4, return_labels=True)
        b, yb = ref.sample(3, seed=4, return_labels=True)
        assert torch.equal(ya, yb) and (a - b).abs().max() <= 1e-3
        with pytest.raises(SamplingError, match="out of range"):
            rt.sample(2, labels=[0, 3])
    _, _, d_uncond = engine_dirs[("uncond", "ddim", 0.7)]
    with Runtime.load(d_uncond) as rt, pytest.raises(SamplingError, match="unconditional"):
        rt.sample(2, labels=[0, 1])


@pytest.mark.slow
def test_steady_state_allocates_only_the_result_and_engines_write_in_place(engine_dirs):
    """After the first request of a batch size, a request allocates its result and nothing else (tracemalloc sees
    numpy's allocations): the buffers and bindings of every step are kept. What breaks it: buffers made per request."""
    import tracemalloc

    _, _, d = engine_dirs[("uncond", "dpmpp_2m", 0.0)]
    with Runtime.load(d, threads=1) as rt:
        tracemalloc.start()
        try:
            peaks = []
            for _ in range(4):
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                images = rt.sample(4, seed=0)
                peaks.append(tracemalloc.get_traced_memory()[1] - before)
                del images
        finally:
            tracemalloc.stop()
        result_bytes = 4 * 1 * 8 * 8 * 4
        assert peaks[0] > 4 * result_bytes  # the first request made the x, x0 and result buffers
        assert all(p <= result_bytes + 4096 for p in peaks[1:]), peaks  # the x and x0 buffers alone are 4 x 1 KiB
        first, second = rt.sample(3, seed=0), rt.sample(3, seed=0)
        assert torch.equal(first, second)  # and the returned images do not alias the buffers
        eng = rt.engines[0]
        x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
        out = {"x_prev": np.empty_like(x), "x0": np.empty_like(x)}
        res = eng.run({"x": x}, out)
        assert res["x_prev"] is out["x_prev"] and res["x0"] is out["x0"]
        fresh = eng.run({"x": x})
        assert np.array_equal(fresh["x_prev"], out["x_prev"])


@pytest.mark.slow
def test_engine_rejects_a_batch_above_its_maximum_and_bad_feeds(engine_dirs):
    _, _, d = engine_dirs[("uncond", "ddim", 0.7)]
    with Runtime.load(d, threads=1) as rt:
        eng = rt.engines[0]
        assert eng.input_names == ("x", "noise")
        z = lambda b, dtype=np.float32: np.zeros((b, 1, 8, 8), dtype)  # noqa: E731
        assert eng.run({"x": z(4), "noise": z(4)})["x_prev"].shape == (4, 1, 8, 8)
        with pytest.raises(EngineError, match="above the engine's maximum 4"):
            eng.run({"x": z(5), "noise": z(5)})
        with pytest.raises(EngineError, match="expected a C-contiguous float32"):
            eng.run({"x": z(2, np.float64), "noise": z(2)})
        with pytest.raises(EngineError, match=r"expected a C-contiguous float32 array of shape \(2, 1, 8, 8\)"):
            eng.run({"x": z(2), "noise": z(3)})
        with pytest.raises(EngineError, match="missing"):
            eng.run({"x": np.zeros((2, 1, 8, 8), np.float32)})  # this stochastic step also takes noise


@pytest.mark.slow
def test_other_backends_on_an_engine_dir(engine_dirs):
    model, plan, d = engine_dirs[("cond", "dpmpp_2m", 0.0)]
    with Runtime.load(d, backend="torch", model=model) as rt:
        assert rt.backend == "torch"
        a = rt.sample(2, seed=1)
    images, labels = sample_from_engines(d, 2, seed=1)
    assert (images - a).abs().max() <= 1e-3 and labels.shape == (2,)
    with pytest.raises(EngineError, match="holds onnxruntime engines, not tensorrt ones"):
        Runtime.load(d, backend="tensorrt")
    with pytest.raises(EngineError, match="holds onnxruntime engines, not openvino ones"):
        Runtime.load(d, backend="openvino")
    with pytest.raises(EngineError, match="unknown backend"):
        Runtime.load(d, backend="onnx")
    with pytest.raises(EngineError, match="build an engine dir first"):
        Runtime.from_plan(plan, backend="onnxruntime", model=model)
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        Runtime.load(d, providers=["cuda"])


# ------------------------------------------------------------- bad engine dirs
@pytest.fixture
def dir_copy(engine_dirs, tmp_path):
    model, plan, src = engine_dirs[("uncond", "dpmpp_2m", 0.0)]
    d = tmp_path / "engines"
    shutil.copytree(src, d)
    return model, plan, d


def edit_manifest(d, fn):
    path = d / MANIFEST_NAME
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


@pytest.mark.slow
def test_manifest_that_does_not_match_its_plan(dir_copy):
    model, plan, d = dir_copy

    def change_plan(m):  # the plan edited, its hash not
        m["plan"]["timesteps"] = [301, 200, 100]

    edit_manifest(d, change_plan)
    with pytest.raises(EngineError, match="does not match its plan"):
        Runtime.load(d)

    def consistent_plan_wrong_steps(m):  # a plan and hash that agree, steps built for another plan
        p = Plan.from_dict(m["plan"])
        m["plan_sha256"] = p.sha256()
        m["steps"][0]["skip"] = ["middle_block.1"]

    edit_manifest(d, consistent_plan_wrong_steps)
    with pytest.raises(EngineError, match=r"step 0 .*does not match the plan"):
        Runtime.load(d)


@pytest.mark.slow
def test_engine_dir_from_another_plan_is_refused(dir_copy, models):
    model, plan, d = dir_copy
    other = make_plan(model, "ddim")
    with pytest.raises(EngineError, match="built from a different plan"):
        Runtime.load(d, plan=other)
    Runtime.load(d, plan=plan).close()


@pytest.mark.slow
def test_missing_or_corrupted_engine_files(dir_copy):
    model, plan, d = dir_copy
    m = json.loads((d / MANIFEST_NAME).read_text())
    engine = d / m["steps"][2]["engine"]["file"]
    data = engine.read_bytes()
    engine.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="corrupted or truncated"):
        Runtime.load(d)
    engine.unlink()
    with pytest.raises(EngineError, match="is missing"):
        Runtime.load(d)


@pytest.mark.slow
def test_recorded_versions_must_match(dir_copy):
    model, plan, d = dir_copy
    edit_manifest(d, lambda m: m["versions"].update(onnxruntime="0.0.1"))
    with pytest.raises(EngineError, match=r"built with onnxruntime 0\.0\.1 but .* is installed"):
        Runtime.load(d)
    Runtime.load(d, check_versions=False).close()


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / MANIFEST_NAME).unlink(), "did not finish"),
    (lambda d: (d / MANIFEST_NAME).write_text('{"format": "autodiffusion-rt-engines", "vers'), "not valid JSON"),
    (lambda d: edit_manifest(d, lambda m: m.update(version=99)), "version"),
    (lambda d: edit_manifest(d, lambda m: m.update(complete=False)), "did not finish"),
    (lambda d: edit_manifest(d, lambda m: m["steps"][0]["engine"].update(file="../../etc/passwd")), "inside the engine dir"),
    (lambda d: edit_manifest(d, lambda m: m["steps"][0]["coefficients"].update(c_x=1.5)), "coefficient c_x"),
    (lambda d: edit_manifest(d, lambda m: m["steps"].pop()), "2 steps"),
])
@pytest.mark.slow
def test_bad_manifests_are_clear_errors(dir_copy, damage, match):
    model, plan, d = dir_copy
    damage(d)
    with pytest.raises(EngineError, match=match):
        Runtime.load(d)


def test_not_an_engine_dir(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        Runtime.load(tmp_path / "nowhere")
    with pytest.raises(Error, match="is missing"):
        Runtime.load(tmp_path)


@pytest.mark.slow
def test_tensorrt_not_installed_says_what_to_install(tensorrt_absent, dir_copy):
    model, plan, d = dir_copy
    from autodiffusion_rt.runtime.manifest import SETTINGS_HASH, settings_sha256

    # a tensorrt build's manifest, hash and all (an edit that keeps the old hash is refused: see test_hostile_input)
    edit_manifest(d, lambda m: m.update(backend="tensorrt") or m.update({SETTINGS_HASH: settings_sha256(m)}))
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        Runtime.load(d)


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    """Every configuration in its own process, on the tiny model: the rows, ratios and memory are there and consistent."""
    import benchmark

    configs = ["ddim-full", "torch-fp32", "openvino-fp32"]
    report = benchmark.run(tiny=True, configs=configs, engines_dir=tmp_path / "e", batch_sizes=[1, 2],
                           repeats=1, warmup=0, latency_runs=3, full_steps=3, threads=1, progress=False)
    assert report["notes"] == []
    rows = {(r["config"], r["batch"]): r for r in report["rows"]}
    assert {c for c, _ in rows} == set(configs) and {b for _, b in rows} == {1, 2}
    one = rows["openvino-fp32", 1]
    assert one["runs"] == 3 and one["p50"] <= one["p90"] <= one["p99"] and one["nfe"] == 4
    assert rows["ddim-full", 1]["nfe"] == 3 and rows["ddim-full", 2]["vs_ddim_full"] == 1.0
    assert rows["torch-fp32", 2]["vs_torch_fp32"] == 1.0
    for r in rows.values():  # the ratios are the baselines' medians over this row's median
        assert r["vs_torch_fp32"] == round(rows["torch-fp32", r["batch"]]["ms"] / r["ms"], 2)
        assert r["gflops"] > 0 and r["resident_mb"] > 0
    assert report["matmul_peak_gflops"]["fp32"] > 0 and report["matmul_peak_gflops"]["bf16"] > 0
    text = benchmark.format_report(report)
    assert "openvino-fp32" in text and "vs torch" in text
    json.dumps(report)  # the report is JSON


def test_onnxruntime_tensorrt_provider_gets_caches_in_the_engine_dir_and_a_profile(monkeypatch, tmp_path):
    import onnxruntime as ort

    from autodiffusion_rt.runtime import onnxruntime_providers

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    profile = {"x": ((1, 1, 8, 8), (4, 1, 8, 8), (8, 1, 8, 8)), "y": ((1,), (4,), (8,))}
    prov = onnxruntime_providers(None, cache_dir=tmp_path / "ort_trt_cache", fp16=True, profile=profile)
    name, opts = prov[0]
    assert name == "TensorrtExecutionProvider" and prov[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"] and opts["trt_fp16_enable"]
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(tmp_path / "ort_trt_cache")
    assert (tmp_path / "ort_trt_cache").is_dir()
    assert opts["trt_profile_min_shapes"] == "x:1x1x8x8,y:1"
    assert opts["trt_profile_opt_shapes"] == "x:4x1x8x8,y:4"
    assert opts["trt_profile_max_shapes"] == "x:8x1x8x8,y:8"
    assert onnxruntime_providers(["cpu"]) == ["CPUExecutionProvider"]


# ------------------------------------------------- speed and memory machinery
@pytest.mark.slow
def test_shared_weights_runtime_equals_unshared(engine_dirs):
    """One copy of the weights (add_initializer with shared OrtValues) must not change a single bit.

    What would catch this: a tensor shared by content with the wrong step (a hash or name mix-up)
    changes that step's output; no sharing at all leaves the shared maps empty.
    """
    from autodiffusion_rt.runtime.backends.ort_backend import shared_initializers

    model, plan, d = engine_dirs[("cond", "dpmpp_2m", 0.0)]
    with Runtime.load(d, threads=1, share_weights=True) as shared, Runtime.load(d, threads=1, share_weights=False) as copies:
        assert all(e._initializers for e in shared.engines) and not any(e._initializers for e in copies.engines)
        assert torch.equal(shared.sample(5, seed=2, clip=False), copies.sample(5, seed=2, clip=False))
    files = [d / s["engine"]["file"] for s in json.loads((d / MANIFEST_NAME).read_text())["steps"]]
    maps = shared_initializers(files)
    values = [v for m in maps for v in m.values()]
    assert len({id(v) for v in values}) < len(values)  # several steps read the same OrtValue


@pytest.mark.slow
def test_images_do_not_depend_on_the_chunk_size(engine_dirs):
    """Image i of sample(n, seed) is the same whether the runtime runs chunks of 4, 3, 2 or 1."""
    _, _, d = engine_dirs[("uncond", "ddim", 0.7)]  # stochastic: per-step noise must follow the sample
    with Runtime.load(d, threads=1) as rt:
        want = rt.sample(7, seed=21, clip=False)
        for chunk in (3, 2, 1):
            rt.max_batch = chunk
            assert torch.equal(rt.sample(7, seed=21, clip=False), want)


@pytest.mark.slow
def test_engines_record_and_check_the_cpu_instruction_set(dir_copy):
    from autodiffusion_rt.runtime.platform import cpu_isa

    model, plan, d = dir_copy
    record = json.loads((d / MANIFEST_NAME).read_text())["steps"][0]["engine"]["record"]
    assert record["isa"] == cpu_isa() and record["optimization"] == "all"
    edit_manifest(d, lambda m: m["steps"][1]["engine"]["record"].update(isa="x86_64:avx2,fma"))
    with pytest.raises(EngineError, match=r"step 1's engine was optimized for CPU 'x86_64:avx2,fma'.*rebuild"):
        Runtime.load(d)


@pytest.mark.slow
def test_plan_from_t999_onnxruntime_equals_torch_at_fp32_tolerance(models, tmp_path):
    """The conditions users run: a plan starting at t = 999 with x0 clipping on.

    At t = 999 x0 = (x - sqrt(1 - a) eps) / sqrt(a) multiplies float32 rounding of eps by
    sqrt(1/a - 1) ~ 156 (linear schedule); the clip bounds it again. What would catch this:
    a graph that drops the clip, or folds the step constants in float32 where the update
    needs them exact, moves the raw outputs far beyond 1e-4 relative.
    """
    model = models["cond"]
    ids = sorted(model.unet.layer_ids)
    plan = Plan.for_model(model, [999, 749, 499, 249], skip=[[], ids[:3], [], [ids[-1]]], spec="test:t999")
    assert plan.sampler == "ddim" and plan.to_dict()["sampler"]["clip_denoised"]
    d = tmp_path / "engines"
    build_engines(plan, d, model=model, max_batch=4, progress=False, backend="onnxruntime")
    with Runtime.load(d, threads=1) as rt, Runtime.from_plan(plan, model=model) as ref:
        a, b = rt.sample(6, seed=5, clip=False), ref.sample(6, seed=5, clip=False)
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= 1e-4 * scale
    assert (b.abs() < 1).float().mean() > 0.05  # not every pixel saturated


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0), ("dpmpp_2m", 0.0), ("ipndm", 0.0),
                                         ("unipc", 0.0), ("unipc3", 0.0)])
@pytest.mark.parametrize("nfe", [1, 2, 5, 7])
def test_step_buffer_plan_feeds_every_step_what_the_sampler_reads(sampler, eta, nfe):
    """Replay the plan's slots symbolically: each input must hold the value the sampler defines for it."""
    from autodiffusion_rt.diffusion import NoiseSchedule, compute_coefficients
    from autodiffusion_rt.diffusion.step_io import step_tensors
    from autodiffusion_rt.runtime.device import plan_step_buffers

    ts = list(np.linspace(999, 50, nfe).round().astype(int)) if nfe > 1 else [500]
    coeffs = compute_coefficients(sampler, NoiseSchedule.named("linear"), ts, eta)
    io = [step_tensors(coeffs, i, (1, 4, 4), conditional=True) for i in range(nfe)]
    names = [([s.name for s in ins], [s.name for s in outs]) for ins, outs in io]
    plan, result, slots = plan_step_buffers(names)
    held = {plan[0].inputs["x"]: ("x_T",), ("y", 0): ("y",)}  # slot -> the value it holds now
    for i, (sb, (ins, outs)) in enumerate(zip(plan, names)):
        assert sorted(sb.inputs) == sorted(ins) and sorted(sb.outputs) == sorted(outs)
        assert not set(sb.inputs.values()) & set(sb.outputs.values()), f"step {i} reads and writes one slot"
        want = {"x": ("x_T",) if i == 0 else ("x_prev", i - 1), "y": ("y",), "prev_x0": ("x0", i - 1),
                "prev_x0_2": ("x0", i - 2), "prev_x0_3": ("x0", i - 3),
                "prev_eps1": ("eps", i - 1), "prev_eps2": ("eps", i - 2), "prev_eps3": ("eps", i - 3)}
        for name, slot in sb.inputs.items():
            if name == "noise":
                held[slot] = ("noise", i)  # refilled just before the step
            assert held.get(slot) == (want[name] if name != "noise" else ("noise", i)), (i, name)
        for name, slot in sb.outputs.items():
            held[slot] = (name, i)
    assert held[result] == ("x_prev", nfe - 1)
    assert set(slots) == {s for sb in plan for s in (*sb.inputs.values(), *sb.outputs.values())}


@pytest.mark.parametrize("case", [("uncond", "ddim", 0.7), ("cond", "dpmpp_2m", 0.0)])
@pytest.mark.slow
def test_device_resident_walk_on_cpu_ortvalues_equals_the_per_step_path(engine_dirs, case):
    """The GPU providers' walk (IOBinding with OrtValues), run with the OrtValues on the CPU: same sessions, same images."""
    from autodiffusion_rt.runtime.device import OrtValueMemory

    _, _, d = engine_dirs[case]
    with Runtime.load(d, threads=1) as host, Runtime.load(d, threads=1, device_resident=True) as walk:
        assert host._device_walk is None
        assert isinstance(walk._device_walk.memory, OrtValueMemory) and walk._device_walk.memory.device == "cpu"
        for n, seed in ((3, 1), (6, 2), (3, 1)):  # 6 > max batch 4: two chunks of two batch sizes; then reuse
            a, ya = host.sample(n, seed=seed, clip=False, return_labels=True)
            b, yb = walk.sample(n, seed=seed, clip=False, return_labels=True)
            assert torch.equal(a, b) and (ya is None or torch.equal(ya, yb))
        handles = dict(walk._device_walk._workspace(3)["handles"])
        walk.sample(3, seed=4)
        assert walk._device_walk._workspace(3)["handles"] == handles  # buffers kept across requests
