"""`memcachefs warm PATH...`: make files resident before they are read.

PATHs are files, directories (every file below) or glob patterns (``**`` spans
directories) under memcachefs mounts. This process only names the files: the
daemon of each mount loads them through its own loader (control.py's socket),
and this process shows the progress: a tqdm bar on a terminal, otherwise a
plain line every few seconds; `--json` prints a summary at the end.

Exit status: 0 when every file is resident; 1 if the source failed a file
(named); 2 for bad input, checked before anything is loaded (a path not under a
memcachefs mount, a set larger than the mount's capacity); 130 after Ctrl-C,
which stops the warm-up (the mount keeps serving).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from memcachefs import mounts
from memcachefs.config import format_size
from memcachefs.control import CONTROL_XATTR, encode, path_from_wire, path_to_wire
from memcachefs.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
PLAIN_PROGRESS_INTERVAL_S = 5.0
CONNECT_TIMEOUT_S = 10.0
TIERS = ("memory", "peer", "source")


@dataclass(frozen=True)
class Target:
    mountpoint: Path
    relpath: bytes
    size: int

    @property
    def path(self) -> Path:
        return self.mountpoint / os.fsdecode(self.relpath)


def collect(paths: Sequence[str]) -> dict[Path, list[Target]]:
    """The regular files PATHs name, by mount; ConfigError (exit 2) for a bad one."""
    found: dict[Path, dict[bytes, Target]] = {}
    for argument in paths:
        names = (
            sorted(glob.glob(argument, recursive=True)) if glob.has_magic(argument) else [argument]
        )
        if not names:
            raise ConfigError(f"{argument} matches nothing")
        for name in names:
            if not os.path.lexists(name):
                raise ConfigError(f"{name} does not exist")
            real = os.path.realpath(name)
            entry = mounts.mount_containing(real)
            if entry is None or entry.fstype != mounts.FSTYPE:
                raise ConfigError(f"{name} is not under a memcachefs mount")
            mountpoint = Path(entry.mountpoint)
            for file_path, size in _regular_files(real):
                relpath = os.fsencode(os.path.relpath(file_path, mountpoint))
                relpath = b"" if relpath == b"." else relpath
                found.setdefault(mountpoint, {})[relpath] = Target(mountpoint, relpath, size)
    return {mountpoint: list(targets.values()) for mountpoint, targets in found.items()}


def _regular_files(path: str) -> Iterator[tuple[str, int]]:
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        yield path, st.st_size
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    for directory, _, names in os.walk(path):
        for name in sorted(names):
            file_path = os.path.join(directory, name)
            try:
                st = os.lstat(file_path)
            except OSError:
                continue  # gone meanwhile
            if stat.S_ISREG(st.st_mode):
                yield file_path, st.st_size


# -- talking to a daemon -----------------------------------------------------------
def _connect(mountpoint: Path) -> socket.socket:
    from memcachefs.cli import read_root_xattr

    path = read_root_xattr(mountpoint, CONTROL_XATTR).decode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT_S)
    try:
        sock.connect(path)
    except OSError as error:
        sock.close()
        raise ConfigError(
            f"cannot reach the daemon of {mountpoint} at {path}: {error.strerror}"
        ) from None
    sock.settimeout(None)
    return sock


def _exchange(
    mountpoint: Path, request: dict[str, Any], progress: Progress | None
) -> dict[str, Any]:
    """Send one request; feed its progress lines to `progress`; the final answer."""
    with _connect(mountpoint) as sock, sock.makefile("rb") as answers:
        sock.sendall(encode(request))
        for line in answers:
            message = json.loads(line)
            if "progress" in message:
                if progress is not None:
                    progress.update(message["progress"])
            elif "done" in message:
                return dict(message["done"])
            else:
                raise ConfigError(f"the daemon of {mountpoint} refused: {message.get('error')}")
    raise ConfigError(f"the daemon of {mountpoint} closed the connection without an answer")


class Progress:
    """A tqdm bar on a terminal; elsewhere one plain line every few seconds."""

    def __init__(self, out: TextIO = sys.stderr, *, what: str = "warm") -> None:
        self._out = out
        self._what = what
        self._bar: Any = None
        self._tty = out.isatty()
        self._last_line = time.monotonic()

    def update(self, snapshot: dict[str, Any]) -> None:
        total, done = snapshot["total_bytes"], snapshot["done_bytes"]
        files = f"{snapshot['files_done']}/{snapshot['files']} files"
        if self._tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self._what
                )
            self._bar.update(done - self._bar.n)
            self._bar.set_postfix_str(files, refresh=False)
        elif time.monotonic() - self._last_line >= PLAIN_PROGRESS_INTERVAL_S:
            self._last_line = time.monotonic()
            seconds = max(snapshot["seconds"], 1e-3)
            rate = done / seconds
            left = f", {(total - done) / rate:.0f}s left" if rate > 0 else ""
            percent = 100 * done / total if total else 100.0
            print(
                f"memcachefs {self._what}: {format_size(done)} of {format_size(total)} "
                f"({percent:.0f}%, {files}), {format_size(rate)}/s{left}",
                file=self._out,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- the commands ------------------------------------------------------------------
def run(paths: Sequence[str], *, check: bool, evict: bool, as_json: bool) -> int:
    plan = collect(paths)
    if check or evict:
        return _inspect(plan, "check" if check else "evict", as_json=as_json)
    for mountpoint, targets in plan.items():
        _refuse_more_than_capacity(mountpoint, targets)
    summaries = []
    progress = Progress()
    try:
        for mountpoint, targets in plan.items():
            request = {"op": "warm", "paths": [path_to_wire(t.relpath) for t in targets]}
            summaries.append((mountpoint, _exchange(mountpoint, request, progress)))
    except KeyboardInterrupt:
        progress.close()
        print("memcachefs warm: stopped; the mount keeps serving", file=sys.stderr)
        return EXIT_INTERRUPTED
    progress.close()
    return _report(summaries, as_json=as_json)


def wait_for_warm(mountpoint: Path) -> int:
    """`mount --wait-warm`: follow the start-up warm-up of a mount until it is done."""
    progress = Progress()
    try:
        summary = _exchange(mountpoint, {"op": "wait"}, progress)
    except KeyboardInterrupt:
        progress.close()
        print("memcachefs: stopped waiting; the warm-up goes on", file=sys.stderr)
        return EXIT_INTERRUPTED
    progress.close()
    return _report([(mountpoint, summary)], as_json=False)


def _refuse_more_than_capacity(mountpoint: Path, targets: list[Target]) -> None:
    from memcachefs.cli import read_statistics

    capacity = int(read_statistics(mountpoint)["capacity_bytes"])
    total = sum(target.size for target in targets)
    if total > capacity:
        raise ConfigError(
            f"{len(targets)} files of {format_size(total)} do not fit in the "
            f"{format_size(capacity)} capacity of {mountpoint}: nothing loaded"
        )


def _report(summaries: list[tuple[Path, dict[str, Any]]], *, as_json: bool) -> int:
    keys = ("files", "files_done", "total_bytes", *(f"{tier}_bytes" for tier in TIERS))
    total: dict[str, Any] = {key: sum(summary[key] for _, summary in summaries) for key in keys}
    total["seconds"] = round(sum(summary["seconds"] for _, summary in summaries), 3)
    total["errors"] = [
        {
            "path": str(mountpoint / os.fsdecode(path_from_wire(error["path"]))),
            "error": error["error"],
        }
        for mountpoint, summary in summaries
        for error in summary["errors"]
    ]
    for error in total["errors"]:
        print(f"memcachefs warm: {error['path']}: {error['error']}", file=sys.stderr)
    if as_json:
        print(json.dumps(total, indent=2, sort_keys=True))
    else:
        tiers = ", ".join(f"{format_size(total[f'{tier}_bytes'])} {tier}" for tier in TIERS)
        print(
            f"memcachefs warm: {total['files_done']} of {total['files']} files resident, "
            f"{format_size(total['total_bytes'])} in {total['seconds']:.1f}s ({tiers})"
        )
    return EXIT_FAILED if total["errors"] else EXIT_OK


def _inspect(plan: dict[Path, list[Target]], op: str, *, as_json: bool) -> int:
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for mountpoint, targets in plan.items():
        request = {"op": op, "paths": [path_to_wire(t.relpath) for t in targets]}
        answer = _exchange(mountpoint, request, None)
        for entry in answer["files"]:
            path = mountpoint / os.fsdecode(path_from_wire(entry["path"]))
            rows.append({"path": str(path), "size": entry["size"], f"{op}_bytes": entry["bytes"]})
        errors += [f"{mountpoint / error['path']}: {error['error']}" for error in answer["errors"]]
    for error in errors:
        print(f"memcachefs warm: {error}", file=sys.stderr)
    if op == "check":
        for row in rows:
            row["resident_bytes"] = row.pop("check_bytes")
            row["resident_percent"] = (
                round(100 * row["resident_bytes"] / row["size"], 1) if row["size"] else 100.0
            )
    else:
        for row in rows:
            row["evicted_bytes"] = row.pop("evict_bytes")
    if as_json:
        print(json.dumps({"files": rows, "errors": errors}, indent=2))
    elif op == "check":
        for row in rows:
            print(
                f"{row['resident_percent']:5.1f}%  {format_size(row['resident_bytes']):>7} of "
                f"{format_size(row['size']):>7}  {row['path']}"
            )
        resident, size = sum(r["resident_bytes"] for r in rows), sum(r["size"] for r in rows)
        percent = 100 * resident / size if size else 100.0
        total = f"{format_size(resident):>7} of {format_size(size):>7}"
        print(f"{percent:5.1f}%  {total}  {len(rows)} files resident")
    else:
        dropped = sum(row["evicted_bytes"] for row in rows)
        print(f"memcachefs warm: evicted {len(rows)} files, {format_size(dropped)} from memory")
    return EXIT_FAILED if errors else EXIT_OK
