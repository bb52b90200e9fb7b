"""Engine backends, one module each: torch (the reference), onnxruntime, OpenVINO and TensorRT.

Each compiled backend builds its own engines from an engine dir's manifest
(``load_engines``); the :class:`~autodiffusion_rt.runtime.Runtime` never
cares which. onnxruntime, openvino, tensorrt and cuda-python are imported
inside their backend, so a missing one is a
:class:`~autodiffusion_rt.errors.BackendUnavailableError` when asked for, never
an import error of this package.
"""

from .base import Engine, LoadedEngines
from .ort_backend import OnnxRuntimeEngine, onnxruntime_providers
from .ov_backend import OpenVINOStepEngine
from .torch_backend import TorchStepEngine
from .trt_backend import SharedDeviceMemory, TensorRTEngine

__all__ = [
    "Engine",
    "LoadedEngines",
    "OnnxRuntimeEngine",
    "OpenVINOStepEngine",
    "SharedDeviceMemory",
    "TensorRTEngine",
    "TorchStepEngine",
    "onnxruntime_providers",
]
