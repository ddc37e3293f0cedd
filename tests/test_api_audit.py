"""Found by the API acceptance audit: deep JSON, gzip uploads, creates racing a migration."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_api_badinput import fault_of, raw, still_fine
from tests.test_api_support import ADMIN, CUSTOMER, ApiEnv, run


def test_deeply_nested_json_gets_a_bad_request_fault(tmp_path: Path) -> None:
    """JSON nested deeper than the decoder takes is bad input (a fault), not a traceback
    and a dropped connection."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            deep = "[" * 5000 + "]" * 5000
            bodies = [
                ("application/json", ('{"params":' + deep + "}").encode()),
                ("application/x-www-form-urlencoded", b"params=" + deep.encode()),
            ]
            for host in (CUSTOMER, ADMIN):
                for ctype, body in bodies:
                    for extra, payload in (
                        (f"Content-Length: {len(body)}\r\n", body),  # the fast path
                        (
                            "Transfer-Encoding: chunked\r\n",  # the aiohttp path
                            b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body),
                        ),
                    ):
                        head = (
                            f"POST /rest/Customer/get_customer_info HTTP/1.1\r\nHost: {host}\r\n"
                            f"Content-Type: {ctype}\r\n{extra}Connection: close\r\n\r\n"
                        )
                        doc = fault_of(await raw(env, head.encode() + payload))
                        assert doc["faultcode"] == "Server.Dispatcher.bad_request", (host, doc)
            assert env.api.metrics["internal_errors"] == 0
            await still_fine(env)

    run(main)


def test_a_gzip_upload_reaches_the_back_end_as_sent(tmp_path: Path) -> None:
    """A body sent with Content-Encoding: gzip is relayed byte for byte on both paths
    (the back end inflates it), never inflated by dsbc and sent on under the gzip header."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            plain = b"a CWMP envelope or an upload " * 500
            gz = gzip.compress(plain)
            head = (
                f"POST /_emulator/echo HTTP/1.1\r\nHost: {CUSTOMER}\r\n"
                "Content-Type: application/octet-stream\r\nContent-Encoding: gzip\r\n"
                "Connection: close\r\n"
            )
            for extra, payload in (
                (f"Content-Length: {len(gz)}\r\n\r\n", gz),
                ("Transfer-Encoding: chunked\r\n\r\n", b"%x\r\n%b\r\n0\r\n\r\n" % (len(gz), gz)),
            ):
                out = await raw(env, head.encode() + extra.encode() + payload)
                status, _, body = out.partition(b"\r\n\r\n")
                assert status.startswith(b"HTTP/1.1 200"), out[:300]
                doc = json.loads(body)
                assert doc["size"] == len(plain), doc
                assert doc["sha256"] == hashlib.sha256(plain).hexdigest()

    run(main)


def test_a_create_recorded_from_a_stale_copy_does_not_undo_a_migration(tmp_path: Path) -> None:
    """A create for a customer this node still sees on the source (its copy of the store
    is a poll behind a migration another process committed) records the new identities
    without writing the old system back over the migration."""
    from dsbc.store import open_store

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            other = open_store(f"sqlite:///{tmp_path / 'loc.db'}")  # the CLI, another node
            try:
                other.migrate(["1"], "target", who="test")
                st, doc, _ = await env.call(
                    ADMIN,
                    "Account/add_account",
                    {"account_info": {"i_customer": 1, "id": "stale-copy"}},
                    {"login": "admin", "password": "admin"},
                )
                assert st == 200, doc
                other.refresh()
                fresh = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
                try:
                    cust = fresh.customer("1")
                    assert cust is not None and cust.system == "target", cust
                    loc = fresh.lookup("account", "stale-copy")
                    assert loc is not None and loc.customer_id == "1"
                finally:
                    fresh.close()
            finally:
                other.close()

    run(main)


def test_an_account_realm_login_by_account_id_finds_its_owner() -> None:
    """Account self-care logs in by account id: with no ``login`` identity for it, the
    ``account`` identity names the owner, so a locked customer's login is held (SPEC 1)
    and a migrated one goes straight to its system."""
    import asyncio
    from urllib.parse import urlencode

    from api_proxy.classify import Action, RouteKey, classify
    from api_proxy.errors import CustomerLocked
    from api_proxy.forward import Forwarder
    from api_proxy.router import DictRouter, ProxySettings

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = urlencode({"params": json.dumps({"login": "100002", "password": "x"})}).encode()
    c = classify("account", "POST", "/rest/Session/login", form, body)
    assert c.action is Action.LOGIN
    assert RouteKey("account", "100002", "login") in c.keys
    web = classify("account", "POST", "/login", form, b"login=100002&password=x")
    assert web.action is Action.WEB_LOGIN and RouteKey("account", "100002", "form") in web.keys
    # the customer realm's logins are customer logins only
    assert [k.kind for k in classify("customer", "POST", "/rest/Session/login", form, body).keys] == [
        "login"
    ]

    router = DictRouter(lock_hold=0.1)
    router.add("2", "source", ["account:100002", "login:bob"])
    router.customers["2"] = ("source", "locked")
    fwd = Forwarder(ProxySettings(), router)

    async def resolve() -> None:
        try:
            await fwd.resolve(c.keys)
        except CustomerLocked:
            return
        raise AssertionError("a locked customer's account login was not held")

    asyncio.run(resolve())
    assert fwd.metrics["held"] == 1
    router.customers["2"] = ("target", "active")
    found = fwd.owner_of(c.keys)
    assert found is not None and found[1].system == "target"


def test_a_header_section_over_max_header_size_in_total_gets_431(tmp_path: Path) -> None:
    """max_header_size bounds the whole header section (deploy/dsbc.example.toml), not
    each field: many fields under the per-field limit add up and get 431 too."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            pad = "".join(f"X-Pad-{i}: {'a' * 4000}\r\n" for i in range(20))  # 80 kB
            head = (
                f"GET /rest/Generic/get_version HTTP/1.1\r\nHost: {CUSTOMER}\r\n{pad}"
                "Connection: close\r\n\r\n"
            )
            out = await raw(env, head.encode())
            assert out.startswith(b"HTTP/1.1 431 "), out[:200]
            assert fault_of(out)["faultcode"] == "Server.Dispatcher.request_too_large"
            assert not [e for e in env.target.log if e["method"] == "Generic/get_version"]
            await still_fine(env)

    run(main)


