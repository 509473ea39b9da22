"""The daemon's own extended attributes on the mount's root: a channel to a running
mount that needs no network port (as s3ql's control file does).

``getxattr(MOUNTPOINT, name)`` with one of these names is answered by the daemon
itself, never passed to the source:

- ``user.memcachefs.stats``: the statistics, one JSON object (`memcachefs stats`);
- ``user.memcachefs.config``: the validated configuration the daemon runs with
  (JSON, the cluster secret left out).
"""

from __future__ import annotations

STATS_XATTR = b"user.memcachefs.stats"
CONFIG_XATTR = b"user.memcachefs.config"
