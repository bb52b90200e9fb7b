"""A model of realistic size to measure on: google/ddpm-cifar10-32's layout with random weights, and plans for it.

    python scripts/cifar_layout.py --out work/cifar
    python benchmark.py --plan work/cifar/plan-nfe4.json --batch-sizes 1,16
    python scripts/memory_ratio.py --model diffusers:work/cifar/model --backend openvino --nfe 10

Writes ``OUT/model`` (a diffusers ``UNet2DModel`` saved with diffusers' own
``save_pretrained``, its ``DDPMScheduler`` config beside it in ``OUT/model/scheduler``:
the hub's layout, so ``diffusers:OUT/model`` loads it) and plans made with
``Plan.for_model`` (a search needs real weights; speed and memory do not):
``plan-nfe4.json`` (DPM-Solver++(2M), uniform 999/749/499/249, no skips),
``plan-nfe10.json`` (uniform, no skips), ``plan-nfe1.json`` (t = 999 only:
one step, the memory baseline) and ``plan-3skips.json`` (10 steps over 3
different sets of kept layers). The architecture: block_out_channels
(128, 256, 256, 256), 2 layers per block, attention at 16x16, 35.7 M
parameters, 3x32x32, linear betas 1e-4..0.02 over 1000 steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: google/ddpm-cifar10-32's UNet2DModel config (the hub's config.json), weights aside.
CIFAR10_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu",
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    center_input_sample=False,
    time_embedding_type="positional",
    mid_block_scale_factor=1,
    resnet_time_scale_shift="default",
    add_attention=True,
)
CIFAR10_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type="fixed_small",
    clip_sample=True,
    prediction_type="epsilon",
)


def write_model(out: Path, seed: int = 0) -> Path:
    """The random-weight model dir (diffusers' save_pretrained); returns it."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**CIFAR10_UNET)
    model_dir = out / "model"
    unet.save_pretrained(str(model_dir))
    DDPMScheduler(**CIFAR10_SCHEDULER).save_pretrained(str(model_dir / "scheduler"))
    return model_dir


def write_plans(out: Path, spec: str) -> list[Path]:
    """The plans the README's performance table and the memory figures use."""
    import autodiffusion_rt as ad
    from autodiffusion_rt.diffusion import uniform_timesteps
    from autodiffusion_rt.plan import Plan

    model = ad.load_model(spec)
    resnets = [layer.id for layer in model.layers if layer.kind == "res"]
    attns = [layer.id for layer in model.layers if layer.kind == "attn"]
    ten = uniform_timesteps(model.num_timesteps, 10)
    three = [[], attns, attns + resnets[-2:]]  # 3 distinct keep sets, each used by several steps
    plans = {
        "plan-nfe4.json": Plan.for_model(model, [999, 749, 499, 249], "dpmpp_2m", spec=spec),
        "plan-nfe10.json": Plan.for_model(model, ten, "dpmpp_2m", spec=spec),
        "plan-nfe1.json": Plan.for_model(model, [999], "ddim", spec=spec),
        "plan-3skips.json": Plan.for_model(model, ten, "dpmpp_2m", skip=[three[i % 3] for i in range(10)], spec=spec),
    }
    return [plan.save(out / name) for name, plan in plans.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write the model and plans into")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_model(out, args.seed)
    for path in write_plans(out, f"diffusers:{model_dir}"):
        print(path)


if __name__ == "__main__":
    main()
