"""Every option reaches a background daemon (it receives the validated config)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from support import free_port, run_cli

from memcachefs.cli import build_parser, config_from_args
from memcachefs.config import OPTIONS
from memcachefs.control import CONFIG_XATTR


def non_default_values(tmp_path: Path) -> dict[str, list[str]]:
    """One non-default value per option (the flag's argv)."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    peers_file = tmp_path / "peers"
    peers_file.write_text("127.0.0.1:1\n")
    return {
        "capacity": ["--capacity", "24M"],
        "block-size": ["--block-size", "1M"],
        "read-ahead": ["--read-ahead", "3"],
        "source-threads": ["--source-threads", "3"],
        "metadata-threads": ["--metadata-threads", "5"],
        "metadata-cache": ["--metadata-cache", "8M"],
        "metadata-timeout": ["--metadata-timeout", "3"],
        "inode-limit": ["--inode-limit", "5000"],
        "page-cache-push": ["--no-page-cache-push"],
        "prefetch": ["--prefetch", "*.gguf", "--prefetch", "*.bin"],
        "no-prefetch": ["--no-prefetch"],
        "prefetch-window": ["--prefetch-window", "32M"],
        "listen": ["--listen", f"127.0.0.1:{free_port()}"],
        "peer": ["--peer", "127.0.0.1:2", "--peer", "127.0.0.1:3"],
        "peers-dns": ["--peers-dns", "localhost:4"],
        "peers-file": ["--peers-file", str(peers_file)],
        "cluster-secret-file": ["--cluster-secret-file", str(secret)],
        "peer-timeout": ["--peer-timeout", "2.5"],
        "dns-refresh": ["--dns-refresh", "7"],
        "attr-timeout": ["--attr-timeout", "0.5"],
        "kernel-read-ahead": ["--kernel-read-ahead", "2M"],
        "fuse-max-background": ["--fuse-max-background", "64"],
        "allow-other": ["--allow-other"],
        "shutdown-grace": ["--shutdown-grace", "1.5"],
        "log-file": ["--log-file", str(tmp_path / "daemon.log")],
        "log-level": ["--log-level", "debug"],
        "log-format": ["--log-format", "json"],
        "http-address": ["--http-address", f"127.0.0.1:{free_port()}"],
        "warm": ["--warm", "models/*.bin"],
        "ready-file": ["--ready-file", str(tmp_path / "ready")],
        "wait-warm": ["--wait-warm"],
        "pin": ["--pin", "models/*.bin"],
        "pin-share": ["--pin-share", "0.25"],
    }


def test_every_option_reaches_the_background_daemon(tmp_path: Path, cli_mounts) -> None:
    source, mountpoint = tmp_path / "source", tmp_path / "mnt"
    (source / "models").mkdir(parents=True)
    (source / "models" / "a.bin").write_bytes(b"w" * 5000)
    mountpoint.mkdir()
    values = non_default_values(tmp_path)
    settable = {name for name, entry in OPTIONS.items() if not entry.option.positional}
    assert set(values) == settable, "give every option a test value"
    argv = [str(source), str(mountpoint)] + [word for words in values.values() for word in words]
    expected = config_from_args(build_parser().parse_args(["mount", *argv]), environ={})
    cli_mounts.track(mountpoint)
    result = run_cli("mount", *argv)
    assert result.returncode == 0, result.stderr
    got = json.loads(os.getxattr(mountpoint, CONFIG_XATTR))
    assert got == expected.public_dump()
    for entry in OPTIONS.values():
        if not entry.option.positional:  # none of the values is the default
            value = got
            for part in entry.path:
                value = value[part]
            assert value != entry.default, entry.option.name
    log_lines = (tmp_path / "daemon.log").read_text().splitlines()
    assert any(json.loads(line)["message"].startswith("mounted") for line in log_lines)
    assert "1 of 1 files resident" in result.stdout  # --wait-warm waited for --warm
