"""Typical SIP messages as phones and sipp send them, and small helpers shared by the
micro-benchmarks (``benchmarks/test_bench_*.py``) and the whole-system scenarios.

Everything here is plain data or I/O-free set-up: no sockets, no peers.
"""

from __future__ import annotations

from collections.abc import Iterator

PHONE = ("127.0.0.2", 5062)  # a device (not a trusted peer)
NODE = ("127.0.0.3", 5070)  # the source system's SIP node
DSBC = ("127.0.0.1", 5060)

SDP = (
    b"v=0\r\n"
    b"o=sipp 53655765 2353687637 IN IP4 127.0.0.2\r\n"
    b"s=-\r\n"
    b"c=IN IP4 127.0.0.2\r\n"
    b"t=0 0\r\n"
    b"m=audio 6000 RTP/AVP 0\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
)


def register(user: str = "100001", seq: int = 1) -> bytes:
    """A REGISTER from a phone, as a desk phone sends it (no Path, no auth yet)."""
    return (
        f"REGISTER sip:127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-reg-{seq};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:{user}@127.0.0.1:5060>;tag=reg{seq}\r\n"
        f"To: <sip:{user}@127.0.0.1:5060>\r\n"
        f"Call-ID: reg-{user}-{seq}@127.0.0.2\r\n"
        f"CSeq: {seq} REGISTER\r\n"
        f"Contact: <sip:{user}@127.0.0.2:5062;transport=udp>\r\n"
        f"Expires: 3600\r\n"
        f"User-Agent: Yealink SIP-T46S 66.86.0.15\r\n"
        f"Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, OPTIONS, INFO, SUBSCRIBE, UPDATE\r\n"
        f"Supported: path, replaces\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def invite(caller: str = "100001", callee: str = "15551234567", seq: int = 1) -> bytes:
    """An INVITE with SDP from a phone (sipp's uac scenario shape)."""
    return (
        f"INVITE sip:{callee}@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-inv-{seq};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:{caller}@127.0.0.2:5062>;tag=from{seq}\r\n"
        f"To: <sip:{callee}@127.0.0.1:5060>\r\n"
        f"Call-ID: call-{seq}@127.0.0.2\r\n"
        f"CSeq: 1 INVITE\r\n"
        f"Contact: <sip:{caller}@127.0.0.2:5062;transport=udp>\r\n"
        f"User-Agent: sipp-bench\r\n"
        f"Content-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP)}\r\n\r\n"
    ).encode() + SDP


def ok_200(request: bytes, to_tag: str = "uas1", record_route: bool = True) -> bytes:
    """The 200 OK a UAS sends back for ``request`` (as received by the UAS: every Via,
    Record-Route echoed), with SDP for an INVITE."""
    head = request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    keep = ("via:", "from:", "to:", "call-id:", "cseq:", "record-route:")
    lines = ["SIP/2.0 200 OK"]
    for h in head[1:]:
        low = h.lower()
        if low.startswith(keep):
            if not record_route and low.startswith("record-route:"):
                continue
            lines.append(h + (f";tag={to_tag}" if low.startswith("to:") else ""))
    is_invite = head[0].startswith("INVITE")
    body = SDP if is_invite else b""
    lines.append(f"Contact: <sip:{NODE[0]}:{NODE[1]};transport=udp>")
    if is_invite:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def customer_rows(
    customers: int, per_customer: int = 4
) -> Iterator[tuple[str, str, str, str, str, int, str]]:
    """Joined rows for ``MemoryIndex.build``: ``customers`` customers with ``per_customer``
    identities each (two accounts, a DID, an i_account), sorted by customer id."""
    for i in range(customers):
        cid = f"{i:07d}"
        system = system_of(i)
        for key in identity_keys(i)[:per_customer]:
            yield (cid, system, "active", "", "", 0, key)


def identity_keys(i: int) -> list[str]:
    """The identities of customer ``i``: two SIP accounts, a DID and an i_account.  The
    same scheme fills dsbc's store and Kamailio's htable (whose config computes it)."""
    return [
        f"account:{account_of(i, 0)}",
        f"account:{account_of(i, 1)}",
        f"did:1555{1_000_000 + i}",
        f"i_account:{i}",
    ]


def system_of(i: int) -> str:
    """Every tenth customer lives on the target."""
    return "target" if i % 10 == 9 else "source"


def account_of(i: int, n: int = 0) -> str:
    """SIP user of customer ``i``'s ``n``-th account."""
    return str(1_000_000 + 2 * i + n)


def in_dialog(method: str, record_route: str, caller: str, seq: int = 1, cseq: int = 2) -> bytes:
    """An ACK / BYE from the phone inside a dialog that dsbc record-routed."""
    return (
        f"{method} sip:{NODE[0]}:{NODE[1]};transport=udp SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bK-{method.lower()}-{seq};rport\r\n"
        f"Route: {record_route}\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:{caller}@127.0.0.2:5062>;tag=from{seq}\r\n"
        f"To: <sip:15551234567@127.0.0.1:5060>;tag=uas1\r\n"
        f"Call-ID: call-{seq}@127.0.0.2\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"Contact: <sip:{caller}@127.0.0.2:5062;transport=udp>\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


class _IndexStore:
    """The slice of a LocationStore that ``dsbc.sip_service.StoreRouter`` uses."""

    unknown = "source"

    def __init__(self, index: object) -> None:
        self.index = index
        self.lookup = index.lookup  # type: ignore[attr-defined]

    def customer(self, customer_id: str) -> object:
        return self.index.customer(customer_id)  # type: ignore[attr-defined]


def make_core(index: object) -> object:
    """A ``ProxyCore`` wired as ``dsbc run`` wires it (StoreRouter over ``index``, one
    source and one target node), without sockets."""
    from dsbc.sip_service import StoreRouter, peer_set
    from sip.flow import FlowSigner
    from sip.health import HealthChecker, Node
    from sip.proxy import ProxyCore, ProxySettings

    router = StoreRouter(_IndexStore(index), peer_set([f"{NODE[0]}:{NODE[1]}"]))  # type: ignore[arg-type]
    health = HealthChecker(
        [Node("source", 0, "udp", *NODE), Node("target", 0, "udp", "127.0.0.4", 5070)]
    )
    settings = ProxySettings(
        advertise_host=DSBC[0], ports={"udp": DSBC[1]}, local_addresses=frozenset({DSBC})
    )
    return ProxyCore(settings, router, health, FlowSigner(b"benchmark-flow-secret-0123456789"))


def call_flow(core: object, caller: str, seq: int = 1) -> list[tuple[str, bytes, object]]:
    """The six messages of one call as dsbc receives them (INVITE, 180, 200, ACK, BYE,
    200), each with its source flow: (name, octets, flow)."""
    from sip.flow import Flow

    phone, node = Flow("udp", *PHONE), Flow("udp", *NODE)
    inv = invite(caller, seq=seq)
    fwd = core.handle_data(inv, phone, 0.0)[0].data  # type: ignore[attr-defined]
    ok = ok_200(fwd)
    rr = next(
        line for line in fwd.decode("latin-1").split("\r\n") if line.startswith("Record-Route:")
    )
    rr = rr.split(":", 1)[1].strip()
    ack = in_dialog("ACK", rr, caller, seq, cseq=1)
    bye = in_dialog("BYE", rr, caller, seq, cseq=2)
    fbye = core.handle_data(bye, phone, 0.0)[0].data  # type: ignore[attr-defined]
    return [
        ("INVITE", inv, phone),
        ("180", ok.replace(b"200 OK", b"180 Ringing", 1), node),
        ("200", ok, node),
        ("ACK", ack, phone),
        ("BYE", bye, phone),
        ("200-BYE", ok_200(fbye), node),
    ]
