"""Emulated Diameter credit-control peers (RFC 4006) for ``dsbc demo`` and the tests.

- :class:`CreditControlServer` stands in for one system's OCS/PCRF peer: answers CER,
  DWR, DPR, and every CCR with a CCA (2001, Granted-Service-Unit) whose Origin-Host is
  the system's identity; it can also send a Re-Auth-Request into a session.  With
  ``answer_cer=False`` it accepts connections and never answers, like a hung peer.
- :class:`CreditControlClient` stands in for a PGW/GGSN: opens (or accepts) a
  connection, exchanges capabilities, sends CCRs and waits for their answers, and
  answers a RAR with a RAA.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dsbc.diameter import codec as dc
from dsbc.diameter.peer import Connection, ConnState, LocalNode

log = logging.getLogger("dsbc.emulator.diameter")


class _Base:
    def __init__(self, origin_host: str, origin_realm: str, host_ip: str = "127.0.0.1") -> None:
        self.node = LocalNode(origin_host, origin_realm, [dc.APP_CREDIT_CONTROL], [host_ip], product="dsbc-emulator")
        self.conns: list[Connection] = []
        self.log: list[dict[str, Any]] = []
        self._waiters: dict[int, asyncio.Future[dc.Message]] = {}
        self._opened: asyncio.Event = asyncio.Event()

    def on_open(self, conn: Connection) -> None:
        self._opened.set()

    def on_closed(self, conn: Connection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        if not any(c.state == ConnState.OPEN for c in self.conns):
            self._opened.clear()

    def on_message(self, conn: Connection, msg: dc.Message) -> None:
        if not msg.is_request:
            fut = self._waiters.pop(msg.hop_by_hop, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        self.on_request(conn, msg)

    def on_request(self, conn: Connection, msg: dc.Message) -> None:
        conn.send(dc.encode(dc.answer(msg, dc.UNABLE_TO_COMPLY, self.node.origin_host, self.node.origin_realm)))

    async def wait_open(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self._opened.wait(), timeout)

    def open_conn(self) -> Connection:
        for c in self.conns:
            if c.state == ConnState.OPEN:
                return c
        raise ConnectionError(f"{self.node.origin_host}: no open Diameter connection")

    async def request(self, code: int, avps: list[dc.Avp], timeout: float = 5.0) -> dc.Message:
        conn = self.open_conn()
        hbh = conn.send_request(code, dc.APP_CREDIT_CONTROL, avps, proxiable=True)
        fut: asyncio.Future[dc.Message] = asyncio.get_running_loop().create_future()
        self._waiters[hbh] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.pop(hbh, None)

    async def close(self) -> None:
        await asyncio.gather(*(c.disconnect() for c in list(self.conns)), return_exceptions=True)


class CreditControlServer(_Base):
    """One system's credit-control server."""

    def __init__(self, label: str, origin_host: str, origin_realm: str, *, answer_cer: bool = True,
                 host_ip: str = "127.0.0.1") -> None:
        super().__init__(origin_host, origin_realm, host_ip)
        self.label = label
        self.answer_cer = answer_cer
        self.server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] = ("", 0)
        self.accepted = 0

    def _factory(self) -> asyncio.Protocol:
        self.accepted += 1
        if not self.answer_cer:
            return asyncio.Protocol()  # swallows everything: a peer that never answers CER
        conn = Connection(self, self.node, False, watchdog=30.0, cer_timeout=30.0)
        self.conns.append(conn)
        return conn

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> CreditControlServer:
        self.server = await asyncio.get_running_loop().create_server(self._factory, host, port, reuse_address=True)
        sock = self.server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        return self

    def on_request(self, conn: Connection, msg: dc.Message) -> None:
        if msg.code != dc.CMD_CC:
            super().on_request(conn, msg)
            return
        cc_type = msg.u32(dc.CC_REQUEST_TYPE)
        entry = {"session": msg.text(dc.SESSION_ID), "type": cc_type, "number": msg.u32(dc.CC_REQUEST_NUMBER),
                 "subscription": dc.subscription_ids(msg),
                 "route_record": [a.text() for a in msg.find_all(dc.ROUTE_RECORD)],
                 "destination_realm": msg.text(dc.DESTINATION_REALM),
                 "destination_host": msg.text(dc.DESTINATION_HOST)}
        self.log.append(entry)
        extra = [dc.u32(dc.AUTH_APPLICATION_ID, dc.APP_CREDIT_CONTROL)]
        for code in (dc.CC_REQUEST_TYPE, dc.CC_REQUEST_NUMBER):
            a = msg.find(code)
            if a is not None:
                extra.append(a)
        if cc_type in (dc.CC_INITIAL, dc.CC_UPDATE):
            extra.append(dc.grouped(dc.GRANTED_SERVICE_UNIT, [dc.u64(dc.CC_TOTAL_OCTETS, 10_000_000)]))
            extra.append(dc.u32(dc.VALIDITY_TIME, 3600))
        ans = dc.answer(msg, dc.SUCCESS, self.node.origin_host, self.node.origin_realm, extra)
        ans.flags = msg.flags & dc.FLAG_P
        conn.send(dc.encode(ans))

    async def re_auth(self, session_id: str, dest_host: str, dest_realm: str, timeout: float = 5.0) -> dc.Message:
        """Send a RAR into a session (the dispatcher must take it to the client that owns it)."""
        avps = [dc.utf8(dc.SESSION_ID, session_id), dc.utf8(dc.ORIGIN_HOST, self.node.origin_host),
                dc.utf8(dc.ORIGIN_REALM, self.node.origin_realm), dc.utf8(dc.DESTINATION_REALM, dest_realm),
                dc.utf8(dc.DESTINATION_HOST, dest_host), dc.u32(dc.AUTH_APPLICATION_ID, dc.APP_CREDIT_CONTROL),
                dc.u32(285, 0)]  # Re-Auth-Request-Type AUTHORIZE_ONLY
        return await self.request(dc.CMD_RA, avps, timeout)

    async def stop(self) -> None:
        await self.close()
        if self.server is not None:
            self.server.close()


