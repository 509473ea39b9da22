"""The metadata benchmark (issue 10 items 4 and 5): a directory of N empty files.

One source directory on the local disk holds `--entries` empty files (100,000 by
default); each case mounts memcachefs over it with a capacity (`--capacity-cases`,
4M and 256M by default; the 256M case first reads `--blocks` of a data file, 88 MiB,
so that the store holds blocks), and times, against the same commands on the source
directory itself in the same repetition:

- `ls -l` cold (the first listing after the mount) and warm (right after the cold
  one: the daemon's cache is filled, the kernel's attributes may have timed out,
  `--attr-timeout` 1 s by default),
- `find DIR -ls`, `ls DIR | wc -l`,
- an xattr sweep: `os.listxattr` and a `getxattr` of a name no file has
  (`user.memcachefs-bench`: a negative answer) on every entry.

Each repetition is a fresh daemon; the figures are medians, each a ratio to the
source's own median. The daemon's counters (`xattr_source_calls`, `refreshes`,
`metadata_calls`) are read per step, and its peak RSS (VmHWM) at the end of each
mount is checked against the data bound, 1.1 x capacity + 100 MiB, plus what the
metadata options allow (README "Semantics" 6): `--metadata-cache` and
`--inode-limit` x INODE_BYTES. The run exits 1 if it is over that; the data bound
alone is reported too.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lib
from lib import MiB, fmt, table
from memcachefs.config import format_size
from memcachefs.inodes import INODE_BYTES
from memcachefs.testing.harness import MountedFS, mount

STEPS = {  # name: what is timed
    "ls_l_cold": "`ls -l` of the directory, the first listing after the mount",
    "ls_l_warm": "`ls -l` again right after (daemon cache filled)",
    "find_ls": "`find DIR -ls`",
    "ls_wc": "`ls DIR` piped to `wc -l`",
    "xattr_sweep": "listxattr + getxattr of an absent name, every entry",
}
GOALS = (("ls_l_cold", 3.0), ("ls_l_warm", 3.0), ("find_ls", 3.0))  # at most N x the source
COUNTERS = ("xattr_source_calls", "xattr_answers", "refreshes", "metadata_calls")
ABSENT = b"user.memcachefs-bench"


def _shell(command: str, directory: Path, expect_lines: int | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        command.format(dir=directory), shell=True, capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command.format(dir=directory)}: {done.stderr.strip()[:200]}")
    if expect_lines is not None and int(done.stdout.strip() or 0) != expect_lines:
        raise RuntimeError(f"{command}: {done.stdout.strip()} entries, expected {expect_lines}")
    return elapsed


def _xattr_sweep(directory: Path) -> float:
    started = time.perf_counter()
    base = os.fsencode(directory) + b"/"
    for name in os.listdir(os.fsencode(directory)):
        path = base + name
        os.listxattr(path, follow_symlinks=False)
        try:
            os.getxattr(path, ABSENT, follow_symlinks=False)
        except OSError as error:
            if error.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
        else:
            raise RuntimeError(f"{path!r} has {ABSENT!r}")
    return time.perf_counter() - started


def _steps(entries: int) -> dict[str, Callable[[Path], float]]:
    return {
        "ls_l_cold": lambda d: _shell("ls -l {dir} | wc -l", d, entries + 1),
        "ls_l_warm": lambda d: _shell("ls -l {dir} | wc -l", d, entries + 1),
        "find_ls": lambda d: _shell("find {dir} -ls | wc -l", d, entries + 1),
        "ls_wc": lambda d: _shell("ls {dir} | wc -l", d, entries),
        "xattr_sweep": _xattr_sweep,
    }


def make_entries(directory: Path, entries: int) -> float:
    """`entries` empty files in `directory` (kept if already there); seconds taken."""
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    if len(os.listdir(directory)) != entries:
        shutil.rmtree(directory)
        directory.mkdir()
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(entries):
                os.close(os.open(f"f{i:07d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        finally:
            os.close(fd)
    return time.perf_counter() - started


def _stats(fs: MountedFS) -> dict[str, int]:
    stats = fs.stats()
    kept = (*COUNTERS, "metadata_cache_bytes", "metadata_cache_budget_bytes", "inodes")
    kept += ("inode_limit",)
    return {k: int(stats.get(k, 0)) for k in kept}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir).absolute()
    source, mountpoint = work / "meta-source", work / "meta-mnt"
    listed = source / "dir"
    mountpoint.mkdir(parents=True, exist_ok=True)
    lib.eprint(f"metadata: {args.entries} empty files in {listed}")
    created_s = make_entries(listed, args.entries)
    data = source / "blocks" / "data.bin"
    if args.blocks:
        data.parent.mkdir(exist_ok=True)
        if not data.exists() or data.stat().st_size != args.blocks:
            lib.write_test_file(data, args.blocks)
    steps = {s: m for s, m in _steps(args.entries).items() if s in args.steps}
    cases: list[dict[str, Any]] = []
    loads: list[float] = []
    load_start = lib.load_average()
    started = time.time()
    try:
        for capacity in args.capacity_cases:
            blocks = args.blocks if capacity > args.blocks else 0  # what fits in the store
            case: dict[str, Any] = {
                "capacity_bytes": capacity,
                "blocks_read_bytes": blocks,
                "data_bound_bytes": int(1.1 * capacity) + 100 * MiB,
                "metadata_allowance_bytes": [],
                "source_s": {s: [] for s in steps},
                "memcachefs_s": {s: [] for s in steps},
                "counters": {s: {c: [] for c in COUNTERS} for s in steps},
                "peak_rss_bytes": [],
                "rss_after_blocks_bytes": [],
                "metadata_cache_bytes": [],
                "inodes": [],
            }
            for repetition in range(args.repeat):
                lib.eprint(f"metadata: capacity {format_size(capacity)}, rep {repetition + 1}")
                for step, measure in steps.items():  # the source first, its caches warm
                    case["source_s"][step].append(measure(listed))
                fs = mount(
                    source,
                    mountpoint,
                    capacity=str(capacity),
                    args=list(args.memcachefs_arg),
                )
                try:
                    if blocks:
                        lib.read_file(mountpoint / "blocks" / "data.bin")
                    case["rss_after_blocks_bytes"].append(lib.proc_bytes("VmRSS", fs.pid))
                    before = _stats(fs)
                    for step, measure in steps.items():
                        case["memcachefs_s"][step].append(measure(mountpoint / "dir"))
                        after = _stats(fs)
                        for c in COUNTERS:
                            case["counters"][step][c].append(after[c] - before[c])
                        before = after
                        loads.append(lib.load_average()[0])
                    case["peak_rss_bytes"].append(lib.proc_bytes("VmHWM", fs.pid))
                    case["metadata_cache_bytes"].append(before["metadata_cache_bytes"])
                    case["metadata_allowance_bytes"].append(
                        before["metadata_cache_budget_bytes"] + before["inode_limit"] * INODE_BYTES
                    )
                    case["inodes"].append(before["inodes"])
                    problems = fs.problems()
                finally:
                    fs.unmount()
                if problems:
                    raise RuntimeError(f"the daemon logged: {problems[:3]}")
            case["ratios"] = {
                s: statistics.median(case["memcachefs_s"][s])
                / statistics.median(case["source_s"][s])
                for s in steps
            }
            case["bound_bytes"] = case["data_bound_bytes"] + max(case["metadata_allowance_bytes"])
            case["rss_ok"] = max(case["peak_rss_bytes"]) <= case["bound_bytes"]
            cases.append(case)
    finally:
        lib.unmount_below(work)
        if not args.keep:
            shutil.rmtree(source, ignore_errors=True)
    goals = [
        {
            "text": f"capacity {format_size(c['capacity_bytes'])}: {step} <= {target:g}x source",
            "ratio": c["ratios"][step],
            "status": "met" if c["ratios"][step] <= target else "not met",
        }
        for c in cases
        for step, target in GOALS
        if step in steps
    ]
    goals += [
        {
            "text": f"capacity {format_size(c['capacity_bytes'])}: peak RSS <= 1.1 x C + 100 MiB"
            " + metadata options",
            "ratio": max(c["peak_rss_bytes"]) / c["bound_bytes"],
            "status": "met" if c["rss_ok"] else "not met",
        }
        for c in cases
    ]
    return {
        "entries": args.entries,
        "create_s": created_s,
        "repeat": args.repeat,
        "memcachefs_args": list(args.memcachefs_arg),
        "cases": cases,
        "metadata_goals": goals,
        "load_average": lib.load_summary(load_start, loads),
        "elapsed_s": round(time.time() - started, 1),
        "ok": all(c["rss_ok"] for c in cases),
    }


def markdown(r: dict[str, Any]) -> str:
    load = r["load_average"]
    lines = [
        *lib.preamble(r),
        f"Directory: {r['entries']:,} empty files in one source directory on the local disk "
        f"(created in {r['create_s']:.1f} s); {r['repeat']} repetitions, each a fresh daemon"
        + (f" ({' '.join(r['memcachefs_args'])})" if r["memcachefs_args"] else "")
        + ", the source's own commands first in each (its dentry cache warm).",
        lib.describe_load(load),
        "",
    ]
    header = ["capacity", "step", "what", "source, s", "memcachefs, s", "x source"]
    header += ["xattr calls to the source", "attribute refreshes"]
    rows = []
    for c in r["cases"]:
        cap = format_size(c["capacity_bytes"])
        if c["blocks_read_bytes"]:
            cap += f" + {c['blocks_read_bytes'] // MiB} MiB of blocks"
        for step, what in STEPS.items():
            if step not in c["ratios"]:
                continue
            counters = c["counters"][step]
            rows.append(
                [
                    cap,
                    step,
                    what,
                    f"{statistics.median(c['source_s'][step]):.3f}",
                    f"{statistics.median(c['memcachefs_s'][step]):.3f}",
                    fmt(c["ratios"][step], "x"),
                    str(int(statistics.median(counters["xattr_source_calls"]))),
                    str(int(statistics.median(counters["refreshes"]))),
                ]
            )
    lines += table(header, rows)
    rss_rows = [
        [
            format_size(c["capacity_bytes"]),
            f"{c['blocks_read_bytes'] // MiB} MiB",
            " / ".join(f"{b / MiB:.0f}" for b in c["peak_rss_bytes"]) + " MiB",
            f"{c['data_bound_bytes'] / MiB:.0f} MiB",
            f"{max(c['peak_rss_bytes']) / c['data_bound_bytes']:.2f}",
            f"{c['bound_bytes'] / MiB:.0f} MiB",
            f"{max(c['peak_rss_bytes']) / c['bound_bytes']:.2f}",
            f"{statistics.median(c['metadata_cache_bytes']) / MiB:.0f} MiB",
            f"{statistics.median(c['inodes']):,.0f}",
            "PASS" if c["rss_ok"] else "FAIL",
        ]
        for c in r["cases"]
    ]
    lines += [""]
    lines += table(
        [
            "capacity",
            "blocks read",
            "daemon peak RSS (VmHWM) per repetition",
            "data bound 1.1 x C + 100 MiB",
            "peak / data bound",
            "bound with the metadata options",
            "peak / bound",
            "metadata cache (estimate)",
            "inodes at the end",
            "result",
        ],
        rss_rows,
    )
    goals = [[g["text"], fmt(g["ratio"], "x"), g["status"]] for g in r["metadata_goals"]]
    lines += ["", *table(["metadata goal (issue 10 items 4, 5)", "measured", "status"], goals)]
    return "\n".join(lines) + "\n"
