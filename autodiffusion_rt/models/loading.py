"""Model specs -> a :class:`DiffusionModel` (UNet + noise schedule + identity).

Specs:

* ``embedded:mnist``: the project's own class-conditional MNIST model, shipped as
  package data (trained by ``autodiffusion-rt train``; see the README).
* ``ckpt:PATH``: a checkpoint written by ``autodiffusion-rt train`` (its config
  and noise schedule travel with the weights).
* ``adm:PATH``: an openai/guided-diffusion checkpoint. Its architecture comes from
  a named preset (``preset="imagenet64-cond"``, the published ADM-G 64x64 model)
  and/or keyword overrides using guided-diffusion's own flag names
  (``num_channels``, ``attention_resolutions="32,16,8"``, ``class_cond``,
  ``learn_sigma``, ``noise_schedule``, ...).
* ``diffusers:DIR``: a diffusers ``UNet2DModel`` saved with ``save_pretrained``,
  laid out as on the hub (``DIR/unet/`` + ``DIR/scheduler/``) or with the model
  at the top level (``DIR/config.json`` + weights, and ``scheduler_config.json``
  beside it or in ``DIR/scheduler/``). diffusers loads the model; the scheduler
  config gives the betas (diffusers computes them), ``num_train_timesteps`` and
  ``prediction_type`` (``epsilon`` or ``v_prediction``, converted to eps by
  :meth:`DiffusionModel.eps`). See :mod:`.diffusers_adapter`.

Nothing is downloaded: a missing file is an error that says where it was looked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..diffusion import NoiseSchedule
from ..errors import CheckpointError, ModelSpecError
from ..registry import MODEL_SPECS, one_of
from ..utils import weights_fingerprint
from .model import DiffusionModel
from .unet import ADMUNet

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODELS = {"mnist": EMBEDDED_DIR / "embedded_mnist.pt"}

# guided-diffusion's script defaults (script_util.model_and_diffusion_defaults).
_ADM_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
)

# The published checkpoints' flags, from guided-diffusion's README.
ADM_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet64-cond": dict(
        attention_resolutions="32,16,8",
        class_cond=True,
        dropout=0.1,
        image_size=64,
        learn_sigma=True,
        noise_schedule="cosine",
        num_channels=192,
        num_head_channels=64,
        num_res_blocks=3,
        resblock_updown=True,
        use_new_attention_order=True,
        use_fp16=True,
        use_scale_shift_norm=True,
    ),
    "imagenet128-cond": dict(
        attention_resolutions="32,16,8",
        class_cond=True,
        image_size=128,
        learn_sigma=True,
        noise_schedule="linear",
        num_channels=256,
        num_heads=4,
        num_res_blocks=2,
        resblock_updown=True,
        use_fp16=True,
        use_scale_shift_norm=True,
    ),
    "imagenet256-cond": dict(
        attention_resolutions="32,16,8",
        class_cond=True,
        image_size=256,
        learn_sigma=True,
        noise_schedule="linear",
        num_channels=256,
        num_head_channels=64,
        num_res_blocks=2,
        resblock_updown=True,
        use_fp16=True,
        use_scale_shift_norm=True,
    ),
    "imagenet256-uncond": dict(
        attention_resolutions="32,16,8",
        class_cond=False,
        image_size=256,
        learn_sigma=True,
        noise_schedule="linear",
        num_channels=256,
        num_head_channels=64,
        num_res_blocks=2,
        resblock_updown=True,
        use_fp16=True,
        use_scale_shift_norm=True,
    ),
}

_DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def _parse_ints(value, name: str) -> tuple:
    if isinstance(value, str):
        try:
            return tuple(float(v) if "." in v else int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ModelSpecError(f"{name}={value!r} is not a comma-separated list of numbers") from None
    return tuple(value)


def adm_config(preset: Optional[str] = None, **flags) -> tuple[dict, dict]:
    """guided-diffusion flags (preset + overrides) -> (ADMUNet kwargs, diffusion settings)."""
    try:
        return _adm_config(preset, **flags)
    except (ValueError, TypeError, ZeroDivisionError) as e:  # a flag of the wrong kind (num_channels=abc, ...=0)
        given = ", ".join(f"{k}={v!r}" for k, v in flags.items()) or "none"
        raise ModelSpecError(
            f"ADM options ({given}) do not make a model config: {type(e).__name__}: {e}; "
            "check the --option values (guided-diffusion's flag names and types)"
        ) from None


def _adm_config(preset: Optional[str] = None, **flags) -> tuple[dict, dict]:
    if preset is not None and preset not in ADM_PRESETS:
        raise ModelSpecError(f"unknown ADM preset {preset!r}: choose one of {sorted(ADM_PRESETS)}")
    unknown = set(flags) - set(_ADM_DEFAULTS)
    if unknown:
        raise ModelSpecError(f"unknown ADM option(s) {sorted(unknown)}: valid options are {sorted(_ADM_DEFAULTS)}")
    f = {**_ADM_DEFAULTS, **(ADM_PRESETS[preset] if preset else {}), **flags}
    for key, default in _ADM_DEFAULTS.items():  # bool("maybe") is True: a yes/no flag takes a yes or a no
        value = f[key]
        if isinstance(default, bool) and not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
            raise ModelSpecError(f"ADM option {key}={value!r} must be true or false")
    size = int(f["image_size"])
    mult = _parse_ints(f["channel_mult"], "channel_mult") if f["channel_mult"] else _DEFAULT_CHANNEL_MULT.get(size)
    if mult is None:
        raise ModelSpecError(f"no default channel_mult for image_size={size}: pass channel_mult='1,2,3,4' or similar")
    unet = dict(
        image_size=size,
        in_channels=3,
        model_channels=int(f["num_channels"]),
        out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=int(f["num_res_blocks"]),
        attention_resolutions=tuple(
            size // int(r) for r in _parse_ints(f["attention_resolutions"], "attention_resolutions")
        ),
        dropout=float(f["dropout"]),
        channel_mult=mult,
        num_classes=1000 if f["class_cond"] else None,
        use_checkpoint=bool(f["use_checkpoint"]),
        use_fp16=bool(f["use_fp16"]),
        num_heads=int(f["num_heads"]),
        num_head_channels=int(f["num_head_channels"]),
        num_heads_upsample=int(f["num_heads_upsample"]),
        use_scale_shift_norm=bool(f["use_scale_shift_norm"]),
        resblock_updown=bool(f["resblock_updown"]),
        use_new_attention_order=bool(f["use_new_attention_order"]),
    )
    diffusion = dict(
        noise_schedule=str(f["noise_schedule"]),
        diffusion_steps=int(f["diffusion_steps"]),
        learn_sigma=bool(f["learn_sigma"]),
    )
    return unet, diffusion


def check_unet_config(unet_config: dict, source: str) -> dict:
    """ADMUNet keyword arguments from a file or options: typed (strict) and within the limits, before anything
    is allocated."""
    from ..limits import check_limit, check_model_bytes
    from ..records import schema, validate

    if not isinstance(unet_config, dict):
        raise CheckpointError(
            f"{source}: the model config must be an object of ADMUNet arguments, got {type(unet_config).__name__}"
        )
    cfg = validate(schema("ADMConfig"), unet_config, f"{source} (model config)", CheckpointError)
    widest = cfg.model_channels * max([1, *cfg.channel_mult])
    check_limit("channels", widest, "model_channels x max(channel_mult)", source, CheckpointError)
    check_limit("image_size", cfg.image_size, "image_size", source, CheckpointError)
    layers = len(cfg.channel_mult) * cfg.num_res_blocks
    check_limit("layers", layers, "len(channel_mult) x num_res_blocks", source, CheckpointError)
    kwargs = _unet_kwargs(unet_config)
    try:
        check_model_bytes(lambda: ADMUNet(**kwargs), source, CheckpointError)
    except (ValueError, TypeError, ZeroDivisionError, AssertionError, RuntimeError) as e:
        raise CheckpointError(
            f"{source}: the model config does not describe a buildable ADM UNet ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); check the preset/options"
        ) from None
    return kwargs


def _check_state_dict(unet: ADMUNet, state_dict: dict, source: str) -> None:
    import torch

    expected = unet.state_dict()
    bad = next((k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(
            f"{source}: entry {bad!r} of the state_dict is a {type(state_dict[bad]).__name__}, "
            "not a tensor: the file is not a model checkpoint"
        )
    for key, value in expected.items():
        if key in state_dict and state_dict[key].dtype.is_floating_point != value.dtype.is_floating_point:
            raise CheckpointError(
                f"{source}: key {key!r} holds {state_dict[key].dtype} values where the model has "
                f"{value.dtype}: the checkpoint is damaged or not this model's"
            )
        if key not in state_dict:
            raise CheckpointError(
                f"{source}: missing key {key!r} (expected shape {tuple(value.shape)}): "
                "the checkpoint does not fit this config; check the preset/options"
            )
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(state_dict[key].shape)} but the config expects "
                f"{tuple(value.shape)}: the checkpoint does not fit this config; check the preset/options"
            )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise CheckpointError(
            f"{source}: unexpected key {extra[0]!r} ({len(extra)} in all): the checkpoint does not fit this config; "
            "check the preset/options"
        )


def _read_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file not found: {path} (looked for it at that path; put the file there or pass its path)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else "empty or not a torch file"
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first}") from None


def _read_adm_state_dict(path: Path) -> dict:
    """A guided-diffusion checkpoint: a bare state_dict."""
    state_dict = _read_checkpoint(path)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} does not hold a state_dict (got {type(state_dict).__name__})")
    return state_dict


def model_from_weights(
    name: str,
    unet_config: dict,
    diffusion: dict,
    state_dict: dict,
    *,
    source: str = "<weights>",
    metadata: Optional[dict] = None,
    checked: bool = False,
) -> DiffusionModel:
    """An ADM :class:`DiffusionModel` from its architecture, noise settings and weights.

    ``unet_config``: :class:`ADMUNet` keyword arguments; ``diffusion``: ``noise_schedule``,
    ``diffusion_steps``, ``learn_sigma``; ``source`` names the weights in errors. Every
    spec loader ends here; it is also the way to make a model that is not a file
    (random weights in tests and ``benchmark.py --tiny``).
    """
    if not checked:  # ``checked``: the caller ran these two on this config already (before reading the weights)
        unet_config = check_unet_config(unet_config, source)
        diffusion_schedule(diffusion, source)  # before the weights are allocated: a bad schedule costs nothing
    unet = ADMUNet(**_unet_kwargs(unet_config))
    _check_state_dict(unet, state_dict, source)
    unet.load_state_dict(state_dict, strict=True)
    unet.eval().requires_grad_(False)
    schedule = diffusion_schedule(diffusion, source)
    return DiffusionModel(
        name=name,
        unet=unet,
        schedule=schedule,
        config={"unet": dict(unet_config), "diffusion": dict(diffusion)},
        fingerprint=weights_fingerprint(state_dict),
        learn_sigma=bool(diffusion.get("learn_sigma", False)),
        metadata=dict(metadata or {}),
    )


def _unet_kwargs(config: dict) -> dict:
    """ADMUNet kwargs as the constructor takes them (JSON turns its tuples into lists)."""
    out = dict(config)
    for key in ("attention_resolutions", "channel_mult"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    return out


def diffusion_schedule(diffusion: dict, source: str = "the model config") -> NoiseSchedule:
    """The noise schedule a model config's ``diffusion`` settings describe (named, or a diffusers scheduler config)."""
    from ..limits import check_limit
    from ..records import schema, validate

    settings = validate(schema("DiffusionSettings"), diffusion, f"{source} (diffusion settings)", CheckpointError)
    if settings.scheduler is not None:
        from .diffusers_adapter import scheduler_noise_schedule

        return scheduler_noise_schedule(settings.scheduler, source)
    check_limit("timesteps", settings.diffusion_steps, "diffusion_steps", source, CheckpointError)
    return NoiseSchedule.named(settings.noise_schedule, settings.diffusion_steps)


