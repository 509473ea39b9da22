"""Issue 7, items 1 and 2: `memcachefs warm` (load, --check, --evict, refusals, source
failures, Ctrl-C) and readiness at start (`--warm`, `--ready-file`, /ready, --wait-warm)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support import DEADLINE_S, MEMCACHEFS, free_port, run_cli, wait_until

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def _files(source: Path) -> dict[str, bytes]:
    files = {
        "models/sd/unet.safetensors": random.Random(1).randbytes(3 * MiB + 17),
        "models/sd/vae.bin": random.Random(2).randbytes(MiB),
        "models/lora/style.safetensors": random.Random(3).randbytes(512 * 1024),
        "other.txt": b"not a model\n",
    }
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    return files


def _warm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli("warm", *args)


def test_warm_loads_through_the_daemon_and_a_repeat_reads_nothing(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    files = _files(memcachefs_source)
    fs = memcachefs_mount(
        memcachefs_source, capacity="32M", args=["--block-size", "1M", "--no-prefetch"]
    )
    models = {name: data for name, data in files.items() if name.startswith("models/")}
    size = sum(map(len, models.values()))

    result = _warm(fs.path / "models", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files"] == summary["files_done"] == len(models)
    assert summary["total_bytes"] == size
    assert summary["source_bytes"] == size  # loaded by the daemon, from the source
    assert summary["memory_bytes"] == summary["peer_bytes"] == 0
    assert summary["errors"] == []
    stats = fs.stats()
    assert stats["source_bytes"] == size
    assert stats["warm_files"] == len(models)
    assert stats["used_bytes"] == size

    again = _warm(fs.path / "models", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["memory_bytes"] == size
    assert fs.stats()["source_bytes"] == size  # a resident set reads nothing again
    for name, data in models.items():  # and reads are served from memory
        assert (fs.path / name).read_bytes() == data
    assert fs.stats()["source_bytes"] == size

    # A glob pattern (quoted: warm expands it) names the same files.
    glob = _warm(f"{fs.path}/**/*.safetensors", "--json")
    assert json.loads(glob.stdout)["files"] == 2


def test_check_and_evict(memcachefs_source: Path, memcachefs_mount) -> None:
    files = _files(memcachefs_source)
    fs = memcachefs_mount(
        memcachefs_source, capacity="32M", args=["--block-size", "1M", "--no-prefetch"]
    )
    unet = fs.path / "models/sd/unet.safetensors"
    assert _warm(unet).returncode == 0

    check = _warm("--check", "--json", fs.path / "models")
    assert check.returncode == 0, check.stderr
    rows = {Path(row["path"]).name: row for row in json.loads(check.stdout)["files"]}
    assert rows["unet.safetensors"]["resident_bytes"] == len(files["models/sd/unet.safetensors"])
    assert rows["unet.safetensors"]["resident_percent"] == 100.0
    assert rows["vae.bin"]["resident_bytes"] == 0
    text = _warm("--check", unet)
    assert "100.0%" in text.stdout, text.stdout
    source_bytes = fs.stats()["source_bytes"]
    assert source_bytes == len(files["models/sd/unet.safetensors"])  # --check loaded nothing

    evict = _warm("--evict", unet)
    assert evict.returncode == 0, evict.stderr
    assert fs.stats()["used_bytes"] == 0
    after = json.loads(_warm("--check", "--json", unet).stdout)["files"][0]
    assert after["resident_bytes"] == 0
    # Its pages left the page cache too: reading it again goes to the source.
    assert unet.read_bytes() == files["models/sd/unet.safetensors"]
    assert fs.stats()["source_bytes"] == 2 * source_bytes


def test_refusals_load_nothing(memcachefs_source: Path, memcachefs_mount, tmp_path: Path) -> None:
    _files(memcachefs_source)
    (memcachefs_source / "huge.dat").write_bytes(b"h" * (9 * MiB))
    fs = memcachefs_mount(memcachefs_source, capacity="8M", args=["--block-size", "1M"])

    too_big = _warm(fs.path)
    assert too_big.returncode == 2
    assert len(too_big.stderr.strip().splitlines()) == 1
    assert "capacity" in too_big.stderr, too_big.stderr
    elsewhere = _warm(tmp_path)
    assert elsewhere.returncode == 2
    assert "not under a memcachefs mount" in elsewhere.stderr
    missing = _warm(fs.path / "nope.bin")
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    nothing = _warm(f"{fs.path}/*.gguf")
    assert nothing.returncode == 2
    assert "matches nothing" in nothing.stderr
    assert fs.stats()["source_bytes"] == 0


def test_a_source_failure_exits_1_naming_the_file(fault_source, memcachefs_mount) -> None:
    (fault_source.backing / "good.bin").write_bytes(b"g" * MiB)
    (fault_source.backing / "bad.eio.bin").write_bytes(b"b" * MiB)
    fs = memcachefs_mount(
        fault_source.path,
        capacity="16M",
        args=["--block-size", "256K", "--no-prefetch"],
        expected_log=[r"bad\.eio"],
    )
    result = _warm(fs.path)
    assert result.returncode == 1
    assert "bad.eio.bin" in result.stderr
    assert "1 of 2 files resident" in result.stdout
    assert (
        json.loads(_warm("--check", "--json", fs.path / "good.bin").stdout)["files"][0][
            "resident_percent"
        ]
        == 100.0
    )


def test_ctrl_c_stops_the_warm_up_and_the_mount_keeps_serving(
    fault_source, memcachefs_mount
) -> None:
    (fault_source.backing / "cached.bin").write_bytes(b"c" * MiB)
    (fault_source.backing / "cold.bin").write_bytes(b"x" * (4 * MiB))
    fs = memcachefs_mount(
        fault_source.path, capacity="16M", args=["--block-size", "1M", "--no-prefetch"]
    )
    assert (fs.path / "cached.bin").read_bytes() == b"c" * MiB
    assert (fs.path / "cold.bin").stat().st_size == 4 * MiB  # known: answered while stalled
    fault_source.stall_file.touch()
    try:
        warm = subprocess.Popen(
            [*MEMCACHEFS, "warm", str(fs.path / "cold.bin")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert wait_until(lambda: fs.stats()["warm_jobs_in_flight"] == 1, DEADLINE_S)
        warm.send_signal(signal.SIGINT)
        _, stderr = warm.communicate(timeout=DEADLINE_S)
        assert warm.returncode == 130
        assert "stopped" in stderr
        assert wait_until(lambda: fs.stats()["warm_jobs_in_flight"] == 0, DEADLINE_S)
        assert (fs.path / "cached.bin").read_bytes() == b"c" * MiB  # still serving
    finally:
        fault_source.stall_file.unlink()


def _ready(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_warm_at_start_then_ready(
    memcachefs_source: Path, memcachefs_mount, tmp_path: Path
) -> None:
    (memcachefs_source / "models").mkdir()
    data = random.Random(4).randbytes(2 * MiB)
    (memcachefs_source / "models" / "m.safetensors").write_bytes(data)
    ready_file = tmp_path / "ready"
    port = free_port()
    fs = memcachefs_mount(
        memcachefs_source,
        capacity="16M",
        args=[
            "--block-size", "1M",
            "--warm", "**/*.safetensors",
            "--warm", "nothing/*.gguf",
            "--ready-file", str(ready_file),
            "--http-address", f"127.0.0.1:{port}",
        ],
        expected_log=[r"--warm nothing/\*\.gguf names no file"],
    )  # fmt: skip
    assert wait_until(ready_file.exists, DEADLINE_S)
    status, progress = _ready(port)
    assert status == 200
    assert progress["ready"] is True
    assert progress["warm"]["files"] == progress["warm"]["files_done"] == 1  # type: ignore[index]
    assert progress["warm"]["source_bytes"] == len(data)  # type: ignore[index]
    stats = fs.stats()
    assert stats["used_bytes"] == stats["source_bytes"] == len(data)
    assert (fs.path / "models" / "m.safetensors").read_bytes() == data
    assert fs.stats()["source_bytes"] == len(data)  # the read found it resident
    assert fs.unmount() == 0
    assert not ready_file.exists()  # removed at unmount


def test_not_ready_while_a_warm_file_fails(fault_source, memcachefs_mount, tmp_path: Path) -> None:
    (fault_source.backing / "bad.eio.bin").write_bytes(b"b" * MiB)
    (fault_source.backing / "notes.txt").write_text("hello")
    ready_file = tmp_path / "ready"
    port = free_port()
    fs = memcachefs_mount(
        fault_source.path,
        capacity="16M",
        args=[
            "--block-size", "1M",
            "--warm", "*.eio.bin",
            "--ready-file", str(ready_file),
            "--http-address", f"127.0.0.1:{port}",
        ],
        expected_log=[r"bad\.eio", r"could not be loaded"],
    )  # fmt: skip
    assert wait_until(lambda: fs.stats()["warm_errors"] >= 1, DEADLINE_S)
    status, progress = _ready(port)
    assert status == 503
    assert progress["ready"] is False
    assert progress["mounted"] is True
    errors = progress["warm"]["errors"]  # type: ignore[index]
    assert [error["path"] for error in errors] == ["bad.eio.bin"]  # type: ignore[index]
    assert not ready_file.exists()
    assert (fs.path / "notes.txt").read_text() == "hello"  # the mount serves meanwhile


def test_mount_refuses_a_warm_set_larger_than_the_capacity(
    memcachefs_source: Path, tmp_path: Path
) -> None:
    (memcachefs_source / "big.bin").write_bytes(b"b" * (5 * MiB))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli("mount", memcachefs_source, mountpoint, "--capacity", "4M", "--warm", "*.bin")
    assert result.returncode == 2
    assert "--warm names 1 files of 5.0M: more than the capacity 4.0M" in result.stderr
    assert not os.path.ismount(mountpoint)


def test_wait_warm_returns_once_resident(memcachefs_source: Path, tmp_path: Path) -> None:
    data = random.Random(5).randbytes(3 * MiB)
    (memcachefs_source / "model.safetensors").write_bytes(data)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli(
        "mount", memcachefs_source, mountpoint, "--capacity", "16M", "--warm", "*.safetensors",
        "--wait-warm", "--log-file", tmp_path / "log",
    )  # fmt: skip
    try:
        assert result.returncode == 0, result.stderr
        assert "1 of 1 files resident" in result.stdout
        # Returned only once resident: nothing left to load.
        stats = json.loads(os.getxattr(mountpoint, "user.memcachefs.stats"))
        assert stats["used_bytes"] == len(data)
        assert stats["warm_jobs_in_flight"] == 0
    finally:
        assert run_cli("umount", mountpoint).returncode == 0
    foreground = run_cli("mount", memcachefs_source, mountpoint, "--capacity", "16M",
                         "--wait-warm", "--foreground")  # fmt: skip
    assert foreground.returncode == 2
    assert "--wait-warm is for background mounts" in foreground.stderr
