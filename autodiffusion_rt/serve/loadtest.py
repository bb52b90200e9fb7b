"""Load test of a running service: ``python benchmark.py --serve URL`` (loopback only, bounded).

    python benchmark.py --serve http://127.0.0.1:8000 [--concurrency 1,2,4,8,16,32] [--requests 96]
                        [--n 1] [--format png] [--plan NAME] [--overload-seconds 5] [--json OUT] [--plot OUT.png]
                        [--engines DIR [--engine-threads 1]]

0. With ``--engines DIR`` (the dir the service serves): the engines' own
   throughput at batch sizes = the concurrency levels, ``Runtime.sample_requests``
   called directly in this process while the service is idle, and one
   ``Runtime.sample(n)``'s latency; each closed-loop level is then given as a
   ratio of the engines' throughput at the same batch (what the batcher loses).

1. **Closed loop** at each concurrency c: c clients, each sending its next
   request when the last one is answered, ``--requests`` requests in all (after
   c unmeasured warm-up requests). Throughput (images/s of 200 answers over
   the wall time), p50/p95/p99 latency, answers by status, and the mean engine
   batch (images and requests per batch, read from the server's /metrics before
   and after: it shows the merging).
2. **Open loop overload** at 2x the sustainable rate (the best closed-loop
   request rate): requests sent on a fixed clock whatever the answers, for
   ``--overload-seconds`` (at most ``--overload-requests``). The share answered
   429 and their latency, any 5xx, and the latency of the accepted ones.
3. **Recovery**: right after the overload stops, one client sends requests in
   turn; recovery is the time until the first of 3 answers in a row within
   ``max(2 x p50, p99)`` of concurrency 1 (normal latency).

Every figure depends on the machine's load: compare numbers of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlsplit

from ..errors import Error
from ..utils import positive_ints, print_report

__all__ = ["check_loopback", "main", "percentile", "run"]


class LoadTestError(Error):
    """A bad load-test argument: a non-loopback URL, a server that is not ready, a missing plotting library."""


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash if its host is a loopback address; the load test never leaves the machine."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host:
        raise LoadTestError(f"--serve {url!r} is not an http URL: give e.g. http://127.0.0.1:8000")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LoadTestError(
            f"--serve {url!r}: the load test only targets loopback (127.0.0.1, ::1, localhost), not {host!r}"
        )
    return url.rstrip("/")


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _summary(results: list[tuple[float, int]], wall: float, n: int) -> dict:
    ok = [lat for lat, status in results if status == 200]
    by_status: dict[str, int] = {}
    for _, status in results:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    ms = lambda v: None if v is None else round(v * 1e3, 2)  # noqa: E731
    return {
        "requests": len(results),
        "seconds": round(wall, 3),
        "status": by_status,
        "errors": {k: v for k, v in by_status.items() if k != "200"},
        "images_per_s": round(len(ok) * n / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 2) if wall > 0 else None,
        "p50_ms": ms(percentile(ok, 50)),
        "p95_ms": ms(percentile(ok, 95)),
        "p99_ms": ms(percentile(ok, 99)),
    }


class _Client:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for the load only.

    The load generator shares the machine with the server, so it must cost far
    less per request than the server: httpx's connection pool spends more CPU
    per request than the service itself once hundreds are in flight (its
    latency then measures the client). Requests are JSON POSTs and GETs to one
    loopback host; answers are read by Content-Length, which the service always sends.
    """

    def __init__(self, base: str):
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port or 80
        self.host_header = parts.netloc
        self._idle: list = []

    async def request(self, method: str, path: str, body: Optional[bytes] = None) -> tuple[int, dict, bytes]:
        conn = self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"\r\n" + (body or b""))
            await writer.drain()
            lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            data = await reader.readexactly(int(headers.get("content-length", 0)))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append(conn)
        return status, headers, data

    async def get_text(self, path: str) -> tuple[int, str]:
        status, _, data = await self.request("GET", path)
        return status, data.decode()

    async def metrics_by_replica(self, quiet_after: int = 3, most: int = 16) -> dict[str, str]:
        """Every replica's /metrics text, by its X-Replica header. One server: one scrape. Under Ray Serve each
        scrape reaches one replica (metrics are per replica): scrape until ``quiet_after`` in a row add none."""
        texts: dict[str, str] = {}
        quiet = 0
        for _ in range(most):
            _, headers, data = await self.request("GET", "/metrics")
            replica = headers.get("x-replica", "")
            quiet = quiet + 1 if replica in texts else 0
            texts[replica] = data.decode()
            if not replica or quiet >= quiet_after:
                break
        return texts

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _one(client: _Client, body: dict) -> tuple[float, int]:
    start = time.perf_counter()
    try:
        status, _, _ = await client.request("POST", "/v1/samples", json.dumps(body).encode())
    except Exception as e:  # counted by kind, never fatal: the load test reports errors
        status = f"exception:{type(e).__name__}"
    return time.perf_counter() - start, status


