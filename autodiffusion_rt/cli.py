"""The ``autodiffusion-rt`` command line.

User errors (any :class:`autodiffusion_rt.errors.Error`) print one line and exit 2.
Subcommands of other packages (``build`` from ``export``; ``fid``, ``fid-stats``
and ``train-classifier`` from the metrics package; ``serve``) register themselves
through a ``register(subparsers)`` function, imported only when that command is
chosen. The arguments are parsed before torch or any heavy module is imported
(names and help come from :mod:`autodiffusion_rt.registry`), so ``--help`` and a
usage error answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import __version__
from .errors import DataError, Error, SamplingError
from .registry import (
    COMMANDS,
    DEFAULT_MODEL,
    IMAGE_OUTPUTS,
    MAX_SAMPLES,
    RUNTIME_BACKENDS,
    SAMPLERS,
    SPACING_HELP,
    SPACINGS,
    model_spec_help,
    one_of,
)

# Nothing heavy at module level (torch is imported by the commands): main() takes SIGTERM/Ctrl-C within
# a fraction of a second of the process's start.

# Modules that add subcommands (registry.COMMANDS names their commands); a missing optional one is skipped.
_PLUGINS = ("autodiffusion_rt.metrics.cli", "export.cli", "autodiffusion_rt.serve.cli")


def parse_int_list(text: str, what: str) -> list[int]:
    """``"999,600,300"`` -> [999, 600, 300]; an empty entry (``1,,2``) or a non-integer is an error naming it."""
    items = text.split(",")
    out = []
    for k, v in enumerate(items):
        v = v.strip()
        if not v:
            raise SamplingError(
                f"{what} {text!r}: entry {k + 1} is empty; "
                "pass comma-separated integers without gaps (e.g. 999,600,300,100)"
            )
        try:
            out.append(int(v))
        except ValueError:
            raise SamplingError(
                f"{what} {text!r}: entry {k + 1} ({v!r}) is not an integer; "
                "pass comma-separated integers (e.g. 999,600,300,100)"
            ) from None
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
    p.add_argument("--model", default=None, help=model_spec_help())
    p.add_argument("--preset", default=None, help="ADM preset for adm: specs (e.g. imagenet64-cond)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="guided-diffusion flag for adm: specs, repeatable",
    )


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
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help=f"{one_of(SAMPLERS)} (default: ddim)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="number of uniformly spaced steps (default 50)")
    g.add_argument("--timesteps", default=None, help="explicit strictly descending timesteps, e.g. 999,600,300,100")
    p.add_argument(
        "--spacing",
        default=None,
        choices=SPACINGS,
        help=f"uniform spacing for --steps: {SPACING_HELP} (default linear)",
    )
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")


def timesteps_from_args(args, num_timesteps: int, schedule=None) -> list[int]:
    """The timesteps ``--timesteps`` / ``--steps`` / ``--spacing`` ask for; ``schedule``: the model's (logsnr)."""
    from .diffusion import uniform_timesteps

    if args.timesteps is not None:
        return parse_int_list(args.timesteps, "--timesteps")
    if args.steps is not None and args.steps < 1:
        raise SamplingError(f"--steps {args.steps}: must be a positive integer (e.g. 50)")
    return uniform_timesteps(
        num_timesteps, 50 if args.steps is None else args.steps, args.spacing or "linear", alphas_cumprod=schedule
    )


def check_image_output(path: Path, n: Optional[int] = None) -> Path:
    """Refuse an output path (and a PNG grid too large to read) before any work is done, not after."""
    from .utils import check_writable

    path = Path(path)
    if path.suffix.lower() not in IMAGE_OUTPUTS:
        raise DataError(f"--out {path} must end in {one_of(f'{k} ({v})' for k, v in IMAGE_OUTPUTS.items())}")
    if n is not None and path.suffix.lower() == ".png" and n > MAX_GRID:
        raise DataError(
            f"--n {n} is too many for a PNG grid (at most {MAX_GRID}): write an .npz or .npy "
            "(--out samples.npz), which is streamed in chunks"
        )
    return check_writable(path, "the output", "pass --out with a path in a writable folder", DataError)


def _write_failed(e: OSError, path: Path):
    from .utils import path_error

    return DataError(path_error(e, path, "pass --out with a path in a writable folder with free space"))


