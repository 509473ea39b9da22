"""Command line: argv -> validated config -> run. One-line errors, exit code 2.

memcachefs mount SOURCE MOUNTPOINT --capacity 20G [options]
memcachefs umount MOUNTPOINT
memcachefs stats MOUNTPOINT [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import pydantic

from memcachefs import __version__, mounts
from memcachefs.config import (
    CacheConfig,
    ClusterConfig,
    MountConfig,
    format_size,
    parse_host_port,
    parse_size,
)
from memcachefs.errors import ConfigError, MemcachefsError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
READY_TIMEOUT_S = 60.0

log = logging.getLogger("memcachefs")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts and humans both read it.
        self.exit(EXIT_USAGE, f"memcachefs: {message} (see memcachefs {self._sub()}--help)\n")

    def _sub(self) -> str:
        words = self.prog.split()[1:]
        return " ".join(words) + " " if words else ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memcachefs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"memcachefs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mount = commands.add_parser(
        "mount", help="mount a read-only, memory-cached mirror of SOURCE at MOUNTPOINT"
    )
    mount.add_argument("source", help="the slow directory to mirror")
    mount.add_argument("mountpoint", help="an existing empty directory")
    mount.add_argument(
        "--capacity",
        required=True,
        help="memory for cached blocks, e.g. 20G (K/M/G/T are 1024-based)",
    )
    mount.add_argument("--block-size", default="4M", help="cache block size (default 4M)")
    mount.add_argument(
        "--read-ahead",
        type=int,
        default=4,
        metavar="BLOCKS",
        help="blocks fetched ahead of a sequential reader (default 4)",
    )
    mount.add_argument(
        "--kernel-read-ahead",
        default="1M",
        metavar="SIZE",
        help="kernel readahead of the mount, sets the FUSE read size "
        "(default 1M; 0 leaves the kernel default)",
    )
    mount.add_argument(
        "--attr-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long attributes and listings are cached (default 1.0)",
    )
    mount.add_argument(
        "--source-threads",
        type=int,
        default=8,
        help="parallel block reads from the source (default 8)",
    )
    mount.add_argument(
        "--no-page-cache-push",
        action="store_true",
        help="do not copy a file's cached blocks into the kernel page cache when it "
        "is opened (saves CPU and page cache; reads then go through the daemon)",
    )
    mount.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users access the mount (needs user_allow_other "
        "in /etc/fuse.conf when not root)",
    )
    mount.add_argument(
        "--foreground",
        "-f",
        action="store_true",
        help="stay attached (containers, systemd); log to stderr",
    )
    mount.add_argument("--log-file", help="where the background daemon logs")
    mount.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    mount.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long SIGTERM waits for reads in flight and open files to close "
        "before unmounting (default 5; keep it below your orchestrator's kill timeout)",
    )
    cluster = mount.add_argument_group("cluster (instances share their memory)")
    cluster.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="serve blocks to peers on this address (needs --cluster-secret-file)",
    )
    cluster.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a peer's --listen address (repeatable)",
    )
    cluster.add_argument(
        "--peers-dns",
        metavar="NAME:PORT",
        help="peers are the addresses of NAME, re-resolved every few seconds "
        "(e.g. a Kubernetes headless Service)",
    )
    cluster.add_argument(
        "--peers-file",
        metavar="PATH",
        help="peers listed one HOST:PORT per line, re-read when the file changes",
    )
    cluster.add_argument(
        "--cluster-secret-file",
        metavar="PATH",
        help="file holding the secret peers authenticate their requests with "
        "(not readable by others)",
    )
    cluster.add_argument(
        "--peer-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="deadline for a block from a peer before reading the source (default 5)",
    )
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    umount = commands.add_parser("umount", help="unmount, whether the daemon is alive or not")
    umount.add_argument("mountpoint")

    stats = commands.add_parser("stats", help="print what the cache of a mount is doing")
    stats.add_argument("mountpoint")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "mount":
            return _mount(args)
        if args.command == "umount":
            return _umount(Path(args.mountpoint))
        return _stats(Path(args.mountpoint), as_json=args.json)
    except MemcachefsError as error:
        _report(args, str(error))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _report(args: argparse.Namespace, message: str) -> None:
    ready_fd = getattr(args, "ready_fd", None)
    if ready_fd is not None:
        _send_ready(ready_fd, f"error: {message}")
    else:
        print(f"memcachefs: {message}", file=sys.stderr)


# -- mount -----------------------------------------------------------------------
def config_from_args(args: argparse.Namespace) -> MountConfig:
    capacity = parse_size(args.capacity, "capacity")
    block_size = parse_size(args.block_size, "block size")
    kernel_read_ahead = (
        0
        if args.kernel_read_ahead.strip() == "0"
        else parse_size(args.kernel_read_ahead, "kernel read-ahead")
    )
    if 0 < kernel_read_ahead < 4 * 1024:
        raise ConfigError("--kernel-read-ahead: must be 0 (the kernel default) or at least 4K")
    try:
        return MountConfig(
            source=Path(args.source).absolute(),
            mountpoint=Path(args.mountpoint).absolute(),
            cache=CacheConfig(
                capacity_bytes=capacity,
                block_size_bytes=block_size,
                read_ahead_blocks=args.read_ahead,
                source_threads=args.source_threads,
                push_page_cache=not args.no_page_cache_push,
            ),
            cluster=cluster_from_args(args),
            attr_timeout_s=args.attr_timeout,
            kernel_read_ahead_kib=kernel_read_ahead // 1024,
            allow_other=args.allow_other,
            shutdown_grace_s=args.shutdown_grace,
        )
    except pydantic.ValidationError as error:
        raise ConfigError(_first_validation_message(error)) from None


_OPTION_OF_FIELD = {
    "capacity_bytes": "--capacity",
    "block_size_bytes": "--block-size",
    "read_ahead_blocks": "--read-ahead",
    "source_threads": "--source-threads",
    "attr_timeout_s": "--attr-timeout",
    "kernel_read_ahead_kib": "--kernel-read-ahead (KiB)",
    "shutdown_grace_s": "--shutdown-grace",
    "peer_timeout_s": "--peer-timeout",
    "listen": "--listen",
}


def _first_validation_message(error: pydantic.ValidationError) -> str:
    first = error.errors()[0]
    fields = [str(part) for part in first["loc"]]
    where = _OPTION_OF_FIELD.get(fields[-1], ".".join(fields)) if fields else ""
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message.lower()}" if where else message


def cluster_from_args(args: argparse.Namespace) -> ClusterConfig:
    """The cluster options, checked; ConfigError (one line) on bad input."""
    listen = _address(args.listen, "--listen") if args.listen else None
    peers = tuple(_address(text, "--peer") for text in args.peer)
    peers_dns = _address(args.peers_dns, "--peers-dns") if args.peers_dns else None
    peers_file = None
    if args.peers_file:
        from memcachefs.membership import read_peers_file

        peers_file = Path(args.peers_file).absolute()
        try:
            read_peers_file(peers_file)
        except OSError as error:
            raise ConfigError(f"--peers-file {args.peers_file}: {error.strerror}") from None
    secret = read_secret(Path(args.cluster_secret_file)) if args.cluster_secret_file else None
    return ClusterConfig(
        listen=listen,
        peers=peers,
        peers_dns=peers_dns,
        peers_file=peers_file,
        secret=secret,
        peer_timeout_s=args.peer_timeout,
    )


def _address(text: str, option: str) -> tuple[str, int]:
    host, port = parse_host_port(text, option)
    if port == 0:
        raise ConfigError(f"invalid {option} {text!r}: the port must be 1-65535")
    return host, port


def read_secret(path: Path) -> bytes:
    """The cluster secret: the file's bytes without surrounding whitespace."""
    option = "--cluster-secret-file"
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{option} {path}: {error.strerror}") from None
    if mode & 0o004:
        raise ConfigError(f"{option} {path} is readable by everyone (chmod 600 it)")
    secret = data.strip()
    if not secret:
        raise ConfigError(f"{option} {path} is empty")
    return secret


