"""TLS listeners that admit a connection at its accept, before its handshake.

    acceptor = TlsAcceptor(loop, sock, factory, ctx, handshake_timeout, gate)
    acceptor.close()                   # stop accepting (a drain), as Server.close()
    socks = await listening_sockets(loop, host, port)   # as create_server binds them

``loop.create_server(ssl=ctx)`` hands a connection to its protocol only once the TLS
handshake is done: connection caps checked there did not hold for clients still in their
handshake (a source could keep any number of connections open by never finishing one), and
a handshake that failed was dropped by the event loop without a word.  Here the listening
socket is accepted from directly: ``gate.admit(ip)`` takes or refuses a slot at once, the
handshake runs through ``loop.connect_accepted_socket``, and ``gate.release(ip)`` frees the
slot when the handshake is over (the protocol counts the connection itself from its
``connection_made``), ``gate.failed(ip, exc)`` tells a failed one.

Perf: TLS connections are few and long-lived (phones, peers); the task per accept is the
cost of the handshake's coroutine, nothing per message.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

from .logbudget import LogBudget

log = logging.getLogger("dsbc.tls")

#: accepts per wake-up of the listening socket: a flood of connections cannot starve the loop
ACCEPT_BATCH = 64
#: failed handshakes logged per minute per listener kind (the rest are counted)
FAILED_LOG_BURST = 10


class Gate(Protocol):
    def admit(self, ip: str) -> bool: ...

    def release(self, ip: str) -> None: ...

    def failed(self, ip: str, exc: BaseException) -> None: ...


class Handshaking:
    """The connections still in their TLS handshake, per source IP and in all: a slot of
    the listener's caps each, beside the connections its protocol already counts; and the
    log of the handshakes that failed (``what``: "SIP", "API")."""

    def __init__(self, what: str) -> None:
        self.per_ip: dict[str, int] = {}
        self.total = 0
        self.what = what
        # a phone whose certificate is refused (or that refuses dsbc's) says why at INFO;
        # a scanner's handshakes cost a few lines a minute, not one each
        self._log = LogBudget(log, f"failed {what} TLS handshakes", burst=FAILED_LOG_BURST, window=60.0)

    def failed(self, ip: str, exc: BaseException) -> None:
        """Log a failed (or timed-out) handshake from ``ip``, with its reason; bounded."""
        shown = f"[{ip}]" if ":" in ip else ip
        self._log.log(logging.INFO, "%s TLS handshake from %s failed: %s", self.what, shown,
                      str(exc) or type(exc).__name__)

    def take(self, ip: str, conns: int, ip_conns: int, max_conns: int, max_per_ip: int) -> bool:
        """A slot for ``ip`` (which has ``ip_conns`` of the ``conns`` counted connections),
        or False when it would pass ``max_conns`` or ``max_per_ip``."""
        if conns + self.total >= max_conns or ip_conns + self.per_ip.get(ip, 0) >= max_per_ip:
            return False
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.total += 1
        return True

    def release(self, ip: str) -> None:
        n = self.per_ip.get(ip, 1) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)
        self.total -= 1


class TlsAcceptor:
    """One TLS listening socket, accepted from by hand (see the module's text)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        ctx: ssl.SSLContext,
        handshake_timeout: float,
        gate: Gate,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.ctx = ctx
        self.handshake_timeout = handshake_timeout
        self.gate = gate
        self.handshakes: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        """Accept no more, as ``Server.close()``; a handshake still in progress is dropped
        (the client connects again, to a reload's successor), not left to a closing loop."""
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for task in list(self.handshakes):
            task.cancel()

    def _readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE, ECONNABORTED: the next wake-up tries again
                return
            ip = str(addr[0])  # as the socket gives it (the gate unmaps ::ffff:a.b.c.d)
            if not self.gate.admit(ip):
                conn.close()
                continue
            conn.setblocking(False)
            task = self.loop.create_task(self._handshake(conn, ip))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)

    async def _handshake(self, conn: socket.socket, ip: str) -> None:
        try:
            await self.loop.connect_accepted_socket(
                self.factory, conn, ssl=self.ctx, ssl_handshake_timeout=self.handshake_timeout
            )
        except (OSError, ValueError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self.gate.failed(ip, exc)
            if conn.fileno() >= 0:  # not taken over by a transport that closed it
                conn.close()
        finally:
            self.gate.release(ip)

async def listening_sockets(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for ``host:port``, as ``loop.create_server`` makes them (every
    address of a name, IPv6 only on an IPv6 socket, SO_REUSEPORT for a reload's successor)."""
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(1024)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
