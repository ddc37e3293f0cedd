"""Wires the SIP proxy core to the location store and the configuration."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from sip.admission import Admission
from sip.flow import FlowSigner
from sip.health import HealthChecker, Node
from sip.peers import PeerSet
from sip.proxy import ProxyCore, ProxySettings, RegistrationSeen
from sip.ratelimit import RateLimiter
from sip.scanner import ScannerFilter
from sip.transport import SipEndpoint

from .config import Config, Endpoint, is_ip, parse_hostport, parse_peer
from .regfilter import RefreshFilter
from .regwriter import RegistrationWriter
from .store.base import BadIdentity, Decision, LocationStore, Registration, StoreError, normalise
from .tls import sip_client_context, sip_server_contexts

log = logging.getLogger("dsbc.sip")


def peer_set(entries: Sequence[str]) -> PeerSet:
    """CIDRs, IPs and IP:PORT pairs from configuration, as the core's ``PeerSet``."""
    peers = PeerSet()
    for entry in entries:
        net, port = parse_peer(entry)
        if port is not None:
            peers.add_pair(str(net.network_address), port)
        elif net.num_addresses == 1:
            peers.add_addr(str(net.network_address))
        else:
            peers.add_network(net)
    return peers


class StoreRouter:
    """The proxy's Router over a LocationStore (memory-only lookups)."""

    #: perf: the PeerSet's own (compiled) method, called by the core without a frame here
    is_trusted: Callable[[str, int], bool]

    def __init__(self, store: LocationStore, trusted: PeerSet) -> None:
        self.store = store
        self.is_trusted = trusted.contains
        self.lookups = 0  # out-of-dialog owner lookups (metrics)
        self.misses = 0  # ... that found no customer

    def decide(self, candidates: Sequence[tuple[str, str]]) -> Decision:
        store = self.store
        self.lookups += 1
        for kind, value in candidates:
            if not value:
                continue
            try:
                v = normalise(kind, value)
            except BadIdentity:
                continue
            loc = store.lookup(kind, v)
            if loc is not None:
                return Decision(loc.system, loc.customer_id, loc.state, f"{kind}:{v} -> customer {loc.customer_id}")
        self.misses += 1
        what = ", ".join(f"{k}:{v}" for k, v in candidates if v) or "no identity"
        return Decision(store.unknown, "", "active", f"{what} unknown -> store.unknown={store.unknown}")

    def expires_cap(self, customer_id: str) -> int:
        c = self.store.customer(customer_id)
        return c.expires_cap if c is not None else 0


def system_nodes(cfg: Config) -> list[Node]:
    nodes = []
    for system in ("source", "target"):
        for i, text in enumerate(cfg.system(system).sip):
            e = Endpoint.parse(text)
            nodes.append(Node(system, i, e.transport, e.host, e.port))
    return nodes


def trusted_peers(cfg: Config) -> PeerSet:
    t = peer_set(cfg.sip.trusted_peers)
    for n in system_nodes(cfg):
        if is_ip(n.host):  # names are resolved before the workers start (dsbc/resolve.py)
            t.add_pair(n.host, n.port)
    return t


def listeners(cfg: Config) -> list[tuple[str, str, int]]:
    return [(e.transport, e.host, e.port) for e in (Endpoint.parse(x) for x in cfg.sip.listen)]


def advertise(cfg: Config) -> tuple[str, dict[str, int]]:
    """The address put in Via / Record-Route / Path, and the port per transport."""
    lst = listeners(cfg)
    ports: dict[str, int] = {}
    for t, _, p in lst:
        ports.setdefault(t, p)
    host = ""
    if cfg.sip.advertise:
        text = cfg.sip.advertise
        if text.startswith("[") and text.endswith("]"):  # "[::1]": an IPv6 address, no port
            host = text[1:-1]
        elif text.count(":") == 1 or text.startswith("["):
            host, port = parse_hostport(text)
            # the port stands for the listeners on the first one's port (udp and tcp); one on
            # a port of its own (tls on 5061) keeps it: TLS advertised on the plain port sends
            # a TLS phone's in-dialog requests to a listener that cannot take them
            first = lst[0][2] if lst else port
            ports = {t: port if p == first else p for t, p in ports.items()} or {"udp": port}
        else:
            host = text
    if not host:
        host = next((h for _, h, _ in lst if h not in ("0.0.0.0", "::")), "") or primary_address()
    return host, ports


