"""Feature statistics, the Frechet distance, FID, and the reference-statistics cache.

:class:`FeatureStats` is (mu, sigma, num_samples) plus the key it was computed
under: dataset id, extractor name, preprocessing id and extractor weights
fingerprint. Two statistics are comparable only when their extractor,
preprocessing and fingerprint agree; :func:`frechet_distance` refuses
otherwise.

The Frechet distance itself is pytorch-fid's
``pytorch_fid.fid_score.calculate_frechet_distance``.

Reference statistics are computed once per key and cached on disk under
``$AUTODIFFUSION_RT_CACHE`` (default ``~/.cache/autodiffusion-rt``), in
``fid-stats/``. A cache file records its key; a file that is unreadable or
whose key differs is recomputed (with a warning) and rewritten atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..utils import atomic_write
from .extractors import FeatureExtractor, get_extractor

__all__ = [
    "FIDWarning",
    "FeatureStats",
    "StatsKey",
    "bootstrap_indices",
    "cache_root",
    "compute_stats",
    "fid",
    "fid_with_bootstrap",
    "frechet_distance",
    "stats_from_features",
]

STATS_FORMAT = "autodiffusion-rt/fid-stats/1"
CACHE_ENV = "AUTODIFFUSION_RT_CACHE"


class FIDWarning(UserWarning):
    """FID computed, but on shaky ground: too few samples, a singular covariance, a recomputed cache file."""


@dataclass(frozen=True)
class StatsKey:
    """What a set of statistics was computed from and with."""

    dataset: str
    extractor: str
    preprocessing: str
    fingerprint: str

    def as_dict(self) -> dict[str, str]:
        return {
            "dataset": self.dataset,
            "extractor": self.extractor,
            "preprocessing": self.preprocessing,
            "fingerprint": self.fingerprint,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def cache_filename(self) -> str:
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", self.dataset)[:60]
        return f"{readable}__{self.extractor}__{self.digest()}.npz"

    @classmethod
    def for_extractor(cls, dataset: str, extractor: FeatureExtractor) -> "StatsKey":
        return cls(dataset, extractor.name, extractor.preprocessing, extractor.fingerprint)


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Mean and covariance of N feature vectors, with the key they were computed under."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    dataset: str
    extractor: str
    preprocessing: str
    fingerprint: str

    @property
    def key(self) -> StatsKey:
        return StatsKey(self.dataset, self.extractor, self.preprocessing, self.fingerprint)

    @property
    def feature_dim(self) -> int:
        return int(self.mu.shape[0])

    def comparable_with(self, other: "FeatureStats | FeatureExtractor") -> str | None:
        """None when the two were computed with the same extractor, preprocessing and weights; else why not."""
        name = other.name if isinstance(other, FeatureExtractor) else other.extractor
        if self.extractor != name:
            return f"extractor {self.extractor!r} != {name!r}"
        if self.preprocessing != other.preprocessing:
            return f"preprocessing {self.preprocessing!r} != {other.preprocessing!r}"
        if self.fingerprint != other.fingerprint:  # for an extractor, this loads its weights: compared last
            return f"weights fingerprint {self.fingerprint!r} != {other.fingerprint!r}"
        return None

    # --- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (.npz) atomically: a temporary file in the same folder, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            np.savez(
                f,
                format=np.array(STATS_FORMAT),
                key=np.array(json.dumps(self.key.as_dict(), sort_keys=True)),
                mu=self.mu,
                sigma=self.sigma,
                num_samples=np.array(self.num_samples, dtype=np.int64),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect: StatsKey | None = None) -> "FeatureStats":
        """Read a file written by :meth:`save`; DataError if it is unreadable, malformed, or its key is not
        ``expect``."""
        from ..limits import check_npz_arrays

        path = Path(path)
        try:
            check_npz_arrays(path, DataError)  # every array's size from its header, before one is read
            with np.load(path, allow_pickle=False) as z:
                fields = {k: z[k] for k in z.files}
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(
                f"statistics file {path} does not exist: compute it with `autodiffusion-rt fid-stats`"
            ) from None
        except Exception as e:  # noqa: BLE001 - zip/npy errors of every kind mean the same: unreadable
            raise DataError(
                f"statistics file {path} is unreadable ({type(e).__name__}: {e}): "
                "recompute it with `autodiffusion-rt fid-stats`"
            ) from None
        missing = {"format", "key", "mu", "sigma", "num_samples"} - set(fields)
        if missing:
            raise DataError(
                f"{path} is not an autodiffusion-rt statistics file (missing {sorted(missing)}): "
                "recompute it with `autodiffusion-rt fid-stats`"
            )
        if str(fields["format"]) != STATS_FORMAT:
            raise DataError(
                f"{path} has format {str(fields['format'])!r}, expected {STATS_FORMAT!r}: "
                "recompute it with `autodiffusion-rt fid-stats`"
            )
        from ..records import loads_json, one_line, schema, validate

        fix = "recompute it with `autodiffusion-rt fid-stats`"
        try:
            key = loads_json(str(fields["key"]))
        except ValueError as e:
            raise DataError(f"{path} has a malformed key ({one_line(e)}): {fix}") from None
        key = StatsKey(**validate(schema("StatsKeyRecord"), key, f"{path} (key)", DataError, fix).model_dump())
        num_samples = fields["num_samples"]
        if num_samples.shape != () or not np.issubdtype(num_samples.dtype, np.integer):
            raise DataError(
                f"{path}: field 'num_samples' must be one integer, got {num_samples.dtype} {num_samples.shape}; {fix}"
            )
        stats = cls._validated(fields["mu"], fields["sigma"], int(num_samples), key, str(path))
        if expect is not None and key != expect:
            diff = ", ".join(
                f"{k} {v!r} (file) != {expect.as_dict()[k]!r}"
                for k, v in key.as_dict().items()
                if expect.as_dict()[k] != v
            )
            raise DataError(f"{path} holds statistics for another key: {diff}")
        return stats

    @classmethod
    def _validated(cls, mu, sigma, num_samples: int, key: StatsKey, where: str) -> "FeatureStats":
        mu = np.asarray(mu)
        sigma = np.asarray(sigma)
        if mu.ndim != 1 or mu.shape[0] < 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise DataError(f"{where}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
            raise DataError(f"{where}: mu and sigma must be floating point, got {mu.dtype} and {sigma.dtype}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise DataError(f"{where}: mu or sigma contains NaN or inf")
        if num_samples < 0:
            raise DataError(f"{where}: num_samples must be >= 0, got {num_samples}")
        return cls(
            mu.astype(np.float64),
            sigma.astype(np.float64),
            int(num_samples),
            key.dataset,
            key.extractor,
            key.preprocessing,
            key.fingerprint,
        )

    def __repr__(self) -> str:
        return (
            f"FeatureStats(dataset={self.dataset!r}, extractor={self.extractor!r}, dim={self.feature_dim}, "
            f"num_samples={self.num_samples})"
        )


# --- computing statistics -----------------------------------------------------------------------
def stats_from_features(features: np.ndarray, key: StatsKey) -> FeatureStats:
    """Mean and covariance of (N, D) features; warns when N is too small for a full-rank covariance."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise DataError(f"features must be (N, D), got shape {features.shape}")
    n, d = features.shape
    if n < 2:
        raise DataError(
            f"{n} image(s): a covariance needs at least 2 samples, "
            f"and a full-rank one {d + 1} or more with the {key.extractor!r} extractor ({d}-d features)"
        )
    if n < d + 1:
        warnings.warn(
            f"only {n} samples for {d}-d {key.extractor!r} features: the covariance has rank at most {n - 1} < {d}, "
            f"so the FID is biased and unstable; use at least {d + 1} samples (several times that for a stable FID)",
            FIDWarning,
            stacklevel=3,
        )
    return FeatureStats(
        features.mean(axis=0),
        np.cov(features, rowvar=False).reshape(d, d),
        n,
        key.dataset,
        key.extractor,
        key.preprocessing,
        key.fingerprint,
    )


