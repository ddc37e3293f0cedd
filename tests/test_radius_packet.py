"""RADIUS codec: round trips, RFC test vectors, authenticators, hiding, and fuzzing."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsbc.radius import packet as rp

SECRET = b"xyzzy5461"


def test_rfc2865_password_vector() -> None:
    # RFC 2865 section 7.1: user "nemo", password "arctangent", secret "xyzzy5461"
    auth = bytes.fromhex("0f403f9473978057bd83d5cb98f4227a")
    hidden = rp.hide_password(b"arctangent", SECRET, auth)
    assert hidden == bytes.fromhex("0d be 70 8d 93 d4 13 ce 31 96 e4 3f 78 2a 0a ee".replace(" ", ""))
    assert rp.unhide_password(hidden, SECRET, auth) == b"arctangent"


def test_rfc2865_access_accept_vector() -> None:
    req_auth = bytes.fromhex("0f403f9473978057bd83d5cb98f4227a")
    # RFC 2865 7.1 Access-Accept body: Service-Type, Login-Service, Login-IP-Host
    attrs = [(6, struct.pack("!I", 1)), (15, struct.pack("!I", 0)), (14, bytes([192, 168, 1, 3]))]
    raw = rp.sign_response(rp.Packet(rp.ACCESS_ACCEPT, 0, rp.ZERO16, attrs), req_auth, SECRET)
    assert raw.hex() == "0200002686fe220e7624ba2a1005f6bf9b55e0b2060600000001 0f06000000000e06c0a80103".replace(" ", "")
    assert rp.verify_response(raw, req_auth, SECRET)
    assert not rp.verify_response(raw, req_auth, b"other")


@pytest.mark.parametrize("pw", [b"", b"a", b"x" * 16, b"y" * 17, b"z" * 128])
def test_password_round_trip(pw: bytes) -> None:
    auth = bytes(range(16))
    hidden = rp.hide_password(pw, SECRET, auth)
    assert len(hidden) % 16 == 0 and hidden
    assert rp.unhide_password(hidden, SECRET, auth) == pw


def test_encode_decode_round_trip() -> None:
    pkt = rp.Packet(rp.ACCESS_REQUEST, 7, bytes(range(16)), [(rp.USER_NAME, b"alice"), (rp.PROXY_STATE, b"\x01")])
    raw = rp.encode(pkt)
    back = rp.decode(raw)
    assert back == pkt
    assert back.get_text(rp.USER_NAME) == "alice"
    # octets past the Length field are padding
    assert rp.decode(raw + b"\x00\x00") == pkt


def test_accounting_request_signature() -> None:
    pkt = rp.Packet(rp.ACCOUNTING_REQUEST, 1, rp.ZERO16,
                    [(rp.USER_NAME, b"bob"), (rp.ACCT_STATUS_TYPE, struct.pack("!I", rp.ACCT_START))])
    raw = rp.sign_request(pkt, SECRET)
    expected = hashlib.md5(raw[:4] + rp.ZERO16 + raw[20:] + SECRET).digest()
    assert raw[4:20] == expected
    assert rp.verify_accounting_request(raw, SECRET)
    assert not rp.verify_accounting_request(raw, b"nope")


def test_message_authenticator() -> None:
    pkt = rp.Packet(rp.ACCESS_REQUEST, 9, bytes(16), [(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16), (rp.USER_NAME, b"u")])
    raw = rp.sign_request(pkt, SECRET)
    assert rp.verify_message_authenticator(raw, SECRET) is True
    assert rp.verify_message_authenticator(raw, b"bad") is False
    plain = rp.encode(rp.Packet(rp.ACCESS_REQUEST, 9, bytes(16), [(rp.USER_NAME, b"u")]))
    assert rp.verify_message_authenticator(plain, SECRET) is None
    # one of the wrong length makes the packet invalid (RFC 3579 3.2), not unsigned
    short = rp.encode(rp.Packet(rp.ACCESS_REQUEST, 9, bytes(16), [(rp.MESSAGE_AUTHENTICATOR, b"abc"), (rp.USER_NAME, b"u")]))
    assert rp.verify_message_authenticator(short, SECRET) is False
    # an answer's Message-Authenticator is computed over the request's authenticator
    req_auth = bytes(range(16))
    ans = rp.sign_response(rp.Packet(rp.ACCESS_ACCEPT, 9, rp.ZERO16, [(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16)]),
                           req_auth, SECRET)
    assert rp.verify_message_authenticator(ans, SECRET, req_auth) is True
    assert rp.verify_response(ans, req_auth, SECRET)


def test_salt_encryption_and_mppe_reencrypt() -> None:
    a1, a2 = bytes(range(16)), bytes(range(16, 32))
    key = bytes(range(32))
    enc = rp.salt_encrypt(key, b"s1", a1)
    assert enc[0] & 0x80 and rp.salt_decrypt(enc, b"s1", a1) == key
    vsa = rp.join_vsa(rp.VENDOR_MICROSOFT, [(rp.MS_MPPE_RECV_KEY, enc), (99, b"keep")])
    pkt = rp.Packet(rp.ACCESS_ACCEPT, 1, rp.ZERO16,
                    [(rp.VENDOR_SPECIFIC, vsa), (rp.TUNNEL_PASSWORD, b"\x01" + rp.salt_encrypt(b"tunnel", b"s1", a1))])
    rp.reencrypt_answer_attrs(pkt, b"s1", a1, b"s2", a2)
    vendor, subs = rp.split_vsa(pkt.attrs[0][1]) or (0, [])
    assert vendor == rp.VENDOR_MICROSOFT and subs[1] == (99, b"keep")
    assert rp.salt_decrypt(subs[0][1], b"s2", a2) == key
    assert pkt.attrs[1][1][0] == 1 and rp.salt_decrypt(pkt.attrs[1][1][1:], b"s2", a2) == b"tunnel"


def test_vendor_salt_encrypted_attributes_reencrypted() -> None:
    """Aruba-MPSK-Passphrase (a Wi-Fi key per device) and Juniper's ERX-LI-Action are
    salt-encrypted like MS-MPPE keys (FreeRADIUS dictionaries: encrypt=2)."""
    a1, a2 = bytes(range(16)), bytes(range(16, 32))
    aruba = rp.join_vsa(14823, [(44, rp.salt_encrypt(b"device-psk-123", b"s1", a1))])
    erx = rp.join_vsa(4874, [(58, rp.salt_encrypt(b"\x00\x00\x00\x01", b"s1", a1)), (1, b"plain")])
    pkt = rp.Packet(rp.ACCESS_ACCEPT, 1, rp.ZERO16, [(rp.VENDOR_SPECIFIC, aruba), (rp.VENDOR_SPECIFIC, erx)])
    rp.reencrypt_answer_attrs(pkt, b"s1", a1, b"s2", a2)
    (_, [(_, psk)]), (_, [(_, li), plain]) = (rp.split_vsa(v) or (0, []) for _, v in pkt.attrs)
    assert rp.salt_decrypt(psk, b"s2", a2) == b"device-psk-123"
    assert rp.salt_decrypt(li, b"s2", a2) == b"\x00\x00\x00\x01" and plain == (1, b"plain")


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "truncated"),
        (b"\x01\x02\x00", "truncated"),
        (b"\x01\x02\x00\x13" + bytes(16), "bad_length"),  # length 19 < 20
        (b"\x01\x02\x10\x01" + bytes(16), "bad_length"),  # 4097 > 4096
        (b"\x01\x02\x00\x30" + bytes(16), "truncated"),  # says 48, has 20
        (b"\x01\x02\x00\x16" + bytes(16) + b"\x01\x01", "bad_attribute"),  # attribute length 1
        (b"\x01\x02\x00\x17" + bytes(16) + b"\x01\x05\x41", "bad_attribute"),  # runs past the end
        (b"\x01\x02\x00\x15" + bytes(16) + b"\x01", "bad_attribute"),  # half an attribute header
    ],
)
def test_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(rp.RadiusDecodeError) as ei:
        rp.decode(data)
    assert ei.value.reason == reason
    assert ei.value.action == "drop"


def test_unknown_attributes_kept() -> None:
    raw = rp.encode(rp.Packet(rp.ACCESS_REQUEST, 1, bytes(16), [(250, b"\xff" * 10), (rp.VENDOR_SPECIFIC, b"\x00")]))
    assert rp.decode(raw).attrs == [(250, b"\xff" * 10), (rp.VENDOR_SPECIFIC, b"\x00")]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes_decode_or_raise_own_error(data: bytes) -> None:
    try:
        pkt = rp.decode(data)
    except rp.RadiusDecodeError:
        return
    assert rp.decode(rp.encode(pkt)) == pkt


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255),
       st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=12), st.binary(max_size=8))
def test_fuzz_mutated_headers(code: int, ident: int, attrs: list[tuple[int, bytes]], junk: bytes) -> None:
    raw = rp.encode(rp.Packet(code, ident, bytes(16), attrs)) + junk
    assert rp.decode(raw).attrs == attrs
    for cut in range(0, len(raw), 7):
        try:
            rp.decode(raw[:cut])
        except rp.RadiusDecodeError:
            pass
    for hidden in (raw[20:36], raw[:16], b""):
        try:
            rp.unhide_password(hidden, SECRET, bytes(16))
        except rp.RadiusDecodeError:
            pass
        try:
            rp.salt_decrypt(hidden, SECRET, bytes(16))
        except rp.RadiusDecodeError:
            pass


@pytest.mark.parametrize("module", ["dsbc/radius/packet.py", "dsbc/radius/core.py", "dsbc/radius/idspace.py",
                                    "dsbc/diameter/codec.py", "dsbc/diameter/routing.py"])
def test_protocol_cores_do_no_io(module: str) -> None:
    """The codecs and dispatcher cores never touch a socket, a loop or a clock."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parent.parent / module).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"asyncio", "socket", "uvloop", "time", "selectors", "threading"}, names
