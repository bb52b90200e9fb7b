"""The names a user can type, in one place that imports nothing heavy (no torch, numpy or onnx).

The command lines' help, choices and one-line errors are generated from these
tables, so ``--help`` answers before torch is imported. Where the code that
implements a name lives in a heavy module (the samplers, the backends), that
module keeps its own tuple and ``tests/test_registry.py`` checks the two are
equal; the light modules (the model loader, the schedules) read them from here.
"""

from __future__ import annotations

__all__ = [
    "BUILD_BACKENDS", "BUILD_PRECISIONS", "COMMANDS", "DEFAULT_MODEL", "DEFAULT_OPSET", "EXTRACTORS", "IMAGE_OUTPUTS",
    "LABEL_MODES", "MAX_SAMPLES", "MODEL_SPECS", "RUNTIME_BACKENDS", "SAMPLERS", "SPACINGS", "SPACING_HELP",
    "model_spec_help", "one_of",
]

#: Sampler names (autodiffusion_rt.diffusion.samplers.SAMPLERS implements them; a test checks they agree).
SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "ipndm", "unipc", "unipc3")

#: Uniform timestep spacings (autodiffusion_rt.diffusion.schedules.uniform_timesteps reads them from here).
SPACINGS = ("linear", "quadratic", "logsnr", "karras")
SPACING_HELP = (
    "linear (trailing), quadratic (denser near t=0), logsnr (equal steps in log-SNR) "
    "or karras (EDM rho=7 in sigma, diffusers' use_karras_sigmas)"
)

#: Model spec kinds: ``KIND:ARG`` -> what ARG is (autodiffusion_rt.models.loading.load_model dispatches on them).
MODEL_SPECS = {
    "embedded": ("embedded:mnist", "the model shipped with the package"),
    "adm": ("adm:PATH", "a guided-diffusion checkpoint (with --preset / --option)"),
    "ckpt": ("ckpt:PATH", "a checkpoint written by 'autodiffusion-rt train'"),
    "diffusers": ("diffusers:DIR", "a diffusers UNet2DModel save_pretrained directory"),
}
DEFAULT_MODEL = "embedded:mnist"

#: Engine backends the runtime loads (autodiffusion_rt.runtime.BACKENDS; "auto" picks one) and ``build`` writes
#: (export.context.BUILD_BACKENDS); tests check both.
RUNTIME_BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
BUILD_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
#: Engine precisions ``build`` writes (export.context reads them from here; "auto" picks one per backend and CPU).
BUILD_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: How a class-conditional step's label embedding is built (export.subnet reads them from here).
LABEL_MODES = ("auto", "table", "graph")
#: The ONNX opset ``build`` exports with (export.onnx_export reads it from here).
DEFAULT_OPSET = 17

#: FID feature extractors (autodiffusion_rt.metrics.EXTRACTOR_NAMES).
EXTRACTORS = ("mnist", "inception")

#: What ``sample --out`` writes, by suffix.
IMAGE_OUTPUTS = {
    ".png": "a grid of the images",
    ".npz": "uint8 NHWC images (arr_0, ADM's layout) and labels (arr_1)",
    ".npy": "float32 NCHW images in [-1, 1], as the service's format=npy returns",
}

#: The most samples one command or call makes (an .npz is written in chunks: memory stays O(chunk)).
MAX_SAMPLES = 1_000_000

#: The ``autodiffusion-rt`` subcommands: name -> (module that registers it, one-line help). The top-level
#: ``--help`` is printed from this table; only the chosen command's module is imported.
COMMANDS = {
    "sample": ("autodiffusion_rt.cli", "sample images (uniform/explicit timesteps, a plan, or built engines)"),
    "train": ("autodiffusion_rt.cli", "train the embedded MNIST model (resumable)"),
    "info": ("autodiffusion_rt.cli", "model config, layer table with MACs, versions"),
    "export-diffusers": ("autodiffusion_rt.cli",
                         "the diffusers scheduler settings reproducing a plan's schedule (no skipping)"),
    "fid-stats": ("autodiffusion_rt.metrics.cli", "compute (and cache) FID reference statistics"),
    "fid": ("autodiffusion_rt.metrics.cli", "FID of generated images against reference statistics"),
    "train-classifier": ("autodiffusion_rt.metrics.cli", "train the mnist feature classifier"),
    "build": ("export.cli", "compile a plan into an engine dir: one engine per step and manifest.json"),
    "serve": ("autodiffusion_rt.serve.cli", "serve engine dirs over HTTP (POST /v1/samples) with dynamic batching"),
}


def one_of(names) -> str:
    """``a, b or c``: the choices as a help line or an error names them."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def model_spec_help(default: str = DEFAULT_MODEL) -> str:
    return f"model spec: {one_of(form for form, _ in MODEL_SPECS.values())} (default: {default})"
