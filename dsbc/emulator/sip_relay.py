"""The proxy half of an emulated SIP system: requests to registered users go out through
their Path (RFC 3327), in-dialog requests follow the Route set, responses come back by Via.

"Stateful enough" (RFC 3261 16): one client transaction per forwarded request, keyed by
our branch; the upstream server transaction is keyed by the upstream branch so that a
retransmitted request is answered with the latest response (and re-sent downstream over
UDP while the next hop is silent), a CANCEL is answered 200 and sent on, and the ACK of a
non-2xx final response is generated downstream and absorbed upstream.  100 Trying is
sent upstream at once for INVITE and never relayed.  ACK of a 2xx is forwarded statelessly.

A request for an account registered from several phones forks to all of them (``fork``,
RFC 3261 16.7): provisional and 2xx answers of every branch go upstream, the first 2xx
CANCELs the branches still ringing, and when every branch failed the best failure (a 6xx,
else the lowest status) is the one final answer upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sip.headers import Via
from sip.message import Editor, SipMessage

from .sip_net import Hop

if TYPE_CHECKING:
    from .sip_system import SipSystem

#: a finished transaction is kept this long to relay 2xx retransmissions and absorb ACKs
LINGER = 32.0
#: a CANCELled INVITE whose next hop never sends its 487 is ended by us after this long
CANCEL_WAIT = 4.0

ServerKey = tuple[str, str, int, str]


class Fork:
    """The branches of one forked request and what went upstream for all of them."""

    __slots__ = ("answered", "branches", "finals")

    def __init__(self) -> None:
        self.branches: list[RelayTx] = []
        self.answered = False  # a 2xx went upstream
        self.finals: dict[str, tuple[int, bytes]] = {}  # branch -> failure (status, upstream bytes)


class RelayTx:
    __slots__ = (
        "ack_data",
        "branch",
        "cancelled_at",
        "created",
        "data",
        "done_at",
        "entry",
        "fork",
        "last",
        "method",
        "responded",
        "routes",
        "ruri",
        "status",
        "target",
        "up_hop",
        "up_key",
        "up_msg",
        "via",
    )

    def __init__(self, branch: str, up_msg: SipMessage, up_hop: Hop, up_key: ServerKey, target: Hop,
                 data: bytes, ruri: str, routes: list[str], via: str, now: float,
                 entry: dict[str, Any] | None) -> None:
        self.branch = branch
        self.method = up_msg.method
        self.up_msg = up_msg
        self.up_hop = up_hop
        self.up_key = up_key
        self.target = target
        self.data = data
        self.ruri = ruri
        self.routes = routes
        self.via = via
        self.status = 0  # final status once known
        self.last = b""  # latest response sent upstream
        self.created = now
        self.done_at = 0.0
        self.cancelled_at = 0.0
        self.responded = False  # the next hop answered something
        self.entry = entry
        self.ack_data = b""
        self.fork: Fork | None = None  # set on every branch of a forked request


def server_key(msg: SipMessage, method: str | None = None) -> ServerKey:
    return (msg.top_via.branch, msg.call_id, msg.cseq[0], method or msg.method)


def via_with_received(via: Via, ip: str, port: int) -> str | None:
    """The top Via with received/rport filled in (RFC 3261 18.2.1, RFC 3581), or None when
    nothing needs to change."""
    want_rport = via.param("rport") is not None
    if not want_rport and via.host == ip:
        return None
    params: list[str] = []
    has_received = False
    for k, v in via.params:
        kl = k.lower()
        if kl == "rport":
            params.append(f";rport={port}")
        elif kl == "received":
            params.append(f";received={ip}")
            has_received = True
        else:
            params.append(f";{k}" if v is None else f";{k}={v}")
    if not has_received:
        params.append(f";received={ip}")
    sent_by = via.host if via.port is None else f"{via.host}:{via.port}"
    return f"SIP/2.0/{via.transport} {sent_by}{''.join(params)}"


class Relay:
    def __init__(self, system: SipSystem) -> None:
        self.sys = system
        self._client: dict[str, RelayTx] = {}
        self._server: dict[ServerKey, RelayTx] = {}

    # --- requests --------------------------------------------------------------------------

    def fork(self, msg: SipMessage, hop: Hop, targets: list[tuple[Hop, str, list[str] | None]], *,
             pop_route: bool = False, record_route: bool = False, entry: dict[str, Any] | None = None) -> None:
        """Send ``msg`` to every ``(target, ruri, route)`` at once (one branch each)."""
        if len(targets) == 1:
            target, ruri, route = targets[0]
            self.forward(msg, hop, target, ruri=ruri, route=route, pop_route=pop_route,
                         record_route=record_route, entry=entry)
            return
        group = Fork()
        for i, (target, ruri, route) in enumerate(targets):
            tx = self.forward(msg, hop, target, ruri=ruri, route=route, pop_route=pop_route,
                              record_route=record_route, entry=entry, trying=i == 0, group=group)
            if tx is not None:
                group.branches.append(tx)

    def forward(self, msg: SipMessage, hop: Hop, target: Hop, *, ruri: str | None = None,
                route: list[str] | None = None, pop_route: bool = False,
                record_route: bool = False, entry: dict[str, Any] | None = None,
                trying: bool = True, group: Fork | None = None) -> RelayTx | None:
        """Send ``msg`` on to ``target`` with our Via (and Record-Route, new R-URI, Route)."""
        sys = self.sys
        mf = msg.max_forwards
        if mf is not None and mf <= 0:
            if msg.method != "ACK" and trying:
                sys.send(hop, sys.response(msg, 483, "Too Many Hops"))
            return None
        ed = Editor(msg)
        if ruri is not None:
            ed.start_line = f"{msg.method} {ruri} SIP/2.0".encode("latin-1", "replace")
        routes = msg.values("route")
        if pop_route:
            ed.set_first_value("route", None)
            routes = routes[1:]
        top = via_with_received(msg.top_via, hop.addr[0], hop.addr[1])
        if top is not None:
            ed.set_first_value("via", top)
        idx = msg.index("max-forwards")
        if idx >= 0 and mf is not None:
            ed.set(idx, str(mf - 1))
        else:
            ed.append("max-forwards", "70")
        if route:
            ed.prepend("route", ", ".join(route))
            routes = route + routes
        if record_route:
            ed.prepend("record-route", f"<{sys.own_uri(hop.transport)};lr>")
        branch = "z9hG4bK" + sys.new_tag()
        via = f"SIP/2.0/{target.transport.upper()} {sys.sent_by()};branch={branch};rport"
        ed.prepend("via", via)
        ed.append("x-system", sys.name)
        data = ed.to_bytes()
        if msg.method == "ACK":
            sys.send(target, data)
            return None
        key = server_key(msg)
        tx = RelayTx(branch, msg, hop, key, target, data, ruri or msg.ruri, routes, via, sys.now(), entry)
        tx.fork = group
        self._client[branch] = tx
        if trying:  # the upstream side's transaction: the first branch stands for all of them
            self._server[key] = tx
        if msg.method == "INVITE" and trying:
            tx.last = sys.response(msg, 100, "Trying")
            sys.send(hop, tx.last)
        sys.send(target, data, on_fail=lambda: self._unreachable(tx))
        return tx

    def _unreachable(self, tx: RelayTx) -> None:
        if tx.status == 0 and not tx.responded:
            self._final(tx, 503, "Service Unavailable", [("retry-after", "5")])

    def _final(self, tx: RelayTx, status: int, reason: str, extra: list[tuple[str, str]] | None = None) -> None:
        """A final response of our own for a transaction the next hop did not finish."""
        sys = self.sys
        tx.status = status
        tx.done_at = sys.now()
        data = sys.response(tx.up_msg, status, reason, extra or [])
        if tx.fork is not None:
            self._branch_failed(tx, status, data)
            return
        tx.last = data
        sys.send(tx.up_hop, tx.last)
        sys.note(tx.entry, str(status), "cancelled" if status == 487 else f"failed {status}")

    def _upstream(self, tx: RelayTx) -> RelayTx:
        """The transaction that answers upstream: the first branch of a fork, else ``tx``."""
        return tx.fork.branches[0] if tx.fork is not None and tx.fork.branches else tx

    def _branch_failed(self, tx: RelayTx, status: int, data: bytes) -> None:
        """A branch of a fork ended without a 2xx: once every branch has, the best failure
        (a 6xx, else the lowest status) goes upstream, unless a 2xx already did."""
        group = tx.fork
        assert group is not None
        group.finals[tx.branch] = (status, data)
        if group.answered or len(group.finals) < len(group.branches):
            return
        best = min(group.finals.values(), key=lambda f: (f[0] < 600, f[0]))
        up = self._upstream(tx)
        up.last = best[1]
        up.done_at = self.sys.now()
        self.sys.send(up.up_hop, best[1])
        self.sys.note(tx.entry, str(best[0]), "cancelled" if best[0] == 487 else f"failed {best[0]}")

    def retransmission(self, msg: SipMessage, hop: Hop) -> bool:
        tx = self._server.get(server_key(msg))
        if tx is None:
            return False
        if tx.last:
            self.sys.send(hop, tx.last)
        for branch in tx.fork.branches if tx.fork is not None else [tx]:
            if not branch.responded and branch.target.transport == "udp":
                self.sys.send(branch.target, branch.data)
        return True

    def cancel(self, msg: SipMessage, hop: Hop) -> bool:
        tx = self._server.get(server_key(msg, "INVITE"))
        if tx is None:
            return False
        sys = self.sys
        sys.send(hop, sys.response(msg, 200, "OK"))
        sys.note(tx.entry, "CANCEL", None)
        for branch in tx.fork.branches if tx.fork is not None else [tx]:
            self._cancel_branch(branch)
        return True

    def _cancel_branch(self, tx: RelayTx) -> None:
        if tx.status == 0 and not tx.cancelled_at:
            tx.cancelled_at = self.sys.now()
            self.sys.send(tx.target, self._build(tx, "CANCEL", tx.up_msg.get("to") or ""))

    def ack(self, msg: SipMessage) -> bool:
        """The ACK of a non-2xx final response we relayed: absorbed (we ACKed downstream)."""
        tx = self._server.get(server_key(msg, "INVITE"))
        if tx is not None and tx.fork is not None:
            return not tx.fork.answered and len(tx.fork.finals) == len(tx.fork.branches)
        return tx is not None and tx.status >= 300

    def _build(self, tx: RelayTx, method: str, to: str) -> bytes:
        """CANCEL or ACK for the INVITE we sent (RFC 3261 9.1 and 17.1.1.3): same R-URI,
        Via (branch), Route, From, Call-ID and CSeq number."""
        up = tx.up_msg
        lines = [f"{method} {tx.ruri} SIP/2.0", f"Via: {tx.via}"]
        if tx.routes:
            lines.append(f"Route: {', '.join(tx.routes)}")
        lines += [
            "Max-Forwards: 70",
            f"From: {up.get('from')}",
            f"To: {to}",
            f"Call-ID: {up.call_id}",
            f"CSeq: {up.cseq[0]} {method}",
            f"X-System: {self.sys.name}",
            "Content-Length: 0",
            "",
            "",
        ]
        return "\r\n".join(lines).encode("latin-1", "replace")

    # --- responses -------------------------------------------------------------------------

    def response(self, msg: SipMessage, hop: Hop) -> bool:
        """Relay a response upstream; False when it is not ours (the caller counts it)."""
        tx = self._client.get(msg.top_via.branch)
        if tx is None:
            return False
        method = msg.cseq[1]
        if method == "CANCEL":
            return True  # the answer to our own CANCEL
        if method != tx.method:
            return False
        tx.responded = True
        status = msg.status
        if status == 100:
            return True
        sys = self.sys
        if tx.status:
            if tx.method == "INVITE" and tx.status >= 300 and status >= 300 and tx.ack_data:
                sys.send(tx.target, tx.ack_data)  # our ACK was lost: send it again
            if not (tx.method == "INVITE" and 200 <= status < 300):
                return True  # a retransmitted final response: the upstream side is done
        ed = Editor(msg)
        ed.set_first_value("via", None)
        ed.append("x-system", sys.name)
        data = ed.to_bytes()
        if status >= 200 and not tx.status:
            tx.status = status
            tx.done_at = sys.now()
        if tx.method == "INVITE" and status >= 300:
            tx.ack_data = self._build(tx, "ACK", msg.get("to") or "")
            sys.send(tx.target, tx.ack_data)
        group = tx.fork
        if group is not None:
            if status >= 300:
                self._branch_failed(tx, status, data)
                return True
            up = self._upstream(tx)
            if status >= 200:
                if group.answered and tx.method != "INVITE":
                    return True  # RFC 3261 16.7: one final answer upstream (2xx to INVITE aside)
                if not group.answered:
                    group.answered = True
                    up.done_at = sys.now()
                    for other in group.branches:  # the others stop ringing
                        if other is not tx and other.method == "INVITE":
                            self._cancel_branch(other)
            elif group.answered:
                return True  # a late provisional answer
            up.last = data
        else:
            tx.last = data
        sys.send(tx.up_hop, data)
        state = None
        if tx.method == "INVITE":
            if status < 200:
                state = "ringing" if status in (180, 183) else None
            elif status < 300:
                state = "answered"
            else:
                state = "cancelled" if status == 487 else f"failed {status}"
        sys.note(tx.entry, str(status), state)
        return True

    # --- timers ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        timeout = self.sys.relay_timeout
        for tx in list(self._client.values()):
            if tx.status:
                if now - tx.done_at > LINGER:
                    self._client.pop(tx.branch, None)
                    if self._server.get(tx.up_key) is tx:
                        del self._server[tx.up_key]
                continue
            if tx.cancelled_at and now - tx.cancelled_at > CANCEL_WAIT:
                self._final(tx, 487, "Request Terminated")
            elif now - tx.created > timeout:
                if tx.method == "INVITE" and tx.responded and not tx.cancelled_at:
                    tx.cancelled_at = now
                    self.sys.send(tx.target, self._build(tx, "CANCEL", tx.up_msg.get("to") or ""))
                self._final(tx, 408, "Request Timeout")

    def close(self) -> None:
        self._client.clear()
        self._server.clear()

    def __len__(self) -> int:
        return len(self._client)
