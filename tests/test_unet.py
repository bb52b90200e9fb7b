"""ADMUNet against guided-diffusion (keys and outputs), layer skipping and the MACs registry."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from autodiffusion_rt.errors import LayerError, SamplingError
from autodiffusion_rt.models.loading import adm_config
from autodiffusion_rt.models.train import EMBEDDED_MNIST_CONFIG
from autodiffusion_rt.models.unet import ADMUNet, AttentionBlock, ResBlock

DATA = Path(__file__).parent / "data"


def _randomised(config: dict, seed: int = 0) -> ADMUNet:
    torch.manual_seed(seed)
    m = ADMUNet(**config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def reference():
    # Made by running guided-diffusion's own unet.py on seeded random weights (see "source").
    return torch.load(DATA / "guided_diffusion_reference.pt", weights_only=True)


@pytest.mark.parametrize("name", ["legacy", "updown_cond"])
def test_guided_diffusion_checkpoint_loads_strict_and_computes_the_same_function(reference, name):
    ref = reference["models"][name]
    m = ADMUNet(**ref["kwargs"]).eval()
    m.load_state_dict({k: v.float() for k, v in ref["state_dict"].items()}, strict=True)
    with torch.no_grad():
        out = m(ref["x"], ref["t"], ref["y"])
    assert out.shape == ref["out"].shape
    torch.testing.assert_close(out, ref["out"], rtol=1e-4, atol=1e-4)


def test_imagenet64_preset_has_guided_diffusions_exact_keys_and_shapes():
    expected = json.loads((DATA / "adm_imagenet64_cond_keys.json").read_text())["state_dict_shapes"]
    unet_kwargs, diffusion = adm_config(preset="imagenet64-cond")
    with torch.device("meta"):
        m = ADMUNet(**unet_kwargs)
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert list(got) == list(expected)  # same keys in the same order
    assert got == expected
    assert sum(v.numel() for v in m.state_dict().values()) == 295_904_454
    assert diffusion == {"noise_schedule": "cosine", "diffusion_steps": 1000, "learn_sigma": True}


def test_keeping_every_layer_is_exactly_the_plain_forward():
    m = _randomised(EMBEDDED_MNIST_CONFIG)
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([5, 500, 999]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(m(x, t, y), m(x, t, y, keep=m.layer_ids))


def test_a_skipped_attention_block_is_identity():
    # An attention block whose output projection is zero adds nothing: the network with
    # it skipped must compute exactly the same function as the network with it running.
    m = _randomised(EMBEDDED_MNIST_CONFIG)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([4, 9])
    for layer in [a for a in m.layers if a.kind == "attn"]:
        block = m.get_submodule(layer.id)
        saved = [p.detach().clone() for p in block.proj_out.parameters()]
        with torch.no_grad():
            skipped = m(x, t, y, keep=m.layer_ids - {layer.id})
            for p in block.proj_out.parameters():
                p.zero_()
            zeroed = m(x, t, y)
            for p, s in zip(block.proj_out.parameters(), saved):
                p.copy_(s)
            running = m(x, t, y)
        torch.testing.assert_close(skipped, zeroed, rtol=0, atol=1e-6)
        assert not torch.allclose(skipped, running, atol=1e-4), f"skipping {layer.id} changed nothing"


def test_a_skipped_resblock_is_the_block_with_its_residual_branch_zeroed():
    """Skipping a ResBlock must equal running it with its residual branch contributing nothing (its last conv
    zeroed, as ADM initialises it): what remains is the skip connection, with the 1x1 projection or the
    resampling where the block has them, and the rest of the network unchanged.
    What would catch this: a skip that drops the projection or the resampling, or skips a neighbour too."""
    m = _randomised({**EMBEDDED_MNIST_CONFIG, "resblock_updown": True})
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([4, 9])
    res_layers = [layer for layer in m.layers if layer.kind == "res"]
    kinds = set()
    for layer in res_layers:
        block = m.get_submodule(layer.id)
        kinds.add("updown" if block.updown else "projection" if block.channels != block.out_channels else "identity")
        last = block.out_layers[-1]
        saved = [p.detach().clone() for p in last.parameters()]
        with torch.no_grad():
            skipped = m(x, t, y, keep=m.layer_ids - {layer.id})
            running = m(x, t, y)
            for p in last.parameters():
                p.zero_()
            zeroed = m(x, t, y)
            for p, s in zip(last.parameters(), saved):
                p.copy_(s)
        torch.testing.assert_close(skipped, zeroed, rtol=0, atol=1e-6)
        assert not torch.allclose(skipped, running, atol=1e-4), f"skipping {layer.id} changed nothing"
    assert kinds == {"updown", "projection", "identity"}  # every kind of skip path was exercised


def test_a_skipped_resblock_with_equal_channels_is_the_identity():
    m = _randomised(EMBEDDED_MNIST_CONFIG)
    plain = [layer for layer in m.layers if layer.kind == "res" and not m.get_submodule(layer.id).updown
             and m.get_submodule(layer.id).channels == m.get_submodule(layer.id).out_channels]
    assert plain
    for layer in plain:
        block = m.get_submodule(layer.id)
        x = torch.randn(2, block.channels, layer.resolution, layer.resolution)
        with torch.no_grad():
            assert torch.equal(block(x, None, skip=True), x)


def _measured_macs(m: ADMUNet, keep, batch: int = 2) -> float:
    x = torch.randn(batch, m.in_channels, m.image_size, m.image_size)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, m.num_classes, (batch,)) if m.num_classes else None
    # The math backend: FlopCounterMode has no formula for PyTorch's fused CPU attention kernel
    # (it would count 0), while the math path's two batched products are what the registry counts.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        m(x, t, y, keep=keep)
    return counter.get_total_flops() / 2 / batch


@pytest.mark.parametrize(
    "config",
    [
        EMBEDDED_MNIST_CONFIG,
        {**EMBEDDED_MNIST_CONFIG, "resblock_updown": True, "conv_resample": True, "use_new_attention_order": True},
        dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=2,
             attention_resolutions=(2, 4), channel_mult=(1, 2, 3), num_classes=None, num_head_channels=16,
             use_scale_shift_norm=False, resblock_updown=False),
    ],
    ids=["embedded", "updown", "rgb-learn-sigma"],
)
def test_subnetwork_macs_are_full_minus_skipped_layers_and_match_the_flop_counter(config):
    m = ADMUNet(**config).eval()
    full = m.macs()
    assert _measured_macs(m, None) == full
    rng = random.Random(0)
    ids = [layer.id for layer in m.layers]
    for _ in range(4):
        skipped = set(rng.sample(ids, rng.randint(1, len(ids))))
        keep = set(ids) - skipped
        expected = full - sum(layer.macs for layer in m.layers if layer.id in skipped)
        assert m.macs(keep) == expected
        assert _measured_macs(m, keep) == expected
        assert expected < full


def test_imagenet64_preset_registry_matches_the_flop_counter_on_the_meta_device():
    unet_kwargs, _ = adm_config(preset="imagenet64-cond")
    with torch.device("meta"):
        m = ADMUNet(**unet_kwargs)
        x, t, y = torch.randn(1, 3, 64, 64), torch.tensor([3]), torch.tensor([7])
        with FlopCounterMode(display=False) as counter:
            m(x, t, y)
    assert counter.get_total_flops() / 2 == m.macs()
    kinds = {layer.kind for layer in m.layers}
    assert kinds == {"res", "attn"}
    assert len(m.layers) == len({layer.id for layer in m.layers})


def test_registry_lists_every_resblock_and_attention_block_once_in_execution_order():
    m = ADMUNet(**EMBEDDED_MNIST_CONFIG)
    blocks = [mod.layer_id for mod in m.modules() if isinstance(mod, (ResBlock, AttentionBlock))]
    assert sorted(blocks) == sorted(layer.id for layer in m.layers)
    order = [layer.id for layer in m.layers]
    assert order[0].startswith("input_blocks.") and order[-1].startswith("output_blocks.")
    # ids are module paths: each resolves to the block it names
    for layer in m.layers:
        block = m.get_submodule(layer.id)
        assert (layer.kind == "res") == isinstance(block, ResBlock)


def test_unknown_layer_ids_and_label_misuse_are_clear_errors():
    m = ADMUNet(**EMBEDDED_MNIST_CONFIG)
    x, t = torch.randn(1, 1, 28, 28), torch.tensor([1])
    with pytest.raises(LayerError, match="nope"):
        m(x, t, torch.tensor([0]), keep={"input_blocks.1.0", "nope"})
    with pytest.raises(SamplingError, match="class-conditional"):
        m(x, t)
    uncond = ADMUNet(**{**EMBEDDED_MNIST_CONFIG, "num_classes": None})
    with pytest.raises(SamplingError, match="unconditional"):
        uncond(x, t, torch.tensor([0]))
