"""How each registered scenario is measured: the phases of one run, and the RSS check.

`Bench` runs the scenarios a preset picks (see ``run.py``'s registry), in phases
chosen so that the source reads come first (s3fs serves a file from its own
memory while any descriptor of it is open, so nothing else may hold it then) and
the fast scenarios are interleaved repetition by repetition (drift in the
machine's load hits them alike). A scenario that is not picked is skipped where
it would run.
"""

# The lambdas handed to Bench.measure() run before it returns: loop variables are safe.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lib
import slowsource
from lib import MiB, Sample
from memcachefs.testing.harness import MountedFS, mount
from slowsource import SlowSource

MODEL_SCENARIOS = {
    "safetensors_tmpfs",
    "memcachefs_safetensors",
    "memcachefs_cold_1_instance",
    "memcachefs_cold_3_instances",
}


@dataclass
class Record:
    """The repetitions of one scenario and what the daemons spent on them."""

    name: str
    group: str
    what: str
    ceiling: str | None
    unit: str
    samples_s: list[float] = field(default_factory=list)
    samples_gbps: list[float] = field(default_factory=list)
    bytes_per_read: int = 0
    daemon_cpu_s: list[float] = field(default_factory=list)
    daemon_peak_rss_bytes: int | None = None
    # per repetition: memory_bytes / source_bytes / peer_bytes (daemon counters) and
    # source_tx_bytes (what the slow source sent)
    counters: dict[str, list[int]] = field(default_factory=dict)
    load_average: list[list[float]] = field(default_factory=list)
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        gbps, n = self.samples_gbps, self.bytes_per_read
        cpu = statistics.median(self.daemon_cpu_s) / (n / lib.GiB) if self.daemon_cpu_s else None
        return asdict(self) | {
            "median_gbps": statistics.median(gbps) if gbps else 0.0,
            "min_gbps": min(gbps, default=0.0),
            "max_gbps": max(gbps, default=0.0),
            "repetitions": len(gbps),
            "cpu_s_per_gib": cpu if n else None,
        }


