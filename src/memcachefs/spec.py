"""`memcachefs mount --spec FILE`: the cache entries of a PAI-EAS service spec.

A PAI-EAS service JSON (the whole spec, or just its ``storage`` list) lists
storage entries, each one kind (``cache``, ``oss``, ``nas``, ...) and a
``mount_path``. Every ``cache`` entry is one memcachefs mount: source
``cache.path``, mountpoint ``mount_path``, capacity ``cache.capacity``. Entries of
other kinds are the platform's to mount; they are noted and skipped.

The entry's values are the lowest-precedence layer of `config.load_config`, so
flags, MEMCACHEFS_* variables and --config still apply to every entry. All entries
are validated before any is mounted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from memcachefs.config import MountConfig, load_config
from memcachefs.errors import ConfigError

MAX_SPEC_BYTES = 1024 * 1024


class CacheStorage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    capacity: str | int


class CacheEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    cache: CacheStorage
    mount_path: str


@dataclass(frozen=True)
class Skipped:
    index: int
    kind: str
    mount_path: str | None


@dataclass(frozen=True)
class Plan:
    mounts: list[MountConfig]
    skipped: list[Skipped]


def read_spec(path: Path) -> list[Any]:
    """The storage list of a spec file; ConfigError (one line) on a bad file."""
    what = f"--spec {path}"
    try:
        if os.path.getsize(path) > MAX_SPEC_BYTES:
            raise ConfigError(f"{what} is larger than {MAX_SPEC_BYTES} bytes")
        data = json.loads(Path(path).read_bytes())
    except OSError as error:
        raise ConfigError(f"{what}: {error.strerror}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what}: not valid JSON: {error}") from None
    if isinstance(data, dict):
        if "storage" not in data:
            raise ConfigError(f"{what}: no 'storage' list in the spec")
        data = data["storage"]
    if not isinstance(data, list):
        raise ConfigError(f"{what}: 'storage' must be a list of entries")
    return data


def plan(
    path: Path,
    flags: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Plan:
    """A validated MountConfig per cache entry; ConfigError naming the entry's index and key."""
    mounts: list[MountConfig] = []
    skipped: list[Skipped] = []
    for index, raw in enumerate(read_spec(path)):
        where = f"storage[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"--spec {path}: {where} is not an object")
        kinds = [key for key in raw if key != "mount_path"]
        if "cache" not in raw:
            mount_path = raw.get("mount_path")
            skipped.append(
                Skipped(index, kinds[0] if kinds else "?", mount_path if mount_path else None)
            )
            continue
        try:
            entry = CacheEntry.model_validate(raw)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            reason = "is required" if first["type"] == "missing" else f": {first['msg']}"
            if first["type"] == "extra_forbidden":
                reason = "is not a key of a cache entry"
            raise ConfigError(f"--spec {path}: {where}.{key} {reason}".replace(" :", ":")) from None
        spec_path = Path(path).absolute().parent
        layer = {
            "source": str(spec_path / entry.cache.path),
            "mountpoint": str(spec_path / entry.mount_path),
            "capacity": str(entry.cache.capacity),
        }
        origins = {
            "source": f"{where}.cache.path in {path}",
            "mountpoint": f"{where}.mount_path in {path}",
            "capacity": f"{where}.cache.capacity in {path}",
        }
        mounts.append(
            load_config(
                flags,
                config_file=config_file,
                environ=environ,
                defaults=layer,
                default_origins=origins,
            )
        )
    if not mounts:
        raise ConfigError(f"--spec {path}: no cache entry to mount")
    targets = [config.mountpoint for config in mounts]
    for index, target in enumerate(targets):
        if target in targets[:index]:
            raise ConfigError(f"--spec {path}: two cache entries mount {target}")
    return Plan(mounts, skipped)
