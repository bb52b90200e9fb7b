"""Train the embedded default model: a small class-conditional ADM UNet on MNIST.

Run as ``autodiffusion-rt train`` (see the README for the exact command that made
the committed checkpoint). Standard DDPM training: uniform timesteps, epsilon
prediction, MSE loss, AdamW, an EMA of the weights; the EMA weights are saved.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import load_mnist
from ..utils import atomic_write
from .unet import ADMUNet

# The embedded model's architecture. Sized so that a forward pass at batch 256
# stays under half a second on a 2-core CPU and training fits in under an hour:
# the 28x28 level dominates the cost, so it keeps 32 channels and resamples
# without convolutions.
EMBEDDED_MNIST_CONFIG = dict(
    image_size=28,
    in_channels=1,
    model_channels=32,
    out_channels=1,
    num_res_blocks=1,
    attention_resolutions=(2, 4),
    dropout=0.0,
    channel_mult=(1, 1, 2),
    conv_resample=False,
    num_classes=10,
    num_heads=4,
    use_scale_shift_norm=True,
    resblock_updown=False,
)
EMBEDDED_MNIST_DIFFUSION = dict(noise_schedule="cosine", diffusion_steps=1000, learn_sigma=False)


def train_embedded(
    out: Path,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    threads: int | None = None,
    quiet: bool = False,
    command: str = "",
    init: Path | None = None,
) -> dict:
    """Train the embedded MNIST model and save its EMA weights atomically to ``out``."""
    from ..diffusion import NoiseSchedule

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_mnist("all")
    schedule = NoiseSchedule.named(EMBEDDED_MNIST_DIFFUSION["noise_schedule"], EMBEDDED_MNIST_DIFFUSION["diffusion_steps"])
    sqrt_ab = torch.tensor(schedule.alphas_cumprod, dtype=torch.float64).sqrt().float()
    sqrt_1mab = torch.tensor(1 - schedule.alphas_cumprod, dtype=torch.float64).sqrt().float()

    model = ADMUNet(**EMBEDDED_MNIST_CONFIG)
    history: list[dict] = []
    if init is not None:
        # Continue from an earlier run's (EMA) weights; its record is kept in the history.
        previous = torch.load(init, map_location="cpu", weights_only=True)
        model.load_state_dict(previous["state_dict"], strict=True)
        history = [*previous.get("training", {}).get("history", []), {k: v for k, v in previous["training"].items() if k != "history"}]
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    # Linear warmup, then cosine decay to 10% of lr: fast early progress, a calm finish.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    t0 = time.time()
    losses: list[float] = []
    bar = tqdm(range(steps), disable=quiet, desc="train")
    for step in bar:
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        t = torch.randint(schedule.num_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * noise
        loss = F.mse_loss(model(xt, t, y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA with a warmup so the average is not dominated by the random init.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    seconds = time.time() - t0
    final_loss = sum(losses[-200:]) / len(losses[-200:])
    record = {
        "format": 1,
        "name": "embedded:mnist",
        "config": dict(EMBEDDED_MNIST_CONFIG),
        "diffusion": dict(EMBEDDED_MNIST_DIFFUSION),
        "state_dict": ema.state_dict(),
        "training": {
            "command": command,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "ema_decay": ema_decay,
            "seed": seed,
            "seconds": round(seconds, 1),
            "final_loss": round(final_loss, 5),
            "torch": str(torch.__version__),
            "history": history,
        },
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        torch.save(record, f)
    return record["training"]
