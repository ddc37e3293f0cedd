"""asyncio adapters for the SIP proxy core: UDP, TCP (and TLS when given an SSLContext).

Thin by design: bytes in, ``ProxyCore.handle_data``, ``Send`` actions out.  Framing lives
in ``sip.framing``; routing in ``sip.proxy``.

Several worker processes share each listening port with SO_REUSEPORT.  A UDP datagram can
be sent from any worker's socket.  A stream connection lives in one worker: a message
for a connection of another worker is handed over a Unix datagram socket
(``\\0dsbc-<run>-<worker>`` in the abstract namespace).

Perf note: ``datagram_received`` is synchronous (parse, look up in memory, edit, sendto);
no task per datagram.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any, Final

from .admission import Admission
from .errors import SipError
from .flow import Flow
from .framing import NEED_DATA, PING, PONG, StreamFramer
from .message import SipMessage, parse_message
from .proxy import ProxyCore, Send
from .transport_sockets import big_buffers
from .transport_tls import Handshaking, TlsAcceptor

log = logging.getLogger("dsbc.sip")

LINGER = 2.0  # seconds a broken stream is read and discarded after its answer
#: a message handed to the worker that owns its connection: connection id, peer port, the
#: seconds a registration keeps that connection open (``Send.keep``), length of the peer IP
_IPC_HEAD: Final = "!IHIB"
_IPC_HEAD_SIZE: Final = struct.calcsize(_IPC_HEAD)
#: a hand-over to a worker whose queue is full is tried again every IPC_RETRY_EVERY seconds
#: for IPC_RETRY_FOR seconds (then 430); at most IPC_WAITING_MAX wait per worker
IPC_RETRY_EVERY: Final = 0.002
IPC_RETRY_FOR: Final = 2.0
IPC_WAITING_MAX: Final = 10_000
#: source IPs refused a connection remembered between two sweeps (a slot is freed for each)
CROWDED_MAX: Final = 1024


def _unmapped(ip: str) -> str:
    """An IPv4 peer on a "::" socket (``::ffff:a.b.c.d``) by its IPv4 address, as it is known
    to the config (trusted, pinged) and to flow tokens; any other address as it is."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


class SipDatagram(asyncio.DatagramProtocol):
    __slots__ = ("ep", "transport", "v6")

    def __init__(self, ep: SipEndpoint) -> None:
        self.ep = ep
        self.transport: asyncio.DatagramTransport | None = None
        self.v6 = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.v6 = transport.get_extra_info("socket").family == socket.AF_INET6

    # addr: (host, port) over IPv4, (host, port, flowinfo, scope_id) over IPv6; a compiled
    # (mypyc) build checks the annotation, so it must take both
    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) <= 4 and not data.strip():
            return  # CRLF keep-alive over UDP
        ep = self.ep
        ip: str = _unmapped(addr[0]) if self.v6 else addr[0]
        flow = Flow("udp", ip, addr[1])
        if ep.admission is not None:  # rate limit, scanners, size: before parsing
            verdict = ep.admission.check(data, flow, ep.loop.time())
            if verdict is not None:
                if verdict:
                    ep.dispatch(verdict)
                return
        try:
            sends = ep.core.handle_data(data, flow, ep.loop.time())
        except Exception:  # a bug must not kill the worker: count it and go on
            log.exception("internal error on a datagram from %s:%s", addr[0], addr[1])
            ep.core.counters["internal_errors"] += 1
            return
        if sends:
            ep.dispatch(sends)

    def error_received(self, exc: Exception) -> None:
        self.ep.core.counters["udp_errors"] += 1


