"""Issue 2, items 3 and 11: background mounts return once ready; SIGTERM/SIGINT finish
reads in flight, unmount and exit 0; `memcachefs umount` works on a live and on a dead
daemon; a crash leaves ENOTCONN (never an empty directory) and the next mount recovers."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
from support import DEADLINE_S, MEMCACHEFS, in_thread, run_cli, wait_until

from memcachefs import mounts

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def _daemon_pid(mountpoint: Path) -> int:
    return int(json.loads(run_cli("stats", mountpoint, "--json").stdout)["pid"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours would still answer; read its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _assert_enotconn(path: Path) -> None:
    """The dead mount answers ENOTCONN: it never looks like an empty directory.

    (stat of the root itself may be answered from the kernel's attribute cache
    until the attribute timeout passes; listing and opening always ask.)
    """
    for call in (os.listdir, lambda p: (p / "f").read_bytes()):
        with pytest.raises(OSError) as raised:
            call(path)
        # ECONNABORTED for a request the kernel had queued when the daemon died
        assert raised.value.errno in (errno.ENOTCONN, errno.ECONNABORTED), (call, raised.value)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_when_idle_unmounts_and_exits_0(
    memcachefs_source: Path, memcachefs_mount, signum: int
) -> None:
    (memcachefs_source / "f").write_bytes(b"data")
    fs = memcachefs_mount(memcachefs_source, capacity="8M")
    assert (fs.path / "f").read_bytes() == b"data"
    fs.signal(signum)
    assert fs.wait() == 0
    assert not fs.mounted
    assert os.listdir(fs.path) == []  # the plain directory again, not ENOTCONN
    assert "unmounted" in fs.log_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_read_in_flight(fault_source, memcachefs_mount, signum: int) -> None:
    payload = random.Random(5).randbytes(2 * MiB)
    (fault_source.backing / "slow.bin").write_bytes(payload)
    fs = memcachefs_mount(fault_source.path, capacity="16M", args=["--block-size", "256K"])
    assert (fs.path / "slow.bin").stat().st_size == len(payload)
    with (
        open(fs.path / "slow.bin", "rb") as f,
        fault_source.stalled(),
        in_thread(f.read) as read,
    ):
        wait_until(lambda: fs.stats()["fills_in_flight"] >= 1, "the read to reach the source")
        fs.signal(signum)
        name = signal.Signals(signum).name
        wait_until(lambda: f"received {name}" in fs.log_text(), "the daemon to see the signal")
        assert _alive(fs.pid)  # waiting for the read, not gone
        fault_source.stall_file.unlink()
        assert read() == payload
    assert fs.wait() == 0
    assert not fs.mounted


def test_signal_waits_for_open_files_to_be_closed(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    (memcachefs_source / "f").write_bytes(b"0123456789" * 100_000)
    fs = memcachefs_mount(memcachefs_source, capacity="8M")
    with open(fs.path / "f", "rb") as f:
        assert f.read(10) == b"0123456789"
        fs.signal(signal.SIGTERM)
        wait_until(lambda: "received SIGTERM" in fs.log_text(), "the daemon to see the signal")
        assert _alive(fs.pid)
        # The reader goes on to the end of the file.
        assert f.read() == (b"0123456789" * 100_000)[10:]
    assert fs.wait() == 0
    assert not fs.mounted


def test_umount_command_on_a_live_daemon(cli_mounts, tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    (source / "f").write_bytes(b"x" * 100_000)
    result = cli_mounts.mount(source, mountpoint)
    assert result.returncode == 0, result.stderr
    pid = _daemon_pid(mountpoint)
    assert (mountpoint / "f").read_bytes() == b"x" * 100_000

    result = run_cli("umount", mountpoint)
    assert result.returncode == 0, result.stderr
    assert mounts.find_mount(mountpoint) is None
    assert not _alive(pid)  # umount waits for the daemon to exit
    assert os.listdir(mountpoint) == []
    log = (tmp_path / "mnt.log").read_text()
    assert " WARNING " not in log
    assert " ERROR " not in log


def test_kill_9_leaves_enotconn_then_umount_cleans_up(cli_mounts, tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    (source / "f").write_bytes(b"f")
    assert cli_mounts.mount(source, mountpoint).returncode == 0
    pid = _daemon_pid(mountpoint)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _alive(pid), "the daemon to die")

    _assert_enotconn(mountpoint)
    assert mounts.is_stale(mountpoint)
    stats = run_cli("stats", mountpoint)
    assert stats.returncode == 2
    assert "stale" in stats.stderr

    result = run_cli("umount", mountpoint)
    assert result.returncode == 0, result.stderr
    assert mounts.find_mount(mountpoint) is None
    assert os.listdir(mountpoint) == []


def test_kill_9_then_mount_again_on_the_same_mountpoint(cli_mounts, tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    (source / "f").write_bytes(b"first")
    assert cli_mounts.mount(source, mountpoint).returncode == 0
    pid = _daemon_pid(mountpoint)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _alive(pid), "the daemon to die")
    _assert_enotconn(mountpoint)

    (source / "f").write_bytes(b"second")
    result = cli_mounts.mount(source, mountpoint)
    assert result.returncode == 0, result.stderr
    assert (mountpoint / "f").read_bytes() == b"second"
    assert _daemon_pid(mountpoint) != pid
    # Exactly one mount there now: the stale one was removed, not stacked under.
    entries = [e for e in mounts.mount_entries() if e.mountpoint == str(mountpoint)]
    assert len(entries) == 1
    assert "stale mount" in result.stderr + result.stdout


def test_background_mount_returns_when_ready_and_keeps_serving(cli_mounts, tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    payload = random.Random(9).randbytes(3 * MiB)
    (source / "model.bin").write_bytes(payload)
    result = cli_mounts.mount(source, mountpoint, "--block-size", "1M")
    assert result.returncode == 0, result.stderr
    assert "mounted" in result.stdout
    # Ready means ready: no polling needed before the first access.
    assert mounts.find_mount(mountpoint) is not None
    assert os.listdir(mountpoint) == ["model.bin"]
    pid = _daemon_pid(mountpoint)
    assert str(pid) in result.stdout
    # The command's process is gone; the daemon it started is not attached to it.
    assert os.getsid(pid) == pid
    assert (mountpoint / "model.bin").read_bytes() == payload
    assert _alive(pid)


def test_foreground_mount_stays_attached_and_logs_to_stderr(tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    (source / "f").write_bytes(b"fg")
    process = subprocess.Popen(
        [*_memcachefs(), "mount", str(source), str(mountpoint), "--capacity", "8M", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: process.poll() is not None or mounts.find_mount(mountpoint) is not None,
            "the foreground mount",
        )
        assert process.poll() is None
        wait_until(lambda: os.path.exists(mountpoint / "f"), "the mount to serve")
        assert (mountpoint / "f").read_bytes() == b"fg"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if mounts.find_mount(mountpoint) is not None:
            mounts.unmount(mountpoint, lazy=True)
    assert process.returncode == 0
    assert "mounted" in stderr
    assert "unmounted" in stderr
    assert mounts.find_mount(mountpoint) is None


def _memcachefs() -> list[str]:
    from support import MEMCACHEFS

    return MEMCACHEFS


@pytest.mark.slow
def test_two_mounts_of_one_mountpoint_started_together_one_wins(tmp_path: Path, cli_mounts) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "f").write_bytes(b"x")
    for trial in range(3):
        mountpoint = cli_mounts.track(tmp_path / f"mnt{trial}")
        mountpoint.mkdir()
        argv = [*MEMCACHEFS, "mount", str(source), str(mountpoint), "--capacity", "16M"]
        racers = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        results = []
        for racer in racers:
            _, err = racer.communicate(timeout=60)
            results.append((racer.returncode, err))
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        refused = next(err for code, err in results if code == 2)
        assert len(refused.splitlines()) == 1, refused
        assert sum(e.mountpoint == str(mountpoint) for e in mounts.mount_entries()) == 1
        assert run_cli("umount", mountpoint).returncode == 0


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2])
def test_other_signals_are_logged_and_ignored(
    memcachefs_source: Path, memcachefs_mount, signum: int
) -> None:
    (memcachefs_source / "f").write_bytes(b"still here")
    fs = memcachefs_mount(memcachefs_source, capacity="8M")
    fs.signal(signum)
    name = signal.Signals(signum).name
    wait_until(lambda: f"received {name}: ignored" in fs.log_text(), "the log line")
    assert (fs.path / "f").read_bytes() == b"still here"
    assert fs.process.poll() is None
