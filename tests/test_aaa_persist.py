"""The periodic save of RADIUS accounting pins and Diameter sessions must not stall the
event loop when the store is slow to answer (Redis hung or cut off: its write timeout is
10 s; SQLite locked by a long write): dispatching goes on from memory (SPEC section 2)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest

from dsbc.radius import service as rsvc
from dsbc.radius.core import RadiusCore, SystemTarget


class SlowStore:
    """A store whose set_meta takes `delay` seconds (a Redis that does not answer)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.meta: dict[str, str] = {}
        self.writes: list[str] = []
        self.lock = threading.Lock()

    def set_meta(self, key: str, value: str, only_if_absent: bool = False) -> str:
        time.sleep(self.delay)
        with self.lock:
            self.meta[key] = value
            self.writes.append(value)
        return value

    def get_meta(self, key: str) -> str | None:
        return self.meta.get(key)


def _core() -> RadiusCore:
    systems = [SystemTarget("source", "s", [("127.0.0.1", 9)], [("127.0.0.1", 10)]),
               SystemTarget("target", "t", [("127.0.0.1", 11)], [("127.0.0.1", 12)])]
    return RadiusCore([("127.0.0.1", "nas")], systems, lambda user: ("source", "active"))


def test_radius_pins_saved_without_stalling_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rsvc, "PERSIST_EVERY", 0.05)
    store = SlowStore(delay=0.8)

    async def main() -> tuple[float, Any]:
        loop = asyncio.get_running_loop()
        core = _core()
        svc = rsvc.RadiusService(core, store, loop)  # type: ignore[arg-type]
        core.sticky[("127.0.0.1", "s1")] = ["source", loop.time()]
        core.sticky_dirty = True
        svc._persist_task = loop.create_task(svc._persist_loop())
        worst, last = 0.0, loop.time()
        end = last + 1.2
        while loop.time() < end:
            await asyncio.sleep(0.01)
            now = loop.time()
            worst, last = max(worst, now - last), now
        # a pin made while a save is in its thread: the final save at stop must win
        core.sticky[("127.0.0.1", "s2")] = ["target", loop.time()]
        core.sticky_dirty = True
        await svc.stop()
        return worst, svc

    worst, _ = asyncio.run(main())
    assert worst < 0.3, f"the event loop stalled {worst:.2f} s while saving the pins"
    rows = json.loads(store.meta[rsvc.STICKY_META_KEY])
    assert sorted(r[1] for r in rows) == ["s1", "s2"]


def test_nodes_sharing_a_store_keep_their_own_pins(tmp_path: Any) -> None:
    """Two nodes on one (Redis) store: each node's saved accounting pins survive the other
    node's saves, so a rolling restart of both keeps every session on the system that saw
    its Start."""
    from dsbc.config import parse_config
    from tests.test_radius_core import open_test_store
    from tests.test_radius_freeradius import dsbc_config

    store = open_test_store(tmp_path)
    store.put_customer("1", ["account:alice"], "source")
    cfgs = [parse_config(dsbc_config((["127.0.0.1:9"], ["127.0.0.1:10"], "s"), (["127.0.0.1:11"], ["127.0.0.1:12"], "t")))
            for _ in range(2)]

    async def node(i: int, session: str | None) -> list[Any]:
        svc = await rsvc.start_radius(cfgs[i], store)
        loaded = sorted(k[1] for k in svc.core.sticky)
        if session is not None:
            svc.core.sticky[("127.0.0.1", session)] = ["source", svc.loop.time()]
            svc.core.sticky_dirty = True
        await svc.stop()  # saves its pins
        return loaded

    asyncio.run(node(0, "on-node-0"))
    asyncio.run(node(1, "on-node-1"))  # saves after node 0: must not drop node 0's pins
    assert asyncio.run(node(0, None)) == ["on-node-0"]
    assert asyncio.run(node(1, None)) == ["on-node-1"]


def test_pins_saved_under_the_old_key_are_read_after_an_upgrade(tmp_path: Any) -> None:
    from dsbc.config import parse_config
    from tests.test_radius_core import open_test_store
    from tests.test_radius_freeradius import dsbc_config

    store = open_test_store(tmp_path)
    store.set_meta(rsvc.STICKY_META_KEY, json.dumps([["127.0.0.1", "old", "target", time.time()]]))
    cfg = parse_config(dsbc_config((["127.0.0.1:9"], ["127.0.0.1:10"], "s"), (["127.0.0.1:11"], ["127.0.0.1:12"], "t")))

    async def main() -> dict[Any, Any]:
        svc = await rsvc.start_radius(cfg, store)
        pins = dict(svc.core.sticky)
        await svc.stop()
        return pins

    assert list(asyncio.run(main())) == [("127.0.0.1", "old")]