def _load_trained(spec: str, path: Path, fix: str) -> DiffusionModel:
    """A checkpoint written by ``autodiffusion-rt train``: config, schedule and weights in one file."""
    from ..records import schema, validate

    record = _read_checkpoint(path)
    if not (isinstance(record, dict) and record.get("format") == 1 and "state_dict" in record):
        raise CheckpointError(f"{path} is not an autodiffusion-rt checkpoint (format 1): {fix}")
    validate(schema("CheckpointRecord"), record, str(path), CheckpointError, fix)
    return model_from_weights(
        spec,
        record["config"],
        record["diffusion"],
        record["state_dict"],
        source=str(path),
        metadata=record.get("training", {}),
    )


def load_model(spec: str, **overrides) -> DiffusionModel:
    """Load ``embedded:NAME``, ``ckpt:PATH``, ``adm:PATH`` (with ``preset=`` and guided-diffusion flags)
    or ``diffusers:DIR``."""
    if not isinstance(spec, str) or ":" not in spec:
        forms = one_of(repr(form) for form, _ in MODEL_SPECS.values())
        raise ModelSpecError(f"unknown model spec {spec!r}: use {forms}")
    kind, _, rest = spec.partition(":")
    if kind == "embedded":
        if rest not in EMBEDDED_MODELS:
            raise ModelSpecError(
                f"unknown embedded model {rest!r} in {spec!r}: available: {['embedded:' + k for k in EMBEDDED_MODELS]}"
            )
        if overrides:
            raise ModelSpecError(f"the embedded model takes no options, got {sorted(overrides)}")
        return _load_trained(spec, EMBEDDED_MODELS[rest], "reinstall the package")
    if kind == "ckpt":
        if not rest:
            raise ModelSpecError(
                f"model spec {spec!r} has no path: use 'ckpt:PATH' for a checkpoint written by 'autodiffusion-rt train'"
            )
        if overrides:
            raise ModelSpecError(f"a ckpt: model carries its own config and takes no options, got {sorted(overrides)}")
        return _load_trained(spec, Path(rest).expanduser(), "pass a file written by 'autodiffusion-rt train --out'")
    if kind == "adm":
        if not rest:
            raise ModelSpecError(f"model spec {spec!r} has no path: use 'adm:PATH/TO/CHECKPOINT.pt'")
        path = Path(rest).expanduser()
        unet_kwargs, diffusion = adm_config(**overrides)
        where = f"{spec} with its preset/options"
        unet_kwargs = check_unet_config(unet_kwargs, where)  # the options before the file is read
        diffusion_schedule(diffusion, where)
        state_dict = _read_adm_state_dict(path)
        return model_from_weights(
            spec, unet_kwargs, diffusion, state_dict, source=str(path), metadata={"overrides": overrides}, checked=True
        )
    if kind == "diffusers":
        if not rest:
            raise ModelSpecError(f"model spec {spec!r} has no path: use 'diffusers:DIR' (a save_pretrained directory)")
        if overrides:
            raise ModelSpecError(
                f"a diffusers: model carries its own config and takes no options, got {sorted(overrides)}"
            )
        from .diffusers_adapter import load_diffusers

        return load_diffusers(spec, Path(rest).expanduser())
    kinds = ", ".join(map(repr, MODEL_SPECS))
    raise ModelSpecError(f"unknown model spec {spec!r}: the kind {kind!r} is not one of {kinds}")


def load_model_for_plan(plan, model: Optional[DiffusionModel] = None) -> DiffusionModel:
    """The DiffusionModel ``plan`` was made for, checked against it (weights fingerprint, config, layers).

    ``adm:PATH`` checkpoints are rebuilt from the architecture the plan records,
    so no preset or options are needed; the other specs carry their own config.
    ``model``: use this one instead of loading it (checked all the same).
    """
    if model is None:
        spec = plan.model_spec
        if spec.startswith("adm:") and isinstance(plan.model_config, dict) and "unet" in plan.model_config:
            path = Path(spec[4:]).expanduser()
            state_dict = _read_adm_state_dict(path)
            model = model_from_weights(
                spec, plan.model_config["unet"], plan.model_config["diffusion"], state_dict, source=str(path)
            )
        else:
            model = load_model(spec)
    plan.check_model(model)
    return model
