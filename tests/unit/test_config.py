"""Sizes, addresses and the frozen config models."""

from __future__ import annotations

import pydantic
import pytest

from memcachefs.config import (
    CacheConfig,
    GiB,
    KiB,
    MiB,
    MountConfig,
    format_size,
    parse_host_port,
    parse_size,
)
from memcachefs.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("1", 1),
        ("1K", KiB),
        ("1k", KiB),
        ("4M", 4 * 1024 * 1024),
        ("20G", 20 * 1024**3),
        ("2T", 2 * 1024**4),
        ("20GiB", 20 * GiB),
        ("20gb", 20 * GiB),
        ("512MB", 512 * MiB),
        ("1.5G", 3 * GiB // 2),
        (" 8M ", 8 * MiB),
    ],
)
def test_parse_size_is_1024_based(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_allows_zero_the_models_bound_it() -> None:
    # One validator for every size; whether 0 is allowed is each option's bound.
    assert parse_size("0") == 0
    assert parse_size("0G") == 0


@pytest.mark.parametrize("text", ["-1", "abc", "20X", "", "G", "1e3", "0.1"])
def test_parse_size_rejects_bad_sizes_with_the_option_name(text: str) -> None:
    with pytest.raises(ConfigError, match="capacity") as caught:
        parse_size(text, "capacity")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("num_bytes", "expected"),
    [(0, "0B"), (1023, "1023B"), (KiB, "1.0K"), (4 * MiB, "4.0M"), (20 * GiB, "20.0G")],
)
def test_format_size(num_bytes: int, expected: str) -> None:
    assert format_size(num_bytes) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host:7000", ("host", 7000)),
        ("10.0.0.1:0", ("10.0.0.1", 0)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, "peer") == expected


@pytest.mark.parametrize("text", ["host", "host:", ":7000", "host:65536", "host:-1", "host:x"])
def test_parse_host_port_rejects_bad_addresses(text: str) -> None:
    with pytest.raises(ConfigError, match="peer"):
        parse_host_port(text, "peer")


def test_cache_config_refuses_capacity_below_the_block_size() -> None:
    with pytest.raises(pydantic.ValidationError, match="smaller than the block size"):
        CacheConfig(capacity_bytes=1 * MiB, block_size_bytes=4 * MiB)


def test_cache_config_refuses_block_size_not_a_multiple_of_4k() -> None:
    with pytest.raises(pydantic.ValidationError, match="multiple of 4K"):
        CacheConfig(capacity_bytes=GiB, block_size_bytes=64 * KiB + 512)


def test_cache_config_accepts_capacity_of_exactly_one_block() -> None:
    config = CacheConfig(capacity_bytes=4 * MiB)
    assert config.block_size_bytes == 4 * MiB
    assert config.read_ahead_blocks == 4


def test_config_models_are_frozen_and_reject_unknown_fields(tmp_path) -> None:
    cache = CacheConfig(capacity_bytes=GiB)
    with pytest.raises(pydantic.ValidationError):
        cache.capacity_bytes = 2 * GiB  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        CacheConfig(capacity_bytes=GiB, capacity=GiB)  # type: ignore[call-arg]
    mount = MountConfig(source=tmp_path, mountpoint=tmp_path / "m", cache=cache)
    with pytest.raises(pydantic.ValidationError):
        mount.attr_timeout_s = 5.0  # type: ignore[misc]
    assert not mount.cluster.enabled
