"""The soak (issue 10 item 12): a mixed, verified load under injected faults, and the contract.

Three instances (`--capacity` each, 128M by default) form a cluster on loopback
(`--listen`, `--peer`, one cluster secret) over one source, a faultfs mount
(`memcachefs.testing.faultfs`) of a local directory, so the source can be stalled.
The source holds a pinned file (`hot.bin`, 1/8 of the capacity, never changed)
and four data files of 1/4 to 3/4 of the capacity, each made of 16-byte units
stamped (file id, version, offset), so every byte read can be checked.

The load, for `--minutes` (a smoke run: one cycle of every fault, about a minute):

- `--readers` reader processes (6), sequential read(), random pread and mmap in
  turn, spread over the three mounts; each read call is checked: the right file, the
  right offset, one version in the call (README Semantics 2) and the same version
  for every read of one open handle, with the size that version has (Semantics 3:
  files are only ever replaced by rename, so a handle keeps its version to the end);
- a file of the source replaced by a new version (written beside it, renamed over)
  every `--flip-interval` seconds; every version has its own size;
- a random reader SIGKILLed every `--kill-interval` seconds (and started again);
- in turn, with quiet periods between: an instance SIGKILLed, its dead mount
  unmounted lazily and the instance started again on the same port and mountpoint;
  the source stalled (faultfs's stall file) while the pinned file is read on every
  mount with its page cache dropped, which must finish before the stall is lifted
  (Semantics 8: cached reads go on); a flood of idle and garbage connections on an
  instance's peer port (`bench_flood.flood`);
- each daemon in its own memory cgroup limited to `--memory-limit` (capacity +
  192 MiB): cgroup v2 where its memory controller is available, else the v1 memory
  controller, else none ("not applied").

Reported, and checked (the run exits 1 if a check fails): bytes read and verified;
wrong, mixed and handle-mixed bytes and size errors (must be 0); faults injected by
kind; errors seen by kind, each expected only where its fault explains it (an
instance's own readers while it was dead: ENOTCONN, ECONNABORTED, ENOENT, SIGBUS of
an mmap reader; ESTALE of a handle opened during a stall, whose file was replaced
meanwhile: the open could not pin it); every daemon's peak RSS (VmHWM) against
1.1 x capacity + 100 MiB; descriptors and threads of each daemon at the end against
its start; `/sys/fs/fuse/connections/N/waiting` back to 0; every daemon alive (no
OOM kill) and exiting 0 at unmount; no unexpected warning in the daemons' logs.

    python benchmarks/run.py soak [--minutes 30] [--capacity 128M] [--readers 6] [--smoke]

A reader is this script run as `soak.py --reader CONFIG`: it reports on a pipe shared
by all readers, one JSON line per write (below PIPE_BUF: a killed reader never
leaves half a line).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import mmap
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_flood
import lib
from lib import MiB, table
from memcachefs import mounts
from memcachefs.config import format_size
from memcachefs.peers.pool import MAX_IDLE_CONNECTIONS_PER_PEER
from memcachefs.source import IDLE_DESCRIPTORS
from memcachefs.testing import faultfs
from memcachefs.testing.harness import MountedFS, mount

UNIT = 16  # bytes: file id (u32), version (u32), offset (u64), little-endian
_ID_MASK = np.uint64(0xFFFFFFFF)
KINDS = ("seq", "pread", "mmap")
INSTANCES = 3
HOT = "hot.bin"
FLUSH_S = 0.5  # how often a reader reports what it verified
MAX_DETAILS = 5  # per reader: descriptions of wrong bytes sent to the parent
SETTLE_S = 45.0  # at the end: how long descriptors, threads and FUSE requests may take
KILL_WAIT_S = 30.0  # how long a SIGKILLed daemon may take to exit
STALL_PROBE_MAX_S = 120.0  # a stall lasts until the cached reads are done, at most this
SLOW_PROBE_S = 10.0  # a probe still running then has where it waits recorded
FUSECTL = mounts.FUSECTL
# Errors a reader may see on the mount of an instance that was dead meanwhile.
WHILE_DOWN = {"ENOTCONN", "ECONNABORTED", "ENOENT", "SIGBUS"}
# Daemon log lines that a fault explains (a regex: the fault).
EXPECTED_LOG = {
    r"peer connections \(the limit\)": "connection flood past the peer connection limit",
}


# -- the data: stamped units ---------------------------------------------------------------
@dataclass(frozen=True)
class FileSpec:
    name: str
    fid: int
    base_bytes: int


def version_bytes(spec: FileSpec, version: int) -> int:
    """Each version has its own size (a multiple of the unit, not of a block)."""
    return spec.base_bytes + (version % 4) * 17 * 4096


def write_version(directory: Path, spec: FileSpec, version: int) -> None:
    """Write `version` of the file beside it and rename it over (an atomic replace)."""
    units, chunk = version_bytes(spec, version) // UNIT, 4 * MiB // UNIT
    word = np.uint64(spec.fid | version << 32)
    tmp = directory / f".{spec.name}.new"
    with open(tmp, "wb", buffering=0) as f:
        for start in range(0, units, chunk):
            block = np.empty((min(chunk, units - start), 2), dtype="<u8")
            block[:, 0] = word
            block[:, 1] = np.arange(start, start + len(block), dtype=np.uint64) * UNIT
            f.write(memoryview(block).cast("B"))
    os.replace(tmp, directory / spec.name)


def layout(capacity: int) -> list[FileSpec]:
    """The pinned file (C/8) and four data files of C/4 to 3C/4 (whole MiB)."""
    parts = [(HOT, 8), ("a.bin", 4), ("b.bin", 8 / 3), ("c.bin", 2), ("d.bin", 4 / 3)]
    return [
        FileSpec(name, fid, max(MiB, int(capacity / share) // MiB * MiB))
        for fid, (name, share) in enumerate(parts, start=1)
    ]


# -- the reader (a child process) --------------------------------------------------------
class Reporter:
    """Counts of one reader, sent as JSON lines (each below PIPE_BUF) on a shared pipe."""

    def __init__(self, fd: int | None, slot: int) -> None:
        self.fd, self.slot = fd, slot  # without a pipe, messages are kept in `kept`
        self.counts: Counter[str] = Counter()
        self.kept: list[dict[str, Any]] = []
        self.details = 0
        self.flushed = time.monotonic()

    def _send(self, message: dict[str, Any]) -> None:
        if self.fd is None:
            self.kept.append(message)
            return
        line = json.dumps({"slot": self.slot, "t": time.time(), **message})
        os.write(self.fd, line[:4000].encode() + b"\n")

    def flush(self) -> None:
        if self.counts:
            self._send({"counts": dict(self.counts)})
            self.counts.clear()
        self.flushed = time.monotonic()

    def flush_if_due(self) -> None:
        if time.monotonic() - self.flushed > FLUSH_S:
            self.flush()

    def error(self, op: str, error: OSError, opened: float) -> None:
        self.flush()
        name = errno.errorcode.get(error.errno or 0, str(error.errno))
        self._send({"error": name, "op": op, "opened": opened})

    def detail(self, text: str) -> None:
        if self.details < MAX_DETAILS:
            self.details += 1
            self.flush()
            self._send({"detail": text})


class Verifier:
    """Checks what one open handle returns: its file, the offsets, one version throughout."""

    def __init__(self, spec: FileSpec, size: int, out: Reporter) -> None:
        self.spec, self.size, self.out = spec, size, out
        self.version: int | None = None

    def _first(self, version: int) -> None:
        self.version = version
        if self.size != version_bytes(self.spec, version):
            self.out.counts["size_errors"] += 1
            self.out.detail(
                f"{self.spec.name}: version {version} opened with size {self.size}, "
                f"its size is {version_bytes(self.spec, version)}"
            )

    def check(self, data: bytes | memoryview, offset: int) -> None:
        counts = self.out.counts
        counts["reads"] += 1
        whole = len(data) // UNIT * UNIT if offset % UNIT == 0 else 0
        counts["unaligned_bytes"] += len(data) - whole
        if not whole:
            return
        units = np.frombuffer(data, dtype="<u8", count=whole // 8).reshape(-1, 2)
        words, offsets = units[:, 0], units[:, 1]
        expected = np.arange(offset, offset + whole, UNIT, dtype=np.uint64)
        if (
            (words == words[0]).all()
            and (offsets == expected).all()
            and int(words[0]) & 0xFFFFFFFF == self.spec.fid
        ):
            version = int(words[0]) >> 32
            if self.version is None:
                self._first(version)
            if version == self.version:
                counts["verified_bytes"] += whole
            else:
                counts["handle_mixed_bytes"] += whole
                self.out.detail(
                    f"{self.spec.name} [{offset}, +{whole}): version {version} in a handle "
                    f"that read version {self.version}"
                )
            return
        bad = (offsets != expected) | ((words & _ID_MASK) != self.spec.fid)
        versions = words[~bad] >> np.uint64(32)
        counts["wrong_bytes"] += int(bad.sum()) * UNIT
        text = f"{self.spec.name} [{offset}, +{whole}): {int(bad.sum())} wrong units"
        if versions.size:
            values, sizes = np.unique(versions, return_counts=True)
            major = int(values[sizes.argmax()])
            if self.version is None:
                self._first(major)
            mixed = (versions.size - int(sizes.max())) * UNIT
            counts["mixed_bytes"] += mixed
            if major != self.version:
                counts["handle_mixed_bytes"] += int(sizes.max()) * UNIT
            counts["verified_bytes"] += int(sizes.max()) * UNIT * (major == self.version)
            text += f", versions {dict(zip(values.tolist(), sizes.tolist(), strict=True))}"
        first = int(np.argmax(bad)) if bad.any() else 0
        self.out.detail(text + f"; unit {first}: {units[first].tobytes().hex()}")

    def at_end(self, offset: int) -> None:
        if offset != self.size:
            self.out.counts["size_errors"] += 1
            self.out.detail(f"{self.spec.name}: EOF at {offset} of {self.size} bytes")


def _sequential(fd: int, v: Verifier, rng: random.Random, stopping: Callable[[], bool]) -> None:
    view = memoryview(bytearray(rng.choice((128 * 1024, MiB, 3 * MiB + 4096))))
    offset = 0
    while not stopping():
        n = os.readv(fd, [view])
        if not n:
            v.at_end(offset)
            return
        v.check(view[:n], offset)
        offset += n


def _preads(fd: int, v: Verifier, rng: random.Random, stopping: Callable[[], bool]) -> None:
    for _ in range(rng.randint(16, 128)):
        if stopping():
            return
        length = rng.choice((4096, 65536, MiB))
        offset = rng.randrange(0, max(1, v.size - length)) // UNIT * UNIT
        v.check(os.pread(fd, length, offset), offset)


def _mapped(fd: int, v: Verifier, rng: random.Random, stopping: Callable[[], bool]) -> None:
    with mmap.mmap(fd, v.size, prot=mmap.PROT_READ) as m:
        if rng.random() < 0.25:  # a whole sweep, else random windows
            windows = [(offset, MiB) for offset in range(0, v.size, MiB)]
        else:
            windows = []
            for _ in range(rng.randint(8, 64)):
                length = rng.choice((4096, 65536, MiB))
                windows.append((rng.randrange(0, max(1, v.size - length)) // UNIT * UNIT, length))
        for offset, length in windows:
            if stopping():
                return
            v.check(m[offset : offset + length], offset)


def reader_main(config: dict[str, Any]) -> int:
    """One reader: open a random file, read it its way, verify, close; until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rng = random.Random(config["seed"])
    directory, specs = Path(config["dir"]), [FileSpec(*f) for f in config["files"]]
    out = Reporter(config["fd"], config["slot"])
    read = {"seq": _sequential, "pread": _preads, "mmap": _mapped}[config["kind"]]
    while not stop.is_set():
        spec = rng.choice(specs)
        opened = time.time()
        try:
            fd = os.open(directory / spec.name, os.O_RDONLY)
        except OSError as error:
            out.error("open", error, opened)
            stop.wait(0.2)
            continue
        out.counts["opens"] += 1
        try:
            read(fd, Verifier(spec, os.fstat(fd).st_size, out), rng, stop.is_set)
        except OSError as error:
            out.error("read", error, opened)
            stop.wait(0.2)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        out.flush_if_due()
    out.flush()
    return 0


