"""HTTP/1.1 framing for the fast path (``fastpath.py``): pure, no I/O.

- ``parse_request_head`` reads a client's request head, and answers None for anything
  the fast path leaves to the aiohttp path (``server.py``): other versions, methods or
  framings, unusual targets, non-ASCII, obs-fold, Expect, Upgrade, Transfer-Encoding,
  repeated Host / Content-Length, a bad Content-Length.  None is not an error: the same
  bytes are handed to aiohttp, which answers them as it always did (400, 431, ...).
- ``parse_response_head`` reads a back end's answer head (strict: anything else is
  ``H1Error``, which the caller turns into ``backend_unavailable``);
- ``origin_form`` reads an absolute-form request target (the aiohttp path takes it);
- ``ChunkedDecoder`` de-frames a chunked body; ``chunk`` frames one piece again.
- ``date_header`` is the Date value aiohttp would send, cached per second.

Perf note: no regular expression runs over a whole head (``sre`` spends tens of
instructions an octet).  One ``bytes.translate`` deletes the octets a line may hold (for
a request: SP and those of a target): what is left of a usual head is its CRLFs and
nothing else, one compare with ``_CRLFS``.  Any other head (HTAB, obs-text, LF line
ends, a stray CR...) is checked octet by octet and line by line, to accept exactly what
the one regex did.  The request or status line is read field by field (no split), and
each header name is looked up in a small memo of names already found to be tokens,
which gives its lowercase (a regex over the name alone for a new one).  The head is
split into lines; header values stay text and nothing is copied beyond the lines
themselves.  A response head is read as latin-1 text (every octet one character, so
``client_head`` gives the same octets back with one ``encode``): mypyc calls ``str``
methods directly, where each ``bytes`` method is a Python-level call.  The header loop
is written out in both parsers: a shared helper returning the 4-tuple was tried and
cost 3.7k instructions a request (mypyc unboxes the optional tuple and boxes it again).  This module and ``h1relay`` are compiled with mypyc where a C
compiler is at hand (``sip/_pure.py``, setup.py): keep them fully annotated, module
constants ``Final``, and free of msgspec Structs and asyncio.
"""

from __future__ import annotations

import re
import sys
import time
from email.utils import formatdate
from typing import Final

#: what the fast path takes; PATCH / PUT / DELETE are rare on the billing API and go
#: the aiohttp way (they would pass too, but nothing is gained by widening the surface)
FAST_METHODS: Final = frozenset({"GET", "POST"})
#: hop-by-hop headers (RFC 9110 7.6.1 and the usual extras): never relayed either way
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)
#: a header name (RFC 9110 5.1); see ``_token_lower``
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: header names already found to be tokens, as sent -> lowercase (interned): one dict
#: lookup instead of a regex call and a ``str.lower``, and the lowercase names are the
#: same objects again and again, so the dict and set lookups that follow find their key
#: by identity.  Bounded (a client may send any names): cleared when it reaches
#: _MAX_GOOD_NAMES
_good_names: Final[dict[str, str]] = {}
_MAX_GOOD_NAMES: Final = 512
#: HTAB, SP and VCHAR: what a header line may hold besides obs-text
_LINE_OCTETS: Final = b"\t" + bytes(range(0x20, 0x7F))
#: what a request head may hold: those and CR, LF
_REQUEST_OCTETS: Final = _LINE_OCTETS + b"\r\n"
#: what a response head may hold besides _LINE_OCTETS: CR, LF and obs-text
_RESPONSE_EXTRA_OCTETS: Final = b"\r\n" + bytes(range(0x80, 0x100))
#: the octets of a fast-path request line: SP and those of a target (RFC 3986 pchar, "/",
#: "?"), which also spell GET, POST and HTTP/1.1
_REQUEST_LINE_OCTETS: Final = (
    b" ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%?"
)
_ODD_PATH: Final = re.compile(r"//|/\.\.?(?:/|$)")
#: request headers that send a request the aiohttp way, whatever their value
_SLOW_REQUEST_HEADERS: Final = frozenset({"transfer-encoding", "expect", "upgrade"})
#: request headers that may appear once only on the fast path
_ONCE: Final = frozenset({"host", "content-length", "connection"})
MAX_CONTENT_LENGTH_DIGITS: Final = 18
MAX_FAST_HEADERS: Final = 100
#: _CRLFS[n]: n CRLFs, what is left of a usual head with n line ends once the octets of
#: its lines are deleted (``bytes.translate``)
_CRLFS: Final[tuple[bytes, ...]] = tuple(b"\r\n" * n for n in range(MAX_FAST_HEADERS))


