"""The RADIUS dispatcher core: requests in, re-signed requests and answers out. I/O-free.

The adapter (``dsbc.radius.service``) feeds it datagrams with the current time and
sends the :class:`Out` items it returns; it also calls :meth:`RadiusCore.handle_timer`
at :meth:`RadiusCore.get_timer`.  Nothing here reads a clock or touches a socket.

Per request:
  1. decode, find the client by source address, check its authenticators;
  2. a retransmission of a request already seen (source, code, identifier, Request
     Authenticator: RFC 5080 2.2.2) is answered from the cached answer, or ignored
     while the first copy is still in flight;
  3. the owner: the pin of the NAS's Acct-Session-Id for accounting (an Accounting-On
     or -Off ends the NAS's pins), the system that sent the Access-Challenge whose State
     an Access-Request returns (the next round of an EAP exchange), else the User-Name's
     customer;
     a locked customer is held until the flip or ``lock_hold``;
  4. the request gets an identifier of the system's id space, a Proxy-State, a new
     Request Authenticator, User-Password and Message-Authenticator for the system's
     secret;
  5. the answer is checked against the system's secret, stripped of our Proxy-State,
     re-encrypted and re-signed for the client, cached, and sent.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

from dsbc.radius import packet as rp
from dsbc.radius.idspace import ClientEntry, ClientTable, IdExhausted, IdSpace

Addr = tuple[str, int]
# (system or "reject", state "active" | "locked")
Decide = Callable[[str], tuple[str, str]]

TO_CLIENT = 0
TO_SERVER = 1
AUTH = 0
ACCT = 1


class Out(NamedTuple):
    """A datagram to send: to a client through listener ``via`` or to a server through ``slot``."""

    kind: int  # TO_CLIENT or TO_SERVER
    via: int  # listener index (AUTH / ACCT) for TO_CLIENT, slot for TO_SERVER
    system: str
    data: bytes
    addr: Addr


class SystemTarget:
    __slots__ = ("answers", "dead_until", "ids", "last_answer", "name", "requests", "secret", "server_timeouts",
                 "servers", "timeouts")

    def __init__(self, name: str, secret: str, auth: list[Addr], acct: list[Addr], max_slots: int = 64) -> None:
        self.name = name
        self.secret = secret.encode()
        self.servers: tuple[list[Addr], list[Addr]] = (auth, acct)
        self.dead_until: dict[Addr, float] = {}
        self.last_answer: dict[Addr, float] = {}  # per server: when it last answered
        self.ids = IdSpace(max_slots)
        self.requests = 0
        self.answers = 0
        self.timeouts = 0
        self.server_timeouts: dict[Addr, int] = {}  # per server, for `dsbc status`

    def pick(self, kind: int, now: float) -> Addr | None:
        """The first server of this kind not marked dead; the least recently dead otherwise."""
        servers = self.servers[kind]
        if not servers:
            return None
        for s in servers:
            if self.dead_until.get(s, 0.0) <= now:
                return s
        return min(servers, key=lambda s: self.dead_until.get(s, 0.0))


class _Dup:
    __slots__ = ("answer", "outstanding", "via")

    def __init__(self, via: int) -> None:
        self.answer: bytes | None = None
        self.outstanding = 0
        self.via = via


DupKey = tuple[str, int, int, int, bytes]  # client ip, port, code, identifier, authenticator


class _Request:
    """A client request waiting for the system (or for its customer's lock to clear)."""

    __slots__ = ("addr", "client", "deadline", "key", "pkt", "session", "status", "user", "via")

    def __init__(self, key: DupKey, via: int, client: ClientEntry, addr: Addr, pkt: rp.Packet,
                 user: str, session: tuple[str, str] | None, status: int | None) -> None:
        self.key = key
        self.via = via
        self.client = client
        self.addr = addr
        self.pkt = pkt
        self.user = user
        self.session = session
        self.status = status
        self.deadline = 0.0


class _Pending:
    __slots__ = ("auth", "deadline", "ident", "req", "sent", "server", "slot", "state", "system", "tries", "wire")

    def __init__(self, req: _Request, system: SystemTarget, slot: int, ident: int, server: Addr,
                 auth: bytes, wire: bytes, state: bytes, deadline: float, sent: float) -> None:
        self.req = req
        self.system = system
        self.slot = slot
        self.ident = ident
        self.server = server
        self.auth = auth
        self.wire = wire
        self.tries = 1
        self.deadline = deadline
        self.state = state
        self.sent = sent


def nas_key(source: str, pkt: rp.Packet) -> str:
    """Which NAS sent an accounting request: its source address, and the NAS-IP-Address,
    NAS-IPv6-Address and NAS-Identifier it names.  Acct-Session-Ids are unique per NAS only
    (RFC 2866 5.5), and a RADIUS proxy in front of dsbc sends for many NAS from one address."""
    parts = [source]
    for t in (rp.NAS_IP_ADDRESS, rp.NAS_IPV6_ADDRESS):
        v = pkt.get(t)
        if v is not None:
            parts.append(str(ipaddress.ip_address(v)) if len(v) in (4, 16) else v.hex())
    ident = pkt.get_text(rp.NAS_IDENTIFIER)
    if ident is not None:
        parts.append(ident)
    return "|".join(parts)


class RadiusCore:
    """All RADIUS dispatching state of one process."""

    HOLD_POLL = 0.05
    STICKY_TTL = 2 * 86400.0
    SWEEP_EVERY = 60.0
    CHALLENGES_MAX = 100_000  # EAP conversations followed at once (a few rounds each)
    CHALLENGE_TTL = 60.0  # FreeRADIUS's eap timer_expire: a conversation's next round comes sooner

    def __init__(
        self,
        clients: Sequence[tuple[str, str] | tuple[str, str, bool]],
        systems: list[SystemTarget],
        decide: Decide,
        *,
        timeout: float = 3.0,
        retries: int = 2,
        duplicate_window: float = 30.0,
        lock_hold: float = 2.0,
        dead_time: float = 30.0,
    ) -> None:
        self.clients = ClientTable(clients)
        self.systems = {s.name: s for s in systems}
        self.decide = decide
        self.timeout = timeout
        self.retries = retries
        self.window = duplicate_window
        self.lock_hold = lock_hold
        self.dead_time = dead_time
        self._dups: dict[DupKey, _Dup] = {}
        self._dup_expiry: deque[tuple[float, DupKey]] = deque()
        self._pending: dict[tuple[str, int, int], _Pending] = {}
        self._heap: list[tuple[float, int, tuple[str, int, int]]] = []
        self._seq = itertools.count()
        self._held: list[_Request] = []
        self._next_sweep = 0.0
        self._state_prefix = os.urandom(4)
        # (NAS address, Acct-Session-Id) -> [system, last seen]
        self.sticky: dict[tuple[str, str], list[object]] = {}
        self.sticky_dirty = False
        # the pins other nodes saved (adopt_sticky): a session of theirs whose requests come
        # here (the address moved to this node) takes its pin over on its first request
        self.adopted: dict[tuple[str, str], list[object]] = {}
        # sessions whose Stop was answered -> (system, until): a Stop the NAS sends again with
        # a new Identifier (Acct-Delay-Time changed, RFC 2866 5.2) follows the first one
        self._stopped: dict[tuple[str, str], tuple[str, float]] = {}
        # (NAS address, State of an Access-Challenge) -> (system, until): the next round of
        # a multi-round (EAP) authentication goes where it started, even after a migration
        self._challenges: dict[tuple[str, bytes], tuple[str, float]] = {}
        self.requests = 0
        self.answers = 0
        self.duplicates = 0
        self.held_total = 0
        self.drops: dict[str, int] = {}

    # -- bookkeeping -----------------------------------------------------------------------

    def drop(self, reason: str) -> list[Out]:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return []

    @property
    def held_count(self) -> int:
        return len(self._held)

    def status(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "answers": self.answers,
            "duplicates": self.duplicates,
            "held": self.held_total,
            "drops": dict(self.drops),
            "pending": len(self._pending),
            "accounting_sessions": len(self.sticky),
            "systems": {s.name: self._system_status(s) for s in self.systems.values()},
        }

    def _system_status(self, s: SystemTarget) -> dict[str, object]:
        servers: dict[str, str] = {}
        timeouts: dict[str, int] = {}
        for kind in (AUTH, ACCT):
            for addr in s.servers[kind]:
                name = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
                if s.dead_until.get(addr, 0.0) > self._last_now:
                    servers[name] = "dead"
                else:  # "untried": nothing has come back from it yet (dsbc sends no probes)
                    servers[name] = "up" if addr in s.last_answer else "untried"
                timeouts[name] = s.server_timeouts.get(addr, 0)
        return {
            "requests": s.requests,
            "answers": s.answers,
            "timeouts": s.timeouts,
            "sockets": s.ids.slots,
            "servers": servers,
            "server_timeouts": timeouts,
        }

    _last_now = 0.0

    # -- requests from clients ------------------------------------------------------------------

    def handle_request(self, via: int, data: bytes, addr: Addr, now: float) -> list[Out]:
        self._last_now = now
        client = self.clients.find(addr[0], addr[1])
        if client is None:
            return self.drop("unknown_client")
        try:
            pkt = rp.decode(data)
        except rp.RadiusDecodeError as exc:
            return self.drop(exc.reason)
        code = pkt.code
        if code not in rp.REQUEST_CODES or (
                code != rp.STATUS_SERVER and (code == rp.ACCOUNTING_REQUEST) != (via == ACCT)):
            return self.drop("bad_code")  # Status-Server is welcome on both ports (RFC 5997 4)
        key: DupKey = (addr[0], addr[1], code, pkt.identifier, pkt.authenticator)
        dup = self._dups.get(key)
        if dup is not None:
            self.duplicates += 1
            if dup.answer is not None:
                return [Out(TO_CLIENT, via, "", dup.answer, addr)]
            return []  # first copy still in flight or held: we retransmit, not the NAS
        try:
            if not self._authentic(pkt, data, client.secret):
                return self.drop("bad_authenticator")
        except rp.RadiusDecodeError as exc:
            return self.drop(exc.reason)
        if client.require_ma and code == rp.ACCESS_REQUEST and pkt.get(rp.MESSAGE_AUTHENTICATOR) is None:
            # radius.clients[].require_message_authenticator (Blast-RADIUS, CVE-2024-3596)
            return self.drop("no_message_authenticator")
        if code == rp.STATUS_SERVER:
            return self._status_server(via, pkt, client, key, addr, now)
        self.requests += 1
        user = (pkt.get_text(rp.USER_NAME) or "").strip()
        session: tuple[str, str] | None = None
        status: int | None = None
        nas = addr[0]
        if code == rp.ACCOUNTING_REQUEST:
            status = pkt.get_int(rp.ACCT_STATUS_TYPE)
            nas = nas_key(addr[0], pkt)
            sid = pkt.get_text(rp.ACCT_SESSION_ID)
            if sid:
                session = (nas, sid)
        req = _Request(key, via, client, addr, pkt, user, session, status)
        dup = self._dups[key] = _Dup(via)
        self._dup_expiry.append((now + self.window, key))
        if code == rp.ACCOUNTING_REQUEST and status in (rp.ACCT_ON, rp.ACCT_OFF):
            # the NAS (re)started or stops: its sessions are over, and a NAS that numbers
            # them from a counter reuses their Acct-Session-Ids for other users' sessions
            self._forget_nas(nas)
        if code == rp.ACCOUNTING_REQUEST and status in (rp.ACCT_ON, rp.ACCT_OFF):
            # a NAS reboot concerns the sessions it had on either system, whatever User-Name
            # it puts in (some give their own name)
            return self._fan_out(req, dup, now)
        pinned = self.sticky.get(session) if session is not None else None
        if pinned is None and session is not None and status != rp.ACCT_START and nas != addr[0]:
            # a pin saved by a dsbc that keyed sessions by the source address alone
            pinned = self.sticky.get((addr[0], session[1]))
            if pinned is not None:
                req.session = (addr[0], session[1])
        if pinned is None and session is not None and status != rp.ACCT_START:
            pinned = self.adopted.pop(session, None)
            if pinned is not None and float(pinned[1]) < now - self.STICKY_TTL:  # type: ignore[arg-type]
                pinned = None  # aged since it was adopted (those rows are read once)
            if pinned is not None:
                self.sticky[session] = pinned
                self.sticky_dirty = True
        if pinned is not None:
            pinned[1] = now
            return self._forward(req, self.systems[str(pinned[0])], dup, now)
        if code == rp.ACCESS_REQUEST:
            returned = pkt.get(rp.STATE)
            challenged = self._challenges.get((addr[0], returned)) if returned is not None else None
            if challenged is not None and challenged[1] > now:
                return self._forward(req, self.systems[challenged[0]], dup, now)
        if session is not None and status != rp.ACCT_START:
            stopped = self._stopped.get(session)
            if stopped is not None and stopped[1] > now:
                return self._forward(req, self.systems[stopped[0]], dup, now)
        system, state = self.decide(user)
        if state == "locked":
            req.deadline = now + self.lock_hold
            self._held.append(req)
            self.held_total += 1
            return []
        return self._route(req, system, dup, now)

    def _authentic(self, pkt: rp.Packet, data: bytes, secret: bytes) -> bool:
        if pkt.code == rp.ACCOUNTING_REQUEST:
            if not rp.verify_accounting_request(data, secret):
                return False
            signed = rp.verify_message_authenticator(data, secret, rp.ZERO16)
            # RFC 3579 3.2: a packet with an EAP-Message and no Message-Authenticator is
            # discarded (FreeRADIUS does: relayed, it would time out and mark the server dead)
            return signed if signed is not None else pkt.get(rp.EAP_MESSAGE) is None
        ok = rp.verify_message_authenticator(data, secret)
        if ok is None:
            # RFC 3579 3.2 / RFC 5997: EAP and Status-Server must be signed
            return pkt.code == rp.ACCESS_REQUEST and pkt.get(rp.EAP_MESSAGE) is None
        return ok

    def _status_server(self, via: int, pkt: rp.Packet, client: ClientEntry, key: DupKey,
                       addr: Addr, now: float) -> list[Out]:
        code = rp.ACCOUNTING_RESPONSE if via == ACCT else rp.ACCESS_ACCEPT
        ans = rp.Packet(code, pkt.identifier, pkt.authenticator,
                        [(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16), (rp.REPLY_MESSAGE, b"dsbc alive")])
        wire = rp.sign_response(ans, pkt.authenticator, client.secret)
        dup = self._dups[key] = _Dup(via)
        dup.answer = wire
        self._dup_expiry.append((now + self.window, key))
        return [Out(TO_CLIENT, via, "", wire, addr)]

    def _route(self, req: _Request, system_name: str, dup: _Dup, now: float) -> list[Out]:
        system = self.systems.get(system_name)
        if system is None and system_name == "reject" and req.pkt.code == rp.ACCESS_REQUEST:
            # store.unknown = "reject": answer Access-Reject (a NAS left without an answer
            # retransmits and then takes dsbc for a dead server)
            self.drop("rejected")
            attrs = [(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16)]
            attrs += [(rp.PROXY_STATE, v) for v in req.pkt.get_all(rp.PROXY_STATE)]
            ans = rp.Packet(rp.ACCESS_REJECT, req.pkt.identifier, req.pkt.authenticator, attrs)
            wire = rp.sign_response(ans, req.pkt.authenticator, req.client.secret)
            dup.answer = wire
            return [Out(TO_CLIENT, req.via, "", wire, req.addr)]
        if system is None:
            self._dups.pop(req.key, None)
            return self.drop("rejected" if system_name == "reject" else "no_system")
        if req.session is not None and req.status != rp.ACCT_STOP:
            self.sticky[req.session] = [system.name, now]
            self.sticky_dirty = True
        return self._forward(req, system, dup, now)

    def _fan_out(self, req: _Request, dup: _Dup, now: float) -> list[Out]:
        out: list[Out] = []
        for system in self.systems.values():
            if system.servers[ACCT]:
                out += self._forward(req, system, dup, now)
        if not out:
            self._dups.pop(req.key, None)
        return out

    def _forward(self, req: _Request, system: SystemTarget, dup: _Dup, now: float) -> list[Out]:
        kind = ACCT if req.pkt.code == rp.ACCOUNTING_REQUEST else AUTH
        server = system.pick(kind, now)
        if server is None:
            if dup.outstanding == 0:
                self._dups.pop(req.key, None)
            return self.drop("no_server")
        try:
            slot, ident = system.ids.allocate(now)
        except IdExhausted:
            if dup.outstanding == 0:
                self._dups.pop(req.key, None)
            return self.drop("ids_exhausted")
        src = req.pkt
        state = self._state_prefix + bytes((slot >> 8 & 0xFF, slot & 0xFF, ident))
        attrs: list[tuple[int, bytes]]
        if kind == AUTH:
            auth = rp.random_authenticator()
            # Blast-RADIUS (CVE-2024-3596): sign every Access-Request, MA first
            attrs = [(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16)]
            for t, v in src.attrs:
                if t == rp.MESSAGE_AUTHENTICATOR:
                    continue
                if t == rp.USER_PASSWORD:
                    try:
                        plain = rp.unhide_password(v, req.client.secret, src.authenticator)
                    except rp.RadiusDecodeError as exc:
                        system.ids.release(slot, ident, now)
                        self._dups.pop(req.key, None)
                        return self.drop(exc.reason)
                    v = rp.hide_password(plain, system.secret, auth)
                attrs.append((t, v))
            if src.get(rp.CHAP_PASSWORD) is not None and src.get(rp.CHAP_CHALLENGE) is None:
                # the challenge defaulted to the Request Authenticator, which we change
                attrs.append((rp.CHAP_CHALLENGE, src.authenticator))
        else:
            auth = rp.ZERO16
            attrs = list(src.attrs)
        attrs.append((rp.PROXY_STATE, state))
        fwd = rp.Packet(src.code, ident, auth, attrs)
        try:
            wire = rp.sign_request(fwd, system.secret)
        except ValueError:
            system.ids.release(slot, ident, now)
            if dup.outstanding == 0:
                self._dups.pop(req.key, None)
            return self.drop("too_big")
        if kind == ACCT:
            auth = wire[4:20]
        deadline = now + self.timeout
        p = _Pending(req, system, slot, ident, server, auth, wire, state, deadline, now)
        pkey = (system.name, slot, ident)
        self._pending[pkey] = p
        heapq.heappush(self._heap, (deadline, next(self._seq), pkey))
        dup.outstanding += 1
        system.requests += 1
        return [Out(TO_SERVER, slot, system.name, wire, server)]

    # -- answers from systems ------------------------------------------------------------------

    def handle_answer(self, system_name: str, slot: int, data: bytes, addr: Addr, now: float) -> list[Out]:
        self._last_now = now
        try:
            code, ident, _ = rp.peek_header(data)
        except rp.RadiusDecodeError as exc:
            return self.drop("answer_" + exc.reason)
        p = self._pending.get((system_name, slot, ident))
        if p is None or p.server != addr:
            return self.drop("unexpected_answer")
        system = p.system
        req = p.req
        try:
            pkt = rp.decode(data)
            if not rp.verify_response(data, p.auth, system.secret):
                return self.drop("bad_answer_authenticator")
            if rp.verify_message_authenticator(data, system.secret, p.auth) is False:
                return self.drop("bad_answer_authenticator")
            expected = rp.ACCOUNTING_RESPONSE if req.pkt.code == rp.ACCOUNTING_REQUEST else None
            if (expected is not None and code != expected) or (expected is None and code not in rp.AUTH_ANSWERS):
                return self.drop("bad_answer_code")
            # our Proxy-State is the last one (RFC 2865 5.33): strip it, keep the client's
            for i in range(len(pkt.attrs) - 1, -1, -1):
                if pkt.attrs[i][0] == rp.PROXY_STATE:
                    if pkt.attrs[i][1] == p.state:
                        del pkt.attrs[i]
                    break
            rp.reencrypt_answer_attrs(pkt, system.secret, p.auth, req.client.secret, req.pkt.authenticator)
        except rp.RadiusDecodeError as exc:
            return self.drop("answer_" + exc.reason)
        del self._pending[(system_name, slot, ident)]
        system.ids.release(slot, ident, now)
        system.dead_until.pop(p.server, None)
        system.last_answer[p.server] = now
        system.answers += 1
        dup = self._dups.get(req.key)
        if dup is None:  # expired from the cache while in flight: still answer once
            dup = _Dup(req.via)
        else:
            dup.outstanding -= 1
        if dup.answer is not None:
            return []  # second answer of a fan-out
        pkt.identifier = req.pkt.identifier
        if code in rp.AUTH_ANSWERS and pkt.get(rp.MESSAGE_AUTHENTICATOR) is None:
            # Blast-RADIUS (CVE-2024-3596): a NAS may require it in every Access answer,
            # and first; home servers that leave it out still get their answers through
            pkt.attrs.insert(0, (rp.MESSAGE_AUTHENTICATOR, rp.ZERO16))
        wire = rp.sign_response(pkt, req.pkt.authenticator, req.client.secret)
        dup.answer = wire
        if code == rp.ACCESS_CHALLENGE:
            returned = pkt.get(rp.STATE)
            if returned is not None:
                if len(self._challenges) >= self.CHALLENGES_MAX:  # bounded: the oldest go first
                    del self._challenges[next(iter(self._challenges))]
                self._challenges[(req.addr[0], returned)] = (system.name, now + self.CHALLENGE_TTL)
        if req.session is not None and req.status == rp.ACCT_STOP:
            if self.sticky.pop(req.session, None) is not None:
                self.sticky_dirty = True
            self._stopped[req.session] = (system.name, now + self.window)
        self.answers += 1
        return [Out(TO_CLIENT, req.via, system.name, wire, req.addr)]

    # -- time ----------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        heap = self._heap
        while heap and self._pending.get(heap[0][2]) is None:
            heapq.heappop(heap)
        times = []
        if heap:
            times.append(heap[0][0])
        if self._held:
            times.append(min(self._held[0].deadline, self._last_now + self.HOLD_POLL))
        if self._dup_expiry:
            times.append(self._dup_expiry[0][0])
        if self.sticky or self._stopped or self._challenges:
            times.append(self._next_sweep)
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[Out]:
        self._last_now = now
        out: list[Out] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, pkey = heapq.heappop(heap)
            p = self._pending.get(pkey)
            if p is None or p.deadline != deadline:
                continue
            if p.tries <= self.retries:
                # RFC 5080 2.2.1: same identifier and authenticator on a retransmission
                p.tries += 1
                p.deadline = now + self.timeout
                heapq.heappush(heap, (p.deadline, next(self._seq), pkey))
                out.append(Out(TO_SERVER, p.slot, p.system.name, p.wire, p.server))
                continue
            del self._pending[pkey]
            p.system.ids.release(p.slot, p.ident, now)
            p.system.timeouts += 1
            p.system.server_timeouts[p.server] = p.system.server_timeouts.get(p.server, 0) + 1
            if p.system.last_answer.get(p.server, -1.0) < p.sent:
                # silent since this request went out: dead (as FreeRADIUS's proxy, a server
                # that answers others meanwhile is alive; it dropped this one request)
                p.system.dead_until[p.server] = now + self.dead_time
            self.drop("timeout")
            dup = self._dups.get(p.req.key)
            if dup is not None:
                dup.outstanding -= 1
                if dup.outstanding <= 0 and dup.answer is None:
                    del self._dups[p.req.key]  # let the NAS's next retransmission try again
        if self._held:
            still: list[_Request] = []
            for req in self._held:
                system, state = self.decide(req.user)
                dup = self._dups.get(req.key)
                if dup is None:
                    continue
                if state != "locked":
                    out += self._route(req, system, dup, now)
                elif req.deadline <= now:
                    del self._dups[req.key]
                    self.drop("locked")
                else:
                    still.append(req)
            self._held = still
        exp = self._dup_expiry
        while exp and exp[0][0] <= now:
            _, key = exp.popleft()
            dup = self._dups.get(key)
            if dup is None:
                continue
            if dup.outstanding <= 0 and (dup.answer is not None or not self._is_held(key)):
                del self._dups[key]
            else:
                exp.append((now + self.window, key))
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_EVERY
            old = now - self.STICKY_TTL
            stale = [k for k, v in self.sticky.items() if float(v[1]) < old]  # type: ignore[arg-type]
            for k in stale:
                del self.sticky[k]
            self.sticky_dirty = self.sticky_dirty or bool(stale)
            for k in [k for k, v in self._stopped.items() if v[1] <= now]:
                del self._stopped[k]
            for c in [c for c, v in self._challenges.items() if v[1] <= now]:
                del self._challenges[c]
        return out

    def _forget_nas(self, nas: str) -> None:
        """Drop the accounting pins (and answered Stops) of the sessions of NAS ``nas`` (a
        :func:`nas_key`; one that names less, a bare source address say, stands for every
        NAS it may be: an Accounting-On may leave out the NAS-Identifier its sessions give)."""
        source, *names = nas.split("|")

        def of_nas(k: tuple[str, str]) -> bool:
            parts = k[0].split("|")
            return parts[0] == source and all(n in parts[1:] for n in names)

        pinned = [k for k in self.sticky if of_nas(k)]
        for k in pinned:
            del self.sticky[k]
        for k in [k for k in self._stopped if of_nas(k)]:
            del self._stopped[k]
        self.sticky_dirty = self.sticky_dirty or bool(pinned)

    def _is_held(self, key: DupKey) -> bool:
        return any(r.key == key for r in self._held)

    # -- accounting pins across restarts ---------------------------------------------------

    def sticky_snapshot(self) -> list[list[object]]:
        self.sticky_dirty = False
        return [[nas, sid, v[0], v[1]] for (nas, sid), v in self.sticky.items()]

    def adopt_sticky(self, rows: list[list[object]], now: float) -> None:
        """Replace the pins known from other nodes (a session pinned here keeps its own).
        Those last seen over STICKY_TTL ago are left out, as the sweep drops this node's
        own: a node that died or was retired never saves again, and its last pins would
        send a reused Acct-Session-Id to a system its customer left long ago."""
        old = now - self.STICKY_TTL
        self.adopted = {(str(r[0]), str(r[1])): [str(r[2]), float(r[3])]  # type: ignore[arg-type]
                        for r in rows if len(r) == 4 and str(r[2]) in self.systems
                        and float(r[3]) >= old}  # type: ignore[arg-type]

    def load_sticky(self, rows: list[list[object]]) -> None:
        for row in rows:
            if len(row) == 4 and str(row[2]) in self.systems:
                self.sticky[(str(row[0]), str(row[1]))] = [str(row[2]), float(row[3])]  # type: ignore[arg-type]
