"""What decides whether a step's ONNX file or engine can be reused.

Two layers, each content-addressed:

* **ONNX key** (:func:`onnx_key`): everything the exported graph depends on:
  the weights (model fingerprint), the model's config and prediction type
  (eps / v, learned variance), the timestep, the six sampler constants of
  the step, the kept layers, the step's inputs/outputs, the label mode, the
  graph dtype, the opset, simplification, and the torch/onnx versions and
  exporter revision that produced it. Equal key, same graph: the export is
  skipped. A changed plan changes the key of exactly the steps it changes
  (for multistep samplers that includes the neighbours whose constants move).
* **Engine record** (:func:`engine_record`): the ONNX file's sha256, the
  backend, precision, batch profile, the library versions that shape the
  engine (onnxruntime; or tensorrt and the GPU's compute capability). An
  engine is reused only when its whole record matches.

Every file's sha256 is recorded; a file that no longer hashes to it
(truncated, corrupted) is rebuilt with a warning, never loaded. File names
carry a prefix of the key, and a rebuild of a step whose file the previous
manifest names (``--force``, or a corrupted file) writes the other name of the
pair (:func:`step_file`): engine bytes are not reproducible (onnxruntime's
node order, TensorRT's tactics), so overwriting would leave the old manifest
naming a file with another hash. A new build never overwrites a file the
previous manifest still names: an interrupted build leaves the old dir usable.
The steps a build has finished are journaled (:data:`PROGRESS_NAME`) until its
manifest is written, so the build after a ``kill -9`` reuses them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Optional

from autodiffusion_rt.records import loads_json
from autodiffusion_rt.utils import sha256_file, write_json

__all__ = [
    "EXPORTER_REVISION",
    "PROGRESS_NAME",
    "canonical_hash",
    "engine_record",
    "file_state",
    "onnx_key",
    "read_progress",
    "remove_unreferenced",
    "step_file",
    "write_progress",
]

#: Bump when the step module or the exporter changes what a given key produces.
EXPORTER_REVISION = 1

_STEP_FILE = re.compile(r"^(step\d+-[0-9a-f]+\.(onnx|plan|blob)|embeddings-[0-9a-f]+\.npz)$")


def canonical_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def onnx_key(
    *,
    model,
    timestep: int,
    row,
    keep: Optional[Iterable[str]],
    inputs,
    outputs,
    label_mode: Optional[str],
    onnx_dtype: str,
    opset: int,
    simplify: bool,
    versions: dict,
) -> str:
    """The content key of one step's ONNX graph (``model``: the plan's DiffusionModel)."""
    return canonical_hash(
        {
            "revision": EXPORTER_REVISION,
            "fingerprint": model.fingerprint,
            # The weights do not say everything the graph computes: the architecture (heads, attention
            # order, ...), the noise settings, and what the network predicts (eps, v; learned variance).
            "config": model.config,
            "prediction_type": model.prediction_type,
            "image_shape": list(model.image_shape),
            "num_classes": model.num_classes,
            "learn_sigma": bool(model.learn_sigma),
            "timestep": int(timestep),
            "row": [repr(float(v)) for v in row],  # repr: exact float64
            "keep": None if keep is None else sorted(keep),
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "label_mode": label_mode,
            "onnx_dtype": onnx_dtype,
            "opset": int(opset),
            "simplify": bool(simplify),
            "torch": versions.get("torch"),
            "onnx": versions.get("onnx"),
            "onnxslim": versions.get("onnxslim") if simplify else None,
        }
    )


def engine_record(
    *,
    onnx_sha256: str,
    backend: str,
    precision: str,
    onnx_dtype: str,
    batch: dict,
    versions: dict,
    isa: Optional[str] = None,
    optimization: Optional[str] = None,
    int8: Optional[dict] = None,
    strip_weights: bool = False,
) -> dict:
    """Everything an engine's reuse depends on (stored in the manifest; compared whole).

    onnxruntime engines also record the graph optimization level they were
    saved at and, since the ``all`` level lays tensors out for the CPU's
    vector width, the instruction set (``isa``). ``int8``: the quantization
    settings of a step built in int8 (calibration, its data).
    ``strip_weights`` (TensorRT): the engine holds no weights and is refitted
    from its ONNX file at load; only stripped records carry the key, so the
    records of engines built before it existed still match.
    """
    record = {
        "onnx_sha256": onnx_sha256,
        "backend": backend,
        "precision": precision,
        "onnx_dtype": onnx_dtype,
        "batch": {k: int(batch[k]) for k in ("min", "opt", "max")},
    }
    if backend == "onnxruntime":
        record["versions"] = {"onnxruntime": versions.get("onnxruntime")}
        record["compute_capability"] = None
        record["optimization"] = optimization
        record["isa"] = isa
    else:
        record["versions"] = {"tensorrt": versions.get("tensorrt")}
        record["compute_capability"] = versions.get("compute_capability")
    if int8 is not None:
        record["int8"] = int8
    if strip_weights:
        record["weights"] = "stripped"
    return record


def file_state(path: Path, sha256: Optional[str]) -> str:
    """``ok``, ``missing`` or ``corrupt`` (hash differs from the record)."""
    if not path.is_file():
        return "missing"
    if sha256 is None or sha256_file(path) != sha256:
        return "corrupt"
    return "ok"


def remove_unreferenced(engine_dir: Path, referenced: Iterable[str]) -> list[Path]:
    """Delete step files and leftover temporaries the manifest no longer names; return what was removed.

    Call it holding the dir's build lock (``build_engines`` does): then no other
    build is writing here, and every temp file left is a dead (killed) build's.
    """
    keep = {str(Path(r)) for r in referenced}
    removed = []
    for sub in ("onnx", "engines"):
        d = engine_dir / sub
        if not d.is_dir():
            continue
        for f in d.iterdir():
            rel = str(Path(sub) / f.name)
            # .qdq: an int8 build's intermediate
            stale_tmp = f.name.startswith(".") and f.name.endswith((".tmp", ".qdq"))
            if f.is_file() and (stale_tmp or (_STEP_FILE.match(f.name) and rel not in keep)):
                f.unlink()
                removed.append(f)
    for f in engine_dir.iterdir():
        if f.is_file() and f.name.startswith((".manifest.json.", f".{PROGRESS_NAME}.")) and f.name.endswith(".tmp"):
            f.unlink()
            removed.append(f)
    return removed


def step_file(sub: str, index: int, digest: str, ext: str, named: set) -> str:
    """The relative path of step ``index``'s file in ``sub``: ``stepNN-<digest[:16]><ext>``, or, when the previous
    manifest names that path (``named``), ``stepNN-<digest[16:32]><ext>`` (see the module docstring)."""
    rel = f"{sub}/step{index:02d}-{digest[:16]}{ext}"
    return rel if rel not in named else f"{sub}/step{index:02d}-{digest[16:32]}{ext}"


#: The journal of the steps a running (or killed) build has finished; removed once the manifest is written.
PROGRESS_NAME = "build-progress.json"  # visible: it says a build did not finish


def read_progress(engine_dir: Path) -> list[dict]:
    """The step entries a build that did not finish journaled ([] if none; unreadable: [] too, those steps are rebuilt).

    Data only (JSON); every file an entry names is still checked against its sha256 before it is reused.
    """
    try:
        d = loads_json((Path(engine_dir) / PROGRESS_NAME).read_bytes())
    except (OSError, ValueError):
        return []
    steps = d.get("steps") if isinstance(d, dict) else None
    if not isinstance(steps, list):
        return []
    return [
        s
        for s in steps
        if isinstance(s, dict) and isinstance(s.get("onnx"), dict) and isinstance(s.get("engine"), dict)
    ]


def write_progress(engine_dir: Path, steps: list[dict]) -> None:
    """Journal the finished steps (manifest step entries), atomically."""
    write_json(Path(engine_dir) / PROGRESS_NAME, {"steps": steps}, indent=None)
