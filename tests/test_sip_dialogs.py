"""Dialog features beyond a basic call, through a real `dsbc run`: subscriptions and their
NOTIFYs, with scripted nodes (tests/peers/fakenode.py) as the systems and UDP sockets as
the phones (127.0.0.6, untrusted).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from sip.headers import split_values
from tests.peers.fakenode import FakeNode
from tests.peers.sipmsg import SipText
from tests.test_security import DEVICE, Udp, start

pytestmark = [pytest.mark.peers, pytest.mark.timeout(60)]

Factory = Callable[..., Any]


@pytest.fixture
def nodes() -> Any:
    with FakeNode("udp") as source, FakeNode("udp") as target:
        yield source, target


def wait_for(node: FakeNode, method: str, count: int, timeout: float = 5.0) -> list[SipText]:
    deadline = time.monotonic() + timeout
    while len(node.requests(method)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    got = node.requests(method)
    assert len(got) >= count, f"{method} x{count} never reached the node: {got}"
    return got


def first_request(msgs: list[SipText], method: str) -> SipText:
    found = [m for m in msgs if m.method == method]
    assert found, f"no {method} among {[m.start_line for m in msgs]}"
    return found[0]


def record_routes(m: SipText) -> list[str]:
    return [v for line in m.all("record-route") for v in split_values(line)]


def subscribe(phone: Udp, ruri: str, call_id: str, cseq: int, route: Sequence[str] = (), to_tag: str = "",
              expires: int = 600) -> bytes:  # fmt: skip
    ip, port = phone.addr
    lines = [
        f"SUBSCRIBE {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK-sub-{time.monotonic_ns()};rport",
        "Max-Forwards: 70",
        "From: <sip:1001@example.com>;tag=sub1",
        "To: <sip:2002@example.com>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} SUBSCRIBE",
        f"Contact: <sip:1001@{ip}:{port}>",
        "Event: dialog",
        f"Expires: {expires}",
        *[f"Route: {r}" for r in route],
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_notify_in_a_subscription_is_record_routed(dsbc_factory: Factory, nodes: Any) -> None:
    """RFC 6665 4.3: a proxy that record-routed a SUBSCRIBE record-routes its NOTIFYs (as
    Kamailio's default configuration does), because a subscriber that gets the first NOTIFY
    before the 200 (forking, a lost 200 over UDP) builds its route set from that NOTIFY.
    Without dsbc in it, the refresh and the un-SUBSCRIBE bypass dsbc and never reach the
    system (the phone cannot reach the node's own address, or its NAT drops the answer)."""
    source, _ = nodes
    d = start(dsbc_factory, nodes)
    phone = Udp(DEVICE)
    try:
        call_id = f"blf-{time.monotonic_ns()}"
        phone.send(subscribe(phone, f"sip:2002@{d.ip}:{d.port}", call_id, 1), d.sip_addr)
        sub = wait_for(source, "SUBSCRIBE", 1)[0]
        dsbc_rr = record_routes(sub)
        assert len(dsbc_rr) == 1
        # the node (the notifier) sends its first NOTIFY through the route set of the
        # SUBSCRIBE, with its own Record-Route, as an RFC 6665 notifier behind Kamailio does
        notify = (
            f"NOTIFY sip:1001@{phone.addr[0]}:{phone.addr[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {source.ip}:{source.port};branch=z9hG4bK-n1-{time.monotonic_ns()}\r\n"
            "Max-Forwards: 70\r\n"
            f"Route: {dsbc_rr[0]}\r\n"
            f"Record-Route: <sip:{source.ip}:{source.port};lr>\r\n"
            "From: <sip:2002@example.com>;tag=notifier1\r\n"
            "To: <sip:1001@example.com>;tag=sub1\r\n"
            f"Call-ID: {call_id}\r\n"
            "CSeq: 1 NOTIFY\r\n"
            f"Contact: <sip:2002@{source.ip}:{source.port}>\r\n"
            "Event: dialog\r\n"
            "Subscription-State: active;expires=600\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        source.send(notify, d.sip_addr)
        got = first_request(phone.recv_all(1.5), "NOTIFY")
        rr = record_routes(got)
        assert len(rr) == 2 and rr[1] == f"<sip:{source.ip}:{source.port};lr>", rr
        assert rr[0] == dsbc_rr[0], "dsbc's Record-Route of the NOTIFY names the same flow and system"
        # the subscriber's un-SUBSCRIBE, routed by the NOTIFY's route set, reaches the node
        phone.send(
            subscribe(phone, f"sip:2002@{source.ip}:{source.port}", call_id, 2, route=rr,
                      to_tag="notifier1", expires=0),
            d.sip_addr,
        )  # fmt: skip
        unsub = wait_for(source, "SUBSCRIBE", 2)[1]
        assert unsub.get("expires") == "0"
    finally:
        phone.close()
    assert not d.traceback()
