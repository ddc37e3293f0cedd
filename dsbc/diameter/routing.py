"""The Diameter dispatching core: which system a request goes to, and the way back. I/O-free.

Connections are opaque ids: client connections are ints, system peers are system
names.  The adapter (``dsbc.diameter.service``) handles capabilities exchange,
watchdogs and disconnects itself, tells the core when a system's peer opens or drops
(:meth:`DiameterRouter.peer_state`), feeds it every other message, and sends the
:class:`Send` items it returns.  Time is an argument; nothing here reads a clock.

Routing (SPEC section 8):
- a request whose Session-Id the core knows goes to the session's system (CCR-Update
  and -Terminate, and anything else in the session); a CCR-Update or -Terminate of a
  session it does not know goes to the system whose peer its Destination-Host names;
- otherwise the owner of its Subscription-Id (E.164 -> ``msisdn`` then ``did``, IMSI ->
  ``imsi``, SIP URI -> ``account`` then its number as ``msisdn`` / ``did``, tel URI -> the
  number, NAI / private -> ``account``, then an NAI's user part), then of its User-Name; an
  initial request pins its Session-Id to that system;
- a locked owner holds the request up to ``lock_hold``, then DIAMETER_TOO_BUSY (3004);
- the system's peer down: DIAMETER_UNABLE_TO_DELIVER (3002).
Requests from a system (Re-Auth, Abort-Session) go back to the client connection
that opened the session (for a session this node did not see open, to the client its
Destination-Host names).  Hop-by-hop ids are mapped both ways; End-to-End ids are
never changed (RFC 6733 6.1.9).
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Callable
from typing import NamedTuple

from dsbc.diameter import codec as dc

# (kind, value) candidates -> (system or "reject", state, known)
Decide = Callable[[list[tuple[str, str]]], tuple[str, str]]

TO_PEER = 0
TO_CLIENT = 1


class Send(NamedTuple):
    kind: int  # TO_PEER (target: system name) or TO_CLIENT (target: connection id)
    target: str | int
    data: bytes


class SystemRoute:
    __slots__ = ("answers", "dest_host", "dest_realm", "errors", "identity", "name", "open", "realm", "requests")

    def __init__(self, name: str, dest_host: str = "", dest_realm: str = "") -> None:
        self.name = name
        self.dest_host = dest_host
        self.dest_realm = dest_realm
        self.open = False
        self.identity = ""  # Origin-Host the peer gave in its CEA
        self.realm = ""  # Origin-Realm the peer gave in its CEA
        self.requests = 0
        self.answers = 0
        self.errors: dict[int, int] = {}


class _Session:
    __slots__ = ("client", "seen", "system")

    def __init__(self, system: str, client: str, seen: float) -> None:
        self.system = system
        self.client = client  # the client's Diameter identity (Origin-Host of its CER)
        self.seen = seen


class _Pending:
    __slots__ = ("app", "back", "back_hbh", "cc_type", "code", "deadline", "dest", "e2e", "flags", "session")

    def __init__(self, back: str | int, back_hbh: int, deadline: float, session: str, cc_type: int | None,
                 req: dc.Message, dest: str | int) -> None:
        self.back = back
        self.back_hbh = back_hbh
        self.deadline = deadline
        self.session = session
        self.cc_type = cc_type
        self.code = req.code
        self.app = req.app_id
        self.flags = req.flags
        self.e2e = req.end_to_end
        self.dest = dest


#: a telephone number as a SIP or tel URI writes it: "+", digits, visual separators (RFC 3966)
_PHONE = re.compile(r"\+?[0-9][0-9\-.()]*")


def _number(text: str) -> list[tuple[str, str]]:
    """``msisdn`` then ``did`` candidates of a URI's user part that is a telephone number."""
    if not _PHONE.fullmatch(text):
        return []
    digits = "".join(ch for ch in text if ch.isdigit())
    return [("msisdn", digits), ("did", digits)]


