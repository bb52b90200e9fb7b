"""diffusers' ``UNet2DModel`` as a :class:`~autodiffusion_rt.models.adapter.SkippableUNet`.

The model is loaded and owned by diffusers (``UNet2DModel.from_pretrained`` of
a local ``save_pretrained`` directory); the adapter adds the layer registry and
walks diffusers' own modules (its blocks' resnets, attentions, down/upsamplers,
stem and head) in the order ``UNet2DModel.forward`` does, so that a layer can
be skipped and the timestep embedding folded:

* skippable layers: every ``ResnetBlock2D`` and ``Attention`` of the down, mid
  and up blocks, id = module path (``down_blocks.1.resnets.0``,
  ``mid_block.attentions.0``, ...);
* a skipped resnet becomes its shortcut (identity, or ``conv_shortcut`` where
  channels change, divided by its ``output_scale_factor``), a skipped attention
  becomes identity; the long skip connections, down/upsamplers, stem and head
  always run;
* a resnet's embedding projection (SiLU + ``time_emb_proj``) is computed apart
  from its body, so an exporter can fold it for a fixed timestep.

Supported: ``UNet2DModel`` with positional time embedding, no class embedding,
blocks :data:`SUPPORTED_DOWN`, :data:`SUPPORTED_UP` and :data:`SUPPORTED_MID`
with conv down/upsampling (the google/ddpm-* layouts). Anything else is a
:class:`~autodiffusion_rt.errors.ModelSpecError` naming what is supported.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import nn

from ..errors import ModelSpecError
from .adapter import Layer, SkippableUNet

SUPPORTED_CLASSES = ("UNet2DModel",)
SUPPORTED_DOWN = ("DownBlock2D", "AttnDownBlock2D")
SUPPORTED_UP = ("UpBlock2D", "AttnUpBlock2D")
SUPPORTED_MID = ("UNetMidBlock2D",)


def check_unet_config(config: Mapping, source: str) -> None:
    """Refuse a UNet config this adapter cannot run, naming what it supports."""
    cls = config.get("_class_name", "UNet2DModel")
    if cls not in SUPPORTED_CLASSES:
        raise ModelSpecError(
            f"{source}: UNet class {cls!r} is not supported: the diffusers adapter supports {list(SUPPORTED_CLASSES)}"
        )

    def check(key, supported, default):
        values = config.get(key, default)
        for v in [values] if isinstance(values, str) or values is None else values:
            if v not in supported:
                raise ModelSpecError(
                    f"{source}: {key} has block type {v!r}, which is not supported: use {list(supported)}"
                )

    check("down_block_types", SUPPORTED_DOWN, ())
    check("up_block_types", SUPPORTED_UP, ())
    check("mid_block_type", SUPPORTED_MID, "UNetMidBlock2D")
    for key, supported, default in (
        ("downsample_type", ("conv",), "conv"),
        ("upsample_type", ("conv",), "conv"),
        ("time_embedding_type", ("positional",), "positional"),
        ("resnet_time_scale_shift", ("default", "scale_shift"), "default"),
    ):
        if config.get(key, default) not in supported:
            raise ModelSpecError(f"{source}: {key}={config.get(key)!r} is not supported: use {list(supported)}")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise ModelSpecError(
            f"{source}: class-conditional UNet2DModel (class_embed_type/num_class_embeds) is not supported: "
            "the diffusers adapter runs unconditional models"
        )
    if config.get("out_channels", 3) != config.get("in_channels", 3):
        raise ModelSpecError(
            f"{source}: out_channels={config.get('out_channels')} differs from "
            f"in_channels={config.get('in_channels')}: "
            "learned-variance diffusers models are not supported (the output must be eps or v)"
        )
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)) and len(set(size)) != 1:
        raise ModelSpecError(f"{source}: sample_size={size} is not square: the adapter supports square images")


def _conv_macs(conv: nn.Conv2d, out_hw: tuple[int, int]) -> int:
    return out_hw[0] * out_hw[1] * conv.in_channels * conv.out_channels * math.prod(conv.kernel_size) // conv.groups


def _conv_out_hw(conv: nn.Conv2d, hw: tuple[int, int], extra_pad: int = 0) -> tuple[int, int]:
    return tuple(
        (hw[d] + 2 * conv.padding[d] + extra_pad - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1) // conv.stride[d]
        + 1
        for d in range(2)
    )


class _Resnet:
    """A view onto one diffusers ``ResnetBlock2D``: its projection, body and skip path."""

    kind = "res"

    def __init__(self, layer_id: str, block: nn.Module):
        if block.upsample is not None or block.downsample is not None or block.time_emb_proj is None:
            raise ModelSpecError(
                f"{layer_id}: resampling resnets or resnets without a time embedding are not supported"
            )
        if block.time_embedding_norm not in ("default", "scale_shift"):
            raise ModelSpecError(
                f"{layer_id}: time_embedding_norm={block.time_embedding_norm!r} is not supported: "
                "use 'default' or 'scale_shift'"
            )
        self.layer_id, self.block = layer_id, block

    @property
    def projection_width(self) -> int:
        return self.block.time_emb_proj.out_features

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        b = self.block
        if not b.skip_time_act:
            emb = b.nonlinearity(emb)
        return b.time_emb_proj(emb)[:, :, None, None]

    def __call__(self, x: torch.Tensor, proj: Optional[torch.Tensor], skip: bool) -> torch.Tensor:
        # ResnetBlock2D.forward with the embedding projection given (diffusers' modules, its order).
        b = self.block
        shortcut = b.conv_shortcut(x) if b.conv_shortcut is not None else x
        if skip:
            return shortcut / b.output_scale_factor
        h = b.conv1(b.nonlinearity(b.norm1(x)))
        if b.time_embedding_norm == "default":
            h = b.norm2(h + proj.to(h.dtype))
        else:
            scale, shift = torch.chunk(proj.to(h.dtype), 2, dim=1)
            h = b.norm2(h) * (1 + scale) + shift
        h = b.conv2(b.dropout(b.nonlinearity(h)))
        return (shortcut + h) / b.output_scale_factor

    def macs(self, hw) -> tuple[int, int]:
        """(MACs skipping saves, MACs of the skip path)."""
        b = self.block
        body = (
            _conv_macs(b.conv1, hw)
            + _conv_macs(b.conv2, hw)
            + b.time_emb_proj.in_features * b.time_emb_proj.out_features
        )
        return body, (
            _conv_macs(b.conv_shortcut, _conv_out_hw(b.conv_shortcut, hw)) if b.conv_shortcut is not None else 0
        )


class _Attention:
    """A view onto one diffusers ``Attention`` (self-attention over positions, residual inside)."""

    kind = "attn"

    def __init__(self, layer_id: str, attn: nn.Module):
        if getattr(attn, "spatial_norm", None) is not None or not getattr(attn, "residual_connection", False):
            raise ModelSpecError(f"{layer_id}: only residual self-attention without spatial norm is supported")
        self.layer_id, self.attn = layer_id, attn

    def __call__(self, x: torch.Tensor, skip: bool) -> torch.Tensor:
        return x if skip else self.attn(x)

    def macs(self, hw) -> tuple[int, int]:
        a = self.attn
        n = hw[0] * hw[1]
        linears = [a.to_q, a.to_k, a.to_v, a.to_out[0]]
        inner = a.to_q.out_features
        return n * sum(m.in_features * m.out_features for m in linears) + 2 * n * n * inner, 0


class DiffusersUNet(SkippableUNet):
    """A diffusers ``UNet2DModel`` with the skippable-UNet interface (its weights stay diffusers')."""

    def __init__(self, unet: nn.Module, source: str = "UNet2DModel"):
        super().__init__()
        check_unet_config(dict(unet.config), source)
        self.unet = unet
        cfg = unet.config
        size = cfg.sample_size
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(cfg.out_channels)
        self.num_classes = None
        self._views: dict[str, object] = {}
        self._set_registry(*self._build_registry())

    # ----------------------------------------------------------------- registry
    def _stages(self):
        """(kind, name, module, views) in execution order; views are (resnet, attention or None) pairs."""
        u = self.unet
        for i, block in enumerate(u.down_blocks):
            attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
            yield "down", f"down_blocks.{i}", block, list(zip(block.resnets, attns))
        mid = u.mid_block
        yield (
            "mid",
            "mid_block",
            mid,
            [(mid.resnets[0], None)] + [(r, a) for a, r in zip(mid.attentions, mid.resnets[1:])],
        )
        for i, block in enumerate(u.up_blocks):
            attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
            yield "up", f"up_blocks.{i}", block, list(zip(block.resnets, attns))

    def _build_registry(self):
        u = self.unet
        hw = (self.image_size, self.image_size)
        fixed = _conv_macs(u.conv_in, hw)
        te = u.time_embedding
        fixed += sum(m.in_features * m.out_features for m in (te.linear_1, te.linear_2))
        layers = []
        self._plan = []  # per stage: list of (resnet view, attention view or None)
        for kind, name, block, pairs in self._stages():
            views = []
            for j, (r, a) in enumerate(pairs):
                # mid: attention j precedes resnet j+1 (UNetMidBlock2D.forward); elsewhere the attention follows.
                rv = _Resnet(f"{name}.resnets.{j}", r)
                av = None
                if a is not None:
                    aidx = j if kind != "mid" else j - 1
                    av = _Attention(f"{name}.attentions.{aidx}", a)
                order = [av, rv] if kind == "mid" else [rv, av]
                for v in order:
                    if v is None:
                        continue
                    saved, skip_path = v.macs(hw)
                    out_ch = v.block.out_channels if v.kind == "res" else v.attn.to_out[0].out_features
                    layers.append(Layer(v.layer_id, v.kind, hw[0], int(out_ch), int(saved)))
                    fixed += skip_path
                    self._views[v.layer_id] = v
                views.append((rv, av))
            self._plan.append(views)
            for d in getattr(block, "downsamplers", None) or []:
                extra = 1 if d.use_conv and d.padding == 0 else 0
                if d.use_conv:
                    out = _conv_out_hw(d.conv, hw, extra)
                    fixed += _conv_macs(d.conv, out)
                else:
                    out = (hw[0] // 2, hw[1] // 2)
                hw = out
            for up in getattr(block, "upsamplers", None) or []:
                if up.use_conv_transpose:
                    raise ModelSpecError(
                        "transposed-convolution upsamplers are not supported: use upsample_type='conv'"
                    )
                hw = (2 * hw[0], 2 * hw[1])
                if up.use_conv:
                    fixed += _conv_macs(up.conv, hw)
        fixed += _conv_macs(u.conv_out, hw)
        return layers, fixed

    # ------------------------------------------------------------- interface
    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        u = self.unet
        return u.time_embedding(u.time_proj(t).to(dtype=u.dtype))

    def projected_blocks(self, keep: Optional[frozenset[str]] = None) -> list[_Resnet]:
        return [v for v in self._views.values() if v.kind == "res" and (keep is None or v.layer_id in keep)]

    def forward_projected(
        self, x: torch.Tensor, projections: Mapping[str, torch.Tensor], keep: Optional[frozenset[str]] = None
    ) -> torch.Tensor:
        """UNet2DModel.forward's body (steps 0 and 2-6) with per-layer skipping and given projections."""
        u = self.unet

        def res(v: _Resnet, h):
            skip = keep is not None and v.layer_id not in keep
            return v(h, None if skip else projections[v.layer_id], skip)

        def attn(v: Optional[_Attention], h):
            return h if v is None else v(h, keep is not None and v.layer_id not in keep)

        if u.config.center_input_sample:
            x = 2 * x - 1.0
        h = u.conv_in(x)
        hs = [h]
        stages = list(self._stages())
        for (kind, _, block, _), views in zip(stages, self._plan):
            if kind == "down":
                for rv, av in views:
                    h = attn(av, res(rv, h))
                    hs.append(h)
                for d in block.downsamplers or []:
                    h = d(h)
                    hs.append(h)
            elif kind == "mid":
                for rv, av in views:
                    h = res(rv, attn(av, h))
            else:
                for rv, av in views:
                    h = attn(av, res(rv, torch.cat([h, hs.pop()], dim=1)))
                for up in block.upsamplers or []:
                    h = up(h)
        return u.conv_out(u.conv_act(u.conv_norm_out(h)))


# ------------------------------------------------------------------- loading
PREDICTION_TYPES = ("epsilon", "v_prediction")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _read_json(path, schema_name: str):
    """A diffusers config file: bounded JSON, then its typed schema (the keys this project reads; others pass)."""
    from ..records import read_json, schema, validate

    try:
        data = read_json(path, ModelSpecError, "pass a config written by diffusers' save_pretrained")
    except OSError as e:
        raise ModelSpecError(f"cannot read {path}: {e.strerror or e}") from None
    validate(schema(schema_name), data, str(path), ModelSpecError)
    return data


def check_unet_limits(config: Mapping, source: str) -> None:
    """A UNet2DModel config's sizes within :mod:`autodiffusion_rt.limits`, before diffusers allocates anything."""
    from ..limits import check_limit, check_model_bytes

    size = config.get("sample_size", 32)
    for v in size if isinstance(size, (list, tuple)) else [size]:
        if v < 1:
            raise ModelSpecError(f"{source}: sample_size={size} must be positive (the image side in pixels)")
        check_limit("image_size", v, "sample_size", source, ModelSpecError)
    channels = list(config.get("block_out_channels", (64,)))
    if not channels or min(channels) < 1:
        raise ModelSpecError(f"{source}: block_out_channels={channels} must be a non-empty list of positive integers")
    check_limit("channels", max(channels), "max(block_out_channels)", source, ModelSpecError)
    layers = len(channels) * config.get("layers_per_block", 2)
    check_limit("layers", layers, "len(block_out_channels) x layers_per_block", source, ModelSpecError)
    for key in ("down_block_types", "up_block_types"):
        if len(config.get(key, ())) != len(channels):
            raise ModelSpecError(
                f"{source}: {key} has {len(config.get(key, ()))} blocks for {len(channels)} "
                "block_out_channels: give one block type per level"
            )
    from diffusers import UNet2DModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        check_model_bytes(lambda: UNet2DModel.from_config(cfg), source, ModelSpecError)
    except (ValueError, TypeError, AttributeError, ZeroDivisionError, RuntimeError) as e:
        raise ModelSpecError(
            f"{source}: diffusers cannot build this UNet ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None


def locate(directory) -> tuple:
    """(unet dir, scheduler config file) of a diffusers directory, hub layout or model at the top level."""
    from pathlib import Path

    d = Path(directory)
    if not d.is_dir():
        raise ModelSpecError(f"diffusers directory not found: {d} (pass a directory written by save_pretrained)")
    unet_dir = d / "unet" if (d / "unet" / "config.json").is_file() else d
    missing = []
    if not (unet_dir / "config.json").is_file():
        missing.append(f"{d / 'unet' / 'config.json'} or {d / 'config.json'}")
    elif not any((unet_dir / w).is_file() for w in WEIGHT_FILES):
        missing.append(" or ".join(str(unet_dir / w) for w in WEIGHT_FILES))
    candidates = [d / "scheduler" / "scheduler_config.json", d / "scheduler_config.json"]
    scheduler = next((c for c in candidates if c.is_file()), None)
    if scheduler is None:
        missing.append(" or ".join(str(c) for c in candidates))
    if missing:
        raise ModelSpecError(f"{d} is not a complete diffusers model directory: missing {'; missing '.join(missing)}")
    return unet_dir, scheduler


def check_scheduler_config(config: Mapping, source: str) -> dict:
    """The scheduler settings we use, validated: prediction_type, num_train_timesteps and the beta settings."""
    pred = config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ModelSpecError(
            f"{source}: prediction_type={pred!r} is not supported: use one of {list(PREDICTION_TYPES)}"
        )
    keys = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "rescale_betas_zero_snr",
        "_class_name",
    )
    return {k: config[k] for k in keys if k in config and config[k] is not None}


def scheduler_noise_schedule(config: Mapping, source: str = "the scheduler config"):
    """The training noise schedule of a diffusers scheduler config, betas computed by diffusers' DDPMScheduler."""
    from diffusers import DDPMScheduler

    from ..diffusion import NoiseSchedule
    from ..errors import SamplingError
    from ..limits import check_limit
    from ..records import schema, validate

    checked = validate(schema("SchedulerConfig"), config, source, ModelSpecError)
    check_limit("timesteps", checked.num_train_timesteps, "num_train_timesteps", source, ModelSpecError)
    if checked.trained_betas is not None:
        check_limit("timesteps", len(checked.trained_betas), "len(trained_betas)", source, ModelSpecError)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        betas = DDPMScheduler.from_config(cfg).betas
    except (NotImplementedError, ValueError) as e:
        raise ModelSpecError(f"diffusers scheduler config {cfg}: {e}") from None
    try:
        return NoiseSchedule.from_betas(
            f"diffusers:{cfg.get('beta_schedule', 'trained_betas')}", betas.double().numpy()
        )
    except SamplingError as e:
        raise ModelSpecError(f"the scheduler config gives an unsupported schedule: {e}") from None


def load_diffusers(spec: str, directory):
    """``diffusers:DIR`` -> :class:`~autodiffusion_rt.models.model.DiffusionModel` (see the module docstring)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ModelSpecError(
            f"{spec}: loading a diffusers model needs the diffusers package: pip install diffusers"
        ) from None
    from ..utils import weights_fingerprint
    from .model import DiffusionModel

    unet_dir, scheduler_file = locate(directory)
    unet_config = _read_json(unet_dir / "config.json", "DiffusersUNetConfig")
    check_unet_config(unet_config, str(unet_dir / "config.json"))
    scheduler = check_scheduler_config(_read_json(scheduler_file, "SchedulerConfig"), str(scheduler_file))
    schedule = scheduler_noise_schedule(scheduler, str(scheduler_file))  # before the weights: costs nothing
    check_unet_limits(unet_config, str(unet_dir / "config.json"))
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelSpecError(
            f"diffusers cannot load {unet_dir}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    unet = unet.float().eval().requires_grad_(False)
    adapter = DiffusersUNet(unet, str(unet_dir)).eval()
    unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return DiffusionModel(
        name=spec,
        unet=adapter,
        schedule=schedule,
        config={
            "unet": {"class": "UNet2DModel", **unet_config},
            "diffusion": {
                "noise_schedule": schedule.name,
                "diffusion_steps": schedule.num_timesteps,
                "learn_sigma": False,
                "scheduler": scheduler,
            },
        },
        fingerprint=weights_fingerprint(unet.state_dict()),
        learn_sigma=False,
        metadata={"unet_dir": str(unet_dir), "scheduler_config": str(scheduler_file)},
        prediction_type=scheduler.get("prediction_type", "epsilon"),
    )


# ----------------------------------------------------- plans -> diffusers
def diffusers_scheduler_config(plan) -> dict:
    """The ``DPMSolverMultistepScheduler`` config that, with ``set_timesteps(timesteps=plan.timesteps)``,
    reproduces the plan's schedule without its layer skipping.

    DDIM (eta = 0) is first-order DPM-Solver++ (solver_order=1); DPM-Solver++(2M) is
    solver_order=2 with the midpoint form; both end at sigma = 0 (final_sigmas_type="zero"),
    as the plan's last step goes to clean data. Stochastic samplers (DDPM, DDIM eta > 0)
    have no equivalent here: their noise draws differ from the plan's.
    """
    from ..diffusion import NoiseSchedule
    from ..errors import PlanError

    if plan.sampler == "dpmpp_2m":
        order = 2
    elif plan.sampler == "ddim" and plan.eta == 0:
        order = 1
    else:
        raise PlanError(
            f"sampler {plan.sampler!r} (eta={plan.eta}) has no diffusers DPMSolverMultistepScheduler equivalent: "
            "export-diffusers supports 'ddim' with eta=0 and 'dpmpp_2m' plans"
        )
    diffusion = plan.model_config.get("diffusion", {}) if isinstance(plan.model_config, dict) else {}
    if "scheduler" in diffusion:
        betas = {k: v for k, v in diffusion["scheduler"].items() if not k.startswith("_")}
    else:  # an ADM / embedded plan: its named schedule's betas
        sched = NoiseSchedule.named(
            diffusion.get("noise_schedule", "linear"), int(diffusion.get("diffusion_steps", 1000))
        )
        betas = {
            "num_train_timesteps": sched.num_timesteps,
            "trained_betas": sched.betas.tolist(),
            "prediction_type": "epsilon",
        }
    return {
        **betas,
        "algorithm_type": "dpmsolver++",
        "solver_order": order,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "final_sigmas_type": "zero",
        "thresholding": False,
        "use_karras_sigmas": False,
        "use_lu_lambdas": False,
    }


def diffusers_scheduler(plan):
    """A diffusers ``DPMSolverMultistepScheduler`` with the plan's timesteps set
    (see :func:`diffusers_scheduler_config`)."""
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler.from_config(diffusers_scheduler_config(plan))
    s.set_timesteps(timesteps=list(plan.timesteps))
    return s


def export_diffusers_command(args) -> int:
    """``autodiffusion-rt export-diffusers PLAN [--out DIR]``: print (and save) the scheduler reproducing the plan."""
    from pathlib import Path

    from ..plan import Plan

    plan = Plan.load(args.plan)
    s = diffusers_scheduler(plan)
    cfg = {k: v for k, v in diffusers_scheduler_config(plan).items() if k != "trained_betas"}
    print(f"# {plan.sampler} plan over {len(plan.timesteps)} steps; no layer skipping in diffusers")
    print("from diffusers import DPMSolverMultistepScheduler")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        s.save_pretrained(args.out)
        print(f"scheduler = DPMSolverMultistepScheduler.from_pretrained({str(args.out)!r})")
    else:
        extra = ", trained_betas=[...]" if "trained_betas" in diffusers_scheduler_config(plan) else ""
        print(f"scheduler = DPMSolverMultistepScheduler(**{cfg!r}{extra})")
    print(f"scheduler.set_timesteps(timesteps={list(plan.timesteps)})")
    if plan.clip_denoised:
        print("# note: the plan clips x0 to [-1, 1] at each step; diffusers' DPM-Solver does not, so images can differ")
    return 0
