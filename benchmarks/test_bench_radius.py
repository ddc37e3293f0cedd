"""RADIUS: decode / encode of an Access-Request and an Accounting-Request, and the whole
relay of one Access-Request through ``RadiusCore`` (decode, authenticate, re-hide the
password, re-sign for the system; then the answer re-signed for the NAS).  I/O-free."""

from __future__ import annotations

import itertools
import os
import struct
from typing import Any

from dsbc.radius import packet as rp
from dsbc.radius.core import TO_SERVER, RadiusCore, SystemTarget

NAS = ("127.0.0.9", 40000)
NAS_SECRET = b"nas-secret"
SYSTEM_SECRET = "source-secret"
SERVER = ("127.0.0.10", 1812)


def access_request(ident: int = 1, auth: bytes | None = None, user: bytes = b"1000002") -> bytes:
    auth = auth or os.urandom(16)
    attrs = [
        (rp.MESSAGE_AUTHENTICATOR, rp.ZERO16),  # a Blast-RADIUS-aware NAS signs every request
        (rp.USER_NAME, user),
        (rp.USER_PASSWORD, rp.hide_password(b"secret-password", NAS_SECRET, auth)),
        (rp.NAS_IP_ADDRESS, bytes((127, 0, 0, 9))),
        (rp.NAS_IDENTIFIER, b"bras-1"),
        (61, struct.pack("!I", 15)),  # NAS-Port-Type
        (31, b"00-11-22-33-44-55"),  # Calling-Station-Id
    ]
    return rp.sign_request(rp.Packet(rp.ACCESS_REQUEST, ident, auth, attrs), NAS_SECRET)


def accounting_request(ident: int = 2) -> bytes:
    attrs = [
        (rp.USER_NAME, b"1000002"),
        (rp.ACCT_STATUS_TYPE, struct.pack("!I", rp.ACCT_START)),
        (rp.ACCT_SESSION_ID, b"5f3a-0001"),
        (rp.NAS_IP_ADDRESS, bytes((127, 0, 0, 9))),
        (46, struct.pack("!I", 0)),  # Acct-Session-Time
    ]
    return rp.sign_request(rp.Packet(rp.ACCOUNTING_REQUEST, ident, rp.ZERO16, attrs), NAS_SECRET)


def test_decode_access_request(benchmark: Any) -> None:
    data = access_request()
    pkt = benchmark(rp.decode, data)
    assert pkt.get(rp.USER_NAME) == b"1000002"


def test_encode_sign_access_request(benchmark: Any) -> None:
    pkt = rp.decode(access_request())
    wire = benchmark(rp.sign_request, pkt, NAS_SECRET)
    assert rp.verify_message_authenticator(wire, NAS_SECRET) is True


def test_decode_accounting_request(benchmark: Any) -> None:
    pkt = benchmark(rp.decode, accounting_request())
    assert pkt.get_int(rp.ACCT_STATUS_TYPE) == rp.ACCT_START


def test_encode_sign_accounting_request(benchmark: Any) -> None:
    pkt = rp.decode(accounting_request())
    wire = benchmark(rp.sign_request, pkt, NAS_SECRET)
    assert rp.verify_accounting_request(wire, NAS_SECRET)


def test_relay_access_request_round_trip(benchmark: Any) -> None:
    """handle_request + handle_answer: the dispatcher's whole CPU work per authentication."""
    core = RadiusCore(
        [(NAS[0], NAS_SECRET.decode())],
        [
            SystemTarget("source", SYSTEM_SECRET, [SERVER], [(SERVER[0], 1813)]),
            SystemTarget("target", "target-secret", [("127.0.0.11", 1812)], [("127.0.0.11", 1813)]),
        ],
        lambda user: ("source", "active"),
    )
    secret = SYSTEM_SECRET.encode()
    ids = itertools.count()

    def setup() -> tuple[tuple[bytes], dict[str, Any]]:
        # a new Request Authenticator each round: a repeat would be answered from the cache
        return (access_request(next(ids) & 0xFF),), {}

    def relay(data: bytes) -> bytes:
        (out,) = core.handle_request(0, data, NAS, 0.0)
        assert out.kind == TO_SERVER
        fwd = rp.decode(out.data)
        state = fwd.get_all(rp.PROXY_STATE)[-1]
        answer = rp.Packet(
            rp.ACCESS_ACCEPT,
            fwd.identifier,
            b"",
            [(rp.REPLY_MESSAGE, b"ok"), (rp.PROXY_STATE, state)],
        )
        wire = rp.sign_response(answer, fwd.authenticator, secret)
        (back,) = core.handle_answer("source", out.via, wire, out.addr, 0.0)
        return back.data

    # the answer is built inside the round (a real server's work, ~15 us): see the README
    back = benchmark.pedantic(relay, setup=setup, rounds=3000, warmup_rounds=50)
    assert back[0] == rp.ACCESS_ACCEPT