class Bench:
    def __init__(self, args: argparse.Namespace, records: dict[str, Record]) -> None:
        self.args = args
        self.records = records
        self.size = args.size
        self.work = Path(args.workdir).absolute()
        self.shm = Path(args.tmpfs_dir) / f"memcachefs-bench-{os.getpid()}"
        self.global_drop = not args.smoke
        self.notes: list[str] = []
        self.mounts: list[MountedFS] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.src: SlowSource | None = None
        self.created: list[Path] = []
        self.data = args.source_file
        self.model = "model.safetensors"
        self.model_size = 0
        self.with_model = bool(MODEL_SCENARIOS & set(records))
        self.source, self.capacity = self.work / "data", ""  # set by prepare()
        self.secret: Path | None = None  # the cluster secret (mode 0600), made when needed

    # -- helpers
    def wants(self, name: str) -> bool:
        return name in self.records

    def read(self, path: Path) -> Callable[[], Sample]:
        return lambda: lib.read_file(path, self.args.buffer)

    def measure(
        self,
        name: str,
        operation: Callable[[], Sample],
        *,
        drop: Path | None = None,
        daemons: Sequence[MountedFS] = (),
        pids: Sequence[int] = (),
        counters: Callable[[], dict[str, int]] | None = None,
    ) -> Sample | None:
        """One repetition: prepare, time, record the daemons' CPU, peak RSS and bytes."""
        if name not in self.records:
            return None
        record = self.records[name]
        if drop:
            lib.drop_page_cache(drop, global_drop=self.global_drop)
        pids = [*pids, *(d.pid for d in daemons)]
        if daemons and not counters:
            counters = functools.partial(lib.daemon_counters, *daemons)
        cpu0 = sum(lib.cpu_seconds(pid) for pid in pids)
        counters0 = counters() if counters else {}
        tx0 = self.src.tx_bytes() if self.src else None
        proxy0 = self.src.proxy_counters() if self.src else {}
        sample = operation()
        if tx0 is not None and self.src:
            record.counters.setdefault("source_tx_bytes", []).append(self.src.tx_bytes() - tx0)
            for key, value in self.src.proxy_counters().items():  # object-store profile
                if key in proxy0:
                    record.counters.setdefault(f"source_{key}", []).append(value - proxy0[key])
        if pids:
            record.daemon_cpu_s.append(sum(lib.cpu_seconds(pid) for pid in pids) - cpu0)
            peak = max(lib.proc_bytes("VmHWM", pid) for pid in pids)
            record.daemon_peak_rss_bytes = max(record.daemon_peak_rss_bytes or 0, peak) or None
        for key, value in (counters() if counters else {}).items():
            record.counters.setdefault(key, []).append(value - counters0.get(key, 0))
        record.samples_s.append(sample.seconds)
        record.samples_gbps.append(sample.gbps)
        record.bytes_per_read = sample.bytes
        record.load_average.append(lib.load_average())
        shown = (
            f"{sample.seconds * 1000:8.2f} ms"
            if record.unit == "ms"
            else f"{sample.gbps:8.3f} GB/s ({sample.seconds:.2f} s)"
        )
        lib.eprint(f"  {name:<32} {shown}")
        return sample

    def mount(self, name: str, args: Sequence[str] = ()) -> MountedFS:
        mountpoint = self.work / "mnt" / name
        mountpoint.mkdir(parents=True, exist_ok=True)
        mounted = mount(
            self.source,
            mountpoint,
            capacity=self.capacity,
            args=[
                f"--kernel-read-ahead={self.args.read_ahead_kb}K",
                *args,
                *self.args.memcachefs_arg,
            ],
            log_path=self.work / f"{name}.log",
        )
        self.mounts.append(mounted)
        return mounted

    def unmount(self, mounted: MountedFS) -> None:
        problems = mounted.problems()
        mounted.unmount()
        self.mounts.remove(mounted)
        with contextlib.suppress(OSError):
            mounted.path.rmdir()
        if problems:
            self.notes.append(f"{mounted.path.name} daemon log: {problems[:3]}")

    def fresh(self, name: str, args: Sequence[str] = ()) -> contextlib.AbstractContextManager[Any]:
        """A daemon for one block of reads: `with self.fresh("x") as m:`."""

        @contextlib.contextmanager
        def scope() -> Any:
            mounted = self.mount(name, args)
            try:
                yield mounted
            finally:
                self.unmount(mounted)

        return scope()

    # -- phases
    def prepare(self, stack: contextlib.ExitStack) -> None:
        """The files (random bytes, and a safetensors model if wanted) and the source."""
        mode = self.args.source
        folder = self.work / "data" if mode in ("local", "s3") else Path(mode).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        self.shm.mkdir(parents=True)
        writers = [(self.data, lib.write_test_file)]
        if self.with_model:
            writers.append((self.model, lib.write_safetensors))
        for name, write in writers:
            if mode in ("local", "s3") or not (folder / name).exists():
                lib.eprint(f"writing {folder / name} ({self.size} bytes)")
                self.created.append(write(folder / name, self.size))
            shutil.copyfile(folder / name, self.shm / name)
        if self.with_model:
            self.model_size = (folder / self.model).stat().st_size
        self.size = (folder / self.data).stat().st_size
        held = self.size + self.model_size  # the main daemon holds both files, and a quarter more
        self.capacity = str(max(held + self.size // 4, 64 * MiB) // MiB * MiB)
        os.sync()
        if mode == "s3":
            files = [folder / name for name, _ in writers]
            workdir = Path(self.args.source_workdir)
            self.src = stack.enter_context(
                SlowSource(
                    files, rate=self.args.rate, workdir=workdir, **slowsource.profile(self.args)
                )
            )
            self.source = self.src.mountpoint
        else:
            self.source = folder
        lib.eprint(f"source: {self.source}")

    def source_reads(self) -> None:
        source = self.source / self.data
        copy = self.shm / "copy-of-source.bin"
        for rep in range(self.args.cold_repeat):
            lib.eprint(f"source reads {rep + 1}/{self.args.cold_repeat}")
            self.measure("source_raw", self.read(source), drop=source)
            if self.measure("shm_copy", lambda: lib.copy_file(source, copy), drop=source):
                self.measure("shm_copy_read", self.read(copy))
                copy.unlink()
            self.measure("ttfb_source", lambda: lib.first_byte(source))

    def cold_read(self, daemon: MountedFS) -> None:
        """A fresh daemon reads the data file (cold), then a new open() reads it again."""
        path = daemon.path / self.data
        if not self.measure("memcachefs_cold", self.read(path), daemons=[daemon]):
            lib.read_file(path)  # the warm-up the cached scenarios need
        self.measure("memcachefs_first_after_warmup", self.read(path), daemons=[daemon])

    def in_memory(self) -> None:
        """The main daemon's cold read, then every fast scenario, interleaved."""
        ref_mp, reference = self.work / "mnt" / "reference", None
        groups = {record.group for record in self.records.values()}
        main = nopush = None
        try:
            if self.wants("reference"):
                log = self.work / "reference.log"
                reference = lib.start_reference(
                    ref_mp, self.shm / self.data, self.args.read_ahead_kb, log
                )
                self.processes.append(reference)
            if "memcachefs" in groups:
                main = self.mount("main")
                lib.eprint("main daemon: cold read (sample 1 of the cold scenarios)")
                self.cold_read(main)
                if self.with_model:
                    model = main.path / self.model
                    if not self.measure(
                        "memcachefs_cold_1_instance", self.read(model), daemons=[main]
                    ):
                        lib.read_file(model)
            if self.wants("memcachefs_cached_nopush"):
                nopush = self.mount("nopush", ["--no-page-cache-push"])
                lib.read_file(nopush.path / self.data)
            for daemon in (d for d in (main, nopush) if d):
                if daemon.stats()["used_bytes"] < self.size + self.model_size * (daemon is main):
                    self.notes.append(f"warning: {daemon.path.name} does not hold every file")
            tmpfs_data, tmpfs_model, ref_file = (
                self.shm / self.data,
                self.shm / self.model,
                ref_mp / self.data,
            )
            for rep in range(self.args.repeat):
                lib.eprint(
                    f"fast scenarios {rep + 1}/{self.args.repeat} (load {lib.load_average()})"
                )
                self.measure("tmpfs", self.read(tmpfs_data))
                self.measure("loopback_tcp", lambda: lib.loopback_tcp(self.size))
                if reference:
                    counters = functools.partial(lib.reference_counters, ref_mp)
                    self.measure(
                        "reference",
                        self.read(ref_file),
                        drop=ref_file,
                        pids=[reference.pid],
                        counters=counters,
                    )
                self.measure("safetensors_tmpfs", lambda: lib.load_safetensors(tmpfs_model))
                if nopush:  # first: its drop_caches would empty what memcachefs_repeat reads
                    path = nopush.path / self.data
                    self.measure(
                        "memcachefs_cached_nopush",
                        self.read(path),
                        drop=path,
                        daemons=[nopush],
                    )
                if not main:
                    continue
                data, model = main.path / self.data, main.path / self.model
                self.measure("memcachefs_cached", self.read(data), drop=data, daemons=[main])
                self.measure("memcachefs_repeat", self.read(data), daemons=[main])
                self.measure("memcachefs_repeat_steady", self.read(data), daemons=[main])
                self.measure(
                    "memcachefs_safetensors",
                    lambda: lib.load_safetensors(model),
                    drop=model,
                    daemons=[main],
                )
                self.measure(
                    "memcachefs_random_4m",
                    lambda: lib.random_preads(data, seed=rep),
                    drop=data,
                    daemons=[main],
                )
                self.measure(
                    "memcachefs_ttfb_warm",
                    lambda: lib.first_byte(data),
                    drop=data,
                    daemons=[main],
                )
        finally:
            for daemon in (d for d in (main, nopush) if d):
                self.unmount(daemon)
            if reference:
                lib.stop(reference)
                self.processes.remove(reference)
            lib.unmount_below(self.work / "mnt")

    def cold(self) -> None:
        """Further cold reads on fresh daemons, and cold time to first byte."""
        for rep in range(1, self.args.cold_repeat if self.wants("memcachefs_cold") else 0):
            lib.eprint(f"memcachefs cold {rep + 1}/{self.args.cold_repeat}")
            with self.fresh(f"cold-{rep}") as daemon:
                self.cold_read(daemon)
        for rep in range(self.args.cold_repeat if self.wants("memcachefs_ttfb_cold") else 0):
            with self.fresh(f"ttfb-{rep}") as daemon:
                path = daemon.path / self.data
                self.measure(
                    "memcachefs_ttfb_cold", lambda: lib.first_byte(path), pids=[daemon.pid]
                )

    def peering(self, port: int, *peers: int) -> list[str]:
        """memcachefs options: listen on `port` of loopback, ask `peers`, one shared secret."""
        asks = [arg for peer in peers for arg in ("--peer", f"127.0.0.1:{peer}")]
        if self.secret is None:
            self.secret = lib.secret_file(self.work)
            self.created.append(self.secret)
        return ["--listen", f"127.0.0.1:{port}", *asks, "--cluster-secret-file", str(self.secret)]

    def cluster(self) -> None:
        if self.wants("memcachefs_remote_hit"):
            port = lib.free_port()
            with self.fresh("peer-a", self.peering(port)) as holder:
                lib.eprint("remote hit: instance A reads the file once (from the source)")
                lib.read_file(holder.path / self.data)
                for rep in range(self.args.repeat):
                    with self.fresh(f"peer-b-{rep}", self.peering(lib.free_port(), port)) as b:
                        path = b.path / self.data
                        self.measure(
                            "memcachefs_remote_hit", self.read(path), pids=[holder.pid], daemons=[b]
                        )
        for rep in range(self.args.cold_repeat if self.wants("memcachefs_cold_3_instances") else 0):
            lib.eprint(f"3 instances cold-load the model {rep + 1}/{self.args.cold_repeat}")
            ports = [lib.free_port() for _ in range(3)]
            with contextlib.ExitStack() as stack:
                group = [
                    stack.enter_context(
                        self.fresh(f"trio-{rep}-{i}", self.peering(*ports[i:], *ports[:i]))
                    )
                    for i in range(len(ports))
                ]
                self.measure(
                    "memcachefs_cold_3_instances", lambda: self.together(group), daemons=group
                )
            if rep and self.wants("memcachefs_cold_1_instance"):  # the main daemon gave sample 1
                with self.fresh(f"alone-{rep}") as alone:
                    path = alone.path / self.model
                    self.measure("memcachefs_cold_1_instance", self.read(path), daemons=[alone])

    def together(self, group: list[MountedFS]) -> Sample:
        """Every instance reads the model at once; wall time until the last one is done."""
        barrier = threading.Barrier(len(group))

        def read(daemon: MountedFS) -> Sample:
            barrier.wait()
            return lib.read_file(daemon.path / self.model, self.args.buffer)

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(group)) as pool:
            results = list(pool.map(read, group))  # raises what a reader raised
        wall = time.perf_counter() - start
        extra = self.records["memcachefs_cold_3_instances"].extra
        extra.setdefault("per_instance_gbps", []).append([r.gbps for r in results])
        return Sample(self.model_size, wall)

    def alternatives(self) -> None:
        for label in ("rclone", "s3fs_cache"):
            if not self.wants(f"{label}_cold") or self.src is None:
                continue
            lib.eprint(f"alternative: {label}")
            try:
                alt = self.src.alternative(label)
            except RuntimeError as error:
                self.notes.append(f"{label}: {error}")
                continue
            with alt:
                path, pid = alt.mountpoint / self.data, alt.pids
                for _rep in range(self.args.cold_repeat):
                    alt.clear_cache()
                    self.measure(f"{label}_cold", self.read(path), drop=path, pids=pid())
                for _rep in range(self.args.repeat):  # the last cold read filled its cache
                    self.measure(f"{label}_cached", self.read(path), drop=path, pids=pid())
                    self.measure(f"{label}_repeat", self.read(path), pids=pid())
                self.records[f"{label}_cached"].extra["cache_dir_bytes"] = [alt.cache_bytes()]

    def run(self) -> None:
        with contextlib.ExitStack() as stack:
            try:
                self.prepare(stack)
                self.source_reads()
                self.in_memory()
                self.cold()
                self.cluster()
                self.alternatives()
            finally:
                with lib.signals(signal.SIG_IGN):
                    for mounted in list(self.mounts):
                        mounted.unmount()
                    for process in self.processes:
                        lib.stop(process)
                    lib.unmount_below(self.work / "mnt")
                    stack.close()  # the slow source, below our mounts
                    shutil.rmtree(self.shm, ignore_errors=True)
                    shutil.rmtree(self.work / "mnt", ignore_errors=True)
                    for path in self.created if not self.args.keep else []:
                        path.unlink(missing_ok=True)


# -- the rss preset: daemon memory under pressure ----------------------------------------
def _reader(number: int, files: list[str], read_size: int, stop: Any, out: Any) -> None:
    """Read until `stop` (odd numbers sequential, even random), dropping what was read
    from the page cache so that the reads keep reaching the daemon."""
    rng, buf, done, sequential = random.Random(number), bytearray(read_size), 0, number % 2
    try:
        while not stop.is_set():
            fd = os.open(rng.choice(files), os.O_RDONLY)
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
        lib.eprint(f"reader {number}: {error}")
        with out.get_lock():
            out[1] += 1
    with out.get_lock():
        out[0] += done


def pressure(args: argparse.Namespace) -> dict[str, Any]:
    """A mount of capacity C over 4 x C of files; 16 readers; sample VmRSS and the store."""
    capacity = args.capacity
    file_size = capacity * args.working_set_factor // args.files // MiB * MiB
    bound = int(1.1 * capacity) + 100 * MiB
    work = Path(args.workdir).absolute()
    source, mountpoint = work / "rss-source", work / "rss-mnt"
    source.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(exist_ok=True)
    names = [f"part-{i:02d}.bin" for i in range(args.files)]
    for i, name in enumerate(names):
        lib.write_test_file(source / name, file_size, seed=i)
    ctx = multiprocessing.get_context("fork")
    stop, out = ctx.Event(), ctx.Array("q", 2)  # bytes read, reader errors
    rss_samples: list[tuple[float, int]] = []
    stats: list[dict[str, Any]] = []
    readers: list[Any] = []
    mounted = None
    try:
        mounted = mount(
            source,
            mountpoint,
            capacity=str(capacity),
            args=["--kernel-read-ahead", f"{args.read_ahead_kb}K", *args.memcachefs_arg],
        )
        pid, files = mounted.pid, [str(mountpoint / name) for name in names]
        rss_idle, load_start = lib.proc_bytes("VmRSS", pid), lib.load_average()
        for number in range(args.readers):
            reader_args = (number, files, args.read_size, stop, out)
            readers.append(ctx.Process(target=_reader, args=reader_args, daemon=True))
            readers[-1].start()
        started, cpu0 = time.monotonic(), lib.cpu_seconds(pid)
        next_stats = started
        while (now := time.monotonic()) - started < args.duration:
            rss_samples.append((round(now - started, 3), lib.proc_bytes("VmRSS", pid)))
            if now >= next_stats:
                stats.append(mounted.stats())
                next_stats = now + 0.5
            time.sleep(0.1)
        stop.set()
        for reader in readers:
            reader.join(timeout=30)
        elapsed, cpu_s = time.monotonic() - started, lib.cpu_seconds(pid) - cpu0
        stats.append(mounted.stats())
        peak_hwm, problems = lib.proc_bytes("VmHWM", pid), mounted.problems()
    finally:
        stop.set()
        for reader in readers:
            if reader.is_alive():
                reader.kill()
                reader.join()
        if mounted is not None:
            mounted.unmount()
        lib.unmount_below(work)
        if not args.keep:
            shutil.rmtree(source, ignore_errors=True)
    max_used = max(s["used_bytes"] for s in stats)
    max_held = max(
        s["used_bytes"] + s.get("reserved_bytes", 0) + s.get("free_buffer_bytes", 0) for s in stats
    )
    checks = {
        "peak_rss_within_bound": peak_hwm <= bound,
        "used_bytes_within_capacity": max_used <= capacity,
        "held_bytes_within_capacity": max_held <= capacity,
        "no_reader_errors": out[1] == 0,
        "evicted": stats[-1].get("evictions", 0) > 0,
    }
    return {
        "load_average_start": load_start,
        "capacity_bytes": capacity,
        "bound_bytes": bound,
        "files": args.files,
        "file_bytes": file_size,
        "working_set_bytes": file_size * args.files,
        "readers": args.readers,
        "read_bytes": args.read_size,
        "duration_s": elapsed,
        "bytes_read": out[0],
        "throughput_gbps": out[0] / elapsed / lib.GB,
        "daemon_cpu_s": cpu_s,
        "rss_idle_bytes": rss_idle,
        "peak_rss_sampled_bytes": max(r for _, r in rss_samples),
        "peak_rss_hwm_bytes": peak_hwm,
        "max_used_bytes": max_used,
        "max_held_bytes": max_held,
        "reader_errors": out[1],
        "daemon_log_problems": problems[:10],
        "stats_end": stats[-1],
        "rss_samples": rss_samples,
        "checks": checks,
        "ok": all(v for k, v in checks.items() if k != "evicted"),
    }
