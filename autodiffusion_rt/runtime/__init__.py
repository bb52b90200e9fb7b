"""The runtime: engine backends (torch, onnxruntime, tensorrt) and the schedule-walking :class:`Runtime`."""

from .engines import (
    Engine,
    OnnxRuntimeEngine,
    SharedDeviceMemory,
    TensorRTEngine,
    TensorSpec,
    TorchStepEngine,
    onnxruntime_providers,
    step_io,
)
from .runtime import (
    BACKENDS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ModelInfo,
    Runtime,
    coefficients_for_plan,
    library_versions,
    load_plan_model,
    plan_sha256,
    read_manifest,
    sample_from_engines,
)

__all__ = [
    "BACKENDS",
    "Engine",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ModelInfo",
    "OnnxRuntimeEngine",
    "Runtime",
    "SharedDeviceMemory",
    "TensorRTEngine",
    "TensorSpec",
    "TorchStepEngine",
    "coefficients_for_plan",
    "library_versions",
    "load_plan_model",
    "onnxruntime_providers",
    "plan_sha256",
    "read_manifest",
    "sample_from_engines",
    "step_io",
]