def _uri_candidates(data: str) -> list[tuple[str, str]]:
    """END_USER_SIP_URI: ``sip:`` / ``sips:`` (the user as ``account``, then as a number:
    IMS names a subscriber ``sip:+15550100@ims;user=phone``) or ``tel:`` (a number)."""
    uri = data.strip().strip("<>").strip()
    scheme, colon, rest = uri.partition(":")
    if not colon:
        scheme, rest = "sip", uri
    if scheme.lower() == "tel":
        number = rest.split(";", 1)[0]
        return _number(number) or [("account", number)]
    user = rest.rsplit("@", 1)[0] if "@" in rest else rest
    phone = user.split(";", 1)[0]  # a tel-subscriber's own parameters (;npdi, ;isub=)
    return [("account", user), *_number(phone)]


def _nai(data: str) -> list[tuple[str, str]]:
    """An NAI (``user@realm``, RFC 7542) or a User-Name: as written, then its user part as
    the ``account`` (the RADIUS dispatcher does the same with a User-Name)."""
    out = [("account", data), ("radius", data)]
    if "@" in data[1:]:
        out.append(("account", data.split("@", 1)[0]))
    return out


def candidates(m: dc.Message) -> list[tuple[str, str]]:
    """The identities that may name a request's owner, most specific first."""
    out: list[tuple[str, str]] = []
    for kind, data in dc.subscription_ids(m):
        data = data.strip()
        if not data:
            continue
        if kind == dc.SUB_E164:
            digits = data.lstrip("+")
            out += [("msisdn", digits), ("did", digits)]
        elif kind == dc.SUB_IMSI:
            out.append(("imsi", data))
        elif kind == dc.SUB_SIP_URI:
            out += _uri_candidates(data)
        else:
            out += _nai(data)
    user = m.text(dc.USER_NAME) or ""
    if user:
        out += _nai(user)
        local = user.split("@", 1)[0]  # an EPC NAI: "001010000000002@nai.epc.mnc001..."
        if local.isdigit():
            out += [("imsi", local), ("msisdn", local)]
    return out


