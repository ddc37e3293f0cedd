"""Diameter messages (RFC 6733) and the credit-control AVPs dsbc routes on (RFC 4006). I/O-free.

A :class:`Message` is a header plus a list of :class:`Avp` (code, flags, vendor, raw
data); grouped AVPs are decoded on demand with :meth:`Avp.group`.  :class:`Framer`
cuts a TCP byte stream into messages.

Errors carry their answer: :class:`DiameterDecodeError` has the ``result_code`` to put
in the answer (5014 DIAMETER_INVALID_AVP_LENGTH, 3008 DIAMETER_INVALID_HDR_BITS, ...)
and, once the header could be read, the ``header`` to answer to; ``fatal`` errors
(bad version, bad message length) mean the stream cannot be trusted any more and the
connection is closed (RFC 6733 3, 7.1.5).

Perf note: a relayed request is decoded to AVPs and encoded again (hop-by-hop id,
Route-Record, Destination-* rewrite); for the few dozen AVPs of a CCR this costs a
few microseconds, far below a TCP round trip, so the codec favours being obviously
correct over editing bytes in place.
"""

from __future__ import annotations

import struct
from typing import Final

import msgspec

# --- numbers ---------------------------------------------------------------------------

FLAG_R: Final = 0x80
FLAG_P: Final = 0x40
FLAG_E: Final = 0x20
FLAG_T: Final = 0x10
AVP_V: Final = 0x80
AVP_M: Final = 0x40
AVP_P: Final = 0x20

CMD_CE: Final = 257
CMD_RA: Final = 258
CMD_CC: Final = 272
CMD_AS: Final = 274
CMD_ST: Final = 275
CMD_DW: Final = 280
CMD_DP: Final = 282
BASE_COMMANDS: Final = frozenset({CMD_CE, CMD_DW, CMD_DP})

APP_COMMON: Final = 0
APP_CREDIT_CONTROL: Final = 4
APP_RELAY: Final = 0xFFFFFFFF

USER_NAME: Final = 1
HOST_IP_ADDRESS: Final = 257
AUTH_APPLICATION_ID: Final = 258
ACCT_APPLICATION_ID: Final = 259
VENDOR_SPECIFIC_APPLICATION_ID: Final = 260
SESSION_ID: Final = 263
ORIGIN_HOST: Final = 264
SUPPORTED_VENDOR_ID: Final = 265
VENDOR_ID: Final = 266
FIRMWARE_REVISION: Final = 267
RESULT_CODE: Final = 268
PRODUCT_NAME: Final = 269
DISCONNECT_CAUSE: Final = 273
ORIGIN_STATE_ID: Final = 278
FAILED_AVP: Final = 279
ERROR_MESSAGE: Final = 281
ROUTE_RECORD: Final = 282
DESTINATION_REALM: Final = 283
DESTINATION_HOST: Final = 293
INBAND_SECURITY_ID: Final = 299
ORIGIN_REALM: Final = 296
EXPERIMENTAL_RESULT: Final = 297
CC_REQUEST_NUMBER: Final = 415
CC_REQUEST_TYPE: Final = 416
GRANTED_SERVICE_UNIT: Final = 431
CC_TOTAL_OCTETS: Final = 421
SUBSCRIPTION_ID: Final = 443
SUBSCRIPTION_ID_DATA: Final = 444
VALIDITY_TIME: Final = 448
SUBSCRIPTION_ID_TYPE: Final = 450
SERVICE_CONTEXT_ID: Final = 461

CC_INITIAL: Final = 1
CC_UPDATE: Final = 2
CC_TERMINATE: Final = 3
CC_EVENT: Final = 4

SUB_E164: Final = 0
SUB_IMSI: Final = 1
SUB_SIP_URI: Final = 2
SUB_NAI: Final = 3
SUB_PRIVATE: Final = 4

SUCCESS: Final = 2001
UNABLE_TO_DELIVER: Final = 3002
REALM_NOT_SERVED: Final = 3003
TOO_BUSY: Final = 3004
LOOP_DETECTED: Final = 3005
APPLICATION_UNSUPPORTED: Final = 3007
INVALID_HDR_BITS: Final = 3008
INVALID_AVP_BITS: Final = 3009
UNKNOWN_PEER: Final = 3010
UNKNOWN_SESSION_ID: Final = 5002
MISSING_AVP: Final = 5005
NO_COMMON_APPLICATION: Final = 5010
UNSUPPORTED_VERSION: Final = 5011
UNABLE_TO_COMPLY: Final = 5012
INVALID_AVP_LENGTH: Final = 5014
INVALID_MESSAGE_LENGTH: Final = 5015
NO_COMMON_SECURITY: Final = 5017
USER_UNKNOWN: Final = 5030  # RFC 4006 DIAMETER_USER_UNKNOWN

