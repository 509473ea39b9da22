#!/usr/bin/env python3
"""A real slow source for the benchmarks: S3 in a rate-capped network namespace.

The seeds' source is an object-storage bucket mounted through an s3fs-like FUSE
client. This module stands up the same stack on one machine (see
``shared/guide/slow-source.md``):

* ``s3rver`` (a Node S3 server, files on local disk) running *inside* a network
  namespace ``memcachefs-bench``, listening on ``10.203.0.2:PORT``;
* a veth pair ``mcfsb-host`` (10.203.0.1/30) <-> ``mcfsb-ns`` (10.203.0.2/30);
* ``tc tbf`` on the namespace side's egress, so everything the server sends is
  capped at ``rate`` (default 400mbit, ``0`` = uncapped);
* ``s3fs`` mounting the bucket ``ro,direct_io`` (no kernel page cache, as on an
  OSS FUSE mount): that mount is the *source* the benchmarks read.

The namespace side's ``tx_bytes`` counter is every byte the server sent, i.e.
what was read from the source (payload plus HTTP/TCP/IP overhead).

The same bucket can be mounted by the alternatives a user would otherwise
choose: ``rclone mount --vfs-cache-mode full`` and ``s3fs -o use_cache``, both
with their cache on /dev/shm.

Library use::

    from slowsource import SlowSource

    with SlowSource(["/var/tmp/model.safetensors"], rate="400mbit") as src:
        src.mountpoint            # Path of the s3fs ro,direct_io mount
        before = src.tx_bytes()   # int (None in plain mode)
        with src.rclone() as alt:   # or src.s3fs_cache()
            alt.mountpoint; alt.clear_cache()

    with SlowSource(files, plain=True) as src:   # smoke mode: a plain directory
        ...

CLI (root)::

    python3 benchmarks/slowsource.py install
    python3 benchmarks/slowsource.py up [--rate 400mbit] [--rclone] [--s3fs-cache] FILE...
    python3 benchmarks/slowsource.py status [--json]
    python3 benchmarks/slowsource.py down

Everything created is recorded in ``/run/memcachefs-bench.json`` as it is
created, so ``down`` (from any process) removes leftovers: it unmounts, kills
the recorded pids (checked against their start time), and deletes the veth and
the namespace. Only the standard library is used, so any ``python3`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

NETNS = "memcachefs-bench"
VETH_HOST = "mcfsb-host"
VETH_NS = "mcfsb-ns"
HOST_ADDR = "10.203.0.1"
NS_ADDR = "10.203.0.2"
PREFIX_LEN = 30
DEFAULT_PORT = 4568
DEFAULT_RATE = "400mbit"
BUCKET = "memcachefs-bench"
ACCESS_KEY = "S3RVER"  # s3rver's built-in credentials
SECRET_KEY = "S3RVER"
S3RVER_VERSION = "3.7.1"

STATE_FILE = Path(os.environ.get("MEMCACHEFS_BENCH_STATE", "/run/memcachefs-bench.json"))
WORKDIR = Path(os.environ.get("MEMCACHEFS_BENCH_WORKDIR", "/var/tmp/memcachefs-slowsource"))
SHM_DIR = Path(os.environ.get("MEMCACHEFS_BENCH_SHM", "/dev/shm/memcachefs-slowsource"))
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
NODE_PREFIX = CACHE_DIR / "node"
S3RVER_JS = NODE_PREFIX / "node_modules" / "s3rver" / "bin" / "s3rver.js"

_S3RVER_SUFFIX = "._S3rver_"


class SlowSourceError(RuntimeError):
    """Standing up or using the slow source failed."""


class AlternativeUnavailable(SlowSourceError):
    """The alternative needs the S3 stack (not available in plain mode)."""


# --------------------------------------------------------------------------- helpers


def _log(msg: str) -> None:
    print(f"[slowsource] {msg}", file=sys.stderr, flush=True)


def _run(
    cmd: list[str], *, check: bool = True, capture: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, text=True, capture_output=capture, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        err = (proc.stderr or "").strip() if capture else ""
        raise SlowSourceError(f"{' '.join(cmd)} failed ({proc.returncode}): {err}")
    return proc


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SlowSourceError("the S3 slow source needs root (netns, tc, mounts)")


def _proc_starttime(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (None if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _pid_alive(pid: int, starttime: int | None) -> bool:
    st = _proc_starttime(pid)
    if st is None:
        return False
    if starttime is not None and st != starttime:
        return False  # pid reused by another process
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rindex(")") + 2] != "Z"
    except OSError:
        return False


def _kill_pid(pid: int, starttime: int | None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, one recorded process (never by name)."""
    if not _pid_alive(pid, starttime):
        _reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not _pid_alive(pid, starttime):
            return
        time.sleep(0.05)
    if _pid_alive(pid, starttime):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            _reap(pid)
            if not _pid_alive(pid, starttime):
                return
            time.sleep(0.05)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _mounted(path: Path) -> bool:
    target = str(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mnt = line.split()[4].replace("\\040", " ")
                if mnt == target:
                    return True
    except OSError:
        pass
    return False


def _unmount(path: Path) -> None:
    """Unmount a FUSE mount; lazily if it is busy; never raises."""
    for _ in range(20):
        if not _mounted(path):
            return
        r = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, check=False)
        if r.returncode == 0 and not _mounted(path):
            return
        time.sleep(0.1)
    for cmd in (["fusermount3", "-uz", str(path)], ["umount", "-l", str(path)]):
        if not _mounted(path):
            return
        subprocess.run(cmd, capture_output=True, check=False)
    if _mounted(path):
        _log(f"warning: could not unmount {path}")


