"""Issue 7, item 3: the operators' HTTP listener on a real mount: /metrics equals
`memcachefs stats --json` after a known read, /ready, /healthz, /stats, and idle or
malformed clients do not disturb reads."""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, run_cli, wait_until

from memcachefs.httpd import metric_name
from memcachefs.metrics import all_metrics

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _answers(port: int) -> bool:
    try:
        return _get(port, "/ready")[0] == 200
    except OSError:
        return False


@pytest.fixture
def http_mount(memcachefs_source: Path, memcachefs_mount):  # type: ignore[no-untyped-def]
    payload = random.Random(7).randbytes(2 * MiB + 11)
    (memcachefs_source / "model.bin").write_bytes(payload)
    port = free_port()
    fs = memcachefs_mount(
        memcachefs_source,
        capacity="32M",
        args=["--block-size", "1M", "--http-address", f"127.0.0.1:{port}"],
    )
    wait_until(lambda: _answers(port), "the HTTP listener")
    return fs, port, payload


def test_metrics_equal_stats_after_a_known_read(http_mount) -> None:  # type: ignore[no-untyped-def]
    fs, port, payload = http_mount
    assert (fs.path / "model.bin").read_bytes() == payload
    wait_until(  # nothing in the background moves the counters between the two reads
        lambda: (
            not any(
                fs.stats()[gauge]
                for gauge in (
                    "fills_in_flight",
                    "prefetches_in_flight",
                    "page_cache_pushes_in_flight",
                )
            )
        ),
        "fills, prefetches and pushes to finish",
    )
    stats = json.loads(run_cli("stats", fs.path, "--json").stdout)
    status, body = _get(port, "/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    registry = all_metrics()
    compared = 0
    for key, value in stats.items():
        metric = registry.get(key)
        # The getxattr of `stats` is itself a request in flight; rss and uptime move.
        if metric is None or key in ("rss_bytes", "uptime_s", "requests_in_flight"):
            continue
        if key.startswith("peer_errors_"):
            continue  # no cluster here
        assert samples[metric_name(key, metric.kind), ()] == value, key
        compared += 1
    assert compared > 30
    assert stats["source_bytes"] == len(payload)
    assert samples["memcachefs_source_bytes_total", ()] == len(payload)
    assert samples["memcachefs_source_block_read_seconds_count", ()] >= 3

    status, body = _get(port, "/stats")
    assert status == 200
    assert json.loads(body)["source_bytes"] == len(payload)
    assert _get(port, "/healthz")[0] == 200
    status, body = _get(port, "/ready")
    assert (status, json.loads(body)["ready"]) == (200, True)
    assert _get(port, "/nowhere")[0] == 404


def test_idle_and_malformed_clients_do_not_disturb_reads(http_mount) -> None:  # type: ignore[no-untyped-def]
    fs, port, payload = http_mount
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        idle[0].sendall(b"GARBAGE \x00\x01 nonsense\r\n\r\n")
        idle[1].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        started = time.monotonic()
        assert (fs.path / "model.bin").read_bytes() == payload
        assert time.monotonic() - started < 5
        assert _get(port, "/healthz")[0] == 200
    finally:
        for sock in idle:
            sock.close()


def test_a_busy_http_port_is_an_error_and_nothing_is_mounted(tmp_path: Path) -> None:
    from memcachefs import mounts

    source, mountpoint = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "mount", source, mountpoint, "--capacity", "16M", "--http-address", f"127.0.0.1:{port}"
        )
    assert result.returncode == 2, result
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in result.stderr
    assert result.stderr.count("\n") == 1
    assert mounts.find_mount(mountpoint) is None
