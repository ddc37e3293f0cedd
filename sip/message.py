"""SIP message parsing and byte-exact editing, free of I/O.

``parse_message(data)`` splits the start line and header lines once, records the byte
slice of every header, and parses eagerly only what routing needs (Via, From/To tags,
Call-ID, CSeq, Max-Forwards, Route, Content-Length).  Anything else stays raw and is
parsed on first use.

Perf note: a proxy edits, it does not rebuild.  ``Editor.to_bytes()`` emits the new start
line (if any), the added header lines and then the untouched ``raw[start:end]`` slices of
every other header, followed by the body, in one ``b"".join``.
"""

from __future__ import annotations

import re
from typing import Final

from .errors import (
    FramingError,
    MessageTooLarge,
    SipError,
    SipParseError,
    UnsupportedUriScheme,
    VersionNotSupported,
)
from .headers import (
    CANONICAL,
    LIST_HEADERS,
    SINGLETONS,
    Via,
    canonical_name,
    display_name,
    first_comma,
    parse_via,
    split_values,
)
from .uri import (
    MAX_DIGITS,
    NameAddr,
    SipUri,
    is_token,
    parse_name_addr,
    parse_uri,
    remember,
    shared_name_addr,
    uri_text_ok,
)

MAX_CSEQ: Final = 2**32 - 1
#: RFC 3261 20.22: "an integer in the range 0-255"
MAX_FORWARDS_LIMIT: Final = 255
_FOLD: Final = re.compile(r"\r?\n[ \t]+")
_SP_HTAB: Final = " \t"
#: perf: header names as written -> canonical name, for names already found valid.  A peer
#: writes the same dozen spellings in every message, so the token check and the lower-casing
#: run once per spelling instead of once per line.  Bounded: junk names are never kept.
_NAMES: Final[dict[str, str]] = {}
_NAMES_MAX: Final = 1024
#: the headers validate() allows once: SINGLETONS but Content-Length (equal repeats
#: allowed, content_length_of checks them), each with a bit of its own
_SINGLETON_BITS: Final[dict[str, int]] = {
    name: 1 << i for i, name in enumerate(sorted(SINGLETONS - {"content-length"}))
}
#: ``SipMessage._max_forwards`` before the header was read
_UNREAD: Final = -2


def _digits(text: str, max_digits: int = MAX_DIGITS) -> bool:
    """``sip.uri.is_digits`` for text (1 to ``max_digits`` ASCII digits) without a Python
    loop per character: on ASCII text ``str.isdigit`` accepts exactly 0-9."""
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


class Header:
    """One header line (with its continuation lines): canonical name, unfolded value, slice."""

    __slots__ = ("end", "name", "start", "value")

    def __init__(self, name: str, value: str, start: int, end: int) -> None:
        self.name = name
        self.value = value
        self.start = start
        self.end = end

    def __repr__(self) -> str:
        return f"Header({self.name!r}, {self.value[:60]!r})"


