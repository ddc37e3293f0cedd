"""Migrations in the SQLite store: atomic, idempotent, audited, group rule, lock, prepare, rollback."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from dsbc.store import GroupSplitError, StoreError, open_store
from dsbc.store.sqlite import SqliteStore
from tests.store_contract import (
    check_concurrent_migrations,
    check_dead_batches,
    check_group_members,
    check_registration_counts,
    check_registrations_recorded_before_the_import,
    check_rollback,
)


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = open_store(f"sqlite:///{tmp_path}/loc.db")
    s.import_rows([
        {"customer_id": "1", "identities": "account:a1;did:101"},
        {"customer_id": "2", "identities": "account:a2;did:102"},
        {"customer_id": "3", "identities": "account:a3", "group": "ivr"},
        {"customer_id": "4", "identities": "account:a4", "group": "ivr"},
        {"customer_id": "5", "identities": "account:a5", "group": "ivr"},
    ])
    yield s
    s.close()


def systems(store: SqliteStore) -> dict[str, str]:
    return {cid: c.system for cid, c in store.customers(["1", "2", "3", "4", "5"]).items()}


def test_migrate_flips_every_identity_and_audits(store: SqliteStore) -> None:
    r = store.migrate(["1", "2"], "target", who="alice")
    assert re.fullmatch(r"b-\d{8}-\d{6}-[0-9a-f]{4}", r.batch_id)
    assert (r.moved, r.already, r.unknown, r.dry_run) == (["1", "2"], [], [], False)
    for key in ("a1", "a2"):
        loc = store.lookup("account", key)
        assert loc is not None and (loc.system, loc.state) == ("target", "active")
    assert store.lookup("did", "101").system == "target"  # type: ignore[union-attr]
    assert store.customer("1").batch_id == r.batch_id  # type: ignore[union-attr]
    entries = store.audit(r.batch_id)
    assert [(e.who, e.customer_id, e.from_system, e.to_system) for e in entries] == [
        ("alice", "1", "source", "target"), ("alice", "2", "source", "target")]
    assert all(e.ts > 0 for e in entries)


def test_migrate_is_idempotent_and_reports_unknown(store: SqliteStore) -> None:
    first = store.migrate(["1"], "target")
    again = store.migrate(["1", "2", "nope"], "target")
    assert (again.moved, again.already, again.unknown) == (["2"], ["1"], ["nope"])
    assert [e.customer_id for e in store.audit(again.batch_id)] == ["2"]  # `already` is not audited
    assert first.batch_id != again.batch_id


def test_migrate_to_a_bad_system(store: SqliteStore) -> None:
    with pytest.raises(StoreError, match="cannot migrate to 'middle'"):
        store.migrate(["1"], "middle")


def test_group_split_is_refused_and_changes_nothing(store: SqliteStore, tmp_path: Path) -> None:
    with pytest.raises(GroupSplitError) as err:
        store.migrate(["1", "3"], "target")
    assert str(err.value) == "group 'ivr' must move together: missing customer(s) 4, 5"
    assert (err.value.group, err.value.missing) == ("ivr", ["4", "5"])
    assert set(systems(store).values()) == {"source"}
    db = sqlite3.connect(tmp_path / "loc.db")
    assert db.execute("SELECT count(*) FROM audit").fetchone()[0] == 0


def test_group_moves_together_or_in_steps_over_members_already_there(store: SqliteStore) -> None:
    store.migrate(["3", "4", "5"], "target")
    assert systems(store) == {"1": "source", "2": "source", "3": "target", "4": "target", "5": "target"}
    # a member may go back only with the rest of its group
    with pytest.raises(GroupSplitError, match="missing customer.s. 3, 5"):
        store.migrate(["4"], "source")


def test_dry_run_checks_everything_and_changes_nothing(store: SqliteStore, tmp_path: Path) -> None:
    r = store.migrate(["1", "2", "nope"], "target", dry_run=True)
    assert (r.moved, r.unknown, r.dry_run) == (["1", "2"], ["nope"], True)
    with pytest.raises(GroupSplitError):
        store.migrate(["3"], "target", dry_run=True)
    assert set(systems(store).values()) == {"source"}
    db = sqlite3.connect(tmp_path / "loc.db")
    assert db.execute("SELECT count(*) FROM audit").fetchone()[0] == 0
    assert store.refresh() == []


def test_lock_then_flip(store: SqliteStore, tmp_path: Path) -> None:
    other = open_store(f"sqlite:///{tmp_path}/loc.db")  # a dispatcher process
    store.lock(["1", "2", "nope"], "b-test")
    assert sorted(other.refresh()) == ["1", "2"]
    loc = other.lookup("account", "a1")
    assert loc is not None and (loc.system, loc.state) == ("source", "locked")
    assert other.decide("account", "a1").state == "locked"
    store.migrate(["1", "2"], "target", batch_id="b-test")
    other.refresh()
    loc = other.lookup("account", "a1")
    assert loc is not None and (loc.system, loc.state) == ("target", "active")
    assert {e.batch_id for e in store.audit()} == {"b-test"}


def test_unlock_restores_state_and_batch(store: SqliteStore) -> None:
    moved = store.migrate(["1"], "target").batch_id
    store.lock(["1", "2"], "b-aborted")
    store.unlock(["1", "2"])
    c1, c2 = store.customer("1"), store.customer("2")
    assert c1 is not None and (c1.system, c1.state, c1.batch_id) == ("target", "active", moved)
    assert c2 is not None and (c2.system, c2.state, c2.batch_id) == ("source", "active", "")


def test_already_there_but_locked_is_unlocked(store: SqliteStore) -> None:
    store.migrate(["1"], "target")
    store.lock(["1"], "b-x")
    r = store.migrate(["1"], "target")
    assert r.already == ["1"]
    assert store.customer("1").state == "active"  # type: ignore[union-attr]


def test_prepare_caps_expiry_until_the_flip(store: SqliteStore, tmp_path: Path) -> None:
    other = open_store(f"sqlite:///{tmp_path}/loc.db")
    store.prepare(["1", "2"], 60)
    other.refresh()
    assert other.customer("1").expires_cap == 60  # type: ignore[union-attr]
    store.migrate(["1"], "target")
    other.refresh()
    assert other.customer("1").expires_cap == 0  # type: ignore[union-attr]
    assert other.customer("2").expires_cap == 60  # type: ignore[union-attr]
    store.prepare(["2"], 0)
    assert store.customer("2").expires_cap == 0  # type: ignore[union-attr]


def test_rollback_moves_a_batch_back_as_a_new_batch(store: SqliteStore) -> None:
    check_rollback(store)


def test_rollback_keeps_groups_whole(store: SqliteStore) -> None:
    store.migrate(["3", "4", "5"], "target")
    store.put_customer("6", ["account:a6"], "source", group="ivr")  # joins the group later
    late = store.migrate(["6"], "target")  # allowed: the rest of the group is already there
    with pytest.raises(GroupSplitError, match="group 'ivr' must move together: missing customer.s. 3, 4, 5"):
        store.rollback(late.batch_id)
    assert store.customer("6").system == "target"  # type: ignore[union-attr]


def test_rollback_unknown_batch(store: SqliteStore) -> None:
    with pytest.raises(StoreError, match="unknown batch 'b-nope'"):
        store.rollback("b-nope")


def test_big_batch_in_one_transaction(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path}/big.db")
    s.import_rows({"customer_id": str(i), "identities": [f"account:u{i}"]} for i in range(20_000))
    r = s.migrate([str(i) for i in range(20_000)], "target")
    assert len(r.moved) == 20_000
    assert s.counts()["customers.target.active"] == 20_000
    assert s.lookup("account", "u19999").system == "target"  # type: ignore[union-attr]


def test_base_class_defaults_agree_with_sqlite(store: SqliteStore) -> None:
    """`batches` and `unlock` have generic versions in LocationStore for other store kinds."""
    from dsbc.store import LocationStore

    b = store.migrate(["1", "2"], "target")
    store.rollback(b.batch_id)
    assert LocationStore.batches(store, 10) == store.batches(10)
    store.lock(["1", "3"], "b-aborted")
    LocationStore.unlock(store, ["1", "3"])
    assert {c.state for c in store.customers(["1", "3"]).values()} == {"active"}
    assert systems(store)["1"] == "source"


def test_locks_of_a_dead_migration_are_released(store: SqliteStore) -> None:
    check_dead_batches(store)


def test_leases_of_ended_batches_are_forgotten(store: SqliteStore) -> None:
    from tests.store_contract import check_spent_leases

    def leases() -> set[str]:
        with store._read() as cur:
            return {b for (b,) in cur.execute("SELECT batch_id FROM leases")}

    check_spent_leases(store, leases)


def test_group_members(store: SqliteStore) -> None:
    check_group_members(store)


def test_concurrent_migrations_of_the_same_customers(store: SqliteStore, tmp_path: Path) -> None:
    other = open_store(f"sqlite:///{tmp_path}/loc.db")  # another `dsbc migrate` process
    try:
        check_concurrent_migrations(store, other)
    finally:
        other.close()


def test_registration_counts_per_system(store: SqliteStore) -> None:
    check_registration_counts(store)


def test_registrations_recorded_before_the_import(store: SqliteStore) -> None:
    check_registrations_recorded_before_the_import(store)
