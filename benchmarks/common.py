"""Helpers shared by the benchmarks: test files, cold caches, timed reads, process gauges.

Everything here is plain synchronous Python. Scripts in this directory import it
as ``common`` (they run as ``python benchmarks/<script>.py``, which puts this
directory first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1024 * 1024
GiB = 1024 * MiB
GB = 1e9  # throughput is reported in GB/s (10^9 bytes per second)

REPO = Path(__file__).resolve().parent.parent
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1G' -> 1073741824 (1024-based suffixes, like memcachefs)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    number, suffix = match.groups()
    scale = 1024 ** " kmgt".index(suffix.lower() or " ")
    return int(float(number) * scale)


def format_size(n: int) -> str:
    for unit, scale in (("G", GiB), ("M", MiB), ("K", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


# -- test data ------------------------------------------------------------------
def write_test_file(path: Path, size: int, *, seed: int = 0, chunk: int = 16 * MiB) -> Path:
    """Write `size` random-ish bytes to `path` (fast: one random chunk, varied per chunk).

    Every chunk is the same random block XORed with a per-chunk byte and stamped
    with its offset, so no two chunks (and no two 4 KiB pages) are equal and the
    content does not compress, while generation runs at memory speed.
    """
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=chunk, dtype=np.uint8)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb", buffering=0) as f:
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            block = base[:n] ^ np.uint8((offset // chunk) % 251 + 1)
            stamp = np.frombuffer(offset.to_bytes(8, "little"), dtype=np.uint8)
            block[: min(8, n)] = stamp[: min(8, n)]
            f.write(memoryview(block))
            offset += n
    os.replace(tmp, path)
    return path


def fill_buffer(size: int, *, seed: int = 0, chunk: int = 16 * MiB) -> bytearray:
    """The same bytes as `write_test_file(path, size, seed=seed)`, in memory."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=chunk, dtype=np.uint8)
    buffer = bytearray(size)
    target = np.frombuffer(buffer, dtype=np.uint8)
    offset = 0
    while offset < size:
        n = min(chunk, size - offset)
        np.bitwise_xor(base[:n], np.uint8((offset // chunk) % 251 + 1), out=target[offset:][:n])
        stamp = np.frombuffer(offset.to_bytes(8, "little"), dtype=np.uint8)
        target[offset : offset + min(8, n)] = stamp[: min(8, n)]
        offset += n
    return buffer


# -- caches -----------------------------------------------------------------------
def is_root() -> bool:
    return os.geteuid() == 0


def drop_page_cache(path: Path, *, global_drop: bool = True) -> None:
    """Drop the kernel page cache of one file (and, as root, the clean page cache).

    posix_fadvise(DONTNEED) drops the file's clean pages, FUSE files included.
    As root, `echo 1 > /proc/sys/vm/drop_caches` also drops what a source below
    it may hold (a local disk source); it never touches tmpfs.
    """
    os.sync() if global_drop and is_root() else None
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if global_drop and is_root():
        with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")


# -- timed reads ------------------------------------------------------------------
@dataclass
class ReadResult:
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / GB


def timed_read(path: Path, buffer_size: int = MiB) -> ReadResult:
    """Read `path` sequentially with readinto into one reused buffer; time open to EOF."""
    buf = bytearray(buffer_size)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return ReadResult(total, time.perf_counter() - start)


# -- processes --------------------------------------------------------------------
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat


def proc_status_bytes(pid: int, key: str) -> int:
    """A kB figure from /proc/PID/status (VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss(pid: int) -> int:
    return proc_status_bytes(pid, "VmHWM")


def rss(pid: int) -> int:
    return proc_status_bytes(pid, "VmRSS")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_description() -> dict[str, Any]:
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Hypervisor vendor", "Architecture"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
    with contextlib.suppress(OSError):
        info["memory_gib"] = round(proc_status_bytes_meminfo("MemTotal") / GiB, 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["fusermount3", "-V"], capture_output=True, text=True, check=False
        ).stdout
        info["fusermount3"] = out.strip()
    with contextlib.suppress(ImportError):
        import pyfuse3

        info["pyfuse3"] = pyfuse3.__version__
    return info


def proc_status_bytes_meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def code_version() -> dict[str, Any]:
    """The commit benchmarked, and the files of src/ that differ from it (if any)."""
    info: dict[str, Any] = {"commit": None, "uncommitted_src": []}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["commit"] = _git("rev-parse", "--short", "HEAD").strip() or None
        out = _git("status", "--porcelain", "--", "src")
        info["uncommitted_src"] = [line[3:] for line in out.splitlines() if line.strip()]
    return info


def _git(*args: str) -> str:
    command = ["git", "-C", str(REPO), *args]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=10).stdout


def describe_code_line(info: dict[str, Any]) -> str:
    line = f"Code: commit {info.get('commit') or '?'}"
    if info.get("uncommitted_src"):
        line += " plus uncommitted changes to " + ", ".join(info["uncommitted_src"])
    return line + "."


def describe_machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info.get('model_name', platform.processor() or '?')}, {info.get('cpus')} CPUs, "
        f"{info.get('memory_gib')} GiB RAM, Linux {info.get('kernel')}, "
        f"Python {info.get('python')}, pyfuse3 {info.get('pyfuse3', '?')}"
    )


# -- samples ----------------------------------------------------------------------
@dataclass
class Scenario:
    """The repetitions of one scenario and what the daemon spent on them."""

    name: str
    description: str
    samples_gbps: list[float] = field(default_factory=list)
    samples_s: list[float] = field(default_factory=list)
    bytes_per_read: int = 0
    daemon_cpu_s: list[float] = field(default_factory=list)  # per repetition
    daemon_peak_rss_bytes: int | None = None
    # from the daemon's stats, per repetition: bytes it handed out from memory / read
    daemon_memory_bytes: list[int] = field(default_factory=list)
    daemon_source_bytes: list[int] = field(default_factory=list)
    source_tx_bytes: list[int] = field(default_factory=list)  # slow source: bytes it sent
    load_average: list[list[float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, result: ReadResult) -> None:
        self.samples_gbps.append(result.gbps)
        self.samples_s.append(result.seconds)
        self.bytes_per_read = result.bytes
        self.load_average.append(load_average())

    @property
    def median(self) -> float:
        return statistics.median(self.samples_gbps) if self.samples_gbps else 0.0

    @property
    def cpu_s_per_gib(self) -> float | None:
        if not self.daemon_cpu_s or not self.bytes_per_read:
            return None
        per_read = statistics.median(self.daemon_cpu_s)
        return per_read / (self.bytes_per_read / GiB)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            median_gbps=self.median,
            min_gbps=min(self.samples_gbps, default=0.0),
            max_gbps=max(self.samples_gbps, default=0.0),
            repetitions=len(self.samples_gbps),
            cpu_s_per_gib=self.cpu_s_per_gib,
        )
        return data


def plain_text(markdown: str) -> str:
    """Markdown tables as aligned plain-text columns (other lines unchanged)."""
    out: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            out.extend(
                "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                for row in table
            )
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):
                table.append(cells)
            continue
        flush()
        out.append(line.replace("`", ""))
    flush()
    return "\n".join(out)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# -- cleanup ----------------------------------------------------------------------
def fuse_unmount(path: Path) -> None:
    """Unmount a FUSE mount if one is at `path` (lazy as a last resort)."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    for command in ([fusermount, "-u", "-q", str(path)], [fusermount, "-u", "-z", "-q", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(command, capture_output=True, check=False)


def is_mounted(path: Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so `finally` blocks clean up."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
