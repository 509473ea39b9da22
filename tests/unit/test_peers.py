"""Peer server and client in one process over loopback: auth, paths, integrity, faults."""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
import xxhash

from memcachefs import protocol
from memcachefs.blockstore import BlockStore
from memcachefs.config import ClusterConfig
from memcachefs.hashring import HashRing
from memcachefs.keys import BlockKey, FileVersion
from memcachefs.loader import Loader
from memcachefs.membership import Membership
from memcachefs.peers import PeerClient, PeerServer
from memcachefs.peers import server as peer_server
from memcachefs.peers.client import PEER_THREADS
from memcachefs.protocol import RESPONSE_HEADER_BYTES, Request
from memcachefs.source import Source, version_of
from memcachefs.testing.faultproxy import FaultProxy

BS = 64 * 1024
SECRET = b"s3cret"


@dataclass
class Served:
    server: PeerServer
    loader: Loader
    source: Source
    port: int


@pytest.fixture
def root(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"top secret " * 10_000)
    root = tmp_path / "source"
    (root / "dir").mkdir(parents=True)
    (root / "model.bin").write_bytes(random.Random(1).randbytes(5 * BS + 100))
    (root / "dir" / "a.bin").write_bytes(b"a" * BS)
    (root / "many.bin").write_bytes(random.Random(2).randbytes(40 * BS))
    (root / "escape").symlink_to(outside / "secret.txt")
    (root / "linkdir").symlink_to(outside)
    return root


@asynccontextmanager
async def serving(root: Path, secret: bytes = SECRET) -> AsyncIterator[Served]:
    with Source(root, block_threads=2, metadata_threads=2) as source:
        async with trio.open_nursery() as nursery:
            loader = Loader(BlockStore(64 * BS, BS), source, nursery, read_ahead_blocks=0)
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            server = PeerServer(loader, listeners, secret=secret, timeout_s=5)
            await nursery.start(server.run)
            yield Served(server, loader, source, server.addresses[0][1])
            nursery.cancel_scope.cancel()


def version(root: Path, relpath: bytes) -> FileVersion:
    return version_of(relpath, os.lstat(root / os.fsdecode(relpath)))


def request(key: BlockKey, *, secret: bytes = SECRET, **changes: object) -> bytes:
    fields: dict[str, object] = {
        "key": key,
        "block_size": BS,
        "memory_only": False,
        "timestamp_ns": time.time_ns(),
        "nonce": os.urandom(16),
    }
    fields.update(changes)
    return protocol.encode_request(Request(**fields), secret)  # type: ignore[arg-type]