NO_INBAND_SECURITY: Final = 0  # Inband-Security-Id values (RFC 6733 6.10)
INBAND_TLS: Final = 1

DISCONNECT_REBOOTING: Final = 0
DISCONNECT_BUSY: Final = 1
DISCONNECT_DO_NOT_WANT_TO_TALK_TO_YOU: Final = 2

HEADER_LEN: Final = 20
MAX_MESSAGE: Final = 1 << 20  # 1 MiB: far above any real CCR, bounds a hostile peer
VENDOR_ID_DSBC: Final = 0

_HDR = struct.Struct("!I I I I I")


class DiameterError(Exception):
    """Base of every error this package raises about Diameter data."""


class Header(msgspec.Struct):
    flags: int
    code: int
    app_id: int
    hop_by_hop: int
    end_to_end: int

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FLAG_R)


class DiameterDecodeError(DiameterError):
    """Bytes that are not a valid Diameter message; ``result_code`` is the answer to give."""

    def __init__(self, result_code: int, detail: str, header: Header | None = None, fatal: bool = False,
                 failed: Avp | None = None) -> None:
        self.result_code = result_code
        self.header = header
        self.fatal = fatal
        #: the offending AVP, for the answer's Failed-AVP (RFC 6733 7.5)
        self.failed = failed
        super().__init__(f"{result_code}: {detail}")


class Avp(msgspec.Struct):
    code: int
    data: bytes
    flags: int = AVP_M
    vendor: int = 0

    def u32(self) -> int:
        if len(self.data) != 4:
            raise DiameterDecodeError(INVALID_AVP_LENGTH, f"AVP {self.code}: {len(self.data)} octets, want 4",
                                      failed=self)
        return int.from_bytes(self.data, "big")

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def group(self) -> list[Avp]:
        return decode_avps(self.data)


class Message(msgspec.Struct):
    flags: int
    code: int
    app_id: int
    hop_by_hop: int
    end_to_end: int
    avps: list[Avp] = []

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FLAG_R)

    def find(self, code: int, vendor: int = 0) -> Avp | None:
        for a in self.avps:
            if a.code == code and a.vendor == vendor:
                return a
        return None

    def find_all(self, code: int, vendor: int = 0) -> list[Avp]:
        return [a for a in self.avps if a.code == code and a.vendor == vendor]

    def text(self, code: int) -> str | None:
        a = self.find(code)
        return None if a is None else a.text()

    def u32(self, code: int) -> int | None:
        a = self.find(code)
        return None if a is None else a.u32()

    def replace(self, code: int, avp: Avp | None) -> None:
        """Drop every AVP ``code``; put ``avp`` where the first one was (or at the end)."""
        out: list[Avp] = []
        placed = avp is None
        for a in self.avps:
            if a.code == code and a.vendor == 0:
                if not placed:
                    out.append(avp)  # type: ignore[arg-type]
                    placed = True
                continue
            out.append(a)
        if not placed:
            out.append(avp)  # type: ignore[arg-type]
        self.avps = out

    def header(self) -> Header:
        return Header(self.flags, self.code, self.app_id, self.hop_by_hop, self.end_to_end)


# --- decode ------------------------------------------------------------------------------


def decode_header(data: bytes | bytearray | memoryview) -> tuple[Header, int]:
    """The header and the message length; raises a fatal error for a stream that is off."""
    if len(data) < HEADER_LEN:
        raise DiameterDecodeError(INVALID_MESSAGE_LENGTH, f"{len(data)} octets", fatal=True)
    w0, w1, app, hbh, e2e = _HDR.unpack_from(data, 0)
    version, length = w0 >> 24, w0 & 0xFFFFFF
    flags, code = w1 >> 24, w1 & 0xFFFFFF
    header = Header(flags, code, app, hbh, e2e)
    if version != 1:
        raise DiameterDecodeError(UNSUPPORTED_VERSION, f"version {version}", header, fatal=True)
    if length < HEADER_LEN or length % 4 or length > MAX_MESSAGE:
        raise DiameterDecodeError(INVALID_MESSAGE_LENGTH, f"message length {length}", header, fatal=True)
    return header, length


