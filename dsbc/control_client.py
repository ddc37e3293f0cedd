"""A small client of the control API for the command line (`dsbc ... --node URL`).

Plain urllib: a one-shot command must not pay for importing aiohttp.  Every failure is a
`NodeError` whose str() is the one line the CLI prints, with the exit code it means:
1 when the node cannot be reached or cannot write the store (503), 2 when it refused the
request (400, 401, 404, 409).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .config import Config, parse_hostport


class NodeError(Exception):
    def __init__(self, message: str, code: int, status: int = 0, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.body = body or {}


def local_url(cfg: Config) -> str:
    """``http://host:port`` of this host's node (control.listen; a wildcard means loopback)."""
    host, port = parse_hostport(cfg.control.listen, 8080)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def node_url(cfg: Config, given: str) -> str:
    """``--node URL``; ``local`` (or empty) means this host's control.listen."""
    if given in ("", "local"):
        if not cfg.control.enabled:  # control.listen's default port may be anybody's
            raise NodeError("the control API is off in this config (control.enabled = false): "
                            "no node to ask here (--node URL names one)", 2)
        return local_url(cfg)
    url = given.strip()
    if "://" not in url:
        url = f"http://{url}"
    try:  # a URL urllib cannot use was a traceback (ValueError, http.client.InvalidURL)
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname
            or port == 0 or any(ch.isspace() or ord(ch) < 32 for ch in url)):
        raise NodeError(f"--node: {given!r} is not a node's control API URL "
                        "(http://HOST:PORT, HOST:PORT or 'local')", 2)
    return url.rstrip("/")


def node_token(cfg: Config) -> str:
    return os.environ.get("DSBC_CONTROL_TOKEN") or cfg.control.token


class NodeClient:
    def __init__(self, base: str, token: str, timeout: float = 600.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read() or b"{}")
            except ValueError:
                err = {}
            reason = err.get("error") if isinstance(err, dict) else None
            message = f"{self.base}: {reason or f'HTTP {exc.code} {exc.reason}'}"
            if exc.code == 401:
                message += " (give the token as control.token in the config or $DSBC_CONTROL_TOKEN)"
            # a server fault, or customers locked by a batch in flight: try again (exit 1);
            # any other refusal is the request's fault (exit 2), as `dsbc` without --node says
            busy = exc.code >= 500 or (exc.code == 409 and isinstance(err, dict) and "locked" in err)
            raise NodeError(message, 1 if busy else 2, exc.code,
                            err if isinstance(err, dict) else {}) from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise NodeError(f"no running node reachable at {self.base} ({reason})", 1) from None
        try:
            out = json.loads(raw or b"{}")
        except ValueError:
            raise NodeError(f"{self.base}: the answer is not JSON", 1) from None
        return out if isinstance(out, dict) else {"value": out}

    def identity(self, kind: str, value: str) -> tuple[dict[str, Any] | None, str]:
        """(the owner's record, "") or, for an identity the node does not know, (None, the
        node's store.unknown)."""
        path = f"/v1/identities/{urllib.parse.quote(kind, safe='')}/{urllib.parse.quote(value, safe='')}"
        try:
            return self.call("GET", path, timeout=10.0), ""
        except NodeError as exc:
            if exc.status == 404:
                return None, str(exc.body.get("policy") or "")
            raise

    def customer(self, customer_id: str) -> dict[str, Any] | None:
        try:
            return self.call("GET", f"/v1/customers/{urllib.parse.quote(customer_id, safe='')}",
                             timeout=10.0)
        except NodeError as exc:
            if exc.status == 404:
                return None
            raise
