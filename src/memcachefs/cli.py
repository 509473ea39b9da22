"""Command line: argv -> validated config -> run. One-line errors, exit code 2.

memcachefs mount SOURCE MOUNTPOINT --capacity 20G [options]
memcachefs warm PATH... [--check | --evict] [--json]
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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from memcachefs import __version__, mounts
from memcachefs.config import OPTIONS, MountConfig, OptionField, format_size, load_config
from memcachefs.control import CONFIG_XATTR, STATS_XATTR, beside_the_log
from memcachefs.errors import ConfigError, MemcachefsError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
READY_TIMEOUT_S = 60.0
UMOUNT_SLACK_S = 5.0  # beyond the daemon's grace period

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
        "mount",
        help="mount a read-only, memory-cached mirror of SOURCE at MOUNTPOINT",
        description="Options may also come from MEMCACHEFS_<OPTION> environment variables "
        "and from a --config TOML file (keys: option names with _ for -); "
        "flags win over the environment, the environment over the file.",
    )
    _add_options(mount)
    mount.add_argument("--config", metavar="FILE", help="a TOML file with one key per option")
    mount.add_argument(
        "--spec",
        metavar="FILE",
        help="a PAI-EAS service JSON (or its storage list): mount every cache entry, "
        "each in the background (other options apply to every entry)",
    )
    mount.add_argument(
        "--foreground",
        "-f",
        action="store_true",
        help="stay attached (containers, systemd); log to stderr",
    )
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--config-fd", type=int, help=argparse.SUPPRESS)

    warm = commands.add_parser(
        "warm",
        help="load files of a mount into its memory before they are read",
        description="PATHs are files, directories or glob patterns under memcachefs mounts; "
        "the mount's daemon loads them (memory, peers, then the source).",
    )
    warm.add_argument("paths", nargs="+", metavar="PATH")
    what = warm.add_mutually_exclusive_group()
    what.add_argument(
        "--check", action="store_true", help="only report how much of each file is resident"
    )
    what.add_argument("--evict", action="store_true", help="drop the files from memory")
    warm.add_argument("--json", action="store_true", help="print a JSON summary at the end")

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
        if args.command == "warm":
            from memcachefs import warmcli

            return warmcli.run(args.paths, check=args.check, evict=args.evict, as_json=args.json)
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
def _add_options(parser: argparse.ArgumentParser) -> None:
    """One argument per option of the configuration schema (config.OPTIONS)."""
    groups = {
        "cache": parser,
        "cluster": parser.add_argument_group("cluster (instances share their memory)"),
    }
    for name, entry in OPTIONS.items():
        option = entry.option
        target = groups.get(entry.path[0], parser)
        help_text = option.help + _default_text(entry)
        if option.positional:
            target.add_argument(name, nargs="?", default=argparse.SUPPRESS, help=help_text)
        elif entry.is_flag:
            target.add_argument(
                option.flag,
                dest=name,
                action=argparse.BooleanOptionalAction if option.negatable else "store_true",
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            target.add_argument(
                option.flag,
                dest=name,
                action="append" if entry.repeatable else "store",
                default=argparse.SUPPRESS,
                metavar=option.metavar,
                help=help_text,
            )


def _default_text(entry: OptionField) -> str:
    default = entry.default
    if default in (None, (), False) or entry.option.positional:
        return " (required)" if entry.field.is_required() and not entry.option.positional else ""
    if entry.path[-1].endswith("_bytes") and isinstance(default, int):
        return f" (default {format_size(default).replace('.0', '')})"
    if default is True:
        return " (default on)"
    return f" (default {default})"


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> MountConfig:
    """The validated configuration: flags > environment > --config file > defaults."""
    if args.config_fd is not None:  # the background daemon: its parent validated it
        with os.fdopen(args.config_fd, "rb") as f:
            return MountConfig.model_validate_json(f.read())
    config_file = Path(args.config) if args.config else None
    config = load_config(_flags(args), config_file=config_file, environ=environ)
    return _absolute(config)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    flags = {name: getattr(args, name) for name in OPTIONS if hasattr(args, name)}
    for name in ("source", "mountpoint", "peers-file", "log-file", "ready-file"):
        if name in flags:  # relative paths mean relative to where the user ran us
            flags[name] = str(Path(flags[name]).absolute())
    return flags


def _absolute(config: MountConfig) -> MountConfig:
    return config.model_copy(
        update={"source": config.source.absolute(), "mountpoint": config.mountpoint.absolute()}
    )


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


def check_pins(config: MountConfig) -> None:
    """Refuse, before mounting, a pinned set larger than --pin-share of the capacity."""
    cache = config.cache
    if not cache.pin_patterns:
        return
    from memcachefs import patterns

    try:
        found = patterns.expand_by_pattern(config.source, cache.pin_patterns)
    except patterns.TooManyFiles as error:
        raise ConfigError(f"--pin: {error}") from None
    files: dict[str, int] = {}
    for pattern, hits in found.items():
        if not hits:
            log.warning("--pin %s matches no file in %s", pattern, config.source)
        files.update(hits)
    total_bytes = sum(files.values())
    limit_bytes = int(cache.pin_share * cache.capacity_bytes)
    if total_bytes > limit_bytes:
        raise ConfigError(
            f"--pin: the pinned files ({len(files)}, {format_size(total_bytes)}) exceed "
            f"--pin-share {cache.pin_share:g} of the capacity ({format_size(limit_bytes)})"
        )


def _mount_spec(args: argparse.Namespace) -> int:
    """Every cache entry of a service spec, validated all before any is mounted."""
    from memcachefs import spec

    if args.foreground or args.config_fd is not None:
        raise ConfigError("--spec mounts every entry in the background; drop --foreground")
    flags = _flags(args)
    for name in ("source", "mountpoint"):
        if name in flags:
            raise ConfigError(f"--spec takes no {name.upper()}: the spec's entries name them")
    config_file = Path(args.config) if args.config else None
    plan = spec.plan(Path(args.spec), flags, config_file=config_file)
    configs = [_absolute(config) for config in plan.mounts]
    for config in configs:
        check_paths(config)
    for skipped in plan.skipped:
        print(
            f"memcachefs: storage[{skipped.index}] ({skipped.kind}, mount_path "
            f"{skipped.mount_path}) is not a cache entry: skipped"
        )
    for config in configs:
        status = _spawn_background(config)
        if status != EXIT_OK:
            return status
    return _wait_warm(configs)


def _wait_warm(configs: list[MountConfig]) -> int:
    """--wait-warm: follow each mount's start-up warm-up until its files are resident."""
    from memcachefs import warmcli

    for config in configs:
        if config.wait_warm and config.cache.warm_patterns:
            status = warmcli.wait_for_warm(config.mountpoint)
            if status != EXIT_OK:
                return status
    return EXIT_OK


