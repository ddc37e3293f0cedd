"""A small RADIUS server standing in for one emulated system (``dsbc demo``, tests).

Answers every Access-Request with an Access-Accept whose Reply-Message names the
system (``"MR100 accepts alice"``), or with an Access-Reject when a user table is given
and the password does not match, and every Accounting-Request with an
Accounting-Response.  Requests with a wrong authenticator are dropped, as a real
server does, so a mis-signed relay shows up as a timeout.  Proxy-State attributes are
echoed in order (RFC 2865 5.33).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dsbc.radius import packet as rp

log = logging.getLogger("dsbc.emulator.radius")


class RadiusEmulator(asyncio.DatagramProtocol):
    """One emulated RADIUS server socket (auth or acct)."""

    def __init__(self, name: str, secret: str, users: dict[str, str] | None = None,
                 log_list: list[dict[str, Any]] | None = None) -> None:
        self.name = name
        self.secret = secret.encode()
        self.users = users
        self.log: list[dict[str, Any]] = log_list if log_list is not None else []
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            pkt = rp.decode(data)
            answer = self._answer(pkt, data)
        except rp.RadiusDecodeError:
            answer = None
        if answer is None:
            self.dropped += 1
            return
        if self.transport is not None:
            self.transport.sendto(answer, addr)

    def _answer(self, pkt: rp.Packet, data: bytes) -> bytes | None:
        states = [(rp.PROXY_STATE, v) for v in pkt.get_all(rp.PROXY_STATE)]
        user = pkt.get_text(rp.USER_NAME) or ""
        if pkt.code == rp.ACCOUNTING_REQUEST:
            if not rp.verify_accounting_request(data, self.secret):
                return None
            self.log.append({"code": pkt.code, "user": user,
                             "status": pkt.get_int(rp.ACCT_STATUS_TYPE),
                             "session": pkt.get_text(rp.ACCT_SESSION_ID)})
            ans = rp.Packet(rp.ACCOUNTING_RESPONSE, pkt.identifier, pkt.authenticator, states)
            return rp.sign_response(ans, pkt.authenticator, self.secret)
        if pkt.code != rp.ACCESS_REQUEST:
            return None
        signed = rp.verify_message_authenticator(data, self.secret)
        if signed is False:
            return None
        password = b""
        hidden = pkt.get(rp.USER_PASSWORD)
        if hidden is not None:
            password = rp.unhide_password(hidden, self.secret, pkt.authenticator)
        self.log.append({"code": pkt.code, "user": user, "password": password.decode("utf-8", "replace")})
        attrs: list[tuple[int, bytes]] = []
        if signed:
            attrs.append((rp.MESSAGE_AUTHENTICATOR, rp.ZERO16))
        if self.users is not None and self.users.get(user) != password.decode("utf-8", "replace"):
            code = rp.ACCESS_REJECT
            attrs.append((rp.REPLY_MESSAGE, f"{self.name} rejects {user}".encode()))
        else:
            code = rp.ACCESS_ACCEPT
            attrs.append((rp.REPLY_MESSAGE, f"{self.name} accepts {user}".encode()))
        ans = rp.Packet(code, pkt.identifier, pkt.authenticator, attrs + states)
        return rp.sign_response(ans, pkt.authenticator, self.secret)


class RadiusEmulatorHandle:
    """The auth and acct sockets of one emulated server; ``stop()`` closes both."""

    def __init__(self, name: str, auth: RadiusEmulator, acct: RadiusEmulator,
                 auth_addr: tuple[str, int], acct_addr: tuple[str, int]) -> None:
        self.name = name
        self.auth = auth
        self.acct = acct
        self.auth_addr = auth_addr
        self.acct_addr = acct_addr

    @property
    def log(self) -> list[dict[str, Any]]:
        return self.auth.log

    def stop(self) -> asyncio.Future[None]:
        """Close the sockets now; the returned future is already done, so ``await`` is optional."""
        for p in (self.auth, self.acct):
            if p.transport is not None:
                p.transport.close()
        fut: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        fut.set_result(None)
        return fut


async def start_radius_emulator(name: str, host: str, auth_port: int, acct_port: int, secret: str,
                                users: dict[str, str] | None = None) -> RadiusEmulatorHandle:
    """Start an emulated RADIUS server (port 0 picks a free port; see ``.auth_addr``)."""
    loop = asyncio.get_running_loop()
    shared: list[dict[str, Any]] = []
    auth = RadiusEmulator(name, secret, users, shared)
    acct = RadiusEmulator(name, secret, users, shared)
    t1, _ = await loop.create_datagram_endpoint(lambda: auth, local_addr=(host, auth_port))
    try:
        t2, _ = await loop.create_datagram_endpoint(lambda: acct, local_addr=(host, acct_port))
    except OSError:
        t1.close()
        raise
    a1 = t1.get_extra_info("sockname")
    a2 = t2.get_extra_info("sockname")
    log.info("radius emulator %s: auth %s:%d acct %s:%d", name, a1[0], a1[1], a2[0], a2[1])
    return RadiusEmulatorHandle(name, auth, acct, (a1[0], a1[1]), (a2[0], a2[1]))