class SipMessage:
    """A parsed request or response.  ``raw`` holds exactly this message's octets."""

    __slots__ = (
        "_call_id",
        "_cseq",
        "_from",
        "_max_forwards",
        "_routes",
        "_to",
        "_uri",
        "_vias",
        "body_start",
        "headers",
        "is_request",
        "method",
        "raw",
        "reason",
        "ruri",
        "start_line_end",
        "status",
        "version",
    )

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.is_request = True
        self.method = ""
        self.ruri = ""
        self.version = "SIP/2.0"
        self.status = 0
        self.reason = ""
        self.headers: list[Header] = []
        self.body_start = len(raw)
        self.start_line_end = 0
        # parsed on first use (perf: fields, not a dict keyed by built strings)
        self._vias: list[Via] | None = None
        self._from: NameAddr | None = None
        self._to: NameAddr | None = None
        self._cseq: tuple[int, str] | None = None
        self._call_id: str | None = None
        self._max_forwards = _UNREAD  # -1: no Max-Forwards
        self._routes: list[NameAddr] | None = None
        self._uri: SipUri | None = None

    # --- generic access -------------------------------------------------------------

    @property
    def body(self) -> bytes:
        return self.raw[self.body_start :]

    @property
    def start_line(self) -> str:
        return self.raw[: self.start_line_end].decode("latin-1").rstrip("\r\n")

    def get(self, name: str) -> str | None:
        """The first value of a header (canonical lower-case name), unsplit."""
        for h in self.headers:
            if h.name == name:
                return h.value
        return None

    def index(self, name: str) -> int:
        """Index in ``headers`` of the first header with that name, -1 if none."""
        for i, h in enumerate(self.headers):
            if h.name == name:
                return i
        return -1

    def values(self, name: str) -> list[str]:
        """Every value of a header in order; list headers are split on top-level commas."""
        out: list[str] = []
        split = name in LIST_HEADERS
        for h in self.headers:
            if h.name == name:
                if split:
                    out.extend(split_values(h.value))
                else:
                    out.append(h.value)
        return out

    def count(self, name: str) -> int:
        return sum(1 for h in self.headers if h.name == name)

    # --- eager, routing-relevant fields ----------------------------------------------

    @property
    def vias(self) -> list[Via]:
        cached = self._vias
        if cached is not None:
            return cached
        vias: list[Via] = []
        for h in self.headers:
            if h.name == "via":
                texts = split_values(h.value)
                if not texts:
                    # an empty Via line would make "the top Via" ambiguous for editing
                    raise SipParseError("empty Via header")
                vias.extend(parse_via(t) for t in texts)
        self._vias = vias
        return vias

    @property
    def top_via(self) -> Via:
        vias = self.vias
        if not vias:
            raise SipParseError("missing Via")
        return vias[0]

    def _addr(self, name: str) -> NameAddr:
        value = self.get(name)
        if value is None:
            raise SipParseError(f"missing {display_name(name)}")
        # perf: a dialog's messages repeat its From and To word for word
        return shared_name_addr(value)

    @property
    def from_(self) -> NameAddr:
        a = self._from
        if a is None:
            a = self._from = self._addr("from")
        return a

    @property
    def to(self) -> NameAddr:
        a = self._to
        if a is None:
            a = self._to = self._addr("to")
        return a

    @property
    def from_tag(self) -> str:
        return self.from_.param("tag") or ""

    @property
    def to_tag(self) -> str:
        return self.to.param("tag") or ""

    @property
    def call_id(self) -> str:
        c = self._call_id
        if c is None:
            c = self._call_id = self.get("call-id") or ""
        return c

    @property
    def cseq(self) -> tuple[int, str]:
        c = self._cseq
        if c is None:
            value = self.get("cseq")
            if value is None:
                raise SipParseError("missing CSeq")
            # perf: the same few values ("1 INVITE", "2 BYE"...) in message after message
            c = _CSEQ_MEMO.get(value)
            if c is None:
                c = parse_cseq(value)
                remember(_CSEQ_MEMO, value, c, 32)
            self._cseq = c
        return c

    @property
    def max_forwards(self) -> int | None:
        mf = self._max_forwards
        if mf == _UNREAD:
            value = self.get("max-forwards")
            if value is None:
                mf = -1
            elif not _digits(value) or int(value) > MAX_FORWARDS_LIMIT:
                raise SipParseError(f"bad Max-Forwards {value[:20]!r}")  # raised on every read
            else:
                mf = int(value)
            self._max_forwards = mf
        return None if mf < 0 else mf

    @property
    def routes(self) -> list[NameAddr]:
        r = self._routes
        if r is None:
            r = self._routes = [shared_name_addr(v) for v in self.values("route")]
        return r

    @property
    def uri(self) -> SipUri:
        """The parsed Request-URI (a ``tel:`` URI yields user=number, host='')."""
        u = self._uri
        if u is None:
            u = self._uri = shared_request_uri(self.ruri)
        return u

    def __repr__(self) -> str:
        return f"SipMessage({self.start_line[:80]!r})"


_CSEQ_MEMO: Final[dict[str, tuple[int, str]]] = {}


def parse_cseq(value: str) -> tuple[int, str]:
    """``(number, method)`` of a CSeq value; SipParseError if it is not one."""
    # split on SP/HTAB only: str.split() would also split on \x85, \xa0, \x1c...
    parts = [p for p in value.replace("\t", " ").split(" ") if p]
    if len(parts) != 2 or not _digits(parts[0]) or int(parts[0]) > MAX_CSEQ:
        raise SipParseError(f"bad CSeq {value[:40]!r}")
    if not is_token(parts[1]):
        raise SipParseError(f"bad CSeq method {value[:40]!r}")
    return int(parts[0]), parts[1]


_URI_MEMO: Final[dict[str, SipUri]] = {}


