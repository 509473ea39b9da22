"""The model-switch benchmark: safetensors checkpoints loaded from each place a model can be.

For each checkpoint size (``--size 256M,1G,2G``) and each loader
(``safetensors.numpy.load_file``; ``safe_open`` tensor by tensor in a shuffled
order; ``safetensors.torch.load_file`` when torch is installed), the time of a
whole load:

* ``source``: the source mount directly (page cache dropped);
* ``cold``: a fresh memcachefs daemon, every block from the source;
* ``local_cold``: a local hit, the daemon holds the file, page cache dropped;
* ``local_warm``: a local hit again, right after (page cache warm);
* ``remote``: a fresh instance whose peer (the main daemon, on loopback) holds it;
* ``tmpfs``: the file in /dev/shm.

``safe_open`` in file order is also timed cold, as the base of the shuffled-order
goal. Every load is hashed (SHA-256 of each tensor's name, dtype, shape and
bytes), outside the timed window, and compared with a first, untimed load of the
same file from tmpfs: a mismatch fails the run (exit 1). The tmpfs loads are
timed interleaved with the local hits, repetition by repetition.
"""

# The lambdas handed to measure() run before it returns: loop variables are safe.

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import lib
import slowsource
from lib import MiB, fmt, table
from memcachefs.testing.harness import MountedFS
from scenarios import Record
from slowsource import SlowSource

# place, column title, what
PLACES = {
    "source": ("source mount", "the source mount directly, page cache dropped"),
    "cold": ("memcachefs cold", "a fresh daemon: every block from the source"),
    "local_cold": ("local hit (cold page cache)", "the daemon holds the file; page cache dropped"),
    "local_warm": ("local hit (warm page cache)", "the same, right after (page cache warm)"),
    "remote": ("remote hit", "a fresh instance whose peer holds the file (loopback)"),
    "tmpfs": ("tmpfs", "the file in /dev/shm"),
}
LOADERS = {
    "load_file": "safetensors.numpy.load_file",
    "safe_open_shuffled": 'safe_open(framework="numpy"), get_tensor in a shuffled order',
    "torch_load_file": "safetensors.torch.load_file",
    "safe_open_file_order": 'safe_open(framework="numpy"), get_tensor in file order (cold only)',
}
# loader, place, base place, target, the goal's text; the base's loader is the same,
# except for the shuffled-order goal (base: safe_open in file order)
GOALS = (
    ("local_cold", "tmpfs", 0.8, "local hit (cold page cache) >= 0.8x tmpfs"),
    ("cold", "source", 0.97, "cold load >= 0.97x the source mount's own load"),
    ("remote", "local_cold", 0.5, "remote hit >= 0.5x local hit (cold page cache)"),
)
SHUFFLED_GOAL = "shuffled-order cold load >= 0.9x the file-order cold load"


def size_label(size: int) -> str:
    """256M, 1G, 1536M: the size as --size writes it."""
    for unit, n in (("G", lib.GiB), ("M", MiB), ("K", 1024)):
        if size % n == 0:
            return f"{size // n}{unit}"
    return str(size)


def name(loader: str, size: int, place: str) -> str:
    return f"{loader} {size_label(size)} {place}"


