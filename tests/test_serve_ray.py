"""The service as a Ray Serve application: a real Ray (local, 2 CPUs) started once for this module,
2 replicas of 1 thread serving real onnxruntime engine dirs, over loopback HTTP through Ray's proxy.

The references are ``Runtime.sample`` alone (the ``references`` fixture of test_serve.py) and, for the
bad-input table, the single-process server answering the same requests.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from test_serve import BAD, _free_port, engine_dirs, npy, post, references, wait_ready, wait_until  # noqa: E402,F401
from test_serve import serve as serve_one_process  # noqa: E402

from autodiffusion_rt.serve.app import ServeSettings  # noqa: E402
from autodiffusion_rt.serve.ray_app import (  # noqa: E402
    APP_NAME,
    PROXY_CALLBACK,
    PROXY_CALLBACK_ENV,
    RaySettings,
    build_application,
    start_serve,
)
from autodiffusion_rt.serve.schemas import Limits  # noqa: E402

# slow: a real Ray (about a minute to start and serve); the quick subset keeps the single-process service.
pytestmark = [pytest.mark.usefixtures("one_thread_per_module"), pytest.mark.slow]

SETTINGS = ServeSettings(max_batch=8, max_wait_ms=5.0, queue_images=512, deadline_s=60.0, threads=1,
                         limits=Limits(max_n=8, max_body_bytes=1024))


@pytest.fixture(scope="module")
def ray_url(engine_dirs):
    """Ray started once for the module (2 CPUs, no dashboard), Serve's proxy on a free port, the app deployed."""
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process (another module's cluster)")
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK  # read by the proxy process Ray starts
    # address="local": our own Ray, never a cluster someone started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        ray_settings = RaySettings(replicas=2, port=_free_port())
        start_serve(SETTINGS, ray_settings)
        serve.run(build_application({n: engine_dirs[n] for n in ("cond", "uncond")}, SETTINGS, ray_settings),
                  name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{ray_settings.port}"
        wait_ready(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(PROXY_CALLBACK_ENV, None)


def replica_actors() -> list[str]:
    """The names of the live replica actors (Serve's namespace)."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and "SampleReplica" in a["name"])


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments["SampleReplica"]
    return status.replica_states.get("RUNNING", 0)


def test_concurrent_requests_get_exactly_the_images_of_runtime_sample(ray_url, references):
    """Twelve concurrent requests over both plans, spread over 2 replicas and merged into their batches.
    What would catch this: a replica that loads other engines, mixes rows of merged requests, or
    loses labels; the X-Replica headers show which replicas answered."""
    requests = [{"n": 1 + i % 4, "seed": 100 + i, "plan": "cond" if i % 3 else "uncond"} for i in range(12)]
    requests[1]["labels"] = [2, 0]
    answers = [None] * len(requests)

    def send(i):
        answers[i] = post(ray_url, {**requests[i], "format": "npy"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for req, r in zip(requests, answers):
        want, want_y = references[req["plan"]].sample(req["n"], seed=req["seed"], labels=req.get("labels"),
                                                      return_labels=True)
        assert torch.equal(npy(r), want), req
        assert r.headers["x-seed"] == str(req["seed"]) and r.headers["x-plan"] == req["plan"]
        assert r.headers.get("x-labels") == (None if want_y is None else ",".join(str(int(v)) for v in want_y))
        assert r.headers["x-replica"]
    assert running_replicas() == 2


def test_bad_inputs_get_the_same_codes_and_bodies_from_both_deployments(ray_url, engine_dirs):
    """The single-process table (test_serve.BAD), sent to Ray Serve and to the single-process server:
    the same status, the same JSON body, and the Retry-After-free 4xx headers alike."""
    with serve_one_process(engine_dirs, "cond", "uncond") as srv:
        wait_ready(srv.url)
        for body, status, field in BAD:
            one, served = post(srv.url, body), post(ray_url, body)
            assert (one.status_code, served.status_code) == (status, status), (body, served.text)
            assert served.headers["content-type"] == one.headers["content-type"] == "application/json"
            assert served.json() == one.json() and served.json()["error"]["field"] == field, (body, served.text)
        for method, path in (("GET", "/v2/nothing"), ("GET", "/v1/samples"), ("DELETE", "/metrics")):
            one, served = httpx.request(method, srv.url + path), httpx.request(method, ray_url + path)
            assert served.status_code == one.status_code and served.json() == one.json(), (method, path, served.text)
        r = httpx.post(ray_url + "/v1/samples", content=iter([b'{"n": 1, "pad": "', b"x" * 2000, b'"}']), timeout=60)
        assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    # the same Prometheus names, from the replica that answers the scrape
    text = httpx.get(ray_url + "/metrics").text
    for name in ("adrt_requests_total", "adrt_request_seconds_bucket", "adrt_queue_images", "adrt_running_images",
                 "adrt_batch_images_count", "adrt_images_per_second"):
        assert name in text


def test_killing_a_replica_during_a_burst_ends_every_request_and_the_service_recovers(ray_url, references):
    """8 clients each send 4 requests of 8 images in turn; one replica's actor is killed once the first
    answers are back. Every request ends, within its client timeout, with a 200 carrying exactly its
    images or a 5xx whose body is our JSON error; Ray replaces the replica and the next requests succeed.
    What would catch this: a request that hangs on a dead replica, Ray's text 500 reaching the client,
    a service that stays down."""
    seeds = [[1000 + 10 * c + k for k in range(4)] for c in range(8)]
    answers: dict = {}
    first_answer = threading.Event()

    def client(c):
        with httpx.Client(timeout=SETTINGS.deadline_s + 30) as http:
            for seed in seeds[c]:
                try:
                    answers[seed] = http.post(ray_url + "/v1/samples", json={"n": 8, "seed": seed, "format": "npy",
                                                                            "plan": "uncond"})
                except httpx.TransportError as e:  # a hang or a dropped connection: the failure under test
                    answers[seed] = e
                first_answer.set()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    assert first_answer.wait(120)
    victim = replica_actors()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join()
    statuses = {}
    for seed, r in answers.items():
        assert not isinstance(r, Exception), (seed, r)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code == 200:
            assert torch.equal(npy(r), references["uncond"].sample(8, seed=seed))
        else:
            assert r.status_code >= 500 and r.headers["content-type"] == "application/json", (r.status_code, r.text)
            assert len(r.json()["error"]["message"]) > 10
    assert sum(statuses.values()) == 32
    print(f"replica killed mid-burst: answers by status {statuses}")
    # the next requests succeed (on the surviving replica at once), and Ray brings the count back to 2
    for seed in range(4):
        r = post(ray_url, {"n": 2, "seed": seed, "format": "npy", "plan": "uncond"})
        assert torch.equal(npy(r), references["uncond"].sample(2, seed=seed))
    replaced = lambda: victim not in replica_actors() and len(replica_actors()) == 2 and running_replicas() == 2  # noqa: E731
    wait_until(replaced, "Ray to replace the killed replica")
    r = post(ray_url, {"n": 1, "seed": 5, "format": "npy", "plan": "uncond"})
    assert torch.equal(npy(r), references["uncond"].sample(1, seed=5))


def test_ray_proxy_text_errors_are_rewritten_as_our_json():
    """The proxy middleware alone, on what Ray's proxy does for a request whose replica died in flight
    (nothing, then uvicorn's text 500: the kill test provokes it only when the timing is right) and for its
    own text errors: the client gets our JSON error shape. Our own JSON errors pass as they are."""
    from autodiffusion_rt.serve.ray_app import RayErrorsAsJSON

    sent = []

    async def ray_says_nothing(scope, receive, send):
        return None

    async def ray_text_503(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Service Unavailable: no replica", "more_body": True})
        await send({"type": "http.response.body", "body": b" yet"})

    async def collect(message):
        sent.append(message)

    import asyncio

    asyncio.run(RayErrorsAsJSON(ray_says_nothing)({"type": "http"}, None, collect))
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body["error"]["field"] is None and "died" in body["error"]["message"]
    sent.clear()
    asyncio.run(RayErrorsAsJSON(ray_text_503)({"type": "http"}, None, collect))
    assert sent[0]["status"] == 503 and len(sent) == 2
    assert "no replica yet" in json.loads(sent[1]["body"])["error"]["message"]

    ours = [{"type": "http.response.start", "status": 429, "headers": [(b"content-type", b"application/json")]},
            {"type": "http.response.body", "body": b'{"error": {"field": null, "message": "full"}}'}]

    async def our_429(scope, receive, send):
        for m in ours:
            await send(m)

    sent.clear()
    asyncio.run(RayErrorsAsJSON(our_429)({"type": "http"}, None, collect))
    assert sent == ours


def test_the_proxy_answers_429_itself_beyond_its_in_flight_bound():
    """Two requests held in flight by the replica side: the third POST /v1/samples gets our JSON 429 with
    Retry-After from the proxy without reaching the app; other routes pass; once one ends, the next gets in."""
    import asyncio

    from autodiffusion_rt.serve.ray_app import RayErrorsAsJSON

    async def scenario():
        release, reached = asyncio.Event(), []

        async def replica(scope, receive, send):
            reached.append(scope["path"])
            if scope["path"] == "/v1/samples":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        proxy = RayErrorsAsJSON(replica, max_in_flight=2)

        async def call(path="/v1/samples", method="POST"):
            sent = []

            async def collect(message):
                sent.append(message)

            await proxy({"type": "http", "method": method, "path": path}, None, collect)
            return sent

        held = [asyncio.create_task(call()) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = await call()
        metrics = await call("/metrics", "GET")
        release.set()
        done = await asyncio.gather(*held)
        after = await call()
        return refused, metrics, done, after, reached

    refused, metrics, done, after, reached = asyncio.run(scenario())
    assert refused[0]["status"] == 429 and (b"retry-after", b"1") in refused[0]["headers"]
    assert "queue is full" in json.loads(refused[1]["body"])["error"]["message"]
    assert reached.count("/v1/samples") == 3 and "/metrics" in reached  # the refused one never reached the app
    assert metrics[0]["status"] == 200 and all(d[0]["status"] == 200 for d in done) and after[0]["status"] == 200


def test_the_proxy_bound_comes_from_its_variable_and_a_bad_value_is_said_not_fatal(monkeypatch, caplog):
    from autodiffusion_rt.serve.ray_app import PROXY_IN_FLIGHT_ENV, proxy_middlewares

    monkeypatch.setenv(PROXY_IN_FLIGHT_ENV, "256")
    assert proxy_middlewares()[0].kwargs == {"max_in_flight": 256}
    monkeypatch.setenv(PROXY_IN_FLIGHT_ENV, "-3; rm")
    with caplog.at_level("WARNING", logger="autodiffusion_rt.serve"):
        assert proxy_middlewares()[0].kwargs == {"max_in_flight": 0}
    assert "'-3; rm'" in caplog.text and PROXY_IN_FLIGHT_ENV in caplog.text
