"""The dsbc configuration: one TOML file, decoded by msgspec and validated at start.

Every error names the file, the line and the key (``dsbc.toml:12: sip.workers: ...``),
so an operator can fix it without reading a traceback.  ``deploy/dsbc.example.toml``
documents every key; keep the two in step.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import msgspec

from .toml_lines import key_lines, locate, scan

SYSTEMS = ("source", "target")
SystemName = Literal["source", "target"]


class ConfigError(Exception):
    """A configuration file that cannot be used; ``str()`` is the one-line reason.

    ``exit_code``: `dsbc run`'s exit status, 2 (bad input) unless an operational failure
    (a store that cannot be reached) set 1."""

    exit_code = 2


# --- value helpers ---------------------------------------------------------------------


_HOST = re.compile(r"^(\*|[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.%A-Za-z]*)$")


_DOTTED_NUMBERS = re.compile(r"^[0-9.]+$")


def is_ip(host: str) -> bool:
    """An IPv4 or IPv6 address (not a host name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def format_hostport(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_ip(host: str) -> str:
    """An IP address as the kernel writes a peer's (``0:0::1`` and ``FD00::02`` are ``::1``
    and ``fd00::2``; an IPv4-mapped ``::ffff:10.0.0.1`` is ``10.0.0.1``, as dsbc sees such
    a peer), so that a node or listener written another way matches the addresses packets
    come from; anything else as it is."""
    addr, pct, scope = host.partition("%")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        addr = socket.inet_ntop(socket.AF_INET6, ip.packed)  # as recvfrom() and getpeername() write it
        return addr + pct + scope
    return str(ip)


def _ambiguous_port(host: str) -> str:
    """The reading of an unbracketed IPv6 address whose last group could be a port
    (``::1:5060``: the address ``::1:5060``, or ``::1`` port 5060), as a hint; '' if none."""
    addr, _, last = host.rpartition(":")
    if not (last.isdigit() and addr):
        return ""
    try:
        ipaddress.IPv6Address(addr)
    except ValueError:
        return ""
    return f"[{addr}]:{last} for address {addr} port {last}, or [{host}] for the address {host}"


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``"1.2.3.4:5060"``, ``"[::1]:5060"`` or ``"host"`` (with a default port).  An IP
    address comes back in its canonical form (``canonical_ip``)."""
    text = text.strip()
    if "://" in text:
        raise ValueError(f"bad address {text!r}: HOST:PORT, not a URL")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"bad address {text!r}")
        if rest and not (rest.startswith(":") and rest[1:]):  # "[::1]5060", "[::1]:", "[::1]x"
            raise ValueError(f"bad address {text!r}: after [{host}] only :PORT may follow")
        port_s = rest[1:]
        if host and not _is_ipv6(host):  # brackets hold an IPv6 address (RFC 3986), nothing else
            raise ValueError(f"bad address {text!r}: {host!r} in brackets is not an IPv6 address")
    elif text.count(":") == 1:
        host, port_s = text.split(":")
        if not port_s:  # "10.0.0.1:" was taken for the default port (nginx: invalid port)
            raise ValueError(f"bad address {text!r}: no port after ':'")
    else:
        host, port_s = text, ""
        if ":" in host:  # two colons or more, unbracketed: only a bare IPv6 address
            if not _is_ipv6(host):
                raise ValueError(f"bad address {text!r} (an IPv6 address with a port is written [addr]:port)")
            hint = _ambiguous_port(host)
            if hint:
                raise ValueError(f"ambiguous address {text!r}: write {hint}")
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    if not _HOST.match(host) or (_DOTTED_NUMBERS.match(host) and not is_ip(host)):
        raise ValueError(f"bad address {text!r}: {host!r} is not a host name or an IP address")
    host = canonical_ip(host)
    if not port_s:
        if default_port is None:
            raise ValueError(f"bad address {text!r}: no port")
        return host, default_port
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_s)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


TRANSPORTS = ("udp", "tcp", "tls")


class Endpoint(msgspec.Struct, frozen=True):
    """A transport address such as ``udp:127.0.0.1:5060``."""

    transport: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_transport: str = "udp") -> Endpoint:
        """Without a port: 5060, or 5061 for tls (RFC 3261 19.1.2)."""
        transport = default_transport
        head, sep, rest = text.partition(":")
        if sep and head.lower() in TRANSPORTS:
            transport, text = head.lower(), rest
        elif sep and head.isalpha() and ":" in rest and not rest.startswith(":"):
            raise ValueError(f"unknown transport {head!r} in {text!r} (udp, tcp or tls)")
        host, port = parse_hostport(text, 5061 if transport == "tls" else 5060)
        return cls(transport, host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


def _check_endpoints(values: list[str], where: str) -> None:
    for i, v in enumerate(values):
        try:
            Endpoint.parse(v)
        except ValueError as exc:
            raise ValueError(f"{where}[{i}]: {exc}") from None


def parse_api_listen(text: str) -> tuple[str, int, bool | None]:
    """An ``api.listen`` entry: ``"IP:PORT"`` (TLS when ``api.tls_cert`` is set),
    ``"http:IP:PORT"`` (never TLS: phones fetching their files over plain HTTP beside
    HTTPS self-care, as nginx's ``listen 80; listen 443 ssl;``) or ``"https:IP:PORT"``
    (TLS, needs the certificate).  ``(host, port, tls)``, ``tls`` None for a bare entry."""
    text = text.strip()
    scheme, sep, rest = text.partition(":")
    if sep and scheme.lower() in ("http", "https") and not rest.startswith("//"):
        tls = scheme.lower() == "https"
        host, port = parse_hostport(rest, 443 if tls else 80)
        return host, port, tls
    host, port = parse_hostport(text, 443)
    return host, port, None


def _check_hostport(value: str, where: str, default_port: int) -> None:
    try:
        parse_hostport(value, default_port)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _check_caps(total: int, per_ip: int) -> None:
    """The connection caps, each error naming its own key (and so its own line)."""
    if total < 1:
        raise ValueError("max_connections: must be >= 1")
    if per_ip < 1:
        raise ValueError("max_connections_per_ip: must be >= 1")


def _check_specified(host: str, where: str) -> None:
    """An address written in Via / Record-Route / Path: a wildcard there sends the phones'
    and the systems' next requests nowhere."""
    if is_ip(host) and ipaddress.ip_address(host).is_unspecified:
        raise ValueError(f"{where}: {host!r} is a wildcard, not an address peers can reach "
                         "(give the VIP, or this node's public address)")


def _check_url(value: str, where: str) -> None:
    if value and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"{where}: {value!r} is not an http:// or https:// URL")
    authority = re.split(r"[/?#]", value.partition("://")[2], maxsplit=1)[0]
    if "@" in authority:
        # dropped by the HTTP client: the clients' own Authorization goes through instead
        raise ValueError(f"{where}: a user name or password in the URL is not used (no 'user:pass@')")
    if value:
        # what the HTTP client would refuse at each request, with a traceback in the worker
        # ("http://::1:8080", "http://[::1", a port out of range): refused here
        try:
            # an empty port is the scheme's (RFC 3986 3.2.3: "http://host:/" is "http://host/")
            bare = authority[:-1] if authority.endswith(":") and authority.count(":") == 1 else authority
            parse_hostport(bare, 443 if value.lower().startswith("https") else 80)
        except ValueError as exc:
            raise ValueError(f"{where}: {value!r} is not a usable URL: {exc}") from None


# --- sections ------------------------------------------------------------------------


class StoreConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = "sqlite:///var/lib/dsbc/location.db"
    unknown: Literal["source", "target", "reject"] = "source"
    lock_hold: float = 2.0
    lock_lease: float = 30.0
    poll_interval: float = 0.05
    cache_file: str = ""

    def __post_init__(self) -> None:
        if not re.match(r"^(sqlite|redis|rediss|redis\+sentinel)://", self.url):
            from .store.redis_conn import masked_url  # a mistyped scheme keeps its password

            raise ValueError(
                f"url: unsupported store url {masked_url(self.url)!r} (sqlite:///path, redis://host:port/db "
                "or redis+sentinel://host:port/service)"
            )
        if self.url.lower().startswith(("redis:", "rediss:", "redis+sentinel:")):
            from .store.base import StoreError
            from .store.redis_conn import parse_redis_url

            try:
                parse_redis_url(self.url)
            except StoreError as exc:
                raise ValueError(f"url: {exc}") from None
        if self.url.startswith("sqlite:") and ("?" in self.url or "#" in self.url):
            raise ValueError(f"url: {self.url!r}: a sqlite URL takes a path only (no ?options)")
        if self.url.startswith("sqlite:") and not self.url[len("sqlite:"):].strip("/"):
            raise ValueError(f"url: {self.url!r} names no file (sqlite:///path/location.db)")
        if self.lock_hold < 0:
            raise ValueError("lock_hold: must be >= 0")
        if self.poll_interval <= 0:
            raise ValueError("poll_interval: must be > 0")
        if not 1 <= self.lock_lease <= 3600:
            raise ValueError("lock_lease: must be between 1 and 3600 seconds")


class SystemConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str = ""
    sip: list[str] = []
    api: str = ""
    radius: list[str] = []
    radius_acct: list[str] = []
    radius_secret: str = ""
    diameter: str = ""
    diameter_host: str = ""
    diameter_realm: str = ""

    def __post_init__(self) -> None:
        _check_endpoints(self.sip, "sip")
        _check_url(self.api, "api")
        for i, r in enumerate(self.radius):
            _check_hostport(r, f"radius[{i}]", 1812)
        for i, r in enumerate(self.radius_acct):
            _check_hostport(r, f"radius_acct[{i}]", 1813)
        if self.diameter:
            _check_hostport(self.diameter, "diameter", 3868)


class SystemsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    source: SystemConfig = msgspec.field(default_factory=SystemConfig)
    target: SystemConfig = msgspec.field(default_factory=SystemConfig)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_peer(text: str) -> tuple[Network, int | None]:
    """A peer entry: a CIDR, an IP, or IP:PORT -> (network, port or None); ValueError if none.
    An IPv6 address or network may be written in brackets ("[::1]", "[2001:db8::]/32")."""
    if text.startswith("[") and "]" in text:
        inner, _, rest = text[1:].partition("]")
        if not rest or rest.startswith("/"):
            text = inner + rest
    if "/" in text:
        return ipaddress.ip_network(text, strict=False), None
    try:
        return ipaddress.ip_network(text), None
    except ValueError:
        pass
    host, port = parse_hostport(text)
    return ipaddress.ip_network(host.strip("[]")), port


def _check_peer(text: str) -> None:
    parse_peer(text)


class SipConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    listen: list[str] = msgspec.field(default_factory=lambda: ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"])
    advertise: str = ""
    advertise_ipv6: str = ""  # given to IPv6 peers when advertise is an IPv4 address
    aliases: list[str] = []
    trusted_peers: list[str] = []
    workers: int = 1
    flow_secret: str = ""
    flow_secret_previous: list[str] = []  # still verify tokens, never sign (a rotation)
    migration_expires: int = 60
    options_interval: float = 5.0
    options_timeout: float = 2.0
    retry_after: int = 30
    max_message_size: int = 65535
    tcp_idle_timeout: float = 600.0
    tcp_stall_timeout: float = 10.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_verify_client: bool | list[str] = False
    rate_limit: int = 0
    rate_window: float = 2.0
    rate_limit_drop: bool = False
    max_connections: int = 20000
    max_connections_per_ip: int = 200
    drop_scanners: bool = False
    scanner_user_agents: list[str] = msgspec.field(
        default_factory=lambda: ["friendly-scanner", "sipvicious", "sipcli", "sip-scan", "VaxSIPUserAgent", "iWar", "sundayddr"]
    )

    def __post_init__(self) -> None:
        if self.enabled and not self.listen:  # a node that served nothing and said "ready: sip"
            raise ValueError("listen: empty while SIP is enabled (udp:IP:PORT, tcp:... or tls:... "
                             "entries; or enabled = false)")
        _check_endpoints(self.listen, "listen")
        for i, p in enumerate(self.trusted_peers):
            try:
                _check_peer(p)
            except ValueError:
                raise ValueError(f"trusted_peers[{i}]: {p!r} is not a CIDR, an IP or IP:PORT") from None
        if not 1 <= self.workers <= 256:
            raise ValueError("workers: must be between 1 and 256")
        if self.migration_expires < 1:
            raise ValueError("migration_expires: must be >= 1")
        if self.flow_secret and len(self.flow_secret.encode()) < 16:  # what sip.flow.FlowSigner needs
            raise ValueError('flow_secret: must be at least 16 octets ("" = made once and kept in the store)')
        for i, old in enumerate(self.flow_secret_previous):
            if len(old.encode()) < 16:
                raise ValueError(f"flow_secret_previous[{i}]: must be at least 16 octets")
        if any(e.startswith("tls:") for e in self.listen) and not (self.tls_cert and self.tls_key):
            raise ValueError("tls_cert: a tls: listener needs tls_cert and tls_key")
        if isinstance(self.tls_verify_client, list):
            tls_listen = {str(Endpoint.parse(e)) for e in self.listen if e.startswith("tls:")}
            for i, e in enumerate(self.tls_verify_client):
                try:
                    ok = str(Endpoint.parse(e)) in tls_listen
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"tls_verify_client[{i}]: {e!r} is not one of the tls: listen entries")
        if self.tls_verify_client and not self.tls_ca:
            raise ValueError("tls_verify_client: verifying clients needs tls_ca (the CA that signs them)")
        if self.rate_limit < 0:
            raise ValueError("rate_limit: must be >= 0 (0 = off)")
        if self.rate_window <= 0:
            raise ValueError("rate_window: must be > 0")
        _check_caps(self.max_connections, self.max_connections_per_ip)
        if self.max_message_size < 1024:
            raise ValueError("max_message_size: must be >= 1024")
        if self.options_interval <= 0:
            raise ValueError("options_interval: must be > 0")
        if self.options_timeout <= 0:
            raise ValueError("options_timeout: must be > 0")
        if self.retry_after < 0:
            raise ValueError("retry_after: must be >= 0")
        if self.advertise:
            _check_hostport(self.advertise, "advertise", 5060)
            _check_specified(parse_hostport(self.advertise, 5060)[0], "advertise")
        if self.advertise_ipv6.strip("[]"):
            try:
                ipaddress.IPv6Address(self.advertise_ipv6.strip("[]"))
            except ValueError:
                raise ValueError(f"advertise_ipv6: {self.advertise_ipv6!r} is not an IPv6 address") from None
            self.advertise_ipv6 = self.advertise_ipv6.strip("[]")
            _check_specified(self.advertise_ipv6, "advertise_ipv6")
        if self.drop_scanners and not any(ua.strip() for ua in self.scanner_user_agents):
            raise ValueError("scanner_user_agents: empty while drop_scanners = true (nothing would be dropped)")
        for i, alias in enumerate(self.aliases):
            _check_hostport(alias, f"aliases[{i}]", 5060)
        if self.tcp_idle_timeout <= 0:
            raise ValueError("tcp_idle_timeout: must be > 0 (seconds a TCP or TLS connection may stay silent)")
        if self.tcp_stall_timeout <= 0:
            raise ValueError("tcp_stall_timeout: must be > 0 (seconds a half-received message may take)")


def _check_cpe_patterns(patterns: list[str]) -> None:
    for i, pattern in enumerate(patterns):
        try:
            if re.compile(pattern).groups < 1:
                raise ValueError(f"cpe_patterns[{i}]: {pattern!r} needs a group around the MAC")
        except re.error as exc:
            raise ValueError(f"cpe_patterns[{i}]: {pattern!r}: {exc}") from None


class VhostConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str
    realm: str = "customer"
    source: str = ""
    target: str = ""
    cpe_patterns: list[str] = []
    port: int = 0  # 0: any port (or the one written in host, "name:port")
    realm_paths: dict[str, str] = {}  # path prefix -> realm, e.g. {"/customer" = "customer"}

    def __post_init__(self) -> None:
        if self.host.strip() != "*":
            # the router matches whole names only: anything else never matched a request
            if not self.host.strip():
                raise ValueError('host: must not be empty (a host name or IP, or "*" for any host)')
            if "://" in self.host or "/" in self.host:
                raise ValueError(f"host: {self.host!r}: the name the clients send in Host, not a URL "
                                 '(e.g. "www.example.com" or "www.example.com:8443")')
            try:
                parse_hostport(self.host, 0)
            except ValueError as exc:
                raise ValueError(f"host: {exc} (a host name or IP with an optional :port, or \"*\" "
                                 "alone for any host: no *.domain wildcards)") from None
        _check_url(self.source, "source")
        _check_url(self.target, "target")
        if not 0 <= self.port < 65536:
            raise ValueError("port: must be between 0 and 65535")
        for prefix in self.realm_paths:
            if not prefix.startswith("/"):
                raise ValueError(f"realm_paths: {prefix!r} must start with /")
        _check_cpe_patterns(self.cpe_patterns)


class ApiConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    listen: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0:8443"])
    tls_cert: str = ""
    tls_key: str = ""
    source: str = ""
    target: str = ""
    vhosts: list[VhostConfig] = []
    timeout: float = 30.0
    max_header_size: int = 16384
    max_body_size: int = 104857600
    session_ttl: int = 86400
    cpe_patterns: list[str] = []
    route_body_limit: int = 1048576  # bytes of a request body read to route it
    body_timeout: float = 15.0  # a client's silence while sending a body
    send_timeout: float = 60.0  # a client that takes none of its answer (nginx's send_timeout)
    header_timeout: float = 10.0  # request line + headers, from their first octet
    max_connections: int = 10000
    max_connections_per_ip: int = 200
    connect_timeout: float = 5.0
    pool_size: int = 100  # keep-alive connections per system
    backend_verify: bool = True  # verify the systems' TLS certificates
    backend_ca: str = ""  # CA file for the systems' certificates
    fast_path: bool = True  # plain forwards on the lean HTTP/1.1 path (api_proxy/fastpath.py)

    def __post_init__(self) -> None:
        for i, entry in enumerate(self.listen):
            try:
                tls = parse_api_listen(entry)[2]
            except ValueError as exc:
                raise ValueError(f"listen[{i}]: {exc}") from None
            if tls and not (self.tls_cert and self.tls_key):
                raise ValueError(f"listen[{i}]: {entry!r} needs tls_cert and tls_key")
        if (self.tls_cert or self.tls_key) and not (self.tls_cert and self.tls_key):
            raise ValueError("tls_cert: TLS needs both tls_cert and tls_key")
        _check_cpe_patterns(self.cpe_patterns)  # checked even while no cpe vhost uses them
        if self.route_body_limit < 1024:
            raise ValueError("route_body_limit: must be >= 1024")
        if self.pool_size < 1:
            raise ValueError("pool_size: must be >= 1")
        for key in ("timeout", "body_timeout", "send_timeout", "connect_timeout"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0 (seconds)")
        if self.header_timeout <= 0:
            raise ValueError("header_timeout: must be > 0")
        _check_caps(self.max_connections, self.max_connections_per_ip)
        if self.session_ttl < 1:
            raise ValueError("session_ttl: must be >= 1 (seconds)")
        if self.max_header_size < 1024:
            raise ValueError("max_header_size: must be >= 1024")
        if self.max_body_size < 0:
            raise ValueError("max_body_size: must be >= 0")
        _check_url(self.source, "source")
        _check_url(self.target, "target")


class RadiusClient(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    address: str
    secret: str
    require_message_authenticator: bool = False

    def __post_init__(self) -> None:
        try:
            _check_peer(self.address)
        except ValueError:
            raise ValueError(f"address: {self.address!r} is not a CIDR, an IP or IP:PORT") from None
        if not self.secret:
            raise ValueError("secret: must not be empty (RFC 2865: the client's shared secret)")


class RadiusConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    auth_listen: str = "0.0.0.0:1812"
    acct_listen: str = ""  # "": auth_listen's address, its port + 1
    clients: list[RadiusClient] = []
    timeout: float = 3.0
    retries: int = 2
    duplicate_window: float = 30.0

    def __post_init__(self) -> None:
        _check_hostport(self.auth_listen, "auth_listen", 1812)
        if not self.acct_listen.strip():
            host, port = parse_hostport(self.auth_listen, 1812)
            if port == 65535:
                raise ValueError("auth_listen: port 65535 leaves no port + 1 for accounting "
                                 "(set acct_listen)")
            self.acct_listen = format_hostport(host, port + 1)
        _check_hostport(self.acct_listen, "acct_listen", 1813)
        if parse_hostport(self.auth_listen, 1812) == parse_hostport(self.acct_listen, 1813):
            raise ValueError(f"acct_listen: {self.acct_listen!r} is auth_listen's address and port too "
                             "(accounting needs a port of its own, 1813 by default)")
        if self.timeout <= 0:
            raise ValueError("timeout: must be > 0 (seconds)")
        if self.retries < 0:
            raise ValueError("retries: must be >= 0")
        if self.duplicate_window < 0:
            raise ValueError("duplicate_window: must be >= 0 (seconds)")


class DiameterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    listen: str = "0.0.0.0:3868"
    origin_host: str = "dsbc.localdomain"
    origin_realm: str = "localdomain"
    watchdog_interval: float = 30.0
    reconnect_max: float = 30.0
    reconnect_min: float = 0.5
    cer_timeout: float = 10.0
    request_timeout: float = 10.0
    # the clients (PGW, GGSN, ...) that may connect: IPs or CIDRs; [] = any host that
    # reaches `listen` (a CER from another address is answered 3010 DIAMETER_UNKNOWN_PEER)
    clients: list[str] = []

    def __post_init__(self) -> None:
        _check_hostport(self.listen, "listen", 3868)
        for key in ("origin_host", "origin_realm"):
            if not getattr(self, key).strip():
                raise ValueError(f"{key}: must not be empty (it names dsbc in every CER and answer)")
        for i, p in enumerate(self.clients):
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                raise ValueError(f"clients[{i}]: {p!r} is not an IP or a CIDR") from None
        for key in ("watchdog_interval", "reconnect_max", "reconnect_min", "cer_timeout", "request_timeout"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min: must be <= reconnect_max")


class ControlConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    listen: str = "127.0.0.1:8080"
    token: str = ""

    def __post_init__(self) -> None:
        _check_hostport(self.listen, "listen", 8080)
        if self.token != self.token.strip():  # a client sends it without: every call a 401
            raise ValueError("token: must not begin or end with a space or a newline")


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json: bool = False


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    systems: SystemsConfig = msgspec.field(default_factory=SystemsConfig)
    sip: SipConfig = msgspec.field(default_factory=SipConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    radius: RadiusConfig = msgspec.field(default_factory=RadiusConfig)
    diameter: DiameterConfig = msgspec.field(default_factory=DiameterConfig)
    control: ControlConfig = msgspec.field(default_factory=ControlConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    path: str = ""

    def system(self, name: str) -> SystemConfig:
        return self.systems.source if name == "source" else self.systems.target


# --- loading ---------------------------------------------------------------------------

_PATH_PART = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]")


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for m in _PATH_PART.finditer(path):
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
    return parts


def config_error(cfg: Config, parts: list[str | int], reason: str) -> ConfigError:
    """A ConfigError for a loaded ``cfg`` (``file:line: key: reason``): for what only shows
    once the values are used (a host name that does not resolve)."""
    name = cfg.path or "dsbc.toml"
    try:
        line = f":{locate(Path(cfg.path).read_text(encoding='utf-8-sig'), parts)}" if cfg.path else ""
    except (OSError, UnicodeDecodeError):
        line = ""
    return ConfigError(f"{name}{line}: {key_text(parts)}: {reason}")


def key_text(parts: list[str | int]) -> str:
    """``["api", "vhosts", 0, "realm"]`` -> ``api.vhosts[0].realm``."""
    return ".".join((f"[{p}]" if isinstance(p, int) else p) for p in parts).replace(".[", "[")


_TYPE_WORDS = {"object": "a table", "array": "a list", "str": "a string", "int": "an integer",
               "float": "a number", "bool": "true or false", "null": "nothing"}


def _choices(parts: list[str | int]) -> list[str]:
    """The allowed values of a Literal-typed key (for "Invalid enum value" errors)."""
    tp: Any = Config
    for p in parts:
        if isinstance(p, int):
            args = typing.get_args(tp)
            tp = args[0] if args else None
            continue
        try:
            tp = typing.get_type_hints(tp).get(p)
        except TypeError:
            return []
    return [str(a) for a in typing.get_args(tp)] if typing.get_origin(tp) is Literal else []


def _list_of_tables(parts: list[str | int]) -> bool:
    """Whether a key of the schema is an array of tables (``api.vhosts``, ``radius.clients``)."""
    tp: Any = Config
    for p in parts:
        if isinstance(p, int):
            return False
        try:
            tp = typing.get_type_hints(tp).get(p)
        except TypeError:
            return False
    args = typing.get_args(tp)
    return typing.get_origin(tp) is list and bool(args) and isinstance(args[0], type) and issubclass(
        args[0], msgspec.Struct)


def _reason(reason: str, parts: list[str | int]) -> str:
    """msgspec's wording, in the operator's terms."""
    m = re.match(r"Expected `([^`]+)`, got `([^`]+)`$", reason)
    if m:
        want = " or ".join(_TYPE_WORDS.get(w, w) for w in m.group(1).split(" | "))
        return f"expected {want}, got {_TYPE_WORDS.get(m.group(2), m.group(2))}"
    m = re.match(r"Invalid enum value (.*)$", reason)
    if m:
        choices = _choices(parts)
        if choices:
            return f"{m.group(1)} is not one of {', '.join(choices)}"
        return f"invalid value {m.group(1)}"
    return reason


def load_config(path: str | Path) -> Config:
    """Read and validate ``path``; raise ConfigError naming ``file:line: key: reason``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text") from None
    cfg = parse_config(text, str(p))
    _anchor_store_paths(cfg, p.parent)
    return cfg


def _anchor_store_paths(cfg: Config, base: Path) -> None:
    """A relative SQLite file or cache file in the config is relative to the config file's
    directory (as nginx's paths are to its prefix): the node and every CLI command given
    the same ``-c`` open the same file, whatever directory each was started in."""
    from .store.base import StoreError
    from .store.sqlite_schema import sqlite_path

    url = cfg.store.url
    if url.startswith("sqlite:"):
        try:
            path = sqlite_path(url)
        except StoreError:
            return  # parse_config's checks name it
        if path != ":memory:" and not Path(path).is_absolute():
            full = str((base / path).resolve())
            # three slashes and the path's own: "sqlite:///x.db" (no directory) would be
            # relative again, so a file in / keeps four
            cfg.store.url = f"sqlite://{full}" if full.count("/") > 1 else f"sqlite:///{full}"
    if cfg.store.cache_file and not Path(cfg.store.cache_file).is_absolute():
        cfg.store.cache_file = str((base / cfg.store.cache_file).resolve())


def _syntax_error(text: str, name: str, error: str) -> str:
    """tomllib's error as ``file:line: key: TOML syntax error: reason``, naming the key or
    table written on that line (a key or table defined twice: where it was first)."""
    m = re.search(r"line (\d+)", error)
    lines = text.split("\n")  # as tomllib counts them (a U+2028 in a string ends no line)
    line = int(m.group(1)) if m else max(1, len(text.rstrip("\n").split("\n")))  # "at end of document"
    reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", error)
    key = scan("\n".join(lines[:line]))[1].get(line)  # the valid part, and the line itself
    if key is None:
        return f"{name}:{line}: TOML syntax error: {reason}"
    if reason == "Cannot overwrite a value" or re.match(r"Cannot declare .* twice$", reason):
        earlier = scan("\n".join(lines[: line - 1]))[0]
        at = next((earlier[key[:i]] for i in range(len(key), 0, -1) if key[:i] in earlier), 0)
        reason = f"defined twice (first at line {at})" if at else "defined twice"
    return f"{name}:{line}: {key_text(list(key))}: TOML syntax error: {reason}"


def parse_config(text: str, name: str = "dsbc.toml") -> Config:
    import tomllib

    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_error(text, name, str(exc))) from None
    try:
        cfg = msgspec.toml.decode(text.encode(), type=Config)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        reason, _, where = msg.partition(" - at `")
        where = where.rstrip("`")
        parts = _split_path(where.removeprefix("$"))
        m = re.search(r"unknown field `([^`]+)`", reason)
        if m:
            parts = parts + [m.group(1)]
            reason = f"unknown key {m.group(1)!r}"
        m = re.match(r"^([a-z_][a-z0-9_]*)(?:\[(\d+)\])?: (.*)$", reason)
        if m:  # a check of ours: "key: why", "key[i]: why" for an entry of a list
            parts = parts + [m.group(1)] + ([int(m.group(2))] if m.group(2) else [])
            reason = m.group(3)
        m = re.search(r"missing required field `([^`]+)`", reason)
        if m:
            reason = f"missing required key {m.group(1)!r}"
        reason = _reason(reason, parts)
        key = key_text(parts)
        if reason == "expected a list, got a table" and _list_of_tables(parts):
            reason += f" (one [[{key}]] header per entry, two brackets)"
        elif reason == "expected a table, got a list" and re.search(
                rf"^\s*\[\[\s*{re.escape(key)}\s*\]\]", text, re.MULTILINE):
            reason += f" (write [{key}], one bracket)"
        line = locate(text, parts)
        raise ConfigError(f"{name}:{line}: {key_text(parts) or '(top)'}: {reason}") from None
    cfg.path = name
    bad = _non_finite(cfg, [])
    if bad is not None:
        raise ConfigError(f"{name}:{locate(text, bad)}: {key_text(bad)}: must be a finite number (not nan or inf)")
    _cross_check(cfg, text, name)
    return cfg


def _non_finite(value: object, parts: list[str | int]) -> list[str | int] | None:
    """The key of the first nan / inf in the config (TOML allows them; every "> 0" check
    passes a nan, and a timer of nan or inf seconds never fires or raises in the loop)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else parts
    items: Iterable[tuple[str | int, object]]
    if isinstance(value, msgspec.Struct):
        items = ((f, getattr(value, f)) for f in value.__struct_fields__)
    elif isinstance(value, list):
        items = enumerate(value)
    elif isinstance(value, dict):
        items = ((str(k), v) for k, v in value.items())
    else:
        return None
    for key, item in items:
        found = _non_finite(item, [*parts, key])
        if found is not None:
            return found
    return None


def api_backends(cfg: Config) -> tuple[str, str]:
    """The API's default (source, target) base URLs: ``api.source`` / ``api.target``, else
    ``systems.<name>.api``; a vhost without back ends of its own takes these."""
    return (cfg.api.source or cfg.systems.source.api, cfg.api.target or cfg.systems.target.api)


def api_wanted(cfg: Config) -> bool:
    """Whether the API dispatcher runs: enabled, and vhosts or both default back ends."""
    return cfg.api.enabled and bool(cfg.api.vhosts or all(api_backends(cfg)))


def _check_node_transports(cfg: Config, text: str, name: str) -> None:
    """A tcp: or tls: node needs a listener of its transport: dsbc's Via, Record-Route and
    Path toward it name that transport, and the node sends its own requests (a call to a
    registered phone, a BYE) there on a connection of its own."""
    listening = {Endpoint.parse(e).transport for e in cfg.sip.listen}
    for which in ("source", "target"):
        for i, text_node in enumerate(getattr(cfg.systems, which).sip):
            transport = Endpoint.parse(text_node).transport
            if transport not in listening:
                line = locate(text, ["systems", which, "sip", i])
                raise ConfigError(
                    f"{name}:{line}: systems.{which}.sip[{i}]: node {text_node!r} needs a {transport}: listener "
                    f"in sip.listen (the node sends its requests to dsbc over {transport})"
                )


def _cross_check(cfg: Config, text: str, name: str) -> None:
    realms = {"admin", "reseller", "distributor", "customer", "account", "cc_staff",
              "vendor", "representative", "cpe", "porting"}
    for i, vh in enumerate(cfg.api.vhosts):
        for key, realm in [("realm", vh.realm)] + [("realm_paths", r) for r in vh.realm_paths.values()]:
            if realm not in realms:
                line = locate(text, ["api", "vhosts", i, key])
                raise ConfigError(
                    f"{name}:{line}: api.vhosts[{i}].{key}: unknown realm {realm!r} "
                    f"(one of {', '.join(sorted(realms))})"
                )
    if api_wanted(cfg) and not cfg.api.listen:
        line = locate(text, ["api", "listen"])
        raise ConfigError(f"{name}:{line}: api.listen: empty while the API dispatcher runs "
                          "(IP:PORT entries; or [api] enabled = false)")
    if cfg.api.enabled:
        defaults = dict(zip(("source", "target"), api_backends(cfg)))
        if not cfg.api.vhosts and bool(defaults["source"]) != bool(defaults["target"]):
            # one back end only: the catch-all vhost needs both, every request would be a 500
            have, need = ("source", "target") if defaults["source"] else ("target", "source")
            given: list[str | int] = ["api", have] if getattr(cfg.api, have) else ["systems", have, "api"]
            line = locate(text, given)
            raise ConfigError(f"{name}:{line}: api.{need}: {key_text(given)} is set but there is no {need} "
                              f"back end (api.{need} or systems.{need}.api; or [api] enabled = false)")
        for i, vh in enumerate(cfg.api.vhosts):
            for which in ("source", "target"):
                if not (getattr(vh, which) or defaults[which]):
                    line = locate(text, ["api", "vhosts", i, which])
                    raise ConfigError(
                        f"{name}:{line}: api.vhosts[{i}].{which}: vhost {vh.host!r} has no {which} "
                        f"back end (set it here, or api.{which}, or systems.{which}.api)"
                    )
    if cfg.sip.enabled:
        _check_node_transports(cfg, text, name)
    seen: dict[tuple[Network, int | None], int] = {}
    for i, client in enumerate(cfg.radius.clients):
        j = seen.setdefault(parse_peer(client.address), i)
        if j != i:  # the first entry's secret answers its NAS: this one was never used
            line = locate(text, ["radius", "clients", i, "address"])
            raise ConfigError(f"{name}:{line}: radius.clients[{i}].address: {client.address!r} is "
                              f"radius.clients[{j}]'s too (one secret per NAS)")
    if cfg.radius.enabled and not cfg.radius.clients:
        line = locate(text, ["radius", "enabled"])
        raise ConfigError(f"{name}:{line}: radius.clients: RADIUS is enabled but no client is configured")
    if cfg.radius.enabled:
        for which in ("source", "target"):
            system = getattr(cfg.systems, which)
            if (system.radius or system.radius_acct) and not system.radius_secret:
                where = key_lines(text)
                key = "radius_secret" if ("systems", which, "radius_secret") in where else "radius"
                line = locate(text, ["systems", which, key])
                raise ConfigError(f"{name}:{line}: systems.{which}.radius_secret: must not be empty "
                                  "when RADIUS servers are set (RFC 2865: the shared secret)")
