"""Bad input on the fast path's listener: the same faults as the aiohttp path, no leaks.

Garbage and oversized heads and bad Content-Lengths are handed to aiohttp, which answers
them as before; a stalled body, a silent or unreachable back end are answered by the
fast path itself, with the octets the aiohttp path gives (Date aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any, Self

import pytest

from api_proxy.records import session_key
from api_proxy.router import DictRouter, ProxySettings, SessionRecord, make_vhost
from api_proxy.server import ApiProxy
from tests.peers.net import free_port
from tests.test_api_fastpath import TOKEN, Backend, get, post, read_answer, run


class Env:
    def __init__(self, fast: bool, origin: str = "", **settings: Any) -> None:
        self.fast = fast
        self.origin = origin
        self.settings = settings
        self.be = Backend()

    async def __aenter__(self) -> Self:
        await self.be.start()
        router = DictRouter()
        router.put_session(
            SessionRecord(key=session_key("at", TOKEN), system="source", expires_at=4e9)
        )
        origin = self.origin or self.be.origin
        kw: dict[str, Any] = {"timeout": 1.0, "body_timeout": 0.3, **self.settings}
        s = ProxySettings(
            listen=[("127.0.0.1", 0)],
            vhosts=[make_vhost("*", "customer", origin, origin)],
            fast_path=self.fast,
            **kw,
        )
        self.proxy = ApiProxy(s, router)
        await self.proxy.start()
        self.host, self.port = self.proxy.addresses[0]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.proxy.stop()
        await self.be.stop()

    async def raw(self, data: bytes, wait: float = 3.0) -> bytes:
        """Write ``data`` and read until the dispatcher closes (or ``wait`` passes)."""
        r, w = await asyncio.open_connection(self.host, self.port)
        w.write(data)
        out = b""
        try:
            while True:
                chunk = await asyncio.wait_for(r.read(65536), wait)
                if not chunk:
                    break
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        w.close()
        return out

    async def fine(self) -> None:
        r, w = await asyncio.open_connection(self.host, self.port)
        w.write(post("/rest/Account/get_account_info"))
        status, _, body = await read_answer(r)
        w.close()
        assert status == b"HTTP/1.1 200 OK" and b'"echo": 31' in body


def fault(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["faultcode"]


def without_date(answer: bytes) -> bytes:
    return b"\r\n".join(x for x in answer.split(b"\r\n") if not x.startswith(b"Date: "))


BIG_HEAD = b"GET / HTTP/1.1\r\nHost: api.example\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
MANY = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n"
BAD_CL = [
    b"POST /x HTTP/1.1\r\nHost: api.example\r\nContent-Length: 12abc\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: api.example\r\nContent-Length: -1\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: api.example\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    (
        b"POST /x HTTP/1.1\r\nHost: api.example\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
]


def test_garbage_oversized_heads_and_bad_lengths_get_the_aiohttp_faults() -> None:
    async def main() -> None:
        answers: dict[bool, list[bytes]] = {}
        for fast in (True, False):
            async with Env(fast) as env:
                got = [
                    await env.raw(b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n"),
                    await env.raw(b"NOT HTTP AT ALL\r\n\r\n"),
                    await env.raw(BIG_HEAD),
                    await env.raw(BIG_HEAD[:17000]),  # no end of head in sight
                    await env.raw(MANY),
                    # heads that end in bare LFs: answered at once, not left to the timeout
                    await env.raw(b"GET / HTTP/1.1\nHost: api.example\n\n", wait=0.5),
                    await env.raw(b"GET / HTTP/1.1\r\nHost: api.example\n\r\n", wait=0.5),
                    *[await env.raw(x) for x in BAD_CL],
                ]
                answers[fast] = [without_date(a) for a in got]
                await env.fine()
                if fast:
                    assert env.proxy.metrics["handed_over"] >= len(got)
                assert env.proxy._conns <= 1
        assert answers[True] == answers[False]
        fast = answers[True]
        assert fault(fast[0]) == (500, "Server.Dispatcher.bad_request")
        assert fault(fast[2]) == (431, "Server.Dispatcher.request_too_large")
        assert fault(fast[4]) == (431, "Server.Dispatcher.request_too_large")  # > 128 fields
        assert fault(fast[5]) == fault(fast[6]) == (500, "Server.Dispatcher.bad_request")
        for a in fast[7:10]:
            assert fault(a) == (500, "Server.Dispatcher.bad_request"), a

    run(main)


def test_other_http_versions_get_505_and_the_absolute_form_is_taken() -> None:
    """As nginx answers (found by an audit: GET / HTTP/2.0 was relayed and answered
    "HTTP/2.0 200 OK" in HTTP/1 framing; an absolute-form target, which RFC 9112 3.2.2
    says a server MUST accept, got bad_request)."""

    async def main() -> None:
        answers: dict[bool, list[bytes]] = {}
        for fast in (True, False):
            async with Env(fast) as env:
                got = [
                    await env.raw(b"GET / HTTP/%b\r\nHost: api.example\r\n\r\n" % v)
                    for v in (b"2.0", b"0.9", b"3.0", b"9.1")
                ]
                got.append(await env.raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
                # the URI's authority is the Host; the back end gets the origin form
                absolute = post(
                    "http://API.example:8080/rest/Account/get_account_info?x=%41",
                    extra="Connection: close\r\n",
                    host="elsewhere.example",
                )
                got.append(await env.raw(absolute))
                up = env.be.log[-1]
                assert up.startswith(b"POST /rest/Account/get_account_info?x=%41 HTTP/1.1\r\n")
                assert b"\r\nX-Forwarded-Host: API.example:8080\r\n" in up, up
                # a scheme that is not HTTP's, a userinfo: still no request target
                for target in ("ftp://api.example/x", "http://user@api.example/x"):
                    got.append(await env.raw(get(target, "Connection: close\r\n")))
                answers[fast] = [without_date(a) for a in got]
                await env.fine()
        assert answers[True] == answers[False]
        a = answers[True]
        for answer in a[:5]:
            assert answer.startswith(b"HTTP/1.1 505 "), answer  # HTTP/3.0 too (was an HTTP/1.0 line)
            assert fault(answer) == (505, "Server.Dispatcher.http_version_not_supported")
            assert b"Connection: close" in answer
        assert a[0].startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
        assert b"HTTP/2.0 is not supported" in a[0] and b"HTTP/0.9" in a[1]
        assert a[5].startswith(b"HTTP/1.1 200 OK\r\n") and b'"echo": 31' in a[5]
        assert fault(a[6]) == fault(a[7]) == (500, "Server.Dispatcher.bad_request")

    run(main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_stalls_timeouts_and_unreachable_back_ends_answer_alike(loop: str) -> None:
    async def main() -> None:
        answers: dict[bool, list[bytes]] = {}
        nobody = f"http://127.0.0.1:{free_port('tcp')}"
        for fast in (True, False):
            async with Env(fast) as env:
                stalled = post("/rest/Account/get_account_info")[:-10]
                got = [
                    await env.raw(stalled),  # body_timeout: request_timeout, closed
                    await env.raw(get("/slow", "Connection: close\r\n")),  # timeout: 1 s
                ]
                await env.fine()
            async with Env(fast, origin=nobody) as env:
                got.append(await env.raw(get("/x", "Connection: close\r\n")))
            answers[fast] = [without_date(a) for a in got]
        assert answers[True] == answers[False]
        a = answers[True]
        assert fault(a[0]) == (500, "Server.Dispatcher.request_timeout")
        assert b"Connection: close" in a[0]
        assert fault(a[1]) == (500, "Server.Dispatcher.backend_unavailable")
        assert b"timed out" in a[1]
        assert fault(a[2]) == (500, "Server.Dispatcher.backend_unavailable")

    run(main, loop)


def test_a_client_gone_mid_body_costs_nothing_and_leaks_nothing() -> None:
    async def main() -> None:
        async with Env(True) as env:
            for cut in (10, 60, len(post("/rest/Account/get_account_info")) - 5):
                _r, w = await asyncio.open_connection(env.host, env.port)
                w.write(post("/rest/Account/get_account_info")[:cut])
                await w.drain()
                w.close()
            for _ in range(50):
                if env.proxy._conns == 0:
                    break
                await asyncio.sleep(0.02)
            assert env.proxy._conns == 0 and not env.proxy.fast_conns
            assert env.be.log == []  # nothing half-read was sent on
            await env.fine()
            # gone while its answer was awaited: the upstream connection is dropped
            _r, w = await asyncio.open_connection(env.host, env.port)
            w.write(get("/slow"))
            await asyncio.sleep(0.1)
            w.close()
            await asyncio.sleep(0.1)
            await env.fine()
            assert env.proxy.metrics["fast_path"] == 3

    run(main)


def test_a_pipelined_request_the_fast_path_does_not_take_is_handed_over_in_order() -> None:
    async def main() -> None:
        async with Env(True) as env:
            r, w = await asyncio.open_connection(env.host, env.port)
            expect = (
                b"POST /rest/Account/get_account_info HTTP/1.1\r\nHost: api.example\r\n"
                b"Expect: 100-continue\r\nContent-Type: application/json\r\nContent-Length: 2"
                b"\r\n\r\n{}"
            )
            w.write(post("/rest/Account/get_account_info") + expect + get("/chunked"))
            first = await read_answer(r)
            assert first[0] == b"HTTP/1.1 200 OK" and b'"echo": 31' in first[2]
            assert (await read_answer(r))[0] == b"HTTP/1.1 100 Continue"  # aiohttp's
            second = await read_answer(r)
            third = await read_answer(r)
            w.close()
            assert b'"echo": 2' in second[2] and third[2] == b"hello, world"
            m = env.proxy.metrics
            assert m["fast_path"] == 1 and m["handed_over"] == 1 and m["requests"] == 3

    run(main)


def test_a_transfer_coding_other_than_chunked_gets_501_and_is_not_sent_on() -> None:
    """``Transfer-Encoding: gzip, chunked`` (which aiohttp's parser takes): the chunked
    framing was undone and the body sent on as it came, gzip octets under no coding at
    all, since Transfer-Encoding is hop-by-hop.  nginx answers 501; so does dsbc, with
    its fault, on both paths, and the back end sees nothing."""

    async def main() -> None:
        answers: dict[bool, list[bytes]] = {}
        for fast in (True, False):
            async with Env(fast) as env:
                got = [
                    await env.raw(
                        b"POST /x HTTP/1.1\r\nHost: api.example\r\nTransfer-Encoding: %b\r\n"
                        b"\r\n3\r\nabc\r\n0\r\n\r\n" % coding
                    )
                    for coding in (b"gzip, chunked", b"deflate,Chunked", b"x-custom , chunked")
                ]
                assert env.be.log == []
                # chunked alone (any case) is relayed as ever
                r, w = await asyncio.open_connection(env.host, env.port)
                w.write(
                    b"POST /x HTTP/1.1\r\nHost: api.example\r\nTransfer-Encoding: Chunked\r\n"
                    b"\r\n3\r\nabc\r\n0\r\n\r\n"
                )
                status, _, body = await read_answer(r)
                w.close()
                assert status == b"HTTP/1.1 200 OK" and b'"echo": 3' in body
                answers[fast] = [without_date(a) for a in got]
                await env.fine()
        assert answers[True] == answers[False]
        for a in answers[True]:
            assert a.startswith(b"HTTP/1.1 501 Not Implemented\r\n"), a
            assert fault(a) == (501, "Server.Dispatcher.not_implemented")
            assert b"Connection: close" in a

    run(main)


@pytest.mark.parametrize("fast", [True, False])
def test_a_back_end_that_stops_reading_an_upload_times_out(fast: bool) -> None:
    """A streamed upload (over route_body_limit) to a back end that accepted the
    connection and stopped reading: dsbc waited for its buffers to drain for as long as
    the back end held the connection (for ever, for a hung application), where nginx
    gives up after proxy_send_timeout.  No progress for api.timeout is a time-out."""

    async def main() -> None:
        holding: list[asyncio.StreamWriter] = []

        async def hang(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            holding.append(w)  # reads nothing, answers nothing, closes nothing

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            async with Env(fast, origin=origin, timeout=1.0, body_timeout=5.0) as env:
                size = 64 << 20
                r, w = await asyncio.open_connection(env.host, env.port)
                w.write(
                    b"POST /upload HTTP/1.1\r\nHost: api.example\r\n"
                    b"Content-Type: application/pdf\r\nContent-Length: %d\r\n\r\n" % size
                )
                block = b"x" * (1 << 20)

                async def send() -> None:
                    with contextlib.suppress(ConnectionError):
                        for _ in range(size >> 20):
                            w.write(block)
                            await w.drain()

                sender = asyncio.create_task(send())
                start = asyncio.get_running_loop().time()
                status, _, body = await asyncio.wait_for(read_answer(r), 10)
                took = asyncio.get_running_loop().time() - start
                sender.cancel()
                w.close()
                assert status == b"HTTP/1.1 500 Internal Server Error", body
                assert json.loads(body)["faultcode"] == "Server.Dispatcher.backend_unavailable"
                assert b"timed out" in body
                assert took < 5, took
        finally:
            for held in holding:
                held.close()
            server.close()

    run(main)


@pytest.mark.parametrize("fast", [True, False])
def test_a_client_that_reads_none_of_its_answer_is_dropped(fast: bool) -> None:
    """A client that asks for a large answer (an invoice) and reads none of it held its
    connection and the back-end connection under it for as long as it liked: pool_size
    such clients (100 by default; one source may hold 200 connections) stalled every
    request to that system.  As nginx's send_timeout, a client that takes nothing of its
    answer for send_timeout is dropped, and the back-end connection with it."""

    async def main() -> None:
        closed = asyncio.Event()

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await r.readuntil(b"\r\n\r\n")
                    if b" /small " in head:
                        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        await w.drain()
                        continue
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 32))
                    block = b"x" * (1 << 20)
                    while True:
                        w.write(block)
                        await w.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                closed.set()
            finally:
                w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            async with Env(fast, origin=origin, pool_size=1, send_timeout=0.5) as env:
                _r, w = await asyncio.open_connection(env.host, env.port)
                w.write(get("/invoice.pdf"))  # and never read
                start = asyncio.get_running_loop().time()
                await asyncio.wait_for(closed.wait(), 10)
                took = asyncio.get_running_loop().time() - start
                assert took < 4, took
                # the one back-end connection is free again
                r2, w2 = await asyncio.open_connection(env.host, env.port)
                w2.write(get("/small"))
                status, _, body = await asyncio.wait_for(read_answer(r2), 5)
                assert status == b"HTTP/1.1 200 OK" and body == b"ok"
                assert env.proxy.metrics["client_timeouts"] == 1
                w.close()
                w2.close()
        finally:
            server.close()

    run(main)


async def slow_link_download(env: Env) -> socket.socket:
    """A client on a slow link that asked for /invoice.pdf: small buffers both ways (the
    send buffer of dsbc's accepted connections is taken over from their listener;
    loopback's would grow to MBs).  A non-blocking socket for the loop's sock_* calls."""
    for srv in env.proxy._servers:
        for sock in getattr(srv, "sockets", None) or []:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, (env.host, env.port))
    await loop.sock_sendall(client, get("/invoice.pdf"))
    return client


@pytest.mark.parametrize("fast", [True, False])
def test_a_slow_client_that_takes_its_answer_is_not_dropped(fast: bool) -> None:
    """send_timeout drops a client that takes *none* of its answer (nginx's send_timeout:
    the time between two writes), not one slower than the write buffer: a mobile client
    downloading an invoice at 20 kB/s, far too slow to empty dsbc's 64 kB write buffer
    within send_timeout, was cut off with a truncated file while it kept reading."""

    async def main() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await r.readuntil(b"\r\n\r\n")
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
                block = b"x" * (1 << 16)
                while True:
                    w.write(block)
                    await w.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            async with Env(fast, origin=origin, send_timeout=1.5) as env:
                client = await slow_link_download(env)
                loop = asyncio.get_running_loop()
                got = 0
                end = loop.time() + 5.0
                while loop.time() < end:  # 2 kB every 0.1 s
                    data = await asyncio.wait_for(loop.sock_recv(client, 2048), 3)
                    assert data, f"cut off after {got} octets"
                    got += len(data)
                    await asyncio.sleep(0.1)
                assert env.proxy.metrics["client_timeouts"] == 0
                client.close()
        finally:
            server.close()

    run(main)


def test_a_slow_client_gets_the_tail_of_a_finished_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The back end's answer was all in dsbc's write buffer (the exchange done, the
    connection idle in keep-alive) while a slow client still read it: the idle timer (75 s)
    closed the connection and threw the rest away, a mobile client got a truncated file.
    A client still taking its answer is idle only once it has it all."""
    from api_proxy import fastpath

    if not hasattr(fastpath, "__file__") or not str(fastpath.__file__).endswith(".py"):
        pytest.skip("KEEPALIVE is a compiled constant: the pure pass (DSBC_PURE_PYTHON=1) runs it")
    monkeypatch.setattr(fastpath, "KEEPALIVE", 1.0)
    size = 120_000

    async def main() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await r.readuntil(b"\r\n\r\n")
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
                await w.drain()
                await r.read()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            async with Env(True, origin=origin, send_timeout=1.5) as env:
                client = await slow_link_download(env)
                loop = asyncio.get_running_loop()
                got = b""
                while not got.endswith(b"x" * 64) or len(got) - got.find(b"\r\n\r\n") - 4 < size:
                    data = await asyncio.wait_for(loop.sock_recv(client, 4096), 3)  # 40 kB/s
                    body = len(got) - got.find(b"\r\n\r\n") - 4 if b"\r\n\r\n" in got else 0
                    assert data, f"cut off after {body} of {size} octets"
                    got += data
                    await asyncio.sleep(0.1)
                client.close()
        finally:
            server.close()

    run(main)
