"""Issue 2, item 10: a source read error is EIO for that reader only; a stalled source
does not block reads of cached data; an unexpected exception in a handler is EIO plus
one log line, and the mount lives on.

The faulty source is memcachefs.testing.faultfs (reads of `*.eio*` fail, everything
waits while a stall file exists); the unexpected exceptions are injected into the real
daemon through a sitecustomize module (see conftest.inject_into_daemon).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support import drop_page_cache, in_thread, run_cli, wait_until

from memcachefs.testing import faultfs

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def test_source_read_error_is_eio_for_that_reader_only(fault_source, memcachefs_mount) -> None:
    good = random.Random(1).randbytes(2 * MiB)
    (fault_source.backing / "good.bin").write_bytes(good)
    (fault_source.backing / "bad.eio.bin").write_bytes(b"b" * MiB)
    fs = memcachefs_mount(
        fault_source.path,
        capacity="16M",
        args=["--block-size", "256K"],
        expected_log=[r"bad\.eio"],
    )
    # Metadata of the broken file is fine; its data is not.
    assert (fs.path / "bad.eio.bin").stat().st_size == MiB
    for _ in range(2):  # and it stays an error, it is not cached as bytes
        with pytest.raises(OSError) as raised:
            (fs.path / "bad.eio.bin").read_bytes()
        assert raised.value.errno == errno.EIO
    assert (fs.path / "good.bin").read_bytes() == good
    stats = fs.stats()
    assert stats["read_errors"] >= 1
    assert stats["source_bytes"] == len(good)
    assert stats["used_bytes"] == len(good)  # no block of the broken file is stored
    assert fs.process.poll() is None


def test_stalled_source_does_not_block_cached_reads(fault_source, memcachefs_mount) -> None:
    cached = random.Random(2).randbytes(3 * MiB)
    cold = random.Random(3).randbytes(MiB)
    (fault_source.backing / "cached.bin").write_bytes(cached)
    (fault_source.backing / "cold.bin").write_bytes(cold)
    fs = memcachefs_mount(
        fault_source.path, capacity="16M", args=["--block-size", "256K", "--attr-timeout", "0.2"]
    )
    assert (fs.path / "cached.bin").read_bytes() == cached
    assert (fs.path / "cold.bin").stat().st_size == len(cold)
    hits_before = fs.stats()["hits"]

    def read_cached() -> bytes:
        drop_page_cache(fs.path / "cached.bin")  # the open itself needs the daemon
        return (fs.path / "cached.bin").read_bytes()

    cold_path = fs.path / "cold.bin"
    with fault_source.stalled(), in_thread(cold_path.read_bytes) as cold_read:
        wait_until(lambda: fs.stats()["fills_in_flight"] >= 1, "the cold read to stall")
        # A new open asks the (stalled) source: the daemon falls back to the
        # version it knew, and the blocks come from memory.
        with in_thread(read_cached) as cached_read:
            assert cached_read() == cached
        assert fs.stats()["unpinned_opens"] >= 1
        assert os.stat(fs.path / "cached.bin").st_size == len(cached)
        # The cold read is still stuck on the source.
        assert fs.stats()["fills_in_flight"] >= 1
        # (leaving the stall: the cold read completes)
        fault_source.stall_file.unlink()
        assert cold_read() == cold
    stats = fs.stats()
    assert stats["hits"] > hits_before
    assert stats["source_bytes"] == len(cached) + len(cold)
    assert fs.unmount() == 0  # nothing is left waiting on the source


def test_block_reads_reach_a_one_read_per_handle_source_in_parallel(
    fault_source, memcachefs_mount
) -> None:
    """A FUSE client of object storage may serve one read of a handle at a time
    (rclone without its cache): through one shared descriptor, the daemon's
    parallel block fills reached it one by one."""
    data = random.Random(8).randbytes(16 * MiB)
    (fault_source.backing / "model.serial.dat").write_bytes(data)
    fs = memcachefs_mount(
        fault_source.path, capacity="64M", args=["--block-size", "1M", "--source-threads", "4"]
    )
    assert (fs.path / "model.serial.dat").read_bytes() == data
    source_file = fault_source.path / "model.serial.dat"
    assert int(os.getxattr(source_file, faultfs.MOST_READS_XATTR)) >= 2
    assert fs.stats()["parallel_opens"] >= 1
    assert fs.unmount() == 0


def test_reads_waiting_on_a_stalled_source_do_not_hold_up_cached_reads(
    fault_source, memcachefs_mount
) -> None:
    """A buffered READ the kernel reads ahead for is a FUSE background request, and by
    default the kernel sends only 12 of those at once: readers of blocks the stalled
    source must give held them all, and a read of a cached file waited in the kernel
    until the source answered."""
    cached = random.Random(6).randbytes(2 * MiB)
    (fault_source.backing / "cached.dat").write_bytes(cached)
    (fault_source.backing / "cold.dat").write_bytes(random.Random(7).randbytes(72 * MiB))
    # Not model files (*.bin): a prefetch of the cold file would evict the cached one.
    fs = memcachefs_mount(
        fault_source.path,
        capacity="64M",
        args=["--block-size", "1M", "--no-page-cache-push"],  # every read is a READ
    )
    assert (fs.path / "cached.dat").read_bytes() == cached

    def read_cached() -> bytes:
        with open(fs.path / "cached.dat", "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            return os.pread(f.fileno(), len(cached), 0)

    with open(fs.path / "cold.dat", "rb", buffering=0) as cold, fault_source.stalled():
        stuck = [  # blocks apart: no readahead of the daemon's joins them
            threading.Thread(target=os.pread, args=(cold.fileno(), 4096, (3 * n + 8) * MiB))
            for n in range(20)
        ]
        for thread in stuck:
            thread.start()
        wait_until(lambda: fs.stats()["requests_in_flight"] >= 12, "the cold reads to stall")
        with in_thread(read_cached) as cached_read:
            assert cached_read(10.0) == cached
    for thread in stuck:
        thread.join(30)
    assert not any(thread.is_alive() for thread in stuck)
    assert fs.unmount() == 0


def test_closing_source_files_on_a_stalled_source_does_not_block_cached_reads(
    fault_source, memcachefs_mount
) -> None:
    # The daemon keeps at most 64 idle source descriptors: releasing 80 handles
    # closes 16 source files, and each close(2) waits on the stalled source.
    names = [f"f{i:03d}" for i in range(80)]
    for name in names:
        (fault_source.backing / name).write_bytes(name.encode() * 100)
    cached = random.Random(4).randbytes(MiB)
    (fault_source.backing / "cached.bin").write_bytes(cached)
    fs = memcachefs_mount(fault_source.path, capacity="16M", args=["--block-size", "256K"])
    assert (fs.path / "cached.bin").read_bytes() == cached
    with open(fs.path / "cached.bin", "rb", buffering=0) as reader:
        handles = [open(fs.path / name, "rb") for name in names]  # noqa: SIM115
        assert all(h.read() == name.encode() * 100 for h, name in zip(handles, names, strict=True))
        with fault_source.stalled():
            for handle in handles:
                handle.close()
            wait_until(lambda: fs.stats()["open_files"] == 1, "the handles to be released")

            def read_cached() -> bytes:
                drop_page_cache(fs.path / "cached.bin")
                return os.pread(reader.fileno(), len(cached), 0)

            with in_thread(read_cached) as cached_read:
                assert cached_read(10.0) == cached
            assert fs.stats()["open_descriptors"] <= 66
    assert fs.unmount() == 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "umount"])
def test_shutdown_with_a_stalled_source_ends_within_the_grace_period(
    fault_source, memcachefs_mount, how: str
) -> None:
    cached = random.Random(5).randbytes(MiB)
    (fault_source.backing / "cached.bin").write_bytes(cached)
    (fault_source.backing / "cold.bin").write_bytes(random.Random(6).randbytes(MiB))
    fs = memcachefs_mount(
        fault_source.path,
        capacity="16M",
        args=["--block-size", "256K", "--shutdown-grace", "1"],
        expected_log=["requests in flight", "abandoned"],
    )
    assert (fs.path / "cached.bin").read_bytes() == cached
    cold = fs.path / "cold.bin"
    assert cold.stat().st_size == MiB  # known: its open falls back to these attributes
    with fault_source.stalled(), in_thread(cold.read_bytes) as cold_read:
        wait_until(lambda: fs.stats()["fills_in_flight"] >= 1, "the cold read to stall")
        started = time.monotonic()
        if how == "sigterm":
            fs.signal(signal.SIGTERM)
        else:
            result = run_cli("umount", fs.path, timeout_s=30)
            assert result.returncode == 0, result.stderr
        wait_until(lambda: "INFO memcachefs.events: unmounted" in fs.log_text(), "the unmount")
        assert not fs.mounted
        assert time.monotonic() - started < 1 + 8  # the grace period, and a few seconds
        with pytest.raises(OSError):
            cold_read()  # the read in flight got an error
    # A thread of the daemon waited in the source's read (an uninterruptible wait in
    # the kernel): the process ends once the source answers.
    assert fs.wait(timeout_s=15) == 0
    # The source answers again: nothing of the daemon is left behind.
    assert (fault_source.path / "cached.bin").read_bytes() == cached


HANDLER_FAULTS = {
    "read": (
        "memcachefs.source.Source.read_block",
        "key.version.relpath",
        lambda p: (p / "boom.bin").read_bytes(),
    ),
    "getattr": (
        "memcachefs.source.Source.lstat",
        "relpath",
        lambda p: os.stat(p / "boom.bin"),
    ),
    "readlink": (
        "memcachefs.source.Source.readlink",
        "relpath",
        lambda p: os.readlink(p / "boom-link"),
    ),
    "opendir": (
        "memcachefs.source.Source.listdir",
        "relpath",
        lambda p: os.listdir(p / "boom-dir"),
    ),
}

_INJECTION = """
import functools, importlib

