"""FID with the `mnist` extractor: properties of the distance, the classifier, statistics, the cache, bad input, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from autodiffusion_rt.data import from_uint8, load_mnist, to_uint8
from autodiffusion_rt.errors import DataError
from autodiffusion_rt.metrics import (
    FeatureStats,
    FIDWarning,
    MnistExtractor,
    StatsKey,
    compute_stats,
    fid,
    frechet_distance,
    get_extractor,
    load_image_source,
    reference_stats,
    stats_from_features,
)
from autodiffusion_rt.metrics.mnist_classifier import DEFAULT_WEIGHTS, accuracy, load_classifier


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTODIFFUSION_RT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_mnist("all")[0]


@pytest.fixture(scope="module")
def ext():
    return get_extractor("mnist")


@pytest.fixture(scope="module")
def digit_features(digits, ext) -> np.ndarray:
    return ext.features(digits)


@pytest.fixture(scope="module")
def ref(digit_features, ext) -> FeatureStats:
    return stats_from_features(digit_features, StatsKey.for_extractor("mnist-all", ext))


def noise_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g).clamp(-1, 1)


def shuffled(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]


# --- the distance ---------------------------------------------------------------------------------
def test_fid_of_a_set_with_itself_is_zero(digits, ext):
    x = shuffled(digits)[:1500]
    stats = compute_stats(x, ext)
    assert abs(frechet_distance(stats, stats)) < 1e-6
    assert abs(fid(x, stats, ext)) < 1e-6  # the full path: features again, same stats


def test_fid_is_symmetric(digits, ext, ref):
    mixed = torch.cat([shuffled(digits)[:800], noise_images(700)])
    gen = compute_stats(mixed, ext)
    ab, ba = frechet_distance(gen, ref), frechet_distance(ref, gen)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-6)


def test_disjoint_halves_of_real_digits_are_far_closer_than_noise(digit_features, ext, ref):
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(1)).numpy()
    half_a = stats_from_features(digit_features[order[:2500]], StatsKey.for_extractor("half-a", ext))
    half_b = stats_from_features(digit_features[order[2500:]], StatsKey.for_extractor("half-b", ext))
    halves = frechet_distance(half_a, half_b)
    noise = frechet_distance(compute_stats(noise_images(2500), ext), ref)
    assert 0 < halves < 0.01 * noise, (halves, noise)


def test_fid_falls_monotonically_as_real_digits_replace_noise(digits, ext, ref):
    n = 1000
    real, noise = shuffled(digits, seed=2)[:n], noise_images(n, seed=3)
    scores = []
    for frac in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        k = round(frac * n)
        scores.append(fid(torch.cat([real[:k], noise[k:]]), ref, ext))
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] < 0.02 * scores[0], scores


# --- the extractor --------------------------------------------------------------------------------
def test_mnist_extractor_interface(digits, ext, tmp_path):
    assert get_extractor("mnist") is ext  # loaded once, shared
    assert (ext.name, ext.feature_dim) == ("mnist", 64)
    assert isinstance(ext.preprocessing, str) and ext.preprocessing
    # the fingerprint names the weights: the same file gives it again, one changed weight changes it
    assert len(ext.fingerprint) == 64 and MnistExtractor(DEFAULT_WEIGHTS).fingerprint == ext.fingerprint
    blob = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    first = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][first].view(-1)[0] += 1
    torch.save(blob, tmp_path / "changed.pt")
    assert MnistExtractor(tmp_path / "changed.pt").fingerprint != ext.fingerprint
    x = digits[:300]
    f = ext.features(x, batch_size=128)
    assert f.shape == (300, 64) and f.dtype == np.float64 and np.isfinite(f).all()
    # batch size does not change the result; uint8 NHWC arrays (files) give the same features as tensors
    np.testing.assert_allclose(ext.features(x, batch_size=300), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ext.features(to_uint8(x)), f, rtol=1e-5, atol=1e-5)
    # preprocessing quantizes to 8 bits like a saved PNG: sub-level jitter does not change the features
    jitter = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * (0.9 / 127.5)
    np.testing.assert_allclose(ext.features(x + jitter), f, rtol=1e-5, atol=1e-5)
    # the features are informative: every dimension varies over real digits (full-rank covariance)
    assert np.linalg.matrix_rank(np.cov(ext.features(digits[:2000]), rowvar=False)) == 64


def test_extractor_and_stats_pickle_for_worker_processes(ext, ref, digits):
    import pickle

    clone = pickle.loads(pickle.dumps(ext))
    assert clone is not ext and clone.fingerprint == ext.fingerprint
    np.testing.assert_allclose(clone.features(digits[:50]), ext.features(digits[:50]), rtol=1e-6, atol=1e-6)
    back = pickle.loads(pickle.dumps(ref))
    assert back.key == ref.key and np.array_equal(back.sigma, ref.sigma)


def test_classifier_reaches_its_accuracy_on_the_heldout_split():
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    model, meta = load_classifier()
    x, y = load_mnist("heldout")
    assert x.shape == (1000, 1, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10
    measured = accuracy(model, x, y)
    assert measured >= 0.97, measured
    assert measured == pytest.approx(meta["heldout_accuracy"], abs=1e-9)  # the recorded figure is the real one
    # and it is not trivially everything: the network distinguishes all ten classes
    with torch.inference_mode():
        assert torch.unique(model(x).argmax(1)).numel() == 10


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "images, words",
    [
        (torch.zeros(0, 1, 28, 28), "empty"),
        (torch.zeros(5, 28, 28), "4-D"),
        (torch.zeros(5, 28, 28, 1), "permute"),
        (torch.zeros(5, 1, 28, 28, dtype=torch.uint8), "from_uint8"),
        (np.zeros((5, 1, 28, 28), dtype=np.float32), "uint8"),
        (np.zeros((0, 28, 28, 1), dtype=np.uint8), "empty"),
        (torch.full((5, 1, 28, 28), 200.0), "[0, 255]"),
        (torch.zeros(5, 3, 32, 32), "inception"),
        ([[0.0]], "torch tensor"),
    ],
)
def test_bad_images_are_refused_with_a_hint(ext, images, words):
    with pytest.raises(DataError, match=None) as info:
        ext.features(images)
    assert words in str(info.value)


def test_nan_images_are_refused(ext, digits):
    x = digits[:10].clone()
    x[3, 0, 5, 5] = float("nan")
    with pytest.raises(DataError, match="1 of 10 images contain NaN"):
        ext.features(x)


def test_too_few_samples_warn_with_the_count_needed(ext, digits, ref):
    with pytest.warns(FIDWarning, match="at least 65 samples"):
        value = fid(digits[:40], ref, ext)
    assert np.isfinite(value)
    with pytest.raises(DataError, match="at least 2 samples"):
        compute_stats(digits[:1], ext)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FIDWarning)
        compute_stats(digits[:65], ext)  # D + 1 samples: no warning


def test_unknown_extractor_is_refused():
    with pytest.raises(DataError, match="unknown feature extractor 'vgg'.*mnist, inception"):
        get_extractor("vgg")


def test_stats_from_another_extractor_setting_are_refused(digits, ext, ref):
    other_pre = dataclasses.replace(ref, preprocessing="something-else")
    other_fp = dataclasses.replace(ref, fingerprint="0" * 16)
    other_ext = dataclasses.replace(ref, extractor="inception")
    for bad, word in ((other_pre, "preprocessing"), (other_fp, "fingerprint"), (other_ext, "extractor")):
        with pytest.raises(DataError, match=word):
            fid(digits[:100], bad, ext)
        with pytest.raises(DataError, match=word):
            frechet_distance(ref, bad)


# --- statistics files and the cache ---------------------------------------------------------------
def test_stats_save_load_roundtrip_is_atomic_and_checks_the_key(tmp_path, ref):
    path = ref.save(tmp_path / "s" / "ref.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temporary file left behind
    back = FeatureStats.load(path, expect=ref.key)
    assert back.key == ref.key and back.num_samples == 5000
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    with pytest.raises(DataError, match="another key: dataset"):
        FeatureStats.load(path, expect=dataclasses.replace(ref.key, dataset="other"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="unreadable"):
        FeatureStats.load(path)


class _Counting:
    """Wraps an extractor's ``features`` to count calls."""

    def __init__(self, monkeypatch, ext):
        self.calls = 0
        original = ext.features

        def features(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(ext, "features", features)


def test_reference_stats_are_cached_and_a_changed_key_recomputes(tmp_path, monkeypatch, ext):
    counter = _Counting(monkeypatch, ext)
    first = reference_stats("mnist:heldout", ext)
    assert counter.calls == 1
    files = list((tmp_path / "cache" / "fid-stats").glob("*.npz"))  # $AUTODIFFUSION_RT_CACHE is honoured
    assert len(files) == 1 and "mnist" in files[0].name
    second = reference_stats("mnist:heldout", ext)
    assert counter.calls == 1  # read from the cache
    np.testing.assert_array_equal(first.sigma, second.sigma)
    assert second.key == first.key and first.dataset.startswith("mnist:heldout:")

    reference_stats("mnist:train", ext)  # another data set
    assert counter.calls == 2
    monkeypatch.setattr(ext, "preprocessing", ext.preprocessing + "-changed")  # another preprocessing
    third = reference_stats("mnist:heldout", ext)
    assert counter.calls == 3 and third.preprocessing.endswith("-changed")
    assert len(list((tmp_path / "cache" / "fid-stats").glob("*.npz"))) == 3


def test_other_classifier_weights_change_the_key(tmp_path, ext):
    blob = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    blob["state_dict"]["head.bias"] = blob["state_dict"]["head.bias"] + 1.0  # the head is not part of the features...
    path = tmp_path / "other.pt"
    torch.save(blob, path)
    other = get_extractor("mnist", weights=path)
    assert other is not ext and other.fingerprint != ext.fingerprint  # ...but the fingerprint covers all weights
    a = reference_stats("mnist:heldout", ext)
    b = reference_stats("mnist:heldout", other)
    assert a.fingerprint != b.fingerprint
    with pytest.raises(DataError, match="fingerprint"):
        frechet_distance(a, b)


def test_a_corrupted_cache_file_is_recomputed_with_a_warning(tmp_path, monkeypatch, ext):
    good = reference_stats("mnist:heldout", ext)
    (path,) = (tmp_path / "cache" / "fid-stats").glob("*.npz")
    path.write_bytes(b"not an npz at all")
    counter = _Counting(monkeypatch, ext)
    with pytest.warns(FIDWarning, match="recomputing"):
        again = reference_stats("mnist:heldout", ext)
    assert counter.calls == 1
    np.testing.assert_allclose(again.sigma, good.sigma)
    assert FeatureStats.load(path, expect=good.key).num_samples == 1000  # rewritten, valid again
    # a cache file holding another key's statistics is not trusted either
    dataclasses.replace(good, dataset="someone-else").save(path)
    with pytest.warns(FIDWarning, match="another key"):
        reference_stats("mnist:heldout", ext)
    assert counter.calls == 2


# --- image files ------------------------------------------------------------------------------------
def test_image_folders_and_npz_files(tmp_path, digits, ext):
    from PIL import Image

    x = digits[:12]
    u8 = to_uint8(x)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, a in enumerate(u8):
        Image.fromarray(a[..., 0]).save(folder / f"{i:03d}.png")
    src = load_image_source(folder)
    np.testing.assert_array_equal(src.images, u8)
    np.savez(tmp_path / "imgs.npz", arr_0=u8)
    np.testing.assert_array_equal(load_image_source(tmp_path / "imgs.npz").images, u8)
    np.testing.assert_allclose(ext.features(src.images), ext.features(x), rtol=1e-5, atol=1e-5)

    Image.fromarray(np.zeros((30, 30), np.uint8)).save(folder / "zzz.png")
    with pytest.raises(DataError, match="differ in size"):
        load_image_source(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_source(tmp_path / "empty")
    np.savez(tmp_path / "float.npz", arr_0=from_uint8(u8).numpy())
    with pytest.raises(DataError, match="dtype float32"):
        load_image_source(tmp_path / "float.npz")
    np.savez(tmp_path / "adm.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(DataError, match="--extractor inception"):
        load_image_source(tmp_path / "adm.npz", extractor="mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_image_source(tmp_path / "nope")


# --- command line -----------------------------------------------------------------------------------
def run_cli(*argv: str) -> int:
    from autodiffusion_rt.metrics.cli import register

    parser = argparse.ArgumentParser(prog="autodiffusion-rt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_fid_stats_and_fid(tmp_path, capsys, digits):
    out = tmp_path / "heldout_stats.npz"
    assert run_cli("fid-stats", "mnist:heldout", "--out", str(out), "--quiet") == 0
    line = capsys.readouterr().out
    assert "1000 samples, extractor mnist" in line and str(out) in line
    stats = FeatureStats.load(out)
    assert stats.extractor == "mnist" and stats.num_samples == 1000

    np.savez(tmp_path / "gen.npz", arr_0=to_uint8(shuffled(digits)[:300]))
    assert run_cli("fid-stats", str(tmp_path / "gen.npz"), "--quiet") == 0  # an .npz of images
    assert capsys.readouterr().out.startswith("npz:gen:")
    assert run_cli("fid-stats", str(tmp_path / "gen.npz"), "--quiet") == 0
    assert "(cached at" in capsys.readouterr().out
    assert run_cli("fid", str(tmp_path / "gen.npz"), "--ref", str(out), "--quiet") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("FID ") and "300 samples, extractor mnist" in printed
    value = float(printed.split()[1])
    expected = fid(from_uint8(to_uint8(shuffled(digits)[:300])), stats)
    assert value == pytest.approx(expected, abs=1e-3)

    np.savez(tmp_path / "few.npz", arr_0=to_uint8(digits[:30]))
    assert run_cli("fid", str(tmp_path / "few.npz"), "--ref", "mnist:heldout", "--quiet") == 0
    captured = capsys.readouterr()
    assert "30 samples" in captured.out and "warning: only 30 samples" in captured.err and "at least 65" in captured.err

    with pytest.raises(DataError, match="another extractor setting"):
        run_cli("fid", str(tmp_path / "gen.npz"), "--ref", str(out), "--extractor", "inception", "--quiet")
    with pytest.raises(DataError, match="either the generated images"):
        run_cli("fid", "--ref", str(out), "--quiet")


@pytest.mark.slow  # a CLI process; test_cli_fid_with_the_embedded_model stays quick
def test_cli_fid_samples_from_a_model_through_the_public_api(capsys, embedded_model, ext, ref):
    """``fid --model`` prints the FID of ``autodiffusion_rt.sample(model, timesteps, n=, seed=)`` against ``--ref``.

    The reference does not go through the CLI: the public sample() of the embedded model and fid() on this
    module's own statistics of all embedded digits (what ``--ref mnist`` names). What would catch this: the CLI
    sampling other timesteps, n, seed, sampler or labels than asked, or ``--steps 4`` not meaning
    [999, 749, 499, 249]; the last assertion shows that a schedule one step off gives another FID.
    """
    import autodiffusion_rt

    def cli_fid(*args: str) -> float:
        assert run_cli("fid", "--model", "embedded:mnist", "--n", "20", "--quiet", *args) == 0
        out = capsys.readouterr().out
        assert "20 samples, extractor mnist" in out
        return float(out.split()[1])

    def api_fid(timesteps, seed: int) -> float:
        images = autodiffusion_rt.sample(embedded_model, timesteps, "ddim", n=20, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FIDWarning)  # 20 samples: FID warns that it is biased
            return fid(images, ref, ext)

    # The CLI prints 4 decimals.
    assert cli_fid("--timesteps", "999,500,100", "--seed", "4") == pytest.approx(api_fid([999, 500, 100], 4), abs=1e-3)
    steps4 = cli_fid("--steps", "4")
    assert steps4 == pytest.approx(api_fid([999, 749, 499, 249], 0), abs=1e-3)
    assert steps4 != pytest.approx(api_fid([999, 750, 500, 250], 0), abs=1e-3)


def test_cli_fid_with_the_embedded_model(capsys):
    """The committed embedded model end to end; a missing asset fails here (it ships with the package)."""
    assert run_cli("fid", "--model", "embedded:mnist", "--steps", "2", "--n", "100", "--quiet") == 0
    out = capsys.readouterr().out
    assert out.startswith("FID ") and "100 samples" in out and np.isfinite(float(out.split()[1]))


def test_cli_train_classifier_is_registered():
    from autodiffusion_rt.metrics.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-classifier", "--out", os.devnull, "--epochs", "3"])
    assert args.epochs == 3 and callable(args.func) and Path(args.out) == Path(os.devnull)


# --- the FID's uncertainty ------------------------------------------------------------------------
def test_bootstrap_fid_is_the_fid_and_its_spread_shrinks_with_more_samples(digits, ext, ref):
    """The identity resample reproduces fid() exactly; the resamples' spread is positive and falls as n grows."""
    from autodiffusion_rt.metrics import bootstrap_indices, fid_with_bootstrap

    images = shuffled(digits)[:1200]
    value, boot = fid_with_bootstrap(images, ref, ext, np.arange(len(images))[None])
    assert value == fid(images, ref, ext) and boot[0] == pytest.approx(value, rel=1e-9)
    spreads = []
    for n in (150, 1200):
        value, boot = fid_with_bootstrap(images[:n], ref, ext, bootstrap_indices(n, 20, seed=3))
        assert boot.shape == (20,) and np.isfinite(boot).all()
        spreads.append(np.std(boot, ddof=1))
    assert 0 < spreads[1] < spreads[0]


@pytest.mark.slow  # two small tables; a script, not a stage of the quick subset
def test_fid_table_shows_each_extractor_pass_and_chunk_and_quiet_silences_them(tmp_path, capsys, monkeypatch):
    """scripts/fid_table.py: a bar per feature pass and a line per sample chunk (an Inception pass takes minutes on
    a CPU and printed nothing); --quiet prints the rows alone, with the same FIDs."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    import fid_table

    args = ["--n", "80", "--chunk", "40", "--rows", "ddim:2", "--no-real", "--extractors", "mnist"]
    fid_table.main([*args, "--json", str(tmp_path / "a.json")])
    out, err = capsys.readouterr()
    assert "ddim2: samples 0..39 done" in out and "ddim2: samples 40..79 done" in out
    assert "mnist features" in err and "80/80" in err, err[-500:]
    fid_table.main([*args, "--json", str(tmp_path / "b.json"), "--quiet"])
    out, err = capsys.readouterr()
    assert err == "" and "samples" not in out
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert [r["fid_mnist"] for r in a] == [r["fid_mnist"] for r in b] and math.isfinite(a[0]["fid_mnist"])
    # fewer samples than feature dimensions (the README's 2,000 against Inception's 2048): one note, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", FIDWarning)
        fid_table.main(["--n", "40", "--chunk", "40", "--rows", "ddim:2", "--no-real", "--ddpm-n", "40", "--quiet"])
    assert "note: mnist features are 64-d: rows of 40 samples have a rank-deficient" in capsys.readouterr().err