def shared_request_uri(text: str) -> SipUri:
    """``parse_request_uri``, remembered (a peer sends the same few Request-URIs over and
    over): the caller must not edit the result."""
    u = _URI_MEMO.get(text)
    if u is None:
        u = parse_request_uri(text)
        remember(_URI_MEMO, text, u)
    return u


def parse_request_uri(text: str) -> SipUri:
    if text[:4].lower() == "tel:":
        number = text[4:].partition(";")[0]
        if not number or not uri_text_ok(text[4:]):
            raise SipParseError(f"bad tel URI {text[:80]!r}")
        return SipUri("tel", number, "", None, [], "", None, text)
    u = parse_uri(text)
    if u.headers:
        raise SipParseError("headers are not allowed in a Request-URI")
    return u


# --- parsing ---------------------------------------------------------------------------


def _find_header_end(text: str, start: int, bare_lf: bool = True) -> tuple[int, int]:
    """(end of last header line, start of body) in ``text`` (the message decoded as
    latin-1: offsets are octet offsets); (-1, -1) if the blank line is missing.
    ``bare_lf`` also accepts LF LF (datagrams only: StreamFramer splits on CRLF CRLF).

    Perf note: searched in the decoded text, as the rest of the head is: mypyc calls
    ``str.find`` directly, where ``bytes.find`` (METH_VARARGS) builds and parses an
    argument tuple, which costs more than the search on a SIP head."""
    i = text.find("\r\n\r\n", start)
    if not bare_lf:
        return (i + 2, i + 4) if i >= 0 else (-1, -1)
    # a bare LF LF counts only before the CRLF CRLF (perf: the body is not searched)
    j = text.find("\n\n", start, i + 2 if i >= 0 else len(text))
    if j >= 0:
        return j + 1, j + 2
    if i >= 0:
        return i + 2, i + 4
    return -1, -1


def content_length_of(msg: SipMessage) -> int | None:
    """The declared body length; FramingError on a bad or conflicting value (RFC 4475 ncl, mcl01)."""
    found: int | None = None
    for h in msg.headers:
        if h.name == "content-length":
            v = h.value.strip(_SP_HTAB)
            if not _digits(v):
                raise FramingError(f"bad Content-Length {v[:20]!r}")
            n = int(v)
            if found is not None and n != found:
                raise FramingError("conflicting Content-Length values")
            found = n
    return found


def parse_head(data: bytes, head_end: int, text: str) -> SipMessage:
    """Parse the start line and header lines of ``data[:head_end]`` (no body handling).
    ``text``: ``data`` decoded as latin-1 (at least its first ``head_end`` octets).

    Every header line is read even after an error, so that a malformed request can still
    be answered: the first error is raised with ``exc.partial`` holding the message so far
    (requests only).  An error in a response sets ``exc.respond = False``: it is dropped.
    """
    msg = SipMessage(data)
    eol = text.find("\n", 0, head_end)
    if eol < 0:
        raise SipParseError("no start line")
    line = text[:eol].rstrip("\r")
    msg.start_line_end = eol + 1
    error: SipError | None = None
    try:
        _parse_start_line(msg, line)
    except SipError as exc:
        error = exc
    header_error = _parse_header_lines(msg, text, eol + 1, head_end)
    error = error or header_error
    if error is not None:
        _annotate(error, msg)
        raise error
    return msg


def _annotate(exc: SipError, msg: SipMessage) -> None:
    """Attach what the caller needs to answer (requests) or to drop quietly (responses).

    A request without a readable Via line gets no ``partial``: an answer would have no
    Via to travel back on (RFC 3261 18.2.2), so it is dropped like a response."""
    if not msg.is_request:
        exc.respond = False  # never answer a response (RFC 4475 bigcode, scalarlg)
    elif any(h.name == "via" for h in msg.headers):
        exc.partial = msg  # type: ignore[attr-defined]


