"""Bad input and faults, as a careful new user meets them: a table of cases across the CLI, the API and files.

Every CLI case asserts exit status 2, one line on stderr that names the bad
value, no traceback, and that nothing the user had (the files in the work
dir, byte for byte) was changed. CLI cases run in real subprocesses; to keep
the file quick, one subprocess runs a batch of cases through the real entry
points (``autodiffusion_rt.cli.main``, ``search.run.main``), each with its own
argv and captured stderr, and a few cases also run alone through the console
entry (``python -m ...``) to check the process itself. Fault cases (read-only
dir, full disk, concurrent builds, kill -9 of a build and of a search) use real
mounts and processes, and are skipped (with the reason) where the machine does
not allow them.

What would catch a regression: a traceback or a second line (the line count),
an exit status 0 for bad input (the status), an error that does not say which
value was wrong (the needle), and a failed command that still wrote or
deleted something (the snapshot of the work dir).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A user's work dir: a tiny ADM checkpoint, its plan, an engine dir built from it, and files they care about."""
    from conftest import core_random_model

    from autodiffusion_rt.plan import Plan
    from export.build import build_engines

    root = tmp_path_factory.mktemp("user")
    model = core_random_model()
    ckpt = root / "tiny.pt"
    torch.save(model.unet.state_dict(), ckpt)
    spec = f"adm:{ckpt}"
    plan = Plan.for_model(model, [999, 600, 300, 100], "ddim", spec=spec)
    plan.save(root / "plan.json")
    build_engines(plan, root / "engines", max_batch=8, progress=False, backend="onnxruntime")  # the model loaded from the plan, as the CLI does
    _nan_engine_dir(root, root / "nan-engines")
    # A plan whose config was edited: the embedded model's checkpoint records its schedule, and the plan's
    # now disagrees. (An adm: checkpoint records no config: there the plan is the only record, see the report.)
    from autodiffusion_rt import load_model

    embedded = load_model("embedded:mnist")
    d = Plan.for_model(embedded, [999, 500], "ddim", spec="embedded:mnist").to_dict()
    schedule = d["model"]["config"]["diffusion"]["noise_schedule"]
    d["model"]["config"]["diffusion"]["noise_schedule"] = "linear" if schedule != "linear" else "cosine"
    (root / "edited-plan.json").write_text(json.dumps(d))
    (root / "truncated-plan.json").write_text((root / "plan.json").read_text()[:200])
    d = plan.to_dict()
    d["version"] = 9
    (root / "future-plan.json").write_text(json.dumps(d))
    # A "plan" that is a pickle whose loading would run code (creates a marker file).
    (root / "pickled-plan.json").write_bytes(pickle.dumps(_Exploit(str(root / "PWNED"))))
    (root / "existing.png").write_bytes(b"the user's picture")
    (root / "a-file").write_text("not a directory")
    (root / "out-dir.png").mkdir()
    (root / "out-dir.npz").mkdir()
    (root / "empty-engines").mkdir()
    bad = root / "bad-manifest"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format": "autodiffusion-rt-engines", "vers')
    return root


class _Exploit:
    """Unpickling this creates a file: the proof that a loader executed code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def snapshot(root: Path) -> dict:
    """Every file under ``root``: sha256 and mode (what a failed command must leave as it was)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = None
    return out


_DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys, traceback, warnings
    cases = json.loads(sys.stdin.read())
    results = []
    for entry, argv in cases:
        err, out = io.StringIO(), io.StringIO()
        code = None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                if entry == "search":
                    from search.run import main
                else:
                    from autodiffusion_rt.cli import main
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = "traceback"
        results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
    print(json.dumps(results))
