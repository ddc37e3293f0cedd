"""Sockets of an emulated SIP system: one UDP endpoint and one TCP listener on the same
port, plus outgoing TCP connections reused by remote address.

Thin adapters (STYLE.md): bytes in, a synchronous call into the system, bytes out.  No task
per datagram; the only tasks are one per outgoing TCP connect.  TCP messages are split by
``sip.framing.StreamFramer``; CRLFCRLF keep-alives are answered with CRLF.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from sip.errors import SipError
from sip.framing import NEED_DATA, PING, PONG, StreamFramer

log = logging.getLogger("dsbc.emulator.sip")

#: upper bound of messages handled per ``data_received`` call, so that one peer cannot
#: keep the loop busy forever
_MAX_EVENTS_PER_READ = 256


class Hop:
    """Where a message came from or goes to: transport, address, and a TCP connection if any."""

    __slots__ = ("addr", "conn", "transport")

    def __init__(self, transport: str, addr: tuple[str, int], conn: TcpConnection | None = None) -> None:
        self.transport = transport
        self.addr = addr
        self.conn = conn

    def __repr__(self) -> str:
        return f"{self.transport}:{self.addr[0]}:{self.addr[1]}"


OnMessage = Callable[[bytes, Hop, bool], None]
OnStreamError = Callable[[SipError, bytes, Hop], None]
OnFail = Callable[[], None]


class _UdpProtocol(asyncio.DatagramProtocol):
    __slots__ = ("net",)

    def __init__(self, net: SipNetwork) -> None:
        self.net = net

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.net.on_message(data, Hop("udp", (addr[0], addr[1])), True)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that went away: nothing to do for UDP
        log.debug("udp error: %s", exc)


class TcpConnection(asyncio.Protocol):
    """One TCP connection, accepted or opened by us; frames messages by Content-Length."""

    __slots__ = ("addr", "closed", "framer", "hop", "net", "transport")

    def __init__(self, net: SipNetwork) -> None:
        self.net = net
        self.transport: asyncio.Transport | None = None
        self.framer = StreamFramer()
        self.addr: tuple[str, int] = ("", 0)
        self.closed = False
        self.hop = Hop("tcp", self.addr, self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.addr = (peer[0], peer[1]) if peer else ("", 0)
        self.hop = Hop("tcp", self.addr, self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        self.net._conns[self.addr] = self

    def data_received(self, data: bytes) -> None:
        framer = self.framer
        framer.receive_data(data)
        for _ in range(_MAX_EVENTS_PER_READ):
            if self.closed:
                return
            try:
                ev = framer.next_event()
            except SipError as exc:
                # the stream cannot be resynchronised: answer if we can, then close
                self.net.on_stream_error(exc, data, self.hop)
                self.close()
                return
            if ev is NEED_DATA:
                return
            if ev is PING:
                self.write(PONG)
                continue
            assert isinstance(ev, bytes)
            self.net.on_message(ev, self.hop, False)
        # more than _MAX_EVENTS_PER_READ messages in one read: finish them on the next turn
        asyncio.get_running_loop().call_soon(self.data_received, b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.net._conns.get(self.addr) is self:
            del self.net._conns[self.addr]

    def write(self, data: bytes) -> bool:
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class SipNetwork:
    """UDP + TCP on one port; ``send(hop, data)`` picks the socket or connection."""

    def __init__(self, host: str, port: int, transports: tuple[str, ...],
                 on_message: OnMessage, on_stream_error: OnStreamError) -> None:
        bad = [t for t in transports if t not in ("udp", "tcp")]
        if bad or not transports:
            raise ValueError(f"unsupported transports {bad or transports!r} (udp, tcp)")
        self.host = host
        self.port = port
        self.transports = transports
        self.on_message = on_message
        self.on_stream_error = on_stream_error
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._conns: dict[tuple[str, int], TcpConnection] = {}
        self._pending: dict[tuple[str, int], list[tuple[bytes, OnFail | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Bind every transport on one port (a free one when ``port`` is 0); return it."""
        loop = asyncio.get_running_loop()
        for _ in range(20):
            port = self.port
            try:
                if "udp" in self.transports:
                    udp, _p = await loop.create_datagram_endpoint(
                        lambda: _UdpProtocol(self), local_addr=(self.host, port))
                    self._udp = udp
                    port = udp.get_extra_info("sockname")[1]
                if "tcp" in self.transports:
                    self._server = await loop.create_server(
                        lambda: TcpConnection(self), self.host, port, reuse_address=True)
                    port = self._server.sockets[0].getsockname()[1]
            except OSError as exc:
                await self.stop()
                if self.port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the UDP port is taken for TCP: try another pair
                raise
            self.port = port
            return port
        raise OSError(errno.EADDRINUSE, "no free port with both UDP and TCP")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        self._pending.clear()
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # --- sending --------------------------------------------------------------------

    def send(self, hop: Hop, data: bytes, on_fail: OnFail | None = None) -> None:
        if hop.transport == "udp":
            if self._udp is None:
                if on_fail is not None:
                    on_fail()
                return
            try:
                # uvloop wants an IP literal of the socket's family: no DNS here
                self._udp.sendto(data, hop.addr)
            except (ValueError, OSError) as exc:
                log.debug("udp send to %s failed: %s", hop, exc)
                if on_fail is not None:
                    on_fail()
            return
        if hop.transport != "tcp":
            if on_fail is not None:
                on_fail()
            return
        if hop.conn is not None and hop.conn.write(data):
            return
        conn = self._conns.get(hop.addr)
        if conn is not None and conn.write(data):
            return
        # no live connection to that address: open one (a peer's ephemeral port simply
        # refuses, and on_fail answers for it)
        queue = self._pending.get(hop.addr)
        if queue is not None:
            queue.append((data, on_fail))
            return
        self._pending[hop.addr] = [(data, on_fail)]
        task = asyncio.get_running_loop().create_task(self._connect(hop.addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            _t, conn = await asyncio.wait_for(
                loop.create_connection(lambda: TcpConnection(self), addr[0], addr[1]), 5.0)
        except (TimeoutError, OSError) as exc:
            log.info("tcp connect to %s:%s failed: %s", addr[0], addr[1], exc)
            for _data, on_fail in self._pending.pop(addr, []):
                if on_fail is not None:
                    on_fail()
            return
        # key by the address we dialled (an IPv6 peername may carry more fields)
        self._conns[addr] = conn
        conn.addr = addr
        conn.hop = Hop("tcp", addr, conn)
        for data, on_fail in self._pending.pop(addr, []):
            if not conn.write(data) and on_fail is not None:
                on_fail()
