"""Model loading: the embedded default, guided-diffusion checkpoints, and the errors users hit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autodiffusion_rt as ad
from autodiffusion_rt.errors import CheckpointError, ModelSpecError
from autodiffusion_rt.models.loading import EMBEDDED_MODELS, weights_fingerprint

REFERENCE = Path(__file__).parent / "data" / "guided_diffusion_reference.pt"


@pytest.mark.slow  # a fresh process
def test_embedded_model_loads_offline_and_is_small():
    path = EMBEDDED_MODELS["mnist"]
    assert path.stat().st_size < 5 * 1024 * 1024
    # A fresh interpreter with every network socket refused: loading must not touch the network.
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network disabled in this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "import autodiffusion_rt as ad\n"
        "m = ad.load_model('embedded:mnist')\n"
        "print(m.image_shape, m.num_classes, m.fingerprint)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(1, 28, 28) 10" in out.stdout


def test_embedded_model_identity(embedded_model):
    m = embedded_model
    assert m.schedule.num_timesteps == 1000 and m.schedule.name == "linear"
    assert len(m.layers) > 10
    assert m.unet.macs() <= 150e6  # the cost budget every search and benchmark pays
    assert m.metadata["command"].startswith("autodiffusion-rt train")


def test_the_fingerprint_is_of_the_weights_and_only_the_weights(embedded_model):
    """One changed weight, dtype or name changes it; the dict's order and the file format do not."""
    sd = {k: v.clone() for k, v in embedded_model.unet.state_dict().items()}
    base = weights_fingerprint(sd)
    assert weights_fingerprint(dict(reversed(list(sd.items())))) == base
    first = next(iter(sd))
    changed = dict(sd)
    changed[first] = sd[first].clone()
    changed[first].view(-1)[0] += 1e-6
    assert weights_fingerprint(changed) != base
    assert weights_fingerprint({**sd, first: sd[first].double()}) != base
    renamed = dict(sd)
    renamed["x." + first] = renamed.pop(first)
    assert weights_fingerprint(renamed) != base


@pytest.mark.slow
def test_embedded_model_draws_the_requested_digits_on_clean_backgrounds(embedded_model):
    """DDIM-20, 200 samples, labels cycling 0-9, judged by the project's MNIST classifier.

    What would catch this: the previous checkpoint (cosine schedule, 5,000 steps at batch 64)
    drew the requested digit 73-75% of the time and a gray blob on ~24% of samples.
    """
    from autodiffusion_rt.diffusion import uniform_timesteps
    from autodiffusion_rt.metrics.mnist_classifier import accuracy, gray_border_fraction, load_classifier

    labels = torch.arange(200) % 10
    images = ad.sample(embedded_model, uniform_timesteps(1000, 20), "ddim", n=200, seed=123, labels=labels)
    classifier, _ = load_classifier()
    assert accuracy(classifier, images, labels) >= 0.93
    assert gray_border_fraction(images) <= 0.03


def test_gray_border_fraction_tells_blobs_from_digits():
    from autodiffusion_rt.data import load_mnist
    from autodiffusion_rt.metrics.mnist_classifier import gray_border_fraction

    digits, _ = load_mnist("all")
    assert gray_border_fraction(digits) == 0.0
    blobs = digits[:10].clone()
    blobs[:4] = blobs[:4] * 0.3 + 0.2  # the background lifted to gray on 4 of 10
    assert gray_border_fraction(blobs) == pytest.approx(0.4)


def _reference_checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    ref = torch.load(REFERENCE, weights_only=True)["models"]["legacy"]
    path = tmp_path / "legacy.pt"
    torch.save({k: v.float() for k, v in ref["state_dict"].items()}, path)
    return path, ref


# guided-diffusion flags that describe the "legacy" reference model
LEGACY_FLAGS = dict(
    image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="4", channel_mult="1,1",
    num_heads=2, use_scale_shift_norm=False, class_cond=False, learn_sigma=False,
)


def test_adm_checkpoint_loads_from_guided_diffusion_flags_and_matches_its_output(tmp_path):
    path, ref = _reference_checkpoint(tmp_path)
    model = ad.load_model(f"adm:{path}", **LEGACY_FLAGS)
    with torch.no_grad():
        out = model.unet(ref["x"], ref["t"])
    torch.testing.assert_close(out, ref["out"], rtol=1e-4, atol=1e-4)
    assert model.num_classes is None and model.image_shape == (3, 8, 8)


def test_learn_sigma_models_give_the_sampler_the_first_c_channels():
    ref = torch.load(REFERENCE, weights_only=True)["models"]["updown_cond"]
    from autodiffusion_rt.models import model_from_weights

    model = model_from_weights("t", ref["kwargs"], {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True},
                               {k: v.float() for k, v in ref["state_dict"].items()}, source="test")
    eps = model.eps(ref["x"], ref["t"], ref["y"])
    torch.testing.assert_close(eps, ref["out"][:, :3], rtol=1e-4, atol=1e-4)


def test_unknown_specs_are_refused():
    for spec, pattern in [
        ("mnist", "unknown model spec"),
        ("embedded:cifar", "unknown embedded model"),
        ("hub:foo", "'embedded', 'adm'"),
        ("adm:", "no path"),
    ]:
        with pytest.raises(ModelSpecError, match=pattern):
            ad.load_model(spec)
    with pytest.raises(ModelSpecError, match="unknown ADM preset"):
        ad.load_model("adm:/nonexistent.pt", preset="imagenet1024")
    with pytest.raises(ModelSpecError, match="unknown ADM option"):
        ad.load_model("adm:/nonexistent.pt", num_chanels=3)


def test_missing_checkpoint_says_where_it_looked(tmp_path):
    missing = tmp_path / "nowhere" / "64x64_diffusion.pt"
    with pytest.raises(CheckpointError, match=str(missing)):
        ad.load_model(f"adm:{missing}", preset="imagenet64-cond")


def test_state_dict_that_does_not_fit_names_the_key_and_both_shapes(tmp_path):
    path, _ = _reference_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"'time_embed\.0\.weight' has shape \(128, 32\) but the config expects \(256, 64\)"):
        ad.load_model(f"adm:{path}", **{**LEGACY_FLAGS, "num_channels": 64})
    sd = torch.load(path, weights_only=True)
    del sd["out.2.bias"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="missing key 'out.2.bias'"):
        ad.load_model(f"adm:{path}", **LEGACY_FLAGS)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        ad.load_model(f"adm:{path}", **LEGACY_FLAGS)
