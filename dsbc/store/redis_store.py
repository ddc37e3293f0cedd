"""The shared location store on Redis: the same model and guarantees as the SQLite store,
for several dispatcher nodes behind one floating IP.

- Every write is one Lua script (`redis_lua.SCRIPT`): a migration, a rollback, a lock,
  an import chunk commit whole or not at all, with the audit log, the change log entry
  (a Redis stream keyed by a sequence number) and a PUBLISH of that number.
- Every process keeps the in-memory index (`MemoryIndex`): lookups never touch the
  network.  A background thread (`redis_watch.Watcher`) listens for change
  notifications and probes the sequence once a second; `refresh()` (called by the
  runner every `store.poll_interval`, and at once when the thread wakes it through
  `set_notify`) reads the change log since the last applied sequence and reloads the
  customers it names.  A node that missed more than the kept log (or sees a bulk
  import) gets a complete new index, built by the thread and swapped in by `refresh()`.
- Redis away: lookups go on from memory, `healthy` is False (with a `reason`), writes
  raise StoreUnavailable, registrations and API sessions are kept and written when Redis
  returns, and `refresh()` costs nothing until the thread sees Redis again; then the
  change log since the last applied sequence is replayed (nothing missed is lost).
- Timeouts: the calls `refresh()`, registrations and sessions make on the dispatcher's
  loop use a 100 ms socket timeout, and none is tried while Redis is known to be away.
  Operator writes (migrate, import) use a longer one: a migration is never sent twice.
- ``cache_file`` (store.cache_file): a copy of the index on local disk, so a node
  restarted while Redis is away still dispatches (flagged unhealthy until Redis returns).
  Meta values set while Redis is away (the accounting pins and Diameter sessions a
  worker saves when a reload replaces it) are kept beside it (``<cache_file>.meta``) for
  the worker that starts next, and written to Redis when it returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .base import (
    LOCK_LEASE,
    SYSTEMS,
    ApiSession,
    AuditEntry,
    BatchCancelled,
    BatchSummary,
    Customer,
    CustomerRow,
    GroupSplitError,
    LockedByBatch,
    MigrationResult,
    Registration,
    StoreError,
    StoreUnavailable,
)
from .memory import IndexedStore, MemoryIndex, canon, new_batch_id, unique_keys
from .redis_cache import read_cache, read_kept_meta, write_cache, write_kept_meta
from .redis_conn import RedisTarget, parse_redis_url
from .redis_lua import LOG_MAXLEN, SCRIPT
from .redis_side import MAX_PENDING, SideData
from .redis_watch import Watcher, call_quietly, decode_record, load_index

__all__ = ["RedisStore"]

log = logging.getLogger("dsbc.store")

FAST_TIMEOUT = 0.1  # socket timeout of the calls made on a dispatcher's event loop
WRITE_TIMEOUT = 10.0  # operator writes (a 20,000-customer migration is one script)
BULK = 1000  # an import of more rows is written in chunks and logged as one reload
CHUNK = 2000  # rows per import script
FETCH = 1000  # customers per HMGET
LOG_PAGE = 100  # change-log entries read per refresh step ...
MAX_CATCH_UP = 5000  # ... and customers reloaded (a worker's loop never waits long)
CACHE_EVERY = 10.0  # seconds between writes of the cache file while changes come in
REPLICA_WAIT = 1.0  # seconds a write waits for a replica of the master to confirm it


def _ids(value: Any) -> list[str]:
    return [str(x) for x in value] if isinstance(value, list) else []


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.exceptions.RedisError, OSError)


def _why(exc: BaseException) -> str:
    """redis-py's reason, short: a Sentinel's "No master found for 'svc' : <redis.client.Redis(
    <ConnectionPool(<Connection(...)>)>)>" is cut at its object dump, and any text at 300."""
    text = str(exc).split(" : <", 1)[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _auth_failure(url: str, target: RedisTarget, exc: BaseException) -> str:
    """What a refused login means, or "" for another error.  redis-py files it under
    connection errors, but Redis was reached: "cannot reach" would send the operator to
    the network."""
    import redis

    text = str(exc)
    if not (isinstance(exc, redis.exceptions.AuthenticationError) or text.startswith("NOAUTH")):
        return ""
    if target.password is None:
        return (f"{url} requires a password: put it in store.url "
                "(redis://:PASSWORD@host:port/db, or redis://USER:PASSWORD@... for an ACL user)")
    return f"{url} refused the user name or password in store.url ({_why(exc)})"


class RedisStore(IndexedStore):
    def __init__(
        self,
        url: str,
        unknown: str = "source",
        *,
        load: bool = True,
        create: bool = True,
        cache_file: str = "",
        fast_timeout: float = FAST_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        import redis

        self.target: RedisTarget = parse_redis_url(url)
        self.url = self.target.display
        self.prefix = self.target.prefix
        self.unknown = unknown
        self.cache_file = cache_file
        self._errors = _redis_errors()
        self._timeout_error = redis.exceptions.TimeoutError
        self._response_error = redis.exceptions.ResponseError
        self._connection_error = redis.exceptions.ConnectionError
        self._w = self.target.client(timeout=write_timeout, connect_timeout=min(2.0, write_timeout))
        self._r = self.target.client(timeout=fast_timeout, connect_timeout=fast_timeout)
        self._script = self._w.register_script(SCRIPT)
        self._lock = threading.RLock()
        self._owner = threading.get_ident()
        self._mem: MemoryIndex | None = None
        self._last_seq = 0
        self._epoch = ""
        self._remote_seq = 0
        self._replicas_seen = (0.0, 0)  # (monotonic time, count): INFO once a second, not per write
        self._applied_at = 0.0  # time.time() of the last change applied (lag)
        self._probed = 0.0
        self._up = False
        self._reason = ""  # why healthy is False
        self._lost = ""  # Redis came back empty: its data are lost, we keep ours
        self._changes = threading.Event()
        self._drop_sessions = threading.Event()
        self._gone_sessions: deque[str] = deque(maxlen=MAX_PENDING)
        self._offered: tuple[MemoryIndex, int, str] | None = None
        self._expected_epoch = ""  # of an offered index not swapped in yet
        self._notify: Callable[[], None] | None = None
        self._side = SideData(self)
        self._meta: dict[str, str] = {}  # kept in the cache file too (sip.flow_secret)
        self._meta_pending: dict[str, str] = {}  # set while Redis was away: written when back
        self._cache_written = 0.0
        self._cache_dirty = False
        self._cache_lock = threading.Lock()
        self._watcher: Watcher | None = None
        try:
            epoch = self._w.get(self.prefix + "epoch")
            if epoch is None and not create and self._w.hlen(self.prefix + "cust") == 0:
                raise StoreError(f"no store at {self.url} (dsbc import creates it)")
            self._up = True
            if load:
                self._meta_pending = read_kept_meta(self._kept_meta_file())
                self._flush_meta(self._w)
                self._meta = dict(self._w.hgetall(self.prefix + "meta"))
                mem, seq, epoch = load_index(self._w, self.prefix)
                if mem.customer_count or not (cache_file and self._cache_over_empty_store(epoch)):
                    self._swap(mem, seq, epoch)
        except self._errors as exc:
            if not load:
                raise self._unavailable("opening the store", exc, writing=False) from None
            if not (cache_file and self._load_cache()):
                hint = "" if cache_file else " (set store.cache_file to start from a local copy)"
                raise self._unavailable("opening the store", exc, writing=False, hint=hint) from None
            self._went_down(exc)
        if load:
            self._write_cache()
            self._watcher = Watcher(self)
            self._watcher.start()

    # -- errors and health ----------------------------------------------------------------

    def _unavailable(self, what: str, exc: BaseException, writing: bool = True,
                     hint: str = "", sent: bool = False) -> StoreUnavailable:
        """`sent`: the write went out on a connection that was up; lost before its answer,
        it may have been applied (a master killed right after running the script)."""
        unsure = ("; it may or may not have been applied: check with `dsbc where` or "
                  "`dsbc status`") if writing else ""
        if isinstance(exc, self._timeout_error):
            return StoreUnavailable(f"{what} failed: {self.url} did not answer in time{unsure}{hint}")
        tail = "; nothing was changed" if writing else ""
        if sent and isinstance(exc, self._connection_error) and not self._never_connected(exc):
            tail = unsure
        auth = _auth_failure(self.url, self.target, exc)
        if auth:  # (a cache file would not help: this is the configuration)
            return StoreUnavailable(f"{what} failed: {auth}{tail}")
        if isinstance(exc, self._response_error):  # e.g. NOREPLICAS, READONLY, MISCONF
            return StoreUnavailable(f"{what} failed: {self.url} refused it ({_why(exc)}){tail}{hint}")
        return StoreUnavailable(f"{what} failed: cannot reach {self.url} ({_why(exc)}){tail}{hint}")

    def _never_connected(self, exc: BaseException) -> bool:
        """A connection error raised before anything was sent: no connection (redis-py's
        "Error 111 connecting to ..."), no master known to the Sentinels, a refused login."""
        import redis.sentinel

        return (isinstance(exc, (redis.sentinel.MasterNotFoundError, redis.exceptions.AuthenticationError))
                or " connecting to " in str(exc))

    def _went_down(self, exc: BaseException) -> None:
        reason = _auth_failure(self.url, self.target, exc)
        if not reason and isinstance(exc, self._response_error):  # OOM at maxmemory, MISCONF ...
            reason = f"{self.url} refuses writes: {_why(exc)}"
        if self._up or not self._reason:
            if reason:
                log.warning("store: %s (dispatching from memory)", reason)
            else:
                log.warning("store %s unreachable (dispatching from memory): %s", self.url, _why(exc))
        self._up = False
        self._reason = reason or f"cannot reach {self.url}: {_why(exc)}"

    def _came_up(self) -> None:
        if not self._up:
            log.info("store %s reachable again: catching up from change %d", self.url, self._last_seq)
        self._up = True
        self._reason = ""
        self._changes.set()
        self._wake()

    def _data_lost(self, epoch: str) -> None:
        if not self._lost:
            log.error("store %s is empty but this node holds %d customers: its data were lost "
                      "(restore them or run dsbc import); dispatching from memory",
                      self.url, self._known_customers())
        self._lost = f"{self.url} holds no customers (epoch {epoch or 'none'}): data lost?"

    def _known_customers(self) -> int:
        mem = self._mem
        return 0 if mem is None else mem.customer_count

    @property
    def healthy(self) -> bool:
        return self._up and not self._lost

    @property
    def reason(self) -> str:
        return self._lost or self._reason

    def set_notify(self, callback: Callable[[], None] | None) -> None:
        """`callback()` is called from the watcher thread when `refresh()` has work."""
        self._notify = callback
        if callback is not None and (self._changes.is_set() or self._offered is not None):
            call_quietly(callback)

    def _wake(self) -> None:
        call_quietly(self._notify)

    def stats(self) -> dict[str, Any]:
        """For metrics and status: health, sequence numbers, lag."""
        now = time.time()
        return {
            "kind": "redis",
            "url": self.url,
            "healthy": self.healthy,
            "reason": self.reason,
            "seq_applied": self._last_seq,
            "seq_remote": max(self._remote_seq, self._last_seq),
            "seq_gap": max(0, self._remote_seq - self._last_seq),
            "since_change": round(now - self._applied_at, 3) if self._applied_at else None,
            "since_probe": round(now - self._probed, 3) if self._probed else None,
            "customers": self._known_customers(),
            "pending_registrations": len(self._side.pending_regs),
            "pending_sessions": len(self._side.pending_sessions),
        }

    # -- the index ------------------------------------------------------------------------

    def _swap(self, mem: MemoryIndex, seq: int, epoch: str) -> list[str]:
        self._last_seq, self._epoch = seq, epoch
        self._remote_seq = max(self._remote_seq, seq)
        self._applied_at = time.time()
        return self._install(mem)

    def _offer_index(self, mem: MemoryIndex, seq: int, epoch: str) -> None:
        """From the watcher: a complete new index for refresh() to swap in."""
        self._offered = (mem, seq, epoch)
        self._expected_epoch = epoch
        self._wake()

    def expected_epoch(self) -> str:
        return self._expected_epoch or self._epoch

    def refresh(self) -> list[str]:
        """Apply what was committed since the last call; the changed customer ids.  Never
        raises; costs nothing while nothing changed or while Redis is away."""
        if self._mem is None:
            return []
        changed: list[str] = []
        with self._lock:
            offered, self._offered = self._offered, None
            if offered is not None:
                changed = self._swap(*offered)
                self._expected_epoch = ""
                self._changes.set()
            gone = [self._gone_sessions.popleft() for _ in range(len(self._gone_sessions))]
            drop_all = self._drop_sessions.is_set() and self._up
            if drop_all:
                self._drop_sessions.clear()
            if gone or drop_all:
                self._side.forget_sessions(gone, drop_all)
            if not self._up or not self._changes.is_set():
                return changed
            self._changes.clear()
            try:
                changed += self._catch_up(self._r)
                self._side.flush_pending()
                self._flush_meta(self._r)
            except self._errors as exc:
                self._changes.set()
                self._went_down(exc)
        if changed:
            self._cache_dirty = True  # the watcher writes it (CACHE_EVERY)
        return changed

    def _catch_up(self, client: Any) -> list[str]:
        """Replay the change log after `_last_seq` (at most LOG_PAGE entries per call)."""
        mem = self._mem
        assert mem is not None
        entries = client.xrange(self.prefix + "log", min=f"({self._last_seq}-1", count=LOG_PAGE)
        if not entries:
            return []
        first = int(entries[0][0].split("-")[0])
        ids: dict[str, None] = {}
        reload = first > self._last_seq + 1  # older entries were trimmed: we fell behind
        last = self._last_seq
        for n, (entry_id, fields) in enumerate(entries):
            if n and len(ids) >= MAX_CATCH_UP:  # the rest at the next call: bounded work per call
                break
            if "r" in fields:
                reload = True
            for cid in _ids(json.loads(fields.get("c") or "[]")):
                ids[cid] = None
            last = int(entry_id.split("-")[0])
        if reload and self._watcher is not None:
            self._watcher.reload_wanted.set()
        fresh = self._fetch(client, list(ids))  # all of it first: a failure applies nothing
        mem.apply(ids, fresh)
        self._last_seq = last
        self._applied_at = time.time()
        if last != int(entries[-1][0].split("-")[0]) or len(entries) == LOG_PAGE:
            self._changes.set()
            self._wake()
        return list(ids)

    def _fetch(self, client: Any, ids: Sequence[str]) -> dict[str, Customer]:
        out: dict[str, Customer] = {}
        for start in range(0, len(ids), FETCH):
            part = list(ids[start : start + FETCH])
            for cid, raw in zip(part, client.hmget(self.prefix + "cust", part)):
                if raw is not None:
                    system, state, group, batch, cap, keys = decode_record(raw)
                    out[cid] = Customer(cid, canon(system), canon(state), group, batch, cap, keys)
        return out

    # -- the cache file -------------------------------------------------------------------

    def cache_due(self) -> bool:
        return bool(self.cache_file) and self._cache_dirty and (
            time.monotonic() - self._cache_written >= CACHE_EVERY)

    def _write_cache(self) -> None:
        """Write the index to the cache file (any thread: the watcher, close(), the start).

        The sequence is read before the customers are copied, so the copy is at least as
        new as the sequence it is filed under; a node starting from it replays the rest."""
        if not self.cache_file or self._mem is None or self._lost:
            return
        with self._cache_lock:
            self._cache_dirty = False
            self._cache_written = time.monotonic()
            seq, epoch = self._last_seq, self._epoch
            customers = list(self._mem.customers())  # one C-level copy: no half-applied change
            write_cache(self.cache_file, seq, epoch, self.url, dict(self._meta), customers)

    def _load_cache(self) -> bool:
        found = read_cache(self.cache_file)
        if found is None:
            return False
        mem, seq, epoch, self._meta, mtime = found
        self._swap(mem, seq, epoch)
        self._applied_at = mtime
        log.warning("store %s unreachable: started from the cache %s (%d customers, change %d)",
                    self.url, self.cache_file, self._known_customers(), self._last_seq)
        return True

    def _cache_over_empty_store(self, epoch: str) -> bool:
        """Redis answers but holds no customer while the cache file holds some: Redis lost
        its data (restarted without persistence, flushed).  Start from the cache, flagged as
        the running nodes are (`_data_lost`), rather than route everybody by store.unknown
        and write the empty index over the last local copy."""
        if not os.path.exists(self.cache_file):  # a new installation: nothing was lost
            return False
        found = read_cache(self.cache_file)
        if found is None or found[0].customer_count == 0:
            return False
        mem, seq, cached_epoch, meta, mtime = found
        self._meta = {**meta, **self._meta}
        self._swap(mem, seq, cached_epoch)
        self._applied_at = mtime
        self._data_lost(epoch)
        return True


    # -- reads (lookup, customer, customers: IndexedStore) ---------------------------------

    def _read_customers(self, ids: Sequence[str]) -> dict[str, Customer]:
        try:
            return self._fetch(self._w, ids)
        except self._errors as exc:
            raise self._unavailable("reading customers", exc, writing=False) from None

    def _direct_owner(self, key: str) -> Customer | None:
        try:
            cid = self._w.hget(self.prefix + "ident", key)
            return None if cid is None else self._fetch(self._w, [cid]).get(cid)
        except self._errors as exc:
            raise self._unavailable("reading the store", exc, writing=False) from None

    def _direct_owners(self, keys: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            for start in range(0, len(keys), 1000):
                part = list(keys[start : start + 1000])
                for k, cid in zip(part, self._w.hmget(self.prefix + "ident", part), strict=True):
                    if cid is not None:
                        out[k] = cid.decode() if isinstance(cid, bytes) else cid
        except self._errors as exc:
            raise self._unavailable("reading the store", exc, writing=False) from None
        return out

    def _direct_group_members(self, groups: Sequence[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        try:
            pipe = self._w.pipeline(transaction=False)
            for g in groups:
                pipe.smembers(self.prefix + "g:" + g)
            for g, members in zip(groups, pipe.execute(), strict=True):
                if members:
                    out[g] = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        except self._errors as exc:
            raise self._unavailable("reading the store", exc, writing=False) from None
        return out

    # -- writes ---------------------------------------------------------------------------

    def _run(self, what: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One script call; StoreUnavailable when Redis cannot be reached; the result."""
        args = [self.prefix, op, json.dumps(payload), LOG_MAXLEN]
        acked = 0
        try:
            replicas = self._replicas()
        except self._errors as exc:
            raise self._unavailable(what, exc) from None
        try:
            if not replicas:
                raw = self._script(args=args, client=self._w)
            else:
                # Redis replicates asynchronously (min-replicas-to-write does not wait): a
                # master killed right after answering takes the write with it when Sentinel
                # promotes a replica.  WAIT, on the script's own connection, tells.
                pipe = self._w.pipeline(transaction=False)
                self._script(args=args, client=pipe)
                pipe.wait(1, int(REPLICA_WAIT * 1000))
                raw, waited = pipe.execute(raise_on_error=False)
                if isinstance(raw, Exception):  # the script's own error: nothing was changed
                    raise raw
                if isinstance(waited, Exception):
                    # WAIT refused (an ACL user without it): the write stands, unconfirmed
                    log.warning("store %s: %s committed; cannot wait for a replica (%s)",
                                self.url, what, _why(waited))
                    replicas = 0
                else:
                    acked = int(waited)
        except self._errors as exc:
            self._replicas_seen = (0.0, 0)  # a fail-over may follow: ask the next master afresh
            raise self._unavailable(what, exc, sent=True) from None
        res: dict[str, Any] = json.loads(raw)
        if replicas and not acked and res.get("seq"):
            with contextlib.suppress(*self._errors):
                replicas = self._replicas(fresh=True)  # the count was up to a second old
        if replicas and not acked and res.get("seq"):
            res["warning"] = (f"{what} committed on the Redis master, but none of its {replicas} "
                              f"replica(s) confirmed it within {REPLICA_WAIT:g} s: a fail-over now "
                              "could lose it (check with `dsbc where` once `dsbc status` shows the "
                              "store healthy)")
            log.warning("store %s: %s", self.url, res["warning"])
        err = res.get("err")
        if err == "group":
            raise GroupSplitError(str(res["group"]), _ids(res.get("missing")))
        if err == "cancelled":
            raise BatchCancelled(str(payload.get("batch")))
        if err == "locked":
            held = res.get("locked")
            raise LockedByBatch(dict(held) if isinstance(held, dict) else {})
        if err == "unknown_batch":
            raise StoreError(f"unknown batch {payload.get('batch')!r} (dsbc status lists recent batches)")
        if err and err != "batch_exists":
            raise StoreError(f"{what} failed: the store script said {err!r}")
        if res.get("seq"):
            self._remote_seq = max(self._remote_seq, int(res["seq"]))
            self._after_write()
        return res

    def _replicas(self, fresh: bool = False) -> int:
        """How many replicas the master has (0: a lone Redis, nothing to wait for), asked at
        most once a second: a migration writes in chunks, and each would pay a round trip."""
        now = time.monotonic()
        at, count = self._replicas_seen
        if not fresh and at and now - at < 1.0:
            return count
        try:
            info = self._w.info("replication")
        except self._response_error:  # INFO renamed or denied by an ACL: do not wait
            count = 0
        else:
            count = int(info.get("connected_slaves", 0) or 0)
        self._replicas_seen = (now, count)
        return count

    def _after_write(self) -> None:
        """Read your own writes: the thread that owns the index applies them at once;
        another thread (the control API's executor) leaves them to the next refresh()."""
        self._changes.set()
        if self._mem is None:
            return
        if threading.get_ident() != self._owner:
            self._wake()
            return
        with self._lock:
            self._changes.clear()
            try:
                self._catch_up(self._w)
            except self._errors:
                self._changes.set()

    def _ensure_epoch(self) -> None:
        """The first write makes the store's epoch (an empty index has nothing to reload)."""
        epoch = new_batch_id().replace("b-", "e-")
        # ours before it is in Redis, or the watcher could see it first and reload for nothing
        mine = self._mem is not None and self._mem.customer_count == 0 and not self._epoch
        if mine:
            self._epoch = epoch
        try:
            created = self._w.set(self.prefix + "epoch", epoch, nx=True)
        except self._errors as exc:
            created = False
            raise self._unavailable("writing to the store", exc) from None
        finally:
            if mine and not created:
                self._epoch = ""  # another one was there: the watcher reloads from it
        if created:
            log.info("store %s created", self.url)

    def _import(self, rows: list[CustomerRow], progress: Callable[[int], None] | None) -> int:
        """Up to BULK rows: one script.  More: chunks of CHUNK rows, logged as one "reload
        everything" when the last chunk (or a failure) is done."""
        unique_keys(rows)
        self._ensure_epoch()
        bulk = len(rows) > BULK
        payload = [[r.customer_id, list(r.identities), r.system or "", r.group] for r in rows]
        done = 0
        try:
            for start in range(0, max(1, len(rows)), CHUNK if bulk else max(1, len(rows))):
                part = payload[start : start + CHUNK] if bulk else payload
                last = start + len(part) >= len(rows)
                mode = ("reload" if last else "quiet") if bulk else "changes"
                self._run("import", "import", {"rows": part, "log": mode})
                done += len(part)
                if progress is not None:
                    progress(done)
        except StoreError:
            if bulk and done:  # tell the nodes about the chunks that did go in
                with contextlib.suppress(StoreError):
                    self._run("import", "reload", {})
            raise
        return len(rows)

    def lock(
        self, customer_ids: list[str], batch_id: str, force: bool = False, lease: float = LOCK_LEASE
    ) -> None:
        self._run("lock", "lock", {"ids": list(dict.fromkeys(customer_ids)), "batch": batch_id,
                                   "force": force, "until": time.time() + lease})

    def locks(self) -> list[tuple[str, int, float]]:
        try:
            held: dict[str, int] = {}
            for batch in self._w.hvals(self.prefix + "locks"):
                b = batch.decode() if isinstance(batch, bytes) else str(batch)
                held[b] = held.get(b, 0) + 1
            ends = self._w.hmget(self.prefix + "leases", list(held)) if held else []
        except self._errors as exc:
            raise self._unavailable("reading the store", exc, writing=False) from None
        out = [(b, n, float(e or 0)) for (b, n), e in zip(held.items(), ends, strict=True)]
        return sorted(out, key=lambda r: (r[2], r[0]))

    def release_expired_locks(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        try:  # the usual answer, none, in one or two cheap calls
            if not self._w.hlen(self.prefix + "locks") and not any(
                    0 <= float(v) < now for v in self._w.hvals(self.prefix + "leases")):
                return {}  # nothing locked, and no lease of a batch that ended to forget
        except self._errors as exc:
            raise self._unavailable("reading the store", exc, writing=False) from None
        res = self._run("releasing expired locks", "release", {"now": now})
        released = res.get("released")
        return {str(k): int(v) for k, v in released.items()} if isinstance(released, dict) else {}

    def unlock(self, customer_ids: list[str], batch_id: str | None = None) -> None:
        payload: dict[str, Any] = {"ids": list(dict.fromkeys(customer_ids))}
        if batch_id is not None:
            payload["batch"] = batch_id
        self._run("unlock", "unlock", payload)

    def prepare(self, customer_ids: list[str], expires: int) -> None:
        self._run("prepare", "prepare", {"ids": list(dict.fromkeys(customer_ids)),
                                         "expires": max(0, int(expires))})

    def _migrate(
        self, ids: list[str], to: str, who: str, batch_id: str | None, dry_run: bool
    ) -> MigrationResult:
        for _ in range(10):
            bid = batch_id or ("" if dry_run else new_batch_id())
            res = self._run("migration", "migrate", {
                "ids": ids, "to": to, "who": who, "batch": bid, "now": time.time(),
                "dry": dry_run, "fresh": batch_id is None})
            if res.get("err") != "batch_exists":
                return MigrationResult(bid, to, _ids(res.get("moved")), _ids(res.get("already")),
                                       _ids(res.get("unknown")), dry_run, str(res.get("warning", "")))
        raise StoreError("migration failed: no unused batch id")  # pragma: no cover

    def rollback(self, batch_id: str, who: str = "cli") -> MigrationResult:
        for _ in range(10):
            new = new_batch_id()
            res = self._run("rollback", "rollback", {"batch": batch_id, "new": new, "who": who,
                                                     "now": time.time()})
            if res.get("err") != "batch_exists":
                return MigrationResult(new, str(res.get("to", "")), _ids(res.get("moved")),
                                       _ids(res.get("already")), _ids(res.get("unknown")),
                                       warning=str(res.get("warning", "")))
        raise StoreError("rollback failed: no unused batch id")  # pragma: no cover

    # -- audit ------------------------------------------------------------------------------

    def audit(self, batch_id: str | None = None, limit: int = 1000) -> list[AuditEntry]:
        key = self.prefix + ("audit" if batch_id is None else f"ab:{batch_id}")
        try:
            rows = self._w.lrange(key, -max(1, limit), -1)
        except self._errors as exc:
            raise self._unavailable("reading the audit log", exc, writing=False) from None
        out = []
        for raw in rows:
            ts, who, cid, frm, to, bid, note = json.loads(raw)
            out.append(AuditEntry(float(ts), who, cid, frm, to, bid, note))
        return out

    def batches(self, limit: int = 10) -> list[BatchSummary]:
        try:
            ids = self._w.zrevrange(self.prefix + "batches", 0, max(1, limit) - 1)
            sums = self._w.hmget(self.prefix + "bsum", ids) if ids else []
        except self._errors as exc:
            raise self._unavailable("reading the audit log", exc, writing=False) from None
        out = []
        for bid, raw in zip(ids, sums):
            if raw is not None:
                ts, who, frm, to, n, note = json.loads(raw)
                out.append(BatchSummary(bid, float(ts), who, frm, to, int(n), note))
        return out

    # -- registrations and API sessions (redis_side.SideData) -------------------------------

    def record_registrations(self, regs: list[Registration], now: float | None = None) -> None:
        """Written at once; while Redis is away kept (newest per contact) and written later."""
        self._side.record_registrations(regs, now)

    def registrations(
        self, customer_ids: list[str] | None = None, now: float | None = None
    ) -> list[Registration]:
        return self._side.registrations(customer_ids, now)

    def put_session(self, session: ApiSession) -> None:
        self._side.put_session(session)

    def get_session(self, key: str) -> ApiSession | None:
        """Memory first, then Redis (a session another node made a moment ago); None when
        neither has it or Redis is away."""
        return self._side.get_session(key)

    def delete_session(self, key: str) -> None:
        self._side.delete_session(key)

    # -- misc -----------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """From Redis; while it is away, the value last seen (the cache file keeps them)."""
        try:
            value = self._w.hget(self.prefix + "meta", key)
        except self._errors as exc:
            kept = read_kept_meta(self._kept_meta_file()).get(key) if self.cache_file else None
            if kept is not None:  # set while Redis was away (a predecessor's last save)
                with self._lock:
                    self._meta[key] = self._meta_pending[key] = kept
                return kept
            if key in self._meta:
                return self._meta[key]
            raise self._unavailable("reading meta", exc, writing=False) from None
        if value is None:
            self._meta.pop(key, None)
            return None
        self._meta[key] = str(value)
        return str(value)

    def meta_keys(self, prefix: str) -> list[str]:
        try:
            keys = self._w.hkeys(self.prefix + "meta")
        except self._errors as exc:
            raise self._unavailable("reading meta", exc, writing=False) from None
        return [str(k) for k in keys if str(k).startswith(prefix)]

    def set_meta(self, key: str, value: str, only_if_absent: bool = False) -> str:
        try:
            if not only_if_absent:
                self._w.hset(self.prefix + "meta", key, value)
            else:
                self._w.hsetnx(self.prefix + "meta", key, value)
                value = str(self._w.hget(self.prefix + "meta", key))
        except self._errors as exc:
            if only_if_absent and key in self._meta:  # a node started from its cache file
                return self._meta[key]
            if only_if_absent or not self.cache_file:
                raise self._unavailable("setting meta", exc) from None
            # kept beside the cache file for a worker that starts meanwhile (a reload), and
            # written to Redis when it returns
            with self._lock:
                self._meta[key] = self._meta_pending[key] = value
                kept = read_kept_meta(self._kept_meta_file())
                kept[key] = value
                write_kept_meta(self._kept_meta_file(), kept)
            return value
        self._meta[key] = value
        if self.cache_file:
            self._drop_kept_meta(key)
        return value

    def _drop_kept_meta(self, key: str) -> None:
        """`key` was just written to Redis: an older value kept while Redis was away (by
        this worker or a predecessor) must not be written over it later (`_flush_meta`)."""
        with self._lock:
            self._meta_pending.pop(key, None)
            kept = read_kept_meta(self._kept_meta_file())
            if kept.pop(key, None) is not None:
                write_kept_meta(self._kept_meta_file(), kept)

    def _kept_meta_file(self) -> str:
        return f"{self.cache_file}.meta" if self.cache_file else ""

    def _flush_meta(self, client: Any) -> None:
        """Write the meta values set while Redis was away; raises the client's errors."""
        if not self._meta_pending:
            return
        with self._lock:
            pending = dict(self._meta_pending)
            client.hset(self.prefix + "meta", mapping=pending)
            for k, v in pending.items():
                if self._meta_pending.get(k) == v:
                    del self._meta_pending[k]
            if self.cache_file:
                kept = read_kept_meta(self._kept_meta_file())
                for k, v in pending.items():
                    if kept.get(k) == v:
                        del kept[k]
                write_kept_meta(self._kept_meta_file(), kept)

    def counts(self) -> dict[str, int]:
        now = time.time()
        out = {f"customers.{s}.{st}": 0 for s in SYSTEMS for st in ("active", "locked")}
        try:
            stored = self._w.hgetall(self.prefix + "counts")
            for key in out:
                out[key] = int(stored.get(key.removeprefix("customers."), 0))
            out["customers"] = sum(out.values())
            out["identities"] = int(self._w.hlen(self.prefix + "ident"))
            out["groups"] = int(self._w.scard(self.prefix + "groups"))
            out["prepared"] = int(stored.get("prepared", 0))
            regs = self.registrations(None, now)
            out["registrations"] = len(regs)
            for system in SYSTEMS:
                out[f"registrations.{system}"] = sum(1 for r in regs if r.system == system)
            out["sessions"] = sum(1 for _ in self._w.scan_iter(match=f"{self.prefix}sess:*", count=1000))
        except self._errors as exc:
            raise self._unavailable("reading counts", exc, writing=False) from None
        return out

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.join(timeout=2.0)
            self._watcher = None
        with contextlib.suppress(Exception):
            self._side.flush_pending()
        with contextlib.suppress(Exception):
            self._flush_meta(self._w)
        if self._cache_dirty:
            self._write_cache()
        for c in (self._r, self._w):
            with contextlib.suppress(Exception):
                c.close()