_BUCKET_429 = re.compile(
    r'^adrt_request_seconds_(bucket|count)\{(?:le="([^"]+)",)?route="/v1/samples",status="429"\}\s+(\S+)$', re.M
)


async def _server_429s(client: _Client) -> dict:
    """The servers' own count of 429 answers, and how many they answered within 50 ms (their latency histograms)."""
    out = {"count": 0.0, "within_50ms": 0.0}
    for text in (await client.metrics_by_replica()).values():
        for kind, le, value in _BUCKET_429.findall(text):
            if kind == "count":
                out["count"] += float(value)
            elif le == "0.05":
                out["within_50ms"] += float(value)
    return out


_CPU = re.compile(r"^process_cpu_seconds_total\s+(\S+)$", re.M)


async def _server_cpu_s(client: _Client) -> Optional[float]:
    """CPU seconds the serving processes have used (summed over replicas), from their process_cpu_seconds_total."""
    values = [float(m) for text in (await client.metrics_by_replica()).values() for m in _CPU.findall(text)]
    return sum(values) if values else None


_METRIC = re.compile(r'^(adrt_batch_(?:images|requests)_(?:sum|count))\{plan="([^"]*)"\}\s+(\S+)$', re.M)


async def _batch_totals(client: _Client, plan: Optional[str]) -> dict:
    """Sums and counts of the servers' batch histograms (for one plan, or all), over every replica."""
    out: dict[str, float] = {}
    for text in (await client.metrics_by_replica()).values():
        for name, p, value in _METRIC.findall(text):
            if plan is None or p == plan:
                out[name] = out.get(name, 0.0) + float(value)
    return out


def _batch_means(before: dict, after: dict) -> dict:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = d.get("adrt_batch_images_count", 0.0)
    if not batches:
        return {"batches": 0, "mean_batch_images": None, "mean_batch_requests": None}
    return {
        "batches": int(batches),
        "mean_batch_images": round(d["adrt_batch_images_sum"] / batches, 2),
        "mean_batch_requests": round(d["adrt_batch_requests_sum"] / batches, 2),
    }


async def _closed_loop(client: _Client, concurrency: int, requests: int, body: dict, seed0: int) -> dict:
    # warm-up: not measured
    await asyncio.gather(*[_one(client, {**body, "seed": seed0 + i}) for i in range(concurrency)])
    before = await _batch_totals(client, body.get("plan"))
    cpu_before = await _server_cpu_s(client)
    counter = iter(range(requests))
    results: list[tuple[float, int]] = []

    async def worker():
        for i in counter:
            results.append(await _one(client, {**body, "seed": seed0 + concurrency + i}))

    start, client_cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall, client_cpu = time.perf_counter() - start, time.process_time() - client_cpu
    cpu_after = await _server_cpu_s(client)
    after = await _batch_totals(client, body.get("plan"))
    row = {"concurrency": concurrency, **_summary(results, wall, body["n"]), **_batch_means(before, after)}
    # CPU per image answered: the server processes' (engines, batcher, event loop, encoding) and this load generator's
    images = sum(1 for _, status in results if status == 200) * body["n"]
    row["server_cpu_ms_per_image"] = (
        round((cpu_after - cpu_before) * 1e3 / images, 3)
        if images and cpu_before is not None and cpu_after is not None
        else None
    )
    row["client_cpu_ms_per_image"] = round(client_cpu * 1e3 / images, 3) if images else None
    return row


