"""Issue 7, items 5 and 7: --pin keeps files' blocks out of LRU eviction (filled at mount,
refused past --pin-share); --log-format json event lines."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from support import drop_page_cache, run_cli, wait_until

from memcachefs import mounts

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024
ARGS = ["--block-size", "256K", "--no-prefetch", "--no-page-cache-push"]


def test_pin_keeps_a_pinned_file_through_a_flood_of_other_reads(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    rng = random.Random(7)
    (memcachefs_source / "models").mkdir()
    pinned = rng.randbytes(2 * MiB)
    (memcachefs_source / "models" / "m.safetensors").write_bytes(pinned)
    flood = [memcachefs_source / f"flood{i}.raw" for i in range(6)]
    for path in flood:
        path.write_bytes(rng.randbytes(2 * MiB))
    fs = memcachefs_mount(
        memcachefs_source,
        capacity="4M",
        args=[*ARGS, "--pin", "**/*.safetensors", "--log-format", "json"],
    )
    # Pinned files are filled at mount, before anyone reads them.
    wait_until(lambda: fs.stats()["pinned_bytes"] == len(pinned), "the pinned file filled")
    assert fs.stats()["pinned_files"] == 1
    for path in flood:
        assert (fs.path / path.name).read_bytes() == path.read_bytes()
    before = fs.stats()
    assert before["evictions"] > 0  # the flood did not fit
    target = fs.path / "models" / "m.safetensors"
    drop_page_cache(target)
    assert target.read_bytes() == pinned
    after = fs.stats()
    assert after["source_bytes"] == before["source_bytes"]  # every block came from memory
    assert after["pinned_bytes"] == len(pinned)
    assert after["used_bytes"] + after["reserved_bytes"] + after["free_buffer_bytes"] <= 4 * MiB

    # --log-format json: every line is one JSON object; the notable events are there.
    entries = [json.loads(line) for line in fs.log_text().splitlines() if line.strip()]
    events = {entry.get("event"): entry for entry in entries}
    assert events["mounted"]["mountpoint"] == str(fs.path)
    assert events["pinned"]["files"] == 1 and events["pinned"]["bytes"] == len(pinned)
    # One line per event, never one per block at INFO.
    assert len(entries) < 20, entries


def test_pin_larger_than_the_share_exits_2_and_mounts_nothing(
    memcachefs_source: Path, tmp_path: Path
) -> None:
    (memcachefs_source / "big.raw").write_bytes(b"x" * 3 * MiB)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli("mount", memcachefs_source, mountpoint, "--capacity", "4M", "--pin", "big.raw")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "3.0M" in lines[0] and "2.0M" in lines[0] and "--pin" in lines[0], lines[0]
    assert mounts.find_mount(mountpoint.absolute()) is None


def test_pin_share_is_validated(memcachefs_source: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli(
        "mount", memcachefs_source, mountpoint, "--capacity", "4M", "--pin-share", "1.5"
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "pin-share" in result.stderr


def test_a_pin_pattern_matching_nothing_is_a_warning(
    memcachefs_source: Path, memcachefs_mount
) -> None:
    fs = memcachefs_mount(
        memcachefs_source,
        capacity="4M",
        args=[*ARGS, "--pin", "nothing/*.gguf"],
        expected_log=["matches no file"],
    )
    assert "--pin nothing/*.gguf matches no file" in fs.log_text()
    assert fs.stats()["pinned_files"] == 0
