"""The FastAPI app: routes, error bodies, request metrics, engine loading and draining.

Routes: ``POST /v1/samples``, ``GET /healthz`` (alive), ``GET /readyz`` (503
until every engine dir is loaded and warmed), ``GET /metrics`` (Prometheus).
Every refusal is ``{"error": {"field": ..., "message": ...}}`` with a 4xx (or
503 while loading / shutting down).

Engines load in a background thread once the server is up, so ``/healthz``
answers during a long load and ``/readyz`` tells a load balancer when to send
traffic. On shutdown (uvicorn has stopped accepting and finished the requests
in flight) every batcher drains its queue and the runtimes are closed.

(No ``from __future__ import annotations`` here: FastAPI reads the handlers'
annotations, and ``Request`` is imported lazily inside :func:`_add_sample_route`.)
"""

import asyncio
import concurrent.futures
import io
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import EngineError, Error
from .metrics import ROUTES, ServeMetrics
from .schemas import Limits, RequestError, parse_sample_request

__all__ = ["ServeSettings", "ServeSettingsError", "ServeState", "create_app", "engine_specs"]

log = logging.getLogger("autodiffusion_rt.serve")

MAX_DEADLINE_S = 86400.0  # a day: beyond it a "deadline" is a typo (and asyncio/threading timeouts overflow near 1e9 s)
MAX_BODY_BYTES = 1 << 20  # the request is a few fields: a MiB is generous


class ServeSettingsError(Error):
    """A server option out of range (max batch, queue bound, limits)."""


