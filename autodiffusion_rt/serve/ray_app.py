"""The same service as a Ray Serve application: ``autodiffusion-rt serve --ray``.

One definition of the API: each replica is a :class:`SampleReplica` whose
Serve ingress is the ASGI app :func:`~autodiffusion_rt.serve.app.create_app`
builds for the single-process server (same routes, request parsing, error
bodies, headers, status codes and Prometheus names). What Ray adds is around it:

- **replicas**: each loads the engine dirs itself (a path every node can read)
  and warms them up in its constructor, so Ray routes no request to it before
  it is ready; each batches its own requests with the same
  :class:`~autodiffusion_rt.serve.batcher.Batcher` (one thread per plan);
- **backpressure stays ours**: a replica accepts up to ``max_ongoing_requests``
  at once, set above what its own queue bound admits, so a full queue answers
  our 429 JSON with Retry-After instead of Ray's proxy queueing (or its 503);
- **errors Ray makes itself** (a replica that died with requests in flight, a
  proxy timeout, no replica available) reach the client as our JSON error body,
  through :class:`RayErrorsAsJSON` on the proxy;
- **shutdown**: ``serve.shutdown()`` (SIGTERM or Ctrl-C in the command) lets
  each replica finish its in-flight requests, then its batchers drain.

``/metrics`` is per replica: the replica that answers the scrape reports its own
counters (the response's ``X-Replica`` header names it). Ray's own metrics
(``ray_serve_*``: requests, latency, queue lengths and replica counts per
deployment, aggregated by Ray) are on each node's Ray metrics endpoint and the
Ray dashboard.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import Error
from .app import ServeSettings, ServeState, create_app

__all__ = [
    "APP_NAME",
    "RayErrorsAsJSON",
    "RaySettings",
    "RaySettingsError",
    "build_application",
    "default_replica_threads",
    "proxy_middlewares",
    "run_ray",
    "start_serve",
]

log = logging.getLogger("autodiffusion_rt.serve")

APP_NAME = "autodiffusion-rt"
DEPLOYMENT_NAME = "SampleReplica"


class RaySettingsError(Error):
    """A --ray option out of range (replicas, autoscaling bounds, address)."""


def default_replica_threads(replicas: int, cpus: Optional[int] = None) -> int:
    """Engine threads per replica so that ``replicas`` replicas on one machine do not oversubscribe its cores."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, replicas))


@dataclass(frozen=True)
class RaySettings:
    """What ``serve --ray`` adds: the cluster, the replicas, and the HTTP proxy's address."""

    address: Optional[str] = None  # None: start a local Ray; "auto" or "ray://HOST:PORT": join a cluster
    replicas: int = 1  # fixed number of replicas, unless autoscaling bounds are given
    min_replicas: Optional[int] = None  # autoscaling bounds (both or neither)
    max_replicas: Optional[int] = None
    target_ongoing: float = 16.0  # autoscaling: requests in flight per replica that Ray aims for
    host: str = "127.0.0.1"  # Ray's HTTP proxy
    port: int = 8000

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def check(self) -> "RaySettings":
        if self.address is not None and self.address != "auto" and not self.address.startswith("ray://"):
            raise RaySettingsError(
                f"--ray-address {self.address!r}: give auto (the cluster this machine is part of) "
                "or ray://HOST:PORT (a Ray client server)"
            )
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise RaySettingsError(f"--replicas={self.replicas!r} must be a positive integer")
        if self.autoscaling:
            lo, hi = self.min_replicas, self.max_replicas
            if lo is None or hi is None or lo < 0 or hi < 1 or lo > hi:
                raise RaySettingsError(
                    f"--min-replicas={lo} and --max-replicas={hi}: give both, with 0 <= min <= max and max >= 1"
                )
            if self.target_ongoing <= 0:
                raise RaySettingsError(
                    f"--target-ongoing={self.target_ongoing} must be > 0 (requests in flight per replica)"
                )
        return self

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.autoscaling else self.replicas


def max_ongoing_requests(settings: ServeSettings) -> int:
    """Requests Ray lets into one replica at once: more than its queue bound admits (at least one image each)
    plus a running batch and the requests being parsed or encoded, so the replica's own check answers 429 first."""
    return 2 * (settings.queue_images + settings.max_batch) + 16


