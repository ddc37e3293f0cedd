"""Back-end node health by OPTIONS pings (I/O free: time is an argument).

Each system has an ordered list of nodes.  ``pick(system)`` returns the first node that is
up, so traffic fails over to the next node of the *same* system and never to the other
system.  A node is down after it leaves a ping unanswered for ``timeout`` seconds (or the
transport reports it unreachable) or answers 5xx, and up again on its next answer below 500.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from typing import Final

from .message import SipMessage
from .value import Value

log = logging.getLogger("dsbc.sip")

PING_BRANCH_PREFIX: Final = "z9hG4bK-dsbcping-"
#: a ping's timeout check that runs this much (s) after its time ran on a stalled loop ...
STALL: Final = 0.1
#: ... and is made again this much later, after the loop has read its sockets once
RECHECK: Final = 0.002


class Node(Value):
    """One back-end node of a system (a ``Value``)."""

    __slots__ = ("host", "index", "key", "port", "system", "transport")

    def __init__(self, system: str, index: int, transport: str, host: str, port: int) -> None:
        self.system = system
        self.index = index
        self.transport = transport
        self.host = host
        self.port = port
        self.key = f"{system}/{index}"

    def _fields(self) -> tuple[str, int, str, str, int]:
        return (self.system, self.index, self.transport, self.host, self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


class NodeState:
    __slots__ = ("answered", "check_at", "failures", "last_ok", "next_ping", "node", "pending", "rtt", "sent_at",
                 "since", "up")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.up = True  # until a ping says otherwise: a new worker serves at once
        self.answered = False  # a ping of this worker's was answered: up for sure
        self.last_ok = 0.0
        self.pending = ""  # branch of the unanswered ping
        self.sent_at = 0.0
        self.check_at = 0.0  # when the silence of the pending ping is judged
        self.next_ping = 0.0
        self.rtt = 0.0
        self.failures = 0
        self.since = 0.0


class Ping:
    __slots__ = ("data", "node")

    def __init__(self, node: Node, data: bytes) -> None:
        self.node = node
        self.data = data


class HealthChecker:
    def __init__(
        self,
        nodes: list[Node],
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        local_host: str = "127.0.0.1",
        local_port: int = 5060,
        tag: str = "",
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.local_host = local_host
        self.local_port = local_port
        self._tag = tag or uuid.uuid4().hex[:10]
        self._seq = itertools.count(1)
        self.states: dict[str, NodeState] = {n.key: NodeState(n) for n in nodes}
        self._by_system: dict[str, list[NodeState]] = {}
        self._by_addr: dict[tuple[str, int], NodeState] = {}
        for st in self.states.values():
            self._by_system.setdefault(st.node.system, []).append(st)
            self._by_addr[(st.node.host, st.node.port)] = st
        for lst in self._by_system.values():
            lst.sort(key=lambda s: s.node.index)
        #: ping branch without its sequence number -> the node it was sent to
        self._by_branch_head = {self._branch_head(st.node): st for st in self.states.values()}

    # --- queries --------------------------------------------------------------------

    def pick(self, system: str, prefer: tuple[str, int] | None = None) -> Node | None:
        """A node of ``system`` that is up: ``prefer`` (host, port) if it is one and up."""
        if prefer is not None:
            st = self._by_addr.get(prefer)
            if st is not None and st.node.system == system and st.up:
                return st.node
        fallback = None
        for st in self._by_system.get(system, ()):
            if st.up:
                if st.answered:
                    return st.node
                if fallback is None:
                    fallback = st.node
        # no node has answered yet (a worker just started): the first one presumed up.  Once
        # one has, a node not heard from yet (one a reload added) waits for its first answer
        return fallback

    def node_at(self, host: str, port: int) -> Node | None:
        st = self._by_addr.get((host, port))
        return st.node if st else None

    def nodes(self, system: str) -> list[Node]:
        return [st.node for st in self._by_system.get(system, ())]

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "system": st.node.system,
                "node": str(st.node),
                "up": st.up,
                "rtt_ms": round(st.rtt * 1000, 2),
                "failures": st.failures,
            }
            for st in self.states.values()
        ]

    # --- timers ---------------------------------------------------------------------

    def get_timer(self) -> float | None:
        deadlines = []
        for st in self.states.values():
            deadlines.append(st.next_ping)
            if st.pending:
                deadlines.append(st.check_at)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Ping]:
        out: list[Ping] = []
        for st in self.states.values():
            if st.pending and now >= st.check_at:
                first = st.sent_at + self.timeout
                if st.check_at == first and now - first > STALL:
                    # this check runs late: the loop was stalled (a busy or paused worker),
                    # and the answer may be in the socket unread (uvloop runs timers before
                    # it polls).  Judge once more after one poll, not on a silence not heard.
                    st.check_at = now + RECHECK
                else:
                    self._mark(st, False, now, f"no answer to OPTIONS in {self.timeout:g} s")
                    st.pending = ""
            if now >= st.next_ping:
                out.append(self._ping(st, now))
        return out

    def _ping(self, st: NodeState, now: float) -> Ping:
        seq = next(self._seq)
        n = st.node
        branch = f"{self._branch_head(n)}-{seq}"
        if not st.pending:
            st.pending = branch
            st.sent_at = now
            st.check_at = now + self.timeout
        else:
            st.pending = branch  # keep the original sent_at: the node is still silent
        st.next_ping = now + self.interval
        host = f"[{n.host}]" if ":" in n.host else n.host
        lhost = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        data = (
            f"OPTIONS sip:{host}:{n.port};transport={n.transport} SIP/2.0\r\n"
            f"Via: SIP/2.0/{n.transport.upper()} {lhost}:{self.local_port};branch={branch};rport\r\n"
            f"Max-Forwards: 70\r\n"
            f"From: <sip:dsbc@{lhost}>;tag={self._tag}\r\n"
            f"To: <sip:{host}:{n.port}>\r\n"
            f"Call-ID: dsbcping-{self._tag}-{seq}\r\n"
            f"CSeq: {seq} OPTIONS\r\n"
            f"User-Agent: dsbc\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
        return Ping(n, data)

    # --- inputs ---------------------------------------------------------------------

    @staticmethod
    def is_ping_response(msg: SipMessage) -> bool:
        vias = msg.vias
        return bool(vias) and vias[0].branch.startswith(PING_BRANCH_PREFIX)

    def _branch_head(self, n: Node) -> str:
        return f"{PING_BRANCH_PREFIX}{self._tag}-{n.system}.{n.index}"

    def handle_response(self, msg: SipMessage, now: float, src_ip: str | None = None) -> None:
        """An answer to a ping; ``src_ip`` (where it came from) must be the node's own
        address, so a forged 200 from elsewhere cannot keep a dead node "up"."""
        # any answer to a ping of a node that is waiting for one: with an interval shorter
        # than the node's answer time the answer is to an earlier ping than the last one,
        # and must count all the same (else a slow but living node is marked down)
        if msg.status < 200:
            return  # (a provisional answer: the final one decides)
        st = self._by_branch_head.get(msg.vias[0].branch.rpartition("-")[0])
        if st is not None and st.pending and (src_ip is None or src_ip == st.node.host):
            st.rtt = now - st.sent_at
            st.pending = ""
            # a node that answers 5xx / 6xx (503 overloaded or in maintenance, 500) is up
            # but will not serve: down, as Kamailio's dispatcher counts it; 4xx (a node
            # that does not do OPTIONS: 404, 405, 483) is a living node
            self._mark(st, msg.status < 500, now, f"answered OPTIONS {msg.status}")

    def mark_unreachable(self, host: str, port: int, now: float) -> None:
        st = self._by_addr.get((host, port))
        if st is not None:
            self._mark(st, False, now, "unreachable (connection failed)")

    def _mark(self, st: NodeState, ok: bool, now: float, why: str) -> None:
        if ok:
            st.last_ok = now
            st.answered = True
            st.failures = 0
        else:
            st.failures += 1
        if st.up != ok:
            st.up = ok
            st.since = now
            # the operator's first sign that calls to a system fail over, or get 503
            (log.info if ok else log.warning)("sip: node %s %s is %s: %s", st.node.key, st.node,
                                               "up again" if ok else "down", why)