async def _overload(
    client: _Client, rate: float, seconds: float, max_requests: int, body: dict, seed0: int
) -> tuple[dict, float]:
    """The overload's report and the time it stopped sending."""
    count = max(1, min(max_requests, int(rate * seconds)))
    start = time.perf_counter()
    tasks = []
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(client, {**body, "seed": seed0 + i})))
    end = time.perf_counter()
    sent_for = end - start
    results = await asyncio.gather(*tasks)
    rejected = [lat for lat, status in results if status == 429]
    ms = lambda v: None if v is None else round(v * 1e3, 2)  # noqa: E731
    server_errors = sum(1 for _, s in results if isinstance(s, int) and s >= 500) + sum(
        1 for _, s in results if isinstance(s, str)
    )
    return {
        "target_rate_per_s": round(rate, 2),
        "sent": count,
        "sent_over_s": round(sent_for, 3),
        "status": _summary(results, sent_for, body["n"])["status"],
        "share_429": round(len(rejected) / count, 4),
        "p50_429_ms": ms(percentile(rejected, 50)),
        "p99_429_ms": ms(percentile(rejected, 99)),
        "max_429_ms": ms(max(rejected) if rejected else None),
        "server_errors_5xx": server_errors,
        "accepted": _summary([r for r in results if r[1] == 200], sent_for, body["n"]),
    }, end


async def _recovery(
    client: _Client, overload_end: float, threshold_s: float, limit_s: float, body: dict, seed0: int
) -> dict:
    probes, in_row, i = [], 0, 0
    while time.perf_counter() - overload_end < limit_s:
        lat, status = await _one(client, {**body, "seed": seed0 + i})
        i += 1
        done = time.perf_counter() - overload_end
        probes.append({"after_s": round(done, 3), "latency_ms": round(lat * 1e3, 2), "status": status})
        in_row = in_row + 1 if status == 200 and lat <= threshold_s else 0
        if in_row == 3:
            first = probes[-3]
            return {
                "recovered": True,
                "recovery_s": round(first["after_s"] - first["latency_ms"] / 1e3, 3),
                "threshold_ms": round(threshold_s * 1e3, 2),
                "probes": probes,
            }
    return {"recovered": False, "recovery_s": None, "threshold_ms": round(threshold_s * 1e3, 2), "probes": probes}


async def _run(
    base: str,
    concurrency: Sequence[int],
    requests: int,
    n: int,
    fmt: str,
    plan: Optional[str],
    overload_seconds: float,
    overload_requests: int,
    recovery_limit_s: float,
    progress,
) -> dict:
    body = {"n": n, "format": fmt, **({"plan": plan} if plan else {})}
    client = _Client(base)
    try:
        try:
            status, text = await client.get_text("/readyz")
        except OSError as e:
            raise LoadTestError(
                f"cannot reach {base}/readyz ({type(e).__name__}: {e}): start 'autodiffusion-rt serve' first"
            ) from None
        if status != 200:
            raise LoadTestError(f"{base}/readyz answered {status}: wait until the server is ready ({text[:200]})")
        report = {
            "url": base,
            "settings": {
                "n": n,
                "format": fmt,
                "plan": plan,
                "requests_per_level": requests,
                "overload_seconds": overload_seconds,
            },
            "closed_loop": [],
        }
        seed = 0
        for c in concurrency:
            row = await _closed_loop(client, c, max(requests, c), body, seed)
            seed += 10_000_000
            report["closed_loop"].append(row)
            progress(
                f"closed loop c={c}: {row['images_per_s']} img/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                f"mean batch {row['mean_batch_requests']} requests, errors {row['errors']}"
            )
        best = max(report["closed_loop"], key=lambda r: r["requests_per_s"] or 0)
        c1 = next((r for r in report["closed_loop"] if r["concurrency"] == 1), report["closed_loop"][0])
        rate = 2 * (best["requests_per_s"] or 1.0)
        before = await _server_429s(client)
        overload, end = await _overload(client, rate, overload_seconds, overload_requests, body, seed)
        after = await _server_429s(client)
        overload["sustainable_rate_per_s"] = best["requests_per_s"]
        # the server's own view (from accepting the request to sending the answer), beside the client's
        n429 = after["count"] - before["count"]
        overload["server_429_within_50ms"] = (
            round((after["within_50ms"] - before["within_50ms"]) / n429, 4) if n429 else None
        )
        report["overload"] = overload
        progress(
            f"overload at {rate:.1f} req/s: {overload['share_429']:.1%} answered 429 "
            f"(p99 {overload['p99_429_ms']} ms), "
            f"5xx {overload['server_errors_5xx']}"
        )
        threshold = max(2 * (c1["p50_ms"] or 0), c1["p99_ms"] or 0) / 1e3
        report["recovery"] = await _recovery(client, end, threshold, recovery_limit_s, body, seed + 10_000_000)
        progress(f"recovery: {report['recovery']['recovery_s']} s after the overload stopped")
    finally:
        client.close()
    by_c = {r["concurrency"]: r for r in report["closed_loop"]}
    checks = {}
    if 1 in by_c and 16 in by_c and by_c[1]["images_per_s"]:
        checks["throughput_c16_over_c1"] = round(by_c[16]["images_per_s"] / by_c[1]["images_per_s"], 2)
    if 16 in by_c and by_c[16]["p50_ms"]:
        checks["p99_over_p50_c16"] = round(by_c[16]["p99_ms"] / by_c[16]["p50_ms"], 2)
    checks["p99_429_ms"] = report["overload"]["p99_429_ms"]
    checks["server_429_within_50ms"] = report["overload"]["server_429_within_50ms"]
    checks["overload_5xx"] = report["overload"]["server_errors_5xx"]
    checks["recovery_s"] = report["recovery"]["recovery_s"]
    report["targets"] = checks
    return report


