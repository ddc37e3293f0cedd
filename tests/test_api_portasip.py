"""The PortaSIP API and the CallControl API (SPEC 7, first line) through dsbc, black-box.

Both speak the billing API's format (``POST /rest/<Service>/<method>`` with
``auth_info`` / ``params``) on virtual hosts of their own; the vhost's realm decides how a
call is routed, as for the billing API: an admin-realm PortaSIP API call naming an account
goes to its owner (per-request credentials or a twin session), an account-realm
CallControl call follows the account's session.  Each case runs through the fast path
and through the aiohttp path (``api.fast_path = false``); the emulated systems answer
these services with their unknown-method fault, which carries the system's name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_api_admin import ADMIN_CREDS, ROWS
from tests.test_api_support import ApiEnv, run

PORTASIP = "portasip-api.billing.com"
CALLCONTROL = "callcontrol.billing.com"
VHOSTS = ((PORTASIP, "admin"), (CALLCONTROL, "account"))


@pytest.mark.parametrize("fast_path", [True, False])
def test_portasip_api_calls_reach_the_owner_of_the_account(tmp_path: Path, fast_path: bool) -> None:
    async def main() -> None:
        extra = f"fast_path = {str(fast_path).lower()}\n"
        async with ApiEnv(tmp_path, ROWS, extra_api=extra, vhosts=VHOSTS) as env:
            method = "SIPStatus/get_sip_status"
            # credentials on each call (no session): the account's owner
            for params, system in (
                ({"i_account": 202}, "source"),
                ({"i_account": 206}, "target"),
                ({"id": "200001"}, "target"),  # "id" names an account in Account only
                ({"account_info": {"i_account": 203}}, "source"),
                ({}, "target"),
            ):
                for _ in range(2):  # the second on a kept-alive connection
                    env.clear_logs()
                    st, doc, _ = await env.call(PORTASIP, method, params, ADMIN_CREDS)
                    assert st == 500 and doc["faultcode"] == "Client.Request.unknown_method"
                    assert env.served_by(method) == [system], (params, env.served_by(method))
                    # the call reached the system as it was sent
                    got = (env.source.log + env.target.log)[-1]
                    assert got["params"] == params
            # a session opened through the PortaSIP vhost is a twin: each system its own
            st, sess, _ = await env.call(PORTASIP, "Session/login", ADMIN_CREDS)
            assert st == 200
            auth = {"session_id": sess["session_id"]}
            for iacc, system in ((201, "source"), (207, "target")):
                env.clear_logs()
                st, doc, _ = await env.call(
                    PORTASIP, "Account/get_account_info", {"i_account": iacc}, auth
                )
                assert st == 200 and doc["account_info"]["i_account"] == iacc
                assert env.served_by("Account/get_account_info") == [system]
            # a list without an owner is merged, with the bearer token too
            st, doc, _ = await env.call(
                PORTASIP,
                "Account/get_account_list",
                {"get_total": 1, "offset": 2, "limit": 3},
                headers={"Authorization": f"Bearer {sess['access_token']}"},
            )
            assert [a["i_account"] for a in doc["account_list"]] == [203, 204, 205]
            assert doc["total"] == 7
            if fast_path:
                assert env.api.metrics["fast_path"] > 0
            else:
                assert env.api.metrics.get("fast_path", 0) == 0

    run(main)


@pytest.mark.parametrize("fast_path", [True, False])
def test_callcontrol_calls_follow_the_account_session(tmp_path: Path, fast_path: bool) -> None:
    async def main() -> None:
        extra = f"fast_path = {str(fast_path).lower()}\n"
        async with ApiEnv(tmp_path, ROWS, extra_api=extra, vhosts=VHOSTS) as env:
            method = "CallControl/make_call"
            call = {"caller": "200002", "callee": "16660005"}
            for login, system in (("200002", "source"), ("200006", "target")):
                st, sess, _ = await env.call(
                    CALLCONTROL, "Session/login", {"login": login, "password": "secret"}
                )
                assert st == 200, sess
                for how in (
                    {"auth": {"session_id": sess["session_id"]}},
                    {"auth": {"access_token": sess["access_token"]}},
                    {"headers": {"Authorization": f"Bearer {sess['access_token']}"}},
                    {"as_json": True, "auth": {"session_id": sess["session_id"]}},
                ):
                    env.clear_logs()
                    kw: dict[str, Any] = dict(how)
                    st, doc, _ = await env.call(CALLCONTROL, method, call, **kw)
                    assert env.served_by(method) == [system], (login, how)
                    assert doc["faultcode"] == "Client.Request.unknown_method"
                # the session's own calls there work too
                st, doc, _ = await env.call(
                    CALLCONTROL,
                    "Account/get_account_info",
                    {},
                    {"session_id": sess["session_id"]},
                )
                assert st == 200 and doc["account_info"]["id"] == login, json.dumps(doc)
            # login and password on each call: the account's owner
            env.clear_logs()
            st, doc, _ = await env.call(
                CALLCONTROL, method, call, {"login": "200003", "password": "secret"}
            )
            assert env.served_by(method) == ["source"]

    run(main)
