"""Reading records from files and bodies: bounded JSON, and one typed schema per format.

Every JSON the project reads (plans, manifests, diffusers configs, search
states, request bodies) goes through :func:`loads_json`: nesting depth, integer
digits and size are bounded (:mod:`autodiffusion_rt.limits`), a string holding
a lone surrogate (``"\\ud800"``, which no UTF-8 encoder can write back) is
refused, and in request bodies ``NaN`` and ``Infinity`` too, all as one
:class:`JSONBoundsError` naming where.

Records with a fixed layout (``ckpt:`` checkpoints, training states, diffusers
configs, the model entry of a manifest) are checked by a pydantic model in
strict mode (``1.0``, ``"3"`` and ``true`` are not integers) through
:func:`validate`, which turns pydantic's report into the project's one line:
the file, the field's path, and what was wrong with it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, TypeVar

from .errors import Error
from .limits import LIMITS, limit
from .utils import defer_interrupts

__all__ = ["JSONBoundsError", "loads_json", "read_json", "validate"]

_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONBoundsError(ValueError):
    """JSON that parses but is beyond the bounds (depth, integer digits, non-finite numbers, lone surrogates)."""


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > limit("json_int_digits"):
        raise JSONBoundsError(
            f"an integer with {digits:,} digits (the limit is {limit('json_int_digits')}, "
            f"{LIMITS['json_int_digits'].env})"
        )
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JSONBoundsError(f"the number {text[:40]} is out of the float range")
    return value


def _parse_constant(text: str):
    raise JSONBoundsError(f"{text} is not a JSON number (give a finite number)")


def _where(path: list) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "the top level"


def _check_tree(data: Any, max_depth: int) -> None:
    """Depth and strings of parsed JSON, without recursion."""
    stack = [(data, 1, [])]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise JSONBoundsError(f"the string at {_where(path)} holds a lone surrogate (not valid Unicode)")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > max_depth:
            raise JSONBoundsError(
                f"nested deeper than {max_depth} levels at {_where(path)} (the limit is {LIMITS['json_depth'].env})"
            )
        if isinstance(value, dict):
            for k, v in value.items():
                if _SURROGATE.search(k):
                    raise JSONBoundsError(f"a key at {_where(path)} holds a lone surrogate (not valid Unicode)")
                stack.append((v, depth + 1, [*path, k[:40]]))
        else:
            stack.extend((v, depth + 1, [*path, i]) for i, v in enumerate(value))


def loads_json(text: str | bytes, finite: bool = False) -> Any:
    """``json.loads`` with the bounds of the module docstring; a :class:`ValueError` (``JSONDecodeError``,
    ``UnicodeDecodeError`` or :class:`JSONBoundsError`) for anything it refuses.

    ``finite``: refuse ``NaN``, ``Infinity`` and numbers beyond the float range too (request bodies). Files keep
    them: the project writes them itself (``json.dump`` of an unjudged candidate's FID, ``inf``), and each
    record's own checks say where a non-finite number is wrong.
    """
    max_depth = limit("json_depth")
    hooks = {"parse_float": _parse_float, "parse_constant": _parse_constant} if finite else {}
    try:
        data = json.loads(text, parse_int=_parse_int, **hooks)
    except RecursionError:
        raise JSONBoundsError(
            f"nested deeper than {max_depth} levels (the limit is {LIMITS['json_depth'].env})"
        ) from None
    _check_tree(data, max_depth)
    return data


def read_json(path: str | Path, error: type = Error, fix: str = "") -> Any:
    """The JSON in the file ``path``, bounded as :func:`loads_json`; ``error`` (one line naming the file and ``fix``)
    when it is too large or not bounded JSON. An ``OSError`` (missing, unreadable) is the caller's to word."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit("json_bytes"):
            raise error(
                f"{path} is {size:,} bytes, above the limit of {limit('json_bytes'):,} bytes for a JSON file "
                f"({LIMITS['json_bytes'].env} raises it){tail}"
            )
        raw = f.read()
    try:
        return loads_json(raw)
    except ValueError as e:
        raise error(f"{path} is not valid JSON ({one_line(e)}){tail}") from None


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


M = TypeVar("M")


def validate(schema: type[M], data: Any, source: str, error: type = Error, fix: str = "") -> M:
    """``data`` as the pydantic model ``schema`` (strict), or ``error``: one line with ``source``, the first bad
    field and why."""
    import pydantic

    try:
        return schema.model_validate(data, strict=True)
    except pydantic.ValidationError as e:
        raise error(describe(e, source) + (f"; {fix}" if fix else "")) from None


def describe(e, source: str) -> str:
    """pydantic's first error as ``source: field a.b[2] ...: why`` (and how many more)."""
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = [p for p in first["loc"] if not _is_branch(p)]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "the record"
    value = first.get("input")
    shown = _show(value) if first["type"] != "missing" else None
    more = f" ({len(errors) - 1} more)" if len(errors) > 1 else ""
    got = f" (got {shown})" if shown is not None else ""
    return f"{source}: field {field!r}: {first['msg']}{got}{more}"


_TYPE_NAMES = {"int", "float", "str", "bool", "none", "list", "dict", "tuple", "is-instance"}


def _is_branch(part) -> bool:
    """A union member's tag in an error location (``list[int]``, ``int``, ``function-after[...]``), not a field."""
    return isinstance(part, str) and (
        "[" in part or part in _TYPE_NAMES or part.startswith(("function-", "lax-or-strict"))
    )


def _show(value) -> Optional[str]:
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {type(value).__name__} {tuple(value.shape)} {value.dtype}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------ schemas, one per format
@defer_interrupts
def _schemas():
    """The pydantic models, built on first use (pydantic and torch load only when a record is read)."""
    if "ADMConfig" in globals():
        return
    from pydantic import BaseModel, ConfigDict

    class Closed(BaseModel):  # every float finite (sizes and rates; a NaN is never what a file means there)
        model_config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True, allow_inf_nan=False)

    class Open(BaseModel):  # third-party configs (diffusers) carry keys we do not use
        model_config = ConfigDict(extra="allow", strict=True, arbitrary_types_allowed=True, allow_inf_nan=False)

    models = {**_training_schemas(Closed), **_diffusers_schemas(Open), **_file_key_schemas(Closed)}
    # ADMConfig last: its presence says every model is there (another thread may be asking at the same time)
    globals().update({k: v for k, v in models.items() if k != "ADMConfig"})
    globals()["ADMConfig"] = models["ADMConfig"]


