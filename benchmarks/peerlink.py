"""Peers at link speed (issue 8 item 5): remote hits over a rate-capped veth, against raw TCP.

* the warm instance runs in the network namespace ``mcfs-peer`` (its netns only: it
  keeps the host's mount namespace), listening on ``10.204.0.2``; it reads the data
  file and the checkpoint once, so it holds every block;
* a veth pair ``mcfsp-host`` (10.204.0.1/24) <-> ``mcfsp-ns`` (10.204.0.2/24), both
  ends capped with ``tc tbf`` at each ``--peer-rates`` rate in turn (``0``: uncapped,
  the machine's ceiling); slowsource.py's helpers stand it up and tear it down;
* per rate and repetition: a raw TCP stream of the same bytes from a sender in the
  namespace to a receiver on the host (same buffer size), then a fresh instance on the
  host (``--peer`` the warm one) reads the file sequentially, and another fresh one
  loads the checkpoint with ``safetensors.numpy.load_file`` (verified by digest); each
  with the CPU seconds of both daemons and the fresh daemon's peer/source bytes.

    python benchmarks/run.py peerlink [--size 1G] [--repeat 3] [--peer-rates 1gbit,2gbit,4gbit,0]
    python benchmarks/peerlink.py send HOST PORT NBYTES BUFFER   (the raw TCP sender)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib
import slowsource
import switch
from memcachefs.testing.harness import MountedFS

NETNS, VETH_HOST, VETH_NS = "mcfs-peer", "mcfsp-host", "mcfsp-ns"
HOST_ADDR, NS_ADDR, PREFIX_LEN = "10.204.0.1", "10.204.0.2", 24
WARM_PORT, FRESH_PORT, RAW_PORT = 4620, 4621, 4622
DATA, MODEL = "data.bin", "model.safetensors"
GOAL = 0.9  # remote read and remote load >= 0.9x raw TCP over the same capped link
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_namespace(netns: str) -> Iterator[None]:
    """This thread in `netns`'s network namespace: processes it starts are born there."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{netns}") as there:
        if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the host namespace")


def send(host: str, port: int, nbytes: int, buffer_size: int) -> None:
    """The raw TCP sender (runs in the namespace): `nbytes` to host:port."""
    with socket.create_connection((host, port)) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
        view, left = memoryview(bytearray(buffer_size)), nbytes
        while left:
            conn.sendall(view[: min(left, buffer_size)])
            left -= min(left, buffer_size)


def raw_tcp(nbytes: int, buffer_size: int) -> float:
    """Seconds to move `nbytes` from a sender in the namespace to the host, over the veth."""
    with socket.create_server((HOST_ADDR, RAW_PORT)) as server:
        server.settimeout(30)
        argv = ["ip", "netns", "exec", NETNS, sys.executable, __file__, "send"]
        sender = subprocess.Popen([*argv, HOST_ADDR, str(RAW_PORT), str(nbytes), str(buffer_size)])
        try:
            conn, _ = server.accept()
            with conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
                buf, total = memoryview(bytearray(buffer_size)), 0
                start = time.perf_counter()
                while total < nbytes and (n := conn.recv_into(buf)):
                    total += n
                seconds = time.perf_counter() - start
        finally:
            if sender.wait(timeout=60) != 0:
                raise RuntimeError(f"the raw TCP sender failed ({sender.returncode})")
    if total != nbytes:
        raise RuntimeError(f"raw TCP moved {total} of {nbytes} bytes")
    return seconds