class RayErrorsAsJSON:
    """ASGI middleware on Ray's HTTP proxy: the errors Ray answers itself get our JSON error body.

    Ray's proxy answers its own timeouts with 408 and "no replica" with 503, as
    text; for a request whose replica died in flight it sends nothing, and the
    proxy's uvicorn then answers a bare text 500. Our replicas' answers are JSON
    already (and pass through untouched); a non-JSON error is rewritten, keeping
    its status, and a request the proxy left unanswered gets 503 with Retry-After:
    retrying is the right thing to do, Ray is replacing the replica.
    """

    def __init__(self, app, max_in_flight: int = 0):
        self.app = app
        self.max_in_flight = max_in_flight  # 0: no check here (the replicas' queues still answer 429)
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.max_in_flight and scope["method"] == "POST" and scope["path"] == "/v1/samples":
            if self.in_flight >= self.max_in_flight:
                # Our check in front: when the replicas hold all they admit, a 429 from here costs no RPC to a
                # replica whose cores run the engines, so it still answers within milliseconds.
                return await _send_error(send, 429, "")
            self.in_flight += 1
            try:
                return await self._answer(scope, receive, send)
            finally:
                self.in_flight -= 1
        return await self._answer(scope, receive, send)

    async def _answer(self, scope, receive, send):
        held = {}

        async def send_json_errors(message):
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if message["status"] >= 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                    held["start"] = message
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                if message.get("more_body"):
                    held.setdefault("body", b"")
                    held["body"] += message.get("body", b"")
                    return
                status = held["start"]["status"]
                text = (held.get("body", b"") + message.get("body", b"")).decode("utf-8", "replace").strip()
                return await _send_error(send, status, text)
            await send(message)

        async def send_json_errors_noting_start(message):
            if message["type"] == "http.response.start":
                held["started"] = True
            await send_json_errors(message)

        try:
            await self.app(scope, receive, send_json_errors_noting_start)
        except Exception as e:  # the proxy failed the request: the client still gets an answer
            if held.get("started"):
                raise
            log.warning("Ray's proxy failed a request: %s: %s", type(e).__name__, e)
        if not held.get("started"):
            await _send_error(send, 500, "")


async def _send_error(send, status: int, text: str) -> None:
    import json

    headers = {}
    if status == 500:
        status, headers = 503, {"retry-after": "1"}
        message = (
            "the replica answering this request failed or died before it answered (Ray Serve replaces it): "
            f"retry; Ray said: {text or 'Internal Server Error'}"
        )
    elif status == 408:
        message = f"no answer within the proxy's request timeout: retry later ({text})"
    elif status == 429:
        headers = {"retry-after": "1"}
        message = (
            "every replica's queue is full (the proxy's bound on requests in flight): "
            "retry after the Retry-After seconds"
        )
    elif status == 503:
        headers = {"retry-after": "1"}
        message = f"no replica can take the request now (starting, replaced or overloaded): retry ({text})"
    else:
        message = text or f"HTTP {status}"
    body = json.dumps({"error": {"field": None, "message": message}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _replica_class():
    """The deployment class (ray imported only here: the package imports without ray)."""
    from ray import serve

    @serve.ingress()
    class SampleReplica:
        """One replica: loads and warms the engine dirs in its constructor, then serves the app over them."""

        def __init__(self, engines: dict, settings: ServeSettings):
            if settings.threads:
                import torch

                torch.set_num_threads(settings.threads)
            try:
                ctx = serve.get_replica_context()
                replica = f"{ctx.replica_id.unique_id}@{os.uname().nodename}"
            except Exception:  # outside a replica (never in Serve): the process is the replica
                replica = f"{os.getpid()}@{os.uname().nodename}"
            self.state = ServeState({name: Path(d) for name, d in engines.items()}, settings, replica=replica)
            self.state.load()  # Ray sends no request before the constructor returns: warm first

        def __serve_build_asgi_app__(self):
            return create_app(self.state, load_on_startup=False)

    return SampleReplica


def build_application(engines: dict, settings: ServeSettings, ray_settings: RaySettings):
    """The bound Serve application: ``serve.run(build_application(...))`` deploys it."""
    from ray import serve

    settings, ray_settings = settings.check(), ray_settings.check()
    threads = settings.threads or 1
    options = dict(
        name=DEPLOYMENT_NAME,
        max_ongoing_requests=max_ongoing_requests(settings),
        # a replica being stopped finishes what it has: a request waits at most deadline_s for its batch to start
        graceful_shutdown_timeout_s=settings.deadline_s + 10,
        graceful_shutdown_wait_loop_s=0.5,
        # Ray only schedules what fits: each replica claims the cores its engines use
        ray_actor_options={
            "num_cpus": threads,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}},
        },
        # a replica warms up before its constructor returns; a big plan on a busy node takes a while
        health_check_timeout_s=60,
    )
    if ray_settings.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": ray_settings.min_replicas,
            "max_replicas": ray_settings.max_replicas,
            "initial_replicas": max(1, ray_settings.min_replicas),
            "target_ongoing_requests": ray_settings.target_ongoing,
        }
    else:
        options["num_replicas"] = ray_settings.replicas
    deployment = serve.deployment(**options)(_replica_class())
    return deployment.bind({name: str(Path(d).resolve()) for name, d in engines.items()}, settings)


