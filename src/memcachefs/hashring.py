"""Who owns a block: rendezvous (highest random weight) hashing over the live members.

Pure and sync. Every member scores every key with xxh3-64 seeded by the
member's own hash; the highest score owns the key. When a member leaves, only
the keys it owned move (each to its second-ranked member); when one joins, it
takes only the keys it now ranks first for. Every instance that sees the same
member set computes the same owner, without coordination.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import xxhash

from memcachefs.keys import BlockKey

_KEY_FIELDS = struct.Struct("!QqQ")


def key_bytes(key: BlockKey) -> bytes:
    """A stable byte encoding of a block key (the same on every node)."""
    version = key.version
    return _KEY_FIELDS.pack(version.size, version.mtime_ns, key.index) + version.relpath


class HashRing:
    """An immutable view of a member set; members are ids like ``"10.0.0.7:7000"``."""

    def __init__(self, members: Iterable[str]) -> None:
        self.members = frozenset(members)
        # Sorted so that ties (astronomically unlikely) break the same way everywhere.
        self._seeds = [
            (xxhash.xxh64_intdigest(member.encode()), member) for member in sorted(self.members)
        ]

    def __len__(self) -> int:
        return len(self._seeds)

    def ranked(self, key: BlockKey) -> list[str]:
        """All members, best candidate for `key` first."""
        data = key_bytes(key)
        scored = [
            (xxhash.xxh3_64_intdigest(data, seed=seed), member) for seed, member in self._seeds
        ]
        scored.sort(reverse=True)
        return [member for _, member in scored]
