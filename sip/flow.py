"""Flows and flow tokens (in the manner of RFC 5626 section 5.2), free of I/O.

A flow is where a device's packets came from: transport, IP, port, and for stream
transports the connection (worker id and connection id).  dsbc puts a flow token in the
Path of every REGISTER and in the Record-Route of dialogs with a device, so requests a
system sends back to the device find the NAT binding or TCP connection it came from.

The token is HMAC-SHA256 signed with the shared ``sip.flow_secret``; a forged or altered
token fails ``decode_flow`` with ``FlowTokenError`` (answered 403).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import struct
from collections.abc import Sequence
from typing import Final

from .errors import FlowTokenError
from .uri import remember
from .value import Value

__all__ = ["Flow", "FlowSigner", "FlowTokenError"]

_TRANSPORT_CODES: Final = {"udp": 0, "tcp": 1, "tls": 2, "ws": 3, "wss": 4}
_CODE_TRANSPORTS: Final = {v: k for k, v in _TRANSPORT_CODES.items()}
_MAC_LEN: Final = 10


class Flow(Value):
    """The far end of a message as the transport saw it (a ``Value``)."""

    __slots__ = ("conn_id", "ip", "is_stream", "port", "transport", "worker")

    def __init__(self, transport: str, ip: str, port: int, conn_id: int = 0, worker: int = 0) -> None:
        self.transport = transport  # "udp", "tcp", "tls"
        self.ip = ip
        self.port = port
        self.conn_id = conn_id  # stream transports: the connection inside its worker (0 for UDP)
        self.worker = worker  # the worker process that owns the connection
        self.is_stream = transport != "udp"

    def _fields(self) -> tuple[str, str, int, int, int]:
        return (self.transport, self.ip, self.port, self.conn_id, self.worker)


class FlowSigner:
    """Signs and verifies flow tokens with one secret (shared by every worker and node)."""

    __slots__ = ("_key", "_old", "_tags")

    #: perf: tags computed lately (a call's INVITE tags its system, its ACK, BYE and
    #: re-INVITEs check the same text); bounded, holds only what this signer computed
    TAG_CACHE_SIZE: Final = 8192
    #: ... of texts no longer than this: a system and a Call-ID (a Route forged with a
    #: Call-ID tens of KB long, checked and refused, is not worth keeping)
    TAG_TEXT_MAX: Final = 256

    def __init__(self, secret: bytes, previous: Sequence[bytes] = ()) -> None:
        """``previous``: secrets of a rotation (``sip.flow_secret_previous``): what they
        signed still verifies; nothing new is signed with them."""
        if len(secret) < 16:
            raise ValueError("flow secret must be at least 16 octets")
        self._key = secret
        self._old = tuple(FlowSigner(p) for p in previous if p != secret)
        self._tags: dict[str, str] = {}

    def verifiers(self) -> tuple[FlowSigner, ...]:
        """This signer, then one per previous secret (each verifies what its secret signed)."""
        return (self, *self._old)

    def tag_ok(self, text: str, given: str) -> bool:
        """``given`` is `tag` of ``text`` under this secret or a previous one: in constant
        time, and False for non-ASCII text (octets from the wire, decoded as Latin-1)."""
        if not given.isascii():
            return False
        if hmac.compare_digest(given, self.tag(text)):
            return True
        return any(hmac.compare_digest(given, s.tag(text)) for s in self._old)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.digest(self._key, payload, "sha256")[:_MAC_LEN]

    def tag(self, text: str) -> str:
        """A short MAC of ``text`` (the system named in dsbc's Record-Route and Path)."""
        tags = self._tags
        tag = tags.get(text)
        if tag is None:
            mac = hmac.digest(self._key, b"tag|" + text.encode("utf-8", "surrogateescape"), "sha256")
            tag = base64.urlsafe_b64encode(mac[:6]).rstrip(b"=").decode("ascii")
            remember(tags, text, tag, self.TAG_TEXT_MAX, self.TAG_CACHE_SIZE)
        return tag

    def subkey(self, label: str) -> bytes:
        """A key of its own for another use of the secret (``label`` names the use)."""
        return hmac.digest(self._key, b"key|" + label.encode("utf-8"), "sha256")

    def encode(self, flow: Flow) -> str:
        ip = ipaddress.ip_address(flow.ip).packed
        payload = struct.pack("!BBHI", _TRANSPORT_CODES.get(flow.transport, 0), flow.worker & 0xFF, flow.port, flow.conn_id & 0xFFFFFFFF) + ip
        token = payload + self._mac(payload)
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode("ascii")

    def decode(self, token: str) -> Flow:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise FlowTokenError("bad flow token") from None
        if len(raw) not in (8 + 4 + _MAC_LEN, 8 + 16 + _MAC_LEN):
            raise FlowTokenError("bad flow token")
        payload, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(payload)) and not any(
                hmac.compare_digest(mac, s._mac(payload)) for s in self._old):
            raise FlowTokenError("forged flow token")
        code, worker, port, conn_id = struct.unpack("!BBHI", payload[:8])
        ip = str(ipaddress.ip_address(payload[8:]))
        transport = _CODE_TRANSPORTS.get(code)
        if transport is None:
            raise FlowTokenError("bad flow token")
        return Flow(transport, ip, port, conn_id, worker)
