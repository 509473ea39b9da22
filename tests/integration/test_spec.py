"""Issue 7, item 4: `memcachefs mount --spec FILE` mounts every cache entry of a PAI-EAS
service spec (the SD web UI example, its paths rewritten to temporary directories)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import run_cli

from memcachefs import mounts

EXAMPLE = Path(__file__).parents[2] / "examples" / "sd-webui-spec.json"


def _rewritten(tmp_path: Path, spec: dict, source: Path, mountpoint: Path) -> Path:  # type: ignore[type-arg]
    for entry in spec["storage"]:
        if "cache" in entry:
            entry["cache"]["path"] = str(source)
            entry["cache"]["capacity"] = "64M"
            entry["mount_path"] = str(mountpoint)
        else:
            entry["mount_path"] = str(source)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.fuse
def test_the_sd_example_mounts_its_cache_entry(tmp_path: Path) -> None:
    source, mountpoint = tmp_path / "data-slow", tmp_path / "data-fast"
    (source / "models" / "Stable-diffusion").mkdir(parents=True)
    mountpoint.mkdir()
    (source / "models" / "Stable-diffusion" / "v1-5.safetensors").write_bytes(b"w" * 5000)
    spec = _rewritten(tmp_path, json.loads(EXAMPLE.read_text()), source, mountpoint)
    result = run_cli("mount", "--spec", spec, "--log-file", tmp_path / "d.log")
    try:
        assert result.returncode == 0, result.stderr
        assert "storage[1] (oss" in result.stdout and "skipped" in result.stdout
        assert mounts.find_mount(mountpoint) is not None
        data = (mountpoint / "models" / "Stable-diffusion" / "v1-5.safetensors").read_bytes()
        assert data == b"w" * 5000
        stats = json.loads(run_cli("stats", mountpoint, "--json").stdout)
        assert stats["capacity_bytes"] == 64 * 1024 * 1024
    finally:
        run_cli("umount", mountpoint)


def test_just_the_storage_list_is_accepted_and_flags_apply(tmp_path: Path) -> None:
    from memcachefs.spec import plan

    storage = json.loads(EXAMPLE.read_text())["storage"]
    path = tmp_path / "storage.json"
    path.write_text(json.dumps(storage))
    result = plan(path, {"block-size": "1M"}, environ={})
    (config,) = result.mounts
    assert config.source == Path("/data-slow") and config.mountpoint == Path("/data-fast")
    assert config.cache.capacity_bytes == 20 * 1024**3
    assert config.cache.block_size_bytes == 1024 * 1024
    assert [(s.index, s.kind) for s in result.skipped] == [(1, "oss")]
    # A flag wins over the entry.
    assert plan(path, {"capacity": "1G"}, environ={}).mounts[0].cache.capacity_bytes == 1024**3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"not valid JSON"),
        ('{"name": "x"}', r"no 'storage' list"),
        (
            '[{"cache": {"path": "/s"}, "mount_path": "/m"}]',
            r"storage\[0\]\.cache\.capacity is required",
        ),
        (
            '[{"oss": {}, "mount_path": "/o"}, '
            '{"cache": {"path": "/s", "capacity": "20X"}, "mount_path": "/m"}]',
            r"storage\[1\]\.cache\.capacity in .*'20X'",
        ),
        (
            '[{"cache": {"path": "/s", "capacity": "1G", "size": 1}, "mount_path": "/m"}]',
            r"storage\[0\]\.cache\.size is not a key",
        ),
        ('[{"cache": {"path": "/s", "capacity": "1G"}}]', r"storage\[0\]\.mount_path is required"),
        ('[{"oss": {}, "mount_path": "/o"}]', r"no cache entry"),
    ],
)
def test_bad_specs_are_one_line_errors_with_exit_2(
    tmp_path: Path, content: str, message: str
) -> None:
    import re

    path = tmp_path / "spec.json"
    path.write_text(content)
    result = run_cli("mount", "--spec", path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_nothing_is_mounted_when_a_later_entry_is_invalid(tmp_path: Path) -> None:
    good, missing = tmp_path / "m1", tmp_path / "m2"
    good.mkdir()
    (tmp_path / "src").mkdir()
    spec = [
        {"cache": {"path": str(tmp_path / "src"), "capacity": "64M"}, "mount_path": str(good)},
        {"cache": {"path": str(tmp_path / "nope"), "capacity": "64M"}, "mount_path": str(missing)},
    ]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    result = run_cli("mount", "--spec", path)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert mounts.find_mount(good) is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--foreground"], r"--spec mounts every entry in the background"),
        (["/src"], r"--spec takes no SOURCE"),
    ],
)
def test_spec_with_a_foreground_or_positional_is_refused(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    import re

    path = tmp_path / "spec.json"
    path.write_text(EXAMPLE.read_text())
    result = run_cli("mount", "--spec", path, *extra)
    assert result.returncode == 2, result
    assert re.search(message, result.stderr), result.stderr
    assert result.stderr.count("\n") == 1
