"""Core throughput of memcachefs, side by side with its ceilings, in one run.

Scenarios (same file, same run; medians of --repeat repetitions):

  tmpfs              read the file from tmpfs (/dev/shm): the memory-read ceiling
  reference          benchmarks/reference_fs.py serving the file from one buffer,
                     cold kernel page cache: the pyfuse3 FUSE transport ceiling
  memcachefs_cached  memcachefs with every block in memory, cold kernel page cache
  memcachefs_cached_nopush  the same, mounted with --no-page-cache-push
  memcachefs_repeat  memcachefs, the read right after the cached read: page cache
  memcachefs_repeat_steady  the read after that one (page cache, pages already active)
  source_raw         plain read of the source file (cold page cache where possible)
  memcachefs_cold    a fresh memcachefs daemon reading the source file once

    python benchmarks/bench_core.py [--size 1G] [--repeat 5] [--json out.json]
        [--markdown] [--png chart.png] [--smoke]
        [--slow-source RATE | --source DIR [--source-file NAME]]

Goals (issue 2 item 16): cached >= 0.9x reference, repeat >= 0.9x tmpfs,
cold >= 0.9x raw source. Reported, never asserted: exit 0 unless a step fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import MiB, Scenario
from memcachefs.testing.harness import MountedFS, fuse_available, mount

HERE = Path(__file__).resolve().parent
STATS_XATTR = "user.memcachefs.stats"
REFERENCE_XATTR = "user.reference.stats"

DESCRIPTIONS = {
    "tmpfs": "read of the file in tmpfs (/dev/shm)",
    "reference": "reference FUSE fs (one in-memory buffer), cold page cache",
    "memcachefs_cached": "memcachefs, all blocks in memory, cold page cache",
    "memcachefs_cached_nopush": "the same with --no-page-cache-push (every byte a FUSE READ)",
    "memcachefs_repeat": "memcachefs, repeat read from the kernel page cache",
    "memcachefs_repeat_steady": "memcachefs, a further repeat read (page cache)",
    "source_raw": "raw read of the source file",
    "memcachefs_cold": "memcachefs, fresh daemon, every block from the source",
}
ORDER = list(DESCRIPTIONS)


def daemon_bytes(path: Path) -> Callable[[], tuple[int, int]]:
    """(memory_bytes, source_bytes) of memcachefs: did a read reach the daemon?"""

    def read() -> tuple[int, int]:
        stats = json.loads(os.getxattr(path, STATS_XATTR))
        return int(stats.get("memory_bytes", 0)), int(stats.get("source_bytes", 0))

    return read


def reference_bytes(path: Path) -> Callable[[], tuple[int, int]]:
    """(bytes answered, 0) of reference_fs."""

    def read() -> tuple[int, int]:
        return int(json.loads(os.getxattr(path, REFERENCE_XATTR))["read_bytes"]), 0

    return read


def start_reference(
    mountpoint: Path, data_file: Path, read_ahead_kb: int, log_path: Path
) -> subprocess.Popen[bytes]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "reference_fs.py"),
                str(mountpoint),
                "--from-file",
                str(data_file),
                "--name",
                data_file.name,
                "--read-ahead-kb",
                str(read_ahead_kb),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 1.0)[0]:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    if not line.startswith(b"ready"):
        common.stop_process(process)
        common.fuse_unmount(mountpoint)
        raise RuntimeError(f"reference_fs did not start: {line.decode(errors='replace')!r}")
    common.eprint(f"reference_fs: {line.decode().strip()}")
    return process


def measure(
    scenario: Scenario,
    path: Path,
    buffer_size: int,
    *,
    before: Callable[[], None] | None = None,
    pid: int | None = None,
    served_by: Callable[[], tuple[int, int]] | None = None,
    tx: Callable[[], int | None] | None = None,
) -> None:
    """One repetition: prepare, read timed, record the daemon's CPU and bytes served."""
    if before:
        before()
    cpu0 = common.cpu_seconds(pid) if pid else 0.0
    served0 = served_by() if served_by else (0, 0)
    tx0 = tx() if tx else None
    result = common.timed_read(path, buffer_size)
    if pid:
        scenario.daemon_cpu_s.append(common.cpu_seconds(pid) - cpu0)
        scenario.daemon_peak_rss_bytes = max(
            scenario.daemon_peak_rss_bytes or 0, common.peak_rss(pid)
        )
    if served_by:
        memory, source = served_by()
        scenario.daemon_memory_bytes.append(memory - served0[0])
        scenario.daemon_source_bytes.append(source - served0[1])
    if tx0 is not None and tx is not None:
        scenario.source_tx_bytes.append((tx() or 0) - tx0)
    scenario.add(result)
    common.eprint(f"  {scenario.name:<18} {result.gbps:7.3f} GB/s  ({result.seconds:.3f} s)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = common.parse_size(args.size)
    code = common.code_version()  # at the start: the daemons run the working tree
    global_drop = not args.smoke and common.is_root()
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    shm = Path(tempfile.mkdtemp(prefix="memcachefs-bench-", dir=args.tmpfs_dir))
    scenarios = {name: Scenario(name, DESCRIPTIONS[name]) for name in ORDER}
    notes: list[str] = []
    mounts: list[MountedFS] = []
    reference: subprocess.Popen[bytes] | None = None
    ref_mp = work / "reference"
    created_source_file: Path | None = None
    slow: Any = None
    exits = contextlib.ExitStack()
    try:
        # -- the data: one file in tmpfs, the same bytes in the source ------------
        if args.source:
            source_dir = Path(args.source).absolute()
            source_file = source_dir / args.source_file
            if source_file.exists():
                size = source_file.stat().st_size
                started = time.perf_counter()
                shutil.copyfile(source_file, shm / source_file.name)
                copy_s = time.perf_counter() - started
                notes.append(
                    f"source {source_dir}: copied {source_file.name} to tmpfs in {copy_s:.1f} s "
                    f"({size / copy_s / common.GB:.3f} GB/s)"
                )
            else:
                common.write_test_file(source_file, size)
                created_source_file = source_file
                shutil.copyfile(source_file, shm / source_file.name)
                notes.append(f"source {source_dir}: wrote {source_file.name} there")
        elif args.slow_source:
            from slowsource import SlowSource

            local = work / "source"
            local.mkdir(exist_ok=True)
            created_source_file = common.write_test_file(local / args.source_file, size)
            shutil.copyfile(created_source_file, shm / args.source_file)
            slow = exits.enter_context(SlowSource([created_source_file], rate=args.slow_source))
            source_dir = slow.mountpoint
            source_file = slow.path(args.source_file)
            notes.append(
                f"source: S3 (s3rver) in a network namespace capped at {args.slow_source} "
                f"(tc tbf), mounted by s3fs ro,direct_io at {source_dir} (benchmarks/slowsource.py)"
            )
        else:
            source_dir = work / "source"
            source_dir.mkdir(exist_ok=True)
            source_file = source_dir / args.source_file
            common.write_test_file(source_file, size)
            created_source_file = source_file
            notes.append(
                f"source is a local directory ({source_dir}): source_raw is a "
                + (
                    "cold read from its disk (page cache dropped before each read)"
                    if global_drop
                    else "read from the page cache (no root/smoke: not dropped)"
                )
                + ", not a rate-capped remote source; see --slow-source"
            )
        tmpfs_file = shm / source_file.name
        if not tmpfs_file.exists():
            common.write_test_file(tmpfs_file, size)
        os.sync()
        common.eprint(f"file: {source_file.name}, {size} bytes; work dir {work}")

        capacity = common.format_size(max(size + size // 4, 64 * MiB) // MiB * MiB)
        mount_args = ["--kernel-read-ahead", f"{args.read_ahead_kb}K", *args.memcachefs_arg]

        def drop(path: Path) -> Callable[[], None]:
            return lambda: common.drop_page_cache(path, global_drop=global_drop)

        # -- phase 1: reads that need a cold source. Nothing else may hold the source
        # file open meanwhile (s3fs keeps a file's data while any descriptor is open).
        for rep in range(args.repeat):
            common.eprint(f"cold {rep + 1}/{args.repeat} (load {common.load_average()})")
            measure(
                scenarios["source_raw"],
                source_file,
                args.buffer,
                before=drop(source_file),
                tx=slow.tx_bytes if slow else None,
            )
            mp = work / f"mcfs-cold-{rep}"
            mp.mkdir(exist_ok=True)
            common.drop_page_cache(source_file, global_drop=global_drop)
            cold = mount(source_dir, mp, capacity=capacity, args=mount_args)
            mounts.append(cold)
            try:
                measure(
                    scenarios["memcachefs_cold"],
                    mp / source_file.name,
                    args.buffer,
                    pid=cold.pid,
                    served_by=daemon_bytes(cold.path),
                    tx=slow.tx_bytes if slow else None,
                )
            finally:
                problems = cold.problems()
                cold.unmount()
                mounts.remove(cold)
                mp.rmdir()
            if problems:
                notes.append(f"memcachefs_cold daemon log: {problems[:3]}")

        # -- phase 2: memory and page-cache reads, scenarios interleaved per repetition
        reference = start_reference(ref_mp, tmpfs_file, args.read_ahead_kb, work / "reference.log")
        ref_file = ref_mp / source_file.name
        (work / "mcfs").mkdir(exist_ok=True)
        cached = mount(source_dir, work / "mcfs", capacity=capacity, args=mount_args)
        mounts.append(cached)
        mcfs_file = cached.path / source_file.name
        warm = common.timed_read(mcfs_file, args.buffer)
        common.eprint(f"memcachefs warm-up read: {warm.gbps:.3f} GB/s")
        (work / "mcfs-nopush").mkdir(exist_ok=True)
        nopush = mount(
            source_dir,
            work / "mcfs-nopush",
            capacity=capacity,
            args=[*mount_args, "--no-page-cache-push"],
        )
        mounts.append(nopush)
        nopush_file = nopush.path / source_file.name
        common.timed_read(nopush_file, args.buffer)
        for daemon in (cached, nopush):
            if daemon.stats()["used_bytes"] < size:
                notes.append("warning: the warm-up did not leave the whole file in memory")
        for rep in range(args.repeat):
            common.eprint(f"cached {rep + 1}/{args.repeat} (load {common.load_average()})")
            measure(scenarios["tmpfs"], tmpfs_file, args.buffer)
            measure(
                scenarios["reference"],
                ref_file,
                args.buffer,
                before=drop(ref_file),
                pid=reference.pid,
                served_by=reference_bytes(ref_mp),
            )
            # nopush first: its drop_caches would also empty the page cache that
            # memcachefs_repeat reads.
            measure(
                scenarios["memcachefs_cached_nopush"],
                nopush_file,
                args.buffer,
                before=drop(nopush_file),
                pid=nopush.pid,
                served_by=daemon_bytes(nopush.path),
            )
            measure(
                scenarios["memcachefs_cached"],
                mcfs_file,
                args.buffer,
                before=drop(mcfs_file),
                pid=cached.pid,
                served_by=daemon_bytes(cached.path),
            )
            measure(
                scenarios["memcachefs_repeat"],
                mcfs_file,
                args.buffer,
                pid=cached.pid,
                served_by=daemon_bytes(cached.path),
            )
            measure(
                scenarios["memcachefs_repeat_steady"],
                mcfs_file,
                args.buffer,
                pid=cached.pid,
                served_by=daemon_bytes(cached.path),
            )
        stats = cached.stats()
        problems = cached.problems()
        if problems:
            notes.append(f"memcachefs daemon log: {problems[:3]}")
    finally:
        for mounted in mounts:
            mounted.unmount()
        if reference is not None:
            common.stop_process(reference)
        common.fuse_unmount(ref_mp)
        exits.close()  # the slow source, if any
        shutil.rmtree(shm, ignore_errors=True)
        if created_source_file is not None and not args.keep:
            created_source_file.unlink(missing_ok=True)

    for name in ("reference", "memcachefs_cached", "memcachefs_cached_nopush"):
        served = scenarios[name].daemon_memory_bytes
        if served and min(served) < size:
            notes.append(
                f"{name}: some reads were partly served by the page cache "
                "(memcachefs pushes cached blocks into it on open, unless --no-page-cache-push)"
            )
    for name in ("memcachefs_repeat", "memcachefs_repeat_steady"):
        served = scenarios[name].daemon_memory_bytes
        if served and max(served) > size // 100:
            notes.append(f"{name}: some repetitions reached the daemon (page cache dropped)")
    return {
        "benchmark": "bench_core",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "size_bytes": size,
        "buffer_bytes": args.buffer,
        "repeat": args.repeat,
        "read_ahead_kb": args.read_ahead_kb,
        "global_drop_caches": global_drop,
        "smoke": args.smoke,
        "machine": common.machine_description(),
        "code": code,
        "code_end": common.code_version(),
        "load_average_end": common.load_average(),
        "memcachefs_stats_end": stats,
        "notes": notes,
        "scenarios": {name: s.summary() for name, s in scenarios.items()},
    }


# -- report ---------------------------------------------------------------------------
GOALS = [
    ("memcachefs_cached", "reference", 0.9, "cached, cold page cache >= 0.9x reference FUSE"),
    (
        "memcachefs_cached_nopush",
        "reference",
        0.9,
        "(the same without the page-cache push) >= 0.9x reference",
    ),
    ("memcachefs_repeat", "tmpfs", 0.9, "repeat read >= 0.9x tmpfs"),
    ("memcachefs_cold", "source_raw", 0.9, "cold read >= 0.9x raw source read"),
]


def ratio(result: dict[str, Any], name: str, base: str) -> float:
    denominator = result["scenarios"][base]["median_gbps"]
    return result["scenarios"][name]["median_gbps"] / denominator if denominator else 0.0


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    loads = [la for s in result["scenarios"].values() for la in s["load_average"]]
    load_1m = [la[0] for la in loads] or [0.0]
    lines = [
        f"Command: `python benchmarks/{result['command']}`",
        "",
        f"Machine: {common.describe_machine_line(machine)}.",
        common.describe_code_line(result["code"])
        + (
            " The code changed during the run (at the end: "
            + common.describe_code_line(result["code_end"]).removeprefix("Code: ")
            + ")"
            if result.get("code_end") and result["code_end"] != result["code"]
            else ""
        ),
        f"File: {common.format_size(result['size_bytes'])}iB, read sequentially with "
        f"{result['buffer_bytes'] // 1024} KiB `readinto`; kernel readahead "
        f"{result['read_ahead_kb']} KiB; {result['repeat']} repetitions per scenario, "
        "the two source scenarios first, then the others interleaved.",
        f"Load average (1 min) during the run: {min(load_1m):.2f} to {max(load_1m):.2f} "
        f"(at the end: {', '.join(f'{x:.2f}' for x in result['load_average_end'])}).",
        "",
        "| scenario | median GB/s | min | max | x tmpfs | x reference | "
        "daemon CPU s/GiB | daemon peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ORDER:
        s = result["scenarios"][name]
        cpu = f"{s['cpu_s_per_gib']:.2f}" if s["cpu_s_per_gib"] is not None else "-"
        peak = s["daemon_peak_rss_bytes"]
        rss = f"{peak / MiB:.0f} MiB" if peak else "-"
        lines.append(
            f"| {name} | {s['median_gbps']:.3g} | {s['min_gbps']:.3g} | {s['max_gbps']:.3g} "
            f"| {ratio(result, name, 'tmpfs'):.2f} | {ratio(result, name, 'reference'):.2f} "
            f"| {cpu} | {rss} |"
        )
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for name, base, target, text in GOALS:
        r = ratio(result, name, base)
        lines.append(f"| {text} | {r:.2f}x | {'yes' if r >= target else 'no'} |")
    notes = list(result["notes"])
    for name in ("source_raw", "memcachefs_cold"):
        tx = result["scenarios"][name].get("source_tx_bytes")
        if tx:
            notes.append(
                f"{name}: the source sent {statistics.median(tx) / result['size_bytes']:.3f}x "
                "the file size per read (median; namespace veth tx counter)"
            )
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> None:
    """Median GB/s per scenario with min-max whiskers, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        common.eprint("warning: no matplotlib (pip install -e '.[bench]'); no chart written")
        return
    names = ORDER[::-1]
    data = [result["scenarios"][name] for name in names]
    medians = [s["median_gbps"] for s in data]
    errors = [
        [m - s["min_gbps"] for m, s in zip(medians, data, strict=True)],
        [s["max_gbps"] - m for m, s in zip(medians, data, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["tab:blue" if n.startswith("memcachefs") else "tab:gray" for n in names]
    ax.barh(names, medians, xerr=errors, color=colors, capsize=3)
    for y, m in enumerate(medians):
        ax.text(m, y, f" {m:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(s["max_gbps"] for s in data) * 1.12)
    ax.set_xlabel("GB/s (median, whiskers min-max)")
    ax.set_title(
        f"memcachefs core read throughput, {result['size_bytes'] / MiB:.0f} MiB file, "
        f"{result['repeat']} repetitions"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="memcachefs core throughput vs tmpfs and a reference FUSE fs"
    )
    parser.add_argument("--size", default="1G", help="file size, 1024-based (default 1G)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--buffer", type=common.parse_size, default=MiB, help="read size (1M)")
    parser.add_argument("--read-ahead-kb", type=int, default=1024, help="kernel readahead")
    parser.add_argument("--source", help="a (slow) source directory; default: local disk")
    parser.add_argument(
        "--slow-source",
        metavar="RATE",
        help="stand up S3 in a netns capped at RATE (e.g. 400mbit) with slowsource.py (root)",
    )
    parser.add_argument("--source-file", default="bench-data.bin", help="file name in it")
    parser.add_argument("--workdir", default="/var/tmp/memcachefs-bench", help="mounts, logs")
    parser.add_argument("--tmpfs-dir", default="/dev/shm", help="where the tmpfs copy goes")
    parser.add_argument(
        "--memcachefs-arg", action="append", default=[], help="extra mount option (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument(
        "--markdown", action="store_true", help="print the README results text (default: plain)"
    )
    parser.add_argument("--png", type=Path, help="write a chart (needs the 'bench' extra)")
    parser.add_argument("--keep", action="store_true", help="keep a generated source file")
    parser.add_argument("--smoke", action="store_true", help="32 MiB, 1 repetition, no drop_caches")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.repeat = "32M", 1
    problem = fuse_available()
    if problem:
        common.eprint(f"error: {problem}")
        return 2
    with common.terminate_on_signals():
        try:
            result = run(args)
        except RuntimeError as error:  # a daemon or the slow source could not start
            common.eprint(f"error: {error}")
            return 2
    if args.json:
        common.write_json(args.json, result)
    if args.png:
        chart(result, args.png)
    text = markdown(result)
    print(text if args.markdown else common.plain_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
