"""Issue 2, item 5: every mutating operation returns EROFS; the mount is ro,nosuid,nodev;
the source is never written."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support import mount_options

pytestmark = pytest.mark.fuse


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, int, int, str]]:
    """Every entry's attributes and content digest (atime left out: reads may touch it)."""
    out = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            out[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                digest,
            )
    return out


@pytest.fixture
def mounted(memcachefs_source: Path, memcachefs_mount):
    (memcachefs_source / "dir" / "sub").mkdir(parents=True)
    (memcachefs_source / "file").write_bytes(b"content" * 1000)
    (memcachefs_source / "dir" / "inner").write_bytes(b"inner")
    os.symlink("file", memcachefs_source / "link")
    os.setxattr(memcachefs_source / "file", "user.origin", b"source")
    before = _snapshot(memcachefs_source)
    fs = memcachefs_mount(memcachefs_source, capacity="8M")
    yield fs
    assert _snapshot(memcachefs_source) == before, "the source was modified"


def _open(flags: int) -> Callable[[Path], object]:
    def call(root: Path) -> None:
        os.close(os.open(root / "file", flags))

    return call


MUTATIONS: dict[str, Callable[[Path], object]] = {
    "open-write": _open(os.O_WRONLY),
    "open-read-write": _open(os.O_RDWR),
    "open-append": _open(os.O_WRONLY | os.O_APPEND),
    "open-truncate": _open(os.O_RDONLY | os.O_TRUNC),
    "create": lambda root: os.close(os.open(root / "new", os.O_WRONLY | os.O_CREAT, 0o644)),
    "create-exclusive": lambda root: os.close(
        os.open(root / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    ),
    "truncate": lambda root: os.truncate(root / "file", 0),
    "chmod": lambda root: os.chmod(root / "file", 0o777),
    "chown": lambda root: os.chown(root / "file", 1234, 1234),
    "utime-touch": lambda root: os.utime(root / "file"),
    "utime-explicit": lambda root: os.utime(root / "file", (0, 0)),
    "mkdir": lambda root: os.mkdir(root / "newdir"),
    "mknod-fifo": lambda root: os.mkfifo(root / "fifo"),
    "symlink": lambda root: os.symlink("file", root / "newlink"),
    "hard-link": lambda root: os.link(root / "file", root / "hardlink"),
    "unlink": lambda root: os.unlink(root / "file"),
    "unlink-symlink": lambda root: os.unlink(root / "link"),
    "rmdir": lambda root: os.rmdir(root / "dir" / "sub"),
    "rename-file": lambda root: os.rename(root / "file", root / "renamed"),
    "rename-over": lambda root: os.rename(root / "dir" / "inner", root / "file"),
    "rename-dir": lambda root: os.rename(root / "dir", root / "dir2"),
    "setxattr": lambda root: os.setxattr(root / "file", "user.x", b"1"),
    "setxattr-replace": lambda root: os.setxattr(root / "file", "user.origin", b"mount"),
    "removexattr": lambda root: os.removexattr(root / "file", "user.origin"),
    "setxattr-root": lambda root: os.setxattr(root, "user.memcachefs.stats", b"{}"),
}


def test_every_mutation_fails_with_erofs(mounted) -> None:
    # One mount for all of them (a mount per case costs half a second each).
    outcomes = {}
    for operation, call in MUTATIONS.items():
        try:
            call(mounted.path)
        except OSError as error:
            outcomes[operation] = errno.errorcode.get(error.errno or 0, str(error))
        else:
            outcomes[operation] = "succeeded"
    assert outcomes == dict.fromkeys(MUTATIONS, "EROFS")


SHELL_COMMANDS = [
    ["touch", "file"],
    ["touch", "brand-new"],
    ["rm", "-f", "file"],
    ["rm", "-rf", "dir"],
    ["mkdir", "x"],
    ["mv", "file", "moved"],
    ["cp", "/etc/hostname", "file"],
    ["chmod", "777", "file"],
    ["truncate", "-s", "0", "file"],
    ["ln", "-s", "a", "b"],
]


def test_shell_commands_report_a_read_only_filesystem(mounted) -> None:
    refused = {}
    for command in SHELL_COMMANDS:
        result = subprocess.run(
            command,
            cwd=mounted.path,
            capture_output=True,
            text=True,
            env={"LC_ALL": "C", "PATH": os.environ["PATH"]},
            check=False,
        )
        refused[" ".join(command)] = result.returncode != 0 and (
            "Read-only file system" in result.stderr
        )
    assert refused == dict.fromkeys(refused, True)


def test_reads_and_xattrs_still_work(mounted) -> None:
    assert (mounted.path / "file").read_bytes() == b"content" * 1000
    assert os.getxattr(mounted.path / "file", "user.origin") == b"source"
    assert "user.origin" in os.listxattr(mounted.path / "file")


def test_mount_options_are_ro_nosuid_nodev(mounted) -> None:
    options = mount_options(mounted.path)
    assert {"ro", "nosuid", "nodev"} <= options
    assert os.statvfs(mounted.path).f_flag & os.ST_RDONLY
