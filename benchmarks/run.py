"""The benchmark runner: a registry of scenarios, and presets that pick and judge them.

    python benchmarks/run.py core   [--size 1G] [--repeat 5] [--source local|s3|DIR] [--rate R]
                                    [--profile link|object-store] [--latency-ms MS]
                                    [--per-connection-rate R]
    python benchmarks/run.py suite  [--size 1G] [--repeat 5] [--cold-repeat 3] [--skip GROUP]
    python benchmarks/run.py rss    [--capacity 512M] [--files 8] [--readers 16] [--duration 30]
    python benchmarks/run.py switch [--size 256M,1G,2G] [--repeat 5] [--cold-repeat 3]
    python benchmarks/run.py metadata [--entries 100000] [--capacity-cases 4M,256M] [--blocks 88M]
                                      [--repeat 3]
    python benchmarks/run.py soak   [--minutes 30] [--capacity 128M] [--readers 6]
    python benchmarks/run.py --list
        any preset: [--json F] [--png F] [--markdown F] [--smoke] [--workdir DIR] [--keep]

Every figure is a ratio to a ceiling measured in the same run: each scenario names
its ceiling in SCENARIOS, each preset its goals. Goals are reported, never
asserted (exit 0 unless a step fails: 2, or the run is interrupted: 130), except
that the rss and metadata presets are checks of the RSS bound and the soak a check of
the contract under faults: they exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib
import metabench
import peerlink
import slowsource
import soak
import switch
from lib import MiB, fmt, table
from memcachefs.config import format_size
from memcachefs.testing.harness import fuse_available
from scenarios import Bench, Record, pressure
from slowsource import DEFAULT_RATE, SlowSourceError


# -- the registry -----------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    name: str
    group: str  # baseline | memcachefs | cluster | alternatives
    ceiling: str | None  # the scenario its "x ceiling" column divides by
    unit: str  # GB/s, or ms: a time to first byte
    what: str  # what is read, and the state of the caches before


# name, group, ceiling, unit, what is read (and the page cache before the read)
REGISTRY = """
source_raw                    baseline     -                  GB/s raw read of the source (cold)
shm_copy                      baseline     source_raw         GB/s copy source -> /dev/shm (what people do today)
shm_copy_read                 baseline     tmpfs              GB/s read of that /dev/shm copy right after copying
tmpfs                         baseline     -                  GB/s read of the file in tmpfs (/dev/shm)
loopback_tcp                  baseline     -                  GB/s TCP on 127.0.0.1, one stream, 4 MiB buffers
reference                     baseline     tmpfs              GB/s reference FUSE fs, one in-memory buffer, cold page cache
safetensors_tmpfs             baseline     tmpfs              GB/s safe_open(numpy) all tensors, from tmpfs
ttfb_source                   baseline     -                  ms   open + 4 KiB read, source
memcachefs_cold               memcachefs   source_raw         GB/s fresh daemon, every block from the source
memcachefs_cached             memcachefs   reference          GB/s all blocks in memory, cold kernel page cache
memcachefs_cached_nopush      memcachefs   reference          GB/s the same with --no-page-cache-push (every byte a FUSE READ)
memcachefs_repeat             memcachefs   tmpfs              GB/s repeat read (kernel page cache)
memcachefs_repeat_steady      memcachefs   tmpfs              GB/s the read after that (page cache)
memcachefs_first_after_warmup memcachefs   tmpfs              GB/s first read by a new reader right after a warm-up (cold) read
memcachefs_safetensors        memcachefs   safetensors_tmpfs  GB/s safe_open(numpy) mmap, all tensors, cached, cold page cache
memcachefs_random_4m          memcachefs   reference          GB/s 4 MiB preads in shuffled order, cached, cold page cache
memcachefs_ttfb_cold          memcachefs   -                  ms   open + 4 KiB read, fresh daemon
memcachefs_ttfb_warm          memcachefs   -                  ms   open + 4 KiB read, cached, cold page cache
memcachefs_remote_hit         cluster      loopback_tcp       GB/s instance B (fresh) reads what instance A holds, over loopback
memcachefs_cold_1_instance    cluster      source_raw         GB/s one instance alone cold-loads the model from the source
memcachefs_cold_3_instances   cluster      source_raw         GB/s 3 instances cold-load the model together (size / wall time)
rclone_cold                   alternatives source_raw         GB/s rclone vfs-cache full (/dev/shm), empty cache
rclone_cached                 alternatives reference          GB/s rclone, file in its cache, cold page cache
rclone_repeat                 alternatives tmpfs              GB/s rclone, repeat read right after
s3fs_cache_cold               alternatives source_raw         GB/s s3fs use_cache (/dev/shm), empty cache
s3fs_cache_cached             alternatives reference          GB/s s3fs use_cache, file cached, cold page cache
s3fs_cache_repeat             alternatives tmpfs              GB/s s3fs use_cache, repeat read right after
"""  # noqa: E501
SCENARIOS = {
    (f := line.split(maxsplit=4))[0]: Spec(f[0], f[1], None if f[2] == "-" else f[2], f[3], f[4])
    for line in REGISTRY.strip().splitlines()
}
GROUPS = ("baseline", "memcachefs", "cluster", "alternatives", "switch")  # switch: its preset


@dataclass(frozen=True)
class Goal:
    scenario: str
    base: str  # a scenario; for metric "source_bytes", the file size
    target: float  # 0: reported, not judged
    metric: str  # gbps: ratio of median GB/s | seconds | source_bytes
    text: str
    at_most: bool = False


def _metadata_steps(text: str) -> list[str]:
    steps = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(steps) - set(metabench.STEPS))
    if unknown or not steps:
        raise argparse.ArgumentTypeError(f"steps are some of {','.join(metabench.STEPS)}")
    return steps


def goals(table: str) -> tuple[Goal, ...]:
    """One goal a line: scenario, base, target (<=N: at most N), metric, the text."""
    out = []
    for line in table.strip().splitlines():
        name, base, target, metric, text = line.split(maxsplit=4)
        out.append(Goal(name, base, float(target.lstrip("<=")), metric, text, "<=" in target))
    return tuple(out)


def ratio(result: dict[str, Any], name: str, base: str, metric: str = "gbps") -> float | None:
    s, b = result["scenarios"].get(name), result["scenarios"].get(base)
    if not s or not s["samples_gbps"]:
        return None
    if metric == "source_bytes":  # bytes read from the source per read / the file size
        measured = s["counters"].get("source_tx_bytes") or s["counters"].get("source_bytes")
        return statistics.median(measured) / s["bytes_per_read"] if measured else None
    if not b or not b["samples_gbps"]:
        return None
    if metric == "seconds":
        return statistics.median(s["samples_s"]) / statistics.median(b["samples_s"])
    return s["median_gbps"] / b["median_gbps"] if b["median_gbps"] else None


def judge(result: dict[str, Any], goals: tuple[Goal, ...]) -> list[dict[str, Any]]:
    out = []
    for goal in goals:
        r = ratio(result, goal.scenario, goal.base, goal.metric)
        met = r is not None and (r <= goal.target if goal.at_most else r >= goal.target)
        status = "not measured" if r is None else "reported" if not goal.target else None
        out.append(goal.__dict__ | {"ratio": r, "status": status or ("met" if met else "not met")})
    return out


@dataclass(frozen=True)
class Preset:
    what: str
    scenarios: list[str] = field(default_factory=list)
    goals: tuple[Goal, ...] = ()
    goals_title: str = "goal"
    source: str = "local"  # the default --source
    cold_repeat: int | None = None  # the default --cold-repeat (None: --repeat)
    run: Callable[[argparse.Namespace], dict[str, Any]] | None = None  # its own runner
    smoke: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # of options it shares (None)


CORE = [
    "tmpfs",
    "reference",
    "memcachefs_cached",
    "memcachefs_cached_nopush",
    "memcachefs_repeat",
    "memcachefs_repeat_steady",
    "source_raw",
    "memcachefs_cold",
]
CORE_GOALS = goals("""
memcachefs_cached        reference  0.9 gbps cached, cold page cache >= 0.9x reference FUSE
memcachefs_cached_nopush reference  0.9 gbps (the same without the page-cache push) >= 0.9x reference
memcachefs_repeat        tmpfs      0.9 gbps repeat read >= 0.9x tmpfs
memcachefs_cold          source_raw 0.9 gbps cold read >= 0.9x raw source read
""")  # noqa: E501
SUITE = [n for n in SCENARIOS if n not in ("memcachefs_cached_nopush", "memcachefs_repeat_steady")]
SUITE_GOALS = goals("""
memcachefs_cached             reference         0.9 gbps cached, cold kernel cache >= 0.9x the reference FUSE fs
memcachefs_cached             tmpfs             0   gbps cached, cold kernel cache, against tmpfs (reported)
memcachefs_repeat             tmpfs             0.9 gbps repeat read >= 0.9x tmpfs
memcachefs_first_after_warmup tmpfs             0.8 gbps first read after a warm-up >= 0.8x tmpfs
memcachefs_safetensors        safetensors_tmpfs 0.5 gbps mmap safetensors load from cache >= 0.5x the same load from tmpfs
memcachefs_remote_hit         loopback_tcp      0.6 gbps remote hit >= 0.6x loopback TCP
memcachefs_cold               source_raw        0.9 gbps cold >= 0.9x the raw source
memcachefs_repeat             rclone_repeat     10  gbps repeat reads >= 10x rclone's repeat reads
memcachefs_cached             s3fs_cache_cached 2   gbps cached, cold kernel cache >= 2x s3fs use_cache cached
memcachefs_cold_3_instances   size          <=1.1 source_bytes 3 instances cold-loading one model read <= 1.1x its size (bytes the source sent)
memcachefs_cold_3_instances   memcachefs_cold_1_instance 0 seconds 3 instances together: wall time against one instance alone (reported)
""")  # noqa: E501


PRESETS: dict[str, Preset] = {
    "core": Preset("core throughput (issue 2 item 16)", CORE, CORE_GOALS),
    "suite": Preset(
        "the issue-4 suite: slow source, alternatives, peers",
        SUITE,
        SUITE_GOALS,
        "goal (issue 4 item 5)",
        source="s3",
        cold_repeat=3,
    ),
    "rss": Preset(
        "daemon RSS under pressure (issue 2 item 7): exits 1 over the bound",
        run=pressure,
        smoke={"capacity": 16 * MiB, "files": 4, "duration": 3.0},
        defaults={"capacity": 512 * MiB, "readers": 16},
    ),
    "switch": Preset(
        "model switch (issue 8 item 3): safetensors loads from the source, memcachefs cold, "
        "local and remote hits, tmpfs; every load verified (exits 1 on a mismatch)",
        source="s3",
        cold_repeat=3,
        run=switch.run,
        smoke={"sizes": [8 * MiB]},
    ),
    "metadata": Preset(
        "metadata at scale (issue 10 items 4, 5): ls -l, find -ls, ls | wc -l and xattrs of a "
        "directory of N empty files against the source; exits 1 if the peak RSS is over the bound",
        run=metabench.run,
        smoke={"entries": 2000, "capacity_cases": [4 * MiB, 16 * MiB], "blocks": 8 * MiB},
    ),
    "peerlink": Preset(
        "peers at link speed (issue 8 item 5): remote hits over a tbf-capped veth to a peer "
        "in a network namespace, against raw TCP over the same link (root)",
        cold_repeat=3,
        run=peerlink.run,
        smoke={"peer_rates": "1gbit"},
    ),
    "soak": Preset(
        "the soak (issue 10 item 12): verified sequential, pread and mmap readers on a "
        "3-instance cluster under version flips, killed readers and instances, a stalled "
        "source, connection floods and a memory cgroup; exits 1 if a contract check fails",
        run=soak.run,
        smoke={
            "capacity": 32 * MiB,
            "flip_interval": 1.0,
            "kill_interval": 2.0,
            "down_s": 2.0,
            "stall_s": 3.0,
            "flood_connections": 1000,
            "flood_s": 2.0,
            "quiet_s": 3.0,
        },
        defaults={"capacity": 128 * MiB, "readers": 6},
    ),
}


# -- the report ----------------------------------------------------------------------------
HEADER = ["scenario", "what", "median", "min", "max", "n", "x tmpfs", "x ceiling"]
HEADER += ["daemon peak RSS", "daemon CPU s/GiB"]


def scenario_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in result["order"]:
        s = result["scenarios"][name]
        if not s["samples_gbps"]:
            continue
        if s["unit"] == "ms":
            ms = [x * 1000 for x in s["samples_s"]]
            cells = [f"{statistics.median(ms):.2f} ms", f"{min(ms):.2f}", f"{max(ms):.2f}"]
            x_tmpfs = x_ceiling = "-"
        else:
            cells = [f"{s[k]:.3f}" for k in ("median_gbps", "min_gbps", "max_gbps")]
            cells[0] += " GB/s"
            x_tmpfs = fmt(ratio(result, name, "tmpfs"))
            x_ceiling = fmt(ratio(result, name, s["ceiling"] or ""), f"x {s['ceiling']}")
        peak = s["daemon_peak_rss_bytes"]
        cpu = s["cpu_s_per_gib"] if s["unit"] != "ms" else None
        rows.append(
            [
                name,
                s["what"],
                *cells,
                str(s["repetitions"]),
                x_tmpfs,
                x_ceiling,
                f"{peak / MiB:.0f} MiB" if peak else "-",
                fmt(cpu),
            ]
        )
    return rows


def observations(result: dict[str, Any]) -> list[str]:
    """What the counters say: bytes from the source, the peer, the page cache."""
    found, scenarios, size = [], result["scenarios"], result["size_bytes"]
    copy, copied = scenarios.get("shm_copy"), scenarios.get("shm_copy_read")
    if copy and copy["samples_s"] and copied and copied["samples_s"]:
        c, r = (statistics.median(s["samples_s"]) for s in (copy, copied))
        found.append(f"copy to /dev/shm then read: copy {c:.2f} s + read {r:.2f} s (medians)")
    for name in result["order"]:
        s, counters = scenarios[name], scenarios[name]["counters"]
        n, per_read = s["bytes_per_read"], "per read (namespace veth tx counter)"
        if counters.get("source_tx_bytes") and "source_raw" in (name, s["ceiling"]) and n:
            sent = ", ".join(f"{b / n:.3f}x" for b in counters["source_tx_bytes"])
            found.append(f"{name}: the source sent {sent} the file size {per_read}")
        if counters.get("source_requests") and "source_raw" in (name, s["ceiling"]) and n:
            requests = ", ".join(str(r) for r in counters["source_requests"])
            conns = ", ".join(str(c) for c in counters.get("source_connections", []))
            mib = statistics.median(counters["source_requests"])
            found.append(
                f"{name}: {requests} HTTP requests ({n / mib / MiB:.2f} MiB each, median) on "
                f"{conns} new connections per read (the object-store proxy's counters)"
            )
        if name.startswith("memcachefs_cold_") and counters.get("source_bytes"):
            read = ", ".join(f"{b / n:.3f}x" for b in counters["source_bytes"])
            walls = ", ".join(f"{x:.2f}" for x in s["samples_s"])
            found.append(f"{name}: wall {walls} s; the daemons read {read} the file size")
        if counters.get("peer_bytes") and name == "memcachefs_remote_hit":
            peer = ", ".join(f"{b / n:.3f}" for b in counters["peer_bytes"])
            source = ", ".join(str(b) for b in counters.get("source_bytes", []))
            found.append(
                f"{name}: bytes from the peer / file size {peer}; from the source {source}"
            )
        memory = counters.get("memory_bytes")
        if (
            memory
            and name in ("reference", "memcachefs_cached", "memcachefs_cached_nopush")
            and min(memory) < size
        ):
            found.append(
                f"{name}: some reads were partly served by the page cache (memcachefs pushes "
                "cached blocks into it on open, unless --no-page-cache-push)"
            )
        if memory and name.startswith("memcachefs_repeat") and max(memory) > size // 100:
            found.append(f"{name}: some repetitions reached the daemon (page cache dropped)")
    return found


def markdown(result: dict[str, Any]) -> str:
    if result["preset"] == "rss":
        return rss_markdown(result)
    if result["preset"] == "switch":
        return switch.markdown(result)
    if result["preset"] == "metadata":
        return metabench.markdown(result)
    if result["preset"] == "peerlink":
        return peerlink.markdown(result)
    if result["preset"] == "soak":
        return soak.markdown(result)
    load, src = result["load_average"], result["source"]
    source = {
        "local": f"a local directory ({src['dir']}): source_raw reads its disk, "
        + ("page cache dropped before each read" if result["global_drop_caches"] else "cached"),
        "s3": slowsource.describe(src),
    }.get(src["mode"], f"the directory {src['dir']}")
    model = f" and a {format_size(result['model_bytes'])}iB safetensors file" * bool(
        result["model_bytes"]
    )
    lines = [
        *lib.preamble(result),
        f"Source: {source}.",
        f"Files: {format_size(result['size_bytes'])}iB of random bytes{model}; sequential "
        f"reads with {result['buffer_bytes'] // 1024} KiB `readinto`; kernel readahead "
        f"{result['read_ahead_kb']} KiB; {result['repeat']} repetitions "
        f"({result['cold_repeat']} for the scenarios that read the source).",
        lib.describe_load(load),
        "",
        *table(
            HEADER,
            scenario_rows(result),
        ),
    ]
    if found := observations(result):
        lines += ["", *[f"- {line}" for line in found]]
    if result["goals"]:
        rows = [[g["text"], fmt(g["ratio"], "x"), g["status"]] for g in result["goals"]]
        lines += ["", *table([result["goals_title"], "measured", "status"], rows)]
    if result["notes"]:
        lines += ["", *[f"- {note}" for note in result["notes"]]]
    if result.get("switch"):
        lines += ["", switch.markdown(result["switch"], header=False).rstrip()]
        lines += [f"- {note}" for note in result["switch"]["notes"]]
    return "\n".join(lines) + "\n"


RSS_ROWS = """
capacity C | {capacity_bytes} MiB
working set | {files} files x {file_bytes} MiB = {factor:.1f} x C
readers | {readers} processes (half random, half sequential {read_kib} KiB reads), {duration_s:.0f} s
read through the daemon | {gib_read:.1f} GiB, {throughput_gbps:.2f} GB/s
hits / misses / evictions | {hits} / {misses} / {evictions}
daemon RSS idle | {rss_idle_bytes} MiB
daemon peak RSS (VmHWM / sampled VmRSS) | {peak_rss_hwm_bytes} / {peak_rss_sampled_bytes} MiB
bound 1.1 x C + 100 MiB | {bound_bytes} MiB
peak RSS / bound | {of_bound:.2f}
store: max used / max used+reserved+spare | {max_used_bytes} / {max_held_bytes} MiB
reader errors | {reader_errors}
result | {verdict}
"""  # noqa: E501


def rss_markdown(r: dict[str, Any]) -> str:
    values = r | r["stats_end"] | {k: round(v / MiB) for k, v in r.items() if k.endswith("bytes")}
    values |= {
        "factor": r["working_set_bytes"] / r["capacity_bytes"],
        "read_kib": r["read_bytes"] // 1024,
        "gib_read": r["bytes_read"] / lib.GiB,
        "of_bound": r["peak_rss_hwm_bytes"] / r["bound_bytes"],
        "verdict": "PASS" if r["ok"] else "FAIL",
    }
    rows = [line.format(**values).split(" | ") for line in RSS_ROWS.strip().splitlines()]
    start, end = (
        ", ".join(f"{x:.2f}" for x in r[k]) for k in ("load_average_start", "load_average_end")
    )
    lines = [
        f"Command: `{r['command']}`",
        "",
        lib.describe(r["machine"], r["code"]),
        f"Load average before the readers started: {start}; at the end (readers included): {end}.",
        "",
        *table(["", ""], rows),
    ]
    return "\n".join(lines) + "\n"


def plain_text(markdown: str) -> str:
    """The markdown with its tables as aligned columns, for a terminal."""
    out: list[str] = []
    rows: list[list[str]] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                rows.append(cells)
            continue
        if rows:
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            out += [
                "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                for row in rows
            ]
            rows.clear()
        out.append(line.replace("`", ""))
    return "\n".join(out).rstrip() + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    """Median GB/s per scenario (log scale) with min-max whiskers, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    except ImportError:
        lib.eprint("warning: no matplotlib (pip install -e '.[bench]'); no chart written")
        return
    items = [result["scenarios"][n] for n in result["order"][::-1]]
    items = [s for s in items if s["unit"] == "GB/s" and s["samples_gbps"]]
    if not items:
        return
    medians = [s["median_gbps"] for s in items]
    errors = [
        [m - s["min_gbps"] for m, s in zip(medians, items, strict=True)],
        [s["max_gbps"] - m for m, s in zip(medians, items, strict=True)],
    ]
    colors = ("tab:gray", "tab:blue", "tab:cyan", "tab:orange", "tab:green")
    palette = dict(zip(GROUPS, colors, strict=True))
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(items) + 1.5))
    colors = [palette[s["group"]] for s in items]
    ax.barh([s["name"] for s in items], medians, xerr=errors, capsize=3, color=colors)
    for y, (m, s) in enumerate(zip(medians, items, strict=True)):
        ax.text(s["max_gbps"], y, f" {m:.3g}", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    low = min(s["min_gbps"] for s in items if s["min_gbps"] > 0)
    ax.set_xlim(low / 2, max(s["max_gbps"] for s in items) * 2)
    ax.set_xlabel("GB/s (median, whiskers min-max, log scale)")
    src = result["source"]
    ax.set_title(
        f"memcachefs {result['preset']}: {result['size_bytes'] / MiB:.0f} MiB, source "
        f"{src['rate'] or 'uncapped' if src['mode'] == 's3' else src['mode']}"
        f"{' ' + src['profile'] if src.get('profile') == 'object-store' else ''}, "
        f"load {result['load_average']['median_1m']:.1f}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# -- running ---------------------------------------------------------------------------------
def run_scenarios(preset: Preset, args: argparse.Namespace) -> dict[str, Any]:
    names = [n for n in preset.scenarios if SCENARIOS[n].group not in args.skip]
    notes = []
    if args.source != "s3" and any(SCENARIOS[n].group == "alternatives" for n in names):
        names = [n for n in names if SCENARIOS[n].group != "alternatives"]
        notes.append("the alternatives (rclone, s3fs use_cache) need --source s3: not run")
    records = {n: Record(**SCENARIOS[n].__dict__) for n in names}
    bench = Bench(args, records)
    started, load_start = time.time(), lib.load_average()
    bench.run()
    loads = [la[0] for r in records.values() for la in r.load_average] or [0.0]
    notes += bench.notes
    if "memcachefs_first_after_warmup" in records:
        notes.append(
            "memcachefs_cold and memcachefs_cold_1_instance: sample 1 is the main daemon's own "
            "first (cold) read, the others fresh daemons; memcachefs_first_after_warmup is the "
            "read right after each cold read, by a new open()"
        )
    if any(records[n].group == "cluster" for n in names):
        notes.append(
            "daemon CPU and peak RSS: memcachefs_remote_hit sums instances A and B (max RSS), "
            "memcachefs_cold_3_instances the 3 daemons"
        )
    return {
        "size_bytes": bench.size,
        "model_bytes": bench.model_size,
        "buffer_bytes": args.buffer,
        "repeat": args.repeat,
        "cold_repeat": args.cold_repeat,
        "read_ahead_kb": args.read_ahead_kb,
        "global_drop_caches": bench.global_drop and os.geteuid() == 0,
        "source": {
            "mode": args.source if args.source in ("local", "s3") else "dir",
            "dir": str(bench.source),
            **slowsource.summary(bench.src),
        },
        "load_average": lib.load_summary(load_start, loads),
        "elapsed_s": round(time.time() - started, 1),
        "notes": notes,
        "scenarios": {name: record.summary() for name, record in records.items()},
        "order": names,  # the JSON file sorts its keys
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", choices=list(PRESETS))
    parser.add_argument("--list", action="store_true", help="list the presets and scenarios")
    add = parser.add_argument
    add("--size", help="size of each file (1G); switch: of each checkpoint (256M,1G,2G)")
    add("--switch-size", default="256M,1G,2G", help="suite: the switch part's checkpoints")
    add(
        "--peer-rates",
        default="1gbit,2gbit,4gbit,0",
        help="peerlink: the veth caps, tc syntax, 0: uncapped (1gbit,2gbit,4gbit,0)",
    )
    add("--repeat", type=int, help="repetitions of the fast scenarios (5; metadata: 3)")
    add("--cold-repeat", type=int, help="repetitions of those that read the source")
    add("--source", help="local (default), s3 (the slow source, root), or a directory")
    add("--source-file", default="data.bin", help="the data file's name in the source")
    add(
        "--rate",
        help=f"s3 source egress cap, tc syntax, 0: none ({DEFAULT_RATE}; object-store 2gbit)",
    )
    slowsource.add_profile_arguments(parser)
    add("--source-workdir", default="/var/tmp/memcachefs-slowsource", help="s3 work directory")
    add("--buffer", type=lib.size_arg, default=MiB, help="read size (1M)")
    add("--read-ahead-kb", type=int, default=1024, help="kernel readahead of the mounts")
    add("--memcachefs-arg", action="append", default=[], help="extra mount option (repeatable)")
    add("--skip", action="append", default=[], choices=GROUPS, help="skip a scenario group")
    add("--workdir", default="/var/tmp/memcachefs-bench", help="data, mounts, logs")
    add("--tmpfs-dir", default="/dev/shm", help="where the tmpfs copies go")
    add("--capacity", type=lib.size_arg, help="rss: cache capacity C (512M); soak: each (128M)")
    add("--working-set-factor", type=int, default=4, help="rss: working set / C")
    add("--files", type=int, default=8, help="rss: files in the working set")
    add("--readers", type=int, help="rss: reader processes (16); soak: (6)")
    add("--duration", type=float, default=30.0, help="rss: seconds of reading")
    add("--read-size", type=lib.size_arg, default=MiB, help="rss: bytes per read")
    add("--entries", type=int, default=100_000, help="metadata: files in the directory")
    add(
        "--steps",
        type=_metadata_steps,
        default=list(metabench.STEPS),
        help="metadata: the steps timed (" + ",".join(metabench.STEPS) + ")",
    )
    add(
        "--capacity-cases",
        type=lambda text: [lib.size_arg(x) for x in text.split(",") if x.strip()],
        default=[4 * MiB, 256 * MiB],
        help="metadata: the capacities mounted, one case each (4M,256M)",
    )
    add(
        "--blocks",
        type=lib.size_arg,
        default=88 * MiB,
        help="metadata: bytes of blocks read first where the capacity holds them (88M)",
    )
    add("--minutes", type=float, default=30.0, help="soak: minutes of load (30)")
    add("--flip-interval", type=float, default=2.0, help="soak: seconds between new versions")
    add("--kill-interval", type=float, default=5.0, help="soak: seconds between reader kills")
    add("--down", dest="down_s", type=float, default=5.0, help="soak: seconds an instance is dead")
    add("--stall", dest="stall_s", type=float, default=8.0, help="soak: seconds of a stall")
    add("--flood-connections", type=int, default=4000, help="soak: half idle, half garbage")
    add("--flood-hold", dest="flood_s", type=float, default=10.0, help="soak: seconds held")
    add("--quiet", dest="quiet_s", type=float, default=20.0, help="soak: seconds between faults")
    add("--memory-limit", type=lib.size_arg, help="soak: each daemon's cgroup (capacity + 192M)")
    add("--seed", type=int, default=0, help="soak: the random choices")
    add("--json", type=Path, help="write every sample here")
    add("--png", type=Path, help="write a chart here (needs the 'bench' extra)")
    add("--markdown", type=Path, help="write the README results text here")
    add("--keep", action="store_true", help="keep the generated files")
    add("--smoke", action="store_true", help="16 MiB, 1 repetition, local source, no drop_caches")
    args = parser.parse_args(argv)
    if not args.list and not args.preset:
        parser.error("name a preset, or --list")
    preset = PRESETS[args.preset or "core"]
    for name, value in preset.defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.source = args.source or ("local" if args.smoke else preset.source)
    args.repeat = args.repeat or (3 if args.preset == "metadata" else 5)
    try:
        sizes = [lib.size_arg(x) for x in (args.size or "").split(",") if x.strip()]
        args.switch_sizes = [lib.size_arg(x) for x in args.switch_size.split(",") if x.strip()]
    except argparse.ArgumentTypeError as error:
        parser.error(f"--size: {error}")
    if args.preset == "switch":
        args.switch_sizes = sizes or args.switch_sizes
    elif len(sizes) > 1:
        parser.error("several sizes (--size A,B) are for the switch preset")
    args.size = sizes[0] if sizes else lib.GiB
    args.sizes = args.switch_sizes
    if args.smoke:
        args.size, args.repeat, args.cold_repeat = 16 * MiB, 1, 1
        args.sizes = args.switch_sizes = [8 * MiB]
        vars(args).update(preset.smoke)
    args.cold_repeat = args.cold_repeat or preset.cold_repeat or args.repeat
    if args.repeat < 1 or args.cold_repeat < 1:
        parser.error("--repeat and --cold-repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, preset in PRESETS.items():
            listed = preset.scenarios or (list(switch.PLACES) if name == "switch" else [])
            print(f"{name}: {preset.what}\n  " + (" ".join(listed) or "-"))
        for name, spec in SCENARIOS.items():
            print(f"{name:<30} {spec.group:<12} x {spec.ceiling or '-':<18} {spec.what}")
        return 0
    preset = PRESETS[args.preset]
    if problem := fuse_available():
        lib.eprint(f"error: {problem}")
        return 2
    if args.profile != "link" and args.source != "s3":
        lib.eprint("error: --profile is a profile of the S3 slow source: add --source s3")
        return 2
    if args.source == "s3" and os.geteuid() != 0:
        lib.eprint("error: the S3 slow source needs root (or pass --source local)")
        return 2
    command = " ".join(["python benchmarks/run.py", *(argv or sys.argv[1:])])
    code = lib.code_version()  # at the start: the daemons run the working tree
    try:
        with lib.signals(lib.interrupt):
            result = (preset.run or (lambda a: run_scenarios(preset, a)))(args)
            if args.preset == "suite" and "switch" not in args.skip:
                lib.eprint("the suite's model-switch part")
                result["switch"] = switch.run(args)
    except KeyboardInterrupt:
        lib.eprint("interrupted: everything was torn down")
        return 130
    except (RuntimeError, SlowSourceError) as error:  # a daemon or the source did not start
        lib.eprint(f"error: {error}")
        return 2
    result |= {"preset": args.preset, "command": command, "smoke": args.smoke, "code": code}
    result |= {"machine": lib.machine(), "load_average_end": lib.load_average()}
    result |= {"goals": judge(result, preset.goals), "goals_title": preset.goals_title}
    if result.get("switch"):  # the suite's switch part: its goals, and its verdict
        result["switch"] |= {"command": command, "code": code, "machine": result["machine"]}
        result["ok"] = result["switch"]["ok"]
    if args.json:
        write_json(args.json, result)
    if args.png and result.get("order"):
        chart(result, args.png)
    text = markdown(result)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    print(plain_text(text))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