""")


def run_batch(cases, cwd: Path, preexec_fn=None) -> list[dict]:
    """Run ``[(entry, argv), ...]`` in one fresh Python process (the real mains, argv and stderr per case)."""
    proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(cases), capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=900, preexec_fn=preexec_fn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(root: Path, argv) -> list[str]:
    return [a.format(root=root) for a in argv]


# ------------------------------------------------------------ the CLI table
# (id, entry, argv, needle): the one stderr line must contain the needle (the bad value, or what names it).
# {root} is the work dir. Cases that load a model use the tiny checkpoint or the embedded model.
SAMPLE = ["sample", "--out", "{root}/existing.png", "--quiet"]
TINY = ["--model", "adm:{root}/tiny.pt", "--preset", "nonexistent"]
CLI_CASES = [
    # sample: numbers
    ("n-zero", "adr", [*SAMPLE, "--n", "0"], "--n 0"),
    ("n-negative", "adr", [*SAMPLE, "--n", "-5"], "--n -5"),
    ("n-huge", "adr", [*SAMPLE, "--n", "1000000000", "--out", "{root}/x.npz"], "1000000000"),
    ("n-grid-cap", "adr", [*SAMPLE, "--n", "5000"], "--n 5000"),
    ("n-not-int", "adr", [*SAMPLE, "--n", "ten"], "'ten'"),
    ("seed-negative", "adr", [*SAMPLE, "--seed", "-1"], "--seed=-1"),
    ("seed-2^63", "adr", [*SAMPLE, "--seed", str(2**63)], str(2**63)),
    ("seed-float", "adr", [*SAMPLE, "--seed", "1.5"], "'1.5'"),
    ("seed-text", "adr", [*SAMPLE, "--seed", "abc"], "'abc'"),
    ("labels-gap", "adr", [*SAMPLE, "--n", "4", "--labels", "1,,2,3"], "entry 2 is empty"),
    ("labels-text", "adr", [*SAMPLE, "--labels", "one"], "'one'"),
    ("labels-count", "adr", [*SAMPLE, "--n", "3", "--labels", "1,2"], "2 labels for --n 3"),
    ("labels-negative", "adr", [*SAMPLE, "--n", "2", "--labels=-1,2"], "-1"),
    ("labels-range", "adr", [*SAMPLE, "--labels", "12", "--steps", "2"], "label 12"),
    ("steps-zero", "adr", [*SAMPLE, "--steps", "0"], "--steps 0"),
    ("timesteps-repeat", "adr", [*SAMPLE, "--timesteps", "10,10"], "appears twice"),
    ("timesteps-ascending", "adr", [*SAMPLE, "--timesteps", "5,900"], "descending"),
    ("timesteps-range", "adr", [*SAMPLE, "--timesteps", "1500"], "1500"),
    ("timesteps-text", "adr", [*SAMPLE, "--timesteps", "a,b"], "'a'"),
    ("timesteps-gap", "adr", [*SAMPLE, "--timesteps", "999,,500"], "entry 2 is empty"),
    ("sampler-unknown", "adr", [*SAMPLE, "--sampler", "euler", "--steps", "2"], "'euler'"),
    ("eta-range", "adr", [*SAMPLE, "--eta", "2", "--steps", "2"], "--eta 2"),
    ("model-unknown", "adr", [*SAMPLE, "--model", "embedded:cifar"], "embedded:cifar"),
    ("model-missing-file", "adr", [*SAMPLE, "--model", "adm:/no/such/file.pt", "--preset", "imagenet64-cond"], "/no/such/file.pt"),
    ("option-format", "adr", [*SAMPLE, "--model", "adm:/no/such.pt", "--option", "num_channels"], "'num_channels'"),
    # sample: outputs (checked before any work)
    ("out-suffix", "adr", ["sample", "--out", "{root}/x.jpg"], "x.jpg"),
    ("out-proc", "adr", ["sample", "--out", "/proc/x.png", "--n", "2"], "/proc/x.png"),
    ("out-under-file", "adr", ["sample", "--out", "{root}/a-file/x.png"], "a-file"),
    ("out-is-dir", "adr", ["sample", "--out", "{root}/out-dir.png"], "out-dir.png"),
    # sample: conflicting flags say which one wins
    ("plan-and-engines", "adr", [*SAMPLE, "--plan", "{root}/plan.json", "--engines", "{root}/engines"], "it wins"),
    ("plan-and-steps", "adr", [*SAMPLE, "--plan", "{root}/plan.json", "--steps", "4"], "--steps given with --plan"),
    ("plan-and-model", "adr", [*SAMPLE, "--plan", "{root}/plan.json", "--model", "embedded:mnist"], "--model given with --plan"),
    ("engines-and-sampler", "adr", [*SAMPLE, "--engines", "{root}/engines", "--sampler", "ddpm"], "--sampler given with --engines"),
    ("engines-and-timesteps", "adr", [*SAMPLE, "--engines", "{root}/engines", "--timesteps", "999,1"], "--timesteps given with --engines"),
    ("backend-without-engines", "adr", [*SAMPLE, "--backend", "onnxruntime"], "--backend onnxruntime"),
    ("plan-and-backend", "adr", [*SAMPLE, "--plan", "{root}/plan.json", "--backend", "onnxruntime"], "--backend onnxruntime"),
    # sample: plan and engine files
    ("plan-missing", "adr", [*SAMPLE, "--plan", "{root}/nope.json"], "nope.json"),
    ("plan-is-dir", "adr", [*SAMPLE, "--plan", "{root}/engines"], "is a directory"),
    ("plan-truncated", "adr", [*SAMPLE, "--plan", "{root}/truncated-plan.json"], "truncated-plan.json"),
    ("plan-future-version", "adr", [*SAMPLE, "--plan", "{root}/future-plan.json"], "'version'"),
    ("plan-pickle", "adr", [*SAMPLE, "--plan", "{root}/pickled-plan.json"], "pickled-plan.json"),
    ("plan-config-edited", "adr", [*SAMPLE, "--plan", "{root}/edited-plan.json"], "noise_schedule"),
    ("engines-missing", "adr", [*SAMPLE, "--engines", "{root}/no-engines"], "no-engines"),
    ("engines-unbuilt", "adr", [*SAMPLE, "--engines", "{root}/empty-engines"], "empty-engines"),
    ("engines-bad-manifest", "adr", [*SAMPLE, "--engines", "{root}/bad-manifest"], "bad-manifest"),
    ("engines-backend-unknown", "adr", [*SAMPLE, "--engines", "{root}/engines", "--backend", "cuda"], "'cuda'"),
    ("engines-output-nan", "adr", [*SAMPLE, "--engines", "{root}/nan-engines", "--n", "2"], "step 1 (t=600)"),  # not a black PNG
    # build
    ("build-plan-missing", "adr", ["build", "{root}/nope.json", "--out", "{root}/e2", "--quiet"], "nope.json"),
    ("build-plan-dir", "adr", ["build", "{root}/engines", "--out", "{root}/e2", "--quiet"], "is a directory"),
    ("build-config-edited", "adr", ["build", "{root}/edited-plan.json", "--out", "{root}/e2", "--quiet"], "noise_schedule"),
    ("build-max-batch", "adr", ["build", "{root}/plan.json", "--out", "{root}/e2", "--max-batch", "0"], "--max-batch 0"),
    ("build-opt-batch", "adr", ["build", "{root}/plan.json", "--out", "{root}/e2", "--opt-batch", "99", "--quiet"], "opt_batch=99"),
    ("build-opset", "adr", ["build", "{root}/plan.json", "--out", "{root}/e2", "--opset", "11"], "--opset 11"),
    ("build-workspace", "adr", ["build", "{root}/plan.json", "--out", "{root}/e2", "--workspace-mb", "0"], "--workspace-mb 0"),
    ("build-out-file", "adr", ["build", "{root}/plan.json", "--out", "{root}/a-file", "--quiet"], "a-file"),
    ("build-out-under-file", "adr", ["build", "{root}/plan.json", "--out", "{root}/a-file/e", "--quiet"], "a-file"),
    ("build-out-proc", "adr", ["build", "{root}/plan.json", "--out", "/proc/engines", "--quiet"], "/proc/engines"),
    ("build-backend", "adr", ["build", "{root}/plan.json", "--out", "{root}/e2", "--backend", "cuda"], "'cuda'"),
    # search (arguments are checked before the model or the data are loaded)
    ("search-seed-negative", "search", ["--seed", "-1", "--out", "{root}/s/p.json"], "--seed=-1"),
    ("search-seed-2^63", "search", ["--seed", str(2**63), "--out", "{root}/s/p.json"], str(2**63)),
    ("search-seed-float", "search", ["--seed", "0.5"], "'0.5'"),
    ("search-nfe", "search", ["--nfe", "0", "--out", "{root}/s/p.json"], "--nfe 0"),
    ("search-population", "search", ["--population", "0", "--out", "{root}/s/p.json"], "--population 0"),
    ("search-eta", "search", ["--eta", "2", "--out", "{root}/s/p.json"], "--eta 2"),
    ("search-budget-fraction", "search", ["--budget-fraction", "0", "--out", "{root}/s/p.json"], "--budget-fraction 0"),
    ("search-budget-macs-inf", "search", ["--budget-macs", "inf", "--out", "{root}/s/p.json"], "--budget-macs inf"),
    ("search-batch-size", "search", ["--batch-size", "0", "--out", "{root}/s/p.json"], "--batch-size 0"),
    ("search-threads", "search", ["--threads", "0", "--out", "{root}/s/p.json"], "--threads 0"),
    ("search-sampler", "search", ["--sampler", "euler", "--out", "{root}/s/p.json"], "'euler'"),
    ("search-out-dir", "search", ["--out", "{root}/engines"], "is a directory"),
    ("search-out-under-file", "search", ["--out", "{root}/a-file/p.json"], "a-file"),
    ("search-out-proc", "search", ["--out", "/proc/p.json"], "/proc/p.json"),
    ("search-checkpoint-is-out", "search", ["--out", "{root}/s/p.json", "--checkpoint", "{root}/s/p.json"], "--checkpoint"),
    # fid-stats / fid
    ("fid-stats-out-txt", "adr", ["fid-stats", "mnist", "--out", "{root}/stats.txt"], "stats.txt"),
    ("fid-stats-out-dir", "adr", ["fid-stats", "mnist", "--out", "{root}/out-dir.npz"], "out-dir.npz"),
    ("fid-stats-out-proc", "adr", ["fid-stats", "mnist", "--out", "/proc/stats.npz"], "/proc/stats.npz"),
    ("fid-stats-batch", "adr", ["fid-stats", "mnist", "--batch-size", "0"], "--batch-size 0"),
    ("fid-stats-source", "adr", ["fid-stats", "{root}/no-images"], "no-images"),
    ("fid-steps", "adr", ["fid", "--model", "embedded:mnist", "--steps", "0"], "--steps 0"),
    ("fid-seed", "adr", ["fid", "--model", "embedded:mnist", "--steps", "2", "--seed", "-3"], "--seed=-3"),
    ("fid-n", "adr", ["fid", "--model", "embedded:mnist", "--steps", "2", "--n", "1"], "--n 1"),
    ("fid-timesteps-gap", "adr", ["fid", "--model", "embedded:mnist", "--timesteps", "999,,1"], "entry 2 is empty"),
    # train (hardened by the lead; part of the table so it stays so)
    ("train-steps", "adr", ["train", "--steps", "0", "--out", "{root}/t.pt"], "steps=0"),
    ("train-batch", "adr", ["train", "--batch-size", "0", "--out", "{root}/t.pt"], "0"),
    ("train-lr", "adr", ["train", "--lr", "-1", "--out", "{root}/t.pt"], "-1"),
    ("train-init", "adr", ["train", "--init", "{root}/no-init.pt", "--out", "{root}/t.pt"], "no-init.pt"),
    ("train-out-proc", "adr", ["train", "--out", "/proc/t.pt", "--steps", "1"], "/proc/t.pt"),
]


@pytest.fixture(scope="module")
def cli_results(work):
    before = snapshot(work)
    cases = [(entry, fmt(work, argv)) for _, entry, argv, _ in CLI_CASES]
    results = run_batch(cases, work)
    return before, results


@pytest.mark.slow  # a table of CLI processes (11 s)
@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_clear_line(case, work, cli_results):
    before, results = cli_results
    r = results[CLI_CASES.index(case)]
    needle = case[3].format(root=work)
    lines = r["stderr"].strip().splitlines()
    assert r["code"] == 2, r
    assert "Traceback" not in r["stderr"], r["stderr"]
    assert len(lines) == 1, r["stderr"]
    assert needle in lines[0], lines[0]
    assert lines[0].split(": error: ", 1)[0] in ("autodiffusion-rt", "search.run") or ": error: " in lines[0]


@pytest.mark.slow  # the table's processes (see above)
def test_cli_bad_input_changed_nothing(work, cli_results):
    """After all the failed commands: every file as it was (e.g. existing.png, the plan, the engines), no new
    files or empty folders (e2/, s/), and the pickled plan's code never ran."""
    before, _ = cli_results
    assert snapshot(work) == before
    assert not (work / "PWNED").exists()


