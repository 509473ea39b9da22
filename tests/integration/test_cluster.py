"""Issue 3: real daemons on loopback share their memory; peer faults stay invisible."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import socket
import threading
from pathlib import Path

import pytest
from support import drop_page_cache, free_port, in_thread, run_cli, wait_until

from memcachefs import mounts
from memcachefs.metrics import metric_names
from memcachefs.testing import MountedFS
from memcachefs.testing.faultproxy import BackgroundFaultProxy

pytestmark = pytest.mark.fuse

MiB = 1 << 20
SIZE = 12 * MiB + 12345  # 4 blocks of 4M, the last one short


def addr(port: int) -> str:
    return f"127.0.0.1:{port}"


@pytest.fixture
def memcachefs_mount(memcachefs_mount, tmp_path: Path):
    """Every instance shares one cluster secret (a listener needs one), unless given its own."""
    secret = tmp_path / "cluster-secret"
    secret.write_text("the cluster secret\n")
    secret.chmod(0o600)

    def factory(source: Path, *, args=(), **options):
        args = list(args)
        if "--cluster-secret-file" not in args:
            args += ["--cluster-secret-file", str(secret)]
        return memcachefs_mount(source, args=args, **options)

    return factory


@pytest.fixture
def source(memcachefs_source: Path) -> Path:
    (memcachefs_source / "model.bin").write_bytes(random.Random(7).randbytes(SIZE))
    return memcachefs_source


def warm_instance(memcachefs_mount, source: Path) -> tuple[MountedFS, int]:
    """An instance alone in its cluster that has read model.bin (all from the source)."""
    port = free_port()
    warm = memcachefs_mount(source, capacity="64M", args=["--listen", addr(port)])
    assert (warm.path / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
    assert warm.stats()["source_bytes"] == SIZE
    return warm, port


def test_a_new_instance_reads_from_its_warm_peer(source: Path, memcachefs_mount) -> None:
    warm, port = warm_instance(memcachefs_mount, source)
    new = memcachefs_mount(
        source, capacity="64M", args=["--listen", addr(free_port()), "--peer", addr(port)]
    )
    assert (new.path / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
    stats = new.stats()
    assert metric_names("cluster") | metric_names("peer_server") <= stats.keys()
    assert stats["source_bytes"] == 0
    assert stats["peer_bytes"] == SIZE
    assert stats["peer_hits"] == 4
    assert warm.stats()["blocks_served_to_peers"] == 4
    report = run_cli("stats", new.path)
    assert report.returncode == 0
    assert "from peers" in report.stdout and "peer errors" in report.stdout


def test_two_cold_instances_read_each_block_from_the_source_once(
    source: Path, memcachefs_mount
) -> None:
    port_a, port_b = free_port(), free_port()
    a = memcachefs_mount(
        source, capacity="64M", args=["--listen", addr(port_a), "--peer", addr(port_b)]
    )
    b = memcachefs_mount(
        source, capacity="64M", args=["--listen", addr(port_b), "--peer", addr(port_a)]
    )
    expected = (source / "model.bin").read_bytes()
    with in_thread((a.path / "model.bin").read_bytes) as from_a:
        from_b = (b.path / "model.bin").read_bytes()
        assert from_a() == expected
    assert from_b == expected
    stats_a, stats_b = a.stats(), b.stats()
    assert stats_a["source_bytes"] + stats_b["source_bytes"] == SIZE
    assert stats_a["peer_bytes"] + stats_b["peer_bytes"] == SIZE


@pytest.mark.parametrize(
    ("mode", "counters"),
    [
        ("flip", ["peer_errors_checksum"]),
        ("drop", ["peer_errors_closed"]),
        ("stall", ["peer_errors_timeout"]),
        ("version", ["peer_errors_version"]),
        # A reset that lands before connect() returns fails the connect itself.
        ("refuse", ["peer_errors_closed", "peer_errors_refused"]),
    ],
)
def test_peer_faults_are_invisible_to_readers(
    source: Path, memcachefs_mount, mode: str, counters: list[str]
) -> None:
    _warm, port = warm_instance(memcachefs_mount, source)
    with BackgroundFaultProxy(("127.0.0.1", port), mode=mode) as proxy:
        reader = memcachefs_mount(
            source,
            capacity="64M",
            args=["--peer", proxy.address, "--peer-timeout", "1"],
        )
        assert (reader.path / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
        stats = reader.stats()
        assert proxy.proxy.faults >= 1
        errors = sum(stats[counter] for counter in counters)
        assert errors >= 1, {k: v for k, v in stats.items() if k.startswith("peer")}
        assert stats["peer_bytes"] < SIZE  # what the faulty peer sent was not kept
        assert stats["source_bytes"] + stats["peer_bytes"] == SIZE


def test_a_dead_peer_is_refused_and_the_source_serves(source: Path, memcachefs_mount) -> None:
    reader = memcachefs_mount(source, capacity="64M", args=["--peer", addr(free_port())])
    assert (reader.path / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
    stats = reader.stats()
    # Only the fills started before the first refusal ask it (a reader and its
    # readahead); then it is down: no retry storm.
    assert 1 <= stats["peer_errors_refused"] == stats["peer_fetches"] <= 5
    assert stats["peers_down"] == 1
    assert stats["source_bytes"] == SIZE


def test_a_wrong_secret_gets_nothing(source: Path, tmp_path: Path, memcachefs_mount) -> None:
    secrets = []
    for name in ("one", "two"):
        path = tmp_path / f"secret-{name}"
        path.write_text(f"secret {name}\n")
        path.chmod(0o600)
        secrets.append(str(path))
    port = free_port()
    warm = memcachefs_mount(
        source, capacity="64M", args=["--listen", addr(port), "--cluster-secret-file", secrets[0]]
    )
    assert (warm.path / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
    other = memcachefs_mount(
        source, capacity="64M", args=["--peer", addr(port), "--cluster-secret-file", secrets[1]]
    )
    assert (other.path / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
    assert other.stats()["peer_errors_auth"] >= 1
    assert other.stats()["source_bytes"] == SIZE
    served = warm.stats()
    assert served["peer_auth_failures"] >= 1
    assert served["blocks_served_to_peers"] == 0


def test_an_instance_stopped_with_sigterm_leaves_its_peers_reading(
    source: Path, memcachefs_mount
) -> None:
    warm, port = warm_instance(memcachefs_mount, source)
    # The reader's cache is smaller than the file: it keeps asking its peer.
    reader = memcachefs_mount(
        source, capacity="8M", args=["--peer", addr(port), "--read-ahead", "0"]
    )
    expected = (source / "model.bin").read_bytes()
    first_pass = threading.Event()
    stopped = threading.Event()

    def read_until_after_stop() -> int:
        passes = 0
        while passes < 2 or not stopped.is_set():
            drop_page_cache(reader.path / "model.bin")
            assert (reader.path / "model.bin").read_bytes() == expected
            passes += 1
            first_pass.set()
            if passes > 200:
                break
        # Two more passes with the peer gone.
        for _ in range(2):
            drop_page_cache(reader.path / "model.bin")
            assert (reader.path / "model.bin").read_bytes() == expected
        return passes

    with in_thread(read_until_after_stop) as result:
        assert first_pass.wait(30)
        warm.signal(signal.SIGTERM)
        assert warm.wait(30) == 0
        stopped.set()
        assert result(60) >= 1
    assert not mounts.find_mount(warm.path)
    stats = reader.stats()
    assert stats["peer_bytes"] > 0
    assert stats["internal_errors"] == 0


def test_three_cold_instances_read_each_block_from_the_source_once(
    source: Path, memcachefs_mount
) -> None:
    ports = [free_port() for _ in range(3)]
    instances = [
        memcachefs_mount(
            source,
            capacity="64M",
            args=[
                "--listen",
                addr(port),
                *(a for p in ports if p != port for a in ("--peer", addr(p))),
            ],
        )
        for port in ports
    ]
    expected = (source / "model.bin").read_bytes()
    with (
        in_thread((instances[0].path / "model.bin").read_bytes) as first,
        in_thread((instances[1].path / "model.bin").read_bytes) as second,
    ):
        assert (instances[2].path / "model.bin").read_bytes() == expected
        assert first() == expected
        assert second() == expected
    stats = [fs.stats() for fs in instances]
    assert sum(s["source_bytes"] for s in stats) == SIZE
    assert all(s["members"] == 2 for s in stats)


def test_a_new_instance_reads_from_every_warm_peer(source: Path, memcachefs_mount) -> None:
    block = ["--block-size", "1M"]  # 13 blocks: enough to spread over two holders
    blocks = -(-SIZE // MiB)
    expected = (source / "model.bin").read_bytes()
    port_a, port_b = free_port(), free_port()
    a = memcachefs_mount(source, capacity="64M", args=[*block, "--listen", addr(port_a)])
    assert (a.path / "model.bin").read_bytes() == expected
    b = memcachefs_mount(
        source, capacity="64M", args=[*block, "--listen", addr(port_b), "--peer", addr(port_a)]
    )
    assert (b.path / "model.bin").read_bytes() == expected  # now A and B both hold it
    assert a.stats()["source_bytes"] == SIZE and b.stats()["source_bytes"] == 0
    served_before = a.stats()["blocks_served_to_peers"] + b.stats()["blocks_served_to_peers"]
    c = memcachefs_mount(
        source, capacity="64M", args=[*block, "--peer", addr(port_a), "--peer", addr(port_b)]
    )
    assert (c.path / "model.bin").read_bytes() == expected
    stats = c.stats()
    assert (stats["source_bytes"], stats["peer_bytes"], stats["peer_hits"]) == (0, SIZE, blocks)
    assert 0 <= stats["peer_holder_hits"] <= stats["peer_holder_fetches"]
    served = a.stats()["blocks_served_to_peers"] + b.stats()["blocks_served_to_peers"]
    assert served - served_before == blocks
    assert a.stats()["source_bytes"] == SIZE  # holders are asked from memory only


def open_flood(port: int, idle: int, garbage: int) -> list[socket.socket]:
    """`idle` connections that send nothing and `garbage` ones that send noise."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < idle + garbage + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    connections = []
    for n in range(idle + garbage):
        connection = socket.socket()
        connection.settimeout(2)
        try:
            connection.connect(("127.0.0.1", port))
            if n % 2 and garbage:  # interleaved, so both kinds hold the server at once
                garbage -= 1
                connection.sendall(os.urandom(64))
        except OSError:
            pass  # a full accept queue or a connection already displaced
        connections.append(connection)
    return connections


