"""The ``autodiffusion-rt`` command line.

User errors (any :class:`autodiffusion_rt.errors.Error`) print one line and exit 2.
Subcommands of other packages (``build`` from ``export``; ``fid``, ``fid-stats``
and ``train-classifier`` from the metrics package) register themselves through a
``register(subparsers)`` function and are imported lazily, so the core never
depends on them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import DataError, Error, SamplingError

# Modules that add subcommands; a missing optional one is skipped.
_PLUGINS = ("autodiffusion_rt.metrics.cli", "export.cli")


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SamplingError(f"{what}={text!r} is not a comma-separated list of integers (e.g. 999,600,300,100)") from None


def parse_options(items: Sequence[str]) -> dict:
    """``key=value`` pairs for ADM checkpoints (guided-diffusion flag names)."""
    out: dict = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SamplingError(f"--option {item!r} must be key=value (e.g. num_channels=192)")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded:mnist", help="model spec: embedded:mnist or adm:PATH (default: %(default)s)")
    p.add_argument("--preset", default=None, help="ADM preset for adm: specs (e.g. imagenet64-cond)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="guided-diffusion flag for adm: specs, repeatable")


def load_model_from_args(args):
    from . import load_model

    overrides = parse_options(args.option)
    if args.preset:
        overrides["preset"] = args.preset
    return load_model(args.model, **overrides)


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default="ddim", help="ddim, ddpm or dpmpp_2m (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="number of uniformly spaced steps (default 50)")
    g.add_argument("--timesteps", default=None, help="explicit strictly descending timesteps, e.g. 999,600,300,100")
    p.add_argument("--spacing", default="linear", help="uniform spacing for --steps: linear or quadratic")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")


def timesteps_from_args(args, num_timesteps: int) -> list[int]:
    from .diffusion import uniform_timesteps

    if args.timesteps is not None:
        return parse_int_list(args.timesteps, "--timesteps")
    return uniform_timesteps(num_timesteps, 50 if args.steps is None else args.steps, args.spacing)


def check_image_output(path: Path) -> Path:
    """Refuse an output path before any work is done, not after."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".npz"):
        raise DataError(f"output {path} must end in .png (a grid) or .npz (the images)")
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise DataError(f"cannot write {path}: {existing} is not a writable directory")
    return path


def save_images(images, path: Path, labels=None) -> Path:
    """Write images in [-1, 1] as a PNG grid or an .npz of uint8 NHWC (``arr_0``, ADM's layout)."""
    import math

    import numpy as np

    from .data import to_uint8

    path = check_image_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images)
    from .utils import atomic_write

    if path.suffix == ".npz":
        extra = {} if labels is None else {"arr_1": np.asarray(labels)}
        with atomic_write(path, "wb") as f:
            np.savez(f, arr_0=arr, **extra)
        return path
    from PIL import Image

    n, h, w, c = arr.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = arr[k]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    with atomic_write(path, "wb") as f:
        img.save(f, format="PNG")
    return path


# ------------------------------------------------------------------ commands
def cmd_sample(args) -> int:
    from . import sample

    check_image_output(Path(args.out))
    labels = parse_int_list(args.labels, "--labels") if args.labels else None
    if labels is not None and len(labels) == 1:
        labels = labels[0]
    if args.engines:
        from .runtime import Runtime

        runtime = Runtime.load(args.engines, backend=args.backend)
        images, y = runtime.sample(args.n, seed=args.seed, labels=labels, return_labels=True)
        what = f"engines {args.engines} ({runtime.backend_name})"
    elif args.plan:
        from .plan import Plan
        from .runtime import Runtime

        plan = Plan.load(args.plan)
        runtime = Runtime.from_plan(plan, backend="torch")
        images, y = runtime.sample(args.n, seed=args.seed, labels=labels, return_labels=True)
        what = f"plan {args.plan} ({plan.sampler}, timesteps {list(plan.timesteps)})"
    else:
        model = load_model_from_args(args)
        ts = timesteps_from_args(args, model.num_timesteps)
        images, y = sample(
            model, ts, sampler=args.sampler, n=args.n, seed=args.seed, eta=args.eta, labels=labels,
            progress=not args.quiet, return_labels=True,
        )
        what = f"{model.name} {args.sampler} over {len(ts)} steps"
    out = save_images(images, Path(args.out), y)
    print(f"wrote {len(images)} samples ({what}) to {out}")
    return 0