ALONE_CASES = [
    (["-m", "autodiffusion_rt.cli", "sample", "--labels", "1,,2", "--n", "3"], "entry 2 is empty"),
    (["-m", "autodiffusion_rt.cli", "sample", "--seed", str(2**64)], str(2**64)),
    (["-m", "autodiffusion_rt.cli", "sample", "--n", "x"], "'x'"),
    (["-m", "search.run", "--seed", "-1"], "--seed=-1"),
]


@pytest.fixture(scope="module")
def alone_results(tmp_path_factory):
    """Each ALONE_CASES command in its own process, each in an empty cwd, all started at once (the cost is the imports)."""
    cwds = [tmp_path_factory.mktemp("alone") for _ in ALONE_CASES]
    procs = [subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=ENV)
             for (argv, _), cwd in zip(ALONE_CASES, cwds)]
    return [(p.wait(timeout=300), p.communicate()[1], cwd) for p, cwd in zip(procs, cwds)]


@pytest.mark.slow  # a batch of CLI processes
@pytest.mark.parametrize("i", range(len(ALONE_CASES)), ids=[c[1] for c in ALONE_CASES])
def test_cli_alone_in_its_process(i, alone_results):
    """The process itself (not the batch driver): exit status 2, one line, nothing written in the cwd."""
    code, stderr, cwd = alone_results[i]
    needle = ALONE_CASES[i][1]
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in stderr, stderr
    assert list(cwd.iterdir()) == []


