"""The Diameter dispatcher service: a listener for clients, a link per system, one timer.

Wires :mod:`dsbc.diameter.peer` connections to the I/O-free
:class:`dsbc.diameter.routing.DiameterRouter`.  ``start_diameter(cfg, store)`` is what
``dsbc run`` calls; ``await service.stop()`` sends DPR to every peer and client and
waits (briefly) for their DPA.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from typing import Any

from dsbc.config import Config, format_hostport, parse_hostport
from dsbc.diameter import codec as dc
from dsbc.diameter.peer import Connection, ConnState, LocalNode, PeerLink
from dsbc.diameter.routing import TO_CLIENT, DiameterRouter, Send, SystemRoute
from dsbc.store.base import BadIdentity, LocationStore, normalise
from sip.logbudget import LogBudget

from ..core_timer import CoreTimer, PinnedRows, node_key

log = logging.getLogger("dsbc.diameter")

SESSIONS_META_KEY = "diameter.sessions"
PERSIST_EVERY = 30.0
DRAIN_LIMIT = 2.0  # seconds a stopping dispatcher waits for the answers of requests in flight
SUCCESSOR_WAIT = 3.0  # seconds a replaced dispatcher waits for its successor to listen
LINKS_WAIT = 2.0  # seconds a starting dispatcher waits for its links before it serves


def make_decide(store: LocationStore) -> Any:
    """Candidates ``[(kind, value), ...]`` -> (system, state) of the first known identity."""

    def decide(cands: list[tuple[str, str]]) -> tuple[str, str]:
        for kind, value in cands:
            try:
                v = normalise(kind, value)
            except BadIdentity:
                continue
            if store.lookup(kind, v) is not None:
                d = store.decide(kind, v)
                return d.system, d.state
        return store.unknown, "active"

    return decide


class DiameterService:
    """A running Diameter dispatcher."""

    def __init__(self, cfg: Config, store: LocationStore | None, router: DiameterRouter, node: LocalNode) -> None:
        self.cfg = cfg
        self.store = store
        self.router = router
        self.node = node
        self.loop = asyncio.get_running_loop()
        self.links: dict[str, PeerLink] = {}
        self.clients: dict[int, Connection] = {}
        self.server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] | None = None
        self.bad_messages = 0
        #: set by the worker when a reload replaces it: its successor will listen on the
        #: same port, and the clients told to reconnect must find it there
        self.handover = False
        self._timer = CoreTimer(self.loop, self.router.get_timer, self.router.handle_timer, self._send)
        self._pins = PinnedRows(store, node_key(SESSIONS_META_KEY, cfg.diameter.listen, cfg.store.url), self.loop,
                                "diameter sessions", legacy_key=SESSIONS_META_KEY)
        self._persist_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._clients = [ipaddress.ip_network(p, strict=False) for p in cfg.diameter.clients]
        self.refused_peers = 0
        #: refused CERs and connections closed before their capabilities exchange: any host
        #: that reaches the port can cause them, one per connection (bounded lines)
        self.refusals_log = LogBudget(log, "refused or failed Diameter connections")

    def _allowed(self, peer: Any) -> bool:
        """Whether a client at ``peer`` (its socket's peer address) is in ``diameter.clients``."""
        try:
            ip = ipaddress.ip_address(peer[0])
        except (TypeError, ValueError, IndexError):
            ip = None
        if ip is not None and isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip is not None and any(ip in net for net in self._clients):
            return True
        self.refused_peers += 1
        self.refusals_log.log(logging.WARNING, "diameter: CER from %s refused (3010): not in diameter.clients", peer)
        return False

    # -- connection events (peer.Owner) ----------------------------------------------------------

    def new_client(self) -> Connection:
        c = self.cfg.diameter
        conn = Connection(self, self.node, False, watchdog=c.watchdog_interval, cer_timeout=c.cer_timeout,
                          accept_apps={dc.APP_CREDIT_CONTROL},
                          accept_peer=self._allowed if self._clients else None,
                          log_budget=self.refusals_log)
        conn.key = conn.id
        self.clients[conn.id] = conn
        return conn

    def on_open(self, conn: Connection) -> None:
        if isinstance(conn.key, str):
            log.info("diameter: %s peer %s is open", conn.key, conn.peer_host)
            self._send(self.router.peer_state(conn.key, True, conn.peer_host, conn.peer_realm))
        else:
            self.router.client_open(conn.id, conn.peer_host)

    def on_closed(self, conn: Connection) -> None:
        self.bad_messages += conn.bad_messages
        if isinstance(conn.key, str):
            link = self.links.get(conn.key)
            if link is not None and link.conn is conn and conn.peer_host:
                (log.info if self._stopping else log.warning)("diameter: %s peer %s is down (%s)", conn.key, conn.peer_host, conn.close_reason)
                self._send(self.router.peer_state(conn.key, False))
        else:
            self.clients.pop(conn.id, None)
            self.router.client_closed(conn.id)
        self._arm()

    def on_message(self, conn: Connection, msg: dc.Message) -> None:
        now = self.loop.time()
        try:
            if isinstance(conn.key, str):
                out = (self.router.peer_request(conn.key, msg, now) if msg.is_request
                       else self.router.answer_from(conn.key, msg, now))
            else:
                out = (self.router.client_request(conn.id, msg, now) if msg.is_request
                       else self.router.answer_from(conn.id, msg, now))
        except dc.DiameterDecodeError as exc:
            self.bad_messages += 1
            if msg.is_request:
                conn.send(dc.encode(dc.error_answer(msg, exc, self.node.origin_host, self.node.origin_realm)))
            return
        self._send(out)
        self._arm()

    def _send(self, out: list[Send]) -> None:
        for s in out:
            if s.kind == TO_CLIENT:
                conn = self.clients.get(s.target)  # type: ignore[arg-type]
            else:
                link = self.links.get(s.target)  # type: ignore[arg-type]
                conn = link.conn if link is not None else None
            if conn is not None and conn.state == ConnState.OPEN:
                conn.send(s.data)

    # -- the one timer ----------------------------------------------------------------------------

    def _arm(self) -> None:
        self._timer.arm()

    def _persist(self) -> None:
        self._pins.save(self.router.sessions_snapshot())

    def _restore(self) -> None:
        if self.store is not None:
            self.router.load_sessions(self._pins.load())

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(PERSIST_EVERY)
            if self.router.sessions_dirty:
                await self._pins.save_async(self.router.sessions_snapshot())

    # -- service interface ------------------------------------------------------------------------

    @property
    def held_count(self) -> int:
        """Requests of customers in flight waiting for their flip (a drain waits for them)."""
        return self.router.held_count

    def status(self) -> dict[str, Any]:
        st = self.router.status()
        systems = st["systems"]
        assert isinstance(systems, dict)
        for name, link in self.links.items():
            systems[name]["link"] = link.status()
        st["listen"] = f"{self.address[0]}:{self.address[1]}" if self.address else ""
        st["bad_messages"] = self.bad_messages + sum(c.bad_messages for c in self.clients.values())
        st["refused_peers"] = self.refused_peers
        return st

    async def stop(self) -> None:
        self._stopping = True
        if self._persist_task is not None:
            self._persist_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._persist_task
            await self._pins.wait_saved()
        # saved before the listener closes: a successor (a SIGHUP reload) binds it once it
        # is closed and loads the sessions then; saved again below with the last changes
        self._persist()
        if self.server is not None:
            self.server.close()
            if self.handover and self.address is not None:
                # the DPRs below make the clients reconnect at once: a PGW refused then
                # waits its Tc timer (often 30 s) with no credit control
                await self._successor_listening(self.address)
        # the answers to requests in flight still reach their clients before the DPRs (a
        # PGW left without its CCA applies Credit-Control-Failure-Handling to the session)
        deadline = self.loop.time() + min(self.cfg.diameter.request_timeout, DRAIN_LIMIT)
        while self.router.in_flight() and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.gather(*(link.stop() for link in self.links.values()),
                             *(c.disconnect(dc.DISCONNECT_REBOOTING) for c in list(self.clients.values())),
                             return_exceptions=True)
        self._timer.cancel()
        self._persist()

    async def _successor_listening(self, address: tuple[str, int]) -> None:
        """Until another socket listens on ``address`` (a plain bind is refused), for
        SUCCESSOR_WAIT at most."""
        deadline = self.loop.time() + SUCCESSOR_WAIT
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        while self.loop.time() < deadline:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # past the connections in TIME_WAIT, not past a listener
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                except OSError:
                    return
            await asyncio.sleep(0.01)
        log.warning("diameter: no successor listening on %s after %g s; disconnecting "
                    "the clients anyway", format_hostport(address[0], address[1]), SUCCESSOR_WAIT)


async def start_diameter(cfg: Config, store: LocationStore) -> DiameterService:
    """Listen for Diameter clients on ``diameter.listen`` and connect to each system's peer."""
    c = cfg.diameter
    host, port = parse_hostport(c.listen, 3868)
    host = host.strip("[]")
    # (each connection advertises its own local address; this is the fallback)
    ips = [host] if host not in ("0.0.0.0", "::", "") else [_primary_ip()]
    node = LocalNode(c.origin_host, c.origin_realm, [dc.APP_CREDIT_CONTROL], ips)
    routes = [SystemRoute(n, cfg.system(n).diameter_host, cfg.system(n).diameter_realm) for n in ("source", "target")]
    router = DiameterRouter(routes, make_decide(store), c.origin_host, c.origin_realm,
                            request_timeout=c.request_timeout, lock_hold=cfg.store.lock_hold,
                            hbh_seed=node.state_id << 8)
    svc = DiameterService(cfg, store, router, node)
    svc._restore()
    # not serving until the links to the systems are open (below): on a reload the clients
    # of the replaced worker reconnect here, and would get 3002 for their first requests
    if host == "::":
        svc.server = await svc.loop.create_server(svc.new_client, sock=_dual_stack_socket(port),
                                                  start_serving=False)
    else:
        svc.server = await svc.loop.create_server(svc.new_client, host, port, reuse_address=True,
                                                  start_serving=False)
    # again now that the port is this worker's: a predecessor (a SIGHUP reload) saved its
    # last sessions just before it closed it
    svc._restore()
    sock = svc.server.sockets[0].getsockname()
    svc.address = (sock[0], sock[1])
    for name in ("source", "target"):
        sc = cfg.system(name)
        if not sc.diameter:
            continue
        phost, pport = parse_hostport(sc.diameter, 3868)
        link = PeerLink(svc, node, name, phost.strip("[]"), pport, watchdog=c.watchdog_interval,
                        cer_timeout=c.cer_timeout, backoff_min=c.reconnect_min, backoff_max=c.reconnect_max)
        svc.links[name] = link
        link.start()
    svc._persist_task = svc.loop.create_task(svc._persist_loop())
    deadline = svc.loop.time() + min(c.cer_timeout, LINKS_WAIT)
    while svc.loop.time() < deadline and not all(link.is_open for link in svc.links.values()):
        await asyncio.sleep(0.01)
    await svc.server.start_serving()
    log.info("diameter: listening on %s as %s", format_hostport(*svc.address), c.origin_host)
    if not c.clients and not ipaddress.ip_address(svc.address[0]).is_loopback:
        log.warning("diameter: diameter.clients is empty: any host that reaches %s may connect",
                    format_hostport(*svc.address))
    return svc


def _dual_stack_socket(port: int) -> socket.socket:
    """A listening socket on ``::`` that takes IPv4 clients too, as SIP's and RADIUS's
    wildcard listeners do (asyncio would set IPV6_V6ONLY: every IPv4 PGW was refused)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        sock.listen(100)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _primary_ip() -> str:
    """The address we advertise in Host-IP-Address when listening on the wildcard."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
