"""Image sets and statistics files on disk: folders of images, .npz of images, .npz of statistics,
and :func:`reference_stats` / :func:`resolve_reference`, which turn any of them (or an embedded
dataset) into the cached reference statistics FID compares with.

Images stay uint8 NHWC numpy arrays here (the edge format); extractors
convert them to NCHW [-1, 1] batch by batch.

Accepted .npz layouts:

- autodiffusion-rt statistics (written by ``fid-stats --out`` or the cache):
  ``format``, ``key``, ``mu``, ``sigma``, ``num_samples``;
- the ADM reference batches (openai/guided-diffusion ``evaluations``):
  ``arr_0`` uint8 NHWC images and/or precomputed ``mu``/``sigma`` (TF
  Inception pool-3). Their ``mu``/``sigma`` are used as ``inception``
  statistics: they come from the same 2015-12-05 TF FID network, fed 8-bit
  images and resized by the TF graph's own ``ResizeBilinear``, which is the
  preprocessing our ``inception`` extractor reproduces;
- generated samples: ``arr_0`` (as guided-diffusion's sample scripts write)
  or ``images``, or a single array, uint8 NHWC or NHW.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import check_uint8_images
from ..errors import DataError
from .extractors import FeatureExtractor, get_extractor
from .stats import STATS_FORMAT, FeatureStats, StatsKey, cached_stats, images_digest, stats_from_features

__all__ = [
    "EMBEDDED_DATASETS",
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "load_image_folder",
    "load_image_source",
    "load_images_npz",
    "reference_stats",
    "resolve_reference",
]

EMBEDDED_DATASETS = {"mnist": "all", "mnist:all": "all", "mnist:train": "train", "mnist:heldout": "heldout"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_IMAGE_KEYS = ("arr_0", "images")


@dataclass
class ImageSource:
    """What a path held: images (uint8 NHWC) or statistics, with a label for dataset ids and messages."""

    label: str
    description: str
    images: np.ndarray | None = None
    stats: FeatureStats | None = None


def load_image_folder(folder: str | Path, progress: bool = False) -> np.ndarray:
    """All images under ``folder`` (recursively, sorted by path) as uint8 NHWC; they must share one size."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder}: the image set is empty")
    iterator = files
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(files, desc=f"read {folder.name}", unit="img")
    # Our limit is the one check (PIL's own bomb error is a message without the size or the override).
    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        arrays = _read_images(iterator)
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    gray = all(a.ndim == 2 for _, _, a in arrays)
    out = []
    for p, mode, a in arrays:
        if not gray and a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        elif gray:
            a = a[..., None]
        out.append(a)
    first = out[0].shape
    for (p, _, _), a in zip(arrays, out):
        if a.shape != first:
            raise DataError(
                f"images in {folder} differ in size: {arrays[0][0].name} is {first[1]}x{first[0]}, "
                f"{p.name} is {a.shape[1]}x{a.shape[0]}; resize them to one size first"
            )
    return np.stack(out)


def _npz_member_shape(path: Path, name: str) -> tuple[int, ...] | None:
    """Shape of array ``name`` in an .npz without reading its data (reference batches can be gigabytes)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
            return tuple(shape)
    except Exception:  # noqa: BLE001 - informational only
        return None


def _adm_stats(z, path: Path, ext: FeatureExtractor, image_key: str | None) -> ImageSource:
    from ..limits import check_npz_arrays

    check_npz_arrays(path, DataError, ("mu", "sigma"))  # their sizes from their headers, before they are read
    mu, sigma = z["mu"], z["sigma"]
    if mu.shape != (ext.feature_dim,):
        raise DataError(f"{path}: ADM mu has shape {mu.shape}, expected ({ext.feature_dim},) Inception pool-3 features")
    shape = _npz_member_shape(path, image_key) if image_key else None
    n = int(shape[0]) if shape else 0
    h = hashlib.sha256()
    for a in (mu, sigma):
        h.update(np.ascontiguousarray(a).tobytes())
    key = StatsKey(f"adm:{path.stem}:{h.hexdigest()[:12]}", ext.name, ext.preprocessing, ext.fingerprint)
    stats = FeatureStats._validated(mu, sigma, n, key, str(path))
    count = f"{n} samples" if n else "sample count not recorded"
    return ImageSource(f"adm:{path.stem}", f"{path} (ADM precomputed mu/sigma, {count})", stats=stats)


def _read_images(paths) -> list:
    """(path, mode, uint8 array) of each image file; its size checked from its header before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    from ..limits import check_limit

    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:  # reads the header only
                w, h = im.size
                check_limit("image_pixels", w * h, f"{w}x{h} pixels", str(p), DataError)
                gray = im.mode in ("1", "L", "I", "I;16")
                arrays.append((p, im.mode, np.asarray(im.convert("L") if gray else im.convert("RGB"))))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot read image {p}: {e}") from None
    return arrays


def _as_uint8_images(a: np.ndarray, where: str) -> np.ndarray:
    a = check_uint8_images(a, where)
    if a.shape[0] == 0:
        raise DataError(f"{where} holds 0 images: the image set is empty")
    return a


def load_images_npz(path: str | Path) -> np.ndarray:
    """The uint8 NHWC images in an .npz (``arr_0``, ``images``, or its only array)."""
    src = load_image_source(path, extractor=None)
    if src.images is None:
        raise DataError(f"{path} holds statistics, not images")
    return src.images


