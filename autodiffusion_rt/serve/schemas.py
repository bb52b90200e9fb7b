"""The ``POST /v1/samples`` request: parsed and checked by hand, field by field.

Every refusal is a :class:`RequestError` naming the field and what is allowed;
the app turns it into ``{"error": {"field": ..., "message": ...}}`` with its
status. Types are strict (JSON has one number type, so ``1.0``, ``1.5``,
``"3"`` and ``true`` are not an ``n``); seeds follow
:func:`autodiffusion_rt.diffusion.check_seed` (integers in [0, 2^63)).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Mapping, Optional

from ..errors import Error, SamplingError

__all__ = ["FIELDS", "FORMATS", "Limits", "RequestError", "SampleRequest", "parse_sample_request"]

FORMATS = ("png", "npy")
FIELDS = ("n", "seed", "labels", "format", "plan")


class RequestError(Error):
    """A request the service refuses: an HTTP status, the field at fault, and what is allowed."""

    def __init__(self, status: int, field: Optional[str], message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


@dataclass(frozen=True)
class Limits:
    """Per-request limits: images per request, bytes per request body."""

    max_n: int = 64
    max_body_bytes: int = 64 * 1024


@dataclass(frozen=True)
class SampleRequest:
    n: int
    seed: int
    labels: Optional[list[int]]
    format: str
    plan: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number with a fraction",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def parse_sample_request(
    body: bytes, plans: Mapping[str, Optional[int]], default_plan: str, limits: Limits
) -> SampleRequest:
    """``body`` (JSON bytes) -> a checked request. ``plans``: served plan name -> its number of classes
    (None: unconditional)."""
    from ..records import loads_json, one_line

    try:
        data = loads_json(body, finite=True)  # bounded: depth, integer digits, finite numbers, valid Unicode
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, JSONBoundsError
        raise RequestError(
            400,
            "body",
            f'the body is not valid JSON ({one_line(e)[:200]}): send an object like {{"n": 4, "format": "png"}}',
        ) from None
    if not isinstance(data, dict):
        raise RequestError(
            422, "body", f"the body must be a JSON object with fields {', '.join(FIELDS)}, got {_kind(data)}"
        )
    extra = sorted(set(data) - set(FIELDS))
    if extra:
        raise RequestError(422, extra[0], f"unknown field {extra[0]!r}: the allowed fields are {', '.join(FIELDS)}")

    if "n" not in data:
        raise RequestError(422, "n", f"n is required: the number of images, an integer in [1, {limits.max_n}]")
    n = data["n"]
    if not _is_int(n):
        raise RequestError(422, "n", f"n must be an integer in [1, {limits.max_n}], got {_kind(n)} ({json.dumps(n)})")
    if not 1 <= n <= limits.max_n:
        raise RequestError(
            422, "n", f"n={n} is outside [1, {limits.max_n}]: ask for at most {limits.max_n} images per request"
        )

    from ..diffusion.noise import MAX_SEED, check_seed  # here, not at the top: `serve --help` imports no torch

    seed = data.get("seed")
    if seed is not None:
        try:
            seed = check_seed(seed)
        except SamplingError as e:
            raise RequestError(422, "seed", str(e)) from None
    else:
        seed = secrets.randbelow(MAX_SEED)

    fmt = data.get("format", "png")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise RequestError(422, "format", f"format={json.dumps(fmt)} is not one of {', '.join(map(repr, FORMATS))}")

    plan = data.get("plan")
    if plan is None:
        plan = default_plan
    if not isinstance(plan, str) or plan not in plans:
        raise RequestError(
            422, "plan", f"unknown plan {json.dumps(plan)}: this server serves {', '.join(map(repr, plans))}"
        )

    labels = data.get("labels")
    num_classes = plans[plan]
    if labels is not None:
        if num_classes is None:
            raise RequestError(422, "labels", f"plan {plan!r} is unconditional: it takes no labels (drop the field)")
        if not isinstance(labels, list) or not all(_is_int(v) for v in labels):
            raise RequestError(
                422,
                "labels",
                f"labels must be a list of n integers in [0, {num_classes}), got {_kind(labels)}"
                + ("" if not isinstance(labels, list) else " with a non-integer item"),
            )
        if len(labels) != n:
            raise RequestError(422, "labels", f"got {len(labels)} labels for n={n}: give one label per image")
        bad = [v for v in labels if not 0 <= v < num_classes]
        if bad:
            raise RequestError(
                422, "labels", f"label {bad[0]} is out of range: plan {plan!r} has classes 0..{num_classes - 1}"
            )
    return SampleRequest(n=n, seed=seed, labels=labels, format=fmt, plan=plan)
