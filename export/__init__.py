"""Plan -> per-step subnetworks -> ONNX -> engines (onnxruntime, TensorRT), with an engine cache.

* :mod:`export.subnet`: :class:`StepModule`, step i of a plan as a static module
  (skipped layers gone, timestep folded, sampler update fused);
* :mod:`export.onnx_export`: one verified ONNX file per step;
* :mod:`export.tensorrt_build`: ONNX -> serialized TensorRT engine (10.x, 11.x);
* :mod:`export.cache`: the reuse rules;
* :mod:`export.build`: :func:`build_engines`, the engine dir and its manifest;
* :mod:`export.cli`: the ``autodiffusion-rt build`` subcommand.

The runtime that loads an engine dir is :class:`autodiffusion_rt.runtime.Runtime`.
"""

from autodiffusion_rt.utils import lazy_exports

# Imported on first use, so that ``build --help`` (export.cli) does not pay for torch.
_SOURCES = {
    "BuildReport": ".build",
    "build_engines": ".build",
    "OnnxExport": ".onnx_export",
    "export_step_onnx": ".onnx_export",
    "graph_stats": ".onnx_export",
    "StepModule": ".subnet",
    "step_modules": ".subnet",
}
__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
