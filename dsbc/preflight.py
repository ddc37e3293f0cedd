"""What a worker would find wrong only when it starts, found by the master first.

`dsbc run` runs these checks before any worker starts, and a reload (SIGHUP) before it
replaces any worker.  A value that passes the config file's own checks but cannot be used
(a CA file that is missing, a vhost's port, an advertise address, a back-end name that
does not resolve, TLS files) stops the start, or refuses the reload and keeps the running
workers, with ``file:line: key: reason``.  Without them the workers would fail one after
another, and on a reload only after the old ones had drained: the node went down.
"""

from __future__ import annotations

import logging
import os

from .config import Config, Endpoint, api_wanted, config_error
from .resolve import resolve_backends
from .tls import check_tls

log = logging.getLogger("dsbc")


def preflight(cfg: Config, create_store: bool = True) -> Config:
    """``cfg`` with its back-end names resolved (the workers' config); ConfigError if a
    worker could not start with it.  ``create_store=False`` (``dsbc run --check``) makes no
    SQLite file where none is: it checks that one could be made."""
    cfg = resolve_backends(cfg)
    check_tls(cfg)
    _check_cache_file(cfg)
    _check_store(cfg, create_store)
    if cfg.sip.enabled:
        from .sip_service import advertise

        try:
            advertise(cfg)
        except ValueError as exc:
            raise config_error(cfg, ["sip", "advertise"], str(exc)) from None
        _check_udp_families(cfg)
        _warn_family_ports(cfg)
        for which in ("source", "target"):
            if not cfg.system(which).sip:
                log.warning("%s", config_error(cfg, ["systems", which, "sip"], "no SIP node while SIP is "
                            f"enabled: SIP requests of the {which}'s customers get 503 (/healthz: degraded)"))
    for enabled, key, what, outcome in (
            (cfg.radius.enabled, "radius", "RADIUS server", "requests are dropped (counted as no_server)"),
            (cfg.diameter.enabled, "diameter", "Diameter peer", "requests get 3002 (unable to deliver)")):
        for which in ("source", "target") if enabled else ():
            if not getattr(cfg.system(which), key):
                log.warning("%s", config_error(cfg, ["systems", which, key], f"no {what} while "
                            f"{what.split()[0]} is enabled: the {which}'s customers' {outcome}"))
    if api_wanted(cfg):
        from .api_service import build_settings

        build_settings(cfg)
    elif cfg.api.enabled and _api_written(cfg):
        log.warning("%s", config_error(cfg, ["api"], "no back end (api.source and api.target, systems.source.api "
                                                     "and systems.target.api, or [[api.vhosts]]): the API "
                                                     "dispatcher does not run (say [api] enabled = false)"))
    return cfg


def _api_written(cfg: Config) -> bool:
    """Whether the config file sets a key of [api] (its listen, TLS, timeouts ...): the
    operator meant the API dispatcher to run."""
    from pathlib import Path

    from .toml_lines import key_lines

    try:
        text = Path(cfg.path).read_text(encoding="utf-8-sig") if cfg.path else ""
    except (OSError, UnicodeDecodeError):
        return False
    return any(len(k) > 1 and k[0] == "api" and k[1] != "enabled" for k in key_lines(text))


def _check_udp_families(cfg: Config) -> None:
    """A udp: node is sent to from a UDP listener of its address family ("::" takes both):
    without one every request to it was lost, with a traceback per message."""
    hosts = [e.host for e in (Endpoint.parse(t) for t in cfg.sip.listen) if e.transport == "udp"]
    for which in ("source", "target"):
        for i, text in enumerate(cfg.system(which).sip):
            e = Endpoint.parse(text)
            if e.transport != "udp":
                continue
            v6 = ":" in e.host
            if not hosts:
                why = "a udp: node needs a udp: listener in sip.listen"
            elif not any(h == "::" or (":" in h) == v6 for h in hosts):
                why = ("an IPv6 udp: node needs an IPv6 udp: listener in sip.listen" if v6 else
                       "an IPv4 udp: node needs an IPv4 udp: listener in sip.listen (or udp:[::])")
            else:
                continue
            raise config_error(cfg, ["systems", which, "sip", i], why)


def _warn_family_ports(cfg: Config) -> None:
    """dsbc advertises one port per transport, the first listener's, to both address
    families: an IPv6 (or IPv4) listener of that transport only on another port gets its
    peers' in-dialog requests (Record-Route, Path) sent to a port it does not listen on."""
    if cfg.sip.advertise and cfg.sip.advertise.count(":") == 1:
        return  # an advertised port of its own (a NAT's): nothing to compare with
    entries = [Endpoint.parse(t) for t in cfg.sip.listen]
    for i, e in enumerate(entries):
        first = next(f for f in entries if f.transport == e.transport)
        v6 = ":" in e.host
        if e.port == first.port or any(
            f.transport == e.transport and f.port == first.port and (f.host == "::" or (":" in f.host) == v6)
            for f in entries
        ):
            continue
        log.warning("%s", config_error(cfg, ["sip", "listen", i], (
            f"{e.transport} listener on port {e.port}, but dsbc gives every {e.transport} peer port "
            f"{first.port} (the first {e.transport}: listener's) in Record-Route and Path, and "
            f"listens on it only for IPv{6 if not v6 else 4}: the in-dialog requests of IPv{6 if v6 else 4} "
            f"peers will not reach dsbc (listen on port {first.port} for both families)")))


def _check_cache_file(cfg: Config) -> None:
    """A Redis store's cache file can be written (it lets a node start while Redis is away;
    one that cannot be written was only logged, at each write)."""
    from .store.sqlite import missing_directory

    if not cfg.store.cache_file or cfg.store.url.partition(":")[0].lower() == "sqlite":
        return
    folder = os.path.dirname(os.path.abspath(cfg.store.cache_file))
    if not os.path.isdir(folder):
        raise config_error(cfg, ["store", "cache_file"], missing_directory(folder, "store.cache_file"))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise config_error(cfg, ["store", "cache_file"], f"directory {folder} cannot be written "
                           "by this user (the node writes the cache there)")


def _check_store(cfg: Config, create: bool = True) -> None:
    """The store opens (a Redis that cannot be reached is fine with a cache file: the
    workers start from it).  Without loading the index: the workers load it."""
    from .store import StoreUnavailable, open_store
    from .store.sqlite import missing_directory
    from .store.sqlite_schema import sqlite_path

    url = cfg.store.url
    if not create and url.partition(":")[0].lower() == "sqlite":
        path = sqlite_path(url)
        folder = os.path.dirname(os.path.abspath(path))
        if path != ":memory:" and not os.path.exists(path):
            if not os.access(folder, os.W_OK | os.X_OK):
                why = missing_directory(folder) if not os.path.isdir(folder) else f"directory {folder} cannot be written"
                raise config_error(cfg, ["store", "url"], f"cannot create the store {path}: {why}")
            return  # `dsbc run` makes it there
    try:
        open_store(url, cfg.store.unknown, load=False).close()
    except Exception as exc:  # noqa: BLE001 - report the reason, not a traceback
        cache = cfg.store.cache_file
        if not (isinstance(exc, StoreUnavailable) and cache and os.path.exists(cache)):
            err = config_error(cfg, ["store", "url"], f"cannot open the store: {exc}")
            if isinstance(exc, StoreUnavailable):
                err.exit_code = 1  # not reached (README: exit 1), not a bad value
            raise err from None
        log.warning("%s; starting from the cache %s", exc, cache)
