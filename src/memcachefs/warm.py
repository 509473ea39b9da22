"""Warm-ups: whole files made resident before anyone reads them.

The daemon does the loading: every block goes through the Loader (memory, then
the owning peer, then the source; single-flight; the source's thread limit),
so a warm-up never copies data through the process that asked for it. A job
is a list of files; its progress (files and bytes done, where the bytes came
from, failures) is a snapshot any caller can read while it runs: the control
socket streams it to `memcachefs warm`, /ready reports the start-up job's.

The start-up job (`mount --warm PATTERN`) retries files the source failed,
with a growing pause, until every one is resident: readiness means resident.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from memcachefs.errors import ReadError
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.loader import Loader
from memcachefs.metadata import MetadataCache
from memcachefs.metrics import counter, gauge

log = logging.getLogger(__name__)

RETRY_FIRST_S = 2.0  # the start-up job's first pause before retrying failed files
RETRY_MAX_S = 60.0
TIERS = ("memory", "peer", "source")

# Called when a file of a warm-up is resident: push it into the page cache.
ResidentHook = Callable[[FileVersion], None]
# Called when a file was evicted: drop its pages from the page cache.
EvictedHook = Callable[[FileVersion], Awaitable[None]]


async def _nothing(version: FileVersion) -> None:
    pass


@dataclass
class WarmStatistics:
    warm_jobs: int = counter("warm-ups started (memcachefs warm, mount --warm)")
    warm_files: int = counter("files warm-ups made resident")
    warm_bytes: int = counter("bytes of the files warm-ups made resident")
    warm_errors: int = counter("files a warm-up could not load (a source error)")
    warm_jobs_in_flight: int = gauge("warm-ups running now")


@dataclass
class WarmJob:
    """The progress of one warm-up (a snapshot is a copy: `snapshot()`)."""

    files: int = 0
    total_bytes: int = 0
    files_done: int = 0
    done_bytes: int = 0
    tier_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    errors: dict[str, str] = field(default_factory=dict)  # path -> what failed
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    finished: bool = False
    _ran: trio.Event = field(default_factory=trio.Event, repr=False)
    _resident: trio.Event = field(default_factory=trio.Event, repr=False)

    @property
    def resident(self) -> bool:
        """Whether a run has ended with every file resident (it stays so)."""
        return self._resident.is_set()

    async def wait_resident(self) -> None:
        """Return once a run has ended with every file resident."""
        await self._resident.wait()

    async def wait_finished(self) -> None:
        """Return once the job's current run (the first, or a retry) has finished."""
        while not self.finished:
            await self._ran.wait()

    def snapshot(self) -> dict[str, Any]:
        seconds = self.seconds if self.finished else time.monotonic() - self.started
        return {
            "files": self.files,
            "files_done": self.files_done,
            "total_bytes": self.total_bytes,
            "done_bytes": self.done_bytes,
            **{f"{tier}_bytes": count for tier, count in self.tier_bytes.items()},
            "errors": [{"path": path, "error": error} for path, error in self.errors.items()],
            "seconds": round(seconds, 3),
            "finished": self.finished,
        }


