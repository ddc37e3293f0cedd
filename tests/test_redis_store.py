"""The Redis store: the same model and guarantees as the SQLite store (the same checks as
tests/test_store_sqlite.py and tests/test_store_migrate.py), plus what sharing adds:
the change feed between nodes, Redis going away and coming back, a partition, a stalled
server, lost data, the local cache file, persistence across a restart.

One redis-server per module (tests/peers/redis.py); every test starts from an empty
database.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsbc.store import (
    ApiSession,
    GroupSplitError,
    LocationStore,
    Registration,
    StoreError,
    StoreUnavailable,
    open_store,
)
from dsbc.store.redis_cache import read_cache
from dsbc.store.redis_conn import parse_redis_url
from dsbc.store.redis_store import RedisStore
from tests.peers.proc import find_binary
from tests.peers.redis import RedisServer, TcpProxy
from tests.store_contract import (
    check_concurrent_migrations,
    check_dead_batches,
    check_group_members,
    check_registration_counts,
    check_registrations_recorded_before_the_import,
    check_rollback,
)

pytestmark = [
    pytest.mark.peers,
    pytest.mark.timeout(60),
    pytest.mark.skipif(find_binary("redis-server") is None, reason="redis-server is not installed"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as r:
        yield r


@pytest.fixture
def redis_url(server: RedisServer) -> str:
    if not server.running:
        server.start()
    c = server.client()
    c.flushall()
    c.close()
    return server.url


@pytest.fixture
def opened() -> Iterator[list[LocationStore]]:
    stores: list[LocationStore] = []
    yield stores
    for s in stores:
        s.close()


@pytest.fixture
def make(redis_url: str, opened: list[LocationStore]) -> Any:
    def make(url: str | None = None, **kw: Any) -> RedisStore:
        s = open_store(url or redis_url, **kw)
        opened.append(s)
        assert isinstance(s, RedisStore)
        return s

    return make


@pytest.fixture
def store(make: Any) -> RedisStore:
    s: RedisStore = make()
    s.import_rows(
        [
            {"customer_id": "1", "identities": ["account:a1", "did:+1 555 0001"]},
            {"customer_id": "2", "identities": ["account:a2"]},
            {"customer_id": "3", "identities": ["account:a3"], "group": "ivr"},
            {"customer_id": "4", "identities": ["account:a4"], "group": "ivr"},
            {"customer_id": "5", "identities": ["account:a5"], "group": "ivr"},
        ]
    )
    return s


def systems(store: LocationStore) -> dict[str, str]:
    return {cid: c.system for cid, c in store.customers([str(i) for i in range(1, 6)]).items()}


def wait_for(cond: Any, timeout: float = 5.0, step: float = 0.005, refresh: Any = None) -> float:
    """Seconds until cond() held (refreshing `refresh` stores meanwhile); fails on timeout."""
    started = time.monotonic()
    while True:
        for s in refresh or ():
            s.refresh()
        if cond():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)


# --- urls --------------------------------------------------------------------------------


def test_urls() -> None:
    t = parse_redis_url("redis://:s3cret@10.0.0.1:6380/2?prefix=mig:")
    assert (t.db, t.password, t.prefix, t.display) == (2, "s3cret", "mig:", "redis://:***@10.0.0.1:6380/2")
    t = parse_redis_url("redis+sentinel://10.0.0.1:26379,10.0.0.2/dsbc/1")
    assert (t.sentinels, t.service, t.db) == ([("10.0.0.1", 26379), ("10.0.0.2", 26379)], "dsbc", 1)
    with pytest.raises(StoreError, match="name the Sentinel service"):
        parse_redis_url("redis+sentinel://10.0.0.1:26379")
    with pytest.raises(StoreError, match="database must be a number"):
        parse_redis_url("redis://10.0.0.1/x")


def test_open_errors(redis_url: str) -> None:
    with pytest.raises(StoreError, match="no store at"):
        open_store(redis_url, load=False, create=False)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot reach redis://127.0.0.1:1/0"):
        open_store("redis://127.0.0.1:1/0")
    assert time.monotonic() - started < 3


def test_password_errors_name_the_password(store: RedisStore, server: RedisServer, make: Any) -> None:
    """A refused login is not "cannot reach": Redis was reached, store.url is what is wrong."""
    c = server.client()
    c.config_set("requirepass", "s3cret")
    try:
        plain = f"redis://127.0.0.1:{server.port}/0"
        with pytest.raises(StoreUnavailable, match=r"requires a password: put it in store.url") as err:
            open_store(plain)
        assert "cannot reach" not in str(err.value) and "cache_file" not in str(err.value)
        with pytest.raises(StoreUnavailable, match=r"refused the user name or password in store.url"):
            open_store(f"redis://:wrong@127.0.0.1:{server.port}/0")
        node = make(f"redis://:s3cret@127.0.0.1:{server.port}/0")
        assert node.lookup("account", "a1") is not None
        # the password changes under a running node: its health says what is wrong
        c.config_set("requirepass", "other")
        c.client_kill_filter(_type="pubsub")
        c.client_kill_filter(_type="normal", skipme=True)
        # (first "Connection closed by server", then the reconnection is refused)
        wait_for(lambda: not node.healthy and "refused the user name or password" in node.reason,
                 refresh=[node], timeout=5)
    finally:
        c.config_set("requirepass", "")
        c.close()


# --- the model (as the SQLite store) ------------------------------------------------------


def test_import_lookup_and_reimport(store: RedisStore, make: Any) -> None:
    loc = store.lookup("did", "15550001")
    assert loc is not None and (loc.customer_id, loc.system, loc.state) == ("1", "source", "active")
    assert store.decide("account", "nope").system == "source"
    store.migrate(["2"], "target")
    store.import_rows([{"customer_id": "2", "identities": "account:a2;account:a2b"}])
    assert store.customer("2").system == "target"  # type: ignore[union-attr]  # kept
    store.import_rows([{"customer_id": "2", "identities": ["account:a2"], "system": "source"}])
    assert store.customer("2").system == "source"  # type: ignore[union-attr]
    direct = make(load=False)
    assert direct.lookup("account", "a2b") is None
    assert direct.customer("2").identities == ("account:a2",)  # type: ignore[union-attr]
    # the batch owner read an import checks take-overs with, from Redis and from memory
    for s in (direct, store):
        assert s.owners_of(["account:a2", "did:15550001", "account:nobody"]) == {
            "account:a2": "2", "did:15550001": "1"}
    with pytest.raises(StoreError, match="row 2: did:.abc. is not a number"):
        store.import_rows([{"customer_id": "9", "identities": "account:x"},
                           {"customer_id": "10", "identities": "did:abc"}])
    assert store.customer("9") is None


def test_identity_moves_between_customers(store: RedisStore, make: Any) -> None:
    other = make()
    store.put_customer("6", ["account:a1"])
    assert store.customer("1").identities == ("did:15550001",)  # type: ignore[union-attr]
    wait_for(lambda: other.lookup("account", "a1").customer_id == "6", refresh=[other])  # type: ignore[union-attr]
    assert other.customer("1").identities == ("did:15550001",)  # type: ignore[union-attr]


def test_group_split_is_refused_and_changes_nothing(store: RedisStore, server: RedisServer) -> None:
    with pytest.raises(GroupSplitError) as err:
        store.migrate(["1", "3"], "target")
    assert str(err.value) == "group 'ivr' must move together: missing customer(s) 4, 5"
    assert set(systems(store).values()) == {"source"}
    assert server.client().llen("dsbc:audit") == 0
    store.migrate(["3", "4", "5"], "target")
    with pytest.raises(GroupSplitError, match="missing customer.s. 3, 5"):
        store.migrate(["4"], "source")


def test_dry_run_changes_nothing(store: RedisStore, server: RedisServer) -> None:
    r = store.migrate(["1", "2", "nope"], "target", dry_run=True)
    assert (r.moved, r.unknown, r.dry_run, r.batch_id) == (["1", "2"], ["nope"], True, "")
    with pytest.raises(GroupSplitError):
        store.migrate(["3"], "target", dry_run=True)
    assert set(systems(store).values()) == {"source"}
    assert server.client().llen("dsbc:audit") == 0
    assert store.refresh() == []


def test_lock_then_flip_unlock_prepare(store: RedisStore, make: Any) -> None:
    other = make()
    store.lock(["1", "2", "nope"], "b-test")
    wait_for(lambda: other.decide("account", "a1").state == "locked", refresh=[other])
    store.migrate(["1", "2"], "target", batch_id="b-test")
    wait_for(lambda: other.lookup("account", "a1").system == "target", refresh=[other])  # type: ignore[union-attr]
    assert other.lookup("account", "a1").state == "active"  # type: ignore[union-attr]
    moved = store.customer("1").batch_id  # type: ignore[union-attr]
    store.lock(["1", "3"], "b-aborted")
    store.unlock(["1", "3"])
    c1, c3 = store.customer("1"), store.customer("3")
    assert c1 is not None and (c1.system, c1.state, c1.batch_id) == ("target", "active", moved)
    assert c3 is not None and (c3.system, c3.state, c3.batch_id) == ("source", "active", "")
    store.lock(["1"], "b-x")
    assert store.migrate(["1"], "target").already == ["1"]
    assert store.customer("1").state == "active"  # type: ignore[union-attr]
    store.prepare(["2", "3"], 60)
    wait_for(lambda: other.customer("3").expires_cap == 60, refresh=[other])  # type: ignore[union-attr]
    store.migrate(["3", "4", "5"], "target")
    wait_for(lambda: other.customer("3").expires_cap == 0, refresh=[other])  # type: ignore[union-attr]


def test_meta_keys(store: RedisStore) -> None:
    from tests.store_contract import check_meta_keys

    check_meta_keys(store)


def test_rollback(store: RedisStore) -> None:
    check_rollback(store)
    # the generic versions agree (they are what another store kind would get)
    assert LocationStore.batches(store, 10) == store.batches(10)
    with pytest.raises(StoreError, match="unknown batch 'b-nope'"):
        store.rollback("b-nope")


def test_rollback_keeps_groups_whole(store: RedisStore) -> None:
    store.migrate(["3", "4", "5"], "target")
    store.put_customer("6", ["account:a6"], "source", group="ivr")
    late = store.migrate(["6"], "target")
    with pytest.raises(GroupSplitError, match="group 'ivr' must move together: missing customer.s. 3, 4, 5"):
        store.rollback(late.batch_id)
    assert store.customer("6").system == "target"  # type: ignore[union-attr]


def test_big_import_and_batch(make: Any) -> None:
    s = make()
    other = make()
    s.import_rows({"customer_id": str(i), "identities": [f"account:u{i}"]} for i in range(20_000))
    r = s.migrate([str(i) for i in range(20_000)], "target")
    assert len(r.moved) == 20_000
    assert s.counts()["customers.target.active"] == 20_000
    assert s.lookup("account", "u19999").system == "target"  # type: ignore[union-attr]
    wait_for(lambda: (other.lookup("account", "u19999") or s.lookup("x", "y") or None) is not None
             and other.lookup("account", "u19999").system == "target", refresh=[other], timeout=20)


def test_counts_registrations_sessions_meta(store: RedisStore, make: Any) -> None:
    store.lock(["1"], "b-x")
    store.prepare(["2"], 60)
    c = store.counts()
    assert c["customers"] == 5 and c["identities"] == 6 and c["groups"] == 1 and c["prepared"] == 1
    assert c["customers.source.locked"] == 1 and c["customers.source.active"] == 4
    now = time.time()
    store.record_registrations([
        Registration("a1", "sip:a1@10.0.0.1:5060", "source", now + 60),
        Registration("a1", "sip:a1@10.0.0.2:5060", "source", now + 60, "1"),
        Registration("zed", "sip:zed@10.0.0.3", "source", now + 60),
    ], now=now)
    regs = store.registrations(["1"], now=now)
    assert sorted(r.contact for r in regs) == ["sip:a1@10.0.0.1:5060", "sip:a1@10.0.0.2:5060"]
    assert all(r.customer_id == "1" for r in regs)
    store.record_registrations([
        Registration("a1", "sip:a1@10.0.0.1:5060", "target", now + 3600),
        Registration("a1", "sip:a1@10.0.0.2:5060", "source", now),
    ], now=now + 1)
    assert [(r.contact, r.system) for r in store.registrations(["1"], now=now + 1)] == [
        ("sip:a1@10.0.0.1:5060", "target")]
    assert [r.account for r in store.registrations(now=now + 100)] == ["a1"]
    assert store.counts()["registrations"] == 1
    # sessions: another node reads them on a miss and forgets them when they are deleted
    other = make()
    store.put_session(ApiSession("tok1", "source", now + 3600, "1", "customer", '{"x": 1}'))
    s = other.get_session("tok1")
    assert s is not None and (s.system, s.customer_id, s.extra) == ("source", "1", '{"x": 1}')
    store.put_session(ApiSession("old", "target", now - 1))
    assert store.get_session("old") is None
    # and read it again when it changes (an admin's context, a refresh made on this node):
    # first let its watcher subscribe (a subscription drops every cached session), then cache
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        other.refresh()
        time.sleep(0.01)
    assert other.get_session("tok1") is not None
    store.put_session(ApiSession("tok1", "source", now + 3600, "1", "customer", '{"ctx": "source"}'))
    wait_for(lambda: (other.get_session("tok1") or s).extra == '{"ctx": "source"}', refresh=[other])
    store.delete_session("tok1")
    wait_for(lambda: other.get_session("tok1") is None, refresh=[other])
    assert store.counts()["sessions"] == 0
    assert store.set_meta("flow_secret", "aaa", only_if_absent=True) == "aaa"
    assert other.set_meta("flow_secret", "bbb", only_if_absent=True) == "aaa"
    assert other.get_meta("flow_secret") == "aaa"


def test_counts_stay_true(store: RedisStore, server: RedisServer) -> None:
    """The counters the scripts keep agree with a recount after every kind of write."""
    b = store.migrate(["1", "3", "4", "5"], "target")
    store.lock(["2"], "b-l")
    store.prepare(["1", "2"], 30)
    store.rollback(b.batch_id)
    store.put_customer("2", ["account:a2"], "target")
    store.unlock(["2"])
    store.put_customer("7", [], "target")
    c = server.client()
    recount: dict[str, int] = {}
    for raw in c.hvals("dsbc:cust"):
        import json

        system, state, _, _, cap, _ = json.loads(raw)
        recount[f"customers.{system}.{state}"] = recount.get(f"customers.{system}.{state}", 0) + 1
        recount["prepared"] = recount.get("prepared", 0) + (cap > 0)
    counts = store.counts()
    assert {k: v for k, v in counts.items() if k in recount} == recount
    assert counts["customers"] == 6


# --- sharing ------------------------------------------------------------------------------


def test_change_feed_wakes_the_other_node(store: RedisStore, make: Any) -> None:
    other = make()
    woke = threading.Event()
    other.set_notify(woke.set)
    woke.clear()
    started = time.monotonic()
    store.migrate(["1"], "target")
    assert woke.wait(2.0)
    assert other.refresh() == ["1"]
    assert other.lookup("account", "a1").system == "target"  # type: ignore[union-attr]
    assert time.monotonic() - started < 0.5
    st = other.stats()
    assert st["healthy"] and st["seq_gap"] == 0 and st["seq_applied"] == store.stats()["seq_applied"]


def test_redis_restart_loses_nothing(store: RedisStore, server: RedisServer, make: Any) -> None:
    b = store.migrate(["1", "2"], "target", who="alice")
    store.put_session(ApiSession("tok", "target", time.time() + 600))
    server.restart()
    # the node notices, serves from memory meanwhile, then catches up
    wait_for(lambda: store.healthy, refresh=[store], timeout=10)
    fresh = make(load=False)
    assert systems(fresh) == {"1": "target", "2": "target", "3": "source", "4": "source", "5": "source"}
    assert [x.batch_id for x in fresh.batches()] == [b.batch_id]
    assert len(fresh.audit(b.batch_id)) == 2
    assert fresh.get_session("tok") is not None
    store.migrate(["1"], "source")  # writes work again
    assert store.lookup("account", "a1").system == "source"  # type: ignore[union-attr]


def test_redis_down_then_back(store: RedisStore, server: RedisServer, make: Any) -> None:
    other = make()
    server.stop()
    wait_for(lambda: not other.healthy, refresh=[other], timeout=5)
    assert "cannot reach" in other.reason
    # dispatching goes on from memory, without waiting
    started = time.monotonic()
    for _ in range(1000):
        assert other.lookup("account", "a1").system == "source"  # type: ignore[union-attr]
        other.refresh()
    assert time.monotonic() - started < 0.5
    with pytest.raises(StoreUnavailable, match="migration failed: cannot reach .*nothing was changed"):
        other.migrate(["1"], "target")
    other.record_registrations([Registration("a1", "sip:a1@10.9.9.9", "source", time.time() + 300)])
    other.put_session(ApiSession("while-down", "source", time.time() + 300))
    assert other.get_session("while-down") is not None
    server.start()
    wait_for(lambda: other.healthy and not other.stats()["pending_registrations"], refresh=[other], timeout=10)
    store.refresh()
    assert [r.contact for r in store.registrations(["1"])] == ["sip:a1@10.9.9.9"]
    assert store.get_session("while-down") is not None


def test_partition_then_heal_applies_missed_changes(store: RedisStore, server: RedisServer, make: Any) -> None:
    proxy = TcpProxy(server.addr)
    try:
        node = make(proxy.url())
        proxy.cut()
        wait_for(lambda: not node.healthy, refresh=[node], timeout=5)
        store.migrate(["1", "2"], "target")  # made through "the other path"
        store.put_customer("8", ["account:a8"], "target")
        node.refresh()
        assert node.lookup("account", "a1").system == "source"  # type: ignore[union-attr]
        proxy.heal()
        wait_for(lambda: node.healthy and node.lookup("account", "a8") is not None, refresh=[node], timeout=10)
        assert node.lookup("account", "a1").system == "target"  # type: ignore[union-attr]
        assert node.stats()["seq_gap"] == 0
    finally:
        proxy.close()


def test_stalled_redis_never_blocks_a_worker(store: RedisStore, server: RedisServer, make: Any) -> None:
    proxy = TcpProxy(server.addr)
    try:
        node = make(proxy.url())
        proxy.stall()
        store.migrate(["1"], "target")  # a notification the node cannot read now
        worst = 0.0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            node.refresh()
            node.record_registrations([Registration("a2", "sip:a2@10.0.0.9", "source", time.time() + 60)])
            node.get_session("nope")
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.02)
        assert worst < 0.35, f"a call on the dispatcher's thread took {worst:.3f}s"
        assert not node.healthy
        proxy.heal()
        wait_for(lambda: node.healthy and node.lookup("account", "a1").system == "target",  # type: ignore[union-attr]
                 refresh=[node], timeout=10)
    finally:
        proxy.close()


def test_trimmed_change_log_forces_a_full_reload(store: RedisStore, server: RedisServer, make: Any) -> None:
    proxy = TcpProxy(server.addr)
    try:
        node = make(proxy.url())
        proxy.cut()
        wait_for(lambda: not node.healthy, refresh=[node], timeout=5)
        store.migrate(["1"], "target")
        store.migrate(["2"], "target")
        server.client().xtrim("dsbc:log", maxlen=1)  # the node's next change is gone
        proxy.heal()
        wait_for(lambda: node.lookup("account", "a1").system == "target", refresh=[node], timeout=10)  # type: ignore[union-attr]
        assert node.lookup("account", "a2").system == "target"  # type: ignore[union-attr]
    finally:
        proxy.close()


def test_lost_redis_data_keeps_the_memory(store: RedisStore, server: RedisServer) -> None:
    store.migrate(["1"], "target")
    server.client().flushall()
    wait_for(lambda: not store.healthy, refresh=[store], timeout=5)
    assert "data lost" in store.reason
    assert store.lookup("account", "a1").system == "target"  # type: ignore[union-attr]
    # an operator restores the data (here: imports again): the node takes it
    store.import_rows([{"customer_id": "1", "identities": ["account:a1"], "system": "source"}])
    wait_for(lambda: store.healthy and store.lookup("account", "a2") is None, refresh=[store], timeout=10)


def test_node_restarted_on_an_emptied_redis_keeps_its_cache(store: RedisStore, server: RedisServer,
                                                            make: Any, tmp_path: Path) -> None:
    """Redis came back empty (no persistence, flushed) and a node restarts: it must not
    route everybody by store.unknown nor write the empty index over its cache file."""
    cache = str(tmp_path / "index.cache")
    node = make(cache_file=cache)
    store.migrate(["1"], "target")
    wait_for(lambda: node.lookup("account", "a1").system == "target", refresh=[node])  # type: ignore[union-attr]
    node.close()
    server.client().flushall()
    again = make(cache_file=cache)
    assert not again.healthy and "data lost" in again.reason
    assert again.lookup("account", "a1").system == "target"  # type: ignore[union-attr]
    again.close()
    found = read_cache(cache)
    assert found is not None and found[0].customer_count == 5
    # an operator restores the data (here: imports again): the node takes it
    node = make(cache_file=cache)
    store.import_rows([{"customer_id": "1", "identities": ["account:a1"], "system": "target"}])
    wait_for(lambda: node.healthy and node.lookup("account", "a2") is None, refresh=[node], timeout=10)
    assert node.lookup("account", "a1").system == "target"  # type: ignore[union-attr]


def test_cache_file_starts_a_node_while_redis_is_away(store: RedisStore, server: RedisServer,
                                                       make: Any, tmp_path: Path) -> None:
    cache = str(tmp_path / "index.cache")
    store.set_meta("sip.flow_secret", "s3cret", only_if_absent=True)
    first = make(cache_file=cache)
    assert os.path.exists(cache)
    first.close()
    server.stop()
    with pytest.raises(StoreUnavailable, match="store.cache_file"):
        open_store(server.url)
    node = make(cache_file=cache)
    assert not node.healthy
    assert node.lookup("did", "15550001").customer_id == "1"  # type: ignore[union-attr]
    # what a SIP worker asks at start: the flow-token key, from the cache
    assert node.set_meta("sip.flow_secret", "other", only_if_absent=True) == "s3cret"
    server.start()
    store.migrate(["1"], "target")
    wait_for(lambda: node.lookup("account", "a1").system == "target", refresh=[node], timeout=10)  # type: ignore[union-attr]
    assert node.healthy


def test_cache_file_is_current_once_redis_goes_away(store: RedisStore, server: RedisServer,
                                                    make: Any, tmp_path: Path) -> None:
    """A worker started while Redis is away (a SIGHUP reload, a restart) starts from the
    cache file: a migration the node had applied before Redis went away must be in it,
    not only the index of the last periodic write (store.cache_file writes every 10 s)."""
    cache = str(tmp_path / "index.cache")
    node = make(cache_file=cache)  # writes the cache at the start
    store.migrate(["1"], "target")
    wait_for(lambda: node.lookup("account", "a1").system == "target", refresh=[node])  # type: ignore[union-attr]
    server.stop()

    def cached_system() -> str:
        found = read_cache(cache)
        cust = found[0].customer("1") if found is not None else None
        return cust.system if cust is not None else ""

    wait_for(lambda: not node.healthy and cached_system() == "target", refresh=[node], timeout=5)
    fresh = make(cache_file=cache)  # the reloaded worker
    assert not fresh.healthy
    assert fresh.lookup("account", "a1").system == "target"  # type: ignore[union-attr]


def test_meta_set_while_redis_is_away_reaches_the_next_worker_then_redis(
        store: RedisStore, server: RedisServer, make: Any, tmp_path: Path) -> None:
    """Found by an audit: a SIGHUP reload while Redis was away lost the RADIUS accounting
    pins and Diameter sessions (the old worker's last save, a meta value, failed), so an
    Interim / Stop or CCR-U of a session started before its customer moved went to the new
    system.  The value is kept beside the cache file for the next worker, then written to
    Redis when it returns."""
    cache = str(tmp_path / "index.cache")
    old = make(cache_file=cache)
    old.set_meta("radius.sticky@node", "[1]")
    server.stop()
    wait_for(lambda: not old.healthy, refresh=[old], timeout=5)
    old.set_meta("radius.sticky@node", "[2]")  # its last save, as a reload replaces it
    new = make(cache_file=cache)  # its successor, started from the cache file
    assert new.get_meta("radius.sticky@node") == "[2]"
    old.close()
    server.start()
    wait_for(lambda: new.healthy and not os.path.exists(cache + ".meta"), refresh=[new], timeout=10)
    assert make(load=False).get_meta("radius.sticky@node") == "[2]"


def test_sigstopped_redis_migration_error_is_clear(store: RedisStore, server: RedisServer, make: Any) -> None:
    """A write to a hung server times out and says it may or may not have happened."""
    slow = RedisStore(server.url, load=False, write_timeout=0.3)
    try:
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable, match="did not answer in time; it may or may not"):
                slow.migrate(["1"], "target")
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    finally:
        slow.close()


def test_write_lost_before_its_answer_may_have_been_applied(store: RedisStore, server: RedisServer) -> None:
    """The master dies after the migration went out and before it answered: the script may
    have run (and been replicated), so "nothing was changed" would be a guess."""
    slow = RedisStore(server.url, load=False, write_timeout=5.0)
    assert server.proc is not None
    pid = server.proc.pid

    def hang_after_the_check() -> int:  # the server stops between INFO and the script
        os.kill(pid, signal.SIGSTOP)
        threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
        return 0

    slow._replicas = hang_after_the_check  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreUnavailable, match="cannot reach .*; it may or may not have been applied"):
            slow.migrate(["1"], "target")
    finally:
        slow.close()
        server.stop()
        server.start()


def test_maxmemory_is_not_reported_as_unreachable(store: RedisStore, server: RedisServer) -> None:
    """Registrations refused at maxmemory: kept to be written later, and the health says
    why (Redis answers: it refuses writes), not "cannot reach"."""
    c = server.client()
    c.config_set("maxmemory", 1)  # below what it uses: every write is refused (OOM)
    try:
        store.record_registrations([Registration("a1", "sip:a1@192.0.2.1", "source", time.time() + 60, "1")])
        assert not store.healthy
        assert "refuses writes: " in store.reason and "maxmemory" in store.reason
        assert "cannot reach" not in store.reason
        assert store.stats()["pending_registrations"] == 1
    finally:
        c.config_set("maxmemory", 0)
        c.close()
    wait_for(lambda: store.healthy and store.stats()["pending_registrations"] == 0, refresh=[store], timeout=5)
    assert [r.account for r in store.registrations(["1"])] == ["a1"]


def test_refused_write_says_why(store: RedisStore, server: RedisServer) -> None:
    c = server.client()
    c.config_set("min-replicas-to-write", 1)  # no replica: the master refuses writes
    try:
        with pytest.raises(StoreUnavailable, match=r"migration failed: .* refused it \(NOREPLICAS"):
            store.migrate(["1"], "target")
    finally:
        c.config_set("min-replicas-to-write", 0)
    assert store.customer("1").system == "source"  # type: ignore[union-attr]


def test_sentinel_url(store: RedisStore, server: RedisServer, tmp_path: Path) -> None:
    """redis+sentinel:// finds the master through a real Sentinel."""
    from tests.peers.net import free_port, wait_port
    from tests.peers.proc import PeerProcess

    port = free_port("tcp")
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor dsbc 127.0.0.1 {server.port} 1\n")
    sentinel = PeerProcess("sentinel", [find_binary("redis-server") or "redis-server", str(conf), "--sentinel"],
                           tmp_path / "sentinel.log")
    sentinel.start()
    try:
        wait_port("127.0.0.1", port, "tcp", timeout=10)
        s = RedisStore(f"redis+sentinel://127.0.0.1:{port}/dsbc")
        try:
            assert s.lookup("account", "a1").customer_id == "1"  # type: ignore[union-attr]
            s.migrate(["1"], "target")
            wait_for(lambda: store.lookup("account", "a1").system == "target", refresh=[store])  # type: ignore[union-attr]
            assert s.healthy
        finally:
            s.close()
    finally:
        sentinel.stop()


def test_concurrent_migrations_of_the_same_customers(store: RedisStore, make: Any) -> None:
    check_concurrent_migrations(store, make())  # two nodes on one Redis


def test_locks_of_a_dead_migration_are_released(store: RedisStore) -> None:
    check_dead_batches(store)


def test_leases_of_ended_batches_are_forgotten(store: RedisStore) -> None:
    from tests.store_contract import check_spent_leases

    def leases() -> set[str]:
        return {b.decode() if isinstance(b, bytes) else b
                for b in store._w.hkeys(store.prefix + "leases")}

    check_spent_leases(store, leases)


def test_group_members(store: RedisStore) -> None:
    check_group_members(store)


def test_registration_counts_per_system(store: RedisStore) -> None:
    check_registration_counts(store)



def test_a_meta_value_saved_once_redis_is_back_is_not_overwritten_by_the_kept_one(
        store: RedisStore, server: RedisServer, make: Any, tmp_path: Path) -> None:
    cache = str(tmp_path / "index.cache")
    node = make(cache_file=cache)
    node.set_meta("radius.sticky@node", "[1]")
    server.stop()
    wait_for(lambda: not node.healthy, refresh=[node], timeout=5)
    node.set_meta("radius.sticky@node", "[2]")  # a periodic save while Redis is away: kept
    server.start()  # back (here empty: data lost, so the node stays flagged)
    node.set_meta("radius.sticky@node", "[3]")  # the next save, or the last one at a reload
    node.close()
    assert make(load=False).get_meta("radius.sticky@node") == "[3]"
    assert not os.path.exists(cache + ".meta")

def test_a_first_start_on_an_empty_redis_does_not_warn_of_a_missing_cache(
        server: RedisServer, make: Any, tmp_path: Path, caplog: Any) -> None:
    """A new installation: Redis and the cache file are both still empty; nothing is wrong."""
    cache = str(tmp_path / "index.cache")
    with caplog.at_level("WARNING", logger="dsbc.store"):
        node = make(cache_file=cache)
    assert node.healthy
    assert not [r for r in caplog.records if "no usable store cache" in r.getMessage()]


def test_a_write_stands_when_the_user_may_not_wait_for_replicas(store: RedisStore, server: RedisServer) -> None:
    """Review (rev-aaa): an ACL user without WAIT (allowed INFO): the migration ran, and was
    reported as "refused ...; nothing was changed"."""
    c = server.client()
    c.acl_setuser("nowait", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                  commands=["+@all", "-wait"])
    url = server.url.replace("redis://", "redis://nowait:pw@")
    writer = RedisStore(url, load=False)
    writer._replicas = lambda: 1  # type: ignore[method-assign]  # a master with one replica
    try:
        result = writer.migrate(["1"], "target")
        assert result.moved == ["1"]
        wait_for(lambda: systems(store)["1"] == "target", refresh=[store])
        with pytest.raises(GroupSplitError):  # the script's own refusals still raise
            writer.migrate(["3"], "target")
    finally:
        writer.close()
        c.acl_deluser("nowait")
        c.close()


def test_writes_ask_for_the_replica_count_once_a_second_not_each_time(make: Any, server: RedisServer) -> None:
    """Each write (a migration chunk, a PUT, a session) asked `INFO replication` first, to know
    whether to WAIT for a replica: a round trip more per write."""
    writer = make()
    c = server.client()

    def info_calls() -> int:
        return int(c.info("commandstats").get("cmdstat_info", {}).get("calls", 0))

    try:
        before = info_calls()
        for to in ("target", "source", "target", "source", "target", "source"):
            writer.migrate(["1"], to)  # each flip is a write
        asked = info_calls() - before - 1  # our own INFO commandstats counts too
        assert asked == 1, asked
    finally:
        c.close()


def test_the_session_cache_beside_redis_is_capped(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every session a node wrote or read stayed in its memory until it expired (a soak of
    25 logins/s grew worker 0 by 14 MB in 12 minutes).  Past the cap the oldest go, and are
    read again from Redis when asked for."""
    import dsbc.store.redis_side as side

    monkeypatch.setattr(side, "MAX_CACHED_SESSIONS", 40)
    node = make()
    later = time.time() + 3600
    for i in range(200):
        node.put_session(ApiSession(f"cap{i}", "target", later, str(i), "customer"))
        assert len(node._side.sessions) <= 40
    s = node.get_session("cap0")  # long gone from the cache
    assert s is not None and (s.system, s.customer_id) == ("target", "0")
    assert node.get_session("cap199") is not None


def test_contacts_that_expired_do_not_pile_up_while_the_customer_registers(store: RedisStore) -> None:
    """A phone that registers from a new port or connection each time (NAT rebinding, a
    TCP phone reconnecting) writes a new contact each time; the customer's key lives as
    long as its newest binding, so its expired contacts stayed in Redis for good unless a
    migration or a status read them (1,000 a day for a phone re-registering every 90 s)."""
    now = time.time()
    for n in range(50):  # each binding expires before the next REGISTER comes
        t = now + n * 90
        store.record_registrations(
            [Registration("a1", f"sip:a1@198.51.100.7:{40000 + n};transport=tcp", "source", t + 60, "1")],
            now=t)
    def contacts(cid: str) -> int:  # the hash's fields but REG_WRITE's mark ("")
        return len([f for f in store._w.hkeys(store.prefix + f"reg:{cid}") if f])

    assert contacts("1") <= 5
    live = store.registrations(["1"], now=now + 49 * 90)
    assert [r.contact for r in live] == ["sip:a1@198.51.100.7:40049;transport=tcp"]
    # a customer with many live phones keeps them all
    store.record_registrations(
        [Registration(f"p{n}", f"sip:p{n}@10.0.0.{n}", "source", now + 3600, "2") for n in range(20)], now=now)
    store.record_registrations([Registration("p0", "sip:p0@10.0.1.1", "source", now + 3600, "2")], now=now + 1)
    assert contacts("2") == 21
    assert len(store.registrations(["2"], now=now + 2)) == 21


def test_registrations_recorded_before_the_import(store: RedisStore) -> None:
    check_registrations_recorded_before_the_import(store)