def load_image_source(
    path: str | Path,
    extractor: str | FeatureExtractor | None = "mnist",
    progress: bool = False,
    prefer_images: bool = False,
) -> ImageSource:
    """Read a folder of images or an .npz (images or statistics); see the module docstring for layouts.

    An ADM batch's precomputed ``mu``/``sigma`` are used when ``extractor`` is
    ``inception``, unless ``prefer_images`` and the file also holds images.
    """
    path = Path(path)
    if not path.exists():
        names = ", ".join(EMBEDDED_DATASETS)
        raise DataError(
            f"{path} does not exist: give an image folder, an .npz of images or statistics, "
            f"or an embedded data set ({names})"
        )
    if path.is_dir():
        images = load_image_folder(path, progress=progress)
        return ImageSource(f"folder:{path.name}", f"{path} ({len(images)} images)", images=images)
    if path.suffix.lower() != ".npz":
        raise DataError(
            f"{path} is neither a folder nor an .npz file: put images in a folder, "
            "or save them with np.savez(path, arr_0=uint8 NHWC array)"
        )
    from ..limits import check_npz_arrays

    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read {path} as .npz ({type(e).__name__}: {e})") from None
    with z:
        files = set(z.files)
        if "format" in files:
            if str(z["format"]) != STATS_FORMAT:
                raise DataError(f"{path} has format {str(z['format'])!r}, expected {STATS_FORMAT!r}")
            stats = FeatureStats.load(path)
            return ImageSource(
                f"stats:{path.name}",
                f"{path} (statistics of {stats.dataset}, {stats.num_samples} samples)",
                stats=stats,
            )
        image_key = next((k for k in _IMAGE_KEYS if k in files), None)
        if image_key is None and len(files) == 1 and not files & {"mu", "sigma"}:
            image_key = next(iter(files))
        ext = get_extractor(extractor) if extractor is not None else None
        has_stats = {"mu", "sigma"} <= files
        if has_stats and ext is not None and ext.name == "inception" and not (prefer_images and image_key):
            return _adm_stats(z, path, ext, image_key)
        if image_key is None:
            if has_stats:
                name = ext.name if ext is not None else "none"
                raise DataError(
                    f"{path} holds precomputed Inception mu/sigma (ADM format) and no images: "
                    f"use --extractor inception (got {name})"
                )
            raise DataError(
                f"{path} holds arrays {sorted(files)}: expected images under 'arr_0' or 'images', "
                "or statistics 'mu'/'sigma'"
            )
        check_npz_arrays(path, DataError, (image_key,))  # its size from its header, before it is read
        images = _as_uint8_images(z[image_key], f"{path}[{image_key!r}]")
        return ImageSource(f"npz:{path.stem}", f"{path} ({len(images)} images)", images=images)


def reference_stats(
    dataset: str | os.PathLike = "mnist",
    extractor: str | FeatureExtractor = "mnist",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    recompute: bool = False,
) -> FeatureStats:
    """Reference statistics of a dataset under an extractor, computed once and cached on disk.

    ``dataset``: ``mnist`` (all 5,000 embedded digits), ``mnist:train``,
    ``mnist:heldout``; or a path to an image folder or an .npz of uint8 images
    (``arr_0`` NHWC, as in the ADM reference batches; an ADM batch's
    precomputed ``mu``/``sigma`` are used directly with the ``inception``
    extractor). Call it once and keep the result; :func:`fid` does no file I/O.
    """
    return resolve_reference(
        dataset, extractor, cache_dir=cache_dir, batch_size=batch_size, progress=progress, recompute=recompute
    )[0]


def resolve_reference(
    ref, extractor="mnist", cache_dir=None, batch_size=None, progress=False, recompute=False, use_precomputed=True
) -> tuple[FeatureStats, str]:
    """(stats, a one-line description of where they came from) for an embedded dataset, image path or stats file.

    ``use_precomputed=False`` recomputes an ADM batch's statistics from its images instead of using its mu/sigma.
    """
    from ..data import load_mnist

    ext = get_extractor(extractor)
    ref_str = str(ref)
    if ref_str in EMBEDDED_DATASETS:
        split = EMBEDDED_DATASETS[ref_str]
        images = load_mnist(split)[0]
        dataset_id = f"mnist:{split}:{images_digest(images)}"
    else:
        source = load_image_source(ref_str, extractor=ext, progress=progress, prefer_images=not use_precomputed)
        if source.stats is not None:  # a statistics file, ours or ADM's
            why = source.stats.comparable_with(ext)
            if why is not None:
                raise DataError(
                    f"statistics file {ref_str} was computed with another extractor setting ({why}): "
                    f"use --extractor {source.stats.extractor}, or recompute the statistics"
                )
            return source.stats, source.description
        images = source.images
        dataset_id = f"{source.label}:{images_digest(images)}"
    key = StatsKey.for_extractor(dataset_id, ext)
    stats, path, hit = cached_stats(
        key,
        lambda: stats_from_features(ext.features(images, batch_size=batch_size, progress=progress), key),
        cache_dir=cache_dir,
        recompute=recompute,
    )
    return stats, f"{ref_str} ({'cached' if hit else 'computed, cached'} at {path})"
