"""What the systems answer, as real deployments send it: gzipped by a compressing web
server in front of the billing system (nginx ``gzip on``).

dsbc reads some answers itself (a login's session, a refusal, a list page to merge, a
created id); a client that accepts gzip (aiohttp, requests, curl --compressed, browsers)
must get the same dispatching as one that does not."""

from __future__ import annotations

from pathlib import Path

from tests.test_api_admin import ADMIN_CREDS, ROWS
from tests.test_api_support import ADMIN, CUSTOMER, ApiEnv, run


def test_gzipping_systems_still_merge_record_and_remember(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS, compress=True) as env:
            gz = {"Accept-Encoding": "gzip, deflate"}
            # the emulators do gzip for such a client
            async with env.http.post(
                f"{env.source.url}/rest/Session/login",
                data={"params": '{"login": "admin", "password": "admin"}'},
                headers=gz,
                auto_decompress=False,
            ) as r:
                assert r.headers.get("Content-Encoding") == "gzip"
            st, sess, hdrs = await env.call(ADMIN, "Session/login", ADMIN_CREDS, headers=gz)
            assert st == 200, sess
            auth = {"session_id": sess["session_id"]}
            # the twin session was made: the list is merged over both systems
            st, doc, _ = await env.call(
                ADMIN, "Customer/get_customer_list", {"get_total": 1, "offset": 1, "limit": 4},
                auth, headers=gz,
            )
            assert st == 200, doc
            assert [c["i_customer"] for c in doc["customer_list"]] == [2, 3, 4, 5]
            assert doc["total"] == 7
            # a create is recorded in the store
            st, _, hdrs = await env.call(
                ADMIN, "Customer/add_customer", {"customer_info": {"login": "zipped"}}, auth,
                headers=gz,
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR115"
            assert env.store.decide("login", "zipped").system == "target"
            # a source customer's login is remembered: its next call goes straight there
            env.clear_logs()
            st, cs, hdrs = await env.call(
                CUSTOMER, "Session/login", {"login": "user2", "password": "secret"}, headers=gz
            )
            assert st == 200 and hdrs["X-Billing-System"] == "MR100"
            env.clear_logs()
            st, info, hdrs = await env.call(
                CUSTOMER, "Customer/get_customer_info", {}, {"session_id": cs["session_id"]},
                headers=gz,
            )
            assert st == 200 and info["customer_info"]["i_customer"] == 2
            assert env.served_by("Customer/get_customer_info") == ["source"]

    run(main)
