"""sip.proxy.ProxyCore without sockets: bytes and time in, ``Send`` actions out.

The core is built as dsbc builds it (ProxySettings, HealthChecker with Nodes, FlowSigner)
around a tiny Router stub defined here, so every test states what a user would see on
the wire: which node (or phone flow) a message goes to, and which headers it carries.
Bugs found in the proxy are kept as regression tests (``test_regression_*``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sip.errors import SipError
from sip.flow import Flow, FlowSigner
from sip.health import HealthChecker, Node
from sip.message import SipMessage, make_response, parse_message
from sip.proxy import BRANCH_PREFIX, ProxyCore, ProxySettings, RegistrationSeen, Send
from sip.uri import parse_name_addr
from tests.peers.sipmsg import parse_message as lenient_parse

SECRET = b"proxy-core-test-secret-0123456789"
ADV = "192.0.2.10"
PORT = 5060
PHONE = Flow("udp", "203.0.113.5", 40000)
PHONE_TCP = Flow("tcp", "203.0.113.6", 40001, conn_id=7, worker=1)
CARRIER = Flow("udp", "198.51.100.7", 5060)
S1 = Node("source", 0, "udp", "10.0.0.1", 5060)
S2 = Node("source", 1, "udp", "10.0.0.2", 5060)
T1 = Node("target", 0, "udp", "10.0.1.1", 5060)
T2 = Node("target", 1, "udp", "10.0.1.2", 5060)
NODES = (S1, S2, T1, T2)
NODE_AT = {(n.host, n.port): n for n in NODES}


def flow_of(node: Node) -> Flow:
    return Flow(node.transport, node.host, node.port)


# --- the Router stub ---------------------------------------------------------------------


class Decision(NamedTuple):
    system: str
    customer_id: str = ""
    state: str = "active"
    reason: str = ""


class StubRouter:
    """Identities -> customers -> (system, state), in memory; records every decide()."""

    def __init__(self) -> None:
        self.owners: dict[tuple[str, str], str] = {}
        self.customers: dict[str, tuple[str, str]] = {}
        self.unknown = "source"
        self.trusted: set[tuple[str, int]] = {(n.host, n.port) for n in NODES} | {
            (CARRIER.ip, CARRIER.port)
        }
        self.caps: dict[str, int] = {}
        self.decide_calls: list[list[tuple[str, str]]] = []

    def add(self, customer_id: str, system: str, *identities: str, state: str = "active") -> None:
        self.customers[customer_id] = (system, state)
        for ident in identities:
            kind, value = ident.split(":", 1)
            self.owners[(kind, value)] = customer_id

    def move(self, customer_id: str, system: str | None = None, state: str | None = None) -> None:
        old_system, old_state = self.customers[customer_id]
        self.customers[customer_id] = (system or old_system, state or old_state)

    def owner_system(self, customer_id: str) -> str:
        return self.customers[customer_id][0] if customer_id in self.customers else self.unknown

    def decide(self, candidates: Sequence[tuple[str, str]]) -> Decision:
        self.decide_calls.append(list(candidates))
        for kind, value in candidates:
            if kind == "did":
                value = "".join(c for c in value if c.isdigit())
            cid = self.owners.get((kind, value))
            if cid is not None:
                system, state = self.customers[cid]
                return Decision(system, cid, state, f"{kind}:{value}")
        return Decision(self.unknown, "", "active", "unknown")

    def is_trusted(self, ip: str, port: int) -> bool:
        return (ip, port) in self.trusted

    def expires_cap(self, customer_id: str) -> int:
        return self.caps.get(customer_id, 0)


def make_core(
    router: StubRouter | None = None, *, lock_hold: float = 2.0, nodes: Iterable[Node] = NODES
) -> tuple[ProxyCore, StubRouter]:
    router = router or standard_router()
    settings = ProxySettings(
        advertise_host=ADV,
        ports={"udp": PORT, "tcp": PORT},
        local_addresses=frozenset({(ADV, PORT)}),
        lock_hold=lock_hold,
        retry_after=30,
    )
    health = HealthChecker(
        list(nodes), interval=5.0, timeout=2.0, local_host=ADV, local_port=5099, tag="test"
    )
    return ProxyCore(settings, router, health, FlowSigner(SECRET)), router


def standard_router() -> StubRouter:
    r = StubRouter()
    r.add("42", "source", "account:1001", "did:15550001001")
    r.add("43", "target", "account:2000", "did:15550002000")
    return r


# --- messages ------------------------------------------------------------------------------


def request(
    method: str,
    ruri: str = "sip:2000@example.com",
    *,
    src: Flow = PHONE,
    frm: str = "<sip:1001@example.com>;tag=from1",
    to: str = "<sip:2000@example.com>",
    via: str | None = None,
    branch: str = "z9hG4bKphone1",
    call_id: str = "call-1@phone",
    cseq: int = 1,
    max_forwards: int | None = 70,
    headers: Sequence[str] = (),
    body: bytes = b"",
) -> bytes:
    via = via or f"SIP/2.0/{src.transport.upper()} {src.ip}:{src.port};branch={branch};rport"
    lines = [f"{method} {ruri} SIP/2.0", f"Via: {via}"]
    if max_forwards is not None:
        lines.append(f"Max-Forwards: {max_forwards}")
    lines += [f"From: {frm}", f"To: {to}", f"Call-ID: {call_id}", f"CSeq: {cseq} {method}"]
    lines += list(headers)
    lines += [f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode() + body


def answer(
    forwarded: bytes,
    status: int,
    reason: str = "OK",
    *,
    to_tag: str | None = "node-tag",
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """What a node answers to a request dsbc forwarded to it (Via, From, To, Call-ID,
    CSeq copied byte-exact; the Record-Route set reflected on a dialog-creating answer)."""
    m = parse_message(forwarded)
    extra = list(headers)
    if 100 < status < 300:
        extra += [("record-route", v) for v in m.values("record-route")]
    return make_response(m, status, reason, extra, to_tag=to_tag if status > 100 else None)


def parse(send: Send) -> SipMessage:
    return parse_message(send.data, datagram=send.transport == "udp")


def one(sends: list[Send]) -> Send:
    assert len(sends) == 1, sends
    return sends[0]


def to_node(send: Send, node: Node) -> None:
    assert (send.transport, send.ip, send.port) == (node.transport, node.host, node.port), send
    assert not send.health


def to_flow(send: Send, flow: Flow) -> None:
    assert (send.transport, send.ip, send.port) == (flow.transport, flow.ip, flow.port), send
    if flow.is_stream:
        assert (send.conn_id, send.worker) == (flow.conn_id, flow.worker), send


def status_of(send: Send) -> int:
    m = parse(send)
    assert not m.is_request, send.data[:80]
    return m.status


def rr_values(m: SipMessage) -> list[str]:
    return m.values("record-route")


def uri_params(value: str) -> dict[str, str]:
    return {k: v or "" for k, v in parse_name_addr(value).uri.params}


def our_branch(m: SipMessage) -> str:
    top = m.vias[0]
    assert top.host == ADV and top.branch.startswith(BRANCH_PREFIX)
    return top.branch


def mark_down(core: ProxyCore, *nodes: Node) -> None:
    for n in nodes:
        core.health.mark_unreachable(n.host, n.port, 0.0)


# --- who owns a request ------------------------------------------------------------------


def test_device_invite_goes_to_the_system_of_the_from_user() -> None:
    core, router = make_core()
    # From 1001 (source) calling 2000 (target): the caller's system gets the call
    send = one(core.handle_data(request("INVITE"), PHONE, 0.0))
    to_node(send, S1)
    assert router.decide_calls == [[("account", "1001")]]
    m = parse(send)
    assert m.method == "INVITE" and m.ruri == "sip:2000@example.com"


@pytest.mark.parametrize(
    "method", ["SUBSCRIBE", "MESSAGE", "OPTIONS", "NOTIFY", "REFER", "PUBLISH"]
)
def test_other_device_requests_follow_the_from_user(method: str) -> None:
    core, router = make_core()
    send = one(
        core.handle_data(
            request(method, "sip:1001@example.com", frm="<sip:2000@example.com>;tag=a"), PHONE, 0.0
        )
    )
    to_node(send, T1)
    assert router.decide_calls == [[("account", "2000")]]


def test_register_goes_to_the_system_of_the_to_user() -> None:
    core, router = make_core()
    # third-party registration: From 1001 (source) registers 2000 (target)
    reg = request(
        "REGISTER",
        "sip:example.com",
        to="<sip:2000@example.com>",
        headers=["Contact: <sip:2000@203.0.113.5:40000>"],
    )
    send = one(core.handle_data(reg, PHONE, 0.0))
    to_node(send, T1)
    assert router.decide_calls == [[("account", "2000")]]


def test_trusted_peer_is_routed_by_request_uri_as_did_then_account() -> None:
    core, router = make_core()
    # a carrier calls a DID of customer 43
    send = one(
        core.handle_data(
            request(
                "INVITE", "sip:15550002000@192.0.2.10", src=CARRIER, frm="<sip:999@carrier>;tag=c"
            ),
            CARRIER,
            0.0,
        )
    )
    to_node(send, T1)
    assert router.decide_calls[-1] == [("did", "15550002000"), ("account", "15550002000")]
    # the From user (1001, source) does not matter for a trusted peer
    send = one(
        core.handle_data(
            request("INVITE", "sip:2000@192.0.2.10", src=CARRIER, call_id="c2"), CARRIER, 0.0
        )
    )
    to_node(send, T1)
    assert router.decide_calls[-1] == [("did", "2000"), ("account", "2000")]
    # a system's node calling the other system's customer (a call between the systems)
    send = one(
        core.handle_data(
            request(
                "INVITE",
                "sip:1001@192.0.2.10",
                src=flow_of(T1),
                frm="<sip:2000@x>;tag=t",
                call_id="c3",
            ),
            flow_of(T1),
            0.0,
        )
    )
    to_node(send, S1)


def test_tel_request_uri_from_a_carrier() -> None:
    core, router = make_core()
    send = one(
        core.handle_data(
            request("INVITE", "tel:+1-555-000-1001", src=CARRIER, to="<tel:+1-555-000-1001>"),
            CARRIER,
            0.0,
        )
    )
    to_node(send, S1)
    assert router.decide_calls[-1][0] == ("did", "+1-555-000-1001")
    assert parse(send).ruri == "tel:+1-555-000-1001"


@pytest.mark.parametrize("unknown,node", [("source", S1), ("target", T1)])
def test_unknown_identity_follows_store_unknown(unknown: str, node: Node) -> None:
    core, router = make_core()
    router.unknown = unknown
    send = one(
        core.handle_data(request("INVITE", frm="<sip:nobody@example.com>;tag=x"), PHONE, 0.0)
    )
    to_node(send, node)


ANON = '"Anonymous" <sip:anonymous@anonymous.invalid>;tag=x'


@pytest.mark.parametrize(
    "headers",
    [
        ['P-Preferred-Identity: "Erin" <sip:2000@example.com>'],
        ['Proxy-Authorization: Digest username="2000", realm="x", nonce="n", uri="sip:a", response="r"'],
        ["Authorization: Digest realm=x, username=2000, nonce=n, uri=sip:a, response=r"],
    ],
)
def test_an_anonymous_call_goes_by_the_identity_or_credentials_it_carries(headers: list[str]) -> None:
    """A phone hiding its number (RFC 3323: From anonymous@anonymous.invalid) still names
    itself in P-Preferred-Identity or in its Digest credentials: the owner of that account
    (the target here) gets the call, not store.unknown's system (the source)."""
    core, _ = make_core()
    to_node(one(core.handle_data(request("INVITE", frm=ANON, headers=headers), PHONE, 0.0)), T1)
    # a known From wins over them
    known = request("INVITE", headers=headers, branch="z9hG4bKk", call_id="c2")
    to_node(one(core.handle_data(known, PHONE, 0.0)), S1)