def _clean_env() -> dict[str, str]:
    """The environment without AWS_*/RCLONE_* (an AWS_CA_BUNDLE breaks rclone's S3 client)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}


def _rate_arg(rate: str | int | None) -> str | None:
    if rate is None:
        return None
    s = str(rate).strip()
    if s in ("", "0", "none", "off", "uncapped"):
        return None
    if s.isdigit():
        return s + "bit"
    return s


def _rmtree(path: Path) -> None:
    if path.exists() and not _mounted(path):
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- install


def _have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def ensure_installed(*, alternatives: bool = True) -> None:
    """Install s3fs, rclone, node/npm and s3rver if missing (idempotent; root)."""
    apt: list[str] = []
    if not _have("s3fs"):
        apt.append("s3fs")
    if alternatives and not _have("rclone"):
        apt.append("rclone")
    if not _have("node"):
        apt.append("nodejs")
    if not _have("npm"):
        apt.append("npm")
    if not _have("fusermount3"):
        apt.append("fuse3")
    if not _have("ip") or not _have("tc"):
        apt.append("iproute2")
    if apt:
        _require_root()
        _log(f"apt-get install {' '.join(apt)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", *apt],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
            r = subprocess.run(
                ["apt-get", "install", "-y", "--no-install-recommends", *apt],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if r.returncode != 0:
                raise SlowSourceError(f"apt-get install {apt} failed: {r.stderr[-2000:]}")
    if not _s3rver_installed():
        NODE_PREFIX.mkdir(parents=True, exist_ok=True)
        _log(f"npm install s3rver@{S3RVER_VERSION} into {NODE_PREFIX}")
        _run(
            [
                "npm",
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
                str(NODE_PREFIX),
                f"s3rver@{S3RVER_VERSION}",
            ],
            timeout=900,
        )
        if not _s3rver_installed():
            raise SlowSourceError("npm install s3rver did not produce s3rver.js")


def _s3rver_installed() -> bool:
    pkg = NODE_PREFIX / "node_modules" / "s3rver" / "package.json"
    try:
        return json.loads(pkg.read_text()).get("version") == S3RVER_VERSION and S3RVER_JS.exists()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- state


class _State:
    """What has been created, written to STATE_FILE after every change."""

    def __init__(self, path: Path = STATE_FILE) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "owner_pid": os.getpid(),
            "owner_starttime": _proc_starttime(os.getpid()),
            "netns": None,
            "veth": None,
            "pids": [],
            "mounts": [],
            "dirs": [],
            "info": {},
        }

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def add_pid(self, name: str, pid: int) -> None:
        self.data["pids"].append({"name": name, "pid": pid, "starttime": _proc_starttime(pid)})
        self.save()

    def remove_pid(self, pid: int) -> None:
        self.data["pids"] = [p for p in self.data["pids"] if p["pid"] != pid]
        self.save()

    def add_mount(self, path: Path) -> None:
        if str(path) not in self.data["mounts"]:
            self.data["mounts"].append(str(path))
            self.save()

    def remove_mount(self, path: Path) -> None:
        self.data["mounts"] = [m for m in self.data["mounts"] if m != str(path)]
        self.save()

    def add_dir(self, path: Path) -> None:
        if str(path) not in self.data["dirs"]:
            self.data["dirs"].append(str(path))
            self.save()

    @staticmethod
    def load(path: Path = STATE_FILE) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def teardown(state_path: Path = STATE_FILE, *, verbose: bool = False) -> None:
    """Remove everything recorded in the state file, and known leftovers by name.

    Safe to call any number of times, from any process; never raises.
    """
    data = _State.load(state_path) or {}
    say = _log if verbose else (lambda _m: None)
    # 1. mounts (newest first), including any under our directories
    mounts = list(reversed(data.get("mounts", [])))
    # (only our own subdirectories: other tools may use neighbouring paths)
    info = data.get("info", {})
    workdir = Path(info.get("workdir") or WORKDIR)
    shm_dir = Path(info.get("shm_dir") or SHM_DIR)
    for prefix in (str(workdir / "mnt") + "/", str(shm_dir) + "/"):
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    mnt = line.split()[4].replace("\\040", " ")
                    if mnt.startswith(prefix) and mnt not in mounts:
                        mounts.append(mnt)
        except OSError:
            pass
    for m in mounts:
        if _mounted(Path(m)):
            say(f"unmount {m}")
        _unmount(Path(m))
    # 2. recorded processes, newest first
    for p in reversed(data.get("pids", [])):
        if _pid_alive(p["pid"], p.get("starttime")):
            say(f"kill {p['name']} pid {p['pid']}")
        _kill_pid(p["pid"], p.get("starttime"))
    # 3. anything still running inside our namespace (it is ours by construction)
    ns = data.get("netns") or NETNS
    if Path(f"/run/netns/{ns}").exists():
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
        for tok in r.stdout.split():
            if tok.isdigit():
                say(f"kill pid {tok} left in netns {ns}")
                _kill_pid(int(tok), None)
    # 4. network
    veth = (data.get("veth") or {}).get("host", VETH_HOST)
    if Path(f"/sys/class/net/{veth}").exists():
        say(f"ip link del {veth}")
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
    if Path(f"/run/netns/{ns}").exists():
        say(f"ip netns del {ns}")
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    # 5. directories we created (object data, caches, mountpoints)
    for d in reversed(data.get("dirs", [])):
        _rmtree(Path(d))
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()


# --------------------------------------------------------------------------- mounts


class Mount:
    """A FUSE mount run in the foreground by a child process we own.

    ``mountpoint`` is the path; ``pid`` the FUSE daemon's pid; ``clear_cache()``
    unmounts, wipes the cache directory and mounts again (a cold cache).
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        mountpoint: Path,
        state: _State,
        *,
        cache_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.argv = argv
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.env = dict(env) if env is not None else _clean_env()
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self._state = state
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> Mount:
        if _mounted(self.mountpoint):
            _unmount(self.mountpoint)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._state.add_mount(self.mountpoint)
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                start_new_session=True,  # a terminal's Ctrl-C reaches only us
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        self._state.add_pid(self.name, self._proc.pid)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SlowSourceError(
                    f"{self.name} exited with {self._proc.returncode}: {self._log_tail()}"
                )
            if _mounted(self.mountpoint):
                with contextlib.suppress(OSError):
                    os.listdir(self.mountpoint)
                    return self
            time.sleep(0.05)
        raise SlowSourceError(
            f"{self.name} did not mount in {self.ready_timeout}s: {self._log_tail()}"
        )

    def stop(self) -> None:
        _unmount(self.mountpoint)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_pid(self._proc.pid, None)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)
            self._state.remove_pid(self._proc.pid)
            self._proc = None
        self._state.remove_mount(self.mountpoint)

    def clear_cache(self) -> None:
        """Unmount, delete the cache directory's contents, mount again."""
        self.stop()
        if self.cache_dir is not None:
            _rmtree(self.cache_dir)
        self.start()

    def cache_bytes(self) -> int:
        """Bytes allocated in the cache directory (0 without one)."""
        if self.cache_dir is None:
            return 0
        total = 0
        for root, _dirs, files in os.walk(self.cache_dir):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
        return total

    def _log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- the source


