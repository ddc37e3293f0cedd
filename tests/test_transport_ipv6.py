"""sip.transport takes IPv6 datagrams: their address is (host, port, flowinfo, scope_id).

A compiled (mypyc) build checks the ``addr`` annotation of ``datagram_received``: with
``tuple[str, int]`` every IPv6 UDP datagram raised TypeError in the event loop and was lost
(found by the audit: ``udp:[::1]:PORT`` listener, an INVITE from ::1, nothing forwarded).
"""

from __future__ import annotations

import asyncio

from sip.transport import SipDatagram, SipEndpoint
from tests.test_proxy_core import make_core, request
from sip.flow import Flow


def test_datagram_from_an_ipv6_address_reaches_the_core() -> None:
    core, _ = make_core()
    loop = asyncio.new_event_loop()
    try:
        proto = SipDatagram(SipEndpoint(core, loop))
        v6 = request("OPTIONS", "sip:2000@example.com", src=Flow("udp", "::1", 5062), via="SIP/2.0/UDP [::1]:5062;branch=z9hG4bKv6")
        v4 = request("OPTIONS", "sip:2000@example.com", via="SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKv4")
        proto.datagram_received(v6, ("::1", 5062, 0, 0))
        proto.datagram_received(v4, ("127.0.0.1", 5062))
    finally:
        loop.close()
    assert core.counters["requests_in:OPTIONS"] == 2
    assert core.counters["forwarded:source"] == 2  # From 1001: a source customer