def test_an_anonymous_call_from_a_registered_flow_goes_to_its_accounts_system() -> None:
    """The first INVITE of an anonymous call carries no credentials yet: the account that
    registered from the same address and port (or TCP connection) decides."""
    core, _ = make_core()
    reg = request("REGISTER", "sip:example.com", frm="<sip:2000@example.com>;tag=r",
                  to="<sip:2000@example.com>", headers=["Contact: <sip:2000@203.0.113.5:40000>"])
    to_node(one(core.handle_data(reg, PHONE, 0.0)), T1)
    anon = request("INVITE", frm=ANON, branch="z9hG4bKa", call_id="anon-1")
    to_node(one(core.handle_data(anon, PHONE, 1.0)), T1)
    # from another flow: nothing known, store.unknown (the source)
    other = Flow("udp", "203.0.113.5", 40002)
    anon2 = request("INVITE", frm=ANON, src=other, branch="z9hG4bKb", call_id="anon-2")
    to_node(one(core.handle_data(anon2, other, 1.0)), S1)


def test_unknown_identity_with_reject_policy_gets_404() -> None:
    core, router = make_core()
    router.unknown = "reject"
    send = one(
        core.handle_data(request("INVITE", frm="<sip:nobody@example.com>;tag=x"), PHONE, 0.0)
    )
    to_flow(send, PHONE)
    assert status_of(send) == 404
    assert core.counters["rejected:unknown"] == 1


def test_options_to_dsbc_itself_is_answered_200() -> None:
    core, router = make_core()
    send = one(
        core.handle_data(request("OPTIONS", f"sip:{ADV}:{PORT}", to=f"<sip:{ADV}>"), PHONE, 0.0)
    )
    to_flow(send, PHONE)
    m = parse(send)
    assert m.status == 200 and "INVITE" in (m.get("allow") or "")
    assert router.decide_calls == []
    # over TCP the answer goes back on the same connection
    send = one(core.handle_data(request("OPTIONS", f"sip:{ADV}", src=PHONE_TCP), PHONE_TCP, 0.0))
    to_flow(send, PHONE_TCP)
    assert status_of(send) == 200


def test_regression_a_keepalive_options_with_dsbc_as_its_route_is_answered_by_dsbc() -> None:
    """A phone with dsbc as its outbound proxy puts it in a Route (RFC 3261 8.1.2): its
    keep-alive OPTIONS to dsbc's address went to the From user's system instead (and got
    that system's 503 while it was down, or 404 for an unknown user).  With its own Route
    removed (16.4) the request is for dsbc: answered as one without a Route."""
    core, router = make_core()
    route = (f"Route: <sip:{ADV}:{PORT};lr>",)
    m = parse(one(core.handle_data(request("OPTIONS", f"sip:{ADV}:{PORT}", to=f"<sip:{ADV}>", headers=route), PHONE, 0.0)))
    assert m.status == 200 and "INVITE" in (m.get("allow") or "")
    mark_down(core, S1, S2)  # the owner's system down: dsbc's own answer does not change
    send = one(core.handle_data(request("OPTIONS", f"sip:{ADV}", headers=route, src=PHONE_TCP), PHONE_TCP, 0.0))
    to_flow(send, PHONE_TCP)
    assert status_of(send) == 200
    assert status_of(one(core.handle_data(request("INVITE", f"sip:{ADV}", headers=route), PHONE, 0.0))) == 404
    assert router.decide_calls == []
    # a REGISTER to dsbc's address still goes to its To user's system; with a further Route
    # it is not for dsbc (and that preloaded Route is not sent on)
    core, router = make_core()
    to_node(one(core.handle_data(request("REGISTER", f"sip:{ADV}", to="<sip:1001@example.com>", headers=route), PHONE, 0.0)), S1)
    send = one(core.handle_data(
        request("OPTIONS", f"sip:{ADV}", headers=(f"Route: <sip:{ADV}:{PORT};lr>, <sip:{S1.host}:{S1.port};lr>",)), PHONE, 0.0
    ))
    to_node(send, S1)
    m = parse(send)
    assert m.is_request and m.values("route") == []


def test_a_devices_preloaded_route_does_not_reach_the_owners_node() -> None:
    """A device's request out of any dialog (or a REGISTER) naming other hops in Route (the
    other system's node, a host behind dsbc) goes to its owner's node without them: the node
    would route it there.  Kamailio's edge examples remove_hf("Route") alike.  A trusted
    peer's Route and a device's in-dialog route set are kept."""
    core, _ = make_core()
    preloaded = f"Route: <sip:{ADV}:{PORT};lr>, <sip:{T1.host}:{T1.port};lr>, <sip:10.1.2.3;lr>"
    for method, ruri, to in (
        ("INVITE", "sip:2000@example.com", "<sip:2000@example.com>"),
        ("MESSAGE", "sip:2000@example.com", "<sip:2000@example.com>"),
        ("REGISTER", "sip:example.com", "<sip:1001@example.com>"),
    ):
        send = one(core.handle_data(request(method, ruri, to=to, headers=(preloaded,)), PHONE, 0.0))
        to_node(send, S1)  # 1001 is a source customer
        assert parse(send).values("route") == [], method
    # a carrier's preloaded Route is its business
    send = one(core.handle_data(request("INVITE", "sip:15550001001@example.com", src=CARRIER,
                                        headers=(f"Route: <sip:{ADV}:{PORT};lr>, <sip:10.1.2.3;lr>",)), CARRIER, 0.0))
    assert parse(send).values("route") == ["<sip:10.1.2.3;lr>"]
    # in a dialog: the route set after dsbc's own entry goes on
    fwd = one(core.handle_data(request("INVITE"), PHONE, 0.0))
    rr = parse(fwd).values("record-route")
    bye = request("BYE", "sip:2000@10.0.0.1:5060", to="<sip:2000@example.com>;tag=x", cseq=2,
                  headers=[f"Route: {', '.join([*rr, '<sip:10.0.0.1;lr>'])}"])
    assert parse(one(core.handle_data(bye, PHONE, 1.0))).values("route") == ["<sip:10.0.0.1;lr>"]


def test_answers_made_by_dsbc_tell_the_phone_its_nat_address() -> None:
    """RFC 3581 4: the top Via of a response dsbc makes itself (a keep-alive OPTIONS, a 483,
    a 400) carries received and rport, which is how a phone behind NAT learns its public
    address; the later Via values are copied as they were."""
    core, _ = make_core()
    via = "SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bKnat1;rport, SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx"
    for req, status in (
        (request("OPTIONS", f"sip:{ADV}", to=f"<sip:{ADV}>", via=via), 200),
        (request("INVITE", via=via, max_forwards=0), 483),
    ):
        m = parse(one(core.handle_data(req, PHONE, 0.0)))
        assert m.status == status
        assert m.values("via") == [
            f"SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bKnat1;received={PHONE.ip};rport={PHONE.port}",
            "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx",
        ]


# --- Record-Route and dialogs ------------------------------------------------------------


def test_record_route_carries_the_system_and_the_device_flow() -> None:
    core, _ = make_core()
    m = parse(one(core.handle_data(request("INVITE"), PHONE, 0.0)))
    (rr,) = rr_values(m)
    params = uri_params(rr)
    assert parse_name_addr(rr).uri.host == ADV and "lr" in params
    assert params["dsbc"].partition(".")[0] == "source"
    assert core.signer.decode(params["ft"]) == PHONE


def test_record_route_from_a_trusted_peer_has_no_flow_token() -> None:
    core, _ = make_core()
    m = parse(
        one(core.handle_data(request("INVITE", "sip:15550001001@x", src=CARRIER), CARRIER, 0.0))
    )
    (rr,) = rr_values(m)
    params = uri_params(rr)
    assert params["dsbc"].partition(".")[0] == "source" and "ft" not in params


def test_regression_a_strict_router_next_hop_gets_its_uri_as_the_request_uri() -> None:
    """RFC 3261 16.6 item 6: a next hop whose Route URI has no ``lr`` is a strict router (RFC
    2543): it must get its own URI as the Request-URI and the Request-URI last in the Route.
    dsbc sent the BYE of a system toward a carrier's strict-routing proxy with the carrier's
    Contact as the Request-URI and the proxy's URI left in the Route."""
    core, _ = make_core()
    m = parse(one(core.handle_data(request("INVITE", "sip:15550001001@x", src=CARRIER), CARRIER, 0.0)))
    (rr,) = rr_values(m)
    strict = "<sip:198.51.100.8:5060;maddr=198.51.100.8>"  # the carrier's proxy, no lr
    bye = _in_dialog(
        "BYE", [rr, strict], "sip:carrier-ua@10.20.30.40:5060", src=flow_of(S1),
        frm="<sip:1001@example.com>;tag=n1", to="<sip:15557654321@carrier>;tag=c1", cseq=2, branch="z9hG4bKsr1",
    )  # fmt: skip
    send = one(core.handle_data(bye, flow_of(S1), 1.0))
    assert (send.ip, send.port) == ("198.51.100.8", 5060)
    m = parse(send)
    assert m.start_line == "BYE sip:198.51.100.8:5060;maddr=198.51.100.8 SIP/2.0"
    assert m.values("route") == ["<sip:carrier-ua@10.20.30.40:5060>"]
    # a loose router (lr) next hop: Request-URI and Route as they were
    loose = "<sip:198.51.100.8:5060;lr>"
    bye = _in_dialog(
        "BYE", [rr, loose], "sip:carrier-ua@10.20.30.40:5060", src=flow_of(S1),
        frm="<sip:1001@example.com>;tag=n1", to="<sip:15557654321@carrier>;tag=c1", cseq=3, branch="z9hG4bKsr2",
    )  # fmt: skip
    m = parse(one(core.handle_data(bye, flow_of(S1), 1.0)))
    assert m.start_line == "BYE sip:carrier-ua@10.20.30.40:5060 SIP/2.0" and m.values("route") == [loose]


