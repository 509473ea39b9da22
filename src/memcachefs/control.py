"""The daemon's own extended attributes on the mount's root: a channel to a running
mount that needs no network port (as s3ql's control file does).

``getxattr(MOUNTPOINT, name)`` with one of these names is answered by the daemon
itself, never passed to the source:

- ``user.memcachefs.stats``: the statistics, one JSON object (`memcachefs stats`);
- ``user.memcachefs.config``: the validated configuration the daemon runs with
  (JSON, the cluster secret left out);
- ``user.memcachefs.control``: the path of the daemon's control socket (below).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

STATS_XATTR = b"user.memcachefs.stats"
CONFIG_XATTR = b"user.memcachefs.config"


# -- the control socket -------------------------------------------------------------
# Commands to a running mount (`memcachefs warm`) go through a unix socket, mode
# 0600, owned by the daemon's user; its path is the root xattr CONTROL_XATTR.
# One request per connection: a JSON object on one line. The daemon answers with
# JSON lines: {"progress": {...}} while it works, then {"done": {...}} or
# {"error": "..."}. Closing the connection cancels the request (Ctrl-C).
CONTROL_XATTR = b"user.memcachefs.control"
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # a warm-up of a million paths fits
_MAX_UNIX_PATH = 100  # sun_path holds 108 bytes


def beside_the_log(mountpoint: Path, suffix: str) -> Path:
    """`/tmp/memcachefs-<mountpoint>.<suffix>`: the default log and the control socket."""
    slug = str(mountpoint).strip("/").replace("/", "-") or "root"
    return Path(tempfile.gettempdir()) / f"memcachefs-{slug}.{suffix}"


def socket_path(mountpoint: Path) -> Path:
    """Where the daemon serving `mountpoint` listens: beside its default log."""
    path = beside_the_log(mountpoint, "sock")
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / f"memcachefs-{digest}.sock"
    return path


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def path_to_wire(relpath: bytes) -> str:
    """A path as a JSON string (undecodable bytes survive as surrogates)."""
    return os.fsdecode(relpath)


def path_from_wire(text: str) -> bytes:
    return os.fsencode(text)
