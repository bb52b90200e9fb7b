"""The sampling service: ``autodiffusion-rt serve --engines DIR``.

FastAPI + uvicorn in front of one :class:`~autodiffusion_rt.serve.batcher.Batcher`
per served engine dir (a thread, the one consumer of that plan's engines), with
Prometheus metrics. ``POST /v1/samples`` takes ``{"n", "seed"?, "labels"?,
"format": "png"|"npy", "plan"?}``; concurrent requests for one plan are merged
into one batch with :meth:`Runtime.sample_requests`, so every request gets
exactly the images ``Runtime.sample(n, seed, labels)`` gives alone.

fastapi, uvicorn and prometheus-client are the ``serve`` extra
(``pip install autodiffusion-rt[serve]``); nothing here imports them until a
server is built, so the package imports without them.
"""

from .schemas import FORMATS, Limits, RequestError, SampleRequest, parse_sample_request

__all__ = ["FORMATS", "Limits", "RequestError", "SampleRequest", "parse_sample_request"]
