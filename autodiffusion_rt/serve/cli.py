"""``autodiffusion-rt serve --engines DIR [--engines NAME=DIR ...] [--host 127.0.0.1] [--port 8000] [--ray ...]``.

Registered through ``autodiffusion_rt.cli._PLUGINS``; fastapi and uvicorn are
imported only when the command runs (the ``serve`` extra).
"""

from __future__ import annotations

import argparse

__all__ = ["cmd_serve", "register"]


def register(subparsers) -> argparse.ArgumentParser:
    from .app import ServeSettings
    from .schemas import Limits

    d, lim = ServeSettings(), Limits()
    p = subparsers.add_parser(
        "serve",
        help="serve engine dirs over HTTP (POST /v1/samples) with dynamic batching",
        description="A sampling service: POST /v1/samples {\"n\", \"seed\"?, \"labels\"?, \"format\": \"png\"|\"npy\", \"plan\"?}; "
        "GET /healthz, /readyz, /metrics. Concurrent requests for one plan are merged into engine batches; "
        "each request's images equal 'autodiffusion-rt sample --engines DIR' with the same seed. SIGTERM drains and exits.",
    )
    p.add_argument("--engines", action="append", required=True, metavar="[NAME=]DIR",
                   help="an engine dir from 'autodiffusion-rt build', optionally named (repeatable; the first is the default plan)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images per engine batch (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long a request waits for others to merge with; 0: run at once, and requests arriving "
                   "while a batch runs merge into the next (default: %(default)s)")
    p.add_argument("--queue-images", type=int, default=d.queue_images,
                   help="images that may wait per plan; beyond it requests get 429 (default: %(default)s)")
    p.add_argument("--deadline-s", type=float, default=d.deadline_s,
                   help="per-request deadline: 504 after it, dropped if not started (default: %(default)s)")
    p.add_argument("--max-n", type=int, default=lim.max_n, help="most images in one request (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=lim.max_body_bytes, help="request body limit (default: %(default)s)")
    p.add_argument("--backend", default=d.backend, help="runtime backend: auto (what each dir was built for), onnxruntime, openvino, tensorrt, torch (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"onnxruntime, OpenVINO and torch threads (per replica with --ray); default: {d.threads}, "
                   "or with --ray the machine's cores divided by the (most) replicas, at least 1")
    p.add_argument("--spinning", choices=("on", "off"), default="on" if d.spinning else "off",
                   help="onnxruntime workers spin between ops while a batch runs (on), or sleep and leave the cores "
                   "to the server's event loop (off); matters with --threads > 1 (default: %(default)s)")
    ray = p.add_argument_group("Ray Serve (the same API, served by replicas on a Ray cluster; needs the 'ray' extra)")
    ray.add_argument("--ray", action="store_true",
                     help="serve as a Ray Serve application (--host/--port: Ray's HTTP proxy)")
    ray.add_argument("--ray-address", default=None, metavar="auto|ray://HOST:PORT",
                     help="join a running cluster (default: start a local Ray for this command)")
    ray.add_argument("--replicas", type=int, default=1,
                     help="replicas, each loading the engine dirs (default: %(default)s)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound (with --min-replicas)")
    ray.add_argument("--target-ongoing", type=float, default=16.0,
                     help="autoscaling: requests in flight per replica Ray aims for (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="the server's and uvicorn's log level (default: %(default)s)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    import importlib.util
    import logging

    from ..errors import BackendUnavailableError
    from .app import ServeSettings, ServeState, create_app, engine_specs
    from .schemas import Limits

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(f"serve needs {', '.join(missing)}: pip install 'autodiffusion-rt[serve]'")
    ray_settings = None
    if args.ray:
        from .ray_app import RaySettings, default_replica_threads

        if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
            raise BackendUnavailableError("serve --ray needs ray[serve]: pip install 'autodiffusion-rt[ray]'")
        ray_settings = RaySettings(address=args.ray_address, replicas=args.replicas, min_replicas=args.min_replicas,
                                   max_replicas=args.max_replicas, target_ongoing=args.target_ongoing, host=args.host,
                                   port=args.port).check()
        threads = args.threads or default_replica_threads(ray_settings.most_replicas)
    else:
        threads = args.threads or ServeSettings().threads
    import torch

    torch.set_num_threads(threads)
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_images=args.queue_images,
                             deadline_s=args.deadline_s, limits=Limits(max_n=args.max_n, max_body_bytes=args.max_body_bytes),
                             backend=args.backend, threads=threads, spinning=args.spinning == "on")
    engines = engine_specs(args.engines)
    state = ServeState(engines, settings)  # bad dirs and options fail here: one line, exit 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ray_settings is not None:
        from .ray_app import run_ray

        return run_ray(engines, settings, ray_settings, log_level=args.log_level)
    import uvicorn

    failed = []
    server: "uvicorn.Server"

    def on_load_error(message):
        failed.append(message)
        server.should_exit = True

    app = create_app(state, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=settings.deadline_s + 5))
    # uvicorn takes SIGINT/SIGTERM while it runs (stop accepting, finish the requests in flight, then our
    # lifespan drains the batchers) and re-raises the signal to the previous handler afterwards. By then
    # the drain is complete, so that handler does nothing and the command exits normally (0).
    import signal

    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        from ..errors import EngineError

        raise EngineError(f"the engines could not be loaded: {failed[0]}")
    return 0
