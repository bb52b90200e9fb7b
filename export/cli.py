"""``autodiffusion-rt build PLAN [--backend auto|onnxruntime|openvino|tensorrt]
[--precision auto|fp32|fp16|bf16|int8] --out DIR``."""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

# The registry, not the export modules: `build --help` answers before torch is imported.
from autodiffusion_rt.registry import BUILD_BACKENDS, BUILD_PRECISIONS, DEFAULT_OPSET, LABEL_MODES

__all__ = ["cmd_build", "main", "register"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``build`` subcommand (``func=cmd_build``)."""
    p = subparsers.add_parser(
        "build",
        help="compile a plan into an engine dir: one engine per step and manifest.json",
        description="Export each step of a plan (kept layers, folded timestep, fused sampler update; for OpenVINO "
        "one shared graph per distinct set of kept layers) to ONNX, verify it against PyTorch, compile it for the "
        "backend, and write DIR/manifest.json. Steps whose ONNX graph and engine record are unchanged are reused.",
    )
    p.add_argument("plan", help="plan.json from the search")
    p.add_argument(
        "--backend",
        choices=("auto", *BUILD_BACKENDS),
        default="auto",
        help="engine backend; auto: tensorrt on an NVIDIA GPU, else openvino, else onnxruntime (default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", *BUILD_PRECISIONS),
        default="auto",
        help="engine precision; auto: bf16 for openvino on a CPU with native bf16, else fp32; bf16 is "
        "openvino's, int8 onnxruntime's (default: %(default)s)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the engines take (default: %(default)s)")
    p.add_argument("--opt-batch", type=int, default=None, help="batch size TensorRT tunes for (default: min(16, max))")
    p.add_argument("--out", required=True, help="the engine dir to write (updated in place when it exists)")
    p.add_argument(
        "--label-mode",
        choices=LABEL_MODES,
        default="auto",
        help="class-conditional models: fold a per-class projection table, or keep label_emb in the graph",
    )
    p.add_argument(
        "--simplify", action="store_true", help="simplify each ONNX graph with onnxslim (pip install onnxslim)"
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, 17 or newer (default: %(default)s)")
    p.add_argument("--workspace-mb", type=int, default=None, help="TensorRT builder workspace limit in MiB")
    p.add_argument("--force", action="store_true", help="rebuild every step, ignoring the cache")
    p.add_argument(
        "--strip-weights",
        action="store_true",
        help="TensorRT: weight-stripped engines, refitted at load from the step's ONNX file in the dir",
    )
    p.add_argument(
        "--wait-lock",
        action="store_true",
        help="if another build is writing the same --out, wait for it (default: fail)",
    )
    p.add_argument(
        "--gate-fid-samples",
        "--int8-fid-samples",
        dest="gate_fid_samples",
        type=int,
        default=2000,
        help="bf16 and int8: samples of the FID check that decides which steps stay in low precision "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--gate-max-fid-rise",
        "--int8-max-fid-rise",
        dest="gate_max_fid_rise",
        type=float,
        default=0.05,
        help="bf16 and int8: largest relative FID rise over fp32 the low-precision steps may cause "
        "(default: %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build)
    return p


def cmd_build(args) -> int:
    from autodiffusion_rt.errors import EngineError
    from autodiffusion_rt.plan import Plan

    from .build import build_engines

    # Arguments first, before the plan's model is loaded.
    for name in ("max_batch", "opt_batch", "workspace_mb"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise EngineError(f"--{name.replace('_', '-')} {v}: must be a positive integer")
    if args.opset < 17:
        raise EngineError(f"--opset {args.opset}: use 17 or newer")
    if args.max_batch is not None:
        from autodiffusion_rt.limits import check_limit

        check_limit("batch", args.max_batch, "--max-batch", error=EngineError)
    if args.gate_fid_samples < 2:
        raise EngineError(f"--gate-fid-samples {args.gate_fid_samples}: FID needs at least 2 samples")
    if not (math.isfinite(args.gate_max_fid_rise) and args.gate_max_fid_rise >= 0):
        raise EngineError(f"--gate-max-fid-rise {args.gate_max_fid_rise}: must be a finite number >= 0 "
                          "(a relative FID rise)")
    plan = Plan.load(args.plan)
    report = build_engines(
        plan,
        args.out,
        backend=args.backend,
        precision=args.precision,
        max_batch=args.max_batch,
        opt_batch=args.opt_batch,
        label_mode=args.label_mode,
        simplify=args.simplify,
        opset=args.opset,
        force=args.force,
        workspace_bytes=None if args.workspace_mb is None else args.workspace_mb << 20,
        progress=not args.quiet,
        wait_lock=args.wait_lock,
        int8_fid_samples=args.gate_fid_samples,
        int8_max_fid_rise=args.gate_max_fid_rise,
        strip_weights=args.strip_weights,
    )
    print(f"built {report.summary()}")
    for kind in ("int8", "bf16"):
        gate = report.manifest.get(kind)
        if gate is None or gate.get("checked") is False:
            continue
        kept = [i for i, s in enumerate(gate["steps"]) if s[kind]]
        print(
            f"{kind}: steps {kept} kept in {kind} (FID {gate.get('fid', [s['fid'] for s in gate['steps']])} vs fp32 "
            f"{gate['fid_fp32']}, limit {gate['limit']}; {gate['samples']} samples, seed {gate['seed']}, "
            f"{gate['extractor']} features); the others run fp32"
        )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m export.cli build ...`` without the package's console script."""
    from autodiffusion_rt.cli import run_command

    parser = argparse.ArgumentParser(prog="autodiffusion-rt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command("autodiffusion-rt", lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
