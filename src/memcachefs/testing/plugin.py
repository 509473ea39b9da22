"""pytest fixtures that mount memcachefs over temporary directories.

Loaded automatically (entry point ``pytest11``) once memcachefs is installed::

    def test_reads(memcachefs_source, memcachefs_mount):
        (memcachefs_source / "model.bin").write_bytes(b"x" * 10_000_000)
        fs = memcachefs_mount(memcachefs_source, capacity="64M")
        assert (fs.path / "model.bin").read_bytes() == b"x" * 10_000_000
        assert fs.stats()["misses"] > 0

Every mount is unmounted at the end of the test, and the test fails if the
daemon logged a warning, an error or a traceback it did not declare with
``expected_log=[regex, ...]``. Without a usable /dev/fuse the fixtures skip,
unless MEMCACHEFS_REQUIRE_FUSE=1 (then they fail).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from memcachefs.testing.harness import MountedFS, fuse_available, mount


class MountFactory(Protocol):
    def __call__(
        self,
        source: Path | None = None,
        *,
        capacity: str = "256M",
        args: Iterable[str] = (),
        expected_log: Sequence[str] = (),
    ) -> MountedFS: ...


@pytest.fixture
def memcachefs_source(tmp_path: Path) -> Path:
    """An empty source directory for a test to fill."""
    source = tmp_path / "source"
    source.mkdir()
    return source


def require_fuse() -> None:
    """Skip the calling test without a usable /dev/fuse; fail it with MEMCACHEFS_REQUIRE_FUSE=1."""
    reason = fuse_available()
    if reason is not None:
        if os.environ.get("MEMCACHEFS_REQUIRE_FUSE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _mounts(base: Path) -> Iterator[MountFactory]:
    """A factory of mounts below `base`, all unmounted at the end; fails on logged problems."""
    require_fuse()
    mounted: list[MountedFS] = []

    def factory(
        source: Path | None = None,
        *,
        capacity: str = "256M",
        args: Iterable[str] = (),
        expected_log: Sequence[str] = (),
    ) -> MountedFS:
        if source is None:
            source = base / "source"
            source.mkdir(exist_ok=True)
        mountpoint = base / f"mnt{len(mounted)}"
        mountpoint.mkdir()
        fs = mount(source, mountpoint, capacity=capacity, args=args, expected_log=expected_log)
        mounted.append(fs)
        return fs

    yield factory
    problems: list[str] = []
    for fs in mounted:
        fs.unmount()
        problems += [f"{fs.path}: {line}" for line in fs.problems()]
    if problems:
        pytest.fail("the daemon logged problems:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def memcachefs_mount(tmp_path: Path) -> Iterator[MountFactory]:
    """A factory: `memcachefs_mount(source, capacity=..., args=[...])` -> MountedFS."""
    yield from _mounts(tmp_path)


@pytest.fixture(scope="module")
def memcachefs_module_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountFactory]:
    """The same factory for mounts that every test of a module shares (read-only tests)."""
    yield from _mounts(tmp_path_factory.mktemp("memcachefs"))
