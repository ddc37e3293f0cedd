"""The SQLite store: schema, imports, change feed across processes, failures, registrations,
sessions, meta.  Real files in tmp_path."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dsbc.store import (
    ApiSession,
    BadRow,
    Registration,
    StoreError,
    StoreUnavailable,
    open_store,
)
from dsbc.store.sqlite import SqliteStore, sqlite_path


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/loc.db"


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = open_store(url(tmp_path))
    yield s
    s.close()


def run_py(code: str) -> None:
    """Run `code` in another Python process (another dispatcher, the CLI)."""
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=60)


# --- opening ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("u", "path"),
    [
        ("sqlite:///var/lib/dsbc/location.db", "/var/lib/dsbc/location.db"),
        ("sqlite:////var/lib/dsbc/location.db", "/var/lib/dsbc/location.db"),
        ("sqlite:///location.db", "location.db"),
        ("sqlite:///./data/location.db", "./data/location.db"),
        ("sqlite://data/location.db", "data/location.db"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_urls(u: str, path: str) -> None:
    assert sqlite_path(u) == path


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="cannot reach redis://127.0.0.1:1/0"):
        open_store("redis://127.0.0.1:1/0")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"sqlite:///{tmp_path}/missing/loc.db")
    with pytest.raises(StoreError, match="unknown"):
        open_store(url(tmp_path), "sideways")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open store"):
        open_store(f"sqlite:///{tmp_path}/junk.db")


def test_schema_and_wal(store: SqliteStore, tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "loc.db")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"customers", "identities", "audit", "changes", "registrations", "sessions", "meta"} <= tables
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.get_meta("schema") == "1"


# --- customers --------------------------------------------------------------------------


def test_import_and_lookup(store: SqliteStore) -> None:
    n = store.import_rows([
        {"customer_id": "1", "identities": "account:alice;did:+1 555 0100"},
        {"customer_id": "2", "identities": ["account:bob"], "system": "target", "group": "g"},
    ])
    assert n == 2
    loc = store.lookup("did", "15550100")
    assert loc is not None and (loc.customer_id, loc.system, loc.state) == ("1", "source", "active")
    c = store.customer("2")
    assert c is not None and (c.system, c.group, c.identities) == ("target", "g", ("account:bob",))
    assert store.counts()["identities"] == 3


def test_import_errors_name_the_row_and_change_nothing(store: SqliteStore) -> None:
    with pytest.raises(BadRow, match=r"row 2: did:'12ab' is not a number"):
        store.import_rows([{"customer_id": "1", "identities": "account:a"},
                           {"customer_id": "2", "identities": "did:12ab"}])
    with pytest.raises(StoreError, match="account:a is given to both customer 1 and customer 2"):
        store.import_rows([{"customer_id": "1", "identities": "account:a"},
                           {"customer_id": "2", "identities": "account:a"}])
    assert store.counts()["customers"] == 0


def test_reimport_keeps_the_system_unless_given(store: SqliteStore) -> None:
    store.import_rows([{"customer_id": "1", "identities": "account:a"}])
    store.migrate(["1"], "target")
    store.import_rows([{"customer_id": "1", "identities": "account:a;did:100"}])
    c = store.customer("1")
    assert c is not None and c.system == "target" and c.identities == ("account:a", "did:100")
    store.import_rows([{"customer_id": "1", "identities": "account:a", "system": "source"}])
    assert store.lookup("did", "100") is None
    assert store.lookup("account", "a").system == "source"  # type: ignore[union-attr]


def test_put_customer_takes_an_identity_from_another(store: SqliteStore, tmp_path: Path) -> None:
    store.put_customer("1", ["account:a", "did:100"])
    other = open_store(url(tmp_path))
    store.put_customer("2", ["did:100"], "target")
    assert store.customer("1").identities == ("account:a",)  # type: ignore[union-attr]
    assert other.refresh() and other.lookup("did", "100").customer_id == "2"  # type: ignore[union-attr]
    assert other.customer("1").identities == ("account:a",)  # type: ignore[union-attr]


def test_bulk_import_writes_one_reload_row(store: SqliteStore, tmp_path: Path) -> None:
    other = open_store(url(tmp_path))
    rows = [{"customer_id": str(i), "identities": [f"did:{1000 + i}", f"account:u{i}"]} for i in range(3000)]
    seen: list[int] = []
    assert store.import_rows(rows, progress=seen.append) == 3000
    assert seen[-1] == 3000
    db = sqlite3.connect(tmp_path / "loc.db")
    assert db.execute("SELECT count(*), count(customer_id) FROM changes").fetchone() == (1, 0)
    assert len(other.refresh()) == 3000  # a full reload reports every customer
    assert other.lookup("account", "u2999").customer_id == "2999"  # type: ignore[union-attr]


# --- the change feed --------------------------------------------------------------------


def test_refresh_is_empty_when_nothing_changed(store: SqliteStore) -> None:
    store.put_customer("1", ["account:a"])
    assert store.refresh() == []  # own writes are already applied
    assert store.healthy


def test_changes_from_another_process_are_seen(store: SqliteStore, tmp_path: Path) -> None:
    store.put_customer("1", ["account:a"])
    run_py(f"""
        from dsbc.store import open_store
        s = open_store({url(tmp_path)!r}, load=False)
        s.migrate(["1"], "target", who="other")
        s.put_customer("2", ["did:200"])
    """)
    # the other process has committed: the very next refresh sees it
    assert sorted(store.refresh()) == ["1", "2"]
    assert store.lookup("account", "a").system == "target"  # type: ignore[union-attr]
    assert store.lookup("did", "200").customer_id == "2"  # type: ignore[union-attr]


def test_change_visible_within_one_second_while_polling(store: SqliteStore, tmp_path: Path) -> None:
    """A writer process flips a customer while this one polls as the runner does (every 0.2 s)."""
    store.put_customer("1", ["account:a"])
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from dsbc.store import open_store
        s = open_store({url(tmp_path)!r}, load=False)
        time.sleep(0.3)
        s.migrate(["1"], "target")
        print(time.time(), flush=True)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        seen_at = None
        for _ in range(150):  # bounded: 30 s at most
            store.refresh()
            if store.lookup("account", "a").system == "target":  # type: ignore[union-attr]
                seen_at = time.time()
                break
            time.sleep(0.2)
        out, _ = writer.communicate(timeout=30)
    finally:
        writer.kill()
    assert seen_at is not None
    assert seen_at - float(out) < 1.0


def test_pruned_change_log_forces_a_full_reload(store: SqliteStore, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import dsbc.store.sqlite_schema as schema

    store.put_customer("1", ["account:a"])
    monkeypatch.setattr(schema, "KEEP_CHANGES", 2)
    writer = open_store(url(tmp_path), load=False)
    for i in range(10):
        writer.put_customer(str(100 + i), [f"account:x{i}"])
    writer.migrate(["1"], "target")
    assert "1" in store.refresh()
    assert store.lookup("account", "x0") is not None  # only a full reload knows x0
    assert store.lookup("account", "a").system == "target"  # type: ignore[union-attr]


def test_refresh_failure_marks_unhealthy_and_keeps_serving(store: SqliteStore, tmp_path: Path) -> None:
    store.put_customer("1", ["account:a"])
    db = sqlite3.connect(tmp_path / "loc.db")
    db.execute("DROP TABLE changes")
    db.commit()
    assert store.refresh() == []
    assert not store.healthy
    assert store.lookup("account", "a") is not None


# --- failures: nothing half-applied ------------------------------------------------------


def test_disk_full_rolls_back(tmp_path: Path) -> None:
    s = open_store(url(tmp_path))
    s.put_customer("1", ["account:a"])
    assert isinstance(s, SqliteStore)
    pages = s._db.execute("PRAGMA page_count").fetchone()[0]
    s._db.execute(f"PRAGMA max_page_count = {pages + 2}")
    rows = [{"customer_id": str(i), "identities": [f"account:{'x' * 50}{i}"]} for i in range(2, 5000)]
    with pytest.raises(StoreUnavailable, match="the disk is full; nothing was changed"):
        s.import_rows(rows)
    assert s.counts()["customers"] == 1
    assert s.lookup("account", "x" * 50 + "2") is None


def test_a_migration_is_in_the_database_file_not_only_in_the_wal(tmp_path: Path) -> None:
    """location.db alone (a backup that copied it without -wal, a -wal file deleted) still
    holds every committed migration: the write is checkpointed at once."""
    db = tmp_path / "loc.db"
    node = SqliteStore(str(db))  # a running node: the database stays open
    cli = SqliteStore(str(db), load=False)
    try:
        cli.import_rows([{"customer_id": str(i), "identities": [f"account:a{i}"]} for i in range(1, 4)])
        node.refresh()
        node.record_registrations([Registration("a1", "sip:a1@192.0.2.1", "source", time.time() + 60, "1")])
        cli.migrate(["1"], "target")
        copy = tmp_path / "copy"
        copy.mkdir()
        (copy / "loc.db").write_bytes(db.read_bytes())
        backup = SqliteStore(str(copy / "loc.db"), load=False, create=False)
        try:
            assert backup.customer("1").system == "target"  # type: ignore[union-attr]
            assert [e.customer_id for e in backup.audit()] == ["1"]
        finally:
            backup.close()
    finally:
        cli.close()
        node.close()


def test_busy_store_is_reported(tmp_path: Path) -> None:
    s = SqliteStore(str(tmp_path / "loc.db"), busy_timeout=0.2)
    s.put_customer("1", ["account:a"])
    other = sqlite3.connect(tmp_path / "loc.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="busy"):
            s.migrate(["1"], "target")
    finally:
        other.execute("ROLLBACK")
    assert s.customer("1").system == "source"  # type: ignore[union-attr]
    assert s.migrate(["1"], "target").moved == ["1"]


# --- direct mode (CLI) ------------------------------------------------------------------


def test_direct_reads_without_loading(store: SqliteStore, tmp_path: Path) -> None:
    store.put_customer("1", ["account:a", "did:100"], "target", group="g")
    d = open_store(url(tmp_path), load=False)
    loc = d.lookup("did", "100")
    assert loc is not None and (loc.customer_id, loc.system) == ("1", "target")
    assert d.customer("1").group == "g"  # type: ignore[union-attr]
    assert set(d.customers(["1", "nope"])) == {"1"}
    assert d.decide("did", "999").system == "source"
    assert d.refresh() == []


# --- registrations, sessions, meta --------------------------------------------------------


def test_registrations(store: SqliteStore) -> None:
    store.put_customer("1", ["account:alice"])
    now = 1000.0
    store.record_registrations([
        Registration("alice", "sip:alice@10.0.0.1:5060", "source", now + 60),
        Registration("alice", "sip:alice@10.0.0.2:5060", "source", now + 60, "1"),
        Registration("zed", "sip:zed@10.0.0.3", "source", now + 60),
    ], now=now)
    regs = store.registrations(["1"], now=now)
    assert sorted(r.contact for r in regs) == ["sip:alice@10.0.0.1:5060", "sip:alice@10.0.0.2:5060"]
    assert all(r.customer_id == "1" for r in regs)  # filled from the account identity
    # re-registration on the target updates the same row; expiry 0 removes one
    store.record_registrations([
        Registration("alice", "sip:alice@10.0.0.1:5060", "target", now + 3600),
        Registration("alice", "sip:alice@10.0.0.2:5060", "source", now),
    ], now=now + 1)
    regs = store.registrations(["1"], now=now + 1)
    assert [(r.contact, r.system) for r in regs] == [("sip:alice@10.0.0.1:5060", "target")]
    assert [r.account for r in store.registrations(now=now + 100)] == ["alice"]  # zed expired
    assert store.counts()["registrations"] == 0  # wall clock is far past `now`


def test_sessions(store: SqliteStore, tmp_path: Path) -> None:
    later = time.time() + 3600
    store.put_session(ApiSession("tok1", "source", later, "1", "customer", '{"x": 1}'))
    assert store.get_session("tok1").extra == '{"x": 1}'  # type: ignore[union-attr]
    other = open_store(url(tmp_path))  # another node: memory miss, read from SQLite
    s = other.get_session("tok1")
    assert s is not None and (s.system, s.customer_id, s.realm) == ("source", "1", "customer")
    store.put_session(ApiSession("old", "target", time.time() - 1))
    assert store.get_session("old") is None
    store.delete_session("tok1")
    assert store.get_session("tok1") is None
    assert open_store(url(tmp_path)).get_session("tok1") is None
    assert other.get_session("nope") is None


def test_the_session_cache_keeps_only_what_it_would_not_read_again(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A soak found worker 0 growing with every login (about 1 KB each) until the sessions
    expired: each was cached for its whole life, though the cache is read again from SQLite
    after SESSION_FRESH anyway.  Now what is older than that leaves the cache."""
    import dsbc.store.sqlite as mod

    clock = [time.time()]
    monkeypatch.setattr(mod, "time", type("T", (), {"time": staticmethod(lambda: clock[0])}))
    for i in range(500):
        store.put_session(ApiSession(f"tok{i}", "source", clock[0] + 3600, str(i), "customer"))
    clock[0] += 120  # past the once-a-minute trim, sessions still valid
    s = store.get_session("tok7")
    assert s is not None and s.customer_id == "7"  # read again from SQLite
    assert len(store._sessions) == 1, len(store._sessions)
    clock[0] += 120
    store.put_session(ApiSession("new", "target", clock[0] + 3600))
    assert set(store._sessions) == {"new"}


