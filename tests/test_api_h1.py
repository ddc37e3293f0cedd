"""The head parsers of ``api_proxy.h1`` (compiled or pure) accept and reject exactly the
heads the regular expressions they replaced did, and read them the same way.

``reference_parse_request_head`` / ``reference_parse_response_head`` below are verbatim
copies of the regex-based parsers (with their regexes) as they were before the fast
checks (octet translate, CR / LF counts, field-by-field request / status line, memoised
token names) replaced the one ``fullmatch`` over the whole head.  They are THE REFERENCE
the fast checks must match: do not edit them to follow a change of ``h1``.

One deliberate departure, marked where it is: the old line split read a head with mixed
line ends wrongly (``HTTP/1.1 200 OK\nA: b\r\nC: d`` gave the reason ``OK\nA: b`` and
lost header A; a trailing CR stayed in the last value).  The reference splits such a
head on LF and drops the CR before each, as the grammar it checks reads it.
"""

from __future__ import annotations

import re
from typing import Final

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from api_proxy import h1
from api_proxy.h1 import (
    _ODD_PATH,
    _ONCE,
    _SLOW_REQUEST_HEADERS,
    ASCII_SPACE,
    CHUNKED,
    EMPTY_BODY_STATUS,
    LENGTH,
    MAX_CONTENT_LENGTH_DIGITS,
    MAX_FAST_HEADERS,
    NO_BODY,
    UNTIL_CLOSE,
    H1Error,
    RequestHead,
    ResponseHead,
)

# --- THE REFERENCE: verbatim copy of the regex-based parsers (h1.py before the change) ---

_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_HEAD: Final = re.compile(
    rb"(GET|POST) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*) HTTP/1\.1\r\n"
    rb"(?:" + _TOKEN + rb":[\t -~]*\r\n)*"
)


def reference_parse_request_head(head: bytes) -> RequestHead | None:
    """``head``: the request line and header lines, each ending in CRLF, without the
    blank line.  None: not for the fast path (see the module docstring)."""
    m = _REQUEST_HEAD.fullmatch(head)
    if m is None:
        return None
    text = head.decode("ascii")
    lines = text.split("\r\n")
    if len(lines) > MAX_FAST_HEADERS:
        return None  # near aiohttp's max_headers: it decides
    method, target, _ = lines[0].split(" ")
    path = target.partition("?")[0]
    # every match holds "//" or "/.": the two substring tests spare the regex call
    if ("//" in path or "/." in path) and _ODD_PATH.search(path):
        return None
    headers: list[tuple[str, str]] = []
    index: dict[str, str] = {}
    for line in lines[1:-1]:
        name, _, value = line.partition(":")
        lname = name.lower()
        value = value.strip(" \t")
        if lname in index:
            if lname in _ONCE:
                return None
        else:
            if lname in _SLOW_REQUEST_HEADERS:
                return None
            index[lname] = value
        headers.append((name, value))
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


_RESPONSE_HEAD: Final = re.compile(
    rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [\t -~\x80-\xff]*)?"
    rb"(?:\r?\n" + _TOKEN + rb":[\t -~\x80-\xff]*)*\r?"
)


def reference_parse_response_head(head: bytes) -> ResponseHead:
    """A back end's status line and headers (CRLF or LF line ends, no blank line).

    The text is latin-1: header names are tokens (ASCII), so ``str.lower`` lowers them
    as ``bytes.lower`` would; in values, no latin-1 letter lowers to an ASCII one, so the
    Connection / Transfer-Encoding tokens compare as the octets would."""
    m = _RESPONSE_HEAD.fullmatch(head)
    if m is None:
        raise H1Error("the back end's answer is not valid HTTP/1.x")
    minor, status = m.group(1), int(m.group(2))
    text = head.decode("latin-1")
    # DEPARTURE from the old code (see the module docstring): every head split on LF
    lines = [line.rstrip("\r") for line in text.split("\n")]
    reason = lines[0][13:]
    headers: list[tuple[str, str, str]] = []
    cl: str | None = None
    te = ""
    conn = ""
    for raw in lines[1:]:
        name, _, value = raw.partition(":")
        value = value.strip(" \t")
        lname = name.lower()
        if lname == "content-length":
            if cl is not None and cl != value:
                raise H1Error("the back end's answer has two Content-Length values")
            cl = value
        elif lname == "transfer-encoding":
            te = te + "," + value if te else value
        elif lname == "connection":
            conn = conn + "," + value if conn else value
        headers.append((lname, name, value))
    keep_alive = minor == b"1"
    if conn:
        tokens = {t.strip(ASCII_SPACE) for t in conn.lower().split(",")}
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
    return ResponseHead(status, reason, headers, framing, length, keep_alive)


