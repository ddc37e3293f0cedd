"""The billing API emulator on its own: sessions, faults, lists, export / import."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from dsbc.emulator.billing import BillingEmulator, sample_rows, start_billing_emulator, sync_systems


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 60))


async def call(
    http: aiohttp.ClientSession,
    emu: BillingEmulator,
    name: str,
    params: Any = None,
    auth: Any = None,
    as_json: bool = False,
) -> tuple[int, Any]:
    url = f"{emu.url}/rest/{name}"
    if as_json:
        async with http.post(url, json={"auth_info": auth, "params": params or {}}) as r:
            return r.status, await r.json()
    data = {"params": json.dumps(params or {})}
    if auth is not None:
        data["auth_info"] = json.dumps(auth)
    async with http.post(url, data=data) as r:
        return r.status, await r.json()


def test_login_sessions_tokens_and_faults() -> None:
    async def main() -> None:
        src = await start_billing_emulator("MR100", "127.0.0.1", 0, sample_rows(), system="source")
        try:
            async with aiohttp.ClientSession() as http:
                st, fault = await call(
                    http, src, "Session/login", {"login": "alice", "password": "wrong"}
                )
                assert st == 500 and fault["faultcode"] == "Server.Session.auth_failed"
                st, sess = await call(
                    http, src, "Session/login", {"login": "alice", "password": "secret"}
                )
                assert st == 200 and {
                    "session_id",
                    "access_token",
                    "refresh_token",
                    "expires_at",
                } <= set(sess)
                st, info = await call(
                    http, src, "Customer/get_customer_info", {}, {"session_id": sess["session_id"]}
                )
                assert info["customer_info"]["login"] == "alice"
                async with http.post(
                    f"{src.url}/rest/Account/get_account_list",
                    headers={"Authorization": f"Bearer {sess['access_token']}"},
                ) as r:
                    assert r.headers["X-Billing-System"] == "MR100"
                    assert [a["id"] for a in (await r.json())["account_list"]] == ["100001"]
                st, new = await call(
                    http,
                    src,
                    "Session/refresh_access_token",
                    {"refresh_token": sess["refresh_token"]},
                )
                assert st == 200 and new["access_token"] != sess["access_token"]
                st, _ = await call(
                    http,
                    src,
                    "Customer/get_customer_info",
                    {},
                    {"access_token": sess["access_token"]},
                )
                assert st == 500
                st, _ = await call(
                    http,
                    src,
                    "Session/logout",
                    {},
                    {"session_id": sess["session_id"]},
                    as_json=True,
                )
                assert st == 200
                st, fault = await call(
                    http, src, "Customer/get_customer_info", {}, {"session_id": sess["session_id"]}
                )
                assert st == 500 and fault["faultcode"] == "Server.Session.auth_failed"
                st, fault = await call(
                    http, src, "Nope/nothing", {}, {"login": "admin", "password": "admin"}
                )
                assert st == 500 and "unknown_method" in fault["faultcode"]
        finally:
            await src.stop()

    run(main)


def test_lists_skip_exported_and_migration_between_systems() -> None:
    async def main() -> None:
        rows = sample_rows()
        src = await start_billing_emulator("MR100", "127.0.0.1", 0, rows)
        tgt = await start_billing_emulator("MR115", "127.0.0.1", 0, rows)
        assert (src.system, tgt.system) == ("source", "target")
        admin = {"login": "admin", "password": "admin"}
        try:
            async with aiohttp.ClientSession() as http:
                _, all_src = await call(
                    http, src, "Customer/get_customer_list", {"get_total": 1}, admin
                )
                assert all_src["total"] == 5  # dave and erin moved: kept as exported
                _, live = await call(
                    http,
                    src,
                    "Customer/get_customer_list",
                    {"skip_exported": 1, "get_total": 1},
                    admin,
                )
                assert [c["login"] for c in live["customer_list"]] == ["alice", "bob", "carol"]
                _, page = await call(
                    http,
                    tgt,
                    "Customer/get_customer_list",
                    {"offset": 1, "limit": 1, "get_total": 1},
                    admin,
                )
                assert [c["login"] for c in page["customer_list"]] == ["erin"] and page[
                    "total"
                ] == 2
                # carol moves
                tgt.import_customer(src.export_customer(3))
                st, _ = await call(
                    http, src, "Session/login", {"login": "carol", "password": "secret"}
                )
                assert st == 500
                st, sess = await call(
                    http, tgt, "Session/login", {"login": "carol", "password": "secret"}
                )
                assert st == 200
                _, acc = await call(
                    http, tgt, "Account/get_account_list", {}, {"session_id": sess["session_id"]}
                )
                assert acc["account_list"][0]["i_account"] == 103
                st, new = await call(
                    http,
                    tgt,
                    "Customer/add_customer",
                    {"customer_info": {"name": "New", "login": "newbie"}},
                    admin,
                )
                assert st == 200 and new["i_customer"] >= 5000
                st, num = await call(
                    http, tgt, "DID/get_number_info", {"number": "15550104"}, admin
                )
                assert num["number_info"]["i_customer"] == 4
        finally:
            await src.stop()
            await tgt.stop()

    run(main)


def test_self_care_pages_invoice_cpe_and_cwmp() -> None:
    async def main() -> None:
        src = await start_billing_emulator("MR100", "127.0.0.1", 0, sample_rows())
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                async with http.get(src.url + "/") as r:
                    assert "MR100 self-care" in await r.text()
                async with http.post(
                    src.url + "/login", data={"login": "bob", "password": "x"}
                ) as r:
                    assert r.status == 401
                async with http.post(
                    src.url + "/login", data={"login": "bob", "password": "secret"}
                ) as r:
                    assert r.status == 200 and "Welcome, Bob" in await r.text()
                async with http.get(src.url + "/invoice/201.pdf?size=300000") as r:
                    body = await r.read()
                    assert len(body) == 300000 and body.startswith(b"%PDF")
                async with http.get(src.url + "/prov/0004f2a1b2c2.cfg") as r:
                    assert r.status == 200 and "account.1.user = 100002" in await r.text()
                async with http.get(src.url + "/prov/0004f2ffffff.cfg") as r:
                    assert r.status == 404
                inform = (
                    b"<cwmp:Inform><DeviceId><SerialNumber>0004F2A1B2C1</SerialNumber>"
                    b"</DeviceId></cwmp:Inform>"
                )
                async with http.post(src.url + "/cwmp", data=inform) as r:
                    assert r.status == 200
                async with http.post(src.url + "/cwmp", data=b"") as r:
                    assert r.status == 204
        finally:
            await src.stop()

    run(main)


def test_sync_systems_follows_the_store() -> None:
    async def main() -> None:
        rows = sample_rows()
        src = await start_billing_emulator("MR100", "127.0.0.1", 0, rows)
        tgt = await start_billing_emulator("MR115", "127.0.0.1", 0, rows)
        try:
            placement = [(r["customer_id"], r["system"]) for r in rows]
            assert sync_systems(src, tgt, placement) == 0  # seeded alike already
            placement[0] = ("1", "target")
            assert sync_systems(src, tgt, placement) == 1
            assert src.data.customers[1].exported and 1 in tgt.data.customers
            assert tgt.data.find_account(id="100001") is not None
            placement[0] = ("1", "source")
            assert sync_systems(src, tgt, placement) == 1
            assert not src.data.customers[1].exported and 1 not in tgt.data.customers
            assert tgt.data.find_account(id="100001") is None
            # a batch holds customer 1 locked (its copy window): the target has a copy at once,
            # the source still serves it (found by an audit: a login held in the demo during
            # a migration reached the target before the demo had copied the customer)
            assert sync_systems(src, tgt, [], copying=["1"]) == 0
            assert 1 in tgt.data.customers and not src.data.customers[1].exported
            assert sync_systems(src, tgt, [("1", "target")]) == 0  # the flip: exported now
            assert src.data.customers[1].exported
        finally:
            await src.stop()
            await tgt.stop()

    run(main)


def test_bad_list_windows_and_params_are_faults() -> None:
    """A list window or an id the billing API cannot read is a fault in its own shape
    (HTTP 500, faultcode / faultstring), never an HTML error page; a negative window is
    refused, not read from the end of the list; ``"0"`` is false as 0 is."""

    async def main() -> None:
        src = await start_billing_emulator("MR100", "127.0.0.1", 0, sample_rows())
        admin = {"login": "admin", "password": "admin"}
        try:
            async with aiohttp.ClientSession() as http:
                for params in (
                    {"offset": "abc"},
                    {"limit": "x"},
                    {"offset": -1},
                    {"limit": -2},
                    {"offset": [1]},
                ):
                    async with http.post(
                        f"{src.url}/rest/Customer/get_customer_list",
                        data={"params": json.dumps(params), "auth_info": json.dumps(admin)},
                    ) as r:
                        body = await r.read()
                        assert r.status == 500 and r.content_type == "application/json", body
                        fault = json.loads(body)
                        assert fault["faultcode"] == "Client.Request.bad_param", fault
                        assert fault["faultstring"]
                for name, params in (
                    ("Customer/add_customer", {"customer_info": {"i_parent": "nope"}}),
                    ("Account/add_account", {"account_info": {"i_customer": "x1"}}),
                ):
                    st, fault = await call(http, src, name, params, admin)
                    assert st == 500 and fault["faultcode"] == "Client.Request.bad_param", fault
                st, page = await call(
                    http,
                    src,
                    "Customer/get_customer_list",
                    {"get_total": "0", "skip_exported": "0", "limit": "2"},
                    admin,
                )
                assert st == 200 and "total" not in page and len(page["customer_list"]) == 2
        finally:
            await src.stop()

    run(main)
