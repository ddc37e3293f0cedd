"""Back-end host names, resolved once when dsbc starts and on each reload.

A system's SIP nodes are trusted peers by IP and port, and their answers (like a RADIUS
server's) are told apart by source address, so a name in ``systems.*.sip``, ``radius``
or ``radius_acct`` is replaced by its address before any worker starts: the workers
only ever see addresses.  ``systems.*.diameter`` is only checked: a Diameter connection
resolves its peer's name again each time it connects.  Only the keys of the enabled
dispatchers are looked at (``sip.enabled``, ``radius.enabled``, ``diameter.enabled``).  A name that does not resolve
stops the start (or refuses the reload) with the file, line and key, the way nginx does
for an upstream it cannot find, instead of a node that is silently never reached.

IPv4 is preferred when a name has both kinds of address (an IPv6-only name gives its
IPv6 address; with SIP listening on IPv6 addresses only, a SIP node's name gives its IPv6
address); the first address is used, as Kamailio's dispatcher does.
"""

from __future__ import annotations

import socket

import msgspec

from .config import (
    Config,
    ConfigError,
    Endpoint,
    config_error,
    format_hostport,
    is_ip,
    parse_hostport,
)

#: (key, default port) of the host:port lists of a system that are resolved here
_HOSTPORT_LISTS = (("radius", 1812), ("radius_acct", 1813))


def lookup(host: str, port: int, stype: int = socket.SOCK_DGRAM, prefer_v6: bool = False) -> str:
    """The address ``host`` names (itself when it is one), IPv4 first unless ``prefer_v6``;
    OSError when it names none."""
    if is_ip(host):
        return host
    infos = socket.getaddrinfo(host, port, type=stype)
    preferred = [i for i in infos if i[0] == (socket.AF_INET6 if prefer_v6 else socket.AF_INET)]
    return str((preferred or infos)[0][4][0])


def resolve_backends(cfg: Config) -> Config:
    """``cfg`` with every back-end SIP node and RADIUS server named by its address;
    ConfigError (file:line: key: reason) for a name that does not resolve."""

    def fail(parts: list[str | int], host: str, exc: OSError) -> ConfigError:
        return config_error(cfg, parts, f"cannot resolve {host!r} ({exc.strerror or exc})")

    # SIP listening on IPv6 only: a name with both kinds of address is reached over IPv6
    hosts = [Endpoint.parse(t).host for t in cfg.sip.listen]
    v6_only = bool(hosts) and all(":" in h for h in hosts) and "::" not in hosts
    systems = {}
    for which in ("source", "target"):
        sc = cfg.system(which)
        changes: dict[str, object] = {}
        nodes = []
        for i, text in enumerate(sc.sip if cfg.sip.enabled else []):
            e = Endpoint.parse(text)
            try:
                ip = lookup(e.host, e.port, socket.SOCK_DGRAM if e.transport == "udp" else socket.SOCK_STREAM,
                            prefer_v6=v6_only)
            except OSError as exc:
                raise fail(["systems", which, "sip", i], e.host, exc) from None
            nodes.append(str(Endpoint(e.transport, ip, e.port)) if ip != e.host else text)
        changes["sip"] = nodes if cfg.sip.enabled else sc.sip
        for key, default in _HOSTPORT_LISTS if cfg.radius.enabled else ():
            out = []
            for i, text in enumerate(getattr(sc, key)):
                host, port = parse_hostport(text, default)
                host = host.strip("[]")
                try:
                    ip = lookup(host, port)
                except OSError as exc:
                    raise fail(["systems", which, key, i], host, exc) from None
                out.append(format_hostport(ip, port) if ip != host else text)
            changes[key] = out
        if sc.diameter and cfg.diameter.enabled:
            host, port = parse_hostport(sc.diameter, 3868)
            try:
                lookup(host.strip("[]"), port, socket.SOCK_STREAM)
            except OSError as exc:
                raise fail(["systems", which, "diameter"], host, exc) from None
        systems[which] = msgspec.structs.replace(sc, **changes)
    return msgspec.structs.replace(cfg, systems=msgspec.structs.replace(cfg.systems, **systems))