# --- END OF THE REFERENCE ---------------------------------------------------------------------


def header_fields(headers: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The headers of a head as the reference gives them: (name, value) for a request,
    (lowercase name, name, value) for an answer.  h1 gives (lowercase name, name, value,
    line) for both: the lowercase name and the line are checked here."""
    out: list[tuple[str, ...]] = []
    for h in headers:
        if len(h) == 4:
            lname, name, value, line = h
            assert lname == name.lower() and line == f"{name}: {value}", h
            h = (name, value)
        out.append(h)
    return out


def request_fields(r: RequestHead | None) -> object:
    if r is None:
        return None
    fields = (r.method, r.target, header_fields(r.headers), r.index, r.content_length, r.keep_alive)
    assert all(type(x) is type(y) for x, y in zip(fields, ("", "", [], {}, 0, True)))
    return fields


def response_fields(head: bytes, parse: object) -> object:
    try:
        r = parse(head)  # type: ignore[operator]
    except H1Error as exc:
        return ("H1Error", str(exc))
    headers = [(h[0], *header_fields([h])[0]) if len(h) == 4 else h for h in r.headers]
    fields = (r.status, r.reason, headers, r.framing, r.length, r.keep_alive)
    assert all(type(x) is type(y) for x, y in zip(fields, (0, "", [], 0, 0, True)))
    assert r.status_line == f"HTTP/1.1 {r.status} {r.reason}", head
    if parse is not reference_parse_response_head:
        # the tokens of the Connection headers (client_head drops the headers they name;
        # an empty token names none)
        conns = [h[2] for h in r.headers if h[0] == "connection"]
        want = {t.strip(ASCII_SPACE).lower() for v in conns for t in v.split(",")} - {""}
        assert (r.conn_tokens or set()) - {""} == want, head
        assert (r.conn_tokens is None) == (not "".join(conns)), head
    return fields


def same_request(head: bytes) -> None:
    want = request_fields(reference_parse_request_head(head))
    got = request_fields(h1.parse_request_head(head))
    assert got == want, head


def same_response(head: bytes) -> None:
    want = response_fields(head, reference_parse_response_head)
    got = response_fields(head, h1.parse_response_head)
    assert got == want, head


# --- generated heads: mostly well formed, then mutated -----------------------------------------
#
# Each part of a head has a well-formed strategy and an odd one; ``pick`` takes the odd one
# for about ``wild`` parts in 10, ``wild`` drawn once per head (most heads: 0, well formed),
# and ``mutated`` then inserts / replaces / deletes a few octets in some of them.

#: octets a mutation puts in, the interesting ones often
SPECIAL: Final = b"\r\n\t :\x7f\x80\xff\x00/?.%"
octet = st.one_of(st.sampled_from(list(SPECIAL)), st.integers(0, 255))
TOKEN_CHARS: Final = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TARGET_CHARS: Final = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%?"
)
VALUE_CHARS: Final = "".join(map(chr, range(0x20, 0x7F))) + "\t"
LATIN1_VALUE_CHARS: Final = VALUE_CHARS + "".join(map(chr, range(0x80, 0x100)))


def pick(
    draw: st.DrawFn, wild: int, good: st.SearchStrategy[str], odd: st.SearchStrategy[str]
) -> str:
    return draw(odd if draw(st.integers(0, 9)) < wild else good)


good_eol = st.just("\r\n")
odd_eol = st.sampled_from(["\n", "\r", "\r\r\n", "\n\r", "", "\r\n\r\n", " \r\n"])
good_name = st.one_of(
    st.sampled_from(
        [
            "Host",
            "host",
            "HOST",
            "Content-Length",
            "content-length",
            "Connection",
            "Transfer-Encoding",
            "Expect",
            "Upgrade",
            "Content-Type",
            "Authorization",
            "Server",
            "Date",
            "Keep-Alive",
            "X-Forwarded-For",
            "ETag",
            "x",
            "Accept",
        ]
    ),
    st.text(TOKEN_CHARS, min_size=1, max_size=12),
)
odd_name = st.one_of(
    st.sampled_from(
        [
            "",
            " Host",
            "Host ",
            "Ho st",
            "H\xf6st",
            "Host\t",
            "a(b)",
            "x@y",
            'a"b',
            "a,b",
            "a/b",
            "a[b]",
            "{",
            "\x7f",
        ]
    ),
    st.text(min_size=0, max_size=6),
)
good_sep = st.sampled_from([":", ": ", ": ", ":  ", ":\t", ": \t"])
odd_sep = st.sampled_from([" :", "", "::", "\t:", ";"])
good_value = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "127.0.0.1:8443",
            "example.com",
            " 12 ",
            "0",
            "12",
            "00012",
            "-1",
            "1e3",
            "123456789012345678",
            "1234567890123456789",
            "close",
            "keep-alive",
            "Keep-Alive",
            " close ",
            "Upgrade",
            "close, keep-alive",
            "chunked",
            "gzip, chunked",
            "gzip",
            "chunked, gzip",
            "identity",
            "application/json",
            "\tx\t",
            "a:b:c",
            "x ,close",
        ]
    ),
    st.text(VALUE_CHARS, max_size=30),
)
odd_value = st.one_of(
    st.sampled_from(["\xb2", "1\xb9", "caf\xe9", "\x7f", "a\x00b", "\x80\xff"]),
    st.text(LATIN1_VALUE_CHARS, max_size=12),
    st.text(max_size=8),
)


@st.composite
def header_lines(draw: st.DrawFn, wild: int, host: bool) -> list[str]:
    """Header lines without their line ends."""
    lines = []
    for _ in range(draw(st.integers(0, 7))):
        lines.append(
            pick(draw, wild, good_name, odd_name)
            + pick(draw, wild, good_sep, odd_sep)
            + pick(draw, wild, good_value, odd_value)
        )
    if host and pick(draw, wild, st.just("y"), st.just("")):
        lines.insert(draw(st.integers(0, len(lines))), "Host: 127.0.0.1:8443")
    return lines


@st.composite
def mutated(draw: st.DrawFn, text: str, wild: int) -> bytes:
    wide = any(ord(c) > 0xFF for c in text)
    data = bytearray(text.encode("utf-8" if wide else "latin-1"))
    if not draw(st.integers(0, 9)) < wild + 1:
        return bytes(data)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "replace", "delete", "line end"]))
        if op == "insert":
            data[pos:pos] = bytes([draw(octet)])
        elif op == "replace" and pos < len(data):
            data[pos] = draw(octet)
        elif op == "delete" and pos < len(data):
            del data[pos]
        elif op == "line end":
            data[pos:pos] = draw(st.sampled_from([b"\r\n", b"\r", b"\n", b"\r\r\n", b"\r\n\r\n"]))
    return bytes(data)


wildness = st.sampled_from([0, 0, 0, 0, 1, 1, 2, 3, 5, 10])
good_target = st.one_of(
    st.sampled_from(
        [
            "/",
            "/rest/Account/get_account_info",
            "/a?b=c",
            "/a//b",
            "/a/./b",
            "/a/../b",
            "/a/.",
            "/..",
            "/a/.b",
            "/?x=//",
            "/a%20b",
            "/a?b/../c",
            "/~u/(x)*",
            "/a:b@c;d=e",
        ]
    ),
    st.text(TARGET_CHARS, max_size=20).map(lambda t: "/" + t),
)
odd_target = st.sampled_from(
    [
        "",
        "*",
        "http://h/a",
        "a/b",
        "/a b",
        "/a#f",
        "/a\tb",
        "/[x]",
        '/a"b',
        "/a{b}",
        "/a|b",
        "/a\\b",
        "/a^b",
        "/a`b",
        "/a<b>",
        "/\xe9",
        "/a\x7f",
    ]
)
good_method = st.sampled_from(["GET", "POST"])
odd_method = st.sampled_from(["PUT", "get", "GETT", "", "HEAD", "POS", "GET ", " GET"])
good_version = st.just("HTTP/1.1")
odd_version = st.sampled_from(["HTTP/1.0", "HTTP/2", "HTTP/1.1 ", "http/1.1", "", "HTTP/1.11"])
good_space = st.just(" ")
odd_space = st.sampled_from(["", "  ", "\t", " \t"])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    wild = draw(wildness)
    line = (
        pick(draw, wild, good_method, odd_method)
        + pick(draw, wild, good_space, odd_space)
        + pick(draw, wild, good_target, odd_target)
        + pick(draw, wild, good_space, odd_space)
        + pick(draw, wild, good_version, odd_version)
    )
    text = "".join(
        line + pick(draw, wild, good_eol, odd_eol)
        for line in [line, *draw(header_lines(wild, True))]
    )
    return draw(mutated(text, wild))


good_status = st.one_of(
    st.sampled_from(["200", "204", "304", "100", "101", "404"]), st.integers(100, 999).map(str)
)
odd_status = st.sampled_from(
    ["099", "000", "1000", "20a", "2 0", "20", "", " 200", "\xb200", "1x0", "-20"]
)
good_reason = st.one_of(
    st.sampled_from(["", " OK", " Not Found", " ", "  OK", " OK\t", " Gr\xfc\xdfe", " \x80\xff"]),
    st.text(LATIN1_VALUE_CHARS, max_size=12).map(lambda t: " " + t),
)
odd_reason = st.sampled_from(["OK", "\tOK", " a\x7fb", " a\x00", "x"])
good_response_version = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"])
odd_response_version = st.sampled_from(["HTTP/1.2", "HTTP/2.0", "HTTP/1.", "http/1.1", "HTTP/11"])


framing_header = st.tuples(
    st.sampled_from(["Content-Length", "content-length", "Transfer-Encoding", "Connection"]),
    st.sampled_from([": ", ":"]),
    st.one_of(
        st.sampled_from(
            ["chunked", "gzip, chunked", "close", "keep-alive", "0", "12", " 12 ", "\xb2"]
        ),
        st.integers(0, 10**19).map(str),
    ),
).map("".join)


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    wild = draw(wildness)
    status_line = (
        pick(draw, wild, good_response_version, odd_response_version)
        + pick(draw, wild, good_space, odd_space)
        + pick(draw, wild, good_status, odd_status)
        + pick(draw, wild, good_reason, odd_reason)
    )
    headers = draw(header_lines(wild, False))
    for _ in range(draw(st.integers(0, 2))):  # the headers that decide the framing
        headers.insert(draw(st.integers(0, len(headers))), draw(framing_header))
    # line ends: CRLF (what fastpool cuts at CRLF CRLF), LF, or mixed; then an odd one now
    # and then, and sometimes something after the last line
    style = draw(st.sampled_from(["\r\n"] * 6 + ["\n", "mixed"]))
    text = status_line
    for line in headers:
        end = draw(st.sampled_from(["\r\n", "\n"])) if style == "mixed" else style
        text += pick(draw, wild, st.just(end), odd_eol) + line
    text += pick(
        draw,
        wild,
        st.sampled_from(["", "", "", "\r"]),
        st.sampled_from(["\r", "\n", "\r\n", "\r\r", "\n\r"]),
    )
    return draw(mutated(text, wild))


FEW: Final = settings(
    max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@FEW
@given(request_heads())
@example(b"GET / HTTP/1.1\r\nHost: h\r\n")
@example(b"GET / HTTP/1.1\r\nHost: h\r\n\r")
@example(b"GET / HTTP/1.1\r\nHost: h\n")
@example(b"GET / HTTP/1.1\r\nHost: h\r\r\n")
def test_request_head_as_the_regex_read_it(head: bytes) -> None:
    same_request(head)


@FEW
@given(response_heads())
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 3")
@example(b"HTTP/1.1 200 OK\nA: b\r\nC: d")
def test_response_head_as_the_regex_read_it(head: bytes) -> None:
    same_response(head)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=40).map(lambda b: b"GET / HTTP/1.1\r\nHost: h\r\n" + b))
def test_request_head_any_octets(head: bytes) -> None:
    same_request(head)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=40).map(lambda b: b"HTTP/1.1 200" + b))
def test_response_head_any_octets(head: bytes) -> None:
    same_response(head)


REQUESTS: Final = [
    b"",
    b"\r\n",
    b"GET / HTTP/1.1\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n",
    b"GET / HTTP/1.1\r\nHost: h",  # no CRLF at the end
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",  # a blank line inside
    b"GET / HTTP/1.1\nHost: h\r\n",  # bare LF
    b"GET / HTTP/1.1\r\nHost: h\r\r\n",  # CR CR LF
    b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n",  # bare CR
    b"GET / HTTP/1.1\r\nHost\r\n",  # no colon
    b"GET / HTTP/1.1\r\n: h\r\nHost: h\r\n",  # empty name
    b"GET / HTTP/1.1\r\nHost : h\r\n",  # space before the colon
    b"GET / HTTP/1.1\r\nHost: h\x7f\r\n",
    b"GET / HTTP/1.1\r\nHost: h\x80\r\n",
    b"GET / HTTP/1.1\r\nHost: \th\t\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n X: folded\r\n",  # obs-fold
    b"GET /\t HTTP/1.1\r\nHost: h\r\n",
    b"GET  / HTTP/1.1\r\nHost: h\r\n",
    b"GET / HTTP/1.1 \r\nHost: h\r\n",
    b"GET / HTTP/1.0\r\nHost: h\r\n",
    b"HEAD / HTTP/1.1\r\nHost: h\r\n",
    b"GET * HTTP/1.1\r\nHost: h\r\n",
    b"GET /a#b HTTP/1.1\r\nHost: h\r\n",
    b"POST /a?b=c:d@e HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n",
    b"GET /a/../b HTTP/1.1\r\nHost: h\r\n",
    b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\nX:\r\n",
    b"GET /a HTTP/1.1\r\nhost: h\r\nHOST: i\r\n",
    b"GET /a HTTP/1.1\r\nHost: h\r\nX-Y: a:b\r\n",
]

RESPONSES: Final = [
    b"",
    b"HTTP/1.1",
    b"HTTP/1.1 20",
    b"HTTP/1.1 200",
    b"HTTP/1.1 200 ",
    b"HTTP/1.1 200\r",
    b"HTTP/1.1 200\n",
    b"HTTP/1.1 200\r\n",
    b"HTTP/1.1 200\rX: y",
    b"HTTP/1.1 2000",
    b"HTTP/1.1 20a",
    b"HTTP/1.1 099",
    b"HTTP/1.2 200",
    b"HTTP/1.1  200",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\r",
    b"HTTP/1.1 200 OK\r\r\nContent-Length: 3",
    b"HTTP/1.1 200 OK\nContent-Length: 3\nConnection: close",
    b"HTTP/1.1 200 OK\nContent-Length: 3\r\nConnection: close",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\nConnection: close",
    b"HTTP/1.1 200 OK\r\nA: b\r\nC: d\nE: f",
    b"HTTP/1.1 200 OK\r\n\r\nA: b",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\nBad Name: x",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2",
    b"HTTP/1.0 200 Gr\xfc\xdfe\r\nConnection: keep-alive\r\nX: \x80\xff",
    b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3",
    b"HTTP/1.1 200 OK\r\nX: a\x00b",
    b"HTTP/1.1 200 OK\r\nX: a\x7fb",
    b"HTTP/1.1 200 OK\r\nX\xe9: a",
]


@pytest.mark.parametrize("head", REQUESTS)
def test_request_edge_cases(head: bytes) -> None:
    same_request(head)


@pytest.mark.parametrize("head", RESPONSES)
def test_response_edge_cases(head: bytes) -> None:
    same_response(head)


def test_many_header_names_keep_the_memo_bounded() -> None:
    """More distinct names than the memo holds: it is cleared, and still right after."""
    for i in range(1300):
        same_request(b"GET / HTTP/1.1\r\nHost: h\r\nX-%d: v\r\n" % i)
        same_response(b"HTTP/1.1 200 OK\r\nY-%d: v\r\nContent-Length: 0" % i)
        assert len(h1._good_names) <= h1._MAX_GOOD_NAMES
    for bad in (b"X %d", b"X\t%d", b"X(%d)", b"X\xe9%d"):
        same_request(b"GET / HTTP/1.1\r\nHost: h\r\n" + bad % 1 + b": v\r\n")
        same_response(b"HTTP/1.1 200 OK\r\n" + bad % 1 + b": v")


def test_the_edge_cases_are_not_all_rejected() -> None:
    """The generators and edge cases reach the accepting paths, not just None / H1Error."""
    assert sum(reference_parse_request_head(h) is not None for h in REQUESTS) >= 5
    read = [response_fields(h, h1.parse_response_head) for h in RESPONSES]
    assert sum(r[0] != "H1Error" for r in read) >= 10  # type: ignore[index]


def test_mixed_line_ends_are_read_line_by_line() -> None:
    from api_proxy.h1 import parse_response_head

    r = parse_response_head(b"HTTP/1.1 200 OK\nA: b\r\nC: d\nContent-Length: 0\r")
    assert r.reason == "OK"
    assert [(n, v) for _, n, v, _ in r.headers] == [("A", "b"), ("C", "d"), ("Content-Length", "0")]
    assert r.length == 0 and r.keep_alive


def test_absolute_form_targets_give_their_authority_and_origin_form() -> None:
    """RFC 9112 3.2.2 (the aiohttp path serves such a request as its origin form)."""
    assert h1.origin_form("http://API.example:8080/rest/x?y=%41") == (
        "API.example:8080",
        "/rest/x?y=%41",
    )
    assert h1.origin_form("HTTPS://a.example") == ("a.example", "/")
    assert h1.origin_form("http://a.example?x=1") == ("a.example", "/?x=1")
    for target in ("/x", "/x?u=http://a/", "ftp://a/x", "http://u@a/x", "http://a/x#f", "*"):
        assert h1.origin_form(target) is None, target


@pytest.mark.parametrize(
    ("buf", "head", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody\n\nmore", b"HTTP/1.1 200 OK\r\nA: b", b"body\n\nmore"),
        (b"HTTP/1.1 200 OK\nA: b\n\nbody\r\n\r\nmore", b"HTTP/1.1 200 OK\nA: b", b"body\r\n\r\nmore"),
        (b"HTTP/1.1 200 OK\nA: b\r\n\nbody", b"HTTP/1.1 200 OK\nA: b", b"body"),
        (b"HTTP/1.1 200 OK\r\nA: b\n\r\nbody", b"HTTP/1.1 200 OK\r\nA: b", b"body"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 204 No Content", b""),
        (b"HTTP/1.1 200 OK\r\nA: b\r\n", None, None),
        (b"HTTP/1.1 200 OK\nA: b\n", None, None),
    ],
)
def test_the_end_of_an_answer_head_with_crlf_or_bare_lf_line_ends(
    buf: bytes, head: bytes | None, body: bytes | None
) -> None:
    """The blank line that ends a back end's head is the first one, whichever line ends
    the head uses (a body may hold the other kind)."""
    end, start = h1.response_head_end(buf)
    if head is None:
        assert (end, start) == (-1, -1)
        return
    assert buf[:end] == head and buf[start:] == body
    h1.parse_response_head(buf[:end])  # what the parser takes