def _training_schemas(Closed) -> dict:
    """The embedded model's records: its UNet config, diffusion settings, checkpoint and training state."""
    from typing import Literal, Union

    import torch
    from pydantic import ConfigDict, Field

    Positive = Field(ge=1)
    Ints = Union[list[int], tuple[int, ...]]
    Tensors = dict[str, torch.Tensor]

    class ADMConfig(Closed):  # the ADMUNet keyword arguments
        image_size: int = Positive
        in_channels: int = Positive
        model_channels: int = Positive
        out_channels: int = Positive
        num_res_blocks: int = Positive
        attention_resolutions: Ints
        dropout: float = Field(0.0, ge=0, le=1)
        channel_mult: Union[list[Union[int, float]], tuple[Union[int, float], ...]] = (1, 2, 4, 8)
        conv_resample: bool = True
        dims: Literal[2] = 2
        num_classes: Optional[int] = Field(None, ge=1)
        use_checkpoint: bool = False
        use_fp16: bool = False
        num_heads: int = Field(1, ge=1)
        num_head_channels: int = Field(-1, ge=-1)
        num_heads_upsample: int = Field(-1, ge=-1)
        use_scale_shift_norm: bool = False
        resblock_updown: bool = False
        use_new_attention_order: bool = False

    class DiffusionSettings(Closed):
        noise_schedule: str
        diffusion_steps: int = Field(1000, ge=1)
        learn_sigma: bool = False
        scheduler: Optional[dict] = None

    class CheckpointRecord(Closed):  # what 'autodiffusion-rt train' writes
        format: Literal[1]
        name: str
        config: ADMConfig
        diffusion: DiffusionSettings
        state_dict: Tensors
        training: dict = {}

    class TrainState(Closed):  # the resumable training state
        format: Literal[1]
        settings: dict
        step: int = Field(ge=0)
        seconds: float = Field(ge=0)
        model: Tensors
        ema: Tensors
        optimizer: dict
        lr_schedule: dict
        generator: torch.Tensor
        torch_rng: torch.Tensor
        losses: list[float]  # a diverged run's NaN losses are its record, not damage
        history: list[dict]

        model_config = ConfigDict(allow_inf_nan=True)

    return {m.__name__: m for m in (ADMConfig, DiffusionSettings, CheckpointRecord, TrainState)}


def _diffusers_schemas(Open) -> dict:
    """The keys of diffusers' config files this project reads (others are allowed and kept)."""
    from typing import Union

    from pydantic import Field

    Ints = Union[list[int], tuple[int, ...]]

    class DiffusersUNetConfig(Open):  # the keys of a UNet2DModel config.json this project reads or sizes by
        sample_size: Union[int, list[int]] = 32
        in_channels: int = Field(3, ge=1)
        out_channels: int = Field(3, ge=1)
        block_out_channels: Ints = (64,)
        layers_per_block: int = Field(2, ge=1)
        down_block_types: Union[list[str], tuple[str, ...]] = ()
        up_block_types: Union[list[str], tuple[str, ...]] = ()
        mid_block_type: Optional[str] = "UNetMidBlock2D"
        norm_num_groups: Optional[int] = Field(32, ge=1)
        attention_head_dim: Optional[int] = Field(8, ge=1)

    class SchedulerConfig(Open):
        num_train_timesteps: int = Field(1000, ge=2)
        beta_start: float = Field(0.0001, gt=0, lt=1)
        beta_end: float = Field(0.02, gt=0, lt=1)
        beta_schedule: str = "linear"
        trained_betas: Optional[list[float]] = None
        prediction_type: str = "epsilon"
        rescale_betas_zero_snr: bool = False

    return {m.__name__: m for m in (DiffusersUNetConfig, SchedulerConfig)}


def _file_key_schemas(Closed) -> dict:
    """The records that name what a file was made from: a statistics file's key, a manifest's model."""
    from pydantic import Field

    class StatsKeyRecord(Closed):  # the key of a reference statistics file (metrics.stats)
        dataset: str
        extractor: str
        preprocessing: str
        fingerprint: str

    class ManifestModel(Closed):  # a manifest's "model"
        spec: str
        name: str
        fingerprint: str
        image_shape: list[int] = Field(min_length=3, max_length=3)
        num_classes: Optional[int] = Field(ge=1)
        learn_sigma: bool
        prediction_type: str

    return {m.__name__: m for m in (StatsKeyRecord, ManifestModel)}


def schema(name: str):
    """The pydantic model of one format: ADMConfig, DiffusionSettings, CheckpointRecord, TrainState,
    DiffusersUNetConfig, SchedulerConfig, ManifestModel, StatsKeyRecord."""
    _schemas()
    return globals()[name]