# -- the daemons' surroundings --------------------------------------------------------------
class MemoryLimit:
    """One memory cgroup: v2 if its memory controller is enabled there, else v1, else none."""

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.limit_bytes, self.path, self.kind, self.problem = limit_bytes, None, None, ""
        v2 = [e for e in mounts.mount_entries() if e.fstype == "cgroup2"]
        v1 = [e for e in mounts.mount_entries() if e.fstype == "cgroup"]
        v1 = [e for e in v1 if (Path(e.mountpoint) / "memory.limit_in_bytes").exists()]
        try:
            root = next(
                Path(e.mountpoint)
                for e in v2
                if "memory" in (Path(e.mountpoint) / "cgroup.controllers").read_text().split()
            )
            (root / "cgroup.subtree_control").write_text("+memory\n")
            self.kind, self.path = "cgroup v2", root / name
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.max").write_text(f"{limit_bytes}\n")
            (self.path / "memory.swap.max").write_text("0\n")
            return
        except StopIteration:
            pass
        except OSError as error:
            self.problem = f"cgroup v2: {error}; "
        try:
            if not v1:
                self.problem += "no memory controller mounted (v2 or v1)"
                self.kind = self.path = None
                return
            self.kind, self.path = "cgroup v1", Path(v1[0].mountpoint) / name
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.limit_in_bytes").write_text(f"{limit_bytes}\n")
            with contextlib.suppress(OSError):  # charges follow a daemon moved in
                (self.path / "memory.move_charge_at_immigrate").write_text("3\n")
        except OSError as error:
            self.problem += f"cgroup v1: {error}"
            self.kind = None

    def add(self, pid: int) -> None:
        if self.kind and self.path:
            try:
                (self.path / "cgroup.procs").write_text(f"{pid}\n")
            except OSError as error:
                self.problem += f"moving {pid}: {error}; "

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text() if self.path else ""
        except OSError:
            return ""

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind or "not applied", "limit_bytes": self.limit_bytes}
        out["problem"] = self.problem or None
        if self.kind == "cgroup v1":
            out["max_usage_bytes"] = int(self._read("memory.max_usage_in_bytes") or 0)
            out["failcnt"] = int(self._read("memory.failcnt") or 0)
            oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
            out["oom_kills"] = int(oom.get("oom_kill", 0))
        elif self.kind == "cgroup v2":
            out["max_usage_bytes"] = int(self._read("memory.peak") or 0) or None
            events = dict(line.split() for line in self._read("memory.events").splitlines())
            out["failcnt"] = int(events.get("max", 0))
            out["oom_kills"] = int(events.get("oom_kill", 0))
        return out

    def remove(self) -> None:
        if self.kind and self.path:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except FileNotFoundError:
                    return
                except OSError:
                    time.sleep(0.1)


