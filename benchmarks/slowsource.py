"""A real slow source for the benchmarks: S3 in a rate-capped network namespace.

* ``s3rver`` (a Node S3 server, objects on local disk) runs inside the network
  namespace ``memcachefs-bench`` on ``10.203.0.2:4568``;
* a veth pair ``mcfsb-host`` (10.203.0.1/30) <-> ``mcfsb-ns`` (10.203.0.2/30), with
  ``tc tbf`` on the namespace side's egress: everything the server sends is capped;
* ``s3fs`` mounts the bucket ``ro,direct_io``: that mount is the source.

Two profiles. ``link`` (the default): one capped link, as above. ``object-store``:
closer to object storage, where each request pays a latency and each connection is
slower than the link: a delaying, per-connection-throttling TCP proxy
(``latencyproxy.py``) runs in the namespace on ``10.203.0.2:4569`` in front of
s3rver, under a higher tbf link cap (``--latency-ms``, ``--per-connection-rate``,
``--rate``; defaults 30 ms, 200mbit, 2gbit), so that parallel requests pay off.
``slowsource.py probe`` measures what a profile gives: time to first byte, and the
throughput of 1, 2, 4, 8 parallel streams.

The namespace side's ``tx_bytes`` is every byte the server sent. The same bucket can
be mounted by the alternatives a user would choose instead: rclone
``--vfs-cache-mode full`` and s3fs ``use_cache``, caches on /dev/shm. Only
10.203.0.0/30 and loopback are used. See SLOW_SOURCE.md.

    with SlowSource([path, ...], rate="400mbit") as src:
        src.mountpoint, src.tx_bytes()
        with src.alternative("rclone") as alt:  # or "s3fs_cache"
            alt.mountpoint, alt.clear_cache()

CLI (root): ``python benchmarks/slowsource.py install | up FILE... | probe [FILE] | status | down``.
The namespace is the lock: while it exists (a run, ``up``, or what a killed run
left) a second start is refused, and ``down`` removes everything by name.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import errno
import hashlib
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib
from memcachefs import mounts

NETNS, VETH_HOST, VETH_NS = "memcachefs-bench", "mcfsb-host", "mcfsb-ns"
HOST_ADDR, NS_ADDR, PORT = "10.203.0.1", "10.203.0.2", 4568
PROXY_PORT = 4569  # the object-store profile's proxy, in front of PORT
DEFAULT_RATE = "400mbit"
PROFILES = ("link", "object-store")
SOURCE_CLIENTS = ("s3fs", "rclone")  # the FUSE client of the source mount
# The rclone source mount: no VFS cache (one stream per open file); ranges of
# memcachefs's default block size and no read-ahead buffer, so that a block read
# is one GET, not the first 4 MiB of a 128 MiB one cut off (the rest in flight is
# sent all the same). A sequential reader's ranges double from there.
RCLONE_SOURCE_OPTIONS = ("--vfs-cache-mode", "off", "--vfs-read-chunk-size", "4M")
RCLONE_SOURCE_OPTIONS += ("--buffer-size", "0")
# the object-store profile's defaults: link cap, per-request latency, per-connection rate
OBJECT_STORE = {"rate": "2gbit", "latency_ms": 30.0, "per_connection_rate": "200mbit"}
BUCKET = "memcachefs-bench"
KEY = "S3RVER"  # s3rver's built-in access key and secret
S3RVER_VERSION = "3.7.1"
WORKDIR = Path("/var/tmp/memcachefs-slowsource")
SHM_DIR = Path("/dev/shm/memcachefs-slowsource")
NODE_PREFIX = Path(__file__).resolve().parent / ".cache" / "node"
S3RVER_JS = NODE_PREFIX / "node_modules" / "s3rver" / "bin" / "s3rver.js"


class SlowSourceError(RuntimeError):
    """Standing up or using the slow source failed."""


def _run(*cmd: str, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise SlowSourceError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def ensure_installed() -> None:
    """apt-get s3fs, rclone, node/npm, fuse3, iproute2 and npm s3rver where missing."""
    wanted = {"s3fs": "s3fs", "rclone": "rclone", "node": "nodejs", "npm": "npm"}
    wanted |= {"fusermount3": "fuse3", "ip": "iproute2", "tc": "iproute2"}
    apt = sorted({package for cmd, package in wanted.items() if not shutil.which(cmd)})
    if apt:
        lib.eprint(f"[slowsource] apt-get install {' '.join(apt)}")
        os.environ["DEBIAN_FRONTEND"] = "noninteractive"
        with contextlib.suppress(SlowSourceError):
            _run("apt-get", "update")
        _run("apt-get", "install", "-y", "--no-install-recommends", *apt)
    package = NODE_PREFIX / "node_modules" / "s3rver" / "package.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(package.read_text()).get("version") == S3RVER_VERSION:
            return
    lib.eprint(f"[slowsource] npm install s3rver@{S3RVER_VERSION} into {NODE_PREFIX}")
    NODE_PREFIX.mkdir(parents=True, exist_ok=True)
    npm = ["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix"]
    _run(*npm, str(NODE_PREFIX), f"s3rver@{S3RVER_VERSION}", timeout=900)


@dataclass
class FuseClient:
    """A FUSE client (s3fs, rclone) we run in the foreground; memcachefs.mounts unmounts it."""

    argv: list[str]
    mountpoint: Path
    log: Path
    cache_dir: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> FuseClient:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        if (
            not lib.wait_until(
                lambda: (
                    mounts.find_mount(self.mountpoint) is not None
                    or self.process.poll() is not None
                ),
                30,
            )
            or self.process.poll() is not None
        ):
            self.stop()
            tail = self.log.read_text(errors="replace")[-2000:]
            raise SlowSourceError(f"{self.argv[0]} did not mount {self.mountpoint}: {tail}")
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            mounts.unmount(self.mountpoint)
        if self.process:
            lib.stop(self.process)  # after an unmount the client exits on its own
            self.process = None

    def clear_cache(self) -> None:
        """A cold cache: unmount, delete the cache directory, mount again."""
        self.stop()
        if self.cache_dir:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.start()

    def cache_bytes(self) -> int:
        walk = os.walk(self.cache_dir) if self.cache_dir else []
        return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in walk for f in fs)

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process else []

    def __enter__(self) -> FuseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SlowSource:
    """s3rver + netns + tc + s3fs, stood up by `start()` (or `with`), torn down by `close()`."""

    def __init__(
        self,
        files: list[Path],
        *,
        rate: str | None = None,
        workdir: Path = WORKDIR,
        shm_dir: Path = SHM_DIR,
        profile: str = "link",
        latency_ms: float | None = None,
        per_connection_rate: str | None = None,
        s3fs_options: list[str] | None = None,
        source_client: str = "s3fs",
    ) -> None:
        if profile not in PROFILES:
            raise SlowSourceError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})")
        if source_client not in SOURCE_CLIENTS:
            raise SlowSourceError(
                f"unknown source client {source_client!r} (one of {', '.join(SOURCE_CLIENTS)})"
            )
        self.source_client = source_client
        store = profile == "object-store"
        self.files = [Path(f).resolve() for f in files]
        self.profile = profile
        self.s3fs_options = list(s3fs_options or [])
        rate = rate if rate is not None else OBJECT_STORE["rate"] if store else DEFAULT_RATE
        self.rate = None if str(rate).strip() in ("", "0", "none", "None") else str(rate)
        if self.rate and self.rate.isdigit():
            self.rate += "bit"
        self.latency_ms = float(OBJECT_STORE["latency_ms"] if latency_ms is None else latency_ms)
        self.per_connection_rate = str(per_connection_rate or OBJECT_STORE["per_connection_rate"])
        if not store:
            self.latency_ms, self.per_connection_rate = 0.0, ""
        else:
            from latencyproxy import rate_bytes

            try:
                rate_bytes(self.per_connection_rate)
            except ValueError as error:
                raise SlowSourceError(f"--per-connection-rate: {error}") from None
        self.workdir, self.shm_dir = Path(workdir), Path(shm_dir)
        self.mountpoint = self.workdir / "mnt" / "source"
        self.endpoint = f"http://{NS_ADDR}:{PROXY_PORT if store else PORT}"
        self.server: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.clients: list[FuseClient] = []
        self.owns = False

    def __enter__(self) -> SlowSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> SlowSource:
        if os.geteuid() != 0:
            raise SlowSourceError("the S3 slow source needs root (netns, tc, mounts)")
        if Path(f"/run/netns/{NETNS}").exists():
            raise SlowSourceError(
                f"network namespace {NETNS} exists: another run, `slowsource.py up`, or the "
                "leftovers of a killed run; `python benchmarks/slowsource.py down` removes it"
            )
        ensure_installed()
        try:
            _run("ip", "netns", "add", NETNS)  # the lock: fails if another run just took it
            self.owns = True
            self._network()
            self._populate()
            self._serve()
            if self.source_client == "rclone":
                source = self._rclone(self.mountpoint, *RCLONE_SOURCE_OPTIONS)
            else:
                source = self._s3fs(self.mountpoint, "direct_io", *self.s3fs_options)
            self.clients.append(source.start())
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Tear down what this object stood up; a second Ctrl-C cannot interrupt it."""
        if not self.owns:
            return
        with lib.signals(signal.SIG_IGN):
            for client in reversed(self.clients):
                client.stop()
            if self.proxy:
                lib.stop(self.proxy)
            if self.server:
                lib.stop(self.server)
            teardown(self.workdir, self.shm_dir)
            self.owns = False

    def _network(self) -> None:
        veth_namespace(NETNS, VETH_HOST, VETH_NS, HOST_ADDR, NS_ADDR, prefix_len=30)
        if self.rate:
            cap_link(VETH_NS, self.rate, netns=NETNS)

    def _populate(self) -> None:
        """Write s3rver's on-disk layout directly (a hard link, an MD5, metadata): no upload."""
        bucket = self.workdir / "s3data" / BUCKET
        bucket.mkdir(parents=True, exist_ok=True)
        for path in self.files:
            base = bucket / f"{path.name}._S3rver_"
            target = Path(f"{base}object")
            target.unlink(missing_ok=True)
            try:
                os.link(path, target)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copyfile(path, target)
            md5 = hashlib.md5(usedforsecurity=False)
            with open(path, "rb") as f:
                while chunk := f.read(8 * lib.MiB):
                    md5.update(chunk)
            Path(f"{base}object.md5").write_text(md5.hexdigest())
            meta = {"content-type": "application/octet-stream", "x-amz-meta-mode": str(0o100644)}
            Path(f"{base}metadata.json").write_text(json.dumps(meta))  # mode: s3fs shows 0644

    def _serve(self) -> None:
        argv = ["ip", "netns", "exec", NETNS, "node", str(S3RVER_JS), "-d"]
        argv += [str(self.workdir / "s3data"), "-a", NS_ADDR, "-p", str(PORT), "--silent"]
        argv += ["--allow-mismatched-signatures", "--no-vhost-buckets"]
        with open(self.workdir / "s3rver.log", "ab") as log:
            self.server = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection((NS_ADDR, PORT), 0.5):
                return True
            return self.server is None or self.server.poll() is not None

        if not lib.wait_until(listening, 30) or self.server.poll() is not None:
            raise SlowSourceError(f"s3rver did not listen (log: {self.workdir / 's3rver.log'})")
        if self.profile == "object-store":
            self._proxy()

    def _proxy(self) -> None:
        """latencyproxy.py in the namespace, on PROXY_PORT, in front of s3rver."""
        argv = ["ip", "netns", "exec", NETNS, sys.executable, str(lib.HERE / "latencyproxy.py")]
        argv += ["--listen", f"{NS_ADDR}:{PROXY_PORT}", "--upstream", f"{NS_ADDR}:{PORT}"]
        argv += ["--latency-ms", str(self.latency_ms)]
        argv += ["--per-connection-rate", self.per_connection_rate]
        log = open(self.workdir / "latencyproxy.log", "ab")  # noqa: SIM115 (the child holds it)
        with log:
            self.proxy = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert self.proxy.stdout is not None
        ready = select.select([self.proxy.stdout], [], [], 30)[0]
        line = self.proxy.stdout.readline().decode(errors="replace") if ready else ""
        if not line.startswith("ready"):
            raise SlowSourceError(
                f"latencyproxy did not start (log: {self.workdir / 'latencyproxy.log'})"
            )

    def _s3fs(self, mountpoint: Path, *options: str) -> FuseClient:
        passwd = self.workdir / "s3fs.passwd"
        passwd.write_text(f"{KEY}:{KEY}\n")
        passwd.chmod(0o600)
        base = [f"url={self.endpoint}", "use_path_request_style", f"passwd_file={passwd}", "ro"]
        argv = ["s3fs", BUCKET, str(mountpoint), "-f", "-o", ",".join([*base, *options])]
        return FuseClient(argv, mountpoint, self.workdir / f"s3fs-{mountpoint.name}.log")

    def _rclone(self, mountpoint: Path, *options: str) -> FuseClient:
        conf = self.workdir / "rclone.conf"
        conf.write_text(
            "[bench]\ntype = s3\nprovider = Other\nenv_auth = false\n"
            f"access_key_id = {KEY}\nsecret_access_key = {KEY}\n"
            f"endpoint = {self.endpoint}\nforce_path_style = true\n"
        )
        conf.chmod(0o600)
        argv = ["rclone", "--config", str(conf), "mount", f"bench:{BUCKET}", str(mountpoint)]
        argv += ["--read-only", *options]
        return FuseClient(argv, mountpoint, self.workdir / f"rclone-{mountpoint.name}.log")

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def tx_bytes(self) -> int:
        """Bytes the storage server has sent (the namespace veth's tx counter)."""
        out = _run("ip", "-n", NETNS, "-s", "-j", "link", "show", "dev", VETH_NS)
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def proxy_counters(self) -> dict[str, int]:
        """The object-store proxy's requests and connections so far (empty for `link`)."""
        if not self.proxy or self.proxy.poll() is not None:
            return {}
        log = self.workdir / "latencyproxy.log"
        size = log.stat().st_size
        self.proxy.send_signal(signal.SIGUSR1)  # it answers with one JSON line in its log
        if not lib.wait_until(lambda: log.stat().st_size > size, 5):
            return {}
        with contextlib.suppress(ValueError, IndexError):
            line = log.read_bytes()[size:].decode(errors="replace").splitlines()[-1]
            counters = json.loads(line)
            return {
                "requests": int(counters["requests"]),
                "connections": int(counters["connections"]),
            }
        return {}

    def alternative(self, label: str) -> FuseClient:
        """rclone (--vfs-cache-mode full) or s3fs_cache (use_cache), cache on /dev/shm; started."""
        cache, mountpoint = self.shm_dir / f"{label}-cache", self.workdir / "mnt" / label
        if label == "s3fs_cache":
            client = self._s3fs(mountpoint, f"use_cache={cache}")
        else:
            client = self._rclone(mountpoint, "--vfs-cache-mode", "full", "--cache-dir", str(cache))
        client.cache_dir = cache
        self.clients.append(client)
        return client.start()