def test_meta(store: SqliteStore) -> None:
    assert store.get_meta("flow_secret") is None
    assert store.set_meta("flow_secret", "aaa", only_if_absent=True) == "aaa"
    assert store.set_meta("flow_secret", "bbb", only_if_absent=True) == "aaa"
    assert store.set_meta("flow_secret", "ccc") == "ccc"
    assert store.get_meta("flow_secret") == "ccc"


def test_meta_keys(store: SqliteStore) -> None:
    from tests.store_contract import check_meta_keys

    check_meta_keys(store)


def test_counts(store: SqliteStore) -> None:
    store.put_customer("1", ["account:a"])
    store.put_customer("2", ["account:b", "did:1"], "target", group="g")
    store.lock(["1"], "b-x")
    store.prepare(["2"], 60)
    c = store.counts()
    assert c["customers"] == 2 and c["identities"] == 3 and c["groups"] == 1 and c["prepared"] == 1
    assert c["customers.source.locked"] == 1 and c["customers.target.active"] == 1


def test_removed_bindings_leave_the_store(tmp_path: Path) -> None:
    """Bindings of 0 s (a de-registration) and `Contact: *` remove what the store holds, and
    a later REGISTER of the same binding is written again."""
    from dsbc.regfilter import RefreshFilter
    from dsbc.sip_service import registrations_of
    from sip.proxy import RegistrationSeen

    store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
    try:
        store.put_customer("1", ["account:u1"], "source")
        seen = RefreshFilter()
        now = time.time()

        def apply(*contacts: tuple[str, int]) -> None:
            ev = RegistrationSeen("u1", list(contacts), "source", "udp:10.0.0.1:5060")
            store.record_registrations(registrations_of([ev], store, seen.fresh, now))

        apply(("sip:u1@10.0.0.1", 600), ("sip:u1@10.0.0.2", 600), ("sip:u1@10.0.0.3", 600))
        apply(("sip:u1@10.0.0.1", 0))
        assert sorted(r.contact for r in store.registrations(["1"])) == ["sip:u1@10.0.0.2", "sip:u1@10.0.0.3"]
        apply(("*", 0))
        assert store.registrations(["1"]) == []
        apply(("sip:u1@10.0.0.2", 600))  # registered again: written although seen before
        assert [r.contact for r in store.registrations(["1"])] == ["sip:u1@10.0.0.2"]
    finally:
        store.close()