class H1Error(Exception):
    """A back end's answer that is not valid HTTP/1.1 (remote misbehaviour)."""


class RequestHead:
    """A request head the fast path takes.  ``headers``: (lowercase name, name, value,
    line) in order, where ``line`` is ``f"{name}: {value}"`` (the line as it came when it
    reads so, as the usual one does); ``index``: lowercase name -> first value."""

    __slots__ = ("content_length", "headers", "index", "keep_alive", "method", "target")

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str, str, str]],
        index: dict[str, str],
        content_length: int,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.index = index
        self.content_length = content_length
        self.keep_alive = keep_alive


def _token_lower(name: str) -> str:
    """The lowercase of header name ``name`` when it is a token, else "" (an empty name
    is no token).  A latin-1 name is a token exactly when its lowercase is: ``str.lower``
    maps A-Z to a-z and no other latin-1 character to an ASCII one."""
    lname = _good_names.get(name)
    if lname is not None:
        return lname
    lname = name.lower()
    if _TOKEN.fullmatch(lname) is None:
        return ""
    lname = sys.intern(lname)
    if len(_good_names) >= _MAX_GOOD_NAMES:
        _good_names.clear()
    _good_names[name] = lname
    return lname


def _header(line: str, i: int, name: str) -> tuple[str, str]:
    """(value, line as relayed) of header ``line`` whose colon is at ``i`` and whose name
    is ``name`` (``line[:i]``): the value without the SP / HTAB around it, and
    ``f"{name}: {value}"``, which is ``line`` itself in the usual case (one SP after the
    colon, none after the value): no copy then.  (An unboxed tuple: no allocation.)"""
    n = len(line)
    j = i + 1
    if j < n and ord(line[j]) == 32:
        j += 1
    if j < n:
        first = ord(line[j])
        last = ord(line[n - 1])
        if first != 32 and first != 9 and last != 32 and last != 9:
            value = line[j:]
            if j == i + 2:
                return value, line
            return value, f"{name}: {value}"
        value = line[i + 1 :].strip(" \t")
    else:
        value = ""
        if j == i + 2:
            return value, line
    return value, f"{name}: {value}"


def _request_octets_ok(head: bytes, rest: bytes, crlfs: int, first: int) -> bool:
    """The octet and CR / LF checks of a request head that is not the usual kind.
    ``rest``: what is left of ``head`` once _REQUEST_LINE_OCTETS are deleted;
    ``crlfs``: the CRLFs in it; ``first``: the length of its request line."""
    if rest.translate(None, _REQUEST_OCTETS):
        return False  # an octet other than HTAB, CR, LF, SP and VCHAR
    if rest.count(b"\r") != crlfs or rest.count(b"\n") != crlfs:
        return False  # a CR or LF that is not one of a CRLF
    return not head[:first].translate(None, _REQUEST_LINE_OCTETS)