def test_a_connection_flood_does_not_starve_the_mount_or_its_peers(
    source: Path, memcachefs_mount
) -> None:
    port = free_port()
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, limit[0]), limit[1]))  # ulimit -Sn
    try:
        warm = memcachefs_mount(
            source,
            capacity="64M",
            args=["--listen", addr(port)],
            expected_log=["peer connections"],
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limit)
    expected = (source / "model.bin").read_bytes()
    assert (warm.path / "model.bin").read_bytes() == expected
    flood: list[socket.socket] = []
    with in_thread(lambda: flood.extend(open_flood(port, 5000, 5000))) as flooded:
        # A peer fetching from the flooded instance while the flood arrives.
        reader = memcachefs_mount(source, capacity="64M", args=["--peer", addr(port)])
        assert (reader.path / "model.bin").read_bytes() == expected
        flooded(120)
    try:
        drop_page_cache(warm.path / "model.bin")
        assert (warm.path / "model.bin").read_bytes() == expected  # local, from memory
        assert len(os.listdir(warm.path)) >= 1
        report = run_cli("stats", warm.path)
        assert report.returncode == 0, report
        stats = warm.stats()
        assert stats["peer_connections_displaced"] > 0
        assert stats["peer_connections"] <= 1024
        assert stats["source_bytes"] == SIZE  # nothing read twice
        reader_stats = reader.stats()
        assert (reader_stats["peer_hits"], reader_stats["source_bytes"]) == (4, 0)
        assert reader_stats["peer_errors_timeout"] == 0
    finally:
        for connection in flood:
            connection.close()


def test_peer_down_and_up_are_one_event_line_each(source: Path, memcachefs_mount) -> None:
    port = free_port()
    reader = memcachefs_mount(
        source, capacity="64M", args=["--peer", addr(port), "--log-format", "json"]
    )
    assert (reader.path / "model.bin").read_bytes() == (source / "model.bin").read_bytes()

    def events(name: str) -> list[dict]:
        entries = [json.loads(line) for line in reader.log_text().splitlines() if line.strip()]
        return [entry for entry in entries if entry.get("event") == name]

    (down,) = events("peer_down")  # one line, however many fills it failed
    assert down["peer"] == addr(port) and down["kind"] == "refused"
    memcachefs_mount(source, capacity="64M", args=["--listen", addr(port)])
    probes = iter(range(1000))

    def back() -> list[dict]:
        # A new file is a miss, and a miss asks the peer once its backoff is over.
        name = f"probe{next(probes)}.raw"
        (source / name).write_bytes(os.urandom(64 * 1024))
        (reader.path / name).read_bytes()
        return events("peer_up")

    (up,) = wait_until(back, "the peer_up event", interval_s=0.2)
    assert up["peer"] == addr(port) and up["failed_tries"] >= 1