# ------------------------------------------------------------------- API
def test_api_seed_is_one_type_and_range(tiny_model):
    """sample(), Runtime.sample, SampleNoise: the same check (int in [0, 2^63)); 1.5 is not silently 1."""
    from autodiffusion_rt import sample
    from autodiffusion_rt.errors import SamplingError
    from autodiffusion_rt.plan import Plan
    from autodiffusion_rt.runtime import Runtime

    rt = Runtime.from_plan(Plan.for_model(tiny_model, [999, 500]), model=tiny_model)
    for bad in (1.5, "abc", -1, 2**63, True, np.float64(3.0)):
        with pytest.raises(SamplingError, match="seed"):
            sample(tiny_model, [999, 500], n=1, seed=bad)
        with pytest.raises(SamplingError, match="seed"):
            rt.sample(1, seed=bad)
    # the extremes of the range are fine, and numpy integers are integers
    assert rt.sample(1, seed=2**63 - 1).shape == (1, 1, 8, 8)
    assert torch.equal(rt.sample(1, seed=np.int64(5)), rt.sample(1, seed=5))


def test_api_n_limit_and_chunks_equal_one_call(tiny_model):
    """n above the documented limit is refused before allocating; first= gives the same images as one call."""
    from autodiffusion_rt import sample
    from autodiffusion_rt.errors import SamplingError
    from autodiffusion_rt.sampling import MAX_SAMPLES

    with pytest.raises(SamplingError, match=str(MAX_SAMPLES + 1)):
        sample(tiny_model, [999, 500], n=MAX_SAMPLES + 1)
    with pytest.raises(SamplingError, match="first"):
        sample(tiny_model, [999, 500], n=2, first=-1)
    whole = sample(tiny_model, [999, 500], sampler="ddpm", n=5, seed=3)
    parts = torch.cat([sample(tiny_model, [999, 500], sampler="ddpm", n=b - a, seed=3, first=a) for a, b in ((0, 2), (2, 5))])
    assert torch.allclose(whole, parts, atol=1e-5)  # the same draws; only batch-size rounding differs


def test_api_a_plan_can_be_a_path(work, tiny_model):
    """Runtime.load(dir, plan="plan.json") and Runtime.from_plan("plan.json") take a path; other types are refused."""
    from autodiffusion_rt.errors import PlanError
    from autodiffusion_rt.plan import Plan
    from autodiffusion_rt.runtime import Runtime

    rt = Runtime.load(work / "engines", plan=str(work / "plan.json"))
    ref = Runtime.from_plan(str(work / "plan.json"), model=tiny_model)
    assert torch.allclose(rt.sample(3, seed=4), ref.sample(3, seed=4), atol=1e-4)
    with pytest.raises(PlanError, match="int"):
        Runtime.load(work / "engines", plan=123)
    with pytest.raises(PlanError, match="is a directory"):
        Plan.load(work / "engines")


def test_api_plan_config_checked_against_the_model(work, embedded_model):
    """An edited plan config is refused by Plan.check_model, at build time and at sample time (no silent schedule)."""
    from autodiffusion_rt.errors import PlanError
    from autodiffusion_rt.plan import Plan
    from autodiffusion_rt.runtime import Runtime
    from export.build import build_engines

    edited = Plan.load(work / "edited-plan.json")
    with pytest.raises(PlanError, match="noise_schedule"):
        edited.check_model(embedded_model)
    with pytest.raises(PlanError, match="noise_schedule"):
        Runtime.from_plan(edited, model=embedded_model)
    with pytest.raises(PlanError, match="noise_schedule"):
        build_engines(edited, work / "never", model=embedded_model, progress=False, backend="onnxruntime")
    assert not (work / "never").exists()


def _nan_engine_dir(work: Path, dst: Path) -> Path:
    """A copy of the engine dir whose step-1 engine really outputs NaN (a weight set to NaN, hash re-recorded)."""
    import onnx
    from onnx import numpy_helper

    from autodiffusion_rt.utils import sha256_file

    shutil.copytree(work / "engines", dst)
    m = json.loads((dst / "manifest.json").read_text())
    f = dst / m["steps"][1]["engine"]["file"]
    g = onnx.load(str(f))
    for init in g.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 16:
            init.CopyFrom(numpy_helper.from_array(np.full_like(arr, np.nan), init.name))
            break
    onnx.save(g, str(f))
    m["steps"][1]["engine"]["sha256"] = sha256_file(f)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_nan_engine_is_an_error_naming_the_step_not_a_black_image(work, tmp_path):
    """What would catch this: without the finite check the PNG is written with NaN -> 0 (black) and exit 0."""
    from autodiffusion_rt.errors import SamplingError
    from autodiffusion_rt.runtime import Runtime

    assert torch.isfinite(Runtime.load(work / "engines").sample(2, seed=0)).all()  # the same dir before the NaN weight

    with pytest.raises(SamplingError, match=r"step 1 \(t=600\)"):
        Runtime.load(work / "nan-engines").sample(2, seed=0)
    # the CLI's `sample --engines nan-engines` is the table's case engines-output-nan (existing.png left as it was)


