"""The benchmarks cannot rot: each preset of benchmarks/run.py runs end to end on tiny files.

Numbers are not checked (they are reported in benchmarks/README.md from full
runs); only that every scenario of a preset ran on real mounts, measured
something, and that the JSON, the markdown and the goals came out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memcachefs import mounts
from memcachefs.testing.plugin import require_fuse

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"
CORE_SCENARIOS = {
    "tmpfs",
    "reference",
    "memcachefs_cached",
    "memcachefs_cached_nopush",
    "memcachefs_repeat",
    "memcachefs_repeat_steady",
    "source_raw",
    "memcachefs_cold",
}
SUITE_SCENARIOS = {  # suite --smoke: everything but the alternatives (they need S3)
    "source_raw",
    "shm_copy",
    "shm_copy_read",
    "tmpfs",
    "loopback_tcp",
    "reference",
    "safetensors_tmpfs",
    "ttfb_source",
    "memcachefs_cold",
    "memcachefs_cached",
    "memcachefs_repeat",
    "memcachefs_first_after_warmup",
    "memcachefs_safetensors",
    "memcachefs_random_4m",
    "memcachefs_ttfb_cold",
    "memcachefs_ttfb_warm",
    "memcachefs_remote_hit",
    "memcachefs_cold_1_instance",
    "memcachefs_cold_3_instances",
}


@pytest.fixture
def fuse_required() -> None:
    require_fuse()


def _run(
    preset: str, tmp_path: Path, timeout_s: float = 120, codes: tuple[int, ...] = (0,)
) -> tuple[dict[str, Any], str, str]:
    """run.py PRESET --smoke, which exits with one of `codes`; (the JSON, the markdown
    file, stdout)."""
    out, md, work = tmp_path / f"{preset}.json", tmp_path / f"{preset}.md", tmp_path / "work"
    outputs = ["--json", str(out), "--markdown", str(md), "--png", str(tmp_path / "chart.png")]
    result = subprocess.run(
        [sys.executable, str(RUNNER), preset, "--smoke", "--workdir", str(work), *outputs],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode in codes, result.stdout + result.stderr
    # Nothing stays mounted under the work directory.
    assert not [entry for entry in mounts.mount_entries() if entry.mountpoint.startswith(str(work))]
    return json.loads(out.read_text()), md.read_text(), result.stdout


def _check_scenarios(data: dict[str, Any], expected: set[str]) -> None:
    assert set(data["scenarios"]) == expected
    assert set(data["order"]) == expected
    for name, scenario in data["scenarios"].items():
        assert scenario["repetitions"] >= 1, name
        assert all(gbps > 0 for gbps in scenario["samples_gbps"]), name
        if scenario["unit"] == "GB/s" and name not in (
            "loopback_tcp",
            "memcachefs_cold_3_instances",
        ):
            size = data["model_bytes"] if "safetensors" in name or "instance" in name else None
            assert scenario["bytes_per_read"] == (size or data["size_bytes"]), name


@pytest.mark.usefixtures("fuse_required")
def test_core_smoke(tmp_path: Path) -> None:
    data, md, stdout = _run("core", tmp_path)
    _check_scenarios(data, CORE_SCENARIOS)
    # the daemons' counters: a cold-page-cache read reached the daemon, the cold one the source
    cached = data["scenarios"]["memcachefs_cached_nopush"]["counters"]
    assert cached["memory_bytes"] == [data["size_bytes"]]
    assert data["scenarios"]["memcachefs_cold"]["counters"]["source_bytes"] == [data["size_bytes"]]
    assert [g["status"] for g in data["goals"]] and "not measured" not in str(data["goals"])
    for name in CORE_SCENARIOS:
        assert f"| {name} |" in md
    assert "| goal | measured | status |" in md
    assert "memcachefs_cached_nopush" in stdout and "|" not in stdout  # plain-text columns


@pytest.mark.usefixtures("fuse_required")
def test_suite_smoke(tmp_path: Path) -> None:
    data, md, _ = _run("suite", tmp_path)
    _check_scenarios(data, SUITE_SCENARIOS)
    hit = data["scenarios"]["memcachefs_remote_hit"]["counters"]
    assert hit["peer_bytes"] == [data["size_bytes"]] and hit["source_bytes"] == [0]
    goals = {g["text"]: g for g in data["goals"]}
    assert goals["remote hit >= 0.6x loopback TCP"]["ratio"] > 0
    assert any(g["status"] == "not measured" for g in goals.values())  # rclone, s3fs: need S3
    assert "| goal (issue 4 item 5) | measured | status |" in md
    assert "the alternatives (rclone, s3fs use_cache) need --source s3" in md
    _check_switch(data["switch"])  # the suite's model-switch part
    assert "| model-switch goal (issue 8 item 3) | measured | status |" in md


@pytest.mark.usefixtures("fuse_required")
def test_rss_smoke(tmp_path: Path) -> None:
    data, md, _ = _run("rss", tmp_path)
    assert data["ok"], data["checks"]
    assert data["bytes_read"] > 0
    assert data["throughput_gbps"] > 0
    assert data["peak_rss_hwm_bytes"] <= data["bound_bytes"]
    assert data["max_used_bytes"] <= data["capacity_bytes"]
    assert "| result | PASS |" in md


@pytest.mark.usefixtures("fuse_required")
def test_switch_smoke(tmp_path: Path) -> None:
    """8 MiB checkpoints, one repetition, a local source: every load ran and was verified."""
    data, md, _ = _run("switch", tmp_path)
    _check_switch(data)
    assert "| model-switch goal (issue 8 item 3) | measured | status |" in md
    assert "| checkpoint | source mount, s | memcachefs cold, s |" in md


@pytest.mark.usefixtures("fuse_required")
def test_metadata_smoke(tmp_path: Path) -> None:
    """2,000 empty files, capacities 4M and 16M (8 MiB of blocks read first): every step
    timed on the source and the mount, the counters read, the RSS bound judged."""
    data, md, _ = _run("metadata", tmp_path)
    assert data["ok"] and data["entries"] == 2000
    steps = {"ls_l_cold", "ls_l_warm", "find_ls", "ls_wc", "xattr_sweep"}
    assert [c["capacity_bytes"] for c in data["cases"]] == [4 << 20, 16 << 20]
    assert [c["blocks_read_bytes"] for c in data["cases"]] == [0, 8 << 20]
    for case in data["cases"]:
        assert set(case["ratios"]) == steps
        assert all(case["source_s"][s] and case["memcachefs_s"][s] for s in steps)
        assert all(r > 0 for r in case["ratios"].values())
        assert case["rss_ok"] and max(case["peak_rss_bytes"]) <= case["bound_bytes"]
        assert case["bound_bytes"] > case["data_bound_bytes"]  # the metadata options' share
        assert case["inodes"][0] >= 2000  # the listing reached the daemon
        # the second sweep of xattrs is answered by the cache: no call to the source
        assert case["counters"]["ls_l_warm"]["xattr_source_calls"] == [0]
    assert data["cases"][1]["rss_after_blocks_bytes"][0] > 8 << 20
    assert len(data["metadata_goals"]) == 4 * len(data["cases"])
    assert "| metadata goal (issue 10 items 4, 5) | measured | status |" in md
    assert "| 4.0M | ls_l_cold |" in md


def _check_switch(data: dict[str, Any]) -> None:
    assert data["ok"] and data["mismatches"] == []
    assert data["loaders"][:2] == ["load_file", "safe_open_shuffled"]
    (checkpoint,) = data["checkpoints"]
    assert checkpoint["size"] == 8 * 1024 * 1024 and checkpoint["tensors"] > 10
    places = {"source", "cold", "local_cold", "local_warm", "remote", "tmpfs"}
    expected = {f"{loader} 8M {place}" for loader in data["loaders"] for place in places}
    expected.add("safe_open_file_order 8M cold")
    assert set(data["scenarios"]) == expected
    for name, scenario in data["scenarios"].items():
        assert scenario["repetitions"] == 1, name
        assert scenario["extra"]["verified"] == [True], name  # the digest of the tmpfs load
        assert scenario["bytes_per_read"] == checkpoint["bytes"], name
    assert data["verified_loads"] == len(expected)
    for loader in data["loaders"]:
        cold = data["scenarios"][f"{loader} 8M cold"]["counters"]
        assert cold["source_bytes"] == [checkpoint["bytes"]]
        remote = data["scenarios"][f"{loader} 8M remote"]["counters"]
        assert remote["peer_bytes"] == [checkpoint["bytes"]] and remote["source_bytes"] == [0]
    goals = data["switch_goals"]
    assert len(goals) == 3 * len(data["loaders"]) + 1
    assert all(g["ratio"] and g["ratio"] > 0 for g in goals), goals


@pytest.mark.usefixtures("fuse_required")
def test_peerlink_smoke(tmp_path: Path) -> None:
    """16 MiB over a 1gbit veth: every remote byte came from the peer in the namespace."""
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")):
        pytest.skip("peerlink needs root, ip and tc (a network namespace)")
    data, md, _ = _run("peerlink", tmp_path)
    assert data["ok"] and data["size"] == 16 * 1024 * 1024
    (rate,) = data["rates"]
    assert rate["rate"] == "1gbit" and rate["raw_tcp_gbps"] > 0 and rate["tbf_burst_bytes"]
    for kind, size in (("read", data["size"]), ("load", data["model_bytes"])):
        (sample,) = rate[kind]["samples"]
        assert sample["bytes"] == size and sample["verified"], kind
        assert sample["peer_bytes"] == size and sample["source_bytes"] == 0, kind
        assert rate[kind]["gbps"] > 0 and rate[kind]["ratio"] > 0, kind
    assert "| link | raw TCP GB/s | remote read GB/s |" in md
    assert not Path("/run/netns/mcfs-peer").exists()  # torn down


@pytest.mark.usefixtures("fuse_required")
def test_soak_smoke(tmp_path: Path) -> None:
    """One cycle of every fault on a 3-instance cluster with 32M each: the run exits 0
    only if every contract check held; here, that each fault was injected and judged."""
    data, md, _ = _run("soak", tmp_path, timeout_s=400, codes=(0, 1))
    failed = {name for name, ok in data["checks"].items() if not ok}
    assert not failed, failed
    counts = data["counts"]
    assert counts["verified_bytes"] > 0 and counts["opens"] > 0
    for wrong in ("wrong_bytes", "mixed_bytes", "handle_mixed_bytes", "size_errors"):
        assert counts.get(wrong, 0) == 0, wrong
    faults = data["faults"]
    for kind in ("version_flip", "reader_sigkill", "instance_sigkill", "instance_restart"):
        assert faults.get(kind, 0) >= 1, kind
    assert faults["source_stall"] == 1 and faults["connection_flood"] == 1
    assert data["floods"][0]["connections"] == 1000
    (probe,) = data["stall_probes"]
    assert probe["finished_while_stalled"] and probe["mounts"] == 3 and not probe["problems"]
    assert all(not e["unexpected"] for e in data["errors"].values()), data["errors"]
    assert data["memory_limit"] in ("cgroup v2", "cgroup v1", "not applied")
    assert [i["instance"] for i in data["instances"]] == [0, 1, 2]
    assert sum(i["processes"] for i in data["instances"]) == 4  # one instance restarted
    for instance in data["instances"]:
        assert instance["exit"] == 0 and instance["end"]["settled"], instance
        assert instance["peak_rss_bytes"] <= data["bound_bytes"]
    assert "| result | PASS |" in md
    assert "| instance | processes | peak RSS (VmHWM) / bound |" in md


def test_presets_are_registered() -> None:
    listing = subprocess.run(
        [sys.executable, str(RUNNER), "--list"], capture_output=True, text=True, check=True
    ).stdout
    for preset in ("core:", "suite:", "rss:", "switch:", "metadata:", "peerlink:", "soak:"):
        assert preset in listing
    several = subprocess.run(
        [sys.executable, str(RUNNER), "core", "--size", "1M,2M"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert several.returncode == 2 and "for the switch preset" in several.stderr


def test_latency_proxy(tmp_path: Path) -> None:
    """The object-store profile's proxy: each request waits the latency, each connection
    is paced to its rate, and two connections together get twice that."""
    import socket
    import threading
    import time

    answer = 1_000_000  # bytes per request; at 40mbit (5 MB/s): 0.2 s less a 50 ms burst
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while conn.recv(4096):  # one request a recv (small, one line)
                conn.sendall(b"x" * answer)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, str(RUNNER.with_name("latencyproxy.py")), "--listen"]
    argv += [f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{server.getsockname()[1]}"]
    argv += ["--latency-ms", "50", "--per-connection-rate", "40mbit"]
    proxy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proxy.stdout is not None and proxy.stdout.readline() == b"ready\n"

        def request(conn: socket.socket) -> tuple[float, float]:
            start = time.perf_counter()
            conn.sendall(b"GET / HTTP/1.1\r\n\r\n")
            got = len(conn.recv(65536))
            first = time.perf_counter() - start
            while got < answer:
                got += len(conn.recv(1 << 20))
            return first, time.perf_counter() - start

        with socket.create_connection(("127.0.0.1", port)) as conn:
            for _ in range(2):  # a new connection, then kept alive: both pay the latency
                first, total = request(conn)
                assert 0.045 <= first < 0.5
                assert total >= 0.05 + 0.14  # paced: 1 MB at 5 MB/s, less the burst
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        times: list[float] = []
        threads = [threading.Thread(target=lambda c=c: times.append(request(c)[1])) for c in conns]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        for conn in conns:
            conn.close()
        assert wall < 2 * 0.05 + 2 * 0.2  # in parallel: about the time of one, not two
    finally:
        proxy.terminate()
        _, err = proxy.communicate(timeout=10)
        server.close()
    (counters,) = [line for line in err.decode().splitlines() if line.startswith("{")]
    assert json.loads(counters)["requests"] == 4, err


@pytest.mark.usefixtures("fuse_required")
def test_bench_flood_smoke(tmp_path: Path) -> None:
    """bench_flood.py runs end to end on a small file and a small flood (the speed
    ratio decides only its exit status, 0 or 1, which is not checked here)."""
    out = tmp_path / "flood.json"
    argv = [sys.executable, str(RUNNER.with_name("bench_flood.py")), "--size", "8M"]
    argv += ["--passes", "1", "--idle", "100", "--garbage", "100", "--settle", "0.2"]
    result = subprocess.run(
        [*argv, "--json", str(out)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    data = json.loads(out.read_text())
    assert data["size_bytes"] == 8 * 1024 * 1024
    assert data["flood_connections"] == 200
    assert data["quiet_gbps"] > 0 and data["flooded_gbps"] > 0
    assert data["peer_protocol_errors"] > 0  # the garbage connections reached the server
