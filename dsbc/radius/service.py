"""asyncio adapters of the RADIUS dispatcher: two listening sockets, upstream sockets, one timer.

Thin by design: a datagram is handled synchronously (decode, look up in memory,
re-sign, ``sendto``); no task per datagram.  Upstream sockets are plain non-blocking
UDP sockets watched with ``loop.add_reader`` so that a new identifier slot (see
``dsbc.radius.idspace``) can be opened synchronously, in the middle of a datagram
callback, when every identifier of the existing ones is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from typing import Any

from dsbc.config import Config, format_hostport, parse_hostport
from dsbc.radius.core import ACCT, AUTH, TO_CLIENT, Addr, Out, RadiusCore, SystemTarget
from dsbc.store.base import LocationStore
from sip.transport_sockets import PKTINFO_SPACE, Cmsg, big_buffers, reply_from, want_destination

from ..core_timer import CoreTimer, PinnedRows, node_key

log = logging.getLogger("dsbc.radius")

STICKY_META_KEY = "radius.acct_sessions"
PERSIST_EVERY = 30.0
#: how often the pins other nodes saved are read (a node taking over their address)
ADOPT_EVERY = 5.0


def make_decide(store: LocationStore) -> Any:
    """User-Name -> (system, state): ``account``, then ``radius``, then the name without @realm."""

    def decide(user: str) -> tuple[str, str]:
        if not user:
            return store.unknown, "active"
        candidates = [("account", user), ("radius", user)]
        if "@" in user:
            candidates.append(("account", user.split("@", 1)[0]))
        for kind, value in candidates:
            if store.lookup(kind, value) is not None:
                d = store.decide(kind, value)
                return d.system, d.state
        d = store.decide("account", user)
        return d.system, d.state

    return decide


class _Listener:
    """One listening socket, read on the loop with ``add_reader`` (each datagram handled
    synchronously, as an asyncio ``datagram_received``).

    On a wildcard address (``0.0.0.0``, ``[::]``) each answer leaves from the address its
    request was sent to (IP_PKTINFO), as FreeRADIUS answers on ``ipaddr = *``: left to the
    kernel, the answer to a NAS that reached the host on the keepalived VIP or a second
    address comes from the route's preferred source, and the NAS drops it."""

    __slots__ = ("local", "loop", "sock", "svc", "via")

    def __init__(self, svc: RadiusService, via: int, sock: socket.socket, wildcard: bool) -> None:
        self.svc = svc
        self.via = via
        self.sock = sock
        self.loop = svc.loop
        #: per client address and request Identifier (an answer carries its request's): the
        #: control message of the address that request was sent to.  Not per client alone: a
        #: NAS may send from one port to two addresses of the host (primary and secondary
        #: server) before the first is answered
        self.local: dict[tuple[Addr, int], Cmsg] | None = {} if wildcard and want_destination(sock) else None
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(64):  # bounded, as the upstream sockets: the loop is not starved
            try:
                data, anc, _flags, addr = self.sock.recvmsg(4096, PKTINFO_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP unreachable and the like, reported on a read
                continue
            client = (addr[0], addr[1])
            if self.local is not None and len(data) >= 2:
                cmsg = reply_from(anc)
                key = (client, data[1])
                if cmsg is not None:
                    if len(self.local) >= 65536:  # requests never answered (dropped)
                        self.local.clear()
                    self.local[key] = cmsg
            self.svc.on_request(self.via, data, client)

    def sendto(self, data: bytes, addr: Addr) -> None:
        # taken: an answer is sent once per request datagram (a retransmission, answered from
        # the duplicate cache, came with its own), so only requests in flight are kept
        cmsg = self.local.pop((addr, data[1]), None) if self.local is not None and len(data) >= 2 else None
        if cmsg is None:
            self.sock.sendto(data, addr)
        else:
            self.sock.sendmsg([data], [cmsg], 0, addr)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class RadiusService:
    """A running RADIUS dispatcher: ``status()`` for metrics, ``await stop()`` to end it."""

    def __init__(self, core: RadiusCore, store: LocationStore | None, loop: asyncio.AbstractEventLoop,
                 pins_key: str = STICKY_META_KEY) -> None:
        self.core = core
        self.store = store
        self.loop = loop
        self.listeners: list[_Listener] = []
        self.addresses: list[Addr] = []
        self._socks: dict[tuple[str, int, int], socket.socket] = {}
        self._timer = CoreTimer(self.loop, self.core.get_timer, self.core.handle_timer, self._send)
        self._pins = PinnedRows(store, pins_key, self.loop, "radius accounting sessions",
                                legacy_key=STICKY_META_KEY if pins_key != STICKY_META_KEY else "")
        self._persist_task: asyncio.Task[None] | None = None
        self.send_errors = 0

    # -- datagrams --------------------------------------------------------------------------

    def on_request(self, via: int, data: bytes, addr: Addr) -> None:
        self._send(self.core.handle_request(via, data, addr, self.loop.time()))
        self._arm()

    def _on_readable(self, system: str, slot: int, sock: socket.socket) -> None:
        # bounded: at most 64 datagrams per wake-up so one busy system cannot starve the loop
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP port unreachable reported on the next read
                continue
            self._send(self.core.handle_answer(system, slot, data, (addr[0], addr[1]), self.loop.time()))
        self._arm()

    def _upstream(self, system: str, slot: int, family: int) -> socket.socket:
        # one socket per family too: a system's servers may be IPv4 and IPv6, and an IPv6
        # address cannot leave through an IPv4 socket (its failover to the other failed)
        sock = self._socks.get((system, slot, family))
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            self.loop.add_reader(sock.fileno(), self._on_readable, system, slot, sock)
            self._socks[(system, slot, family)] = sock
        return sock

    def _send(self, outs: list[Out]) -> None:
        for o in outs:
            try:
                if o.kind == TO_CLIENT:
                    self.listeners[o.via].sendto(o.data, o.addr)
                else:
                    fam = socket.AF_INET6 if ":" in o.addr[0] else socket.AF_INET
                    self._upstream(o.system, o.via, fam).sendto(o.data, o.addr)
            except OSError as exc:
                self.send_errors += 1
                log.debug("radius send to %s failed: %s", o.addr, exc)

    # -- the one timer ------------------------------------------------------------------------

    def _arm(self) -> None:
        self._timer.arm()

    def _persist(self) -> None:
        self._pins.save(self.core.sticky_snapshot())

    def _restore(self) -> None:
        if self.store is not None:
            self.core.load_sticky(self._pins.load())

    async def adopt_others(self) -> None:
        """Learn the pins other nodes saved (read in a thread: the loop never waits)."""
        if self.store is not None:
            rows = await self.loop.run_in_executor(None, self._pins.load_others)
            if rows is not None:  # None: nothing new since the last round
                self.core.adopt_sticky(rows, self.loop.time())

    async def _persist_loop(self) -> None:
        next_save = self.loop.time() + PERSIST_EVERY
        while True:
            await asyncio.sleep(min(ADOPT_EVERY, PERSIST_EVERY))
            await self.adopt_others()
            if self.loop.time() >= next_save:
                next_save = self.loop.time() + PERSIST_EVERY
                if self.core.sticky_dirty:
                    await self._pins.save_async(self.core.sticky_snapshot())

    # -- service interface -----------------------------------------------------------------------

    @property
    def held_count(self) -> int:
        """Requests of customers in flight waiting for their flip (a drain waits for them)."""
        return self.core.held_count

    def status(self) -> dict[str, Any]:
        st = self.core.status()
        st["listen"] = [format_hostport(h, p) for h, p in self.addresses]
        st["send_errors"] = self.send_errors
        return st

    async def stop(self, persist: bool = True) -> None:
        """Close; save the pins unless ``persist`` is False (a start that failed to bind:
        what it loaded must not overwrite what a predecessor saves meanwhile)."""
        if self._persist_task is not None:
            self._persist_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._persist_task
            await self._pins.wait_saved()
        self._timer.cancel()
        # the pins are saved before the listeners close (no await between: nothing is read
        # in between): a successor (a SIGHUP reload) binds them once they are closed and
        # loads the pins then, so it must find this worker's last ones
        if persist:
            self._persist()
        for lst in self.listeners:
            lst.close()
        for sock in self._socks.values():
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()


async def _resolve(loop: asyncio.AbstractEventLoop, entries: list[str], default_port: int) -> list[Addr]:
    out: list[Addr] = []
    for e in entries:
        host, port = parse_hostport(e, default_port)
        host = host.strip("[]")
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        out.append((str(infos[0][4][0]), port))
    return out


async def _listening_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> tuple[socket.socket, bool]:
    """A bound non-blocking UDP socket on ``host:port``, and whether that is a wildcard
    address.  ``::`` takes IPv4 NAS too (dual stack), as SIP's wildcard listeners do."""
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setblocking(False)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock, ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]).is_unspecified


