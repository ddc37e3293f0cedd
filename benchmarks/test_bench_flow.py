"""Flow tokens: signed into every Path / Record-Route of a device, verified on every
request coming back toward it (HMAC-SHA256, truncated)."""

from __future__ import annotations

from typing import Any

from sip.flow import Flow, FlowSigner

SIGNER = FlowSigner(b"benchmark-flow-secret-0123456789")
UDP = Flow("udp", "203.0.113.7", 5062)
TCP = Flow("tcp", "2001:db8::7", 40123, conn_id=123456, worker=1)


def test_flow_sign_udp(benchmark: Any) -> None:
    token = benchmark(SIGNER.encode, UDP)
    assert SIGNER.decode(token) == UDP


def test_flow_verify_udp(benchmark: Any) -> None:
    token = SIGNER.encode(UDP)
    assert benchmark(SIGNER.decode, token) == UDP


def test_flow_verify_tcp_ipv6(benchmark: Any) -> None:
    token = SIGNER.encode(TCP)
    assert benchmark(SIGNER.decode, token) == TCP
