"""The dispatching proxy core (SPEC section 6), free of I/O: bytes and time in, sends out.

``ProxyCore.handle_data(data, flow, now)`` takes one datagram or one framed stream message
and returns the ``Send`` actions to perform.  The core is transaction-stateless in the
RFC 3261 section 16.11 sense (branches are computed from the incoming request, responses
are relayed by Via), with three small pieces of soft state, all bounded and expiring:

* INVITE destinations by outgoing branch, so CANCEL and the ACK of a failed INVITE follow
  their INVITE even after the customer moved;
* requests of ``locked`` customers held until their migration commits (SPEC section 1);
* back-end node health (``sip.health``).

Who owns a request is asked of a small ``Router`` (dsbc implements it over the location
store); the core never imports dsbc.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import hmac
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, Protocol

import msgspec

from .errors import (
    BadExtension,
    LoopDetected,
    MessageTooLarge,
    SipError,
    SipParseError,
    TooManyHops,
)
from .flow import Flow, FlowSigner, FlowTokenError
from .health import HealthChecker, Node
from .message import Editor, SipMessage, make_response, parse_message, shared_request_uri
from .uri import NameAddr, SipUri, is_digits, parse_name_addr, remember, unescape
from .value import Value

BRANCH_PREFIX: Final = "z9hG4bK-d5"
DIALOG_CREATING: Final = frozenset({"INVITE", "SUBSCRIBE", "REFER"})
INVITE_STATE_TTL: Final = 300.0
#: how long an INVITE's destination is kept once it had a final answer (the ACK of a failure)
INVITE_ANSWERED_TTL: Final = 40.0
#: flow tokens kept signed / verified (each cache is emptied when it reaches this size)
FLOW_CACHE_SIZE: Final = 4096
#: reply tags kept (``ProxyCore._reply_tag``): a few seconds of transactions at a busy node
REPLY_TAG_CACHE: Final = 8192
#: ... for keys no longer than this (a 16-character hash, an IPv6 address, a port): the
#: address of a forged response's second Via can be any host name tens of KB long
REPLY_TAG_KEY_MAX: Final = 80
MAX_DATAGRAM: Final = 65507  # the largest UDP payload over IPv4
KNOWN_METHODS: Final = frozenset(
    {"INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "INFO", "UPDATE", "PRACK", "PUBLISH"}
)

_ALLOW: Final = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, SUBSCRIBE, NOTIFY, REFER, MESSAGE, INFO, UPDATE, PRACK, PUBLISH"

#: counter names per message (perf: no string built per message)
_REQUESTS_IN: Final = {m: f"requests_in:{m}" for m in KNOWN_METHODS}
_RESPONSES_IN: Final = tuple(f"responses_in:{i}xx" for i in range(7))  # status 100-699


class Router(Protocol):
    """What the proxy asks of the location store."""

    def decide(self, candidates: Sequence[tuple[str, str]]) -> Any:
        """The owner of the first known identity (``.system``, ``.customer_id``, ``.state``,
        ``.reason``), or the unknown policy's answer; ``.system`` may be ``"reject"``."""

    def is_trusted(self, ip: str, port: int) -> bool:
        """A carrier or a system's node: routed by Request-URI."""

    def expires_cap(self, customer_id: str) -> int:
        """>0 while the customer's migration is being prepared (``dsbc migrate --prepare``)."""


class Send(Value):
    """Send ``data`` to ``ip:port`` over ``transport``; on a stream transport use connection
    ``conn_id`` of ``worker`` if given (``worker=-1``: any worker / a new connection)."""

    __slots__ = ("conn_id", "data", "health", "ip", "keep", "port", "transport", "worker")

    def __init__(self, transport: str, ip: str, port: int, data: bytes, conn_id: int = 0,
                 worker: int = -1, health: bool = False, keep: int = 0) -> None:
        self.transport = transport
        self.ip = ip
        self.port = port
        self.data = data
        self.conn_id = conn_id
        self.worker = worker
        self.health = health
        #: a 2xx to a REGISTER going out over a device's TCP/TLS flow: the seconds its bindings
        #: were granted for; the connection stays open at least that long, silent or not (the
        #: registrar reaches the phone through it), as Kamailio keeps a registered phone's
        #: connection for its registration (``tcp_connection_lifetime``, the registrar's
        #: ``tcp_persistent_flag``)
        self.keep = keep

    def _fields(self) -> tuple[str, str, int, bytes, int, int, bool, int]:
        return (self.transport, self.ip, self.port, self.data, self.conn_id, self.worker, self.health, self.keep)


class RegistrationSeen(msgspec.Struct, gc=False):
    """A 2xx to a REGISTER that dsbc relayed: the bindings the system granted."""

    account: str
    contacts: list[tuple[str, int]]  # (contact URI, granted expiry in seconds)
    system: str
    received: str  # the phone's flow, "transport:ip:port"


class ProxySettings(msgspec.Struct, kw_only=True):
    advertise_host: str
    ports: dict[str, int]  # transport -> advertised port
    #: the address put in Via / Record-Route / Path toward IPv6 peers ("": advertise_host)
    advertise_host6: str = ""
    local_addresses: frozenset[tuple[str, int]] = frozenset()
    worker: int = 0
    lock_hold: float = 2.0
    retry_after: int = 30
    max_message_size: int = 65535
    server: str = "dsbc"
    #: INVITE destinations kept for their CANCEL / ACK (the oldest is forgotten first)
    invite_state_max: int = 200_000


class _Held:
    __slots__ = ("customer_id", "deadline", "key", "msg", "src")

    def __init__(self, msg: SipMessage, src: Flow, deadline: float, customer_id: str, key: str) -> None:
        self.msg = msg
        self.src = src
        self.deadline = deadline
        self.customer_id = customer_id
        self.key = key


#: perf: an empty BLAKE2b state per digest size the core uses; copying one costs less than
#: the constructor's keyword-argument parsing
_BLAKE2B: Final = {size: hashlib.blake2b(digest_size=size) for size in (3, 5, 8)}


