"""The Redis store through a real Sentinel fail-over: a master, one replica, three
Sentinels on loopback; the master is killed (SIGKILL) and Sentinel promotes the replica.

- lookups go on from memory throughout, migrations are refused with a clear error until
  the replica is promoted, then work; both nodes find the new master and hear its change
  notifications again; the old master coming back as a replica confuses nothing;
- Redis replicates asynchronously (min-replicas-to-write does not wait for the replica):
  a write no replica confirmed could be lost by a fail-over, and the store says so.

The replica reaches the master through a TcpProxy, so a test can stall the replication
link while the master still counts the replica as connected.
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

from dsbc.store import StoreUnavailable
from dsbc.store.redis_store import RedisStore
from tests.peers.net import free_port, wait_port
from tests.peers.proc import PeerProcess, find_binary
from tests.peers.redis import RedisServer, TcpProxy
from tests.test_redis_store import wait_for

pytestmark = [
    pytest.mark.peers,
    pytest.mark.timeout(90),
    pytest.mark.skipif(find_binary("redis-server") is None, reason="redis-server is not installed"),
]


def role(server: RedisServer) -> str:
    try:
        c = server.client(socket_timeout=0.5)
        try:
            return str(c.role()[0])
        finally:
            c.close()
    except Exception:  # noqa: BLE001 - down, loading: no role
        return ""


class SentinelSet:
    def __init__(self, workdir: Path) -> None:
        self.master = RedisServer(workdir / "master").start()
        self.replica = RedisServer(workdir / "replica").start()
        self.link = TcpProxy(self.master.addr)  # the replica's replication link
        self.sentinels: list[PeerProcess] = []
        for s in (self.master, self.replica):
            c = s.client()
            c.config_set("repl-diskless-sync-delay", 0)
            c.close()
        c = self.replica.client()
        c.replicaof(*self.link.addr)
        c.close()
        c = self.replica.client()
        wait_for(lambda: c.info("replication").get("master_link_status") == "up", 10)
        c.close()
        ports = [free_port("tcp") for _ in range(3)]
        for n, port in enumerate(ports):
            conf = workdir / f"sentinel{n}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                            f"sentinel monitor dsbc 127.0.0.1 {self.master.port} 2\n"
                            "sentinel down-after-milliseconds dsbc 1000\n"
                            "sentinel failover-timeout dsbc 5000\n")
            p = PeerProcess(f"sentinel{n}", [find_binary("redis-server") or "redis-server", str(conf),
                                             "--sentinel"], workdir / f"sentinel{n}.log")
            p.start()
            self.sentinels.append(p)
        for port in ports:
            wait_port("127.0.0.1", port, "tcp", timeout=10)
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/dsbc"
        # every Sentinel knows the replica before anything fails
        import redis

        for port in ports:
            sc = redis.Redis(port=port, decode_responses=True)
            wait_for(lambda sc=sc: len(sc.sentinel_slaves("dsbc")) == 1, 10, step=0.1)  # type: ignore[misc]
            sc.close()

    def kill_master(self) -> None:
        assert self.master.proc is not None
        os.kill(self.master.proc.pid, signal.SIGKILL)
        self.master.stop()

    def close(self) -> None:
        for p in self.sentinels:
            p.stop()
        self.link.close()
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    s = SentinelSet(tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def nodes(sentinels: SentinelSet) -> Iterator[tuple[RedisStore, RedisStore]]:
    a = RedisStore(sentinels.url)
    a.import_rows([{"customer_id": str(i), "identities": [f"account:a{i}"]} for i in range(1, 6)])
    b = RedisStore(sentinels.url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def system(store: RedisStore, user: str) -> str:
    loc = store.lookup("account", user)
    assert loc is not None
    return loc.system


def seen_by(store: RedisStore, user: str, want: str, within: float) -> float:
    """Seconds until `store` (woken by its change feed) serves `user` on `want`."""
    woke = threading.Event()
    store.set_notify(woke.set)
    try:
        started = time.monotonic()
        while time.monotonic() - started < within:
            woke.wait(0.05)
            woke.clear()
            store.refresh()
            if system(store, user) == want:
                return time.monotonic() - started
        raise AssertionError(f"{user} not on {want} within {within}s")
    finally:
        store.set_notify(None)


def test_sentinel_failover(sentinels: SentinelSet, nodes: tuple[RedisStore, RedisStore]) -> None:
    a, b = nodes
    r = a.migrate(["1"], "target")
    assert r.moved == ["1"] and not r.warning  # the replica confirmed it
    seen_by(b, "a1", "target", 1.0)
    sentinels.kill_master()
    killed = time.monotonic()
    refused: list[str] = []
    while True:  # lookups from memory throughout; migrations refused until the promotion
        for s in (a, b):
            s.refresh()
            assert system(s, "a1") == "target" and system(s, "a2") == "source"
        try:
            a.migrate(["2"], "target")
            break
        except StoreUnavailable as exc:
            refused.append(str(exc))
        assert time.monotonic() - killed < 30, refused[-1]
        time.sleep(0.2)
    assert refused and all(m.startswith("migration failed: ") for m in refused)
    assert role(sentinels.replica) == "master"
    # the migration committed before the kill is on the new master, and the one after it
    # reaches the other node through the new master's change feed
    fresh = RedisStore(sentinels.url, load=False)
    try:
        assert fresh.customer("1").system == "target"  # type: ignore[union-attr]
    finally:
        fresh.close()
    wait_for(lambda: a.healthy and b.healthy, 10, refresh=(a, b))
    assert seen_by(b, "a2", "target", 1.0) < 1.0
    a.migrate(["3"], "target")
    assert seen_by(b, "a3", "target", 1.0) < 1.0
    # the old master comes back: Sentinel turns it into a replica of the new one
    sentinels.master.start()
    wait_for(lambda: role(sentinels.master) == "slave", 30, step=0.2)
    r = b.migrate(["4"], "target")
    assert r.moved == ["4"]
    assert seen_by(a, "a4", "target", 1.0) < 1.0
    for s in (a, b):
        st = s.stats()
        assert st["healthy"] and st["customers"] == 5 and st["seq_gap"] == 0


def test_write_no_replica_confirmed_says_so(sentinels: SentinelSet, nodes: tuple[RedisStore, RedisStore],
                                            caplog: Any) -> None:
    a, _ = nodes
    c = sentinels.master.client()
    c.config_set("min-replicas-to-write", 1)  # as docs/OPERATIONS.md recommends
    c.close()
    sentinels.link.stall()  # the replica still counts as connected, but gets nothing
    time.sleep(0.3)  # (once the relay's reads in progress, 0.1 s, are over)
    r = a.migrate(["1"], "target")
    assert r.moved == ["1"]
    assert "replica(s) confirmed it within 1 s: a fail-over now could lose it" in r.warning
    assert any("could lose it" in rec.getMessage() for rec in caplog.records)
    # and it could: the promoted replica never had it
    sentinels.kill_master()
    wait_for(lambda: role(sentinels.replica) == "master", 30, step=0.2)
    c = sentinels.replica.client()
    try:
        assert c.hget("dsbc:cust", "1").startswith('["source"')
    finally:
        c.close()