def test_a_successor_binding_at_the_first_chance_finds_the_last_pins(tmp_path: Any) -> None:
    """A SIGHUP reload: the new worker tries the RADIUS ports until the old one closes them;
    a failed try must not write back the pins it loaded, and the one that binds must
    hold the old worker's last pins."""
    from dsbc.config import parse_config
    from tests.test_radius_core import open_test_store
    from tests.test_radius_freeradius import dsbc_config

    store = open_test_store(tmp_path)
    store.put_customer("1", ["account:alice"], "source")
    cfg = parse_config(dsbc_config((["127.0.0.1:9"], ["127.0.0.1:10"], "s"), (["127.0.0.1:11"], ["127.0.0.1:12"], "t")))

    async def main() -> list[str]:
        old = await rsvc.start_radius(cfg, store)
        old.core.sticky[("127.0.0.1", "late")] = ["source", old.loop.time()]  # not saved yet

        async def successor() -> rsvc.RadiusService:
            while True:  # what the runner does on a reload
                try:
                    return await rsvc.start_radius(cfg, store)
                except OSError:
                    await asyncio.sleep(0.001)

        task = asyncio.ensure_future(successor())
        await asyncio.sleep(0.05)
        await old.stop()
        new = await asyncio.wait_for(task, 10)
        try:
            return sorted(k[1] for k in new.core.sticky)
        finally:
            await new.stop()

    try:
        assert asyncio.run(main()) == ["late"]
    finally:
        store.close()


def test_a_node_follows_the_sessions_another_node_saved(tmp_path: Any) -> None:
    """Two nodes behind one address: keepalived moves it from node A (stopped, or dead
    after its last save) to node B.  The Interim-Update and Stop of a session whose Start
    A relayed must reach the system of that Start, though its customer moved meanwhile
    (they went by owner on B: the Start on the source, the Stop on the target)."""
    from dsbc.config import parse_config
    from dsbc.radius import packet as rp
    from dsbc.radius.core import ACCT
    from tests.test_radius_core import acct_request, open_test_store
    from tests.test_radius_freeradius import dsbc_config

    store = open_test_store(tmp_path)
    store.put_customer("1", ["account:alice"], "source")
    cfgs = [parse_config(dsbc_config((["127.0.0.1:9"], ["127.0.0.1:10"], "s"), (["127.0.0.1:11"], ["127.0.0.1:12"], "t")))
            for _ in range(2)]
    nas = ("127.0.0.1", 40000)

    async def main() -> list[str]:
        b = await rsvc.start_radius(cfgs[1], store)
        a = await rsvc.start_radius(cfgs[0], store)
        [fwd] = a.core.handle_request(ACCT, acct_request("alice", rp.ACCT_START, "s1", 1), nas, a.loop.time())
        assert fwd.system == "source"
        await a.stop()  # saves its pins; its NAS now send to B
        store.migrate(["1"], "target")
        await b.adopt_others()  # B's periodic round
        seen = []
        for n, status in enumerate((rp.ACCT_INTERIM, rp.ACCT_STOP), 2):
            [fwd] = b.core.handle_request(ACCT, acct_request("alice", status, "s1", n), nas, b.loop.time())
            seen.append(fwd.system)
        await b.stop()
        return seen

    try:
        assert asyncio.run(main()) == ["source", "source"]
    finally:
        store.close()


def test_a_dead_nodes_old_pins_expire(tmp_path: Any) -> None:
    """A node that died (or was retired, or got a new host name) never saves again: its
    last pins stay in the store.  Another node adopted them for ever, so a session they
    name, last seen days ago (a NAS that reuses its Acct-Session-Ids), went to the system
    of that old Start, though the node itself drops a pin STICKY_TTL after its last use."""
    from dsbc.config import parse_config
    from dsbc.radius import packet as rp
    from dsbc.radius.core import ACCT
    from tests.test_radius_core import acct_request, open_test_store
    from tests.test_radius_freeradius import dsbc_config

    store = open_test_store(tmp_path)
    store.put_customer("1", ["account:alice"], "target")
    cfg = parse_config(dsbc_config((["127.0.0.1:9"], ["127.0.0.1:10"], "s"), (["127.0.0.1:11"], ["127.0.0.1:12"], "t")))
    nas = ("127.0.0.1", 40000)
    now = time.time()
    rows = [["127.0.0.1", "old", "source", now - RadiusCore.STICKY_TTL - 3600],
            ["127.0.0.1", "recent", "source", now - 3600]]
    store.set_meta(rsvc.STICKY_META_KEY + "@dead-node:1812", json.dumps(rows))

    async def main() -> list[str]:
        b = await rsvc.start_radius(cfg, store)
        seen = []
        for n, sid in enumerate(("old", "recent"), 1):
            [fwd] = b.core.handle_request(ACCT, acct_request("alice", rp.ACCT_INTERIM, sid, n), nas, b.loop.time())
            seen.append(fwd.system)
        await b.stop()
        return seen

    try:
        assert asyncio.run(main()) == ["target", "source"]
    finally:
        store.close()