def test_double_record_route_when_transports_differ() -> None:
    core, _ = make_core()
    send = one(core.handle_data(request("INVITE", src=PHONE_TCP), PHONE_TCP, 0.0))
    to_node(send, S1)
    m = parse(send)
    top, second = rr_values(m)
    # the top entry faces the node (UDP), the second the phone (TCP)
    assert uri_params(top)["transport"] == "udp" and uri_params(second)["transport"] == "tcp"
    for rr in (top, second):
        assert uri_params(rr)["dsbc"].partition(".")[0] == "source"
        assert core.signer.decode(uri_params(rr)["ft"]) == PHONE_TCP
    # the answer goes back on the phone's connection
    resp = one(core.handle_data(answer(send.data, 180, "Ringing"), flow_of(S1), 0.1))
    to_flow(resp, PHONE_TCP)


def _call(core: ProxyCore, src: Flow = PHONE, node: Node = S1) -> tuple[list[str], SipMessage]:
    """A device call answered 200 by the node: (Record-Route set, the 200 as relayed)."""
    fwd = one(core.handle_data(request("INVITE", src=src), src, 0.0))
    to_node(fwd, node)
    ok = one(
        core.handle_data(
            answer(fwd.data, 200, headers=[("contact", f"<sip:2000@{node.host}:{node.port}>")]),
            flow_of(node),
            0.1,
        )
    )
    to_flow(ok, src)
    relayed = parse(ok)
    return relayed.values("record-route"), relayed


def _in_dialog(
    method: str,
    route: Sequence[str],
    ruri: str,
    *,
    src: Flow,
    frm: str,
    to: str,
    cseq: int,
    branch: str,
) -> bytes:
    return request(
        method,
        ruri,
        src=src,
        frm=frm,
        to=to,
        cseq=cseq,
        branch=branch,
        headers=[f"Route: {', '.join(route)}"],
    )


def test_in_dialog_requests_stay_on_the_dialog_system_without_lookup() -> None:
    core, router = make_core()
    rr, _ = _call(core)
    router.move("42", "target")  # the caller migrated during the call
    router.decide_calls.clear()
    # the phone hangs up: Route is the reversed Record-Route set, R-URI the node's Contact
    bye = _in_dialog(
        "BYE",
        list(reversed(rr)),
        f"sip:2000@{S1.host}:{S1.port}",
        src=PHONE,
        frm="<sip:1001@example.com>;tag=from1",
        to="<sip:2000@example.com>;tag=node-tag",
        cseq=2,
        branch="z9hG4bKbye1",
    )
    send = one(core.handle_data(bye, PHONE, 1.0))
    to_node(send, S1)
    m = parse(send)
    assert m.method == "BYE" and not m.values("route")  # our Route entry was consumed
    assert router.decide_calls == []
    # and the node sends a re-INVITE to the phone: it reaches the phone's flow
    reinv = _in_dialog(
        "INVITE",
        rr,
        "sip:1001@203.0.113.5:40000",
        src=flow_of(S1),
        frm="<sip:2000@example.com>;tag=node-tag",
        to="<sip:1001@example.com>;tag=from1",
        cseq=7,
        branch="z9hG4bKnode1",
    )
    send = one(core.handle_data(reinv, flow_of(S1), 2.0))
    to_flow(send, PHONE)
    assert router.decide_calls == []


@pytest.mark.parametrize("state", ["active", "locked"])
def test_in_dialog_request_without_route_stays_on_the_node_it_names(state: str) -> None:
    """A phone that dropped the route set sends its BYE straight to the node's Contact: the
    dialog stays there, with no lookup, even though its customer moved or is locked (found
    by an audit: held until the flip, then sent to the new system, which knows no dialog)."""
    core, router = make_core()
    _call(core)
    router.move("42", "target", state)
    router.decide_calls.clear()
    bye = request("BYE", f"sip:2000@{S1.host}:{S1.port}", to="<sip:2000@example.com>;tag=node-tag",
                  cseq=2, branch="z9hG4bKnoroute")
    send = one(core.handle_data(bye, PHONE, 1.0))
    to_node(send, S1)
    assert parse(send).method == "BYE" and router.decide_calls == []
    # a node of the system that is down: the next node of the same system, never the other
    mark_down(core, S1)
    to_node(one(core.handle_data(bye.replace(b"noroute", b"noroute2"), PHONE, 2.0)), S2)
    # an R-URI naming no node (the far phone's own Contact) is still looked up
    other = request("BYE", "sip:2000@203.0.113.99:5070", to="<sip:2000@example.com>;tag=node-tag",
                    cseq=3, branch="z9hG4bKnoroute3")
    sends = core.handle_data(other, PHONE, 3.0)
    assert router.decide_calls, sends


def test_regression_a_carriers_in_dialog_request_fails_over_or_gets_503_like_a_phones() -> None:
    """A trusted peer's in-dialog request goes to the next hop of its route set, the node
    that record-routed the dialog; with that node down it was sent there all the same (the
    carrier retransmitted its BYE for 32 s), where a phone's gets the next node of the same
    system, or 503 with Retry-After when every node is down (SPEC section 6)."""
    core, _ = make_core()
    inv = request("INVITE", "sip:15550001001@192.0.2.10", src=CARRIER, frm="<sip:15557654321@carrier>;tag=c1",
                  to="<sip:15550001001@192.0.2.10>", branch="z9hG4bKcarrier1")
    fwd = one(core.handle_data(inv, CARRIER, 0.0))
    to_node(fwd, S1)
    ours = rr_values(parse(fwd))[0]
    route = [ours, f"<sip:{S1.host}:{S1.port};lr>"]  # the carrier's route set: dsbc, then S1

    def bye(n: int) -> bytes:
        return _in_dialog("BYE", route, "sip:1001@203.0.113.5:40000", src=CARRIER,
                          frm="<sip:15557654321@carrier>;tag=c1", to="<sip:15550001001@192.0.2.10>;tag=p1",
                          cseq=1 + n, branch=f"z9hG4bKcbye{n}")

    to_node(one(core.handle_data(bye(1), CARRIER, 1.0)), S1)
    mark_down(core, S1)
    to_node(one(core.handle_data(bye(2), CARRIER, 2.0)), S2)  # the same system, never the other
    mark_down(core, S2)
    refused = one(core.handle_data(bye(3), CARRIER, 3.0))
    to_flow(refused, CARRIER)
    assert status_of(refused) == 503 and parse(refused).get("retry-after") == "30"


def test_in_dialog_request_prefers_the_node_of_the_dialog() -> None:
    core, router = make_core()
    rr, _ = _call(core)
    bye = _in_dialog(
        "BYE",
        list(reversed(rr)),
        f"sip:2000@{S2.host}:{S2.port}",
        src=PHONE,
        frm="<sip:1001@example.com>;tag=from1",
        to="<sip:2000@example.com>;tag=node-tag",
        cseq=2,
        branch="z9hG4bKbye2",
    )
    to_node(one(core.handle_data(bye, PHONE, 1.0)), S2)
    # a dialog marked for the source never goes to a target node, even when named
    bye = _in_dialog(
        "BYE",
        list(reversed(rr)),
        f"sip:2000@{T1.host}:{T1.port}",
        src=PHONE,
        frm="<sip:1001@example.com>;tag=from1",
        to="<sip:2000@example.com>;tag=node-tag",
        cseq=3,
        branch="z9hG4bKbye3",
    )
    to_node(one(core.handle_data(bye, PHONE, 1.0)), S1)
    assert router.decide_calls == [[("account", "1001")]]


# --- registrations: Path with a flow token ---------------------------------------------------


def _register(
    core: ProxyCore, src: Flow, *, user: str = "1001", cap_node: Node = S1
) -> tuple[str, Send]:
    reg = request(
        "REGISTER",
        "sip:example.com",
        src=src,
        frm=f"<sip:{user}@example.com>;tag=r1",
        to=f"<sip:{user}@example.com>",
        call_id=f"reg-{src.port}",
        headers=[
            f"Contact: <sip:{user}@{src.ip}:{src.port};transport={src.transport}>;expires=3600"
        ],
    )
    send = one(core.handle_data(reg, src, 0.0))
    to_node(send, cap_node)
    (path,) = parse(send).values("path")
    return path, send


@pytest.mark.parametrize("phone", [PHONE, PHONE_TCP], ids=["udp", "tcp"])
def test_path_flow_token_brings_a_call_from_the_node_to_the_phone(phone: Flow) -> None:
    core, router = make_core()
    path, _ = _register(core, phone)
    assert core.signer.decode(uri_params(path)["ft"]) == phone
    router.decide_calls.clear()
    # the registrar calls the phone with the Path as Route, to the registered Contact
    inv = request(
        "INVITE",
        f"sip:1001@{phone.ip}:{phone.port};transport={phone.transport}",
        src=flow_of(S1),
        frm="<sip:2000@example.com>;tag=n1",
        to="<sip:1001@example.com>",
        call_id="in-1",
        branch="z9hG4bKin1",
        headers=[f"Route: {path}"],
    )
    send = one(core.handle_data(inv, flow_of(S1), 1.0))
    to_flow(send, phone)
    assert router.decide_calls == []
    m = parse(send)
    assert not m.values("route")
    # the call's Record-Route keeps the phone's flow and the node's system
    for rr in rr_values(m):
        assert uri_params(rr)["dsbc"].partition(".")[0] == "source"
        assert core.signer.decode(uri_params(rr)["ft"]) == phone
    # the phone's 180 goes back to the node by Via
    resp = one(core.handle_data(answer(send.data, 180, "Ringing"), phone, 1.1))
    to_node(resp, S1)


@pytest.mark.parametrize("mutate", ["flip-char", "garbage", "truncated"])
def test_forged_or_altered_flow_token_is_refused_403(mutate: str) -> None:
    core, _ = make_core()
    path, _ = _register(core, PHONE)
    token = uri_params(path)["ft"]
    if mutate == "flip-char":
        bad = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    elif mutate == "garbage":
        bad = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    else:
        bad = token[:-4]
    forged = path.replace(token, bad)
    inv = request(
        "INVITE",
        "sip:1001@203.0.113.99:5060",
        src=flow_of(S1),
        frm="<sip:2000@example.com>;tag=n1",
        to="<sip:1001@example.com>",
        call_id="in-2",
        headers=[f"Route: {forged}"],
    )
    send = one(core.handle_data(inv, flow_of(S1), 1.0))
    to_node(send, S1)  # the answer, to the sender
    assert status_of(send) == 403
    assert core.counters["flow_token_rejected"] == 1


# --- Via, Max-Forwards, loops, extensions ------------------------------------------------------


def test_received_and_rport_added_to_the_top_via() -> None:
    core, _ = make_core()
    behind_nat = request("INVITE", via="SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bKnat;rport")
    send = one(core.handle_data(behind_nat, PHONE, 0.0))
    vias = parse(send).vias
    assert len(vias) == 2
    assert vias[1].host == "10.1.1.1"
    assert vias[1].param("received") == PHONE.ip and vias[1].param("rport") == str(PHONE.port)
    # the answer goes to the address the request came from, not to the Via's sent-by
    resp = one(core.handle_data(answer(send.data, 486, "Busy Here"), flow_of(S1), 0.1))
    to_flow(resp, PHONE)


