"""Block arithmetic: which blocks a read touches and how long each block is."""

from __future__ import annotations

import pytest

from memcachefs.keys import BlockKey, FileVersion, block_span

BS = 4096


@pytest.mark.parametrize(
    ("offset", "size", "file_size", "expected"),
    [
        (0, BS, 10 * BS, range(0, 1)),  # exactly the first block
        (0, 1, 10 * BS, range(0, 1)),
        (BS - 1, 2, 10 * BS, range(0, 2)),  # straddles a boundary
        (BS, BS, 10 * BS, range(1, 2)),  # starts on a boundary
        (0, 10 * BS, 10 * BS, range(0, 10)),  # the whole file
        (9 * BS, 100, 9 * BS + 100, range(9, 10)),  # the short last block
        (9 * BS + 50, BS, 9 * BS + 100, range(9, 10)),  # size past EOF is clamped
        (0, 100 * BS, 3 * BS + 1, range(0, 4)),
    ],
)
def test_block_span_covers_exactly_the_blocks_holding_the_bytes(
    offset: int, size: int, file_size: int, expected: range
) -> None:
    assert block_span(offset, size, file_size, BS) == expected


@pytest.mark.parametrize(
    ("offset", "size", "file_size"),
    [
        (0, 0, 10 * BS),  # empty read
        (0, BS, 0),  # empty file
        (10 * BS, BS, 10 * BS),  # at EOF
        (20 * BS, BS, 10 * BS),  # past EOF
        (0, -1, 10 * BS),
    ],
)
def test_block_span_is_empty_when_no_byte_is_read(offset: int, size: int, file_size: int) -> None:
    assert len(block_span(offset, size, file_size, BS)) == 0


def test_block_count_rounds_up_and_empty_file_has_no_blocks() -> None:
    assert FileVersion(b"f", 0, 1).block_count(BS) == 0
    assert FileVersion(b"f", 1, 1).block_count(BS) == 1
    assert FileVersion(b"f", BS, 1).block_count(BS) == 1
    assert FileVersion(b"f", BS + 1, 1).block_count(BS) == 2


def test_block_length_is_full_then_short_then_zero_past_the_end() -> None:
    version = FileVersion(b"f", 2 * BS + 10, 1)
    assert [version.block_length(i, BS) for i in range(4)] == [BS, BS, 10, 0]
    assert BlockKey(version, 2).length(BS) == 10
    assert BlockKey(version, 2).offset(BS) == 2 * BS


def test_keys_of_different_versions_differ() -> None:
    # A changed file (size or mtime) must never find the old version's blocks.
    old = BlockKey(FileVersion(b"f", 100, 1), 0)
    assert old == BlockKey(FileVersion(b"f", 100, 1), 0)
    assert old != BlockKey(FileVersion(b"f", 100, 2), 0)
    assert old != BlockKey(FileVersion(b"f", 101, 1), 0)
    assert len({old, BlockKey(FileVersion(b"f", 100, 1), 0)}) == 1
