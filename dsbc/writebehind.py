"""Store writes that must not wait in the event loop: applied in order by one thread, on a
store connection of its own, retried until they land.

    wb = WriteBehind(cfg.store.url, cfg.store.unknown, store)
    task = loop.create_task(wb.run())
    wb.submit(lambda s: s.put_session(session))     # written at once, or queued: never waits
    ...
    await wb.close()                                 # a last flush at shutdown

Why: the SQLite store waits up to its busy timeout (5 s) for another process's write
lock, and a Redis that stopped answering up to its socket timeout.  Inside the event loop
that wait would stop every request of the worker (the API and, in worker 0, SIP too).
Here the wait happens in a thread, on a store object of its own (``load=False``: its own
connection and lock, so the loop's reads and refreshes never queue behind it).

When nothing is queued, ``submit`` first tries the write at once on a third connection
whose busy timeout is ``FAST_TIMEOUT`` (50 ms): in the normal case the write has landed
when ``submit`` returns, so another node that gets the next request finds it (an API
session made here, SPEC section 7).  Only when that attempt meets a lock does the write
go to the queue (and everything after it, to keep the order).

Nothing submitted is lost to a stall: a batch that fails is retried, in order, with what
came after it, bounded (``max_pending`` operations; the oldest go first, counted).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from .store import open_store
from .store.base import LocationStore, StoreError
from .store.sqlite import SqliteStore
from .store.sqlite_schema import sqlite_path

log = logging.getLogger("dsbc.store")

__all__ = ["WriteBehind"]

Op = Callable[[LocationStore], None]


class WriteBehind:
    RETRY = 0.5
    FAST_TIMEOUT = 0.05

    def __init__(
        self, url: str, unknown: str, fallback: LocationStore, max_pending: int = 100_000
    ) -> None:
        self.url = url
        self.unknown = unknown
        self.fallback = fallback
        # a private in-memory database cannot be shared by a second connection
        self._shared = url.endswith(":memory:")
        self.max_pending = max_pending
        self._ops: collections.deque[Op] = collections.deque()
        self._wake = asyncio.Event()
        self._store: LocationStore | None = None
        self._fast: LocationStore | None = None
        self._fast_next_try = 0.0  # opening the fast connection failed: not before then
        self._running = False
        self._failing = False
        self.written = 0
        self.dropped = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        return len(self._ops)

    @property
    def idle(self) -> bool:
        """Everything submitted has landed (nothing queued, nothing being written)."""
        return not self._ops and not self._running

    def submit(self, op: Op) -> None:
        if self.idle:
            fast = self._fast_store()
            if fast is not None:
                try:
                    op(fast)
                    self.written += 1
                    return
                except StoreError:
                    pass  # busy: queue it (and what follows, in order)
        self._ops.append(op)
        while len(self._ops) > self.max_pending:
            self._ops.popleft()
            self.dropped += 1
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                ops = list(self._ops)
                self._ops.clear()
                self._running = True
                try:
                    await asyncio.to_thread(self._apply, ops)
                except Exception as exc:  # noqa: BLE001 - the store may be away: retry
                    self.failures += 1
                    if not self._failing:
                        log.warning("store writes delayed (%d kept, retried): %s", len(ops), exc)
                    self._failing = True
                    self._ops.extendleft(reversed(ops))
                    await asyncio.sleep(self.RETRY)
                    continue
                finally:
                    self._running = False
                if self._failing:
                    log.info("store writes go through again")
                self._failing = False

    async def close(self) -> None:
        """A last flush (bounded by the store's own timeouts), then close the connection."""
        if self._ops:
            ops = list(self._ops)
            self._ops.clear()
            try:
                await asyncio.to_thread(self._apply, ops)
            except Exception as exc:  # noqa: BLE001 - shutting down: report and go
                log.warning("%d store writes lost at shutdown: %s", len(ops), exc)
        for st in (self._store, self._fast):
            if st is not None:
                try:
                    st.close()
                except Exception:
                    log.debug("closing a write-behind store", exc_info=True)
        self._store = self._fast = None

    def _fast_store(self) -> LocationStore | None:
        if self._shared or not self.url.startswith("sqlite:"):
            return None
        if self._fast is None:
            if time.monotonic() < self._fast_next_try:
                return None
            try:
                self._fast = SqliteStore(
                    sqlite_path(self.url), self.unknown, load=False, busy_timeout=self.FAST_TIMEOUT
                )
            except StoreError:
                self._fast_next_try = time.monotonic() + 5.0  # the store is busy or away
                return None
        return self._fast

    def _apply(self, ops: list[Op]) -> None:
        if self._shared:
            store = self.fallback
        else:
            if self._store is None:
                self._store = open_store(self.url, self.unknown, load=False)
            store = self._store
        done = 0
        try:
            for op in ops:
                op(store)
                done += 1
        finally:
            # what went through is not applied twice on a retry
            del ops[:done]
            self.written += done
