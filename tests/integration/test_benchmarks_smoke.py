"""The benchmarks cannot rot: their smoke modes run end to end on tiny files.

Numbers are not checked (they are reported in benchmarks/README.md from full
runs); only that every scenario ran and measured something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memcachefs import mounts
from memcachefs.testing import fuse_available

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
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


@pytest.fixture
def fuse_required() -> None:
    reason = fuse_available()
    if reason is not None:
        if os.environ.get("MEMCACHEFS_REQUIRE_FUSE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _run(script: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    work = tmp_path / "work"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / script),
            "--smoke",
            "--workdir",
            str(work),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Nothing stays mounted under the work directory.
    assert not [entry for entry in mounts.mount_entries() if entry.mountpoint.startswith(str(work))]
    return json.loads(out.read_text())


@pytest.mark.usefixtures("fuse_required")
def test_bench_core_smoke(tmp_path: Path) -> None:
    data = _run("bench_core.py", tmp_path)
    assert set(data["scenarios"]) == CORE_SCENARIOS
    for name, scenario in data["scenarios"].items():
        assert scenario["repetitions"] >= 1, name
        assert scenario["samples_gbps"], name
        assert all(gbps > 0 for gbps in scenario["samples_gbps"]), name
        assert scenario["bytes_per_read"] == data["size_bytes"], name


@pytest.mark.usefixtures("fuse_required")
def test_bench_rss_smoke(tmp_path: Path) -> None:
    data = _run("bench_rss.py", tmp_path)
    assert data["ok"], data["checks"]
    assert data["bytes_read"] > 0
    assert data["throughput_gbps"] > 0
    assert data["peak_rss_hwm_bytes"] <= data["bound_bytes"]
    assert data["max_used_bytes"] <= data["capacity_bytes"]


SUITE_SCENARIOS = {  # bench_suite.py --smoke: everything but the alternatives (need S3)
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


@pytest.mark.usefixtures("fuse_required")
def test_bench_suite_smoke(tmp_path: Path) -> None:
    out, work = tmp_path / "suite.json", tmp_path / "work"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_suite.py"),
            "--smoke",
            "--workdir",
            str(work),
            "--json",
            str(out),
            "--png",
            str(tmp_path / "suite.png"),
            "--markdown",
            str(tmp_path / "suite.md"),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [entry for entry in mounts.mount_entries() if entry.mountpoint.startswith(str(work))]
    data = json.loads(out.read_text())
    assert set(data["scenarios"]) == SUITE_SCENARIOS
    for name, scenario in data["scenarios"].items():
        assert scenario["repetitions"] >= 1, name
        assert all(gbps > 0 for gbps in scenario["samples_gbps"]), name
    assert data["goals"] and "| goal (issue 4 item 5)" in (tmp_path / "suite.md").read_text()
