"""The sampling service: a real uvicorn server on a free loopback port, real HTTP (httpx), real onnxruntime engines.

The reference for every image is ``Runtime.sample(n, seed, labels)`` on the
same engine dir, called alone, outside the server.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from conftest import CORE_TINY_CONFIG, core_random_model  # noqa: E402

from autodiffusion_rt.data import to_uint8  # noqa: E402
from autodiffusion_rt.plan import Plan  # noqa: E402
from autodiffusion_rt.runtime import Runtime  # noqa: E402
from autodiffusion_rt.serve.app import ServeSettings, ServeState, create_app  # noqa: E402
from autodiffusion_rt.serve.loadtest import LoadTestError, check_loopback, percentile  # noqa: E402
from autodiffusion_rt.serve.schemas import Limits  # noqa: E402
from export.build import build_engines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Users' plans start at t=999 with x0 clipping on; DDIM eta>0 makes every step draw noise, so a
# request's images depend on its own per-sample generators at every step, not only on x_T.
TIMESTEPS = [999, 500, 200]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def engine_dirs(tmp_path_factory):
    """Two onnxruntime engine dirs: a class-conditional plan (3 classes) and an unconditional one."""
    out = {}
    for name, overrides, seed in (("cond", {"num_classes": 3, "resblock_updown": True}, 1), ("uncond", {}, 0)):
        model = core_random_model({**CORE_TINY_CONFIG, **overrides}, seed=seed, scale=0.05)
        plan = Plan.for_model(model, TIMESTEPS, sampler="ddim", eta=0.7, spec=f"test:{name}")
        d = tmp_path_factory.mktemp(name) / "engines"
        build_engines(plan, d, model=model, max_batch=8, progress=False, backend="onnxruntime")
        out[name] = d
    return out


@pytest.fixture(scope="module")
def references(engine_dirs):
    """The runtimes the answers are compared with (loaded apart from any server)."""
    rts = {name: Runtime.load(d, threads=1) for name, d in engine_dirs.items()}
    yield rts
    for rt in rts.values():
        rt.close()


class Server:
    """uvicorn serving ``create_app(state)`` in a thread, on a loopback socket bound to a free port."""

    def __init__(self, state: ServeState, *, load_on_startup: bool = True):
        self.state = state
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(state, load_on_startup=load_on_startup)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        wait_until(lambda: self.server.started, "the server to start")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def wait_until(predicate, what: str, timeout: float = 120.0):
    """Poll until ``predicate()`` is true; the timeout only bounds a hang, it asserts nothing about speed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def serve(engine_dirs, *names, runtime_loader=None, **settings) -> Server:
    limits = settings.pop("limits", Limits(max_n=8, max_body_bytes=1024))
    state = ServeState({n: engine_dirs[n] for n in names}, ServeSettings(limits=limits, threads=1, **settings),
                       runtime_loader=runtime_loader)
    return Server(state)


class EngineGate:
    """Keeps the engines busy on demand: once armed, the next batch is held on the engines until released.

    A request that arrives to idle engines and an empty queue starts at once; tests of merging and
    of a full queue need requests that arrive while a batch runs, and the tiny engines finish in
    milliseconds. The held batch is a real one (the real runtime runs it after the release).
    """

    def __init__(self):
        self.armed, self.holding, self.released = threading.Event(), threading.Event(), threading.Event()

    def loader(self, d):
        rt = Runtime.load(d, threads=1)
        real = rt.sample_requests

        def sample_requests(requests):
            if self.armed.is_set():
                self.armed.clear()
                self.holding.set()
                self.released.wait(120)
            return real(requests)

        rt.sample_requests = sample_requests
        return rt

    def hold(self, url: str, plan: str):
        """Send a one-image request and return once its batch is held on the engines (its thread and answer)."""
        answer = {}
        self.armed.set()
        t = threading.Thread(target=lambda: answer.setdefault("r", post(url, {"n": 1, "seed": 0, "plan": plan})))
        t.start()
        assert self.holding.wait(120), "the held batch never started"
        return t, answer


def wait_ready(url: str):
    wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, "/readyz to answer 200")