def engine_throughput(
    engine_dir,
    batches: Sequence[int],
    *,
    threads: Optional[int] = 1,
    n: int = 1,
    min_seconds: float = 2.0,
    backend: str = "auto",
    spinning: bool = True,
) -> dict:
    """The engines' own throughput, in this process: ``Runtime.sample_requests`` called directly with ``b``
    requests of ``n`` images (what a perfect batcher would hand them), repeated for at least ``min_seconds``
    per batch size; and the latency of one ``Runtime.sample(n)`` (what a lone request cannot beat)."""
    import statistics

    from ..runtime import Runtime

    rt = Runtime.load(engine_dir, backend=backend, threads=threads, spinning=spinning)
    try:
        rows = []
        seed = 0
        for b in batches:
            rt.sample_requests([(n, seed + i, None) for i in range(b)])  # warm-up: first runs allocate
            times, start, cpu = [], time.perf_counter(), time.process_time()
            while time.perf_counter() - start < min_seconds or len(times) < 3:
                seed += b
                t = time.perf_counter()
                rt.sample_requests([(n, seed + i, None) for i in range(b)])
                times.append(time.perf_counter() - t)
            cpu = time.process_time() - cpu  # every thread of this process: the engines' own workers too
            ms = statistics.median(times) * 1e3
            rows.append(
                {
                    "batch": b,
                    "requests": b,
                    "runs": len(times),
                    "ms": round(ms, 3),
                    "images_per_s": round(b * n / (ms / 1e3), 2),
                    "cpu_ms_per_image": round(cpu * 1e3 / (len(times) * b * n), 3),
                }
            )
        single = []
        start = time.perf_counter()
        while time.perf_counter() - start < min_seconds or len(single) < 5:
            t = time.perf_counter()
            rt.sample(n, seed=len(single))
            single.append(time.perf_counter() - t)
        return {
            "dir": str(engine_dir),
            "runtime": str(rt),
            "threads": threads,
            "spinning": spinning,
            "batches": rows,
            "sample_p50_ms": round(percentile(single, 50) * 1e3, 3),
            "sample_runs": len(single),
        }
    finally:
        rt.close()


