"""Diameter connections over TCP: framing, capabilities exchange, watchdog, disconnect.

:class:`Connection` is the asyncio Protocol of one transport connection, in either
role: it sends the CER (``initiator``) or expects one (``responder``), answers DWR
and DPR, sends DWR when the link is idle (RFC 3539 style: two silent intervals close
it), and hands every other message to its owner.  :class:`PeerLink` keeps one
connection to a configured peer up, reconnecting with exponential back-off.

Used by the dispatcher (``dsbc.diameter.service``) and by the emulated peers
(``dsbc.emulator.diameter_peer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

from dsbc.diameter import codec as dc
from sip.logbudget import LogBudget

log = logging.getLogger("dsbc.diameter")


class ConnState(enum.Enum):
    WAIT_CER = "wait-cer"
    WAIT_CEA = "wait-cea"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class LocalNode:
    """Who we are in a capabilities exchange."""

    def __init__(self, origin_host: str, origin_realm: str, apps: list[int], host_ips: list[str] | None = None,
                 product: str = "dsbc") -> None:
        self.origin_host = origin_host
        self.origin_realm = origin_realm
        self.apps = apps
        self.host_ips = host_ips or ["127.0.0.1"]
        self.product = product
        self.state_id = int.from_bytes(os.urandom(4), "big") | 1
        self._e2e = itertools.count((self.state_id & 0xFFF) << 20)

    def next_e2e(self) -> int:
        return next(self._e2e) & 0xFFFFFFFF

    def capabilities(self, local_ip: str = "") -> list[dc.Avp]:
        """Our CER / CEA AVPs; Host-IP-Address is ``local_ip`` (the address the connection
        uses) when there is one: a wildcard listener or an outgoing connection has no other."""
        return dc.capabilities(self.origin_host, self.origin_realm, [local_ip] if local_ip else self.host_ips,
                               self.apps, self.product, self.state_id)


class Owner(Protocol):
    def on_open(self, conn: Connection) -> None: ...
    def on_message(self, conn: Connection, msg: dc.Message) -> None: ...
    def on_closed(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One Diameter transport connection."""

    _ids = itertools.count(1)

    def __init__(self, owner: Owner, node: LocalNode, initiator: bool, *, watchdog: float = 30.0,
                 cer_timeout: float = 10.0, key: str | int | None = None,
                 accept_apps: set[int] | None = None,
                 accept_peer: Callable[[Any], bool] | None = None,
                 log_budget: LogBudget | None = None) -> None:
        self.owner = owner
        #: (a responder on a public address) how the close of a connection that never
        #: passed its capabilities exchange is logged: anyone can open those in a loop
        self.log_budget = log_budget
        self.node = node
        self.initiator = initiator
        self.watchdog = watchdog
        self.cer_timeout = cer_timeout
        self.id = next(Connection._ids)
        self.key: str | int = self.id if key is None else key
        self.accept_apps = accept_apps
        self.accept_peer = accept_peer  # (a responder) whether the peer's address may connect
        self.state = ConnState.WAIT_CEA if initiator else ConnState.WAIT_CER
        self.framer = dc.Framer()
        self.transport: asyncio.Transport | None = None
        self.peer_host = ""
        self.peer_realm = ""
        self.peer_apps: set[int] = set()
        self.peer_addr: Any = None
        self.local_ip = ""  # our end of the connection, for Host-IP-Address
        self.close_reason = ""
        self.peer_dpr_cause: int | None = None  # the Disconnect-Cause of the peer's DPR
        self.closed: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        self._dpa: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._dwr_outstanding = False
        self._loop = asyncio.get_event_loop()
        self._last_rx = self._loop.time()  # when the peer was last heard (RFC 3539 Tw restarts)
        self._hbh = itertools.count(int.from_bytes(os.urandom(2), "big") << 16)
        self.bad_messages = 0
        self.watchdogs_answered = 0  # DWAs received for our DWRs

    # -- transport ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer_addr = transport.get_extra_info("peername")
        self.local_ip = _local_ip(transport.get_extra_info("sockname"))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_event_loop()
        self._timer = loop.call_later(self.cer_timeout, self._tick)
        if self.initiator:
            self.send_request(dc.CMD_CE, dc.APP_COMMON, self.node.capabilities(self.local_ip))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.close_reason:
            self.close_reason = f"connection lost: {exc}" if exc else "closed by the peer"
        self.state = ConnState.CLOSED
        if self._timer is not None:
            self._timer.cancel()
        if self._dpa is not None and not self._dpa.done():
            self._dpa.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)
        self.owner.on_closed(self)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_request(self, code: int, app: int, avps: list[dc.Avp], proxiable: bool = False) -> int:
        hbh = next(self._hbh) & 0xFFFFFFFF
        self.send(dc.encode(dc.request(code, app, hbh, self.node.next_e2e(), avps, proxiable)))
        return hbh

    def close(self, reason: str = "") -> None:
        if reason and not self.close_reason:
            self.close_reason = reason
            if self.log_budget is not None and not self.peer_host:
                self.log_budget.log(logging.INFO, "diameter %s (%s): closing: %s", self.peer_addr, self.key, reason)
            else:
                log.info("diameter %s (%s): closing: %s", self.peer_host or self.peer_addr, self.key, reason)
        self.state = ConnState.CLOSING if self.state != ConnState.CLOSED else self.state
        if self.transport is not None:
            self.transport.close()

    async def disconnect(self, cause: int = dc.DISCONNECT_REBOOTING, timeout: float = 2.0) -> None:
        """DPR, wait for the DPA (or ``timeout``), close."""
        if self.state == ConnState.OPEN:
            self._dpa = asyncio.get_event_loop().create_future()
            self.state = ConnState.CLOSING
            self.send_request(dc.CMD_DP, dc.APP_COMMON, [dc.utf8(dc.ORIGIN_HOST, self.node.origin_host),
                                                         dc.utf8(dc.ORIGIN_REALM, self.node.origin_realm),
                                                         dc.u32(dc.DISCONNECT_CAUSE, cause)])
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._dpa), timeout)
        self.close("disconnect")

    # -- bytes in ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.framer.feed(data)
        self._last_rx = self._loop.time()
        self._dwr_outstanding = False  # any message from the peer shows it is alive
        while self.state != ConnState.CLOSED:
            try:
                raw = self.framer.next_message()
            except dc.DiameterDecodeError as exc:  # the stream is off: nothing after it can be trusted
                self.bad_messages += 1
                if self.state == ConnState.WAIT_CER and self.framer.head(2) == b"\x16\x03":  # a TLS handshake record
                    self.close("the peer starts TLS: dsbc speaks Diameter over plain TCP only (configure the "
                               "peer without TLS: freeDiameter No_TLS, Inband-Security-Id 0)")
                else:
                    self.close(f"bad framing: {exc}")
                return
            if raw is None:
                return
            try:
                msg = dc.decode(raw)
            except dc.DiameterDecodeError as exc:
                self.bad_messages += 1
                if exc.header is not None and exc.header.is_request:
                    self.send(dc.encode(dc.error_answer(exc.header, exc, self.node.origin_host, self.node.origin_realm)))
                continue
            try:
                self._dispatch(msg)
            except dc.DiameterDecodeError as exc:  # a value deeper in the message (grouped AVP, Unsigned32)
                self.bad_messages += 1
                if msg.is_request:
                    self.send(dc.encode(dc.error_answer(msg, exc, self.node.origin_host, self.node.origin_realm)))

    def _dispatch(self, m: dc.Message) -> None:
        code = m.code
        if code == dc.CMD_CE:
            if m.is_request:
                self._on_cer(m)
            elif self.state == ConnState.WAIT_CEA:
                self._on_cea(m)
            return
        if self.state not in (ConnState.OPEN, ConnState.CLOSING):
            if m.is_request:
                self.send(dc.encode(dc.answer(m, dc.UNKNOWN_PEER, self.node.origin_host, self.node.origin_realm,
                                              error_message="no capabilities exchange yet")))
            self.close("message before capabilities exchange")
            return
        if code == dc.CMD_DW:
            if m.is_request:
                self.send(dc.encode(dc.answer(m, dc.SUCCESS, self.node.origin_host, self.node.origin_realm,
                                              [dc.u32(dc.ORIGIN_STATE_ID, self.node.state_id)])))
            else:
                self._dwr_outstanding = False
                self.watchdogs_answered += 1
            return
        if code == dc.CMD_DP:
            if m.is_request:
                try:
                    self.peer_dpr_cause = m.u32(dc.DISCONNECT_CAUSE)
                except dc.DiameterDecodeError:  # a cause we cannot read: still a DPR
                    self.peer_dpr_cause = None
                self.send(dc.encode(dc.answer(m, dc.SUCCESS, self.node.origin_host, self.node.origin_realm)))
                self.state = ConnState.CLOSING
                self.close("peer sent DPR")
            elif self._dpa is not None and not self._dpa.done():
                self._dpa.set_result(None)
            return
        self.owner.on_message(self, m)

    def _on_cer(self, m: dc.Message) -> None:
        if self.state != ConnState.WAIT_CER:
            # RFC 6733 5.6.4 election is for simultaneous opens; a second CER on an open link is an error
            self.send(dc.encode(dc.answer(m, dc.UNABLE_TO_COMPLY, self.node.origin_host, self.node.origin_realm)))
            return
        host, realm = m.text(dc.ORIGIN_HOST), m.text(dc.ORIGIN_REALM)
        apps = dc.advertised_apps(m)
        avps = self.node.capabilities(self.local_ip)
        # absent means NO_INBAND_SECURITY; a peer that offers TLS alone would start a TLS
        # handshake after a successful CEA, and there is no TLS here
        inband = {a.u32() for a in m.find_all(dc.INBAND_SECURITY_ID)}
        why = ""
        if self.accept_peer is not None and not self.accept_peer(self.peer_addr):
            rc = dc.UNKNOWN_PEER  # RFC 6733 5.3: a CER from an unknown peer
        elif not host or not realm:
            rc = dc.MISSING_AVP
        elif self.accept_apps is not None and not (apps & (self.accept_apps | {dc.APP_RELAY})) \
                and dc.APP_RELAY not in self.node.apps:
            rc = dc.NO_COMMON_APPLICATION
        elif inband and dc.NO_INBAND_SECURITY not in inband:
            rc = dc.NO_COMMON_SECURITY  # RFC 6733 5.3, 7.1.5
            why = "no TLS here: connect with Inband-Security-Id NO_INBAND_SECURITY (0)"
        else:
            rc = dc.SUCCESS
        ans = dc.answer(m, rc, self.node.origin_host, self.node.origin_realm, avps[2:], error_message=why)
        self.send(dc.encode(ans))
        if rc != dc.SUCCESS:
            self.close(f"CER refused with {rc}")
            return
        self.peer_host, self.peer_realm, self.peer_apps = host or "", realm or "", apps
        self._opened()

    def _on_cea(self, m: dc.Message) -> None:
        rc = m.u32(dc.RESULT_CODE)
        if rc != dc.SUCCESS:
            self.close(f"CEA with Result-Code {rc}")
            return
        self.peer_host, self.peer_realm = m.text(dc.ORIGIN_HOST) or "", m.text(dc.ORIGIN_REALM) or ""
        self.peer_apps = dc.advertised_apps(m)
        self._opened()

    def _opened(self) -> None:
        self.state = ConnState.OPEN
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._last_rx + self.watchdog, self._tick)
        self.owner.on_open(self)

    # -- watchdog ---------------------------------------------------------------------------------

    def _tick(self) -> None:
        self._timer = None
        if self.state in (ConnState.WAIT_CER, ConnState.WAIT_CEA):
            self.close("no capabilities exchange in time")
            return
        if self.state != ConnState.OPEN:
            return
        now = self._loop.time()
        due = self._last_rx + self.watchdog
        if now < due - 0.001:  # heard from the peer since: Tw runs from then
            self._timer = self._loop.call_at(due, self._tick)
            return
        if self._dwr_outstanding:
            self.close("watchdog: no answer to DWR")
            return
        # Tw of silence: a DWR, and the answer (or any message) is due within Tw again
        self._dwr_outstanding = True
        self.send_request(dc.CMD_DW, dc.APP_COMMON, [dc.utf8(dc.ORIGIN_HOST, self.node.origin_host),
                                                     dc.utf8(dc.ORIGIN_REALM, self.node.origin_realm),
                                                     dc.u32(dc.ORIGIN_STATE_ID, self.node.state_id)])
        self._timer = self._loop.call_at(now + self.watchdog, self._tick)


