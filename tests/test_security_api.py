"""The API dispatcher on the public address (issue #7): sessions stay with their customer
and their system, slow clients are dropped, bodies over the limit are refused, TLS is
1.2 at least.  Real HTTP through dsbc's dispatcher to the two emulated billing systems.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.test_api_support import ADMIN, CUSTOMER, ApiEnv, run

LOGIN = "Session/login"
DAVE = {"i_customer": 4, "i_account": 104}  # a target customer (sample_rows)


def no_dave(doc: Any) -> bool:
    text = json.dumps(doc) if not isinstance(doc, bytes) else doc.decode("utf-8", "replace")
    return "dave" not in text and '"i_customer": 4' not in text and "100004" not in text


def test_a_customer_session_never_reaches_the_other_customer_or_system(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            st, sess, _ = await env.call(CUSTOMER, LOGIN, {"login": "alice", "password": "secret"})
            assert st == 200
            sid = sess["session_id"]
            env.clear_logs()
            # alice's session naming dave's entities (dave lives on the target)
            for name, params in (
                ("Customer/get_customer_info", {"i_customer": DAVE["i_customer"]}),
                ("Account/get_account_info", {"i_account": DAVE["i_account"]}),
                ("Account/get_account_list", {"i_customer": DAVE["i_customer"]}),
                ("Invoice/get_invoice_list", {"i_customer": DAVE["i_customer"]}),
            ):
                st, doc, hdrs = await env.call(CUSTOMER, name, params, {"session_id": sid})
                assert hdrs.get("X-Billing-System") in (None, "MR100"), (name, hdrs)
                assert no_dave(doc), (name, doc)
                # the same with the access token, as JSON
                st, doc, _ = await env.call(
                    CUSTOMER, name, params, None, as_json=True,
                    headers={"Authorization": f"Bearer {sess['access_token']}"},
                )  # fmt: skip
                assert no_dave(doc), (name, doc)
            assert env.target.log == [], "a source customer's session reached the target"
            # the same session on the admin host: not an admin session anywhere
            env.clear_logs()
            st, doc, _ = await env.call(
                ADMIN,
                "Account/get_account_info",
                {"i_account": DAVE["i_account"]},
                {"session_id": sid},
            )
            assert no_dave(doc), doc
            st, doc, _ = await env.call(
                ADMIN, "Customer/get_customer_list", {}, {"session_id": sid}
            )
            assert no_dave(doc), doc
            # a made-up session id gets nobody's data from either system
            st, doc, _ = await env.call(
                CUSTOMER, "Customer/get_customer_info", {"i_customer": 4}, {"session_id": "0" * 32}
            )
            assert st == 500 and no_dave(doc), doc

    run(main)


async def _raw(url: str, chunks: list[bytes], gap: float, wait: float) -> tuple[bytes, float]:
    """Send ``chunks`` with ``gap`` seconds between them; read until dsbc closes."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    start = time.monotonic()
    out = b""
    try:
        for c in chunks:
            try:
                writer.write(c)
                await writer.drain()
            except (ConnectionError, OSError):
                break
            try:
                data = await asyncio.wait_for(reader.read(65536), gap)
            except TimeoutError:
                continue
            if not data:
                break
            out += data
        deadline = start + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(reader.read(65536), left)
            except (TimeoutError, ConnectionError):
                break
            if not data:
                break
            out += data
        return out, time.monotonic() - start
    finally:
        writer.close()


