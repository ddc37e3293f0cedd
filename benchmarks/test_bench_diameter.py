"""Diameter: decode / encode of a Credit-Control-Request (initial) and the routing
candidates read from it."""

from __future__ import annotations

from typing import Any

from dsbc.diameter import codec as dc
from dsbc.diameter.routing import candidates


def ccr_initial() -> bytes:
    avps = [
        dc.utf8(dc.SESSION_ID, "gw1.example.net;1700000000;42;bench"),
        dc.utf8(dc.ORIGIN_HOST, "gw1.example.net"),
        dc.utf8(dc.ORIGIN_REALM, "example.net"),
        dc.utf8(dc.DESTINATION_REALM, "dsbc.example.net"),
        dc.u32(dc.AUTH_APPLICATION_ID, dc.APP_CREDIT_CONTROL),
        dc.utf8(dc.SERVICE_CONTEXT_ID, "32251@3gpp.org"),
        dc.u32(dc.CC_REQUEST_TYPE, dc.CC_INITIAL),
        dc.u32(dc.CC_REQUEST_NUMBER, 0),
        dc.subscription_id(dc.SUB_E164, "15550012345"),
        dc.subscription_id(dc.SUB_IMSI, "001010000012345"),
        dc.u32(dc.ORIGIN_STATE_ID, 1700000000),
        dc.grouped(437, [dc.u64(dc.CC_TOTAL_OCTETS, 1_000_000)]),  # Requested-Service-Unit
    ]
    return dc.encode(dc.request(dc.CMD_CC, dc.APP_CREDIT_CONTROL, 1, 1, avps, proxiable=True))


def test_decode_ccr(benchmark: Any) -> None:
    m = benchmark(dc.decode, ccr_initial())
    assert m.code == dc.CMD_CC


def test_encode_ccr(benchmark: Any) -> None:
    m = dc.decode(ccr_initial())
    assert benchmark(dc.encode, m) == ccr_initial()


def test_ccr_routing_candidates(benchmark: Any) -> None:
    m = dc.decode(ccr_initial())
    assert benchmark(candidates, m)[0] == ("msisdn", "15550012345")
