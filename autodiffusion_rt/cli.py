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
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import DataError, Error, SamplingError

# Nothing heavy at module level (torch is imported by the commands): main() takes SIGTERM/Ctrl-C within
# a fraction of a second of the process's start.

# Modules that add subcommands; a missing optional one is skipped.
_PLUGINS = ("autodiffusion_rt.metrics.cli", "export.cli", "autodiffusion_rt.serve.cli")


def parse_int_list(text: str, what: str) -> list[int]:
    """``"999,600,300"`` -> [999, 600, 300]; an empty entry (``1,,2``) or a non-integer is an error naming it."""
    items = text.split(",")
    out = []
    for k, v in enumerate(items):
        v = v.strip()
        if not v:
            raise SamplingError(f"{what} {text!r}: entry {k + 1} is empty; pass comma-separated integers without gaps (e.g. 999,600,300,100)")
        try:
            out.append(int(v))
        except ValueError:
            raise SamplingError(f"{what} {text!r}: entry {k + 1} ({v!r}) is not an integer; pass comma-separated integers (e.g. 999,600,300,100)") from None
    return out


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
    # default None (meaning embedded:mnist): so that a --model given with --plan/--engines can be refused
    p.add_argument("--model", default=None, help=f"model spec: embedded:mnist or adm:PATH (default: {DEFAULT_MODEL})")
    p.add_argument("--preset", default=None, help="ADM preset for adm: specs (e.g. imagenet64-cond)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="guided-diffusion flag for adm: specs, repeatable")


DEFAULT_MODEL = "embedded:mnist"
#: The most images a PNG grid holds (beyond it the grid is unreadable: write an .npz).
MAX_GRID = 1024
#: Samples made and written per chunk when streaming an .npz.
STREAM_CHUNK = 256


def load_model_from_args(args):
    from . import load_model

    overrides = parse_options(args.option)
    if args.preset:
        overrides["preset"] = args.preset
    return load_model(args.model or DEFAULT_MODEL, **overrides)


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default=None, help="ddim, ddpm or dpmpp_2m (default: ddim)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="number of uniformly spaced steps (default 50)")
    g.add_argument("--timesteps", default=None, help="explicit strictly descending timesteps, e.g. 999,600,300,100")
    p.add_argument("--spacing", default=None, help="uniform spacing for --steps: linear or quadratic (default linear)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")


def timesteps_from_args(args, num_timesteps: int) -> list[int]:
    from .diffusion import uniform_timesteps

    if args.timesteps is not None:
        return parse_int_list(args.timesteps, "--timesteps")
    if args.steps is not None and args.steps < 1:
        raise SamplingError(f"--steps {args.steps}: must be a positive integer (e.g. 50)")
    return uniform_timesteps(num_timesteps, 50 if args.steps is None else args.steps, args.spacing or "linear")


def check_image_output(path: Path, n: Optional[int] = None) -> Path:
    """Refuse an output path (and a PNG grid too large to read) before any work is done, not after."""
    from .utils import check_writable

    path = Path(path)
    if path.suffix.lower() not in (".png", ".npz"):
        raise DataError(f"--out {path} must end in .png (a grid) or .npz (the images)")
    if n is not None and path.suffix.lower() == ".png" and n > MAX_GRID:
        raise DataError(f"--n {n} is too many for a PNG grid (at most {MAX_GRID}): write an .npz (--out samples.npz), which is streamed in chunks")
    return check_writable(path, "the output", "pass --out with a path in a writable folder", DataError)


def _write_failed(e: OSError, path: Path):
    from .utils import path_error

    return DataError(path_error(e, path, "pass --out with a path in a writable folder with free space"))


def save_images(images, path: Path, labels=None) -> Path:
    """Write images in [-1, 1] as a PNG grid or an .npz of uint8 NHWC (``arr_0``, ADM's layout)."""

    def chunks():
        yield images, labels

    return save_image_chunks(chunks(), Path(path), len(images))


def save_image_chunks(chunks, path: Path, n: int) -> Path:
    """Write ``n`` images arriving as ``(images, labels)`` chunks; an .npz is streamed (O(chunk) memory).

    Every chunk is checked finite first (NaN would become black pixels). The
    file appears only when complete (written to a temp file, then renamed).
    """
    import math

    import numpy as np

    from .data import to_uint8
    from .utils import atomic_write

    path = check_image_output(path, n)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".npz":
            import zipfile

            with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", allowZip64=True) as zf:
                ys, done = [], 0
                with zf.open("arr_0.npy", "w", force_zip64=True) as entry:
                    for images, y in chunks:
                        _check_images_finite(images, done)
                        arr = to_uint8(images)
                        if done == 0:
                            np.lib.format.write_array_header_2_0(
                                entry, {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": (n, *arr.shape[1:])})
                        entry.write(np.ascontiguousarray(arr).tobytes())
                        done += len(arr)
                        if y is not None:
                            ys.append(np.asarray(y))
                if done != n:
                    raise DataError(f"internal: {done} images for n={n}")
                if ys:
                    with zf.open("arr_1.npy", "w", force_zip64=True) as entry:
                        np.lib.format.write_array(entry, np.concatenate(ys) if ys else np.zeros(0, np.int64))
            return path
        from PIL import Image

        parts = []
        for images, _ in chunks:
            _check_images_finite(images, sum(len(p) for p in parts))
            parts.append(to_uint8(images))
        arr = np.concatenate(parts)
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
    except OSError as e:
        raise _write_failed(e, path) from None


def _check_images_finite(images, offset: int) -> None:
    import torch

    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
    ok = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(ok.all()):
        first = int((~ok).nonzero()[0]) + offset
        raise SamplingError(f"sample {first} holds NaN/inf: refusing to write it as an image (it would be black); nothing was written")


# ------------------------------------------------------------------ commands
def _check_sample_flags(args) -> None:
    """--plan/--engines fix the model, sampler and timesteps: other flags for them are refused, not ignored."""
    if args.plan and args.engines:
        raise SamplingError(
            f"--plan {args.plan} and --engines {args.engines} both given: the engine dir's own plan is what runs "
            "(it wins); pass --engines alone, or --plan alone to run the plan on PyTorch"
        )
    source = "--engines" if args.engines else "--plan" if args.plan else None
    if source is None:
        if args.backend is not None:
            raise SamplingError(f"--backend {args.backend} applies to --engines only: drop it, or pass --engines DIR")
        return
    fixed = {"--model": args.model, "--preset": args.preset, "--option": args.option or None, "--sampler": args.sampler,
             "--steps": args.steps, "--timesteps": args.timesteps, "--spacing": args.spacing, "--eta": args.eta}
    given = [k for k, v in fixed.items() if v is not None]
    if given:
        raise SamplingError(
            f"{', '.join(given)} given with {source}: the {'engine dir' if args.engines else 'plan'}'s model, sampler and "
            f"timesteps win; drop {', '.join(given)} (or drop {source} to sample without a plan)"
        )
    if args.plan and args.backend is not None:
        raise SamplingError(f"--backend {args.backend} applies to --engines only (--plan runs on PyTorch): drop it, "
                            "or build the plan ('autodiffusion-rt build PLAN --out DIR') and pass --engines DIR")


def _parse_labels(text: Optional[str], n: int):
    if text is None:
        return None
    labels = parse_int_list(text, "--labels")
    if len(labels) == 1:
        return labels[0]
    if len(labels) != n:
        raise SamplingError(f"--labels {text!r} gives {len(labels)} labels for --n {n}: pass one label for all, or one per sample")
    if any(v < 0 for v in labels):
        raise SamplingError(f"--labels {text!r}: label {min(labels)} is negative; labels are class indices >= 0")
    return labels


def cmd_sample(args) -> int:
    from . import sample
    from .diffusion import check_seed
    from .sampling import check_n

    # Arguments and the output first: nothing is loaded or computed before they are known to be usable.
    _check_sample_flags(args)
    if args.n < 1:
        raise SamplingError(f"--n {args.n}: the number of samples must be a positive integer")
    n = check_n(args.n)
    from .sampling import MAX_SAMPLES  # the most samples per command (an .npz is written in chunks)

    if n > MAX_SAMPLES:
        raise SamplingError(f"--n {n} is above the limit of {MAX_SAMPLES:,} samples per command: run several commands with different --seed")
    seed = check_seed(args.seed, "--seed")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise SamplingError(f"--eta {args.eta}: DDIM's eta lies in [0, 1]")
    labels = _parse_labels(args.labels, n)
    out_path = check_image_output(Path(args.out), n)

    if args.engines or args.plan:
        from .plan import Plan
        from .runtime import Runtime

        if args.engines:
            runtime = Runtime.load(args.engines, backend=args.backend or "auto")
            what = f"engines {args.engines} ({runtime.backend_name})"
        else:
            plan = Plan.load(args.plan)
            runtime = Runtime.from_plan(plan, backend="torch")
            what = f"plan {args.plan} ({plan.sampler}, timesteps {list(plan.timesteps)})"
        from .sampling import check_labels

        check_labels(runtime.info, labels, n)  # before any sampling

        def run(a: int, b: int, y):
            return runtime.sample(b - a, seed=seed, labels=y, return_labels=True, first=a)
    else:
        model = load_model_from_args(args)
        sampler = args.sampler or "ddim"
        ts = timesteps_from_args(args, model.num_timesteps)
        from .diffusion import SAMPLERS, validate_timesteps
        from .sampling import check_labels

        if sampler not in SAMPLERS:
            raise SamplingError(f"--sampler {sampler!r} is unknown: choose one of {', '.join(SAMPLERS)}")
        validate_timesteps(ts, model.num_timesteps)
        check_labels(model, labels, n)
        eta = 0.0 if args.eta is None else args.eta
        what = f"{model.name} {sampler} over {len(ts)} steps"

        def run(a: int, b: int, y):
            return sample(model, ts, sampler=sampler, n=b - a, seed=seed, eta=eta, labels=y,
                          progress=not args.quiet and b - a == n, return_labels=True, first=a)

    chunk = n if out_path.suffix.lower() == ".png" else STREAM_CHUNK

    def chunks():
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            y = labels[a:b] if isinstance(labels, list) else labels
            yield run(a, b, y)

    out = save_image_chunks(chunks(), out_path, n)
    print(f"wrote {n} samples ({what}) to {out}")
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
        time_limit=args.time_limit, stop_at_step=args.stop_at_step, threads=args.threads, compile=args.compile, quiet=args.quiet, command=command, init=args.init,
    )
    if not record["finished"]:
        print(f"stopped at step {record['step']} of {record['steps']} after {record['seconds']} s; the EMA weights so far "
              f"are in {args.out}; run the same command with --resume to continue")
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
    from .sampling import MAX_SAMPLES

    parser = OneLineParser(prog="autodiffusion-rt", description="Fast sampling for pretrained diffusion UNets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample images (uniform/explicit timesteps, a plan, or built engines)")
    add_model_args(p)
    add_schedule_args(p)
    p.add_argument("--plan", default=None, help="a plan.json: sample with its timesteps and skipped layers (torch)")
    p.add_argument("--engines", default=None, help="an engine dir from 'autodiffusion-rt build'")
    p.add_argument("--backend", default=None, help="backend for --engines: auto (what the dir was built for), onnxruntime, openvino, tensorrt or torch (default: auto)")
    p.add_argument("--n", type=int, default=64, help=f"number of samples (default: %(default)s; at most {MAX_SAMPLES:,}, "
                   f"and at most {MAX_GRID} in a .png grid; an .npz is written in chunks of {STREAM_CHUNK})")
    p.add_argument("--seed", type=int, default=0, help="an integer in [0, 2^63) (default: %(default)s)")
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
    p.add_argument("--stop-at-step", type=int, default=None, help="save the state (and the EMA weights so far) and stop at this step")
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


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def run_command(prog: str, command: Callable[[], Optional[int]], interrupted: str = "interrupted",
                pending: Sequence[int] = ()) -> int:
    """A command line's exit status: ``command()``'s (0 for None); a user error is one line and 2, Ctrl-C 130.

    An :class:`Error`, or an ``OSError`` no command turned into its own message,
    prints ``prog: error: ...`` on one line; Ctrl-C prints ``prog: interrupted``.
    SIGTERM is Ctrl-C here (130, temp files removed on the way out) unless the
    command handles it itself (``train`` saves its state, ``serve`` drains).
    ``pending``: signals that came while the command was being set up: it stops at once (130).
    """
    import signal
    import threading

    from .utils import os_error_line

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if pending:
            raise KeyboardInterrupt
        return int(command() or 0)
    except Error as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: error: {one_line(os_error_line(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import signal
    import threading

    from .utils import plain_warnings

    # SIGTERM/Ctrl-C while the command's modules import (torch, onnx: seconds) are noted, not fatal: the
    # command then stops at once (130), or 'serve' exits 0 (nothing to drain yet).
    early: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def note(signum, frame):
            early.append(signum)

        previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    plain_warnings()
    if args.command == "serve":
        args.early_signals = early  # serve's own handling takes them
        early = []
    return run_command("autodiffusion-rt", lambda: args.func(args), pending=early)


if __name__ == "__main__":
    sys.exit(main())