@pytest.mark.slow  # a search process
def test_crafted_search_checkpoint_cannot_run_code(tmp_path, search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    """A version-1 checkpoint with a pickled NSGA-II field (what the old loader unpickled) is refused, code not run."""
    from search.checkpoint import load_state
    from search.errors import SearchError
    from search.run import prepare, run_search

    opts = _search_opts(tmp_path)
    run_search(opts, search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, stop_after=1)
    ckpt = tmp_path / "plan.search-state.json"
    d = json.loads(ckpt.read_text())
    marker = tmp_path / "PWNED"
    d["version"], d["nsga2"] = 1, base64.b64encode(pickle.dumps(_Exploit(str(marker)))).decode()
    ckpt.write_text(json.dumps(d))
    settings = prepare(opts, search_tiny_model, search_tiny_extractor, search_tiny_ref_stats).run_settings
    with pytest.raises(SearchError, match="'nsga2'.*pickle.*start a new search"):
        load_state(ckpt, settings)
    d["version"] = 2
    ckpt.write_text(json.dumps(d))
    with pytest.raises(SearchError, match="'nsga2'"):
        load_state(ckpt, settings)
    assert not marker.exists()
    for name in ("checkpoint.py", "evolution.py", "_pymoo.py"):  # no loader left that could unpickle
        text = (REPO / "search" / name).read_text()
        assert "import pickle" not in text and "pickle.load" not in text, name


def _search_opts(tmp_path, **kw):
    from search.run import SearchOptions

    return SearchOptions(model="tiny:search", nfe=3, num_samples=24, population=6, generations=1, topk=2, mutants=2,
                         crossovers=2, budget_fraction=0.85, report=False, batch_size=12, out=str(tmp_path / "plan.json"),
                         quiet=True, **{"compute": "macs", **kw})


# (id, edit of the checkpoint JSON, the field the error must name)
DAMAGED = [
    ("truncated", lambda d: "TRUNCATE", "not valid JSON"),
    ("not-an-object", lambda d: [1, 2], "not a search checkpoint"),
    ("unknown-stage", lambda d: d.update(stage=7), "'stage'"),
    ("stage-text", lambda d: d.update(stage="two"), "'stage'"),
    ("generation-range", lambda d: d.update(generation=-5), "'generation'"),
    ("empty-rng", lambda d: d.update(rng_state={}), "'rng_state'"),
    ("rng-garbage", lambda d: d.update(rng_state={"bit_generator": "PCG64", "state": "x"}), "'rng_state'"),
    ("missing-memo", lambda d: d.pop("memo") and None, "'memo'"),
    ("memo-fid-text", lambda d: d["memo"][0].__setitem__(1, "abc"), "'memo[0]'"),
    ("memo-fid-negative", lambda d: d["memo"][0].__setitem__(1, "-1.0"), "'memo[0]'"),
    ("population-not-candidate", lambda d: d.update(population=[{"timesteps": "x"}]), "'population[0]'"),
    ("population-not-in-memo", lambda d: d.update(population=[{"timesteps": [900, 500, 100], "skip": [[], [], []]}]), "'population[0]'"),
    ("candidate-out-of-range", lambda d: d["memo"].append([{"timesteps": [5000, 500, 100], "skip": [[], [], []]}, "1.0"]), "outside [0, 1000)"),
    ("candidate-unknown-layer", lambda d: d["memo"].append([{"timesteps": [999, 500, 100], "skip": [["no.such"], [], []]}, "1.0"]), "no.such"),
    ("candidate-wrong-nfe", lambda d: d["memo"].append([{"timesteps": [999, 500], "skip": [[], []]}, "1.0"]), "expected NFE 3"),
    ("done-text", lambda d: d.update(done="yes"), "'done'"),
    ("elapsed-negative", lambda d: d.update(elapsed=-3), "'elapsed'"),
    ("counters-text", lambda d: d.update(counters={"unet_calls": "many"}), "'counters'"),
    ("history-not-list", lambda d: d.update(history={}), "'history'"),
    ("version-future", lambda d: d.update(version=99), "version 99"),
]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    """The text of a valid checkpoint after one generation (the damaged cases edit a copy)."""
    from search.run import run_search

    d = tmp_path_factory.mktemp("ckpt")
    run_search(_search_opts(d), search_tiny_model, search_tiny_extractor, search_tiny_ref_stats, stop_after=1)
    return (d / "plan.search-state.json").read_text()


@pytest.mark.slow  # runs a search first
@pytest.mark.parametrize("edit, field", [c[1:] for c in DAMAGED], ids=[c[0] for c in DAMAGED])
def test_damaged_search_checkpoint_is_a_search_error_naming_the_field(tmp_path, edit, field, good_checkpoint, search_tiny_model,
                                                                     search_tiny_extractor, search_tiny_ref_stats):
    """What would catch this: a KeyError/ValueError traceback, or a resume that runs on damaged state."""
    from search.errors import SearchError
    from search.run import run_search

    objs = (search_tiny_model, search_tiny_extractor, search_tiny_ref_stats)
    ckpt = tmp_path / "plan.search-state.json"
    ckpt.write_text(good_checkpoint)
    d = json.loads(ckpt.read_text())
    new = edit(d)
    text = ckpt.read_text()[:100] if new == "TRUNCATE" else json.dumps(d if new is None else new)
    ckpt.write_text(text)
    with pytest.raises(SearchError) as e:
        run_search(_search_opts(tmp_path, resume=True), *objs)
    msg = str(e.value)
    assert field in msg and ("start a new search" in msg or "drop --resume" in msg), msg
    assert ckpt.read_text() == text  # the damaged file is left for the user to inspect
    assert not (tmp_path / "plan.json").exists()


# ------------------------------------------------------------------ faults
@contextlib.contextmanager
def mounted(kind: str, target: Path, source: Path | None = None, size: str = "64k"):
    """A tiny tmpfs, or a read-only bind mount of ``source``, at ``target``; skip if this machine forbids mounts."""
    target.mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs":
        cmds = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)]]
    else:
        cmds = [["mount", "--bind", str(source), str(target)], ["mount", "-o", "remount,ro,bind", str(target)]]
    done = 0
    try:
        for c in cmds:
            if shutil.which(c[0]) is None or subprocess.run(c, capture_output=True).returncode != 0:
                pytest.skip(f"cannot {' '.join(c[:3])} here (needs root / CAP_SYS_ADMIN)")
            done += 1
        yield target
    finally:
        if done:
            subprocess.run(["umount", str(target)], capture_output=True)