def _parse_header_lines(msg: SipMessage, decoded: str, pos: int, head_end: int) -> SipError | None:
    """Append a Header per (possibly folded) line; skip bad lines, return the first error.

    Perf note: the header section is decoded once (latin-1 maps each octet to one
    character, so string offsets are octet offsets) and header names are looked up in
    ``_NAMES`` before being checked; tests/test_sip_fastpaths.py holds the line-by-line
    version this replaced and checks that both give the same headers and errors.
    ``decoded``: the message decoded as latin-1."""
    headers = msg.headers
    names = _NAMES
    error: SipError | None = None
    text = decoded[pos:head_end]
    n = len(text)
    i = 0
    while i < n:
        nl = text.find("\n", i)
        if nl < 0:
            nl = n - 1
        end = nl + 1
        folded = False
        # continuation lines
        while end < n and (text[end] == " " or text[end] == "\t"):
            folded = True
            nl2 = text.find("\n", end)
            end = n if nl2 < 0 else nl2 + 1
        first, start, i = i, pos + i, end
        # perf: offsets into ``text`` instead of slicing the line, then the name, then the
        # value, then the value without CRLF, then the value stripped; one character is
        # compared with " " and "\t" (two pointer checks) rather than searched in _SP_HTAB
        colon = text.find(":", first, end)
        if colon <= first:
            error = error or SipParseError(f"bad header line {text[first:end][:40].strip()!r}")
            continue
        raw = text[first:colon]
        if text[colon - 1] == " " or text[colon - 1] == "\t":
            raw = raw.rstrip(_SP_HTAB)
        name = names.get(raw)
        if name is None:
            if not is_token(raw):
                error = error or SipParseError(f"bad header name {raw[:40]!r}")
                continue
            name = canonical_name(raw)
            if len(names) < _NAMES_MAX:
                names[raw] = name
        vs, ve = colon + 1, end
        if ve > vs and text[ve - 1] == "\n":
            ve -= 1
            if ve > vs and text[ve - 1] == "\r":
                ve -= 1
        if folded:
            value = _FOLD.sub(" ", text[vs:ve]).strip(_SP_HTAB)
        else:
            while vs < ve and (text[vs] == " " or text[vs] == "\t"):
                vs += 1
            while ve > vs and (text[ve - 1] == " " or text[ve - 1] == "\t"):
                ve -= 1
            value = text[vs:ve]
        if "\r" in value or "\n" in value:
            # a bare CR/LF inside a value would let an edited line smuggle in a header
            error = error or SipParseError(f"bare CR or LF in {raw[:40]!r}")
            continue
        headers.append(Header(name, value, start, pos + end))
    return error


def _parse_start_line(msg: SipMessage, line: str) -> None:
    if line.startswith("SIP/"):
        msg.is_request = False
        parts = line.split(" ", 2)
        if len(parts) < 2:
            raise SipParseError("bad status line")
        version, code = parts[0], parts[1]
        msg.reason = parts[2] if len(parts) > 2 else ""
        if version != "SIP/2.0":
            raise VersionNotSupported(f"version {version[:12]!r}")
        if not _digits(code, 3) or not 100 <= int(code) <= 699:
            raise SipParseError(f"bad status code {code[:10]!r}")
        msg.status = int(code)
        msg.version = version
        return
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        if len(parts) >= 3 and parts[-1].startswith("SIP/") and parts[-1] != "SIP/2.0" and all(parts):
            raise VersionNotSupported(f"version {parts[-1][:12]!r}")
        raise SipParseError("bad request line")
    method, ruri, version = parts
    if not is_token(method):
        raise SipParseError(f"bad method {method[:20]!r}")
    if version != "SIP/2.0":
        if version.upper().startswith("SIP/"):
            raise VersionNotSupported(f"version {version[:12]!r}")
        raise SipParseError("bad request line")
    msg.method = method
    msg.ruri = ruri
    msg.version = version


def parse_message(data: bytes, *, datagram: bool = True, max_size: int = 65535) -> SipMessage:
    """Parse one complete SIP message.

    ``datagram=True``: ``data`` is a whole UDP datagram; octets beyond Content-Length are
    ignored (RFC 4475 dblreq) and a missing Content-Length means "the rest" (inv2543).
    ``datagram=False``: ``data`` was framed by :class:`sip.framing.StreamFramer` and is
    exactly one message: CRLF CRLF ends the header section and Content-Length must match.

    Raises a ``SipError`` subclass; when a request's head could be read (with at least
    one Via line), ``exc.partial`` holds the message so far, enough to answer with
    ``make_response``.  An error in a response has ``exc.respond = False`` and no
    ``partial``: responses are dropped.
    """
    if len(data) > max_size:
        raise MessageTooLarge(f"{len(data)} octets")
    # one decoding for the whole head (perf: see _find_header_end)
    text = data.decode("latin-1")
    start, n = 0, len(text)
    while start + 1 < n and text[start] == "\r" and text[start + 1] == "\n":
        start += 2  # RFC 3261 7.5: ignore leading CRLFs
    if start:
        data = data[start:]
        text = text[start:]
    head_end, body_start = _find_header_end(text, 0, bare_lf=datagram)
    if head_end < 0:
        if not datagram:
            raise FramingError("header section not terminated by an empty line")
        # a datagram ends the header section (RFC 4475 baddn): read it so we can answer
        head_end = body_start = len(data)
    msg = parse_head(data, head_end, text)
    try:
        cl = content_length_of(msg)
        if cl is None:
            if not datagram:
                raise FramingError("missing Content-Length on a stream")
            end = len(data)
        else:
            end = body_start + cl
            if end > len(data):
                if not datagram:
                    raise FramingError(f"Content-Length {cl} exceeds the {len(data) - body_start} octets framed")
                raise SipParseError(f"Content-Length {cl} exceeds the {len(data) - body_start} octets received")
            if not datagram and end != len(data):
                raise FramingError("octets after the message on a stream")
        msg.raw = data if end == len(data) else data[:end]
        msg.body_start = body_start
        validate(msg)
    except SipError as exc:
        _annotate(exc, msg)
        raise
    return msg


