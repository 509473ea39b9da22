"""Peers share their memory: a server answering block requests, a client asking them.

Small modules, one job each:

- `server`: PeerServer, answering authenticated requests from memory or, as
  the owner, from its own source (never from a third peer).
- `client`: PeerClient, the loader's PeerFetcher: asks the cluster on a miss,
  under a deadline, and keeps nothing unverified.
- `routing`: which peer to ask (the rendezvous owner over the live members,
  or a less loaded known holder of the file).
- `pool`: kept-alive connections per peer and one request/response exchange.
- `health`: a failing peer's backoff and probe.
- `wire`: the one receive loop, filling the block buffer straight from the socket.

The frames themselves are `memcachefs.protocol` (pure, sync).
"""

from memcachefs.peers.client import PeerClient, PeerClientStatistics
from memcachefs.peers.server import PeerServer, PeerServerStatistics

__all__ = ["PeerClient", "PeerClientStatistics", "PeerServer", "PeerServerStatistics"]
