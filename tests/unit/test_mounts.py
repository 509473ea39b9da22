"""The FUSE connection's background limit, set in fusectl (a directory stands in here)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from memcachefs import mounts


def test_the_background_limit_and_its_congestion_threshold_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = tmp_path / "41"
    connection.mkdir()
    monkeypatch.setattr(mounts, "FUSECTL", tmp_path)
    assert mounts.set_fuse_background("0:41", 256)
    assert (connection / "max_background").read_text() == "256\n"
    # The kernel's own ratio: past 3/4 of the limit it stops asynchronous readahead.
    assert (connection / "congestion_threshold").read_text() == "192\n"


def test_fusectl_is_mounted_when_the_connection_is_not_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mounts, "FUSECTL", tmp_path)
    mounted: list[bool] = []

    def mount_fusectl() -> None:
        mounted.append(True)
        (tmp_path / "41").mkdir()

    monkeypatch.setattr(mounts, "mount_fusectl", mount_fusectl)
    assert mounts.set_fuse_background("0:41", 64)
    assert mounted == [True]
    assert (tmp_path / "41" / "max_background").read_text() == "64\n"


def test_a_limit_that_cannot_be_set_is_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mounts, "FUSECTL", tmp_path)

    def refused() -> None:
        raise OSError(errno.EPERM, "mount -t fusectl: permission denied")

    monkeypatch.setattr(mounts, "mount_fusectl", refused)
    with caplog.at_level(logging.WARNING, logger="memcachefs.mounts"):
        assert not mounts.set_fuse_background("0:41", 256)
    (record,) = caplog.records
    assert "background request limit" in record.getMessage()
    assert "stalled source" in record.getMessage()


@pytest.mark.parametrize(
    ("fstype", "network"),
    [
        ("fuse.rclone", True),
        ("fuse.s3fs", True),
        ("fuse", True),
        ("nfs4", True),
        ("cifs", True),
        ("ext4", False),
        ("xfs", False),
        ("tmpfs", False),
        ("fuseblk", False),
    ],
)
def test_network_filesystems_are_told_from_local_ones(fstype: str, network: bool) -> None:
    entry = mounts.MountEntry(mountpoint="/m", fstype=fstype, source="s", device="0:42")
    assert mounts.is_network(entry) is network