def decode_avps(data: bytes | memoryview, header: Header | None = None) -> list[Avp]:
    avps: list[Avp] = []
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            # RFC 6733 7.5: a header cut short is reported padded with zeros
            cut = bytes(data[pos:end]).ljust(8, b"\0")
            raise DiameterDecodeError(INVALID_AVP_LENGTH, f"AVP header cut at offset {pos}", header,
                                      failed=Avp(int.from_bytes(cut[:4], "big"), b"", cut[4] & ~AVP_V))
        code = int.from_bytes(data[pos : pos + 4], "big")
        flags = data[pos + 4]
        length = int.from_bytes(data[pos + 5 : pos + 8], "big")
        hlen = 12 if flags & AVP_V else 8
        if length < hlen or pos + length > end:
            # the offending AVP's header with an empty payload (enough for RFC 6733 7.5)
            vendor = int.from_bytes(data[pos + 8 : pos + 12], "big") if flags & AVP_V and pos + 12 <= end else 0
            raise DiameterDecodeError(INVALID_AVP_LENGTH, f"AVP {code} length {length} at offset {pos}", header,
                                      failed=Avp(code, b"", flags & ~AVP_V, vendor))
        vendor = int.from_bytes(data[pos + 8 : pos + 12], "big") if flags & AVP_V else 0
        avps.append(Avp(code, bytes(data[pos + hlen : pos + length]), flags, vendor))
        pos += (length + 3) & ~3
    return avps


def decode(data: bytes | bytearray | memoryview) -> Message:
    """One whole message (as cut by :class:`Framer`)."""
    header, length = decode_header(data)
    if length != len(data):
        raise DiameterDecodeError(INVALID_MESSAGE_LENGTH, f"length field {length}, {len(data)} octets", header, True)
    flags = header.flags
    if flags & 0x0F or (flags & FLAG_R and flags & FLAG_E):
        # RFC 6733 3: reserved bits must be 0; a request cannot be an error
        raise DiameterDecodeError(INVALID_HDR_BITS, f"flags {flags:#04x}", header)
    avps = decode_avps(memoryview(data)[HEADER_LEN:length], header)
    return Message(flags, header.code, header.app_id, header.hop_by_hop, header.end_to_end, avps)


# --- encode ------------------------------------------------------------------------------


def encode_avp(a: Avp) -> bytes:
    flags = a.flags | (AVP_V if a.vendor else 0)
    hlen = 12 if flags & AVP_V else 8
    length = hlen + len(a.data)
    if length > 0xFFFFFF:
        raise ValueError(f"AVP {a.code} too long")
    head = struct.pack("!II", a.code, (flags << 24) | length)
    if flags & AVP_V:
        head += struct.pack("!I", a.vendor)
    return head + a.data + bytes(-len(a.data) % 4)


def encode_avps(avps: list[Avp]) -> bytes:
    return b"".join(encode_avp(a) for a in avps)


def encode(m: Message) -> bytes:
    body = encode_avps(m.avps)
    length = HEADER_LEN + len(body)
    return _HDR.pack((1 << 24) | length, (m.flags << 24) | m.code, m.app_id, m.hop_by_hop, m.end_to_end) + body


def set_hop_by_hop(raw: bytes, hbh: int) -> bytes:
    return raw[:12] + hbh.to_bytes(4, "big") + raw[16:]


# --- AVP builders --------------------------------------------------------------------------


def u32(code: int, value: int, flags: int = AVP_M, vendor: int = 0) -> Avp:
    return Avp(code, value.to_bytes(4, "big"), flags, vendor)


def u64(code: int, value: int, flags: int = AVP_M) -> Avp:
    return Avp(code, value.to_bytes(8, "big"), flags)


def utf8(code: int, value: str, flags: int = AVP_M, vendor: int = 0) -> Avp:
    return Avp(code, value.encode(), flags, vendor)


def grouped(code: int, avps: list[Avp], flags: int = AVP_M) -> Avp:
    return Avp(code, encode_avps(avps), flags)


def address(code: int, ip: str) -> Avp:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    family = 1 if addr.version == 4 else 2
    return Avp(code, family.to_bytes(2, "big") + addr.packed)


def decode_address(data: bytes) -> str | None:
    import ipaddress

    if len(data) == 6 and data[:2] == b"\x00\x01":
        return str(ipaddress.IPv4Address(data[2:]))
    if len(data) == 18 and data[:2] == b"\x00\x02":
        return str(ipaddress.IPv6Address(data[2:]))
    return None


# --- answers and base messages ---------------------------------------------------------------


