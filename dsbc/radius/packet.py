"""RADIUS packets (RFC 2865 / 2866 / 2869 / 3579 / 5080): decode, encode, sign, hide.

I/O-free: bytes in, values out.  Attributes stay raw ``(type, value)`` pairs in wire
order so a proxy can edit a request without understanding every attribute it carries;
only the few a dispatcher must touch (User-Name, User-Password, Proxy-State,
Message-Authenticator, the salt-encrypted keys of Wi-Fi answers) are interpreted.

Every malformed input raises :class:`RadiusDecodeError`: for a RADIUS server or proxy
that always means "drop silently and count" (RFC 2865 section 3), so the error carries
a short ``reason`` for the counters and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Final

import msgspec

# --- codes and attribute types ---------------------------------------------------------

ACCESS_REQUEST: Final = 1
ACCESS_ACCEPT: Final = 2
ACCESS_REJECT: Final = 3
ACCOUNTING_REQUEST: Final = 4
ACCOUNTING_RESPONSE: Final = 5
ACCESS_CHALLENGE: Final = 11
STATUS_SERVER: Final = 12
STATUS_CLIENT: Final = 13

REQUEST_CODES: Final = frozenset({ACCESS_REQUEST, ACCOUNTING_REQUEST, STATUS_SERVER})
AUTH_ANSWERS: Final = frozenset({ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE})
ANSWER_CODES: Final = AUTH_ANSWERS | {ACCOUNTING_RESPONSE}

USER_NAME: Final = 1
USER_PASSWORD: Final = 2
CHAP_PASSWORD: Final = 3
NAS_IP_ADDRESS: Final = 4
REPLY_MESSAGE: Final = 18
STATE: Final = 24
VENDOR_SPECIFIC: Final = 26
PROXY_STATE: Final = 33
NAS_IDENTIFIER: Final = 32
ACCT_STATUS_TYPE: Final = 40
ACCT_SESSION_ID: Final = 44
CHAP_CHALLENGE: Final = 60
TUNNEL_PASSWORD: Final = 69
EAP_MESSAGE: Final = 79
MESSAGE_AUTHENTICATOR: Final = 80
NAS_IPV6_ADDRESS: Final = 95

ACCT_START: Final = 1
ACCT_STOP: Final = 2
ACCT_INTERIM: Final = 3
ACCT_ON: Final = 7
ACCT_OFF: Final = 8

VENDOR_MICROSOFT: Final = 311
MS_CHAP_MPPE_KEYS: Final = 12
MS_MPPE_SEND_KEY: Final = 16
MS_MPPE_RECV_KEY: Final = 17

HEADER_LEN: Final = 20
MAX_PACKET: Final = 4096
ZERO16: Final = bytes(16)

_HDR = struct.Struct("!BBH16s")


class RadiusError(Exception):
    """Base of every error this package raises about RADIUS data."""


class RadiusDecodeError(RadiusError):
    """Bytes that are not a valid RADIUS packet: drop them and count ``reason``."""

    action = "drop"

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Packet(msgspec.Struct):
    """One RADIUS packet; ``attrs`` are raw ``(type, value)`` pairs in wire order."""

    code: int
    identifier: int
    authenticator: bytes
    attrs: list[tuple[int, bytes]] = []

    def get(self, attr_type: int) -> bytes | None:
        for t, v in self.attrs:
            if t == attr_type:
                return v
        return None

    def get_all(self, attr_type: int) -> list[bytes]:
        return [v for t, v in self.attrs if t == attr_type]

    def remove(self, attr_type: int) -> None:
        self.attrs = [(t, v) for t, v in self.attrs if t != attr_type]

    def get_int(self, attr_type: int) -> int | None:
        v = self.get(attr_type)
        if v is None or len(v) != 4:
            return None
        return int.from_bytes(v, "big")

    def get_text(self, attr_type: int) -> str | None:
        v = self.get(attr_type)
        return None if v is None else v.decode("utf-8", "replace")


# --- decode / encode -------------------------------------------------------------------


def peek_header(data: bytes) -> tuple[int, int, int]:
    """``(code, identifier, length)`` after the checks every packet must pass."""
    if len(data) < HEADER_LEN:
        raise RadiusDecodeError("truncated", f"{len(data)} bytes")
    code, ident, length = data[0], data[1], (data[2] << 8) | data[3]
    if length < HEADER_LEN or length > MAX_PACKET:
        raise RadiusDecodeError("bad_length", f"length field {length}")
    if length > len(data):
        # RFC 2865 section 3: shorter than its Length field -> silently discard
        raise RadiusDecodeError("truncated", f"length field {length} > {len(data)} received")
    return code, ident, length


def decode(data: bytes) -> Packet:
    """Parse a packet; octets past the Length field are padding and ignored (RFC 2865)."""
    code, ident, length = peek_header(data)
    attrs: list[tuple[int, bytes]] = []
    pos = HEADER_LEN
    while pos < length:
        if pos + 2 > length:
            raise RadiusDecodeError("bad_attribute", f"attribute header cut at offset {pos}")
        t, alen = data[pos], data[pos + 1]
        if alen < 2 or pos + alen > length:
            raise RadiusDecodeError("bad_attribute", f"attribute {t} length {alen} at offset {pos}")
        attrs.append((t, bytes(data[pos + 2 : pos + alen])))
        pos += alen
    return Packet(code, ident, bytes(data[4:20]), attrs)


def encode_attrs(attrs: list[tuple[int, bytes]]) -> bytes:
    parts: list[bytes] = []
    for t, v in attrs:
        if len(v) > 253:
            raise ValueError(f"attribute {t} value of {len(v)} octets (max 253)")
        parts.append(bytes((t, len(v) + 2)))
        parts.append(v)
    return b"".join(parts)


def encode(pkt: Packet, authenticator: bytes | None = None) -> bytes:
    body = encode_attrs(pkt.attrs)
    length = HEADER_LEN + len(body)
    if length > MAX_PACKET:
        raise ValueError(f"packet of {length} octets (max {MAX_PACKET})")
    auth = pkt.authenticator if authenticator is None else authenticator
    return _HDR.pack(pkt.code, pkt.identifier, length, auth) + body


# --- vendor-specific -------------------------------------------------------------------


def split_vsa(value: bytes) -> tuple[int, list[tuple[int, bytes]]] | None:
    """A Vendor-Specific value in the RFC 2865 suggested format, or None if it is not one."""
    if len(value) < 4:
        return None
    vendor = int.from_bytes(value[:4], "big")
    subs: list[tuple[int, bytes]] = []
    pos = 4
    while pos < len(value):
        if pos + 2 > len(value):
            return None
        t, ln = value[pos], value[pos + 1]
        if ln < 2 or pos + ln > len(value):
            return None
        subs.append((t, value[pos + 2 : pos + ln]))
        pos += ln
    return vendor, subs


def join_vsa(vendor: int, subs: list[tuple[int, bytes]]) -> bytes:
    return vendor.to_bytes(4, "big") + b"".join(bytes((t, len(v) + 2)) + v for t, v in subs)


# --- authenticators --------------------------------------------------------------------


def random_authenticator() -> bytes:
    return os.urandom(16)


def _md5(*parts: bytes) -> bytes:
    h = hashlib.md5()
    for p in parts:
        h.update(p)
    return h.digest()


def accounting_request_authenticator(raw: bytes, secret: bytes) -> bytes:
    """RFC 2866 3: MD5(Code+Identifier+Length+16 zero octets+Attributes+Secret)."""
    return _md5(raw[:4], ZERO16, raw[20:], secret)


def response_authenticator(raw: bytes, request_authenticator: bytes, secret: bytes) -> bytes:
    """RFC 2865 3: MD5(Code+ID+Length+RequestAuth+Attributes+Secret)."""
    return _md5(raw[:4], request_authenticator, raw[20:], secret)


def verify_accounting_request(raw: bytes, secret: bytes) -> bool:
    _, _, length = peek_header(raw)
    raw = raw[:length]
    return hmac.compare_digest(raw[4:20], accounting_request_authenticator(raw, secret))


def verify_response(raw: bytes, request_authenticator: bytes, secret: bytes) -> bool:
    _, _, length = peek_header(raw)
    raw = raw[:length]
    return hmac.compare_digest(raw[4:20], response_authenticator(raw, request_authenticator, secret))


def _message_authenticator_offset(raw: bytes) -> int:
    """Offset of the Message-Authenticator value in ``raw``, -1 if there is none, -2 if it
    is not 16 octets long (RFC 3579 3.2: such a packet is invalid)."""
    length = (raw[2] << 8) | raw[3]
    pos = HEADER_LEN
    while pos + 2 <= length:
        t, alen = raw[pos], raw[pos + 1]
        if alen < 2:
            return -1
        if t == MESSAGE_AUTHENTICATOR:
            return pos + 2 if alen == 18 else -2
        pos += alen
    return -1


def compute_message_authenticator(raw: bytes, secret: bytes, authenticator: bytes | None = None) -> bytes:
    """HMAC-MD5 over the packet with the Message-Authenticator zeroed (RFC 3579 3.2).

    ``authenticator`` replaces the header's (answers are signed over the Request
    Authenticator of their request)."""
    off = _message_authenticator_offset(raw)
    if off < 0:
        raise ValueError("no Message-Authenticator in packet")
    buf = bytearray(raw)
    buf[off : off + 16] = ZERO16
    if authenticator is not None:
        buf[4:20] = authenticator
    return hmac.new(secret, bytes(buf), hashlib.md5).digest()


def verify_message_authenticator(raw: bytes, secret: bytes, authenticator: bytes | None = None) -> bool | None:
    """True / False, or None when the packet carries no Message-Authenticator."""
    _, _, length = peek_header(raw)
    raw = raw[:length]
    off = _message_authenticator_offset(raw)
    if off == -1:
        return None
    if off < 0:
        return False  # a Message-Authenticator of the wrong length
    expected = compute_message_authenticator(raw, secret, authenticator)
    return hmac.compare_digest(raw[off : off + 16], expected)


def _fill_message_authenticator(raw: bytes, secret: bytes, authenticator: bytes | None) -> bytes:
    off = _message_authenticator_offset(raw)
    if off < 0:
        return raw
    mac = compute_message_authenticator(raw, secret, authenticator)
    return raw[:off] + mac + raw[off + 16 :]


def sign_request(pkt: Packet, secret: bytes) -> bytes:
    """Wire bytes of a request signed for ``secret``.

    Access-Request / Status-Server keep ``pkt.authenticator`` (random; it hides
    User-Password) and get their Message-Authenticator filled in; Accounting-Request
    gets the RFC 2866 Request Authenticator (computed after the Message-Authenticator,
    which is computed over a zero authenticator)."""
    if pkt.code == ACCOUNTING_REQUEST:
        raw = encode(pkt, ZERO16)
        raw = _fill_message_authenticator(raw, secret, ZERO16)
        return raw[:4] + accounting_request_authenticator(raw, secret) + raw[20:]
    raw = encode(pkt)
    return _fill_message_authenticator(raw, secret, None)


def sign_response(pkt: Packet, request_authenticator: bytes, secret: bytes) -> bytes:
    """Wire bytes of an answer: Message-Authenticator, then Response Authenticator."""
    raw = encode(pkt, request_authenticator)
    raw = _fill_message_authenticator(raw, secret, request_authenticator)
    return raw[:4] + response_authenticator(raw, request_authenticator, secret) + raw[20:]


# --- hidden attributes -----------------------------------------------------------------


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _password_blocks(data: bytes, secret: bytes, authenticator: bytes, decrypt: bool) -> bytes:
    """RFC 2865 5.2 cipher over 16-octet blocks (each block keyed by the previous ciphertext)."""
    out: list[bytes] = []
    last = authenticator
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        res = _xor(chunk, _md5(secret, last))
        out.append(res)
        last = chunk if decrypt else res
    return b"".join(out)


def hide_password(password: bytes, secret: bytes, authenticator: bytes) -> bytes:
    """RFC 2865 5.2 User-Password hiding."""
    if len(password) > 128:
        raise ValueError("User-Password longer than 128 octets")
    padded = password + bytes(-len(password) % 16 or (16 if not password else 0))
    return _password_blocks(padded, secret, authenticator, decrypt=False)


def unhide_password(hidden: bytes, secret: bytes, authenticator: bytes) -> bytes:
    if not hidden or len(hidden) % 16 or len(hidden) > 128:
        raise RadiusDecodeError("bad_password", f"User-Password of {len(hidden)} octets")
    return _password_blocks(hidden, secret, authenticator, decrypt=True).rstrip(b"\x00")


def rehide(hidden: bytes, old_secret: bytes, old_auth: bytes, new_secret: bytes, new_auth: bytes) -> bytes:
    """A value hidden as User-Password is (MS-CHAP-MPPE-Keys, RFC 2548 2.4.1) for the other
    side of the proxy: every block, padding included, so binary keys keep their last octets."""
    if not hidden or len(hidden) % 16:
        raise RadiusDecodeError("bad_hidden_attribute", f"{len(hidden)} octets")
    plain = _password_blocks(hidden, old_secret, old_auth, decrypt=True)
    return _password_blocks(plain, new_secret, new_auth, decrypt=False)


def salt_encrypt(plain: bytes, secret: bytes, request_authenticator: bytes, salt: bytes | None = None) -> bytes:
    """RFC 2868 3.5 / RFC 2548 2.4.2: salt + encrypted (length byte + data + pad)."""
    if salt is None:
        salt = bytes((0x80 | (os.urandom(1)[0] & 0x7F), os.urandom(1)[0]))
    data = bytes((len(plain),)) + plain
    data += bytes(-len(data) % 16)
    out: list[bytes] = []
    last = request_authenticator + salt
    for i in range(0, len(data), 16):
        c = _xor(data[i : i + 16], _md5(secret, last))
        out.append(c)
        last = c
    return salt + b"".join(out)


def salt_decrypt(value: bytes, secret: bytes, request_authenticator: bytes) -> bytes:
    if len(value) < 18 or (len(value) - 2) % 16:
        raise RadiusDecodeError("bad_salted_attribute", f"{len(value)} octets")
    salt, enc = value[:2], value[2:]
    out: list[bytes] = []
    last = request_authenticator + salt
    for i in range(0, len(enc), 16):
        chunk = enc[i : i + 16]
        out.append(_xor(chunk, _md5(secret, last)))
        last = chunk
    plain = b"".join(out)
    n = plain[0]
    if n > len(plain) - 1:
        raise RadiusDecodeError("bad_salted_attribute", "length byte past the data")
    return plain[1 : 1 + n]


# Vendor-Specific sub-attributes hidden with the secret and the Request Authenticator
# (FreeRADIUS dictionaries: encrypt=2 is salted as Tunnel-Password, encrypt=1 as User-Password)
SALTED_VSAS: Final = {
    VENDOR_MICROSOFT: frozenset({MS_MPPE_SEND_KEY, MS_MPPE_RECV_KEY}),  # RFC 2548: Wi-Fi keys after EAP
    14823: frozenset({44}),  # Aruba-MPSK-Passphrase
    4874: frozenset({58, 59, 60, 61}),  # Juniper ERX-LI-Action, -Med-Dev-Handle, -Med-Ip-Address, -Med-Port-Number
}
HIDDEN_VSAS: Final = {VENDOR_MICROSOFT: frozenset({MS_CHAP_MPPE_KEYS})}  # RFC 2548 2.4.1: MS-CHAPv1 MPPE keys


def reencrypt_answer_attrs(
    pkt: Packet, old_secret: bytes, old_auth: bytes, new_secret: bytes, new_auth: bytes
) -> None:
    """Re-encrypt the request-authenticator-keyed attributes of an answer in place.

    Tunnel-Password (RFC 2868, with its tag octet) and the vendor attributes of
    ``SALTED_VSAS`` / ``HIDDEN_VSAS`` (MS-MPPE-Send/Recv-Key, MS-CHAP-MPPE-Keys, ...) are
    encrypted with the secret and the Request Authenticator, both of which differ on each
    side of a proxy."""
    out: list[tuple[int, bytes]] = []
    for t, v in pkt.attrs:
        if t == TUNNEL_PASSWORD and len(v) >= 19:
            plain = salt_decrypt(v[1:], old_secret, old_auth)
            v = v[:1] + salt_encrypt(plain, new_secret, new_auth, v[1:3])
        elif t == VENDOR_SPECIFIC:
            vsa = split_vsa(v)
            if vsa is None:
                out.append((t, v))
                continue
            vendor, subs = vsa
            salted = SALTED_VSAS.get(vendor, frozenset())
            hidden = HIDDEN_VSAS.get(vendor, frozenset())
            if any(st in salted or st in hidden for st, _ in subs):
                edited = []
                for st, sv in subs:
                    if st in salted:
                        plain = salt_decrypt(sv, old_secret, old_auth)
                        sv = salt_encrypt(plain, new_secret, new_auth, sv[:2])
                    elif st in hidden:
                        sv = rehide(sv, old_secret, old_auth, new_secret, new_auth)
                    edited.append((st, sv))
                v = join_vsa(vendor, edited)
        out.append((t, v))
    pkt.attrs = out
