"""Hostile files and options (issue 26): the patterns an adversarial pass found, as tables.

Each CLI case asserts exit status 2, one line on stderr naming the bad value
(the needle), no traceback, and that nothing in the work dir was written or
lost (its snapshot, byte for byte). The cases run in one process whose address
space is capped at 2 GiB above what its imports mapped: a size allocated before
it was checked would be a MemoryError, not the limit's line. The patterns:

1. options out of range or not finite (serve, train, benchmark.py, build, search.report) are refused before any work;
2. sizes read from files and options (model widths and depths, schedules, image sides, batches, .npz headers,
   image pixels) are checked against :mod:`autodiffusion_rt.limits` before anything is allocated;
3. records that parse are typed (``ckpt:`` files, training states, diffusers configs, manifests, plans);
4. JSON is bounded (depth, integer digits, NaN, lone surrogates): in files (exit 2) and request bodies (400);
5. locks and counts: ``train`` locks --out, a resumed state's step must agree with its own counts, a manifest's
   behaviour fields are covered by its hash, ``search.report`` refuses a plan its extractor cannot judge.

The service's readiness (a dead batcher is 503) and SIGTERM at several offsets of its start-up are at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bad_input import ENV, snapshot

REPO = Path(__file__).resolve().parents[1]

_DRIVER = textwrap.dedent("""
    import contextlib, io, json, os, resource, sys, traceback
    cases = json.loads(sys.stdin.read())
    import autodiffusion_rt.cli, benchmark, diffusers, search.report  # what maps much is mapped before the cap
    # The address space capped at what is mapped now + 2 GiB: a case that allocated what its file or option
    # asks for before checking it would be a MemoryError (a traceback), not the limit's one line.
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), resource.RLIM_INFINITY))
    results = []
    for entry, argv in cases:
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                if entry == "benchmark":
                    from benchmark import main
                elif entry == "report":
                    from search.report import main
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