def metric(url: str, name: str, **labels) -> float:
    """One sample's value from /metrics (0 when absent)."""
    text = httpx.get(url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})?\s+(\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def npy(response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-npy"
    return torch.from_numpy(np.load(io.BytesIO(response.content)))


def post(url: str, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/v1/samples", content=data, headers={"content-type": "application/json"}, timeout=120, **kw)


# ---------------------------------------------------------------- images
def test_merged_requests_get_exactly_their_own_images(engine_dirs, references):
    """Four concurrent requests (labels given, drawn) merged into one batch, then the unconditional plan.

    They arrive while a batch is held on the engines, so they queue; max_batch = their total
    images, so their batch is cut as soon as all have arrived (the long max wait only bounds the
    test). What would catch this: a batcher that mixes rows between requests, shares one
    generator, or drops a request's labels; /metrics must show the held batch and 1 batch of 4.
    """
    requests = [
        {"n": 3, "seed": 5, "labels": [0, 2, 1]},
        {"n": 1, "seed": 5},                       # the same seed in the same batch, its label drawn
        {"n": 2, "seed": 2**63 - 1},
        {"n": 2, "seed": 9, "labels": [1, 1]},
    ]
    total = sum(r["n"] for r in requests)
    gate = EngineGate()
    with serve(engine_dirs, "cond", "uncond", max_batch=total, max_wait_ms=60_000, runtime_loader=gate.loader) as srv:
        wait_ready(srv.url)
        blocker, blocked = gate.hold(srv.url, "cond")  # the engines are busy: the next requests queue and merge
        answers = [None] * len(requests)

        def send(i):
            answers[i] = post(srv.url, {**requests[i], "format": "npy"})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        wait_until(lambda: metric(srv.url, "adrt_queue_images", plan="cond") == total, "the requests to be queued")
        gate.released.set()
        for t in [blocker, *threads]:
            t.join()
        assert blocked["r"].status_code == 200
        # the held batch of 1, then the 4 queued requests as one batch
        assert metric(srv.url, "adrt_batch_requests_count", plan="cond") == 2
        assert metric(srv.url, "adrt_batch_requests_sum", plan="cond") == 1 + len(requests)
        assert metric(srv.url, "adrt_batch_images_sum", plan="cond") == 1 + total
        rt = references["cond"]
        for req, r in zip(requests, answers):
            images = npy(r)
            want, want_y = rt.sample(req["n"], seed=req["seed"], labels=req.get("labels"), return_labels=True)
            assert images.dtype == torch.float32 and images.shape == (req["n"], 1, 8, 8)
            assert torch.equal(images, want)
            assert r.headers["x-seed"] == str(req["seed"]) and r.headers["x-plan"] == "cond"
            assert r.headers["x-labels"] == ",".join(str(int(v)) for v in want_y)
        # the images say something: not all saturated, and different seeds differ
        first = npy(answers[0])
        assert (first.abs() < 0.99).float().mean() > 0.2
        assert not torch.equal(npy(answers[2])[:1], first[:1])

        # the unconditional plan, by name, as a PNG grid (8 images: a full batch, cut at once);
        # a missing seed gets a fresh one, which reproduces the images
        r = post(srv.url, {"n": 8, "plan": "uncond"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-plan"] == "uncond"
        seed = int(r.headers["x-seed"])
        assert 0 <= seed < 2**63 and "x-labels" not in r.headers
        from PIL import Image

        grid = np.asarray(Image.open(io.BytesIO(r.content)))
        want = to_uint8(references["uncond"].sample(8, seed=seed))[..., 0]  # 3x3 grid, 2-pixel white borders
        assert grid.shape == (32, 32)
        for k in range(8):
            row, col = divmod(k, 3)
            assert np.array_equal(grid[2 + row * 10: 2 + row * 10 + 8, 2 + col * 10: 2 + col * 10 + 8], want[k])
        other = post(srv.url, {"n": 8, "plan": "uncond"})
        assert other.headers["x-seed"] != r.headers["x-seed"]


# ---------------------------------------------------------------- backpressure
def test_full_queue_gets_429_and_a_passed_deadline_drops_the_work(engine_dirs):
    """While a batch is held on the engines, A waits in the queue (4 of 5 images, the batch is cut at 5 or
    after 60 s); B does not fit: 429 with Retry-After, while A is still waiting. A's 1 s deadline passes
    before its batch starts: 504, and A never ran (dropped; only the held batch did). C is served."""
    gate = EngineGate()
    with serve(engine_dirs, "cond", max_batch=5, max_wait_ms=60_000, queue_images=5, deadline_s=1.0,
               limits=Limits(max_n=5, max_body_bytes=1024), runtime_loader=gate.loader) as srv:
        wait_ready(srv.url)
        blocker, _ = gate.hold(srv.url, "cond")
        answer = {}
        a = threading.Thread(target=lambda: answer.setdefault("a", post(srv.url, {"n": 4, "seed": 1})))
        a.start()
        wait_until(lambda: metric(srv.url, "adrt_queue_images", plan="cond") == 4, "request A to be queued")
        b = post(srv.url, {"n": 2, "seed": 2})
        a.join()
        assert b.status_code == 429
        assert int(b.headers["retry-after"]) >= 1
        assert "queue" in b.json()["error"]["message"]
        assert answer["a"].status_code == 504 and "deadline" in answer["a"].json()["error"]["message"]
        assert metric(srv.url, "adrt_dropped_requests_total", plan="cond", reason="deadline") == 1
        assert metric(srv.url, "adrt_queue_images", plan="cond") == 0
        gate.released.set()
        blocker.join()  # answered 504 at its deadline; its batch ends (and is counted) when released
        wait_until(lambda: metric(srv.url, "adrt_batch_images_count", plan="cond") == 1, "the held batch to end")
        c = post(srv.url, {"n": 5, "seed": 3, "format": "npy"})
        assert c.status_code == 200
        # the held batch and C's only: A's work never ran
        assert metric(srv.url, "adrt_batch_images_count", plan="cond") == 2
        assert metric(srv.url, "adrt_requests_total", route="/v1/samples", status="429") == 1
        # A (dropped) and the held request (its deadline passed while its batch was on the engines)
        assert metric(srv.url, "adrt_requests_total", route="/v1/samples", status="504") == 2


def test_a_lone_request_starts_at_once_and_max_wait_applies_only_behind_a_running_batch(engine_dirs, references):
    """max wait 60 s against a 5 s deadline: a lone request to idle engines must not wait for merges (it
    would be dropped with 504 at its deadline); one that arrives while a batch runs does wait for others.
    What would catch this: a batcher that makes every oldest request wait max_wait (the lone request 504s),
    or one that never merges behind a running batch (B and C would run as two batches)."""
    gate = EngineGate()
    with serve(engine_dirs, "cond", max_batch=4, max_wait_ms=60_000, deadline_s=5.0, runtime_loader=gate.loader) as srv:
        wait_ready(srv.url)
        for seed in (11, 12):  # each alone, one after the other: nothing to merge with, run at once
            r = post(srv.url, {"n": 2, "seed": seed, "format": "npy"})
            assert torch.equal(npy(r), references["cond"].sample(2, seed=seed))
        assert metric(srv.url, "adrt_batch_requests_count", plan="cond") == 2
        blocker, _ = gate.hold(srv.url, "cond")
        answers = {}
        b = threading.Thread(target=lambda: answers.setdefault("b", post(srv.url, {"n": 1, "seed": 1,
                                                                                   "format": "npy"})))
        b.start()
        wait_until(lambda: metric(srv.url, "adrt_queue_images", plan="cond") == 1, "B to be queued")
        gate.released.set()
        blocker.join()
        # B waits behind the batch that ran (its merge window is open), so C, sent now, joins its batch
        assert metric(srv.url, "adrt_queue_images", plan="cond") == 1
        c = post(srv.url, {"n": 3, "seed": 2, "format": "npy"})  # 1 + 3 = max_batch: the batch is cut
        b.join()
        assert torch.equal(npy(answers["b"]), references["cond"].sample(1, seed=1))
        assert torch.equal(npy(c), references["cond"].sample(3, seed=2))
        assert metric(srv.url, "adrt_batch_requests_count", plan="cond") == 4  # 2 alone, the held one, B + C
        assert metric(srv.url, "adrt_batch_requests_sum", plan="cond") == 5


# ---------------------------------------------------------------- bad input
BAD = [
    (b'{"n": 2', 400, "body"),                                    # malformed JSON
    (b"[1, 2]", 422, "body"),                                     # not an object
    (b'"n"', 422, "body"),
    ({"seed": 1}, 422, "n"),                                      # n missing
    ({"n": 0}, 422, "n"),
    ({"n": -3}, 422, "n"),
    ({"n": 9}, 422, "n"),                                         # over the limit of 8
    ({"n": 1.5}, 422, "n"),
    ({"n": 2.0}, 422, "n"),
    ({"n": "2"}, 422, "n"),
    ({"n": True}, 422, "n"),
    ({"n": None}, 422, "n"),
    ({"n": 2, "labels": [0]}, 422, "labels"),                     # wrong length
    ({"n": 2, "labels": [0, 3]}, 422, "labels"),                  # out of range (3 classes)
    ({"n": 1, "labels": [-1]}, 422, "labels"),
    ({"n": 1, "labels": [1.0]}, 422, "labels"),
    ({"n": 1, "labels": 1}, 422, "labels"),
    ({"n": 1, "labels": [True]}, 422, "labels"),
    ({"n": 1, "labels": [0], "plan": "uncond"}, 422, "labels"),   # labels for an unconditional model
    ({"n": 1, "seed": -1}, 422, "seed"),
    ({"n": 1, "seed": 2**63}, 422, "seed"),
    ({"n": 1, "seed": 1.5}, 422, "seed"),
    ({"n": 1, "seed": False}, 422, "seed"),
    ({"n": 1, "seed": "7"}, 422, "seed"),
    ({"n": 1, "plan": "nope"}, 422, "plan"),                      # unknown plan
    ({"n": 1, "plan": 3}, 422, "plan"),
    ({"n": 1, "format": "jpeg"}, 422, "format"),                  # unknown format
    ({"n": 1, "format": None}, 422, "format"),
    ({"n": 1, "extra": 1}, 422, "extra"),                         # extra field
    (json.dumps({"n": 1, "pad": "x" * 2000}).encode(), 413, "body"),  # body over the 1024-byte limit
]


def test_each_bad_input_gets_its_4xx_and_the_next_good_request_succeeds(engine_dirs):
    with serve(engine_dirs, "cond", "uncond") as srv:
        wait_ready(srv.url)
        for body, status, field in BAD:
            r = post(srv.url, body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["field"] == field, (body, err)
            assert isinstance(err["message"], str) and len(err["message"]) > 10
            good = post(srv.url, {"n": 1, "seed": 0, "format": "npy"})
            assert good.status_code == 200, (body, good.text)
        # a chunked body over the limit (no Content-Length) is cut off too
        r = httpx.post(srv.url + "/v1/samples", content=iter([b'{"n": 1, "pad": "', b"x" * 2000, b'"}']), timeout=60)
        assert r.status_code == 413 and r.json()["error"]["field"] == "body"
        r = httpx.get(srv.url + "/v2/nothing")
        assert r.status_code == 404 and "/v1/samples" in r.json()["error"]["message"]
        assert post(srv.url, {"n": 1}).status_code == 200
        assert metric(srv.url, "adrt_requests_total", route="/v1/samples", status="413") == 2


def test_error_messages_name_what_is_allowed(engine_dirs):
    with serve(engine_dirs, "cond", "uncond") as srv:
        wait_ready(srv.url)
        assert "[1, 8]" in post(srv.url, {"n": 9}).json()["error"]["message"]
        assert "0..2" in post(srv.url, {"n": 1, "labels": [5]}).json()["error"]["message"]
        assert "2^63" in post(srv.url, {"n": 1, "seed": -1}).json()["error"]["message"]
        msg = post(srv.url, {"n": 1, "plan": "x"}).json()["error"]["message"]
        assert "'cond'" in msg and "'uncond'" in msg
        assert "n, seed, labels, format, plan" in post(srv.url, {"n": 1, "z": 0}).json()["error"]["message"]
        # the routes the app serves are the ones metrics.ROUTES labels and a 404 names
        from autodiffusion_rt.serve.metrics import ROUTES

        fastapi_app = srv.server.config.app.app  # inside the metering middleware
        served = {r.path: m for r in fastapi_app.routes if hasattr(r, "methods") for m in r.methods - {"HEAD"}}
        assert served == ROUTES
        r = httpx.get(srv.url + "/v2/samples")
        assert r.status_code == 404 and all(f"{m} {p}" in r.json()["error"]["message"] for p, m in ROUTES.items())


# ---------------------------------------------------------------- readiness
def test_readyz_is_503_until_the_engines_are_loaded_and_warm(engine_dirs):
    """Loading is started by the test, so 'before' is observable; the warm-up must have run when /readyz says 200."""
    warm_calls = []

    def loader(d):
        rt = Runtime.load(d, threads=1)
        real = rt.sample_requests
        rt.sample_requests = lambda requests: (warm_calls.append(list(requests)), real(requests))[1]
        return rt

    settings = ServeSettings(max_batch=4, threads=1, limits=Limits(max_n=4))
    state = ServeState({"cond": engine_dirs["cond"]}, settings, runtime_loader=loader)
    srv = Server(state, load_on_startup=False)
    with srv:
        assert httpx.get(srv.url + "/healthz").status_code == 200
        r = httpx.get(srv.url + "/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "loading" in r.json()["error"]["message"]
        r = post(srv.url, {"n": 1})
        assert r.status_code == 503 and "/readyz" in r.json()["error"]["message"]
        assert post(srv.url, {"n": 0}).status_code == 422  # bad input is still refused as such while loading
        state.load()
        assert warm_calls and sum(n for n, _, _ in warm_calls[0]) == 4  # warmed at the largest batch
        assert httpx.get(srv.url + "/readyz").status_code == 200
        assert post(srv.url, {"n": 2}).status_code == 200


def _thread_niceness() -> dict[int, int]:
    """{thread id: nice} of every thread of this process (/proc/self/task/TID/stat, field 19)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            out[int(task.name)] = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread priorities from Linux's /proc")
def test_engine_threads_run_below_the_http_side(engine_dirs):
    """Under saturation the event loop must win the CPU (a 429 answers at once): every thread the load starts (the
    batcher, onnxruntime's workers) runs ENGINE_NICENESS below the caller, whose own priority is unchanged."""
    from autodiffusion_rt.serve.app import ENGINE_NICENESS

    base = os.getpriority(os.PRIO_PROCESS, 0)
    before = set(_thread_niceness())
    state = ServeState({"cond": engine_dirs["cond"]}, ServeSettings(max_batch=4, threads=2, limits=Limits(max_n=4)))
    try:
        state.load()
        started = {tid: nice for tid, nice in _thread_niceness().items() if tid not in before}
        assert state.batchers["cond"]._thread.native_id in started
        assert len(started) >= 2  # the batcher and at least one onnxruntime worker (2 threads)
        assert set(started.values()) == {min(19, base + ENGINE_NICENESS)}, started
        assert os.getpriority(os.PRIO_PROCESS, 0) == base
    finally:
        state.close()


# ---------------------------------------------------------------- shutdown
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_during_a_request_lets_it_finish(engine_dirs, references):
    """``autodiffusion-rt serve`` in its own process; SIGTERM while a request waits in the batcher.

    A large request (256 images in chunks of 8) keeps the engines busy, so the next one queues
    behind it and waits for merges (max wait 1.5 s). Both must still get their 200 and exact
    images, and the process must exit 0. What would catch this: a server that drops queued
    work or closes the engines on SIGTERM.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "autodiffusion_rt.cli", "serve", "--engines", f"cond={engine_dirs['cond']}", "--port", str(port),
         "--max-wait-ms", "1500", "--max-batch", "8", "--max-n", "256", "--queue-images", "512", "--threads", "1",
         "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stdout.read()}")
            try:
                return httpx.get(url + "/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "the server process to be ready", timeout=300)
        answer = {}
        big_request = {"n": 256, "seed": 7, "format": "npy"}
        big = threading.Thread(target=lambda: answer.setdefault("big", post(url, big_request)))
        big.start()
        wait_until(lambda: metric(url, "adrt_running_images", plan="cond") == 256, "the large request to run")
        t = threading.Thread(target=lambda: answer.setdefault("r", post(url, {"n": 3, "seed": 42, "format": "npy"})))
        t.start()
        # queued behind the large batch (on a very fast machine the large batch may end first: B then runs at once)
        wait_until(lambda: metric(url, "adrt_queue_images", plan="cond") == 3 or not t.is_alive(),
                   "the request to be queued")
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        big.join(120)
        assert torch.equal(npy(answer["r"]), references["cond"].sample(3, seed=42))
        assert torch.equal(npy(answer["big"]), references["cond"].sample(256, seed=7))
        assert proc.wait(120) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/healthz")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_a_bad_engine_dir_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "autodiffusion_rt.cli", "serve", "--engines", str(tmp_path / "missing")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


# ---------------------------------------------------------------- load test helpers
def test_load_test_only_targets_loopback():
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_loopback("http://[::1]:9") == "http://[::1]:9"
    assert check_loopback("http://localhost:1") == "http://localhost:1"
    for url in ("http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1", "127.0.0.1:8000"):
        with pytest.raises(LoadTestError):
            check_loopback(url)


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 100):
        xs = rng.standard_normal(size).tolist()
        for q in (0, 50, 95, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), abs=1e-12)
    assert percentile([], 50) is None


def test_load_test_against_a_real_server_reports_every_request(engine_dirs, tmp_path):
    """A small run of ``benchmark.py --serve`` (closed loop at 1 and 3, a short overload against a 4-image queue).

    What would catch this: lost or double-counted requests (status counts must add up to what
    was sent), a closed loop that does not merge (mean batch at concurrency 3 > 1 needs the
    /metrics deltas), a report that benchmark.py cannot write as JSON or plot.
    """
    pytest.importorskip("matplotlib")
    import benchmark

    with serve(engine_dirs, "uncond", max_batch=8, max_wait_ms=300, queue_images=4, limits=Limits(max_n=4)) as srv:
        wait_ready(srv.url)
        out, png = tmp_path / "serve.json", tmp_path / "serve.png"
        assert benchmark.main(["--serve", srv.url, "--concurrency", "1,3", "--requests", "6", "--overload-seconds", "0.5",
                               "--overload-requests", "40", "--recovery-limit", "20", "--json", str(out), "--plot", str(png),
                               "--engines", str(engine_dirs["uncond"]), "--engine-seconds", "0.1",
                               "--quiet"]) == 0
        report = json.loads(out.read_text())
        served = metric(srv.url, "adrt_images_total", plan="uncond")
    c1, c3 = report["closed_loop"]
    assert (c1["concurrency"], c3["concurrency"]) == (1, 3)
    assert c1["status"] == {"200": 6} and c3["status"] == {"200": 6} and not c1["errors"]
    assert c1["mean_batch_requests"] == 1.0 and c3["mean_batch_requests"] > 1.0
    assert c1["p50_ms"] <= c1["p95_ms"] <= c1["p99_ms"]
    o = report["overload"]
    assert sum(o["status"].values()) == o["sent"] <= 40 and o["server_errors_5xx"] == 0
    assert report["recovery"]["recovered"] and report["recovery"]["probes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the engines alone at batch = each concurrency level, and the service as a ratio of them
    own = report["engines"]
    assert [r["batch"] for r in own["batches"]] == [1, 3] and all(r["images_per_s"] > 0 for r in own["batches"])
    assert c3["over_engines"] == pytest.approx(c3["images_per_s"] / own["batches"][1]["images_per_s"], rel=1e-2, abs=5e-4)  # the report rounds to 3 decimals
    assert report["targets"]["c1_p50_over_sample_p50"] > 0
    # every 200 of the run (plus warm-ups and probes) was generated by the server: nothing invented client-side
    answered = sum(r["status"].get("200", 0) for r in report["closed_loop"]) + o["status"].get("200", 0)
    assert served >= answered


def test_load_test_refuses_a_remote_url():
    import benchmark

    assert benchmark.main(["--serve", "http://192.0.2.1:8000", "--quiet"]) == 2


@pytest.mark.slow
def test_any_json_body_is_either_a_valid_request_or_a_4xx_naming_a_field():
    """Property over arbitrary JSON (hypothesis): the parser never raises anything but a 4xx RequestError,
    and what it accepts is within the limits. What would catch this: a TypeError on an odd type
    (a 500 in the service), a bool taken as an int, a label or seed out of range let through."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from autodiffusion_rt.serve.schemas import FIELDS, RequestError, parse_sample_request

    scalars = st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=True) | st.text(max_size=5)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                          max_leaves=8)
    bodies = st.fixed_dictionaries({}, optional={k: values | st.integers(0, 9) for k in FIELDS}) | st.dictionaries(
        st.sampled_from([*FIELDS, "x"]), values, max_size=6) | values
    plans = {"cond": 3, "uncond": None}

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
    @hypothesis.given(bodies)
    def check(body):
        try:
            req = parse_sample_request(json.dumps(body).encode(), plans, "cond", Limits(max_n=8))
        except RequestError as e:
            assert 400 <= e.status < 500 and e.body()["error"]["message"]
            assert e.field in (*FIELDS, "body") or (isinstance(body, dict) and e.field in body)
            return
        assert type(req.n) is int and 1 <= req.n <= 8
        assert type(req.seed) is int and 0 <= req.seed < 2**63
        assert req.plan in plans and req.format in ("png", "npy")
        if req.labels is not None:
            assert plans[req.plan] is not None and len(req.labels) == req.n
            assert all(type(v) is int and 0 <= v < plans[req.plan] for v in req.labels)

    check()
