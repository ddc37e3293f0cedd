"""What a worker would find wrong only when it starts, found by the master first.

`dsbc run` runs these checks before any worker starts, and a reload (SIGHUP) before it
replaces any worker.  A value that passes the config file's own checks but cannot be used
(a CA file that is missing, a vhost's port, an advertise address, a back-end name that
does not resolve, TLS files) stops the start, or refuses the reload and keeps the running
workers, with ``file:line: key: reason``.  Without them the workers would fail one after
another, and on a reload only after the old ones had drained: the node went down.
"""

from __future__ import annotations

import ssl

from .config import Config, api_wanted, config_error
from .resolve import resolve_backends
from .tls import check_tls


def preflight(cfg: Config) -> Config:
    """``cfg`` with its back-end names resolved (the workers' config); ConfigError if a
    worker could not start with it."""
    cfg = resolve_backends(cfg)
    check_tls(cfg)
    if cfg.sip.enabled:
        from .sip_service import advertise

        try:
            advertise(cfg)
        except ValueError as exc:
            raise config_error(cfg, ["sip", "advertise"], str(exc)) from None
    if api_wanted(cfg):
        from .api_service import build_settings

        build_settings(cfg)
        if cfg.api.backend_ca:
            try:
                ssl.create_default_context(cafile=cfg.api.backend_ca)
            except (OSError, ssl.SSLError) as exc:
                raise config_error(cfg, ["api", "backend_ca"], f"cannot load the CA file: {exc}") from None
    return cfg

