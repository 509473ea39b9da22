"""Notable events: one log line each, with structured fields.

`event("mounted", source=..., mountpoint=...)` logs one INFO line (WARNING with
`level=logging.WARNING`) whose message names the event and its fields; the
fields also ride on the record (`record.event`, `record.fields`) so that
``--log-format json`` turns them into JSON keys. Events are rare by design:
never one per block at INFO.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("memcachefs.events")


def event(name: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one line for the event `name` with its fields."""
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    log.log(
        level,
        "%s%s%s",
        name,
        " " if text else "",
        text,
        extra={"event": name, "fields": fields},
    )


class RateLimitedEvent:
    """An event logged at most once per `interval_s`; the lines left out are counted
    and reported as `suppressed` on the next line."""

    def __init__(
        self,
        name: str,
        interval_s: float,
        *,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.level = level
        self._clock = clock
        self._last_s: float | None = None
        self.suppressed = 0

    def __call__(self, **fields: Any) -> bool:
        """Log the event unless one was logged less than `interval_s` ago; True if logged."""
        now = self._clock()
        if self._last_s is not None and now - self._last_s < self.interval_s:
            self.suppressed += 1
            return False
        self._last_s = now
        event(self.name, level=self.level, suppressed=self.suppressed, **fields)
        self.suppressed = 0
        return True
