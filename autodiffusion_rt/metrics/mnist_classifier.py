"""The small MNIST classifier whose penultimate layer is the ``mnist`` FID feature.

Inception at 299x299 is far too slow to judge thousands of search candidates
on a CPU; this network reads 28x28 digits directly. It is trained by the
project on ``load_mnist("train")`` (4,000 digits) and judged on
``load_mnist("heldout")`` (1,000 digits, 100 per class, never seen in training).

Architecture: two conv stages (16 channels 5x5, then 32 channels 3x3; ReLU and
2x2 max-pool each; about 1.3 M multiply-adds per digit, so 2,000 digits take a
fraction of a second),
a linear layer to ``FEATURE_DIM`` = 64 units with SiLU, dropout, and a linear
head to 10 classes. The features are the 64 SiLU activations, i.e. exactly the
input of the final linear layer. SiLU rather than ReLU: a ReLU unit that is
dead on all digits would be a constant feature and make the covariance
singular; SiLU has no such flat region.

Train (seeded; about a minute on one core)::

    autodiffusion-rt train-classifier --out autodiffusion_rt/metrics/assets/mnist_classifier.pt

The file holds the state dict (fp32, ~0.4 MB), the architecture config, the
training settings and the held-out accuracy measured at the end of training.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from ..utils import atomic_write

FORMAT = "autodiffusion-rt/mnist-classifier/1"
FEATURE_DIM = 64
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "mnist_classifier.pt"
TRAIN_COMMAND = "autodiffusion-rt train-classifier --out autodiffusion_rt/metrics/assets/mnist_classifier.pt"


class MnistClassifier(nn.Module):
    """Small CNN for 1x28x28 digits in [-1, 1]; ``features`` gives the penultimate layer."""

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM, dropout: float = 0.3):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "dropout": dropout}
        self.body = nn.Sequential(
            # max-pool before ReLU: the same function (both are monotone), 4x less memory traffic
            nn.Conv2d(1, width, 5, padding=2),
            nn.MaxPool2d(2),  # 14x14
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.MaxPool2d(2),  # 7x7
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, feature_dim),
            nn.SiLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))


def load_classifier(path: str | os.PathLike | None = None) -> tuple[MnistClassifier, dict]:
    """The trained classifier (eval mode) and its metadata; a clear error if the file is missing or foreign."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(
            f"the mnist feature classifier's weights {path} are missing: "
            f"train them with `{TRAIN_COMMAND}` (or reinstall autodiffusion-rt, which ships them)"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise CheckpointError(
            f"cannot read the mnist classifier weights {path}: {e}; retrain with `{TRAIN_COMMAND}`"
        ) from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an mnist classifier file of format {FORMAT!r}; retrain with `{TRAIN_COMMAND}`"
        )
    model = MnistClassifier(**blob["config"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(
            f"the weights in {path} do not fit the classifier architecture {blob['config']}: {e}; "
            f"retrain with `{TRAIN_COMMAND}`"
        ) from e
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.eval(), meta


@torch.inference_mode()
def accuracy(model: MnistClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy on (images, labels)."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def gray_border_fraction(images: torch.Tensor, border: int = 3, threshold: float = 0.15) -> float:
    """Share of images whose ``border``-pixel frame is not black: mean above ``threshold`` on a [0, 1] scale.

    MNIST digits sit on a black background (none of the 5,000 real digits is
    above 0.15); a diffusion model's failed samples are gray blobs.
    """
    x = (images.detach().float().clamp(-1, 1) + 1) / 2
    frame = torch.ones(x.shape[-2:], dtype=torch.bool)
    frame[border:-border, border:-border] = False
    return float((x[..., frame].mean(dim=(1, 2)) > threshold).float().mean())


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine jitter (rotate +-12 deg, scale 0.9-1.1, shift +-2 px), background stays -1."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / 14)  # 2 px in normalized coords
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train(
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    threads: int = 1,
    quiet: bool = False,
) -> tuple[MnistClassifier, dict]:
    """Train on ``load_mnist("train")``; returns the model (eval mode) and its metadata, incl. held-out accuracy."""
    from tqdm.auto import tqdm

    from ..data import load_mnist

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_mnist("train")
    x_held, y_held = load_mnist("heldout")

    model = MnistClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    start = time.time()
    bar = tqdm(range(epochs), desc="train mnist classifier", disable=quiet, unit="epoch")
    for _ in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(_augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(x_train):.3f}")
    model.eval()
    meta = {
        "format": FORMAT,
        "config": dict(model.config),
        "heldout_accuracy": accuracy(model, x_held, y_held),
        "train_accuracy": accuracy(model, x_train, y_train),
        "train": {
            "seed": seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "data": "load_mnist('train') (4000 digits); held-out: load_mnist('heldout') (1000 digits)",
            "command": TRAIN_COMMAND,
            "torch": str(torch.__version__),
            "seconds": round(time.time() - start, 1),
        },
    }
    return model, meta


def save_classifier(model: MnistClassifier, meta: dict, path: str | os.PathLike) -> Path:
    """Write weights + metadata atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = dict(meta)
    blob["state_dict"] = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path, "wb") as f:
        torch.save(blob, f)
    return path


def run(args: argparse.Namespace) -> int:
    from ..diffusion import check_seed
    from ..errors import DataError
    from ..utils import check_writable

    # Arguments and the output first: not after the whole training.
    check_seed(args.seed, "--seed")
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    if not args.lr > 0 or args.lr == float("inf"):
        raise DataError(f"--lr {args.lr}: must be a positive number")
    out = Path(args.out) if args.out is not None else DEFAULT_WEIGHTS
    check_writable(out, "the classifier weights", "pass --out with a path in a writable folder", DataError)
    model, meta = train(
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        quiet=args.quiet,
    )
    path = save_classifier(model, meta, out)
    print(
        f"mnist classifier: held-out accuracy {meta['heldout_accuracy']:.4f} (1000 digits), "
        f"train accuracy {meta['train_accuracy']:.4f}, {meta['train']['seconds']} s -> {path} "
        f"({path.stat().st_size / 1e6:.2f} MB)"
    )
    return 0