def run_batch(cases, cwd: Path, env=None) -> list[dict]:
    """``[(entry, argv), ...]`` in one fresh Python process (the real mains; argv and stderr per case)."""
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or ENV,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- files a hostile user hands over
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (its pixels are not there: only the header may be read)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def _npz_with_header(path: Path, shape: tuple) -> None:
    """A tiny .npz whose arr_0 header declares ``shape`` (uint8) with no data behind it."""
    with zipfile.ZipFile(path, "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _diffusers_dir(root: Path, name: str, unet: object = None, scheduler: object = None, raw_unet: str = None) -> Path:
    """A diffusers directory (config.json, an empty weights file, scheduler_config.json); the checks come first."""
    d = root / name
    d.mkdir()
    base = {
        "_class_name": "UNet2DModel",
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    }
    config = {**base, **unet} if isinstance(unet, dict) else base if unet is None else unet
    (d / "config.json").write_text(raw_unet if raw_unet is not None else json.dumps(config))
    (d / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    sched = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
    }
    (d / "scheduler_config.json").write_text(json.dumps({**sched, **(scheduler or {})}))
    return d


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A work dir of damaged and oversized files, next to good ones (a tiny ckpt:, its plan and engines, a training
    state)."""
    from conftest import CORE_TINY_CONFIG, CORE_TINY_DIFFUSION, core_random_model

    from autodiffusion_rt.models.train import TrainSettings, train_embedded
    from autodiffusion_rt.plan import Plan
    from export.build import build_engines

    root = tmp_path_factory.mktemp("hostile")
    model = core_random_model()
    sd = model.unet.state_dict()
    good = {
        "format": 1,
        "name": "tiny",
        "config": dict(CORE_TINY_CONFIG),
        "diffusion": dict(CORE_TINY_DIFFUSION),
        "state_dict": sd,
        "training": {},
    }
    ckpts = {
        "good": good,
        "missing-key": {k: v for k, v in good.items() if k != "diffusion"},
        "extra-key": {**good, "surprise": 1},
        "list-config": {**good, "config": list(CORE_TINY_CONFIG.items())},
        "str-channels": {**good, "config": {**CORE_TINY_CONFIG, "model_channels": "32"}},
        "wide": {**good, "config": {**CORE_TINY_CONFIG, "model_channels": 10**6}},
        "deep": {**good, "config": {**CORE_TINY_CONFIG, "num_res_blocks": 10**6}},
        "huge-image": {**good, "config": {**CORE_TINY_CONFIG, "image_size": 100_000}},
        "long-schedule": {**good, "diffusion": {**CORE_TINY_DIFFUSION, "diffusion_steps": 10**10}},
        "int-weights": {**good, "state_dict": {k: v.to(torch.int64) for k, v in sd.items()}},
        "many-bytes": {
            **good,
            "config": {
                **CORE_TINY_CONFIG,
                "model_channels": 1024,
                "channel_mult": (1, 2, 4, 4),
                "num_res_blocks": 8,
                "image_size": 64,
            },
        },
    }
    for name, record in ckpts.items():
        torch.save(record, root / f"{name}.pt")
    (root / "empty.pt").write_bytes(b"")

    # diffusers directories
    _diffusers_dir(root, "df-list", unet=[1, 2, 3])
    _diffusers_dir(root, "df-beta-text", scheduler={"beta_start": "abc"})
    _diffusers_dir(root, "df-blocks-int", unet={"down_block_types": 5})
    _diffusers_dir(root, "df-wide", unet={"block_out_channels": [20000, 20000]})
    _diffusers_dir(root, "df-timesteps", scheduler={"num_train_timesteps": 10**10})
    _diffusers_dir(root, "df-sample-size", unet={"sample_size": 100000})
    _diffusers_dir(root, "df-negative-size", unet={"sample_size": -8})
    _diffusers_dir(root, "df-deep", raw_unet='{"sample_size": ' + _deep(30000) + "}")
    _diffusers_dir(root, "df-digits", raw_unet='{"sample_size": ' + "9" * 5000 + "}")
    _diffusers_dir(root, "df-nan", scheduler={"beta_end": float("nan")})

    # a plan, its engines, and damaged copies of both
    plan = Plan.for_model(model, [999, 600, 300], "ddim", spec=f"ckpt:{root / 'good.pt'}")
    plan.save(root / "plan.json")
    build_engines(plan, root / "engines", model=model, max_batch=4, progress=False)
    text = (root / "plan.json").read_text()
    (root / "plan-deep.json").write_text(text.replace('"sampler"', '"nest": ' + _deep(30000) + ', "sampler"', 1))
    (root / "plan-digits.json").write_text(text.replace('"sampler"', '"nest": ' + "7" * 5000 + ', "sampler"', 1))
    (root / "plan-nan.json").write_text(text.replace('"eta": 0.0', '"eta": NaN', 1))

    def damaged_engines(name: str, edit=None, raw=None):
        d = root / name
        shutil.copytree(root / "engines", d)
        m = json.loads((d / "manifest.json").read_text())
        if edit is not None:
            edit(m)
        (d / "manifest.json").write_text(raw(m) if raw else json.dumps(m))

    damaged_engines("eng-batch-max", lambda m: m["batch"].update(max=10**9))
    damaged_engines(
        "eng-batch-rehashed", lambda m: (m["batch"].update(max=10**9), m.update(settings_sha256=_rehash(m)))
    )
    damaged_engines("eng-classes", lambda m: m["model"].update(num_classes="ten"))
    damaged_engines("eng-backend-edit", lambda m: m.update(label_mode="graph"))
    damaged_engines(
        "eng-deep", raw=lambda m: json.dumps(m).replace('"versions"', '"nest": ' + _deep(30000) + ', "versions"', 1)
    )
    damaged_engines(
        "eng-digits", raw=lambda m: json.dumps(m).replace('"versions"', '"nest": ' + "1" * 5000 + ', "versions"', 1)
    )
    damaged_engines("eng-surrogate", raw=lambda m: json.dumps(m).replace('"versions"', '"\\ud800": 1, "versions"', 1))

    # image data: a bomb PNG (header only), an .npz whose header declares 146 GiB
    (root / "bomb").mkdir()
    (root / "bomb" / "big.png").write_bytes(_png_header(16000, 16000))
    _npz_with_header(root / "huge.npz", (2_000_000, 280, 280, 1))

    # a real training state (two steps of batch 2), then damaged copies
    settings = TrainSettings(steps=4, batch_size=2)
    train_embedded(root / "t.pt", settings, stop_at_step=2, quiet=True)
    state = torch.load(root / "t.pt.state", weights_only=True)
    states = {
        "step-negative": {**state, "step": -5},
        "step-huge": {**state, "step": 10**9},
        "step-edited": {**state, "step": 3},
        "step-text": {**state, "step": "abc"},
        "weights-shape": {**state, "model": {k: torch.zeros(2, 2, 2, 2, 2) for k in state["model"]}},
        "extra-field": {**state, "surprise": 1},
    }
    for name, s in states.items():
        torch.save(s, root / f"{name}.state")
    shutil.copy(root / "t.pt", root / "checkpoint-as.state")
    (root / "existing.png").write_bytes(b"the user's picture")
    return root


def _rehash(m: dict) -> str:
    from autodiffusion_rt.runtime.manifest import settings_sha256

    return settings_sha256(m)


# ---------------------------------------------------------------- the CLI table
# (id, entry, argv, needle). {root} is the work dir.
SAMPLE = ["sample", "--out", "{root}/existing.png", "--quiet", "--n", "1"]
ENG = ["serve", "--engines", "{root}/engines"]
TRAIN = ["train", "--out", "{root}/new.pt", "--quiet"]
RESUME = ["train", "--steps", "4", "--batch-size", "2", "--out", "{root}/resumed.pt", "--resume", "--quiet"]
BENCH = ["--tiny"]
CASES = [
    # 1. serve options: checked before any engine is read
    ("serve-wait-inf", "adr", [*ENG, "--max-wait-ms", "inf"], "--max-wait-ms inf"),
    ("serve-wait-nan", "adr", [*ENG, "--max-wait-ms", "nan"], "--max-wait-ms nan"),
    ("serve-wait-negative", "adr", [*ENG, "--max-wait-ms", "-1"], "--max-wait-ms -1"),
    ("serve-wait-huge", "adr", [*ENG, "--max-wait-ms", "1e300"], "--max-wait-ms 1e+300"),
    ("serve-deadline-nan", "adr", [*ENG, "--deadline-s", "nan"], "--deadline-s nan"),
    ("serve-deadline-inf", "adr", [*ENG, "--deadline-s", "inf"], "--deadline-s inf"),
    ("serve-deadline-zero", "adr", [*ENG, "--deadline-s", "0"], "--deadline-s 0"),
    ("serve-port-99999", "adr", [*ENG, "--port", "99999"], "--port 99999"),
    ("serve-port-65536", "adr", [*ENG, "--port", "65536"], "--port 65536"),
    ("serve-port-negative", "adr", [*ENG, "--port=-1"], "--port -1"),
    ("serve-threads-negative", "adr", [*ENG, "--threads=-1"], "--threads -1"),
    ("serve-threads-zero", "adr", [*ENG, "--threads", "0"], "--threads 0"),
    ("serve-max-batch-huge", "adr", [*ENG, "--max-batch", "100000000"], "--max-batch=100,000,000"),
    ("serve-max-batch-zero", "adr", [*ENG, "--max-batch", "0"], "--max-batch 0"),
    ("serve-queue-zero", "adr", [*ENG, "--queue-images", "0"], "--queue-images 0"),
    ("serve-body-zero", "adr", [*ENG, "--max-body-bytes", "0"], "--max-body-bytes 0"),
    ("serve-max-n-huge", "adr", [*ENG, "--max-n", "100000000", "--queue-images", "100000000"], "--max-n=100,000,000"),
    ("serve-manifest-deep", "adr", ["serve", "--engines", "{root}/eng-deep"], "nested deeper than 64"),
    ("serve-manifest-classes", "adr", ["serve", "--engines", "{root}/eng-classes"], "num_classes"),
    # train options and lost work
    ("train-batch-huge", "adr", [*TRAIN, "--batch-size", "100000000"], "--batch-size=100,000,000"),
    ("train-threads-negative", "adr", [*TRAIN, "--threads=-1"], "--threads -1"),
    ("train-checkpoint-every-nan", "adr", [*TRAIN, "--checkpoint-every", "nan"], "--checkpoint-every nan"),
    ("train-time-limit-negative", "adr", [*TRAIN, "--time-limit=-1"], "--time-limit -1"),
    ("train-stop-at-negative", "adr", [*TRAIN, "--stop-at-step=-1"], "--stop-at-step -1"),
    ("train-init-list-config", "adr", [*TRAIN, "--init", "{root}/list-config.pt"], "'config'"),
    ("resume-step-negative", "adr", [*RESUME, "--state", "{root}/step-negative.state"], "'step'"),
    ("resume-step-huge", "adr", [*RESUME, "--state", "{root}/step-huge.state"], "step=1000000000"),
    ("resume-step-edited", "adr", [*RESUME, "--state", "{root}/step-edited.state"], "step=3 disagrees"),
    ("resume-step-text", "adr", [*RESUME, "--state", "{root}/step-text.state"], "'step'"),
    ("resume-weights-shape", "adr", [*RESUME, "--state", "{root}/weights-shape.state"], "weights-shape.state"),
    ("resume-extra-field", "adr", [*RESUME, "--state", "{root}/extra-field.state"], "surprise"),
    ("resume-checkpoint", "adr", [*RESUME, "--state", "{root}/checkpoint-as.state"], "is a checkpoint"),
    # 2./3. ckpt: records: typed, and sized before allocating
    ("ckpt-missing-key", "adr", ["info", "--model", "ckpt:{root}/missing-key.pt"], "'diffusion'"),
    ("ckpt-extra-key", "adr", ["info", "--model", "ckpt:{root}/extra-key.pt"], "'surprise'"),
    ("ckpt-list-config", "adr", ["info", "--model", "ckpt:{root}/list-config.pt"], "'config'"),
    ("ckpt-str-channels", "adr", ["info", "--model", "ckpt:{root}/str-channels.pt"], "model_channels"),
    ("ckpt-int-weights", "adr", ["info", "--model", "ckpt:{root}/int-weights.pt"], "torch.int64"),
    ("ckpt-empty", "adr", ["info", "--model", "ckpt:{root}/empty.pt"], "empty.pt"),
    ("ckpt-wide", "adr", ["info", "--model", "ckpt:{root}/wide.pt"], "AUTODIFFUSION_RT_MAX_CHANNELS"),
    ("ckpt-deep", "adr", ["info", "--model", "ckpt:{root}/deep.pt"], "AUTODIFFUSION_RT_MAX_LAYERS"),
    ("ckpt-huge-image", "adr", ["info", "--model", "ckpt:{root}/huge-image.pt"], "image_size=100,000"),
    (
        "ckpt-long-schedule",
        "adr",
        ["info", "--model", "ckpt:{root}/long-schedule.pt"],
        "diffusion_steps=10,000,000,000",
    ),
    ("ckpt-many-bytes", "adr", ["info", "--model", "ckpt:{root}/many-bytes.pt"], "AUTODIFFUSION_RT_MAX_MODEL_BYTES"),
    (
        "adm-option-wide",
        "adr",
        ["info", "--model", "adm:{root}/good.pt", "--preset", "imagenet64-cond", "--option", "num_channels=1000000"],
        "AUTODIFFUSION_RT_MAX_CHANNELS",
    ),
    (
        "adm-option-text",
        "adr",
        ["info", "--model", "adm:{root}/no.pt", "--option", "num_channels=abc"],
        "num_channels='abc'",
    ),
    (
        "adm-option-zero-attention",
        "adr",
        ["info", "--model", "adm:{root}/no.pt", "--option", "attention_resolutions=0"],
        "attention_resolutions=0",
    ),
    (
        "adm-option-not-bool",
        "adr",
        ["info", "--model", "adm:{root}/no.pt", "--option", "class_cond=maybe"],
        "class_cond='maybe'",
    ),
    (
        "adm-option-steps",
        "adr",
        ["info", "--model", "adm:{root}/no.pt", "--option", "diffusion_steps=10000000000"],
        "diffusion_steps=10,000,000,000",
    ),
    # diffusers configs
    ("diffusers-list", "adr", ["info", "--model", "diffusers:{root}/df-list"], "config.json"),
    ("diffusers-beta-text", "adr", ["info", "--model", "diffusers:{root}/df-beta-text"], "'beta_start'"),
    ("diffusers-blocks-int", "adr", ["info", "--model", "diffusers:{root}/df-blocks-int"], "'down_block_types'"),
    ("diffusers-wide", "adr", ["info", "--model", "diffusers:{root}/df-wide"], "max(block_out_channels)=20,000"),
    (
        "diffusers-timesteps",
        "adr",
        ["info", "--model", "diffusers:{root}/df-timesteps"],
        "num_train_timesteps=10,000,000,000",
    ),
    ("diffusers-sample-size", "adr", ["info", "--model", "diffusers:{root}/df-sample-size"], "sample_size=100,000"),
    ("diffusers-negative-size", "adr", ["info", "--model", "diffusers:{root}/df-negative-size"], "sample_size=-8"),
    ("diffusers-deep", "adr", ["info", "--model", "diffusers:{root}/df-deep"], "nested deeper than 64"),
    ("diffusers-digits", "adr", ["info", "--model", "diffusers:{root}/df-digits"], "5,000 digits"),
    ("diffusers-nan", "adr", ["info", "--model", "diffusers:{root}/df-nan"], "'beta_end'"),
    # 4. bounded JSON in plans and manifests
    ("plan-deep", "adr", [*SAMPLE, "--plan", "{root}/plan-deep.json"], "nested deeper than 64"),
    ("plan-digits", "adr", [*SAMPLE, "--plan", "{root}/plan-digits.json"], "5,000 digits"),
    ("plan-nan", "adr", [*SAMPLE, "--plan", "{root}/plan-nan.json"], "eta"),
    ("build-plan-deep", "adr", ["build", "{root}/plan-deep.json", "--out", "{root}/e2", "--quiet"], "plan-deep.json"),
    (
        "build-max-batch-huge",
        "adr",
        ["build", "{root}/plan.json", "--out", "{root}/e2", "--max-batch", "100000"],
        "--max-batch=100,000",
    ),
    (
        "build-int8-rise-nan",
        "adr",
        ["build", "{root}/plan.json", "--out", "{root}/e2", "--gate-max-fid-rise", "nan"],
        "--gate-max-fid-rise nan",
    ),
    ("engines-deep", "adr", [*SAMPLE, "--engines", "{root}/eng-deep"], "nested deeper than 64"),
    ("engines-digits", "adr", [*SAMPLE, "--engines", "{root}/eng-digits"], "5,000 digits"),
    ("engines-surrogate", "adr", [*SAMPLE, "--engines", "{root}/eng-surrogate"], "lone surrogate"),
    ("engines-classes-text", "adr", [*SAMPLE, "--engines", "{root}/eng-classes"], "num_classes"),
    # 5. a manifest's behaviour fields are covered by its hash; batch.max within the limit even when re-hashed
    ("engines-batch-max-edited", "adr", [*SAMPLE, "--engines", "{root}/eng-batch-max"], "settings_sha256"),
    ("engines-label-mode-edited", "adr", [*SAMPLE, "--engines", "{root}/eng-backend-edit"], "settings_sha256"),
    (
        "engines-batch-max-rehashed",
        "adr",
        [*SAMPLE, "--engines", "{root}/eng-batch-rehashed"],
        "batch.max=1,000,000,000",
    ),
    # image data: sizes from headers
    ("fid-stats-npz-header", "adr", ["fid-stats", "{root}/huge.npz", "--out", "{root}/s.npz", "--quiet"], "arr_0"),
    ("fid-stats-png-bomb", "adr", ["fid-stats", "{root}/bomb", "--out", "{root}/s.npz", "--quiet"], "16000x16000"),
    (
        "fid-stats-batch-huge",
        "adr",
        ["fid-stats", "mnist", "--batch-size", "100000000", "--quiet"],
        "--batch-size=100,000,000",
    ),
    # benchmark.py counts (checked before the tiny model is made)
    ("bench-repeats-zero", "benchmark", [*BENCH, "--repeats", "0"], "--repeats 0"),
    ("bench-latency-runs-negative", "benchmark", [*BENCH, "--latency-runs=-1"], "--latency-runs -1"),
    ("bench-warmup-negative", "benchmark", [*BENCH, "--warmup=-3"], "--warmup -3"),
    ("bench-full-steps-zero", "benchmark", [*BENCH, "--full-steps", "0"], "--full-steps 0"),
    ("bench-threads-zero", "benchmark", [*BENCH, "--threads", "0"], "--threads 0"),
    ("bench-batch-sizes-huge", "benchmark", [*BENCH, "--batch-sizes", "1,100000000"], "--batch-sizes=100,000,000"),
    ("bench-gate-samples-one", "benchmark", [*BENCH, "--gate-samples", "1"], "--gate-samples 1"),
    ("bench-repeats-text", "benchmark", [*BENCH, "--repeats", "x"], "'x'"),
    # search.report: a plan its extractor cannot judge is refused, not reported as inf
    ("report-other-model", "report", ["{root}/plan.json", "--num-samples", "4", "--quiet"], "cannot judge"),
    ("report-batch-huge", "report", ["{root}/plan.json", "--batch-size", "100000000"], "--batch-size=100,000,000"),
]


@pytest.fixture(scope="module")
def cli_results(hostile):
    before = snapshot(hostile)
    results = run_batch([(entry, [a.format(root=hostile) for a in argv]) for _, entry, argv, _ in CASES], hostile)
    return before, results


def test_the_table_covers_every_pattern():
    assert len(CASES) >= 70 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.slow  # a table of ~70 CLI processes (10 s)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_clear_line(case, hostile, cli_results):
    _, results = cli_results
    r = results[CASES.index(case)]
    needle = case[3].format(root=hostile)
    lines = r["stderr"].strip().splitlines()
    assert r["code"] == 2, r
    assert "Traceback" not in r["stderr"] and len(lines) == 1, r["stderr"]
    assert needle in lines[0], lines[0]


@pytest.mark.slow  # the table's processes (see above)
def test_hostile_input_changed_nothing(hostile, cli_results):
    """After every refused command: each file as it was, nothing new (no e2/, s.npz, new.pt, resumed.pt, stats)."""
    before, _ = cli_results
    assert snapshot(hostile) == before


def test_the_defaults_admit_every_preset_the_readme_names():
    """The ADM ImageNet presets and the google/ddpm-cifar10-32 layout are within the limits (checked on the meta
    device)."""
    from autodiffusion_rt.models.diffusers_adapter import check_unet_limits
    from autodiffusion_rt.models.loading import ADM_PRESETS, adm_config, check_unet_config

    for preset in ADM_PRESETS:
        unet, _ = adm_config(preset)
        check_unet_config(unet, preset)
    pytest.importorskip("diffusers")
    cifar10 = {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [128, 256, 256, 256],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    }
    check_unet_limits(cifar10, "google/ddpm-cifar10-32")


def test_a_limit_is_raised_by_its_variable(hostile):
    """The override works and is the only way past a limit: the wide ckpt: passes the channel check once raised
    (and then stops at the model-bytes limit, which it also exceeds)."""
    from autodiffusion_rt import load_model
    from autodiffusion_rt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="MAX_CHANNELS"):
        load_model(f"ckpt:{hostile / 'wide.pt'}")
    os.environ["AUTODIFFUSION_RT_MAX_CHANNELS"] = str(10**7)
    try:
        with pytest.raises(CheckpointError, match="MAX_MODEL_BYTES"):
            load_model(f"ckpt:{hostile / 'wide.pt'}")
    finally:
        del os.environ["AUTODIFFUSION_RT_MAX_CHANNELS"]
    assert load_model(f"ckpt:{hostile / 'good.pt'}").image_shape == (1, 8, 8)


# ---------------------------------------------------------------- locks
def test_two_trains_on_one_out_do_not_both_succeed(tmp_path, capsys):
    """A second run on the same --out fails at once naming the lock, and the first one's files are untouched.
    (flock locks belong to an open file, so the lock held here excludes a second open in this process too.)"""
    from autodiffusion_rt.cli import main
    from autodiffusion_rt.utils import file_lock

    out = tmp_path / "m.pt"
    out.write_bytes(b"the first run's result")
    with file_lock(out.with_name(".m.pt.lock")):  # held as a running train holds it
        code = main(["train", "--out", str(out), "--steps", "2", "--batch-size", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "another 'autodiffusion-rt train' is writing --out" in err and len(err.splitlines()) == 1, err
    assert out.read_bytes() == b"the first run's result" and sorted(p.name for p in tmp_path.iterdir()) == [
        ".m.pt.lock",
        "m.pt",
    ]  # the lock: this test's


# ---------------------------------------------------------------- HTTP bodies and readiness
@pytest.fixture(scope="module")
def served(hostile):
    """A loaded ServeState over the tiny engines and a TestClient on its app (no uvicorn needed for these)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from autodiffusion_rt.serve.app import ServeSettings, ServeState, create_app

    state = ServeState({"tiny": hostile / "engines"}, ServeSettings(max_batch=2, threads=1))
    state.load()
    with TestClient(create_app(state, load_on_startup=False)) as client:
        yield state, client


BODIES = [
    ("deep", b'{"n": ' + _deep(30000).encode() + b"}", "nested deeper"),
    ("digits", b'{"n": ' + b"1" * 5000 + b"}", "5,000 digits"),
    ("surrogate-key", b'{"\\ud800": 1}', "lone surrogate"),
    ("surrogate-value", b'{"n": 1, "plan": "\\udfff"}', "lone surrogate"),
    ("nan", b'{"n": NaN}', "NaN"),
    ("huge-float", b'{"n": 1, "seed": 1e999}', "1e999"),
    ("not-utf8", b'{"n": 1, "format": "\xff"}', "utf-8"),
    ("seed-2^64", b'{"n": 1, "seed": 18446744073709551616}', "18446744073709551616"),
]


@pytest.mark.parametrize("body, needle", [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_hostile_bodies_are_4xx_with_a_json_error(served, body, needle):
    _, client = served
    r = client.post("/v1/samples", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert needle in r.json()["error"]["message"], r.text


def test_readyz_turns_503_when_a_batcher_dies(served, caplog):
    """Ready only while a batch can run: the batcher's thread ran its own warm-up; when it dies (here: a wait the
    settings would refuse, set on the live batcher, so threading's timeout overflows once a request waits to merge,
    i.e. arrives while a batch is marked running), /readyz says so and it is logged."""
    state, client = served
    batcher = state.batchers["tiny"]
    assert batcher.warmed.is_set() and client.get("/readyz").status_code == 200
    assert client.post("/v1/samples", json={"n": 1, "seed": 0, "format": "npy"}).status_code == 200
    batcher.max_wait_s = float("inf")
    with batcher._cond:
        batcher._running = True  # as if a batch were on the engines: the next request waits to merge
    with caplog.at_level("CRITICAL", logger="autodiffusion_rt.serve"):
        job = batcher.submit(1, 0, None, time.monotonic() + 30)
        batcher._thread.join(30)
    assert not batcher.serving and "OverflowError" in batcher.error
    assert job.future.exception().status == 503  # the queued request is answered, not left to time out
    r = client.get("/readyz")
    assert r.status_code == 503 and "stopped" in r.json()["error"]["message"], r.text
    assert client.post("/v1/samples", json={"n": 1}).status_code == 503
    assert any("batcher thread died" in rec.getMessage() for rec in caplog.records)


# ---------------------------------------------------------------- SIGTERM during serve start-up
def _serve_and_term(engines: Path, after_line: str | None, delay: float) -> tuple:
    """Start ``serve`` (two plans: two engine loads); SIGTERM ``delay`` s after ``after_line`` on its log
    (None: after the start). Returns (exit status, stderr)."""
    cmd = [
        sys.executable,
        "-m",
        "autodiffusion_rt.cli",
        "serve",
        "--port",
        "0",
        "--log-level",
        "info",
        *[a for k in range(2) for a in ("--engines", f"p{k}={engines}")],
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if after_line is not None and after_line in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if after_line is not None:
        assert seen.wait(120), "".join(lines)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(300)
    reader.join(10)
    return code, "".join(lines)


# (after this log line, delay s): from the interpreter's start, through the load of two plans, to ready.
OFFSETS = [
    (None, 0.3),
    ("Waiting for application startup", 0.0),
    ("Waiting for application startup", 0.2),
    ("plan p0", 0.0),
    ("Uvicorn running on", 0.5),
]


@pytest.mark.slow  # 20 serve start-ups
def test_sigterm_at_every_phase_of_serve_start_up_exits_cleanly(hostile, tmp_path):
    """Never an abort ('terminate called without an active exception', status -6/134) or a traceback: exit 0
    (nothing to drain yet, or drained), from the imports (main() takes the signals within a few tens of ms of
    the start) to ready. Only a signal before the interpreter reaches main() gets its default action (-15):
    allowed for the 0.3 s case alone, which a loaded machine may not bring that far. Alongside, 'build' and
    'train' get SIGTERM mid-way: 130 (build: interrupted, no temp file left) or train's own stop (0, state saved)."""
    # The serve offsets one at a time, build and train beside them: more processes at once on a small machine
    # (onnxruntime's spinning thread pools among them) slow each other down by minutes.
    others = {}

    def interrupt(name, argv, delay):
        proc = subprocess.Popen([sys.executable, "-m", "autodiffusion_rt.cli", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        others[name] = (proc.returncode, out, err)

    build = ["build", str(hostile / "plan.json"), "--out", str(tmp_path / "e"), "--quiet"]
    train = ["train", "--out", str(tmp_path / "t.pt"), "--steps", "100000", "--batch-size", "2", "--quiet"]
    beside = threading.Thread(target=lambda: (interrupt("build", build, 2.0), interrupt("train", train, 4.0)))
    beside.start()
    results = [_serve_and_term(hostile / "engines", after, delay) for after, delay in OFFSETS]
    beside.join()
    code, out, err = others["build"]
    assert code in (0, 130) and "Traceback" not in err and not list(tmp_path.rglob("*.tmp")), (code, err)
    assert code == 0 or err.strip() == "autodiffusion-rt: interrupted", err
    code, out, err = others["train"]
    assert "Traceback" not in err and not list(tmp_path.glob(".t.pt*.tmp")), (code, err)
    stopped = code == 0 and "stopped at step" in out and (tmp_path / "t.pt.state").is_file()
    assert stopped or code == 130, (code, out, err)
    for (after, delay), (code, stderr) in zip(OFFSETS, results):
        assert "terminate called" not in stderr and "Traceback" not in stderr, (after, delay, stderr)
        assert code == 0 or (after is None and code == -signal.SIGTERM), (after, delay, code, stderr)
