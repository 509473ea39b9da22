"""Daemon memory under pressure: RSS stays within 1.1 x capacity + 100 MiB.

A memcachefs mount with capacity C over a working set of 4 x C (several files);
16 reader processes read it for a fixed time, half of them random 1 MiB preads,
half sequential passes, each dropping the kernel page cache of what it read so
the reads keep reaching the daemon. The daemon's VmRSS is sampled every 100 ms
and its statistics every 0.5 s.

    python benchmarks/bench_rss.py [--capacity 512M] [--duration 30] [--json out.json]

A check, not a benchmark to admire: exits 1 when the peak RSS (VmHWM) is over
1.1 x C + 100 MiB, when the store held more than C bytes, or when a reader
failed; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import GiB, MiB
from memcachefs.testing.harness import MountedFS, fuse_available, mount

STATS_XATTR = "user.memcachefs.stats"


@dataclass
class Readers:
    """What the reader processes share (passed by fork, never pickled)."""

    files: list[str]
    read_size: int
    stop: Event
    total: Synchronized[int]
    errors: Synchronized[int]


def reader(number: int, shared: Readers, sequential: bool) -> None:
    """Read until `stop`; random or sequential; drop what was read from the page cache."""
    files, read_size, stop = shared.files, shared.read_size, shared.stop
    total, errors = shared.total, shared.errors
    rng = random.Random(number)
    buf = bytearray(read_size)
    done = 0
    try:
        while not stop.is_set():
            path = rng.choice(files)
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                offsets = (
                    range(0, size, read_size)
                    if sequential
                    else [rng.randrange(0, max(1, size - read_size)) for _ in range(64)]
                )
                for offset in offsets:
                    if stop.is_set():
                        break
                    n = os.preadv(fd, [buf], offset)
                    os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
                    done += n
            finally:
                os.close(fd)
    except OSError as error:
        common.eprint(f"reader {number}: {error}")
        with errors.get_lock():
            errors.value += 1
    with total.get_lock():
        total.value += done


def daemon_stats(path: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(path, STATS_XATTR))


def run(args: argparse.Namespace) -> dict[str, Any]:
    capacity = common.parse_size(args.capacity)
    working_set = capacity * args.working_set_factor
    file_size = working_set // args.files // MiB * MiB
    bound = int(1.1 * capacity) + 100 * MiB
    work = Path(args.workdir).absolute()
    source = work / "rss-source"
    mountpoint = work / "rss-mnt"
    source.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(exist_ok=True)
    names = [f"part-{i:02d}.bin" for i in range(args.files)]
    for i, name in enumerate(names):
        common.write_test_file(source / name, file_size, seed=i)
    common.eprint(
        f"capacity {capacity / MiB:.0f} MiB, working set {args.files} x "
        f"{file_size / MiB:.0f} MiB, {args.readers} readers for {args.duration:.0f} s"
    )
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    total = ctx.Value("q", 0)
    errors = ctx.Value("i", 0)
    rss_samples: list[tuple[float, int]] = []
    stats_samples: list[dict[str, Any]] = []
    processes: list[multiprocessing.process.BaseProcess] = []
    mounted: MountedFS | None = None
    try:
        mounted = mount(
            source,
            mountpoint,
            capacity=args.capacity,
            args=["--kernel-read-ahead", f"{args.read_ahead_kb}K", *args.memcachefs_arg],
        )
        pid = mounted.pid
        rss_idle = common.rss(pid)
        load_start = common.load_average()
        files = [str(mountpoint / name) for name in names]
        shared = Readers(files, args.read_size, stop, total, errors)
        for number in range(args.readers):
            process = ctx.Process(
                target=reader,
                args=(number, shared, number % 2 == 1),
                daemon=True,
            )
            process.start()
            processes.append(process)
        started = time.monotonic()
        cpu0 = common.cpu_seconds(pid)
        next_stats = started
        while (now := time.monotonic()) - started < args.duration:
            rss_samples.append((round(now - started, 3), common.rss(pid)))
            if now >= next_stats:
                stats_samples.append(daemon_stats(mountpoint))
                next_stats = now + 0.5
            time.sleep(0.1)
        stop.set()
        for process in processes:
            process.join(timeout=30)
        elapsed = time.monotonic() - started
        cpu_s = common.cpu_seconds(pid) - cpu0
        stats_samples.append(daemon_stats(mountpoint))
        peak_hwm = common.peak_rss(pid)
        problems = mounted.problems()
    finally:
        stop.set()
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        if mounted is not None:
            mounted.unmount()
        common.fuse_unmount(mountpoint)
        if not args.keep:
            shutil.rmtree(source, ignore_errors=True)

    peak_sampled = max(r for _, r in rss_samples)
    max_used = max(s["used_bytes"] for s in stats_samples)
    max_held = max(
        s["used_bytes"] + s.get("reserved_bytes", 0) + s.get("free_buffer_bytes", 0)
        for s in stats_samples
    )
    end = stats_samples[-1]
    checks = {
        "peak_rss_within_bound": peak_hwm <= bound,
        "used_bytes_within_capacity": max_used <= capacity,
        "held_bytes_within_capacity": max_held <= capacity,
        "no_reader_errors": errors.value == 0,
        "evicted": end.get("evictions", 0) > 0,
    }
    return {
        "benchmark": "bench_rss",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": common.machine_description(),
        "code": common.code_version(),
        "load_average_start": load_start,
        "load_average_end": common.load_average(),
        "capacity_bytes": capacity,
        "bound_bytes": bound,
        "files": args.files,
        "file_bytes": file_size,
        "working_set_bytes": file_size * args.files,
        "readers": args.readers,
        "read_bytes": args.read_size,
        "duration_s": elapsed,
        "bytes_read": total.value,
        "throughput_gbps": total.value / elapsed / common.GB,
        "daemon_cpu_s": cpu_s,
        "rss_idle_bytes": rss_idle,
        "peak_rss_sampled_bytes": peak_sampled,
        "peak_rss_hwm_bytes": peak_hwm,
        "max_used_bytes": max_used,
        "max_held_bytes": max_held,
        "reader_errors": errors.value,
        "daemon_log_problems": problems[:10],
        "stats_end": end,
        "rss_samples": rss_samples,
        "checks": checks,
        "ok": all(v for k, v in checks.items() if k != "evicted"),
    }


def markdown(result: dict[str, Any]) -> str:
    end = result["stats_end"]
    rows = [
        ("capacity C", f"{result['capacity_bytes'] / MiB:.0f} MiB"),
        (
            "working set",
            f"{result['files']} files x {result['file_bytes'] / MiB:.0f} MiB = "
            f"{result['working_set_bytes'] / result['capacity_bytes']:.1f} x C",
        ),
        (
            "readers",
            f"{result['readers']} processes (half random, half sequential "
            f"{result['read_bytes'] // 1024} KiB reads), {result['duration_s']:.0f} s",
        ),
        (
            "read through the daemon",
            f"{result['bytes_read'] / GiB:.1f} GiB, {result['throughput_gbps']:.2f} GB/s",
        ),
        ("hits / misses / evictions", f"{end['hits']} / {end['misses']} / {end['evictions']}"),
        ("daemon RSS idle", f"{result['rss_idle_bytes'] / MiB:.0f} MiB"),
        (
            "daemon peak RSS (VmHWM / sampled VmRSS)",
            f"{result['peak_rss_hwm_bytes'] / MiB:.0f} / "
            f"{result['peak_rss_sampled_bytes'] / MiB:.0f} MiB",
        ),
        ("bound 1.1 x C + 100 MiB", f"{result['bound_bytes'] / MiB:.0f} MiB"),
        (
            "peak RSS / bound",
            f"{result['peak_rss_hwm_bytes'] / result['bound_bytes']:.2f}",
        ),
        (
            "store: max used / max used+reserved+spare",
            f"{result['max_used_bytes'] / MiB:.0f} / {result['max_held_bytes'] / MiB:.0f} MiB",
        ),
        ("reader errors", str(result["reader_errors"])),
        ("result", "PASS" if result["ok"] else "FAIL"),
    ]
    lines = [
        f"Command: `python benchmarks/{result['command']}`",
        "",
        f"Machine: {common.describe_machine_line(result['machine'])}; load average before "
        f"the readers started: {', '.join(f'{x:.2f}' for x in result['load_average_start'])}, "
        f"at the end (16 readers included): "
        f"{', '.join(f'{x:.2f}' for x in result['load_average_end'])}.",
        common.describe_code_line(result["code"]),
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="memcachefs daemon RSS under a 4x working set")
    parser.add_argument("--capacity", default="512M", help="cache capacity C (default 512M)")
    parser.add_argument("--working-set-factor", type=int, default=4, help="working set / C")
    parser.add_argument("--files", type=int, default=8, help="files in the working set")
    parser.add_argument("--readers", type=int, default=16, help="reader processes")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of reading")
    parser.add_argument("--read-size", type=common.parse_size, default=MiB, help="bytes per read")
    parser.add_argument("--read-ahead-kb", type=int, default=1024, help="kernel readahead")
    parser.add_argument(
        "--memcachefs-arg", action="append", default=[], help="extra mount option (repeatable)"
    )
    parser.add_argument("--workdir", default="/var/tmp/memcachefs-bench", help="files, mounts")
    parser.add_argument("--json", type=Path, help="write the result and RSS samples here")
    parser.add_argument("--markdown", action="store_true", help="print the README results text")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--smoke", action="store_true", help="capacity 16M, 4 files, 3 s")
    args = parser.parse_args()
    if args.smoke:
        args.capacity, args.files, args.duration = "16M", 4, 3.0
    problem = fuse_available()
    if problem:
        common.eprint(f"error: {problem}")
        return 2
    with common.terminate_on_signals():
        result = run(args)
    if args.json:
        common.write_json(args.json, result)
    text = markdown(result)
    print(text if args.markdown else common.plain_text(text))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