def _mount(args: argparse.Namespace) -> int:
    if args.spec is not None:
        return _mount_spec(args)
    config = config_from_args(args)
    if config.wait_warm and args.foreground and args.config_fd is None:
        raise ConfigError(
            "--wait-warm is for background mounts; in the foreground use --ready-file or /ready"
        )
    check_paths(config)
    check_pins(config)
    if not args.foreground:
        status = _spawn_background(config)
        return status if status != EXIT_OK else _wait_warm([config])
    _lock(config.mountpoint)
    setup_logging(config)
    # Imported here so that `stats`/`umount` and input errors stay fast.
    import trio

    from memcachefs.daemon import serve

    def ready() -> None:
        if args.ready_fd is not None:
            _send_ready(args.ready_fd, "ok")

    trio.run(serve, config, ready)
    return EXIT_OK


_held_locks: list[int] = []


def _lock(mountpoint: Path) -> None:
    """One daemon per mountpoint: hold its lock until this process ends."""
    try:
        _held_locks.append(mounts.lock_mountpoint(mountpoint))
    except BlockingIOError:
        raise ConfigError(f"another memcachefs is mounting {mountpoint}") from None
    except OSError as error:
        raise ConfigError(f"cannot lock the mountpoint {mountpoint}: {error.strerror}") from None
    if mounts.find_mount(mountpoint) is not None:  # the other one finished first
        raise ConfigError(f"{mountpoint} is already a mount point (unmount it first)")


def _send_ready(fd: int, message: str) -> None:
    try:
        os.write(fd, (message.replace("\n", " ") + "\n").encode())
        os.close(fd)
    except OSError:
        pass  # the parent gave up waiting; the log has the story


