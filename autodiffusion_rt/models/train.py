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
            run = _RunOptions(
                out, state, resume, checkpoint_every, time_limit, stop_at_step, compile, quiet, command, init
            )
            return _train(settings, run)
    except LockBusy:
        raise TrainingError(
            f"another 'autodiffusion-rt train' is writing --out {out} (it holds {lock}): wait for it "
            "to finish, or pass another --out"
        ) from None


@dataclass(frozen=True)
class _RunOptions:
    """How one training session runs (where it writes, when it stops); what it computes is :class:`TrainSettings`."""

    out: Path
    state: Path
    resume: bool
    checkpoint_every: float
    time_limit: Optional[float]
    stop_at_step: Optional[int]
    compile: bool
    quiet: bool
    command: str
    init: Optional[Path]


@dataclass
class _Training:
    """Everything a training state file holds: the model, its EMA, the optimizer, the LR schedule, the generator."""

    model: ADMUNet
    ema: ADMUNet
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator
    start: int = 0
    seconds_before: float = 0.0
    losses: list = field(default_factory=list)
    history: list = field(default_factory=list)

    def save(self, settings: TrainSettings, step: int, elapsed: float, path: Path) -> None:
        """Write the resumable state atomically."""
        payload = {
            "format": STATE_FORMAT,
            "settings": settings.to_json(),
            "step": step,
            "seconds": elapsed,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "lr_schedule": self.sched.state_dict(),
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "losses": self.losses[-200:],
            "history": self.history,
        }
        with atomic_write(path, "wb") as f:
            torch.save(payload, f)


