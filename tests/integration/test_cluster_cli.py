"""Issue 3, item 1: cluster options are checked before mounting; one line, exit 2."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from support import free_port, run_cli

from memcachefs import mounts

pytestmark = pytest.mark.fuse


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    source, mountpoint = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    return source, mountpoint


def secret_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_text(text)
    path.chmod(mode)
    return path


def mount_listening(source: Path, mountpoint: Path, listen: str, secret: Path, *extra):
    return run_cli(
        "mount",
        source,
        mountpoint,
        "--capacity",
        "64M",
        "--listen",
        listen,
        "--cluster-secret-file",
        secret,
        *extra,
    )


CASES = [
    ("listen-not-an-address", ["--listen", "nope"], ["--listen", "HOST:PORT"]),
    ("listen-port-zero", ["--listen", "127.0.0.1:0"], ["--listen", "port"]),
    ("listen-bad-port", ["--listen", "127.0.0.1:70000"], ["--listen"]),
    ("peer-no-port", ["--peer", "10.0.0.1"], ["--peer", "HOST:PORT"]),
    ("peers-dns-no-port", ["--peers-dns", "svc.local"], ["--peers-dns"]),
    ("peers-file-missing", ["--peers-file", "/nonexistent/peers"], ["--peers-file"]),
    ("non-loopback-without-secret", ["--listen", "0.0.0.0:7000"], ["--cluster-secret-file"]),
    ("loopback-without-secret", ["--listen", "127.0.0.1:7000"], ["--cluster-secret-file"]),
    ("secret-missing", ["--cluster-secret-file", "/nonexistent/secret"], ["secret"]),
    ("peer-timeout-zero", ["--peer", "127.0.0.1:7000", "--peer-timeout", "0"], ["--peer-timeout"]),
]


def _assert_refused(result, *words: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


@pytest.mark.parametrize(("args", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_cluster_options(dirs, args: list[str], words: list[str]) -> None:
    source, mountpoint = dirs
    result = run_cli("mount", source, mountpoint, "--capacity", "64M", *args)
    _assert_refused(result, *words)
    assert mounts.find_mount(mountpoint) is None


@pytest.mark.parametrize(
    ("text", "mode", "word"),
    [("", 0o600, "empty"), ("  \n", 0o600, "empty"), ("s3cret", 0o644, "readable")],
)
def test_bad_secret_files(dirs, tmp_path: Path, text: str, mode: int, word: str) -> None:
    source, mountpoint = dirs
    path = secret_file(tmp_path, text, mode)
    result = run_cli(
        "mount", source, mountpoint, "--capacity", "64M", "--cluster-secret-file", path
    )
    _assert_refused(result, "--cluster-secret-file", word)


def test_a_busy_peer_port_is_one_line_and_nothing_is_mounted(dirs, tmp_path: Path) -> None:
    source, mountpoint = dirs
    path = secret_file(tmp_path, "s3cret\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = mount_listening(source, mountpoint, f"127.0.0.1:{port}", path)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert "cannot listen for peers" in result.stderr and "in use" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert mounts.find_mount(mountpoint) is None


def test_a_secret_allows_any_listen_address(dirs, tmp_path: Path) -> None:
    source, mountpoint = dirs
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = mount_listening(source, mountpoint, f"0.0.0.0:{port}", secret_file(tmp_path, "s\n"))
    try:
        assert result.returncode == 0, result
        assert mounts.find_mount(mountpoint) is not None
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # background mode passed the cluster options to the daemon
    finally:
        assert run_cli("umount", mountpoint).returncode == 0


def test_a_binary_secret_reaches_background_daemons_intact(tmp_path: Path) -> None:
    """`head -c 32 /dev/urandom > secret` is a fine secret: not UTF-8, passed on whole."""
    source, warm, fresh = (tmp_path / name for name in ("source", "warm", "fresh"))
    for folder in (source, warm, fresh):
        folder.mkdir()
    data = os.urandom(3 * 1024 * 1024)
    (source / "model.bin").write_bytes(data)
    secret = tmp_path / "secret"
    secret.write_bytes(b"\xff\xfe" + os.urandom(30))
    secret.chmod(0o600)
    warm_port = free_port()
    mounted = []
    try:
        for mountpoint, asked in ((warm, []), (fresh, ["--peer", f"127.0.0.1:{warm_port}"])):
            port = warm_port if mountpoint == warm else free_port()
            result = mount_listening(
                source, mountpoint, f"127.0.0.1:{port}", secret, "--no-prefetch", *asked
            )
            assert result.returncode == 0, result.stderr
            mounted.append(mountpoint)
        assert (warm / "model.bin").read_bytes() == data
        assert (fresh / "model.bin").read_bytes() == data
        stats = json.loads(run_cli("stats", "--json", fresh).stdout)
        assert (stats["peer_bytes"], stats["source_bytes"]) == (len(data), 0)
    finally:
        for mountpoint in reversed(mounted):
            assert run_cli("umount", mountpoint).returncode == 0
