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

from .errors import FramingError, SipError, SipParseError, UnsupportedUriScheme, VersionNotSupported
from .headers import LIST_HEADERS, SINGLETONS, Via, canonical_name, display_name, parse_via, split_values
from .uri import _TOKEN_CHARS, NameAddr, SipUri, parse_name_addr, parse_uri

MAX_CSEQ = 2**32 - 1
_FOLD = re.compile(r"\r?\n[ \t]+")
_METHOD_CHARS = _TOKEN_CHARS


class Header:
    """One header line (with its continuation lines): canonical name, unfolded value, slice."""

    __slots__ = ("name", "value", "start", "end")

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
        "raw",
        "is_request",
        "method",
        "ruri",
        "version",
        "status",
        "reason",
        "headers",
        "body_start",
        "start_line_end",
        "_cache",
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
        self._cache: dict[str, object] = {}

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
        v = self._cache.get("vias")
        if v is None:
            v = [parse_via(text) for text in self.values("via")]
            self._cache["vias"] = v
        return v  # type: ignore[return-value]

    @property
    def top_via(self) -> Via:
        vias = self.vias
        if not vias:
            raise SipParseError("missing Via")
        return vias[0]

    def _addr(self, name: str) -> NameAddr:
        key = "addr:" + name
        a = self._cache.get(key)
        if a is None:
            value = self.get(name)
            if value is None:
                raise SipParseError(f"missing {display_name(name)}")
            a = parse_name_addr(value)
            self._cache[key] = a
        return a  # type: ignore[return-value]

    @property
    def from_(self) -> NameAddr:
        return self._addr("from")

    @property
    def to(self) -> NameAddr:
        return self._addr("to")

    @property
    def from_tag(self) -> str:
        return self.from_.param("tag") or ""

    @property
    def to_tag(self) -> str:
        return self.to.param("tag") or ""

    @property
    def call_id(self) -> str:
        return self.get("call-id") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        c = self._cache.get("cseq")
        if c is None:
            value = self.get("cseq")
            if value is None:
                raise SipParseError("missing CSeq")
            parts = value.split()
            if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) > MAX_CSEQ:
                raise SipParseError(f"bad CSeq {value[:40]!r}")
            if any(ch not in _METHOD_CHARS for ch in parts[1]):
                raise SipParseError(f"bad CSeq method {value[:40]!r}")
            c = (int(parts[0]), parts[1])
            self._cache["cseq"] = c
        return c  # type: ignore[return-value]

    @property
    def max_forwards(self) -> int | None:
        value = self.get("max-forwards")
        if value is None:
            return None
        if not value.isdigit():
            raise SipParseError(f"bad Max-Forwards {value[:20]!r}")
        return int(value)

    @property
    def routes(self) -> list[NameAddr]:
        r = self._cache.get("routes")
        if r is None:
            r = [parse_name_addr(v) for v in self.values("route")]
            self._cache["routes"] = r
        return r  # type: ignore[return-value]

    @property
    def uri(self) -> SipUri:
        """The parsed Request-URI (a ``tel:`` URI yields user=number, host='')."""
        u = self._cache.get("ruri")
        if u is None:
            u = parse_request_uri(self.ruri)
            self._cache["ruri"] = u
        return u  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"SipMessage({self.start_line[:80]!r})"


def parse_request_uri(text: str) -> SipUri:
    if text[:4].lower() == "tel:":
        number, _, params = text[4:].partition(";")
        return SipUri("tel", number, "", None, [], "", None, text)
    u = parse_uri(text)
    if u.headers:
        raise SipParseError("headers are not allowed in a Request-URI")
    return u


# --- parsing ---------------------------------------------------------------------------


def _find_header_end(data: bytes, start: int) -> tuple[int, int]:
    """(end of last header line, start of body); (-1, -1) if the blank line is missing."""
    i = data.find(b"\r\n\r\n", start)
    j = data.find(b"\n\n", start)
    if i >= 0 and (j < 0 or i + 1 <= j):
        return i + 2, i + 4
    if j >= 0:
        return j + 1, j + 2
    return -1, -1


def content_length_of(msg: SipMessage) -> int | None:
    """The declared body length; FramingError on a bad or conflicting value (RFC 4475 ncl, mcl01)."""
    found: int | None = None
    for h in msg.headers:
        if h.name == "content-length":
            v = h.value.strip()
            if not v.isdigit():
                raise FramingError(f"bad Content-Length {v[:20]!r}")
            n = int(v)
            if found is not None and n != found:
                raise FramingError("conflicting Content-Length values")
            found = n
    return found


def parse_head(data: bytes, head_end: int) -> SipMessage:
    """Parse the start line and header lines of ``data[:head_end]`` (no body handling)."""
    msg = SipMessage(data)
    headers = msg.headers
    eol = data.find(b"\n", 0, head_end)
    if eol < 0:
        raise SipParseError("no start line")
    line = data[:eol].rstrip(b"\r").decode("latin-1")
    msg.start_line_end = eol + 1
    try:
        _parse_start_line(msg, line)
    except SipError as exc:
        # read the headers anyway so that a request can still be answered
        try:
            _parse_header_lines(msg, data, eol + 1, head_end)
        except SipError:
            pass
        else:
            if not line.startswith("SIP/"):
                exc.partial = msg  # type: ignore[attr-defined]
        raise
    _parse_header_lines(msg, data, eol + 1, head_end)
    return msg