def test_slow_request_heads_are_dropped_and_bodies_are_capped(tmp_path: Path) -> None:
    async def main() -> None:
        extra = "header_timeout = 1.0\nmax_body_size = 4000\nroute_body_limit = 2048\n"
        async with ApiEnv(tmp_path, extra_api=extra) as env:
            head = (
                f"POST /rest/Session/login HTTP/1.1\r\nHost: {CUSTOMER}\r\nX-Slow: ".encode()
                + b"a" * 100
            )
            # slowloris: one octet every 0.2 s; the head is not complete 1 s after it began
            out, took = await _raw(env.url, [bytes([b]) for b in head], 0.2, 3.0)
            assert took < 4.0, f"a slow client held its connection {took:.1f} s"
            assert b"HTTP/1.1 200" not in out
            assert env.api.metrics["client_timeouts"] >= 1
            # a client that connects and says nothing is dropped as well
            out, took = await _raw(env.url, [], 0.1, 5.0)
            assert took < 3.0 and out == b""
            # a body over max_body_size is refused: 413 with the billing API's fault body
            big = b'{"params": {"login": "' + b"x" * 5000 + b'"}}'
            req = (
                f"POST /rest/Session/login HTTP/1.1\r\nHost: {CUSTOMER}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(big)}\r\n\r\n"
            ).encode() + big
            out, _ = await _raw(env.url, [req], 1.0, 2.0)
            assert out.startswith(b"HTTP/1.1 413"), out[:200]
            assert b"Server.Dispatcher.request_too_large" in out
            # and normal clients are still served
            st, _, _ = await env.call(CUSTOMER, LOGIN, {"login": "alice", "password": "secret"})
            assert st == 200

    run(main)


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_back_end_that_is_down_is_not_located_for_the_client(
    tmp_path: Path, fast_path: bool
) -> None:
    """The fault for a system that does not answer names the system, not the back end's
    address, port or TLS mode (that stays in dsbc status for the operator)."""

    async def main() -> None:
        async with ApiEnv(tmp_path, extra_api=f"fast_path = {str(fast_path).lower()}\n") as env:
            hidden = [urlsplit(env.source.url).netloc, urlsplit(env.target.url).netloc]
            await env.source.stop()
            await env.target.stop()
            st, doc, _ = await env.call(CUSTOMER, LOGIN, {"login": "alice", "password": "secret"})
            assert st == 500 and doc["faultcode"] == "Server.Dispatcher.backend_unavailable"
            async with env.http.get(f"{env.url}/", headers={"Host": CUSTOMER}) as r:
                page = (await r.read()).decode()
            for text in (json.dumps(doc), page):
                assert "not answering" in text
                for netloc in hidden:
                    assert netloc not in text and netloc.split(":")[1] not in text, text
                assert "Connect call" not in text and "ssl:" not in text, text
            backends = env.api.status()["backends"].values()
            assert any(b["last_error"] for b in backends), "the operator's copy"

    run(main)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TLSVersion.TLSv1 / TLSv1_1
def test_api_tls_is_1_2_or_newer(tmp_path: Path) -> None:
    from tests.peers.tlsca import TestCA, openssl_available

    if not openssl_available():
        pytest.skip("openssl is not installed")
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("api", ips=["127.0.0.1"])

    async def main() -> None:
        async with ApiEnv(tmp_path, extra_api=f'tls_cert = "{cert}"\ntls_key = "{key}"\n') as env:
            assert env.url.startswith("https://")
            u = urlsplit(env.url)
            ctx = ca.client_context()
            _reader, writer = await asyncio.open_connection(u.hostname, u.port, ssl=ctx)
            version = writer.get_extra_info("ssl_object").version()
            writer.close()
            assert version in ("TLSv1.2", "TLSv1.3")
            old = ca.client_context()
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.set_ciphers("ALL:@SECLEVEL=0")
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                await asyncio.open_connection(u.hostname, u.port, ssl=old)

    run(main)


