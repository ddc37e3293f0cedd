"""Errors made by the API dispatcher, and the billing API's fault shape.

Every error dsbc makes on the API path carries its own answer (h11's
``error_status_hint`` idea): a ``faultcode`` under ``Server.Dispatcher.`` and a one-line
``faultstring``.  The server turns any ``DispatchError`` into the billing API's own fault
shape (HTTP 500 with a JSON object), never an HTML page or a traceback.

Back-end faults are read with ``parse_fault`` so the dispatcher can tell an
authentication fault (retry the login on the other system) from any other fault (pass
it through untouched).
"""

from __future__ import annotations

import msgspec

FAULT_STATUS = 500
FAULT_CONTENT_TYPE = "application/json; charset=utf-8"


class DispatchError(Exception):
    """Base of every error the dispatcher answers itself.  ``str()`` is the faultstring."""

    reason = "error"
    #: close the client connection after the fault (the request stream is unusable)
    close = False
    #: HTTP status of the fault: the billing API answers its faults with 500; a request
    #: over the size limits gets the HTTP status clients and proxies expect (413 / 431)
    http_status = 500

    @property
    def faultcode(self) -> str:
        return f"Server.Dispatcher.{self.reason}"

    def body(self) -> bytes:
        return fault_body(self.faultcode, str(self) or self.reason)


class BadRequest(DispatchError):
    """The request cannot be parsed far enough to route it (remote misbehaviour)."""

    reason = "bad_request"


class RequestTooLarge(BadRequest):
    """A body or header block over the configured limits."""

    reason = "request_too_large"
    close = True
    http_status = 413


class HeadersTooLarge(RequestTooLarge):
    """A request header section over ``max_header_size`` in total."""

    http_status = 431


class RequestTimeout(BadRequest):
    """The client stopped sending its body."""

    reason = "request_timeout"
    close = True


class VersionNotSupported(BadRequest):
    """A request in another HTTP major version than 1 (HTTP/2.0 in clear text, HTTP/0.9):
    505, as nginx answers, and the connection closed (its framing is not HTTP/1's)."""

    reason = "http_version_not_supported"
    close = True
    http_status = 505

    def __init__(self, version: str) -> None:
        super().__init__(f"HTTP/{version} is not supported: send HTTP/1.1")


class CodingNotImplemented(BadRequest):
    """A request body in a transfer coding other than chunked (``gzip, chunked``): 501,
    as nginx answers; relayed, it would reach the back end as coded octets under no
    coding at all (Transfer-Encoding is hop-by-hop)."""

    reason = "not_implemented"
    close = True
    http_status = 501


class UnknownHost(DispatchError):
    """No virtual host is configured for the Host header."""

    reason = "unknown_host"


class UnknownEntity(DispatchError):
    """``store.unknown = reject`` and the request names an identity nobody owns."""

    reason = "unknown_entity"


class CustomerLocked(DispatchError):
    """The owning customer stayed locked (mid-migration) longer than ``store.lock_hold``."""

    reason = "customer_locked"


class BackendUnavailable(DispatchError):
    """The system that owns the request did not answer."""

    reason = "backend_unavailable"

    def __init__(self, system: str, detail: str = "") -> None:
        self.system = system
        #: why (a connect error names the back end's address): for the operator, in the
        #: back end's ``last_error`` (dsbc status); the client's fault keeps only a reason
        #: that names nothing ("timed out"), else it would tell anyone on the public
        #: address where the systems are (nginx's 502 does not)
        self.detail = detail
        shown = detail if detail in _CLIENT_DETAILS else ""
        super().__init__(f"the {system} system is not answering" + (f": {shown}" if shown else ""))


#: why a back end failed, as a client may be told (they name no host, port or TLS setting)
_CLIENT_DETAILS = frozenset({"timed out", "Server disconnected"})


class NoSessionOnSystem(DispatchError):
    """An admin session accepted by one system only, asked for something on the other."""

    def __init__(self, system: str, text: str = "") -> None:
        self.system = system
        super().__init__(
            text
            or f"this session was not accepted by the {system} system, and the request needs "
            f"it; log in with credentials valid on both systems"
        )

    @property
    def reason(self) -> str:  # type: ignore[override]
        return f"no_session_on_{self.system}"


class NotMadeByDispatcher(NoSessionOnSystem):
    """An admin session opened on one system directly (not through dsbc), asked for
    something on the other: dsbc never had the login to open a twin there."""

    def __init__(self, system: str, home: str) -> None:
        super().__init__(
            system,
            f"this session was not opened through dsbc: it is known on the {home} system "
            f"only, and the request needs the {system} system; log in through dsbc to reach "
            "both systems",
        )


class NoAnswerAtLogin(NoSessionOnSystem):
    """An admin session made while one system did not answer, asked for something there.

    Not a refusal: the system may accept the same login now.  dsbc keeps no password to
    try it again itself (``Flows.admin_login``), so the admin is told to log in again."""

    def __init__(self, system: str) -> None:
        super().__init__(
            system,
            f"the {system} system did not answer when this session was opened, so it has no "
            f"session there, and the request needs it; log in again once the {system} "
            f"system answers",
        )

    @property
    def reason(self) -> str:  # type: ignore[override]
        return f"{self.system}_unreachable_at_login"


class UpstreamFault(DispatchError):
    """A back-end answer dsbc needed to read (a list to merge) and could not."""

    reason = "bad_backend_answer"


# --- the fault shape ------------------------------------------------------------------------


class Fault(msgspec.Struct, frozen=True):
    faultcode: str
    faultstring: str = ""


_fault_encoder = msgspec.json.Encoder()
_fault_decoder = msgspec.json.Decoder(Fault)


def fault_body(faultcode: str, faultstring: str) -> bytes:
    return _fault_encoder.encode(Fault(faultcode, faultstring))


def parse_fault(status: int, body: bytes) -> Fault | None:
    """The fault in a back-end answer, or None when the answer is not a fault."""
    if status < 400 or not body or body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return None
    try:
        return _fault_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


# Faults that mean "these credentials / this session are not known here": the login
# fall-back and the unknown-session probe move on to the other system on these only.
AUTH_FAULT_MARKERS = (
    "auth_failed",
    "authfailed",
    "invalid_session",
    "session_expired",
    "not_authorized",
    "unauthorized",
    "access_token",
    "check_auth",
    "login_failed",
)


def is_auth_fault(status: int, body: bytes) -> bool:
    """True when a back end refused the credentials (not when it refused the request)."""
    if status == 401:
        return True
    fault = parse_fault(status, body)
    if fault is None:
        return False
    code = fault.faultcode.lower()
    if code.startswith(("server.session.", "client.session.")):
        return True
    return any(m in code for m in AUTH_FAULT_MARKERS)


NOT_FOUND_MARKERS = ("not_found", "notfound", "no_such", "unknown")


def is_not_found_fault(status: int, body: bytes) -> bool:
    """True when a back end says the named entity does not exist there."""
    fault = parse_fault(status, body)
    if fault is None:
        return False
    code = fault.faultcode.lower()
    return any(m in code for m in NOT_FOUND_MARKERS)