# -- the namespace, its veth and its cap (also used by peerlink.py) --------------------------
def veth_namespace(
    netns: str, veth_host: str, veth_ns: str, host_addr: str, ns_addr: str, *, prefix_len: int
) -> None:
    """Join the existing namespace `netns` to the host by a veth pair, both ends up."""
    ns = ("ip", "netns", "exec", netns)
    _run("ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_ns)
    _run("ip", "link", "set", veth_ns, "netns", netns)
    _run("ip", "addr", "add", f"{host_addr}/{prefix_len}", "dev", veth_host)
    _run("ip", "link", "set", veth_host, "up")
    _run(*ns, "ip", "addr", "add", f"{ns_addr}/{prefix_len}", "dev", veth_ns)
    _run(*ns, "ip", "link", "set", veth_ns, "up")
    _run(*ns, "ip", "link", "set", "lo", "up")


def tbf_burst_bytes(rate: str) -> int:
    """tbf's burst for `rate`: 1mbit (the link profile's), more above 400mbit (2.5 ms of
    the rate), so that the bucket, refilled once per timer tick, does not cap below it."""
    from latencyproxy import rate_bytes

    return max(125_000, int(rate_bytes(rate) / 400))


def cap_link(dev: str, rate: str | None, *, netns: str | None = None) -> None:
    """Cap `dev`'s egress with tc tbf at `rate` (tc syntax); None or "0": remove the cap."""
    ns = ("ip", "netns", "exec", netns) if netns else ()
    if not rate or rate == "0":
        cmd = [*ns, "tc", "qdisc", "del", "dev", dev, "root"]
        subprocess.run(cmd, capture_output=True, check=False)  # no cap there: fine
        return
    tbf = ("rate", rate, "burst", str(tbf_burst_bytes(rate)), "latency", "50ms")
    _run(*ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", *tbf)


def remove_namespace(netns: str, veth_host: str) -> None:
    """Kill what runs in `netns` (ours by construction), delete the veth and the namespace.
    Never raises."""
    if Path(f"/run/netns/{netns}").exists():
        pids = subprocess.run(
            ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
        )
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.2)
    for cmd in (["ip", "link", "del", veth_host], ["ip", "netns", "del", netns]):
        subprocess.run(cmd, capture_output=True, check=False)


# -- probe: what a profile gives a plain HTTP client -------------------------------------------
def http_get(
    endpoint: str, key: str, start: int, length: int, conn: Any = None
) -> dict[str, float]:
    """One ranged GET (path style, s3rver needs no signature): seconds to first byte and
    in all, bytes. On `conn` (kept alive) or a new connection."""
    host, _, port = endpoint.removeprefix("http://").partition(":")
    own = conn is None
    conn = conn or http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Range": f"bytes={start}-{start + length - 1}"}
    t0 = time.perf_counter()
    try:
        conn.request("GET", f"/{BUCKET}/{key}", headers=headers)
        response = conn.getresponse()
        first = response.read(1)
        t1 = time.perf_counter()
        n = len(first)
        buf = memoryview(bytearray(1024 * 1024))
        while (got := response.readinto(buf)) > 0:
            n += got
        if response.status not in (200, 206) or n != length:
            raise SlowSourceError(f"GET {key} {headers}: {response.status}, {n} bytes")
    finally:
        if own:
            conn.close()
    return {"ttfb_s": t1 - t0, "seconds": time.perf_counter() - t0, "bytes": n}


def probe(src: SlowSource, key: str, size: int, streams: list[int], each: int) -> dict[str, Any]:
    """Time to first byte (new and kept-alive connections), then N parallel streams."""
    out: dict[str, Any] = {"profile": src.profile, "rate": src.rate, "endpoint": src.endpoint}
    out |= {"latency_ms": src.latency_ms, "per_connection_rate": src.per_connection_rate}
    new = [http_get(src.endpoint, key, 0, 4096)["ttfb_s"] for _ in range(5)]
    host, _, port = src.endpoint.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    kept = [http_get(src.endpoint, key, i * 4096, 4096, conn)["ttfb_s"] for i in range(5)]
    conn.close()
    out["ttfb_ms_new_connection"] = sorted(1000 * x for x in new)
    out["ttfb_ms_kept_alive"] = sorted(1000 * x for x in kept)
    out["streams"] = []
    for n in streams:

        def one(i: int) -> dict[str, float]:
            return http_get(src.endpoint, key, i * each % (size - each + 1), each)

        tx0, t0 = src.tx_bytes(), time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one, range(n)))  # raises what a stream raised
        wall = time.perf_counter() - t0
        moved = sum(r["bytes"] for r in results)
        out["streams"].append(
            {
                "streams": n,
                "aggregate_mb_s": moved / wall / 1e6,
                "per_stream_mb_s": sorted(r["bytes"] / r["seconds"] / 1e6 for r in results),
                "tx_over_payload": (src.tx_bytes() - tx0) / moved,
            }
        )
        lib.eprint(f"  {n} streams: {moved / wall / 1e6:.1f} MB/s")
    return out


