"""The runtime: engine backends (torch, onnxruntime, OpenVINO, TensorRT), the engine dir's manifest, and the
schedule-walking :class:`Runtime`."""

from .backends import (
    Engine,
    OnnxRuntimeEngine,
    OpenVINOStepEngine,
    SharedDeviceMemory,
    TensorRTEngine,
    TorchStepEngine,
    onnxruntime_providers,
)
from .manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, Manifest, library_versions
from .runtime import BACKENDS, ModelInfo, Runtime, sample_from_engines

__all__ = [
    "BACKENDS",
    "Engine",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "Manifest",
    "ModelInfo",
    "OnnxRuntimeEngine",
    "OpenVINOStepEngine",
    "Runtime",
    "SharedDeviceMemory",
    "TensorRTEngine",
    "TorchStepEngine",
    "library_versions",
    "onnxruntime_providers",
    "sample_from_engines",
]