def _spawn_background(config: MountConfig) -> int:
    log_path = config.log_file or default_log_path(config.mountpoint)
    process, outcome = spawn_daemon(["mount", "--foreground"], log_path, config=config)
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
    return beside_the_log(mountpoint, "log")


def spawn_daemon(
    argv: list[str],
    log_path: Path,
    timeout_s: float = READY_TIMEOUT_S,
    *,
    config: MountConfig | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `memcachefs <argv> --ready-fd N` detached; wait until it mounted or failed.

    With `config`, the daemon gets that validated configuration through a pipe
    (`--config-fd`) instead of options in `argv`, and logs to `log_path`.
    Returns the process and "ok", or an "error: ..." line from the daemon.
    """
    read_fd, write_fd = os.pipe()
    pass_fds = [write_fd]
    extra = ["--ready-fd", str(write_fd)]
    if config is not None:
        config_read, config_write = os.pipe()
        data = config.model_copy(update={"log_file": log_path}).model_dump_json().encode()
        os.write(config_write, data)  # far below a pipe's buffer
        os.close(config_write)
        pass_fds.append(config_read)
        extra += ["--config-fd", str(config_read)]
    try:
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "memcachefs", *argv, *extra],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                pass_fds=pass_fds,
                start_new_session=True,
            )
    finally:
        for fd in pass_fds:
            os.close(fd)
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


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        name = getattr(record, "event", None)
        if name is not None:
            entry["event"] = name
            for key, value in getattr(record, "fields", {}).items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(config: MountConfig) -> None:
    log_file = config.log_file
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(
        _JsonFormatter()
        if config.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)


# -- umount and stats --------------------------------------------------------------
def _umount(mountpoint: Path) -> int:
    path = mountpoint.absolute()
    if mounts.find_mount(path) is None:
        raise ConfigError(f"{mountpoint} is not mounted")
    try:
        config = json.loads(read_root_xattr(path, CONFIG_XATTR, timeout_s=5.0))
        pid = int(json.loads(read_root_xattr(path, STATS_XATTR, timeout_s=5.0))["pid"])
    except (ConfigError, KeyError, ValueError):
        config, pid = {}, None  # a dead or hung daemon: unmount all the same
    try:
        mounts.unmount(path)
    except OSError:
        mounts.unmount(path, lazy=True)  # a dead daemon or a busy mount
    if pid is not None:
        # After an unmount the daemon gives requests in flight its grace period.
        timeout_s = float(config.get("shutdown_grace_s", 5.0)) + UMOUNT_SLACK_S
        if not _wait_for_exit(pid, timeout_s):
            # Its mount is gone; a thread may wait in a read the source has not
            # answered (an uninterruptible wait in the kernel).
            print(
                f"memcachefs: unmounted {mountpoint}; its daemon (pid {pid}) is still "
                f"waiting for the source after {timeout_s:.0f}s and exits once it answers",
                file=sys.stderr,
            )
    return EXIT_OK


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def read_statistics(mountpoint: Path, timeout_s: float = 10.0) -> dict[str, Any]:
    """The statistics of the daemon serving `mountpoint` (via an xattr of its root)."""
    return dict(json.loads(read_root_xattr(mountpoint, STATS_XATTR, timeout_s)))


def read_root_xattr(mountpoint: Path, name: bytes, timeout_s: float = 10.0) -> bytes:
    """One of the daemon's own xattrs of the mount's root (see fs.py); ConfigError if none."""
    # getxattr on a hung daemon would block forever: ask from a child with a deadline.
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os,sys; sys.stdout.buffer.write(os.getxattr(sys.argv[1], sys.argv[2]))",
                str(mountpoint),
                name.decode(),
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
    return result.stdout


def _stats(mountpoint: Path, *, as_json: bool) -> int:
    from memcachefs.metrics import format_report

    if mounts.is_stale(mountpoint):
        raise ConfigError(f"{mountpoint}: the daemon is gone (stale mount; memcachefs umount it)")
    if not mountpoint.exists():
        raise ConfigError(f"{mountpoint} does not exist")
    stats = read_statistics(mountpoint)
    print(json.dumps(stats, indent=2, sort_keys=True) if as_json else format_report(stats))
    return EXIT_OK