def test_combined_via_line_on_requests_and_responses() -> None:
    core, _ = make_core()
    via = "SIP/2.0/UDP 203.0.113.5:40000;branch=z9hG4bKa1;rport, SIP/2.0/UDP 10.9.9.9:5062;branch=z9hG4bKb2"
    send = one(core.handle_data(request("INVITE", via=via), PHONE, 0.0))
    to_node(send, S1)
    m = parse(send)
    vias = m.vias
    assert [v.host for v in vias] == [ADV, "203.0.113.5", "10.9.9.9"]
    assert vias[1].param("received") == PHONE.ip and vias[2].branch == "z9hG4bKb2"
    # the node answers with every Via on one line, as sipp does
    texts = ", ".join(v.text for v in vias)
    lines = [
        ln for ln in answer(send.data, 200).split(b"\r\n") if not ln.lower().startswith(b"via:")
    ]
    resp = b"\r\n".join([lines[0], b"Via: " + texts.encode(), *lines[1:]])
    out = one(core.handle_data(resp, flow_of(S1), 0.1))
    to_flow(out, PHONE)
    relayed = parse(out)
    assert [v.host for v in relayed.vias] == ["203.0.113.5", "10.9.9.9"]
    assert relayed.status == 200


def test_max_forwards_decremented_or_added() -> None:
    core, _ = make_core()
    m = parse(one(core.handle_data(request("INVITE", max_forwards=10), PHONE, 0.0)))
    assert m.get("max-forwards") == "9"
    m = parse(one(core.handle_data(request("INVITE", max_forwards=None, call_id="c2"), PHONE, 0.0)))
    assert m.get("max-forwards") == "70"


def test_max_forwards_zero_is_answered_483() -> None:
    core, _ = make_core()
    send = one(core.handle_data(request("INVITE", max_forwards=0), PHONE, 0.0))
    to_flow(send, PHONE)
    assert status_of(send) == 483
    assert (
        core.handle_data(request("ACK", max_forwards=0), PHONE, 0.0) == []
    )  # an ACK is never answered


def test_a_request_that_comes_back_is_a_loop_482() -> None:
    core, _ = make_core()
    send = one(core.handle_data(request("INVITE", "sip:2000@example.com"), PHONE, 0.0))
    # the same request, our Via on top, comes back with the same R-URI from the same source
    back = one(core.handle_data(send.data, PHONE, 0.1))
    to_flow(back, PHONE)
    assert status_of(back) == 482


def test_proxy_require_is_answered_420_with_unsupported() -> None:
    core, _ = make_core()
    send = one(
        core.handle_data(request("INVITE", headers=["Proxy-Require: foo, nonsense"]), PHONE, 0.0)
    )
    to_flow(send, PHONE)
    m = parse(send)
    assert m.status == 420
    assert m.values("unsupported") == ["foo", "nonsense"]


# --- responses --------------------------------------------------------------------------------


def test_response_relayed_by_the_second_via_with_ours_removed() -> None:
    core, _ = make_core()
    fwd = one(core.handle_data(request("INVITE"), PHONE, 0.0))
    out = one(core.handle_data(answer(fwd.data, 180, "Ringing"), flow_of(S1), 0.1))
    to_flow(out, PHONE)
    m = parse(out)
    assert m.status == 180
    assert [v.host for v in m.vias] == [PHONE.ip]
    assert m.vias[0].branch == "z9hG4bKphone1"


def test_100_trying_is_never_forwarded() -> None:
    core, _ = make_core()
    fwd = one(core.handle_data(request("INVITE"), PHONE, 0.0))
    assert core.handle_data(answer(fwd.data, 100, "Trying"), flow_of(S1), 0.1) == []


def test_response_whose_top_via_is_not_ours_is_dropped_and_counted() -> None:
    core, _ = make_core()
    stray = make_response(parse_message(request("INVITE")), 200, "OK", to_tag="x")
    assert core.handle_data(stray, flow_of(S1), 0.0) == []
    assert core.counters["responses_dropped"] == 1
    # our host but not our branch prefix: dropped too
    fwd = one(core.handle_data(request("INVITE"), PHONE, 0.0))
    resp = answer(fwd.data, 200).replace(BRANCH_PREFIX.encode(), b"z9hG4bK-xx", 1)
    assert core.handle_data(resp, flow_of(S1), 0.1) == []
    assert core.counters["responses_dropped"] == 2


def test_forged_response_cannot_send_dsbc_to_another_address() -> None:
    """A response is relayed over UDP to its second Via only when dsbc's branch was made for
    that address: anyone can write dsbc's Via on top of a victim's and send it (reflection)."""
    core, _ = make_core()
    victim = "SIP/2.0/UDP 192.0.2.99:5060;branch=z9hG4bKvictim;received=192.0.2.99;rport=5060"
    forged = request(
        "INVITE", via=f"SIP/2.0/UDP {ADV}:{PORT};branch={BRANCH_PREFIX}{'ab' * 12}.abcdef, {victim}"
    )
    assert core.handle_data(answer(forged, 200), PHONE, 0.0) == []
    # a real branch of dsbc's (one the attacker saw in a request it was sent), another hop
    fwd = one(core.handle_data(request("INVITE"), PHONE, 0.0))
    ours = parse(fwd).values("via")[0]
    replayed = request("INVITE", via=f"{ours}, {victim}")
    assert core.handle_data(answer(replayed, 200), PHONE, 0.1) == []
    # a forged 200 to a REGISTER records nothing
    reg = one(core.handle_data(request("REGISTER", "sip:example.com", to="<sip:1001@example.com>"), PHONE, 0.2))
    reg_via = parse(reg).values("via")[0]
    forged_reg = request("REGISTER", via=f"{reg_via}, {victim}", to="<sip:1001@example.com>")
    core.events.clear()
    ok = answer(forged_reg, 200, headers=[("contact", "<sip:1001@192.0.2.99>;expires=3600")])
    assert core.handle_data(ok, PHONE, 0.3) == []
    assert core.events == []
    assert core.counters["responses_forged"] == 3
    # the real answers still go to the phone
    to_flow(one(core.handle_data(answer(fwd.data, 200), flow_of(S1), 0.4)), PHONE)
    to_flow(one(core.handle_data(answer(reg.data, 200), flow_of(S1), 0.5)), PHONE)


# --- CANCEL and the ACK of a failure follow their INVITE ---------------------------------------


def test_cancel_and_failure_ack_follow_the_invite_after_the_owner_changed() -> None:
    core, router = make_core()
    fwd = one(core.handle_data(request("INVITE"), PHONE, 0.0))
    to_node(fwd, S1)
    branch = our_branch(parse(fwd))
    router.move("42", "target")
    cancel = request("CANCEL", cseq=1)  # same top Via branch, R-URI, Call-ID and CSeq number
    send = one(core.handle_data(cancel, PHONE, 0.5))
    to_node(send, S1)
    assert our_branch(parse(send)) == branch
    one(core.handle_data(answer(fwd.data, 487, "Request Terminated"), flow_of(S1), 0.6))
    ack = request("ACK", to="<sip:2000@example.com>;tag=node-tag")
    send = one(core.handle_data(ack, PHONE, 0.7))
    to_node(send, S1)
    assert our_branch(parse(send)) == branch


def test_cancel_follows_the_invite_to_the_failover_node() -> None:
    core, _ = make_core()
    mark_down(core, S1)
    fwd = one(core.handle_data(request("INVITE"), PHONE, 0.0))
    to_node(fwd, S2)
    # S1 answers a ping and is up again: the CANCEL still goes where the INVITE went
    (ping,) = [p for p in core.handle_timer(0.2) if (p.ip, p.port) == (S1.host, S1.port)]
    core.handle_data(
        make_response(parse_message(ping.data), 200, "OK", to_tag="n"), flow_of(S1), 0.3
    )
    assert core.health.states[S1.key].up
    to_node(one(core.handle_data(request("CANCEL"), PHONE, 0.5)), S2)


def test_regression_the_invite_state_for_cancel_and_ack_is_bounded() -> None:
    """Each INVITE's destination was kept 300 s with no bound on how many: a flood of
    INVITEs grew a worker by ~200 octets per INVITE (12 MB for 60,000 through `dsbc run`).
    At ``invite_state_max`` the oldest is forgotten; a retransmission adds nothing."""
    core, router = make_core()
    core.s.invite_state_max = 3
    fwds = [one(core.handle_data(request("INVITE", branch=f"z9hG4bKf{i}", call_id=f"f{i}"), PHONE, i / 10)) for i in range(5)]
    for _ in range(4):  # retransmissions of the last one
        core.handle_data(request("INVITE", branch="z9hG4bKf4", call_id="f4"), PHONE, 0.6)
    assert len(core._invites) == 3 and len(core._invite_expiry) == 3
    assert core.counters["invite_state_evicted"] == 2
    router.move("42", "target")  # the newest three CANCELs still follow their INVITEs
    for i in (2, 3, 4):
        send = one(core.handle_data(request("CANCEL", branch=f"z9hG4bKf{i}", call_id=f"f{i}"), PHONE, 1.0))
        to_node(send, S1)
        assert our_branch(parse(send)) == our_branch(parse(fwds[i]))


def test_regression_an_invite_answered_late_is_forgotten() -> None:
    """An INVITE answered more than 260 s after it was sent (a long ring) was kept for ever:
    its final answer set the entry's expiry past the only time it was looked at."""
    core, _ = make_core()
    fwd = one(core.handle_data(request("INVITE"), PHONE, 0.0))
    core.handle_data(answer(fwd.data, 486, "Busy Here"), flow_of(S1), 290.0)
    core.handle_timer(300.0)
    ack = request("ACK", to="<sip:2000@example.com>;tag=node-tag")  # the ACK still follows
    to_node(one(core.handle_data(ack, PHONE, 300.5)), S1)
    core.handle_timer(331.0)
    assert core._invites == {}


# --- locked customers: held, released to the new system, or 503 ---------------------------------


def test_held_invite_released_to_the_new_system_after_the_flip() -> None:
    core, router = make_core()
    router.move("42", state="locked")
    sends = core.handle_data(request("INVITE"), PHONE, 0.0)
    trying = one(sends)
    to_flow(trying, PHONE)
    assert status_of(trying) == 100
    assert core.held_count == 1
    # the phone retransmits: another 100, still held once
    assert status_of(one(core.handle_data(request("INVITE"), PHONE, 0.5))) == 100
    assert core.held_count == 1
    # the migration commits: customer 42 now lives on the target
    router.move("42", "target", "active")
    assert core.customers_changed(["99"], 0.8) == []  # someone else's change releases nothing
    released = one(core.customers_changed(["42"], 0.9))
    to_node(released, T1)
    assert parse(released).method == "INVITE"
    assert core.held_count == 0


