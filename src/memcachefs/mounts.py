"""The kernel's side of mounting: the mount table, stale mounts, unmounting, readahead,
the FUSE connection's request limits.

Everything here is synchronous and may block (it runs fusermount3 or touches
a possibly dead mountpoint): call it from a worker thread inside the daemon.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entries(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            entries.append(
                MountEntry(
                    mountpoint=_unescape(fields[4]),
                    device=fields[2],
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                )
            )
    return entries


def find_mount(mountpoint: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount at exactly `mountpoint`, if any."""
    target = os.path.abspath(mountpoint)
    found = None
    for entry in mount_entries():
        if entry.mountpoint == target:
            found = entry
    return found


def is_stale(mountpoint: str | os.PathLike[str]) -> bool:
    """True when a FUSE mount is there but its daemon is gone (ENOTCONN)."""
    try:
        os.stat(mountpoint)
        # After the daemon died the kernel still answers stat from attributes it
        # cached (for the attribute timeout); opening the directory always asks.
        os.close(os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY))
    except OSError as error:
        return error.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def unmount(mountpoint: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount a FUSE mount, dead or alive. Raises OSError if it stays mounted."""
    path = os.fspath(mountpoint)
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    commands = []
    if fusermount:
        commands.append([fusermount, "-u", *(["-z"] if lazy else []), "-q", path])
    elif shutil.which("umount"):
        # Only without fusermount: umount(8) asks statfs of the mount, which can
        # wait on a stalled source.
        commands.append(["umount", *(["-l"] if lazy else []), path])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0 or find_mount(path) is None:
            return
    raise OSError(errno.EBUSY, f"{path} is still mounted")


def set_read_ahead(device: str, read_ahead_kib: int) -> bool:
    """Set the kernel readahead of a mount's backing device info; False if not allowed."""
    path = Path("/sys/class/bdi") / device / "read_ahead_kb"
    try:
        path.write_text(f"{read_ahead_kib}\n")
    except OSError as error:
        log.warning(
            "could not raise the kernel readahead to %d KiB (%s: %s); reads stay at "
            "the kernel default size and run slower",
            read_ahead_kib,
            path,
            error.strerror,
        )
        return False
    return True


FUSECTL = Path("/sys/fs/fuse/connections")


def set_fuse_background(device: str, max_background: int) -> bool:
    """Let the kernel send up to `max_background` background requests (buffered READs)
    to a FUSE mount at once, in fusectl; False if not allowed.

    fusectl is mounted first where it is not (systemd mounts it at boot; a container
    usually does not). The congestion threshold, where the kernel stops sending
    asynchronous readahead, keeps the kernel's own ratio of 3/4.
    """
    connection = FUSECTL / device.rsplit(":", maxsplit=1)[-1]
    try:
        if not connection.is_dir():
            mount_fusectl()
        (connection / "max_background").write_text(f"{max_background}\n")
        (connection / "congestion_threshold").write_text(f"{max_background * 3 // 4}\n")
    except OSError as error:
        log.warning(
            "could not raise the FUSE background request limit to %d (%s); READs waiting "
            "on a stalled source can hold up reads of cached blocks",
            max_background,
            error.strerror or error,
        )
        return False
    return True


def mount_fusectl() -> None:
    """Mount fusectl at FUSECTL; OSError if it cannot be."""
    command = ["mount", "-t", "fusectl", "fusectl", str(FUSECTL)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise OSError(errno.EIO, f"mount -t fusectl: {error}") from None
    if done.returncode != 0:
        raise OSError(errno.EPERM, f"mount -t fusectl: {done.stderr.strip()}")


def lock_mountpoint(mountpoint: str | os.PathLike[str]) -> int:
    """Take the lock of a mountpoint for this process; BlockingIOError if another holds it.

    The lock is a flock of the mountpoint directory itself, taken before mounting
    over it: it lives exactly as long as the process (no file to clean up), and a
    second daemon for the same mountpoint finds it taken. Returns the descriptor
    holding it (keep it open).
    """
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


FSTYPE = "fuse.memcachefs"  # fsname/subtype the daemon mounts with


def mount_containing(path: str | os.PathLike[str]) -> MountEntry | None:
    """The innermost mount that `path` (resolved) lies in; None only if there is none."""
    real = os.path.realpath(path)
    found = None
    for entry in mount_entries():
        top = entry.mountpoint.rstrip("/")
        if (real == entry.mountpoint or real.startswith(top + "/")) and (
            found is None or len(entry.mountpoint) >= len(found.mountpoint)
        ):
            found = entry
    return found


# Filesystems whose reads cross a network (a FUSE client of object storage, NFS, SMB...);
# "fuseblk" is FUSE over a local block device (ntfs-3g).
NETWORK_FSTYPES = ("fuse", "nfs", "nfs4", "cifs", "smb3", "9p", "ceph", "glusterfs", "lustre")


def is_network(entry: MountEntry | None) -> bool:
    """Whether the mount `entry` reads over a network (or from a user-space client)."""
    if entry is None:
        return False
    return entry.fstype.split(".")[0] in NETWORK_FSTYPES