def check_paths(config: MountConfig) -> None:
    """Refuse sources and mountpoints that cannot work; clean a stale mount."""
    source, mountpoint = config.source, config.mountpoint
    if not source.exists():
        raise ConfigError(f"source {source} does not exist")
    if not source.is_dir():
        raise ConfigError(f"source {source} is not a directory")
    if not os.access(source, os.R_OK | os.X_OK):
        raise ConfigError(f"source {source} is not readable")
    if mounts.is_stale(mountpoint):
        log.warning("cleaning a stale mount at %s (its daemon died)", mountpoint)
        try:
            mounts.unmount(mountpoint, lazy=True)
        except OSError as error:
            raise ConfigError(
                f"stale mount at {mountpoint} could not be cleaned: {error}"
            ) from None
    if not mountpoint.exists():
        raise ConfigError(f"mountpoint {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise ConfigError(f"mountpoint {mountpoint} is not a directory")
    real_source, real_mountpoint = source.resolve(), mountpoint.resolve()
    if real_mountpoint == real_source:
        raise ConfigError("mountpoint and source are the same directory")
    if real_source in real_mountpoint.parents:
        raise ConfigError(f"mountpoint {mountpoint} is inside the source (it would recurse)")
    if mounts.find_mount(real_mountpoint) is not None:
        raise ConfigError(f"{mountpoint} is already a mount point (unmount it first)")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as error:
        raise ConfigError(f"/dev/fuse is not usable: {error.strerror}") from None


def _mount(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_paths(config)
    if not args.foreground:
        return _spawn_background(args, config)
    _setup_logging(args.log_level, args.log_file)
    # Imported here so that `stats`/`umount` and input errors stay fast.
    import trio

    from memcachefs.daemon import serve

    def ready() -> None:
        if args.ready_fd is not None:
            _send_ready(args.ready_fd, "ok")

    trio.run(serve, config, ready)
    return EXIT_OK


def _send_ready(fd: int, message: str) -> None:
    try:
        os.write(fd, (message.replace("\n", " ") + "\n").encode())
        os.close(fd)
    except OSError:
        pass  # the parent gave up waiting; the log has the story


def _spawn_background(args: argparse.Namespace, config: MountConfig) -> int:
    log_path = Path(args.log_file) if args.log_file else default_log_path(config.mountpoint)
    process, outcome = spawn_daemon(_child_argv(args), log_path)
    if outcome != "ok":
        print(f"memcachefs: {outcome.removeprefix('error: ')} (log: {log_path})", file=sys.stderr)
        try:  # the daemon reported its error before exiting: wait for its status
            status = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            status = None
        return EXIT_USAGE if status == EXIT_USAGE else EXIT_FAILURE
    print(
        f"memcachefs: mounted {config.source} at {config.mountpoint} "
        f"({format_size(config.cache.capacity_bytes)} cache, pid {process.pid}, log {log_path})"
    )
    return EXIT_OK


def default_log_path(mountpoint: Path) -> Path:
    slug = str(mountpoint).strip("/").replace("/", "-") or "root"
    return Path(tempfile.gettempdir()) / f"memcachefs-{slug}.log"


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "mount",
        str(Path(args.source).absolute()),
        str(Path(args.mountpoint).absolute()),
        "--foreground",
        "--capacity",
        args.capacity,
        "--block-size",
        args.block_size,
        "--read-ahead",
        str(args.read_ahead),
        "--kernel-read-ahead",
        args.kernel_read_ahead,
        "--attr-timeout",
        str(args.attr_timeout),
        "--source-threads",
        str(args.source_threads),
        "--log-level",
        args.log_level,
        "--shutdown-grace",
        str(args.shutdown_grace),
    ]
    if args.no_page_cache_push:
        argv.append("--no-page-cache-push")
    if args.allow_other:
        argv.append("--allow-other")
    if args.listen:
        argv += ["--listen", args.listen]
    for peer in args.peer:
        argv += ["--peer", peer]
    if args.peers_dns:
        argv += ["--peers-dns", args.peers_dns]
    if args.peers_file:
        argv += ["--peers-file", str(Path(args.peers_file).absolute())]
    if args.cluster_secret_file:
        argv += ["--cluster-secret-file", str(Path(args.cluster_secret_file).absolute())]
    argv += ["--peer-timeout", str(args.peer_timeout)]
    return argv


def spawn_daemon(
    argv: list[str], log_path: Path, timeout_s: float = READY_TIMEOUT_S
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `memcachefs <argv> --ready-fd N` detached; wait until it mounted or failed.

    Returns the process and "ok", or an "error: ..." line from the daemon.
    """
    read_fd, write_fd = os.pipe()
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "memcachefs", *argv, "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    try:
        message = _read_line(read_fd, timeout_s)
    finally:
        os.close(read_fd)
    if message == "ok":
        return process, "ok"
    if not message:
        if process.poll() is None:
            process.terminate()
            return process, f"error: the daemon did not become ready within {timeout_s:.0f}s"
        return process, f"error: the daemon exited with status {process.wait()}"
    return process, message


def _read_line(fd: int, timeout_s: float) -> str:
    import select

    deadline = time.monotonic() + timeout_s
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _setup_logging(level: str, log_file: str | None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)


# -- umount and stats --------------------------------------------------------------
def _umount(mountpoint: Path) -> int:
    path = mountpoint.absolute()
    if mounts.find_mount(path) is None:
        raise ConfigError(f"{mountpoint} is not mounted")
    pid = _daemon_pid(path)
    try:
        mounts.unmount(path)
    except OSError:
        mounts.unmount(path, lazy=True)  # a dead daemon or a busy mount
    if pid is not None:
        _wait_for_exit(pid, timeout_s=30.0)
    return EXIT_OK


def _daemon_pid(mountpoint: Path) -> int | None:
    try:
        return int(read_statistics(mountpoint, timeout_s=5.0)["pid"])
    except (ConfigError, KeyError, ValueError):
        return None


def _wait_for_exit(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def read_statistics(mountpoint: Path, timeout_s: float = 10.0) -> dict[str, Any]:
    """The statistics of the daemon serving `mountpoint` (via an xattr of its root)."""
    from memcachefs.fs import STATS_XATTR

    # getxattr on a hung daemon would block forever: ask from a child with a deadline.
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os,sys; sys.stdout.buffer.write(os.getxattr(sys.argv[1], sys.argv[2]))",
                str(mountpoint),
                STATS_XATTR.decode(),
            ],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"the daemon at {mountpoint} did not answer in {timeout_s:.0f}s"
        ) from None
    if result.returncode != 0:
        if mounts.is_stale(mountpoint):
            raise ConfigError(f"{mountpoint}: the daemon is gone (stale mount)")
        raise ConfigError(f"{mountpoint} is not a memcachefs mount")
    return dict(json.loads(result.stdout))


def _stats(mountpoint: Path, *, as_json: bool) -> int:
    from memcachefs.metrics import format_report

    if not mountpoint.exists() and not mounts.is_stale(mountpoint):
        raise ConfigError(f"{mountpoint} does not exist")
    stats = read_statistics(mountpoint)
    print(json.dumps(stats, indent=2, sort_keys=True) if as_json else format_report(stats))
    return EXIT_OK
