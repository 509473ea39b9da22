"""The project's exception hierarchy and its mapping to errno values."""

from __future__ import annotations

import errno


class MemcachefsError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MemcachefsError):
    """Bad user input: reported as one line with exit code 2."""


class MountError(MemcachefsError):
    """The mount could not be set up (also exit code 2)."""


class ReadError(MemcachefsError):
    """A block could not be produced; carries the errno the reader sees."""

    errno_value: int = errno.EIO


class FillCancelled(ReadError):
    """The fill a reader waited on was cancelled (the daemon is stopping)."""


class SourceError(ReadError):
    """The source failed (I/O error, vanished file, short read)."""


class StaleVersion(ReadError):
    """The source no longer holds the file version a handle or key refers to."""

    errno_value = errno.ESTALE


class PeerError(MemcachefsError):
    """A peer could not deliver a block; never reaches a reader."""

    kind: str = "error"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
