"""Scenarios every store kind must pass the same way (SQLite and Redis tests call them)."""

from __future__ import annotations

import time
from collections.abc import Callable

from dsbc.store.base import LocationStore, Registration


def systems(store: LocationStore) -> dict[str, str]:
    """Where the five sample customers "1".."5" live."""
    return {cid: c.system for cid, c in store.customers([str(i) for i in range(1, 6)]).items()}


def check_rollback(store: LocationStore) -> None:
    """Customers "1".."5" on the source: a rollback moves a batch back as a new batch,
    audited; rolling back the rollback moves them again; rolling back twice does nothing."""
    store.migrate(["2"], "target")  # an earlier batch, untouched by the rollback
    b = store.migrate(["1", "3", "4", "5"], "target", who="alice")
    r = store.rollback(b.batch_id, who="bob")
    assert r.batch_id != b.batch_id and r.to == "source"
    assert sorted(r.moved) == ["1", "3", "4", "5"]
    assert systems(store) == {"1": "source", "2": "target", "3": "source", "4": "source", "5": "source"}
    entries = store.audit(r.batch_id)
    assert {(e.who, e.from_system, e.to_system, e.note) for e in entries} == {
        ("bob", "target", "source", f"rollback of {b.batch_id}")}
    rr = store.rollback(r.batch_id)
    assert sorted(rr.moved) == ["1", "3", "4", "5"]
    again = store.rollback(r.batch_id)
    assert again.moved == [] and sorted(again.already) == ["1", "3", "4", "5"]
    summaries = store.batches(10)
    assert [(x.batch_id, x.customers, x.note) for x in summaries[:3]] == [
        (rr.batch_id, 4, f"rollback of {r.batch_id}"),
        (r.batch_id, 4, f"rollback of {b.batch_id}"),
        (b.batch_id, 4, ""),
    ]
    assert (summaries[2].who, summaries[2].from_system, summaries[2].to_system) == ("alice", "source", "target")


def check_group_members(store: LocationStore) -> None:
    """Customers "3".."5" in group "ivr": the batch read an import checks groups with, the
    same whether the store has its index in memory or reads the backing store."""
    assert store.group_members(["ivr", "nobody", ""]) == {"ivr": ["3", "4", "5"]}
    store.put_customer("6", ["account:a6"], "source", group="ivr")
    store.put_customer("4", ["account:a4"], "source", group="other")
    assert store.group_members(["ivr", "other"]) == {"ivr": ["3", "5", "6"], "other": ["4"]}
    assert store.group_members([]) == {}


