"""The answer heads the fast path writes to a client: pure, no I/O.

``client_head`` is ``upstream.response_headers`` plus what aiohttp's ``StreamResponse``
adds, in aiohttp's order: the back end's headers without hop-by-hop ones (and those its
Connection header names) and without Content-Length, Location and cookie domains made
the public host's; then Content-Length or Transfer-Encoding, a default Content-Type,
Date, Server, and Connection: close when the client asked for it.  ``fault_bytes`` is
``Forwarder.fault`` as octets.  ``tests/test_api_fastpath*.py`` compare both with the
aiohttp path.
"""

from __future__ import annotations

import re
from http import HTTPStatus

from aiohttp.http import SERVER_SOFTWARE

from api_proxy.errors import DispatchError
from api_proxy.h1 import LENGTH, NO_BODY, ResponseHead, date_header
from api_proxy.upstream import HOP_BY_HOP

_SERVER = b"Server: " + SERVER_SOFTWARE.encode() + b"\r\n"
_RESP_SKIP = frozenset(h.encode() for h in HOP_BY_HOP) | {b"content-length"}
_DOMAIN_ATTR = re.compile(rb";\s*domain=[^;]*", re.IGNORECASE)


def client_head(
    head: ResponseHead, backend_origin: bytes, public: bytes, keep_alive: bool
) -> bytes:
    """The head of the answer to the client for a back end's answer ``head``."""
    out = [b"HTTP/1.1 %d %b\r\n" % (head.status, head.reason)]
    skip = _RESP_SKIP
    conn_listed: set[bytes] = set()
    has_ct = has_date = has_server = False
    for lname, _, value in head.headers:
        if lname == b"connection":
            conn_listed.update(t.strip().lower() for t in value.split(b","))
    for lname, name, value in head.headers:
        if lname in skip or lname in conn_listed:
            continue
        if lname == b"content-type":
            has_ct = True
        elif lname == b"date":
            has_date = True
        elif lname == b"server":
            has_server = True
        elif lname == b"location" and value.startswith(backend_origin):
            value = public + value[len(backend_origin) :]
        elif lname == b"set-cookie":
            value = _DOMAIN_ATTR.sub(b"", value)
        out.append(name + b": " + value + b"\r\n")
    if head.framing != NO_BODY:
        if head.framing == LENGTH:
            out.append(b"Content-Length: %d\r\n" % head.length)
        else:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if not has_ct and (head.framing != LENGTH or head.length):
            out.append(b"Content-Type: application/octet-stream\r\n")
    if not has_date:
        out.append(b"Date: " + date_header().encode() + b"\r\n")
    if not has_server:
        out.append(_SERVER)
    if not keep_alive:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def fault_bytes(exc: DispatchError, keep_alive: bool) -> bytes:
    """The answer ``Forwarder.fault`` gives through aiohttp, as octets."""
    body = exc.body()
    close = exc.close or not keep_alive
    return b"".join(
        (
            b"HTTP/1.1 %d %b\r\n" % (exc.http_status, HTTPStatus(exc.http_status).phrase.encode()),
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