def cmd_train(args) -> int:
    from .models.train import TrainSettings, train_embedded

    command = "autodiffusion-rt train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "autodiffusion-rt train"
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
        min_snr_gamma=args.min_snr_gamma or None, seed=args.seed,
    )
    record = train_embedded(
        Path(args.out), settings, state=args.state, resume=args.resume, checkpoint_every=args.checkpoint_every,
        time_limit=args.time_limit, threads=args.threads, compile=args.compile, quiet=args.quiet, command=command, init=args.init,
    )
    if not record["finished"]:
        print(f"stopped at step {record['step']} of {record['steps']} after {record['seconds']} s; state saved: "
              f"run the same command with --resume to continue")
        return 0
    print(f"trained {record['steps']} steps in {record['seconds']} s, final loss {record['final_loss']}: {args.out}")
    return 0


def _versions() -> dict:
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("numpy", "onnx", "onnxruntime", "triton", "tensorrt"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:
            out[name] = "not installed"
    return out


def cmd_info(args) -> int:
    import json

    from . import __version__

    model = load_model_from_args(args)
    unet = model.unet
    print(f"model        {model.name}")
    print(f"fingerprint  {model.fingerprint}")
    print(f"parameters   {sum(p.numel() for p in unet.parameters()):,}")
    print(f"image shape  {model.image_shape}   classes {model.num_classes}   learn_sigma {model.learn_sigma}")
    print(f"schedule     {model.schedule.name}, T={model.num_timesteps}")
    print("config       " + json.dumps(model.config["unet"], default=list))
    if model.metadata.get("command"):
        print(f"trained by   {model.metadata['command']}")
    print()
    print(f"{'layer id':<22}{'kind':<6}{'res':>5}{'ch':>6}{'MMACs':>10}")
    for layer in model.layers:
        print(f"{layer.id:<22}{layer.kind:<6}{layer.resolution:>5}{layer.channels:>6}{layer.macs / 1e6:>10.2f}")
    skippable = sum(layer.macs for layer in model.layers)
    total = unet.macs()
    print(f"\ntotal MACs per sample  {total / 1e6:.2f} M  (skippable layers {skippable / 1e6:.2f} M, always-run {(total - skippable) / 1e6:.2f} M)")
    print()
    print("versions     " + ", ".join(f"{k} {v}" for k, v in {"autodiffusion-rt": __version__, **_versions()}.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autodiffusion-rt", description="Fast sampling for pretrained diffusion UNets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample images (uniform/explicit timesteps, a plan, or built engines)")
    add_model_args(p)
    add_schedule_args(p)
    p.add_argument("--plan", default=None, help="a plan.json: sample with its timesteps and skipped layers (torch)")
    p.add_argument("--engines", default=None, help="an engine dir from 'autodiffusion-rt build'")
    p.add_argument("--backend", default="auto", help="backend for --engines (default: %(default)s)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default=None, help="class labels: one for all, or one per sample (comma-separated)")
    p.add_argument("--out", default="samples.png", help="output: .png grid or .npz (default: %(default)s)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train the embedded MNIST model (resumable)")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-SNR-gamma loss weighting; 0 for plain MSE (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--init", default=None, help="start from this checkpoint's weights (a fresh optimizer)")
    p.add_argument("--out", default="embedded_mnist.pt", help="the finished checkpoint (EMA weights)")
    p.add_argument("--state", default=None, help="the resumable training state (default: OUT.state)")
    p.add_argument("--resume", action="store_true", help="continue from --state exactly where it stopped")
    p.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between state saves (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=None, help="save the state and stop after this many seconds")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward (faster after a short compile)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="model config, layer table with MACs, versions")
    add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export-diffusers", help="the diffusers scheduler settings reproducing a plan's schedule (no skipping)")
    p.add_argument("plan", help="a plan.json")
    p.add_argument("--out", default=None, help="also save the scheduler here (save_pretrained directory)")
    p.set_defaults(func=lambda args: importlib.import_module("autodiffusion_rt.models.diffusers_adapter").export_diffusers_command(args))

    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            if e.name and name.startswith(e.name):  # the plugin itself is absent: skip it
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Error as e:
        print(f"autodiffusion-rt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autodiffusion-rt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
