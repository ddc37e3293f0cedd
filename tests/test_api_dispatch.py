"""Customer realm through dsbc: logins, sessions, migration, holds, unavailable systems."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

from api_proxy.records import session_key
from dsbc.api_service import start_api
from dsbc.store import open_store
from tests.test_api_support import ADMIN, CUSTOMER, ApiEnv, run

LOGIN = "Session/login"


def test_source_customer_login_and_every_call_reach_the_source(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            st, sess, hdrs = await env.call(
                CUSTOMER, LOGIN, {"login": "alice", "password": "secret"}
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR100", sess
            assert "authorized-by-remote=1" in " ".join(hdrs.getall("Set-Cookie", []))
            # alice is in the store: her login went straight to her system
            assert env.served_by(LOGIN) == ["source"]
            sid, tok = sess["session_id"], sess["access_token"]
            st, info, hdrs = await env.call(
                CUSTOMER, "Customer/get_customer_info", {}, {"session_id": sid}
            )
            assert (
                st == 200
                and info["customer_info"]["login"] == "alice"
                and hdrs["X-Billing-System"] == "MR100"
            )
            st, acc, hdrs = await env.call(
                CUSTOMER,
                "Account/get_account_list",
                {},
                None,
                headers={"Authorization": f"Bearer {tok}"},
                as_json=True,
            )
            assert st == 200 and acc["account_list"][0]["id"] == "100001"
            st, ping, _ = await env.call(CUSTOMER, "Session/ping", {"session_id": sid})
            assert st == 200 and ping["user_id"] == "1"
            st, new, _ = await env.call(
                CUSTOMER, "Session/refresh_access_token", {"refresh_token": sess["refresh_token"]}
            )
            assert st == 200 and new["access_token"] != tok
            st, _, hdrs = await env.call(
                CUSTOMER,
                "Customer/get_customer_info",
                {},
                headers={"Authorization": f"Bearer {new['access_token']}"},
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR100"
            st, _, _ = await env.call(CUSTOMER, "Session/logout", {}, {"session_id": sid})
            assert st == 200
            assert not env.target.log, "nothing of alice's may reach the target"
            # X-Forwarded-For reached the system
            assert all(e["xff"] == "127.0.0.1" for e in env.source.log)

    run(main)


def test_unknown_login_tries_the_target_then_the_source(tmp_path: Path) -> None:
    rows = [{"customer_id": "7", "system": "source", "identities": ["account:700"]}]

    async def main() -> None:
        async with ApiEnv(tmp_path, rows) as env:
            # the source knows login "zoe" but the store does not: target first, then source
            env.source.data.customers[7].login = "zoe"
            st, sess, hdrs = await env.call(CUSTOMER, LOGIN, {"login": "zoe", "password": "secret"})
            assert st == 200 and hdrs["X-Billing-System"] == "MR100"
            assert env.served_by(LOGIN) == ["source", "target"]
            assert env.api.metrics["login_fallbacks"] == 1
            env.clear_logs()
            st, _, hdrs = await env.call(
                CUSTOMER, "Customer/get_customer_info", {}, {"session_id": sess["session_id"]}
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR100" and not env.target.log
            # nobody accepts it: the source's auth fault comes back as it is
            st, fault, _ = await env.call(CUSTOMER, LOGIN, {"login": "nobody", "password": "x"})
            assert st == 500 and fault["faultcode"] == "Server.Session.auth_failed"
            # a session not made through dsbc: probed on the target, then the source, remembered
            other = env.source.data.open_session("customer", "7")
            env.clear_logs()
            st, _, _ = await env.call(
                CUSTOMER, "Customer/get_customer_info", {}, {"session_id": other.session_id}
            )
            assert st == 200 and env.served_by("Customer/get_customer_info") == ["source", "target"]
            env.clear_logs()
            st, _, _ = await env.call(
                CUSTOMER, "Customer/get_customer_info", {}, {"session_id": other.session_id}
            )
            assert st == 200 and env.served_by("Customer/get_customer_info") == ["source"]

    run(main)


def test_target_customer_reaches_the_target(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            st, sess, hdrs = await env.call(
                CUSTOMER, LOGIN, {"login": "dave", "password": "secret"}, as_json=True
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR115"
            assert "authorized-by-remote" not in " ".join(hdrs.getall("Set-Cookie", []))
            for name in (
                "Customer/get_customer_info",
                "Account/get_account_list",
                "Invoice/get_invoice_list",
            ):
                st, _, hdrs = await env.call(CUSTOMER, name, {}, {"session_id": sess["session_id"]})
                assert st == 200 and hdrs["X-Billing-System"] == "MR115", name
            assert not env.source.log

    run(main)


def test_migration_new_login_on_target_old_session_keeps_working(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            st, old, _ = await env.call(CUSTOMER, LOGIN, {"login": "carol", "password": "secret"})
            assert st == 200
            env.migrate("3")
            st, new, hdrs = await env.call(
                CUSTOMER, LOGIN, {"login": "carol", "password": "secret"}
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR115"
            # a browser that had the source's cookie gets it cleared
            st, _, hdrs = await env.call(
                CUSTOMER,
                LOGIN,
                {"login": "carol", "password": "secret"},
                headers={"Cookie": "authorized-by-remote=1"},
            )
            assert "authorized-by-remote=;" in " ".join(hdrs.getall("Set-Cookie", []))
            st, _, hdrs = await env.call(
                CUSTOMER, "Account/get_account_list", {}, {"session_id": new["session_id"]}
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR115"
            # the old session still lives on the source until it ends
            st, info, hdrs = await env.call(
                CUSTOMER, "Customer/get_customer_info", {}, {"session_id": old["session_id"]}
            )
            assert (
                st == 200
                and hdrs["X-Billing-System"] == "MR100"
                and info["customer_info"]["login"] == "carol"
            )
            st, _, hdrs = await env.call(
                CUSTOMER, "Session/logout", {}, {"session_id": old["session_id"]}
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR100"
            st, fault, _ = await env.call(
                CUSTOMER, "Customer/get_customer_info", {}, {"session_id": old["session_id"]}
            )
            assert st == 500 and "auth" in fault["faultcode"]

    run(main)


def test_locked_customer_is_held_until_the_flip(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path, lock_hold=3.0) as env:
            env.store.lock(["2"], "batch-test")
            login = asyncio.create_task(
                env.call(CUSTOMER, LOGIN, {"login": "bob", "password": "secret"})
            )
            await asyncio.sleep(0.3)
            assert not login.done(), "a locked customer's login is held, not refused"
            env.migrate("2")
            st, _sess, hdrs = await asyncio.wait_for(login, 5)
            assert st == 200 and hdrs["X-Billing-System"] == "MR115"
            assert env.api.metrics["held"] == 1

    run(main)


def test_lock_outlasting_the_hold_and_a_dead_system_give_faults(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path, lock_hold=0.2) as env:
            env.store.lock(["2"], "batch-test")
            st, fault, hdrs = await env.call(
                CUSTOMER, LOGIN, {"login": "bob", "password": "secret"}
            )
            assert st == 500 and fault["faultcode"] == "Server.Dispatcher.customer_locked"
            assert hdrs["Content-Type"].startswith("application/json") and hdrs["Retry-After"]
            st, sess, _ = await env.call(CUSTOMER, LOGIN, {"login": "dave", "password": "secret"})
            assert st == 200
            await env.target.stop()
            st, fault, _ = await env.call(
                CUSTOMER, "Customer/get_customer_info", {}, {"session_id": sess["session_id"]}
            )
            assert st == 500 and fault["faultcode"] == "Server.Dispatcher.backend_unavailable"
            assert "target" in fault["faultstring"]
            # the source still answers its customers
            st, _, hdrs = await env.call(CUSTOMER, LOGIN, {"login": "alice", "password": "secret"})
            assert st == 200 and hdrs["X-Billing-System"] == "MR100"
            assert env.api.status()["backends"]["target"]["healthy"] is False

    run(main)


def test_status_names_each_api_back_end_by_url_and_untried_until_it_answered(tmp_path: Path) -> None:
    """`dsbc status` showed the API back ends as "api source source up" before any request had
    reached them: no URL to tell which back end, and "up" for one never tried."""
    from dsbc.metrics import backend_rows

    def rows(env: ApiEnv) -> dict[str, tuple[str, ...]]:
        summary = {"services": {"api": env.api.status()}}
        return {r[1]: r for r in backend_rows(summary) if r[0] == "api"}

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            before = rows(env)
            assert before["source"][2:4] == (env.source.url, "untried"), before
            assert before["target"][2:4] == (env.target.url, "untried"), before
            st, _, _ = await env.call(CUSTOMER, LOGIN, {"login": "alice", "password": "secret"})
            assert st == 200
            after = rows(env)
            assert after["source"][3] == "up", after
            await env.target.stop()
            await env.call(CUSTOMER, LOGIN, {"login": "dave", "password": "secret"})
            assert rows(env)["target"][2:4] == (env.target.url, "DOWN"), rows(env)

    run(main)


def test_a_second_node_routes_sessions_made_by_the_first(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            st, sess, _ = await env.call(CUSTOMER, LOGIN, {"login": "alice", "password": "secret"})
            assert st == 200
            other_store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
            from dsbc.config import parse_config
            from tests.test_api_support import config_text, free_port

            cfg = parse_config(
                config_text(tmp_path / "loc.db", env.source.url, env.target.url, free_port())
            )
            node2 = await start_api(cfg, other_store)
            try:
                env.clear_logs()
                async with env.http.post(
                    f"{node2.url}/rest/Customer/get_customer_info",
                    headers={"Host": CUSTOMER},
                    data={"auth_info": json.dumps({"session_id": sess["session_id"]})},
                ) as r:
                    assert r.status == 200 and r.headers["X-Billing-System"] == "MR100"
                assert not env.target.log, "node 2 knew the session from the store: no probing"
            finally:
                await node2.stop()
                other_store.close()

    run(main)


def test_web_form_login_falls_back_to_the_source_and_the_cookie_follows(tmp_path: Path) -> None:
    rows = [{"customer_id": "7", "system": "source", "identities": ["account:700"]}]

    async def main() -> None:
        async with ApiEnv(tmp_path, rows) as env:
            env.source.data.customers[7].login = "zoe"  # unknown to the store
            cookies = await env.web_login("zoe", "secret", "MR100")
            assert [e["method"] for e in env.target.log] == ["web:login"]  # refused there first
            assert "authorized-by-remote=1" in cookies
            async with env.http.get(
                f"{env.url}/home", headers={"Host": CUSTOMER, "Cookie": cookies}
            ) as r:
                assert r.status == 200 and "Welcome, Customer 7" in await r.text()
                assert r.headers["X-Billing-System"] == "MR100"
            # a wrong password: both refuse, the source's page comes back as it is
            async with env.http.post(
                f"{env.url}/login",
                data={"login": "zoe", "password": "nope"},
                headers={"Host": CUSTOMER},
                allow_redirects=False,
            ) as r:
                assert r.status == 401 and "authorized-by-remote" not in r.headers.get(
                    "Set-Cookie", ""
                )

    run(main)


def test_a_logout_through_dsbc_expires_the_authorized_by_remote_cookie(tmp_path: Path) -> None:
    """A source customer's logout (self-care page or API) deletes the browser's
    authorized-by-remote cookie too, as it was set (found by an audit: only the session
    cookie went, and the next visit to / still got the source's login page)."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            cookies = await env.web_login("alice", "secret", "MR100")
            assert "authorized-by-remote=1" in cookies
            async with env.http.get(
                f"{env.url}/logout",
                headers={"Host": CUSTOMER, "Cookie": cookies},
                allow_redirects=False,
            ) as r:
                assert r.status == 303 and r.headers["X-Billing-System"] == "MR100"
                gone = [c for c in r.headers.getall("Set-Cookie") if "authorized-by-remote" in c]
                assert gone == ["authorized-by-remote=; Path=/; Max-Age=0"], gone
            # what the browser keeps after that answer: nothing of the source's
            async with env.http.get(f"{env.url}/", headers={"Host": CUSTOMER}) as r:
                assert r.headers["X-Billing-System"] == "MR115"
            # an API logout of a session on the source, from a browser with the cookie
            st, sess, _ = await env.call(CUSTOMER, LOGIN, {"login": "alice", "password": "secret"})
            st, _, hdrs = await env.call(
                CUSTOMER, "Session/logout", {}, {"session_id": sess["session_id"]},
                headers={"Cookie": "authorized-by-remote=1"},
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR100"
            assert "authorized-by-remote=; Path=/; Max-Age=0" in hdrs.getall("Set-Cookie")
            # a page that is no logout keeps it; a browser without it is told nothing
            async with env.http.get(
                f"{env.url}/invoices",
                headers={"Host": CUSTOMER, "Cookie": "authorized-by-remote=1"},
                allow_redirects=False,
            ) as r:
                assert r.headers["X-Billing-System"] == "MR100"
                assert "Set-Cookie" not in r.headers
            cookies = await env.web_login("dave", "secret", "MR115")
            async with env.http.get(
                f"{env.url}/logout",
                headers={"Host": CUSTOMER, "Cookie": cookies},
                allow_redirects=False,
            ) as r:
                assert r.status == 303 and r.headers["X-Billing-System"] == "MR115"
                assert "authorized-by-remote" not in " ".join(r.headers.getall("Set-Cookie"))

    run(main)


def test_concurrent_sessions_of_both_systems_stay_apart(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            logins = [("alice", "MR100"), ("bob", "MR100"), ("dave", "MR115"), ("erin", "MR115")]
            sessions = await asyncio.gather(
                *(env.call(CUSTOMER, LOGIN, {"login": u, "password": "secret"}) for u, _ in logins)
            )
            calls = []
            for (user, system), (st, sess, _) in zip(logins, sessions, strict=True):
                assert st == 200
                for _ in range(15):
                    calls.append((user, system, sess["session_id"]))

            async def one(user: str, system: str, sid: str) -> None:
                st, info, hdrs = await env.call(
                    CUSTOMER, "Customer/get_customer_info", {}, {"session_id": sid}
                )
                assert st == 200 and hdrs["X-Billing-System"] == system
                assert info["customer_info"]["login"] == user

            await asyncio.gather(*(one(*c) for c in calls))
            assert env.api.metrics["requests"] == 64

    run(main)


def test_a_session_changed_on_one_node_counts_on_the_other(tmp_path: Path) -> None:
    """An admin's `Session/set_session_context` made through node 2 steers node 1's next
    creates too, once both had the session (found by an audit: node 1 kept its copy of the
    session and created on the old system for good).  SQLite: within SESSION_FRESH (1 s)."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            from dsbc.config import parse_config
            from tests.test_api_support import ADMIN, config_text, free_port

            other_store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
            cfg = parse_config(config_text(tmp_path / "loc.db", env.source.url, env.target.url, free_port()))
            node2 = await start_api(cfg, other_store)
            try:
                st, sess, _ = await env.call(ADMIN, LOGIN, {"login": "admin", "password": "admin"})
                assert st == 200
                auth = {"session_id": sess["session_id"]}

                async def add(url: str, login: str) -> str:
                    data = {"auth_info": json.dumps(auth),
                            "params": json.dumps({"customer_info": {"login": login}})}
                    async with env.http.post(f"{url}/rest/Customer/add_customer",
                                             headers={"Host": ADMIN}, data=data) as r:
                        assert r.status == 200, await r.text()
                        return r.headers["X-Billing-System"]

                async def set_context(url: str, system: str) -> None:
                    data = {"auth_info": json.dumps(auth), "params": json.dumps({"system": system})}
                    async with env.http.post(f"{url}/rest/Session/set_session_context",
                                             headers={"Host": ADMIN}, data=data) as r:
                        assert r.status == 200, await r.text()

                n = iter(range(1000))
                assert await add(env.url, f"a{next(n)}") == "MR115"  # both nodes know the session
                assert await add(node2.url, f"a{next(n)}") == "MR115"
                for setter, follower, system, name in ((node2, env.api, "source", "MR100"),
                                                       (env.api, node2, "target", "MR115")):
                    await set_context(setter.url, system)
                    assert await add(setter.url, f"a{next(n)}") == name  # at once where it was set
                    seen = []
                    for _ in range(40):  # 4 s at most
                        seen.append(await add(follower.url, f"a{next(n)}"))
                        if seen[-1] == name:
                            break
                        await asyncio.sleep(0.1)
                    assert seen[-1] == name, seen
                    assert len(seen) <= 15, seen  # within about a second (SESSION_FRESH), not for good
            finally:
                await node2.stop()
                other_store.close()

    run(main)


def test_what_a_customer_adds_in_its_own_session_is_recorded(tmp_path: Path) -> None:
    """An account (with its DID) added by a customer in its self-care API session is routed
    by SIP / RADIUS at once, as one an admin adds (found by an audit: nothing was recorded,
    and the new account went by store.unknown, to the source, for good)."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            st, sess, _ = await env.call(CUSTOMER, LOGIN, {"login": "dave", "password": "secret"})
            assert st == 200  # dave: customer 4, on the target
            st, made, hdrs = await env.call(
                CUSTOMER, "Account/add_account",
                {"account_info": {"id": "400004", "login": "dave2", "did_number": "+1 555 777 0004"}},
                {"session_id": sess["session_id"]},
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR115", made
            for kind, value in (("account", "400004"), ("login", "dave2"), ("did", "15557770004"),
                                ("i_account", str(made["i_account"]))):
                d = env.store.decide(kind, value)
                assert (d.customer_id, d.system) == ("4", "target"), (kind, value, d)

    run(main)


async def stored_sessions(env: ApiEnv) -> list[tuple[str, str, str]]:
    """(key, realm, extra) of every session row, once the write-behind has written."""
    writer = env.api.router.writer
    for _ in range(200):
        if writer is None or writer.idle:
            break
        await asyncio.sleep(0.02)
    with contextlib.closing(sqlite3.connect(env.tmp / "loc.db")) as db:
        return list(db.execute("SELECT key, realm, extra FROM sessions"))


def test_customer_session_records_keep_no_raw_credential(tmp_path: Path) -> None:
    """A customer or account session is stored under digests only, after a login, a
    probe and a refresh, and every credential still routes (found by an audit: each row
    held the session id, access token and refresh token in plain text in ``extra``).
    Admin twins keep theirs: requests are rewritten with the other system's."""

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            st, sess, _ = await env.call(CUSTOMER, LOGIN, {"login": "alice", "password": "secret"})
            assert st == 200
            other = env.source.data.open_session("customer", "2")  # not made through dsbc
            st, _, _ = await env.call(
                CUSTOMER, "Customer/get_customer_info", {}, {"session_id": other.session_id}
            )
            assert st == 200
            st, new, _ = await env.call(
                CUSTOMER, "Session/refresh_access_token", {"refresh_token": sess["refresh_token"]}
            )
            assert st == 200 and new["access_token"] != sess["access_token"]
            st, admin, _ = await env.call(ADMIN, LOGIN, {"login": "admin", "password": "admin"})
            assert st == 200
            rows = await stored_sessions(env)
            secrets = [
                sess["session_id"], sess["access_token"], sess["refresh_token"],
                new["access_token"], other.session_id,
            ]
            customer = [r for r in rows if r[1] == "customer"]
            assert len(customer) == 5, rows  # alice: sid, rt, two access tokens; the probe: sid
            for key, _realm, extra in customer:
                assert not [s for s in secrets if s in key + extra], (key, extra)
                assert set(json.loads(extra)) == {"keys"} and key in json.loads(extra)["keys"]
            assert any(admin["session_id"] in extra for _k, realm, extra in rows if realm == "admin")
            # every credential still finds its system
            for auth, headers in (
                ({"session_id": sess["session_id"]}, {}),
                (None, {"Authorization": f"Bearer {new['access_token']}"}),
                ({"session_id": other.session_id}, {}),
            ):
                env.clear_logs()
                st, info, hdrs = await env.call(
                    CUSTOMER, "Customer/get_customer_info", {}, auth, headers=headers
                )
                assert st == 200 and hdrs["X-Billing-System"] == "MR100", info
                assert not env.target.log  # known: no probe
            st, again, _ = await env.call(
                CUSTOMER, "Session/refresh_access_token", {"refresh_token": sess["refresh_token"]}
            )
            assert st == 200 and not env.target.log
            # a logout takes every key still valid with it
            st, _, _ = await env.call(CUSTOMER, "Session/logout", {}, {"session_id": sess["session_id"]})
            assert st == 200
            gone = {
                session_key("sid", sess["session_id"]),
                session_key("rt", sess["refresh_token"]),
                session_key("at", again["access_token"]),
            }
            assert not gone & {k for k, _r, _e in await stored_sessions(env)}

    run(main)
