"""Trusted peers: the sources (carriers, the systems' nodes) whose requests are routed
by their Request-URI and never rate-limited.  I/O free; built from configuration by
``dsbc.sip_service.trusted_peers``.
"""

from __future__ import annotations

import ipaddress
from typing import Final

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: answers remembered per (ip, port); cleared when full
CACHE_SIZE: Final = 100_000


class PeerSet:
    """IP:PORT pairs, single IPs and networks; ``contains`` is cached per (ip, port)."""

    def __init__(self) -> None:
        self.networks: list[Network] = []
        self.addrs: set[str] = set()
        self.pairs: set[tuple[str, int]] = set()
        self._cache: dict[tuple[str, int], bool] = {}

    def add_pair(self, ip: str, port: int) -> None:
        self.pairs.add((ip, port))
        self._cache.clear()

    def add_addr(self, ip: str) -> None:
        self.addrs.add(ip)
        self._cache.clear()

    def add_network(self, net: Network) -> None:
        self.networks.append(net)
        self._cache.clear()

    def contains(self, ip: str, port: int) -> bool:
        key = (ip, port)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ok = key in self.pairs or ip in self.addrs
        if not ok and self.networks:
            try:
                a = ipaddress.ip_address(ip)
            except ValueError:
                a = None
            ok = a is not None and any(a in n for n in self.networks)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = ok
        return ok
