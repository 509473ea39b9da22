"""Which peer to ask for a block: the owner over the live members, or a known holder.

The owner is the first of a rendezvous ranking (hashring.py) over the members
not in backoff, this instance included. When this instance owns a block it
asks the member ranked second (the owner before this instance joined) for the
block *from memory only*, so an instance added to a warm cluster reads nothing
from the source for blocks the others hold.

Known holders: per file version (LRU), the members that answered a hit for
one of its blocks (a member that served one block of a file very likely holds
the others). When such a holder has fewer of this client's requests in flight
than the peer chosen above, it is asked first, from memory only. A holder that
misses is not asked for that file again until it serves one of its blocks
from memory. Sync: only the trio thread touches it.
"""

from __future__ import annotations

from cachetools import LRUCache

from memcachefs.hashring import HashRing
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.membership import Membership
from memcachefs.peers.health import Health
from memcachefs.peers.pool import Pool

HOLDER_VERSIONS = 4096  # file versions whose holders a client remembers (LRU)


class Peer:
    """One member as this client sees it: its connections, its health, its load."""

    def __init__(self, member: str) -> None:
        self.member = member
        self.pool = Pool(member)
        self.health = Health()
        self.in_flight = 0  # this client's requests to it now

    def is_down(self, now: float) -> bool:
        return self.health.is_down(now)


class Router:
    def __init__(self, membership: Membership) -> None:
        self._membership = membership
        self.peers: dict[str, Peer] = {}
        self._membership_version = -1
        self._ring = HashRing([])
        self._ring_members: frozenset[str] = frozenset()
        # file version -> {member: True if it served a block of it, False if it then
        # missed one asked from memory (after that only a hit from memory counts)}
        self._holders: LRUCache[FileVersion, dict[str, bool]] = LRUCache(maxsize=HOLDER_VERSIONS)

    def _sync_members(self) -> None:
        membership = self._membership
        if membership.version == self._membership_version:
            return
        self._membership_version = membership.version
        for member in list(self.peers):
            if member not in membership.peers:
                self.peers.pop(member).pool.close_idle()
        for member in membership.peers:
            self.peers.setdefault(member, Peer(member))

    def choose(self, key: BlockKey, now: float) -> tuple[Peer, bool] | None:
        """(peer, memory_only) to ask for `key`, or None to read the source."""
        self._sync_members()
        live = {member for member, peer in self.peers.items() if not peer.is_down(now)}
        self_id = self._membership.self_id
        if self_id is not None:
            live.add(self_id)
        if live != self._ring_members:
            self._ring_members = frozenset(live)
            self._ring = HashRing(live)
        ranked = self._ring.ranked(key)
        if not ranked:
            return None
        if ranked[0] != self_id:
            return self.peers[ranked[0]], False
        if len(ranked) > 1:
            # We own it; the member ranked second owned it before we joined.
            return self.peers[ranked[1]], True
        return None

    def holder_for(self, key: BlockKey, chosen: Peer, now: float) -> Peer | None:
        """A known holder of `key`'s file less loaded than `chosen`, to ask first; or None.

        Load is this client's requests in flight to each peer; a tie goes to `chosen`.
        """
        holders = self._holders.get(key.version)
        if not holders:
            return None
        best = chosen
        for member, holds in holders.items():
            peer = self.peers.get(member)
            if (
                holds
                and peer is not None
                and not peer.is_down(now)
                and peer.in_flight < best.in_flight
            ):
                best = peer
        return best if best is not chosen else None

    def remember(
        self, version: FileVersion, member: str, *, hit: bool | None, memory_only: bool
    ) -> None:
        """Learn from an answer: a hit (True), a miss (False) or a failure (None).

        A hit makes `member` a known holder of the file. A miss from memory
        means it does not hold all of it: only another hit from memory makes it
        a holder again, not a hit it filled from its source as the owner (so in
        a cold start, where owners hold only what they fill, a member is asked
        in vain at most once per file). A failure forgets it.
        """
        holders = self._holders.get(version)
        if holders is None:
            if hit:
                self._holders[version] = {member: True}
        elif hit is None:
            holders.pop(member, None)
        elif not hit:
            holders[member] = False
        elif memory_only or holders.get(member, True):
            holders[member] = True

    def close(self) -> None:
        for peer in self.peers.values():
            peer.pool.close_idle()
