"""User-facing errors.

Every failure a user can cause raises a subclass of :class:`Error`. Its message
names the bad value and says what to do; the CLI prints it on one line and
exits with status 2.
"""


class Error(Exception):
    """Base class of every user-facing autodiffusion-rt error."""


class ModelSpecError(Error):
    """An unknown or malformed model spec (``embedded:mnist``, ``adm:PATH``)."""


class CheckpointError(Error):
    """A checkpoint file is missing, unreadable or does not fit its config."""


class TimestepsError(Error):
    """A timestep list is empty, not strictly descending, or out of range."""


class SamplingError(Error):
    """Bad sampling arguments: n, labels, keep masks, sampler name."""


class LayerError(Error):
    """Unknown layer ids in a keep or skip set."""


class DataError(Error):
    """Bad image data: empty sets, wrong shapes or dtypes, unreadable files."""


class PlanError(Error):
    """A plan file that is missing, malformed or inconsistent."""


class EngineError(Error):
    """An engine dir, manifest or engine file that cannot be used."""


class BackendUnavailableError(Error):
    """An optional backend (tensorrt, cuda-python, onnxruntime-gpu) is not installed."""