def _local_ip(sockname: Any) -> str:
    """The IP of a socket's own address ('' when it has none: a Unix socket, a test double);
    an IPv4 client of a dual-stack listener is answered with the IPv4 address."""
    try:
        ip = ipaddress.ip_address(sockname[0])
    except (TypeError, ValueError, IndexError):
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return "" if ip.is_unspecified else str(ip)


class PeerLink:
    """Keep one connection to ``host:port`` open; back-off doubles from ``backoff_min`` to ``backoff_max``."""

    def __init__(self, owner: Owner, node: LocalNode, key: str, host: str, port: int, *,
                 watchdog: float = 30.0, cer_timeout: float = 5.0, backoff_min: float = 0.5,
                 backoff_max: float = 30.0, connect_timeout: float = 5.0) -> None:
        self.owner = owner
        self.node = node
        self.key = key
        self.host = host
        self.port = port
        self.watchdog = watchdog
        self.cer_timeout = cer_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.conn: Connection | None = None
        self.attempts = 0
        self.failures = 0
        self.last_error = ""
        self.next_retry = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def is_open(self) -> bool:
        return self.conn is not None and self.conn.state == ConnState.OPEN

    def start(self) -> None:
        self._task = asyncio.get_event_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_event_loop()
        backoff = self.backoff_min
        while not self._stopping:
            self.attempts += 1
            conn = Connection(self.owner, self.node, True, watchdog=self.watchdog,
                              cer_timeout=self.cer_timeout, key=self.key)
            try:
                await asyncio.wait_for(loop.create_connection(lambda c=conn: c, self.host, self.port),  # type: ignore[misc]
                                       self.connect_timeout)
            except (TimeoutError, OSError) as exc:
                error = f"connect: {exc or 'timeout'}"
                if error != self.last_error:  # once per new reason, not every back-off
                    log.warning("diameter: %s peer %s:%d cannot be reached (%s); retrying", self.key,
                                self.host, self.port, error)
                self.last_error = error
            else:
                self.conn = conn
                if self._stopping:
                    # stop() came as the connection completed: Python 3.11's wait_for then
                    # returns it rather than the cancellation, and nobody would close it
                    conn.close("stopping")
                    break
                await conn.closed
                self.last_error = conn.close_reason or "connection closed"
                if conn.peer_host:  # it opened: start the back-off afresh
                    backoff = self.backoff_min
                if conn.peer_dpr_cause in (dc.DISCONNECT_BUSY, dc.DISCONNECT_DO_NOT_WANT_TO_TALK_TO_YOU):
                    # RFC 6733 5.4.3: the peer asked not to be talked to now (only REBOOTING
                    # invites a reconnection): wait the longest back-off, not half a second
                    backoff = self.backoff_max
            if self._stopping:
                break
            self.failures += 1
            self.next_retry = loop.time() + backoff
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)

    async def stop(self) -> None:
        self._stopping = True
        if self.conn is not None and self.conn.state != ConnState.CLOSED:
            await self.conn.disconnect(dc.DISCONNECT_REBOOTING)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.conn is not None and self.conn.state != ConnState.CLOSED:
            self.conn.close("stopping")  # connected while the stop began

    def status(self) -> dict[str, Any]:
        c = self.conn
        return {
            "address": f"{self.host}:{self.port}",
            "state": c.state.value if c is not None and c.state != ConnState.CLOSED else "down",
            "identity": c.peer_host if c is not None else "",
            "watchdogs_answered": c.watchdogs_answered if c is not None else 0,
            "attempts": self.attempts,
            "failures": self.failures,
            "last_error": self.last_error,
        }
