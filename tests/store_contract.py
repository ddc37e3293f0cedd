"""Scenarios every store kind must pass the same way (SQLite and Redis tests call them)."""

from __future__ import annotations

from dsbc.store.base import LocationStore


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
