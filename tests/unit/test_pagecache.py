"""Pushing cached blocks into the kernel page cache (notify_store replaced by a recorder)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import trio
import trio.testing

from memcachefs.blockstore import BlockStore
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.pagecache import PageCachePusher
from memcachefs.residency import ResidencyProbe, resident_blocks

BS = 64 * 1024


class Kernel:
    """Records notify_store calls; can hold a call until released (runs in a thread)."""

    def __init__(self) -> None:
        self.stores: list[tuple[int, int, bytes]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.error: OSError | None = None

    def notify_store(self, inode: int, offset: int, data: memoryview) -> None:
        self.entered.set()
        self.hold.wait(10)
        if self.error is not None:
            raise self.error
        self.stores.append((inode, offset, bytes(data)))


def fill(store: BlockStore, version: FileVersion, data: bytes, indices: range) -> None:
    for index in indices:
        chunk = data[index * BS : (index + 1) * BS]
        buffer = store.try_allocate(len(chunk))
        assert buffer is not None
        buffer[: len(chunk)] = chunk
        store.put(BlockKey(version, index), buffer, len(chunk), 0)


def idle(pusher: PageCachePusher) -> bool:
    return pusher.statistics().page_cache_pushes_in_flight == 0


async def test_pushes_every_cached_block_in_order_and_never_past_the_end(wait_for) -> None:
    data = bytes(range(256)) * (3 * BS // 256) + b"tail"
    version = FileVersion(b"model.bin", len(data), 1)
    store = BlockStore(8 * BS, BS)
    fill(store, version, data, range(4))
    kernel = Kernel()
    async with trio.open_nursery() as nursery:
        pusher = PageCachePusher(store, nursery, notify_store=kernel.notify_store)
        pusher.push(7, version)
        await wait_for(lambda: idle(pusher), "the push to finish")
    assert [offset for _, offset, _ in kernel.stores] == [0, BS, 2 * BS, 3 * BS]
    assert b"".join(chunk for _, _, chunk in kernel.stores) == data
    assert all(inode == 7 for inode, _, _ in kernel.stores)
    assert pusher.statistics().page_cache_pushed_bytes == len(data)


async def test_skips_blocks_not_in_memory_and_files_with_none(wait_for) -> None:
    data = bytes(4 * BS)
    version = FileVersion(b"a", len(data), 1)
    store = BlockStore(8 * BS, BS)
    fill(store, version, data, range(1, 2))
    kernel = Kernel()
    async with trio.open_nursery() as nursery:
        pusher = PageCachePusher(store, nursery, notify_store=kernel.notify_store)
        pusher.push(2, FileVersion(b"not-cached", len(data), 1))
        assert idle(pusher)
        pusher.push(3, version)
        await wait_for(lambda: idle(pusher), "the push to finish")
    assert [offset for _, offset, _ in kernel.stores] == [BS]
    assert pusher.statistics().page_cache_pushes == 1


async def test_stays_ahead_of_the_reader(wait_for) -> None:
    data = bytes(6 * BS)
    version = FileVersion(b"a", len(data), 1)
    store = BlockStore(8 * BS, BS)
    fill(store, version, data, range(6))
    kernel = Kernel()
    async with trio.open_nursery() as nursery:
        pusher = PageCachePusher(
            store, nursery, notify_store=kernel.notify_store, reader_position=lambda inode: 2
        )
        pusher.push(1, version)
        await wait_for(lambda: idle(pusher), "the push to finish")
    # Blocks 0-2 were read already and block 3 is the reader's next READ.
    assert [offset // BS for _, offset, _ in kernel.stores] == [4, 5]


async def test_stop_waits_for_the_thread_and_no_store_follows() -> None:
    data = bytes(4 * BS)
    version = FileVersion(b"a", len(data), 1)
    store = BlockStore(8 * BS, BS)
    fill(store, version, data, range(4))
    kernel = Kernel()
    kernel.hold.clear()
    async with trio.open_nursery() as nursery:
        pusher = PageCachePusher(store, nursery, notify_store=kernel.notify_store)
        pusher.push(1, version)
        await trio.to_thread.run_sync(kernel.entered.wait, 10)
        block = store.get(BlockKey(version, 0))
        assert block is not None and block.pins == 1  # its buffer cannot be reused meanwhile
        stopped = trio.Event()

        async def stop() -> None:
            await pusher.stop(1)
            stopped.set()

        nursery.start_soon(stop)
        await trio.testing.wait_all_tasks_blocked()
        assert not stopped.is_set()  # the thread is still inside notify_store
        kernel.hold.set()
        with trio.fail_after(10):
            await stopped.wait()
        assert block.pins == 0
    # The nursery has ended: every task and thread is done, and none stored more.
    assert len(kernel.stores) == 1
    assert idle(pusher)


async def test_a_push_for_an_inode_runs_once_at_a_time(wait_for) -> None:
    data = bytes(2 * BS)
    old, new = FileVersion(b"a", len(data), 1), FileVersion(b"a", len(data), 2)
    store = BlockStore(8 * BS, BS)
    fill(store, old, data, range(2))
    fill(store, new, data, range(2))
    kernel = Kernel()
    kernel.hold.clear()
    async with trio.open_nursery() as nursery:
        pusher = PageCachePusher(store, nursery, notify_store=kernel.notify_store)
        pusher.push(1, old)
        pusher.push(1, old)  # the inode again while its push runs: one push
        kernel.hold.set()
        await pusher.stop(1)
        pusher.push(1, new)
        await wait_for(lambda: idle(pusher), "the push to finish")
    assert pusher.statistics().page_cache_pushes == 2


async def test_a_forgotten_inode_ends_the_push_quietly(wait_for) -> None:
    data = bytes(3 * BS)
    version = FileVersion(b"a", len(data), 1)
    store = BlockStore(8 * BS, BS)
    fill(store, version, data, range(3))
    kernel = Kernel()
    kernel.error = FileNotFoundError(2, "no such inode")
    async with trio.open_nursery() as nursery:
        pusher = PageCachePusher(store, nursery, notify_store=kernel.notify_store)
        pusher.push(1, version)
        await wait_for(lambda: idle(pusher), "the push to end")
    assert kernel.stores == []
    assert pusher.statistics().page_cache_push_errors == 0


def test_resident_blocks_names_the_blocks_wholly_in_the_page_cache() -> None:
    # A disk file (tmpfs pages cannot be dropped), synced so its pages are clean.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        path = Path(folder) / "f"
        size = 4 * BS + 100  # a short last block
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            os.write(fd, os.urandom(size))
            os.fsync(fd)
            os.pread(fd, size, 0)
            inode = os.fstat(fd).st_ino
            assert resident_blocks(path, inode, size, BS) == {0, 1, 2, 3, 4}
            # Drop every page, then read back all blocks but block 1, without readahead.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert resident_blocks(path, inode, size, BS) == set()
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for index in (0, 2, 3, 4):
                os.pread(fd, BS, index * BS)
            assert resident_blocks(path, inode, size, BS) == {0, 2, 3, 4}
            # The path is another file now: its pages say nothing about this inode.
            assert resident_blocks(path, inode + 1, size, BS) is None
        finally:
            os.close(fd)


def test_the_residency_probe_asks_a_child_process_and_restarts_it() -> None:
    """The daemon never opens its own mount itself (a SIGKILL during that open would
    hang the mount): a child answers, and a dead child is replaced at the next ask."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        path = Path(folder) / "f"
        path.write_bytes(os.urandom(2 * BS))
        inode = path.stat().st_ino
        probe = ResidencyProbe()
        try:
            expected = resident_blocks(path, inode, 2 * BS, BS)
            assert probe.resident_blocks(path, inode, 2 * BS, BS) == expected
            child = probe._process
            assert child is not None and child.pid != os.getpid()
            child.kill()
            child.wait()
            assert probe.resident_blocks(path, inode, 2 * BS, BS) == expected  # a new one
            assert probe._process is not child
            assert probe.resident_blocks(path, inode + 1, 2 * BS, BS) is None
        finally:
            probe.close()
        assert probe._process is not None and probe._process.poll() is not None


def test_the_residency_child_ends_quietly_when_its_daemon_is_gone() -> None:
    """A killed daemon closes the child's pipes: no traceback in the daemon's log."""
    child = subprocess.Popen(
        [sys.executable, "-m", "memcachefs.residency"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    child.stdout.close()
    child.stdin.write(b'["/nonexistent", 1, 10, 4096]\n')
    child.stdin.close()
    assert child.stderr.read() == b""
    child.stderr.close()
    assert child.wait(timeout=30) == 0