def run(
    url: str,
    *,
    concurrency: Sequence[int] = (1, 2, 4, 8, 16, 32),
    requests: int = 96,
    n: int = 1,
    fmt: str = "png",
    plan: Optional[str] = None,
    overload_seconds: float = 5.0,
    overload_requests: int = 2000,
    recovery_limit_s: float = 30.0,
    engines=None,
    engine_threads: Optional[int] = 1,
    engine_spinning: bool = True,
    engine_seconds: float = 2.0,
    progress=None,
) -> dict:
    """The whole load test against ``url`` (a loopback service); a JSON-able report.

    ``engines``: the engine dir the service serves; its own throughput at batch sizes = the concurrency
    levels is measured first, in this process, while the service is idle, and the service is compared with it.
    """
    base = check_loopback(url)
    say = progress or (lambda s: None)
    own = None
    if engines is not None:
        own = engine_throughput(
            engines,
            list(concurrency),
            threads=engine_threads,
            n=int(n),
            spinning=engine_spinning,
            min_seconds=engine_seconds,
        )
        for row in own["batches"]:
            say(f"engines alone, batch {row['batch']}: {row['images_per_s']} img/s ({row['ms']} ms per batch)")
        say(f"engines alone, one Runtime.sample({n}): p50 {own['sample_p50_ms']} ms")
    report = asyncio.run(
        _run(
            base,
            list(concurrency),
            int(requests),
            int(n),
            fmt,
            plan,
            float(overload_seconds),
            int(overload_requests),
            float(recovery_limit_s),
            say,
        )
    )
    if own is not None:
        report["engines"] = own
        by_b = {r["batch"]: r for r in own["batches"]}
        for row in report["closed_loop"]:
            b = by_b.get(row["concurrency"])
            if b and row["images_per_s"]:
                row["over_engines"] = round(row["images_per_s"] / b["images_per_s"], 3)
                report["targets"][f"c{row['concurrency']}_over_engines_batch{row['concurrency']}"] = row["over_engines"]
            if b and row.get("server_cpu_ms_per_image"):
                # images per CPU-second, served against the engines alone: what the server costs beyond the
                # engines, independent of how much CPU a shared machine gave each phase
                row["cpu_efficiency_vs_engines"] = round(b["cpu_ms_per_image"] / row["server_cpu_ms_per_image"], 3)
                report["targets"][f"c{row['concurrency']}_cpu_efficiency_vs_engines"] = row["cpu_efficiency_vs_engines"]
        c1 = next((r for r in report["closed_loop"] if r["concurrency"] == 1), None)
        if c1 and c1["p50_ms"]:
            report["targets"]["c1_p50_over_sample_p50"] = round(c1["p50_ms"] / own["sample_p50_ms"], 3)
    return report


def format_report(report: dict) -> str:
    lines = [f"service {report['url']}: n={report['settings']['n']} per request, format {report['settings']['format']}"]
    own = report.get("engines")
    if own:
        lines += [
            "",
            f"engines alone ({own['runtime']}, {own['threads']} thread(s), spinning {own.get('spinning')}, "
            "in the load generator's process, "
            "Runtime.sample_requests with one request per image): "
            f"one Runtime.sample p50 {own['sample_p50_ms']:.1f} ms",
            f"{'batch':>5} {'ms':>9} {'img/s':>8} {'CPU ms/img':>11}",
        ]
        lines += [
            f"{r['batch']:>5} {r['ms']:>9.1f} {r['images_per_s']:>8.1f} {r['cpu_ms_per_image']:>11.2f}"
            for r in own["batches"]
        ]
    lines += [
        "",
        "closed loop",
        f"{'conc':>5} {'requests':>9} {'img/s':>8} {'/engines':>8} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
        f"{'batch img':>10} {'batch req':>10} {'CPU ms/img server':>17} {'client':>7}  errors",
    ]
    for r in report["closed_loop"]:
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        ratio = f"{r['over_engines']:.2f}x" if r.get("over_engines") else "-"
        lines.append(
            f"{r['concurrency']:>5} {r['requests']:>9} {f(r['images_per_s']):>8} {ratio:>8} "
            f"{f(r['p50_ms']):>9} {f(r['p95_ms']):>9} {f(r['p99_ms']):>9} "
            f"{f(r['mean_batch_images']):>10} {f(r['mean_batch_requests']):>10}"
            f" {f(r.get('server_cpu_ms_per_image')):>17} {f(r.get('client_cpu_ms_per_image')):>7}"
            f"  {r['errors'] or 'none'}"
        )
    o, rec = report["overload"], report["recovery"]
    lines += [
        "",
        f"open loop at {o['target_rate_per_s']} req/s (2x the sustainable {o['sustainable_rate_per_s']} req/s), "
        f"{o['sent']} requests over {o['sent_over_s']} s: status {o['status']}",
        f"  429: {o['share_429']:.1%}, p50 {o['p50_429_ms']} ms, p99 {o['p99_429_ms']} ms; "
        f"5xx: {o['server_errors_5xx']}; "
        f"accepted p50 {o['accepted']['p50_ms']} ms, p99 {o['accepted']['p99_ms']} ms",
        f"  server-side: {o['server_429_within_50ms']} of the 429s answered within 50 ms (its latency histogram)",
        f"  recovery to normal latency (<= {rec['threshold_ms']} ms): "
        + (f"{rec['recovery_s']} s after the overload stopped" if rec["recovered"] else "not within the probe window"),
        "",
        "targets: " + json.dumps(report["targets"]),
    ]
    return "\n".join(lines)