def parse_request_head(head: bytes) -> RequestHead | None:
    """``head``: the request line and header lines, each ending in CRLF, without the
    blank line.  None: not for the fast path (see the module docstring)."""
    # what is left once the octets of a request line are deleted: in the usual head, its
    # CRLFs and nothing else: no CR or LF of its own, no octet but HTAB, SP and VCHAR, a
    # request line of SP and target octets.  Any other is checked in full
    rest = head.translate(None, _REQUEST_LINE_OCTETS)
    text = head.decode("latin-1")  # ASCII once checked: the same text
    lines = text.split("\r\n")
    crlfs = len(lines) - 1
    if crlfs >= MAX_FAST_HEADERS:
        return None  # near aiohttp's max_headers: it decides
    first = lines[0]
    if lines[-1] or (
        rest != _CRLFS[crlfs] and not _request_octets_ok(head, rest, crlfs, len(first))
    ):
        return None  # not ending in CRLF, a stray CR / LF, another octet, an odd target
    # the request line is "GET " or "POST ", a target without SP, " HTTP/1.1" (what
    # ``split(" ")`` into 3 parts read, without the list and the strings)
    if first.startswith("GET "):
        method = "GET"
        start = 4
    elif first.startswith("POST "):
        method = "POST"
        start = 5
    else:
        return None
    if not first.endswith(" HTTP/1.1"):
        return None
    target = first[start : len(first) - 9]
    if target[:1] != "/" or " " in target:
        return None
    # every match holds "//" or "/.", in the path, so in the target: the two substring
    # tests spare the partition and the regex call
    if "//" in target or "/." in target:
        path = target.partition("?")[0]
        if ("//" in path or "/." in path) and _ODD_PATH.search(path):
            return None
    headers: list[tuple[str, str, str, str]] = []
    index: dict[str, str] = {}
    names = _good_names
    for k in range(1, crlfs):  # lines[1:-1]
        line = lines[k]
        i = line.find(":")
        if i <= 0:
            return None  # no colon, or no name
        name = line[:i]
        lname = names.get(name)
        if lname is None:
            lname = _token_lower(name)
            if not lname:
                return None
        value, out = _header(line, i, name)
        if lname in index:
            if lname in _ONCE:
                return None
        else:
            if lname in _SLOW_REQUEST_HEADERS:
                return None
            index[lname] = value
        headers.append((lname, name, value, out))
    if not index.get("host"):
        return None
    length = 0
    cl = index.get("content-length")
    if cl is not None:
        if not cl.isdigit() or len(cl) > MAX_CONTENT_LENGTH_DIGITS or method == "GET":
            return None
        length = int(cl)
    keep_alive = True
    conn = index.get("connection")
    if conn is not None:
        token = conn.lower()
        if token == "close":
            keep_alive = False
        elif token != "keep-alive":
            return None  # other tokens name headers to drop: the aiohttp path does that
    return RequestHead(method, target, headers, index, length, keep_alive)