def compute_stats(
    images,
    extractor: str | FeatureExtractor = "mnist",
    dataset: str = "images",
    batch_size: int | None = None,
    progress: bool = False,
) -> FeatureStats:
    """Statistics of an image set (NCHW float tensor in [-1, 1], or uint8 NHWC numpy) under ``extractor``."""
    ext = get_extractor(extractor)
    feats = ext.features(images, batch_size=batch_size, progress=progress)
    return stats_from_features(feats, StatsKey.for_extractor(dataset, ext))


# --- the distance -------------------------------------------------------------------------------
def frechet_distance(stats_a: FeatureStats, stats_b: FeatureStats) -> float:
    """Frechet distance of two Gaussians (pytorch-fid's ``calculate_frechet_distance``).

    Refuses (DataError) statistics computed with different extractors,
    preprocessing or weights. A singular covariance product, which
    pytorch-fid handles by adding 1e-6 to the diagonals and printing a
    message, is reported as a :class:`FIDWarning` instead.
    """
    from pytorch_fid.fid_score import calculate_frechet_distance

    why = stats_a.comparable_with(stats_b)
    if why is not None:
        raise DataError(
            f"cannot compare statistics of {stats_a.dataset!r} and {stats_b.dataset!r}: {why}. "
            "Recompute the reference statistics with the same extractor "
            f"(autodiffusion-rt fid-stats --extractor {stats_a.extractor})"
        )
    if stats_a.mu.shape != stats_b.mu.shape:
        raise DataError(
            f"feature sizes differ: {stats_a.feature_dim} ({stats_a.dataset}) "
            f"vs {stats_b.feature_dim} ({stats_b.dataset})"
        )
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        try:
            value = calculate_frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)
        except ValueError as e:  # "Imaginary component ...": ill-conditioned covariances
            raise DataError(
                f"the Frechet distance of {stats_a.dataset!r} and {stats_b.dataset!r} failed numerically ({e}): "
                "the covariances are too ill-conditioned; "
                f"use more samples (have {stats_a.num_samples} and {stats_b.num_samples}, "
                f"feature size {stats_a.feature_dim})"
            ) from None
    notes = [printed.getvalue().strip()] if printed.getvalue().strip() else []
    notes += [
        str(w.message) for w in caught if not (issubclass(w.category, DeprecationWarning) and "disp" in str(w.message))
    ]
    if notes:
        warnings.warn(
            f"Frechet distance of {stats_a.dataset!r} and {stats_b.dataset!r}: " + "; ".join(dict.fromkeys(notes)),
            FIDWarning,
            stacklevel=2,
        )
    return float(value)