def test_lock_that_outlasts_lock_hold_is_answered_503_retry_after() -> None:
    core, router = make_core(lock_hold=2.0)
    router.move("42", state="locked")
    one(core.handle_data(request("INVITE"), PHONE, 10.0))
    timer = core.get_timer()
    assert timer is not None and timer <= 12.0
    assert [s for s in core.handle_timer(11.0) if not s.health] == []
    sends = [s for s in core.handle_timer(12.0) if not s.health]
    send = one(sends)
    to_flow(send, PHONE)
    m = parse(send)
    assert m.status == 503 and m.get("retry-after")
    assert core.held_count == 0
    assert all(s.health for s in core.handle_timer(13.0))


def test_held_register_gets_no_100_and_is_released() -> None:
    core, router = make_core()
    router.move("42", state="locked")
    path_reg = request(
        "REGISTER",
        "sip:example.com",
        to="<sip:1001@example.com>",
        headers=["Contact: <sip:1001@203.0.113.5:40000>"],
    )
    assert core.handle_data(path_reg, PHONE, 0.0) == []
    router.move("42", "target", "active")
    to_node(one(core.customers_changed(["42"], 0.5)), T1)


def test_cancel_of_a_held_invite_is_answered_200_and_487() -> None:
    core, router = make_core()
    router.move("42", state="locked")
    one(core.handle_data(request("INVITE"), PHONE, 0.0))
    sends = core.handle_data(request("CANCEL"), PHONE, 0.5)
    assert len(sends) == 2
    for s in sends:
        to_flow(s, PHONE)
    ok, terminated = (parse(s) for s in sends)
    assert (ok.status, ok.cseq[1]) == (200, "CANCEL")
    assert (terminated.status, terminated.cseq[1]) == (487, "INVITE")
    assert core.held_count == 0
    router.move("42", "target", "active")
    assert core.customers_changed(["42"], 1.0) == []


def test_regression_retransmitted_cancel_of_a_held_invite_gets_the_same_answers() -> None:
    """A phone whose 200 to its CANCEL was lost sends the CANCEL again: it was held like a
    new request (no answer until the flip), then relayed to the new system, which never saw
    the INVITE.  dsbc answered that INVITE itself: it answers the retransmission again."""
    core, router = make_core()
    router.move("42", state="locked")
    one(core.handle_data(request("INVITE"), PHONE, 0.0))
    assert len(core.handle_data(request("CANCEL"), PHONE, 0.5)) == 2
    again = core.handle_data(request("CANCEL"), PHONE, 1.0)
    assert sorted((parse(s).status, parse(s).cseq[1]) for s in again) == [(200, "CANCEL"), (487, "INVITE")]
    for s in again:
        to_flow(s, PHONE)
    assert core.held_count == 0
    router.move("42", "target", "active")
    assert core.customers_changed(["42"], 1.5) == []
    # remembered for Timer J (32 s) only: later, a CANCEL is routed like any request again
    core.handle_timer(40.0)
    to_node(one(core.handle_data(request("CANCEL"), PHONE, 40.0)), T1)


def test_regression_invite_retransmitted_after_its_cancel_is_not_held_again() -> None:
    """The held INVITE's 487 was lost and the phone sent the INVITE again: it was held
    anew and relayed after the flip, ringing the callee of a call its caller had ended."""
    core, router = make_core()
    router.move("42", state="locked")
    one(core.handle_data(request("INVITE"), PHONE, 0.0))
    assert len(core.handle_data(request("CANCEL"), PHONE, 0.5)) == 2
    send = one(core.handle_data(request("INVITE"), PHONE, 1.0))
    to_flow(send, PHONE)
    assert status_of(send) == 487
    assert core.held_count == 0
    router.move("42", "target", "active")
    assert core.customers_changed(["42"], 1.5) == []


# --- health: failover within the system, never to the other one ----------------------------------


def test_all_nodes_of_the_owning_system_down_is_503_never_the_other_system() -> None:
    core, _ = make_core()
    mark_down(core, S1, S2)
    send = one(core.handle_data(request("INVITE"), PHONE, 0.0))
    to_flow(send, PHONE)
    m = parse(send)
    assert m.status == 503 and m.get("retry-after") == "30"


def test_failover_to_the_second_node_of_the_same_system_by_pings() -> None:
    core, _ = make_core()
    pings = core.handle_timer(0.0)
    assert sorted((s.ip, s.port) for s in pings if s.health) == sorted(
        (n.host, n.port) for n in NODES
    )
    # every node but S1 answers its ping
    for p in pings:
        node = NODE_AT[(p.ip, p.port)]
        if node != S1:
            assert (
                core.handle_data(
                    make_response(parse_message(p.data), 200, "OK", to_tag="n"), flow_of(node), 0.05
                )
                == []
            )
    core.handle_timer(2.05)  # S1's ping timed out (the timer on time)
    assert not core.health.states[S1.key].up
    to_node(one(core.handle_data(request("INVITE"), PHONE, 3.0)), S2)
    # S1 answers again: traffic goes back to it
    pings = [p for p in core.handle_timer(5.0) if (p.ip, p.port) == (S1.host, S1.port)]
    core.handle_data(
        make_response(parse_message(pings[0].data), 200, "OK", to_tag="n"), flow_of(S1), 5.1
    )
    to_node(one(core.handle_data(request("INVITE", call_id="c2"), PHONE, 5.2)), S1)


# --- registration hand-over: expiry capped, registrations reported ---------------------------------


def test_register_200_gets_its_expiry_capped_and_is_reported() -> None:
    core, router = make_core()
    router.caps["42"] = 60
    _, fwd = _register(core, PHONE)
    top = parse(fwd).vias[0]
    assert top.param("dsbccap") == "60" and top.param("dsbcsys") == "source"
    contact = "<sip:1001@203.0.113.5:40000;transport=udp>;expires=3600"
    ok = answer(fwd.data, 200, headers=[("contact", contact), ("expires", "3600")])
    out = one(core.handle_data(ok, flow_of(S1), 0.1))
    to_flow(out, PHONE)
    m = parse(out)
    assert m.get("expires") == "60"
    (c,) = m.values("contact")
    assert parse_name_addr(c).param("expires") == "60"
    assert not any(v.param("dsbccap") for v in m.vias)
    assert core.events == [
        RegistrationSeen(
            "1001",
            [("sip:1001@203.0.113.5:40000;transport=udp", 60)],
            "source",
            f"udp:{PHONE.ip}:{PHONE.port}",
        )
    ]


def test_regression_the_cap_records_only_the_registering_phones_binding_as_capped() -> None:
    """Found by an audit: with a batch prepared, the 200 to one phone's REGISTER lists every
    binding of the account, and dsbc recorded them all at the cap (60 s), though the other
    phones had been granted their full hour and would not re-register for that long: once
    the cap passed, `dsbc migrate` counted them gone ("0/0 phones", --wait-registrations done)
    while they stayed on the source.  Only the contacts the REGISTER named are recorded at
    the cap; the others keep the expiry the registrar granted them."""
    core, router = make_core()
    router.caps["42"] = 60
    _, fwd = _register(core, PHONE)
    mine = f"<sip:1001@{PHONE.ip}:{PHONE.port};transport=udp>;expires=3600"
    other = "<sip:1001@198.51.100.7:5060>;expires=3000"
    ok = answer(fwd.data, 200, headers=[("contact", mine), ("contact", other)])
    m = parse(one(core.handle_data(ok, flow_of(S1), 0.1)))
    assert [parse_name_addr(c).param("expires") for c in m.values("contact")] == ["60", "60"]
    assert [e.contacts for e in core.events] == [
        [(f"sip:1001@{PHONE.ip}:{PHONE.port};transport=udp", 60), ("sip:1001@198.51.100.7:5060", 3000)]
    ]


@pytest.mark.parametrize(("src", "reg_id", "via", "ob"), [
    (PHONE_TCP, True, None, True),  # an outbound phone over TCP, dsbc its first hop
    (PHONE, True, None, False),  # UDP: dsbc answers no STUN keep-alives, so claims no flow
    (PHONE_TCP, False, None, False),  # no reg-id: not an outbound registration
    (PHONE_TCP, True, "SIP/2.0/TCP 203.0.113.6:40001;branch=z9hG4bKo1, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKo0",
     False),  # not the first hop
])
def test_regression_outbound_register_over_tcp_gets_ob_in_the_path(
    src: Flow, reg_id: bool, via: str | None, ob: bool
) -> None:
    """Found by an audit: an RFC 5626 phone (+sip.instance, reg-id) registering over TCP
    through dsbc got 439 First Hop Lacks Outbound Support from a registrar that supports
    outbound (Kamailio's outbound_mode 1): dsbc keeps the phone's flow (flow token, CRLF
    keep-alives) but never said so with ";ob" in its Path (RFC 5626 5.1)."""
    core, _ = make_core()
    params = ';+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"' + (";reg-id=1" if reg_id else "")
    reg = request("REGISTER", "sip:example.com", src=src, frm="<sip:1001@example.com>;tag=r1",
                  to="<sip:1001@example.com>", via=via,
                  headers=[f"Contact: <sip:1001@{src.ip}:{src.port};transport={src.transport}>{params}",
                           "Supported: outbound, path"])
    fwd = parse(one(core.handle_data(reg, src, 0.0)))
    path = parse_name_addr(fwd.values("path")[0])
    assert (path.uri.param("ob") is not None) is ob, path


def test_register_200_without_a_cap_is_relayed_unchanged_and_reported() -> None:
    core, _ = make_core()
    _, fwd = _register(core, PHONE)
    assert parse(fwd).vias[0].param("dsbccap") is None
    ok = answer(fwd.data, 200, headers=[("contact", "<sip:1001@203.0.113.5:40000>;expires=1800")])
    m = parse(one(core.handle_data(ok, flow_of(S1), 0.1)))
    assert parse_name_addr(m.values("contact")[0]).param("expires") == "1800"
    assert [(e.account, e.contacts, e.system) for e in core.events] == [
        ("1001", [("sip:1001@203.0.113.5:40000", 1800)], "source")
    ]


# --- regressions ---------------------------------------------------------------------------------


def test_regression_malformed_request_without_any_via_is_dropped() -> None:
    # was: answered 505/400 with no Via at all, a response nobody can match
    core, _ = make_core()
    data = request("REGISTER", "sip:example.com").replace(b"SIP/2.0\r\nVia:", b"SIP/7.0\r\nXia:", 1)
    assert core.handle_data(data, PHONE, 0.0) == []
    assert core.counters["requests_dropped"] == 1
    # with its Via the same request is answered 505
    send = one(
        core.handle_data(
            request("REGISTER", "sip:example.com").replace(b"SIP/2.0\r\n", b"SIP/7.0\r\n", 1),
            PHONE,
            0.0,
        )
    )
    assert status_of(send) == 505


@pytest.mark.parametrize("value", ["\xb2", "\xb9", "1\xb3"])
def test_regression_non_ascii_digits_in_register_expires_do_not_raise(value: str) -> None:
    # was: ValueError from int() ("\xb2".isdigit() is True), an internal error per 200 OK
    core, router = make_core()
    router.caps["42"] = 60
    _, fwd = _register(core, PHONE)
    ok = answer(
        fwd.data,
        200,
        headers=[("contact", f"<sip:1001@203.0.113.5:40000>;expires={value}"), ("expires", value)],
    )
    out = one(core.handle_data(ok.decode("latin-1").encode("latin-1"), flow_of(S1), 0.1))
    to_flow(out, PHONE)
    # an unreadable expiry counts as the default (3600), which the cap lowers to 60
    assert core.events[0].contacts == [("sip:1001@203.0.113.5:40000", 60)]