def fuse_waiting(mountpoint: Path) -> int | None:
    """Requests of a mount's FUSE connection not answered yet (None: not known)."""
    entry = mounts.find_mount(mountpoint)
    if entry is None:
        return None
    try:
        return int((FUSECTL / entry.device.split(":")[1] / "waiting").read_text())
    except (OSError, ValueError, IndexError):
        return None


def abort_connection(mountpoint: Path) -> None:
    """Abort a mount's FUSE connection (fusectl): its waiting requests fail, ENOTCONN."""
    entry = mounts.find_mount(mountpoint)
    if entry is not None:
        with contextlib.suppress(OSError, IndexError):
            (FUSECTL / entry.device.split(":")[1] / "abort").write_text("1\n")


def stuck_threads(pid: int) -> list[str]:
    """The threads of a process still there: state, and the kernel functions it waits in."""
    out = []
    with contextlib.suppress(OSError):
        for task in sorted(os.listdir(f"/proc/{pid}/task")):
            out.append(thread_stack(pid, int(task)))
    return [line for line in out if line]


def thread_stack(pid: int, tid: int | None) -> str:
    """One thread's state and the kernel functions it waits in ("" if it is gone)."""
    with contextlib.suppress(OSError):
        task = Path(f"/proc/{pid}/task/{tid}")
        state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        frames = [f.split("+")[0] for f in (task / "stack").read_text().split() if "+" in f]
        return f"{state} {' < '.join(frames[:8])}"
    return ""


