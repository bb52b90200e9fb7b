"""``autodiffusion-rt train``: resumable bit for bit, its loss weighting, its argument checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quick_first

from autodiffusion_rt.models.train import TrainingError, TrainSettings, train_embedded

# A tiny ADM UNet on the real 28x28 digits: fast enough to train a few steps in a test.
TINY = dict(
    image_size=28, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1, attention_resolutions=(),
    dropout=0.0, channel_mult=(1,), conv_resample=False, num_classes=10, num_heads=1, use_scale_shift_norm=True,
    resblock_updown=False,
)
SETTINGS = TrainSettings(steps=6, batch_size=4, lr=1e-3, ema_decay=0.9, seed=3, config=TINY)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit needs the same reduction order in both runs
    yield
    torch.set_num_threads(before)


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_an_interrupted_run_resumed_equals_an_uninterrupted_one(tmp_path, one_thread):
    """Model, EMA, optimizer, LR schedule and RNG states all travel in the state file.

    What would catch this: forgetting any one of them (e.g. the data generator's
    state) makes the resumed weights differ from the straight run's.
    """
    straight = tmp_path / "straight.pt"
    record = train_embedded(straight, SETTINGS, quiet=True)
    assert record["finished"] and straight.is_file()

    pieces = tmp_path / "pieces.pt"
    first = train_embedded(pieces, SETTINGS, stop_at_step=2, quiet=True)
    assert not first["finished"] and first["step"] == 2
    partial = _state(pieces)["training"]
    assert partial["step"] == 2 and partial["finished"] is False  # a stopped run leaves usable weights, marked
    second = train_embedded(pieces, SETTINGS, resume=True, stop_at_step=4, quiet=True)
    assert not second["finished"] and second["step"] == 4
    third = train_embedded(pieces, SETTINGS, resume=True, quiet=True)
    assert third["finished"]

    a, b = _state(Path(str(straight) + ".state")), _state(Path(str(pieces) + ".state"))
    for key in ("model", "ema", "optimizer", "lr_schedule", "generator", "torch_rng", "step", "losses"):
        _assert_same_tensors(a[key], b[key], key)
    _assert_same_tensors(_state(straight)["state_dict"], _state(pieces)["state_dict"], "checkpoint")
    # and training did move the weights (the comparison is not between two untouched inits)
    torch.manual_seed(SETTINGS.seed)
    from autodiffusion_rt.models.unet import ADMUNet

    init = ADMUNet(**TINY).state_dict()
    assert any(not torch.equal(init[k], a["model"][k]) for k in init)


def test_the_saved_checkpoint_loads_as_a_model_and_samples(tmp_path, one_thread):
    import autodiffusion_rt as ad

    out = tmp_path / "m.pt"
    train_embedded(out, SETTINGS, quiet=True, command="autodiffusion-rt train (test)")
    model = ad.load_model(f"ckpt:{out}")
    assert model.schedule.name == "linear" and model.metadata["command"] == "autodiffusion-rt train (test)"
    # The loaded model computes what the trained EMA network does (kept in the training state, written separately).
    from autodiffusion_rt.models.unet import ADMUNet

    trained = ADMUNet(**TINY).eval()
    trained.load_state_dict(_state(Path(f"{out}.state"))["ema"])
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([999, 500]), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(model.eps(x, t, y), trained(x, t, y))
    images = ad.sample(model, [999, 500], n=2, seed=0)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


def test_resume_with_other_settings_is_refused_by_name(tmp_path, one_thread):
    out = tmp_path / "m.pt"
    train_embedded(out, SETTINGS, stop_at_step=1, quiet=True)
    other = TrainSettings(**{**SETTINGS.__dict__, "lr": 5e-4})
    with pytest.raises(TrainingError, match=r"lr=0\.001"):
        train_embedded(out, other, resume=True, quiet=True)
    with pytest.raises(TrainingError, match="no training state"):
        train_embedded(tmp_path / "other.pt", SETTINGS, resume=True, quiet=True)


def test_min_snr_weights_follow_the_paper():
    """min(SNR, gamma) / SNR for epsilon prediction, against a float64 computation from the betas."""
    from autodiffusion_rt.diffusion import NoiseSchedule
    from autodiffusion_rt.models.train import min_snr_weights

    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    acp = np.cumprod(1 - betas)
    snr = acp / (1 - acp)
    want = np.minimum(snr, 5.0) / snr
    got = min_snr_weights(NoiseSchedule.named("linear").alphas_cumprod, 5.0)
    assert got.dtype == torch.float32 and got.shape == (1000,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # low noise (t small) is down-weighted, high noise keeps weight 1
    assert got[0] < 0.01 and got[-1] == 1.0
    assert torch.equal(min_snr_weights(acp, None), torch.ones(1000))  # None: plain MSE


@pytest.mark.parametrize(
    "args, match",
    quick_first([
        (["--steps", "0"], "steps=0"),
        (["--batch-size", "0"], "batch_size=0"),
        (["--lr", "-1"], "lr=-1"),
        (["--seed", "-1"], "seed=-1"),
        (["--init", "/nonexistent/x.pt"], "/nonexistent/x.pt"),
        (["--out", "/proc/version/x.pt"], "/proc/version/x.pt"),
    ]),
)
def test_bad_training_arguments_fail_at_once_with_one_line(args, match, tmp_path):
    cmd = [sys.executable, "-m", "autodiffusion_rt.cli", "train", "--quiet", "--out", str(tmp_path / "m.pt"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert match in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()
