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

from .build import BuildReport, build_engines
from .onnx_export import OnnxExport, export_step_onnx, graph_stats
from .subnet import StepModule, step_modules

__all__ = [
    "BuildReport",
    "OnnxExport",
    "StepModule",
    "build_engines",
    "export_step_onnx",
    "graph_stats",
    "step_modules",
]
