"""Train the embedded default model: a small class-conditional ADM UNet on MNIST.

Run as ``autodiffusion-rt train`` (the README has the exact commands that made the
committed checkpoint). DDPM training: uniform timesteps, epsilon prediction, MSE
loss weighted by min-SNR-gamma (Hang et al., ICCV 2023: down-weights the easy
low-noise steps, which converges several times faster), AdamW, an EMA of the
weights; the EMA weights are what is saved.

Training runs in pieces. Every ``checkpoint_every`` seconds (and when it ends or
hits ``time_limit``) the whole training state (model, EMA, optimizer, LR
schedule, the data generator's and torch's RNG states, the step, recent losses)
is written atomically to ``state``; ``resume=True`` continues from it exactly as
if never stopped (same threads, same machine: bit for bit). Ctrl-C or SIGTERM
stops between two steps and saves the state first.
"""

from __future__ import annotations

import copy
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import load_mnist
from ..errors import Error
from ..utils import atomic_write
from .unet import ADMUNet

# The embedded model's architecture. Sized so that a forward pass at batch 256
# stays under half a second on a 2-core CPU: the 28x28 level dominates the cost,
# so it keeps 32 channels and resamples without convolutions.
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
# Linear (Ho et al.) rather than cosine: at t = 999 the cosine schedule's
# sqrt(alpha_bar) is ~5e-5, so solving for x0 multiplies eps errors by ~2e4 and the
# first steps of a short schedule amplified the model's errors into gray blobs;
# the linear schedule's t = 999 has sqrt(alpha_bar) ~ 6e-3.
EMBEDDED_MNIST_DIFFUSION = dict(noise_schedule="linear", diffusion_steps=1000, learn_sigma=False)

STATE_FORMAT = 1


