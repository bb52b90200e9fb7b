"""OpenVINO engine dirs: one verified ONNX graph and one compiled blob per distinct subnetwork, and the steps'
embeddings.

The steps of a plan that skip the same layers run the same graph
(:class:`export.subnet.SubnetModule`, ``x, emb -> out``), so the dir holds one
ONNX file per distinct keep set, named after the first step that uses it, and
one OpenVINO blob per (keep set, precision) that the steps use; what the steps
differ in (their embeddings) is ``engines/embeddings-<hash>.npz``. The sampler
update runs in float32 outside the graph
(:class:`autodiffusion_rt.runtime.backends.ov_backend.OpenVINOStepEngine`).

A bf16 build passes the FID gate (:func:`export.build.fid_gate`): the plan's
FID with bf16 subnetworks may rise at most ``max_fid_rise`` over fp32's, else
the failing steps run fp32. A model the gate's features cannot read (no
reference images for it) is built in bf16 unchecked, and the manifest says so.
"""

from __future__ import annotations

import io
import time
from typing import Optional

import numpy as np

from autodiffusion_rt.diffusion.step_io import step_io
from autodiffusion_rt.errors import DataError, EngineError
from autodiffusion_rt.runtime.backends.ov_backend import (
    blob_record,
    compile_subnet,
    static_batches,
    subnet_engines,
    subnet_from_entry,
)
from autodiffusion_rt.utils import atomic_write, sha256_file

from .cache import EXPORTER_REVISION, canonical_hash, step_file
from .context import BuildContext, export_entry, fid_gate, file_entry
from .subnet import SubnetModule, step_embeddings

__all__ = ["build_openvino_steps", "subnet_key"]


def subnet_key(model, keep: Optional[frozenset], opset: int, versions: dict) -> str:
    """The content key of a shared subnetwork's ONNX graph: the weights, the architecture, the kept layers,
    the exporter."""
    return canonical_hash(
        {
            "kind": "subnet",
            "revision": EXPORTER_REVISION,
            "fingerprint": model.fingerprint,
            "config": model.config,
            "image_shape": list(model.image_shape),
            "num_classes": model.num_classes,
            "learn_sigma": bool(model.learn_sigma),
            "keep": None if keep is None else sorted(keep),
            "opset": int(opset),
            "torch": versions.get("torch"),
            "onnx": versions.get("onnx"),
        }
    )


def build_openvino_steps(ctx: BuildContext) -> tuple[list, list, dict]:
    """Every step's manifest entry, what was done per step, and the manifest's ``bf16`` and ``embeddings`` entries."""
    from tqdm import tqdm

    s, model = ctx.settings, ctx.model
    subnet_of: dict = {}  # keep set -> subnetwork index, in the order the schedule meets them
    first_step: dict[int, int] = {}
    for i, keep in enumerate(ctx.keeps):
        k = subnet_of.setdefault(keep, len(subnet_of))
        first_step.setdefault(k, i)
    bar = tqdm(total=len(subnet_of), desc=f"build openvino {s.precision}", disable=not s.progress, unit="subnet")
    onnx_entries, statuses = {}, {}
    try:
        for keep, k in subnet_of.items():
            onnx_entries[k], statuses[k] = _subnet_onnx(ctx, first_step[k], k, keep)
            bar.update(1)
    finally:
        bar.close()
    emb_entry = _write_embeddings(ctx)
    steps = []
    for i, keep in enumerate(ctx.keeps):
        k = subnet_of[keep]
        ins, outs = step_io(ctx.coeffs, i, model.image_shape, model.num_classes is not None)
        steps.append(
            {
                "index": i,
                "timestep": int(ctx.coeffs.timesteps[i]),
                "skip": list(ctx.plan.skip[i]),
                "coefficients": ctx.coeffs.row(i)._asdict(),
                "macs_per_sample": int(model.unet.macs(keep)),
                "label_mode": None,
                "inputs": [sp.to_dict() for sp in ins],
                "outputs": [sp.to_dict() for sp in outs],
                "subnet": k,
                "onnx": onnx_entries[k],
            }
        )
    blobs: dict = {}

    def blob(k: int, precision: str) -> dict:
        if (k, precision) not in blobs:
            blobs[k, precision], built = _subnet_blob(ctx, first_step[k], onnx_entries[k], precision)
            statuses[k]["engine"] = "built" if built or statuses[k].get("engine") == "built" else "reused"
        return blobs[k, precision]

    gate = None
    if s.precision == "bf16":
        gate = _bf16_gate(ctx, steps, blob, emb_entry)
    for step, decision in zip(steps, gate["steps"] if gate else [None] * len(steps)):
        precision = "bf16" if decision is not None and decision["bf16"] else "fp32"
        step["engine"], step["precision"] = blob(step["subnet"], precision), precision
    report = [
        {
            "index": i,
            "timestep": st["timestep"],
            "subnet": st["subnet"],
            "onnx": statuses[st["subnet"]]["onnx"],
            "engine": statuses[st["subnet"]].get("engine", "reused"),
        }
        for i, st in enumerate(steps)
    ]
    return steps, report, {"bf16": gate, "embeddings": emb_entry}


def _subnet_onnx(ctx: BuildContext, i: int, k: int, keep) -> tuple[dict, dict]:
    """Subnetwork k's verified ONNX entry (exported now, or reused by key), named after its first step ``i``."""
    key = subnet_key(ctx.model, keep, ctx.settings.opset, ctx.versions)
    entry = ctx.reuse("onnx", key, f"exporting subnetwork {k} again")
    if entry is not None:
        return entry, {"onnx": "reused"}
    ctx.need_write(f"subnetwork {k}'s ONNX file")
    module = SubnetModule(ctx.model, keep, index=k).eval()
    return export_entry(ctx, step_file("onnx", i, key, ".onnx", ctx.named), module, key), {"onnx": "exported"}