class SipStream(asyncio.Protocol):
    __slots__ = (
        "closing", "conn_id", "ep", "flow", "framer", "keep_until", "last_activity", "outbound", "partial_since", "peer",
        "pending", "transport",
    )  # fmt: skip

    def __init__(self, ep: SipEndpoint, outbound: bool = False, transport_name: str = "tcp") -> None:
        self.ep = ep
        self.transport: asyncio.Transport | None = None
        self.framer = StreamFramer(ep.core.s.max_message_size)
        self.conn_id = next(ep.conn_ids)
        self.flow: Flow | None = None
        self.last_activity = ep.loop.time()
        #: a registration granted through this connection: not closed as idle before this
        self.keep_until = 0.0
        self.partial_since = 0.0  # when the message now in the framer began (slowloris)
        self.outbound = outbound
        self.pending: list[bytes] = []
        self.peer = transport_name
        self.closing = False  # answered a broken stream; reading only to discard (linger)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        ep = self.ep
        if peer is None:  # reset before the loop handed it over: nothing left to serve
            transport.close()
            return
        ip = _unmapped(peer[0])
        if len(ep.conns) >= ep.max_connections or (
            not self.outbound and ep.per_ip.get(ip, 0) >= ep.max_connections_per_ip
        ):
            ep.core.counters["tcp_refused"] += 1
            if len(ep.crowded) < CROWDED_MAX:  # the sweep frees a slot held by a silent kept one
                ep.crowded.add(ip)
            transport.close()
            return
        self.flow = Flow(self.peer, ip, peer[1], self.conn_id, ep.worker)
        ep.conns[self.conn_id] = self
        ep.by_addr[(self.peer, ip, peer[1])] = self
        ep.per_ip[ip] = ep.per_ip.get(ip, 0) + 1
        for data in self.pending:
            self.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # the rest of a stream we gave up on
        ep = self.ep
        self.last_activity = ep.loop.time()
        framer = self.framer
        framer.receive_data(data)
        while True:
            try:
                event = framer.next_event()
            except SipError as exc:
                ep.core.counters["stream_framing_errors"] += 1
                self._fail(exc)
                return
            if event is NEED_DATA:
                if not self.partial_since and (framer.buffered > 3 or bytes(framer._buf).strip(b"\r\n")):
                    self.partial_since = self.last_activity
                return
            if event is PING:
                assert self.transport is not None
                self.transport.write(PONG)
                continue
            assert isinstance(event, bytes) and self.flow is not None
            self.partial_since = 0.0
            if ep.admission is not None:
                verdict = ep.admission.check(event, self.flow, self.last_activity)
                if verdict is not None:
                    if verdict:
                        ep.dispatch(verdict)
                    continue
            try:
                sends = ep.core.handle_data(event, self.flow, ep.loop.time())
            except Exception:
                log.exception("internal error on a message from %s", self.flow)
                ep.core.counters["internal_errors"] += 1
                continue
            if sends:
                ep.dispatch(sends)

    def _fail(self, exc: SipError) -> None:
        """Answer what can be answered, then close: the stream cannot be resynchronised."""
        t = self.transport
        if t is None:
            return
        buffered = bytes(self.framer._buf)
        if exc.respond and buffered[:4] != b"SIP/":
            try:
                # read as a datagram it may well parse (a too-large message that arrived
                # whole): it is answered all the same
                req: SipMessage | None = parse_message(buffered, datagram=True, max_size=max(len(buffered), 1))
            except SipError as e2:
                req = getattr(e2, "partial", None)
            except Exception:  # noqa: BLE001 - best effort answer only
                log.debug("no answer possible to a broken stream from %s", self.flow)
                req = None
            if req is not None and req.method != "ACK":
                try:
                    t.write(self.ep.core.answer_bytes(req, exc.status, exc.reason, self.flow))
                except (SipError, ValueError):
                    log.debug("no answer possible to a broken stream from %s", self.flow)
        self.closing = True
        if t.can_write_eof():
            # lingering close: closing with the peer's octets unread makes the kernel send a
            # reset, which destroys our answer in the peer's receive buffer (a phone sending
            # a too-large INVITE would see a reset, not the 513).  Half-close, discard what
            # still comes, close for good when the peer does or after LINGER seconds.
            t.write_eof()
            self.ep.loop.call_later(LINGER, t.close)
        else:
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        ep = self.ep
        if ep.conns.pop(self.conn_id, None) is not None and self.flow is not None:
            key = (self.peer, self.flow.ip, self.flow.port)
            if ep.by_addr.get(key) is self:  # not a new connection to the same address
                del ep.by_addr[key]
            n = ep.per_ip.get(self.flow.ip, 1) - 1
            if n <= 0:
                ep.per_ip.pop(self.flow.ip, None)
            else:
                ep.per_ip[self.flow.ip] = n

    def keep_for(self, seconds: int) -> None:
        """A registration was granted through this connection for ``seconds``: the registrar
        reaches the phone through it until then, so it is not closed as idle before."""
        self.keep_until = max(self.keep_until, self.ep.loop.time() + seconds)

    def gone(self) -> bool:
        """Closed or closing: a write would be lost (the loop tells us a little later)."""
        return self.closing or (self.transport is not None and self.transport.is_closing())

    def write(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        elif self.gone():
            if self.outbound:  # a node's connection (``_send`` opens a new one next time)
                self.ep.core.counters["flow_gone"] += 1
            else:  # a device's flow: the sender hears 430, as for a connection already gone
                self.ep._flow_failed(data)
        else:
            self.transport.write(data)


class SipEndpoint:
    """One worker's SIP sockets around one ProxyCore."""

    def __init__(
        self,
        core: ProxyCore,
        loop: asyncio.AbstractEventLoop,
        *,
        worker: int = 0,
        ipc_name: Callable[[int], str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        client_ssl_context: ssl.SSLContext | None = None,
        tcp_idle_timeout: float = 600.0,
        tcp_stall_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        max_connections: int = 20000,
        max_connections_per_ip: int = 200,
        admission: Admission | None = None,
    ) -> None:
        self.core = core
        self.admission = admission
        self.loop = loop
        self.worker = worker
        self.ipc_name = ipc_name
        self.ssl_context = ssl_context
        #: (host, port) of tls: listeners with a context of their own (mutual TLS)
        self.listener_ssl_contexts: dict[tuple[str, int], ssl.SSLContext] = {}
        self.client_ssl_context = client_ssl_context
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_stall_timeout = tcp_stall_timeout
        #: an outgoing TCP / TLS connection (and its handshake) that is not up by then has
        #: failed (Kamailio's tcp_connect_timeout; the kernel alone retries SYNs for 2 min)
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.conn_ids = itertools.count(1)
        self.conns: dict[int, SipStream] = {}
        self.by_addr: dict[tuple[str, str, int], SipStream] = {}
        self.per_ip: dict[str, int] = {}
        #: source IPs refused at max_connections_per_ip since the last sweep (``_sweep``)
        self.crowded: set[str] = set()
        self.udp: list[SipDatagram] = []
        self.servers: list[asyncio.AbstractServer | TlsAcceptor] = []
        #: TLS connections accepted and still in their handshake, per source IP and in all:
        #: they hold a slot of the caps (transport_tls.py)
        self.handshaking = Handshaking("SIP")
        self.health_udp: SipDatagram | None = None
        self._ipc: socket.socket | None = None
        #: hand-overs waiting for a worker whose queue was full: (deadline, packet, message)
        self._ipc_waiting: dict[int, collections.deque[tuple[float, bytes, bytes]]] = {}
        self._ipc_retry: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._sweeper: asyncio.Task[None] | None = None

    # --- setup -------------------------------------------------------------------------

    async def listen(self, listeners: list[tuple[str, str, int]]) -> None:
        # health pings leave from a socket of their own so that the answers come back here:
        # on the first UDP listener's address, or on "::" (both families) when the nodes
        # pinged over UDP need a family that address does not reach.  It comes first:
        # traffic on a listener arms the core's timer, and a ping sent before the socket
        # existed was lost, then judged a silence: every node down for a moment (found by an
        # audit: 503 for the BYEs of calls in progress after a restart)
        host = next((h for t, h, _ in listeners if t == "udp"), "")
        want_v6 = {":" in st.node.host for st in self.core.health.states.values() if st.node.transport == "udp"}
        if not host or (host != "::" and want_v6 - {":" in host}):
            host = "::" if True in want_v6 else "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        hs = socket.socket(family, socket.SOCK_DGRAM)
        hs.bind((host, 0))
        _, self.health_udp = await self.loop.create_datagram_endpoint(lambda: SipDatagram(self), sock=hs)
        self.core.health.local_host = self.core.s.advertise_host
        self.core.health.local_port = hs.getsockname()[1]
        for transport, host, port in listeners:
            if transport == "udp":
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                big_buffers(sock)
                sock.bind((host, port))
                _, proto = await self.loop.create_datagram_endpoint(lambda: SipDatagram(self), sock=sock)
                self.udp.append(proto)
            else:
                ctx = self.listener_ssl_contexts.get((host, port), self.ssl_context) if transport == "tls" else None
                if transport == "tls" and ctx is None:
                    raise ValueError("a tls: listener needs a certificate")
                # "::" takes IPv4 too, as the udp: listener does (asyncio would set
                # IPV6_V6ONLY, and tcp:0.0.0.0 beside it is the same port)
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
                if host == "::":
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                try:
                    sock.bind((host, port))
                except OSError:
                    sock.close()
                    raise
                if ctx is not None:  # admitted at the accept, before the handshake
                    sock.listen(1024)
                    self.servers.append(TlsAcceptor(
                        self.loop, sock, lambda: SipStream(self, transport_name="tls"), ctx,
                        min(60.0, self.tcp_stall_timeout), self))
                    continue
                server = await self.loop.create_server(
                    lambda: SipStream(self, transport_name="tcp"),
                    sock=sock,
                    backlog=1024,
                )
                self.servers.append(server)
        if self.ipc_name is not None:
            self._ipc = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._ipc.bind(self.ipc_name(self.worker))
            self._ipc.setblocking(False)
            self.loop.add_reader(self._ipc.fileno(), self._ipc_readable)
        self._sweeper = self.loop.create_task(self._sweep())
        self.reschedule()

    async def close(self) -> None:
        # what is still held (taken over UDP while draining, or past the drain's deadline)
        # is answered before the sockets close: never left without a final answer
        self.dispatch(self.core.release_all_held(self.loop.time()))
        for s in self.servers:
            s.close()
        for u in self.udp:
            if u.transport:
                u.transport.close()
        if self.health_udp and self.health_udp.transport:
            self.health_udp.transport.close()
        if self._ipc_retry is not None:  # a last try for what waits, then 430 for the rest
            self._ipc_retry.cancel()
            self._ipc_waiting = {w: collections.deque((0.0, p, d) for _, p, d in q) for w, q in self._ipc_waiting.items()}
            self._ipc_send_waiting()
        if self._ipc is not None:
            self.loop.remove_reader(self._ipc.fileno())
            self._ipc.close()
        if self._timer:
            self._timer.cancel()
        if self._sweeper:
            self._sweeper.cancel()
        for c in list(self.conns.values()):
            if c.transport:
                c.transport.close()

    # --- the TLS acceptors' gate (transport_tls.Gate) ---------------------------------------

    def admit(self, ip: str) -> bool:
        """A slot for a TLS connection from ``ip`` in its handshake, or refused (over a cap)."""
        ip = _unmapped(ip)
        if not self.handshaking.take(ip, len(self.conns), self.per_ip.get(ip, 0),
                                     self.max_connections, self.max_connections_per_ip):
            self.core.counters["tcp_refused"] += 1
            if len(self.crowded) < CROWDED_MAX:
                self.crowded.add(ip)
            return False
        return True

    def release(self, ip: str) -> None:
        self.handshaking.release(_unmapped(ip))

    def failed(self, ip: str, exc: BaseException) -> None:
        self.core.counters["tls_handshake_failed"] += 1
        self.handshaking.failed(_unmapped(ip), exc)

    def stop_listening(self) -> None:
        """Drain: stop accepting new connections, keep the existing ones.  The UDP sockets
        stay open until ``close()``: what the worker holds for a migration is released into
        them (a held INVITE was answered 100 Trying, so the phone no longer retransmits it),
        and a datagram the kernel hands them meanwhile is served rather than lost."""
        for s in self.servers:
            s.close()

    # --- sending ------------------------------------------------------------------------

    def dispatch(self, sends: list[Send]) -> None:
        for s in sends:
            try:
                self._send(s)
            except (OSError, ValueError):  # ValueError: no socket of the address's family
                self.core.counters["send_errors"] += 1
        core = self.core
        if core.timers_changed or self._timer is None:
            core.timers_changed = False
            self.reschedule()

    def _send(self, s: Send) -> None:
        if s.transport == "udp":
            sock = self.health_udp if s.health else self._udp_for(s.ip)
            if sock is not None and sock.transport is not None:
                # an IPv4 peer through an IPv6 socket bound to "::" (it takes both families)
                ip = s.ip if not sock.v6 or ":" in s.ip else "::ffff:" + s.ip
                sock.transport.sendto(s.data, (ip, s.port))
            return
        if s.conn_id:
            if s.worker in (-1, self.worker):
                conn = self._conn_for(s.conn_id, s.ip, s.port)
                if conn is not None:
                    if s.keep:
                        conn.keep_for(s.keep)
                    conn.write(s.data)
                else:
                    self._flow_failed(s.data)
                return
            self._handover(s)
            return
        conn = self.by_addr.get((s.transport, s.ip, s.port))
        if conn is None or conn.gone():  # the node closed or reset it: a new one
            conn = self._connect(s.transport, s.ip, s.port)
        conn.write(s.data)

    def _udp_for(self, ip: str) -> SipDatagram | None:
        v6 = ":" in ip
        for u in self.udp:
            if u.transport is not None and u.v6 == v6:
                return u
        return self.udp[0] if self.udp else None

    def _connect(self, transport: str, ip: str, port: int) -> SipStream:
        proto = SipStream(self, outbound=True, transport_name=transport)
        ctx = self.client_ssl_context if transport == "tls" else None
        self.by_addr[(transport, ip, port)] = proto

        async def run() -> None:
            try:
                await asyncio.wait_for(self.loop.create_connection(lambda: proto, ip, port, ssl=ctx),
                                       self.connect_timeout)
            except OSError:  # TimeoutError among them
                self.core.counters["connect_errors"] += 1
                if self.by_addr.get((transport, ip, port)) is proto:
                    del self.by_addr[(transport, ip, port)]
                self.core.health.mark_unreachable(ip, port, self.loop.time())
                self._unsent(proto.pending)
                proto.pending.clear()

        self.loop.create_task(run())
        return proto

    def _flow_failed(self, data: bytes) -> None:
        """The connection a flow token named is gone: a request gets 430 Flow Failed (RFC 5626
        section 5.3) as if the device had answered it, relayed back by Via to the sender."""
        self.core.counters["flow_gone"] += 1
        if self._answer_for_hop(data, 430, "Flow Failed"):
            self.core.counters["flow_failed_430"] += 1

    def _unsent(self, pending: list[bytes]) -> None:
        """Requests a connection to a node never carried (the node died between two health
        pings): RFC 3261 16.9 takes the transport's error for a 503 from that hop.  Those
        that came over TCP / TLS (our Via names their flow) get it, with Retry-After: their
        senders never retransmit.  A UDP sender's retransmission finds the next node."""
        retry = [("retry-after", str(self.core.s.retry_after))]
        for data in pending:
            if self._answer_for_hop(data, 503, "Service Unavailable", retry, streams_only=True):
                self.core.counters["unsent_503"] += 1

    def _answer_for_hop(self, data: bytes, status: int, reason: str, extra: list[tuple[str, str]] | None = None,
                        streams_only: bool = False) -> bool:
        """Answer a request dsbc could not deliver as if its next hop had: the answer goes
        back through the core (our Via off, by the sender's Via or flow).  False if none;
        ``streams_only``: only for a request that came over TCP / TLS (our Via's ``dsbcf``)."""
        if data[:4] == b"SIP/":
            return False
        try:
            req = parse_message(data, datagram=False, max_size=max(len(data), 1))
            if req.method == "ACK" or (streams_only and not req.vias[0].param("dsbcf")):
                return False
            answer = self.core.answer_bytes(req, status, reason, None, extra)
            sends = self.core.handle_data(answer, Flow("udp", "127.0.0.1", 0), self.loop.time())
        except Exception:
            log.debug("no %d possible for a request that could not be sent", status, exc_info=True)
            return False
        for out in sends:  # a response: if its own flow is gone too, it is only counted
            try:
                self._send(out)
            except OSError:
                self.core.counters["send_errors"] += 1
        return True

    def _handover(self, s: Send) -> None:
        """To the worker that owns the flow's connection.  A worker this node does not have
        (a token another node wrote: the nodes share the flow secret) or one that is gone
        is a gone flow: 430, as for a closed connection, not a silence.  A worker whose
        queue is full (Linux takes net.unix.max_dgram_qlen, 10, datagrams before it reads:
        a burst of calls to TCP/TLS phones) gets the message a little later, in order."""
        if self.ipc_name is None or self._ipc is None:
            self._flow_failed(s.data)
            return
        try:
            ip = s.ip.encode("ascii")
            packet = struct.pack(_IPC_HEAD, s.conn_id, s.port, s.keep, len(ip)) + ip + s.data
        except (UnicodeEncodeError, struct.error):
            self._flow_failed(s.data)
            return
        waiting = self._ipc_waiting.get(s.worker)
        if waiting is not None:  # behind what already waits for that worker
            if len(waiting) >= IPC_WAITING_MAX:
                self._flow_failed(s.data)
            else:
                waiting.append((self.loop.time() + IPC_RETRY_FOR, packet, s.data))
            return
        try:
            self._ipc.sendto(packet, self.ipc_name(s.worker))
            self.core.counters["handovers"] += 1
        except BlockingIOError:
            self.core.counters["handovers_delayed"] += 1
            self._ipc_waiting[s.worker] = collections.deque([(self.loop.time() + IPC_RETRY_FOR, packet, s.data)])
            self._ipc_retry_later()
        except OSError:
            self._flow_failed(s.data)

    def _ipc_retry_later(self) -> None:
        if self._ipc_retry is None:
            self._ipc_retry = self.loop.call_later(IPC_RETRY_EVERY, self._ipc_send_waiting)

    def _ipc_send_waiting(self) -> None:
        """Send what waits for workers whose queue was full; past IPC_RETRY_FOR: 430."""
        self._ipc_retry = None
        if self._ipc is None or self.ipc_name is None:
            return
        now = self.loop.time()
        for worker in list(self._ipc_waiting):
            waiting = self._ipc_waiting[worker]
            name = self.ipc_name(worker)
            while waiting:
                deadline, packet, data = waiting[0]
                try:
                    self._ipc.sendto(packet, name)
                    self.core.counters["handovers"] += 1
                except BlockingIOError:
                    if deadline > now:
                        break
                    self._flow_failed(data)
                except OSError:
                    self._flow_failed(data)
                waiting.popleft()
            if not waiting:
                del self._ipc_waiting[worker]
        if self._ipc_waiting:
            self._ipc_retry_later()

    def _ipc_readable(self) -> None:
        assert self._ipc is not None
        for _ in range(64):
            try:
                data = self._ipc.recv(262144)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(data) < _IPC_HEAD_SIZE:
                continue
            conn_id, port, keep, ip_len = struct.unpack(_IPC_HEAD, data[:_IPC_HEAD_SIZE])
            ip = data[_IPC_HEAD_SIZE : _IPC_HEAD_SIZE + ip_len].decode("ascii", "replace")
            body = data[_IPC_HEAD_SIZE + ip_len :]
            conn = self._conn_for(conn_id, ip, port)
            if conn is not None:
                if keep:
                    conn.keep_for(keep)
                conn.write(body)
            else:
                self._flow_failed(body)

    def _conn_for(self, conn_id: int, ip: str, port: int) -> SipStream | None:
        """The connection a flow names, only if it is still the one with that peer: connection
        ids start again at 1 in a new worker (a SIGHUP reload, a restart), and a flow token
        the systems still hold (a Path, a Record-Route) must not reach another device that
        got the same id."""
        conn = self.conns.get(conn_id)
        if conn is None or conn.flow is None or conn.flow.ip != ip or conn.flow.port != port:
            return None
        return conn

    # --- timers -------------------------------------------------------------------------

    def reschedule(self) -> None:
        at = self.core.get_timer()
        if at is None:
            return
        if self._timer is not None and not self._timer.cancelled() and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(max(at, self.loop.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        try:
            sends = self.core.handle_timer(self.loop.time())
        except Exception:
            log.exception("internal error in the SIP timer")
            sends = []
        self.dispatch(sends)
        self._rearm()

    def _rearm(self) -> None:
        # A method of its own: in _on_timer mypy narrows self._timer to None after the
        # assignment, and the compiled check of that narrowed type raised once dispatch()
        # had re-armed the timer.
        if self._timer is None:
            at = self.core.get_timer()
            if at is not None:
                self._timer_at = at
                self._timer = self.loop.call_at(max(at, self.loop.time() + 0.01), self._on_timer)

    async def _sweep(self) -> None:
        """Close idle connections and slow clients that hold half a message."""
        while True:
            await asyncio.sleep(min(1.0, self.tcp_stall_timeout / 2))
            now = self.loop.time()
            crowded, self.crowded = self.crowded, set()
            #: per crowded source IP: its connection silent the longest, kept only for a registration
            evict: dict[str, tuple[float, SipStream]] = {}
            for c in list(self.conns.values()):
                idle = now - c.last_activity
                if (crowded and idle > self.tcp_idle_timeout and now < c.keep_until and c.flow is not None
                        and c.flow.ip in crowded):
                    best = evict.get(c.flow.ip)
                    if best is None or idle > best[0]:
                        evict[c.flow.ip] = (idle, c)
                # a message begun and not finished within the stall timeout, however slowly
                # its octets keep trickling in (slowloris)
                stalled = c.partial_since > 0 and now - c.partial_since > self.tcp_stall_timeout
                if (idle > self.tcp_idle_timeout and now >= c.keep_until) or stalled:
                    self.core.counters["tcp_idle_closed" if not stalled else "tcp_stalled_closed"] += 1
                    if c.transport:
                        c.transport.close()
            # a source at max_connections_per_ip whose slots are held by connections silent past
            # tcp_idle_timeout, kept only for the registrations made through them (a phone
            # behind a NAT that dropped its idle mapping registers again over a new
            # connection; the old one never says anything again): the oldest goes, one per
            # sweep, rather than the phone's new connection being refused until they expire
            for _, c in evict.values():
                if c.transport and not c.gone():
                    self.core.counters["tcp_idle_closed"] += 1
                    c.transport.close()