def test_a_signed_in_browsers_form_with_a_user_and_a_password_runs_once(tmp_path: Path) -> None:
    """A self-care form of a customer signed in on the source (authorized-by-remote) that
    holds a user name and a password (add a SIP user) is no login: it reaches the source
    once, and is never tried on the target first."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            body = b"username=sipuser7&password=NewSecret1"
            head = (
                f"POST /_emulator/echo HTTP/1.1\r\nHost: {CUSTOMER}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                "Cookie: sc_session=abc; authorized-by-remote=1\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            out = await raw(env, head.encode() + body)
            assert out.startswith(b"HTTP/1.1 200"), out[:300]
            assert [e["method"] for e in env.source.log] == ["test:echo"]
            assert env.target.log == []

    run(main)


def test_a_created_id_that_is_another_customers_is_not_recorded(tmp_path: Path) -> None:
    """The target starts as a copy of the source, so both hand out the same ids.  A create
    on one system whose customer id or identity the store gives to another customer (on
    the other system) is not recorded: it would take that customer's routing."""
    from dsbc.api_service import StoreRouter
    from dsbc.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
    try:
        store.put_customer("5001", ["login:old5001"], "source")
        store.put_customer("7", ["i_account:50001"], "source")
        store.put_customer("4", ["login:four"], "target")
        router = StoreRouter(store)
        router.record_created("5001", "target", ["login:new5001"])
        assert store.lookup("login", "new5001") is None
        assert store.customer("5001").system == "source"  # type: ignore[union-attr]
        router.record_created("4", "target", ["i_account:50001", "account:fresh"])
        owner = store.lookup("i_account", "50001")
        assert owner is not None and owner.customer_id == "7" and owner.system == "source"
        fresh = store.lookup("account", "fresh")
        assert fresh is not None and fresh.customer_id == "4"
        assert router.collisions == 2
    finally:
        store.close()


def test_the_routers_own_session_copies_go_once_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 0 kept its own copy of every session it wrote (SQLite, through the
    write-behind) until the session expired: memory grew with every login.  Once the write
    has landed, the copy goes and the store answers."""
    import dsbc.api_service as mod
    from api_proxy.router import SessionRecord
    from dsbc.store import open_store

    clock = [time.time()]
    monkeypatch.setattr(mod, "time", type("T", (), {"time": staticmethod(lambda: clock[0])}))

    class Landed:  # a write-behind whose writes have all landed
        idle = True

        def submit(self, op: Any) -> None:
            op(store)

    store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
    try:
        router = mod.StoreRouter(store, writer=Landed())  # type: ignore[arg-type]
        for i in range(300):
            router.put_session(SessionRecord(key=f"k{i}", system="target", expires_at=clock[0] + 3600, customer_id=str(i)))
        clock[0] += 120
        router.put_session(SessionRecord(key="last", system="source", expires_at=clock[0] + 3600))
        assert set(router._local) == {"last"}, len(router._local)
        rec = router.get_session("k5")
        assert rec is not None and (rec.system, rec.customer_id) == ("target", "5")
    finally:
        store.close()


def test_logouts_are_not_remembered_once_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 0 remembered every logout (SQLite, through the write-behind) until the
    session would have expired (a day by default): a portal that logs in and out for each
    task grew it without end (about 0.5 kB per logout, 40 MB a day at 1 logout/s).  Once
    the deletion has landed, the store answers; a logout not written yet still hides the
    session."""
    import dsbc.api_service as mod
    from api_proxy.router import SessionRecord
    from dsbc.store import open_store

    clock = [time.time()]
    monkeypatch.setattr(mod, "time", type("T", (), {"time": staticmethod(lambda: clock[0])}))
    queued: list[Any] = []

    class Writer:  # a write-behind that lands what it is given when told to
        idle = True

        def submit(self, op: Any) -> None:
            if self.idle:
                op(store)
            else:
                queued.append(op)

    store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
    try:
        writer = Writer()
        router = mod.StoreRouter(store, writer=writer)  # type: ignore[arg-type]
        for i in range(300):
            router.put_session(SessionRecord(key=f"k{i}", system="target", expires_at=clock[0] + 86400))
            router.delete_session(f"k{i}")
        writer.idle = False  # the store is busy: this logout is queued, not written
        router.put_session(SessionRecord(key="held", system="target", expires_at=clock[0] + 86400))
        queued.clear()
        store.put_session(mod.ApiSession("held", "target", clock[0] + 86400))  # landed before
        router.delete_session("held")
        clock[0] += 120
        router.delete_session("nothing")  # a later logout: the purge runs
        assert router.get_session("held") is None  # its deletion is still queued
        assert set(router._gone) <= {"held", "nothing"}, len(router._gone)
        writer.idle = True
        for op in queued:
            op(store)
        clock[0] += 120
        router.delete_session("late")
        assert set(router._gone) <= {"late"}, len(router._gone)
        assert router.get_session("held") is None and router.get_session("k1") is None
    finally:
        store.close()