async def receive_exactly(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, "connection closed mid-answer"
        data += chunk
    return data


async def answer(stream: trio.SocketStream) -> tuple[protocol.ResponseHeader, bytes, bytes]:
    head = await receive_exactly(stream, RESPONSE_HEADER_BYTES)
    response = protocol.parse_response_header(head, max_payload=BS)
    path = await receive_exactly(stream, response.path_len)
    return response, path, await receive_exactly(stream, response.payload_len)


async def ask(port: int, wire: bytes) -> tuple[protocol.ResponseHeader, bytes, bytes]:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(wire)
        return await answer(stream)


async def closed_without_a_word(port: int, wire: bytes) -> bool:
    """Send `wire`; True if the server closes the connection having sent nothing."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(wire)
        with trio.fail_after(5):
            try:
                return await stream.receive_some(1 << 16) == b""
            except trio.BrokenResourceError:
                return True


# -- server ------------------------------------------------------------------------


async def test_server_answers_from_its_source_and_then_from_memory(root: Path) -> None:
    async with serving(root) as served:
        key = BlockKey(version(root, b"model.bin"), 5)
        data = (root / "model.bin").read_bytes()
        async with await trio.open_tcp_stream("127.0.0.1", served.port) as stream:
            for _ in range(2):  # keep-alive: two exchanges on one connection
                await stream.send_all(request(key))
                response, path, payload = await answer(stream)
                assert response.status == protocol.HIT
                assert path == b"model.bin"
                assert payload == data[5 * BS :] and len(payload) == 100
                assert response.checksum == xxhash.xxh3_64_intdigest(payload)
        stats = served.server.statistics()
        assert stats.blocks_served_to_peers == 2
        assert served.loader.statistics().source_bytes == 100  # filled once, then memory


async def test_memory_only_requests_never_fill(root: Path) -> None:
    async with serving(root) as served:
        key = BlockKey(version(root, b"model.bin"), 0)
        response, _, payload = await ask(served.port, request(key, memory_only=True))
        assert (response.status, payload) == (protocol.MISS, b"")
        assert served.loader.statistics().source_bytes == 0
        await served.loader.block(key, BS)
        response, _, payload = await ask(served.port, request(key, memory_only=True))
        assert response.status == protocol.HIT and len(payload) == BS


async def test_another_version_is_a_miss_and_a_bad_block_size_said_so(root: Path) -> None:
    async with serving(root) as served:
        current = version(root, b"model.bin")
        older = FileVersion(current.relpath, current.size, current.mtime_ns - 1)
        response, _, payload = await ask(served.port, request(BlockKey(older, 0)))
        assert (response.status, payload) == (protocol.MISS, b"")
        wire = request(BlockKey(current, 0), block_size=2 * BS)
        assert (await ask(served.port, wire))[0].status == protocol.BLOCK_SIZE
        beyond = BlockKey(current, 6)
        assert (await ask(served.port, request(beyond)))[0].status == protocol.ERROR


@pytest.mark.parametrize(
    "relpath",
    [
        b"../outside/secret.txt",
        b"dir/../../outside/secret.txt",
        b"/etc/passwd",
        b"model.bin\0",
        b"x" * 256,
        b"dir/" + b"y" * 300,
        b"./model.bin",
        b"dir//a.bin",
        b"escape",  # a symlink to a file outside the root
        b"linkdir/secret.txt",  # through a symlink to a directory outside
        b"",
        b"dir",
    ],
)
async def test_paths_outside_the_root_are_refused(root: Path, relpath: bytes) -> None:
    secret_size = (root.parent / "outside" / "secret.txt").stat().st_size
    async with serving(root) as served:
        key = BlockKey(FileVersion(relpath, secret_size, 1), 0)
        response, _, payload = await ask(served.port, request(key))
        assert response.status != protocol.HIT
        assert payload == b""
        assert served.server.statistics().blocks_served_to_peers == 0
        assert served.loader.statistics().source_bytes == 0


async def test_wrong_secret_gets_nothing(root: Path) -> None:
    async with serving(root) as served:
        key = BlockKey(version(root, b"model.bin"), 0)
        assert await closed_without_a_word(served.port, request(key, secret=b"wrong"))
        assert await closed_without_a_word(served.port, request(key, secret=b""))
        stats = served.server.statistics()
        assert stats.peer_auth_failures == 2
        assert stats.peer_requests_served == 0
        assert served.loader.statistics().source_bytes == 0


async def test_a_replayed_request_gets_nothing(root: Path) -> None:
    async with serving(root) as served:
        wire = request(BlockKey(version(root, b"model.bin"), 0))
        assert (await ask(served.port, wire))[0].status == protocol.HIT
        assert await closed_without_a_word(served.port, wire)
        assert served.server.statistics().peer_auth_failures == 1


async def test_stale_and_future_timestamps_get_nothing(root: Path) -> None:
    async with serving(root) as served:
        key = BlockKey(version(root, b"model.bin"), 0)
        for skew_s in (-120, 120):
            wire = request(key, timestamp_ns=time.time_ns() + skew_s * 10**9)
            assert await closed_without_a_word(served.port, wire)
        assert served.server.statistics().peer_auth_failures == 2


async def test_garbage_and_absurd_lengths_get_nothing(root: Path) -> None:
    async with serving(root) as served:
        assert await closed_without_a_word(served.port, os.urandom(protocol.REQUEST_HEADER_BYTES))
        assert await closed_without_a_word(
            served.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 40
        )
        # A header announcing a 64 KiB path: refused at once, the path is never awaited.
        wire = bytearray(request(BlockKey(version(root, b"model.bin"), 0)))
        wire[6:8] = (0xFFFF).to_bytes(2, "big")
        assert await closed_without_a_word(
            served.port, bytes(wire[: protocol.REQUEST_HEADER_BYTES])
        )
        assert served.server.statistics().peer_protocol_errors == 3


async def test_drain_finishes_answers_and_takes_no_more(root: Path) -> None:
    async with serving(root) as served:
        key = BlockKey(version(root, b"model.bin"), 1)
        async with await trio.open_tcp_stream("127.0.0.1", served.port) as idle_connection:
            await served.server.drain()
            assert await idle_connection.receive_some(10) == b""  # idle: closed
        with pytest.raises(OSError):
            await ask(served.port, request(key))


# -- connection bounds -------------------------------------------------------------


async def test_idle_connections_at_the_bound_make_room_for_a_peer(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(peer_server, "MAX_CONNECTIONS", 8)
    async with serving(root) as served:
        idle = [await trio.open_tcp_stream("127.0.0.1", served.port) for _ in range(30)]
        garbage = [await trio.open_tcp_stream("127.0.0.1", served.port) for _ in range(10)]
        for stream in garbage:
            await stream.send_all(os.urandom(protocol.REQUEST_HEADER_BYTES))
        client = await client_for([f"127.0.0.1:{served.port}"])
        key = BlockKey(version(root, b"model.bin"), 1)
        assert await client.fetch_into(key, memoryview(bytearray(BS))) is not None
        stats = served.server.statistics()
        assert stats.peer_connections <= 8
        assert stats.peer_connections_displaced >= 30 - 8
        assert stats.peer_connections_rejected == 0
        warnings = [r for r in caplog.records if "peer connections" in r.getMessage()]
        assert len(warnings) == 1  # rate-limited
        for stream in idle + garbage:
            await stream.aclose()
        client.close()


async def test_displacing_never_holds_more_connections_than_the_bound(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_server, "MAX_CONNECTIONS", 4)
    open_at_admission: list[int] = []
    serve_requests = PeerServer._serve_requests

    async def recording(self: PeerServer, stream: Any, first: trio.CancelScope) -> None:
        open_at_admission.append(self.statistics().peer_connections)
        await serve_requests(self, stream, first)

    monkeypatch.setattr(PeerServer, "_serve_requests", recording)
    async with serving(root) as served:
        idle = [await trio.open_tcp_stream("127.0.0.1", served.port) for _ in range(20)]
        await trio.testing.wait_all_tasks_blocked()
        assert served.server.statistics().peer_connections_displaced == 16
        assert max(open_at_admission) <= 4
        for stream in idle:
            await stream.aclose()


async def test_authenticated_connections_are_not_displaced(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_server, "MAX_CONNECTIONS", 1)
    async with serving(root) as served:
        client = await client_for([f"127.0.0.1:{served.port}"])
        key = BlockKey(version(root, b"model.bin"), 1)
        buffer = memoryview(bytearray(BS))
        assert await client.fetch_into(key, buffer) is not None  # kept alive in the pool
        assert await closed_without_a_word(served.port, b"")
        assert served.server.statistics().peer_connections_rejected == 1
        assert await client.fetch_into(key, buffer) is not None  # the kept-alive one serves
        client.close()


async def test_a_connection_without_a_request_is_closed_after_the_first_deadline(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_server, "FIRST_REQUEST_S", 0.2)
    async with serving(root) as served:
        async with await trio.open_tcp_stream("127.0.0.1", served.port) as stream:
            with trio.fail_after(5):
                assert await stream.receive_some(10) == b""
        # Once authenticated, only the idle deadline applies.
        key = BlockKey(version(root, b"model.bin"), 0)
        async with await trio.open_tcp_stream("127.0.0.1", served.port) as stream:
            await stream.send_all(request(key))
            assert (await answer(stream))[0].status == protocol.HIT
            await trio.sleep(0.5)
            await stream.send_all(request(key))
            assert (await answer(stream))[0].status == protocol.HIT


# -- client ------------------------------------------------------------------------


async def client_for(
    addresses: list[str], *, listen: tuple[str, int] | None = None, timeout_s: float = 5.0
) -> PeerClient:
    peers = tuple((a.split(":")[0], int(a.split(":")[1])) for a in addresses)
    membership = Membership(ClusterConfig(listen=listen, peers=peers, secret=SECRET))
    await membership.refresh()
    return PeerClient(membership, block_size=BS, secret=SECRET, timeout_s=timeout_s)


async def test_client_reads_a_file_from_a_peer_without_touching_its_source(
    root: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"  # the client's own source has nothing: every byte is the peer's
    empty.mkdir()
    async with serving(root) as served:
        client = await client_for([f"127.0.0.1:{served.port}"])
        file_version = version(root, b"model.bin")
        with Source(empty, block_threads=2, metadata_threads=2) as own_source:
            async with trio.open_nursery() as nursery:
                loader = Loader(
                    BlockStore(16 * BS, BS), own_source, nursery, read_ahead_blocks=0, peers=client
                )
                data = b"".join(
                    [
                        bytes((await loader.block(BlockKey(file_version, i), BS)).view)
                        for i in range(6)
                    ]
                )
                nursery.cancel_scope.cancel()
        assert data == (root / "model.bin").read_bytes()
        stats = loader.statistics()
        assert (stats.source_bytes, stats.peer_bytes, stats.peer_hits) == (0, len(data), 6)
        assert client.statistics().peer_connections_opened == 1  # one kept-alive connection
        client.close()


async def test_requests_on_the_wire_never_outnumber_the_receiving_threads(
    root: Path, tmp_path: Path
) -> None:
    """Beyond them a request's socket waits undrained, and the peer's send with it, until
    the peer gives up and closes the connection mid-transfer."""
    empty = tmp_path / "empty"
    empty.mkdir()
    async with serving(root) as served:
        lookup = served.server._lookup

        async def slow_lookup(request: Any) -> Any:
            await trio.sleep(0.05)
            return await lookup(request)

        served.server._lookup = slow_lookup  # type: ignore[method-assign]
        client = await client_for([f"127.0.0.1:{served.port}"])
        file_version = version(root, b"many.bin")
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, served.server.statistics().peer_requests_in_flight)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as fetches:
                for index in range(32):
                    fetches.start_soon(
                        client.fetch_into, BlockKey(file_version, index), memoryview(bytearray(BS))
                    )
            nursery.cancel_scope.cancel()
        assert 2 <= most <= PEER_THREADS
        stats = client.statistics()
        assert (stats.peer_fetches, stats.peer_fetch_misses, stats.peer_errors_closed) == (32, 0, 0)
        client.close()


async def test_owner_self_asks_the_second_ranked_peer_from_memory_only(root: Path) -> None:
    async with serving(root) as served:
        client = await client_for([f"127.0.0.1:{served.port}"], listen=("127.0.0.1", 1))
        file_version = version(root, b"many.bin")
        keys = [BlockKey(file_version, i) for i in range(40)]
        choices = [client.choose(key) for key in keys]
        assert all(choice is not None for choice in choices)
        memory_only = [key for key, c in zip(keys, choices, strict=True) if c and c[1]]
        assert memory_only, "with two members this instance owns some of 40 blocks"
        buffer = memoryview(bytearray(BS))
        assert await client.fetch_into(memory_only[0], buffer) is None  # cold peer: a miss
        await served.loader.block(memory_only[0], BS)
        assert await client.fetch_into(memory_only[0], buffer) is not None
        assert served.loader.statistics().source_bytes == BS  # only our own fill above
        client.close()


async def test_a_refused_peer_is_marked_down_and_not_retried_at_once() -> None:
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = await client_for([f"127.0.0.1:{port}"])
    key = BlockKey(FileVersion(b"f", BS, 1), 0)
    buffer = memoryview(bytearray(BS))
    assert await client.fetch_into(key, buffer) is None
    assert await client.fetch_into(key, buffer) is None  # down: not asked again
    stats = client.statistics()
    assert (stats.peer_errors_refused, stats.peer_fetches, stats.peers_down) == (1, 1, 1)


async def test_a_peer_with_another_block_size_is_logged_once_and_backed_off(
    root: Path, caplog: pytest.LogCaptureFixture, wait_for
) -> None:
    async with serving(root) as served:
        peers = (("127.0.0.1", served.port),)
        membership = Membership(ClusterConfig(peers=peers, secret=SECRET))
        await membership.refresh()
        client = PeerClient(membership, block_size=2 * BS, secret=SECRET, timeout_s=5)
        file_version = version(root, b"many.bin")
        keys = [BlockKey(file_version, i) for i in range(4)]

        async def fetch(key: BlockKey) -> None:
            assert await client.fetch_into(key, memoryview(bytearray(2 * BS))) is None

        async with trio.open_nursery() as nursery:  # a reader and its readahead
            for key in keys:
                nursery.start_soon(fetch, key)
        for key in keys:  # in backoff: not asked
            await fetch(key)
        stats = client.statistics()
        assert stats.peers_down == 1
        assert stats.peer_errors_block_size == stats.peer_fetches <= len(keys)
        # Past the first backoff: probed once more, still refused.
        await wait_for(lambda: client.choose(keys[0]) is not None, "the backoff ended")
        await fetch(keys[0])
        assert client.statistics().peer_errors_block_size == stats.peer_fetches + 1
        warnings = [r for r in caplog.records if "block-size" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert served.server.statistics().blocks_served_to_peers == 0
        client.close()


async def test_a_wrong_secret_is_counted_as_auth(root: Path) -> None:
    async with serving(root, secret=b"another") as served:
        client = await client_for([f"127.0.0.1:{served.port}"])
        key = BlockKey(version(root, b"model.bin"), 0)
        assert await client.fetch_into(key, memoryview(bytearray(BS))) is None
        assert client.statistics().peer_errors_auth == 1
        assert served.server.statistics().peer_auth_failures == 1


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("flip", "peer_errors_checksum"),
        ("version", "peer_errors_version"),
        ("drop", "peer_errors_closed"),
        ("stall", "peer_errors_timeout"),
        ("refuse", "peer_errors_closed"),
    ],
)
async def test_faulty_answers_are_discarded_and_counted(root: Path, mode: str, kind: str) -> None:
    async with serving(root) as served, trio.open_nursery() as nursery:
        proxy = FaultProxy(("127.0.0.1", served.port), mode=mode)
        await nursery.start(proxy.run)
        client = await client_for([f"127.0.0.1:{proxy.port}"], timeout_s=0.5)
        key = BlockKey(version(root, b"model.bin"), 2)
        buffer = memoryview(bytearray(BS))
        assert await client.fetch_into(key, buffer) is None
        stats = client.statistics()
        errors = getattr(stats, kind)
        if mode == "refuse":  # a reset that lands before connect() returns fails the connect
            errors += stats.peer_errors_refused
        assert errors == 1, stats
        assert stats.peers_down == 1
        assert proxy.faults >= 1
        client.close()
        nursery.cancel_scope.cancel()


async def test_a_peer_is_asked_again_after_its_backoff(root: Path) -> None:
    async with serving(root) as served, trio.open_nursery() as nursery:
        proxy = FaultProxy(("127.0.0.1", served.port), mode="refuse")
        await nursery.start(proxy.run)
        client = await client_for([f"127.0.0.1:{proxy.port}"])
        key = BlockKey(version(root, b"model.bin"), 1)
        buffer = memoryview(bytearray(BS))
        assert await client.fetch_into(key, buffer) is None
        proxy.mode = "pass"
        with trio.fail_after(10):  # the backoff starts at 0.5 s
            while await client.fetch_into(key, buffer) is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert bytes(buffer) == (root / "model.bin").read_bytes()[BS : 2 * BS]
        assert client.statistics().peers_down == 0
        client.close()
        nursery.cancel_scope.cancel()


# -- known holders -----------------------------------------------------------------


def owned_by(member: str, members: list[str], keys: list[BlockKey]) -> list[BlockKey]:
    ring = HashRing(members)
    return [key for key in keys if ring.ranked(key)[0] == member]


async def fetch_all(
    client: PeerClient, keys: list[BlockKey]
) -> dict[BlockKey, tuple[int | None, bytes]]:
    """Fetch `keys` concurrently (as a reader's readahead does)."""
    results: dict[BlockKey, tuple[int | None, bytes]] = {}

    async def one(key: BlockKey) -> None:
        buffer = memoryview(bytearray(key.length(BS)))
        results[key] = (await client.fetch_into(key, buffer), bytes(buffer))

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(one, key)
    return results


def a_peer(client: PeerClient, member: str) -> Any:
    choice = client.choose(BlockKey(FileVersion(b"f", BS, 1), 0))
    assert choice is not None
    peer = client._router.peers[member]
    peer.in_flight = 1  # as if it were busy: any known holder is less loaded
    return peer


async def test_load_spreads_over_two_warm_holders(root: Path) -> None:
    async with serving(root) as a, serving(root) as b:
        file_version = version(root, b"many.bin")
        keys = [BlockKey(file_version, i) for i in range(40)]
        for served in (a, b):  # both hold the whole file
            for key in keys:
                await served.loader.block(key, BS)
        members = [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
        client = await client_for(members)
        # One block owned by each teaches the client that both hold this file.
        await fetch_all(client, [owned_by(m, members, keys)[0] for m in members])
        assert client.statistics().peer_holder_fetches == 0  # nothing known yet: the owners
        served_before = [s.server.statistics().blocks_served_to_peers for s in (a, b)]
        # Eight blocks owned by A at once: with one in flight to A, B is less loaded.
        wanted = owned_by(members[0], members, keys)[1:9]
        assert len(wanted) == 8, "40 blocks over 2 members: about 20 each"
        results = await fetch_all(client, wanted)
        data = (root / "many.bin").read_bytes()
        for key, (checksum, payload) in results.items():
            assert checksum is not None
            assert payload == data[key.index * BS : (key.index + 1) * BS]
        served_now = [s.server.statistics().blocks_served_to_peers for s in (a, b)]
        from_a, from_b = (
            now - before for now, before in zip(served_now, served_before, strict=True)
        )
        assert from_a + from_b == 8
        assert from_a >= 1 and from_b >= 1, (from_a, from_b)
        stats = client.statistics()
        assert stats.peer_holder_hits == from_b == stats.peer_holder_fetches
        assert a.loader.statistics().source_bytes == b.loader.statistics().source_bytes == 40 * BS
        client.close()


async def test_a_holder_that_misses_is_followed_by_the_owner(root: Path) -> None:
    async with serving(root) as a, serving(root) as b:
        file_version = version(root, b"many.bin")
        keys = [BlockKey(file_version, i) for i in range(40)]
        members = [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
        own_a, own_b = owned_by(members[0], members, keys), owned_by(members[1], members, keys)
        await b.loader.block(own_b[0], BS)  # B holds one block of the file only
        client = await client_for(members)
        assert (await fetch_all(client, [own_b[0]]))[own_b[0]][0] is not None
        # Two blocks owned by A at once: one of them goes to B first, which misses.
        results = await fetch_all(client, own_a[:2])
        data = (root / "many.bin").read_bytes()
        for key, (checksum, payload) in results.items():
            assert checksum is not None
            assert payload == data[key.index * BS : (key.index + 1) * BS]
        stats = client.statistics()
        assert (stats.peer_holder_fetches, stats.peer_holder_hits) == (1, 0)
        assert stats.peer_fetch_misses == 1
        assert b.server.statistics().peer_misses_served == 1
        assert b.loader.statistics().source_bytes == BS  # memory only: B filled nothing
        assert a.server.statistics().blocks_served_to_peers == 2
        assert stats.peers_down == 0
        # B missed: it is no longer taken for a holder of this file, not even
        # after serving a block it filled from its source as the owner...
        assert (await fetch_all(client, [own_b[1]]))[own_b[1]][0] is not None
        assert b.loader.statistics().source_bytes == 2 * BS
        results = await fetch_all(client, own_a[2:4])
        assert all(checksum is not None for checksum, _ in results.values())
        assert client.statistics().peer_holder_fetches == 1  # B not asked again
        # ...only after a hit from its memory.
        assert client.holder_for(own_a[4], a_peer(client, members[0])) is None
        client._router.remember(file_version, members[1], hit=True, memory_only=True)
        assert client.holder_for(own_a[4], a_peer(client, members[0])) is not None
        client.close()


async def test_a_failing_holder_is_followed_by_the_owner(root: Path) -> None:
    async with serving(root) as a, serving(root) as b, trio.open_nursery() as nursery:
        proxy = FaultProxy(("127.0.0.1", b.port), mode="pass")
        await nursery.start(proxy.run)
        file_version = version(root, b"many.bin")
        keys = [BlockKey(file_version, i) for i in range(40)]
        members = [f"127.0.0.1:{a.port}", f"127.0.0.1:{proxy.port}"]
        own_a, own_b = owned_by(members[0], members, keys), owned_by(members[1], members, keys)
        for key in keys:
            await b.loader.block(key, BS)
        client = await client_for(members, timeout_s=2)
        assert (await fetch_all(client, [own_b[0]]))[own_b[0]][0] is not None
        proxy.mode = "drop"
        results = await fetch_all(client, own_a[:2])
        data = (root / "many.bin").read_bytes()
        for key, (checksum, payload) in results.items():
            assert checksum is not None
            assert payload == data[key.index * BS : (key.index + 1) * BS]
        stats = client.statistics()
        assert (stats.peer_holder_fetches, stats.peer_holder_hits) == (1, 0)
        assert stats.peer_errors_closed + stats.peer_errors_refused == 1
        assert stats.peers_down == 1
        assert a.server.statistics().blocks_served_to_peers == 2
        client.close()
        nursery.cancel_scope.cancel()
