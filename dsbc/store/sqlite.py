"""The embedded location store: one SQLite file (WAL) and the in-memory index.

Every write is one ``BEGIN IMMEDIATE`` transaction that also appends to ``changes``
(one row per changed customer, or one NULL row meaning "reload everything" after a
bulk import).  Every process (dispatcher workers, the CLI, the control API) polls
``refresh()``: one rowid-range query when nothing changed, so the runner can call it
every 0.2 s; otherwise it reloads only the changed customers.  A process that fell
behind the pruned change log reloads everything.

``load=False`` opens the store without loading the index: reads then go to SQLite
directly.  That is what one-shot CLI commands use (``dsbc where`` on a million
identities answers at once instead of loading them first).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .base import (
    LOCK_LEASE,
    SESSION_FRESH,
    SYSTEMS,
    ApiSession,
    AuditEntry,
    BatchSummary,
    Customer,
    CustomerRow,
    LockedByBatch,
    MigrationResult,
    Registration,
    StoreError,
    StoreUnavailable,
)
from .memory import IndexedStore, MemoryIndex, canon, unique_keys
from .sqlite_schema import (
    BULK,
    CANCELLED,
    JOINED,
    SCHEMA,
    SCHEMA_VERSION,
    SPENT_LEASES,
    UNLOCK,
    check_not_cancelled,
    chunks,
    existing,
    fetch_all,
    held_by_others,
    locked_by,
    log_changes,
    marks,
    migrate_in,
    new_batch,
    sqlite_path,
)

__all__ = ["SqliteStore", "sqlite_path"]

log = logging.getLogger("dsbc.store")


def _open_failure(path: str, exc: sqlite3.Error) -> StoreError:
    """Why the store file cannot be opened: a file that is no store is bad input
    (StoreError, exit 2); a file system that refuses (full, read-only, I/O errors) is an
    operational failure (StoreUnavailable, exit 1), named as such: SQLite says "disk I/O
    error" for a full disk and "unable to open database file" for a read-only one."""
    if getattr(exc, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return StoreError(f"cannot open store {path}: {exc} (not a dsbc store)")
    reason = str(exc)
    folder = Path(path).parent
    try:
        fs = os.statvfs(folder)
    except OSError:
        pass
    else:
        if fs.f_flag & os.ST_RDONLY:
            reason = f"{folder} is on a read-only file system ({exc})"
        elif fs.f_bavail == 0 or fs.f_favail == 0:
            reason = f"the disk is full ({exc})"
        elif not os.access(folder, os.W_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
            reason = f"no write permission on {path} or {folder} ({exc})"
    return StoreUnavailable(f"cannot open store {path}: {reason}")


def _hand_to_directory_owner(path: str) -> None:
    """The store's files that root made (``dsbc import`` run as root before the first start)
    in a directory of another user (/var/lib/dsbc, the service's StateDirectory) go to that
    user: owned by root, the node running as ``dsbc`` could not open the store ("attempt to
    write a readonly database"), nor write its -wal / -shm files."""
    if os.geteuid() != 0:
        return
    try:
        owner = os.stat(Path(path).parent)
        if owner.st_uid == 0:
            return
        for name in (path, f"{path}-wal", f"{path}-shm"):
            try:
                if os.stat(name).st_uid == 0:
                    os.chown(name, owner.st_uid, owner.st_gid)
            except FileNotFoundError:
                continue
    except OSError as exc:
        log.warning("store %s: could not give it to its directory's owner: %s", path, exc)



def missing_directory(folder: Path | str, key: str = "store.url") -> str:
    """Why a store (or `key`'s file) cannot be made in ``folder``, and what to do (the
    README's example config names /var/lib/dsbc, which no package made on a new host)."""
    return (f"directory {folder} does not exist (make it: install -d -o dsbc -g dsbc {folder}; "
            f"or set {key} to a file in a directory that exists)")

class SqliteStore(IndexedStore):
    def __init__(
        self,
        path: str,
        unknown: str = "source",
        *,
        load: bool = True,
        create: bool = True,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self.unknown = unknown
        self.busy_timeout = busy_timeout
        self._lock = threading.RLock()
        self._healthy = True
        self._last_seq = 0
        self._mem: MemoryIndex | None = None
        # API sessions read or written here, with when: read again after SESSION_FRESH
        # (another node may have changed or deleted one; SQLite tells nobody)
        self._sessions: dict[str, tuple[ApiSession, float]] = {}
        self._last_purge = 0.0
        self._last_trim = 0.0
        if path != ":memory:" and not Path(path).parent.is_dir():
            raise StoreError(f"cannot open store {path}: {missing_directory(Path(path).parent)}")
        if not create and path != ":memory:" and not Path(path).exists():
            raise StoreError(f"no store at {path} (dsbc import creates it)")
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            if path != ":memory:":
                self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(SCHEMA)
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS batch(customer_id TEXT PRIMARY KEY)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            if path != ":memory:":
                _hand_to_directory_owner(path)
            if load:
                self._full_load()
        except sqlite3.Error as exc:
            failure = _open_failure(path, exc)
            if "readonly" in str(exc) and path != ":memory:":
                failure = type(failure)(
                    f"{failure} (this user, uid {os.geteuid()}, cannot write it or its directory: the store "
                    f"belongs to the user dsbc runs as, e.g. chown -R dsbc: {Path(path).parent})")
            raise failure from None

    # -- transactions ---------------------------------------------------------------------

    def _failure(self, what: str, exc: sqlite3.Error, writing: bool = True) -> StoreError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            reason = (
                f"the store is busy (another writer held it for more than {self.busy_timeout:g} s)"
            )
        elif "full" in text:
            reason = "the disk is full"
        else:
            reason = text
        tail = "; nothing was changed" if writing else ""
        return StoreUnavailable(f"{what} failed on {self.path}: {reason}{tail}")

    @contextmanager
    def _write(self, what: str, refresh: bool = True) -> Iterator[sqlite3.Cursor]:
        """One BEGIN IMMEDIATE transaction: all of it commits, or none of it (StoreError)."""
        with self._lock:
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                yield cur
                cur.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.rollback()
                if isinstance(exc, sqlite3.Error):
                    raise self._failure(what, exc) from None
                raise
            finally:
                cur.close()
        if refresh:  # an operator's change (import, migration, lock ...), not the dispatchers'
            self._checkpoint()
            self.refresh()

    def _checkpoint(self) -> None:
        """Copy the committed change from the WAL into the database file.  Without it a small
        store lives in location.db-wal for days (SQLite checkpoints every 1,000 pages): a
        backup that copies location.db alone, or a -wal file deleted as if it were a
        temporary one, would take every migration with it.  PASSIVE: never waits for
        readers; what they still use is copied by a later checkpoint."""
        try:
            with self._lock:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the commit stands; SQLite checkpoints later by itself
            log.warning("store %s: checkpoint failed: %s", self.path, exc)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        """A read snapshot (WAL: never blocks on writers)."""
        with self._lock:
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN")
                yield cur
            except sqlite3.Error as exc:
                raise self._failure("reading", exc, writing=False) from None
            finally:
                if self._db.in_transaction:
                    self._db.rollback()
                cur.close()

    # -- loading and the change feed ------------------------------------------------------

    def _full_load(self) -> list[str]:
        with self._read() as cur:
            return self._load_all(cur)

    def _load_all(self, cur: sqlite3.Cursor) -> list[str]:
        """Build a new index from a snapshot and swap it in (readers never see a half-built one)."""
        last = cur.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
        cur.execute(JOINED + " ORDER BY c.customer_id")
        mem = MemoryIndex.build(fetch_all(cur))
        self._last_seq = last
        return self._install(mem)

    def refresh(self) -> list[str]:
        """Apply what other processes committed.  Returns the changed customer ids (every
        customer after a full reload).  Never raises: a failure marks the store unhealthy
        and the index keeps serving."""
        if self._mem is None:
            return []
        try:
            with self._lock:
                # the cheap path, every poll: one rowid-range probe
                if (
                    self._db.execute(
                        "SELECT 1 FROM changes WHERE seq > ? LIMIT 1", (self._last_seq,)
                    ).fetchone()
                    is None
                ):
                    self._healthy = True
                    return []
                with self._read() as cur:
                    changed = self._apply(cur)
        except (sqlite3.Error, StoreError) as exc:
            if self._healthy:
                log.warning("store refresh failed (dispatching from memory): %s", exc)
            self._healthy = False
            return []
        self._healthy = True
        return changed

    def _apply(self, cur: sqlite3.Cursor) -> list[str]:
        rows = cur.execute(
            "SELECT seq, customer_id FROM changes WHERE seq > ? ORDER BY seq", (self._last_seq,)
        ).fetchall()
        if not rows:
            return []
        # AUTOINCREMENT never reuses nor skips a seq (a rollback reverts it too): a gap
        # before the oldest row left means rows this process never saw were pruned
        lowest = cur.execute("SELECT min(seq) FROM changes").fetchone()[0]
        if lowest > self._last_seq + 1 or any(cid is None for _, cid in rows):
            return self._load_all(cur)
        ids = list(dict.fromkeys(cid for _, cid in rows))
        fresh = self._load_customers(cur, ids)
        mem = self._mem
        assert mem is not None
        mem.apply(ids, fresh)
        self._last_seq = rows[-1][0]
        return ids

    def _load_customers(self, cur: sqlite3.Cursor, ids: Sequence[str]) -> dict[str, Customer]:
        out: dict[str, Customer] = {}
        for part in chunks(ids):
            cur.execute(
                JOINED + f" WHERE c.customer_id IN ({marks(len(part))}) ORDER BY c.customer_id",
                part,
            )
            for c in MemoryIndex.build(fetch_all(cur)).customers():
                out[c.customer_id] = c
        return out

    @property
    def healthy(self) -> bool:
        return self._healthy

    # -- reads (lookup, customer, customers: IndexedStore) ---------------------------------

    def _read_customers(self, ids: Sequence[str]) -> dict[str, Customer]:
        with self._read() as cur:
            return self._load_customers(cur, ids)

    def _direct_owner(self, key: str) -> Customer | None:
        with self._read() as cur:
            row = cur.execute("SELECT customer_id FROM identities WHERE key = ?", (key,)).fetchone()
            return None if row is None else self._load_customers(cur, [row[0]]).get(row[0])

    def _direct_owners(self, keys: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        with self._read() as cur:
            for part in chunks(list(keys)):
                cur.execute(f"SELECT key, customer_id FROM identities WHERE key IN ({marks(len(part))})", part)
                out.update(cur.fetchall())
        return out

    def _direct_group_members(self, groups: Sequence[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self._read() as cur:
            for part in chunks(list(groups)):
                cur.execute(f"SELECT grp, customer_id FROM customers WHERE grp IN ({marks(len(part))}) "
                            "ORDER BY grp, customer_id", part)
                for grp, cid in cur.fetchall():
                    out.setdefault(grp, []).append(cid)
        return out

    # -- customers --------------------------------------------------------------------------

    def _import(self, rows: list[CustomerRow], progress: Callable[[int], None] | None) -> int:
        keys = unique_keys(rows)
        bulk = len(rows) > BULK
        if bulk:  # keys arrive in random order: a bigger page cache for this import only
            self._db.execute("PRAGMA cache_size = -65536")
        try:
            return self._import_tx(rows, keys, bulk, progress)
        finally:
            if bulk:
                self._db.execute("PRAGMA cache_size = -2000")

    def _import_tx(
        self,
        rows: list[CustomerRow],
        keys: list[str],
        bulk: bool,
        progress: Callable[[int], None] | None,
    ) -> int:
        with self._write("import") as cur:
            losers: set[str] = set()
            if not bulk:  # customers that lose an identity to these rows change too
                for part in chunks(keys):
                    cur.execute(
                        f"SELECT customer_id FROM identities WHERE key IN ({marks(len(part))})",
                        part,
                    )
                    losers.update(cid for (cid,) in cur)
            done = 0
            for start in range(0, len(rows), 10_000):
                part_rows = rows[start : start + 10_000]
                # ?2 NULL: a new customer starts on source, a stored one keeps its system
                cur.executemany(
                    "INSERT INTO customers(customer_id, system, grp) "
                    "VALUES (?1, coalesce(?2, 'source'), ?3) ON CONFLICT(customer_id) "
                    "DO UPDATE SET system = coalesce(?2, system), grp = ?3",
                    ((r.customer_id, r.system, r.group) for r in part_rows),
                )
                cur.executemany(
                    "DELETE FROM identities WHERE customer_id = ?",
                    ((r.customer_id,) for r in part_rows),
                )
                cur.executemany(
                    "INSERT OR REPLACE INTO identities(key, customer_id) VALUES (?, ?)",
                    ((k, r.customer_id) for r in part_rows for k in r.identities),
                )
                done += len(part_rows)
                if progress is not None:
                    progress(done)
            log_changes(cur, None if bulk else sorted(losers | {r.customer_id for r in rows}))
        return len(rows)

    def lock(
        self, customer_ids: list[str], batch_id: str, force: bool = False, lease: float = LOCK_LEASE
    ) -> None:
        ids = list(dict.fromkeys(customer_ids))
        with self._write("lock") as cur:  # BEGIN IMMEDIATE: the check and the lock are one step
            check_not_cancelled(cur, batch_id)
            held = {} if force else held_by_others(cur, ids, batch_id)
            if held:
                raise LockedByBatch(held)
            found = existing(cur, ids)
            cur.executemany(
                "UPDATE customers SET state = 'locked', batch_id = ? WHERE customer_id = ?",
                ((batch_id, cid) for cid in found),
            )
            cur.execute("INSERT OR REPLACE INTO leases VALUES (?, ?)", (batch_id, time.time() + lease))
            log_changes(cur, found)

    def unlock(self, customer_ids: list[str], batch_id: str | None = None) -> None:
        self._update_each(
            "unlock",
            customer_ids,
            UNLOCK,
            lambda cid: (cid,),
            "state = 'locked'" if batch_id is None else "state = 'locked' AND batch_id = ?",
            () if batch_id is None else (batch_id,),
        )

    def locks(self) -> list[tuple[str, int, float]]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT c.batch_id, count(*), coalesce(l.until, 0) FROM customers c LEFT JOIN leases l "
                "ON l.batch_id = c.batch_id WHERE c.state = 'locked' GROUP BY c.batch_id").fetchall()
        return sorted(((str(b), int(n), float(u)) for b, n, u in rows), key=lambda r: (r[2], r[0]))

    def release_expired_locks(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        expired = (
            "SELECT DISTINCT c.batch_id FROM customers c LEFT JOIN leases l ON l.batch_id = c.batch_id "
            "WHERE c.state = 'locked' AND coalesce(l.until, 0) < ?"
        )
        with self._read() as cur:  # the usual answer, none, without taking the write lock
            if (cur.execute(expired + " LIMIT 1", (now,)).fetchone() is None
                    and cur.execute(SPENT_LEASES + " LIMIT 1", (now,)).fetchone() is None):
                return {}
        released: dict[str, int] = {}
        with self._write("releasing expired locks") as cur:
            for (bid,) in cur.execute(expired, (now,)).fetchall():
                ids = [cid for cid, _ in locked_by(cur, bid)]
                cur.executemany(UNLOCK, ((cid,) for cid in ids))
                cur.execute("DELETE FROM leases WHERE batch_id = ?", (bid,))
                log_changes(cur, ids)
                released[bid] = len(ids)
            # the leases of batches that ended (flipped or unlocked, one row per batch ever
            # run): a batch that still runs renews its row at its next lock
            cur.execute(f"DELETE FROM leases WHERE batch_id IN ({SPENT_LEASES})", (now,))
        return released

    def prepare(self, customer_ids: list[str], expires: int) -> None:
        self._update_each(
            "prepare",
            customer_ids,
            "UPDATE customers SET expires_cap = ? WHERE customer_id = ?",
            lambda cid: (max(0, int(expires)), cid),
        )

    def _update_each(
        self,
        what: str,
        customer_ids: list[str],
        sql: str,
        args: Callable[[str], tuple[object, ...]],
        where: str = "1",
        where_args: Sequence[object] = (),
    ) -> None:
        """One write transaction: `sql` with `args(cid)` for each stored customer among
        `customer_ids` (matching `where` with `where_args`), logged as changed."""
        ids = list(dict.fromkeys(customer_ids))
        with self._write(what) as cur:
            found = existing(cur, ids, where, where_args)
            cur.executemany(sql, (args(cid) for cid in found))
            log_changes(cur, found)

    # -- migrations -------------------------------------------------------------------------

    def _migrate(
        self, ids: list[str], to: str, who: str, batch_id: str | None, dry_run: bool
    ) -> MigrationResult:
        now = time.time()
        if dry_run:
            with self._read() as cur:
                return migrate_in(cur, ids, to, who, batch_id or "", now, write=False)
        with self._write("migration") as cur:
            if batch_id:
                check_not_cancelled(cur, batch_id)
            bid = batch_id or new_batch(cur)
            return migrate_in(cur, ids, to, who, bid, now, write=True)

    def rollback(self, batch_id: str, who: str = "cli") -> MigrationResult:
        with self._write("rollback") as cur:
            rows = cur.execute(
                "SELECT customer_id, from_system FROM audit WHERE batch_id = ? ORDER BY rowid",
                (batch_id,),
            ).fetchall()
            # what the batch still holds locked (it stopped before their flip): released
            held = locked_by(cur, batch_id)
            if not rows and not held:
                raise StoreError(f"unknown batch {batch_id!r} (dsbc status lists recent batches)")
            back: dict[str, dict[str, None]] = {}
            for cid, frm in rows:
                back.setdefault(frm, {})[cid] = None
            new = new_batch(cur)
            total = MigrationResult(new, ",".join(sorted(back or {s: {} for _, s in held})))
            cur.executemany(UNLOCK, ((cid,) for cid, _ in held))
            # a migration of this batch still running locks and flips no more
            cur.execute("INSERT OR REPLACE INTO leases VALUES (?, ?)", (batch_id, CANCELLED))
            log_changes(cur, [cid for cid, _ in held])
            total.already += [cid for cid, _ in held]
            now = time.time()
            for system, ids in sorted(back.items()):
                r = migrate_in(
                    cur,
                    list(ids),
                    system,
                    who,
                    new,
                    now,
                    write=True,
                    note=f"rollback of {batch_id}",
                )
                total.moved += r.moved
                total.already += r.already
                total.unknown += r.unknown
        return total

    def audit(self, batch_id: str | None = None, limit: int = 1000) -> list[AuditEntry]:
        """The last `limit` audit entries (of one batch, if given), oldest first."""
        q = "SELECT ts, who, customer_id, from_system, to_system, batch_id, note FROM audit"
        args: tuple[object, ...] = (limit,)
        if batch_id is not None:
            q += " WHERE batch_id = ?"
            args = (batch_id, limit)
        with self._read() as cur:
            rows = cur.execute(q + " ORDER BY rowid DESC LIMIT ?", args).fetchall()
        return [AuditEntry(*r) for r in reversed(rows)]

    def batches(self, limit: int = 10) -> list[BatchSummary]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT batch_id, min(ts), who, from_system, to_system, count(*), note, "
                "max(rowid) AS last FROM audit GROUP BY batch_id ORDER BY last DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [BatchSummary(*r[:7]) for r in rows]

    # -- registrations ----------------------------------------------------------------------

    def record_registrations(self, regs: list[Registration], now: float | None = None) -> None:
        now = time.time() if now is None else now
        live: list[tuple[str, str, str, float, str]] = []
        dead: list[tuple[str, str]] = []
        for r in regs:
            if r.expires_at <= now:
                dead.append((r.account, r.contact))
            else:
                cid = r.customer_id or self._owner_id(f"account:{r.account}")
                live.append((r.account, r.contact, canon(r.system), r.expires_at, cid))
        with self._write("recording registrations", refresh=False) as cur:
            cur.executemany(
                "INSERT INTO registrations VALUES (?, ?, ?, ?, ?) ON CONFLICT(account, contact) "
                "DO UPDATE SET system = excluded.system, expires_at = excluded.expires_at, "
                "customer_id = excluded.customer_id",
                live,
            )
            cur.executemany("DELETE FROM registrations WHERE account = ? AND contact = ?", dead)
            cur.execute("DELETE FROM registrations WHERE expires_at <= ?", (now,))

    def registrations(
        self, customer_ids: list[str] | None = None, now: float | None = None
    ) -> list[Registration]:
        """Live registrations (expires_at > now), of these customers if given."""
        now = time.time() if now is None else now
        q = (
            "SELECT account, contact, system, expires_at, customer_id FROM registrations "
            "WHERE expires_at > ?"
        )
        out: list[Registration] = []
        with self._read() as cur:
            if customer_ids is None:
                out = [Registration(*r) for r in cur.execute(q, (now,))]
            else:
                for part in chunks(list(dict.fromkeys(customer_ids))):
                    cur.execute(q + f" AND customer_id IN ({marks(len(part))})", (now, *part))
                    out.extend(Registration(*r) for r in cur)
                    # a phone that registered before its customer was imported (store.unknown
                    # sent it on) was recorded under no customer: its account names the owner now
                    cur.execute(
                        "SELECT r.account, r.contact, r.system, r.expires_at, i.customer_id "
                        "FROM identities i JOIN registrations r ON r.account = substr(i.key, 9) "
                        f"WHERE i.customer_id IN ({marks(len(part))}) AND substr(i.key, 1, 8) = 'account:' "
                        "AND r.customer_id = '' AND r.expires_at > ?",
                        (*part, now),
                    )
                    out.extend(Registration(*r) for r in cur)
        return out

    # -- API sessions -----------------------------------------------------------------------

    def put_session(self, session: ApiSession) -> None:
        now = time.time()
        self._sessions[session.key] = (session, now)
        with self._write("saving a session", refresh=False) as cur:
            cur.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                (
                    session.key,
                    session.system,
                    session.expires_at,
                    session.customer_id,
                    session.realm,
                    session.extra,
                ),
            )
            if now - self._last_purge > 60:
                self._last_purge = now
                cur.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
                self._trim_sessions(now)

    def _trim_sessions(self, now: float) -> None:
        """Drop the cached sessions that are expired or would be read again anyway (older
        than SESSION_FRESH): the cache saves a SELECT per request, and kept, every
        session ever seen would stay in memory until it expires."""
        for key in [k for k, (s, at) in self._sessions.items() if s.expires_at <= now or now - at > SESSION_FRESH]:
            del self._sessions[key]

    def get_session(self, key: str) -> ApiSession | None:
        now = time.time()
        if now - self._last_trim > 60:
            self._last_trim = now
            self._trim_sessions(now)
        hit = self._sessions.get(key)
        if hit is not None and now - hit[1] <= SESSION_FRESH:
            s = hit[0]
        else:
            with self._read() as cur:
                row = cur.execute(
                    "SELECT key, system, expires_at, customer_id, realm, extra "
                    "FROM sessions WHERE key = ?",
                    (key,),
                ).fetchone()
            if row is None:
                self._sessions.pop(key, None)
                return None
            s = ApiSession(*row)
            if hit is not None and hit[0] == s:
                s = hit[0]  # unchanged: the same object (callers cache by identity)
            self._sessions[key] = (s, now)
        if s.expires_at <= now:
            self._sessions.pop(key, None)
            return None
        return s

    def delete_session(self, key: str) -> None:
        self._sessions.pop(key, None)
        with self._write("deleting a session", refresh=False) as cur:
            cur.execute("DELETE FROM sessions WHERE key = ?", (key,))

    # -- misc -------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._read() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def meta_keys(self, prefix: str) -> list[str]:
        with self._read() as cur:
            rows = cur.execute("SELECT key FROM meta WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)).fetchall()
        return [str(r[0]) for r in rows]

    def set_meta(self, key: str, value: str, only_if_absent: bool = False) -> str:
        with self._write("setting meta", refresh=False) as cur:
            if not only_if_absent:
                cur.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
                return value
            cur.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
            return str(cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        now = time.time()
        out = {f"customers.{s}.{st}": 0 for s in SYSTEMS for st in ("active", "locked")}
        with self._read() as cur:
            for system, state, n in cur.execute(
                "SELECT system, state, count(*) FROM customers GROUP BY system, state"
            ):
                out[f"customers.{system}.{state}"] = n
            out["customers"] = sum(out.values())
            for name, q, args in (
                ("identities", "SELECT count(*) FROM identities", ()),
                ("groups", "SELECT count(DISTINCT grp) FROM customers WHERE grp != ''", ()),
                ("prepared", "SELECT count(*) FROM customers WHERE expires_cap > 0", ()),
                (
                    "registrations",
                    "SELECT count(*) FROM registrations WHERE expires_at > ?",
                    (now,),
                ),
                ("sessions", "SELECT count(*) FROM sessions WHERE expires_at > ?", (now,)),
            ):
                out[name] = int(cur.execute(q, args).fetchone()[0])
            out |= {f"registrations.{s}": 0 for s in SYSTEMS}
            for system, n in cur.execute(
                "SELECT system, count(*) FROM registrations WHERE expires_at > ? GROUP BY system", (now,)
            ):
                out[f"registrations.{system}"] = n
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()
