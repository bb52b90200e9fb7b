"""The ``fid-stats``, ``fid`` and ``train-classifier`` subcommands.

``autodiffusion_rt.cli`` calls :func:`register` with its subparsers object;
each subparser sets ``func(args) -> int``. User errors are raised as
:class:`autodiffusion_rt.errors.Error` for the main CLI to print.
"""

from __future__ import annotations

import argparse
import warnings

from ..errors import DataError, SamplingError

__all__ = ["add_train_classifier_arguments", "register"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--extractor",
        choices=("mnist", "inception"),
        default=None,
        help="feature network (default: mnist, or the one a statistics file was computed with)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help=(
            "statistics cache folder (default: $AUTODIFFUSION_RT_CACHE or ~/.cache/autodiffusion-rt; "
            "files go in fid-stats/)"
        ),
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per feature batch (default: the extractor's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    """Add ``fid-stats``, ``fid`` and ``train-classifier`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "fid-stats",
        help="compute (and cache) FID reference statistics",
        description=(
            "Mean and covariance of a data set's features, cached under (data set, extractor, preprocessing, weights)."
        ),
    )
    p.add_argument(
        "source",
        help=(
            "mnist | mnist:train | mnist:heldout | an image folder | "
            "an .npz of uint8 images (arr_0 NHWC, e.g. an ADM reference batch)"
        ),
    )
    p.add_argument("--out", default=None, help="also write the statistics to this .npz")
    p.add_argument(
        "--recompute", action="store_true", help="ignore a cached result (and an ADM batch's precomputed mu/sigma)"
    )
    _add_common(p)
    p.set_defaults(func=run_fid_stats)

    p = subparsers.add_parser(
        "fid",
        help="FID of generated images against reference statistics",
        description="FID of a folder / .npz of images, or of images sampled now from --model, against --ref.",
    )
    p.add_argument(
        "images", nargs="?", default=None, help="an image folder or an .npz of uint8 images (omit with --model)"
    )
    p.add_argument(
        "--ref",
        default="mnist",
        help=(
            "reference: mnist | mnist:train | mnist:heldout | a statistics .npz (fid-stats --out, or ADM mu/sigma) | "
            "an image folder or .npz (default: mnist)"
        ),
    )
    p.add_argument("--model", default=None, help="sample the images now from this model spec (e.g. embedded:mnist)")
    p.add_argument("--sampler", default="ddim", help="sampler for --model (default: ddim)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None, help="uniformly spaced timesteps for --model")
    steps.add_argument(
        "--timesteps",
        default=None,
        help="comma-separated, strictly descending timesteps for --model, e.g. 999,749,499,249",
    )
    p.add_argument("--n", type=int, default=2000, help="number of samples for --model (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --model (default: 0)")
    _add_common(p)
    p.set_defaults(func=run_fid)

    p = subparsers.add_parser(
        "train-classifier",
        help="train the mnist feature classifier",
        description="Train the small MNIST classifier whose penultimate layer is the 'mnist' FID feature (seeded).",
    )
    add_train_classifier_arguments(p)
    p.set_defaults(func=_run_train_classifier)


def _show_warnings(caught) -> None:
    """FID warnings as one 'warning: ...' line each on stderr; anything else the usual way."""
    import sys

    from .stats import FIDWarning

    for w in caught:
        if issubclass(w.category, FIDWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _check_batch_size(args) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: must be a positive integer")
    if args.batch_size is not None:
        from ..limits import check_limit

        check_limit("batch", args.batch_size, "--batch-size", error=DataError)


def _check_stats_out(out):
    """``--out`` of fid-stats: an .npz in a writable place, refused before any feature is computed."""
    from pathlib import Path

    from ..utils import check_writable

    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() != ".npz":
        raise DataError(
            f"--out {out}: the statistics are written as an .npz (mu, sigma, key); pass a path ending in .npz"
        )
    return check_writable(path, "the statistics file", "pass --out with a path in a writable folder", DataError)


def run_fid_stats(args: argparse.Namespace) -> int:
    from .extractors import get_extractor
    from .imagesets import resolve_reference
    from .stats import FIDWarning

    _check_batch_size(args)
    out = _check_stats_out(args.out)
    ext = get_extractor(args.extractor or "mnist")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FIDWarning)
        stats, where = resolve_reference(
            args.source,
            ext,
            cache_dir=args.cache_dir,
            batch_size=args.batch_size,
            progress=not args.quiet,
            recompute=args.recompute,
            use_precomputed=not args.recompute,
        )
    _show_warnings(caught)
    line = (
        f"{stats.dataset}: {stats.num_samples} samples, extractor {stats.extractor} "
        f"({stats.feature_dim}-d, {stats.preprocessing}, weights {stats.fingerprint}); {where}"
    )
    if out is not None:
        try:
            path = stats.save(out)
        except OSError as e:
            from ..utils import path_error

            raise DataError(path_error(e, out, "pass --out with a path in a writable folder with free space")) from None
        line += f"; written to {path}"
    print(line)
    return 0


def _parse_timesteps(text: str) -> list[int]:
    from ..cli import parse_int_list

    return parse_int_list(text, "--timesteps")


def _sample_images(args: argparse.Namespace):
    """The images of ``fid --model`` (its options are checked by :func:`run_fid`, before the reference is read)."""
    import autodiffusion_rt as adr

    model = adr.load_model(args.model)
    if args.timesteps is not None:
        timesteps = _parse_timesteps(args.timesteps)
    else:
        from ..diffusion.schedules import uniform_timesteps

        timesteps = uniform_timesteps(model.num_timesteps, args.steps)
    images = adr.sample(
        model, timesteps, sampler=args.sampler, n=args.n, seed=args.seed, labels=None, progress=not args.quiet
    )
    what = f"{args.model}, {args.sampler}, timesteps {','.join(map(str, timesteps))}, seed {args.seed}"
    return images, what


def run_fid(args: argparse.Namespace) -> int:
    from .extractors import get_extractor
    from .imagesets import load_image_source, resolve_reference
    from .stats import FIDWarning, compute_stats, frechet_distance

    if (args.images is None) == (args.model is None):
        raise DataError(
            "give either the generated images (a folder or .npz) or --model SPEC to sample them, not both/neither"
        )
    if args.model is None and (args.steps is not None or args.timesteps is not None):
        raise SamplingError("--steps/--timesteps only apply with --model")
    _check_batch_size(args)
    if args.model is not None:
        from ..diffusion import check_seed

        if args.steps is None and args.timesteps is None:
            raise SamplingError("--model needs --steps N or --timesteps 999,749,...")
        if args.steps is not None and args.steps < 1:
            raise SamplingError(f"--steps {args.steps}: must be a positive integer")
        if args.n < 2:
            raise SamplingError(f"--n {args.n}: FID needs at least 2 samples")
        check_seed(args.seed, "--seed")
        if args.timesteps is not None:
            _parse_timesteps(args.timesteps)  # a malformed list fails now, not after the reference is computed

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FIDWarning)
        extractor = args.extractor
        if extractor is None:
            # a statistics file decides; everything else defaults to mnist
            extractor = _stats_file_extractor(args.ref) or "mnist"
        ext = get_extractor(extractor)
        ref, ref_where = resolve_reference(
            args.ref, ext, cache_dir=args.cache_dir, batch_size=args.batch_size, progress=not args.quiet
        )
        if args.model is not None:
            images, what = _sample_images(args)
        else:
            source = load_image_source(args.images, extractor=None, progress=not args.quiet)
            if source.images is None:
                raise DataError(
                    f"{args.images} holds statistics, not images: pass it as --ref, and the generated images as IMAGES"
                )
            images, what = source.images, source.description
        gen = compute_stats(images, ext, dataset="generated", batch_size=args.batch_size, progress=not args.quiet)
        value = frechet_distance(gen, ref)
    _show_warnings(caught)
    ref_n = f"{ref.num_samples} samples" if ref.num_samples else "sample count not recorded"
    print(
        f"FID {value:.4f}  ({gen.num_samples} samples, extractor {ext.name}; generated: {what}; "
        f"reference: {ref.dataset}, {ref_n}, {ref_where})"
    )
    return 0


def _stats_file_extractor(ref: str) -> str | None:
    """The extractor a statistics .npz was computed with (ours: its key; ADM mu/sigma: inception), else None."""
    from pathlib import Path

    import numpy as np

    path = Path(ref)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if "key" in files and "format" in files:
                from ..records import loads_json

                key = loads_json(str(z["key"]))
                return key.get("extractor") if isinstance(key, dict) else None
            if {"mu", "sigma"} <= files:  # ADM reference batch: TF Inception statistics
                return "inception"
    except Exception:  # noqa: BLE001 - resolve_reference reports unreadable files properly
        return None
    return None


def add_train_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    """``train-classifier``'s options (here, not in mnist_classifier.py: its ``--help`` imports no torch)."""
    parser.add_argument(
        "--out", default=None, help="where to write the weights (default: the packaged asset)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batches (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training digits (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave the other cores alone)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_train_classifier(args) -> int:
    from .mnist_classifier import run

    return run(args)
