"""FID for autodiffusion-rt: feature extractors, statistics, the Frechet distance.

Typical use (the search's fitness)::

    from autodiffusion_rt.metrics import get_extractor, reference_stats, fid

    ext = get_extractor("mnist")             # loaded once, kept
    ref = reference_stats("mnist", ext)      # computed once, cached on disk
    score = fid(images, ref, ext)            # images: NCHW float in [-1, 1]; no file I/O

Extractors: ``mnist`` (64-d penultimate layer of the project's MNIST
classifier, 1x28x28 only, fast) and ``inception`` (the TF FID Inception
network, 2048-d, any size, slow on a CPU). The Frechet distance is pytorch-fid's.
"""

from .extractors import (
    EXTRACTOR_NAMES,
    FeatureExtractor,
    InceptionExtractor,
    MnistExtractor,
    check_images,
    get_extractor,
)
from .imagesets import (
    EMBEDDED_DATASETS,
    load_image_folder,
    load_image_source,
    load_images_npz,
    reference_stats,
    resolve_reference,
)
from .stats import (
    FeatureStats,
    FIDWarning,
    StatsKey,
    bootstrap_indices,
    cache_root,
    compute_stats,
    fid,
    fid_with_bootstrap,
    frechet_distance,
    stats_from_features,
)

__all__ = [
    "EMBEDDED_DATASETS",
    "EXTRACTOR_NAMES",
    "FIDWarning",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionExtractor",
    "MnistExtractor",
    "StatsKey",
    "bootstrap_indices",
    "cache_root",
    "check_images",
    "compute_stats",
    "fid",
    "fid_with_bootstrap",
    "frechet_distance",
    "get_extractor",
    "load_image_folder",
    "load_image_source",
    "load_images_npz",
    "reference_stats",
    "resolve_reference",
    "stats_from_features",
]
