"""The Redis store's background thread: pub/sub, health probes and full reloads.

The dispatcher's event loop never waits for Redis because of this thread: it listens on
the change channel, probes the change sequence once a second (a message lost while the
connection was down is then noticed too), and builds a complete new index when one is
needed (the first connection after a start from the cache file, a bulk import, a node
that fell behind the trimmed change log, a store restored from another copy).  It only
*tells* the store: flags, a queue of session keys, a finished index, then the
`notify` callback; the store applies all of it in `refresh()`, on the caller's thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from .memory import MemoryIndex

if TYPE_CHECKING:
    from .redis_store import RedisStore

log = logging.getLogger("dsbc.store")

PROBE_EVERY = 1.0  # seconds between sequence probes (and the longest a lost message waits)
RETRY_MIN, RETRY_MAX = 0.2, 1.0  # reconnect back-off


Row = tuple[str, str, str, str, str, int, str | None]


def decode_record(raw: str) -> tuple[str, str, str, str, int, tuple[str, ...]]:
    """``[system, state, group, batch_id, expires_cap, [keys]]`` (cjson writes [] as {})."""
    rec = msgspec.json.decode(raw)
    keys = rec[5] if len(rec) > 5 and isinstance(rec[5], list) else []
    return str(rec[0]), str(rec[1]), str(rec[2]), str(rec[3]), int(rec[4] or 0), tuple(keys)


def record_rows(cid: str, raw: str) -> Iterator[Row]:
    system, state, group, batch, cap, keys = decode_record(raw)
    if not keys:
        yield (cid, system, state, group, batch, cap, None)
    for key in keys:
        yield (cid, system, state, group, batch, cap, key)


def load_index(client: Any, prefix: str, page: int = 5000) -> tuple[MemoryIndex, int, str]:
    """A complete index from Redis, and the change sequence it is at least as new as.

    HSCAN is not a snapshot: the sequence is read first, so replaying the change log from
    it afterwards brings every customer that changed during the scan up to date."""
    pipe = client.pipeline(transaction=True)
    pipe.get(prefix + "seq")
    pipe.get(prefix + "epoch")
    seq_raw, epoch = pipe.execute()

    def rows() -> Iterator[Row]:
        cursor = 0
        while True:
            cursor, data = client.hscan(prefix + "cust", cursor, count=page)
            for cid, raw in data.items():
                yield from record_rows(cid, raw)
            if int(cursor) == 0:
                return

    return MemoryIndex.build(rows()), int(seq_raw or 0), epoch or ""


class Watcher(threading.Thread):
    """One per loaded store; `stop()` ends it within a second."""

    def __init__(self, store: RedisStore) -> None:
        super().__init__(name="dsbc-redis-watch", daemon=True)
        self.store = store
        self.stopping = threading.Event()
        self.reload_wanted = threading.Event()
        self._client: Any = None
        self._pubsub: Any = None

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        backoff = RETRY_MIN
        while not self.stopping.is_set():
            try:
                self._session()
                backoff = RETRY_MIN
            except Exception as exc:  # noqa: BLE001 - redis errors, and anything else: retry
                self.store._went_down(exc)
                self._close()
                # what this node applied since the last periodic write goes to the cache
                # file now: a worker started during the outage (a reload, a restart) starts
                # from it, and no change can come in before Redis is back
                if self.store._cache_dirty:
                    self.store._write_cache()
                self.stopping.wait(backoff)
                backoff = min(RETRY_MAX, backoff * 2)
        self._close()

    def _close(self) -> None:
        for thing in (self._pubsub, self._client):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.close()
        self._pubsub = self._client = None

    def _session(self) -> None:
        """Connect, subscribe, then listen and probe until an error or stop()."""
        st = self.store
        self._client = client = st.target.client(timeout=2.0, connect_timeout=1.0,
                                                 health_check_interval=1)
        self._pubsub = ps = client.pubsub(ignore_subscribe_messages=True)
        ps.subscribe(st.prefix + "changes", st.prefix + "sessions")
        # a session deleted while we were not subscribed: forget the cached ones (they are
        # read again from Redis on their next use)
        st._drop_sessions.set()
        self._probe(client)
        next_probe = time.monotonic() + PROBE_EVERY
        while not self.stopping.is_set():
            if self.reload_wanted.is_set():
                self.reload_wanted.clear()
                self._reload(client)
            msg = ps.get_message(timeout=min(0.2, max(0.0, next_probe - time.monotonic())))
            if msg is not None and msg.get("type") == "message":
                if msg["channel"].endswith("changes"):
                    with contextlib.suppress(ValueError):
                        st._remote_seq = max(st._remote_seq, int(msg["data"]))
                    st._changes.set()
                    st._wake()
                else:
                    st._gone_sessions.append(str(msg["data"]))
                    st._wake()
            if time.monotonic() >= next_probe:
                self._probe(client)
                next_probe = time.monotonic() + PROBE_EVERY
                if st.cache_due():
                    st._write_cache()

    def _probe(self, client: Any) -> None:
        st = self.store
        pipe = client.pipeline(transaction=True)
        pipe.get(st.prefix + "seq")
        pipe.get(st.prefix + "epoch")
        pipe.hlen(st.prefix + "cust")
        seq_raw, epoch, customers = pipe.execute()
        seq = int(seq_raw or 0)
        st._remote_seq = seq
        st._probed = time.time()
        epoch = epoch or ""
        if epoch != st.expected_epoch():
            if not customers and st._known_customers() > 0:
                st._data_lost(epoch)
                return
            log.warning("store %s has another epoch (%s, was %s): reloading everything",
                        st.target.display, epoch or "none", st._epoch or "none")
            self._reload(client)
            return
        st._lost = ""
        st._came_up()
        if seq < st._last_seq:
            log.warning("store %s went back from change %d to %d: reloading everything",
                        st.target.display, st._last_seq, seq)
            self._reload(client)
        elif seq > st._last_seq:
            st._changes.set()
            st._wake()

    def _reload(self, client: Any) -> None:
        st = self.store
        started = time.monotonic()
        mem, seq, epoch = load_index(client, st.prefix)
        if mem.customer_count == 0 and st._known_customers() > 0:
            st._data_lost(epoch)
            return
        st._offer_index(mem, seq, epoch)
        log.info("store %s: reloaded %d customers in %.1f s", st.target.display,
                 mem.customer_count, time.monotonic() - started)


def call_quietly(fn: Callable[[], None] | None) -> None:
    if fn is None:
        return
    with contextlib.suppress(Exception):  # the loop may be closing: nothing to wake
        fn()