def teardown(workdir: Path = WORKDIR, shm_dir: Path = SHM_DIR) -> None:
    """Remove the stack by name: mounts below our directories, what runs in the namespace
    (ours by construction), the veth, the namespace, the object data. Never raises."""
    for prefix in (workdir / "mnt", shm_dir):
        lib.unmount_below(prefix)
    remove_namespace(NETNS, VETH_HOST)
    for path in (workdir / "s3data", workdir / "mnt", shm_dir):
        shutil.rmtree(path, ignore_errors=True)


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """SlowSource's profile keywords from add_profile_arguments()'s options."""
    keys = ("profile", "latency_ms", "per_connection_rate", "source_client")
    return {key: getattr(args, key) for key in keys} | {"s3fs_options": args.s3fs_option}


def summary(src: SlowSource | None) -> dict[str, Any]:
    """What a report says of the source: rate, endpoint, profile."""
    if src is None:
        return {"rate": None, "endpoint": None, "profile": None}
    out = {"rate": src.rate, "endpoint": src.endpoint, "profile": src.profile}
    out["s3fs_options"] = src.s3fs_options
    out["source_client"] = src.source_client
    if src.profile == "object-store":
        out |= {"latency_ms": src.latency_ms, "per_connection_rate": src.per_connection_rate}
    return out


