"""``autodiffusion-rt serve --engines DIR [--engines NAME=DIR ...] [--host 127.0.0.1] [--port 8000] [--ray ...]``.

Registered through ``autodiffusion_rt.cli._PLUGINS``; fastapi and uvicorn are
imported only when the command runs (the ``serve`` extra).
"""

from __future__ import annotations

import argparse

__all__ = ["cmd_serve", "register"]


def register(subparsers) -> argparse.ArgumentParser:
    """The ``serve`` subcommand and its options."""
    p = subparsers.add_parser(
        "serve",
        help="serve engine dirs over HTTP (POST /v1/samples) with dynamic batching",
        description='A sampling service: POST /v1/samples {"n", "seed"?, "labels"?, "format": "png"|"npy", "plan"?}; '
        "GET /healthz, /readyz, /metrics. Concurrent requests for one plan are merged into engine batches; "
        "each request's images equal 'autodiffusion-rt sample --engines DIR' with the same seed. "
        "SIGTERM drains and exits.",
    )
    p.add_argument(
        "--engines",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help=(
            "an engine dir from 'autodiffusion-rt build', optionally named (repeatable; the first is the default plan)"
        ),
    )
    _add_service_args(p)
    _add_ray_args(p)
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="the server's and uvicorn's log level (default: %(default)s)",
    )
    p.set_defaults(func=cmd_serve)
    return p


def _add_service_args(p: argparse.ArgumentParser) -> None:
    """The address, batching, limits and runtime options; their defaults are ServeSettings' and Limits'."""
    from .app import ServeSettings
    from .schemas import Limits

    d, lim = ServeSettings(), Limits()
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port in [1, 65535] (default: %(default)s; 0: a free one)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images per engine batch (default: %(default)s)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help="how long a request waits for others to merge with; 0: run at once, and requests arriving "
        "while a batch runs merge into the next (default: %(default)s)",
    )
    p.add_argument(
        "--queue-images",
        type=int,
        default=d.queue_images,
        help="images that may wait per plan; beyond it requests get 429 (default: %(default)s)",
    )
    p.add_argument(
        "--deadline-s",
        type=float,
        default=d.deadline_s,
        help="per-request deadline: 504 after it, dropped if not started (default: %(default)s)",
    )
    p.add_argument("--max-n", type=int, default=lim.max_n, help="most images in one request (default: %(default)s)")
    p.add_argument(
        "--max-body-bytes", type=int, default=lim.max_body_bytes, help="request body limit (default: %(default)s)"
    )
    p.add_argument(
        "--backend",
        default=d.backend,
        help=(
            "runtime backend: auto (what each dir was built for), onnxruntime, openvino, tensorrt, torch "
            "(default: %(default)s)"
        ),
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"onnxruntime, OpenVINO and torch threads (per replica with --ray); default: {d.threads}, "
        "or with --ray the machine's cores divided by the (most) replicas, at least 1",
    )
    p.add_argument(
        "--spinning",
        choices=("on", "off"),
        default="on" if d.spinning else "off",
        help="onnxruntime workers spin between ops while a batch runs (on), or sleep and leave the cores "
        "to the server's event loop (off); matters with --threads > 1 (default: %(default)s)",
    )


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    """The Ray Serve options, in their own help section."""
    ray = p.add_argument_group("Ray Serve (the same API, served by replicas on a Ray cluster; needs the 'ray' extra)")
    ray.add_argument(
        "--ray", action="store_true", help="serve as a Ray Serve application (--host/--port: Ray's HTTP proxy)"
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        metavar="auto|ray://HOST:PORT",
        help="join a running cluster (default: start a local Ray for this command)",
    )
    ray.add_argument(
        "--replicas", type=int, default=1, help="replicas, each loading the engine dirs (default: %(default)s)"
    )
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound (with --min-replicas)")
    ray.add_argument(
        "--target-ongoing",
        type=float,
        default=16.0,
        help="autoscaling: requests in flight per replica Ray aims for (default: %(default)s)",
    )