@pytest.mark.slow  # builds an engine dir
def test_read_only_engine_dir_up_to_date_needs_no_write(work, tmp_path):
    """A read-only, up-to-date engine dir: build succeeds without rewriting the manifest, sample works;
    a read-only dir that needs a change: one clear line, exit 2. (Root ignores chmod, hence a ro bind mount.)"""
    src = tmp_path / "src"
    shutil.copytree(work / "engines", src)  # up to date as the CLI builds it
    before = snapshot(src)
    with mounted("ro", tmp_path / "ro", src) as ro:
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")  # the mount really is read-only
        r = run_batch([
            ("adr", ["build", str(work / "plan.json"), "--out", str(ro), "--backend", "onnxruntime", "--max-batch", "8", "--quiet"]),
            ("adr", ["sample", "--engines", str(ro), "--n", "2", "--out", str(tmp_path / "s.npz"), "--quiet"]),
            ("adr", ["build", str(work / "plan.json"), "--out", str(ro), "--backend", "onnxruntime", "--max-batch", "4", "--quiet"]),
        ], tmp_path)
    assert r[0]["code"] == 0 and "4 reused" in r[0]["stdout"], r[0]
    assert r[1]["code"] == 0, r[1]
    assert r[2]["code"] == 2 and "read-only" in r[2]["stderr"] and str(tmp_path / "ro") in r[2]["stderr"], r[2]
    assert len(r[2]["stderr"].strip().splitlines()) == 1 and "Traceback" not in r[2]["stderr"]
    assert snapshot(src) == before


def _fill(d: Path, leave: int = 0) -> None:
    """Fill the file system holding ``d`` until ``leave`` bytes are free (``d/filler.bin`` is then the user's file)."""
    fd = os.open(d / "filler.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(d / "filler.bin", max(0, os.path.getsize(d / "filler.bin") - leave))


@pytest.mark.slow
def test_full_disk_is_one_line_and_leaves_no_partial_file(work, tmp_path):
    """A full 64 KiB tmpfs (16 KiB left): sample --out x.npz, build and fid-stats --out fail with 'the disk is
    full', what was on the disk is intact, no partial or temp file is left. A search on a second tmpfs with 4 KiB
    left saves its first generation, then stops at the next with one line naming the checkpoint: the saved
    checkpoint is intact (--resume can continue it), no plan, no temp file."""
    with mounted("tmpfs", tmp_path / "full") as full, mounted("tmpfs", tmp_path / "full2") as full2:
        (full / "keep.txt").write_text("mine")
        (full / "old-engines").mkdir()
        _fill(full, leave=16 << 10)
        _fill(full2, leave=4 << 10)
        before = snapshot(full)
        out = full2 / "s" / "p.json"
        search = subprocess.Popen(_search_cmd(out), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        r = run_batch([
            ("adr", ["sample", "--plan", str(work / "plan.json"), "--n", "2000", "--out", str(full / "x.npz"), "--quiet"]),
            ("adr", ["build", str(work / "plan.json"), "--out", str(full / "eng"), "--backend", "onnxruntime", "--max-batch", "8", "--quiet"]),
            ("adr", ["fid-stats", "mnist", "--out", str(full / "stats.npz"), "--quiet"]),
        ], tmp_path)
        after = snapshot(full)
        _, search_err = search.communicate(timeout=600)
        ckpt = out.with_name("p.search-state.json")
        saved = json.loads(ckpt.read_text())
        left = sorted(p.name for p in out.parent.iterdir())
    for res in r:
        assert res["code"] == 2 and "disk is full" in res["stderr"], res
        assert len(res["stderr"].strip().splitlines()) == 1 and "Traceback" not in res["stderr"], res
    assert after == before  # no x.npz, no temp files, no half-built eng/ left
    assert search.returncode == 2, search_err
    assert len(search_err.strip().splitlines()) == 1 and "disk is full" in search_err and str(ckpt) in search_err, search_err
    assert len(saved["history"]) >= 1 and left == ["p.search-state.json"]


def _limit_file_size():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))


@pytest.mark.slow  # a CLI process per case
def test_write_failing_midway_is_one_line_and_leaves_no_partial_file(work, tmp_path):
    """Where mounts are not allowed too: a 16 KiB file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write
    past it fails with EFBIG) makes sample --out x.npz, build and fid-stats --out fail midway: one line naming the
    path, exit 2, and the folder as it was (no partial file, temp file or half-built dir)."""
    d = tmp_path / "out"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    before = snapshot(d)
    r = run_batch([
        ("adr", ["sample", "--plan", str(work / "plan.json"), "--n", "2000", "--out", str(d / "x.npz"), "--quiet"]),
        ("adr", ["build", str(work / "plan.json"), "--out", str(d / "eng"), "--backend", "onnxruntime", "--max-batch", "8", "--quiet"]),
        ("adr", ["fid-stats", "mnist", "--out", str(d / "stats.npz"), "--quiet"]),
    ], tmp_path, preexec_fn=_limit_file_size)
    for res, path in zip(r, ("x.npz", "eng", "stats.npz")):
        assert res["code"] == 2 and "size limit" in res["stderr"] and str(d / path) in res["stderr"], res
        assert len(res["stderr"].strip().splitlines()) == 1 and "Traceback" not in res["stderr"], res
    assert snapshot(d) == before


def _build_cmd(work: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autodiffusion_rt.cli", "build", str(work / "plan.json"), "--out", str(out), "--backend", "onnxruntime", "--max-batch", "8",
            "--quiet", *extra]


