"""`quantdiff serve` under sustained load from a second process on loopback.

A real ``quantdiff serve`` process on a tiny SD1.5 pipeline gets 200 requests from 16 concurrent clients:
valid ones, invalid ones (bad fields, bad JSON, nesting too deep, a 5000-digit number), and oversized
bodies (declared and chunked). Every request must get its exact answer (200 with an image or 503 for a
valid one, 400 for an invalid one, 413 for an oversized one), the request log must hold one line per
request, the server's RSS must stay bounded, and the server must be healthy at the end and stop cleanly.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from PIL import Image

from quantdiff.testing.tiny import save_tiny_pipeline

REQUESTS = 200
CONCURRENCY = 16
LOAD_SECONDS = 10.0
"""Request i is sent at i * LOAD_SECONDS / REQUESTS (or as soon as one of the 16 clients is free): sustained."""
QUEUE_SIZE = 8
RSS_GROWTH_LIMIT = 200 * 2**20
"""Generous: what matters is that it does not grow with the number of requests (measured: tens of MiB)."""


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory) -> Path:
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("load") / "sd15", seed=0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _request(port: int, body: bytes, *, chunked: bool = False) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        headers = {"Content-Type": "application/json"}
        if chunked:
            connection.request("POST", "/api/generate", body=iter([body[i : i + 8192] for i in range(0, len(body), 8192)]),
                               headers=headers, encode_chunked=True)  # fmt: skip
        else:
            connection.request("POST", "/api/generate", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _mix(index: int) -> tuple[str, bytes, bool]:
    """Request ``index`` of the load: (kind, body, chunked). Kinds: valid, invalid, oversized."""
    slot = index % 10
    if slot < 5:
        return "valid", json.dumps({"prompt": f"a cat {index}", "steps": 1, "seed": index}).encode(), False
    if slot == 5:
        return "invalid", json.dumps({"prompt": "x", "steps": "2"}).encode(), False
    if slot == 6:
        return (
            "invalid",
            [b"{not json", b"[" * 20000, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}"][index % 3],
            False,
        )
    if slot == 7:
        return "invalid", json.dumps({"prompt": "", "cfg": 3} if index % 2 else {"prompt": "   "}).encode(), False
    if slot == 8:
        return "oversized", json.dumps({"prompt": "x" * 200_000}).encode(), False
    return "oversized", json.dumps({"prompt": "y" * 100_000}).encode(), True


EXPECTED = {"valid": {200, 503}, "invalid": {400}, "oversized": {413}}


def test_serve_under_sustained_load(tiny_sd15, tmp_path, capsys):
    port = _free_port()
    log = tmp_path / "requests.jsonl"
    command = [sys.executable, "-m", "quantdiff.cli", "--quiet", "serve", str(tiny_sd15), "--port", str(port)]
    command += ["--log", str(log), "--outputs", str(tmp_path / "images"), "--queue-size", str(QUEUE_SIZE)]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/api/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "the server did not start in 120 s"
                time.sleep(0.3)
        # Warm up (first-call allocations), then measure.
        assert _request(port, json.dumps({"prompt": "warm up", "steps": 1, "seed": 0}).encode())[0] == 200
        process = psutil.Process(server.pid)
        rss_before = process.memory_info().rss

        def one(index: int) -> tuple[str, int, dict, float]:
            kind, body, chunked = _mix(index)
            time.sleep(max(0.0, begin + index * LOAD_SECONDS / REQUESTS - time.perf_counter()))
            started = time.perf_counter()
            status, answer = _request(port, body, chunked=chunked)
            return kind, status, answer, time.perf_counter() - started

        begin = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            answers = list(pool.map(one, range(REQUESTS)))
        seconds = time.perf_counter() - begin
        rss_after = process.memory_info().rss

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/api/health")
        health = connection.getresponse()
        assert health.status == 200 and json.loads(health.read())["status"] == "ok"
    finally:
        server.send_signal(signal.SIGINT)
        try:
            output = server.communicate(timeout=60)[0].decode()
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode in (0, 130), output[-3000:]

    statuses = Counter((kind, status) for kind, status, _, _ in answers)
    latencies = sorted(latency for *_, latency in answers)
    with capsys.disabled():
        print(
            f"\nload: {REQUESTS} requests, {CONCURRENCY} concurrent, in {seconds:.1f} s "
            f"({REQUESTS / seconds:.1f} req/s); answers {dict(sorted(statuses.items()))}; "
            f"latency p50 {latencies[len(latencies) // 2]:.2f} s, p95 {latencies[int(len(latencies) * 0.95)]:.2f} s, "
            f"max {latencies[-1]:.2f} s; server RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
        )
    for kind, status, answer, _ in answers:
        assert status in EXPECTED[kind], (kind, status, answer)
        if status == 200:
            image = Image.open(io.BytesIO(base64.b64decode(answer["image_png_base64"])))
            assert image.format == "PNG" and "Steps: 1" in image.text["parameters"]
        elif status == 503:
            assert answer["error"].startswith("the queue is full")
        elif status == 413:
            assert answer["error"] == "the request body is larger than 64 KiB: send a shorter request"
        else:
            assert answer["error"] and "\n" not in answer["error"]
    served = sum(1 for kind, status, _, _ in answers if status == 200)
    assert served >= QUEUE_SIZE  # at least a full queue's worth of valid requests is generated
    assert rss_after - rss_before < RSS_GROWTH_LIMIT

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 1 + REQUESTS  # the warm-up and every request: nothing lost, nothing doubled
    logged = Counter(line["status"] for line in lines[1:])
    assert logged == {"ok": served, "error": REQUESTS - served}
    refused = Counter(line["error_type"] for line in lines if line["status"] == "error")
    assert refused["BodyTooLargeError"] == sum(1 for kind, *_ in answers if kind == "oversized")
    assert refused["QueueFullError"] == sum(1 for _, status, *_ in answers if status == 503)