def _subnet_blob(ctx: BuildContext, i: int, onnx_entry: dict, precision: str) -> tuple[dict, bool]:
    """A subnetwork's compiled blobs at ``precision``: a dynamic batch, and ``static`` for :func:`static_batches`
    (each compiled now, or reused by its record); whether any was built."""
    entry, built = _one_blob(ctx, i, onnx_entry, precision, None)
    static = {}
    for batch in static_batches(ctx.settings.batch):
        static[str(batch)], made = _one_blob(ctx, i, onnx_entry, precision, batch)
        built = built or made
    return {**entry, "static": static}, built


def _one_blob(ctx: BuildContext, i: int, onnx_entry: dict, precision: str, batch) -> tuple[dict, bool]:
    record = blob_record(onnx_entry["sha256"], precision, batch)
    digest = canonical_hash(record)
    entry = ctx.reuse("engine", digest, f"compiling step {i}'s subnetwork again")
    if entry is not None:
        return {k: v for k, v in entry.items() if k != "static"}, False
    ctx.need_write(f"the {precision} blob of step {i}'s subnetwork")
    start = time.perf_counter()
    compiled = compile_subnet(ctx.out_dir / onnx_entry["file"], precision, threads=None, batch=batch)
    rel = step_file("engines", i, digest, ".blob", ctx.named)
    with atomic_write(ctx.out_dir / rel, "wb") as f:
        f.write(compiled.export_model().getvalue())
    return file_entry(ctx.out_dir, rel, record=record, seconds=time.perf_counter() - start), True


def _write_embeddings(ctx: BuildContext) -> dict:
    """``engines/embeddings-<hash>.npz``: each step's time embedding and the labels' (content-named, written once)."""
    buf = io.BytesIO()
    np.savez(buf, **step_embeddings(ctx.model, ctx.coeffs.timesteps))
    data = buf.getvalue()
    digest = canonical_hash(data.hex())
    rel = f"engines/embeddings-{digest[:16]}.npz"
    path = ctx.out_dir / rel
    if not (path.is_file() and path.read_bytes() == data):
        ctx.need_write("the steps' embeddings")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            f.write(data)
    return {"file": rel, "sha256": sha256_file(path)}


def _bf16_gate(ctx: BuildContext, steps: list, blob, emb_entry: dict) -> dict:
    """Which steps keep their bf16 subnetwork: the FID gate, reused from the last build when nothing it saw changed."""
    from autodiffusion_rt.metrics import get_extractor

    s = ctx.settings
    why = None
    if s.fid_reference is None:
        why = "no reference images were given (fid_reference=None)"
    else:
        try:
            get_extractor(s.fid_extractor).check_shape(tuple(ctx.model.image_shape))
        except (DataError, EngineError, ValueError) as e:
            why = f"the {s.fid_extractor} features cannot judge this model's images ({str(e).splitlines()[0]})"
    if why is not None:
        msg = f"bf16 was not quality-checked: {why}; every step runs bf16 unchecked"
        if s.progress:
            print(msg)
        return {"checked": False, "reason": why, "steps": [{"bf16": True} for _ in steps]}
    key = canonical_hash(
        {
            "onnx": [st["onnx"]["sha256"] for st in steps],
            "embeddings": emb_entry["sha256"],
            "fp32": blob_record("", "fp32"),
            "samples": s.fid_samples,
            "max_fid_rise": s.max_fid_rise,
            "extractor": str(s.fid_extractor),
            "reference": str(s.fid_reference),
            "plan": ctx.plan.sha256(),
        }
    )
    old = (ctx.old or {}).get("bf16") if ctx.old is not None else None
    if isinstance(old, dict) and old.get("key") == key and old.get("checked") and not s.force:
        return old
    report = fid_gate(ctx, lambda mask: _runtime(ctx, steps, blob, emb_entry, mask), "bf16")
    report.update(checked=True, key=key)
    return report


def _runtime(ctx: BuildContext, steps: list, blob, emb_entry: dict, mask):
    """A Runtime over the dir's blobs with step i in bf16 where ``mask[i]``, for the gate."""
    from autodiffusion_rt.runtime import Runtime
    from autodiffusion_rt.runtime.runtime import ModelInfo

    model = ctx.model
    subnets = []
    for st, low in zip(steps, mask):
        entry = blob(st["subnet"], "bf16" if low else "fp32")
        if entry["file"] not in ctx.gate_subnets:  # each subnetwork loaded once for all the gate's runs
            onnx = ctx.out_dir / st["onnx"]["file"]
            ctx.gate_subnets[entry["file"]] = subnet_from_entry(ctx.out_dir, entry, lambda onnx=onnx: onnx,
                                                                st["onnx"]["sha256"], "bf16" if low else "fp32")
        subnets.append(ctx.gate_subnets[entry["file"]])
    with np.load(ctx.out_dir / emb_entry["file"], allow_pickle=False) as z:
        tables = {name: z[name] for name in z.files}
    engines = subnet_engines(
        steps,
        subnets,
        tables,
        ctx.coeffs,
        max_batch=ctx.settings.batch["max"],
        learn_sigma=bool(model.learn_sigma),
        prediction_type=model.prediction_type,
        alphas_cumprod=model.schedule.alphas_cumprod,
    )
    info = ModelInfo(model.name, tuple(model.image_shape), model.num_classes)
    return Runtime(engines, ctx.plan, ctx.coeffs, info, "openvino", ctx.settings.batch["max"])