def origin_form(target: str) -> tuple[str, str] | None:
    """(authority, origin-form target) of an absolute-form request target
    (``http://host:port/path?query``), None for any other target.  RFC 9112 3.2.2: a
    server MUST accept the absolute form, and the Host is then the URI's authority (the
    Host header, if any, is ignored).  A userinfo (``user@``) is no request target
    (RFC 9110 4.2.4): None."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    end = len(rest)
    for ch in "/?":
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority = rest[:end]
    if "@" in authority or "#" in rest:
        return None
    path = rest[end:]
    return authority, path if path.startswith("/") else "/" + path


# --- answers from a back end -----------------------------------------------------------------

_NOT_HTTP: Final = "the back end's answer is not valid HTTP/1.x"
#: the largest answer head taken from a back end, on both paths (the fast path's pool,
#: and aiohttp's client per line: ``upstream.Backend``); nginx's default is 4 or 8 kB
#: (``proxy_buffer_size``), but a billing system's long cookies and CSP headers pass
MAX_RESPONSE_HEAD: Final = 65536
#: no body whatever the headers say (RFC 9112 6.3)
EMPTY_BODY_STATUS: Final = frozenset({204, 304})

NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3


def response_head_end(buf: bytes) -> tuple[int, int]:
    """(end of the head, start of the body) of a back end's answer in ``buf``: the head
    is ``buf[:end]`` without its blank line (what ``parse_response_head`` takes), the
    body starts at ``start``; (-1, -1) while the blank line has not come.  Lines end in
    CRLF or in a bare LF (RFC 9112 2.2), so the blank line is the first LF CRLF or LF
    LF: the usual CRLF head is found by one search, and LF LF is looked for before it
    only (a bounded search: a body may hold either)."""
    crlf = buf.find(b"\n\r\n")
    lf = buf.find(b"\n\n", 0, crlf if crlf >= 0 else len(buf))
    if lf >= 0:
        return (lf - 1 if lf and buf[lf - 1] == 13 else lf), lf + 2
    if crlf < 0:
        return -1, -1
    return (crlf - 1 if crlf and buf[crlf - 1] == 13 else crlf), crlf + 3


class ResponseHead:
    """A back end's answer head.  ``headers``: (lowercase name, name, value, line) in
    order, ``line`` as in ``RequestHead``.  ``reason`` and the headers are the octets as
    latin-1 text.  ``conn_tokens``: the lowercase tokens of its Connection headers, None
    without one.  ``status_line``: ``f"HTTP/1.1 {status} {reason}"``, the status line as
    it came in the usual case."""

    __slots__ = (
        "conn_tokens",
        "framing",
        "headers",
        "keep_alive",
        "length",
        "reason",
        "status",
        "status_line",
    )

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str, str, str]],
        framing: int,
        length: int,
        keep_alive: bool,
        conn_tokens: frozenset[str] | None = None,
        status_line: str = "",
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.framing = framing
        self.length = length
        self.keep_alive = keep_alive
        self.conn_tokens = conn_tokens
        self.status_line = status_line or f"HTTP/1.1 {status} {reason}"


#: what ``bytes.strip()`` strips (``str.strip()`` strips more: \x1c-\x1f, \x85, \xa0)
ASCII_SPACE: Final = " \t\n\r\x0b\x0c"


def _check_response_lines(text: str) -> None:
    """The lines of an answer head that is not plain CRLF: each ends in LF (the last one
    at the end of the head), one CR may come before each end, and the header lines are
    ``token:value``.  H1Error if not."""
    lines = text.split("\n")
    for i in range(len(lines)):
        line = lines[i]
        if line[-1:] == "\r":
            line = line[:-1]
        if "\r" in line:
            raise H1Error(_NOT_HTTP)
        if i:
            colon = line.find(":")
            if colon <= 0 or not _token_lower(line[:colon]):
                raise H1Error(_NOT_HTTP)


#: _conn_tokens' answers for the Connection values seen ("keep-alive", "close"...)
_CONN_TOKENS: Final[dict[str, frozenset[str]]] = {}
_CONN_TOKENS_SIZE: Final = 64
_CONN_TOKEN_LEN: Final = 256


def _conn_tokens(conn: str) -> frozenset[str]:
    """The lowercase tokens of a Connection value, kept for short values (emptied when
    full): a back end sends the same one or two values again and again."""
    tokens = _CONN_TOKENS.get(conn)
    if tokens is None:
        tokens = frozenset([t.strip(ASCII_SPACE) for t in conn.lower().split(",")])
        if len(conn) <= _CONN_TOKEN_LEN:
            if len(_CONN_TOKENS) >= _CONN_TOKENS_SIZE:
                _CONN_TOKENS.clear()
            _CONN_TOKENS[conn] = tokens
    return tokens


def parse_response_head(head: bytes) -> ResponseHead:
    """A back end's status line and headers (CRLF or LF line ends, no blank line).

    The text is latin-1: header names are tokens (ASCII), so ``str.lower`` lowers them
    as ``bytes.lower`` would; in values, no latin-1 letter lowers to an ASCII one, so the
    Connection / Transfer-Encoding tokens compare as the octets would."""
    # the status line: HTTP/1.0 or 1.1, a status 100-999, then the end of the line or
    # SP and a reason phrase (its octets are checked with the rest of the head)
    n = len(head)
    if n < 12 or not head.startswith(b"HTTP/1."):
        raise H1Error(_NOT_HTTP)
    minor = head[7]
    d0 = head[9] - 48
    d1 = head[10] - 48
    d2 = head[11] - 48
    if (
        (minor != 48 and minor != 49)
        or head[8] != 32
        or not (1 <= d0 <= 9 and 0 <= d1 <= 9 and 0 <= d2 <= 9)
        or (n > 12 and head[12] != 32 and head[12] != 13 and head[12] != 10)
    ):
        raise H1Error(_NOT_HTTP)
    status = d0 * 100 + d1 * 10 + d2
    text = head.decode("latin-1")
    # lines end in CRLF or LF, the head may end in CR, and there is no other CR.  What is
    # left of a ``plain`` head (the usual one) once HTAB, SP and VCHAR are deleted is its
    # CRLFs: the loop below checks its header lines.  Any other is checked here first
    rest = head.translate(None, _LINE_OCTETS)
    plain = False
    if "\r\n" in text:
        lines = text.split("\r\n")
        crlfs = len(lines) - 1
        plain = crlfs < MAX_FAST_HEADERS and rest == _CRLFS[crlfs]
    else:
        lines = text.split("\n")
    if not plain:
        if rest.translate(None, _RESPONSE_EXTRA_OCTETS):
            raise H1Error(_NOT_HTTP)  # a control octet
        _check_response_lines(text)
        # every line ends in LF with at most one CR before it (checked above), the last
        # may end in a CR alone: one split reads CRLF, LF and mixed heads alike
        lines = [line.rstrip("\r") for line in text.split("\n")]
    first = lines[0]
    reason = first[13:]
    # HTTP/1.1 and a reason (maybe empty): the line as relayed
    status_line = first if minor == 49 and n > 12 and head[12] == 32 else ""
    headers: list[tuple[str, str, str, str]] = []
    cl: str | None = None
    te = ""
    conn = ""
    two_cl = False
    names = _good_names
    # (a head that is not plain had its header lines checked: each has a token name)
    for k in range(1, len(lines)):
        raw = lines[k]
        i = raw.find(":")
        if i <= 0:
            raise H1Error(_NOT_HTTP)  # no colon, or no name
        name = raw[:i]
        lname = names.get(name)
        if lname is None:
            lname = _token_lower(name)
            if not lname:
                raise H1Error(_NOT_HTTP)
        value, out = _header(raw, i, name)
        if lname == "content-length":
            if cl is not None and cl != value:
                two_cl = True  # raised after the loop: a bad line later is reported first
            cl = value
        elif lname == "transfer-encoding":
            te = te + "," + value if te else value
        elif lname == "connection":
            conn = conn + "," + value if conn else value
        headers.append((lname, name, value, out))
    if two_cl:
        raise H1Error("the back end's answer has two Content-Length values")
    keep_alive = minor == 49
    tokens: frozenset[str] | None = None
    if conn:
        tokens = _conn_tokens(conn)
        keep_alive = "close" not in tokens and (keep_alive or "keep-alive" in tokens)
    length = 0
    if 100 <= status < 200 or status in EMPTY_BODY_STATUS:
        framing = NO_BODY
    elif te:
        if te.lower().rsplit(",", 1)[-1].strip(ASCII_SPACE) != "chunked":
            framing, keep_alive = UNTIL_CLOSE, False
        else:
            framing = CHUNKED
            keep_alive = keep_alive and cl is None
    elif cl is not None:
        # str.isdigit also takes the latin-1 digits ¹ ² ³; bytes.isdigit is ASCII only
        if not (cl.isdigit() and cl.isascii()) or len(cl) > MAX_CONTENT_LENGTH_DIGITS:
            raise H1Error("the back end's answer has a bad Content-Length")
        framing, length = LENGTH, int(cl)
    else:
        framing, keep_alive = UNTIL_CLOSE, False
    return ResponseHead(status, reason, headers, framing, length, keep_alive, tokens, status_line)


class ChunkedDecoder:
    """De-frames a chunked body fed piece by piece (extensions and trailers dropped)."""

    __slots__ = ("buf", "done", "left")

    MAX_LINE: Final = 4096

    def __init__(self) -> None:
        self.buf = b""
        self.left = 0  # octets of data left in the current chunk (+2 for its CRLF), -1: trailers
        self.done = False

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """(data pieces, octets after the end of the body)."""
        out: list[bytes] = []
        buf = self.buf + data if self.buf else data
        pos = 0
        n = len(buf)
        while pos < n and not self.done:
            if self.left > 2:
                take = min(self.left - 2, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.left -= take
                continue
            if self.left > 0:  # the CRLF after a chunk's data
                take = min(self.left, n - pos)
                if buf[pos : pos + take] != b"\r\n"[2 - self.left : 2 - self.left + take]:
                    raise H1Error("a chunk of the back end's answer is not framed")
                pos += take
                self.left -= take
                continue
            end = buf.find(b"\n", pos)
            if end < 0:
                if n - pos > self.MAX_LINE:
                    raise H1Error("a chunk size line of the back end's answer is too long")
                break
            line = buf[pos:end].rstrip(b"\r")
            pos = end + 1
            if self.left < 0:  # trailers, up to the blank line
                if not line:
                    self.done = True
                continue
            size = line.split(b";", 1)[0].strip()
            if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise H1Error("a chunk size of the back end's answer is not valid")
            k = int(size, 16)
            self.left = k + 2 if k else -1
        self.buf = buf[pos:] if not self.done else b""
        return out, (buf[pos:] if self.done else b"")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"

_date_cache: tuple[int, str] = (0, "")


def date_header() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]
