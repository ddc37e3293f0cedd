"""The dispatcher's own settings and the virtual-host table (pure).

``dsbc.api_service`` builds ``ProxySettings`` from the ``[api]`` section of dsbc.toml;
``api_proxy`` itself knows nothing of TOML or of the dsbc config classes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

from api_proxy import cpe
from api_proxy.classify import REALMS


class SettingsError(ValueError):
    """Settings that cannot be used (local misuse, raised at start)."""


class Vhost(msgspec.Struct, frozen=True, kw_only=True):
    """A public host (and optional port) and the two systems behind it."""

    host: str  # lowercase name or address, "*" for any
    port: int = 0  # 0: any port
    realm: str = "customer"
    source: str = ""  # base URL on the source system, e.g. https://100-customer.example.com:8444
    target: str = ""
    cpe_patterns: tuple[str, ...] = ()
    realm_paths: tuple[tuple[str, str], ...] = ()  # (path prefix, realm), longest first

    def base(self, system: str) -> str:
        return self.source if system == "source" else self.target

    def realm_for(self, path: str) -> str:
        for prefix, realm in self.realm_paths:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return realm
        return self.realm


class ProxySettings(msgspec.Struct, kw_only=True):
    listen: list[tuple[str, int]] = msgspec.field(default_factory=lambda: [("127.0.0.1", 8443)])
    vhosts: list[Vhost] = []
    tls_cert: str = ""
    tls_key: str = ""
    timeout: float = 30.0  # a back end's silence before backend_unavailable
    connect_timeout: float = 5.0
    body_timeout: float = 15.0  # a client's silence while sending its body
    route_body_limit: int = 1 << 20  # bytes of a body read for routing
    max_body_size: int = 100 << 20
    max_header_size: int = 16384
    session_ttl: int = 86400
    pool_size: int = 100  # keep-alive connections per system
    backend_verify: bool = True
    backend_ca: str = ""
    remote_cookie: str = "authorized-by-remote"


def split_host(text: str) -> tuple[str, int]:
    """``"www.x.com:8444"`` -> ``("www.x.com", 8444)``; ``"[::1]:80"``; no port -> 0."""
    text = text.strip().lower()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise SettingsError(f"bad port in host {text!r}")
    return host.rstrip("."), int(port) if port else 0


def make_vhost(
    host: str,
    realm: str,
    source: str,
    target: str,
    port: int = 0,
    cpe_patterns: Sequence[str] = (),
    realm_paths: dict[str, str] | None = None,
) -> Vhost:
    name, hport = split_host(host)
    if realm not in REALMS:
        raise SettingsError(f"vhost {host!r}: unknown realm {realm!r}")
    for r in (realm_paths or {}).values():
        if r not in REALMS:
            raise SettingsError(f"vhost {host!r}: unknown realm {r!r} in realm_paths")
    for url, what in ((source, "source"), (target, "target")):
        if not re.match(r"^https?://[^/\s]+", url):
            raise SettingsError(f"vhost {host!r}: no usable {what} base URL ({url!r})")
    cpe.compile_patterns(cpe_patterns)
    paths = sorted((realm_paths or {}).items(), key=lambda kv: -len(kv[0]))
    return Vhost(
        host=name,
        port=port or hport,
        realm=realm,
        source=source.rstrip("/"),
        target=target.rstrip("/"),
        cpe_patterns=tuple(cpe_patterns),
        realm_paths=tuple(paths),
    )


class VhostTable:
    """Selects the virtual host of a request by its Host header and local port."""

    def __init__(self, vhosts: Sequence[Vhost]) -> None:
        self._exact: dict[tuple[str, int], Vhost] = {}
        for v in vhosts:
            self._exact.setdefault((v.host, v.port), v)
        self._patterns = {
            id(v): cpe.compile_patterns(v.cpe_patterns) for v in vhosts
        }

    def patterns(self, vhost: Vhost) -> tuple[re.Pattern[str], ...]:
        return self._patterns.get(id(vhost), ())

    def select(self, host_header: str, local_port: int) -> Vhost | None:
        try:
            host, port = split_host(host_header) if host_header else ("", 0)
        except SettingsError:
            return None
        port = port or local_port
        get = self._exact.get
        return get((host, port)) or get((host, 0)) or get(("*", port)) or get(("*", 0))
