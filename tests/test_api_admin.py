"""Admin realm through dsbc: twin sessions, entity owners, merged lists, recorded creates."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

from api_proxy.errors import BadRequest
from api_proxy.listmerge import merge_lists
from dsbc.cli import main as cli
from dsbc.emulator.billing_data import ApiFault
from tests.test_api_support import ADMIN, CUSTOMER, PORTING, ApiEnv, config_text, run

# 3 customers live on the source, 4 on the target (the source keeps those 4 as exported)
ROWS: list[dict[str, Any]] = [
    {
        "customer_id": str(n),
        "system": "source" if n <= 3 else "target",
        "identities": [
            f"login:user{n}",
            f"account:20000{n}",
            f"i_account:{200 + n}",
            f"did:1666000{n}",
        ],
    }
    for n in range(1, 8)
]
ADMIN_CREDS = {"login": "admin", "password": "admin"}


def by_hand(offset: int, limit: int | None) -> list[int]:
    merged = [1, 2, 3] + [4, 5, 6, 7]
    return merged[offset : offset + limit] if limit else merged[offset:]


def test_merged_customer_list_every_window(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env:
            st, sess, hdrs = await env.call(ADMIN, "Session/login", ADMIN_CREDS)
            assert (
                st == 200 and hdrs["X-Billing-System"] == "MR115"
            )  # the target's session is the face
            auth = {"session_id": sess["session_id"]}
            for offset, limit in itertools.product(range(9), [None, *range(9)]):
                params: dict[str, Any] = {"offset": offset, "get_total": 1}
                if limit is not None:
                    params["limit"] = limit
                st, doc, _ = await env.call(ADMIN, "Customer/get_customer_list", params, auth)
                assert st == 200, doc
                got = [c["i_customer"] for c in doc["customer_list"]]
                assert got == by_hand(offset, limit), (offset, limit, got)
                assert doc["total"] == 7
            # without get_total there is no total, and the exported rows never appear twice
            st, doc, hdrs = await env.call(ADMIN, "Customer/get_customer_list", {}, auth, as_json=True)
            assert hdrs["Content-Type"] == "application/json; charset=utf-8"
            assert "total" not in doc and [c["i_customer"] for c in doc["customer_list"]] == [
                1,
                2,
                3,
                4,
                5,
                6,
                7,
            ]
            # the same with the access token as a bearer, and with per-request credentials
            st, doc, _ = await env.call(
                ADMIN,
                "Customer/get_customer_list",
                {"offset": 2, "limit": 3},
                None,
                headers={"Authorization": f"Bearer {sess['access_token']}"},
            )
            assert [c["i_customer"] for c in doc["customer_list"]] == [3, 4, 5]
            # both credentials of the session in auth_info: each system gets its own pair
            both = {"session_id": sess["session_id"], "access_token": sess["access_token"]}
            st, doc, _ = await env.call(ADMIN, "Customer/get_customer_list", {"limit": 4}, both)
            assert [c["i_customer"] for c in doc["customer_list"]] == [1, 2, 3, 4], doc
            st, doc, _ = await env.call(
                ADMIN, "Account/get_account_list", {"get_total": 1}, ADMIN_CREDS
            )
            assert [a["i_account"] for a in doc["account_list"]] == [
                201,
                202,
                203,
                204,
                205,
                206,
                207,
            ]
            assert doc["total"] == 7 and env.api.metrics["lists_merged"] >= 83
            # the source was asked with skip_exported, the target was not
            src = [
                e["params"] for e in env.source.log if e["method"] == "Customer/get_customer_list"
            ]
            tgt = [
                e["params"] for e in env.target.log if e["method"] == "Customer/get_customer_list"
            ]
            assert all(p["skip_exported"] == 1 for p in src) and not any(
                "skip_exported" in p for p in tgt
            )
            # each system saw its own session id
            assert {
                e["user"] for e in env.source.log if e["method"] == "Customer/get_customer_list"
            } == {"admin:admin"}

    run(main)


def test_merge_window_arithmetic_without_sockets() -> None:
    async def main() -> None:
        src, tgt = list(range(100, 103)), list(range(200, 204))

        async def fetch(system: str, p: dict[str, Any]) -> tuple[int, bytes]:
            rows = src if system == "source" else tgt
            off, lim = int(p.get("offset", 0)), int(p.get("limit", 0))
            page = rows[off : off + lim] if lim else rows[off:]
            return 200, json.dumps({"x_list": page, "total": len(rows), "other": system}).encode()

        for off, lim in itertools.product(range(9), range(9)):
            _st, body = await merge_lists(
                fetch, {"offset": off, "limit": lim, "get_total": 1}, "x_list"
            )
            doc = json.loads(body)
            whole = src + tgt
            assert (
                doc["x_list"] == (whole[off : off + lim] if lim else whole[off:])
                and doc["total"] == 7
            )
        with pytest.raises(BadRequest):
            await merge_lists(fetch, {"offset": -1}, "x_list")
        with pytest.raises(BadRequest):
            await merge_lists(fetch, {"limit": "ten"}, "x_list")

        async def faulty(system: str, p: dict[str, Any]) -> tuple[int, bytes]:
            return 500, b'{"faultcode":"Server.Session.auth_failed","faultstring":"no"}'

        assert (await merge_lists(faulty, {}, "x_list"))[0] == 500

    asyncio.run(main())


def test_entities_go_to_their_owner_and_creates_are_recorded(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env:
            st, sess, _ = await env.call(ADMIN, "Session/login", ADMIN_CREDS)
            auth = {"session_id": sess["session_id"]}
            for cid, system in (("1", "MR100"), ("5", "MR115")):
                st, doc, hdrs = await env.call(
                    ADMIN, "Customer/get_customer_info", {"i_customer": int(cid)}, auth
                )
                assert (
                    st == 200
                    and hdrs["X-Billing-System"] == system
                    and doc["customer_info"]["i_customer"] == int(cid)
                )
            # an owner wins over merging
            env.clear_logs()
            st, doc, hdrs = await env.call(
                ADMIN, "Account/get_account_list", {"i_customer": 2}, auth
            )
            assert hdrs["X-Billing-System"] == "MR100" and [
                a["i_account"] for a in doc["account_list"]
            ] == [202]
            assert not env.target.log
            st, doc, hdrs = await env.call(
                ADMIN, "Account/get_account_info", {"id": "200006"}, auth
            )
            assert hdrs["X-Billing-System"] == "MR115" and doc["account_info"]["i_account"] == 206
            # a create without an owner: the target, recorded at once
            st, made, hdrs = await env.call(
                ADMIN,
                "Customer/add_customer",
                {"customer_info": {"name": "New", "login": "newbie"}},
                auth,
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR115"
            new_id = str(made["i_customer"])
            assert env.store.decide("login", "newbie").system == "target"
            assert env.store.customer(new_id).system == "target"
            st, acc, hdrs = await env.call(
                ADMIN,
                "Account/add_account",
                {"account_info": {"i_customer": int(new_id), "id": "300001"}},
                auth,
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR115"
            d = env.store.decide("account", "300001")
            assert (d.system, d.customer_id) == ("target", new_id)  # what SIP asks: routed at once
            assert env.store.decide("i_account", str(acc["i_account"])).system == "target"
            # and `dsbc where` (another process's view of the same store) sees it
            cfg_file = tmp_path / "dsbc.toml"
            cfg_file.write_text(config_text(tmp_path / "loc.db", env.source.url, env.target.url, 9))
            out = CliRunner().invoke(cli, ["where", "account:300001", "-c", str(cfg_file)])
            assert out.exit_code == 0, out.output
            assert f"customer: {new_id}" in out.output and "system:   target" in out.output
            # set_session_context picks the source for the next creates
            st, ok, _ = await env.call(
                ADMIN, "Session/set_session_context", {"system": "source"}, auth
            )
            assert st == 200 and ok["system"] == "source"
            st, made, hdrs = await env.call(
                ADMIN, "Customer/add_customer", {"customer_info": {"login": "oldstyle"}}, auth
            )
            assert (
                hdrs["X-Billing-System"] == "MR100"
                and env.store.decide("login", "oldstyle").system == "source"
            )
            # an account added to a source customer goes to the source
            st, acc, hdrs = await env.call(
                ADMIN,
                "Account/add_account",
                {"account_info": {"i_customer": 3, "id": "300002"}},
                auth,
            )
            assert (
                hdrs["X-Billing-System"] == "MR100"
                and env.store.decide("account", "300002").customer_id == "3"
            )
            assert env.store.decide("account", "200003").customer_id == "3"  # old identities kept
            # logout closes both sessions
            st, _, _ = await env.call(ADMIN, "Session/logout", {}, auth)
            assert st == 200
            assert not env.source.data.sessions and not env.target.data.sessions
            st, fault, _ = await env.call(ADMIN, "Customer/get_customer_list", {}, auth)
            assert st == 500 and "auth" in fault["faultcode"]

    run(main)


def test_session_accepted_by_one_system_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env:
            env.source.data.admins["old-admin"] = "pw"  # exists on the source only
            st, sess, hdrs = await env.call(
                ADMIN, "Session/login", {"login": "old-admin", "password": "pw"}
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR100"
            auth = {"session_id": sess["session_id"]}
            st, _doc, hdrs = await env.call(
                ADMIN, "Customer/get_customer_info", {"i_customer": 2}, auth
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR100"
            st, fault, _ = await env.call(
                ADMIN, "Customer/get_customer_info", {"i_customer": 6}, auth
            )
            assert st == 500 and fault["faultcode"] == "Server.Dispatcher.no_session_on_target"
            st, fault, _ = await env.call(ADMIN, "Customer/get_customer_list", {}, auth)
            assert st == 500 and fault["faultcode"] == "Server.Dispatcher.no_session_on_target"
            st, fault, _ = await env.call(
                ADMIN, "Session/login", {"login": "admin", "password": "bad"}
            )
            assert st == 500 and fault["faultcode"] == "Server.Session.auth_failed"

    run(main)


def test_a_system_down_at_admin_login_is_told_apart_from_a_refusal(tmp_path: Path) -> None:
    """An admin session made while the target was down lives on the source alone; what
    needs the target gets a fault saying it did not answer at login and to log in again,
    not that it refused the credentials (found by an audit: no_session_on_target, "not
    accepted by the target system", for a target that never said no)."""

    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env:
            port = int(env.target.url.rsplit(":", 1)[1])
            await env.target.stop()
            st, sess, hdrs = await env.call(ADMIN, "Session/login", ADMIN_CREDS)
            assert st == 200 and hdrs["X-Billing-System"] == "MR100"
            await env.target.start("127.0.0.1", port)  # back, but this session has none there
            auth = {"session_id": sess["session_id"]}
            st, _doc, hdrs = await env.call(
                ADMIN, "Customer/get_customer_info", {"i_customer": 2}, auth
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR100"
            for name, params in (
                ("Customer/get_customer_info", {"i_customer": 6}),
                ("Customer/get_customer_list", {}),
                ("Session/set_session_context", {"system": "target"}),
            ):
                st, fault, _ = await env.call(ADMIN, name, params, auth)
                assert st == 500, (name, fault)
                assert fault["faultcode"] == "Server.Dispatcher.target_unreachable_at_login"
                assert "did not answer" in fault["faultstring"]
                assert "log in again" in fault["faultstring"]
                assert "not accepted" not in fault["faultstring"]
            # logging in again opens the session on both
            st, sess, _ = await env.call(ADMIN, "Session/login", ADMIN_CREDS)
            st, doc, hdrs = await env.call(
                ADMIN, "Customer/get_customer_info", {"i_customer": 6},
                {"session_id": sess["session_id"]},
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR115", doc

    run(main)


def test_porting_requests_follow_the_did(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env:
            for number, system in (("+1 666 0002", "MR100"), ("16660005", "MR115")):
                st, doc, hdrs = await env.call(
                    PORTING, "DID/get_number_info", {"number": number}, ADMIN_CREDS
                )
                assert st == 200 and hdrs["X-Billing-System"] == system, doc
            env.migrate("2")
            st, doc, hdrs = await env.call(
                PORTING, "DID/get_number_info", {"number": "16660002"}, ADMIN_CREDS
            )
            assert (
                st == 200
                and hdrs["X-Billing-System"] == "MR115"
                and doc["number_info"]["i_customer"] == 2
            )
            # a customer-realm host never merges: its session decides
            st, sess, _ = await env.call(
                CUSTOMER, "Session/login", {"login": "user1", "password": "secret"}
            )
            st, doc, hdrs = await env.call(
                CUSTOMER, "Account/get_account_list", {}, {"session_id": sess["session_id"]}
            )
            assert hdrs["X-Billing-System"] == "MR100" and [
                a["i_account"] for a in doc["account_list"]
            ] == [201]

    run(main)


def test_porting_requests_naming_the_did_outside_params_reach_its_owner(tmp_path: Path) -> None:
    """SPEC 7: a number-porting request about a DID goes to the DID's owner, whether it
    names it in the query, a form or JSON body or the API params (found by an audit: all
    but the params went to the default system, the target)."""

    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env:
            auth = json.dumps(ADMIN_CREDS)
            hdrs = {"Host": PORTING}
            cases: list[tuple[str, str, dict[str, Any]]] = [
                ("POST", "/porting/request", {"data": {"number": "16660002"}}),
                ("POST", "/porting/request", {"json": {"number": "+1 666 0002"}}),
                ("GET", "/porting/request?number=16660002", {}),
                ("GET", "/porting/request?did=16660002", {}),
                # the first DID the store knows decides
                ("GET", "/porting/request?did=19999999&phone_number=16660002", {}),
                ("POST", "/rest/DID/get_number_info",
                 {"json": {"auth_info": ADMIN_CREDS, "params": {}, "did_number": "16660002"}}),
                ("POST", "/rest/DID/get_number_info?number=16660002",
                 {"data": {"auth_info": auth, "params": "{}"}}),
            ]
            for method, path, kw in cases:
                async with env.http.request(method, env.url + path, headers=hdrs, **kw) as r:
                    assert r.headers["X-Billing-System"] == "MR100", (method, path, kw)
            # a target customer's DID, and a request naming none (the default: the target)
            for path in ("/porting/request?number=16660005", "/porting/request"):
                async with env.http.get(env.url + path, headers=hdrs) as r:
                    assert r.headers["X-Billing-System"] == "MR115", path
            assert not [e for e in env.target.log if "16660002" in json.dumps(e)]

    run(main)


def test_admin_requests_for_a_locked_customer_wait_then_fault(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS, lock_hold=0.3) as env:
            env.store.lock(["5"], "batch-x")
            st, fault, hdrs = await env.call(
                ADMIN, "Customer/get_customer_info", {"i_customer": 5}, ADMIN_CREDS
            )
            assert st == 500 and fault["faultcode"] == "Server.Dispatcher.customer_locked"
            assert env.api.metrics["hold_timeouts"] == 1
            # the others are not held
            st, _doc, hdrs = await env.call(
                ADMIN, "Customer/get_customer_info", {"i_customer": 4}, ADMIN_CREDS
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR115"
            await env.source.stop()
            st, fault, _ = await env.call(ADMIN, "Customer/get_customer_list", {}, ADMIN_CREDS)
            assert st == 500 and fault["faultcode"] == "Server.Dispatcher.backend_unavailable"

    run(main)


def test_an_admin_session_kept_in_cookies_reaches_both_systems(tmp_path: Path) -> None:
    """The billing API sets the session as cookies beside the login's answer, and a client
    with a cookie jar sends no auth_info after it.  Requests for the other system go with
    the twin session's cookies there, as they would with its session id in auth_info."""

    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env:
            st, _, hdrs = await env.call(ADMIN, "Session/login", ADMIN_CREDS)
            assert st == 200 and hdrs["X-Billing-System"] == "MR115"
            jar = {
                c.split(";")[0].split("=")[0]: c.split(";")[0] for c in hdrs.getall("Set-Cookie")
            }
            assert set(jar) == {"session_id", "access_token"}
            for names in (["session_id"], ["access_token"], ["session_id", "access_token"]):
                cookie = {"Cookie": "; ".join(["theme=dark", *(jar[n] for n in names)])}
                for cid, system in (("1", "MR100"), ("5", "MR115")):
                    st, doc, hdrs = await env.call(
                        ADMIN,
                        "Customer/get_customer_info",
                        {"i_customer": int(cid)},
                        headers=cookie,
                    )
                    assert st == 200 and hdrs["X-Billing-System"] == system, (names, doc)
                    assert doc["customer_info"]["i_customer"] == int(cid)
                st, doc, _ = await env.call(
                    ADMIN, "Customer/get_customer_list", {"get_total": 1}, headers=cookie
                )
                assert st == 200 and doc["total"] == 7, (names, doc)
            # the source saw its own session, and the client's other cookies
            seen = [e for e in env.source.log if e["method"] == "Customer/get_customer_info"]
            assert seen and all(e["user"] == "admin:admin" for e in seen)
            # the logout closes both
            st, _, _ = await env.call(ADMIN, "Session/logout", {}, headers=cookie)
            assert st == 200
            assert not env.source.data.sessions and not env.target.data.sessions

    run(main)


def test_dids_by_id_and_aliases_of_an_account_go_to_the_owner(tmp_path: Path) -> None:
    """SPEC 7: a request naming ``i_did_number`` goes to the system of the customer the DID
    belongs to; an alias names its account by ``i_master_account`` (its add, its list)."""
    rows = [
        dict(r, identities=[*r["identities"], f"i_did_number:{70 + i}"])
        for i, r in enumerate(ROWS, 1)
    ]

    async def main() -> None:
        async with ApiEnv(tmp_path, rows) as env:
            _, sess, _ = await env.call(ADMIN, "Session/login", ADMIN_CREDS)
            auth = {"session_id": sess["session_id"]}
            for name, params, system in (
                ("DID/get_number_info", {"i_did_number": 72}, "MR100"),
                ("DID/get_number_info", {"i_did_number": "76"}, "MR115"),
                ("DID/update_number", {"number_info": {"i_did_number": 71}}, "MR100"),
                ("Account/get_alias_list", {"i_master_account": 202}, "MR100"),
                ("Account/add_alias", {"alias_info": {"i_master_account": 203}}, "MR100"),
                ("Account/add_alias", {"alias_info": {"i_master_account": 205}}, "MR115"),
            ):
                env.clear_logs()
                _, doc, hdrs = await env.call(ADMIN, name, params, auth)
                assert hdrs["X-Billing-System"] == system, (name, params, doc)
                assert env.served_by(name) == [
                    "source" if system == "MR100" else "target"
                ], (name, params)

    run(main)


def test_a_session_made_on_one_system_directly_is_used_there_alone(tmp_path: Path) -> None:
    """GAPS: an admin session dsbc did not make (opened on the target directly) is known
    there only: its lists are that system's, every time (not a fault from the second
    call on), and what needs the other system gets a fault that says why."""

    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env:
            async with env.http.post(
                f"{env.target.url}/rest/Session/login",
                data={"params": json.dumps(ADMIN_CREDS)},
            ) as r:
                auth = {"session_id": (await r.json())["session_id"]}
            for _ in range(3):
                st, doc, _ = await env.call(
                    ADMIN, "Customer/get_customer_list", {"get_total": 1, "limit": 2}, auth
                )
                assert st == 200, doc
                assert [c["i_customer"] for c in doc["customer_list"]] == [4, 5]
                assert doc["total"] == 4
            st, doc, _ = await env.call(
                ADMIN, "Customer/get_customer_info", {"i_customer": 6}, auth
            )
            assert st == 200 and doc["customer_info"]["i_customer"] == 6
            st, fault, _ = await env.call(
                ADMIN, "Customer/get_customer_info", {"i_customer": 1}, auth
            )
            assert st == 500 and fault["faultcode"] == "Server.Dispatcher.no_session_on_source"
            assert "not opened through dsbc" in fault["faultstring"], fault

    run(main)


def test_a_system_failing_at_admin_login_is_not_taken_for_a_refusal(tmp_path: Path) -> None:
    """A system that answers the login with an error that is no refusal of the
    credentials (a 502 page of the web server in front of a stopped application, a
    fault of its own) did not accept or refuse them: what needs it then gets the
    "log in again once it answers" fault, not "log in with credentials valid on both"."""
    async def bad_gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>502</html>", content_type="text/html")

    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env:

            def broken(*_a: Any, **_k: Any) -> Any:
                raise ApiFault("Server.Internal.database_unavailable", "try later")

            env.target.data.authenticate = broken  # type: ignore[method-assign]
            port = int(env.target.url.rsplit(":", 1)[1])
            for phase in ("fault", "502"):
                if phase == "502":
                    await env.target.stop()
                    app = web.Application()
                    app.router.add_route("*", "/{p:.*}", bad_gateway)
                    runner = web.AppRunner(app)
                    await runner.setup()
                    await web.TCPSite(runner, "127.0.0.1", port).start()
                st, sess, hdrs = await env.call(ADMIN, "Session/login", ADMIN_CREDS)
                assert st == 200 and hdrs["X-Billing-System"] == "MR100", (phase, sess)
                auth = {"session_id": sess["session_id"]}
                st, fault, _ = await env.call(
                    ADMIN, "Customer/get_customer_info", {"i_customer": 6}, auth
                )
                assert fault["faultcode"] == "Server.Dispatcher.target_unreachable_at_login", (
                    phase,
                    fault,
                )
            await runner.cleanup()

    run(main)