@dataclass(frozen=True)
class _Objective:
    """The training data and the loss: eps prediction on uniformly drawn timesteps, min-SNR-gamma weighted."""

    images: torch.Tensor
    labels: torch.Tensor
    num_timesteps: int
    sqrt_ab: torch.Tensor
    sqrt_1mab: torch.Tensor
    loss_weight: torch.Tensor

    @classmethod
    def for_settings(cls, settings: TrainSettings) -> "_Objective":
        """MNIST and the settings' noise schedule."""
        from ..diffusion import NoiseSchedule

        images, labels = load_mnist("all")
        schedule = NoiseSchedule.named(settings.noise_schedule, EMBEDDED_MNIST_DIFFUSION["diffusion_steps"])
        acp = torch.tensor(schedule.alphas_cumprod, dtype=torch.float64)
        loss_weight = min_snr_weights(schedule.alphas_cumprod, settings.min_snr_gamma)
        return cls(images, labels, schedule.num_timesteps, acp.sqrt().float(), (1 - acp).sqrt().float(), loss_weight)

    def batch_loss(self, forward, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weighted loss to minimize, each sample's plain MSE) of one batch drawn with ``gen``."""
        idx = torch.randint(len(self.images), (batch_size,), generator=gen)
        x0, y = self.images[idx], self.labels[idx]
        t = torch.randint(self.num_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = self.sqrt_ab[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1mab[t].view(-1, 1, 1, 1) * noise
        per_sample = F.mse_loss(forward(xt, t, y), noise, reduction="none").mean(dim=(1, 2, 3))
        return (self.loss_weight[t] * per_sample).mean(), per_sample


def _train(settings: TrainSettings, run: _RunOptions) -> dict:
    """One session under the output's lock: set up (fresh, from --init, or resumed), step until done or stopped,
    then save the state and the EMA checkpoint."""
    objective = _Objective.for_settings(settings)
    training = _new_training(settings, run.init if not run.resume else None)
    if run.resume:
        _restore(training, settings, run.state)
    forward = torch.compile(training.model) if run.compile else training.model
    # SIGINT/SIGTERM end the run between two steps, with the state saved: nothing is lost.
    stop_requested = []
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[sig] = signal.signal(sig, lambda *_: stop_requested.append(True))
    step, finished, elapsed = _run_steps(training, settings, run, objective, forward, stop_requested)
    training.save(settings, step, elapsed, run.state)
    final_loss = sum(training.losses) / max(1, len(training.losses))
    record = {
        "steps": settings.steps,
        "step": step,
        "finished": finished,
        "seconds": round(elapsed, 1),
        "final_loss": round(final_loss, 5),
    }
    try:
        with atomic_write(run.out, "wb") as f:
            torch.save(_checkpoint(training, settings, run.command, record), f)
    finally:  # a signal during the last writes is noted, not obeyed: the run is ending and saving anyway
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return record


def _new_training(settings: TrainSettings, init: Optional[Path]) -> _Training:
    """A fresh model (seeded; from ``init``'s weights if given), its EMA, optimizer, LR schedule and generator."""
    config = dict(settings.config)
    config["attention_resolutions"] = tuple(config["attention_resolutions"])
    config["channel_mult"] = tuple(config["channel_mult"])
    torch.manual_seed(settings.seed)
    model = ADMUNet(**config)
    history: list[dict] = []
    if init is not None:
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
    return _Training(model, ema, opt, sched, gen, history=history)


def _restore(training: _Training, settings: TrainSettings, state: Path) -> None:
    """Continue from the state file exactly where it stopped (it must have been made with the same settings)."""
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
        training.model.load_state_dict(saved["model"])
        training.ema.load_state_dict(saved["ema"])
        training.opt.load_state_dict(saved["optimizer"])
        training.sched.load_state_dict(saved["lr_schedule"])
        training.gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise TrainingError(
            f"{state} does not fit the model it claims ({lines[-1].strip()[:200]}): the state is "
            "damaged; delete it (or pass another --state) to start fresh"
        ) from None
    training.start, training.seconds_before = saved["step"], saved["seconds"]
    training.losses, training.history = list(saved["losses"]), saved["history"]


def _run_steps(
    training: _Training, settings: TrainSettings, run: _RunOptions, objective: _Objective, forward, stop_requested
) -> tuple[int, bool, float]:
    """Optimizer steps until the last one, a signal, ``stop_at_step`` or ``time_limit``, saving the state every
    ``checkpoint_every`` seconds: (the step reached, whether the run finished, seconds over all sessions)."""
    model, ema = training.model, training.ema
    t0 = time.time()
    last_save = t0
    bar = tqdm(
        range(training.start, settings.steps),
        initial=training.start,
        total=settings.steps,
        disable=run.quiet,
        desc="train",
    )
    step = training.start
    finished = True
    for step in bar:
        if (
            stop_requested
            or (run.stop_at_step is not None and step >= run.stop_at_step)
            or (run.time_limit is not None and time.time() - t0 >= run.time_limit)
        ):
            finished = False
            break
        loss, per_sample = objective.batch_loss(forward, settings.batch_size, training.gen)
        training.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        training.opt.step()
        training.sched.step()
        # EMA with a warmup so the average is not dominated by the random init.
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        training.losses.append(per_sample.mean().item())  # the unweighted MSE: comparable across weightings
        training.losses = training.losses[-200:]
        if step % 20 == 0:
            recent = training.losses[-100:]
            bar.set_postfix(mse=f"{sum(recent) / len(recent):.4f}")
        if time.time() - last_save >= run.checkpoint_every:
            training.save(settings, step + 1, training.seconds_before + time.time() - t0, run.state)
            last_save = time.time()
    else:
        step = settings.steps
    return step, finished, training.seconds_before + time.time() - t0


def _checkpoint(training: _Training, settings: TrainSettings, command: str, record: dict) -> dict:
    """What --out holds: the EMA weights, marked with their step (a stopped run also leaves a usable one)."""
    return {
        "format": 1,
        "name": "embedded:mnist",
        "config": dict(settings.config),
        "diffusion": {**EMBEDDED_MNIST_DIFFUSION, "noise_schedule": settings.noise_schedule},
        "state_dict": training.ema.state_dict(),
        "training": {
            "command": command,
            **settings.to_json(),
            "step": record["step"],
            "finished": record["finished"],
            "seconds": record["seconds"],
            "final_loss": record["final_loss"],
            "torch": str(torch.__version__),
            "history": training.history,
        },
    }
