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

from autodiffusion_rt.utils import lazy_exports

# Imported on first use, so that ``fid --help`` (metrics.cli) does not pay for torch.
_SOURCES = {
    "EXTRACTOR_NAMES": ".extractors",
    "FeatureExtractor": ".extractors",
    "InceptionExtractor": ".extractors",
    "MnistExtractor": ".extractors",
    "check_images": ".extractors",
    "get_extractor": ".extractors",
    "EMBEDDED_DATASETS": ".imagesets",
    "load_image_folder": ".imagesets",
    "load_image_source": ".imagesets",
    "load_images_npz": ".imagesets",
    "reference_stats": ".imagesets",
    "resolve_reference": ".imagesets",
    "FeatureStats": ".stats",
    "FIDWarning": ".stats",
    "StatsKey": ".stats",
    "bootstrap_indices": ".stats",
    "cache_root": ".stats",
    "compute_stats": ".stats",
    "fid": ".stats",
    "fid_with_bootstrap": ".stats",
    "frechet_distance": ".stats",
    "stats_from_features": ".stats",
}
__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
