"""A SIP caller over many persistent TCP connections (the TCP scenario's load generator).

sipp cannot do it: ``-t tn`` opens one connection per call and closes it when the call
ends, and once ``-max_socket`` makes calls share sockets sipp 3.6.1 breaks them ("Broken
pipe on TCP connection").  This client opens every connection first, then places calls
round-robin over them at a fixed rate: INVITE, (180), 200, ACK, BYE, 200, with ACK and
BYE sent to the 200's Contact through its Record-Route, as a phone does.  It runs in the
benchmark driver's process, never in the one being measured.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_HDR = re.compile(rb"^([A-Za-z-]+)[ \t]*:[ \t]*(.*?)\r?$", re.MULTILINE)
SDP = (
    b"v=0\r\no=bench 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n"
    b"m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


@dataclass
class CallStats:
    started: int = 0
    successful: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.reasons[why] = self.reasons.get(why, 0) + 1


class _Call:
    __slots__ = ("call_id", "caller", "conn", "done", "ftag", "n")

    def __init__(self, n: int, caller: str, conn: _Conn) -> None:
        self.n = n
        self.caller = caller
        self.conn = conn
        self.call_id = f"tcpbench-{n}-{id(conn):x}@127.0.0.2"
        self.ftag = f"f{n}"
        self.done = False


class _Conn(asyncio.Protocol):
    def __init__(self, client: TcpCaller) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.local = ("127.0.0.2", 0)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local = transport.get_extra_info("sockname")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.lost += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(buf[: i + 4])
            m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
            n = i + 4 + (int(m.group(1)) if m else 0)
            if len(buf) < n:
                return
            msg = bytes(buf[:n])
            del buf[:n]
            self.client.on_message(self, msg)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)


class TcpCaller:
    def __init__(
        self,
        proxy: tuple[str, int],
        local_ip: str,
        callers: Sequence[str],
        callee: str = "15550009999",
        timeout: float = 5.0,
    ) -> None:
        self.proxy = proxy
        self.local_ip = local_ip
        self.callers = list(callers)
        self.callee = callee
        self.timeout = timeout
        self.conns: list[_Conn] = []
        self.calls: dict[str, _Call] = {}
        self.stats = CallStats()
        self.lost = 0
        self._branch = itertools.count(1)

    async def connect(self, n: int, concurrency: int = 50) -> None:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                _, proto = await loop.create_connection(
                    lambda: _Conn(self), self.proxy[0], self.proxy[1], local_addr=(self.local_ip, 0)
                )
                self.conns.append(proto)

        await asyncio.gather(*(one() for _ in range(n)))

    def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()

    async def run(self, rate: float, calls: int) -> CallStats:
        """Place ``calls`` calls at ``rate``/s round-robin over the open connections; return
        when every call ended (or timed out)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05
        for n in range(calls):
            at = t0 + n / rate
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._start(n)
        deadline = loop.time() + self.timeout + 1
        while any(not c.done for c in self.calls.values()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for c in self.calls.values():
            if not c.done:
                c.done = True
                self.stats.fail("timeout")
        return self.stats

    def _via(self, conn: _Conn) -> str:
        return f"SIP/2.0/TCP {conn.local[0]}:{conn.local[1]};branch=z9hG4bK-tb{next(self._branch)};rport"

    def _start(self, n: int) -> None:
        live = [c for c in self.conns if not c.closed]
        if not live:
            self.stats.fail("no connection")
            return
        conn = live[n % len(live)]
        call = _Call(n, self.callers[n % len(self.callers)], conn)
        self.calls[call.call_id] = call
        self.stats.started += 1
        host, port = self.proxy
        msg = (
            f"INVITE sip:{self.callee}@{host}:{port};transport=tcp SIP/2.0\r\n"
            f"Via: {self._via(conn)}\r\n"
            f"Max-Forwards: 70\r\n"
            f"From: <sip:{call.caller}@{conn.local[0]}:{conn.local[1]}>;tag={call.ftag}\r\n"
            f"To: <sip:{self.callee}@{host}:{port}>\r\n"
            f"Call-ID: {call.call_id}\r\n"
            f"CSeq: 1 INVITE\r\n"
            f"Contact: <sip:{call.caller}@{conn.local[0]}:{conn.local[1]};transport=tcp>\r\n"
            f"Content-Type: application/sdp\r\n"
            f"Content-Length: {len(SDP)}\r\n\r\n"
        ).encode() + SDP
        conn.send(msg)
        asyncio.get_running_loop().call_later(self.timeout, self._expire, call)

    def _expire(self, call: _Call) -> None:
        if not call.done:
            call.done = True
            self.stats.fail("timeout")

    def on_message(self, conn: _Conn, msg: bytes) -> None:
        first, _, rest = msg.partition(b"\r\n")
        if not first.startswith(b"SIP/2.0 "):
            return  # no request is expected toward this phone
        status = int(first[8:11])
        headers: dict[bytes, list[bytes]] = {}
        for name, value in _HDR.findall(rest.split(b"\r\n\r\n", 1)[0]):
            headers.setdefault(name.lower(), []).append(value)
        cid = (headers.get(b"call-id") or headers.get(b"i") or [b""])[0].decode()
        call = self.calls.get(cid)
        if call is None or call.done:
            return
        method = (headers.get(b"cseq") or [b"0 X"])[0].split()[-1]
        if status < 200:
            return
        if status >= 300:
            call.done = True
            self.stats.fail(f"{status} to {method.decode()}")
            return
        if method == b"INVITE":
            self._ack_and_bye(conn, call, headers)
        elif method == b"BYE":
            call.done = True
            self.stats.successful += 1

    def _ack_and_bye(self, conn: _Conn, call: _Call, h: dict[bytes, list[bytes]]) -> None:
        to = (h.get(b"to") or h.get(b"t") or [b""])[0].decode()
        contact = (h.get(b"contact") or h.get(b"m") or [b""])[0].decode()
        target = (
            contact[contact.find("<") + 1 : contact.find(">")]
            if "<" in contact
            else contact.split(";")[0]
        )
        rr: list[str] = []
        for line in h.get(b"record-route", []):
            rr += [r.strip() for r in line.decode().split(",")]
        routes = "".join(f"Route: {r}\r\n" for r in reversed(rr))
        for method, cseq in (("ACK", 1), ("BYE", 2)):
            msg = (
                f"{method} {target} SIP/2.0\r\n"
                f"Via: {self._via(conn)}\r\n"
                f"{routes}"
                f"Max-Forwards: 70\r\n"
                f"From: <sip:{call.caller}@{conn.local[0]}:{conn.local[1]}>;tag={call.ftag}\r\n"
                f"To: {to}\r\n"
                f"Call-ID: {call.call_id}\r\n"
                f"CSeq: {cseq} {method}\r\n"
                f"Content-Length: 0\r\n\r\n"
            ).encode()
            conn.send(msg)


def run_tcp_calls(
    proxy: tuple[str, int],
    local_ip: str,
    callers: Sequence[str],
    connections: int,
    rate: float,
    calls: int,
    on_ready: object = None,
    on_done: object = None,
) -> tuple[CallStats, int]:
    """Connect, then (after ``on_ready()``) place the calls; ``on_done()`` runs before the
    connections close.  Returns the call statistics and the connections still open."""

    async def main() -> tuple[CallStats, int]:
        client = TcpCaller(proxy, local_ip, callers)
        try:
            await client.connect(connections)
            await asyncio.sleep(1.0)  # let the dispatcher settle after the accepts
            if callable(on_ready):
                on_ready()
            st = await client.run(rate, calls)
            if callable(on_done):
                on_done()
            return st, sum(not c.closed for c in client.conns)
        finally:
            client.close()
            await asyncio.sleep(0.2)

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())