class DiameterRouter:
    """Sessions, hop-by-hop maps and held requests of one dsbc process."""

    HOLD_POLL = 0.05
    SESSION_IDLE = 2 * 86400.0
    SWEEP_EVERY = 60.0

    def __init__(self, systems: list[SystemRoute], decide: Decide, origin_host: str, origin_realm: str,
                 *, request_timeout: float = 10.0, lock_hold: float = 2.0, hbh_seed: int = 0) -> None:
        self.systems = {s.name: s for s in systems}
        self.decide = decide
        self.origin_host = origin_host
        self.origin_realm = origin_realm
        self.request_timeout = request_timeout
        self.lock_hold = lock_hold
        self.sessions: dict[str, _Session] = {}
        self.sessions_dirty = False
        self.clients: dict[int, str] = {}  # open client connections: id -> identity
        self._pending: dict[tuple[str | int, int], _Pending] = {}
        self._heap: list[tuple[float, int, tuple[str | int, int]]] = []
        self._held: list[tuple[float, int, str, dc.Message]] = []
        self._hbh = hbh_seed & 0xFFFFFFFF
        self._seq = itertools.count()
        self._next_sweep = 0.0
        self._last_now = 0.0
        self.requests = 0
        self.answers = 0
        self.held_total = 0
        self.drops: dict[str, int] = {}
        self.local_answers: dict[int, int] = {}

    # -- bookkeeping ---------------------------------------------------------------------------

    def _count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def next_hbh(self) -> int:
        self._hbh = (self._hbh + 1) & 0xFFFFFFFF
        return self._hbh

    @property
    def held_count(self) -> int:
        return len(self._held)

    def status(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "answers": self.answers,
            "held": self.held_total,
            "drops": dict(self.drops),
            "local_answers": {str(k): v for k, v in self.local_answers.items()},
            "pending": len(self._pending),
            "sessions": len(self.sessions),
            "clients": len(self.clients),
            "systems": {
                s.name: {"peer": "open" if s.open else "down", "identity": s.identity, "requests": s.requests,
                         "answers": s.answers, "errors": {str(k): v for k, v in s.errors.items()}}
                for s in self.systems.values()
            },
        }

    def in_flight(self) -> int:
        """Requests relayed and not answered yet (either way)."""
        return len(self._pending)

    def _local(self, conn: int, req: dc.Message, code: int, msg: str,
               avps: list[dc.Avp] | None = None) -> list[Send]:
        self.local_answers[code] = self.local_answers.get(code, 0) + 1
        ans = dc.answer(req, code, self.origin_host, self.origin_realm, avps, error_message=msg)
        return [Send(TO_CLIENT, conn, dc.encode(ans))]

    # -- connections ------------------------------------------------------------------------------

    def client_open(self, conn: int, identity: str) -> None:
        self.clients[conn] = identity

    def client_closed(self, conn: int) -> None:
        self.clients.pop(conn, None)
        for key in [k for k, p in self._pending.items() if p.back == conn]:
            del self._pending[key]  # nobody left to answer

    def peer_state(self, system: str, is_open: bool, identity: str = "", realm: str = "") -> list[Send]:
        """A system's peer opened or dropped; in-flight requests to it get 3002 at once."""
        s = self.systems[system]
        s.open = is_open
        if identity:
            s.identity = identity
        if realm:
            s.realm = realm
        if is_open:
            return []
        out: list[Send] = []
        for key in [k for k in self._pending if k[0] == system]:
            p = self._pending.pop(key)
            out += self._fail(p, dc.UNABLE_TO_DELIVER, f"peer of {system} went down")
        return out

    def _fail(self, p: _Pending, code: int, msg: str) -> list[Send]:
        if isinstance(p.back, int) and p.back not in self.clients:
            return []
        hdr = dc.Header(p.flags, p.code, p.app, p.back_hbh, p.e2e)
        self.local_answers[code] = self.local_answers.get(code, 0) + 1
        ans = dc.answer(hdr, code, self.origin_host, self.origin_realm, error_message=msg)
        if p.session:
            ans.avps.insert(0, dc.utf8(dc.SESSION_ID, p.session))
        return [Send(TO_CLIENT if isinstance(p.back, int) else TO_PEER, p.back, dc.encode(ans))]

    # -- requests from clients ------------------------------------------------------------------

    def _looped(self, m: dc.Message) -> bool:
        """Whether a request already went through dsbc (RFC 6733 6.1.3: its Route-Record)."""
        return any(rr.text() == self.origin_host for rr in m.find_all(dc.ROUTE_RECORD))

    def client_request(self, conn: int, m: dc.Message, now: float) -> list[Send]:
        self._last_now = now
        self.requests += 1
        identity = self.clients.get(conn, "")
        if self._looped(m):
            return self._local(conn, m, dc.LOOP_DETECTED, "request already went through dsbc")
        if m.app_id != dc.APP_CREDIT_CONTROL:  # the only application dsbc advertised in its CEA
            return self._local(conn, m, dc.APPLICATION_UNSUPPORTED,
                               "dsbc relays credit-control (application 4) only")
        sid = m.text(dc.SESSION_ID) or ""
        cc_type = m.u32(dc.CC_REQUEST_TYPE)
        sess = self.sessions.get(sid) if sid else None
        if sess is not None:
            sess.seen = now
            return self._forward(conn, m, self.systems[sess.system], sid, cc_type, now)
        if not sid:
            # RFC 6733 7.5: Failed-AVP holds an example of the missing AVP
            return self._local(conn, m, dc.MISSING_AVP, "Session-Id missing",
                               [dc.grouped(dc.FAILED_AVP, [dc.utf8(dc.SESSION_ID, "")])])
        if cc_type in (dc.CC_UPDATE, dc.CC_TERMINATE):
            # a session this node did not see open (opened through the node that held the
            # address before keepalived moved it): its later requests name the OCS that
            # answered the initial one (RFC 4006 5.5.1), which holds it whatever the owner now
            named = self._system_named(m.text(dc.DESTINATION_HOST) or "")
            if named is not None:
                self.sessions[sid] = _Session(named.name, identity, now)
                self.sessions_dirty = True
                return self._forward(conn, m, named, sid, cc_type, now)
        held = len(self._held)
        out = self._route_new(conn, identity, m, sid, cc_type, now, now + self.lock_hold)
        self.held_total += len(self._held) - held
        return out

    def _route_new(self, conn: int, identity: str, m: dc.Message, sid: str, cc_type: int | None,
                   now: float, hold_until: float) -> list[Send]:
        system, state = self.decide(candidates(m))
        if system == "reject":
            return self._local(conn, m, dc.USER_UNKNOWN, "subscriber unknown to dsbc (store.unknown=reject)")
        if state == "locked":
            if now >= hold_until:
                self._count(self.drops, "locked")
                return self._local(conn, m, dc.TOO_BUSY, "subscriber is being migrated, try again shortly")
            self._held.append((hold_until, conn, sid, m))
            return []
        target = self.systems.get(system)
        if target is None:
            return self._local(conn, m, dc.UNABLE_TO_DELIVER, f"no system {system!r}")
        if cc_type != dc.CC_EVENT:
            self.sessions[sid] = _Session(system, identity, now)
            self.sessions_dirty = True
        return self._forward(conn, m, target, sid, cc_type, now)

    def _forward(self, conn: int, m: dc.Message, s: SystemRoute, sid: str, cc_type: int | None,
                 now: float) -> list[Send]:
        if not s.open:
            s.errors[dc.UNABLE_TO_DELIVER] = s.errors.get(dc.UNABLE_TO_DELIVER, 0) + 1
            if cc_type == dc.CC_INITIAL and self.sessions.get(sid) is not None:
                del self.sessions[sid]
            return self._local(conn, m, dc.UNABLE_TO_DELIVER, f"the {s.name} system's Diameter peer is down")
        hbh = self.next_hbh()
        p = _Pending(conn, m.hop_by_hop, now + self.request_timeout, sid, cc_type, m, s.name)
        self._pending[(s.name, hbh)] = p
        heapq.heappush(self._heap, (p.deadline, next(self._seq), (s.name, hbh)))
        fwd = dc.Message(m.flags, m.code, m.app_id, hbh, m.end_to_end, list(m.avps))
        # the client's Destination-Realm names dsbc's realm (or the old system's): without a
        # configured one, the realm the system's peer gave in its CEA is where the request goes
        realm = s.dest_realm or s.realm
        if realm:
            fwd.replace(dc.DESTINATION_REALM, dc.utf8(dc.DESTINATION_REALM, realm))
        if s.dest_host:
            fwd.replace(dc.DESTINATION_HOST, dc.utf8(dc.DESTINATION_HOST, s.dest_host))
        elif fwd.text(dc.DESTINATION_HOST) == self.origin_host:
            fwd.replace(dc.DESTINATION_HOST, None)  # it named dsbc (RFC 6733 6.1.4): the system picks
        identity = self.clients.get(conn)
        if identity:
            fwd.avps.append(dc.utf8(dc.ROUTE_RECORD, identity))
        s.requests += 1
        return [Send(TO_PEER, s.name, dc.encode(fwd))]

    # -- requests from systems (Re-Auth, Abort-Session, ...) -------------------------------------------

    def peer_request(self, system: str, m: dc.Message, now: float) -> list[Send]:
        self._last_now = now
        if self._looped(m):
            self.local_answers[dc.LOOP_DETECTED] = self.local_answers.get(dc.LOOP_DETECTED, 0) + 1
            ans = dc.answer(m, dc.LOOP_DETECTED, self.origin_host, self.origin_realm,
                            error_message="request already went through dsbc")
            return [Send(TO_PEER, system, dc.encode(ans))]
        sid = m.text(dc.SESSION_ID) or ""
        sess = self.sessions.get(sid) if sid else None
        conn = None
        if sess is not None and sess.system == system:
            conn = self._client_conn(sess.client)
        elif sess is None and sid:
            # a session this node did not see open (opened through the node that held the
            # address before keepalived moved it, or lost in a crash): a relay delivers a
            # request to the peer its Destination-Host names (RFC 6733 6.1.4), and the
            # session's next requests go to the system that sent it
            conn = self._client_conn(m.text(dc.DESTINATION_HOST) or "")
            if conn is not None:
                self.sessions[sid] = _Session(system, self.clients[conn], now)
                self.sessions_dirty = True
        if conn is None:
            ans = dc.answer(m, dc.UNABLE_TO_DELIVER, self.origin_host, self.origin_realm,
                            error_message="no client connection for this session")
            return [Send(TO_PEER, system, dc.encode(ans))]
        hbh = self.next_hbh()
        p = _Pending(system, m.hop_by_hop, now + self.request_timeout, sid, None, m, conn)
        self._pending[(conn, hbh)] = p
        heapq.heappush(self._heap, (p.deadline, next(self._seq), (conn, hbh)))
        fwd = dc.Message(m.flags, m.code, m.app_id, hbh, m.end_to_end, list(m.avps))
        fwd.avps.append(dc.utf8(dc.ROUTE_RECORD, self.systems[system].identity or system))
        return [Send(TO_CLIENT, conn, dc.encode(fwd))]

    def _system_named(self, host: str) -> SystemRoute | None:
        """The one system whose Diameter peer is ``host`` (its ``diameter_host``, or the
        Origin-Host of its CEA), if any."""
        host = host.lower()
        if not host:
            return None
        named = [s for s in self.systems.values() if host in (s.dest_host.lower(), s.identity.lower())]
        return named[0] if len(named) == 1 else None

    def _client_conn(self, identity: str) -> int | None:
        """The newest connection of the client ``identity``: one that reconnected while its
        old one is still half-open (not yet closed by the watchdog) is reached on the new one."""
        if not identity:
            return None
        return next((c for c, ident in reversed(self.clients.items()) if ident == identity), None)

    # -- answers ---------------------------------------------------------------------------------

    def answer_from(self, source: str | int, m: dc.Message, now: float) -> list[Send]:
        """An answer from a system's peer (source: its name) or a client (source: its id)."""
        self._last_now = now
        p = self._pending.pop((source, m.hop_by_hop), None)
        if p is None:
            self._count(self.drops, "unexpected_answer")
            return []
        if isinstance(p.back, int) and p.back not in self.clients:
            self._count(self.drops, "client_gone")
            return []
        if isinstance(source, str):
            s = self.systems[source]
            s.answers += 1
            rc = m.u32(dc.RESULT_CODE) if m.find(dc.RESULT_CODE) is not None else None
            if rc is not None and rc != dc.SUCCESS:
                s.errors[rc] = s.errors.get(rc, 0) + 1
            if p.session and p.session in self.sessions:
                failed_initial = p.cc_type == dc.CC_INITIAL and rc is not None and not 2000 <= rc < 3000
                if p.cc_type == dc.CC_TERMINATE or failed_initial:
                    del self.sessions[p.session]
                    self.sessions_dirty = True
        self.answers += 1
        kind = TO_CLIENT if isinstance(p.back, int) else TO_PEER
        return [Send(kind, p.back, dc.encode(dc.Message(m.flags, m.code, m.app_id, p.back_hbh, m.end_to_end,
                                                        m.avps)))]

    # -- time ---------------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2] not in self._pending:
            heapq.heappop(heap)
        times = [heap[0][0]] if heap else []
        if self._held:
            times.append(self._last_now + self.HOLD_POLL)
        if self.sessions:
            times.append(self._next_sweep)
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[Send]:
        self._last_now = now
        out: list[Send] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, key = heapq.heappop(heap)
            p = self._pending.pop(key, None)
            if p is None:
                continue
            self._count(self.drops, "timeout")
            if isinstance(p.dest, str):
                s = self.systems[p.dest]
                s.errors[dc.UNABLE_TO_DELIVER] = s.errors.get(dc.UNABLE_TO_DELIVER, 0) + 1
            out += self._fail(p, dc.UNABLE_TO_DELIVER, "no answer in time")
        if self._held:
            held, self._held = self._held, []
            for until, conn, sid, m in held:
                if conn not in self.clients:
                    continue
                cc_type = m.u32(dc.CC_REQUEST_TYPE)
                out += self._route_new(conn, self.clients[conn], m, sid, cc_type, now, until)
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_EVERY
            old = now - self.SESSION_IDLE
            stale = [k for k, v in self.sessions.items() if v.seen < old]
            for k in stale:
                del self.sessions[k]
            self.sessions_dirty = self.sessions_dirty or bool(stale)
        return out

    # -- sessions across restarts ----------------------------------------------------------------------

    def sessions_snapshot(self) -> list[list[object]]:
        self.sessions_dirty = False
        return [[k, v.system, v.client, v.seen] for k, v in self.sessions.items()]

    def load_sessions(self, rows: list[list[object]]) -> None:
        for r in rows:
            if len(r) == 4 and str(r[1]) in self.systems:
                self.sessions[str(r[0])] = _Session(str(r[1]), str(r[2]), float(r[3]))  # type: ignore[arg-type]