def check_concurrent_migrations(first: LocationStore, second: LocationStore) -> None:
    """Two stores open on the same backing store (two processes, two nodes), customers
    "1".."5" on the source: two migrations of overlapping customers that both pass their
    check before either locks (the race the check-then-lock used to lose: both ran, the
    later lock took the earlier batch's customers).  One wins every customer it shares,
    the other is refused naming the winner's batch, with nothing of its own changed, and
    nothing is left locked."""
    import threading

    from dsbc.migrate import move_batch
    from dsbc.store import LockedByBatch, MigrationResult

    both_checked = threading.Barrier(2, timeout=20)

    class CheckedThenLocks:
        """The store, with a lock that waits until the other migration has checked too."""

        def __init__(self, store: LocationStore) -> None:
            self.store = store
            self.first = True

        def __getattr__(self, name: str) -> object:
            return getattr(self.store, name)

        def lock(self, ids: list[str], batch_id: str, force: bool = False, lease: float = 30.0) -> None:
            if self.first:
                self.first = False
                both_checked.wait()
            self.store.lock(ids, batch_id, force, lease)

    outcome: dict[str, MigrationResult | BaseException] = {}

    def run(name: str, store: LocationStore, ids: list[str]) -> None:
        try:
            outcome[name] = move_batch(CheckedThenLocks(store), ids, "target",  # type: ignore[arg-type]
                                       lock_for=0.3)
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            outcome[name] = exc

    threads = [threading.Thread(target=run, args=("a", first, ["1", "2", "3", "4", "5"])),
               threading.Thread(target=run, args=("b", second, ["2", "1"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = {k: v for k, v in outcome.items() if isinstance(v, MigrationResult)}
    lost = {k: v for k, v in outcome.items() if isinstance(v, LockedByBatch)}
    assert len(won) == 1 and len(lost) == 1, outcome
    (winner,) = won.values()
    (loser,) = lost.values()
    assert set(loser.locked) <= {"1", "2"} and set(loser.locked.values()) == {winner.batch_id}
    assert f"locked by batch {winner.batch_id}" in str(loser)
    moved = {"a": ["1", "2", "3", "4", "5"], "b": ["2", "1"]}[next(iter(won))]
    assert sorted(winner.moved) == sorted(moved)
    for s in (first, second):
        s.refresh()
    got = {cid: (c.system, c.state) for cid, c in first.customers([str(i) for i in range(1, 6)]).items()}
    assert got == {cid: ("target" if cid in moved else "source", "active") for cid in got}
    entries = first.audit(limit=100)
    assert sorted(e.customer_id for e in entries) == sorted(moved)  # each moved once
    assert {e.batch_id for e in entries} == {winner.batch_id}


def check_dead_batches(store: LocationStore) -> None:
    """Customers "1".."5" on the source: what a migration killed with SIGKILL leaves locked
    is released once its lease runs out (never while it lasts), and `rollback` of such a
    batch moves back what it flipped and releases what it still held."""
    import time

    import pytest

    from dsbc.store import BatchCancelled, LockedByBatch

    def state(cid: str) -> tuple[str, str]:
        c = store.customer(cid)
        assert c is not None
        return c.system, c.state

    store.lock(["1", "2"], "b-dead", lease=-1)  # its lease ran out: the process is gone
    store.lock(["3"], "b-live")  # a migration still running (30 s lease)
    locks = store.locks()
    assert [(b, n) for b, n, _ in locks] == [("b-dead", 2), ("b-live", 1)]
    assert locks[0][2] < time.time() < locks[1][2]
    assert store.release_expired_locks() == {"b-dead": 2}
    assert [(b, n) for b, n, _ in store.locks()] == [("b-live", 1)]
    store.refresh()
    assert [state(c) for c in "123"] == [("source", "active"), ("source", "active"), ("source", "locked")]
    assert store.customer("1").batch_id == ""  # type: ignore[union-attr]
    assert store.release_expired_locks() == {}
    with pytest.raises(LockedByBatch, match="locked by batch b-live"):
        store.lock(["3"], "b-other")
    store.lock(["3"], "b-live", lease=-1)  # renewed by its own batch, and then it died
    assert store.release_expired_locks() == {"b-live": 1}

    # killed in the middle of its flip: 1 flipped, 2 still locked; rolled back at once
    store.lock(["1", "2"], "b-half")
    store.migrate(["1"], "target", batch_id="b-half")
    r = store.rollback("b-half")
    store.refresh()
    assert (r.moved, r.already, r.to) == (["1"], ["2"], "source")
    assert [state(c) for c in "12"] == [("source", "active"), ("source", "active")]
    # killed in its lock window: nothing flipped, the batch known only by its locks
    store.lock(["2"], "b-window")
    r = store.rollback("b-window")
    store.refresh()
    assert (r.moved, r.already, r.to) == ([], ["2"], "source") and state("2") == ("source", "active")
    assert store.release_expired_locks() == {}
    # ... and if that migration was still running, it locks and flips no more
    with pytest.raises(BatchCancelled, match="batch b-window was rolled back while it ran"):
        store.lock(["2"], "b-window")
    with pytest.raises(BatchCancelled):
        store.migrate(["2"], "target", batch_id="b-window")
    store.refresh()
    assert state("2") == ("source", "active")


def check_meta_keys(store: LocationStore) -> None:
    """meta_keys lists the keys of one kind (each node's saved pins), and only those."""
    for key in ("pins@a/1", "pins@b/2", "pinsx@c", "pins"):
        store.set_meta(key, "[]")
    assert sorted(store.meta_keys("pins@")) == ["pins@a/1", "pins@b/2"]
    assert store.meta_keys("none@") == []


def check_spent_leases(store: LocationStore, leases: Callable[[], set[str]]) -> None:
    """Customers "1" and "2" on the source, "4" in no batch: each batch's lock lease is forgotten once the
    batch has ended and its lease ran out (a store that runs migrations for months kept
    one row per batch ever run), never while the batch holds locks or its lease lasts; a
    rolled-back batch's mark stays (a migration of it still running must stop).
    ``leases()``: the batch ids the store keeps a lease for."""
    import pytest

    from dsbc.store import BatchCancelled

    for n in range(3):  # what `dsbc migrate` does: lock, flip (a lease that has run out)
        store.lock(["1"], f"b-done-{n}", lease=-1)
        store.migrate(["1"], "target" if n % 2 == 0 else "source", batch_id=f"b-done-{n}")
    store.lock(["2"], "b-unlocked", lease=-1)  # a migration that gave up and unlocked
    store.unlock(["2"], "b-unlocked")
    store.lock(["2"], "b-running")  # still running: 30 s lease
    store.lock([], "b-holding")  # in its lock window, nothing locked yet, lease lasting
    store.lock(["4"], "b-rolled")
    store.rollback("b-rolled")
    assert {"b-done-0", "b-done-1", "b-done-2", "b-unlocked"} <= leases()
    assert store.release_expired_locks() == {}
    assert leases() == {"b-running", "b-holding", "b-rolled"}
    store.refresh()
    c = store.customer("2")
    assert c is not None and c.state == "locked"
    with pytest.raises(BatchCancelled):
        store.lock(["4"], "b-rolled")
    store.lock(["2"], "b-running")  # renewed: its migration goes on
    assert store.migrate(["2"], "target", batch_id="b-running").moved == ["2"]


def check_registration_counts(store: LocationStore) -> None:
    """`counts()` gives the live registrations per system too (a hand-over's progress in
    `dsbc status` and /metrics).  `store` knows account a1 (customer 1) and a2 (customer 2)."""
    later = time.time() + 600
    store.record_registrations([
        Registration("a1", "sip:a1@10.0.0.1", "source", later),
        Registration("a1", "sip:a1@10.0.0.2", "target", later),
        Registration("a2", "sip:a2@10.0.0.3", "target", later),
    ])
    c = store.counts()
    assert (c["registrations"], c["registrations.source"], c["registrations.target"]) == (3, 1, 2), c


def check_registrations_recorded_before_the_import(store: LocationStore) -> None:
    """Found by an audit: a phone that registered while its account was unknown (store.unknown
    sent it on) was recorded under no customer; once the customer was imported, `dsbc migrate
    --prepare` said "no phone of the batch is registered now" and the flip "0/0 phones",
    though the phone stayed registered on the source for its full expiry."""
    later = time.time() + 600
    store.record_registrations([Registration("a9", "sip:a9@10.0.0.9", "source", later)])
    store.import_rows([{"customer_id": "9", "identities": ["account:a9"]}])
    store.refresh()
    regs = store.registrations(["9"])
    assert [(r.account, r.contact, r.customer_id) for r in regs] == [("a9", "sip:a9@10.0.0.9", "9")], regs
    # the phone registers again, now as the customer's: still one phone, not two (a count
    # of two made `dsbc migrate --wait-registrations` wait for a phone that does not exist)
    store.record_registrations([Registration("a9", "sip:a9@10.0.0.9", "target", later + 60, "9")])
    regs = store.registrations(["9"])
    assert [(r.account, r.contact, r.system) for r in regs] == [("a9", "sip:a9@10.0.0.9", "target")], regs
    assert [(r.account, r.system) for r in store.registrations(None) if r.account == "a9"] == [("a9", "target")]
