"""Rendezvous hashing: stable owners, minimal movement, even spread."""

from __future__ import annotations

from collections import Counter

from memcachefs.hashring import HashRing
from memcachefs.keys import BlockKey, FileVersion

MEMBERS = [f"10.0.0.{n}:7000" for n in range(1, 6)]
KEYS = [
    BlockKey(FileVersion(f"models/m{f}.safetensors".encode(), 1 << 30, 1_700_000_000 + f), i)
    for f in range(20)
    for i in range(100)
]


def owner(ring: HashRing, key: BlockKey) -> str | None:
    """The member that owns `key` (ranked first); None for an empty ring."""
    ranked = ring.ranked(key)
    return ranked[0] if ranked else None


def test_empty_ring_has_no_owner() -> None:
    ring = HashRing([])
    assert owner(ring, KEYS[0]) is None
    assert ring.ranked(KEYS[0]) == []


def test_owner_is_first_ranked_and_independent_of_member_order() -> None:
    ring = HashRing(MEMBERS)
    shuffled = HashRing(reversed(MEMBERS))
    for key in KEYS[:300]:
        ranked = ring.ranked(key)
        assert sorted(ranked) == sorted(MEMBERS)
        assert owner(ring, key) == ranked[0] == owner(shuffled, key)
        assert shuffled.ranked(key) == ranked


def test_owners_are_stable_across_instances() -> None:
    first = [owner(HashRing(MEMBERS), key) for key in KEYS]
    second = [owner(HashRing(list(MEMBERS)), key) for key in KEYS]
    assert first == second


def test_keys_spread_over_members() -> None:
    counts = Counter(owner(HashRing(MEMBERS), key) for key in KEYS)
    expected = len(KEYS) / len(MEMBERS)
    assert set(counts) == set(MEMBERS)
    assert all(0.75 * expected < count < 1.25 * expected for count in counts.values())


def test_a_leaving_member_moves_only_its_keys_to_its_second_choice() -> None:
    full = HashRing(MEMBERS)
    gone = MEMBERS[2]
    smaller = HashRing(m for m in MEMBERS if m != gone)
    moved = 0
    for key in KEYS:
        before = full.ranked(key)
        after = owner(smaller, key)
        if before[0] == gone:
            moved += 1
            assert after == before[1]
        else:
            assert after == before[0]
    assert 0 < moved < len(KEYS) / 3


def test_a_joining_member_takes_keys_only_from_others_and_only_its_own() -> None:
    small = HashRing(MEMBERS[:4])
    grown = HashRing(MEMBERS)
    for key in KEYS:
        new_owner = owner(grown, key)
        if new_owner != MEMBERS[4]:
            assert new_owner == owner(small, key)
        else:
            # The previous owner is the newcomer's second choice: it still has the block.
            assert grown.ranked(key)[1] == owner(small, key)


def test_versions_and_indices_are_distinct_keys() -> None:
    ring = HashRing(MEMBERS)
    version = FileVersion(b"a.bin", 10 << 20, 1)
    newer = FileVersion(b"a.bin", 10 << 20, 2)
    owners = {owner(ring, BlockKey(version, i)) for i in range(50)}
    assert len(owners) > 1
    assert [owner(ring, BlockKey(version, i)) for i in range(50)] != [
        owner(ring, BlockKey(newer, i)) for i in range(50)
    ]