def _hash(text: str, size: int) -> str:
    empty = _BLAKE2B.get(size)
    if empty is None:
        return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=size).hexdigest()
    h = empty.copy()
    h.update(text.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


#: perf: a dotted quad, checked before the general ipaddress parse (which is slow)
_IPV4_RE: Final = re.compile(r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}")


def _is_ip(host: str) -> bool:
    if _IPV4_RE.fullmatch(host) is not None:
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class ProxyCore:
    def __init__(self, settings: ProxySettings, router: Router, health: HealthChecker, signer: FlowSigner) -> None:
        self.s = settings
        self.router = router
        self.health = health
        self.signer = signer
        self.counters: collections.Counter[str] = collections.Counter()
        self.events: list[RegistrationSeen] = []
        self._counter_keys: dict[str, dict[str, tuple[str, str]]] = {}
        # branch -> (transport, ip, port, expiry, conn_id, worker): the connection too, so the CANCEL
        # or ACK of an INVITE sent over a phone's TCP/TLS flow takes that flow, from any worker
        self._invites: dict[str, tuple[str, str, int, float, int, int]] = {}
        self._invite_expiry: collections.deque[tuple[float, str]] = collections.deque()
        #: (expiry, branch) of INVITEs that had a final answer: kept INVITE_ANSWERED_TTL more
        self._answered_expiry: collections.deque[tuple[float, str]] = collections.deque()
        self._held: dict[str, _Held] = {}
        self._held_heap: list[tuple[float, str]] = []
        #: held INVITEs dsbc ended with 487 for their CANCEL, by held key, with the time until
        #: which a retransmitted CANCEL (its 200 was lost) gets the same answers (cleared when full)
        self._cancelled: dict[str, tuple[float, _Held]] = {}
        #: (transport, ip, port) of a device -> the account its last REGISTER named: who an
        #: anonymous call from the same flow belongs to (cleared when full)
        self._reg_flows: dict[tuple[str, str, int], str] = {}
        #: set when a message brought a new deadline (a held request, a health answer): the
        #: transport asks ``get_timer()`` again only then (perf: not once per message)
        self.timers_changed = True
        self._our_hosts = {settings.advertise_host.lower()} | {h.lower() for h, _ in settings.local_addresses}
        if settings.advertise_host6:
            self._our_hosts.add(settings.advertise_host6.lower())
        #: an IPv6 peer and an IPv4 one are given different addresses (double Record-Route)
        self._v6_differs = bool(settings.advertise_host6) and settings.advertise_host6 != settings.advertise_host
        self._our_ports = set(settings.ports.values()) | {p for _, p in settings.local_addresses}
        # a node on TCP/TLS sends its own requests from any port of its host
        self._stream_node_hosts = {st.node.host for st in health.states.values() if st.node.transport != "udp"}
        # perf: flow tokens are HMACs of a few fields; a phone's flow repeats on every request it
        # sends (Via, Record-Route, Path) and a dialog's token on every in-dialog request, so
        # each is signed / verified once (bounded; only tokens that verified are kept)
        self._tokens: dict[Flow, str] = {}
        self._flows: dict[str, Flow] = {}
        #: keyed BLAKE2b (a key of the flow secret's) binding each branch dsbc writes to the
        #: address its answers go back to (see ``_branch``)
        self._reply_mac = _reply_mac(signer)
        self._old_reply_macs = [_reply_mac(s) for s in signer.verifiers()[1:]]  # a rotation's
        #: perf: the tags written lately: a transaction's answers (100, 180, 200) check the
        #: tag its request was given; bounded, and a value only of its key (h|ip|port)
        self._reply_tags: dict[str, str] = {}

    # --- entry points ---------------------------------------------------------------

    def handle_data(self, data: bytes, src: Flow, now: float) -> list[Send]:
        """One UDP datagram or one framed stream message."""
        is_response = data[:4] == b"SIP/"
        try:
            msg = parse_message(data, datagram=not src.is_stream, max_size=self.s.max_message_size)
        except SipError as exc:
            return self._bad_input(exc, is_response, src)
        if msg.is_request:
            # only known methods get a counter of their own: random method names must not grow
            # the counters (and every status snapshot) without bound
            self.counters[_REQUESTS_IN.get(msg.method, "requests_in:OTHER")] += 1
            try:
                return self._request(msg, src, now)
            except SipError as exc:
                # a malformed value found only when read (a CSeq naming another method) is
                # bad input like one found by the parser; the others are dsbc's refusals
                kind = "bad_requests" if isinstance(exc, SipParseError) else "rejected"
                self.counters[f"{kind}:{exc.status}"] += 1
                if msg.method == "ACK":  # RFC 3261 17: an ACK is never answered
                    return []
                return [self._reply(msg, src, exc.status, exc.reason, list(exc.extra_headers))]
        self.counters[_RESPONSES_IN[msg.status // 100]] += 1
        try:
            return self._response(msg, src, now)
        except SipError:
            self.counters["responses_dropped"] += 1
            return []

    def get_timer(self) -> float | None:
        deadlines = [t for t in (self.health.get_timer(),) if t is not None]
        if self._held_heap:  # every held request has its deadline here (stale ones fire once, harmlessly)
            deadlines.append(self._held_heap[0][0])
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Send]:
        out: list[Send] = []
        for ping in self.health.handle_timer(now):
            n = ping.node
            out.append(Send(n.transport, n.host, n.port, ping.data, health=True))
        out.extend(self._recheck_held(now, None))
        cancelled = self._cancelled  # in order of expiry (one TTL for all)
        while cancelled:
            key = next(iter(cancelled))
            if cancelled[key][0] > now:
                break
            del cancelled[key]
        for expiry in (self._invite_expiry, self._answered_expiry):
            while expiry and expiry[0][0] <= now:
                _, branch = expiry.popleft()
                entry = self._invites.get(branch)
                if entry is not None and entry[3] <= now:
                    del self._invites[branch]
        return out

    def customers_changed(self, customer_ids: Iterable[str], now: float) -> list[Send]:
        """The store committed changes for these customers: release what was held for them."""
        if not self._held:
            return []
        return self._recheck_held(now, set(customer_ids))

    @property
    def held_count(self) -> int:
        return len(self._held)

    def release_all_held(self, now: float) -> list[Send]:
        """The worker stops: what it still holds goes to its owner if the lock has ended,
        else gets the 503 of ``store.lock_hold`` (a held INVITE was answered 100 Trying:
        without a final answer its caller waits for nothing)."""
        out = self._recheck_held(now, None)
        for h in self._held.values():
            out.extend(self._refuse_held(h))
        self._held.clear()
        self._held_heap.clear()
        return out

    # --- errors -----------------------------------------------------------------------

    def _bad_input(self, exc: SipError, is_response: bool, src: Flow) -> list[Send]:
        partial: SipMessage | None = getattr(exc, "partial", None)
        # a request without any Via line cannot be answered: nobody could match the answer
        if is_response or partial is None or not exc.respond or partial.index("via") < 0:
            self.counters["responses_dropped" if is_response else "requests_dropped"] += 1
            return []
        self.counters[f"bad_requests:{exc.status}"] += 1
        if partial.method == "ACK":
            return []
        try:
            return [self._reply(partial, src, exc.status, exc.reason, [("warning", f'399 dsbc "{_quote(exc.detail)}"')])]
        except SipError:
            return []

    def _reply(self, req: SipMessage, src: Flow, status: int, reason: str, extra: list[tuple[str, str]] | None = None) -> Send:
        data = self.answer_bytes(req, status, reason, src, extra)
        return Send(src.transport, src.ip, src.port, data, src.conn_id, src.worker if src.is_stream else -1)

    def answer_bytes(self, req: SipMessage, status: int, reason: str, src: Flow | None = None,
                     extra: list[tuple[str, str]] | None = None) -> bytes:
        """A response dsbc makes itself: its Server header, a To tag (RFC 3261 8.2.6.2) and,
        when it goes back to ``src``, received / rport on the top Via (RFC 3581 4: a
        phone learns its NAT address from them)."""
        headers = list(extra or ())
        headers.append(("server", self.s.server))
        via: str | None = None
        if src is not None:
            try:
                via = _with_received(req.vias[0].text, src.ip, src.port)
            except (SipError, IndexError):  # a request whose Via is what was wrong with it
                via = None
        try:
            tag: str | None = _hash(req.call_id, 5) if status > 100 else None
        except SipError:  # (a partial request without a usable Call-ID)
            tag = None
        return make_response(req, status, reason, headers, to_tag=tag, top_via=via)

    # --- requests ---------------------------------------------------------------------

    def _request(self, msg: SipMessage, src: Flow, now: float) -> list[Send]:
        method = msg.method
        mf = msg.max_forwards
        routes = msg.routes
        # our own address with no user: keep-alive OPTIONS and the like are answered here
        if not routes and msg.uri.user is None and self._is_ours(msg.uri):
            answered = self._for_dsbc(msg, src)
            if answered:
                return answered
        if mf is not None and mf <= 0:
            if method == "ACK":
                return []
            raise TooManyHops()
        if method not in ("ACK", "CANCEL"):
            preq = msg.values("proxy-require")
            if preq:
                raise BadExtension(extra_headers=(("unsupported", ", ".join(preq)),))
        ed = Editor(msg)
        # RFC 3261 16.4 route pre-processing: strict-routing previous hop, then our own Routes
        ruri_text = msg.ruri
        route_vals = msg.values("route")
        params: dict[str, str] = {}
        strict = False
        if routes and self._is_ours(msg.uri) and (msg.uri.has_param("dsbc") or msg.uri.has_param("ft")):
            strict = True
            params.update(self._route_params(msg.uri, msg.call_id))
            last = routes[-1]
            ruri_text = last.uri_text
            routes = routes[:-1]
            ed.start_line = f"{method} {ruri_text} SIP/2.0".encode("latin-1")
        popped = 0
        while popped < len(routes) and self._is_ours_addr(routes[popped]):
            params.update(self._route_params(routes[popped].uri, msg.call_id))
            popped += 1
        remaining = routes[popped:]
        if popped and not remaining and not strict and msg.uri.user is None and self._is_ours(msg.uri):
            # RFC 3261 16.4: once its own Routes are removed, a request for dsbc's own address
            # is for dsbc (a phone's keep-alive OPTIONS with its outbound proxy as a Route)
            answered = self._for_dsbc(msg, src)
            if answered:
                return answered
        if popped or len(routes) != len(route_vals):
            self._rewrite_routes(ed, msg, remaining)
        # loop detection (RFC 3261 16.3 item 4)
        loop = _hash(f"{ruri_text}|{src.ip}:{src.port}|{','.join(r.uri_text for r in remaining)}", 3)
        for v in msg.vias:
            if v.branch.startswith(BRANCH_PREFIX) and v.branch.endswith("." + loop) and self._via_is_ours(v.host, v.port):
                raise LoopDetected()
        branch = self._branch(msg, loop, src)
        trusted = self.router.is_trusted(src.ip, src.port)

        # --- where does it go? ------------------------------------------------------
        inside = trusted or (src.is_stream and src.ip in self._stream_node_hosts)
        if method == "REGISTER" or not (msg.to_tag or inside):
            # never in a dialog: a stale Route (Path, Record-Route) must not pin it.  A device's
            # request without a To tag is out of dialog too: a Record-Route it kept from an
            # earlier call, sent again as a preloaded Route, must not skip the owner lookup
            # (it would reach the system its customer has left)
            params.clear()
            if remaining and not inside:
                # nor does a device's preloaded Route go on: the owner's node would route the
                # request to it (another system's node, any host behind dsbc), as Kamailio's
                # edge proxies remove_hf("Route") for requests from clients
                self._rewrite_routes(ed, msg, [])
                remaining = []
        if method == "ACK" and len(msg.to_tag) == 10 and msg.to_tag == _hash(msg.call_id, 5):
            return []  # the ACK of a final answer dsbc itself gave
        if method == "CANCEL":
            key = self._held_key(msg, "INVITE")
            held = self._held.pop(key, None)
            if held is not None:
                self.counters["held_cancelled"] += 1
                if len(self._cancelled) >= CANCELLED_MAX:
                    self._cancelled.clear()
                self._cancelled[key] = (now + CANCELLED_TTL, held)
            else:
                # a retransmission of a CANCEL dsbc already answered: the same answers again
                # (it must not be held, nor reach a system that never saw its INVITE)
                done = self._cancelled.get(key)
                if done is not None and done[0] > now:
                    held = done[1]
            if held is not None:
                return [
                    self._reply(msg, src, 200, "OK"),
                    self._reply(held.msg, held.src, 487, "Request Terminated"),
                ]
        elif method == "INVITE" and self._cancelled:
            # a retransmission of a held INVITE that was cancelled (its 487 was lost): it
            # is over, it must not be held again and ring the callee after the flip
            done = self._cancelled.get(self._held_key(msg, "INVITE"))
            if done is not None and done[0] > now:
                return [self._reply(msg, src, 487, "Request Terminated")]
        if method in ("CANCEL", "ACK") and branch in self._invites:
            transport, ip, port, _, conn_id, worker = self._invites[branch]
            return [self._forward(msg, ed, src, Send(transport, ip, port, b"", conn_id, worker), branch, None, "", "", now, trusted)]
        if "ft" in params:
            flow = self._decode_flow(params["ft"])
            if inside:
                # from the inside (a system's node, a trusted peer): toward the device that
                # registered / is in this dialog.  A device never goes out to another device's
                # flow (RFC 5626 5.3): it learns their tokens from Record-Route, and would
                # bypass the system; from a new NAT port it is the device itself.
                system = params.get("dsbc", "") or self._system_of(src)
                dest = Send(flow.transport, flow.ip, flow.port, b"", flow.conn_id, flow.worker if flow.is_stream else -1)
                return [self._forward(msg, ed, src, dest, branch, flow, system, "", now, trusted)]
        if params:
            # in-dialog (our Record-Route): no lookup, the dialog stays on its system
            system = params.get("dsbc", "")
            hop = self._next_hop(remaining, ruri_text)
            self._strict_next_hop(ed, msg, remaining, ruri_text)
            if trusted and hop is not None:
                at = self.health.node_at(hop[1], hop[2])
                if at is not None:
                    # toward a system's node that record-routed the dialog (a carrier's BYE):
                    # as for a phone's, another node of that system if it is down, and 503
                    # when all are (the carrier would retransmit into the void for 32 s)
                    node = self.health.pick(at.system, (hop[1], hop[2]))
                    if node is None:
                        return self._unavailable(msg, src)
                    if (node.host, node.port) != (hop[1], hop[2]):
                        return [self._forward(msg, ed, src, self._to_node(node), branch, None, system, "", now, trusted)]
                dest = Send(hop[0], hop[1], hop[2], b"")
                return [self._forward(msg, ed, src, dest, branch, None, system, "", now, trusted)]
            if system:
                node = self.health.pick(system, (hop[1], hop[2]) if hop else None)
                if node is None:
                    return self._unavailable(msg, src)
                return [self._forward(msg, ed, src, self._to_node(node), branch, None, system, "", now, trusted)]
        if msg.to_tag and method != "REGISTER":
            # in a dialog whose route set the phone dropped (no Route of ours): a Request-URI
            # (or first Route) naming a system's node keeps the dialog there, no lookup (its
            # customer may have moved since, or be locked by a batch in flight)
            hop = self._next_hop(remaining, ruri_text)
            at = self.health.node_at(hop[1], hop[2]) if hop is not None else None
            if hop is not None and at is not None:
                node = self.health.pick(at.system, (hop[1], hop[2]))
                if node is None:
                    return self._unavailable(msg, src)
                return [self._forward(msg, ed, src, self._to_node(node), branch, None, at.system, "", now, trusted)]
        # out-of-dialog: who owns it?
        candidates = self._candidates(msg, trusted, src)
        decision = self.router.decide(candidates)
        if decision.system == "reject":
            self.counters["rejected:unknown"] += 1
            return [self._reply(msg, src, 404, "Not Found", [("warning", '399 dsbc "unknown customer"')])]
        if decision.state == "locked":
            return self._hold(msg, src, decision.customer_id, now)
        node = self.health.pick(decision.system)
        if node is None:
            return self._unavailable(msg, src)
        cap = 0
        if method == "REGISTER":
            if not trusted:  # relayed (not held, not refused): its flow is this account's now
                self._remember_flow(src, candidates[0][1])
            if decision.customer_id:
                cap = self.router.expires_cap(decision.customer_id)
            self._deregistering(msg, decision.system, src)
        return [self._forward(msg, ed, src, self._to_node(node), branch, None, decision.system, decision.customer_id, now, trusted, cap=cap)]

    def _for_dsbc(self, msg: SipMessage, src: Flow) -> list[Send]:
        """The answer to a request for dsbc's own address with no user: 200 to OPTIONS (a
        keep-alive), 404 to the others but REGISTER and ACK (``[]``: those go on)."""
        method = msg.method
        if method == "OPTIONS":
            return [self._reply(msg, src, 200, "OK", [("allow", _ALLOW)])]
        if method != "REGISTER" and method != "ACK":
            return [self._reply(msg, src, 404, "Not Found")]
        return []

    def _deregistering(self, msg: SipMessage, system: str, src: Flow) -> None:
        """A REGISTER that removes bindings (expires 0, or ``Contact: *``): the 200 lists only
        the bindings that remain (RFC 3261 10.3), so the removed ones are noted here, as
        bindings of 0 s, for `dsbc migrate` to stop counting them."""
        default = msg.get("expires")
        zero_default = default is not None and default.strip() == "0"
        if not zero_default and not any(
            h.name == "contact" and "expires=0" in h.value.replace(" ", "").lower() for h in msg.headers
        ):
            return  # (the usual REGISTER: no contact parsing here)
        gone: list[tuple[str, int]] = []
        for value in msg.values("contact"):
            if value.strip() == "*":
                gone.append(("*", 0))
                continue
            try:
                na = parse_name_addr(value)
            except SipParseError:
                continue
            exp = na.param("expires")
            if exp is None and zero_default or exp is not None and is_digits(exp.strip()) and int(exp) == 0:
                gone.append((na.uri_text, 0))
        if gone:
            try:
                account = self._user(msg.to.uri)
            except SipError:
                return
            self.events.append(RegistrationSeen(account, gone, system, f"{src.transport}:{src.ip}:{src.port}"))

    def _candidates(self, msg: SipMessage, trusted: bool, src: Flow) -> list[tuple[str, str]]:
        out = owner_candidates(msg, trusted)
        if not trusted and msg.method != "REGISTER":
            # last: the account that registered from this flow (a phone's anonymous call)
            registered = self._reg_flows.get((src.transport, src.ip, src.port))
            if registered:
                out.append(("account", registered))
        return out

    def _remember_flow(self, src: Flow, account: str) -> None:
        """A device's REGISTER: its flow belongs to ``account`` (for its anonymous calls)."""
        if len(self._reg_flows) >= REG_FLOWS_MAX:
            self._reg_flows.clear()
        self._reg_flows[(src.transport, src.ip, src.port)] = account

    @staticmethod
    def _user(uri: SipUri) -> str:
        if uri.user is None:
            return ""
        return unescape(uri.user)

    def _hold(self, msg: SipMessage, src: Flow, customer_id: str, now: float) -> list[Send]:
        key = self._held_key(msg, msg.method)
        out: list[Send] = []
        if msg.method == "INVITE":
            out.append(self._reply(msg, src, 100, "Trying"))
        if key not in self._held:
            self.counters["held"] += 1
            deadline = now + self.s.lock_hold
            self._held[key] = _Held(msg, src, deadline, customer_id, key)
            heapq.heappush(self._held_heap, (deadline, key))
            self.timers_changed = True
        return out

    @staticmethod
    def _held_key(msg: SipMessage, method: str) -> str:
        top = msg.vias[0]
        return f"{top.branch}|{top.host}|{msg.call_id}|{method}"

    def _recheck_held(self, now: float, customers: set[str] | None) -> list[Send]:
        out: list[Send] = []
        for key, h in list(self._held.items()):
            if customers is not None and h.customer_id not in customers:
                continue
            decision = self.router.decide(self._candidates(h.msg, self.router.is_trusted(h.src.ip, h.src.port), h.src))
            if decision.state != "locked":
                del self._held[key]
                self.counters["held_released"] += 1
                try:
                    out.extend(self._request(h.msg, h.src, now))
                except SipError as exc:  # answered as handle_data would have
                    self.counters[f"rejected:{exc.status}"] += 1
                    if h.msg.method != "ACK":
                        out.append(self._reply(h.msg, h.src, exc.status, exc.reason, list(exc.extra_headers)))
            elif now >= h.deadline:
                del self._held[key]
                out.extend(self._refuse_held(h))
        while self._held_heap and self._held_heap[0][1] not in self._held:
            heapq.heappop(self._held_heap)
        return out

    def _refuse_held(self, h: _Held) -> list[Send]:
        """The "try again shortly" of a request held longer than its lock allows."""
        self.counters["locked_rejected"] += 1
        if h.msg.method == "ACK":
            return []
        return [self._reply(h.msg, h.src, 503, "Service Unavailable",
                            [("retry-after", "5"), ("warning", '399 dsbc "customer is being migrated"')])]

    def _unavailable(self, msg: SipMessage, src: Flow) -> list[Send]:
        self.counters["rejected:no_node"] += 1
        if msg.method == "ACK":
            return []
        return [self._reply(msg, src, 503, "Service Unavailable", [("retry-after", str(self.s.retry_after))])]

    # --- building the forwarded request ---------------------------------------------------

    def _forward(
        self,
        msg: SipMessage,
        ed: Editor,
        src: Flow,
        dest: Send,
        branch: str,
        to_flow: Flow | None,
        system: str,
        customer_id: str,
        now: float,
        trusted: bool,
        cap: int = 0,
    ) -> Send:
        """``trusted``: what ``router.is_trusted`` said of ``src``."""
        method = msg.method
        # received / rport on the top Via (RFC 3261 18.2.1, RFC 3581)
        top = msg.vias[0]
        ed.set_first_value("via", _with_received(top.text, src.ip, src.port))
        mf = msg.max_forwards
        if mf is None:
            ed.append("max-forwards", "70")
        else:
            ed.set(msg.index("max-forwards"), str(min(mf, 256) - 1))
        # our Via: the branch, plus what the response needs to be relayed statelessly
        dest_v6 = ":" in dest.ip
        via = f"SIP/2.0/{dest.transport.upper()} {self._hostport(dest.transport, dest_v6)};branch={branch};rport"
        if src.is_stream:
            via += f";dsbcf={self._flow_token(src)}"
        if method == "REGISTER":
            via += f";dsbcsys={system}"
            if src.is_stream:  # the longest the phone's connection may be kept for (KEEP_MARGIN)
                via += f";dsbcexp={_asked_expiry(msg)}"
            if cap:
                via += f";dsbccap={cap}"
                mine = _contact_marks(msg)
                if mine:
                    via += f";dsbcct={mine}"
        device_flow: Flow | None = None
        if to_flow is not None:
            device_flow = to_flow
        elif not trusted:
            device_flow = src
        if method in DIALOG_CREATING and not msg.to_tag or method == "NOTIFY" and msg.to_tag:
            # RFC 6665 4.3: the NOTIFYs of a subscription are record-routed like its SUBSCRIBE
            # (as Kamailio's default configuration does): a subscriber that gets a NOTIFY
            # before the 200 (forking, a 200 lost over UDP) takes its route set from it.
            # RFC 3261 16.6 item 4 / RFC 5630: a SIPS request gets a SIPS Record-Route on
            # its TLS side(s); the plain side toward the inside keeps sip:
            sips = msg.uri.scheme == "sips"
            rr = self._rr_uri(dest.transport, system, device_flow, msg.call_id, sips, dest_v6)
            src_v6 = ":" in src.ip
            if src.transport != dest.transport or (src_v6 != dest_v6 and self._v6_differs):
                # double Record-Route (as Kamailio's): each side gets the address it can reach
                ed.prepend("record-route", self._rr_uri(src.transport, system, device_flow, msg.call_id, sips, src_v6))
            ed.prepend("record-route", rr)
        if method == "REGISTER":
            # the system is in the Path too: a call the registrar sends back through it stays
            # on that system's dialog even when the node's source port is not its listed one
            path = self._rr_uri(dest.transport, system, src, "", False, dest_v6)
            if src.is_stream and len(msg.vias) == 1 and _asks_outbound(msg):
                # RFC 5626 5.1: the first hop of an outbound phone says it keeps the flow (a
                # registrar that supports outbound refuses the phone with 439 otherwise); over
                # TCP / TLS only, where dsbc answers the phone's CRLF keep-alives (it answers
                # no STUN over UDP)
                path = path[:-1] + ";ob>"
            ed.prepend("path", path)
        ed.prepend("via", via)
        dest.data = ed.to_bytes()
        if dest.transport == "udp" and len(dest.data) > MAX_DATAGRAM:
            # what we add can push a datagram near 64 KiB over what UDP carries: the sender
            # gets 513 instead of a request that silently fails to leave
            raise MessageTooLarge(f"{len(dest.data)} octets do not fit a datagram to the next hop")
        if method == "INVITE":
            self._remember_invite(branch, dest, now)
        forwarded, routed = self._forward_keys(system, method)
        self.counters[forwarded] += 1
        self.counters[routed] += 1
        return dest

    def _remember_invite(self, branch: str, dest: Send, now: float) -> None:
        """Where an INVITE went, for its CANCEL and the ACK of a failure.  Bounded: at
        ``invite_state_max`` the oldest is forgotten (its CANCEL is routed like any request)."""
        invites = self._invites
        old = invites.get(branch)
        if old is not None:  # a retransmission: its expiry (and its place in the queue) stay
            invites[branch] = (dest.transport, dest.ip, dest.port, old[3], dest.conn_id, dest.worker)
            return
        expiry = self._invite_expiry
        cap = self.s.invite_state_max
        # the queue too: it keeps the branches of INVITEs answered and forgotten since
        while expiry and (len(invites) >= cap or len(expiry) >= cap):
            if invites.pop(expiry.popleft()[1], None) is not None:
                self.counters["invite_state_evicted"] += 1
        invites[branch] = (dest.transport, dest.ip, dest.port, now + INVITE_STATE_TTL, dest.conn_id, dest.worker)
        expiry.append((now + INVITE_STATE_TTL, branch))

    def _forward_keys(self, system: str, method: str) -> tuple[str, str]:
        """The counter names of a forwarded request (perf: built once, not per message)."""
        m = method if method in KNOWN_METHODS else "OTHER"
        by_method = self._counter_keys.get(system)
        if by_method is None:
            by_method = self._counter_keys[system] = {}  # system names: a few, from config
        keys = by_method.get(m)
        if keys is None:
            s = system or "direct"
            keys = by_method[m] = (f"forwarded:{s}", f"routed:{s}/{m}")
        return keys

    def _rr_uri(
        self, transport: str, system: str, flow: Flow | None, call_id: str, sips: bool = False, v6: bool = False
    ) -> str:
        if sips and transport == "tls":
            uri = f"<sips:{self._hostport(transport, v6)};lr"
        else:
            uri = f"<sip:{self._hostport(transport, v6)};transport={transport};lr"
        token = self._flow_token(flow) if flow is not None else ""
        if system:
            # signed, and bound to the flow token (or, without one, to the dialog's Call-ID),
            # so a device cannot name the system its own new requests go to
            uri += f";dsbc={system}.{self.signer.tag(f'{system}|{token or call_id}')}"
        if token:
            uri += f";ft={token}"
        return uri + ">"

    def _hostport(self, transport: str, v6: bool = False) -> str:
        """dsbc's address and port toward a peer over ``transport`` (of IPv6 if ``v6``)."""
        host = self.s.advertise_host6 if v6 and self.s.advertise_host6 else self.s.advertise_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        port = self.s.ports.get(transport) or next(iter(self.s.ports.values()))
        return f"{host}:{port}"

    def _to_node(self, node: Node) -> Send:
        return Send(node.transport, node.host, node.port, b"")

    def _branch(self, msg: SipMessage, loop: str, src: Flow) -> str:
        top = msg.vias[0]
        b = top.branch
        if b.startswith("z9hG4bK"):
            seed = f"{b}|{top.host}|{top.port}"
        else:  # RFC 2543 peers: hash what identifies the transaction
            seed = f"{msg.to_tag}|{msg.from_tag}|{msg.call_id}|{msg.cseq[0]}|{msg.ruri}|{top.text}"
        h = _hash(seed, 8)
        # then a MAC of the address the answers go back to (the received / rport dsbc
        # writes on the sender's Via): a response is relayed over UDP to that Via only if
        # this branch was made for it (``_reply_ok``), so a forged response naming another
        # host in its second Via cannot make dsbc send to it (reflection)
        return f"{BRANCH_PREFIX}{h}{self._reply_tag(h, src.ip, src.port)}.{loop}"

    def _reply_tag(self, h: str, ip: str, port: int) -> str:
        key = f"{h}|{ip}|{port}"
        tags = self._reply_tags
        tag = tags.get(key)
        if tag is None:
            tag = _mac_hex(self._reply_mac, key)
            remember(tags, key, tag, REPLY_TAG_KEY_MAX, REPLY_TAG_CACHE)
        return tag

    def _reply_ok(self, branch: str, ip: str, port: int) -> bool:
        """``branch`` (one of dsbc's) was written for a request from ``ip:port``."""
        start = len(BRANCH_PREFIX)
        if branch.find(".", start) != start + 24:
            return False
        given, head = branch[start + 16 : start + 24], branch[start : start + 16]
        if _same_mac(given, self._reply_tag(head, ip, port)):
            return True
        return any(_same_mac(given, _reply_tag(m, head, ip, port)) for m in self._old_reply_macs)

    def _rewrite_routes(self, ed: Editor, msg: SipMessage, remaining: list[NameAddr]) -> None:
        first = True
        for i, h in enumerate(msg.headers):
            if h.name != "route":
                continue
            if first and remaining:
                ed.set(i, ", ".join(str(r) for r in remaining))
                first = False
            else:
                ed.delete(i)

    def _strict_next_hop(self, ed: Editor, msg: SipMessage, remaining: list[NameAddr], ruri_text: str) -> None:
        """RFC 3261 16.6 item 6: a next hop without ``lr`` is a strict router (RFC 2543); it
        gets its own URI as the Request-URI, and the Request-URI goes last in the Route."""
        if not remaining:
            return
        try:
            if remaining[0].uri.has_param("lr"):
                return
            last = parse_name_addr(f"<{ruri_text}>")
        except SipError:
            return
        ed.start_line = f"{msg.method} {remaining[0].uri_text} SIP/2.0".encode("latin-1")
        self._rewrite_routes(ed, msg, [*remaining[1:], last])

    def _next_hop(self, remaining: list[NameAddr], ruri_text: str) -> tuple[str, str, int] | None:
        try:
            uri = remaining[0].uri if remaining else shared_request_uri(ruri_text)
        except SipError:
            return None
        if uri.scheme not in ("sip", "sips") or not _is_ip(uri.host):
            return None
        host, port = uri.host_port
        return uri.transport, host, port

    def _flow_token(self, flow: Flow) -> str:
        token = self._tokens.get(flow)
        if token is None:
            token = self.signer.encode(flow)
            if len(self._tokens) >= FLOW_CACHE_SIZE:
                self._tokens.clear()
            self._tokens[flow] = token
        return token

    def _decode_flow(self, token: str) -> Flow:
        flow = self._flows.get(token)
        if flow is not None:
            return flow
        try:
            flow = self.signer.decode(token)
        except FlowTokenError:
            self.counters["flow_token_rejected"] += 1
            raise
        if len(self._flows) >= FLOW_CACHE_SIZE:
            self._flows.clear()
        self._flows[token] = flow
        return flow

    def _system_of(self, src: Flow) -> str:
        node = self.health.node_at(src.ip, src.port)
        return node.system if node else ""

    # --- our own addresses ------------------------------------------------------------

    def _is_ours(self, uri: SipUri) -> bool:
        if uri.scheme not in ("sip", "sips"):
            return False
        host = uri.host.strip("[]").lower()
        if host not in self._our_hosts:
            return False
        return uri.host_port[1] in self._our_ports

    def _is_ours_addr(self, addr: NameAddr) -> bool:
        try:
            return self._is_ours(addr.uri)
        except SipError:
            return False

    def _via_is_ours(self, host: str, port: int | None) -> bool:
        return host.strip("[]").lower() in self._our_hosts and (port or 5060) in self._our_ports

    def _route_params(self, uri: SipUri, call_id: str) -> dict[str, str]:
        """``dsbc`` (the system, its signature checked) and ``ft`` of one of dsbc's own URIs."""
        out = {}
        token = uri.param("ft")
        if token:
            self._decode_flow(token)  # a forged token is refused before anything else
            out["ft"] = token
        value = uri.param("dsbc")
        if value:
            system, _, mac = value.rpartition(".")
            if not system or not self.signer.tag_ok(f"{system}|{token or call_id}", mac):
                self.counters["route_signature_rejected"] += 1
                raise FlowTokenError("forged dsbc Route")
            out["dsbc"] = system
        return out

    # --- responses ----------------------------------------------------------------------

    def _response(self, msg: SipMessage, src: Flow, now: float) -> list[Send]:
        vias = msg.vias
        if self.health.is_ping_response(msg):
            self.health.handle_response(msg, now, src.ip)
            self.timers_changed = True
            return []
        top = vias[0]
        if not top.branch.startswith(BRANCH_PREFIX) or not self._via_is_ours(top.host, top.port):
            self.counters["responses_dropped"] += 1
            return []
        if msg.status == 100:
            return []  # RFC 3261 16.7: a 100 is never forwarded
        if len(vias) < 2:
            self.counters["responses_dropped"] += 1
            return []
        # where it goes, checked before anything is learnt from it (a forged 200 to a
        # REGISTER must not record bindings)
        token = top.param("dsbcf")
        if token:
            flow = self._decode_flow(token)
            dest = Send(flow.transport, flow.ip, flow.port, b"", flow.conn_id, flow.worker)
        else:
            # no flow token: the request came over UDP, whatever its Via claims (a Via saying
            # TCP must not make dsbc open a connection to the phone)
            host, port = vias[1].response_address()
            if not self._reply_ok(top.branch, host, port):
                # not an answer to a request dsbc sent for that address: forged or altered
                self.counters["responses_forged"] += 1
                return []
            dest = Send("udp", host, port, b"")
        ed = Editor(msg)
        ed.set_first_value("via", None)
        cseq_method = msg.cseq[1]
        if cseq_method == "REGISTER" and 200 <= msg.status < 300:
            granted = self._registered(msg, ed, top.param("dsbcsys") or "", top.param("dsbccap") or "",
                                       top.param("dsbcct") or "")
            asked = top.param("dsbcexp") or ""
            if is_digits(asked):  # the 200 lists the account's other bindings too
                granted = min(granted, int(asked))
            if token and granted > 0:
                dest.keep = min(granted, KEEP_MAX) + KEEP_MARGIN
        if cseq_method == "INVITE" and msg.status >= 200:
            branch = top.branch
            entry = self._invites.get(branch)
            until = now + INVITE_ANSWERED_TTL
            if entry is not None and entry[3] > until and len(self._answered_expiry) < self.s.invite_state_max:
                # the first final answer: kept a little longer for the ACK of a failure, then
                # forgotten (with that queue full, at its first expiry)
                self._invites[branch] = (entry[0], entry[1], entry[2], until, entry[4], entry[5])
                self._answered_expiry.append((until, branch))
        dest.data = ed.to_bytes()
        return [dest]

    def _registered(self, msg: SipMessage, ed: Editor, system: str, cap_text: str, marks: str = "") -> int:
        """Record the bindings of a REGISTER's 2xx (capped while a batch is prepared); the
        longest expiry it grants, in seconds (0: none)."""
        # is_digits, not str.isdigit: '\xb2' (a latin-1 superscript two) is a digit to isdigit()
        cap = int(cap_text) if is_digits(cap_text) else 0
        # the contacts the REGISTER named (_contact_marks): the phone that gets this 200 renews
        # them within the cap; the account's other bindings listed here were granted their full
        # expiry and are recorded with it, or `dsbc migrate` would count those phones gone
        mine = set(marks.split(".")) if marks else set()
        default = msg.get("expires")
        default_exp = int(default) if default and is_digits(default) else 3600
        contacts: list[tuple[str, int]] = []
        new_values: list[str] = []
        changed = False
        for value in msg.values("contact"):
            try:
                na = parse_name_addr(value)
            except SipParseError:
                new_values.append(value)
                continue
            exp_text = na.param("expires")
            exp = int(exp_text) if exp_text and is_digits(exp_text) else default_exp
            if cap and exp > cap:
                if _contact_mark(na) in mine:
                    exp = cap
                na.params = [(k, v) for k, v in na.params if k.lower() != "expires"] + [("expires", str(cap))]
                value = str(na)
                changed = True
            new_values.append(value)
            contacts.append((na.uri_text, exp))
        if cap and changed:
            idx = [i for i, h in enumerate(msg.headers) if h.name == "contact"]
            ed.set(idx[0], ", ".join(new_values))
            for i in idx[1:]:
                ed.delete(i)
            self.counters["registrations_capped"] += 1
        if cap and default and is_digits(default) and int(default) > cap:
            ed.set(msg.index("expires"), str(cap))
        granted = max((e for _, e in contacts), default=0)
        try:
            account = self._user(msg.to.uri)
        except SipError:
            return granted
        nxt = msg.vias[1]
        h, p = nxt.response_address()
        self.events.append(RegistrationSeen(account, contacts, system, f"{nxt.transport.lower()}:{h}:{p}"))
        return granted


#: a registered phone's TCP/TLS connection is kept open this long past the expiry its
#: registrar granted (its refresh may come a little late), as Kamailio's 3605 s for 3600
KEEP_MARGIN: Final = 10
#: ... and never on the word of a registrar for more than a day
KEEP_MAX: Final = 86400

#: contacts of one REGISTER marked in its Via (a phone registers one; a few at most)
_CONTACT_MARKS_MAX: Final = 8


def _contact_marks(msg: SipMessage) -> str:
    """Short hashes of the contact URIs a capped REGISTER names, dot-separated (a Via
    parameter): its 200 lists every binding of the account, and only these get the cap in
    the registrations dsbc records (the proxy keeps no transaction state to remember them)."""
    marks: list[str] = []
    for value in msg.values("contact"):
        if len(marks) >= _CONTACT_MARKS_MAX:
            break
        try:
            marks.append(_contact_mark(parse_name_addr(value)))
        except SipParseError:
            continue
    return ".".join(marks)


def _asked_expiry(msg: SipMessage) -> int:
    """The longest expiry a REGISTER asks for the contacts it names (0: a removal, a
    ``Contact: *`` or a query; KEEP_MAX where it leaves it to the registrar).  A registrar
    grants no more (RFC 3261 10.3 item 7), and its 200 lists the account's other bindings
    too (item 8): the connection of a phone that registered for 60 s is not kept for the
    hour its account's other phone was granted (Kamailio's registrar keeps it for the
    contacts the REGISTER saved)."""
    default = msg.get("expires")
    default_exp = int(default) if default and is_digits(default) else KEEP_MAX
    asked = 0
    for value in msg.values("contact"):
        try:
            na = parse_name_addr(value)
        except SipParseError:
            continue
        exp_text = na.param("expires")
        asked = max(asked, int(exp_text) if exp_text and is_digits(exp_text) else default_exp)
    return min(asked, KEEP_MAX)


def _asks_outbound(msg: SipMessage) -> bool:
    """A REGISTER of an RFC 5626 outbound phone: a Contact with a reg-id."""
    for value in msg.values("contact"):
        if "reg-id" in value.lower():
            try:
                if parse_name_addr(value).param("reg-id") is not None:
                    return True
            except SipParseError:
                continue
    return False


def _contact_mark(na: NameAddr) -> str:
    """A contact's mark: its user, host and port (a registrar may echo the URI with its
    parameters changed, RFC 3261 19.1.4 compares them loosely too)."""
    try:
        uri = na.uri
        key = f"{uri.user or ''}@{uri.host.lower()}:{uri.port or ''}"
    except SipParseError:
        key = na.uri_text
    return _hash(key, 3)


def _reply_mac(signer: FlowSigner) -> Any:
    return hashlib.blake2b(key=signer.subkey("reply-address"), digest_size=4)


def _same_mac(given: str, expected: str) -> bool:
    """A MAC read from a message equals the one dsbc computes (ASCII hex): in constant
    time, and False for non-ASCII text, which ``hmac.compare_digest`` refuses with a
    TypeError (octets from the wire, decoded as Latin-1)."""
    return given.isascii() and hmac.compare_digest(given, expected)


def _reply_tag(empty: Any, h: str, ip: str, port: int) -> str:
    return _mac_hex(empty, f"{h}|{ip}|{port}")


def _mac_hex(empty: Any, text: str) -> str:
    mac = empty.copy()
    mac.update(text.encode("utf-8", "surrogateescape"))
    return str(mac.hexdigest())


def reply_branch(signer: FlowSigner, head: str, loop: str, ip: str, port: int) -> str:
    """The branch dsbc writes on a request from ``ip:port`` (``head``: 16 characters, the
    transaction's hash; ``loop``: the loop-detection hash), which its answers must carry
    to be relayed there.  For tools and tests that play a node answering through dsbc."""
    if len(head) != 16:
        raise ValueError("head must be 16 characters")
    return f"{BRANCH_PREFIX}{head}{_reply_tag(_reply_mac(signer), head, ip, port)}.{loop}"


def owner_candidates(msg: SipMessage, trusted: bool) -> list[tuple[str, str]]:
    """The identities that decide who owns an out-of-dialog request, in lookup order.

    REGISTER: the To user (``account``); from a trusted peer (carrier or system node): the
    Request-URI user as ``did`` then ``account``; from anyone else: the From user
    (``account``), then (for an anonymous From) the P-Preferred-Identity user and the
    Digest username of Proxy-Authorization / Authorization; ``ProxyCore`` adds the account
    that registered from the same flow.  Public so that tools (``dsbc replay``) classify a request exactly as
    the proxy does without forwarding it.
    """
    if msg.method == "REGISTER":
        return [("account", ProxyCore._user(msg.to.uri))]
    if trusted:
        user = ProxyCore._user(msg.uri)
        # a number may carry telephone-subscriber parameters (RFC 3966: ;npdi;rn=... after a
        # number-portability dip, ;phone-context=, ;isub=): the did is the number before them
        number = user.partition(";")[0]
        return [("did", number), ("account", user)]
    out = [("account", ProxyCore._user(msg.from_.uri))]
    # when the From user is no known account (an anonymous call: anonymous@anonymous.invalid,
    # RFC 3323): the identity the phone asks for, then the user it authenticates as
    ppi = msg.get("p-preferred-identity")
    if ppi is not None:
        try:
            out.append(("account", ProxyCore._user(parse_name_addr(ppi.partition(",")[0]).uri)))
        except SipParseError:
            pass
    for name in ("proxy-authorization", "authorization"):
        cred = msg.get(name)
        if cred is not None:
            m = _DIGEST_USERNAME.search(cred)
            if m is not None:
                out.append(("account", m.group(1) if m.group(1) is not None else m.group(2)))
    return out


#: the username of Digest credentials (RFC 7616: a quoted string, or a token as some send)
_DIGEST_USERNAME: Final = re.compile(r'(?i)(?:^|[\s,])username\s*=\s*(?:"([^"]*)"|([^\s,"]+))')
#: how long a CANCEL of a held INVITE is remembered for its retransmissions (RFC 3261 Timer J)
CANCELLED_TTL: Final = 32.0
#: CANCELs of held INVITEs remembered (``ProxyCore._cancelled``) before a clear
CANCELLED_MAX: Final = 1_000
#: device flows remembered from REGISTERs (``ProxyCore._reg_flows``) before a clear
REG_FLOWS_MAX: Final = 200_000


def _with_received(via_text: str, ip: str, port: int) -> str:
    """The Via value with ``received`` and ``rport`` set to where the request came from."""
    # perf: the plain spelling (no whitespace around or inside the parameters, no received
    # or rport but a last bare ``;rport``) keeps its text as it is, without a list of parts;
    # str.isprintable() is False for every character str.strip() removes but " "
    semi = via_text.find(";")
    if semi > 0:
        tail = via_text[semi - 1 :].removesuffix(";rport")
        if tail.isprintable() and " " not in tail:
            low = tail.lower()
            if "rport" not in low and "received" not in low:
                return f"{via_text[: semi - 1]}{tail};received={ip};rport={port}"
    parts = via_text.split(";")
    out = [parts[0].rstrip()]
    for i in range(1, len(parts)):
        p = parts[i].strip()
        name = p.partition("=")[0].rstrip().lower()
        if name != "received" and name != "rport":
            out.append(p)
    out.append("received=" + ip)
    out.append(f"rport={port}")
    return ";".join(out)


def _quote(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")[:100]
