"""Cache keys and block arithmetic (pure, no I/O).

A key names bytes that never change: it carries the file's version (size and
mtime), so a changed source file produces new keys and old blocks age out.
Keys hold no node-local identity (no st_dev/st_ino), so peers can exchange them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bounds every instance agrees on (config checks them; the peer protocol refuses
# anything outside them before allocating).
MIN_BLOCK_BYTES = 64 * 1024
MAX_BLOCK_BYTES = 256 * 1024 * 1024
MAX_PATH_BYTES = 4096  # a relative path in a key (PATH_MAX)


@dataclass(frozen=True, slots=True)
class FileVersion:
    relpath: bytes  # relative to the source root, no leading slash
    size: int
    mtime_ns: int

    def block_count(self, block_size: int) -> int:
        return -(-self.size // block_size)

    def block_length(self, index: int, block_size: int) -> int:
        """Bytes in block `index` (the last block of a file may be short)."""
        start = index * block_size
        return max(0, min(block_size, self.size - start))


@dataclass(frozen=True, slots=True)
class BlockKey:
    version: FileVersion
    index: int

    def offset(self, block_size: int) -> int:
        return self.index * block_size

    def length(self, block_size: int) -> int:
        return self.version.block_length(self.index, block_size)


def block_span(offset: int, size: int, file_size: int, block_size: int) -> range:
    """Indices of the blocks that hold bytes [offset, offset+size) of the file."""
    end = min(offset + size, file_size)
    if size <= 0 or offset >= end:
        return range(0)
    return range(offset // block_size, (end - 1) // block_size + 1)