class Warmer:
    def __init__(
        self,
        loader: Loader,
        metadata: MetadataCache,
        *,
        window_bytes: int,
        on_resident: ResidentHook = lambda version: None,
        on_evicted: EvictedHook = _nothing,
    ) -> None:
        self._loader = loader
        self._metadata = metadata
        self._block_size = loader.block_size
        self._window_blocks = max(1, window_bytes // loader.block_size)
        self._on_resident = on_resident
        self._on_evicted = on_evicted
        self._in_flight = 0
        self.counters = WarmStatistics()

    async def version(self, relpath: bytes) -> FileVersion:
        """The current version of a regular file; OSError if there is none."""
        st = await self._metadata.lstat(relpath)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(0, "not a regular file", os.fsdecode(relpath))
        return FileVersion(relpath, st.st_size, st.st_mtime_ns)

    def resident_bytes(self, version: FileVersion) -> int:
        """Bytes of `version` in memory now (looks, touches nothing)."""
        store = self._loader.store
        return sum(
            BlockKey(version, index).length(self._block_size)
            for index in range(version.block_count(self._block_size))
            if BlockKey(version, index) in store
        )

    async def evict(self, version: FileVersion) -> int:
        """Drop `version`'s blocks from memory and its pages from the kernel's page
        cache; the bytes dropped from memory."""
        dropped = self.resident_bytes(version)
        for index in range(version.block_count(self._block_size)):
            self._loader.store.discard(BlockKey(version, index))
        await self._on_evicted(version)
        return dropped

    async def warm(self, versions: Sequence[FileVersion], job: WarmJob) -> WarmJob:
        """Make every file of `versions` resident, updating `job` as blocks land.

        A file the source fails is recorded in `job.errors` and the rest go on.
        """
        job.files = len(versions)
        job.total_bytes = sum(version.size for version in versions)
        await self._run(versions, job)
        return job

    async def warm_until_resident(self, versions: Sequence[FileVersion], job: WarmJob) -> None:
        """The start-up job: warm, then retry the files that failed until none does."""
        pause_s = RETRY_FIRST_S
        await self.warm(versions, job)
        while job.errors:
            first = next(iter(job.errors.items()))
            log.warning(
                "warm-up: %d files could not be loaded (%s: %s); retrying in %.0fs",
                len(job.errors),
                *first,
                pause_s,
            )
            await trio.sleep(pause_s)
            pause_s = min(RETRY_MAX_S, pause_s * 2)
            failed = [os.fsencode(path) for path in job.errors]
            job.errors.clear()
            await self._run(await self._current(failed, job), job)

    async def _current(self, relpaths: list[bytes], job: WarmJob) -> list[FileVersion]:
        """The versions the paths hold now (a file replaced meanwhile is warmed anew)."""
        versions = []
        for relpath in relpaths:
            try:
                versions.append(await self.version(relpath))
            except OSError as error:
                job.errors[os.fsdecode(relpath)] = error.strerror or str(error)
        return versions

    async def _run(self, versions: Sequence[FileVersion], job: WarmJob) -> None:
        self.counters.warm_jobs += 1
        self._in_flight += 1
        job.finished = False
        if job._ran.is_set():
            job._ran = trio.Event()
        window = trio.Semaphore(self._window_blocks)
        try:
            async with trio.open_nursery() as nursery:
                for version in versions:
                    await self._warm_file(version, job, window, nursery)
        finally:
            self._in_flight -= 1
            job.seconds = time.monotonic() - job.started
            job.finished = True
            job._ran.set()
            if not job.errors:
                job._resident.set()

    async def _warm_file(
        self,
        version: FileVersion,
        job: WarmJob,
        window: trio.Semaphore,
        nursery: trio.Nursery,
    ) -> None:
        blocks = version.block_count(self._block_size)
        state = _FileState(version, blocks)
        if blocks == 0:
            self._resident(state, job)
            return
        for index in range(blocks):
            if state.failed:
                return
            await window.acquire()
            nursery.start_soon(self._warm_block, state, BlockKey(version, index), job, window)

    async def _warm_block(
        self, state: _FileState, key: BlockKey, job: WarmJob, window: trio.Semaphore
    ) -> None:
        try:
            if state.failed:
                return
            try:
                tier = await self._loader.warm(key)
            except ReadError as error:
                self._failed(state, job, error)
                return
            if state.failed:
                return  # its bytes were taken back from the job's progress
            length = key.length(self._block_size)
            job.tier_bytes[tier] += length
            job.done_bytes += length
            state.done_bytes += length
            state.remaining -= 1
            if state.remaining == 0:
                self._resident(state, job)
        finally:
            window.release()

    def _failed(self, state: _FileState, job: WarmJob, error: ReadError) -> None:
        if state.failed:
            return
        state.failed = True
        job.done_bytes -= state.done_bytes  # it is not resident: not done
        path = os.fsdecode(state.version.relpath)
        job.errors[path] = str(error) or type(error).__name__
        self.counters.warm_errors += 1
        log.info("warm-up of %s failed: %s", path, job.errors[path])

    def _resident(self, state: _FileState, job: WarmJob) -> None:
        job.files_done += 1
        self.counters.warm_files += 1
        self.counters.warm_bytes += state.version.size
        self._loader.store.watch(state.version)  # its first eviction is logged
        self._on_resident(state.version)

    def statistics(self) -> WarmStatistics:
        return replace(self.counters, warm_jobs_in_flight=self._in_flight)


@dataclass
class _FileState:
    version: FileVersion
    remaining: int
    done_bytes: int = 0
    failed: bool = False
