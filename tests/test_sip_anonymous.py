"""An anonymous call (RFC 3323: From anonymous@anonymous.invalid) from a registered phone,
through a running dsbc, reaches the system of the phone's customer."""

from __future__ import annotations

import time
from typing import Any

from tests.test_faults import CUSTOMERS, UdpPhone, nodes  # noqa: F401 - the fixture

__all__ = ["test_a_registered_phones_anonymous_call_reaches_its_customers_system"]


def anonymous_invite(phone: UdpPhone, dsbc: tuple[str, int], call_id: str) -> None:
    lh, lp = phone.addr
    host = f"{dsbc[0]}:{dsbc[1]}"
    phone.sock.sendto((
        f"INVITE sip:15550009999@{host} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {lh}:{lp};branch=z9hG4bK-{call_id};rport\r\nMax-Forwards: 70\r\n"
        f'From: "Anonymous" <sip:anonymous@anonymous.invalid>;tag=a1\r\n'
        f"To: <sip:15550009999@{host}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:{lh}:{lp}>\r\nPrivacy: id\r\nContent-Length: 0\r\n\r\n"
    ).encode(), dsbc)


def invites(node: Any, call_id: str) -> int:
    return len([r for r in node.requests("INVITE") if call_id in str(r.get("call-id") or "")])


def test_a_registered_phones_anonymous_call_reaches_its_customers_system(dsbc_factory: Any, nodes: Any) -> None:  # noqa: F811
    source, target = nodes
    d = dsbc_factory(source=[source.uri], target=[target.uri], customers=CUSTOMERS)
    d.wait_nodes_up()
    phone = UdpPhone("3003")  # customer 300, on the target
    stranger = UdpPhone("3003")  # a socket that never registered
    try:
        assert phone.register(d.sip_addr)[0] == 200
        anonymous_invite(phone, d.sip_addr, "anon-registered")
        anonymous_invite(stranger, d.sip_addr, "anon-stranger")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (
            invites(target, "anon-registered") and invites(source, "anon-stranger")
        ):
            time.sleep(0.05)
        assert invites(target, "anon-registered") and not invites(source, "anon-registered")
        # nothing tells who the stranger is: store.unknown (the source)
        assert invites(source, "anon-stranger") and not invites(target, "anon-stranger")
    finally:
        phone.close()
        stranger.close()