def save_images(images, path: Path, labels=None) -> Path:
    """Write images in [-1, 1] as a PNG grid, an .npz of uint8 NHWC (``arr_0``, ADM's layout) or a float32 NCHW .npy."""

    def chunks():
        yield images, labels

    return save_image_chunks(chunks(), Path(path), len(images))


def save_image_chunks(chunks, path: Path, n: int) -> Path:
    """Write ``n`` images arriving as ``(images, labels)`` chunks; an .npz or .npy is streamed (O(chunk) memory).

    Every chunk is checked finite first (NaN would become black pixels). The
    file appears only when complete (written to a temp file, then renamed).
    """
    path = check_image_output(path, n)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            _write_npz(chunks, path, n)
        elif suffix == ".npy":  # what the service's format=npy returns: float32 NCHW in [-1, 1]
            _write_npy(chunks, path, n)
        else:
            _write_png_grid(chunks, path)
        return path
    except OSError as e:
        raise _write_failed(e, path) from None


def _npy_header(arr, n: int) -> dict:
    """The .npy header of ``n`` images shaped like ``arr``'s (the first chunk's)."""
    import numpy as np

    return {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": (n, *arr.shape[1:])}


def _write_npz(chunks, path: Path, n: int) -> None:
    """ADM's layout: ``arr_0`` uint8 NHWC, streamed into the zip entry chunk by chunk; ``arr_1`` the labels, if any."""
    import zipfile

    import numpy as np

    from .data import to_uint8
    from .utils import atomic_write

    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", allowZip64=True) as zf:
        ys, done = [], 0
        with zf.open("arr_0.npy", "w", force_zip64=True) as entry:
            for images, y in chunks:
                _check_images_finite(images, done)
                arr = to_uint8(images)
                if done == 0:
                    np.lib.format.write_array_header_2_0(entry, _npy_header(arr, n))
                entry.write(np.ascontiguousarray(arr).tobytes())
                done += len(arr)
                if y is not None:
                    ys.append(np.asarray(y))
        if done != n:
            raise DataError(f"internal: {done} images for n={n}")
        if ys:
            with zf.open("arr_1.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.concatenate(ys) if ys else np.zeros(0, np.int64))


def _write_npy(chunks, path: Path, n: int) -> None:
    """float32 NCHW in [-1, 1], streamed chunk by chunk after one header."""
    import numpy as np

    from .utils import atomic_write

    with atomic_write(path, "wb") as f:
        done = 0
        for images, _ in chunks:
            _check_images_finite(images, done)
            arr = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
            if done == 0:
                np.lib.format.write_array_header_1_0(f, _npy_header(arr, n))
            f.write(arr.tobytes())
            done += len(arr)
        if done != n:
            raise DataError(f"internal: {done} images for n={n}")


def _write_png_grid(chunks, path: Path) -> None:
    """All images in one PNG grid (:func:`data.image_grid`), held in memory (at most MAX_GRID)."""
    import torch
    from PIL import Image

    from .data import image_grid
    from .utils import atomic_write

    parts = []
    for images, _ in chunks:
        _check_images_finite(images, sum(len(p) for p in parts))
        parts.append(images.detach().float().cpu())
    img = Image.fromarray(image_grid(torch.cat(parts)))
    with atomic_write(path, "wb") as f:
        img.save(f, format="PNG")


def _check_images_finite(images, offset: int) -> None:
    import torch

    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
    ok = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(ok.all()):
        first = int((~ok).nonzero()[0]) + offset
        raise SamplingError(
            f"sample {first} holds NaN/inf: refusing to write it as an image (it would be black); nothing was written"
        )


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
    fixed = {
        "--model": args.model,
        "--preset": args.preset,
        "--option": args.option or None,
        "--sampler": args.sampler,
        "--steps": args.steps,
        "--timesteps": args.timesteps,
        "--spacing": args.spacing,
        "--eta": args.eta,
    }
    given = [k for k, v in fixed.items() if v is not None]
    if given:
        raise SamplingError(
            f"{', '.join(given)} given with {source}: the {'engine dir' if args.engines else 'plan'}'s model, "
            f"sampler and timesteps win; drop {', '.join(given)} (or drop {source} to sample without a plan)"
        )
    if args.plan and args.backend is not None:
        raise SamplingError(
            f"--backend {args.backend} applies to --engines only (--plan runs on PyTorch): drop it, "
            "or build the plan ('autodiffusion-rt build PLAN --out DIR') and pass --engines DIR"
        )


def _parse_labels(text: Optional[str], n: int):
    if text is None:
        return None
    labels = parse_int_list(text, "--labels")
    if len(labels) == 1:
        return labels[0]
    if len(labels) != n:
        raise SamplingError(
            f"--labels {text!r} gives {len(labels)} labels for --n {n}: pass one label for all, or one per sample"
        )
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
        raise SamplingError(
            f"--n {n} is above the limit of {MAX_SAMPLES:,} samples per command: "
            "run several commands with different --seed"
        )
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
        ts = timesteps_from_args(args, model.num_timesteps, model.schedule)
        from .diffusion import SAMPLERS, validate_timesteps
        from .sampling import check_labels

        if sampler not in SAMPLERS:
            raise SamplingError(f"--sampler {sampler!r} is unknown: choose one of {', '.join(SAMPLERS)}")
        validate_timesteps(ts, model.num_timesteps)
        check_labels(model, labels, n)
        eta = 0.0 if args.eta is None else args.eta
        what = f"{model.name} {sampler} over {len(ts)} steps"

        def run(a: int, b: int, y):
            return sample(
                model,
                ts,
                sampler=sampler,
                n=b - a,
                seed=seed,
                eta=eta,
                labels=y,
                progress=not args.quiet and b - a == n,
                return_labels=True,
                first=a,
            )

    chunk = n if out_path.suffix.lower() == ".png" else STREAM_CHUNK  # .npz and .npy are streamed

    def chunks():
        from tqdm import tqdm

        # a streamed file moves one bar per chunk (one chunk alone shows the sampler's per-step bar)
        with tqdm(total=n, desc=f"sample {what}", unit="img", disable=args.quiet or chunk >= n) as bar:
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                y = labels[a:b] if isinstance(labels, list) else labels
                yield run(a, b, y)
                bar.update(b - a)

    out = save_image_chunks(chunks(), out_path, n)
    print(f"wrote {n} samples ({what}) to {out}")
    return 0


def cmd_train(args) -> int:
    from .models.train import TrainSettings, train_embedded

    command = "autodiffusion-rt train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "autodiffusion-rt train"
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema_decay,
        min_snr_gamma=args.min_snr_gamma or None,
        seed=args.seed,
    )
    record = train_embedded(
        Path(args.out),
        settings,
        state=args.state,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        time_limit=args.time_limit,
        stop_at_step=args.stop_at_step,
        threads=args.threads,
        compile=args.compile,
        quiet=args.quiet,
        command=command,
        init=args.init,
    )
    if not record["finished"]:
        print(
            f"stopped at step {record['step']} of {record['steps']} after {record['seconds']} s; "
            f"the EMA weights so far are in {args.out}; run the same command with --resume to continue"
        )
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


def training_command(recorded: str) -> str:
    """A checkpoint's recorded ``train`` command as one to run again (the README quotes it): without ``--resume``
    (how that run was continued, not what it is), writing ``--out``'s file name in the current folder (never
    over the packaged asset, nor into a folder of the machine it ran on)."""
    import shlex

    words, out = shlex.split(recorded), []
    k = 0
    while k < len(words):
        word = words[k]
        if word == "--resume":
            k += 1
            continue
        if word == "--out" and k + 1 < len(words):
            out += [word, Path(words[k + 1]).name]
            k += 2
            continue
        if word.startswith("--out="):
            word = "--out=" + Path(word.split("=", 1)[1]).name
        out.append(word)
        k += 1
    return shlex.join(out)


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
        print(f"trained by   {training_command(model.metadata['command'])}")
    print()
    print(f"{'layer id':<22}{'kind':<6}{'res':>5}{'ch':>6}{'MMACs':>10}")
    for layer in model.layers:
        print(f"{layer.id:<22}{layer.kind:<6}{layer.resolution:>5}{layer.channels:>6}{layer.macs / 1e6:>10.2f}")
    skippable = sum(layer.macs for layer in model.layers)
    total = unet.macs()
    print(
        f"\ntotal MACs per sample  {total / 1e6:.2f} M  (skippable layers {skippable / 1e6:.2f} M, "
        f"always-run {(total - skippable) / 1e6:.2f} M)"
    )
    print()
    print("versions     " + ", ".join(f"{k} {v}" for k, v in {"autodiffusion-rt": __version__, **_versions()}.items()))
    return 0


def build_parser(commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The command line. ``commands``: the subcommands whose full arguments are needed (default: all); the
    others get a stub with their help line from :data:`registry.COMMANDS`, and their modules are not imported."""
    parser = OneLineParser(
        prog="autodiffusion-rt",
        description="Fast sampling for pretrained diffusion UNets: "
        "search a short sampling plan, build one engine per step, run and serve it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=COMMANDS[name][1], description=description)

    _add_sample_command(add)
    _add_train_command(add)
    _add_info_command(add)
    _add_export_diffusers_command(add)
    _add_plugin_commands(sub, commands)
    return parser


def _add_sample_command(add_parser: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``sample``: the model, a plan on PyTorch, or an engine dir, written as PNG/npz/npy."""
    p = add_parser(
        "sample",
        "Sample images with the full model over uniform or explicit timesteps (--model, --steps / "
        "--timesteps), with a searched plan on PyTorch (--plan), or with the engines 'autodiffusion-rt build' made "
        "(--engines). Writes a PNG grid, an .npz or an .npy (--out).",
    )
    add_model_args(p)
    add_schedule_args(p)
    p.add_argument("--plan", default=None, help="a plan.json: sample with its timesteps and skipped layers (torch)")
    p.add_argument("--engines", default=None, help="an engine dir from 'autodiffusion-rt build'")
    p.add_argument(
        "--backend",
        default=None,
        choices=("auto", *RUNTIME_BACKENDS),
        help=f"backend for --engines: auto (what the dir was built for), {one_of(RUNTIME_BACKENDS)} (default: auto)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=64,
        help=f"number of samples (default: %(default)s; at most {MAX_SAMPLES:,}, "
        f"and at most {MAX_GRID} in a .png grid; an .npz or .npy is written in chunks of {STREAM_CHUNK})",
    )
    p.add_argument("--seed", type=int, default=0, help="an integer in [0, 2^63) (default: %(default)s)")
    p.add_argument("--labels", default=None, help="class labels: one for all, or one per sample (comma-separated)")
    outputs = "; ".join(f"{k} {v}" for k, v in IMAGE_OUTPUTS.items())
    p.add_argument("--out", default="samples.png", help=f"output: {outputs} (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)


def _add_train_command(add_parser: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``train``: the embedded MNIST model, resumable."""
    p = add_parser(
        "train",
        "Train the embedded MNIST model from scratch (or from --init), resumably: the EMA weights go to "
        "--out, the training state to --state. The shipped model was trained by the command 'info' prints.",
    )
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.9995,
        help="decay of the weights' EMA, which is saved (default: %(default)s)",
    )
    p.add_argument(
        "--min-snr-gamma",
        type=float,
        default=5.0,
        help="min-SNR-gamma loss weighting; 0 for plain MSE (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and noise (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--init", default=None, help="start from this checkpoint's weights (a fresh optimizer)")
    p.add_argument(
        "--out",
        default="embedded_mnist.pt",
        help="the finished checkpoint (EMA weights; default: "
        "%(default)s in the current folder; load it with --model ckpt:PATH)",
    )
    p.add_argument("--state", default=None, help="the resumable training state (default: OUT.state)")
    p.add_argument("--resume", action="store_true", help="continue from --state exactly where it stopped")
    p.add_argument(
        "--checkpoint-every", type=float, default=300.0, help="seconds between state saves (default: %(default)s)"
    )
    p.add_argument("--time-limit", type=float, default=None, help="save the state and stop after this many seconds")
    p.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        help="save the state (and the EMA weights so far) and stop at this step",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the training forward (faster after a short compile)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _add_info_command(add_parser: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``info``: a model's config, layer table and versions."""
    p = add_parser(
        "info",
        "Print a model's config, its skippable layers with their MACs, the command that trained it, "
        "and the library versions.",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_info)


def _add_export_diffusers_command(add_parser: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``export-diffusers``: a plan's schedule as diffusers scheduler settings."""
    p = add_parser(
        "export-diffusers",
        "Print (and with --out save) the diffusers scheduler settings that reproduce a "
        "plan's timesteps and sampler; layer skipping has no diffusers equivalent and is left out.",
    )
    p.add_argument("plan", help="a plan.json")
    p.add_argument("--out", default=None, help="also save the scheduler here (save_pretrained directory)")
    p.set_defaults(
        func=lambda args: importlib.import_module("autodiffusion_rt.models.diffusers_adapter").export_diffusers_command(
            args
        )
    )


def _add_plugin_commands(sub, commands: Optional[Sequence[str]]) -> None:
    """The other packages' subcommands: registered in full if wanted, else a stub with their help line."""
    wanted = set(COMMANDS) if commands is None else set(commands)
    registered = set(sub.choices)
    for name in _PLUGINS:
        theirs = [c for c, (module, _) in COMMANDS.items() if module == name]
        if not wanted.intersection(theirs):
            for c in theirs:  # listed in the top-level help; the module is imported when the command is chosen
                sub.add_parser(c, help=COMMANDS[c][1])
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            if e.name and name.startswith(e.name):  # the plugin itself is absent: skip it
                continue
            raise
        module.register(sub)
    unlisted = set(sub.choices) - set(COMMANDS) - registered
    assert not unlisted, f"commands missing from registry.COMMANDS: {sorted(unlisted)}"


def chosen_command(argv: Sequence[str]) -> list[str]:
    """The subcommand ``argv`` names (its first word not starting with '-'), as a list for :func:`build_parser`."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return [word] if word in COMMANDS else []


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def run_command(
    prog: str, command: Callable[[], Optional[int]], interrupted: str = "interrupted", pending: Sequence[int] = ()
) -> int:
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

    interrupt = _Interrupt()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if pending:
            raise KeyboardInterrupt
        try:
            return int(command() or 0)
        finally:
            interrupt.running = False  # the command is over: a signal deferred until now is dropped
    except Error as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: error: {one_line(os_error_line(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        if previous is not None:
            # stopping already: a second interrupt (a signal the engine's native code noted late) must not turn the
            # 130 into a death by SIGINT while the interpreter unwinds
            previous = None
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_IGN)
        return 130
    finally:
        for s, handler in (previous or {}).items():
            signal.signal(s, handler)


class _Interrupt:
    """SIGTERM's and Ctrl-C's handler while a command runs: KeyboardInterrupt, but not inside an import or a
    function marked with :func:`autodiffusion_rt.utils.defer_interrupts`.

    Raised there, it unwinds through native code that does not expect it. In a build's imports the process
    aborted ('terminate called ... KeyboardInterrupt', -6), CPython marked the interrupt unhandled and the 130
    became a death by SIGINT (-2), a library swallowed it, or a half-imported onnxruntime read as not
    installed; pydantic-core turned it into a SchemaError traceback. So there the signal is sent to the main
    thread again 50 ms later.
    """

    def __init__(self):
        self.running = True

    def __call__(self, signum, frame) -> None:
        import threading

        from .utils import INTERRUPT_DEFERRING_CODE

        if not self.running:
            return
        while frame is not None and frame.f_code is not run_command.__code__:
            if frame.f_code.co_filename.startswith("<frozen importlib") or frame.f_code in INTERRUPT_DEFERRING_CODE:
                retry = threading.Timer(0.05, self._send_again, (signum,))
                retry.daemon = True
                retry.start()
                return
            frame = frame.f_back
        raise KeyboardInterrupt

    def _send_again(self, signum: int) -> None:
        import signal
        import threading

        if self.running:
            signal.pthread_kill(threading.main_thread().ident, signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import signal
    import threading

    argv = sys.argv[1:] if argv is None else list(argv)
    # SIGTERM/Ctrl-C while the command's modules import (torch, onnx: seconds) are noted, not fatal: the
    # command then stops at once (130), or 'serve' exits 0 (nothing to drain yet).
    early: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():

        def note(signum, frame):
            early.append(signum)

        previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        args = build_parser(chosen_command(argv)).parse_args(argv)  # before anything heavy is imported
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    from .utils import plain_warnings

    plain_warnings()
    if args.command == "serve":
        args.early_signals = early  # serve's own handling takes them
        early = []
    return run_command("autodiffusion-rt", lambda: args.func(args), pending=early)


if __name__ == "__main__":
    sys.exit(main())