@contextlib.contextmanager
def _timed(steps: list[str], timed: dict[str, float], step: str) -> Iterator[None]:
    """Time one step of a probe into `timed`, naming it in `steps` while it runs."""
    steps.append(step)
    started = time.monotonic()
    try:
        yield
    finally:
        timed[step.split(": ", 1)[1]] = round(time.monotonic() - started, 2)


def ensure_fusectl() -> str:
    """fusectl at /sys/fs/fuse/connections (the waiting counters); how it was found."""
    if any(e.fstype == "fusectl" for e in mounts.mount_entries()):
        return "mounted"
    try:
        mounts.mount_fusectl()
    except OSError:
        return "not available"
    return "mounted by the soak"


def descriptors(pid: int, source: Path) -> dict[str, int]:
    """A process's descriptors: sockets, files of the source, and the others."""
    kinds: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                kinds[
                    "socket"
                    if target.startswith("socket:")
                    else "source"
                    if target.startswith(str(source))
                    else "other"
                ] += 1
    return {k: kinds[k] for k in ("socket", "source", "other")}


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def stats_of(path: Path) -> dict[str, Any] | None:
    """The daemon's statistics read directly (None if the mount does not answer)."""
    try:
        return dict(json.loads(os.getxattr(path, lib.STATS_XATTR)))
    except (OSError, ValueError):
        return None


