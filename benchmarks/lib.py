"""What the benchmarks share: test files, cold caches, timed operations, gauges, signals.

Plain synchronous Python. The scripts of this directory import it as ``lib``
(``python benchmarks/run.py`` puts this directory first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import secrets
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memcachefs import mounts
from memcachefs.config import MiB, parse_size
from memcachefs.errors import ConfigError
from memcachefs.testing.harness import MountedFS, mount
from memcachefs.testing.harness import stop_process as stop

GiB = 1024 * MiB
GB = 1e9  # throughput is reported in GB/s (10^9 bytes per second)
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STATS_XATTR = "user.memcachefs.stats"
REFERENCE_XATTR = "user.reference.stats"


def size_arg(text: str) -> int:
    """argparse type: memcachefs's own size syntax (1024-based K/M/G/T)."""
    try:
        return parse_size(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# -- test data ---------------------------------------------------------------------
def test_chunks(size: int, *, seed: int = 0, chunk: int = 16 * MiB) -> Iterator[np.ndarray]:
    """`size` incompressible bytes at memory speed: one random chunk, varied per chunk.

    Each chunk is the random block XORed with a per-chunk byte and stamped with its
    offset, so no two chunks (and no two 4 KiB pages) are equal.
    """
    base = np.random.default_rng(seed).integers(0, 256, size=chunk, dtype=np.uint8)
    for offset in range(0, size, chunk):
        block = base[: min(chunk, size - offset)] ^ np.uint8((offset // chunk) % 251 + 1)
        stamp = np.frombuffer(offset.to_bytes(8, "little"), dtype=np.uint8)[: block.size]
        block[: stamp.size] = stamp
        yield block


def write_test_file(path: Path, size: int, *, seed: int = 0, header: bytes = b"") -> Path:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb", buffering=0) as f:
        f.write(header)
        for block in test_chunks(size, seed=seed):
            f.write(memoryview(block))
    os.replace(tmp, path)
    return path


def fill_buffer(size: int, *, seed: int = 0) -> bytearray:
    """The bytes of `write_test_file(path, size, seed=seed)`, in memory."""
    buffer = bytearray(size)
    offset = 0
    for block in test_chunks(size, seed=seed):
        buffer[offset : offset + block.size] = memoryview(block)
        offset += block.size
    return buffer


def write_safetensors(path: Path, size: int, *, seed: int = 1) -> Path:
    """A safetensors file of about `size` bytes: float32 tensors of up to 16 MiB."""
    tensor_bytes = max(64 * 1024, min(16 * MiB, size // 8)) // 4096 * 4096
    count = max(1, size // tensor_bytes)
    header: dict[str, Any] = {"__metadata__": {"format": "np", "by": "memcachefs benchmarks"}}
    for i in range(count):
        header[f"layers.{i}.weight"] = {
            "dtype": "F32",
            "shape": [tensor_bytes // 4096, 1024],
            "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return write_test_file(
        path, count * tensor_bytes, seed=seed, header=struct.pack("<Q", len(raw)) + raw
    )


def drop_page_cache(path: Path, *, global_drop: bool) -> None:
    """Drop one file's page cache (posix_fadvise) and, if asked and root, the clean cache."""
    global_drop = global_drop and os.geteuid() == 0
    if global_drop:
        os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if global_drop:
        with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")


# -- timed operations: each returns what it moved and how long it took -----------------
@dataclass
class Sample:
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / GB


def read_file(path: Path, buffer_size: int = MiB) -> Sample:
    """Sequential readinto one reused buffer, timed from open() to EOF."""
    view = memoryview(bytearray(buffer_size))
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return Sample(total, time.perf_counter() - start)


def copy_file(source: Path, target: Path) -> Sample:
    view = memoryview(bytearray(4 * MiB))
    total = 0
    start = time.perf_counter()
    with open(source, "rb", buffering=0) as fin, open(target, "wb", buffering=0) as fout:
        while n := fin.readinto(view):
            fout.write(view[:n])
            total += n
    return Sample(total, time.perf_counter() - start)


def load_safetensors(path: Path) -> Sample:
    """safe_open(framework="numpy") and get_tensor for every tensor (an mmap of the file)."""
    from safetensors import safe_open

    size = path.stat().st_size
    loaded = 0
    start = time.perf_counter()
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            loaded += f.get_tensor(key).nbytes
    seconds = time.perf_counter() - start
    if not size * 0.99 <= loaded <= size:
        raise RuntimeError(f"safetensors: loaded {loaded} bytes of a {size}-byte file")
    return Sample(size, seconds)


def random_preads(path: Path, block: int = 4 * MiB, *, seed: int = 0) -> Sample:
    """Every 4 MiB block of the file once, in shuffled order (os.preadv)."""
    offsets = list(range(0, path.stat().st_size, block))
    random.Random(seed).shuffle(offsets)
    buf = bytearray(block)
    total = 0
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in offsets:
            total += os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return Sample(total, time.perf_counter() - start)


def first_byte(path: Path) -> Sample:
    """Time to first byte: open + one 4 KiB read."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        n = len(os.read(fd, 4096))
    finally:
        os.close(fd)
    return Sample(n, time.perf_counter() - start)


def loopback_tcp(nbytes: int, buffer_size: int = 4 * MiB) -> Sample:
    """Move `nbytes` over one TCP connection on 127.0.0.1 (a sender thread, recv_into)."""
    server = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def send() -> None:
        try:
            conn, _ = server.accept()
            with conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
                view, left = memoryview(bytearray(buffer_size)), nbytes
                while left:
                    conn.sendall(view[: min(left, buffer_size)])
                    left -= min(left, buffer_size)
        except BaseException as error:
            errors.append(error)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    buf, total = memoryview(bytearray(buffer_size)), 0
    try:
        start = time.perf_counter()
        with socket.create_connection(server.getsockname()[:2]) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
            while total < nbytes and (n := client.recv_into(buf)):
                total += n
        seconds = time.perf_counter() - start
    finally:
        server.close()
        sender.join(timeout=30)
    if errors or total != nbytes:
        raise RuntimeError(f"loopback TCP moved {total} of {nbytes} bytes: {errors}")
    return Sample(total, seconds)


def secret_file(folder: Path) -> Path:
    """A cluster secret, mode 0600, for the instances of one run."""
    path = folder / "cluster.secret"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- processes ------------------------------------------------------------------------
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat


def proc_bytes(key: str, pid: int | None = None) -> int:
    """A kB figure of /proc/PID/status (VmRSS, VmHWM) or, without a pid, /proc/meminfo."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status" if pid else "/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def load_summary(start: list[float], samples: list[float]) -> dict[str, Any]:
    """The load average of a run: at its start and end, and its 1-minute samples' range."""
    samples = samples or [0.0]
    return {
        "start": start,
        "end": load_average(),
        "min_1m": min(samples),
        "max_1m": max(samples),
        "median_1m": statistics.median(samples),
    }


def describe_load(load: dict[str, Any]) -> str:
    """The report's sentence for a `load_summary`."""
    return (
        f"Load average (1 min) during the run: {load['min_1m']:.2f} to {load['max_1m']:.2f}, "
        f"median {load['median_1m']:.2f} (start {load['start']}, end {load['end']})."
    )


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def signals(handler: Any) -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP go to `handler` inside the block (main thread only).

    ``signals(interrupt)`` turns them into KeyboardInterrupt so `finally` blocks tear
    down; ``signals(signal.SIG_IGN)`` shields a teardown from a second Ctrl-C.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def unmount_below(prefix: Path) -> None:
    """Unmount every mount below `prefix` (deepest first), lazily as a last resort."""
    for entry in reversed(mounts.mount_entries()):
        if entry.mountpoint.startswith(str(prefix) + "/"):
            try:
                mounts.unmount(entry.mountpoint)
            except OSError:
                with contextlib.suppress(OSError):
                    mounts.unmount(entry.mountpoint, lazy=True)


def start_reference(
    mountpoint: Path, data_file: Path, read_ahead_kb: int, log_path: Path
) -> subprocess.Popen[bytes]:
    """reference_fs.py serving `data_file`; returns once it prints ``ready``."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(HERE / "reference_fs.py"), str(mountpoint)]
    argv += ["--from-file", str(data_file), "--name", data_file.name]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*argv, "--read-ahead-kb", str(read_ahead_kb)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    assert process.stdout is not None
    ready = select.select([process.stdout], [], [], 120)[0]
    line = process.stdout.readline().decode(errors="replace") if ready else ""
    if not line.startswith("ready"):
        stop(process)
        unmount_below(mountpoint.parent)
        raise RuntimeError(f"reference_fs did not start: {line!r} (log: {log_path})")
    eprint(f"reference_fs: {line.strip()}")
    return process


def reference_counters(mountpoint: Path) -> dict[str, int]:
    """What reference_fs answered so far: its READ bytes count as memory bytes."""
    return {"memory_bytes": int(json.loads(os.getxattr(mountpoint, REFERENCE_XATTR))["read_bytes"])}


def daemon_counters(*daemons: Any) -> dict[str, int]:
    """memcachefs's byte counters (memory, source, peer) summed over daemons (MountedFS)."""
    keys = ("memory_bytes", "source_bytes", "peer_bytes")
    stats = [json.loads(os.getxattr(daemon.path, STATS_XATTR)) for daemon in daemons]
    return {key: sum(int(s.get(key, 0)) for s in stats) for key in keys}


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def fmt(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


# -- what ran where ---------------------------------------------------------------------
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gib": round(proc_bytes("MemTotal") / GiB, 1),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Hypervisor vendor", "Architecture"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
    with contextlib.suppress(ImportError):
        import pyfuse3

        info["pyfuse3"] = pyfuse3.__version__
    return info


def code_version() -> dict[str, Any]:
    """The commit benchmarked, and the files of src/ that differ from it."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(REPO), *args]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=10, check=False
        ).stdout

    try:
        commit, changed = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "src")
    except (OSError, subprocess.SubprocessError):
        commit, changed = "", ""
    return {
        "commit": commit.strip() or None,
        "uncommitted_src": [line[3:] for line in changed.splitlines() if line.strip()],
    }


def preamble(result: dict[str, Any]) -> list[str]:
    """The first lines of a preset's markdown: its command and duration, the machine
    and the code."""
    return [
        f"Command: `{result['command']}` ({result['elapsed_s'] / 60:.1f} min)",
        "",
        describe(result["machine"], result["code"]),
    ]


def describe(info: dict[str, Any], code: dict[str, Any]) -> str:
    text = (
        f"Machine: {info.get('model_name', '?')}, {info.get('cpus')} CPUs, "
        f"{info.get('memory_gib')} GiB RAM, Linux {info.get('kernel')}, "
        f"Python {info.get('python')}, pyfuse3 {info.get('pyfuse3', '?')}.\n"
        f"Code: commit {code.get('commit') or '?'}"
    )
    if code.get("uncommitted_src"):
        text += " plus uncommitted changes to " + ", ".join(code["uncommitted_src"])
    return text + "."


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def daemon(
    source: Path,
    mountpoint: Path,
    *,
    capacity: str,
    args: list[str],
    log_path: Path,
    mounted_list: list[MountedFS],
    notes: list[str],
) -> Iterator[MountedFS]:
    """A daemon mounted over `source` for one step of a preset: listed in
    `mounted_list` while it runs (so an interrupt unmounts it), its log's problems
    added to `notes` at the end, its mountpoint removed."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mounted = mount(source, mountpoint, capacity=capacity, args=args, log_path=log_path)
    mounted_list.append(mounted)
    try:
        yield mounted
    finally:
        problems = mounted.problems()
        mounted.unmount()
        mounted_list.remove(mounted)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()
        if problems:
            notes.append(f"{mountpoint.name} daemon log: {problems[:3]}")