def advertised_hosts(cfg: Config, host: str) -> tuple[str, str]:
    """(address given to IPv4 peers, address given to IPv6 peers) in Via, Record-Route and
    Path: ``host`` (what `advertise` gave) for its own family (a name: both),
    ``advertise_ipv6``, else the first listener address of the other family; one address
    when nothing names two."""
    if not is_ip(host):
        return host, host  # a DNS name: the peers resolve it in their own family
    lst = listeners(cfg)

    def first(v6: bool) -> str:
        return next((h for _, h, _ in lst if (":" in h) == v6 and h not in ("0.0.0.0", "::")), "")

    v6 = cfg.sip.advertise_ipv6 or (host if ":" in host else first(True))
    v4 = host if ":" not in host else (first(False) or host)
    return v4, v6 or v4


def _alias_addresses(alias: str, ports: dict[str, int]) -> list[tuple[str, int]]:
    """(host, port) pairs that name dsbc: ``"host:port"`` that port only, a bare host
    every port dsbc listens on."""
    text = alias.strip().lower()
    if text.count(":") == 1 or (text.startswith("[") and "]:" in text):
        host, port = parse_hostport(text)
        return [(host.strip("[]"), port)]
    return [(text.strip("[]"), p) for p in ports.values()]


def primary_address() -> str:
    """The address of the interface that holds the default route (wildcard listeners and no
    ``sip.advertise``).  A UDP connect() chooses the route and sends nothing."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only the routing table is consulted
            addr = str(s.getsockname()[0])
    except OSError:
        addr = "127.0.0.1"
    log.warning("sip.advertise is not set and dsbc listens on a wildcard address: using %s "
                "in Via / Record-Route / Path (set sip.advertise to the VIP)", addr)
    return addr


def flow_secret(cfg: Config, store: LocationStore) -> bytes:
    """The HMAC key for flow tokens: configured, or made once and kept in the store."""
    if cfg.sip.flow_secret:
        return cfg.sip.flow_secret.encode()
    return store.set_meta("sip.flow_secret", secrets.token_hex(32), only_if_absent=True).encode()


class SipService:
    """One worker's SIP dispatcher: endpoint + core + store sync."""

    def __init__(self, cfg: Config, store: LocationStore, worker: int = 0, ipc_name: Callable[[int], str] | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.worker = worker
        host, ports = advertise(cfg)
        host, host6 = advertised_hosts(cfg, host)
        lst = listeners(cfg)
        local = (
            frozenset((h, p) for _, h, p in lst)
            | frozenset((a, p) for a in {host, host6} for p in ports.values())
            | frozenset(a for alias in cfg.sip.aliases for a in _alias_addresses(alias, ports))
        )
        settings = ProxySettings(
            advertise_host=host,
            advertise_host6=host6 if host6 != host else "",
            ports=ports,
            local_addresses=local,
            worker=worker,
            lock_hold=cfg.store.lock_hold,
            retry_after=cfg.sip.retry_after,
            max_message_size=cfg.sip.max_message_size,
        )
        health = HealthChecker(
            system_nodes(cfg), interval=cfg.sip.options_interval, timeout=cfg.sip.options_timeout, tag=f"w{worker}-{os.getpid()}-{secrets.token_hex(6)}"
        )
        self.advertised = host
        self.router = StoreRouter(store, trusted_peers(cfg))
        self.core = ProxyCore(settings, self.router, health, FlowSigner(flow_secret(cfg, store), [p.encode() for p in cfg.sip.flow_secret_previous]))
        sc = cfg.sip
        self.admission = Admission(
            is_trusted=self.router.is_trusted,
            counters=self.core.counters,
            limiter=RateLimiter(sc.rate_limit, sc.rate_window) if sc.rate_limit > 0 else None,
            scanners=ScannerFilter(sc.scanner_user_agents) if sc.drop_scanners and sc.scanner_user_agents else None,
            drop=sc.rate_limit_drop,
            server=settings.server,
            max_message_size=sc.max_message_size,
        )
        self.ipc_name = ipc_name
        self.endpoint: SipEndpoint | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # registrations go to the store from a thread: a stalled store never stalls SIP
        self.reg_writer = RegistrationWriter(cfg.store.url, cfg.store.unknown, store)
        self.reg_filter = RefreshFilter()  # frequent refreshes of one binding: one write

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ctx, per_listener = sip_server_contexts(self.cfg)  # read at each (re)start: SIGHUP
        client_ctx = sip_client_context(self.cfg)
        self.endpoint = SipEndpoint(
            self.core,
            loop,
            worker=self.worker,
            ipc_name=self.ipc_name,
            ssl_context=ctx,
            client_ssl_context=client_ctx,
            tcp_idle_timeout=self.cfg.sip.tcp_idle_timeout,
            tcp_stall_timeout=self.cfg.sip.tcp_stall_timeout,
            max_connections=self.cfg.sip.max_connections,
            max_connections_per_ip=self.cfg.sip.max_connections_per_ip,
            admission=self.admission,
        )
        self.endpoint.listener_ssl_contexts = per_listener
        await self.endpoint.listen(listeners(self.cfg))
        if self.worker == 0:  # where SIP is, as the API, RADIUS and control API say theirs
            log.info("SIP listening on %s, advertised as %s (%d worker(s))", ", ".join(self.cfg.sip.listen),
                     self.advertised, self.cfg.sip.workers)
        self._tasks.append(loop.create_task(self._registrations()))

    def customers_changed(self, ids: list[str]) -> None:
        """Called by the runner after the store's refresh() reported changes."""
        if self.endpoint is None or not ids:
            return
        sends = self.core.customers_changed(ids, self.endpoint.loop.time())
        if sends:
            self.endpoint.dispatch(sends)

    async def _registrations(self) -> None:
        """Write the registrations the workers relayed to the store, once a second."""
        while True:
            await asyncio.sleep(1.0)
            self.flush_registrations()
            await self.reg_writer.flush()

    def flush_registrations(self) -> None:
        events, self.core.events = self.core.events, []
        if events:
            self.reg_writer.add(registrations_of(events, self.store, self.reg_filter.fresh, time.time()))

    def drain(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop_listening()

    @property
    def held_count(self) -> int:
        """Requests of customers in flight waiting for their flip (a drain waits for them)."""
        return self.core.held_count

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.flush_registrations()
        self.reg_writer.close()
        if self.endpoint is not None:
            await self.endpoint.close()

    def status(self) -> dict[str, Any]:
        return {
            "counters": dict(self.core.counters),
            "held": self.core.held_count,
            "nodes": self.core.health.status(),
            "connections": len(self.endpoint.conns) if self.endpoint else 0,
            "lookups": self.router.lookups,
            "misses": self.router.misses,
            "registrations": {"pending": self.reg_writer.pending, "written": self.reg_writer.written,
                              "dropped": self.reg_writer.dropped, "write_failures": self.reg_writer.failures,
                              "coalesced": self.reg_filter.skipped},
            **self.admission.status(),
        }


def registrations_of(
    events: Sequence[RegistrationSeen],
    store: LocationStore,
    fresh: Callable[[str, str, str, int, float], bool],
    now: float,
) -> list[Registration]:
    """The store rows of the bindings the workers saw (``fresh`` skips refreshes already
    written).  A binding of 0 s is a removal; ``Contact: *`` removes every binding of the
    account the store has (read from the store: rare)."""
    regs: list[Registration] = []
    for ev in events:
        contacts = [(c, e) for c, e in ev.contacts if fresh(ev.account, c, ev.system, e, now)]
        if not contacts:
            continue
        try:
            account = normalise("account", ev.account)
        except BadIdentity:
            continue
        loc = store.lookup("account", account)
        cid = loc.customer_id if loc else ""
        for contact, expires in contacts:
            if contact == "*":
                for r in _stored_registrations(store, cid):
                    if r.account == account:
                        fresh(account, r.contact, ev.system, 0, now)  # (forget it was written)
                        regs.append(Registration(account, r.contact, ev.system, now, cid))
                continue
            regs.append(Registration(account, contact, ev.system, now + expires, cid))
    return regs


def _stored_registrations(store: LocationStore, customer_id: str) -> list[Registration]:
    if not customer_id:
        return []
    try:
        return store.registrations([customer_id])
    except StoreError as exc:
        log.warning("cannot read the registrations of customer %s: %s", customer_id, exc)
        return []
