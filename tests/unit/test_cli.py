"""Bad input on the command line: one line on stderr, exit code 2, nothing mounted.

Every case here fails in validation, before anything touches /dev/fuse.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memcachefs import cli
from memcachefs.cli import EXIT_USAGE, build_parser, config_from_args, main
from memcachefs.config import MiB
from memcachefs.errors import ConfigError


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    source, mountpoint = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    return source, mountpoint


@pytest.fixture(autouse=True)
def never_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    # If validation ever lets a bad case through, fail instead of mounting for real.
    def refuse(*args: object, **kwargs: object) -> int:
        raise AssertionError("reached the mount step")

    monkeypatch.setattr(cli, "_spawn_background", refuse)


def args_for(*argv: str):
    return build_parser().parse_args(["mount", *argv])


def test_config_from_args_builds_a_config_in_bytes(dirs: tuple[Path, Path]) -> None:
    source, mountpoint = dirs
    config = config_from_args(
        args_for(str(source), str(mountpoint), "--capacity", "20G", "--block-size", "1M")
    )
    assert config.cache.capacity_bytes == 20 * 1024**3
    assert config.cache.block_size_bytes == MiB
    assert config.source == source
    assert config.kernel_read_ahead_bytes == MiB


def test_kernel_read_ahead_zero_means_kernel_default(dirs: tuple[Path, Path]) -> None:
    source, mountpoint = dirs
    args = args_for(str(source), str(mountpoint), "--capacity", "1G", "--kernel-read-ahead", "0")
    assert config_from_args(args).kernel_read_ahead_bytes == 0


@pytest.mark.parametrize(
    ("options", "names"),
    [
        (["--capacity", "0"], "capacity"),
        (["--capacity=-1"], "capacity"),
        (["--capacity", "abc"], "capacity"),
        (["--capacity", "20X"], "capacity"),
        (["--capacity", "1M"], "capacity"),  # below the default 4M block size
        (["--capacity", "1G", "--block-size", "3"], "--block-size"),  # below 64K
        (["--capacity", "1G", "--block-size", "65537"], "block size"),  # not 4K-aligned
        (["--capacity", "1G", "--block-size", "1G"], "--block-size"),  # above 256M
        (["--capacity", "1G", "--read-ahead", "1000"], "--read-ahead"),
        (["--capacity", "1G", "--source-threads", "0"], "--source-threads"),
        (["--capacity", "1G", "--attr-timeout", "-1"], "--attr-timeout"),
        (["--capacity", "1G", "--shutdown-grace", "-1"], "--shutdown-grace"),
        (["--capacity", "1G", "--kernel-read-ahead", "512"], "--kernel-read-ahead"),
    ],
)
def test_config_errors_are_one_line_naming_the_option(
    dirs: tuple[Path, Path], options: list[str], names: str
) -> None:
    source, mountpoint = dirs
    with pytest.raises(ConfigError) as caught:
        config_from_args(args_for(str(source), str(mountpoint), *options))
    message = str(caught.value)
    assert names in message.lower()
    assert "\n" not in message


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, check exit code 2 and one stderr line; return that line."""
    assert main(["mount", *argv]) == EXIT_USAGE
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("memcachefs: ")
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize("capacity", ["0", "-1", "abc", "20X"])
def test_main_rejects_bad_capacity(
    capsys: pytest.CaptureFixture[str], dirs: tuple[Path, Path], capacity: str
) -> None:
    source, mountpoint = dirs
    line = run_main(capsys, [str(source), str(mountpoint), "--capacity", capacity])
    assert "capacity" in line
    assert repr(capacity) in line


def test_main_rejects_negative_capacity_written_as_separate_argument(
    capsys: pytest.CaptureFixture[str], dirs: tuple[Path, Path]
) -> None:
    # "--capacity -1" must reach parse_size, not be mistaken for an option.
    source, mountpoint = dirs
    line = run_main(capsys, [str(source), str(mountpoint), "--capacity", "-1"])
    assert "capacity" in line


def test_main_rejects_capacity_below_block_size(
    capsys: pytest.CaptureFixture[str], dirs: tuple[Path, Path]
) -> None:
    source, mountpoint = dirs
    line = run_main(
        capsys, [str(source), str(mountpoint), "--capacity", "1M", "--block-size", "4M"]
    )
    assert "capacity" in line
    assert "block size" in line


def test_main_rejects_missing_source(
    capsys: pytest.CaptureFixture[str], dirs: tuple[Path, Path]
) -> None:
    source, mountpoint = dirs
    missing = source.parent / "nope"
    line = run_main(capsys, [str(missing), str(mountpoint), "--capacity", "1G"])
    assert str(missing) in line
    assert "does not exist" in line


def test_main_rejects_source_that_is_a_file(
    capsys: pytest.CaptureFixture[str], dirs: tuple[Path, Path]
) -> None:
    _, mountpoint = dirs
    file = mountpoint.parent / "file"
    file.write_bytes(b"x")
    line = run_main(capsys, [str(file), str(mountpoint), "--capacity", "1G"])
    assert "not a directory" in line


def test_main_rejects_missing_mountpoint(
    capsys: pytest.CaptureFixture[str], dirs: tuple[Path, Path]
) -> None:
    source, mountpoint = dirs
    missing = mountpoint.parent / "no-mnt"
    line = run_main(capsys, [str(source), str(missing), "--capacity", "1G"])
    assert "mountpoint" in line
    assert "does not exist" in line


def test_main_rejects_mountpoint_equal_to_source(
    capsys: pytest.CaptureFixture[str], dirs: tuple[Path, Path]
) -> None:
    source, _ = dirs
    line = run_main(capsys, [str(source), str(source), "--capacity", "1G"])
    assert "same" in line


def test_main_rejects_mountpoint_equal_to_source_through_a_symlink(
    capsys: pytest.CaptureFixture[str], dirs: tuple[Path, Path]
) -> None:
    source, _ = dirs
    alias = source.parent / "alias"
    alias.symlink_to(source)
    line = run_main(capsys, [str(source), str(alias), "--capacity", "1G"])
    assert "same" in line


def test_main_rejects_mountpoint_inside_source(
    capsys: pytest.CaptureFixture[str], dirs: tuple[Path, Path]
) -> None:
    source, _ = dirs
    inside = source / "a" / "b"
    inside.mkdir(parents=True)
    line = run_main(capsys, [str(source), str(inside), "--capacity", "1G"])
    assert "inside the source" in line