def validate(msg: SipMessage) -> None:
    """Check what a proxy relies on; raise the SipError that says how to answer."""
    seen = 0  # perf: a bit per singleton header (_SINGLETON_BITS), not a set per message
    for h in msg.headers:  # in message order, so the error names the first repeat
        bit = _SINGLETON_BITS.get(h.name, 0)
        if bit:
            if seen & bit:
                raise SipParseError(f"more than one {display_name(h.name)}")
            seen |= bit
    if not msg.vias:
        raise SipParseError("missing Via")
    msg.cseq  # noqa: B018 - parse and check
    if not msg.call_id:
        raise SipParseError("missing Call-ID")
    msg.from_  # noqa: B018
    msg.to  # noqa: B018
    if msg.is_request:
        msg.max_forwards  # noqa: B018
        if msg.cseq[1] != msg.method:
            raise SipParseError("CSeq method does not match the request method")
        uri = msg.uri
        if uri.scheme not in ("sip", "sips", "tel"):
            raise UnsupportedUriScheme(uri.scheme)
        if msg.method == "REGISTER":
            for c in msg.values("contact"):
                if c != "*":
                    shared_name_addr(c)


# --- editing ----------------------------------------------------------------------------


class Editor:
    """Collects edits on a message and emits the new octets, keeping the rest byte-exact.

    With no edits ``to_bytes()`` returns ``msg.raw`` unchanged, except that a message
    without Content-Length (RFC 2543 style, inv2543) gains one and a datagram whose header
    section was not terminated gets its empty line.  Header values are latin-1 views of
    the octets (as parsed), so a value read from a message is written back unchanged.
    """

    __slots__ = ("appended", "body", "msg", "replaced", "start_line", "top")

    def __init__(self, msg: SipMessage) -> None:
        self.msg = msg
        self.start_line: bytes | None = None
        self.top: list[bytes] = []
        self.replaced: dict[int, bytes] = {}
        self.appended: list[bytes] = []
        self.body: bytes | None = None

    @staticmethod
    def line(name: str, value: str) -> bytes:
        # perf: a name with a spelling in CANONICAL (most of what dsbc writes) is known clean
        display = CANONICAL.get(name)
        if display is None:
            if "\r" in name or "\n" in name:
                raise ValueError(f"CR or LF in header {name[:40]!r}")  # would inject a header line
            display = display_name(name)
        if "\r" in value or "\n" in value:
            raise ValueError(f"CR or LF in header {name[:40]!r}")
        return f"{display}: {value}\r\n".encode("latin-1", "replace")

    def prepend(self, name: str, value: str) -> None:
        """Add a header line above all others (our Via, Record-Route)."""
        self.top.insert(0, self.line(name, value))

    def append(self, name: str, value: str) -> None:
        self.appended.append(self.line(name, value))

    def set(self, index: int, value: str) -> None:
        """Replace the header line at ``index`` with one carrying ``value``."""
        self.replaced[index] = self.line(self.msg.headers[index].name, value)

    def delete(self, index: int) -> None:
        self.replaced[index] = b""

    def set_first_value(self, name: str, new: str | None) -> None:
        """Replace (or with None remove) the first value of a list header, which may share
        its line with later values (``Via: a, b``).  The later values keep their text.

        Works on the message as parsed: a second call for the same name edits the same
        (original) first value again."""
        for idx, h in enumerate(self.msg.headers):
            # skip empty lines (``Route:``) so "first value" is the one ``values()`` returns
            if h.name == name and split_values(h.value):
                break
        else:
            raise ValueError(f"no {name} header")
        # perf: without a comma or a quote first_comma can only scan to the end and say -1
        value = h.value
        comma = first_comma(value) if "," in value or '"' in value else -1
        rest = None if comma < 0 else value[comma + 1 :]
        if rest is not None and not rest.strip(_SP_HTAB):
            rest = None  # "a," has no second value
        if new is None:
            if rest is None:
                self.delete(idx)
            else:
                self.set(idx, rest.lstrip(_SP_HTAB))
        else:
            self.set(idx, new if rest is None else f"{new},{rest}")

    def to_bytes(self) -> bytes:
        msg = self.msg
        raw = msg.raw
        out: list[bytes] = [self.start_line + b"\r\n" if self.start_line is not None else raw[: msg.start_line_end]]
        out.extend(self.top)
        replaced = self.replaced
        new_body = self.body is not None
        body = self.body if self.body is not None else raw[msg.body_start :]
        has_cl = False
        # perf: unchanged lines are copied in runs (one slice for consecutive lines)
        run_start = run_end = -1
        for i, h in enumerate(msg.headers):
            line = replaced.get(i) if replaced else None
            if h.name == "content-length":
                if new_body:
                    if has_cl:
                        continue  # one Content-Length, matching the new body
                    if line is None:
                        line = self.line("content-length", str(len(body)))
                if line != b"":
                    has_cl = True
            if line is None:
                if run_start < 0:
                    run_start = h.start
                elif run_end != h.start:
                    out.append(raw[run_start:run_end])
                    run_start = h.start
                run_end = h.end
                continue
            if run_start >= 0:
                out.append(raw[run_start:run_end])
                run_start = -1
            out.append(line)
        if run_start >= 0:
            chunk = raw[run_start:run_end]
            if not chunk.endswith(b"\n"):
                chunk += b"\r\n"  # last line of a datagram without the empty line
            out.append(chunk)
        out.extend(self.appended)
        if not has_cl:
            out.append(self.line("content-length", str(len(body))))
        last = msg.headers[-1].end if msg.headers else msg.start_line_end
        blank = raw[last : msg.body_start]
        out.append(blank if blank in (b"\r\n", b"\n") else b"\r\n")
        out.append(body)
        return b"".join(out)