class PeerLink:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = args.size
        self.rates = [r.strip() for r in args.peer_rates.split(",") if r.strip()]
        self.work = Path(args.workdir).absolute() / "peerlink"
        self.source = self.work / "data"
        self.mounts: list[MountedFS] = []
        self.rows: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.reference = ""
        self.model_bytes = 0
        self.owns = False

    # -- the network ------------------------------------------------------------------
    def network(self) -> None:
        if Path(f"/run/netns/{NETNS}").exists():
            raise RuntimeError(
                f"network namespace {NETNS} exists (another run, or a killed one's leftovers: "
                f"`ip link del {VETH_HOST}; ip netns del {NETNS}`)"
            )
        slowsource._run("ip", "netns", "add", NETNS)  # the lock
        self.owns = True
        slowsource.veth_namespace(
            NETNS, VETH_HOST, VETH_NS, HOST_ADDR, NS_ADDR, prefix_len=PREFIX_LEN
        )

    def cap(self, rate: str) -> None:
        slowsource.cap_link(VETH_NS, rate, netns=NETNS)
        slowsource.cap_link(VETH_HOST, rate)

    def close(self) -> None:
        with lib.signals(signal.SIG_IGN):
            for mounted in reversed(self.mounts):
                mounted.unmount()
            self.mounts.clear()
            if self.owns:
                slowsource.remove_namespace(NETNS, VETH_HOST)
                self.owns = False
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)

    # -- daemons ----------------------------------------------------------------------
    def secret_args(self) -> list[str]:
        return ["--cluster-secret-file", str(self.work / "cluster.secret")]

    def daemon(
        self, label: str, args: Sequence[str], capacity: int
    ) -> contextlib.AbstractContextManager[MountedFS]:
        return lib.daemon(
            self.source,
            self.work / "mnt" / label,
            capacity=str(capacity),
            args=[
                f"--kernel-read-ahead={self.args.read_ahead_kb}K",
                *args,
                *self.args.memcachefs_arg,
            ],
            log_path=self.work / f"{label}.log",
            mounted_list=self.mounts,
            notes=self.notes,
        )

    # -- measuring --------------------------------------------------------------------
    def row(self, rate: str) -> dict[str, Any]:
        return self.rows.setdefault(
            rate, {"rate": rate, "raw_tcp_s": [], "read": [], "load": [], "tbf_burst_bytes": None}
        )

    def remote(self, kind: str, rate: str, rep: int, warm: MountedFS) -> None:
        """A fresh daemon on the host; every block of the file from the warm one."""
        nbytes = self.size if kind == "read" else self.model_bytes
        fresh_args = ["--listen", f"{HOST_ADDR}:{FRESH_PORT}", "--peer", f"{NS_ADDR}:{WARM_PORT}"]
        with self.daemon(f"fresh-{kind}-{rep}", fresh_args + self.secret_args(), 2 * nbytes) as d:
            path = d.path / (DATA if kind == "read" else MODEL)
            cpu0 = (lib.cpu_seconds(d.pid), lib.cpu_seconds(warm.pid))
            counters0 = lib.daemon_counters(d)
            start = time.perf_counter()
            verified = True
            if kind == "read":
                lib.read_file(path, self.args.buffer)
                seconds = time.perf_counter() - start
            else:
                tensors = switch.load("load_file", path, [], rep)
                seconds = time.perf_counter() - start
                verified = switch.digest(tensors) == self.reference
                del tensors
            cpu = (lib.cpu_seconds(d.pid) - cpu0[0], lib.cpu_seconds(warm.pid) - cpu0[1])
            counters = {k: v - counters0[k] for k, v in lib.daemon_counters(d).items()}
        sample = {
            "seconds": seconds,
            "bytes": nbytes,
            "fresh_cpu_s": cpu[0],
            "warm_cpu_s": cpu[1],
            "peer_bytes": counters["peer_bytes"],
            "source_bytes": counters["source_bytes"],
            "verified": verified,
            "load_average": lib.load_average(),
        }
        self.row(rate)[kind].append(sample)
        if not verified:
            self.notes.append(f"{rate} load {rep}: DIGEST MISMATCH")
        lib.eprint(
            f"  {rate or 'uncapped':>8} {kind:<4} {nbytes / seconds / lib.GB:6.3f} GB/s "
            f"peer {counters['peer_bytes'] / nbytes:.3f} source {counters['source_bytes']} "
            f"cpu fresh {cpu[0]:.2f} s warm {cpu[1]:.2f} s"
        )

    def run(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.source.mkdir(exist_ok=True)
        lib.write_test_file(self.source / DATA, self.size)
        switch.write_checkpoint(self.source / MODEL, self.size)
        self.model_bytes = (self.source / MODEL).stat().st_size
        self.reference = switch.digest(switch.load("load_file", self.source / MODEL, [], 0))
        lib.secret_file(self.work)
        self.network()
        warm_args = ["--listen", f"{NS_ADDR}:{WARM_PORT}", *self.secret_args()]
        capacity = 2 * (self.size + self.model_bytes)
        with in_namespace(NETNS):  # the daemon is born in the namespace; we go back at once
            warm_cm = self.daemon("warm", warm_args, capacity)
            warm = warm_cm.__enter__()
        try:
            for name in (DATA, MODEL):
                lib.read_file(warm.path / name)
            held = warm.stats()["used_bytes"]
            if held < self.size + self.model_bytes:
                self.notes.append(f"warning: the warm daemon holds {held} bytes only")
            for rate in self.rates:
                self.cap(rate)
                if rate and rate != "0":
                    self.row(rate)["tbf_burst_bytes"] = slowsource.tbf_burst_bytes(rate)
                for rep in range(self.args.repeat):
                    lib.eprint(f"{rate or 'uncapped'} {rep + 1}/{self.args.repeat}")
                    seconds = raw_tcp(self.size, self.args.buffer)
                    self.row(rate)["raw_tcp_s"].append(seconds)
                    lib.eprint(f"  {rate:>8} raw  {self.size / seconds / lib.GB:6.3f} GB/s")
                    self.remote("read", rate, rep, warm)
                    self.remote("load", rate, rep, warm)
        finally:
            warm_cm.__exit__(None, None, None)


def summarize(link: PeerLink) -> list[dict[str, Any]]:
    out = []
    for rate, row in link.rows.items():
        raw = link.size / statistics.median(row["raw_tcp_s"]) / lib.GB
        entry: dict[str, Any] = {"rate": rate or "0", "raw_tcp_gbps": raw}
        entry["tbf_burst_bytes"] = row["tbf_burst_bytes"]
        for kind in ("read", "load"):
            samples = row[kind]
            gbps = statistics.median(s["bytes"] / s["seconds"] / lib.GB for s in samples)
            gib = samples[0]["bytes"] / lib.GiB
            entry[kind] = {
                "gbps": gbps,
                "ratio": gbps / raw,
                "fresh_cpu_s_per_gib": statistics.median(s["fresh_cpu_s"] for s in samples) / gib,
                "warm_cpu_s_per_gib": statistics.median(s["warm_cpu_s"] for s in samples) / gib,
                "source_bytes": [s["source_bytes"] for s in samples],
                "peer_bytes": [s["peer_bytes"] for s in samples],
                "samples": samples,
            }
        capped = rate not in ("", "0")
        entry["goal"] = GOAL if capped else None
        entry["met"] = all(entry[k]["ratio"] >= GOAL for k in ("read", "load")) if capped else None
        out.append(entry)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise RuntimeError("peerlink needs root (a network namespace, tc, mounts)")
    link = PeerLink(args)
    started, load_start = time.time(), lib.load_average()
    try:
        link.run()
    finally:
        link.close()
    rates = summarize(link)
    verified = all(s["verified"] for r in rates for s in r["load"]["samples"])
    from_peer = all(
        s["source_bytes"] == 0 and s["peer_bytes"] == s["bytes"]
        for r in rates
        for kind in ("read", "load")
        for s in r[kind]["samples"]
    )
    if not from_peer:
        link.notes.append("warning: some blocks did not come from the peer (see source_bytes)")
    return {
        "size": link.size,
        "model_bytes": link.model_bytes,
        "repeat": args.repeat,
        "buffer": args.buffer,
        "rates": rates,
        "notes": link.notes,
        "load_average": {"start": load_start, "end": lib.load_average()},
        "elapsed_s": round(time.time() - started, 1),
        "ok": verified and from_peer,
    }


def markdown(result: dict[str, Any]) -> str:
    load = result["load_average"]
    lines = [
        *lib.preamble(result),
        f"Load average at the start {load['start']}, at the end {load['end']}.",
        "",
        f"A {result['size'] / lib.GiB:.2f} GiB file read sequentially ({result['buffer']} B "
        f"reads) and a {result['model_bytes'] / lib.GiB:.2f} GiB checkpoint loaded with "
        "`safetensors.numpy.load_file`, each by a fresh instance on the host whose peer, in "
        f"the network namespace {NETNS}, holds every block; raw TCP: one stream of the same "
        "bytes, same buffer size, namespace to host, over the same veth. Both veth ends "
        f"capped with tc tbf. Medians of {result['repeat']}; CPU s/GiB of the fresh (host) "
        "and warm (namespace) daemons.",
        "",
    ]
    header = [
        "link",
        "raw TCP GB/s",
        "remote read GB/s",
        "x raw",
        "CPU s/GiB fresh / warm",
        "remote load GB/s",
        "x raw",
        "CPU s/GiB fresh / warm",
        "goal >= 0.9x",
    ]
    rows = []
    for r in result["rates"]:
        cells = [
            r["rate"] if r["rate"] != "0" else "uncapped (ceiling)",
            f"{r['raw_tcp_gbps']:.3f}",
        ]
        for kind in ("read", "load"):
            k = r[kind]
            cpu = f"{k['fresh_cpu_s_per_gib']:.2f} / {k['warm_cpu_s_per_gib']:.2f}"
            cells += [f"{k['gbps']:.3f}", f"{k['ratio']:.2f}", cpu]
        cells.append("-" if r["met"] is None else "met" if r["met"] else "not met")
        rows.append(cells)
    lines += lib.table(header, rows)
    sources = sorted(
        {b for r in result["rates"] for k in ("read", "load") for b in r[k]["source_bytes"]}
    )
    lines += ["", f"Bytes the fresh instances read from the source: {sources}."]
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    print("run it as `python benchmarks/run.py peerlink`", file=sys.stderr)
    sys.exit(2)
