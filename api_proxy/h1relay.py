"""The heads the fast path writes, to a back end and to a client: pure, no I/O.

``upstream_request`` is ``upstream.request_headers`` as octets: the client's request
for a back end, hop-by-hop headers removed, X-Forwarded-* set, in aiohttp's client
order.  ``client_head`` is ``upstream.response_headers`` plus what aiohttp's
``StreamResponse`` adds, in aiohttp's order: the back end's headers without hop-by-hop
ones (and those its Connection header names) and without Content-Length, Location and
cookie domains made the public host's; then Content-Length or Transfer-Encoding, a
default Content-Type, Date, Server, and Connection: close when the client asked for it.
``public_url`` and ``public_cookie`` are the Location / Refresh and Set-Cookie rules both use (``nginx``'s ``proxy_redirect
default`` for both back ends of a vhost).  ``fault_bytes`` is ``Forwarder.fault`` as octets.  ``tests/test_api_fastpath*.py``
compare all three with the aiohttp path.

Compiled with mypyc like ``h1`` (see there): annotations, ``Final`` constants.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

from aiohttp.http import SERVER_SOFTWARE

from api_proxy.errors import DispatchError
from api_proxy.h1 import (
    HOP_BY_HOP,
    LENGTH,
    NO_BODY,
    RequestHead,
    ResponseHead,
    date_header,
)

_SERVER: Final[bytes] = b"Server: " + str(SERVER_SOFTWARE).encode() + b"\r\n"
_SERVER_LINE: Final = _SERVER.decode("latin-1")[:-2]
#: re.ASCII: \s and IGNORECASE as in the bytes pattern this was (ASCII only)
_DOMAIN_ATTR: Final = re.compile(r";\s*domain=[^;]*", re.IGNORECASE | re.ASCII)
_PATH_ATTR: Final = re.compile(r"(;\s*path\s*=\s*)([^;]*)", re.IGNORECASE | re.ASCII)
#: request headers never sent on ("close": a Connection token aiohttp treats as a name)
_REQ_SKIP: Final = HOP_BY_HOP | {"host", "content-length", "expect", "close"}
#: X-Forwarded-* as sent, by lowercase name, in the order they are added when absent
_FORWARDED: Final = {
    "x-forwarded-for": "X-Forwarded-For",
    "x-forwarded-proto": "X-Forwarded-Proto",
    "x-forwarded-host": "X-Forwarded-Host",
    "x-real-ip": "X-Real-IP",
}
#: what a header line is to each head, by lowercase name (one dict lookup a header):
#: absent, relayed as it is
_SKIP: Final = 1  # dropped
_FWD: Final = 2  # X-Forwarded-*: replaced
_CT: Final = 3
_DATE: Final = 4
_SRV: Final = 5
_LOC: Final = 6  # rewritten
_COOKIE: Final = 7  # rewritten
_REFRESH: Final = 8  # rewritten
_REQ_KIND: Final[dict[str, int]] = {
    **{lname: _SKIP for lname in _REQ_SKIP},
    **{lname: _FWD for lname in _FORWARDED},
}
_RESP_KIND: Final[dict[str, int]] = {
    **{lname: _SKIP for lname in HOP_BY_HOP | {"content-length"}},
    "content-type": _CT,
    "date": _DATE,
    "server": _SRV,
    "location": _LOC,
    "set-cookie": _COOKIE,
    "refresh": _REFRESH,
}
_DEFAULT_PORT: Final = {"http": "80", "https": "443"}
_REFRESH_URL: Final = re.compile(r"([;,]\s*url\s*=\s*['\"]?)([^'\"]*)", re.IGNORECASE | re.ASCII)


def _url_base(url: str) -> tuple[str, str] | None:
    """``("scheme://host:port", rest)`` of an absolute http(s) URL: scheme and host
    lowercased, the default port written, ``rest`` the path and what follows (as it
    was); None for anything else (a relative URL)."""
    sep = url.find("://")
    if sep < 4 or sep > 5:
        return None
    scheme = url[:sep].lower()
    default = _DEFAULT_PORT.get(scheme)
    if default is None:
        return None
    start = sep + 3
    end = len(url)
    for ch in "/?#":
        i = url.find(ch, start)
        if 0 <= i < end:
            end = i
    authority = url[start:end].lower()
    if not authority or "@" in authority:
        return None
    if authority.endswith(":"):
        authority += default
    elif authority.rfind(":") <= authority.rfind("]"):  # no port (an IPv6 address has colons)
        authority = f"{authority}:{default}"
    return f"{scheme}://{authority}", url[end:]


def backend_bases(urls: list[str]) -> tuple[tuple[str, str], ...]:
    """What ``public_url`` matches for the back-end base URLs of a vhost: each one's
    ``("scheme://host:port", path prefix)``, the longest prefix first, once each."""
    out: list[tuple[str, str]] = []
    for url in urls:
        found = _url_base(url)
        if found is not None:
            key = (found[0], found[1].partition("?")[0].rstrip("/"))
            if key not in out:
                out.append(key)
    out.sort(key=lambda b: -len(b[1]))
    return tuple(out)


def public_url(url: str, bases: tuple[tuple[str, str], ...], public: str) -> str:
    """``url`` (a Location) with a back end's base made ``public`` (``scheme://Host``).

    A URL naming either back end of the vhost, by scheme, host and port (any case, the
    default port written or not) and under its base path, becomes the public host's
    with the base path taken off, as nginx's ``proxy_redirect default`` does: an
    absolute URL naming a back end would send the browser past dsbc.  Anything else is
    left as it is."""
    found = _url_base(url)
    if found is None:
        return url
    origin, rest = found
    for b_origin, prefix in bases:
        if origin != b_origin:
            continue
        if prefix:
            if not rest.startswith(prefix):
                continue
            after = rest[len(prefix) :]
            if after and after[0] not in "/?#":
                continue
            rest = after
        return public + rest
    return url


def public_refresh(value: str, bases: tuple[tuple[str, str], ...], public: str) -> str:
    """A ``Refresh`` header (``5; url=...``) with its URL made public (``public_url``)."""
    m = _REFRESH_URL.search(value)
    if m is None:
        return value
    url = public_url(m.group(2).strip(), bases, public)
    return value[: m.start(2)] + url + value[m.end(2) :]


def upstream_request(
    req: RequestHead,
    prefix: str,
    target: str,
    host_header: str,
    ip: str,
    proto: str,
    body: bytes,
) -> bytes:
    """The request for a back end: ``prefix + target`` (the origin's path prefix, the
    path and query), its Host, the client's headers less hop-by-hop ones, X-Forwarded-*
    for client ``ip`` over ``proto`` (a client's own replaced in place, repeats dropped),
    Content-Length unless GET, then ``body``."""
    index = req.index
    kinds = _REQ_KIND
    fwd: dict[str, str] | None = None  # made at the first X-Forwarded-* of the client's
    # lines without their CRLF, joined with CRLFs once (one f-string for several lines:
    # mypyc builds it in one allocation); a usual header line is the client's own
    lines: list[str] = [f"{req.method} {prefix}{target} HTTP/1.1\r\nHost: {host_header}"]
    for lname, _, _, line in req.headers:
        kind = kinds.get(lname, 0)
        if kind == 0:
            lines.append(line)
        elif kind == _FWD:
            if fwd is None:
                # every X-Forwarded-For line of the client's, joined (as nginx's
                # $proxy_add_x_forwarded_for does), then the client's address
                xff = ", ".join([v for n, _, v, _ in req.headers if n == "x-forwarded-for"])
                fwd = {
                    "x-forwarded-for": xff + ", " + ip if xff else ip,
                    "x-forwarded-proto": proto,
                    "x-forwarded-host": index["host"],
                    "x-real-ip": ip,
                }
            if lname in fwd:  # the first one is replaced; a repeat is dropped
                lines.append(f"{_FORWARDED[lname]}: {fwd.pop(lname)}")
    if fwd is None:  # none of the client's: all four, in _FORWARDED's order, and the end
        if req.method != "GET":
            lines.append(
                f"X-Forwarded-For: {ip}\r\nX-Forwarded-Proto: {proto}\r\n"
                f"X-Forwarded-Host: {index['host']}\r\nX-Real-IP: {ip}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
        else:
            lines.append(
                f"X-Forwarded-For: {ip}\r\nX-Forwarded-Proto: {proto}\r\n"
                f"X-Forwarded-Host: {index['host']}\r\nX-Real-IP: {ip}\r\n\r\n"
            )
    else:
        for lname, value in fwd.items():
            lines.append(f"{_FORWARDED[lname]}: {value}")
        if req.method != "GET":
            lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        else:
            lines.append("\r\n")
    head = "\r\n".join(lines).encode("ascii")
    return head + body if body else head


def public_cookie(value: str, bases: tuple[tuple[str, str], ...]) -> str:
    """A ``Set-Cookie`` for the client: no Domain (the public host's then), and a Path
    under a back end's base path made the public one (``Path=/portal/x`` -> ``/x`` for
    base ``http://b/portal``, as nginx's ``proxy_cookie_path``): else the browser never
    sends the cookie back to the public paths dsbc maps to that base."""
    value = _DOMAIN_ATTR.sub("", value)
    m = _PATH_ATTR.search(value)
    if m is None:
        return value
    path = m.group(2).strip()
    for _, prefix in bases:
        if prefix and path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            return value[: m.start(2)] + (path[len(prefix) :] or "/") + value[m.end(2) :]
    return value


def client_head(
    head: ResponseHead, bases: tuple[tuple[str, str], ...], public: str, keep_alive: bool
) -> bytes:
    """The head of the answer to the client for a back end's answer ``head``.

    Text in, octets out: ``head`` holds latin-1 text (``h1.parse_response_head``), and
    ``bases`` (``backend_bases``) / ``public`` are latin-1 text of their octets too."""
    # lines without their CRLF, joined with CRLFs once (see upstream_request)
    out: list[str] = [head.status_line]
    kinds = _RESP_KIND
    listed = head.conn_tokens  # headers the Connection header names: dropped too
    has_ct = has_date = has_server = False
    for lname, name, value, line in head.headers:
        kind = kinds.get(lname, 0)
        if kind == _SKIP or (listed is not None and lname in listed):
            continue
        if kind == 0:
            out.append(line)
            continue
        if kind == _CT:
            has_ct = True
        elif kind == _DATE:
            has_date = True
        elif kind == _SRV:
            has_server = True
        elif kind == _LOC:
            new = public_url(value, bases, public)
            if new is not value:
                line = f"{name}: {new}"
        elif kind == _REFRESH:
            new = public_refresh(value, bases, public)
            if new is not value:
                line = f"{name}: {new}"
        elif kind == _COOKIE:
            line = f"{name}: {public_cookie(value, bases)}"
        out.append(line)
    if head.framing != NO_BODY:
        if head.framing == LENGTH:
            out.append(f"Content-Length: {head.length}")
        else:
            out.append("Transfer-Encoding: chunked")
        if not has_ct and (head.framing != LENGTH or head.length):
            out.append("Content-Type: application/octet-stream")
    if not has_date:
        out.append(f"Date: {date_header()}")
    if not has_server:
        out.append(_SERVER_LINE)
    if not keep_alive:
        out.append("Connection: close")
    out.append("\r\n")
    return "\r\n".join(out).encode("latin-1")


def fault_bytes(exc: DispatchError, keep_alive: bool) -> bytes:
    """The answer ``Forwarder.fault`` gives through aiohttp, as octets."""
    body = exc.body()
    close = exc.close or not keep_alive
    status = exc.http_status
    return b"".join(
        (
            b"HTTP/1.1 %d %b\r\n" % (status, HTTPStatus(status).phrase.encode()),
            b"Content-Type: application/json; charset=utf-8\r\n",
            b"Retry-After: 2\r\n" if exc.reason == "customer_locked" else b"",
            b"Content-Length: %d\r\n" % len(body),
            b"Date: " + date_header().encode() + b"\r\n",
            _SERVER,
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )
