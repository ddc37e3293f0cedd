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
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .base import (
    SYSTEMS,
    ApiSession,
    AuditEntry,
    BatchSummary,
    Customer,
    CustomerRow,
    GroupSplitError,
    LocationStore,
    Location,
    MigrationResult,
    Registration,
    StoreError,
    StoreUnavailable,
)
from .memory import MemoryIndex, canon, clean_row, new_batch_id, normalise_keys

log = logging.getLogger("dsbc.store")

SCHEMA_VERSION = "1"
BULK = 1000  # an import of more customers than this writes one NULL change row
KEEP_CHANGES = 100_000  # change-log rows kept; a process further behind reloads everything
CHUNK = 500  # ids per IN (...) query

_SCHEMA = """
CREATE TABLE IF NOT EXISTS customers(
    customer_id TEXT PRIMARY KEY, system TEXT NOT NULL DEFAULT 'source',
    state TEXT NOT NULL DEFAULT 'active', grp TEXT NOT NULL DEFAULT '',
    batch_id TEXT NOT NULL DEFAULT '', expires_cap INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS customers_grp ON customers(grp) WHERE grp != '';
CREATE TABLE IF NOT EXISTS identities(key TEXT PRIMARY KEY, customer_id TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS identities_customer ON identities(customer_id);
CREATE TABLE IF NOT EXISTS audit(ts REAL NOT NULL, who TEXT NOT NULL, customer_id TEXT NOT NULL,
    from_system TEXT NOT NULL, to_system TEXT NOT NULL, batch_id TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS audit_batch ON audit(batch_id);
CREATE INDEX IF NOT EXISTS audit_customer ON audit(customer_id);
CREATE TABLE IF NOT EXISTS changes(seq INTEGER PRIMARY KEY AUTOINCREMENT, customer_id TEXT);
CREATE TABLE IF NOT EXISTS registrations(account TEXT NOT NULL, contact TEXT NOT NULL,
    system TEXT NOT NULL, expires_at REAL NOT NULL, customer_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY(account, contact)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS registrations_customer ON registrations(customer_id);
CREATE INDEX IF NOT EXISTS registrations_expiry ON registrations(expires_at);
CREATE TABLE IF NOT EXISTS sessions(key TEXT PRIMARY KEY, system TEXT NOT NULL,
    expires_at REAL NOT NULL, customer_id TEXT NOT NULL DEFAULT '', realm TEXT NOT NULL DEFAULT '',
    extra TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions(expires_at);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# (customer_id, system, state, grp, batch_id, expires_cap, key) sorted by customer: MemoryIndex.build
_JOINED = (
    "SELECT c.customer_id, c.system, c.state, c.grp, c.batch_id, c.expires_cap, i.key "
    "FROM customers c LEFT JOIN identities i ON i.customer_id = c.customer_id"
)


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:`` URL.

    ``sqlite:///abs/dir/file.db`` and ``sqlite:////abs/dir/file.db`` are absolute;
    ``sqlite:///file.db`` (no directory), ``sqlite:///./rel/file.db``, ``sqlite://rel/file.db``
    and ``sqlite:rel/file.db`` are relative to the current directory;
    ``sqlite:///:memory:`` is a private in-memory database (tests)."""
    if not url.startswith("sqlite:"):
        raise StoreError(f"not a sqlite URL: {url!r}")
    rest = url[len("sqlite:"):]
    if rest.startswith("///"):
        path = rest[3:]
        if path == ":memory:" or path.startswith(("./", "../")) or "/" not in path:
            return path
        return "/" + path.lstrip("/")
    if rest.startswith("//"):
        return rest[2:]
    return rest