def plot(report: dict, path) -> Path:
    """Latency percentiles and throughput against concurrency, one PNG (matplotlib, the ``plot`` extra)."""
    from ..utils import atomic_write, import_pyplot

    plt = import_pyplot()

    rows = report["closed_loop"]
    cs = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        a.plot(cs, [r[key] for r in rows], marker="o", label=key.split("_")[0])
    a.set(xscale="log", xlabel="concurrency", ylabel="latency (ms)", title="latency")
    a.set_xticks(cs, [str(c) for c in cs])
    a.legend()
    b.plot(cs, [r["images_per_s"] for r in rows], marker="o", label="service, concurrency c")
    if report.get("engines"):
        own = report["engines"]["batches"]
        b.plot(
            [r["batch"] for r in own],
            [r["images_per_s"] for r in own],
            marker="s",
            linestyle="--",
            label="engines alone, batch c",
        )
        b.legend()
    b.set(xscale="log", xlabel="concurrency", ylabel="images / s", title="throughput")
    b.set_xticks(cs, [str(c) for c in cs])
    fig.suptitle(f"{report['url']} (n={report['settings']['n']}, {report['settings']['format']})")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="benchmark.py --serve", description="Load-test a running autodiffusion-rt service (loopback only)."
    )
    ap.add_argument("--serve", required=True, metavar="URL", help="the service, e.g. http://127.0.0.1:8000")
    ap.add_argument(
        "--concurrency",
        type=positive_ints,
        default=[1, 2, 4, 8, 16, 32],
        help="closed-loop levels (default 1,2,4,8,16,32)",
    )
    ap.add_argument("--requests", type=int, default=96, help="measured requests per level (default 96)")
    ap.add_argument("--n", type=int, default=1, help="images per request (default 1)")
    ap.add_argument("--format", default="png", choices=("png", "npy"))
    ap.add_argument("--plan", default=None, help="plan name (default: the server's default plan)")
    ap.add_argument("--overload-seconds", type=float, default=5.0, help="length of the 2x overload (default 5)")
    ap.add_argument(
        "--overload-requests", type=int, default=2000, help="at most this many overload requests (default 2000)"
    )
    ap.add_argument(
        "--recovery-limit", type=float, default=30.0, help="stop probing for recovery after this many s (default 30)"
    )
    ap.add_argument(
        "--engines",
        default=None,
        metavar="DIR",
        help="the engine dir the service serves: first measure its own throughput at batch sizes = the "
        "concurrency levels (Runtime.sample_requests, in this process, the service idle) and compare",
    )
    ap.add_argument(
        "--engine-seconds",
        type=float,
        default=2.0,
        help="time each batch size of the engines for at least this long (median; default 2)",
    )
    ap.add_argument(
        "--engine-threads", type=int, default=1, help="threads of those engines (the server's --threads; default 1)"
    )
    ap.add_argument(
        "--engine-spinning",
        choices=("on", "off"),
        default="on",
        help="onnxruntime's workers spin between ops (on: the engines' best on an idle machine; default on)",
    )
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON ('-' for stdout)")
    ap.add_argument("--plot", default=None, metavar="PNG", help="also plot latency and throughput against concurrency")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    from ..cli import run_command

    return run_command("benchmark", lambda: _load_test_command(args))


def _load_test_command(args) -> None:
    say = (lambda s: None) if args.quiet or args.json == "-" else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.requests < 1 or args.n < 1 or args.overload_requests < 1:
        raise LoadTestError(
            f"--requests={args.requests}, --n={args.n} and "
            f"--overload-requests={args.overload_requests} must be positive"
        )
    for option, value in (("--overload-seconds", args.overload_seconds), ("--recovery-limit", args.recovery_limit)):
        if not (math.isfinite(value) and 0 < value <= 3600):
            raise LoadTestError(f"{option} {value:g} must be a number of seconds in (0, 3600]")
    report = run(
        args.serve,
        concurrency=args.concurrency,
        requests=args.requests,
        n=args.n,
        fmt=args.format,
        plan=args.plan,
        overload_seconds=args.overload_seconds,
        overload_requests=args.overload_requests,
        recovery_limit_s=args.recovery_limit,
        engines=args.engines,
        engine_threads=args.engine_threads,
        engine_spinning=args.engine_spinning == "on",
        engine_seconds=args.engine_seconds,
        progress=say,
    )
    if args.plot:
        plot(report, args.plot)
    print_report(report, format_report, args.json)