# Ray's proxies read this when they start (in their own processes): set it before Ray starts, or in the
# environment of `ray start` on every node of a cluster. It returns the proxy's middlewares.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "autodiffusion_rt.serve.ray_app.proxy_middlewares"
#: The proxy's bound on /v1/samples requests in flight (set by ``serve --ray`` for the Ray it starts; unset: none).
PROXY_IN_FLIGHT_ENV = "AUTODIFFUSION_RT_PROXY_MAX_IN_FLIGHT"


def proxy_middlewares() -> list:
    """The middlewares of Ray's HTTP proxy (named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    text = os.environ.get(PROXY_IN_FLIGHT_ENV) or "0"
    bound = int(text) if text.isdigit() else 0
    if not text.isdigit():  # the proxy must start whatever the variable holds: say so and serve without the bound
        log.warning("%s=%r is not a count of requests: the proxy answers no 429 of its own", PROXY_IN_FLIGHT_ENV, text)
    return [Middleware(RayErrorsAsJSON, max_in_flight=bound)]


def proxy_in_flight_bound(settings: ServeSettings, ray_settings: RaySettings) -> int:
    """Requests one proxy lets in at once: as many one-image requests as the most replicas' queues hold, which
    keeps every replica's engines busy (a batch running, more queued); beyond it the proxy answers 429 itself,
    before Ray's router sends one to a replica whose queue happens to be full while another's is not."""
    return ray_settings.most_replicas * settings.queue_images


def start_serve(settings: ServeSettings, ray_settings: RaySettings) -> None:
    """Start Serve's controller and HTTP proxy on the connected Ray."""
    from ray import serve

    serve.start(
        http_options={
            "host": ray_settings.host,
            "port": ray_settings.port,
            # nothing waits forever in Ray's router (e.g. while every replica is being replaced)
            "request_timeout_s": settings.deadline_s + 10,
        }
    )


def run_ray(engines: dict, settings: ServeSettings, ray_settings: RaySettings, *, log_level: str = "info") -> int:
    """``serve --ray``: connect to (or start) Ray, deploy, serve until SIGTERM / Ctrl-C, then drain and shut down."""
    import ray
    from ray import serve

    ray_settings.check()
    if not ray.is_initialized():
        if ray_settings.address is None:
            os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
            os.environ.setdefault(PROXY_IN_FLIGHT_ENV, str(proxy_in_flight_bound(settings, ray_settings)))
        # address=None would join a cluster someone started on this machine (`ray start`), whose processes
        # have neither our environment nor our proxy middleware: "local" always starts our own
        env = {"OMP_NUM_THREADS": str(settings.threads or 1)}
        if os.environ.get("PYTHONPATH"):  # Ray's workers (the proxy's too) import this package as the command does
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        ray.init(
            address=ray_settings.address or "local", logging_level=log_level.upper(), runtime_env={"env_vars": env}
        )
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        start_serve(settings, ray_settings)
        try:
            serve.run(build_application(engines, settings, ray_settings), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica that cannot load its engines: Ray gives up after a few tries
            from ..errors import EngineError

            raise EngineError(f"the Ray Serve application did not start: {str(e).splitlines()[0]}") from None
        replicas = (
            f"{ray_settings.min_replicas}-{ray_settings.max_replicas}"
            if ray_settings.autoscaling
            else ray_settings.replicas
        )
        log.info(
            "serving %s on http://%s:%d with %s replica(s) of %d thread(s)",
            ", ".join(engines),
            ray_settings.host,
            ray_settings.port,
            replicas,
            settings.threads or 1,
        )
        while not stop.wait(1.0):
            pass
        log.info("shutting down: replicas finish their in-flight requests, then drain their queues")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            # the application first, the proxies still up: each replica finishes its in-flight requests (and
            # drains its queue) and they reach their clients; new requests get a JSON 404 meanwhile
            serve.delete(APP_NAME)
        finally:
            if ray_settings.address is None:  # our own Ray: all of it goes (a shared cluster keeps Serve)
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
    return 0
