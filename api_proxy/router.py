"""What the API dispatcher is given by its host: the ``Router`` protocol and its settings.

``api_proxy`` never imports ``dsbc``.  ``dsbc.api_service`` implements this protocol on
the location store (SPEC sections 1 and 2); tests may implement it with a dict.  All
methods are synchronous and served from memory except the session and create writes,
which go to the backing store (one small transaction each).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import msgspec

from api_proxy.classify import REALMS, compile_patterns


class Owner(NamedTuple):
    """Who owns an identity now, after the ``store.unknown`` policy."""

    system: str  # "source", "target" or "reject"
    customer_id: str = ""
    state: str = "active"  # "active" or "locked"
    known: bool = True  # False when the policy answered (identity not in the store)


class SessionRecord(msgspec.Struct, kw_only=True):
    """An API / self-care session and the system it lives on.

    ``key`` is a digest made by ``api_proxy.sessions`` (never a raw token); ``extra`` is
    JSON text owned by the dispatcher (the admin's twin session, the sibling keys)."""

    key: str
    system: str
    expires_at: float
    customer_id: str = ""
    realm: str = ""
    extra: str = ""


class Router(Protocol):
    @property
    def lock_hold(self) -> float:
        """Seconds a locked customer's new request is held before customer_locked."""
        ...

    def owner(self, kind: str, value: str) -> Owner | None:
        """The owner of ``kind:value`` (kind: an identity kind, or ``customer`` for a
        customer id).  None when the value is not a valid identity of that kind (the
        caller then ignores that key)."""
        ...

    def default_system(self) -> str:
        """The system for a request that names nothing: ``store.unknown`` (or reject)."""
        ...

    def get_session(self, key: str) -> SessionRecord | None: ...

    def put_session(self, record: SessionRecord) -> None: ...

    def delete_session(self, key: str) -> None: ...

    def record_created(self, customer_id: str, system: str, identities: Sequence[str]) -> None:
        """Add ``kind:value`` identities to a customer (creating it on ``system`` if it is
        new) so that every dispatcher routes them at once."""
        ...


class DictRouter:
    """A Router over plain dicts: for tests, benchmarks and embedding without a store."""

    def __init__(self, unknown: str = "source", lock_hold: float = 2.0) -> None:
        self.unknown = unknown
        self._lock_hold = lock_hold
        self.customers: dict[str, tuple[str, str]] = {}  # id -> (system, state)
        self.identities: dict[str, str] = {}  # "kind:value" -> customer id
        self.sessions: dict[str, SessionRecord] = {}

    @property
    def lock_hold(self) -> float:
        return self._lock_hold

    def add(self, customer_id: str, system: str, identities: Sequence[str] = ()) -> None:
        self.customers[customer_id] = (
            system,
            self.customers.get(customer_id, (system, "active"))[1],
        )
        for ident in identities:
            self.identities[ident] = customer_id

    def owner(self, kind: str, value: str) -> Owner | None:
        cid = value if kind == "customer" else self.identities.get(f"{kind}:{value}")
        if cid is None or cid not in self.customers:
            return Owner(self.unknown, "", "active", False)
        system, state = self.customers[cid]
        return Owner(system, cid, state, True)

    def default_system(self) -> str:
        return self.unknown

    def get_session(self, key: str) -> SessionRecord | None:
        return self.sessions.get(key)

    def put_session(self, record: SessionRecord) -> None:
        self.sessions[record.key] = record

    def delete_session(self, key: str) -> None:
        self.sessions.pop(key, None)

    def record_created(self, customer_id: str, system: str, identities: Sequence[str]) -> None:
        if customer_id not in self.customers:
            self.customers[customer_id] = (system, "active")
        for ident in identities:
            self.identities[ident] = customer_id


# --- settings and virtual hosts ---------------------------------------------------------------
#
# ``dsbc.api_service`` builds ``ProxySettings`` from the ``[api]`` section of dsbc.toml;
# ``api_proxy`` itself knows nothing of TOML or of the dsbc config classes.


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
    #: listeners that never take TLS, even with tls_cert (plain HTTP beside HTTPS)
    plain_listen: list[tuple[str, int]] = []
    vhosts: list[Vhost] = []
    tls_cert: str = ""
    tls_key: str = ""
    timeout: float = 30.0  # a back end's silence before backend_unavailable
    connect_timeout: float = 5.0
    body_timeout: float = 15.0  # a client's silence while sending its body
    send_timeout: float = 60.0  # a client that takes none of its answer this long is dropped
    header_timeout: float = 10.0  # request line and headers, from their first octet (slowloris)
    max_connections: int = 10000  # client connections, in total and per source IP
    max_connections_per_ip: int = 200
    route_body_limit: int = 1 << 20  # bytes of a body read for routing
    max_body_size: int = 100 << 20
    max_header_size: int = 16384
    session_ttl: int = 86400
    pool_size: int = 100  # keep-alive connections per system
    backend_verify: bool = True
    backend_ca: str = ""
    remote_cookie: str = "authorized-by-remote"
    #: False: every connection goes the aiohttp way (a switch to compare the two paths)
    fast_path: bool = True


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
    if port and hport and port != hport:
        raise SettingsError(f"vhost {host!r}: port {port} is not the port written in host ({hport})")
    if realm not in REALMS:
        raise SettingsError(f"vhost {host!r}: unknown realm {realm!r}")
    for r in (realm_paths or {}).values():
        if r not in REALMS:
            raise SettingsError(f"vhost {host!r}: unknown realm {r!r} in realm_paths")
    for url, what in ((source, "source"), (target, "target")):
        if not re.match(r"^https?://[^/\s]+", url):
            raise SettingsError(f"vhost {host!r}: no usable {what} base URL ({url!r})")
    compile_patterns(cpe_patterns)
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
        self._patterns = {id(v): compile_patterns(v.cpe_patterns) for v in vhosts}

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