def fid(
    images,
    ref_stats: FeatureStats,
    extractor: str | FeatureExtractor | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> float:
    """FID of ``images`` (NCHW float tensor in [-1, 1]) against reference statistics.

    ``extractor`` defaults to the one ``ref_stats`` were computed with. This
    is the search's fitness call: the extractor is loaded once and kept, no
    file is read or written.
    """
    ext = get_extractor(extractor if extractor is not None else ref_stats.extractor)
    why = ref_stats.comparable_with(ext)
    if why is not None:
        raise DataError(
            f"reference statistics {ref_stats.dataset!r} were computed with another extractor setting ({why}): "
            f"recompute them with `autodiffusion-rt fid-stats --extractor {ext.name}`"
        )
    gen = compute_stats(images, ext, dataset="generated", batch_size=batch_size, progress=progress)
    return frechet_distance(gen, ref_stats)


def bootstrap_indices(n: int, rounds: int, seed: int = 0) -> np.ndarray:
    """(rounds, n) sample indices drawn with replacement: the resamples :func:`fid_with_bootstrap` uses.

    Pass the same array for image sets made from the same noise (a report's rows) to pair them: the
    spread of a difference of two FIDs is then that of the difference, not of each FID.
    """
    return np.random.default_rng(seed).integers(0, n, size=(int(rounds), int(n)))


def fid_with_bootstrap(
    images, ref_stats: FeatureStats, extractor: str | FeatureExtractor | None = None, indices: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """(FID of ``images``, the FIDs of the resampled sets ``features[indices[k]]``).

    The features are computed once; each resample costs a covariance and a matrix square root of the
    feature size (milliseconds for the 64-d mnist features). The resampled FIDs' standard deviation is the
    FID's uncertainty over the choice of samples; a resample the distance fails on is NaN. ``indices`` None:
    no resamples (an empty array).
    """
    ext = get_extractor(extractor if extractor is not None else ref_stats.extractor)
    why = ref_stats.comparable_with(ext)
    if why is not None:
        raise DataError(
            f"reference statistics {ref_stats.dataset!r} were computed with another extractor setting "
            f"({why}): recompute them with `autodiffusion-rt fid-stats --extractor {ext.name}`"
        )
    feats = ext.features(images)
    key = StatsKey.for_extractor("generated", ext)
    value = frechet_distance(stats_from_features(feats, key), ref_stats)
    boot = []
    for idx in [] if indices is None else indices:
        try:
            boot.append(frechet_distance(stats_from_features(feats[idx], key), ref_stats))
        except DataError:  # a resample too degenerate for the distance (few samples): not a spread, left out
            boot.append(math.nan)
    return value, np.asarray(boot, dtype=np.float64)


# --- reference statistics and their cache ---------------------------------------------------------
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` or ``$AUTODIFFUSION_RT_CACHE`` or ``~/.cache/autodiffusion-rt``, then ``fid-stats/``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "autodiffusion-rt"
    return Path(cache_dir).expanduser() / "fid-stats"


def images_digest(images) -> str:
    """Short sha256 of an image set as 8-bit pixels (what the extractors see), for dataset ids."""
    from ..data import to_uint8

    a = images if isinstance(images, np.ndarray) else to_uint8(images)
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:12]


def cached_stats(key: StatsKey, compute, cache_dir=None, recompute: bool = False) -> tuple[FeatureStats, Path, bool]:
    """(stats, cache file, whether it was read from the cache). ``compute()`` -> FeatureStats under ``key``."""
    path = cache_root(cache_dir) / key.cache_filename()
    if path.exists() and not recompute:
        try:
            return FeatureStats.load(path, expect=key), path, True
        except DataError as e:
            warnings.warn(f"fid-stats cache file {path} cannot be used ({e}); recomputing it", FIDWarning, stacklevel=3)
    stats = compute()
    if stats.key != key:  # a programming error, not a user one
        raise AssertionError(f"computed stats have key {stats.key}, expected {key}")
    stats.save(path)
    return stats, path, False