class TrainingError(Error):
    """Bad training arguments or an unusable training state file."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the result of a training run (a resume must match it)."""

    steps: int = 20000
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.9995
    min_snr_gamma: Optional[float] = 5.0  # None: plain MSE
    seed: int = 0
    noise_schedule: str = EMBEDDED_MNIST_DIFFUSION["noise_schedule"]
    config: dict = field(default_factory=lambda: dict(EMBEDDED_MNIST_CONFIG))

    def check(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise TrainingError(
                f"steps={self.steps!r}: pass a positive integer number of optimizer steps, e.g. --steps 20000"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise TrainingError(f"batch_size={self.batch_size!r}: pass a positive integer, e.g. --batch-size 128")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainingError(f"lr={self.lr!r}: pass a positive learning rate, e.g. --lr 2e-3")
        if not (0 <= self.ema_decay < 1):
            raise TrainingError(f"ema_decay={self.ema_decay!r}: pass a value in [0, 1), e.g. 0.9995")
        if self.min_snr_gamma is not None and not (math.isfinite(self.min_snr_gamma) and self.min_snr_gamma > 0):
            raise TrainingError(
                f"min_snr_gamma={self.min_snr_gamma!r}: pass a positive number (5 is the paper's) or none"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (0 <= self.seed < 2**63):
            raise TrainingError(f"seed={self.seed!r}: pass an integer in [0, 2^63)")

    def to_json(self) -> dict:
        d = asdict(self)
        d["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()}
        return d


def _lr_factor(step: int, steps: int) -> float:
    # Linear warmup over 5% of the run, then cosine decay to 10% of lr.
    warmup = max(1, steps // 20)
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def _probe_writable(path: Path, what: str) -> None:
    """Fail now, not after hours of training, when ``path`` cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path.parent / f".{path.name}.probe", "wb") as f:
            f.write(b"")
        (path.parent / f".{path.name}.probe").unlink()
    except OSError as e:
        raise TrainingError(f"cannot write the {what} {path}: {e.strerror or e}; pass a writable path") from None
    if path.is_dir():
        raise TrainingError(f"the {what} {path} is a directory: pass a file path")


def _read_state(path: Path) -> dict:
    if not path.is_file():
        raise TrainingError(
            f"no training state to resume at {path}: drop --resume to start fresh, or pass --state PATH"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(
            f"cannot read the training state {path} ({type(e).__name__}): delete it to start fresh"
        ) from None
    fresh = "delete it (or pass another --state) to start fresh"
    if isinstance(state, dict) and "state_dict" in state and "model" not in state:
        raise TrainingError(
            f"{path} is a checkpoint (what --out holds), not a training state: pass --state with the "
            f"OUT.state file, or {fresh}"
        )
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path} is not an autodiffusion-rt training state (format {STATE_FORMAT}): {fresh}")
    from ..records import schema, validate

    validate(schema("TrainState"), state, str(path), TrainingError, fresh)
    _check_state_step(state, path, fresh)
    return state


def min_snr_weights(alphas_cumprod, gamma: Optional[float]) -> torch.Tensor:
    """Per-timestep float32 loss weights: min-SNR-gamma for eps prediction, min(SNR, gamma) / SNR (None: all 1)."""
    acp = torch.tensor(alphas_cumprod, dtype=torch.float64)
    snr = acp / (1 - acp)
    return (snr.clamp(max=gamma) / snr).float() if gamma else torch.ones_like(snr).float()


def _check_state_step(state: dict, path: Path, fresh: str) -> None:
    """The state's step against its own history: the LR schedule and the optimizer count every step taken."""
    step = state["step"]
    steps = state["settings"].get("steps")
    if isinstance(steps, int) and step > steps:
        raise TrainingError(f"{path}: step={step} is beyond the run's steps={steps}: the state is damaged; {fresh}")
    counted = {"lr_schedule.last_epoch": state["lr_schedule"].get("last_epoch")}
    for k, v in (state["optimizer"].get("state") or {}).items():
        if isinstance(v, dict) and "step" in v:
            counted[f"optimizer.state[{k}].step"] = int(v["step"])
            break
    for where, n in counted.items():
        if n != step:
            raise TrainingError(
                f"{path}: step={step} disagrees with {where}={n} (the steps the state itself counted): "
                f"the state is damaged or edited; {fresh}"
            )


def _read_init(path: Path) -> dict:
    """An --init checkpoint, read and typed as every ``ckpt:`` record is."""
    from ..records import schema, validate
    from .loading import _read_checkpoint

    record = _read_checkpoint(path)
    fix = "pass a checkpoint written by 'autodiffusion-rt train --out'"
    if not isinstance(record, dict):
        raise TrainingError(f"--init {path} is not an autodiffusion-rt checkpoint: {fix}")
    validate(schema("CheckpointRecord"), record, f"--init {path}", TrainingError, fix)
    return record


def train_embedded(
    out: Path,
    settings: TrainSettings = TrainSettings(),
    *,
    state: Optional[Path] = None,
    resume: bool = False,
    checkpoint_every: float = 300.0,
    time_limit: Optional[float] = None,
    stop_at_step: Optional[int] = None,
    threads: Optional[int] = None,
    compile: bool = False,
    quiet: bool = False,
    command: str = "",
    init: Optional[Path] = None,
) -> dict:
    """Train the embedded MNIST model; save its EMA weights atomically to ``out``.

    ``state`` (default ``OUT.state``) holds the resumable training state.
    ``time_limit`` (seconds) / ``stop_at_step``: save the state and return early
    (``record["finished"]`` is False; ``out`` then holds the EMA weights so far,
    recorded with their step); run again with ``resume=True`` to go on.
    ``compile``: run the training forward through ``torch.compile`` (about 1.3x
    faster on a CPU after a two-minute compile; the same function up to float rounding).
    """

    settings.check()
    from ..limits import check_limit

    check_limit("batch", settings.batch_size, "--batch-size", error=TrainingError)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise TrainingError(f"--threads {threads!r} must be a positive integer (or left out: torch's choice)")
    for option, value in (("--checkpoint-every", checkpoint_every), ("--time-limit", time_limit)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise TrainingError(f"{option} {value!r} must be a finite positive number of seconds")
    if stop_at_step is not None and (
        isinstance(stop_at_step, bool) or not isinstance(stop_at_step, int) or stop_at_step < 0
    ):
        raise TrainingError(f"--stop-at-step {stop_at_step!r} must be an integer >= 0")
    out = Path(out)
    state = Path(state) if state is not None else out.with_name(out.name + ".state")
    _probe_writable(out, "output checkpoint")
    _probe_writable(state, "training state file")
    if init is not None and not Path(init).is_file():
        raise TrainingError(
            f"--init {init}: no such checkpoint file; pass the path of a checkpoint from 'autodiffusion-rt train'"
        )
    if threads:
        torch.set_num_threads(threads)
    from ..utils import LockBusy, file_lock, remove_stale_temps

    lock = out.with_name(f".{out.name}.lock")
    try:
        with file_lock(lock, remove=True):
            remove_stale_temps(out, state)  # under the lock: a temp file here is a killed run's
            return _train(
                out, settings, state, resume, checkpoint_every, time_limit, stop_at_step, compile, quiet, command, init
            )
    except LockBusy:
        raise TrainingError(
            f"another 'autodiffusion-rt train' is writing --out {out} (it holds {lock}): wait for it "
            "to finish, or pass another --out"
        ) from None


def _train(
    out: Path,
    settings: TrainSettings,
    state: Path,
    resume: bool,
    checkpoint_every: float,
    time_limit: Optional[float],
    stop_at_step: Optional[int],
    compile: bool,
    quiet: bool,
    command: str,
    init: Optional[Path],
) -> dict:
    from ..diffusion import NoiseSchedule

    images, labels = load_mnist("all")
    schedule = NoiseSchedule.named(settings.noise_schedule, EMBEDDED_MNIST_DIFFUSION["diffusion_steps"])
    acp = torch.tensor(schedule.alphas_cumprod, dtype=torch.float64)
    sqrt_ab, sqrt_1mab = acp.sqrt().float(), (1 - acp).sqrt().float()
    loss_weight = min_snr_weights(schedule.alphas_cumprod, settings.min_snr_gamma)

    config = dict(settings.config)
    config["attention_resolutions"] = tuple(config["attention_resolutions"])
    config["channel_mult"] = tuple(config["channel_mult"])
    torch.manual_seed(settings.seed)
    model = ADMUNet(**config)
    history: list[dict] = []
    if init is not None and not resume:
        previous = _read_init(Path(init))
        try:
            model.load_state_dict(previous["state_dict"], strict=True)
        except RuntimeError as e:
            why = str(e).strip().splitlines()[-1].strip()
            raise TrainingError(
                f"--init {init} does not fit the embedded model ({why}): "
                "pass a checkpoint written by 'autodiffusion-rt train'"
            ) from None
        history = [
            *previous.get("training", {}).get("history", []),
            {k: v for k, v in previous["training"].items() if k != "history"},
        ]
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, settings.steps))
    gen = torch.Generator().manual_seed(settings.seed)
    start, seconds_before, losses = 0, 0.0, []

    if resume:
        saved = _read_state(state)
        if saved["settings"] != settings.to_json():
            was = saved["settings"]
            diff = ", ".join(
                f"{k}={was.get(k)!r}" for k in sorted(settings.to_json()) if was.get(k) != settings.to_json()[k]
            )
            raise TrainingError(
                f"{state} was made with other settings ({diff}): "
                "resume with the same settings, or delete the state file to start fresh"
            )
        try:
            model.load_state_dict(saved["model"])
            ema.load_state_dict(saved["ema"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["lr_schedule"])
            gen.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            raise TrainingError(
                f"{state} does not fit the model it claims ({lines[-1].strip()[:200]}): the state is "
                "damaged; delete it (or pass another --state) to start fresh"
            ) from None
        start, seconds_before, losses, history = (
            saved["step"],
            saved["seconds"],
            list(saved["losses"]),
            saved["history"],
        )

    def save_state(step: int, elapsed: float) -> None:
        payload = {
            "format": STATE_FORMAT,
            "settings": settings.to_json(),
            "step": step,
            "seconds": elapsed,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_schedule": sched.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "losses": losses[-200:],
            "history": history,
        }
        with atomic_write(state, "wb") as f:
            torch.save(payload, f)

    forward = torch.compile(model) if compile else model
    # SIGINT/SIGTERM end the run between two steps, with the state saved: nothing is lost.
    stop_requested = []
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[sig] = signal.signal(sig, lambda *_: stop_requested.append(True))
    t0 = time.time()
    last_save = t0
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, disable=quiet, desc="train")
    step = start
    finished = True
    for step in bar:
        if (
            stop_requested
            or (stop_at_step is not None and step >= stop_at_step)
            or (time_limit is not None and time.time() - t0 >= time_limit)
        ):
            finished = False
            break
        idx = torch.randint(len(images), (settings.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        t = torch.randint(schedule.num_timesteps, (settings.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * noise
        per_sample = F.mse_loss(forward(xt, t, y), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (loss_weight[t] * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA with a warmup so the average is not dominated by the random init.
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(per_sample.mean().item())  # the unweighted MSE: comparable across weightings
        losses = losses[-200:]
        if step % 20 == 0:
            bar.set_postfix(mse=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
        if time.time() - last_save >= checkpoint_every:
            save_state(step + 1, seconds_before + time.time() - t0)
            last_save = time.time()
    else:
        step = settings.steps
    elapsed = seconds_before + time.time() - t0
    save_state(step, elapsed)
    final_loss = sum(losses) / max(1, len(losses))
    record = {
        "steps": settings.steps,
        "step": step,
        "finished": finished,
        "seconds": round(elapsed, 1),
        "final_loss": round(final_loss, 5),
    }
    # A stopped run also leaves a usable checkpoint: the EMA weights so far, marked with their step.
    checkpoint = {
        "format": 1,
        "name": "embedded:mnist",
        "config": dict(settings.config),
        "diffusion": {**EMBEDDED_MNIST_DIFFUSION, "noise_schedule": settings.noise_schedule},
        "state_dict": ema.state_dict(),
        "training": {
            "command": command,
            **settings.to_json(),
            "step": step,
            "finished": finished,
            "seconds": round(elapsed, 1),
            "final_loss": round(final_loss, 5),
            "torch": str(torch.__version__),
            "history": history,
        },
    }
    try:
        with atomic_write(out, "wb") as f:
            torch.save(checkpoint, f)
    finally:  # a signal during the last writes is noted, not obeyed: the run is ending and saving anyway
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return record
