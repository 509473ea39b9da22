"""Who the peers are: a static list, a DNS name, a peers file; and which one is us.

Members are ids ``"ip:port"`` (``"[v6]:port"``), resolved from the three
sources and refreshed in the background: the static list and the DNS name every
`dns_refresh_s` (a Kubernetes headless Service answers one A record per ready
pod), the peers file whenever its mtime changes (checked every second; one
``HOST:PORT`` per line, ``#`` comments). A source that fails to resolve, or
gets no answer within RESOLVE_TIMEOUT_S, keeps its previous answer. Start-up
never waits on the network: `run` reports started before the first
resolution, and the mount serves local reads while peers are discovered.
The instance itself is recognised by its listen address (or, for a wildcard
listener, by the port and a local IP address) and is kept out of `peers` but
in the ring as `self_id`.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from memcachefs.config import ClusterConfig, parse_host_port
from memcachefs.errors import ConfigError
from memcachefs.events import event
from memcachefs.metrics import counter, gauge

log = logging.getLogger(__name__)

FILE_POLL_S = 1.0
RESOLVE_TIMEOUT_S = 5.0  # one name lookup; past it the lookup counts as failed

Resolver = Callable[[str, int], Awaitable[list[str]]]


def member_id(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_member_id(member: str) -> tuple[str, int]:
    host, _, port = member.rpartition(":")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(host: str, port: int) -> list[str]:
    """Member ids for every address of `host` (one per A/AAAA record)."""
    if _is_ip(host):
        return [member_id(host, port)]
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({member_id(str(info[4][0]), port) for info in infos})


def is_local_address(ip: str) -> bool:
    """Whether `ip` belongs to this host (binding to it succeeds)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((ip, 0))
    except OSError as error:
        if error.errno != errno.EADDRNOTAVAIL:
            log.debug("cannot tell whether %s is local: %s", ip, error)
        return False
    return True


def read_peers_file(path: Path) -> list[tuple[str, int]]:
    """``HOST:PORT`` per line; blank lines and ``#`` comments ignored. ConfigError on a bad line."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                entries.append(parse_host_port(text, "peer"))
            except ConfigError as error:
                raise ConfigError(f"{path}:{number}: {error}") from None
    return entries


@dataclass(frozen=True)
class MembershipStatistics:
    members: int = gauge("peers known (this instance not counted)")
    membership_changes: int = counter("changes of the peer set")
    membership_errors: int = counter("failed resolutions of peer names or the peers file")
    membership_lookup_timeouts: int = counter("peer name lookups without an answer in time")


class Membership:
    """The current peer set; `version` changes whenever it does."""

    def __init__(self, config: ClusterConfig, *, resolver: Resolver = resolve) -> None:
        self._config = config
        self._resolve = resolver
        self._static: list[str] = []
        self._dns: list[str] = []
        self._file: list[str] = []
        self._file_mtime_ns: int | None = None
        self._local_cache: dict[str, bool] = {}
        self._resolved: dict[tuple[str, int], list[str]] = {}
        self.peers: frozenset[str] = frozenset()
        self.version = 0
        self._changes = 0
        self._errors = 0
        self._lookup_timeouts = 0
        self._failing: set[str] = set()
        self.self_id: str | None = None
        if config.listen is not None:
            host, port = config.listen
            self.self_id = member_id(host, port)

    # -- self ------------------------------------------------------------------
    def _is_self(self, member: str) -> bool:
        listen = self._config.listen
        if listen is None:
            return False
        ip, port = split_member_id(member)
        if port != listen[1]:
            return False
        host = listen[0]
        if _is_ip(host) and not ipaddress.ip_address(host).is_unspecified:
            return ipaddress.ip_address(ip) == ipaddress.ip_address(host)
        if ip not in self._local_cache:
            self._local_cache[ip] = is_local_address(ip)
        return self._local_cache[ip]

    # -- refreshing ------------------------------------------------------------
    async def refresh(self, *, names: bool = True) -> None:
        """Re-read the sources (names: the static list and DNS too) and update `peers`."""
        config = self._config
        if names:
            if config.peers:
                static: list[str] = []
                for host, port in config.peers:
                    static += await self._lookup(host, port, f"--peer {host}:{port}")
                self._static = static
            if config.peers_dns is not None:
                host, port = config.peers_dns
                self._dns = await self._lookup(host, port, f"--peers-dns {host}")
        if config.peers_file is not None:
            await self._refresh_file(config.peers_file)
        self._update()

    async def _lookup(self, host: str, port: int, what: str) -> list[str]:
        """Resolve `host`; on failure keep what it resolved to last time."""
        found: list[str] | None = None
        problem = f"no answer within {RESOLVE_TIMEOUT_S:g}s"
        with trio.move_on_after(RESOLVE_TIMEOUT_S) as deadline:
            try:
                found = await self._resolve(host, port)
            except OSError as error:
                problem = str(error)
        if found is None:
            self._errors += 1
            self._lookup_timeouts += deadline.cancelled_caught
            if what not in self._failing:
                self._failing.add(what)
                log.warning("%s does not resolve (%s); keeping its previous members", what, problem)
            return self._resolved.get((host, port), [])
        if what in self._failing:
            self._failing.discard(what)
            log.info("%s resolves again", what)
        self._resolved[(host, port)] = found
        return found

    async def _refresh_file(self, path: Path) -> None:
        try:
            mtime_ns = (await trio.to_thread.run_sync(os.stat, path)).st_mtime_ns
        except OSError as error:
            if self._file_mtime_ns != -1:
                self._errors += 1
                log.warning("peers file %s unreadable (%s); keeping its members", path, error)
                self._file_mtime_ns = -1
            return
        if mtime_ns == self._file_mtime_ns:
            return
        self._file_mtime_ns = mtime_ns
        try:
            entries = await trio.to_thread.run_sync(read_peers_file, path)
        except (OSError, ConfigError) as error:
            self._errors += 1
            log.warning("peers file %s ignored: %s", path, error)
            return
        members: list[str] = []
        for host, port in entries:
            members += await self._lookup(host, port, f"peers file entry {host}:{port}")
        self._file = members

    def _update(self) -> None:
        everyone = set(self._static) | set(self._dns) | set(self._file)
        peers = set()
        for member in everyone:
            if self._is_self(member):
                self.self_id = member  # as the others see us
            else:
                peers.add(member)
        if peers != self.peers:
            added, removed = peers - self.peers, self.peers - peers
            self.peers = frozenset(peers)
            self.version += 1
            self._changes += 1
            event(
                "members_changed",
                members=",".join(sorted(peers)),
                added=",".join(sorted(added)),
                removed=",".join(sorted(removed)),
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report started at once, then resolve and keep the member set fresh."""
        task_status.started()
        log.info("discovering peers in the background")
        await self.refresh()
        names_every = max(FILE_POLL_S, self._config.dns_refresh_s)
        since_names = 0.0
        while True:
            await trio.sleep(FILE_POLL_S)
            since_names += FILE_POLL_S
            names = since_names >= names_every
            if names:
                since_names = 0.0
            await self.refresh(names=names)

    def statistics(self) -> MembershipStatistics:
        return MembershipStatistics(
            members=len(self.peers),
            membership_changes=self._changes,
            membership_errors=self._errors,
            membership_lookup_timeouts=self._lookup_timeouts,
        )
