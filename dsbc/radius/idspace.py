"""RADIUS identifier spaces and client tables: the bookkeeping a proxy needs, I/O-free.

A RADIUS identifier is one octet, and a server tells requests apart by (source IP,
source port, identifier).  One upstream socket can therefore carry at most 256
requests in flight; a dispatcher that relays for many NAS must spread its requests
over several sockets ("slots").  :class:`IdSpace` hands out ``(slot, identifier)``
pairs, opening a new slot only when every identifier of the existing ones is in use,
and reuses identifiers oldest-freed first so that a late answer to a timed-out request
is unlikely to meet a new request with the same identifier (RFC 5080 2.2.1).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Sequence

from dsbc.config import parse_peer

IDS_PER_SLOT = 256


class IdExhausted(Exception):
    """Every identifier of every allowed slot is in flight."""


REUSE_HOLD = 1.0  # seconds an identifier rests after its answer before it is reused


class IdSpace:
    """``(slot, identifier)`` allocation for one system's upstream requests.

    A released identifier rests ``REUSE_HOLD`` seconds before it is handed out again: a home
    server (FreeRADIUS) that still remembers the answered request would otherwise take the
    new one for a conflicting retransmission and drop it.  While every resting identifier
    is younger than that, a new slot (socket) is opened; only when ``max_slots`` are open is
    a resting identifier reused early rather than refusing the request.
    """

    __slots__ = ("_free", "in_use", "max_slots")

    def __init__(self, max_slots: int = 64) -> None:
        self._free: list[deque[tuple[int, float]]] = []  # (identifier, ready at) oldest first
        self.max_slots = max_slots
        self.in_use = 0

    @property
    def slots(self) -> int:
        return len(self._free)

    def allocate(self, now: float = float("inf")) -> tuple[int, int]:
        for slot, free in enumerate(self._free):
            if free and free[0][1] <= now:
                self.in_use += 1
                return slot, free.popleft()[0]
        if len(self._free) < self.max_slots:
            self._free.append(deque((i, 0.0) for i in range(IDS_PER_SLOT)))
            self.in_use += 1
            return len(self._free) - 1, self._free[-1].popleft()[0]
        for slot, free in enumerate(self._free):  # every slot open: reuse the longest rested
            if free:
                self.in_use += 1
                return slot, free.popleft()[0]
        raise IdExhausted(f"{self.in_use} requests in flight on {len(self._free)} sockets")

    def release(self, slot: int, ident: int, now: float = 0.0) -> None:
        self._free[slot].append((ident, now + REUSE_HOLD))
        self.in_use -= 1


class ClientEntry:
    __slots__ = ("name", "net", "port", "require_ma", "secret")

    def __init__(self, address: str, secret: str, require_ma: bool = False) -> None:
        self.name = address
        self.net, self.port = parse_peer(address)
        self.secret = secret.encode()
        self.require_ma = require_ma  # Access-Requests without a Message-Authenticator are dropped


class ClientTable:
    """Which NAS may talk to us, and with which secret; most specific entry wins."""

    __slots__ = ("_cache", "_entries")

    def __init__(self, clients: Sequence[tuple[str, str] | tuple[str, str, bool]]) -> None:
        self._entries = [ClientEntry(*c) for c in clients]
        # longest prefix first, then entries bound to a port before the port-less ones
        self._entries.sort(key=lambda e: (-e.net.prefixlen, e.port is None))
        self._cache: dict[tuple[str, int], ClientEntry | None] = {}

    def find(self, host: str, port: int) -> ClientEntry | None:
        key = (host, port)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found: ClientEntry | None = None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 NAS reaching a "[::]" listener
        if ip is not None:
            for e in self._entries:
                if ip.version == e.net.version and ip in e.net and (e.port is None or e.port == port):
                    found = e
                    break
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[key] = found
        return found
