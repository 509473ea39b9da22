"""Membership: static list, DNS re-resolution, the peers file, recognising ourselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from memcachefs.config import ClusterConfig
from memcachefs.errors import ConfigError
from memcachefs.membership import RESOLVE_TIMEOUT_S, Membership, member_id, read_peers_file


class FakeDNS:
    def __init__(self) -> None:
        self.answers: dict[str, list[str] | OSError] = {}
        self.silent: set[str] = set()  # names it never answers for
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if host in self.silent:
            await trio.sleep_forever()
        answer = self.answers.get(host, [host])
        if isinstance(answer, OSError):
            raise answer
        return [member_id(ip, port) for ip in answer]


async def test_static_peers_and_self_by_listen_address() -> None:
    config = ClusterConfig(
        listen=("127.0.0.1", 7001),
        peers=(("127.0.0.1", 7001), ("127.0.0.2", 7002)),
        secret=b"s",
    )
    membership = Membership(config, resolver=FakeDNS())
    await membership.refresh()
    assert membership.self_id == "127.0.0.1:7001"
    assert membership.peers == {"127.0.0.2:7002"}


async def test_wildcard_listener_recognises_a_local_address() -> None:
    dns = FakeDNS()
    dns.answers["svc"] = ["127.0.0.1", "192.0.2.10"]  # 192.0.2.0/24 is never local
    config = ClusterConfig(listen=("0.0.0.0", 7000), peers_dns=("svc", 7000), secret=b"s")
    membership = Membership(config, resolver=dns)
    await membership.refresh()
    assert membership.self_id == "127.0.0.1:7000"
    assert membership.peers == {"192.0.2.10:7000"}


async def test_dns_answers_are_followed_and_failures_keep_the_last_answer() -> None:
    dns = FakeDNS()
    dns.answers["svc"] = ["192.0.2.1", "192.0.2.2"]
    membership = Membership(ClusterConfig(peers_dns=("svc", 7000)), resolver=dns)
    await membership.refresh()
    assert membership.peers == {"192.0.2.1:7000", "192.0.2.2:7000"}
    version = membership.version
    dns.answers["svc"] = ["192.0.2.2", "192.0.2.3"]  # scale-out and scale-in
    await membership.refresh()
    assert membership.peers == {"192.0.2.2:7000", "192.0.2.3:7000"}
    assert membership.version == version + 1
    dns.answers["svc"] = OSError("temporary failure")
    await membership.refresh()
    assert membership.peers == {"192.0.2.2:7000", "192.0.2.3:7000"}
    assert membership.statistics().membership_errors == 1


async def test_peers_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text("# the cluster\n127.0.0.2:7000\n\n127.0.0.3:7000  # another\n")
    membership = Membership(ClusterConfig(peers_file=path), resolver=FakeDNS())
    await membership.refresh(names=False)
    assert membership.peers == {"127.0.0.2:7000", "127.0.0.3:7000"}
    path.write_text("127.0.0.4:7000\n")
    os.utime(path, ns=(1, 10**18))  # a distinct mtime, however fast the test runs
    await membership.refresh(names=False)
    assert membership.peers == {"127.0.0.4:7000"}


def test_bad_peers_file_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text("127.0.0.2:7000\nnot an address\n")
    with pytest.raises(ConfigError, match=":2:"):
        read_peers_file(path)


def test_every_listener_needs_a_secret() -> None:
    for host in ("0.0.0.0", "127.0.0.1", "localhost", "::1"):
        with pytest.raises(ValueError, match="cluster-secret-file"):
            ClusterConfig(listen=(host, 7000))
        ClusterConfig(listen=(host, 7000), secret=b"s")
    ClusterConfig(peers=(("127.0.0.1", 7000),))  # a client alone needs none


async def test_start_up_does_not_wait_on_a_resolver_that_never_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dns = FakeDNS()
    dns.answers["svc"] = ["192.0.2.1"]
    dns.silent.add("svc")
    config = ClusterConfig(peers=(("127.0.2.2", 7000),), peers_dns=("svc", 7000))
    membership = Membership(config, resolver=dns)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        with trio.fail_after(1):
            await nursery.start(membership.run)
        assert trio.current_time() == start  # started before any lookup answered
        await trio.sleep(RESOLVE_TIMEOUT_S + 0.5)  # the DNS lookup is given up on
        assert membership.peers == {"127.0.2.2:7000"}
        stats = membership.statistics()
        assert (stats.membership_errors, stats.membership_lookup_timeouts) == (1, 1)
        dns.silent.clear()  # the resolver answers again: the next refresh picks it up
        await trio.sleep(config.dns_refresh_s + 1.5)
        assert membership.peers == {"127.0.2.2:7000", "192.0.2.1:7000"}
        nursery.cancel_scope.cancel()
