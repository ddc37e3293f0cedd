"""The SQLite layout of the location store, its URL forms, and the statements that work on
an open transaction's cursor alone (change log, migration checks and writes)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence

from .base import BatchCancelled, GroupSplitError, MigrationResult, StoreError
from .memory import new_batch_id

SCHEMA_VERSION = "1"
BULK = 1000  # an import of more customers than this writes one NULL change row
KEEP_CHANGES = 100_000  # change-log rows kept; a process further behind reloads everything
CHUNK = 500  # ids per IN (...) query

SCHEMA = """
CREATE TABLE IF NOT EXISTS customers(
    customer_id TEXT PRIMARY KEY, system TEXT NOT NULL DEFAULT 'source',
    state TEXT NOT NULL DEFAULT 'active', grp TEXT NOT NULL DEFAULT '',
    batch_id TEXT NOT NULL DEFAULT '', expires_cap INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS customers_grp ON customers(grp) WHERE grp != '';
CREATE TABLE IF NOT EXISTS identities(
    key TEXT PRIMARY KEY, customer_id TEXT NOT NULL) WITHOUT ROWID;
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
CREATE INDEX IF NOT EXISTS customers_locked ON customers(batch_id) WHERE state = 'locked';
CREATE TABLE IF NOT EXISTS leases(batch_id TEXT PRIMARY KEY, until REAL NOT NULL) WITHOUT ROWID;
"""

# (customer_id, system, state, grp, batch_id, expires_cap, key): MemoryIndex.build's rows
JOINED = (
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
    rest = url[len("sqlite:") :]
    if rest.startswith("///"):
        path = rest[3:]
        if path != ":memory:" and not path.startswith(("./", "../")) and "/" in path:
            path = "/" + path.lstrip("/")
    elif rest.startswith("//"):
        path = rest[2:]
    else:
        path = rest
    if not path.strip("/"):  # sqlite3 would open a temporary database: kept nowhere
        raise StoreError(f"{url!r} names no file (sqlite:///path/location.db)")
    return path


def chunks(seq: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def marks(n: int) -> str:
    return ",".join("?" * n)


def fetch_all(
    cur: sqlite3.Cursor, size: int = 10_000
) -> Iterator[tuple[str, str, str, str, str, int, str | None]]:
    while True:
        rows = cur.fetchmany(size)
        if not rows:
            return
        yield from rows


def log_changes(cur: sqlite3.Cursor, ids: Iterable[str] | None) -> None:
    """Append to the change log (None: "reload everything") and prune its oldest rows."""
    if ids is None:
        cur.execute("INSERT INTO changes(customer_id) VALUES (NULL)")
    else:
        cur.executemany("INSERT INTO changes(customer_id) VALUES (?)", ((i,) for i in ids))
    cur.execute(
        "DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - ?", (KEEP_CHANGES,)
    )


def existing(
    cur: sqlite3.Cursor, ids: Sequence[str], where: str = "1", args: Sequence[object] = ()
) -> list[str]:
    """The ids among `ids` that have a customer row (matching `where` with `args`)."""
    found: list[str] = []
    for part in chunks(ids):
        cur.execute(
            f"SELECT customer_id FROM customers WHERE {where} AND customer_id IN "
            f"({marks(len(part))})",
            (*args, *part),
        )
        found.extend(cid for (cid,) in cur)
    return found


UNLOCK = (  # the batch id goes back to the batch that last moved the customer
    "UPDATE customers SET state = 'active', batch_id = coalesce((SELECT a.batch_id "
    "FROM audit a WHERE a.customer_id = customers.customer_id ORDER BY a.rowid DESC LIMIT 1), '') "
    "WHERE customer_id = ?"
)


# the leases that ran out and hold no customer locked (their batch ended); a rolled-back
# batch's CANCELLED row stays (a migration of it still running must learn it)
SPENT_LEASES = (
    "SELECT l.batch_id FROM leases l WHERE l.until >= 0 AND l.until < ? AND NOT EXISTS "
    "(SELECT 1 FROM customers c WHERE c.state = 'locked' AND c.batch_id = l.batch_id)"
)

CANCELLED = -1.0  # the lease of a batch rolled back while it ran: it may lock and flip no more


def check_not_cancelled(cur: sqlite3.Cursor, batch_id: str) -> None:
    row = cur.execute("SELECT until FROM leases WHERE batch_id = ?", (batch_id,)).fetchone()
    if row is not None and row[0] == CANCELLED:
        raise BatchCancelled(batch_id)


def locked_by(cur: sqlite3.Cursor, batch_id: str) -> list[tuple[str, str]]:
    """(customer id, system) of the customers `batch_id` holds locked."""
    return cur.execute(
        "SELECT customer_id, system FROM customers WHERE state = 'locked' AND batch_id = ? "
        "ORDER BY customer_id", (batch_id,)).fetchall()


def held_by_others(cur: sqlite3.Cursor, ids: Sequence[str], batch_id: str) -> dict[str, str]:
    """Customer id -> batch, for the ids among `ids` another batch than `batch_id` holds locked."""
    held: dict[str, str] = {}
    for part in chunks(ids):
        cur.execute(
            "SELECT customer_id, batch_id FROM customers WHERE state = 'locked' AND batch_id != ? "
            f"AND customer_id IN ({marks(len(part))})",
            (batch_id, *part),
        )
        held.update(cur.fetchall())
    return held


def new_batch(cur: sqlite3.Cursor) -> str:
    """A batch id the audit log has not seen."""
    while True:
        bid = new_batch_id()
        if cur.execute("SELECT 1 FROM audit WHERE batch_id = ? LIMIT 1", (bid,)).fetchone() is None:
            return bid


def migrate_in(
    cur: sqlite3.Cursor,
    ids: list[str],
    to: str,
    who: str,
    batch_id: str,
    now: float,
    write: bool,
    note: str = "",
) -> MigrationResult:
    """The migration inside an open transaction: checks first, then writes (if `write`)."""
    cur.execute("DELETE FROM temp.batch")
    cur.executemany("INSERT OR IGNORE INTO temp.batch VALUES (?)", ((i,) for i in ids))
    found: dict[str, tuple[str, str, int]] = {
        cid: (system, state, cap)
        for cid, system, state, cap in cur.execute(
            "SELECT c.customer_id, c.system, c.state, c.expires_cap FROM temp.batch b "
            "JOIN customers c ON c.customer_id = b.customer_id"
        )
    }
    # group rule: every member of a group the batch touches is in the batch or already on `to`
    missing = cur.execute(
        "SELECT m.grp, m.customer_id FROM customers m WHERE m.grp != '' AND m.grp IN ("
        "SELECT c.grp FROM temp.batch b JOIN customers c ON c.customer_id = b.customer_id "
        "WHERE c.grp != '') AND m.system != ? AND m.customer_id NOT IN "
        "(SELECT customer_id FROM temp.batch) ORDER BY m.grp, m.customer_id",
        (to,),
    ).fetchall()
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
            "WHERE customer_id = ?",
            ((to, batch_id, cid) for cid in result.moved),
        )
        cur.executemany(
            "UPDATE customers SET state = 'active', expires_cap = 0 WHERE customer_id = ?",
            ((cid,) for cid in touched),
        )
        cur.executemany(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((now, who, cid, found[cid][0], to, batch_id, note) for cid in result.moved),
        )
        log_changes(cur, result.moved + touched)
    return result
