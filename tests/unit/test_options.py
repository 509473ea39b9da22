"""One definition per option: flags, environment variables and config file keys."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from memcachefs.cli import build_parser, config_from_args
from memcachefs.config import OPTIONS, GiB, MiB, load_config, read_secret
from memcachefs.errors import ConfigError

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    source, mountpoint = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    return source, mountpoint


def parse(*argv: str, environ: dict[str, str] | None = None):
    return config_from_args(build_parser().parse_args(["mount", *argv]), environ=environ or {})


def test_every_option_has_a_flag_an_env_variable_and_a_file_key() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["mount"].format_help()  # type: ignore[union-attr]
    for name, entry in OPTIONS.items():
        option = entry.option
        assert option.env == "MEMCACHEFS_" + name.upper().replace("-", "_")
        assert option.key == name.replace("-", "_")
        if not option.positional:
            assert option.flag in help_text, name


def test_readme_documents_every_option_and_only_those() -> None:
    text = README.read_text()
    written = set(re.findall(r"^\| `--([a-z-]+)", text, re.MULTILINE))
    flags = {name for name, entry in OPTIONS.items() if not entry.option.positional}
    # A boolean may be documented by its --no- form (--no-page-cache-push).
    documented = {name if name in flags else name.removeprefix("no-") for name in written}
    process_only = {"config", "foreground"}
    assert flags <= documented, f"undocumented: {sorted(flags - documented)}"
    assert documented - process_only <= flags, f"not options: {documented - flags}"


def test_environment_and_config_file(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    source, mountpoint = dirs
    config_file = tmp_path / "memcachefs.toml"
    config_file.write_text(
        f'source = "{source}"\nmountpoint = "{mountpoint}"\ncapacity = "2G"\n'
        'block_size = "1M"\nread_ahead = 2\npeer = ["127.0.0.1:7001", "127.0.0.1:7002"]\n'
        "page_cache_push = false\n"
    )
    config = parse("--config", str(config_file))
    assert config.source == source
    assert config.cache.capacity_bytes == 2 * GiB
    assert config.cache.block_size_bytes == MiB
    assert config.cache.read_ahead_blocks == 2
    assert not config.cache.push_page_cache
    assert config.cluster.peers == (("127.0.0.1", 7001), ("127.0.0.1", 7002))
    environ = {"MEMCACHEFS_CAPACITY": "3G", "MEMCACHEFS_PEER": "127.0.0.1:7003,127.0.0.1:7004"}
    config = parse("--config", str(config_file), environ=environ)
    assert config.cache.capacity_bytes == 3 * GiB
    assert config.cluster.peers == (("127.0.0.1", 7003), ("127.0.0.1", 7004))
    assert config.cache.block_size_bytes == MiB  # from the file still
    config = parse("--config", str(config_file), "--capacity", "4G", environ=environ)
    assert config.cache.capacity_bytes == 4 * GiB


def test_flags_given_as_booleans_override_the_file(dirs: tuple[Path, Path], tmp_path) -> None:
    source, mountpoint = dirs
    config_file = tmp_path / "c.toml"
    config_file.write_text('capacity = "1G"\npage_cache_push = false\n')
    argv = [str(source), str(mountpoint), "--config", str(config_file)]
    assert parse(*argv, "--page-cache-push").cache.push_page_cache
    assert not parse(*argv).cache.push_page_cache


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('capcity = "1G"', "unknown key 'capcity' in"),
        ('capacity = "1X"', "capacity in "),
        ("capacity = ", "not valid TOML"),
        ('capacity = "1G"\nread_ahead = "many"', "read_ahead in "),
    ],
)
def test_config_file_errors_name_the_key_and_the_file(
    dirs: tuple[Path, Path], tmp_path: Path, text: str, expected: str
) -> None:
    source, mountpoint = dirs
    config_file = tmp_path / "bad.toml"
    config_file.write_text(text + "\n")
    with pytest.raises(ConfigError) as caught:
        parse(str(source), str(mountpoint), "--config", str(config_file))
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    if "unknown" not in expected and "TOML" not in expected:
        assert str(config_file) in message


def test_environment_errors_name_the_variable(dirs: tuple[Path, Path]) -> None:
    source, mountpoint = dirs
    with pytest.raises(ConfigError, match="MEMCACHEFS_PEER_TIMEOUT 'soon'"):
        parse(
            str(source),
            str(mountpoint),
            "--capacity",
            "1G",
            environ={"MEMCACHEFS_PEER_TIMEOUT": "soon"},
        )


def test_missing_config_file_is_one_line(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config .*No such file"):
        load_config({}, config_file=tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    "address", ["256.1.1.1:7070", "host with space:80", "bad-:1", "host:0", "host:99999"]
)
def test_bad_peer_addresses_are_refused(dirs: tuple[Path, Path], address: str) -> None:
    source, mountpoint = dirs
    with pytest.raises(ConfigError, match="--peer"):
        parse(str(source), str(mountpoint), "--capacity", "1G", "--peer", address)


def test_secret_file_checks_type_mode_and_size_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secret(Path("/dev/zero"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secret(fifo)  # would block forever if it were read
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    big.chmod(0o600)
    with pytest.raises(ConfigError, match="larger than"):
        read_secret(big)
    open_file = tmp_path / "open"
    open_file.write_text("s3cret\n")
    open_file.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by everyone"):
        read_secret(open_file)
    open_file.chmod(0o600)
    assert read_secret(open_file) == b"s3cret"