def _has_tag(to_value: str) -> bool:
    try:
        return parse_name_addr(to_value).param("tag") is not None
    except SipError:
        return ";tag=" in to_value.replace(" ", "").lower()


def make_response(
    req: SipMessage,
    status: int,
    reason: str,
    extra: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
    to_tag: str | None = None,
    body: bytes = b"",
    top_via: str | None = None,
) -> bytes:
    """A response to ``req`` built from its own header lines (RFC 3261 8.2.6): the Via,
    From, To, Call-ID and CSeq lines are copied byte for byte, in their order.
    ``top_via``: the first Via value to write instead (with received / rport).

    ``req`` may be ``exc.partial`` from a failed parse."""
    if "\r" in reason or "\n" in reason:
        raise ValueError("CR or LF in reason phrase")
    raw = req.raw
    out = [f"SIP/2.0 {status} {reason}\r\n".encode("latin-1", "replace")]
    for h in req.headers:
        if h.name in ("via", "from", "to", "call-id", "cseq"):
            if top_via is not None and h.name == "via" and h.value.strip(" \t"):
                new = top_via
                top_via = None
                value = h.value
                try:
                    comma = first_comma(value) if "," in value or '"' in value else -1
                except SipError:  # (unbalanced quotes: the line is copied as it came)
                    comma = -2
                if comma != -2:
                    rest = value[comma + 1 :] if comma >= 0 else ""
                    out.append(Editor.line("via", f"{new},{rest}" if rest.strip(" \t") else new))
                    continue
            if h.name == "to" and to_tag and status > 100 and not _has_tag(h.value):
                out.append(Editor.line("to", f"{h.value};tag={to_tag}"))
                continue
            line = raw[h.start : h.end]
            if not line.endswith(b"\n"):
                line += b"\r\n"
            out.append(line)
    for name, value in extra:
        out.append(Editor.line(name, value))
    out.append(Editor.line("content-length", str(len(body))))
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)
