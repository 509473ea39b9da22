"""Configuration: parsed once into frozen, validated objects whose names carry units.

Sizes accept a plain byte count or a number with a K, M, G or T suffix. The
suffixes are 1024-based: ``4M`` is 4 MiB = 4194304 bytes. An optional trailing
``B`` or ``iB`` is accepted (``20GiB``), case is ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from memcachefs.errors import ConfigError
from memcachefs.keys import MAX_BLOCK_BYTES, MIN_BLOCK_BYTES

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SUFFIX_BYTES = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``20G`` / ``512M`` / ``4096`` into bytes; ConfigError on anything else."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError(
            f"invalid {what} {text!r}: use a byte count or a number with K, M, G or T "
            "(1024-based), e.g. 20G"
        )
    number, suffix = match.group(1), match.group(2).lower()
    value = int(float(number) * _SUFFIX_BYTES[suffix])
    if value <= 0:
        raise ConfigError(f"invalid {what} {text!r}: must be greater than zero")
    return value


def format_size(num_bytes: float) -> str:
    for unit, factor in (("T", 1024 * GiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if abs(num_bytes) >= factor:
            return f"{num_bytes / factor:.1f}{unit}"
    return f"{int(num_bytes)}B"


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"invalid {what} {text!r}: expected HOST:PORT")
    return host, int(port_text)


_Frozen = ConfigDict(frozen=True, extra="forbid")


class CacheConfig(BaseModel):
    model_config = _Frozen

    capacity_bytes: Annotated[int, Field(gt=0)]
    block_size_bytes: Annotated[int, Field(ge=MIN_BLOCK_BYTES, le=MAX_BLOCK_BYTES)] = 4 * MiB
    read_ahead_blocks: Annotated[int, Field(ge=0, le=256)] = 4
    source_threads: Annotated[int, Field(ge=1, le=256)] = 8
    metadata_threads: Annotated[int, Field(ge=1, le=256)] = 8
    push_page_cache: bool = True

    @model_validator(mode="after")
    def _capacity_holds_a_block(self) -> CacheConfig:
        if self.capacity_bytes < self.block_size_bytes:
            raise ValueError(
                f"capacity {format_size(self.capacity_bytes)} is smaller than the block size "
                f"{format_size(self.block_size_bytes)}"
            )
        if self.block_size_bytes % 4096:
            raise ValueError("block size must be a multiple of 4K")
        return self


class ClusterConfig(BaseModel):
    """Peers that share their memory. Empty peer lists mean a cluster of one."""

    model_config = _Frozen

    listen: tuple[str, int] | None = None
    peers: tuple[tuple[str, int], ...] = ()
    peers_dns: tuple[str, int] | None = None
    peers_file: Path | None = None
    secret: bytes | None = None
    peer_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    dns_refresh_s: Annotated[float, Field(gt=0)] = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.listen or self.peers or self.peers_dns or self.peers_file)

    @model_validator(mode="after")
    def _listener_needs_a_secret(self) -> ClusterConfig:
        if self.listen is not None and self.listen[1] == 0:
            raise ValueError("the peer port must be 1-65535 (others must know it)")
        if self.listen is not None and not self.secret:
            raise ValueError(
                f"--listen {self.listen[0]}:{self.listen[1]} needs --cluster-secret-file "
                "(peers must authenticate, on loopback too)"
            )
        if self.secret is not None and not self.secret:
            raise ValueError("the cluster secret is empty")
        return self


class MountConfig(BaseModel):
    model_config = _Frozen

    source: Path
    mountpoint: Path
    cache: CacheConfig
    cluster: ClusterConfig = ClusterConfig()
    attr_timeout_s: Annotated[float, Field(ge=0)] = 1.0
    kernel_read_ahead_kib: Annotated[int, Field(ge=0, le=65536)] = 1024
    allow_other: bool = False
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 5.0
