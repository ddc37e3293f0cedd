"""TLS contexts from the configuration, and the check that they can be built.

    default, per_listener = sip_server_contexts(cfg)   # tls: listeners (mTLS where asked)
    client = sip_client_context(cfg)                   # dsbc -> the systems' tls: nodes
    check_tls(cfg)                                     # ConfigError naming the key and file

Modern defaults: TLS 1.2 at least (Python's default ciphers, no compression, no
renegotiation).  ``check_tls`` runs before a start and before a SIGHUP reload replaces the
workers, so a missing or unreadable certificate refuses the reload and the running workers
keep serving with the old one, instead of a rolling reload into workers that cannot start.
"""

from __future__ import annotations

import logging
import os
import ssl
import time

from .config import Config, ConfigError, Endpoint, api_wanted, config_error

log = logging.getLogger("dsbc")

#: a certificate that ends sooner than this is announced at each start and reload
EXPIRY_NOTICE = 14 * 86400.0

__all__ = ["api_server_context", "check_tls", "sip_client_context", "sip_server_contexts"]


def no_passphrase() -> bytes:
    """The password callback of ``load_cert_chain``: without one, OpenSSL asks for an
    encrypted key's passphrase on the terminal, and a start, a check or a reload from a
    shell waited there for good.  An empty one fails the load instead (``_load_error``)."""
    return b""


def _server_context(
    cert: str, key: str, ca: str = "", verify_client: bool = False
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key, password=no_passphrase)
    if ca:
        ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_client else ssl.CERT_NONE
    return ctx


def sip_server_contexts(
    cfg: Config,
) -> tuple[ssl.SSLContext | None, dict[tuple[str, int], ssl.SSLContext]]:
    """The context of the tls: listeners, and the listeners (host, port) with another one
    (those that require a client certificate when ``tls_verify_client`` is a list)."""
    sc = cfg.sip
    if not sc.tls_cert:
        return None, {}
    verify = sc.tls_verify_client
    if isinstance(verify, bool):
        return _server_context(sc.tls_cert, sc.tls_key, sc.tls_ca, verify), {}
    default = _server_context(sc.tls_cert, sc.tls_key, sc.tls_ca, False)
    mutual = _server_context(sc.tls_cert, sc.tls_key, sc.tls_ca, True)
    per: dict[tuple[str, int], ssl.SSLContext] = {}
    for text in verify:
        e = Endpoint.parse(text)
        per[(e.host, e.port)] = mutual
    return default, per


def sip_client_context(cfg: Config) -> ssl.SSLContext:
    """For connections dsbc opens to tls: nodes: verified against ``tls_ca`` (and nothing
    else) when set (the nodes are addressed by IP: no host name check), presenting dsbc's
    own certificate."""
    sc = cfg.sip
    # tls_ca alone: with no cafile, create_default_context would trust the system's CAs too,
    # and any certificate a public CA issued (to anyone: no host name check) would pass
    ctx = ssl.create_default_context(cafile=sc.tls_ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED if sc.tls_ca else ssl.CERT_NONE
    if sc.tls_cert:
        ctx.load_cert_chain(sc.tls_cert, sc.tls_key, password=no_passphrase)
    return ctx


def api_server_context(cert: str, key: str) -> ssl.SSLContext:
    return _server_context(cert, key)


def check_tls(cfg: Config) -> None:
    """Build every TLS context the configuration asks for; ConfigError (file:line: key) if
    one cannot be, naming the file that failed."""
    if cfg.sip.enabled:
        sc = cfg.sip
        if sc.tls_ca:  # first: the contexts below load it too, and would blame tls_cert
            _check_ca(cfg, ["sip", "tls_ca"], sc.tls_ca, f"cannot load {sc.tls_ca}")
        try:
            sip_server_contexts(cfg)
            sip_client_context(cfg)
        except (OSError, ValueError) as exc:
            raise _load_error(cfg, "sip", sc.tls_cert, sc.tls_key, exc) from None
        if sc.tls_cert:
            _warn_validity(cfg, "sip", sc.tls_cert)
    api = cfg.api
    if api.enabled and api.tls_cert:
        try:
            api_server_context(api.tls_cert, api.tls_key)
        except (OSError, ValueError) as exc:
            raise _load_error(cfg, "api", api.tls_cert, api.tls_key, exc) from None
        _warn_validity(cfg, "api", api.tls_cert)
    if api_wanted(cfg) and api.backend_ca:  # what api_proxy.upstream.Backend loads
        _check_ca(cfg, ["api", "backend_ca"], api.backend_ca, "cannot load the CA file")


def _check_ca(cfg: Config, parts: list[str | int], path: str, reason: str) -> None:
    """ConfigError (``reason: why``) if the CA file ``path`` cannot be loaded."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise config_error(cfg, parts, f"{reason}: {exc}") from None


def _load_error(cfg: Config, section: str, cert: str, key: str, exc: Exception) -> ConfigError:
    """The ConfigError of a certificate / key pair that did not load, naming the key (and
    line) of the file at fault: ``load_cert_chain`` says "PEM lib" or "No such file" for
    either of the two."""
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            return config_error(cfg, [section, name], f"cannot read {path}: {err.strerror or err}")
    if "KEY_VALUES_MISMATCH" in str(exc):
        return config_error(cfg, [section, "tls_key"], f"{key} is not the key of the certificate {cert}")
    try:
        ssl.create_default_context(cafile=cert)  # the certificate alone (its chain) parses?
    except (OSError, ValueError) as err:
        return config_error(cfg, [section, "tls_cert"], f"{cert} holds no PEM certificate ({err})")
    try:
        with open(key, "rb") as f:
            encrypted = b"ENCRYPTED" in f.read(1 << 16)  # PKCS#8 "ENCRYPTED PRIVATE KEY", "Proc-Type: 4,ENCRYPTED"
    except OSError:
        encrypted = False
    if encrypted:
        return config_error(cfg, [section, "tls_key"], f"{key} is encrypted with a passphrase, which dsbc cannot "
                            "ask for: give it the key decrypted (openssl pkey -in KEY -out PLAIN), readable by "
                            "dsbc's user only")
    if "PEM" in str(exc):
        return config_error(cfg, [section, "tls_key"], f"{key} holds no PEM private key (or one with a "
                            f"passphrase, which dsbc cannot give) ({exc})")
    return config_error(cfg, [section, "tls_cert"], f"cannot load {cert} / {key}: {exc}")


def _warn_validity(cfg: Config, section: str, cert: str, now: float | None = None) -> None:
    """A warning (file:line: key: ...) for a certificate that has expired, is not valid yet
    or expires within EXPIRY_NOTICE: it loads, but every TLS client refuses it, as nginx
    would serve it too, unannounced."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:  # not in this Python: no check, no error
        return
    try:
        info = decode(os.fspath(cert))
        not_before = ssl.cert_time_to_seconds(info["notBefore"])
        not_after = ssl.cert_time_to_seconds(info["notAfter"])
    except (OSError, ValueError, KeyError):
        return
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after))
    if now >= not_after:
        why = f"the certificate {cert} expired on {stamp}: TLS clients refuse it"
    elif now < not_before:
        why = (f"the certificate {cert} is not valid before "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(not_before))}: TLS clients refuse it")
    elif not_after - now < EXPIRY_NOTICE:
        why = f"the certificate {cert} expires on {stamp} (in {(not_after - now) / 86400:.1f} days)"
    else:
        return
    log.warning("%s", config_error(cfg, [section, "tls_cert"], why))