def _install():
    module_name, class_name, method_name = {target!r}.rsplit(".", 2)
    cls = getattr(importlib.import_module(module_name), class_name)
    original = getattr(cls, method_name)

    @functools.wraps(original)
    async def failing(self, *args, **kwargs):
        relpath = args[0] if {where!r} == "relpath" else args[0].version.relpath
        if b"boom" in relpath:
            raise RuntimeError("injected fault in " + method_name)
        return await original(self, *args, **kwargs)

    setattr(cls, method_name, failing)

_install()
"""


@pytest.mark.parametrize("handler", list(HANDLER_FAULTS))
def test_unexpected_exception_is_eio_and_one_log_line(
    memcachefs_source: Path, memcachefs_mount, inject_into_daemon, handler: str
) -> None:
    target, where, trigger = HANDLER_FAULTS[handler]
    inject_into_daemon(_INJECTION.format(target=target, where=where))
    (memcachefs_source / "boom.bin").write_bytes(b"x" * 100_000)
    (memcachefs_source / "boom-dir").mkdir()
    os.symlink("target", memcachefs_source / "boom-link")
    (memcachefs_source / "fine.bin").write_bytes(b"fine")
    fs = memcachefs_mount(
        memcachefs_source,
        capacity="8M",
        expected_log=[r"internal error in \w+; answered EIO", r"^Traceback"],
    )

    with pytest.raises(OSError) as raised:
        trigger(fs.path)
    assert raised.value.errno == errno.EIO

    with pytest.raises(OSError) as again:
        trigger(fs.path)
    assert again.value.errno == errno.EIO
    # The mount lives: other requests are answered.
    assert (fs.path / "fine.bin").read_bytes() == b"fine"
    assert sorted(os.listdir(fs.path)) == ["boom-dir", "boom-link", "boom.bin", "fine.bin"]
    # (The kernel may retry a failed page read once, so a read() can be 2 requests.)
    internal_errors = fs.stats()["internal_errors"]
    assert 2 <= internal_errors <= 4
    assert fs.process.poll() is None
    errors = [line for line in fs.log_text().splitlines() if " ERROR " in line]
    # One line per failed request (plus its traceback).
    assert len(errors) == internal_errors, errors
    assert all("injected fault" not in line for line in errors)
    assert "RuntimeError: injected fault" in fs.log_text()


def test_stalled_source_still_answers_metadata_of_known_files(
    fault_source, memcachefs_mount
) -> None:
    """Issue 10 item 2: `ls -l`, xattrs and statfs of known entries under a stall."""
    (fault_source.backing / "d").mkdir()
    for i in range(20):
        (fault_source.backing / "d" / f"f{i:02d}").write_bytes(b"x" * i)
    fs = memcachefs_mount(fault_source.path, capacity="8M", args=["--attr-timeout", "0.2"])
    directory = fs.path / "d"

    def list_long() -> int:
        return subprocess.run(
            ["ls", "-l", str(directory)], capture_output=True, text=True, check=True, timeout=60
        ).stdout.count("\n")

    def metadata() -> list[object]:
        answers: list[object] = [list_long()]
        try:
            answers.append(os.getxattr(directory / "f03", "user.missing"))
        except OSError as error:
            answers.append(error.errno)
        answers.append(os.listxattr(directory / "f03"))
        answers.append(os.statvfs(fs.path).f_bsize > 0)
        return answers

    warm = metadata()
    assert warm[0] == 21 and warm[1] == errno.ENODATA and warm[3] is True
    time.sleep(0.5)  # past the attribute timeout: every answer needs a refresh
    with fault_source.stalled(), in_thread(metadata) as stalled:
        # Answered while the source is still stalled (the stall ends only after this).
        assert stalled() == warm
        # Opening the root (the stale-mount check of `memcachefs stats`) needs no listing.
        assert fs.stats()["stale_answers"] >= 1
        assert fault_source.stall_file.exists()


def test_faultfs_answers_an_open_file_with_its_own_attributes(fault_source) -> None:
    """As on a local filesystem: a file replaced by rename is a new inode, and fstat of
    a descriptor opened before answers for the old file (it answered for the new one,
    so memcachefs pinned the old bytes under the new version)."""
    (fault_source.backing / "f.dat").write_bytes(b"old!")
    fd = os.open(fault_source.path / "f.dat", os.O_RDONLY)
    try:
        before = os.fstat(fd)
        (fault_source.backing / "f.new").write_bytes(b"the new one")
        os.replace(fault_source.backing / "f.new", fault_source.backing / "f.dat")
        assert os.fstat(fd).st_size == 4
        assert os.fstat(fd).st_ino == before.st_ino
        assert os.pread(fd, 100, 0) == b"old!"
        now = os.stat(fault_source.path / "f.dat")
        assert now.st_size == 11 and now.st_ino != before.st_ino
    finally:
        os.close(fd)


def test_a_handle_reads_its_version_to_the_end_over_a_fuse_source(
    fault_source, memcachefs_mount
) -> None:
    """A handle opened before the source file is replaced reads the old bytes to the
    end, also for blocks it had not read yet (they come from the source file it holds)."""
    old, new = random.Random(1).randbytes(2 * MiB), random.Random(2).randbytes(2 * MiB + 4096)
    (fault_source.backing / "model.dat").write_bytes(old)
    fs = memcachefs_mount(fault_source.path, capacity="16M", args=["--block-size", "256K"])
    with open(fs.path / "model.dat", "rb", buffering=0) as f:
        first = f.read(65536)
        (fault_source.backing / "model.new").write_bytes(new)
        os.replace(fault_source.backing / "model.new", fault_source.backing / "model.dat")
        rest = f.read()
    assert first + rest == old
    wait_until(lambda: (fs.path / "model.dat").stat().st_size == len(new), "the new version")
    assert (fs.path / "model.dat").read_bytes() == new


def _reopen(path: Path, stop: threading.Event) -> None:
    """Open and read `path` until `stop` or an error (the mount is gone)."""
    while not stop.is_set():
        try:
            with open(path, "rb") as file:
                file.read(1)
        except OSError:
            return


def _abort_fuse_connection(mountpoint: Path) -> None:
    """End a hung mount (its device from mountinfo: a stat of it would hang too)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            minor = fields[2].split(":")[1]
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")


