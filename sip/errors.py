"""SIP errors.  Each error class knows its answer (h11's ``error_status_hint`` habit).

Remote misbehaviour (a malformed message) is a ``SipError`` subclass carrying the status a
proxy answers with; a response that is malformed is never answered, only dropped and
counted (``respond`` is False).  Local misuse of the library raises ordinary ``TypeError``
or ``ValueError``.
"""

from __future__ import annotations


class SipError(Exception):
    """A SIP message we cannot process.  ``status``/``reason`` is the answer to send."""

    status: int = 400
    reason: str = "Bad Request"
    #: answer with ``status`` when the message is a request we can still reply to
    respond: bool = True
    #: the stream (TCP/TLS) cannot be resynchronised after this error: close it
    close_connection: bool = False

    def __init__(self, detail: str = "", *, extra_headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason
        self.extra_headers = extra_headers


class FlowTokenError(SipError):
    """A flow token (Path, Record-Route) that does not verify: forged, altered, or signed
    with a secret no longer listed.  Defined here, not in the compiled ``sip.flow``: mypyc
    keeps no class attributes on a subclass of a Python exception."""

    status = 403
    reason = "Forbidden"


class SipParseError(SipError):
    """Syntactically invalid message: 400 Bad Request."""


class FramingError(SipParseError):
    """The byte stream cannot be split into messages (bad or conflicting Content-Length)."""

    close_connection = True


class MessageTooLarge(SipError):
    status = 513
    reason = "Message Too Large"
    close_connection = True


class VersionNotSupported(SipError):
    status = 505
    reason = "Version Not Supported"


class UnsupportedUriScheme(SipError):
    status = 416
    reason = "Unsupported URI Scheme"


class TooManyHops(SipError):
    status = 483
    reason = "Too Many Hops"


class LoopDetected(SipError):
    status = 482
    reason = "Loop Detected"


class BadExtension(SipError):
    status = 420
    reason = "Bad Extension"


class NotImplementedMethod(SipError):
    status = 501
    reason = "Not Implemented"