def test_a_dead_nodes_pins_are_decoded_once(tmp_path: Any) -> None:
    """A dead node's key never changes, but every node decoded all its rows and rebuilt
    its adopted pins every 5 s: with 100,000 sessions a third of a second of CPU each
    round, and RADIUS answers delayed by up to 370 ms.  They are decoded again only when
    some node saved; a pin adopted once still ages out (STICKY_TTL after its last use)."""
    from dsbc.config import parse_config
    from dsbc.radius import packet as rp
    from dsbc.radius.core import ACCT
    from tests.test_radius_core import acct_request, open_test_store
    from tests.test_radius_freeradius import dsbc_config

    store = open_test_store(tmp_path)
    store.put_customer("1", ["account:alice"], "target")
    cfg = parse_config(dsbc_config((["127.0.0.1:9"], ["127.0.0.1:10"], "s"), (["127.0.0.1:11"], ["127.0.0.1:12"], "t")))
    nas = ("127.0.0.1", 40000)
    rows = [["127.0.0.1", f"s{i}", "source", time.time() - 60] for i in range(20000)]
    store.set_meta(rsvc.STICKY_META_KEY + "@dead-node:1812", json.dumps(rows))

    async def main() -> list[str]:
        b = await rsvc.start_radius(cfg, store)
        first = b.core.adopted
        assert len(first) == 20000
        await b.adopt_others()  # nothing saved since: nothing decoded again
        assert b.core.adopted is first
        now = b.loop.time()
        [fwd] = b.core.handle_request(ACCT, acct_request("alice", rp.ACCT_INTERIM, "s1", 1), nas, now)
        seen = [fwd.system]
        later = now + RadiusCore.STICKY_TTL
        [fwd] = b.core.handle_request(ACCT, acct_request("alice", rp.ACCT_INTERIM, "s2", 2), nas, later)
        seen.append(fwd.system)
        store.set_meta(rsvc.STICKY_META_KEY + "@dead-node:1812", json.dumps(rows[:10]))
        await b.adopt_others()  # it saved: read again
        assert len(b.core.adopted) == 10
        await b.stop()
        return seen

    try:
        assert asyncio.run(main()) == ["source", "target"]
    finally:
        store.close()


def test_other_nodes_pins_outlive_a_store_outage(tmp_path: Any) -> None:
    """A round that cannot read the store (Redis away) keeps the pins read before, and
    the next one that can still finds them (the keys did not change meanwhile)."""
    from dsbc.config import parse_config
    from tests.test_radius_core import open_test_store
    from tests.test_radius_freeradius import dsbc_config

    store = open_test_store(tmp_path)
    cfg = parse_config(dsbc_config((["127.0.0.1:9"], ["127.0.0.1:10"], "s"), (["127.0.0.1:11"], ["127.0.0.1:12"], "t")))
    rows = [["127.0.0.1", "s1", "source", time.time() - 60]]
    store.set_meta(rsvc.STICKY_META_KEY + "@other-node:1812", json.dumps(rows))

    async def main() -> list[int]:
        b = await rsvc.start_radius(cfg, store)
        seen = [len(b.core.adopted)]
        real = store.meta_keys

        def away(prefix: str) -> list[str]:
            raise OSError("store unreachable")

        store.meta_keys = away  # type: ignore[method-assign]
        await b.adopt_others()
        seen.append(len(b.core.adopted))
        store.meta_keys = real  # type: ignore[method-assign]
        await b.adopt_others()
        seen.append(len(b.core.adopted))
        await b.stop()
        return seen

    try:
        assert asyncio.run(main()) == [1, 1, 1]
    finally:
        store.close()
