"""Redirects name the public host, never a back end (nginx's ``proxy_redirect default``).

A back end builds absolute URLs from its own name (dsbc sends it its own Host), so a
Location or Refresh naming it must become the public host's: by scheme, host and port
in any case, the default port written or not, and with the vhost's base path taken off;
a URL that only starts with the back end's text (another port, another host) is not
its.  A cookie's Path under the base path loses it too (nginx's ``proxy_cookie_path``).  Both paths (fast path and aiohttp) give the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from api_proxy.h1relay import backend_bases, public_cookie, public_refresh, public_url
from api_proxy.router import DictRouter, ProxySettings, make_vhost
from api_proxy.server import ApiProxy
from tests.test_api_fastpath import read_answer, run

PUB = "http://www.pub.example"
BASES = backend_bases(["https://mr100.example:8444/portal/", "http://10.0.0.1"])


@pytest.mark.parametrize(
    ("location", "public"),
    [
        ("https://mr100.example:8444/portal/home?a=1", f"{PUB}/home?a=1"),
        ("https://mr100.example:8444/portal", PUB),
        ("https://MR100.Example:8444/portal/x", f"{PUB}/x"),
        ("HTTPS://mr100.example:8444/portal/x", f"{PUB}/x"),
        ("https://mr100.example:8444/portalx/y", "https://mr100.example:8444/portalx/y"),
        ("https://mr100.example:8444/other", "https://mr100.example:8444/other"),
        ("http://10.0.0.1/x", f"{PUB}/x"),
        ("http://10.0.0.1:80/x", f"{PUB}/x"),
        ("http://10.0.0.1", PUB),
        ("http://10.0.0.1?q=1", f"{PUB}?q=1"),
        ("http://10.0.0.10/x", "http://10.0.0.10/x"),  # another host whose name starts alike
        ("http://10.0.0.1:8080/x", "http://10.0.0.1:8080/x"),  # another port
        ("https://10.0.0.1/x", "https://10.0.0.1/x"),  # another scheme
        ("/home", "/home"),
        ("home", "home"),
        ("mailto:a@b", "mailto:a@b"),
        ("", ""),
    ],
)
def test_public_url(location: str, public: str) -> None:
    assert public_url(location, BASES, PUB) == public


def test_public_refresh() -> None:
    assert public_refresh("0; url=http://10.0.0.1/x", BASES, PUB) == f"0; url={PUB}/x"
    assert public_refresh("5;URL='http://10.0.0.1/x'", BASES, PUB) == f"5;URL='{PUB}/x'"
    assert public_refresh("5", BASES, PUB) == "5"
    assert public_refresh("0; url=/x", BASES, PUB) == "0; url=/x"


@pytest.mark.parametrize(
    ("cookie", "public"),
    [
        ("s=1; Path=/portal; HttpOnly", "s=1; Path=/; HttpOnly"),
        ("s=1; path=/portal/app; Domain=mr100.example", "s=1; path=/app"),
        ("s=1; Path=/", "s=1; Path=/"),
        ("s=1; Path=/portalx", "s=1; Path=/portalx"),
        ("s=1; Domain=mr100.example; Path=/x", "s=1; Path=/x"),
        ("s=1", "s=1"),
    ],
)
def test_public_cookie(cookie: str, public: str) -> None:
    assert public_cookie(cookie, BASES) == public


@contextlib.asynccontextmanager
async def backend() -> AsyncIterator[str]:
    """A back end that redirects to ``?to=``, as a Location and a Refresh header."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        to = request.query["to"]
        headers = {"Location": to, "Refresh": f"0; url={to}", "Set-Cookie": "s=1; Path=/sc"}
        return web.Response(status=302, headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("fast", [True, False])
def test_redirects_naming_a_back_end_name_the_public_host(fast: bool) -> None:
    async def main() -> None:
        async with backend() as origin:
            settings = ProxySettings(
                listen=[("127.0.0.1", 0)],
                vhosts=[make_vhost("www.pub.example", "customer", origin + "/sc", origin + "/sc")],
                fast_path=fast,
            )
            proxy = ApiProxy(settings, DictRouter())
            await proxy.start()
            try:
                host, port = proxy.addresses[0]
                shout = origin.replace("http://", "HTTP://")
                cases = [
                    (f"{origin}/sc/home", f"{PUB}/home"),  # the base path taken off
                    (f"{shout}/sc/x?y=1", f"{PUB}/x?y=1"),  # any case
                    (f"{origin}1/x", f"{origin}1/x"),  # not the back end: left alone
                ]
                for to, want in cases:
                    r, w = await asyncio.open_connection(host, port)
                    w.write(f"GET /p?to={to} HTTP/1.1\r\nHost: www.pub.example\r\n\r\n".encode())
                    status, headers, _ = await asyncio.wait_for(read_answer(r), 10)
                    w.close()
                    assert status.startswith(b"HTTP/1.1 302"), status
                    assert f"Location: {want}".encode() in headers, (to, headers)
                    assert f"Refresh: 0; url={want}".encode() in headers, (to, headers)
                    # the browser sends the session cookie back to the public paths
                    assert b"Set-Cookie: s=1; Path=/" in headers, headers
                assert proxy.metrics["fast_path"] == (3 if fast else 0)
            finally:
                await proxy.stop()

    run(main)


def test_a_client_without_host_is_redirected_to_the_port_it_reached() -> None:
    """An HTTP/1.0 phone that sends no Host: the redirect names the address and port it
    connected to (aiohttp's request.host is the bare address: the phone went to port 80)."""

    async def main() -> None:
        async with backend() as origin:
            settings = ProxySettings(
                listen=[("127.0.0.1", 0)], vhosts=[make_vhost("*", "cpe", origin, origin)]
            )
            proxy = ApiProxy(settings, DictRouter())
            await proxy.start()
            try:
                host, port = proxy.addresses[0]
                r, w = await asyncio.open_connection(host, port)
                w.write(f"GET /y000000000028.cfg?to={origin}/next HTTP/1.0\r\n\r\n".encode())
                _, headers, _ = await asyncio.wait_for(read_answer(r), 10)
                w.close()
                assert f"Location: http://{host}:{port}/next".encode() in headers, headers
            finally:
                await proxy.stop()

    run(main)