@pytest.mark.slow
def test_concurrent_builds_are_serialised(work, tmp_path):
    """A second build of a dir in use fails naming the lock (or waits with --wait-lock, writing nothing meanwhile);
    two builds started together into one new dir both succeed, one building and the other then reusing it all,
    and leave one valid dir with nothing stray. The lock of the first part is held by this test process:
    deterministic, no timing.

    What would catch a regression (the issue's crash): without the lock, the faster build's cleanup deletes the
    slower one's in-flight temp files and the slower one fails; or both build every step."""
    from autodiffusion_rt.runtime import Runtime
    from autodiffusion_rt.utils import file_lock

    out = tmp_path / "eng"
    shutil.copytree(work / "engines", out)  # up to date: the CLI's build reuses every step
    manifest = (out / "manifest.json").read_bytes()
    with file_lock(out / ".build.lock"):
        busy = subprocess.run(_build_cmd(work, out), capture_output=True, text=True, env=ENV, timeout=600)
        waiting = subprocess.Popen(_build_cmd(work, out, "--wait-lock"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        line = waiting.stderr.readline()  # it says it waits, then blocks until we release
        assert "waiting for the other build" in line, line
        assert (out / "manifest.json").read_bytes() == manifest
    assert waiting.wait(timeout=600) == 0 and "engines 0 built, 4 reused" in waiting.stdout.read()
    assert busy.returncode == 2 and "another build is writing" in busy.stderr and "--wait-lock" in busy.stderr, busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    # two builds started together into a new dir, both waiting as needed
    out2 = tmp_path / "eng2"
    procs = [subprocess.Popen(_build_cmd(work, out2, "--wait-lock"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted("engines 4 built, 0 reused" in o for o, _ in results) == [False, True], results
    assert sorted("engines 0 built, 4 reused" in o for o, _ in results) == [False, True], results
    ref = Runtime.load(work / "engines").sample(2, seed=1)
    assert torch.equal(Runtime.load(out2).sample(2, seed=1), ref)
    assert sorted(p.name for p in out2.iterdir()) == ["engines", "manifest.json", "onnx"]
    assert [p.name for p in out2.rglob(".*")] == []  # no temp or lock file
    for f in (out2 / "engines").iterdir():
        assert f.stat().st_mode & 0o044 == 0o044, f  # engines readable by another account (0644), like the manifest


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 600) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled, no blind sleep); fail if it ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the process ended (status {proc.returncode}) before {what}: nothing was killed mid-work"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _step_files(d: Path, hashes: bool = True) -> dict:
    """Every file under onnx/ and engines/: (inode, mtime, sha256); equal before and after: reused, not rewritten.
    Without ``hashes``: (inode, mtime), and files that vanish meanwhile (a running build's) are skipped."""
    out = {}
    for sub in ("onnx", "engines"):
        for p in sorted((d / sub).iterdir()) if (d / sub).is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out[f"{sub}/{p.name}"] = (st.st_ino, st.st_mtime_ns) + ((hashlib.sha256(p.read_bytes()).hexdigest(),) if hashes else ())
    return out


@pytest.mark.slow
def test_kill_9_of_a_build_loses_nothing(work, tmp_path):
    """kill -9 of a first build while step 1 is being exported: the dir says it is unfinished; the next build
    reuses exactly the finished steps (same inode, mtime, bytes), builds the rest, samples bit-identically to a
    clean build and removes the dead build's temp files and lock. kill -9 of a forced rebuild of a complete dir:
    the old dir still loads and samples the same (a rebuild must not overwrite a file the old manifest names),
    and the next build reuses it all.

    What would catch a regression: a next build that exports every step again (work lost), a temp file left
    for ever, or an old manifest naming an engine the killed build had replaced (a 'corrupted' dir)."""
    from autodiffusion_rt.errors import EngineError
    from autodiffusion_rt.runtime import Runtime

    ref = Runtime.load(work / "engines").sample(3, seed=2)  # a clean build's images
    out = tmp_path / "eng"
    proc = subprocess.Popen(_build_cmd(work, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: any(out.glob("engines/step00-*")) and any(out.glob("onnx/.step01-*.tmp")),
               "step 0's engine and step 1's temp ONNX file were on disk")
    with pytest.raises(EngineError, match="did not finish"):
        Runtime.load(out)
    dead = _step_files(out)
    finished = sorted(rel.split("/")[1][:6] for rel in dead if rel.startswith("engines/step"))  # a step's engine comes last
    assert finished and [rel for rel in dead if rel.endswith(".tmp")], dead  # the dead build's temp file is there
    r = subprocess.run(_build_cmd(work, out), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    k = len(finished)
    assert f"engines {4 - k} built, {k} reused" in r.stdout, r.stdout
    after = _step_files(out)
    reused = {rel: st for rel, st in dead.items() if rel.split("/")[1][:6] in finished}
    assert {rel: after.get(rel) for rel in reused} == reused  # the finished steps' ONNX files and engines untouched
    assert torch.equal(Runtime.load(out).sample(3, seed=2), ref)
    assert sorted(p.name for p in out.iterdir()) == ["engines", "manifest.json", "onnx"]  # no lock, journal or temp file

    # A forced rebuild of this complete dir, killed once its first new file is on disk.
    before, manifest = _step_files(out), (out / "manifest.json").read_bytes()
    proc = subprocess.Popen(_build_cmd(work, out, "--force"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: any(rel.startswith("engines/step") and st != before.get(rel, ())[:2]
                                 for rel, st in _step_files(out, hashes=False).items()), "the forced build wrote its first engine")
    assert (out / "manifest.json").read_bytes() == manifest
    assert {rel: _step_files(out).get(rel) for rel in before} == before  # every file the old manifest names is intact
    assert torch.equal(Runtime.load(out).sample(3, seed=2), ref)
    r = subprocess.run(_build_cmd(work, out), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0 and "engines 0 built, 4 reused" in r.stdout, (r.stdout, r.stderr)
    assert _step_files(out) == before  # the dead build's files and temp files removed, the old ones kept
    assert sorted(p.name for p in out.iterdir()) == ["engines", "manifest.json", "onnx"]


def _search_cmd(out: Path, *extra: str) -> list[str]:
    """The real search CLI on the embedded model, tiny: 8 samples, 4 generations per stage, NSGA-II in stage 2,
    FID fitness (no teacher), no held-out re-ranking, no report."""
    return [sys.executable, "-m", "search.run", "--nfe", "3", "--num-samples", "8", "--batch-size", "8", "--population", "6",
            "--generations", "3", "--topk", "2", "--mutants", "2", "--crossovers", "2", "--objective", "fid", "--dp-paths", "0",
            "--holdout-samples", "0", "--no-report", "--multi-objective", "--budget-fraction", "0.85", "--threads", "1",
            "--compute", "macs", "--quiet", "--out", str(out), *extra]


def _generations_saved(ckpt: Path) -> int:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return len(json.loads(ckpt.read_text())["history"])
    return 0


@pytest.mark.slow
def test_kill_9_of_a_search_loses_no_finished_generation(tmp_path):
    """kill -9 of `python -m search.run` inside NSGA-II's stage (after its first generation, with two to go): the
    checkpoint is whole, the dead process's lock does not block `--resume`, and the resumed search writes the plan
    and Pareto set an uninterrupted run with the same seed writes; no lock or temp file (the dead one's) is left.

    What would catch a regression: a resume that fails on the stale lock or the checkpoint, a resumed search that
    draws differently (RNG or NSGA-II state not restored: another plan), or a leftover temp file."""
    full = subprocess.Popen(_search_cmd(tmp_path / "full.json"), env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cut_out = tmp_path / "cut.json"
    cut = subprocess.Popen(_search_cmd(cut_out), env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut.search-state.json"
    _kill_when(cut, lambda: _generations_saved(ckpt) >= 6, "the first NSGA-II generation was saved")
    assert not cut_out.exists() and 6 <= _generations_saved(ckpt) < 8
    assert (tmp_path / ".cut.json.lock").exists()  # the dead search's lock file (its flock died with it)
    # What a kill inside a checkpoint write leaves (atomic_write's temp name): planted, since no poll can land
    # the kill inside that millisecond reliably. The resumed search must remove it.
    (tmp_path / ".cut.search-state.json.k9dead.tmp").write_text('{"format": "autodiffusion-rt-search-st')
    resumed = subprocess.run(_search_cmd(cut_out, "--resume"), env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert full.wait(timeout=600) == 0, full.stderr.read()
    a, b = json.loads((tmp_path / "full.json").read_text()), json.loads(cut_out.read_text())
    assert (a["timesteps"], a["skip"], a["fitness"]) == (b["timesteps"], b["skip"], b["fitness"])
    front = [[(p["timesteps"], p["skip"], p["fitness"]) for p in json.loads((tmp_path / f"{n}.pareto.json").read_text())["plans"]]
             for n in ("full", "cut")]
    assert front[0] == front[1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("cut", ".cut"))) == [
        "cut.json", "cut.pareto.json", "cut.search-state.json"]


def test_two_searches_on_one_out_do_not_both_succeed(tmp_path, search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    """The second search on an --out in use fails naming it (one result would otherwise silently vanish)."""
    from autodiffusion_rt.utils import file_lock
    from search.errors import SearchError
    from search.run import run_search

    out = tmp_path / "deep" / "plan.json"
    out.parent.mkdir()
    with file_lock(out.with_name(".plan.json.lock")):  # held as a running search holds it
        with pytest.raises(SearchError, match="another search is writing --out .*plan.json.*--wait-lock"):
            run_search(replace(_search_opts(tmp_path), out=str(out)), search_tiny_model, search_tiny_extractor, search_tiny_ref_stats)
    assert sorted(p.name for p in out.parent.iterdir()) == [".plan.json.lock"]  # no plan, no checkpoint written


def test_a_failed_search_leaves_no_empty_folders(tmp_path, search_tiny_model, search_tiny_extractor, search_tiny_ref_stats):
    from search.errors import SearchError
    from search.run import run_search

    opts = replace(_search_opts(tmp_path), out=str(tmp_path / "a" / "b" / "plan.json"), resume=True)
    with pytest.raises(SearchError, match="no search checkpoint"):
        run_search(opts, search_tiny_model, search_tiny_extractor, search_tiny_ref_stats)
    assert list(tmp_path.iterdir()) == []


def test_locked_output_dir_removes_only_what_it_made(tmp_path):
    """The lock / parent-dir / rollback of build and search (utils.locked_output_dir): a failure removes the dirs
    this writer made (a listed one with its files when ``discard``; a non-empty one stays otherwise) and never a
    dir that was there before; a held lock raises the caller's error and leaves no dir made."""
    from autodiffusion_rt.errors import Error
    from autodiffusion_rt.utils import file_lock, locked_output_dir

    (tmp_path / "old").mkdir()
    out = tmp_path / "old" / "a" / "out"
    for discard, left in ((True, []), (False, ["a", "a/out", "a/out/f"])):
        with pytest.raises(RuntimeError):
            with locked_output_dir(out / ".lock", [out], error=Error, busy="busy", fix="fix", discard=discard) as locked:
                assert locked and (out / ".lock").is_file()
                (out / "f").write_text("x")
                raise RuntimeError("the writer failed")
        assert sorted(str(q.relative_to(tmp_path / "old")) for q in (tmp_path / "old").rglob("*")) == left
    with file_lock(tmp_path / ".lock"):
        with pytest.raises(Error, match="^another writer$"):
            with locked_output_dir(tmp_path / ".lock", [tmp_path / "new"], error=Error, busy="another writer", fix="x"):
                pass
    assert not (tmp_path / "new").exists()


@pytest.mark.slow  # CLI processes
def test_warnings_do_not_print_the_library_source_line(work, tmp_path):
    """`autodiffusion-rt build` over a corrupted engine rebuilds it with a warning: one 'warning: ...' line naming
    the file, not Python's 'file.py:123: UserWarning' header and the warnings.warn source line."""
    out = tmp_path / "eng"
    shutil.copytree(work / "engines", out)
    m = json.loads((out / "manifest.json").read_text())
    f = out / m["steps"][0]["engine"]["file"]
    f.write_bytes(f.read_bytes()[:100])
    r = subprocess.run(_build_cmd(work, out), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0 and "engines 1 built, 3 reused" in r.stdout, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and str(f) in lines[0], lines
    assert "warnings.warn" not in r.stderr and ".py:" not in r.stderr and "UserWarning" not in r.stderr, r.stderr
