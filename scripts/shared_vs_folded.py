"""What sharing one subnetwork between steps costs against a fully folded step, on onnxruntime and OpenVINO.

    python scripts/shared_vs_folded.py --plan plans/embedded-mnist-nfe4.json --step 1 --batch-sizes 1,64

A folded step (what ``build`` makes for onnxruntime) has its timestep's
projections as constants and the sampler update fused into the graph; a shared
subnetwork (what ``build`` makes for OpenVINO) takes the embedding as an input
and leaves the update to float32 torch outside the engine, so one compiled
model serves every step that skips the same layers. This times one step of
``--plan`` both ways on each backend (median of ``--repeats`` after a warm-up),
each configuration in its own process (``benchmark.py --worker``'s rule), and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = (
    ("onnxruntime", "folded", "fp32"),
    ("onnxruntime", "shared", "fp32"),
    ("openvino", "folded", "fp32"),
    ("openvino", "shared", "fp32"),
    ("openvino", "folded", "bf16"),
    ("openvino", "shared", "bf16"),
    ("openvino", "shared-static", "bf16"),
)


def _worker(spec: dict) -> dict:
    """One (backend, layout, precision): the step's engine timed at each batch size."""
    import numpy as np
    import torch

    from autodiffusion_rt.runtime import Runtime

    torch.set_num_threads(spec["threads"])
    backend, layout, precision = spec["config"]
    i = spec["step"]
    if layout.startswith("shared"):  # the OpenVINO dir's step engine: shared subnetwork + float32 update
        d = spec["dirs"][f"openvino-{precision}"]
        if backend == "openvino":
            engine = Runtime.load(d, threads=spec["threads"]).engines[i]
        else:
            engine = _ort_shared(d, i, spec["threads"])
    else:  # the onnxruntime dir's fused step file, run by the backend
        d = Path(spec["dirs"]["onnxruntime-fp32"])
        if backend == "onnxruntime":
            engine = Runtime.load(d, threads=spec["threads"]).engines[i]
        else:
            engine = _ov_folded(d, i, precision, spec["threads"])
    rows = []
    for b in spec["batch_sizes"]:
        if layout == "shared-static":  # the same subnetwork compiled for this batch size only
            engine.subnet = _static_subnet(spec["dirs"][f"openvino-{precision}"], i, precision, b, spec["threads"])
        rng = np.random.default_rng(0)
        feeds = {
            s.name: (
                rng.integers(0, 10, s.concrete(b))
                if s.dtype == "int64"
                else rng.standard_normal(s.concrete(b)).astype(np.float32)
            )
            for s in engine.inputs
        }
        for _ in range(2):
            engine.run(feeds)
        times = []
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            engine.run(feeds)
            times.append((time.perf_counter() - t) * 1e3)
        rows.append({"batch": b, "ms": round(statistics.median(times), 3)})
    return {"rows": rows}


def _static_subnet(d, i: int, precision: str, batch: int, threads: int):
    """The OpenVINO dir's step-i subnetwork with static shapes for ``batch`` (one compile per batch size)."""
    import openvino as ov

    from autodiffusion_rt.runtime.backends.ov_backend import CompiledSubnet, ov_config

    path = Path(d) / json.loads((Path(d) / "manifest.json").read_text())["steps"][i]["onnx"]["file"]
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({p.get_any_name(): [batch, *list(p.get_partial_shape())[1:]] for p in model.inputs})
    return CompiledSubnet(core.compile_model(model, "CPU", ov_config(precision, threads)), precision)


def _ort_shared(d, i: int, threads: int):
    """The OpenVINO dir's step i, its subnetwork run by onnxruntime instead (same embedding, same update)."""
    import onnxruntime as ort

    from autodiffusion_rt.runtime import Runtime
    from autodiffusion_rt.runtime.backends.ort_backend import ort_session_options

    engine = Runtime.load(d, threads=threads).engines[i]
    path = Path(d) / json.loads((Path(d) / "manifest.json").read_text())["steps"][i]["onnx"]["file"]
    session = ort.InferenceSession(str(path), ort_session_options(threads=threads), providers=["CPUExecutionProvider"])

    class OrtSubnet:
        precision = "fp32"

        def infer(self, x, emb):
            return session.run(None, {"x": x, "emb": emb})[0]

    engine.subnet = OrtSubnet()
    return engine


def _ov_folded(d: Path, i: int, precision: str, threads: int):
    """The onnxruntime dir's fused step i (its verified ONNX export) compiled by OpenVINO."""
    from autodiffusion_rt.runtime import Runtime
    from autodiffusion_rt.runtime.backends.ov_backend import compile_subnet

    engine = Runtime.load(d, threads=threads).engines[i]
    path = d / json.loads((d / "manifest.json").read_text())["steps"][i]["onnx"]["file"]
    request = compile_subnet(path, precision, threads).create_infer_request()
    names = engine.input_names

    def run(feeds, out=None):
        request.infer([feeds[n] for n in names], share_inputs=True)
        return {n: request.get_output_tensor(k).data for k, n in enumerate(engine.output_names)}

    engine.run = run
    return engine


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True)
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="keep the engine dirs here (reused by the next run)")
    args = p.parse_args()
    from autodiffusion_rt.plan import Plan
    from export.build import build_engines

    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        plan = Plan.load(args.plan)
        dirs = {}
        for backend, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")):
            dirs[f"{backend}-{precision}"] = str(work / f"{backend}-{precision}")
            build_engines(
                plan,
                dirs[f"{backend}-{precision}"],
                backend=backend,
                precision=precision,
                max_batch=max(batches),
                progress=False,
                int8_fid_samples=200,
            )
        print(f"step {args.step} of {args.plan}, {args.threads} threads, ms (median of {args.repeats})")
        print("| backend | layout | precision | " + " | ".join(f"batch {b}" for b in batches) + " |")
        print("|---|---|---|" + "---|" * len(batches))
        for config in CONFIGS:
            spec = {
                "config": config,
                "dirs": dirs,
                "step": args.step,
                "batch_sizes": batches,
                "repeats": args.repeats,
                "threads": args.threads,
            }
            out = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True
            )
            if out.returncode != 0:
                print(f"| {' | '.join(config)} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1]} |")
                continue
            rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
            print(f"| {' | '.join(config)} | " + " | ".join(f"{r['ms']:.2f}" for r in rows) + " |", flush=True)


if __name__ == "__main__":
    main()
