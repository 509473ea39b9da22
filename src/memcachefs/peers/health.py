"""Peer health: a failing peer is left out of the ring for a backoff, then probed.

The backoff doubles with each failure (0.5 s up to 30 s, with jitter); after
it, one request (the probe) is let through; its success brings the peer back.
Failures of requests already in flight while a peer is down do not stretch
the backoff. Pure and sync; times are trio clock readings passed in.
"""

from __future__ import annotations

import random

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


class Health:
    def __init__(self) -> None:
        self.failures = 0
        self.down_until = 0.0
        self.probing = False

    def is_down(self, now: float) -> bool:
        return self.failures > 0 and (now < self.down_until or self.probing)

    def failed(self, now: float) -> bool:
        """Record a failure; True if it starts a new backoff (False while already down)."""
        if self.failures and now < self.down_until:
            return False
        self.failures += 1
        backoff = min(BACKOFF_BASE_S * 2 ** (self.failures - 1), BACKOFF_MAX_S)
        self.down_until = now + backoff * random.uniform(0.75, 1.0)
        return True

    def succeeded(self) -> int:
        """Record a success; the failed tries it ends (0 if the peer was not down)."""
        failures, self.failures, self.down_until = self.failures, 0, 0.0
        return failures