class CreditControlClient(_Base):
    """A PGW-like credit-control client."""

    def __init__(self, origin_host: str, origin_realm: str, dest_realm: str, host_ip: str = "127.0.0.1") -> None:
        super().__init__(origin_host, origin_realm, host_ip)
        self.dest_realm = dest_realm
        self.server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] = ("", 0)
        self._numbers: dict[str, int] = {}

    async def connect(self, host: str, port: int, timeout: float = 5.0) -> CreditControlClient:
        conn = Connection(self, self.node, True, watchdog=30.0, cer_timeout=timeout)
        self.conns.append(conn)
        await asyncio.get_running_loop().create_connection(lambda: conn, host, port)
        await self.wait_open(timeout)
        return self

    async def listen(self, host: str, port: int = 0) -> CreditControlClient:
        """Accept the connection instead (a relay agent configured to connect to us)."""

        def factory() -> Connection:
            conn = Connection(self, self.node, False, watchdog=30.0, cer_timeout=30.0)
            self.conns.append(conn)
            return conn

        self.server = await asyncio.get_running_loop().create_server(factory, host, port, reuse_address=True)
        sock = self.server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        return self

    def on_request(self, conn: Connection, msg: dc.Message) -> None:
        if msg.code == dc.CMD_RA:
            self.log.append({"rar": msg.text(dc.SESSION_ID), "from": msg.text(dc.ORIGIN_HOST)})
            conn.send(dc.encode(dc.answer(msg, dc.SUCCESS, self.node.origin_host, self.node.origin_realm)))
            return
        super().on_request(conn, msg)

    async def ccr(self, session_id: str, cc_type: int, subscription: tuple[int, str] | None = None,
                  timeout: float = 5.0, dest_host: str = "") -> dc.Message:
        number = self._numbers.get(session_id, -1) + 1 if cc_type != dc.CC_INITIAL else 0
        self._numbers[session_id] = number
        avps = [dc.utf8(dc.SESSION_ID, session_id), dc.utf8(dc.ORIGIN_HOST, self.node.origin_host),
                dc.utf8(dc.ORIGIN_REALM, self.node.origin_realm), dc.utf8(dc.DESTINATION_REALM, self.dest_realm),
                dc.u32(dc.AUTH_APPLICATION_ID, dc.APP_CREDIT_CONTROL),
                dc.utf8(dc.SERVICE_CONTEXT_ID, "32251@3gpp.org"),
                dc.u32(dc.CC_REQUEST_TYPE, cc_type), dc.u32(dc.CC_REQUEST_NUMBER, number)]
        if dest_host:
            avps.insert(4, dc.utf8(dc.DESTINATION_HOST, dest_host))
        if subscription is not None:
            avps.append(dc.subscription_id(*subscription))
        return await self.request(dc.CMD_CC, avps, timeout)

    async def stop(self) -> None:
        await self.close()
        if self.server is not None:
            self.server.close()