def describe(src: dict[str, Any]) -> str:
    """The source of a report's summary() in words."""
    text = f"s3rver in a network namespace capped with tc tbf at {src['rate'] or 'no limit'}"
    if src.get("profile") == "object-store":
        text += (
            f", behind a proxy adding {src['latency_ms']:g} ms to each request and capping each "
            f"connection at {src['per_connection_rate']} (profile object-store)"
        )
    if src.get("source_client") == "rclone":
        return text + f", mounted with rclone --read-only {' '.join(RCLONE_SOURCE_OPTIONS)}"
    extra = "".join(f",{option}" for option in src.get("s3fs_options") or [])
    return text + f", mounted with s3fs ro,direct_io{extra}"


def status(workdir: Path) -> dict[str, Any]:
    up = Path(f"/run/netns/{NETNS}").exists()
    out: dict[str, Any] = {"up": up, "endpoint": f"http://{NS_ADDR}:{PORT}", "bucket": BUCKET}
    out["mounts"] = [
        m.mountpoint for m in mounts.mount_entries() if m.mountpoint.startswith(str(workdir))
    ]
    if up:
        with contextlib.suppress(SlowSourceError, ValueError, IndexError, KeyError):
            out["tx_bytes"] = SlowSource([], workdir=workdir).tx_bytes()
            qdisc = _run("tc", "-n", NETNS, "-j", "qdisc", "show", "dev", VETH_NS)
            out["qdisc"] = [
                {"kind": q.get("kind"), **q.get("options", {})} for q in json.loads(qdisc)
            ]
    return out


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """--profile, --latency-ms, --per-connection-rate (also run.py's)."""
    add = parser.add_argument
    add("--profile", choices=PROFILES, default="link", help="the source's shape (link)")
    add("--latency-ms", type=float, help="object-store: added to each request (30)")
    add("--per-connection-rate", help="object-store: each connection's cap, tc syntax (200mbit)")
    add(
        "--source-client",
        choices=SOURCE_CLIENTS,
        default="s3fs",
        help="the source's FUSE client: s3fs (-o ro,direct_io) or rclone (--vfs-cache-mode off, "
        "one stream per open file) (s3fs)",
    )
    add(
        "--s3fs-option",
        action="append",
        default=[],
        help="an extra -o option of the source's s3fs mount (repeatable), e.g. parallel_count=16",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("command", choices=["install", "up", "probe", "status", "down"])
    parser.add_argument("files", nargs="*", type=Path, help="up: files to put in the bucket")
    parser.add_argument(
        "--rate", help=f"egress (link) cap, tc syntax, 0: none ({DEFAULT_RATE}; object-store 2gbit)"
    )
    add_profile_arguments(parser)
    parser.add_argument("--streams", default="1,2,4,8", help="probe: parallel streams")
    parser.add_argument("--stream-bytes", default="32M", help="probe: bytes per stream")
    parser.add_argument("--rclone", action="store_true", help="up: also mount rclone")
    parser.add_argument("--s3fs-cache", action="store_true", help="up: also mount s3fs use_cache")
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="object data, mounts, logs")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.command == "install":
            ensure_installed()
        elif args.command == "down":
            teardown(args.workdir)
            return int(Path(f"/run/netns/{NETNS}").exists())
        elif args.command == "status":
            print(json.dumps(status(args.workdir), indent=2))
        elif args.command == "probe":
            each = lib.size_arg(args.stream_bytes)
            streams = [int(n) for n in args.streams.split(",")]
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
            path = args.files[0] if args.files else workdir / "probe.bin"
            if not args.files:
                lib.write_test_file(path, max(streams) * each)
            size = path.stat().st_size
            with SlowSource([path], rate=args.rate, workdir=workdir, **profile(args)) as src:
                print(json.dumps(probe(src, path.name, size, streams, min(each, size)), indent=2))
            if not args.files:
                path.unlink()
        else:  # up, and leave it running: `down` removes it
            src = SlowSource(args.files, rate=args.rate, workdir=args.workdir, **profile(args))
            src.start()
            try:
                labels = ["rclone"] * args.rclone + ["s3fs_cache"] * args.s3fs_cache
                alternatives = [src.alternative(label) for label in labels]
            except BaseException:
                src.close()
                raise
            print(f"source: {src.mountpoint}\nendpoint: {src.endpoint} {BUCKET} rate {src.rate}")
            if src.profile == "object-store":
                print(f"latency {src.latency_ms} ms, per connection {src.per_connection_rate}")
            for alt in alternatives:
                print(f"{alt.argv[0]}: {alt.mountpoint} (cache {alt.cache_dir})")
    except SlowSourceError as error:
        print(f"slowsource: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