# -- the run ----------------------------------------------------------------------------------
@dataclass
class Instance:
    index: int
    port: int
    mountpoint: Path
    limit: MemoryLimit
    fs: MountedFS | None = None
    start: dict[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int = 0  # VmHWM, the largest of every process of this instance
    peak_held_bytes: int = 0  # used + reserved + spare buffers of the store, sampled
    processes: int = 0
    down: list[tuple[float, float]] = field(default_factory=list)  # killed, started again

    def sample(self) -> None:
        if self.fs is not None and self.fs.process.poll() is None:
            self.peak_rss_bytes = max(self.peak_rss_bytes, lib.proc_bytes("VmHWM", self.fs.pid))


@dataclass
class Slot:
    number: int
    kind: str
    instance: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    killed: bool = False


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rng = args, random.Random(args.seed)
        self.work = Path(args.workdir).absolute() / "soak"
        self.backing, self.source = self.work / "backing", self.work / "source"
        self.specs = layout(args.capacity)
        self.versions = {spec.fid: 1 for spec in self.specs}
        self.instances: list[Instance] = []
        self.slots: list[Slot] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.errors: list[dict[str, Any]] = []  # every error a reader reported
        self.details: list[str] = []
        self.stalls: list[tuple[float, float]] = []
        self.probes: list[dict[str, Any]] = []
        self.floods: list[dict[str, Any]] = []
        self.loads: list[float] = []
        self.pipe_read, self.pipe_write = os.pipe()
        self.secret = Path()
        self.fusectl = ""
        self.stuck: list[dict[str, Any]] = []  # SIGKILLed daemons that did not exit

    # -- instances
    def daemon_args(self, instance: Instance) -> list[str]:
        peers = [f"127.0.0.1:{i.port}" for i in self.instances if i is not instance]
        args = ["--listen", f"127.0.0.1:{instance.port}", "--cluster-secret-file", str(self.secret)]
        args += [a for peer in peers for a in ("--peer", peer)] + ["--pin", HOT]
        return args + list(self.args.memcachefs_arg)

    def start_instance(self, instance: Instance) -> None:
        fs = mount(
            self.source,
            instance.mountpoint,
            capacity=str(self.args.capacity),
            args=self.daemon_args(instance),
            log_path=self.work / f"daemon-{instance.index}.log",
            expected_log=list(EXPECTED_LOG),
        )
        instance.limit.add(fs.pid)
        hot = version_bytes(self.specs[0], 1)  # the pinned file is never replaced
        lib.wait_until(
            lambda: (stats_of(instance.mountpoint) or {}).get("pinned_bytes", 0) >= hot, 60
        )
        with self.lock:
            instance.fs, instance.processes = fs, instance.processes + 1
        instance.start = {
            "descriptors": descriptors(fs.pid, self.source),
            "threads": threads(fs.pid),
        }

    def kill_instance(self, instance: Instance) -> float:
        """SIGKILL the daemon; if it does not exit, record why and abort its connection."""
        assert instance.fs is not None
        instance.sample()
        with self.lock:
            fs, instance.fs = instance.fs, None
        killed = time.time()  # before the kill: its readers may see it first
        fs.process.kill()
        try:
            fs.process.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            self.stuck.append(
                {"instance": instance.index, "t": time.time(), "threads": stuck_threads(fs.pid)}
            )
            lib.eprint(f"soak: instance {instance.index} did not exit: aborting its connection")
            abort_connection(instance.mountpoint)
            fs.process.wait(timeout=KILL_WAIT_S)
        return killed

    # -- readers
    def spawn(self, slot: Slot) -> None:
        config = {
            "kind": slot.kind,
            "slot": slot.number,
            "dir": str(self.instances[slot.instance].mountpoint),
            "files": [[s.name, s.fid, s.base_bytes] for s in self.specs],
            "seed": self.rng.randrange(1 << 30),
            "fd": self.pipe_write,
        }
        with open(self.work / "readers.log", "ab") as log:
            slot.process = subprocess.Popen(
                [sys.executable, __file__, "--reader", json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=[self.pipe_write],
            )
        slot.started, slot.killed = time.time(), False
        self.counts["reader_processes"] += 1

    def collect(self) -> None:
        """Thread: the readers' JSON lines into the totals, until the pipe's EOF."""
        with open(self.pipe_read, "rb") as pipe:
            for line in pipe:
                try:
                    message = json.loads(line)
                except ValueError:
                    self.counts["garbled_lines"] += 1
                    continue
                slot = self.slots[message["slot"]]
                if "counts" in message:
                    self.counts.update(message["counts"])
                elif "error" in message:
                    self.errors.append(message | {"instance": slot.instance, "kind": slot.kind})
                elif "detail" in message:
                    self.details.append(
                        f"{slot.kind} on mount {slot.instance}: {message['detail']}"
                    )

    def reap(self, slot: Slot) -> None:
        """A reader that exited: why (a kill of ours, a SIGBUS, a failure), and its successor."""
        assert slot.process is not None
        code = slot.process.returncode
        if (code == -signal.SIGKILL and slot.killed) or (
            code == -signal.SIGTERM and self.stop.is_set()  # stopped before its handler was set
        ):
            pass
        elif code == -signal.SIGBUS:
            self.errors.append(
                {"error": "SIGBUS", "op": "mmap", "t": time.time(), "opened": slot.started}
                | {"instance": slot.instance, "kind": slot.kind, "slot": slot.number}
            )
        elif code != 0 or not self.stop.is_set():
            self.errors.append(
                {"error": f"reader exit {code}", "op": "-", "t": time.time()}
                | {"opened": slot.started, "instance": slot.instance, "kind": slot.kind}
            )
        if not self.stop.is_set():
            self.spawn(slot)

    def chaos(self) -> None:
        """Thread: replace source files, SIGKILL readers, respawn them, sample the daemons."""
        now = time.monotonic()
        next_flip = now + self.args.flip_interval
        next_kill = now + self.args.kill_interval
        next_sample = now
        while not self.stop.wait(0.1):
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is not None and slot.process.poll() is not None:
                    self.reap(slot)
            if now >= next_flip:
                spec = self.rng.choice(self.specs[1:])
                self.versions[spec.fid] += 1
                write_version(self.backing, spec, self.versions[spec.fid])
                self.faults["version_flip"] += 1
                next_flip = now + self.args.flip_interval
            if now >= next_kill:
                slot = self.rng.choice(self.slots)
                if slot.process is not None and slot.process.poll() is None:
                    slot.killed = True
                    slot.process.kill()
                    self.faults["reader_sigkill"] += 1
                next_kill = now + self.args.kill_interval
            if now >= next_sample:
                self.sample()
                next_sample = now + 1.0

    def sample(self) -> None:
        self.loads.append(lib.load_average()[0])
        for instance in self.instances:
            with self.lock:
                fs = instance.fs
            if fs is None:
                continue
            instance.sample()
            stats = stats_of(instance.mountpoint)
            if stats:
                held = sum(stats.get(k, 0) for k in ("used_bytes", "reserved_bytes"))
                held += stats.get("free_buffer_bytes", 0)
                instance.peak_held_bytes = max(instance.peak_held_bytes, held)

    # -- the episodic faults
    def peer_kill(self) -> None:
        instance = self.rng.choice(self.instances)
        lib.eprint(f"soak: SIGKILL instance {instance.index}")
        killed = self.kill_instance(instance)
        self.faults["instance_sigkill"] += 1
        time.sleep(self.args.down_s)
        with contextlib.suppress(OSError):
            mounts.unmount(instance.mountpoint, lazy=True)
        self.start_instance(instance)
        instance.down.append((killed, time.time()))
        self.faults["instance_restart"] += 1

    def read_pinned(self, steps: list[str]) -> dict[str, Any]:
        """The pinned file read and verified on every mount, its page cache dropped first;
        `steps` names the step under way (for a probe that hangs)."""
        hot, started = self.specs[0], time.monotonic()
        probe: dict[str, Any] = {"mounts": 0, "verified_bytes": 0, "problems": [], "steps_s": []}
        for instance in self.instances:
            path, out = instance.mountpoint / hot.name, Reporter(None, -1)
            timed: dict[str, float] = {}
            try:
                with _timed(steps, timed, f"mount {instance.index}: drop its page cache"):
                    lib.drop_page_cache(path, global_drop=False)
                with _timed(steps, timed, f"mount {instance.index}: open"):
                    f = open(path, "rb", buffering=0)  # noqa: SIM115
                with f, _timed(steps, timed, f"mount {instance.index}: read"):
                    v, offset = Verifier(hot, os.fstat(f.fileno()).st_size, out), 0
                    while chunk := f.read(MiB):
                        v.check(chunk, offset)
                        offset += len(chunk)
                    v.at_end(offset)
            except OSError as error:
                out.kept.append({"error": str(error)})
            probe["mounts"] += 1
            probe["verified_bytes"] += out.counts["verified_bytes"]
            probe["problems"] += [f"mount {instance.index}: {m}" for m in out.kept]
            probe["steps_s"].append(timed)
        return probe | {"probe_s": round(time.monotonic() - started, 1)}

    def source_stall(self) -> None:
        """Stall the source; the pinned file must be read on every mount before it resumes."""
        lib.eprint("soak: source stalled")
        result: list[dict[str, Any]] = []
        steps: list[str] = []
        started = time.time()
        slow: dict[str, Any] = {}
        with self.faultfs.stalled():
            self.faults["source_stall"] += 1
            time.sleep(1.0)  # the daemons' source reads are waiting by now
            thread = threading.Thread(target=lambda: result.append(self.read_pinned(steps)))
            thread.start()
            thread.join(SLOW_PROBE_S)
            if thread.is_alive():  # where it waits, for the report
                slow = {
                    "step": steps[-1] if steps else None,
                    "kernel_stack": thread_stack(os.getpid(), thread.native_id),
                    "fuse_waiting": [fuse_waiting(i.mountpoint) for i in self.instances],
                }
            thread.join(max(STALL_PROBE_MAX_S, self.args.stall_s) - SLOW_PROBE_S)
            finished = bool(result)
            time.sleep(max(0.0, started + self.args.stall_s - time.time()))
        self.stalls.append((started, time.time()))
        thread.join()
        probe = result[0] | {"finished_while_stalled": finished}
        if slow:
            probe["slow"] = slow
        self.probes.append(probe | {"stalled_s": round(self.stalls[-1][1] - started, 1)})

    def flood(self) -> None:
        """Idle and garbage connections on one instance's peer port, held a while."""
        instance = self.rng.choice(self.instances)
        lib.eprint(f"soak: connection flood on instance {instance.index}")
        stop, opened, made = threading.Event(), threading.Event(), []
        thread = threading.Thread(
            target=lambda: made.append(
                bench_flood.flood(
                    instance.port,
                    self.args.flood_connections // 2,
                    self.args.flood_connections // 2,
                    stop=stop,
                    opened=opened,
                    churn=False,
                )
            )
        )
        thread.start()
        opened.wait(120)
        self.faults["connection_flood"] += 1
        time.sleep(self.args.flood_s)
        stop.set()
        thread.join()
        self.floods.append({"instance": instance.index, "connections": made[0] if made else 0})

    # -- judging
    def classify(self, error: dict[str, Any]) -> str | None:
        """Why an error a reader saw was expected (None: it was not)."""
        t, opened, name = error["t"], error.get("opened", error["t"]), error["error"]
        instance = self.instances[error["instance"]]
        for killed, restarted in instance.down:
            if name in WHILE_DOWN and t >= killed and opened <= restarted:
                return "its instance was SIGKILLed meanwhile"
        for stalled, resumed in self.stalls:
            if name == "ESTALE" and stalled - 1.0 <= opened <= resumed:
                return "opened during a source stall (unpinned), then replaced"
        return None

    def settle(self, instance: Instance) -> dict[str, Any]:
        """At the end: wait for descriptors, threads and FUSE requests to come back."""
        assert instance.fs is not None
        pid, start = instance.fs.pid, instance.start
        allowed_sockets = start["descriptors"]["socket"] + MAX_IDLE_CONNECTIONS_PER_PEER * (
            INSTANCES - 1
        )
        end: dict[str, Any] = {}

        def settled() -> bool:
            stats = stats_of(instance.mountpoint) or {}
            end.update(
                descriptors=descriptors(pid, self.source),
                threads=threads(pid),
                fuse_waiting=fuse_waiting(instance.mountpoint),
                peer_connections=stats.get("peer_connections", 0),
                held_descriptors=stats.get("held_descriptors"),
            )
            fds = end["descriptors"]
            end["checks"] = {
                # the two pipes of the page cache residency child, started at the first push
                "other_descriptors_back": fds["other"] <= start["descriptors"]["other"] + 2,
                # the idle cache, and the source's root
                "source_descriptors_bounded": fds["source"] <= IDLE_DESCRIPTORS + 1,
                # no handle is open: no source file may still be held for one
                "source_files_let_go": end["held_descriptors"] == 0,
                "sockets_bounded": fds["socket"] <= allowed_sockets + end["peer_connections"],
                "threads_back": end["threads"] <= start["threads"],
                "fuse_waiting_0": end["fuse_waiting"] == 0
                or (end["fuse_waiting"] is None and self.fusectl == "not available"),
            }
            return all(end["checks"].values())

        end["settled"] = lib.wait_until(settled, SETTLE_S)
        end["allowed_sockets"] = allowed_sockets + end["peer_connections"]
        return end

    def run(self) -> dict[str, Any]:
        args = self.args
        lib.unmount_below(self.work)
        self.backing.mkdir(parents=True, exist_ok=True)
        self.source.mkdir(exist_ok=True)
        for spec in self.specs:
            write_version(self.backing, spec, 1)
        self.secret = lib.secret_file(self.work)
        self.stall_file = self.work / "source.stall"
        self.fusectl = fusectl = ensure_fusectl()
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the flood's descriptors
        limit = args.memory_limit or args.capacity + 192 * MiB
        tag = f"memcachefs-soak-{os.getpid()}"
        load_start, started = lib.load_average(), time.monotonic()
        ports = [lib.free_port() for _ in range(INSTANCES)]
        self.instances = [
            Instance(i, ports[i], self.work / f"mnt-{i}", MemoryLimit(f"{tag}-{i}", limit))
            for i in range(INSTANCES)
        ]
        threads_: list[threading.Thread] = []
        ends: list[dict[str, Any]] = []
        exits: list[int | None] = []
        cycle = 0
        try:
            with faultfs.serve(
                self.backing,
                self.source,
                stall_file=self.stall_file,
                log_path=self.work / "faultfs.log",
            ) as self.faultfs:
                for instance in self.instances:
                    instance.mountpoint.mkdir(exist_ok=True)
                    self.start_instance(instance)
                self.slots = [
                    Slot(n, KINDS[n % len(KINDS)], (n // len(KINDS) + n) % INSTANCES)
                    for n in range(args.readers)
                ]
                threads_ = [threading.Thread(target=self.collect, daemon=True)]
                threads_.append(threading.Thread(target=self.chaos, daemon=True))
                for slot in self.slots:
                    self.spawn(slot)
                for thread in threads_:
                    thread.start()
                load_until = started + args.minutes * 60
                episodes = (self.peer_kill, self.source_stall, self.flood)
                while True:
                    for episode in episodes:
                        time.sleep(args.quiet_s)
                        episode()
                    cycle += 1
                    if args.smoke or time.monotonic() + args.quiet_s * 4 > load_until:
                        break
                time.sleep(args.quiet_s if args.smoke else max(0.0, load_until - time.monotonic()))
                self.stop.set()
                threads_[1].join()
                for slot in self.slots:
                    if slot.process is not None and slot.process.poll() is None:
                        slot.process.terminate()
                for slot in self.slots:
                    if slot.process is None:
                        continue
                    try:
                        slot.process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        slot.process.kill()
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            slot.process.wait(timeout=KILL_WAIT_S)
                        self.errors.append(
                            {"error": "reader hung at the end", "op": "-", "t": time.time()}
                            | {"instance": slot.instance, "kind": slot.kind}
                        )
                    else:
                        self.reap(slot)
                os.close(self.pipe_write)
                threads_[0].join(30)
                self.sample()
                ends = [self.settle(instance) for instance in self.instances]
                for instance, end in zip(self.instances, ends, strict=True):
                    end["stats"] = stats_of(instance.mountpoint) or {}
                    instance.sample()
                    assert instance.fs is not None
                    end["alive"] = instance.fs.process.poll() is None
                    end["log_problems"] = instance.fs.problems()
                for instance in self.instances:
                    assert instance.fs is not None
                    exits.append(instance.fs.unmount())
        finally:
            self.stop.set()
            for slot in self.slots:
                if slot.process is not None and slot.process.poll() is None:
                    slot.process.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        slot.process.wait(timeout=KILL_WAIT_S)
            for instance in self.instances:
                if instance.fs is not None and instance.fs.process.poll() is None:
                    instance.fs.unmount()
            lib.unmount_below(self.work)
            memory = [instance.limit.report() for instance in self.instances]
            for instance in self.instances:
                instance.limit.remove()
        return self.report(
            ends=ends,
            exits=exits,
            memory=memory,
            fusectl=fusectl,
            load_start=load_start,
            elapsed_s=time.monotonic() - started,
            cycles=cycle,
        )

    def report(
        self,
        *,
        ends: list[dict[str, Any]],
        exits: list[int | None],
        memory: list[dict[str, Any]],
        fusectl: str,
        load_start: list[float],
        elapsed_s: float,
        cycles: int,
    ) -> dict[str, Any]:
        args, counts = self.args, self.counts
        bound = int(1.1 * args.capacity) + 100 * MiB
        errors: dict[str, dict[str, Any]] = {}
        for error in self.errors:
            why = self.classify(error)
            entry = errors.setdefault(
                f"{error['error']} ({error['op']})", {"expected": 0, "unexpected": 0, "why": []}
            )
            entry["expected" if why else "unexpected"] += 1
            if why and why not in entry["why"]:
                entry["why"].append(why)
        instances = []
        for instance, end, code, cgroup in zip(self.instances, ends, exits, memory, strict=True):
            stats = end["stats"]
            instances.append(
                {
                    "instance": instance.index,
                    "processes": instance.processes,
                    "peak_rss_bytes": instance.peak_rss_bytes,
                    "peak_held_bytes": instance.peak_held_bytes,
                    "start": instance.start,
                    "end": {k: v for k, v in end.items() if k not in ("stats", "log_problems")},
                    "log_problems": end["log_problems"][:10],
                    "exit": code,
                    "memory_limit": cgroup,
                    "counters": {
                        k: stats.get(k)
                        for k in (
                            "source_bytes",
                            "peer_bytes",
                            "memory_bytes",
                            "evictions",
                            "raced_opens",
                            "unpinned_opens",
                            "stale_reads",
                            "read_errors",
                            "internal_errors",
                            "peer_protocol_errors",
                            "peer_connections_rejected",
                            "peer_connections_displaced",
                            "peer_errors_refused",
                            "peer_errors_closed",
                            "peer_errors_timeout",
                        )
                    },
                }
            )
        checks = {
            "bytes verified": counts["verified_bytes"] > 0,
            "no wrong bytes": counts["wrong_bytes"] == 0,
            "no mixed bytes (one version per read)": counts["mixed_bytes"] == 0,
            "no handle mixed bytes (one version per open)": counts["handle_mixed_bytes"] == 0,
            "sizes of the version opened": counts["size_errors"] == 0,
            "only expected errors": all(not e["unexpected"] for e in errors.values()),
            "cached reads during every stall": all(
                p["finished_while_stalled"] and not p["problems"] for p in self.probes
            ),
            "reader reports intact": counts["garbled_lines"] == 0,
            "every SIGKILLed instance exited (its mount ENOTCONN)": not self.stuck,
        }
        for i in instances:
            n, end = i["instance"], i["end"]
            checks[f"instance {n}: peak RSS within the bound"] = i["peak_rss_bytes"] <= bound
            checks[f"instance {n}: store within the capacity"] = (
                i["peak_held_bytes"] <= args.capacity
            )
            checks[f"instance {n}: alive at the end, exit 0"] = end["alive"] and i["exit"] == 0
            checks[f"instance {n}: descriptors, threads, FUSE waiting back"] = end["settled"]
            checks[f"instance {n}: no unexpected log line"] = not i["log_problems"]
            checks[f"instance {n}: no OOM kill"] = not i["memory_limit"].get("oom_kills")
        return {
            "minutes": args.minutes,
            "elapsed_s": round(elapsed_s, 1),
            "cycles": cycles,
            "capacity_bytes": args.capacity,
            "bound_bytes": bound,
            "memory_limit_bytes": memory[0]["limit_bytes"],
            "memory_limit": memory[0]["kind"],
            "fusectl": fusectl,
            "files": [
                {"name": s.name, "base_bytes": s.base_bytes, "versions": self.versions[s.fid]}
                for s in self.specs
            ],
            "readers": args.readers,
            "counts": dict(counts),
            "faults": dict(self.faults),
            "errors": errors,
            "error_events": self.errors[:200],
            "details": self.details[:20],
            "stall_probes": self.probes,
            "floods": self.floods,
            "stuck_kills": self.stuck,
            "instances": instances,
            "checks": checks,
            "ok": all(checks.values()),
            "load_average": lib.load_summary(load_start, self.loads),
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    return Soak(args).run()


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def markdown(r: dict[str, Any]) -> str:
    load, counts = r["load_average"], r["counts"]
    files = ", ".join(f"{f['name']} {_mib(f['base_bytes'])}" for f in r["files"])
    versions = sum(f["versions"] - 1 for f in r["files"])
    errors = "; ".join(
        f"{kind}: {e['expected']} expected ({', '.join(e['why'])})"
        + (f", **{e['unexpected']} unexpected**" if e["unexpected"] else "")
        for kind, e in sorted(r["errors"].items())
    )
    failed = [name for name, ok in r["checks"].items() if not ok]
    stalls = r["stall_probes"]
    rows = [
        ["load", f"{r['elapsed_s'] / 60:.1f} min, {r['cycles']} cycles of the episodic faults"],
        [
            "bytes read and verified",
            f"{counts.get('verified_bytes', 0) / lib.GiB:.2f} GiB in "
            f"{counts.get('reads', 0):,} read calls, {counts.get('opens', 0):,} opens, "
            f"{counts.get('reader_processes', 0)} reader processes",
        ],
        [
            "wrong / mixed (in one read) / mixed (in one open) bytes, size errors",
            f"{counts.get('wrong_bytes', 0)} / {counts.get('mixed_bytes', 0)} / "
            f"{counts.get('handle_mixed_bytes', 0)}, {counts.get('size_errors', 0)}",
        ],
        [
            "faults injected",
            ", ".join(f"{k} {v}" for k, v in sorted(r["faults"].items()))
            + f" ({versions} new versions in all)",
        ],
        ["errors seen by readers", errors or "none"],
        [
            "SIGKILLed instances that did not exit",
            "; ".join(
                f"instance {k['instance']}: " + ", ".join(sorted(set(k["threads"])))
                for k in r["stuck_kills"]
            )
            + " (their connections aborted through fusectl)"
            if r["stuck_kills"]
            else "none",
        ],
        [
            "cached reads during the stalls",
            f"{sum(p['finished_while_stalled'] for p in stalls)} of {len(stalls)} stalls: the "
            f"pinned file read on every mount (page cache dropped) while the source was stalled "
            f"({sum(p['verified_bytes'] for p in stalls) / MiB:.0f} MiB verified; "
            f"{max((p['probe_s'] for p in stalls), default=0):.1f} s at most for the 3 mounts)"
            + "".join(
                f"; one still waited after {SLOW_PROBE_S:.0f} s in {p['slow']['step']} "
                f"({p['slow']['kernel_stack']})"
                for p in stalls
                if "slow" in p
            ),
        ],
        [
            "connection floods",
            ", ".join(f"{f['connections']} on instance {f['instance']}" for f in r["floods"]),
        ],
        [
            "memory limit",
            f"{r['memory_limit']}, {_mib(r['memory_limit_bytes'])} per daemon "
            f"(capacity + {_mib(r['memory_limit_bytes'] - r['capacity_bytes'])})",
        ],
        ["result", "PASS" if r["ok"] else "FAIL: " + "; ".join(failed)],
    ]
    header = ["instance", "processes", "peak RSS (VmHWM) / bound", "store peak / capacity"]
    header += ["descriptors start / end (socket, source, other)", "threads start / end"]
    header += ["FUSE waiting at the end", "cgroup peak / limit, OOM kills", "exit"]
    per = []
    for i in r["instances"]:
        fds = " / ".join(
            ", ".join(str(d[k]) for k in ("socket", "source", "other"))
            for d in (i["start"]["descriptors"], i["end"]["descriptors"])
        )
        cgroup = i["memory_limit"]
        per.append(
            [
                str(i["instance"]),
                str(i["processes"]),
                f"{_mib(i['peak_rss_bytes'])} / {_mib(r['bound_bytes'])}",
                f"{_mib(i['peak_held_bytes'])} / {_mib(r['capacity_bytes'])}",
                fds,
                f"{i['start']['threads']} / {i['end']['threads']}",
                str(i["end"]["fuse_waiting"]),
                f"{_mib(cgroup.get('max_usage_bytes') or 0)} / {_mib(cgroup['limit_bytes'])}, "
                f"{cgroup.get('oom_kills', '-')}"
                if cgroup["kind"] != "not applied"
                else "not applied",
                str(i["exit"]),
            ]
        )
    lines = [
        *lib.preamble(r),
        f"Setup: 3 instances, --capacity {format_size(r['capacity_bytes'])} each, peers on "
        f"loopback; the source a faultfs mount; files {files} (stamped 16-byte units); "
        f"{r['readers']} readers (sequential, pread, mmap).",
        lib.describe_load(load),
        "",
        *table(["", ""], rows),
        "",
        *table(header, per),
    ]
    if r["details"]:
        lines += ["", *[f"- {d}" for d in r["details"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and sys.argv[1:2] == ["--reader"]:
    sys.exit(reader_main(json.loads(sys.argv[2])))
