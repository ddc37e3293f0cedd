"""Registrations written to the store off the event loop, on a connection of their own.

The SIP workers learn of every registration they relay (SPEC section 6, registration
hand-over) and record them in the store once a second.  A store that stalls (another
process holding SQLite's write lock, a Redis that stopped answering) must not stall SIP:
a write that waits 5 s for a lock inside the event loop would hold every call of that
worker for 5 s.  So the writes run in a thread, on a store opened for this purpose
(``load=False``: no index, its own connection and its own lock, so the worker's lookups
and refreshes never queue behind a blocked write).

Nothing relayed is lost to a stall: a failed write is kept and retried with what came
after it, bounded (``MAX_PENDING`` records; the oldest go first, counted) so a store
that is away for hours cannot fill the memory.  Registrations are soft state anyway:
every phone renews its own before it expires.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from .store import open_store
from .store.base import LocationStore, Registration

log = logging.getLogger("dsbc.sip")

MAX_PENDING = 100_000

__all__ = ["RegistrationWriter"]


class RegistrationWriter:
    def __init__(
        self,
        url: str,
        unknown: str,
        fallback: LocationStore,
        opener: Callable[[], LocationStore] | None = None,
    ) -> None:
        self.url = url
        self.unknown = unknown
        # a private in-memory database cannot be shared by a second connection
        self._shared = url.endswith(":memory:")
        self._fallback = fallback
        self._opener = opener or (lambda: open_store(self.url, self.unknown, load=False))
        self._store: LocationStore | None = None
        self._pending: collections.deque[Registration] = collections.deque()
        self._writing = False
        self._failing = False
        self.written = 0
        self.dropped = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, regs: list[Registration]) -> None:
        self._pending.extend(regs)
        over = len(self._pending) - MAX_PENDING
        for _ in range(max(0, over)):
            self._pending.popleft()
            self.dropped += 1

    async def flush(self) -> None:
        """Write what is pending in a thread; one write at a time."""
        if self._writing or not self._pending:
            return
        regs = list(self._pending)
        self._pending.clear()
        self._writing = True
        try:
            await asyncio.to_thread(self._write, regs)
        except Exception as exc:  # noqa: BLE001 - the store may be away; dispatching goes on
            self.failures += 1
            if not self._failing:
                log.warning("could not record %d registrations (kept, retried): %s", len(regs), exc)
            self._failing = True
            self._pending.extendleft(reversed(regs))
            self.add([])  # re-apply the bound
        else:
            if self._failing:
                log.info("registrations are recorded again (%d written)", len(regs))
            self._failing = False
            self.written += len(regs)
        finally:
            self._writing = False

    def close(self) -> None:
        """At shutdown: a last synchronous write (bounded by the store's busy timeout)."""
        if self._pending and not self._writing:
            regs = list(self._pending)
            self._pending.clear()
            try:
                self._write(regs)
            except Exception as exc:  # noqa: BLE001 - shutting down: report and go
                log.warning("could not record %d registrations at shutdown: %s", len(regs), exc)
        if self._store is not None and not self._writing:
            try:
                self._store.close()
            except Exception:
                log.debug("closing the registration store", exc_info=True)
            self._store = None

    def _write(self, regs: list[Registration]) -> None:
        if self._shared:
            self._fallback.record_registrations(regs)
            return
        if self._store is None:
            self._store = self._opener()
        self._store.record_registrations(regs)
