"""The fast path (api_proxy/fastpath.py) and the aiohttp path answer alike, through sockets.

The same raw requests go through one dispatcher with ``settings.fast_path`` on, then
off (every connection handed to aiohttp at once); a scripted back end records what
reached it.  Status lines, headers (but Date), bodies and the upstream requests must be
the same, and the first run must really have used the fast path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop

from api_proxy.records import session_key
from api_proxy.router import DictRouter, ProxySettings, SessionRecord, make_vhost
from api_proxy.server import ApiProxy

TOKEN = "tok-123"
JSON = b'{"params": {"i_account": 4242}}'


def run(fn: Callable[[], Awaitable[None]], loop: str = "asyncio") -> None:
    if loop == "uvloop":
        uvloop.run(asyncio.wait_for(fn(), 60))
    else:
        asyncio.run(asyncio.wait_for(fn(), 60))


class Backend:
    """A scripted back end: the answer depends on the path; every request is logged."""

    def __init__(self) -> None:
        self.log: list[bytes] = []
        self.conns = 0
        self.server: asyncio.Server | None = None
        self.origin = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.origin = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.conns += 1
        seen: dict[str, int] = {}
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await r.readexactly(length) if length else b""
                self.log.append(head + body)
                path = head.split(b" ")[1].decode()
                seen[path] = seen.get(path, 0) + 1
                if path.startswith("/stale") and seen[path] == 2:
                    w.close()  # gone between two requests: the second was sent, no answer
                    return
                if path.startswith("/slow"):
                    await asyncio.sleep(5)
                    return
                w.write(self.answer(path, body))
                await w.drain()
                if path.startswith("/until-close"):
                    w.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    def answer(self, path: str, body: bytes) -> bytes:
        if path.startswith("/chunked"):
            return (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                b"X-Up: 1\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
            )
        if path.startswith("/until-close"):
            return b"HTTP/1.1 200 OK\r\nX-Up: 2\r\n\r\nall of it until the close"
        if path.startswith("/empty"):
            return b"HTTP/1.1 204 No Content\r\nX-Up: 3\r\n\r\n"
        if path.startswith("/redirect"):
            return (
                f"HTTP/1.1 302 Found\r\nLocation: {self.origin}/next?a=1\r\n"
                "Set-Cookie: s=1; Domain=backend.example; Path=/\r\n"
                "Connection: close, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
        if path.startswith("/lf-head"):  # bare LF line ends (RFC 9112 2.2 lets a recipient take them)
            return b"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 5\nX-Up: 4\n\nlf ok"
        if path.startswith("/big-field"):  # a 20 kB header: over aiohttp's 8190 default
            return b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 20000 + b"\r\nContent-Length: 2\r\n\r\nok"
        if path.startswith("/huge-head"):  # a head over fastpool.MAX_RESPONSE_HEAD, in one write
            return b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 70000 + b"\r\nContent-Length: 2\r\n\r\nok"
        if path.startswith("/cl-te"):  # both framings: RFC 9112 6.3 "ought to be handled as an error"
            return (
                b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nok\r\n0\r\n\r\n"
            )
        if path.startswith("/nocontenttype"):
            return b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc"
        doc = b'{"echo": %d, "path": "%b"}' % (len(body), path.encode())
        return (
            b"HTTP/1.1 200 OK\r\nServer: backend\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(doc), doc)
        )


async def read_answer(r: asyncio.StreamReader) -> tuple[bytes, list[bytes], bytes]:
    """(status line, header lines without Date, body) of one answer."""
    head = await r.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    headers = [h for h in lines[1:] if not h.lower().startswith(b"date:")]
    low = [h.lower() for h in lines[1:]]
    body = b""
    status = int(lines[0].split(b" ")[1])
    if status in (204, 304) or 100 <= status < 200:
        pass
    elif b"transfer-encoding: chunked" in low:
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            body += await r.readexactly(size)
            await r.readexactly(2)
            if size == 0:
                break
    else:
        cl = [h for h in low if h.startswith(b"content-length:")]
        body = await r.readexactly(int(cl[0].split(b":")[1])) if cl else await r.read()
    return lines[0], headers, body


def post(path: str, body: bytes = JSON, extra: str = "", host: str = "api.example") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {TOKEN}\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: api.example\r\n{extra}\r\n".encode()


# each case: the requests written on one connection (one write each) and how many answers
CASES: list[tuple[list[bytes], int]] = [
    ([post("/rest/Account/get_account_info")], 1),
    ([post("/rest/Account/get_account_info", extra="X-Forwarded-For: 10.1.1.1\r\n")], 1),
    ([post("/rest/Account/get_account_info", extra="Connection: close\r\n")], 1),
    ([get("/chunked")], 1),
    ([get("/until-close")], 1),
    ([get("/empty")], 1),
    ([get("/lf-head")], 1),
    ([get("/big-field")], 1),
    ([get("/huge-head")], 1),
    ([get("/cl-te")], 1),
    ([get("/redirect")], 1),
    ([post("/nocontenttype", b"")], 1),
    ([get("/page?x=1&y=%20", "Cookie: a=1; b=2\r\nX-Real-IP: 1.2.3.4\r\n")], 1),
    # keep-alive: three in a row, then pipelined (two in one write)
    ([post("/rest/Account/get_account_info")] * 3, 3),
    ([post("/rest/Account/get_account_info") + get("/chunked")], 2),
    # a request the fast path hands over (a login), then the common case on the same connection
    ([post("/rest/Session/login", b'{"params": {"login": "a", "password": "b"}}'), get("/x")], 2),
    # the back end closed the kept-alive connection: GET is sent again, POST is not
    ([get("/stale-get"), get("/stale-get")], 2),
    ([post("/stale-post"), post("/stale-post")], 2),
    # HTTP/1.0 and Expect go the aiohttp way from the first request
    ([b"GET /x HTTP/1.0\r\nHost: api.example\r\n\r\n"], 1),
    # a client behind two proxies that each added a line: both kept, then the client's address
    ([get("/xff", "X-Forwarded-For: 10.1.1.1\r\nX-Forwarded-For: 10.2.2.2, 10.3.3.3\r\n")], 1),
]


@contextlib.asynccontextmanager
async def proxy_to(origin: str, **settings: Any) -> AsyncIterator[ApiProxy]:
    """A started ApiProxy whose one vhost has ``origin`` as both systems, with the client
    session ``TOKEN`` on the source."""
    router = DictRouter()
    router.put_session(SessionRecord(key=session_key("at", TOKEN), system="source", expires_at=4e9))
    proxy = ApiProxy(
        ProxySettings(
            listen=[("127.0.0.1", 0)], vhosts=[make_vhost("*", "customer", origin, origin)], **settings
        ),
        router,
    )
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def through(fast: bool) -> tuple[list[Any], list[bytes], dict[str, int]]:
    be = Backend()
    await be.start()
    answers: list[Any] = []
    try:
        async with proxy_to(be.origin, timeout=1.0, fast_path=fast) as proxy:
            host, port = proxy.addresses[0]
            for requests, count in CASES:
                r, w = await asyncio.open_connection(host, port, limit=1 << 20)
                got = []
                for req in requests:  # one answer each, or all of them after a pipelined write
                    w.write(req)
                    for _ in range(count if len(requests) == 1 else 1):
                        got.append(await read_answer(r))
                answers.append(got)
                w.close()
    finally:
        await be.stop()
    upstream = [
        b"\r\n".join(line for line in req.split(b"\r\n") if not line.startswith(b"Host: "))
        for req in be.log
    ]
    return answers, upstream, dict(proxy.metrics)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_fast_path_and_aiohttp_path_answer_alike(loop: str) -> None:
    async def main() -> None:
        fast, fast_up, fast_m = await through(True)
        slow, slow_up, slow_m = await through(False)
        for case, a, b in zip(CASES, fast, slow, strict=True):
            assert a == b, case
        assert fast_up == slow_up
        assert fast_m["fast_path"] >= 12 and slow_m["fast_path"] == 0
        assert fast_m["handed_over"] >= 2
        for name in ("requests", "to_source", "to_target", "faults", "backend_errors"):
            assert fast_m[name] == slow_m[name], name
        # what the cases show: the pieces a reader would look for
        assert fast[3][0][2] == b"hello, world" and fast[4][0][2] == b"all of it until the close"
        # a back end's answer with bare LF line ends is taken (not waited on until the
        # timeout), a 20 kB header is relayed, a head over 64 kB is a fault, on both paths
        assert fast[6][0][2] == b"lf ok" and b"X-Up: 4" in fast[6][0][1]
        assert fast[7][0][0] == b"HTTP/1.1 200 OK" and fast[7][0][2] == b"ok"
        assert fast[8][0][0] == b"HTTP/1.1 500 Internal Server Error"
        assert b"backend_unavailable" in fast[8][0][2]
        assert b"backend_unavailable" in fast[9][0][2]  # Content-Length and chunked
        status, headers, _ = fast[10][0]
        assert status == b"HTTP/1.1 302 Found"
        assert b"Location: http://api.example/next?a=1" in headers
        assert b"Set-Cookie: s=1; Path=/" in headers
        assert not any(h.lower().startswith((b"x-private", b"keep-alive")) for h in headers)
        assert [a[0] for a in fast[16]] == [b"HTTP/1.1 200 OK"] * 2  # GET sent again
        assert fast[17][1][0] == b"HTTP/1.1 500 Internal Server Error"  # POST is not
        assert b"backend_unavailable" in fast[17][1][2]
        xff = [h for up in fast_up for h in up.split(b"\r\n") if h.startswith(b"X-Forwarded-For: 10.1")]
        assert xff[-1] == b"X-Forwarded-For: 10.1.1.1, 10.2.2.2, 10.3.3.3, 127.0.0.1"

    run(main, loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_back_end_that_hangs_on_a_reused_connection_times_out(loop: str) -> None:
    """A kept-alive upstream connection idle for longer than ``timeout`` (its timer then
    waits the keep-alive time) must still time the next request out after ``timeout``."""

    async def main() -> None:
        be = Backend()
        await be.start()
        try:
            async with proxy_to(be.origin, timeout=0.3) as proxy:
                r, w = await asyncio.open_connection(*proxy.addresses[0])
                w.write(get("/x"))
                assert (await read_answer(r))[0] == b"HTTP/1.1 200 OK"
                await asyncio.sleep(0.6)  # the upstream connection's timer fired while idle
                start = asyncio.get_running_loop().time()
                w.write(get("/slow"))  # the back end reads it and never answers (for 5 s)
                status, _, body = await read_answer(r)
                took = asyncio.get_running_loop().time() - start
                assert status == b"HTTP/1.1 500 Internal Server Error" and b"timed out" in body
                assert took < 1.5, took
                assert be.conns == 1 and proxy.metrics["fast_path"] == 2
                w.close()
        finally:
            await be.stop()

    run(main, loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_timeouts_shorter_than_the_loop_timer_resolution_still_fire(loop: str) -> None:
    """uvloop answers a deadline less than 0.5 ms away with a plain Handle (no ``when()``):
    a back end's silence and a client's missing body must still get their faults."""

    async def main() -> None:
        be = Backend()
        await be.start()
        try:
            async with proxy_to(be.origin, timeout=0.0002, body_timeout=0.0002) as proxy:
                r, w = await asyncio.open_connection(*proxy.addresses[0])
                w.write(get("/slow"))  # the back end reads it and never answers
                status, _, body = await asyncio.wait_for(read_answer(r), 3)
                assert status == b"HTTP/1.1 500 Internal Server Error" and b"timed out" in body
                w.close()
                r, w = await asyncio.open_connection(*proxy.addresses[0])
                w.write(post("/rest/Account/get_account_info")[:-5])  # the body never ends
                status, _, body = await asyncio.wait_for(read_answer(r), 3)
                assert status == b"HTTP/1.1 500 Internal Server Error" and b"no body data" in body
                w.close()
        finally:
            await be.stop()

    run(main, loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_back_end_that_closes_every_new_connection_gets_a_fault(loop: str) -> None:
    """A partition (a relay that accepts, then closes at once): the close can come before
    the pool has taken its new connection; the request must still get its fault."""

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            async with proxy_to(origin, timeout=1.0) as proxy:
                r, w = await asyncio.open_connection(*proxy.addresses[0])
                for _ in range(20):
                    w.write(post("/rest/Account/get_account_info"))
                    status, _, body = await asyncio.wait_for(read_answer(r), 3)
                    assert status == b"HTTP/1.1 500 Internal Server Error", status
                    assert b"backend_unavailable" in body
                assert proxy.metrics["fast_path"] == 20
                w.close()
        finally:
            server.close()

    run(main, loop)