def test_a_tls_client_that_stalls_in_its_handshake_is_dropped_after_header_timeout(tmp_path: Path) -> None:
    """On the HTTPS port a client that said nothing, or half a ClientHello, held its
    connection (one of max_connections_per_ip) for asyncio's 60 s handshake timeout, where
    the same client on a plain port was dropped after ``header_timeout`` (found by an
    audit)."""
    from tests.peers.tlsca import TestCA, openssl_available

    if not openssl_available():
        pytest.skip("openssl is not installed")
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("api", ips=["127.0.0.1"])
    half_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"

    async def main() -> None:
        extra = f'tls_cert = "{cert}"\ntls_key = "{key}"\nheader_timeout = 1.0\n'
        async with ApiEnv(tmp_path, extra_api=extra) as env:
            assert env.url.startswith("https://")
            for chunks in ([], [half_hello]):
                out, took = await _raw(env.url, chunks, 0.1, 8.0)
                assert took < 4.0 and out == b"", (chunks, took, out)
            # and a client that completes its handshake (slower than nothing) is served
            u = urlsplit(env.url)
            reader, writer = await asyncio.open_connection(u.hostname, u.port, ssl=ca.client_context())
            body = b'params={"login":"alice","password":"secret"}'
            writer.write(f"POST /rest/{LOGIN} HTTP/1.1\r\nHost: {CUSTOMER}\r\nContent-Type: "
                         f"application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
            writer.close()

    run(main)


def test_api_caps_hold_for_tls_clients_still_in_their_handshake(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The caps were checked once a connection's TLS handshake was done: a source that never
    finished one held any number of connections (each for header_timeout) past
    max_connections_per_ip, and a failed handshake was not counted (found by an audit)."""
    from tests.peers.tlsca import TestCA, openssl_available

    if not openssl_available():
        pytest.skip("openssl is not installed")
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.issue("api", ips=["127.0.0.1"])
    caplog.set_level(logging.INFO, logger="dsbc.tls")

    async def main() -> None:
        extra = f'tls_cert = "{cert}"\ntls_key = "{key}"\nmax_connections_per_ip = 3\nheader_timeout = 5.0\n'
        async with ApiEnv(tmp_path, extra_api=extra) as env:
            u = urlsplit(env.url)
            silent = [await asyncio.open_connection(u.hostname, u.port) for _ in range(3)]
            try:
                reader, writer = await asyncio.open_connection(u.hostname, u.port)  # the 4th
                try:
                    assert await asyncio.wait_for(reader.read(1), 2.0) == b""
                except ConnectionError:
                    pass
                except TimeoutError:
                    pytest.fail("a 4th connection in its TLS handshake was kept past max_connections_per_ip")
                writer.close()
                assert env.api.metrics["connections_refused"] >= 1
                # another address is served meanwhile; a handshake that fails is counted
                _r, w = await asyncio.open_connection(u.hostname, u.port, ssl=ca.client_context(),
                                                     local_addr=("127.0.0.3", 0))
                w.close()
                with pytest.raises(ssl.SSLError):
                    await asyncio.open_connection(u.hostname, u.port, ssl=ssl.create_default_context(),
                                                  server_hostname="localhost", local_addr=("127.0.0.4", 0))
                for _ in range(50):
                    if env.api.metrics["tls_handshake_failed"] >= 1:
                        break
                    await asyncio.sleep(0.05)
                assert env.api.metrics["tls_handshake_failed"] == 1
                assert any(r.levelname == "INFO" and "API TLS handshake from 127.0.0.4 failed" in r.getMessage()
                           for r in caplog.records), caplog.records  # was at debug only
            finally:
                for _, w in silent:
                    w.close()

    run(main)


def test_api_connection_caps_in_total_and_per_source(tmp_path: Path) -> None:
    async def open_from(url: str, ip: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        u = urlsplit(url)
        return await asyncio.open_connection(u.hostname, u.port, local_addr=(ip, 0))

    async def closed(reader: asyncio.StreamReader, wait: float = 1.0) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), wait) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    async def main() -> None:
        extra = "max_connections = 5\nmax_connections_per_ip = 3\nheader_timeout = 30.0\n"
        async with ApiEnv(tmp_path, extra_api=extra) as env:
            mine = [await open_from(env.url, "127.0.0.6") for _ in range(3)]
            assert not any([await closed(r, 0.3) for r, _ in mine])
            fourth = await open_from(env.url, "127.0.0.6")
            assert await closed(fourth[0])  # over the cap per source
            others = [await open_from(env.url, "127.0.0.7") for _ in range(2)]
            sixth = await open_from(env.url, "127.0.0.8")
            assert await closed(sixth[0])  # over the cap in total
            assert env.api.metrics["connections_refused"] == 2
            for _, w in [*mine, *others, fourth, sixth]:
                w.close()
            await asyncio.sleep(0.3)
            # the slots are free again: served as usual
            st, _, _ = await env.call(CUSTOMER, LOGIN, {"login": "alice", "password": "secret"})
            assert st == 200

    run(main)