# -- checkpoints --------------------------------------------------------------------------
def layout(size: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of a transformer-like checkpoint of about `size` bytes.

    A 64 MiB F16 embedding (smaller for small files), then layers of four F16
    attention matrices, three F16 MLP matrices and two F32 norms, and a final norm.
    """
    hidden = 2048 if size >= 256 * MiB else 512 if size >= 16 * MiB else 256
    vocab = 16384 if hidden == 2048 else 4096
    mlp = hidden * 11 // 8
    layer = 4 * hidden * hidden * 2 + 3 * hidden * mlp * 2 + 2 * hidden * 4
    embed = vocab * hidden * 2
    tensors: list[tuple[str, str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", "F16", (vocab, hidden))
    ]
    for i in range(max(1, round((size - embed) / layer))):
        p = f"model.layers.{i}"
        tensors += [(f"{p}.input_layernorm.weight", "F32", (hidden,))]
        for m in ("q", "k", "v", "o"):
            tensors.append((f"{p}.self_attn.{m}_proj.weight", "F16", (hidden, hidden)))
        tensors += [(f"{p}.post_attention_layernorm.weight", "F32", (hidden,))]
        tensors += [(f"{p}.mlp.gate_proj.weight", "F16", (mlp, hidden))]
        tensors += [(f"{p}.mlp.up_proj.weight", "F16", (mlp, hidden))]
        tensors += [(f"{p}.mlp.down_proj.weight", "F16", (hidden, mlp))]
    return [*tensors, ("model.norm.weight", "F32", (hidden,))]


def write_checkpoint(path: Path, size: int, *, seed: int = 7) -> Path:
    """A valid safetensors file (safetensors.numpy.save_file) of random tensors."""
    from safetensors.numpy import save_file

    spec = layout(size)
    total = sum(int(np.prod(shape)) * (2 if dt == "F16" else 4) for _, dt, shape in spec)
    stream = lib.test_chunks(total, seed=seed)
    pool, tensors = np.empty(0, np.uint8), {}
    for key, dtype, shape in spec:
        n = int(np.prod(shape)) * (2 if dtype == "F16" else 4)
        while pool.size < n:
            pool = np.concatenate([pool, next(stream)])
        raw, pool = pool[:n].copy(), pool[n:]
        tensors[key] = raw.view(np.float16 if dtype == "F16" else np.float32).reshape(shape)
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata={"format": "np", "by": "memcachefs benchmarks"})
    os.replace(tmp, path)
    return path


def file_order(path: Path) -> list[str]:
    """The tensors' names by offset in the file (the header is 8 bytes of length + JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda key: header[key]["data_offsets"][0])


# -- loaders: each returns the tensors; the time is taken around it --------------------------
def load(loader: str, path: Path, order: Sequence[str], seed: int) -> dict[str, Any]:
    if loader == "load_file":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if loader == "torch_load_file":
        from safetensors.torch import load_file as torch_load

        return torch_load(str(path))
    from safetensors import safe_open

    keys = list(order)
    if loader == "safe_open_shuffled":
        random.Random(seed).shuffle(keys)
    with safe_open(str(path), framework="numpy") as f:
        return {key: f.get_tensor(key) for key in keys}


def digest(tensors: dict[str, Any]) -> str:
    """SHA-256 over every tensor (sorted by name): name, dtype, shape, bytes."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        if not isinstance(value, np.ndarray):  # a torch tensor
            value = value.numpy()
        array = np.ascontiguousarray(value)
        h.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def torch_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# -- the run ------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    size: int  # as asked (--size)
    file: str
    bytes: int = 0  # as written
    order: tuple[str, ...] = ()
    reference: str = ""  # the digest of the tmpfs load_file


class Switch:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir).absolute()
        self.shm = Path(args.tmpfs_dir) / f"memcachefs-switch-{os.getpid()}"
        self.global_drop = not args.smoke
        self.loaders = ["load_file", "safe_open_shuffled"] + ["torch_load_file"] * bool(
            torch_available()
        )
        self.checkpoints = [
            Checkpoint(size, f"model-{size_label(size)}.safetensors") for size in args.sizes
        ]
        self.records: dict[str, Record] = {}
        self.mismatches: list[str] = []
        self.notes: list[str] = []
        self.mounts: list[MountedFS] = []
        self.created: list[Path] = []
        self.src: SlowSource | None = None
        self.source, self.capacity, self.secret = self.work / "data", "", Path()

    # -- helpers
    def record(self, loader: str, ckpt: Checkpoint, place: str) -> Record:
        key = name(loader, ckpt.size, place)
        if key not in self.records:
            what = f"{LOADERS[loader]}: {PLACES[place][1]}"
            self.records[key] = Record(key, "switch", what, None, "GB/s")
            self.records[key].extra = {"loader": [loader], "size": [ckpt.size], "place": [place]}
        return self.records[key]

    def measure(
        self,
        loader: str,
        ckpt: Checkpoint,
        place: str,
        path: Path,
        *,
        seed: int = 0,
        drop: bool = False,
        daemons: Sequence[MountedFS] = (),
        pids: Sequence[int] = (),
    ) -> None:
        """One timed load; its digest checked against the reference, outside the time."""
        record = self.record(loader, ckpt, place)
        if drop:
            lib.drop_page_cache(path, global_drop=self.global_drop)
        pids = [*pids, *(d.pid for d in daemons)]
        cpu0 = sum(lib.cpu_seconds(pid) for pid in pids)
        counters0 = lib.daemon_counters(*daemons) if daemons else {}
        tx0 = self.src.tx_bytes() if self.src else None
        proxy0 = self.src.proxy_counters() if self.src else {}
        start = time.perf_counter()
        tensors = load(loader, path, ckpt.order, seed)
        seconds = time.perf_counter() - start
        if tx0 is not None and self.src:
            record.counters.setdefault("source_tx_bytes", []).append(self.src.tx_bytes() - tx0)
            for key, value in self.src.proxy_counters().items():  # object-store profile
                if key in proxy0:
                    record.counters.setdefault(f"source_{key}", []).append(value - proxy0[key])
        if pids:
            record.daemon_cpu_s.append(sum(lib.cpu_seconds(pid) for pid in pids) - cpu0)
            peak = max(lib.proc_bytes("VmHWM", pid) for pid in pids)
            record.daemon_peak_rss_bytes = max(record.daemon_peak_rss_bytes or 0, peak) or None
        for key, value in (lib.daemon_counters(*daemons) if daemons else {}).items():
            record.counters.setdefault(key, []).append(value - counters0.get(key, 0))
        found = digest(tensors)
        del tensors
        verified = found == ckpt.reference
        record.extra.setdefault("verified", []).append(verified)
        if not verified:
            self.mismatches.append(f"{record.name}: digest {found[:16]} != {ckpt.reference[:16]}")
        record.samples_s.append(seconds)
        record.samples_gbps.append(ckpt.bytes / seconds / lib.GB)
        record.bytes_per_read = ckpt.bytes
        record.load_average.append(lib.load_average())
        mark = "" if verified else "  DIGEST MISMATCH"
        lib.eprint(
            f"  {record.name:<40} {seconds:7.2f} s {ckpt.bytes / seconds / lib.GB:7.3f} GB/s{mark}"
        )

    def daemon(
        self, label: str, args: Sequence[str] = ()
    ) -> contextlib.AbstractContextManager[MountedFS]:
        return lib.daemon(
            self.source,
            self.work / "mnt" / label,
            capacity=self.capacity,
            args=[
                f"--kernel-read-ahead={self.args.read_ahead_kb}K",
                *args,
                *self.args.memcachefs_arg,
            ],
            log_path=self.work / f"switch-{label}.log",
            mounted_list=self.mounts,
            notes=self.notes,
        )

    def peering(self, port: int, *peers: int) -> list[str]:
        asks = [arg for peer in peers for arg in ("--peer", f"127.0.0.1:{peer}")]
        return ["--listen", f"127.0.0.1:{port}", *asks, "--cluster-secret-file", str(self.secret)]

    # -- phases
    def prepare(self, stack: contextlib.ExitStack) -> None:
        mode = self.args.source
        folder = self.work / "data" if mode in ("local", "s3") else Path(mode).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        self.shm.mkdir(parents=True)
        for ckpt in self.checkpoints:
            path = folder / ckpt.file
            if mode in ("local", "s3") or not path.exists():
                lib.eprint(f"writing {path} (about {size_label(ckpt.size)})")
                self.created.append(write_checkpoint(path, ckpt.size))
            shutil.copyfile(path, self.shm / ckpt.file)
            ckpt.bytes, ckpt.order = path.stat().st_size, tuple(file_order(path))
        total = sum(c.bytes for c in self.checkpoints)  # the main daemon holds every file
        self.capacity = str(max(total + total // 4, 64 * MiB) // MiB * MiB)
        self.secret = lib.secret_file(self.work)
        self.created.append(self.secret)
        os.sync()
        if mode == "s3":
            files = [folder / c.file for c in self.checkpoints]
            workdir = Path(self.args.source_workdir)
            self.src = stack.enter_context(
                SlowSource(
                    files, rate=self.args.rate, workdir=workdir, **slowsource.profile(self.args)
                )
            )
            self.source = self.src.mountpoint
        else:
            self.source = folder
        lib.eprint(f"source: {self.source}; loaders: {', '.join(self.loaders)}")

    def references(self) -> None:
        """First: the digest of each checkpoint's tmpfs load (load_file), untimed."""
        for ckpt in self.checkpoints:
            ckpt.reference = digest(load("load_file", self.shm / ckpt.file, ckpt.order, 0))

    def source_loads(self) -> None:
        """Before any daemon: s3fs serves a file from its own memory while it is open."""
        for rep in range(self.args.cold_repeat):
            lib.eprint(f"source loads {rep + 1}/{self.args.cold_repeat}")
            for ckpt in self.checkpoints:
                for loader in self.loaders:
                    path = self.source / ckpt.file
                    self.measure(loader, ckpt, "source", path, seed=rep, drop=True)

    def cold(self) -> None:
        """Fresh daemons; the source's page cache (a local disk) dropped before each."""
        for rep in range(self.args.cold_repeat):
            lib.eprint(f"memcachefs cold loads {rep + 1}/{self.args.cold_repeat}")
            for ckpt in self.checkpoints:
                for loader in [*self.loaders, "safe_open_file_order"]:
                    lib.drop_page_cache(self.source / ckpt.file, global_drop=self.global_drop)
                    with self.daemon(f"cold-{rep}") as fresh:
                        path = fresh.path / ckpt.file
                        self.measure(loader, ckpt, "cold", path, seed=rep, daemons=[fresh])

    def hits(self) -> None:
        """The main daemon reads every file once; local hits, then remote hits from it."""
        port = lib.free_port()
        with self.daemon("main", self.peering(port)) as main:
            for ckpt in self.checkpoints:
                lib.read_file(main.path / ckpt.file)
            if main.stats()["used_bytes"] < sum(c.bytes for c in self.checkpoints):
                self.notes.append("warning: the main daemon does not hold every checkpoint")
            for rep in range(self.args.repeat):
                lib.eprint(
                    f"tmpfs and local hits {rep + 1}/{self.args.repeat} (load {lib.load_average()})"
                )
                for ckpt in self.checkpoints:
                    path = main.path / ckpt.file
                    for loader in self.loaders:  # tmpfs interleaved: drift hits both alike
                        self.measure(loader, ckpt, "tmpfs", self.shm / ckpt.file, seed=rep)
                        self.measure(
                            loader, ckpt, "local_cold", path, seed=rep, drop=True, daemons=[main]
                        )
                        self.measure(loader, ckpt, "local_warm", path, seed=rep, daemons=[main])
            for rep in range(self.args.repeat):
                lib.eprint(f"remote hits {rep + 1}/{self.args.repeat}")
                for ckpt in self.checkpoints:
                    for loader in self.loaders:
                        label = f"peer-{rep}"
                        with self.daemon(label, self.peering(lib.free_port(), port)) as fresh:
                            path = fresh.path / ckpt.file
                            self.measure(
                                loader,
                                ckpt,
                                "remote",
                                path,
                                seed=rep,
                                daemons=[fresh],
                                pids=[main.pid],
                            )

    def run(self) -> None:
        with contextlib.ExitStack() as stack:
            try:
                self.prepare(stack)
                self.references()
                self.source_loads()
                self.cold()
                self.hits()
            finally:
                with lib.signals(signal.SIG_IGN):
                    for mounted in list(self.mounts):
                        mounted.unmount()
                    lib.unmount_below(self.work / "mnt")
                    stack.close()  # the slow source, below our mounts
                    shutil.rmtree(self.shm, ignore_errors=True)
                    for path in self.created if not self.args.keep else []:
                        path.unlink(missing_ok=True)


# -- goals and the report -------------------------------------------------------------------------
def median_s(result: dict[str, Any], key: str) -> float | None:
    s = result["scenarios"].get(key)
    return statistics.median(s["samples_s"]) if s and s["samples_s"] else None


def speed_ratio(result: dict[str, Any], a: str, b: str) -> float | None:
    """How fast load `a` is against load `b` (median seconds of b / of a)."""
    sa, sb = median_s(result, a), median_s(result, b)
    return sb / sa if sa and sb else None


def judge(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for size in result["sizes"]:
        tag = size_label(size)
        for loader in result["loaders"]:
            for place, base, target, text in GOALS:
                r = speed_ratio(result, name(loader, size, place), name(loader, size, base))
                out.append((f"{tag} {loader}: {text}", r, target))
        shuffled, ordered = (name(lo, size, "cold") for lo in LOADERS if lo.startswith("safe_"))
        out.append(
            (f"{tag} safe_open: {SHUFFLED_GOAL}", speed_ratio(result, shuffled, ordered), 0.9)
        )
    return [
        {
            "text": text,
            "ratio": r,
            "target": target,
            "status": "not measured" if r is None else "met" if r >= target else "not met",
        }
        for text, r, target in out
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Switch(args)
    started, load_start = time.time(), lib.load_average()
    bench.run()
    loads = [la[0] for r in bench.records.values() for la in r.load_average] or [0.0]
    notes = list(bench.notes)
    if "torch_load_file" not in bench.loaders:
        notes.append("torch is not installed: safetensors.torch.load_file not measured")
    notes += [f"error: {m}" for m in bench.mismatches]
    result = {
        "sizes": [c.size for c in bench.checkpoints],
        "checkpoints": [
            {
                "size": c.size,
                "file": c.file,
                "bytes": c.bytes,
                "tensors": len(c.order),
                "digest": c.reference,
            }
            for c in bench.checkpoints
        ],
        "loaders": bench.loaders,
        "size_bytes": max(c.bytes for c in bench.checkpoints),
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
        "scenarios": {key: record.summary() for key, record in bench.records.items()},
        "order": list(bench.records),
        "verified_loads": sum(sum(r.extra.get("verified", [])) for r in bench.records.values()),
        "mismatches": bench.mismatches,
        "ok": not bench.mismatches,
    }
    result["switch_goals"] = judge(result)
    return result


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def tables(result: dict[str, Any]) -> list[str]:
    """Per loader: rows checkpoint sizes, columns the places (median seconds), then ratios."""
    lines = []
    header = ["checkpoint", *(PLACES[p][0] + ", s" for p in PLACES)]
    header += ["cold / source", "local / tmpfs", "remote / local"]
    for loader in result["loaders"]:
        rows = []
        for ckpt in result["checkpoints"]:
            size = ckpt["size"]
            cells = [seconds(median_s(result, name(loader, size, p))) for p in PLACES]
            ratios = [
                speed_ratio(result, name(loader, size, a), name(loader, size, b))
                for a, b in (("cold", "source"), ("local_cold", "tmpfs"), ("remote", "local_cold"))
            ]
            row = f"{size_label(size)} ({ckpt['bytes'] / MiB:.0f} MiB, {ckpt['tensors']} tensors)"
            rows.append([row, *cells, *(fmt(r, "x") for r in ratios)])
        lines += [
            "",
            f"`{LOADERS[loader]}`, median seconds of a whole load:",
            "",
            *table(header, rows),
        ]
    order_rows = []
    for ckpt in result["checkpoints"]:
        size = ckpt["size"]
        a, b = name("safe_open_shuffled", size, "cold"), name("safe_open_file_order", size, "cold")
        order_rows.append(
            [
                f"{size_label(size)}",
                seconds(median_s(result, a)),
                seconds(median_s(result, b)),
                fmt(speed_ratio(result, a, b), "x"),
            ]
        )
    header = [
        "checkpoint",
        "cold, shuffled order, s",
        "cold, file order, s",
        "shuffled / file order",
    ]
    lines += [
        "",
        "`safe_open` cold, shuffled order against file order:",
        "",
        *table(header, order_rows),
    ]
    return lines


def observations(result: dict[str, Any]) -> list[str]:
    found = []
    for key in result["order"]:
        s = result["scenarios"][key]
        counters, n = s["counters"], s["bytes_per_read"]
        if key.endswith(" remote") and counters.get("peer_bytes") and n:
            peer = ", ".join(f"{b / n:.3f}" for b in counters["peer_bytes"])
            source = ", ".join(str(b) for b in counters.get("source_bytes", []))
            found.append(f"{key}: bytes from the peer / file size {peer}; from the source {source}")
        if key.endswith(" cold") and counters.get("source_bytes") and n:
            read = ", ".join(f"{b / n:.3f}x" for b in counters["source_bytes"])
            found.append(f"{key}: the daemon read {read} the file size from the source")
    return found


def markdown(result: dict[str, Any], *, header: bool = True) -> str:
    src = result["source"]
    source = {
        "local": f"a local directory ({src['dir']}), page cache dropped before each source read",
        "s3": slowsource.describe(src),
    }.get(src["mode"], f"the directory {src['dir']}")
    sizes = ", ".join(
        f"{c['bytes'] / MiB:.0f} MiB ({c['tensors']} tensors)" for c in result["checkpoints"]
    )
    load = result["load_average"]
    lines = []
    if header:
        lines += lib.preamble(result)
    lines += [
        f"Model switch. Source: {source}. Checkpoints: safetensors files of F16 matrices "
        f"(an embedding, 64 MiB from 256 MiB up; attention and MLP weights) and F32 norms: "
        f"{sizes}. "
        f"{result['repeat']} repetitions ({result['cold_repeat']} for the source and cold "
        f"loads); remote hits: a fresh instance peering on loopback with a cluster secret. "
        f"Every load verified against the tmpfs load (SHA-256 of all tensors): "
        f"{result['verified_loads']} loads verified, {len(result['mismatches'])} mismatches.",
        lib.describe_load(load),
        *tables(result),
    ]
    if found := observations(result):
        lines += ["", *[f"- {line}" for line in found]]
    rows = [[g["text"], fmt(g["ratio"], "x"), g["status"]] for g in result["switch_goals"]]
    lines += ["", *table(["model-switch goal (issue 8 item 3)", "measured", "status"], rows)]
    if result["notes"] and header:
        lines += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(lines) + "\n"