def _md5_file(path: Path) -> str:
    """MD5 (s3rver's ETag) of a file, remembered by (dev, ino, size, mtime)."""
    st = path.stat()
    ident = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    memo = CACHE_DIR / "md5.json"
    try:
        known: dict[str, str] = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if ident in known:
        return known[ident]
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    known[ident] = h.hexdigest()
    with contextlib.suppress(OSError):
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(known))
    return known[ident]


def _place(src: Path, dst: Path) -> None:
    """Hard-link src to dst (same filesystem), else copy it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(src, dst)


def _normalize_files(
    files: Iterable[str | os.PathLike[str]] | Mapping[str, Any] | None,
) -> dict[str, Path]:
    """{key: path}: a list of paths gives their basenames as keys."""
    out: dict[str, Path] = {}
    if files is None:
        return out
    items = files.items() if isinstance(files, Mapping) else ((None, f) for f in files)
    for key, path in items:
        p = Path(path).resolve()
        if not p.is_file():
            raise SlowSourceError(f"not a file: {p}")
        k = str(key) if key is not None else p.name
        k = k.strip("/")
        if not k or ".." in k.split("/") or _S3RVER_SUFFIX in k:
            raise SlowSourceError(f"bad object key: {k!r}")
        out[k] = p
    return out


class SlowSource:
    """The benchmark's source directory, real (S3 + netns + tc + s3fs) or plain.

    Use as a context manager (``with SlowSource(files) as src``) or call
    ``start()`` / ``close()``. Attributes once started:

    * ``mountpoint`` (Path): the source directory to mount memcachefs over;
      ``path(key)`` is a file in it.
    * ``tx_bytes()`` -> int | None: bytes sent by the storage server so far
      (the namespace veth's tx counter); None in plain mode.
    * ``server_pid`` (int | None), ``endpoint`` (str | None), ``rate`` (str | None).
    * ``rclone()`` / ``s3fs_cache()`` -> Mount: the alternatives (context managers).
    """

    def __init__(
        self,
        files: Iterable[str | os.PathLike[str]] | Mapping[str, Any] | None = None,
        *,
        plain: bool = False,
        rate: str | int | None = DEFAULT_RATE,
        port: int = DEFAULT_PORT,
        workdir: Path | str = WORKDIR,
        shm_dir: Path | str = SHM_DIR,
        install: bool = True,
        keep_up: bool = False,
        handle_signals: bool = True,
    ) -> None:
        self.files = _normalize_files(files)
        self.plain = plain
        self.rate = None if plain else _rate_arg(rate)
        self.port = port
        self.workdir = Path(workdir)
        self.shm_dir = Path(shm_dir)
        self.install = install
        self.keep_up = keep_up  # CLI `up`: do not tear down on close()
        self.handle_signals = handle_signals
        self.mountpoint: Path = self.workdir / ("plain" if plain else "mnt/source")
        self.data_dir = self.workdir / "s3data"
        self.endpoint: str | None = None if plain else f"http://{NS_ADDR}:{port}"
        self._state = _State()
        self._server: subprocess.Popen[bytes] | None = None
        self._s3fs: Mount | None = None
        self._alts: list[Mount] = []
        self._old_handlers: dict[int, Any] = {}
        self._started = False
        self._owns = False  # set once start() has checked that no one else is up

    # ---- lifecycle

    def __enter__(self) -> SlowSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> SlowSource:
        if self._started:
            return self
        if not self.plain:
            _require_root()
            self._check_not_running()  # before owning anything: never tear down another run
        self._owns = True
        self._install_signal_handlers()
        try:
            if self.plain:
                self._start_plain()
            else:
                self._start_s3()
        except BaseException:
            self.close(force=True)
            raise
        self._started = True
        return self

    def close(self, *, force: bool = False) -> None:
        """Tear down everything this object created (never raises)."""
        self._shield_signals()
        try:
            if (self.keep_up and not force) or not self._owns:
                return
            for alt in reversed(self._alts):
                with contextlib.suppress(Exception):
                    alt.stop()
            self._alts.clear()
            if self.plain:
                _rmtree(self.mountpoint)
            else:
                teardown(self._state.path)
            self._server = None
            self._s3fs = None
            self._started = False
            self._owns = False
        finally:
            self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        if not self.handle_signals:
            return
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            # unwind through the with/finally blocks, which tear down
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, on_signal)

    def _shield_signals(self) -> None:
        """While tearing down, a second Ctrl-C must not interrupt the teardown."""
        if not self._old_handlers:
            return
        for sig in self._old_handlers:
            with contextlib.suppress(Exception):
                signal.signal(sig, signal.SIG_IGN)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, handler)
        self._old_handlers.clear()

    # ---- plain mode

    def _start_plain(self) -> None:
        _rmtree(self.mountpoint)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        for key, path in self.files.items():
            _place(path, self.mountpoint / key)

    # ---- the S3 stack

    def _start_s3(self) -> None:
        teardown(self._state.path)  # leftovers of a dead run
        if self.install:
            ensure_installed()
        elif not _s3rver_installed() or not _have("s3fs"):
            raise SlowSourceError("s3rver/s3fs missing: run `slowsource.py install`")
        self._state.data["info"] = {
            "endpoint": self.endpoint,
            "bucket": BUCKET,
            "rate": self.rate,
            "source": str(self.mountpoint),
            "workdir": str(self.workdir),
            "shm_dir": str(self.shm_dir),
        }
        self._state.save()
        self._setup_network()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._state.add_dir(self.data_dir)
        self._state.add_dir(self.workdir / "mnt")
        self._state.add_dir(self.shm_dir)
        self._populate()
        self._start_server()
        self._mount_source()

    def _check_not_running(self) -> None:
        data = _State.load(self._state.path)
        if not data:
            return
        owner, st = data.get("owner_pid"), data.get("owner_starttime")
        if data.get("detached"):
            raise SlowSourceError(
                f"the slow source is up (`slowsource.py up`, {self._state.path}); "
                "run `slowsource.py down` first"
            )
        if owner and owner != os.getpid() and _pid_alive(owner, st):
            raise SlowSourceError(
                f"the slow source is in use by pid {owner} ({self._state.path}); "
                "run `slowsource.py down` if it is stale"
            )

    def _setup_network(self) -> None:
        self._state.data["netns"] = NETNS
        self._state.data["veth"] = {"host": VETH_HOST, "ns": VETH_NS}
        self._state.save()
        ns = ["ip", "netns", "exec", NETNS]
        _run(["ip", "netns", "add", NETNS])
        _run(["ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS])
        _run(["ip", "link", "set", VETH_NS, "netns", NETNS])
        _run(["ip", "addr", "add", f"{HOST_ADDR}/{PREFIX_LEN}", "dev", VETH_HOST])
        _run(["ip", "link", "set", VETH_HOST, "up"])
        _run([*ns, "ip", "addr", "add", f"{NS_ADDR}/{PREFIX_LEN}", "dev", VETH_NS])
        _run([*ns, "ip", "link", "set", VETH_NS, "up"])
        _run([*ns, "ip", "link", "set", "lo", "up"])
        if self.rate:
            _run(
                [
                    *ns,
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    VETH_NS,
                    "root",
                    "tbf",
                    "rate",
                    self.rate,
                    "burst",
                    "1mbit",
                    "latency",
                    "50ms",
                ]
            )

    def _populate(self) -> None:
        """Pre-populate s3rver's on-disk layout (hard links: no copy, no upload)."""
        bucket = self.data_dir / BUCKET
        bucket.mkdir(parents=True, exist_ok=True)
        for key, path in self.files.items():
            self._put_local(key, path)

    def _put_local(self, key: str, path: Path) -> None:
        parts = key.split("/")
        d = self.data_dir.joinpath(BUCKET, *parts[:-1])
        base = d / (parts[-1] + _S3RVER_SUFFIX)
        _place(path, Path(str(base) + "object"))
        Path(str(base) + "object.md5").write_text(_md5_file(path))
        Path(str(base) + "metadata.json").write_text(
            json.dumps(
                {
                    "content-type": "application/octet-stream",
                    # s3fs: a regular file 0644 (without it, 0640)
                    "x-amz-meta-mode": str(0o100644),
                }
            )
        )

    def add_file(self, path: str | os.PathLike[str], key: str | None = None) -> Path:
        """Add a file to the source after start; returns its path in the source.

        Add files before reading their names through a mount: s3fs may cache a
        negative lookup for a short while.
        """
        files = _normalize_files({key: path} if key else [path])
        ((k, p),) = files.items()
        self.files[k] = p
        if self.plain:
            _place(p, self.mountpoint / k)
        else:
            self._put_local(k, p)
        return self.path(k)

    def _start_server(self) -> None:
        log = open(self.workdir / "s3rver.log", "ab")  # noqa: SIM115
        try:
            self._server = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    NETNS,
                    "node",
                    str(S3RVER_JS),
                    "-d",
                    str(self.data_dir),
                    "-a",
                    NS_ADDR,
                    "-p",
                    str(self.port),
                    "--silent",
                    "--allow-mismatched-signatures",
                    "--no-vhost-buckets",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        # `ip netns exec` execs node: this pid is the server's
        self._state.add_pid("s3rver", self._server.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                tail = (self.workdir / "s3rver.log").read_text(errors="replace")[-2000:]
                raise SlowSourceError(f"s3rver exited with {self._server.returncode}: {tail}")
            with contextlib.suppress(OSError), socket.create_connection((NS_ADDR, self.port), 0.5):
                return
            time.sleep(0.1)
        raise SlowSourceError("s3rver did not listen within 30s")

    def _passwd_file(self) -> Path:
        f = self.workdir / "s3fs.passwd"
        f.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        f.chmod(0o600)
        return f

    def _s3fs_argv(self, mountpoint: Path, opts: list[str]) -> list[str]:
        base = [
            f"url={self.endpoint}",
            "use_path_request_style",
            f"passwd_file={self._passwd_file()}",
            "ro",
        ]
        return ["s3fs", BUCKET, str(mountpoint), "-f", "-o", ",".join(base + opts)]

    def _mount_source(self) -> None:
        self._s3fs = Mount(
            "s3fs-source",
            self._s3fs_argv(self.mountpoint, ["direct_io"]),
            self.mountpoint,
            self._state,
            log_path=self.workdir / "s3fs-source.log",
        ).start()

    # ---- queries

    def path(self, key: str) -> Path:
        return self.mountpoint / key

    @property
    def server_pid(self) -> int | None:
        return self._server.pid if self._server else None

    def tx_bytes(self) -> int | None:
        """Bytes the storage server has sent (ns-side veth tx counter); None if plain."""
        if self.plain:
            return None
        return read_tx_bytes()

    # ---- alternatives

    def _need_s3(self, what: str) -> None:
        if self.plain:
            raise AlternativeUnavailable(f"{what} needs the S3 source (not plain mode)")
        if not self._started:
            raise SlowSourceError("start() the source first")

    def rclone(
        self,
        *,
        cache_dir: Path | str | None = None,
        extra_args: Iterable[str] = (),
    ) -> Mount:
        """Mount the bucket with ``rclone mount --vfs-cache-mode full`` (cache on /dev/shm).

        Returns a started Mount (a context manager that unmounts on exit).
        ``clear_cache()`` gives a cold cache.
        """
        self._need_s3("rclone")
        if not _have("rclone"):
            ensure_installed()
        cache = Path(cache_dir) if cache_dir else self.shm_dir / "rclone-cache"
        mnt = self.workdir / "mnt" / "rclone"
        conf = self.workdir / "rclone.conf"
        conf.write_text(
            "[bench]\n"
            "type = s3\n"
            "provider = Other\n"
            "env_auth = false\n"
            f"access_key_id = {ACCESS_KEY}\n"
            f"secret_access_key = {SECRET_KEY}\n"
            f"endpoint = {self.endpoint}\n"
            "force_path_style = true\n"
        )
        conf.chmod(0o600)
        self._state.add_dir(cache)
        argv = [
            "rclone",
            "--config",
            str(conf),
            "mount",
            f"bench:{BUCKET}",
            str(mnt),
            "--read-only",
            "--vfs-cache-mode",
            "full",
            "--cache-dir",
            str(cache),
            *extra_args,
        ]
        m = Mount(
            "rclone", argv, mnt, self._state, cache_dir=cache, log_path=self.workdir / "rclone.log"
        )
        self._alts.append(m)
        return m.start()

    def s3fs_cache(
        self,
        *,
        cache_dir: Path | str | None = None,
        extra_opts: Iterable[str] = (),
    ) -> Mount:
        """Mount the bucket with ``s3fs -o ro,use_cache=/dev/shm/...`` (what a user does).

        No direct_io (the kernel page cache works as usual: s3fs does not set
        keep_cache, so it is dropped on each open). Returns a started Mount;
        ``clear_cache()`` gives a cold cache.
        """
        self._need_s3("s3fs use_cache")
        cache = Path(cache_dir) if cache_dir else self.shm_dir / "s3fs-cache"
        mnt = self.workdir / "mnt" / "s3fs-cache"
        self._state.add_dir(cache)
        argv = self._s3fs_argv(mnt, [f"use_cache={cache}", *extra_opts])
        m = Mount(
            "s3fs-cache",
            argv,
            mnt,
            self._state,
            cache_dir=cache,
            log_path=self.workdir / "s3fs-cache.log",
        )
        self._alts.append(m)
        return m.start()

    def detach(self) -> None:
        """Leave everything up after this process exits (CLI `up`); `down` removes it."""
        self.keep_up = True
        self._state.data["detached"] = True
        if self.plain:
            self._state.data["info"] = {"source": str(self.mountpoint), "plain": True}
            self._state.data["dirs"] = [str(self.mountpoint)]
        self._state.save()


def read_tx_bytes(netns: str = NETNS, dev: str = VETH_NS) -> int:
    """tx_bytes of the namespace-side veth (bytes sent by the server)."""
    r = _run(["ip", "-n", netns, "-s", "-j", "link", "show", "dev", dev])
    return int(json.loads(r.stdout)[0]["stats64"]["tx"]["bytes"])


# --------------------------------------------------------------------------- CLI


def _status(as_json: bool) -> int:
    data = _State.load()
    if not data:
        print(json.dumps({"up": False}) if as_json else "down (no state file)")
        return 1
    out: dict[str, Any] = {"up": True, **data.get("info", {})}
    out["mounts"] = {m: _mounted(Path(m)) for m in data.get("mounts", [])}
    out["pids"] = {
        f"{p['name']}:{p['pid']}": _pid_alive(p["pid"], p.get("starttime"))
        for p in data.get("pids", [])
    }
    ns = str(data.get("netns") or "")
    out["netns"] = ns if ns and Path(f"/run/netns/{ns}").exists() else None
    if out["netns"]:
        with contextlib.suppress(Exception):
            out["tx_bytes"] = read_tx_bytes(ns)
        r = subprocess.run(
            ["tc", "-n", ns, "-j", "qdisc", "show", "dev", VETH_NS],
            capture_output=True,
            text=True,
            check=False,
        )
        with contextlib.suppress(ValueError):
            out["qdisc"] = [
                {"kind": q.get("kind"), **q.get("options", {})}
                for q in json.loads(r.stdout or "[]")
            ]
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="install s3fs, rclone, node/npm, s3rver (idempotent)")
    up = sub.add_parser("up", help="stand up the source and leave it running")
    up.add_argument("files", nargs="*", help="files to put in the bucket (key = basename)")
    up.add_argument("--rate", default=DEFAULT_RATE, help="egress cap, tc syntax (0 = uncapped)")
    up.add_argument("--port", type=int, default=DEFAULT_PORT)
    up.add_argument("--plain", action="store_true", help="plain directory, no network")
    up.add_argument("--rclone", action="store_true", help="also mount rclone (vfs-cache full)")
    up.add_argument("--s3fs-cache", action="store_true", help="also mount s3fs use_cache")
    st = sub.add_parser("status", help="what is up")
    st.add_argument("--json", action="store_true")
    sub.add_parser("down", help="tear everything down (also leftovers of dead runs)")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "install":
            _require_root()
            ensure_installed()
            return 0
        if args.cmd == "down":
            teardown(verbose=True)
            if Path(f"/run/netns/{NETNS}").exists():
                _log("warning: netns still present")
                return 1
            return 0
        if args.cmd == "status":
            return _status(args.json)
        src = SlowSource(args.files, plain=args.plain, rate=args.rate, port=args.port)
        src.start()
        try:
            alts = []
            if args.rclone:
                alts.append(src.rclone())
            if args.s3fs_cache:
                alts.append(src.s3fs_cache())
        except BaseException:
            src.close(force=True)
            raise
        src.detach()
        src.close()
        print(f"source: {src.mountpoint}")
        if src.endpoint:
            print(f"endpoint: {src.endpoint} bucket {BUCKET} rate {src.rate or 'uncapped'}")
            print(f"server pid: {src.server_pid}  tx_bytes: {src.tx_bytes()}")
        for a in alts:
            print(f"{a.name}: {a.mountpoint} (cache {a.cache_dir})")
        return 0
    except SlowSourceError as e:
        print(f"slowsource: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