@dataclass(frozen=True)
class ServeSettings:
    """What ``autodiffusion-rt serve`` takes beyond the engine dirs (see its --help)."""

    max_batch: int = 32  # images per engine batch
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for others to merge with
    queue_images: int = 128  # images that may wait per plan before 429
    deadline_s: float = 30.0  # per request: 504 (and dropped if not started) past this
    limits: Limits = field(default_factory=Limits)
    backend: str = "auto"
    threads: Optional[int] = 1  # onnxruntime intra-op threads per engine
    # onnxruntime's workers spin between ops while a batch runs; off (the default), they sleep and leave the
    # cores to the event loop, the load's other processes and other replicas: measured with 2 threads on a busy
    # 2-core machine, spinning cost 28 CPU ms per image against 17 without (README "Scaling out")
    spinning: bool = False

    def check(self) -> "ServeSettings":
        """Every setting typed and in range (one line naming the option), before anything is loaded."""
        import math

        from ..limits import check_limit

        def positive_int(name: str, option: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ServeSettingsError(f"{option} {v!r} must be a positive integer")
            return v

        check_limit("batch", positive_int("max_batch", "--max-batch"), "--max-batch", error=ServeSettingsError)
        positive_int("queue_images", "--queue-images")
        if self.threads is not None:
            positive_int("threads", "--threads")
        for name, option in (("deadline_s", "--deadline-s"), ("max_wait_ms", "--max-wait-ms")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                unit = "seconds" if name == "deadline_s" else "ms"
                raise ServeSettingsError(f"{option} {v!r} must be a finite number of {unit}")
        if not 0 < self.deadline_s <= MAX_DEADLINE_S:
            raise ServeSettingsError(f"--deadline-s {self.deadline_s:g} must be in (0, {MAX_DEADLINE_S:g}] seconds")
        if not 0 <= self.max_wait_ms <= 1e3 * MAX_DEADLINE_S:
            raise ServeSettingsError(
                f"--max-wait-ms {self.max_wait_ms:g} must be in [0, {1e3 * MAX_DEADLINE_S:g}] ms (0: run at once)"
            )
        if isinstance(self.limits.max_n, bool) or not isinstance(self.limits.max_n, int) or self.limits.max_n < 1:
            raise ServeSettingsError(f"--max-n {self.limits.max_n!r} must be a positive integer")
        check_limit("batch", self.limits.max_n, "--max-n", error=ServeSettingsError)  # one answer holds all its images
        if (
            isinstance(self.limits.max_body_bytes, bool)
            or not isinstance(self.limits.max_body_bytes, int)
            or not 1 <= self.limits.max_body_bytes <= MAX_BODY_BYTES
        ):
            raise ServeSettingsError(
                f"--max-body-bytes {self.limits.max_body_bytes!r} must be an integer in [1, {MAX_BODY_BYTES}]"
            )
        if self.limits.max_n > self.queue_images:
            raise ServeSettingsError(
                f"max_n={self.limits.max_n} is larger than queue_images={self.queue_images}: "
                "such a request could never be queued; raise queue_images or lower max_n"
            )
        return self


def engine_specs(items) -> dict[str, Path]:
    """``["DIR", "NAME=DIR", ...]`` -> ``{name: dir}`` (a bare DIR is named after its folder); names must differ."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep:
            name, path = Path(item).resolve().name, item
        if not name or not path:
            raise EngineError(f"--engines {item!r}: give DIR or NAME=DIR")
        if name in out:
            raise EngineError(
                f"--engines: the name {name!r} is given twice ({out[name]} and {path}): name them NAME=DIR"
            )
        out[name] = Path(path)
    if not out:
        raise EngineError("no engine dir given: pass --engines DIR (built by 'autodiffusion-rt build')")
    return out


#: How much lower the engines' threads run than the HTTP side (Linux nice levels, inherited by the threads they start).
ENGINE_NICENESS = 10


def _lower_thread_priority() -> None:
    """Lower the calling thread's CPU priority by ENGINE_NICENESS (a thread may always lower its own)."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + ENGINE_NICENESS))
    except (AttributeError, OSError):  # not Linux/Unix, or refused: run at the same priority
        pass


class ServeState:
    """The served plans: manifests read at once, runtimes loaded and warmed by :meth:`load`."""

    def __init__(
        self,
        engines: dict[str, Path],
        settings: ServeSettings,
        *,
        runtime_loader: Optional[Callable] = None,
        replica: Optional[str] = None,
    ):
        from ..runtime import Manifest

        self.settings = settings.check()
        self.engines = dict(engines)
        self.default_plan = next(iter(self.engines))
        # The manifests alone say which plans are conditional, so requests can be checked while loading.
        manifests = {name: Manifest.read(d) for name, d in self.engines.items()}
        self.num_classes = {name: m["model"].get("num_classes") for name, m in manifests.items()}
        self.metrics = ServeMetrics()
        self.runtimes: dict = {}
        self.batchers: dict = {}
        self.ready = threading.Event()
        self.load_error: Optional[str] = None
        self._runtime_loader = runtime_loader
        self._closed = False
        # which server answered (the X-Replica header): several replicas serve one URL under Ray Serve
        self.replica = replica or f"{os.getpid()}@{os.uname().nodename}"

    def _load_runtime(self, d: Path):
        from ..runtime import Runtime

        if self._runtime_loader is not None:
            return self._runtime_loader(d)
        s = self.settings
        return Runtime.load(d, backend=s.backend, threads=s.threads, spinning=s.spinning)

    def load(self) -> None:
        """Load every engine dir, warm it (the largest batch and a single image), start its batcher; then ready.

        The work runs in a thread of lower CPU priority (:data:`ENGINE_NICENESS`), and so do the threads it starts
        (the batchers, onnxruntime's and OpenVINO's workers inherit it): when the cores are saturated, the HTTP
        side (our event loop, Ray's proxy) still answers at once, so a 429 stays fast; idle cores still go to the
        engines.
        """
        with concurrent.futures.ThreadPoolExecutor(1, "engine-loader", _lower_thread_priority) as pool:
            pool.submit(self._load_engines).result()

    def _load_engines(self) -> None:
        from .batcher import Batcher

        try:
            for name, d in self.engines.items():
                if self._closed:  # shutting down: load nothing more
                    return
                start = time.perf_counter()
                rt = self._load_runtime(d)
                self.runtimes[name] = rt
                batch = min(self.settings.max_batch, rt.max_batch or self.settings.max_batch)
                rt.sample_requests([(batch, 0, None)])  # first runs allocate: not on a user's clock
                rt.sample_requests([(1, 0, None)])
                if self._closed:  # shutting down while loading: stop here (close() releases what was loaded)
                    return
                batcher = Batcher(
                    name,
                    rt,
                    max_batch=self.settings.max_batch,
                    max_wait_s=self.settings.max_wait_ms / 1e3,
                    queue_images=self.settings.queue_images,
                    metrics=self.metrics,
                )
                self.batchers[name] = batcher.start()
                batcher.wait_warm()  # ready means a batch can run: the batcher's own thread has run one
                log.info("plan %s: %s loaded and warmed in %.1f s", name, rt, time.perf_counter() - start)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, Error) else str(e)
            log.error("loading the engines failed: %s", self.load_error)
            raise
        if not self._closed:
            self.ready.set()

    def serving(self) -> Optional[str]:
        """None when every plan can run a batch now; else why not (loading, a failed load, a dead batcher)."""
        if self.load_error:
            return f"loading the engines failed: {self.load_error}"
        if not self.ready.is_set():
            return "the engines are loading and warming up"
        dead = [b for b in self.batchers.values() if not b.serving]
        if dead:
            why = dead[0].error or "its thread is not running"
            return f"the batcher of plan {dead[0].name!r} stopped ({why}): restart the service"
        return None

    def close(self, loader: Optional[threading.Thread] = None) -> None:
        """Drain every batcher (queued requests still run), then release the engines.

        ``loader``: the thread running :meth:`load`, waited for first. A process that exits while
        onnxruntime is still creating a session in another thread aborts in C++ (``terminate called
        without an active exception``, exit 134); loading stops after the engine in progress.
        """
        if self._closed:
            return
        self._closed = True
        if loader is not None and loader.is_alive():
            log.info("waiting for the engine being loaded before shutting down")
            loader.join()
        for b in self.batchers.values():
            b.close()
        for rt in self.runtimes.values():
            rt.close()


def _error(e: RequestError):
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _encode(images, labels, fmt: str) -> tuple[bytes, str]:
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, images.numpy().astype(np.float32, copy=False))
        return buf.getvalue(), "application/x-npy"
    from PIL import Image

    from ..data import image_grid

    buf = io.BytesIO()
    Image.fromarray(image_grid(images)).save(buf, format="PNG")
    return buf.getvalue(), "image/png"