async def start_radius(cfg: Config, store: LocationStore) -> RadiusService:
    """Start the RADIUS dispatcher of ``cfg.radius`` on its auth and acct listeners."""
    loop = asyncio.get_running_loop()
    systems: list[SystemTarget] = []
    for name in ("source", "target"):
        sc = cfg.system(name)
        auth = await _resolve(loop, sc.radius, 1812)
        if sc.radius_acct:
            acct = await _resolve(loop, sc.radius_acct, 1813)
        else:  # the usual layout: accounting one port above authentication
            acct = [(h, p + 1) for h, p in auth]
        systems.append(SystemTarget(name, sc.radius_secret, auth, acct))
    rc = cfg.radius
    core = RadiusCore(
        [(c.address, c.secret, c.require_message_authenticator) for c in rc.clients],
        systems,
        make_decide(store),
        timeout=rc.timeout,
        retries=rc.retries,
        duplicate_window=rc.duplicate_window,
        lock_hold=cfg.store.lock_hold,
    )
    svc = RadiusService(core, store, loop, node_key(STICKY_META_KEY, rc.auth_listen, cfg.store.url))
    svc._restore()
    try:
        for via, listen, default in ((AUTH, rc.auth_listen, 1812), (ACCT, rc.acct_listen, 1813)):
            host, port = parse_hostport(listen, default)
            sock, wildcard = await _listening_socket(loop, host.strip("[]"), port)
            svc.listeners.append(_Listener(svc, via, sock, wildcard))
            big_buffers(sock)
            sockname = sock.getsockname()
            svc.addresses.append((sockname[0], sockname[1]))
    except OSError:
        await svc.stop(persist=False)
        raise
    # again now that the ports are this worker's: a predecessor (a SIGHUP reload) saved its
    # last pins just before it closed them (the load above serves requests read meanwhile)
    svc._restore()
    await svc.adopt_others()
    svc._persist_task = loop.create_task(svc._persist_loop())
    log.info("radius: auth on %s, acct on %s", format_hostport(*svc.addresses[0]), format_hostport(*svc.addresses[1]))
    return svc