def test_regression_response_goes_back_over_udp_when_the_via_claims_tcp() -> None:
    # was: relayed over the transport named in the phone's Via, so dsbc opened a TCP
    # connection to a phone that had sent its request over UDP
    core, _ = make_core()
    fwd = one(
        core.handle_data(
            request("INVITE", via="SIP/2.0/TCP 203.0.113.5:40000;branch=z9hG4bKtcp"), PHONE, 0.0
        )
    )
    out = one(core.handle_data(answer(fwd.data, 180, "Ringing"), flow_of(S1), 0.1))
    to_flow(out, PHONE)


def test_regression_unknown_method_names_share_one_counter() -> None:
    # was: one counter per method name, so random methods grew every status snapshot
    core, _ = make_core()
    for i in range(50):
        data = request(f"X{i:04d}Y", "sip:1001@example.com", call_id=f"m{i}")
        core.handle_data(data, PHONE, 0.0)
    assert core.counters["requests_in:OTHER"] == 50
    assert not [k for k in core.counters if k.startswith("requests_in:X")]


def test_regression_path_names_the_system_for_calls_from_an_unlisted_node_port() -> None:
    # was: the system of a call through Path came from the sender's exact address, so a node
    # sending from another port (TCP) gave a Record-Route without dsbc=: the phone's later
    # requests were then routed by lookup, to the wrong system after a migration
    core, router = make_core()
    path, _ = _register(core, PHONE)
    assert uri_params(path)["dsbc"].partition(".")[0] == "source"
    node_tcp = Flow("tcp", S1.host, 41234, conn_id=3, worker=0)
    router.trusted.add((node_tcp.ip, node_tcp.port))
    inv = request(
        "INVITE",
        "sip:1001@203.0.113.5:40000",
        src=node_tcp,
        frm="<sip:2000@example.com>;tag=n1",
        to="<sip:1001@example.com>",
        call_id="in-9",
        headers=[f"Route: {path}"],
    )
    send = one(core.handle_data(inv, node_tcp, 1.0))
    to_flow(send, PHONE)
    assert {uri_params(rr)["dsbc"].partition(".")[0] for rr in rr_values(parse(send))} == {"source"}
    # the phone answers, migrates, and hangs up: the BYE goes to the call's system
    ok = one(
        core.handle_data(
            answer(send.data, 200, headers=[("contact", "<sip:1001@203.0.113.5:40000>")]),
            PHONE,
            1.1,
        )
    )
    to_flow(ok, node_tcp)
    router.move("42", "target")
    rr = rr_values(parse(send))
    bye = _in_dialog(
        "BYE",
        rr,
        "sip:2000@10.0.0.1:5060",
        src=PHONE,
        frm="<sip:1001@example.com>;tag=node-tag",
        to="<sip:2000@example.com>;tag=n1",
        cseq=1,
        branch="z9hG4bKbye9",
    )
    to_node(one(core.handle_data(bye, PHONE, 2.0)), S1)


# --- Hypothesis: nothing raises, nothing crosses systems -------------------------------------------

FLOWS = st.builds(
    Flow,
    st.sampled_from(["udp", "tcp", "tls"]),
    st.sampled_from([PHONE.ip, CARRIER.ip, S1.host, T1.host, "::1", "2001:db8::5"]),
    st.integers(1, 65535),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
)


def _seeds() -> list[bytes]:
    """Messages as they really flow, with real flow tokens and dsbc Via parameters, for
    the fuzz to mangle."""
    core, router = make_core()
    router.caps["42"] = 60
    reg = one(
        core.handle_data(
            request(
                "REGISTER",
                "sip:example.com",
                src=PHONE_TCP,
                to="<sip:1001@example.com>",
                headers=["Contact: <sip:1001@1.2.3.4>"],
            ),
            PHONE_TCP,
            0.0,
        )
    )
    (path,) = parse(reg).values("path")
    inv = one(core.handle_data(request("INVITE", src=PHONE_TCP), PHONE_TCP, 0.0))
    from_node = request(
        "INVITE", "sip:1001@1.2.3.4", src=flow_of(S1), call_id="n1", headers=[f"Route: {path}"]
    )
    rr = parse(inv).values("record-route")
    return [
        request("INVITE"),
        request("OPTIONS", f"sip:{ADV}"),
        request("CANCEL", headers=["Proxy-Require: x"]),
        answer(
            request(
                "INVITE",
                via=f"SIP/2.0/UDP {ADV}:{PORT};branch={BRANCH_PREFIX}x.y, SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKq",
            ),
            200,
        ),
        reg.data,
        answer(
            reg.data,
            200,
            headers=[("contact", "<sip:1001@1.2.3.4>;expires=3600"), ("expires", "3600")],
        ),
        inv.data,
        answer(inv.data, 183, "Session Progress"),
        from_node,
        request(
            "BYE",
            "sip:2000@10.0.0.1:5060",
            to="<sip:2000@example.com>;tag=x",
            headers=[f"Route: {', '.join(reversed(rr))}"],
        ),
    ]


SEED_MESSAGES = _seeds()


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEED_MESSAGES)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i : i + draw(st.integers(1, 40))]
        elif op == "insert":
            data[i:i] = draw(
                st.sampled_from(
                    [
                        b",",
                        b";",
                        b"\r\n",
                        b" ",
                        b"%",
                        b"<",
                        b">",
                        b'"',
                        b"\x00",
                        b":",
                        b"\xb2",
                        b";tag=",
                        b";ft=x",
                    ]
                )
            )
        else:
            j = draw(st.integers(i, min(len(data), i + 80)))
            data[i:i] = data[i:j]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=400), mangled()), src=FLOWS)
def test_any_bytes_from_any_flow_never_raise(data: bytes, src: Flow) -> None:
    core, _ = make_core()
    out = core.handle_data(data, src, 1.0)
    assert isinstance(out, list)
    assert all(isinstance(s, Send) for s in out)


class Dialog(NamedTuple):
    """A dialog between a phone and a node through dsbc, as each side would continue it."""

    phone: Flow
    call_id: str
    phone_route: list[str]  # Route set of the phone's requests
    node_route: list[str]  # Route set of the node's requests
    phone_from: str  # From / To as the phone writes them
    phone_to: str
    node_ruri: str  # the node's Contact: the phone's Request-URI
    node: Node  # the node that sends the node side's requests


CUSTOMERS = {"42": "1001", "43": "2000", "44": "3000"}
USERS = {**{u: c for c, u in CUSTOMERS.items()}, "7777": ""}  # 7777: unknown (store.unknown)