def test_kill_9_while_the_daemon_waits_on_its_own_mount_ends_with_enotconn(
    fault_source, memcachefs_mount
) -> None:
    """Semantics 9. An open of a cached file starts a page cache push, which asks what
    the kernel holds through an open of the mounted file: a request to the daemon
    itself, which waits while the source is stalled. Asked from a thread of the
    daemon, a SIGKILL then left that thread waiting forever on the dead daemon: the
    process never finished exiting, and the mount hung instead of ENOTCONN."""
    (fault_source.backing / "model.bin").write_bytes(random.Random(5).randbytes(8 * MiB))
    fs = memcachefs_mount(fault_source.path, capacity="64M", args=["--block-size", "1M"])
    target = fs.path / "model.bin"
    target.read_bytes()  # in memory: every open pushes
    stop = threading.Event()
    openers = [threading.Thread(target=_reopen, args=(target, stop)) for _ in range(2)]
    for opener in openers:
        opener.start()
    try:
        with fault_source.stalled():
            # Opens wait on the source, and so does a push's own open of the file.
            wait_until(
                lambda: fs.stats()["page_cache_pushes_in_flight"] >= 1,
                "a page cache push to ask what the kernel holds",
            )
            fs.process.kill()
        # Its threads reading the source return once the stall ends (they cannot be
        # interrupted before, Semantics 10); one waiting on the dead daemon never would.
        try:
            fs.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _abort_fuse_connection(fs.path)  # leave no hung mount behind
            pytest.fail("the SIGKILLed daemon did not exit: its mount hung")
    finally:
        stop.set()
        for opener in openers:
            opener.join(10)
    with pytest.raises(OSError) as raised:
        os.listdir(fs.path)
    assert raised.value.errno == errno.ENOTCONN