def _parse_header_lines(msg: SipMessage, data: bytes, pos: int, head_end: int) -> None:
    headers = msg.headers
    while pos < head_end:
        nl = data.find(b"\n", pos, head_end)
        if nl < 0:
            nl = head_end - 1
        end = nl + 1
        # continuation lines
        while end < head_end and data[end] in (0x20, 0x09):
            nl2 = data.find(b"\n", end, head_end)
            end = head_end if nl2 < 0 else nl2 + 1
        text = data[pos:end].decode("latin-1")
        colon = text.find(":")
        if colon <= 0:
            raise SipParseError(f"bad header line {text[:40].strip()!r}")
        name = text[:colon].rstrip(" \t")
        if not name or any(c not in _TOKEN_CHARS for c in name):
            raise SipParseError(f"bad header name {name[:40]!r}")
        value = text[colon + 1 :]
        if end - pos > len(value) or "\n" in value.rstrip("\r\n"):
            value = _FOLD.sub(" ", value)
        value = value.strip(" \t\r\n")
        headers.append(Header(canonical_name(name), value, pos, end))
        pos = end


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
        if len(code) != 3 or not code.isdigit() or not 100 <= int(code) <= 699:
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
    if any(c not in _METHOD_CHARS for c in method):
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
    exactly one message.

    Raises a ``SipError`` subclass; when the head could be read, ``exc.partial`` holds the
    message so far (enough to answer a request with 400).
    """
    from .errors import MessageTooLarge

    if len(data) > max_size:
        raise MessageTooLarge(f"{len(data)} octets")
    start = 0
    while data.startswith(b"\r\n", start):  # RFC 3261 7.5: ignore leading CRLFs
        start += 2
    if start:
        data = data[start:]
    head_end, body_start = _find_header_end(data, 0)
    if head_end < 0:
        if not datagram:
            raise FramingError("header section not terminated by an empty line")
        # a datagram ends the header section (RFC 4475 baddn): read it so we can answer
        head_end = body_start = len(data)
    msg = parse_head(data, head_end)
    try:
        cl = content_length_of(msg)
        if cl is None:
            if not datagram:
                raise FramingError("missing Content-Length on a stream")
            end = len(data)
        else:
            end = body_start + cl
            if end > len(data):
                raise SipParseError(f"Content-Length {cl} exceeds the {len(data) - body_start} octets received")
        msg.raw = data if end == len(data) else data[:end]
        msg.body_start = body_start
        validate(msg)
    except SipError as exc:
        exc.partial = msg  # type: ignore[attr-defined]
        raise
    return msg


def validate(msg: SipMessage) -> None:
    """Check what a proxy relies on; raise the SipError that says how to answer."""
    for name in SINGLETONS:
        if msg.count(name) > 1 and name != "content-length":
            raise SipParseError(f"more than one {display_name(name)}")
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
                    parse_name_addr(c)


# --- editing ----------------------------------------------------------------------------


class Editor:
    """Collects edits on a message and emits the new octets, keeping the rest byte-exact."""

    __slots__ = ("msg", "start_line", "top", "replaced", "appended", "body")

    def __init__(self, msg: SipMessage) -> None:
        self.msg = msg
        self.start_line: bytes | None = None
        self.top: list[bytes] = []
        self.replaced: dict[int, bytes] = {}
        self.appended: list[bytes] = []
        self.body: bytes | None = None

    @staticmethod
    def line(name: str, value: str) -> bytes:
        return f"{display_name(name)}: {value}\r\n".encode("latin-1", "replace")

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
        its line with later values (``Via: a, b``)."""
        idx = self.msg.index(name)
        if idx < 0:
            raise ValueError(f"no {name} header")
        parts = split_values(self.msg.headers[idx].value)
        rest = parts[1:]
        if new is not None:
            rest.insert(0, new)
        if rest:
            self.set(idx, ", ".join(rest))
        else:
            self.delete(idx)

    def to_bytes(self) -> bytes:
        msg = self.msg
        raw = msg.raw
        out: list[bytes] = [self.start_line + b"\r\n" if self.start_line is not None else raw[: msg.start_line_end]]
        out.extend(self.top)
        replaced = self.replaced
        has_cl = False
        body = self.body if self.body is not None else raw[msg.body_start :]
        for i, h in enumerate(msg.headers):
            if h.name == "content-length":
                if has_cl:
                    continue
                has_cl = True
                if self.body is not None and i not in replaced:
                    out.append(self.line("content-length", str(len(body))))
                    continue
            if i in replaced:
                out.append(replaced[i])
            else:
                out.append(raw[h.start : h.end])
        out.extend(self.appended)
        if not has_cl:
            out.append(self.line("content-length", str(len(body))))
        out.append(b"\r\n")
        out.append(body)
        return b"".join(out)


def make_response(
    req: SipMessage,
    status: int,
    reason: str,
    extra: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
    to_tag: str | None = None,
    body: bytes = b"",
) -> bytes:
    """A response to ``req`` built from its own header lines (RFC 3261 8.2.6)."""
    raw = req.raw
    out = [f"SIP/2.0 {status} {reason}\r\n".encode("latin-1", "replace")]
    for h in req.headers:
        if h.name in ("via", "from", "call-id", "cseq"):
            out.append(raw[h.start : h.end])
        elif h.name == "to":
            if to_tag and "tag=" not in h.value.lower() and status > 100:
                out.append(Editor.line("to", f"{h.value};tag={to_tag}"))
            else:
                out.append(raw[h.start : h.end])
    for name, value in extra:
        out.append(Editor.line(name, value))
    out.append(Editor.line("content-length", str(len(body))))
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)