class _Metered:
    """ASGI middleware: count every HTTP response by route and status, time it, and name the replica (X-Replica)."""

    def __init__(self, app, metrics: ServeMetrics, replica: str):
        self.app = app
        self.metrics = metrics
        self.replica_header = (b"x-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), self.replica_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route, str(status)).observe(time.perf_counter() - start)


def create_app(state: ServeState, *, load_on_startup: bool = True, on_load_error: Optional[Callable] = None):
    """The FastAPI app over ``state``. ``load_on_startup``: start :meth:`ServeState.load` in a thread at startup."""
    from fastapi import FastAPI

    lifespan = _lifespan(state, load_on_startup, on_load_error)
    app = FastAPI(title="autodiffusion-rt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    _add_error_handlers(app)
    _add_status_routes(app, state)
    _add_sample_route(app, state)
    return _Metered(app, state.metrics, state.replica)


def _lifespan(state: ServeState, load_on_startup: bool, on_load_error: Optional[Callable]):
    """Startup: load the engines in a thread (``/healthz`` answers meanwhile); shutdown: drain and close them."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load_on_startup:

            def load():
                try:
                    state.load()
                except Exception:
                    if on_load_error is not None:
                        on_load_error(state.load_error)

            loader = threading.Thread(target=load, name="engine-loader", daemon=True)
            loader.start()
        else:
            loader = None
        yield
        await asyncio.to_thread(state.close, loader)

    return lifespan


def _add_error_handlers(app) -> None:
    """Every refusal as ``{"error": {"field", "message"}}``: the service's own, unknown routes, malformed requests."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return _error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        field = "path" if e.status_code == 404 else "method" if e.status_code == 405 else None
        allowed = ", ".join(f"{method} {path}" for path, method in ROUTES.items())
        return JSONResponse(
            {"error": {"field": field, "message": f"{e.detail}: this service has {allowed}"}},
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return _error(RequestError(422, None, str(e)))


def _add_status_routes(app, state: ServeState) -> None:
    """``/healthz`` (alive), ``/readyz`` (503 until every plan can run a batch), ``/metrics`` (Prometheus)."""
    from fastapi.responses import JSONResponse, PlainTextResponse

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        message = state.serving()
        if message is None:
            return {"status": "ready", "plans": {n: str(rt) for n, rt in state.runtimes.items()}}
        return JSONResponse(
            {"error": {"field": None, "message": message}}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return PlainTextResponse(body, media_type=content_type)


def _add_sample_route(app, state: ServeState) -> None:
    """``POST /v1/samples``: read the bounded body, queue the request on its plan's batcher, answer by the deadline."""
    from fastapi import Request
    from fastapi.responses import Response

    limits = state.settings.limits

    @app.post("/v1/samples")
    async def samples(request: Request):
        req = parse_sample_request(await _read_body(request, limits), state.num_classes, state.default_plan, limits)
        if not state.ready.is_set():
            raise RequestError(
                503, None, "the engines are still loading: retry when /readyz answers 200", {"Retry-After": "1"}
            )
        if not state.batchers[req.plan].serving:
            raise RequestError(
                503, None, state.serving() or "the service cannot run batches: restart it", {"Retry-After": "1"}
            )
        images, labels = await _run_job(state, req)
        data, media_type = _encode(images, labels, req.format)
        headers = {"X-Seed": str(req.seed), "X-Plan": req.plan, "X-Images": str(req.n)}
        if labels is not None:
            headers["X-Labels"] = ",".join(str(int(v)) for v in labels)
        return Response(data, media_type=media_type, headers=headers)


async def _read_body(request, limits: Limits) -> bytes:
    """The request body, refused (413, or 400 for a bad Content-Length) as soon as it is known to be too long."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
        raise RequestError(
            413 if length.isdigit() else 400,
            "body",
            f"the body is {length} bytes; the limit is {limits.max_body_bytes} bytes",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise RequestError(413, "body", f"the body is over the limit of {limits.max_body_bytes} bytes")
    return bytes(body)


async def _run_job(state: ServeState, req):
    """``(images, labels)`` of ``req`` from its plan's batcher, or 504 past the deadline (dropped if not started)."""
    batcher = state.batchers[req.plan]
    deadline = time.monotonic() + state.settings.deadline_s
    job = batcher.submit(req.n, req.seed, req.labels, deadline)
    waiter = asyncio.wrap_future(job.future)
    try:
        return await asyncio.wait_for(asyncio.shield(waiter), state.settings.deadline_s)
    except asyncio.TimeoutError:
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # its outcome is no one's now
        dropped = batcher.cancel(job)
        raise RequestError(
            504,
            None,
            f"no answer within the deadline of {state.settings.deadline_s:g} s "
            f"({'dropped before it ran' if dropped else 'its batch was already running'}): retry later",
        ) from None
