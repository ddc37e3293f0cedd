"""The heads the fast path writes, to a back end and to a client: pure, no I/O.

``upstream_request`` is ``upstream.request_headers`` as octets: the client's request
for a back end, hop-by-hop headers removed, X-Forwarded-* set, in aiohttp's client
order.  ``client_head`` is ``upstream.response_headers`` plus what aiohttp's
``StreamResponse`` adds, in aiohttp's order: the back end's headers without hop-by-hop
ones (and those its Connection header names) and without Content-Length, Location and
cookie domains made the public host's; then Content-Length or Transfer-Encoding, a
default Content-Type, Date, Server, and Connection: close when the client asked for it.
``fault_bytes`` is ``Forwarder.fault`` as octets.  ``tests/test_api_fastpath*.py``
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
    ASCII_SPACE,
    HOP_BY_HOP,
    LENGTH,
    NO_BODY,
    RequestHead,
    ResponseHead,
    date_header,
)

_SERVER: Final[bytes] = b"Server: " + str(SERVER_SOFTWARE).encode() + b"\r\n"
_SERVER_TEXT: Final = _SERVER.decode("latin-1")
_RESP_SKIP: Final = HOP_BY_HOP | {"content-length"}
#: re.ASCII: \s and IGNORECASE as in the bytes pattern this was (ASCII only)
_DOMAIN_ATTR: Final = re.compile(r";\s*domain=[^;]*", re.IGNORECASE | re.ASCII)
#: request headers never sent on ("close": a Connection token aiohttp treats as a name)
_REQ_SKIP: Final = HOP_BY_HOP | {"host", "content-length", "expect", "close"}
#: X-Forwarded-* as sent, by lowercase name, in the order they are added when absent
_FORWARDED: Final = {
    "x-forwarded-for": "X-Forwarded-For",
    "x-forwarded-proto": "X-Forwarded-Proto",
    "x-forwarded-host": "X-Forwarded-Host",
    "x-real-ip": "X-Real-IP",
}


def upstream_request(
    req: RequestHead, target: str, host_header: str, ip: str, proto: str, body: bytes
) -> bytes:
    """The request for a back end: ``target`` (the origin's path prefix, the path and
    query), its Host, the client's headers less hop-by-hop ones, X-Forwarded-* for
    client ``ip`` over ``proto`` (a client's own replaced in place, repeats dropped),
    Content-Length unless GET, then ``body``."""
    index = req.index
    xff = index.get("x-forwarded-for")
    fwd: dict[str, str] = {
        "x-forwarded-for": xff + ", " + ip if xff else ip,
        "x-forwarded-proto": proto,
        "x-forwarded-host": index["host"],
        "x-real-ip": ip,
    }
    named = _FORWARDED
    skip = _REQ_SKIP
    # one f-string per line (mypyc builds it in one allocation), joined once
    lines: list[str] = [f"{req.method} {target} HTTP/1.1\r\nHost: {host_header}\r\n"]
    for name, value in req.headers:
        lname = name.lower()
        if lname in skip:
            continue
        if lname in named:
            if lname in fwd:  # the first one is replaced; a repeat is dropped
                lines.append(f"{named[lname]}: {fwd.pop(lname)}\r\n")
            continue
        lines.append(f"{name}: {value}\r\n")
    for lname, value in fwd.items():
        lines.append(f"{named[lname]}: {value}\r\n")
    if req.method != "GET":
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("ascii")
    return head + body if body else head


def client_head(head: ResponseHead, backend_origin: str, public: str, keep_alive: bool) -> bytes:
    """The head of the answer to the client for a back end's answer ``head``.

    Text in, octets out: ``head`` holds latin-1 text (``h1.parse_response_head``), and
    ``backend_origin`` / ``public`` are latin-1 text of their octets too."""
    out: list[str] = [f"HTTP/1.1 {head.status} {head.reason}\r\n"]
    skip = _RESP_SKIP
    conn_listed: set[str] = set()
    has_ct = has_date = has_server = False
    for lname, _, value in head.headers:
        if lname == "connection":
            for t in value.split(","):
                conn_listed.add(t.strip(ASCII_SPACE).lower())
    for lname, name, value in head.headers:
        if lname in skip or lname in conn_listed:
            continue
        if lname == "content-type":
            has_ct = True
        elif lname == "date":
            has_date = True
        elif lname == "server":
            has_server = True
        elif lname == "location" and value.startswith(backend_origin):
            value = public + value[len(backend_origin) :]
        elif lname == "set-cookie":
            value = _DOMAIN_ATTR.sub("", value)
        out.append(f"{name}: {value}\r\n")
    if head.framing != NO_BODY:
        if head.framing == LENGTH:
            out.append(f"Content-Length: {head.length}\r\n")
        else:
            out.append("Transfer-Encoding: chunked\r\n")
        if not has_ct and (head.framing != LENGTH or head.length):
            out.append("Content-Type: application/octet-stream\r\n")
    if not has_date:
        out.append(f"Date: {date_header()}\r\n")
    if not has_server:
        out.append(_SERVER_TEXT)
    if not keep_alive:
        out.append("Connection: close\r\n")
    out.append("\r\n")
    return "".join(out).encode("latin-1")


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
