"""Issue 2, item 12: bad input through the real CLI gives one clear line on stderr,
exit code 2, no traceback, and nothing mounted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import MEMCACHEFS, run_cli

from memcachefs import mounts

pytestmark = pytest.mark.fuse


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    source, mountpoint = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    (source / "file").write_bytes(b"x")
    return source, mountpoint


def _assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("memcachefs: "), lines
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


# (case id, argv builder from (source, mountpoint), words the message must contain)
CASES = [
    ("capacity-0", lambda s, m: [s, m, "--capacity", "0"], ["capacity", "'0'"]),
    ("capacity-negative", lambda s, m: [s, m, "--capacity", "-1"], ["capacity", "-1"]),
    ("capacity-abc", lambda s, m: [s, m, "--capacity", "abc"], ["capacity", "abc"]),
    ("capacity-unit", lambda s, m: [s, m, "--capacity", "20X"], ["capacity", "20X"]),
    ("capacity-empty", lambda s, m: [s, m, "--capacity", ""], ["capacity"]),
    (
        "capacity-below-block",
        lambda s, m: [s, m, "--capacity", "1M", "--block-size", "4M"],
        ["capacity", "block size"],
    ),
    (
        "block-size-bad",
        lambda s, m: [s, m, "--capacity", "64M", "--block-size", "4Q"],
        ["block size", "4Q"],
    ),
    ("capacity-missing", lambda s, m: [s, m], ["--capacity"]),
    (
        "source-missing",
        lambda s, m: [s / "nope", m, "--capacity", "64M"],
        ["source", "does not exist"],
    ),
    (
        "source-is-a-file",
        lambda s, m: [s / "file", m, "--capacity", "64M"],
        ["source", "not a directory"],
    ),
    (
        "mountpoint-missing",
        lambda s, m: [s, m / "nope", "--capacity", "64M"],
        ["mountpoint", "does not exist"],
    ),
    (
        "mountpoint-is-a-file",
        lambda s, m: [s, s / "file", "--capacity", "64M"],
        ["not a directory"],
    ),
    ("mountpoint-is-source", lambda s, m: [s, s, "--capacity", "64M"], ["same"]),
    (
        "mountpoint-is-source-via-dots",
        lambda s, m: [s, m / ".." / "source", "--capacity", "64M"],
        ["same"],
    ),
    ("mountpoint-inside-source", lambda s, m: [s, s / "sub", "--capacity", "64M"], ["inside"]),
]


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_bad_input_is_one_line_exit_2_and_nothing_mounted(
    dirs: tuple[Path, Path], foreground: bool
) -> None:
    source, mountpoint = dirs
    (source / "sub").mkdir()
    failures = {}
    for case, argv_of, words in CASES:
        argv = ["mount", *map(str, argv_of(source, mountpoint))]
        if foreground:
            argv.append("--foreground")
        result = run_cli(*argv)
        try:
            _assert_refused(result, *words)
        except AssertionError as error:
            failures[case] = f"{error}: rc={result.returncode} stderr={result.stderr!r}"
        for path in (mountpoint, source / "sub", source):
            assert mounts.find_mount(path) is None, (case, path)
    assert failures == {}


def test_mountpoint_already_mounted(memcachefs_source: Path, memcachefs_mount) -> None:
    fs = memcachefs_mount(memcachefs_source, capacity="8M")
    before = mounts.mount_entries()
    for extra in ([], ["--foreground"]):
        result = run_cli("mount", memcachefs_source, fs.path, "--capacity", "8M", *extra)
        _assert_refused(result, "already")
    assert mounts.mount_entries() == before  # nothing stacked on top
    assert fs.stats()["pid"] == fs.pid  # and the first mount still serves


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_unusable_dev_fuse(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    # In a private mount namespace, hide /dev/fuse behind a read-only plain file.
    source, mountpoint = dirs
    blocker = tmp_path / "not-a-device"
    blocker.touch()
    script = (
        'mount --bind "$1" /dev/fuse && mount -o remount,bind,ro /dev/fuse && shift && exec "$@"'
    )
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(blocker),
            *MEMCACHEFS,
            "mount",
            str(source),
            str(mountpoint),
            "--capacity",
            "64M",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 2 and "mount" in result.stderr and "memcachefs" not in result.stderr:
        pytest.skip(f"cannot hide /dev/fuse here: {result.stderr.strip()}")
    _assert_refused(result, "/dev/fuse")
    assert mounts.find_mount(mountpoint) is None


def test_usage_errors_are_one_line_too() -> None:
    for argv in (["mount"], ["frobnicate"], ["stats"], []):
        result = run_cli(*argv)
        assert result.returncode == 2, argv
        assert len(result.stderr.splitlines()) == 1, (argv, result.stderr)
        assert "Traceback" not in result.stderr


def test_stats_and_umount_of_a_plain_directory(tmp_path: Path) -> None:
    _assert_refused(run_cli("stats", tmp_path), "not a memcachefs mount")
    _assert_refused(run_cli("stats", tmp_path / "nope"), "does not exist")
    _assert_refused(run_cli("umount", tmp_path), "not mounted")


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("memcachefs")
    assert os.access(script, os.X_OK)
    result = subprocess.run(
        [script, "mount", "/nonexistent-source", "/tmp", "--capacity", "1G"],
        capture_output=True,
        text=True,
        check=False,
    )
    _assert_refused(result, "does not exist")
