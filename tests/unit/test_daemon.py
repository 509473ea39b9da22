"""The daemon's start-up failures reach the user as one line, not a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memcachefs import cli, daemon
from memcachefs.errors import MountError


@pytest.mark.skipif(not os.access("/dev/fuse", os.W_OK), reason="needs /dev/fuse for check_paths")
def test_mount_failure_inside_the_service_nursery_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source, mountpoint = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()

    def refuse(fs: object, config: object) -> None:
        raise MountError("cannot mount: refused for this test")

    monkeypatch.setattr(daemon, "_mount", refuse)
    code = cli.main(["mount", str(source), str(mountpoint), "--capacity", "16M", "--foreground"])

    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["memcachefs: cannot mount: refused for this test"]
