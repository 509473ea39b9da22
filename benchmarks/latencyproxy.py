"""A TCP proxy that makes one capped link behave more like object storage.

Each HTTP request pays a latency and each connection's response is throttled:

* **latency**: the first bytes of each request on a connection (the first client
  bytes after the server last answered, or after the connection opened) are held
  for ``--latency-ms`` before they are forwarded; the time to first byte of every
  request is that much longer;
* **per-connection rate**: what the server sends is paced to ``--per-connection-rate``
  per connection (a token bucket, a burst of 1/20 s), so that N parallel
  connections get up to N times that, until the link cap (tc tbf, outside this
  proxy) is reached.

Standard library only (asyncio), so that it runs under ``ip netns exec`` with any
Python. The slow-source harness runs it inside its namespace, in front of s3rver
(``slowsource.py --profile object-store``); alone:

    python benchmarks/latencyproxy.py --listen 10.203.0.2:4569 --upstream 10.203.0.2:4568 \\
        --latency-ms 30 --per-connection-rate 200mbit

It prints ``ready`` once it listens, and exits on SIGTERM/SIGINT (SIGUSR1: its counters,
as one JSON line on stderr; again at exit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import time

CHUNK = 64 * 1024
UNITS = {  # tc's syntax: bit = bits/s, bps = bytes/s
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
    "bps": 1,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
}


def rate_bytes(text: str) -> float:
    """A rate in tc's syntax ("200mbit", "25mbps"; a bare number: bits/s) as bytes/s; 0: none."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-z]*)\s*", str(text).lower())
    if not match or (match[2] and match[2] not in UNITS):
        raise ValueError(f"not a rate: {text!r} (e.g. 200mbit, 25mbps)")
    return float(match[1]) * UNITS[match[2] or "bit"]


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Pacer:
    """A token bucket: `rate` bytes/s, a burst of `burst_s` seconds' worth."""

    def __init__(self, rate: float, burst_s: float = 0.05) -> None:
        self.rate, self.burst_s = rate, burst_s
        self.free_at = time.monotonic()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.free_at = max(self.free_at, now - self.burst_s) + n / self.rate
        if self.free_at > now:
            await asyncio.sleep(self.free_at - now)


class Proxy:
    def __init__(self, upstream: tuple[str, int], latency_s: float, rate: float) -> None:
        self.upstream, self.latency_s, self.rate = upstream, latency_s, rate
        self.connections = self.requests = self.sent = self.open = self.most_open = 0

    def counters(self) -> dict[str, int]:
        """Connections, requests (first bytes after an answer), bytes sent, most open at once."""
        keys = ("connections", "requests", "sent", "most_open")
        return {key: getattr(self, key) for key in keys}

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # at exit: connections still open
            await self.relay(client_r, client_w)

    async def relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        answered = [True]  # the next client bytes start a new request

        async def up() -> None:  # client -> server: each request waits the latency
            while chunk := await client_r.read(CHUNK):
                if answered[0]:
                    self.requests += 1
                    if self.latency_s:
                        await asyncio.sleep(self.latency_s)
                answered[0] = False
                server_w.write(chunk)
                await server_w.drain()
            with contextlib.suppress(OSError):
                server_w.write_eof()

        async def down() -> None:  # server -> client: paced per connection
            pacer = Pacer(self.rate)
            while chunk := await server_r.read(CHUNK):
                answered[0] = True
                await pacer.take(len(chunk))
                self.sent += len(chunk)
                client_w.write(chunk)
                await client_w.drain()
            with contextlib.suppress(OSError):
                client_w.write_eof()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.exception() for t in done if not t.cancelled()):
                for t in pending:
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.open -= 1
            for writer in (client_w, server_w):
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()


async def serve(args: argparse.Namespace) -> None:
    proxy = Proxy(
        address(args.upstream), args.latency_ms / 1000, rate_bytes(args.per_connection_rate)
    )
    host, port = address(args.listen)
    server = await asyncio.start_server(proxy.handle, host, port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: print(json.dumps(proxy.counters()), file=sys.stderr, flush=True)
    )
    print("ready", flush=True)
    async with server:
        await stop.wait()
    print(json.dumps(proxy.counters()), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the server")
    parser.add_argument("--latency-ms", type=float, default=30.0, help="added to each request")
    parser.add_argument("--per-connection-rate", default="200mbit", help="tc syntax; 0: none")
    args = parser.parse_args(argv)
    try:
        rate_bytes(args.per_connection_rate)
    except ValueError as error:
        parser.error(str(error))
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
