"""Header names, compact forms, multi-value splitting and Via values (I/O free)."""

from __future__ import annotations

from typing import Final

from .errors import SipParseError
from .uri import (
    _HOST_RE,
    _TOKEN_CHARS,
    _WS,
    _end_of_quoted,
    _parse_params,
    find_param,
    is_token,
    plain_host,
    port_number,
)

COMPACT: Final[dict[str, str]] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

#: canonical spelling used when dsbc writes a header of its own
CANONICAL: Final[dict[str, str]] = {
    "via": "Via",
    "from": "From",
    "to": "To",
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "contact": "Contact",
    "content-length": "Content-Length",
    "content-type": "Content-Type",
    "max-forwards": "Max-Forwards",
    "route": "Route",
    "record-route": "Record-Route",
    "path": "Path",
    "expires": "Expires",
    "retry-after": "Retry-After",
    "www-authenticate": "WWW-Authenticate",
    "proxy-authenticate": "Proxy-Authenticate",
    "unsupported": "Unsupported",
    "supported": "Supported",
    "require": "Require",
    "proxy-require": "Proxy-Require",
    "user-agent": "User-Agent",
    "server": "Server",
    "allow": "Allow",
}

#: headers whose grammar is a comma-separated list (RFC 3261 section 7.3.1): these split.
#: Everything else (Authorization family, Date, Call-ID, unknown extension headers) is one value.
LIST_HEADERS: Final = frozenset(
    {
        "via",
        "contact",
        "route",
        "record-route",
        "path",
        "service-route",
        "allow",
        "supported",
        "require",
        "proxy-require",
        "unsupported",
        "accept",
        "accept-encoding",
        "accept-language",
        "allow-events",
        "content-encoding",
        "content-language",
        "in-reply-to",
        "alert-info",
        "call-info",
        "error-info",
        "warning",
        "p-associated-uri",
        "history-info",
        "reason",
    }
)

#: headers that must appear at most once in a request (RFC 4475 multi01)
SINGLETONS: Final = frozenset({"call-id", "from", "to", "cseq", "max-forwards", "content-length"})


def canonical_name(raw: str) -> str:
    """Lower-case full name of a header as written (``v`` -> ``via``, ``MaX-fOrWaRdS`` -> ``max-forwards``)."""
    low = raw.lower()
    return COMPACT.get(low, low)


def display_name(name: str) -> str:
    return CANONICAL.get(name) or "-".join(p.capitalize() for p in name.split("-"))


def split_values(value: str) -> list[str]:
    """Split a list-header value on commas outside quotes and ``<...>``; strip each part."""
    if "," not in value:
        v = value.strip(_WS)
        return [v] if v else []
    if '"' not in value and "<" not in value:
        # perf: no quotes and no <...>: every comma separates
        return [p.strip(_WS) for p in value.split(",")]
    parts: list[str] = []
    start = 0
    while True:
        i = first_comma(value, start)
        if i < 0:
            break
        parts.append(value[start:i].strip(_WS))
        start = i + 1
    parts.append(value[start:].strip(_WS))
    return parts


def first_comma(value: str, start: int = 0) -> int:
    """Index of the first comma at or after ``start`` outside quotes and ``<...>``; -1 if none.
    Raises SipParseError on an unterminated quoted string."""
    depth = 0
    i, n = start, len(value)
    while i < n:
        c = value[i]
        if c == '"':
            i = _end_of_quoted(value, i)
            continue
        if c == "<":
            depth += 1
        elif c == ">":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            return i
        i += 1
    return -1


# --- Via -------------------------------------------------------------------------------


class Via:
    """One Via value.  ``text`` is what was received, kept for byte-exact forwarding."""

    __slots__ = ("host", "params", "port", "text", "transport")

    def __init__(self, transport: str, host: str, port: int | None, params: list[tuple[str, str | None]], text: str) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.params = params
        self.text = text

    def param(self, name: str) -> str | None:
        return find_param(self.params, name)

    @property
    def branch(self) -> str:
        return self.param("branch") or ""

    def response_address(self, default_port: int = 5060) -> tuple[str, int]:
        """Where a response to this hop goes (RFC 3261 18.2.2 with RFC 3581 rport)."""
        host = self.param("received") or self.host
        host = host[1:-1] if host.startswith("[") else host
        rport = self.param("rport")
        port = port_number(rport) if rport else 0
        if port:
            return host, port
        return host, self.port or default_port


def parse_via(text: str) -> Via:
    """Parse ``SIP/2.0/UDP host:port;params`` allowing LWS around the slashes (RFC 4475 wsinv)."""
    t = text.strip(_WS)
    # perf: the plain spelling ``SIP/2.0/UDP host[:port][;params]`` with a hostname or IPv4
    # address, by str methods; the general code below also takes LWS around the slashes
    # and the colon, lower case, IPv6...
    if t.startswith("SIP/2.0/"):
        sp = t.find(" ", 8)
        transport = t[8:sp]
        if sp > 8 and is_token(transport):
            # perf: host and port found by offsets (no sent-by slice, no partition tuple)
            semi = t.find(";", sp + 1)
            end = len(t) if semi < 0 else semi
            rest = "" if semi < 0 else t[semi:]
            colon = t.find(":", sp + 1, end)
            if colon < 0:
                host, port = t[sp + 1 : end], None
            else:
                host, port = t[sp + 1 : colon], port_number(t[colon + 1 : end])
            if plain_host(host) and port != 0:
                params = _parse_params(rest, "Via") if rest else []
                return Via(transport.upper(), host, port, params, t)
    return _parse_via_general(text, t)


def _parse_via_general(text: str, t: str) -> Via:
    parts: list[str] = []
    i = 0
    for _ in range(3):
        j = i
        while j < len(t) and t[j] not in "/" + _WS and not (len(parts) == 2 and t[j] in ";"):
            j += 1
        parts.append(t[i:j])
        while j < len(t) and t[j] in _WS:
            j += 1
        if len(parts) < 3:
            if j >= len(t) or t[j] != "/":
                raise SipParseError(f"bad Via {text[:60]!r}")
            j += 1
            while j < len(t) and t[j] in _WS:
                j += 1
        i = j
    proto, version, transport = parts
    if proto.upper() != "SIP" or version != "2.0" or not transport or not all(c in _TOKEN_CHARS for c in transport):
        raise SipParseError(f"bad Via protocol {text[:60]!r}")
    rest = t[i:]
    semi = rest.find(";")
    sent_by = (rest if semi < 0 else rest[:semi]).strip(_WS)
    if not sent_by:
        raise SipParseError(f"Via without sent-by {text[:60]!r}")
    if sent_by.startswith("["):
        end = sent_by.find("]")
        if end < 0:
            raise SipParseError("bad IPv6 in Via")
        host, portpart = sent_by[: end + 1], sent_by[end + 1 :].lstrip(_WS)
        portpart = portpart[1:].strip(_WS) if portpart.startswith(":") else portpart
    else:
        host, _, portpart = sent_by.partition(":")
        host, portpart = host.strip(_WS), portpart.strip(_WS)
    if not host or not _HOST_RE.fullmatch(host):
        raise SipParseError(f"bad Via host {text[:60]!r}")
    port = None
    if portpart:
        port = port_number(portpart)
        if not port:
            raise SipParseError(f"bad Via port {text[:60]!r}")
    params = _parse_params(rest[semi:], "Via") if semi >= 0 else []
    return Via(transport.upper(), host, port, params, t)