class ProxyWalk(RuleBasedStateMachine):
    """Random requests, answers, in-dialog requests, CANCELs, timers, health changes and
    migrations.  Invariants: nothing raises; a request dsbc sends to a node goes to the
    stub owner's system when it starts a dialog or transaction, and later requests of the
    same Call-ID never reach another system (CANCEL / ACK may be re-decided only when
    their INVITE is long gone)."""

    @initialize()
    def setup(self) -> None:
        router = StubRouter()
        router.add("42", "source", "account:1001", "did:15550001001")
        router.add("43", "target", "account:2000", "did:15550002000")
        router.add("44", "source", "account:3000", state="locked")
        self.core, self.router = make_core(router, lock_hold=2.0)
        self.now = 0.0
        self.seq = 0
        self.call_customer: dict[str, str] = {}  # Call-ID -> customer id ("" unknown)
        self.flow_user: dict[tuple[str, str, int], str] = {}  # a device flow -> its REGISTER user
        self.call_system: dict[str, str] = {}  # Call-ID -> system of the first send to a node
        self.forwarded: list[Send] = []  # requests dsbc sent to nodes
        self.dialogs: list[Dialog] = []
        self.invites: list[tuple[Flow, bytes]] = []  # (phone flow, INVITE as the phone sent it)
        self.paths: list[
            tuple[Flow, str, str]
        ] = []  # (phone flow, Path, user) of forwarded REGISTERs

    def _run(self, sends: list[Send], sender: Flow | None = None) -> None:
        assert isinstance(sends, list)
        for s in sends:
            if s.health:
                continue
            node = NODE_AT.get((s.ip, s.port))
            try:
                m = parse(s)
            except SipError:
                # only an answer to a malformed request may be malformed (its lines are copied),
                # and it has a Via to be matched with; it goes to a device, or back to the node
                # that sent the malformed request (never on to another one)
                back = sender is not None and (s.ip, s.port) == (sender.ip, sender.port)
                assert node is None or back, s.data[:200]
                assert s.data[:9] in (b"SIP/2.0 4", b"SIP/2.0 5"), s.data[:200]
                assert lenient_parse(s.data.decode("latin-1")).get("via") is not None, s.data[:200]
                continue
            if not m.call_id.startswith("walk-"):
                continue  # garbage that borrowed a Call-ID is not part of the walk's calls
            if node is None:
                rr = m.values("record-route")
                if not m.is_request and m.cseq[1] == "INVITE" and 200 <= m.status < 300 and rr:
                    contact = m.values("contact")
                    self.dialogs.append(
                        Dialog(
                            Flow(s.transport, s.ip, s.port, s.conn_id, max(s.worker, 0)),
                            m.call_id,
                            list(reversed(rr)),
                            rr,
                            m.get("from") or "",
                            m.get("to") or "",
                            parse_name_addr(contact[0]).uri_text
                            if contact
                            else "sip:x@example.com",
                            S1 if "dsbc=source" in rr[0] else T1,
                        )
                    )
                continue
            if not m.is_request:
                continue
            if m.method == "REGISTER" and m.values("path"):
                # relayed (at once, or released after a hold): the phone's flow is this
                # account's now, for its anonymous calls (a held one that got 503 is not)
                f = self.core.signer.decode(uri_params(m.values("path")[0])["ft"])
                self.flow_user[(f.transport, f.ip, f.port)] = m.to.uri.user or ""
            self.forwarded.append(s)
            cid = m.call_id
            owner = self.router.owner_system(self.call_customer.get(cid, "?"))
            first = self.call_system.get(cid)
            if first is None:
                # a new dialog or transaction: decided by the stub, at this moment
                self.call_system[cid] = node.system
                assert node.system == owner, (m.method, cid, node.system, owner)
            elif m.method in ("CANCEL", "ACK") and not m.values("route"):
                assert node.system in (first, owner), (m.method, cid, node.system, first, owner)
            else:
                assert node.system == first, (
                    f"{m.method} of {cid} went to {node.system}, its dialog is on {first}"
                )

    def _new_call_id(self) -> str:
        self.seq += 1
        return f"walk-{self.seq}"

    @rule(
        method=st.sampled_from(["INVITE", "INVITE", "REGISTER", "OPTIONS", "MESSAGE", "SUBSCRIBE"]),
        user=st.sampled_from(sorted(USERS)),
        tcp=st.booleans(),
    )
    def phone_request(self, method: str, user: str, tcp: bool) -> None:
        src = PHONE_TCP if tcp else PHONE
        cid = self._new_call_id()
        customer = USERS[user]
        flow = (src.transport, src.ip, src.port)
        if method != "REGISTER" and not customer:  # an unknown From: the account that registered from this flow
            customer = USERS.get(self.flow_user.get(flow, ""), "")
        self.call_customer[cid] = customer
        frm = f"<sip:{user}@example.com>;tag=f{self.seq}"
        to = f"<sip:{user}@example.com>" if method == "REGISTER" else "<sip:9999@example.com>"
        data = request(
            method,
            "sip:9999@example.com",
            src=src,
            frm=frm,
            to=to,
            call_id=cid,
            branch=f"z9hG4bKw{self.seq}",
        )
        if method == "INVITE":
            self.invites.append((src, data))
        sends = self.core.handle_data(data, src, self.now)
        self._run(sends)
        for s in sends:
            if (s.ip, s.port) in NODE_AT and method == "REGISTER":
                (path,) = parse(s).values("path")
                assert self.core.signer.decode(uri_params(path)["ft"]) == src
                self.paths.append((src, path, user))

    @rule(
        user=st.sampled_from(["15550001001", "15550002000", "3000", "555"]),
        node=st.sampled_from(NODES),
    )
    def node_calls_a_number(self, user: str, node: Node) -> None:
        cid = self._new_call_id()
        self.call_customer[cid] = {"15550001001": "42", "15550002000": "43", "3000": "44"}.get(
            user, ""
        )
        data = request(
            "INVITE",
            f"sip:{user}@{ADV}",
            src=flow_of(node),
            frm=f"<sip:x@{node.host}>;tag=n",
            call_id=cid,
            branch=f"z9hG4bKn{self.seq}",
        )
        self._run(self.core.handle_data(data, flow_of(node), self.now))

    @precondition(lambda self: bool(self.forwarded))
    @rule(i=st.integers(0, 10_000), status=st.sampled_from([100, 180, 200, 200, 404, 486, 503]))
    def node_answers(self, i: int, status: int) -> None:
        fwd = self.forwarded[i % len(self.forwarded)]
        m = parse(fwd)
        if m.method == "ACK":
            return
        contact = [("contact", f"<sip:9999@{fwd.ip}:{fwd.port}>")] if status < 300 else []
        resp = answer(fwd.data, status, "X", headers=contact)
        self._run(self.core.handle_data(resp, Flow("udp", fwd.ip, fwd.port), self.now))

    @precondition(lambda self: bool(self.dialogs))
    @rule(
        i=st.integers(0, 10_000),
        from_phone=st.booleans(),
        method=st.sampled_from(["BYE", "INVITE", "INFO", "ACK"]),
    )
    def in_dialog(self, i: int, from_phone: bool, method: str) -> None:
        dlg = self.dialogs[i % len(self.dialogs)]
        self.seq += 1
        if from_phone:
            data = request(
                method,
                dlg.node_ruri,
                src=dlg.phone,
                frm=dlg.phone_from,
                to=dlg.phone_to,
                call_id=dlg.call_id,
                cseq=100 + self.seq,
                branch=f"z9hG4bKd{self.seq}",
                headers=[f"Route: {', '.join(dlg.phone_route)}"],
            )
            self._run(self.core.handle_data(data, dlg.phone, self.now))
        else:
            src = flow_of(dlg.node)
            data = request(
                method,
                f"sip:u@{dlg.phone.ip}:{dlg.phone.port}",
                src=src,
                frm=dlg.phone_to,
                to=dlg.phone_from,
                call_id=dlg.call_id,
                cseq=200 + self.seq,
                branch=f"z9hG4bKe{self.seq}",
                headers=[f"Route: {', '.join(dlg.node_route)}"],
            )
            sends = self.core.handle_data(data, src, self.now)
            self._run(sends)
            # a request from the node in a dialog with a phone reaches that phone's flow
            (out,) = sends
            to_flow(out, dlg.phone)

    @precondition(lambda self: bool(self.paths))
    @rule(i=st.integers(0, 10_000), answer_it=st.booleans())
    def node_calls_a_registered_phone(self, i: int, answer_it: bool) -> None:
        phone, path, user = self.paths[i % len(self.paths)]
        system = uri_params(path)["dsbc"].partition(".")[0]
        node = S1 if system == "source" else T1
        cid = self._new_call_id()
        self.call_system[cid] = system  # the dialog belongs to the system the phone registered on
        inv = request(
            "INVITE",
            f"sip:{user}@{phone.ip}:{phone.port}",
            src=flow_of(node),
            frm=f"<sip:caller@{node.host}>;tag=c{self.seq}",
            to=f"<sip:{user}@example.com>",
            call_id=cid,
            branch=f"z9hG4bKp{self.seq}",
            headers=[f"Route: {path}", f"Contact: <sip:caller@{node.host}:{node.port}>"],
        )
        sends = self.core.handle_data(inv, flow_of(node), self.now)
        self._run(sends)
        (out,) = sends
        to_flow(out, phone)  # through the Path's flow token, whoever owns the phone now
        delivered = parse(out)
        rr = delivered.values("record-route")
        assert rr and all(uri_params(r)["dsbc"].partition(".")[0] == system for r in rr)
        if answer_it:
            ok = make_response(
                delivered,
                200,
                "OK",
                [("record-route", r) for r in rr]
                + [("contact", f"<sip:{user}@{phone.ip}:{phone.port}>")],
                to_tag=f"ph{self.seq}",
            )
            back = self.core.handle_data(ok, phone, self.now)
            self._run(back)
            (resp,) = back
            to_node(resp, node)
            self.dialogs.append(
                Dialog(
                    phone,
                    cid,
                    rr,
                    list(reversed(rr)),
                    f"<sip:{user}@example.com>;tag=ph{self.seq}",
                    delivered.get("from") or "",
                    f"sip:caller@{node.host}:{node.port}",
                    node,
                )
            )

    @precondition(lambda self: bool(self.invites))
    @rule(i=st.integers(0, 10_000), ack=st.booleans())
    def cancel_or_ack(self, i: int, ack: bool) -> None:
        src, inv = self.invites[i % len(self.invites)]
        data = inv.replace(b"INVITE sip:", b"ACK sip:" if ack else b"CANCEL sip:", 1).replace(
            b" INVITE\r\n", b" ACK\r\n" if ack else b" CANCEL\r\n", 1
        )
        if ack:
            data = data.replace(
                b"To: <sip:9999@example.com>", b"To: <sip:9999@example.com>;tag=node-tag", 1
            )
        self._run(self.core.handle_data(data, src, self.now))

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 2.5]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self._run(self.core.handle_timer(self.now))

    @rule(
        cid=st.sampled_from(sorted(CUSTOMERS)),
        system=st.sampled_from(["source", "target"]),
        state=st.sampled_from(["active", "locked"]),
    )
    def migrate(self, cid: str, system: str, state: str) -> None:
        self.router.move(cid, system, state)
        self._run(self.core.customers_changed([cid], self.now))

    @rule(node=st.sampled_from(NODES), up=st.booleans())
    def node_health(self, node: Node, up: bool) -> None:
        if up:
            self.core.health.states[node.key].up = True
        else:
            self.core.health.mark_unreachable(node.host, node.port, self.now)

    @rule(data=st.one_of(st.binary(max_size=200), mangled()), src=FLOWS)
    def garbage(self, data: bytes, src: Flow) -> None:
        self._run(self.core.handle_data(data, src, self.now), sender=src)

    @invariant()
    def timer_is_sane(self) -> None:
        if hasattr(self, "core"):
            t = self.core.get_timer()
            assert t is None or isinstance(t, float)


ProxyWalk.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_proxy_state_walk = ProxyWalk.TestCase


def test_regression_a_device_cannot_use_another_devices_flow_token() -> None:
    # was: any sender whose address differed from the token's went out to the token's
    # flow, so a caller who saw phone B's Record-Route could call B past the system
    core, _ = make_core()
    path, _ = _register(core, PHONE)
    attacker = Flow("udp", "203.0.113.66", 5060)
    inv = request(
        "INVITE",
        "sip:1001@203.0.113.5:40000",
        src=attacker,
        frm="<sip:2000@example.com>;tag=a1",
        to="<sip:1001@example.com>",
        call_id="bypass-1",
        headers=[f"Route: {path}"],
    )
    send = one(core.handle_data(inv, attacker, 1.0))
    # not to the phone: out of dialog (no To tag), so to the owner of the caller (2000, on
    # the target), like any call of theirs; the Route it carried does not pick the system
    to_node(send, T1)


def test_regression_bye_from_a_new_nat_port_goes_to_the_system() -> None:
    # was: the phone's BYE from a rebound NAT port went back out to its old port
    core, _ = make_core()
    rr, _ = _call(core)
    rebound = Flow("udp", PHONE.ip, 41999)
    bye = _in_dialog(
        "BYE",
        list(reversed(rr)),
        f"sip:2000@{S1.host}:{S1.port}",
        src=rebound,
        frm="<sip:1001@example.com>;tag=from1",
        to="<sip:2000@example.com>;tag=node-tag",
        cseq=2,
        branch="z9hG4bKnat2",
    )
    to_node(one(core.handle_data(bye, rebound, 1.0)), S1)


def test_a_tcp_node_reaches_the_phone_from_any_port_of_its_host() -> None:
    s_tcp = Node("source", 0, "tcp", "10.0.0.9", 5060)
    core, _ = make_core(nodes=(s_tcp, T1))
    path, _ = _register(core, PHONE, cap_node=s_tcp)
    node_conn = Flow("tcp", s_tcp.host, 45678, conn_id=12, worker=0)  # not a trusted ip:port
    inv = request(
        "INVITE",
        "sip:1001@203.0.113.5:40000",
        src=node_conn,
        frm="<sip:2000@example.com>;tag=n1",
        to="<sip:1001@example.com>",
        call_id="in-tcp",
        headers=[f"Route: {path}"],
    )
    send = one(core.handle_data(inv, node_conn, 1.0))
    to_flow(send, PHONE)
    assert {uri_params(rr)["dsbc"].partition(".")[0] for rr in rr_values(parse(send))} == {"source"}


def test_register_with_a_stale_route_is_still_routed_by_its_to_user() -> None:
    # a phone that puts the Path (or an old Record-Route) of its last registration in a
    # Route: after the migration its REGISTER must reach the new system all the same
    core, router = make_core()
    path, _ = _register(core, PHONE)
    router.move("42", "target")
    reg = request(
        "REGISTER",
        "sip:example.com",
        frm="<sip:1001@example.com>;tag=r2",
        to="<sip:1001@example.com>",
        call_id="reg-again",
        headers=[f"Route: {path}", "Contact: <sip:1001@203.0.113.5:40000>"],
    )
    to_node(one(core.handle_data(reg, PHONE, 1.0)), T1)