def check_args(args) -> None:
    """The options ServeSettings does not hold (the address), before anything is imported or loaded."""
    from .app import ServeSettingsError

    if not 0 <= args.port <= 65535:
        raise ServeSettingsError(f"--port {args.port} must be in [1, 65535] (or 0: pick a free port)")
    if not args.host or any(c.isspace() for c in args.host):
        raise ServeSettingsError(f"--host {args.host!r} must be an address or a host name, e.g. 127.0.0.1")


def cmd_serve(args) -> int:
    import signal
    import types

    # SIGTERM/Ctrl-C before uvicorn takes the signals (while the manifests are read and the libraries imported):
    # noted here, and the command exits 0 before serving; uvicorn's own handlers take over while it runs.
    stop = types.SimpleNamespace(signals=list(getattr(args, "early_signals", ())), server=None)

    def note(signum, frame):
        stop.signals.append(signum)
        if stop.server is not None:  # made, but uvicorn has not taken the signals yet: it stops once started
            stop.server.should_exit = True

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _serve(args, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _serve(args, stop) -> int:
    """Check the options and the installed extras, read the engine dirs, then serve (uvicorn or Ray) until stopped."""
    import logging

    from .app import ServeState, engine_specs

    settings, ray_settings = _settings_from_args(args)
    _check_installed(ray=args.ray)
    import torch

    torch.set_num_threads(settings.threads)
    engines = engine_specs(args.engines)
    state = ServeState(engines, settings)  # bad dirs fail here: one line, exit 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if stop.signals:
        logging.getLogger("autodiffusion_rt.serve").info("stopped by signal %d before serving", stop.signals[0])
        return 0
    if ray_settings is not None:
        from .ray_app import run_ray

        return run_ray(engines, settings, ray_settings, log_level=args.log_level)
    return _run_uvicorn(state, args, stop)


def _settings_from_args(args):
    """``(ServeSettings, RaySettings or None)`` from the options, each checked (one line naming the option)."""
    from .app import ServeSettings
    from .schemas import Limits

    check_args(args)
    ray_settings = None
    if args.ray:
        from .ray_app import RaySettings, default_replica_threads

        ray_settings = RaySettings(
            address=args.ray_address,
            replicas=args.replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            target_ongoing=args.target_ongoing,
            host=args.host,
            port=args.port,
        ).check()
        threads = default_replica_threads(ray_settings.most_replicas) if args.threads is None else args.threads
    else:
        threads = ServeSettings().threads if args.threads is None else args.threads  # 0 is refused, not defaulted
    limits = Limits(max_n=args.max_n, max_body_bytes=args.max_body_bytes)
    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_images=args.queue_images,
        deadline_s=args.deadline_s,
        limits=limits,
        backend=args.backend,
        threads=threads,
        spinning=args.spinning == "on",
    ).check()
    return settings, ray_settings


def _check_installed(ray: bool) -> None:
    """The ``serve`` extra (and with --ray the ``ray`` extra) is installed, or a one-line pip command."""
    import importlib.util

    from ..errors import BackendUnavailableError

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(f"serve needs {', '.join(missing)}: pip install 'autodiffusion-rt[serve]'")
    if ray and (importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None):
        raise BackendUnavailableError("serve --ray needs ray[serve]: pip install 'autodiffusion-rt[ray]'")


def _run_uvicorn(state, args, stop) -> int:
    """Serve ``state`` with uvicorn until a signal; an engine dir that fails to load stops it (EngineError)."""
    import uvicorn

    from .app import create_app

    failed = []
    server: "uvicorn.Server"

    def on_load_error(message):
        failed.append(message)
        server.should_exit = True

    app = create_app(state, on_load_error=on_load_error)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=state.settings.deadline_s + 5,
        )
    )
    stop.server = server
    if stop.signals:  # one came while the server was being made
        server.should_exit = True
    # uvicorn takes SIGINT/SIGTERM while it runs (stop accepting, finish the requests in flight, then our
    # lifespan waits for an engine being loaded and drains the batchers) and re-raises the signal to the
    # previous handler afterwards: ours (cmd_serve's), which only notes it, so the command exits normally (0).
    server.run()
    if failed:
        from ..errors import EngineError

        raise EngineError(f"the engines could not be loaded: {failed[0]}")
    return 0