def test_a_full_or_read_only_disk_is_an_operational_failure_named_as_such(tmp_path: Path) -> None:
    """Found by an audit: a store on a full disk gave `cannot open store ...: disk I/O
    error` and on a read-only one `unable to open database file`, both exit 2 (bad
    input), for every command, `dsbc where` and `dsbc status` too.  They are exit 1
    (the store cannot be written: not the operator's input) and say what is wrong."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False).returncode:
        pytest.skip("cannot make a mount namespace (unshare -m) here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    repo = Path(__file__).resolve().parents[1]
    dsbc = f"{sys.executable} -m dsbc.cli --store sqlite:///{mnt}/loc.db"
    script = f"""
set -u
mount -t tmpfs -o size=2m tmpfs {mnt}
{dsbc} import {tmp_path}/c.csv >/dev/null || exit 9
dd if=/dev/zero of={mnt}/fill bs=16k 2>/dev/null
{dsbc} where account:u1; echo "rc=$?"
{dsbc} migrate --customer 1; echo "rc=$?"
rm {mnt}/fill
mount -o remount,ro {mnt}
{dsbc} migrate --customer 1; echo "rc=$?"
"""
    (tmp_path / "c.csv").write_text("customer_id,identities\n" + "".join(f"{i},account:u{i}\n" for i in range(500)))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       text=True, cwd=repo, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.split() == ["rc=1"] * 3, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 3, r.stderr
    assert lines[0] == lines[1] == f"cannot open store {mnt}/loc.db: the disk is full (disk I/O error)"
    assert lines[2].startswith(f"cannot open store {mnt}/loc.db: {mnt} is on a read-only file system")


@pytest.mark.skipif(os.geteuid() != 0, reason="root makes the store here, as `sudo dsbc import` does")
def test_a_store_root_makes_in_the_services_directory_belongs_to_the_service(tmp_path: Path) -> None:
    """OPERATIONS: `dsbc import customers.csv` (as root) before `systemctl enable --now
    dsbc` (User=dsbc, StateDirectory /var/lib/dsbc): the file was root's, and the node
    could not open it ("attempt to write a readonly database"), nor could `systemctl
    reload`'s check.  A store file root makes or opens in a directory of another user is
    handed to that user."""
    state = tmp_path / "lib"
    state.mkdir()
    os.chown(state, 65534, 65534)  # nobody: the service's user
    db = state / "location.db"
    store = SqliteStore(str(db))
    try:
        store.import_rows([{"customer_id": "1", "identities": ["account:1001"], "system": "source"}])
        owned = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in state.iterdir()}
    finally:
        store.close()
    assert owned["location.db"] == (65534, 65534), owned
    assert all(ids == (65534, 65534) for ids in owned.values()), owned  # -wal, -shm too
