"""What the systems answer, as real deployments send it: gzipped by a compressing web
server in front of the billing system (nginx ``gzip on``).

dsbc reads some answers itself (a login's session, a refusal, a list page to merge, a
created id); a client that accepts gzip (aiohttp, requests, curl --compressed, browsers)
must get the same dispatching as one that does not."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from tests.test_api_admin import ADMIN_CREDS, ROWS
from tests.test_api_support import ADMIN, CUSTOMER, ApiEnv, run


@asynccontextmanager
async def target_gateway_page(env: ApiEnv) -> AsyncIterator[dict[str, int]]:
    """The target's application stopped behind its web server: its port answers every
    request with an HTML page of the status set in the yielded dict (``code``)."""
    port = int(env.target.url.rsplit(":", 1)[1])
    await env.target.stop()
    status = {"code": 502}

    async def gateway(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status["code"], text="<html>down</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{p:.*}", gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield status
    finally:
        await runner.cleanup()


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
                ADMIN,
                "Customer/get_customer_list",
                {"get_total": 1, "offset": 1, "limit": 4},
                auth,
                headers=gz,
            )
            assert st == 200, doc
            assert [c["i_customer"] for c in doc["customer_list"]] == [2, 3, 4, 5]
            assert doc["total"] == 7
            # a create is recorded in the store
            st, _, hdrs = await env.call(
                ADMIN,
                "Customer/add_customer",
                {"customer_info": {"login": "zipped"}},
                auth,
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
                CUSTOMER,
                "Customer/get_customer_info",
                {},
                {"session_id": cs["session_id"]},
                headers=gz,
            )
            assert st == 200 and info["customer_info"]["i_customer"] == 2
            assert env.served_by("Customer/get_customer_info") == ["source"]

    run(main)


def test_a_target_behind_a_web_server_with_its_application_down(tmp_path: Path) -> None:
    """The target's web server answers 502 / 503 / 504 (its application is stopped): a
    login dsbc does not know must still reach the source, as when the target does not
    answer at all; a login the source refuses then gets the fault naming the target."""

    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env, target_gateway_page(env) as status:
            for code in (502, 503, 504):
                status["code"] = code
                st, sess, hdrs = await env.call(
                    CUSTOMER, "Session/login", {"login": "user1-x", "password": "secret"}
                )
                assert st == 500 and sess["faultcode"] == (
                    "Server.Dispatcher.backend_unavailable"
                ), (code, sess)
                assert "target" in sess["faultstring"]
                # a session of the source (known to nobody yet) is found there
                async with env.http.post(
                    f"{env.source.url}/rest/Session/login",
                    data={"params": '{"login": "user2", "password": "secret"}'},
                ) as r:
                    sid = (await r.json())["session_id"]
                st, info, hdrs = await env.call(
                    CUSTOMER, "Customer/get_customer_info", {}, {"session_id": sid}
                )
                assert st == 200 and hdrs["X-Billing-System"] == "MR100", (code, info)

    run(main)


def test_a_merged_list_with_one_system_failing_is_a_fault_naming_it(tmp_path: Path) -> None:
    """One system's page of a merged list is a 502 page (its application stopped) or
    some other answer that is neither a list nor a fault: the client gets a fault in the
    billing API's shape naming that system, not an HTML page labelled JSON."""

    async def main() -> None:
        async with ApiEnv(tmp_path, ROWS) as env:
            _, sess, _ = await env.call(ADMIN, "Session/login", ADMIN_CREDS)
            auth = {"session_id": sess["session_id"]}
            async with target_gateway_page(env) as status:
                for code, reason in (
                    (502, "backend_unavailable"),
                    (404, "bad_backend_answer"),
                ):
                    status["code"] = code
                    async with env.http.post(
                        f"{env.url}/rest/Customer/get_customer_list",
                        data={"params": "{}", "auth_info": json.dumps(auth)},
                        headers={"Host": ADMIN},
                    ) as r:
                        assert r.status == 500 and r.content_type == "application/json"
                        fault = await r.json()
                    assert fault["faultcode"] == f"Server.Dispatcher.{reason}", (code, fault)
                    assert "target" in fault["faultstring"], fault

    run(main)


BROKEN_ANSWERS = {
    # aiohttp's path refused to write it: a traceback and internal_error
    "control character": b"HTTP/1.1 200 OK\r\nX-Note: a\x01b\r\nContent-Length: 2\r\n\r\nok",
    # the fast path aborted the connection with nothing written (an empty reply)
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BROKEN_ANSWERS))
def test_a_broken_answer_is_a_fault_on_both_paths(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """Found by an audit: two answers of a broken back end that the two API paths told
    the client differently.  A header holding a control character (``X-Note: a\\x01b``)
    got the fast path's ``backend_unavailable`` fault, but on the aiohttp path (HTTP/1.0,
    HEAD, uploads...) aiohttp refused to write it ("Forbidden control character detected
    in headers"): a traceback in the log and an ``internal_error`` fault.  A chunked body
    whose first chunk size is no hex number got aiohttp's fault, but the fast path closed
    the connection with nothing sent (curl: "Empty reply from server"), though it had
    written nothing of the answer yet.  Both paths now answer ``backend_unavailable``."""
    import asyncio
    import logging

    from tests.test_api_badinput import raw, still_fine

    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            port = int(env.target.url.rsplit(":", 1)[1])
            await env.target.stop()

            async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    while await reader.readuntil(b"\r\n\r\n"):
                        writer.write(BROKEN_ANSWERS[case])
                except (asyncio.IncompleteReadError, ConnectionError):
                    writer.close()

            server = await asyncio.start_server(answer, "127.0.0.1", port)
            try:
                for version in (b"1.1", b"1.0"):  # the fast path, then aiohttp's
                    got = await raw(env, b"GET /home HTTP/" + version + b"\r\nHost: "
                                    + CUSTOMER.encode() + b"\r\nConnection: close\r\n\r\n", wait=3.0)
                    head, _, body = got.partition(b"\r\n\r\n")
                    assert head.split(b" ")[1] == b"500", got
                    assert json.loads(body)["faultcode"] == "Server.Dispatcher.backend_unavailable", got
            finally:
                server.close()
            assert env.api.proxy.metrics["internal_errors"] == 0
            # the source (alice's login) still works
            await still_fine(env)

    with caplog.at_level(logging.DEBUG):
        run(main)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
