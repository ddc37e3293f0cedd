"""Diameter codec: round trips, errors that carry their result code, framing, fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsbc.diameter import codec as dc


def ccr() -> dc.Message:
    return dc.request(dc.CMD_CC, dc.APP_CREDIT_CONTROL, 0x11, 0x22, [
        dc.utf8(dc.SESSION_ID, "pgw;1;2"), dc.utf8(dc.ORIGIN_HOST, "pgw.example"),
        dc.utf8(dc.ORIGIN_REALM, "example"), dc.u32(dc.CC_REQUEST_TYPE, dc.CC_INITIAL),
        dc.subscription_id(dc.SUB_E164, "+15550100"), dc.subscription_id(dc.SUB_IMSI, "001010123456789"),
        dc.Avp(1234, b"vendor data", dc.AVP_V, 10415)], proxiable=True)


def test_round_trip_and_grouped() -> None:
    m = ccr()
    raw = dc.encode(m)
    assert len(raw) % 4 == 0 and raw[0] == 1
    back = dc.decode(raw)
    assert back == m
    assert dc.subscription_ids(back) == [(dc.SUB_E164, "+15550100"), (dc.SUB_IMSI, "001010123456789")]
    assert back.find(1234, 10415) is not None and back.find(1234) is None
    assert dc.set_hop_by_hop(raw, 7)[12:16] == b"\x00\x00\x00\x07"


def test_answer_keeps_ids_and_sets_e_bit_for_protocol_errors() -> None:
    m = ccr()
    ans = dc.answer(m, dc.UNABLE_TO_DELIVER, "dsbc", "realm", error_message="down")
    assert ans.flags & dc.FLAG_E and not ans.is_request and ans.flags & dc.FLAG_P
    assert (ans.hop_by_hop, ans.end_to_end, ans.code, ans.app_id) == (0x11, 0x22, dc.CMD_CC, 4)
    assert ans.avps[0].code == dc.SESSION_ID and ans.u32(dc.RESULT_CODE) == 3002
    ok = dc.answer(m, dc.SUCCESS, "dsbc", "realm")
    assert not ok.flags & dc.FLAG_E


def test_capabilities_apps() -> None:
    vsai = dc.grouped(dc.VENDOR_SPECIFIC_APPLICATION_ID, [dc.u32(dc.VENDOR_ID, 10415), dc.u32(dc.AUTH_APPLICATION_ID, 16777238)])
    cer = dc.request(dc.CMD_CE, 0, 1, 1, dc.capabilities("h", "r", ["127.0.0.1", "::1"], [4]) + [vsai])
    assert dc.advertised_apps(dc.decode(dc.encode(cer))) == {4, 16777238}
    ip = cer.find_all(dc.HOST_IP_ADDRESS)
    assert [dc.decode_address(a.data) for a in ip] == ["127.0.0.1", "::1"]


def _hdr(length: int, flags: int = 0x80, version: int = 1) -> bytes:
    return struct.pack("!IIIII", (version << 24) | length, (flags << 24) | 272, 4, 5, 6)


@pytest.mark.parametrize(
    "data,code,fatal",
    [
        (_hdr(20, version=2), dc.UNSUPPORTED_VERSION, True),
        (_hdr(22), dc.INVALID_MESSAGE_LENGTH, True),
        (_hdr(16), dc.INVALID_MESSAGE_LENGTH, True),
        (_hdr(20, flags=0xA0), dc.INVALID_HDR_BITS, False),  # request with E bit
        (_hdr(20, flags=0x81), dc.INVALID_HDR_BITS, False),  # reserved bit
        (_hdr(28) + struct.pack("!II", 263, 0x40000004), dc.INVALID_AVP_LENGTH, False),  # AVP length 4 < 8
        (_hdr(28) + struct.pack("!II", 263, 0x40000010), dc.INVALID_AVP_LENGTH, False),  # past the end
        (_hdr(32) + struct.pack("!III", 263, 0xC000000A, 0), dc.INVALID_AVP_LENGTH, False),  # V set, 10 < 12
        (_hdr(24) + b"\x00\x00\x01\x07", dc.INVALID_AVP_LENGTH, False),  # half an AVP header
    ],
)
def test_decode_errors_carry_result_code(data: bytes, code: int, fatal: bool) -> None:
    with pytest.raises(dc.DiameterDecodeError) as ei:
        dc.decode(data)
    assert ei.value.result_code == code and ei.value.fatal == fatal
    if not fatal:
        assert ei.value.header is not None and ei.value.header.hop_by_hop == 5


def test_bad_grouped_and_unsigned_values() -> None:
    bad = dc.Avp(dc.SUBSCRIPTION_ID, b"\x00\x00\x01\xc2\x40\x00\x00\x02")
    m = dc.request(dc.CMD_CC, 4, 1, 1, [bad, dc.Avp(dc.CC_REQUEST_TYPE, b"\x01")])
    with pytest.raises(dc.DiameterDecodeError) as ei:
        dc.subscription_ids(m)
    assert ei.value.result_code == dc.INVALID_AVP_LENGTH
    with pytest.raises(dc.DiameterDecodeError):
        m.u32(dc.CC_REQUEST_TYPE)


def test_framer_byte_by_byte_and_many_per_read() -> None:
    raws = [dc.encode(ccr()), dc.encode(dc.request(dc.CMD_DW, 0, 2, 2, []))]
    f = dc.Framer()
    got = []
    for b in b"".join(raws):
        f.feed(bytes([b]))
        m = f.next_message()
        if m is not None:
            got.append(m)
    assert got == raws and f.buffered == 0
    f.feed(b"".join(raws) * 3)
    assert [f.next_message() for _ in range(6)] == raws * 3 and f.next_message() is None
    f.feed(_hdr(20, version=3))
    with pytest.raises(dc.DiameterDecodeError):
        f.next_message()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_any_bytes(data: bytes) -> None:
    try:
        m = dc.decode(data)
    except dc.DiameterDecodeError:
        return
    for a in m.avps:
        try:
            a.group()
            a.u32()
        except dc.DiameterDecodeError:
            pass
    try:
        dc.subscription_ids(m)
        dc.advertised_apps(m)
    except dc.DiameterDecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=30)), max_size=8),
       st.integers(0, 255), st.data())
def test_fuzz_valid_then_mutated(avps: list[tuple[int, int, bytes]], flags: int, data: st.DataObject) -> None:
    m = dc.Message(0x80, 272, 4, 1, 2, [dc.Avp(c, d, f & 0x60, 0) for c, f, d in avps])
    raw = dc.encode(m)
    assert dc.decode(raw) == m
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    try:
        dc.decode(bytes(buf))
    except dc.DiameterDecodeError:
        pass
    f = dc.Framer()
    f.feed(bytes(buf))
    try:
        f.next_message()
    except dc.DiameterDecodeError:
        pass