def _chunks(seq: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class SqliteStore(LocationStore):
    def __init__(
        self, path: str, unknown: str = "source", *, load: bool = True, busy_timeout: float = 5.0
    ) -> None:
        self.path = path
        self.unknown = unknown
        self.busy_timeout = busy_timeout
        self._lock = threading.RLock()
        self._healthy = True
        self._last_seq = 0
        self._mem: MemoryIndex | None = None
        self._sessions: dict[str, ApiSession] = {}
        self._last_purge = 0.0
        if path != ":memory:" and not Path(path).parent.is_dir():
            raise StoreError(f"cannot open store {path}: directory {Path(path).parent} does not exist")
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            if path != ":memory:":
                self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS batch(customer_id TEXT PRIMARY KEY)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            if load:
                self._full_load()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None

    # -- transactions ---------------------------------------------------------------------

    def _failure(self, what: str, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            reason = f"the store is busy (another writer held it for more than {self.busy_timeout:g} s)"
        elif "full" in text:
            reason = "the disk is full"
        else:
            reason = text
        return StoreUnavailable(f"{what} failed on {self.path}: {reason}; nothing was changed")

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
        if refresh:
            self.refresh()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        """A read snapshot (WAL: never blocks on writers)."""
        with self._lock:
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN")
                yield cur
            except sqlite3.Error as exc:
                raise self._failure("reading", exc) from None
            finally:
                if self._db.in_transaction:
                    self._db.rollback()
                cur.close()

    def _changed(self, cur: sqlite3.Cursor, ids: Iterable[str] | None) -> None:
        if ids is None:
            cur.execute("INSERT INTO changes(customer_id) VALUES (NULL)")
        else:
            cur.executemany("INSERT INTO changes(customer_id) VALUES (?)", ((i,) for i in ids))
        cur.execute(
            "DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - ?", (KEEP_CHANGES,)
        )

    # -- loading and the change feed ------------------------------------------------------

    def _full_load(self) -> list[str]:
        with self._read() as cur:
            last = cur.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
            cur.execute(_JOINED + " ORDER BY c.customer_id")
            self._mem = MemoryIndex.build(_fetch(cur))
        self._last_seq = last
        return [c.customer_id for c in self._mem.customers()]

    def refresh(self) -> list[str]:
        if self._mem is None:
            return []
        try:
            with self._lock:
                rows = self._db.execute(
                    "SELECT seq, customer_id FROM changes WHERE seq > ?", (self._last_seq,)
                ).fetchall()
                if not rows:
                    self._healthy = True
                    return []
                changed = self._apply(rows)
        except (sqlite3.Error, StoreError) as exc:
            if self._healthy:
                log.warning("store refresh failed (dispatching from memory): %s", exc)
            self._healthy = False
            return []
        self._healthy = True
        return changed

    def _apply(self, rows: list[tuple[int, str | None]]) -> list[str]:
        # AUTOINCREMENT never reuses nor skips a seq (a rollback reverts it too): a gap
        # before the oldest row left means rows this process never saw were pruned
        lowest = self._db.execute("SELECT min(seq) FROM changes").fetchone()[0]
        if lowest > self._last_seq + 1 or any(cid is None for _, cid in rows):
            return self._full_load()
        ids = list(dict.fromkeys(cid for _, cid in rows if cid is not None))
        with self._read() as cur:
            # re-read inside the snapshot so rows and change log agree
            last = cur.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
            more = cur.execute(
                "SELECT customer_id FROM changes WHERE seq > ?", (rows[-1][0],)
            ).fetchall()
            if any(cid is None for (cid,) in more):
                return self._full_load()
            ids.extend(cid for (cid,) in more if cid not in ids)
            fresh = self._load_customers(cur, ids)
        mem = self._mem
        assert mem is not None
        for cid in ids:
            c = fresh.get(cid)
            if c is None:
                mem.remove(cid)
            else:
                mem.put(c)
        self._last_seq = last
        return ids

    def _load_customers(self, cur: sqlite3.Cursor, ids: Sequence[str]) -> dict[str, Customer]:
        out: dict[str, Customer] = {}
        for part in _chunks(ids):
            cur.execute(_JOINED + f" WHERE c.customer_id IN ({_marks(len(part))}) ORDER BY c.customer_id", part)
            for c in MemoryIndex.build(_fetch(cur)).customers():
                out[c.customer_id] = c
        return out

    @property
    def healthy(self) -> bool:
        return self._healthy

    # -- reads ----------------------------------------------------------------------------

    def lookup(self, kind: str, value: str) -> Location | None:
        mem = self._mem
        if mem is not None:
            return mem.lookup(kind, value)
        c = self._direct_owner(f"{kind}:{value}")
        return None if c is None else Location(c.customer_id, c.system, c.state)

    def customer(self, customer_id: str) -> Customer | None:
        mem = self._mem
        if mem is not None:
            return mem.customer(customer_id)
        return self.customers([customer_id]).get(customer_id)

    def customers(self, customer_ids: Iterable[str]) -> dict[str, Customer]:
        ids = list(dict.fromkeys(customer_ids))
        mem = self._mem
        if mem is not None:
            return {cid: c for cid in ids if (c := mem.customer(cid)) is not None}
        with self._read() as cur:
            return self._load_customers(cur, ids)

    def _direct_owner(self, key: str) -> Customer | None:
        with self._read() as cur:
            row = cur.execute("SELECT customer_id FROM identities WHERE key = ?", (key,)).fetchone()
            return None if row is None else self._load_customers(cur, [row[0]]).get(row[0])

    def _owner_id(self, key: str) -> str:
        if self._mem is not None:
            return self._mem.owner(key) or ""
        c = self._direct_owner(key)
        return "" if c is None else c.customer_id

    # -- customers --------------------------------------------------------------------------

    def put_customer(
        self, customer_id: str, identities: Iterable[str], system: str = "source", group: str = ""
    ) -> None:
        row = clean_row({"customer_id": customer_id, "identities": list(identities),
                         "system": system, "group": group})
        self._import([row], None)

    def import_rows(
        self, rows: Iterable[dict[str, object] | CustomerRow], progress: Callable[[int], None] | None = None
    ) -> int:
        """Bulk put_customer.  A row without `system` keeps a stored customer's system (a
        re-import never undoes a migration); new customers start on source."""
        clean: list[CustomerRow] = []
        for i, row in enumerate(rows, 1):
            try:
                clean.append(row if isinstance(row, CustomerRow) else clean_row(row))
            except StoreError as exc:
                raise type(exc)(f"row {i}: {exc}") from None
        return self._import(clean, progress)

    def _import(self, rows: list[CustomerRow], progress: Callable[[int], None] | None) -> int:
        seen: dict[str, str] = {}
        for r in rows:
            for key in r.identities:
                other = seen.setdefault(key, r.customer_id)
                if other != r.customer_id:
                    raise StoreError(f"{key} is given to both customer {other} and customer {r.customer_id}")
        bulk = len(rows) > BULK
        if bulk:  # keys arrive in random order: a bigger page cache for this import only
            self._db.execute("PRAGMA cache_size = -65536")
        try:
            return self._import_tx(rows, list(seen), bulk, progress)
        finally:
            if bulk:
                self._db.execute("PRAGMA cache_size = -2000")

    def _import_tx(
        self, rows: list[CustomerRow], keys: list[str], bulk: bool, progress: Callable[[int], None] | None
    ) -> int:
        with self._write("import") as cur:
            losers: set[str] = set()
            if not bulk:  # customers that lose an identity to these rows change too
                for part in _chunks(keys):
                    cur.execute(f"SELECT customer_id FROM identities WHERE key IN ({_marks(len(part))})", part)
                    losers.update(cid for (cid,) in cur)
            done = 0
            for start in range(0, len(rows), 10_000):
                part_rows = rows[start:start + 10_000]
                # ?2 NULL: a new customer starts on source, a stored one keeps its system
                cur.executemany(
                    "INSERT INTO customers(customer_id, system, grp) VALUES (?1, coalesce(?2, 'source'), ?3) "
                    "ON CONFLICT(customer_id) DO UPDATE SET system = coalesce(?2, system), grp = ?3",
                    ((r.customer_id, r.system, r.group) for r in part_rows),
                )
                cur.executemany("DELETE FROM identities WHERE customer_id = ?",
                                ((r.customer_id,) for r in part_rows))
                cur.executemany("INSERT OR REPLACE INTO identities(key, customer_id) VALUES (?, ?)",
                                ((k, r.customer_id) for r in part_rows for k in r.identities))
                done += len(part_rows)
                if progress is not None:
                    progress(done)
            self._changed(cur, None if bulk else sorted(losers | {r.customer_id for r in rows}))
        return len(rows)

    def lock(self, customer_ids: list[str], batch_id: str) -> None:
        ids = list(dict.fromkeys(customer_ids))
        with self._write("lock") as cur:
            found = self._existing(cur, ids)
            cur.executemany("UPDATE customers SET state = 'locked', batch_id = ? WHERE customer_id = ?",
                            ((batch_id, cid) for cid in found))
            self._changed(cur, found)

    def unlock(self, customer_ids: list[str]) -> None:
        ids = list(dict.fromkeys(customer_ids))
        with self._write("unlock") as cur:
            found = self._existing(cur, ids, "state = 'locked'")
            # the batch id goes back to the batch that last moved the customer
            cur.executemany(
                "UPDATE customers SET state = 'active', batch_id = coalesce((SELECT a.batch_id FROM audit a "
                "WHERE a.customer_id = customers.customer_id ORDER BY a.rowid DESC LIMIT 1), '') "
                "WHERE customer_id = ?", ((cid,) for cid in found))
            self._changed(cur, found)

    def prepare(self, customer_ids: list[str], expires: int) -> None:
        ids = list(dict.fromkeys(customer_ids))
        with self._write("prepare") as cur:
            found = self._existing(cur, ids)
            cur.executemany("UPDATE customers SET expires_cap = ? WHERE customer_id = ?",
                            ((max(0, int(expires)), cid) for cid in found))
            self._changed(cur, found)

    def _existing(self, cur: sqlite3.Cursor, ids: Sequence[str], where: str = "1") -> list[str]:
        found: list[str] = []
        for part in _chunks(ids):
            cur.execute(f"SELECT customer_id FROM customers WHERE {where} AND customer_id IN "
                        f"({_marks(len(part))})", part)
            found.extend(cid for (cid,) in cur)
        return found

    # -- migrations -------------------------------------------------------------------------

    def migrate(
        self,
        customer_ids: list[str],
        to: str,
        who: str = "cli",
        batch_id: str | None = None,
        dry_run: bool = False,
    ) -> MigrationResult:
        if to not in SYSTEMS:
            raise StoreError(f"cannot migrate to {to!r}: one of {', '.join(SYSTEMS)}")
        ids = list(dict.fromkeys(customer_ids))
        now = time.time()
        if dry_run:
            with self._read() as cur:
                return self._migrate_in(cur, ids, to, who, batch_id or "", now, write=False)
        with self._write("migration") as cur:
            bid = batch_id or self._new_batch(cur)
            return self._migrate_in(cur, ids, to, who, bid, now, write=True)

    def rollback(self, batch_id: str, who: str = "cli") -> MigrationResult:
        with self._write("rollback") as cur:
            rows = cur.execute(
                "SELECT customer_id, from_system FROM audit WHERE batch_id = ? ORDER BY rowid", (batch_id,)
            ).fetchall()
            if not rows:
                raise StoreError(f"unknown batch {batch_id!r} (dsbc status lists recent batches)")
            back: dict[str, dict[str, None]] = {}
            for cid, frm in rows:
                back.setdefault(frm, {})[cid] = None
            new = self._new_batch(cur)
            total = MigrationResult(new, ",".join(sorted(back)))
            now = time.time()
            for system, ids in sorted(back.items()):
                r = self._migrate_in(cur, list(ids), system, who, new, now, write=True,
                                     note=f"rollback of {batch_id}")
                total.moved += r.moved
                total.already += r.already
                total.unknown += r.unknown
        return total

    def _new_batch(self, cur: sqlite3.Cursor) -> str:
        while True:
            bid = new_batch_id()
            if cur.execute("SELECT 1 FROM audit WHERE batch_id = ? LIMIT 1", (bid,)).fetchone() is None:
                return bid

    def _migrate_in(
        self, cur: sqlite3.Cursor, ids: list[str], to: str, who: str, batch_id: str, now: float,
        write: bool, note: str = "",
    ) -> MigrationResult:
        """The migration inside an open transaction: checks first, then writes (if `write`)."""
        cur.execute("DELETE FROM temp.batch")
        cur.executemany("INSERT OR IGNORE INTO temp.batch VALUES (?)", ((i,) for i in ids))
        found: dict[str, tuple[str, str, int]] = {
            cid: (system, state, cap)
            for cid, system, state, cap in cur.execute(
                "SELECT c.customer_id, c.system, c.state, c.expires_cap FROM temp.batch b "
                "JOIN customers c ON c.customer_id = b.customer_id")
        }
        # group rule: every member of a group the batch touches is in the batch or already on `to`
        missing = cur.execute(
            "SELECT m.grp, m.customer_id FROM customers m WHERE m.grp != '' AND m.grp IN ("
            "SELECT c.grp FROM temp.batch b JOIN customers c ON c.customer_id = b.customer_id "
            "WHERE c.grp != '') AND m.system != ? AND m.customer_id NOT IN "
            "(SELECT customer_id FROM temp.batch) ORDER BY m.grp, m.customer_id", (to,)).fetchall()
        if missing:
            group = missing[0][0]
            raise GroupSplitError(group, [cid for g, cid in missing if g == group])
        result = MigrationResult(batch_id, to, dry_run=not write)
        touched: list[str] = []  # already on `to` but locked or capped: cleared
        for cid in ids:
            f = found.get(cid)
            if f is None:
                result.unknown.append(cid)
            elif f[0] == to:
                result.already.append(cid)
                if f[1] != "active" or f[2]:
                    touched.append(cid)
            else:
                result.moved.append(cid)
        if write:
            cur.executemany(
                "UPDATE customers SET system = ?, state = 'active', batch_id = ?, expires_cap = 0 "
                "WHERE customer_id = ?", ((to, batch_id, cid) for cid in result.moved))
            cur.executemany("UPDATE customers SET state = 'active', expires_cap = 0 WHERE customer_id = ?",
                            ((cid,) for cid in touched))
            cur.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)",
                            ((now, who, cid, found[cid][0], to, batch_id, note) for cid in result.moved))
            self._changed(cur, result.moved + touched)
        return result

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
                "SELECT batch_id, min(ts), who, from_system, to_system, count(*), note, max(rowid) AS last "
                "FROM audit GROUP BY batch_id ORDER BY last DESC LIMIT ?", (limit,)).fetchall()
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
                "INSERT INTO registrations VALUES (?, ?, ?, ?, ?) ON CONFLICT(account, contact) DO UPDATE "
                "SET system = excluded.system, expires_at = excluded.expires_at, "
                "customer_id = excluded.customer_id", live)
            cur.executemany("DELETE FROM registrations WHERE account = ? AND contact = ?", dead)
            cur.execute("DELETE FROM registrations WHERE expires_at <= ?", (now,))

    def registrations(
        self, customer_ids: list[str] | None = None, now: float | None = None
    ) -> list[Registration]:
        """Live registrations (expires_at > now), of these customers if given."""
        now = time.time() if now is None else now
        q = "SELECT account, contact, system, expires_at, customer_id FROM registrations WHERE expires_at > ?"
        out: list[Registration] = []
        with self._read() as cur:
            if customer_ids is None:
                out = [Registration(*r) for r in cur.execute(q, (now,))]
            else:
                for part in _chunks(list(dict.fromkeys(customer_ids))):
                    cur.execute(q + f" AND customer_id IN ({_marks(len(part))})", (now, *part))
                    out.extend(Registration(*r) for r in cur)
        return out

    # -- API sessions -----------------------------------------------------------------------

    def put_session(self, session: ApiSession) -> None:
        now = time.time()
        self._sessions[session.key] = session
        with self._write("saving a session", refresh=False) as cur:
            cur.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                        (session.key, session.system, session.expires_at, session.customer_id,
                         session.realm, session.extra))
            if now - self._last_purge > 60:
                self._last_purge = now
                cur.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
                for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
                    del self._sessions[key]

    def get_session(self, key: str) -> ApiSession | None:
        s = self._sessions.get(key)
        if s is None:
            with self._read() as cur:
                row = cur.execute("SELECT key, system, expires_at, customer_id, realm, extra "
                                  "FROM sessions WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            s = self._sessions[key] = ApiSession(*row)
        if s.expires_at <= time.time():
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
                    "SELECT system, state, count(*) FROM customers GROUP BY system, state"):
                out[f"customers.{system}.{state}"] = n
            out["customers"] = sum(out.values())
            for name, q, args in (
                ("identities", "SELECT count(*) FROM identities", ()),
                ("groups", "SELECT count(DISTINCT grp) FROM customers WHERE grp != ''", ()),
                ("prepared", "SELECT count(*) FROM customers WHERE expires_cap > 0", ()),
                ("registrations", "SELECT count(*) FROM registrations WHERE expires_at > ?", (now,)),
                ("sessions", "SELECT count(*) FROM sessions WHERE expires_at > ?", (now,)),
            ):
                out[name] = int(cur.execute(q, args).fetchone()[0])
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _fetch(cur: sqlite3.Cursor, size: int = 10_000) -> Iterator[tuple[str, str, str, str, str, int, str | None]]:
    while True:
        rows = cur.fetchmany(size)
        if not rows:
            return
        yield from rows