def test_regression_a_request_too_big_for_a_datagram_after_our_headers_gets_513() -> None:
    # was: forwarded anyway; the send failed with EMSGSIZE and the phone heard nothing
    core, _ = make_core()
    big = request("INVITE", body=b"v=0\r\n" + b"a=x\r\n" * 13040)
    assert 65000 < len(big) <= 65507
    send = one(core.handle_data(big, PHONE, 0.0))
    to_flow(send, PHONE)
    assert status_of(send) == 513
    # over TCP toward the phone-facing side the same size is fine
    node_tcp = Node("source", 0, "tcp", "10.0.0.9", 5060)
    core, _ = make_core(nodes=(node_tcp, T1))
    assert one(core.handle_data(big, PHONE, 0.0)).transport == "tcp"


def test_regression_a_held_request_that_fails_on_release_is_answered() -> None:
    # was: the SipError of the re-run escaped customers_changed() / handle_timer()
    core, router = make_core()
    router.move("42", state="locked")
    big = request("INVITE", body=b"a=x\r\n" * 13040)
    assert status_of(one(core.handle_data(big, PHONE, 0.0))) == 100
    router.move("42", "target", "active")
    send = one(core.customers_changed(["42"], 0.5))
    to_flow(send, PHONE)
    assert status_of(send) == 513
    assert core.held_count == 0


def test_regression_a_node_slower_than_the_ping_interval_stays_up() -> None:
    # was: only an answer to the latest ping counted, so with options_interval shorter than
    # the node's answer time every answer was ignored and the node marked down
    core, _ = make_core()
    core.health.interval, core.health.timeout = 0.5, 2.0
    now = 0.0
    sent: list[tuple[float, Send]] = []
    for _ in range(12):
        sent += [(now, p) for p in core.handle_timer(now) if (p.ip, p.port) == (S1.host, S1.port)]
        for t, p in [x for x in sent if x[0] <= now - 0.7]:  # S1 answers each ping 0.7 s late
            core.handle_data(
                make_response(parse_message(p.data), 200, "OK", to_tag="n"), flow_of(S1), now
            )
            sent.remove((t, p))
        now += 0.5
        assert core.health.states[S1.key].up, now
    to_node(one(core.handle_data(request("INVITE"), PHONE, now)), S1)


def test_a_route_naming_one_of_dsbcs_aliases_is_its_own() -> None:
    """A phone that knows dsbc by its DNS name (sip.aliases) gets the same treatment."""
    from dsbc.config import parse_config
    from dsbc.sip_service import SipService
    from dsbc.store import open_store

    cfg = parse_config(
        '[sip]\nlisten = ["udp:127.0.0.1:5060"]\naliases = ["sbc.example.com"]\n'
        'flow_secret = "0123456789abcdef0123"\n'
        '[systems.source]\nsip = ["udp:127.0.0.20:5060"]\n'
    )
    store = open_store("sqlite:///:memory:")
    store.put_customer("1", ["account:1001"], "source")
    core = SipService(cfg, store).core
    req = (
        b"OPTIONS sip:1002@sbc.example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bKalias\r\n"
        b"Route: <sip:sbc.example.com;lr>\r\n"
        b"From: <sip:1001@sbc.example.com>;tag=a\r\nTo: <sip:1002@sbc.example.com>\r\n"
        b"Call-ID: alias-1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    from sip.flow import Flow

    out = core.handle_data(req, Flow("udp", "127.0.0.2", 5062), 1.0)
    assert [(s.ip, s.port) for s in out] == [("127.0.0.20", 5060)]
    assert b"Route:" not in out[0].data  # our own Route was consumed, not passed on


def test_a_device_cannot_pick_its_system_with_a_made_up_dsbc_route() -> None:
    """The system in dsbc's Record-Route is signed: a device that writes its own
    `;dsbc=target` Route on a new request is refused, not routed there."""
    core, _ = make_core()
    for i, value in enumerate(("target", "target.AAAAAAAA")):
        forged = request("INVITE", branch=f"z9hG4bKforged{i}", headers=[f"Route: <sip:{ADV}:{PORT};lr;dsbc={value}>"])
        out = core.handle_data(forged, PHONE, 0.0)
        assert [parse(s).status for s in out] == [403]
    assert core.counters["route_signature_rejected"] == 2


# --- audit-sip regressions ------------------------------------------------------------------


def test_regression_cancel_and_ack_of_a_call_to_a_tcp_phone_keep_its_connection() -> None:
    """The CANCEL (and the ACK of a failure) of an INVITE the node sent to a phone registered
    over TCP must take the phone's connection (conn_id, worker), like the INVITE: with only
    transport/ip/port, a worker that does not own the connection opens a new one to the
    phone's ephemeral (NAT) port, which fails, and the phone keeps ringing."""
    core, _ = make_core()
    path, _ = _register(core, PHONE_TCP)
    ruri = f"sip:1001@{PHONE_TCP.ip}:{PHONE_TCP.port};transport=tcp"
    common = {
        "src": flow_of(S1),
        "frm": "<sip:2000@example.com>;tag=n1",
        "to": "<sip:1001@example.com>",
        "call_id": "in-tcp",
        "branch": "z9hG4bKintcp",
        "headers": [f"Route: {path}"],
    }
    inv = one(core.handle_data(request("INVITE", ruri, **common), flow_of(S1), 1.0))
    to_flow(inv, PHONE_TCP)
    cancel = one(core.handle_data(request("CANCEL", ruri, **common), flow_of(S1), 1.1))
    to_flow(cancel, PHONE_TCP)
    # the phone answers 487; the node's ACK of that failure follows the same flow
    one(core.handle_data(answer(inv.data, 487, "Request Terminated"), PHONE_TCP, 1.2))
    ack = request("ACK", ruri, **{**common, "to": "<sip:1001@example.com>;tag=node-tag"})
    to_flow(one(core.handle_data(ack, flow_of(S1), 1.3)), PHONE_TCP)


@pytest.mark.parametrize("case", ["forged-route", "loop"])
def test_regression_an_ack_is_never_answered(case: str) -> None:
    """RFC 3261 17: no response to an ACK, whatever is wrong with it (403, 482, 513 ...)."""
    core, _ = make_core()
    if case == "forged-route":
        ack = request(
            "ACK",
            "sip:2000@203.0.113.9:5060",
            to="<sip:2000@example.com>;tag=t1",
            headers=[f"Route: <sip:{ADV}:{PORT};lr;dsbc=target.AAAAAAAA>"],
        )
        assert core.handle_data(ack, PHONE, 0.0) == []
    else:
        ack = request("ACK", to="<sip:2000@example.com>;tag=t1")
        fwd = one(core.handle_data(ack, PHONE, 0.0))
        # the same ACK comes back from the same source with dsbc's Via on it: a loop
        assert core.handle_data(fwd.data, PHONE, 0.1) == []


def test_regression_number_with_telephone_subscriber_parameters_is_the_did() -> None:
    """A carrier's Request-URI after a number-portability dip (RFC 4694):
    sip:+15550002000;npdi;rn=+13125550000@host;user=phone is the did 15550002000, not an
    unknown identity sent to store.unknown's system."""
    core, router = make_core()
    ruri = "sip:+15550002000;npdi;rn=+13125550000@192.0.2.10;user=phone"
    send = one(core.handle_data(request("INVITE", ruri, src=CARRIER, call_id="np1"), CARRIER, 0.0))
    to_node(send, T1)
    assert router.decide_calls[-1][0] == ("did", "+15550002000")
    assert parse(send).ruri == ruri  # forwarded unchanged


def test_regression_replayed_record_route_does_not_pin_a_new_dialog() -> None:
    """A device's new INVITE (no To tag) carrying a Record-Route of an earlier call as a
    preloaded Route goes to its customer's system now, not to the one the old call was on."""
    core, router = make_core()
    inv = one(core.handle_data(request("INVITE", call_id="old-1"), PHONE, 0.0))
    to_node(inv, S1)
    rr = rr_values(parse(inv))[0]
    router.move("42", "target")
    fresh = request("INVITE", call_id="new-1", branch="z9hG4bKnew1", headers=[f"Route: {rr}"])
    send = one(core.handle_data(fresh, PHONE, 1.0))
    assert (send.ip, send.port) in {(T1.host, T1.port), (T2.host, T2.port)}, send
    # in-dialog (To tag) it still stays on the dialog's system with no lookup
    bye = request(
        "BYE", "sip:2000@10.0.0.1:5060", call_id="old-1", branch="z9hG4bKbye1",
        to="<sip:2000@example.com>;tag=node-tag", headers=[f"Route: {rr}"],
    )  # fmt: skip
    to_node(one(core.handle_data(bye, PHONE, 1.1)), S1)


def test_a_deregistration_is_reported_as_bindings_of_zero_seconds() -> None:
    """The 200 to a removal lists only the bindings that remain (RFC 3261 10.3): the removed
    ones are reported from the REGISTER itself, so `dsbc migrate` stops counting them."""
    core, _ = make_core()

    def register(headers: list[str]) -> None:
        reg = request("REGISTER", "sip:example.com", frm="<sip:1001@example.com>;tag=r1",
                      to="<sip:1001@example.com>", call_id="dereg", headers=headers)
        core.handle_data(reg, PHONE, 0.0)

    register(["Contact: <sip:1001@203.0.113.5:40000>;expires=3600"])
    assert core.events == []  # an ordinary REGISTER: reported from its 200 only
    register(["Contact: <sip:1001@203.0.113.5:40000>;expires=0", "Contact: <sip:1001@10.0.0.9>"])
    register(["Contact: <sip:1001@203.0.113.5:40001>", "Expires: 0"])
    register(["Contact: *", "Expires: 0"])
    assert [(e.account, e.contacts, e.system) for e in core.events] == [
        ("1001", [("sip:1001@203.0.113.5:40000", 0)], "source"),
        ("1001", [("sip:1001@203.0.113.5:40001", 0)], "source"),
        ("1001", [("*", 0)], "source"),
    ]


def test_regression_an_unbalanced_quote_in_the_top_via_is_answered_not_raised() -> None:
    """Found by Hypothesis: stamping received / rport on the 400's top Via split a Via
    holding an unbalanced quote and raised; the line is copied as it came instead."""
    core, _ = make_core()
    bad = request("INVITE", via='SIP/2.0/UDP 203.0.113.5:40000;branch=z"9hG4bKphone1;rport')
    out = core.handle_data(bad, Flow("udp", "203.0.113.5", 1), 1.0)
    assert [status_of(s) for s in out] in ([], [400])


def test_a_malformed_route_is_a_bad_request_in_the_counters() -> None:
    """Found only when the proxy reads the Route set: answered 400 and counted as malformed
    input (dsbc_sip_bad_requests_total), not as one of dsbc's refusals (rejected)."""
    core, _ = make_core()
    data = request("INVITE", headers=[f"Route: <sip:{ADV}:{PORT};lr"])
    assert status_of(one(core.handle_data(data, PHONE, 1.0))) == 400
    assert core.counters["bad_requests:400"] == 1 and core.counters["rejected:400"] == 0
