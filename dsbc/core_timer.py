"""Small adapters shared by the AAA services: one loop timer per I/O-free core, and
time-stamped rows kept in the store's meta table across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

log = logging.getLogger("dsbc")


class CoreTimer:
    """Drives ``core.handle_timer(now)`` at ``core.get_timer()``; call ``arm()`` after
    every input the core handled."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        get_timer: Callable[[], float | None],
        handle_timer: Callable[[float], Any],
        send: Callable[[Any], None],
    ) -> None:
        self.loop = loop
        self._get = get_timer
        self._handle = handle_timer
        self._send = send
        self._timer: asyncio.TimerHandle | None = None
        self._at = 0.0

    def arm(self) -> None:
        when = self._get()
        if when is None:
            return
        if self._timer is not None:
            if self._at <= when:
                return
            self._timer.cancel()
        self._at = when
        self._timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._send(self._handle(self.loop.time()))
        self.arm()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def node_key(base: str, listen: str, store_url: str) -> str:
    """The meta key of this node's rows: nodes sharing one store must not overwrite each
    other's saved rows, so each keeps its own.  A SQLite file is shared by the processes
    of one host only: the listen address tells its nodes apart (and a container's new
    host name does not lose them).  Redis nodes are told apart by host name too: give
    each a stable one (docs/OPERATIONS.md)."""
    if store_url.startswith("redis"):
        return f"{base}@{socket.gethostname()}/{listen}"
    return f"{base}@{listen}"


class PinnedRows:
    """Rows ``[a, b, c, deadline]`` saved as JSON in ``store.set_meta(key)``.  Deadlines
    are loop time in memory and wall-clock time in the store, so they survive a restart."""

    def __init__(self, store: Any, key: str, loop: asyncio.AbstractEventLoop, what: str,
                 legacy_key: str = "") -> None:
        self.store = store
        self.key = key
        self.legacy_key = legacy_key  # read when `key` was never written (an upgrade)
        self.loop = loop
        self.what = what
        self._inflight: asyncio.Future[None] | None = None
        self._others: dict[str, tuple[str, list[Any]]] = {}  # key -> (text, rows) last read

    def _encode(self, rows: Iterable[Sequence[Any]]) -> str:
        offset = time.time() - self.loop.time()
        data = [[a, b, c, float(t) + offset] for a, b, c, t in rows]
        return json.dumps(data, separators=(",", ":"))

    def _write(self, text: str) -> None:
        try:
            self.store.set_meta(self.key, text)
        except Exception as exc:  # noqa: BLE001 - a store outage must not stop dispatching
            log.warning("cannot save %s: %s", self.what, exc)

    def save(self, rows: Iterable[Sequence[Any]]) -> None:
        """Write now, on the caller's thread (at stop, after ``wait_saved``)."""
        if self.store is None:
            return
        self._write(self._encode(rows))

    async def save_async(self, rows: Iterable[Sequence[Any]]) -> None:
        """The periodic save: rows taken on the loop, the store write in a thread, so that a
        store that does not answer (Redis hung or cut off: up to its 10 s write timeout; a
        SQLite file locked by a long write) never stalls the dispatcher's event loop."""
        if self.store is None:
            return
        text = self._encode(rows)
        fut = self._inflight = self.loop.run_in_executor(None, self._write, text)
        await asyncio.shield(fut)

    async def wait_saved(self) -> None:
        """Wait for a periodic save still running in its thread (so that the final save at
        stop is written after it, not overwritten by an older snapshot)."""
        fut = self._inflight
        if fut is not None and not fut.done():
            with contextlib.suppress(Exception):
                await fut

    def load(self) -> list[list[Any]]:
        if self.store is None:
            return []
        try:
            text = self.store.get_meta(self.key)
            if text is None and self.legacy_key:
                text = self.store.get_meta(self.legacy_key)
            rows = json.loads(text) if text else []
        except Exception as exc:  # noqa: BLE001 - start without them
            log.warning("cannot load %s: %s", self.what, exc)
            return []
        return self._decode(rows)

    def load_others(self) -> list[list[Any]] | None:
        """The rows other nodes saved under keys of the same kind (``base@...``): the
        sessions of a node that stopped or died, whose clients keepalived now sends here;
        None when no node saved since the last call (a dead node's 100,000 sessions are
        not decoded again every round).  A blocking store read: call it from a thread,
        never on the event loop."""
        base, at, _ = self.key.partition("@")
        if self.store is None or not at:
            return []
        rows: list[Any] = []
        others: dict[str, tuple[str, list[Any]]] = {}
        try:
            for key in self.store.meta_keys(base + "@"):
                text = self.store.get_meta(key) if key != self.key else None
                if not text:
                    continue
                last = self._others.get(key)
                if last is None or last[0] != text:  # parsed again only when that node saved
                    data = json.loads(text)
                    last = (text, data if isinstance(data, list) else [])
                others[key] = last
                rows += last[1]
        except Exception as exc:  # noqa: BLE001 - tried again at the next round
            # the pins read last stay (as the index does while Redis is away)
            log.debug("cannot read other nodes' %s: %s", self.what, exc)
            return None
        unchanged = others.keys() == self._others.keys() and all(
            v is self._others[k] for k, v in others.items())
        self._others = others
        return None if unchanged else self._decode(rows)

    def _decode(self, rows: Any) -> list[list[Any]]:
        if not isinstance(rows, list):
            return []
        offset = time.time() - self.loop.time()
        return [[r[0], r[1], r[2], float(r[3]) - offset] for r in rows if isinstance(r, list) and len(r) == 4]