def answer(req: Message | Header, result_code: int, origin_host: str, origin_realm: str,
           avps: list[Avp] | None = None, error_message: str = "") -> Message:
    """The answer to ``req``: same code, application and ids; E bit for protocol errors (3xxx)."""
    flags = req.flags & FLAG_P
    if 3000 <= result_code < 4000:
        flags |= FLAG_E
    out: list[Avp] = []
    if isinstance(req, Message):
        sid = req.find(SESSION_ID)
        if sid is not None:
            out.append(sid)
    out += [u32(RESULT_CODE, result_code), utf8(ORIGIN_HOST, origin_host), utf8(ORIGIN_REALM, origin_realm)]
    if error_message:
        out.append(utf8(ERROR_MESSAGE, error_message, flags=0))
    out += avps or []
    if isinstance(req, Message):
        # RFC 6733 6.2: Proxy-Info AVPs are copied to the answer in the same order
        out += req.find_all(284)
    return Message(flags, req.code, req.app_id, req.hop_by_hop, req.end_to_end, out)


def error_answer(req: Message | Header, exc: DiameterDecodeError, origin_host: str, origin_realm: str) -> Message:
    """The answer to a request that could not be read: the error's result code and text,
    and the offending AVP in a Failed-AVP when there is one (RFC 6733 7.5)."""
    failed = [grouped(FAILED_AVP, [exc.failed])] if exc.failed is not None else None
    return answer(req, exc.result_code, origin_host, origin_realm, failed, error_message=str(exc))


def capabilities(origin_host: str, origin_realm: str, host_ips: list[str], apps: list[int],
                 product: str = "dsbc", state_id: int = 0) -> list[Avp]:
    avps = [utf8(ORIGIN_HOST, origin_host), utf8(ORIGIN_REALM, origin_realm)]
    avps += [address(HOST_IP_ADDRESS, ip) for ip in host_ips]
    avps += [u32(VENDOR_ID, VENDOR_ID_DSBC), utf8(PRODUCT_NAME, product, flags=0)]
    if state_id:
        avps.append(u32(ORIGIN_STATE_ID, state_id))
    avps += [u32(AUTH_APPLICATION_ID, a) for a in apps]
    return avps


def request(code: int, app_id: int, hbh: int, e2e: int, avps: list[Avp], proxiable: bool = False) -> Message:
    return Message(FLAG_R | (FLAG_P if proxiable else 0), code, app_id, hbh, e2e, avps)


def advertised_apps(m: Message) -> set[int]:
    """Auth/Acct-Application-Ids of a CER/CEA, including those inside Vendor-Specific-Application-Id."""
    apps: set[int] = set()
    for a in m.avps:
        if a.code in (AUTH_APPLICATION_ID, ACCT_APPLICATION_ID) and a.vendor == 0:
            apps.add(a.u32())
        elif a.code == VENDOR_SPECIFIC_APPLICATION_ID and a.vendor == 0:
            for g in a.group():
                if g.code in (AUTH_APPLICATION_ID, ACCT_APPLICATION_ID):
                    apps.add(g.u32())
    return apps


def subscription_ids(m: Message) -> list[tuple[int, str]]:
    """``(Subscription-Id-Type, Subscription-Id-Data)`` pairs of a CCR, in order."""
    out: list[tuple[int, str]] = []
    for a in m.find_all(SUBSCRIPTION_ID):
        kind: int | None = None
        data: str | None = None
        for g in a.group():
            if g.code == SUBSCRIPTION_ID_TYPE:
                kind = g.u32()
            elif g.code == SUBSCRIPTION_ID_DATA:
                data = g.text()
        if kind is not None and data is not None:
            out.append((kind, data))
    return out


def subscription_id(kind: int, data: str) -> Avp:
    return grouped(SUBSCRIPTION_ID, [u32(SUBSCRIPTION_ID_TYPE, kind), utf8(SUBSCRIPTION_ID_DATA, data)])


# --- framing --------------------------------------------------------------------------------


class Framer:
    """Cut a TCP byte stream into whole messages.

    ``feed()`` appends; ``next_message()`` returns the next whole message or None.  The
    buffer is compacted only when a message is taken, so a message that trickles in
    byte by byte costs one header peek per read, not a re-scan."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_LEN:
            return None
        _, length = decode_header(memoryview(buf)[pos : pos + HEADER_LEN])
        if len(buf) - pos < length:
            return None
        msg = bytes(buf[pos : pos + length])
        pos += length
        if pos > 65536 or pos == len(buf):
            del buf[:pos]
            pos = 0
        self._pos = pos
        return msg

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def head(self, n: int) -> bytes:
        """The first ``n`` octets not taken yet (to tell what a stream that is off carries)."""
        return bytes(self._buf[self._pos : self._pos + n])
