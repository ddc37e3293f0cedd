"""Log lines that anyone on the network can cause, bounded: a budget per time window.

``LogBudget(log, burst=10, window=60.0).log(logging.WARNING, "msg %s", arg)`` logs the
first ``burst`` lines of each window and counts the rest; the first line of the next
window is preceded by one summary ("N more ... not logged").  A host that opens
connections in a loop (a Diameter port on the public address) then writes a few lines a
minute to the log instead of one per connection, and cannot fill the disk with it.
No I/O of its own: a caller with a clock of its own (the SIP core's ``now``) passes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["LogBudget"]


class LogBudget:
    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        burst: int = 10,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.what = what
        self.burst = burst
        self.window = window
        self.clock = clock
        self._end = 0.0
        self._count = 0
        self.suppressed = 0  # in the current window
        self.suppressed_total = 0

    def log(self, level: int, msg: str, *args: object, now: float | None = None) -> None:
        if now is None:
            now = self.clock()
        if now >= self._end:
            if self.suppressed:
                self.logger.warning("%d more %s not logged in the last %g s", self.suppressed, self.what,
                                    self.window)
            self._end = now + self.window
            self._count = 0
            self.suppressed = 0
        if self._count < self.burst:
            self._count += 1
            self.logger.log(level, msg, *args)
        else:
            self.suppressed += 1
            self.suppressed_total += 1
