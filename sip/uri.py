"""SIP URIs and name-addr values (RFC 3261 sections 19.1 and 20.10), free of I/O.

Values keep their original text: a proxy compares and routes on parsed fields but forwards
what it received.  Escapes (``%41``) are kept as written; ``unescape`` decodes a field when a
comparison needs it (RFC 4475 esc01 / escnull: ``%00`` does not shorten a user name).
"""

from __future__ import annotations

import re
from typing import Final, TypeVar

from .errors import SipParseError, UnsupportedUriScheme

SIP_SCHEMES: Final = ("sip", "sips")
_TOKEN_CHARS: Final = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
_HOST_RE: Final = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9\-.]*[A-Za-z0-9.])?|[A-Za-z0-9]")
_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
_WS: Final = " \t\r\n"
#: the octets a SIP URI may hold unescaped (RFC 3261 25.1: printable US-ASCII, no SP)
_URI_CHARS: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - set('<>"')
#: longest decimal we convert: int() of a 5000-digit string raises ValueError (CPython's
#: int_max_str_digits), and no SIP scalar needs more than 10 digits (2**32-1)
MAX_DIGITS: Final = 10

# Perf: the fast paths below accept only the plain, well-formed spelling of a value and
# give exactly what the general code gives for it (tests/test_sip_fastpaths.py checks
# both with Hypothesis); anything else takes the general code.
_TOKEN_CLASS: Final = "[" + "".join(re.escape(c) for c in sorted(_TOKEN_CHARS)) + "]"
#: a display name that needs no quotes: tokens and whitespace
_DISPLAY_RE: Final = re.compile(f"(?:{_TOKEN_CLASS}|[ \t\r\n])+")
#: perf: the same sets as strings, for ``str.strip`` (removing every allowed character
#: from both ends leaves nothing exactly when all characters are allowed): cheaper than a
#: regex call for the short values of SIP
_TOKEN_STR: Final = "".join(sorted(_TOKEN_CHARS))
_HOST_STR: Final = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-."


def is_token(text: str) -> bool:
    """RFC 3261 token: one or more of ``_TOKEN_CHARS``.  Perf: most tokens (methods,
    parameter names, transports) are letters and digits, which ``isalnum`` checks without
    the set ``strip`` builds from its argument on every call."""
    return (text.isascii() and text.isalnum()) or (text != "" and not text.strip(_TOKEN_STR))


#: perf: values a proxy sees over and over (hosts, ports, a dialog's From / To / Route /
#: Request-URI) are parsed or checked once and remembered.  Each memo keeps keys of at
#: most ``max_key`` characters and is emptied when it reaches MEMO_SIZE entries, so its
#: memory is bounded whatever peers send.  Only what nothing edits is shared this way.
MEMO_SIZE: Final = 4096
_HOST_MEMO: Final[dict[str, bool]] = {}
_PORT_MEMO: Final[dict[str, int]] = {}
_T = TypeVar("_T")


def remember(memo: dict[str, _T], key: str, value: _T, max_key: int = 256, size: int = MEMO_SIZE) -> None:
    if len(key) <= max_key:
        if len(memo) >= size:
            memo.clear()
        memo[key] = value


def plain_host(text: str) -> bool:
    """``_HOST_RE`` for a hostname or IPv4 address (not an IPv6 reference): letters,
    digits, '-' and '.', starting with a letter or digit and not ending with '-'."""
    ok = _HOST_MEMO.get(text)
    if ok is None:
        ok = text != "" and not text.strip(_HOST_STR) and text[0] not in "-." and text[-1] != "-"
        remember(_HOST_MEMO, text, ok, 64)
    return ok


def port_number(text: str) -> int:
    """The port ``text`` names (1 to 5 digits, 1-65535), or 0 if it names none."""
    port = _PORT_MEMO.get(text)
    if port is None:
        port = int(text) if is_digits(text, 5) else 0
        if not 0 < port < 65536:
            port = 0
        remember(_PORT_MEMO, text, port, 5)
    return port


def host_ok(text: str) -> bool:
    return plain_host(text) or (text[:1] == "[" and _HOST_RE.fullmatch(text) is not None)


def uri_text_ok(text: str) -> bool:
    """Every character in ``_URI_CHARS`` (0x21-0x7E without ``"``, ``<``, ``>``)."""
    return (
        text.isascii() and text.isprintable()
        and " " not in text and '"' not in text and "<" not in text and ">" not in text
    )


def is_digits(text: str | bytes, max_digits: int = MAX_DIGITS) -> bool:
    """1 to ``max_digits`` ASCII digits.  ``str.isdigit`` is not enough: it accepts '\xb2'
    (superscript two, a latin-1 octet) and other Unicode digits that ``int()`` rejects."""
    if not 0 < len(text) <= max_digits:
        return False
    # ``isdigit`` of ASCII text (or of bytes) accepts exactly 0-9
    return text.isascii() and text.isdigit()


def unescape(text: str) -> str:
    """Decode %HH escapes once (not recursively); invalid escapes are kept as written."""
    if "%" not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    raw = bytearray()
    while i < n:
        c = text[i]
        if c == "%" and i + 3 <= n and _is_hex(text[i + 1 : i + 3]):
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
            continue
        if raw:
            out.append(raw.decode("utf-8", "surrogateescape"))
            raw.clear()
        out.append(c)
        i += 1
    if raw:
        out.append(raw.decode("utf-8", "surrogateescape"))
    return "".join(out)


def _is_hex(s: str) -> bool:
    return len(s) == 2 and all(ch in "0123456789abcdefABCDEF" for ch in s)


def find_param(params: list[tuple[str, str | None]], name: str) -> str | None:
    """A parameter's value, matched without regard to case ("" for a flag, None if absent)."""
    name = name.lower()
    for k, v in params:
        if k.lower() == name:
            return "" if v is None else v
    return None


class SipUri:
    """A parsed ``sip:`` / ``sips:`` URI.  ``params`` keeps order and case of names."""

    __slots__ = ("headers", "host", "params", "password", "port", "scheme", "text", "user")

    def __init__(
        self,
        scheme: str,
        user: str | None,
        host: str,
        port: int | None = None,
        params: list[tuple[str, str | None]] | None = None,
        headers: str = "",
        password: str | None = None,
        text: str = "",
    ) -> None:
        self.scheme = scheme
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self.params = params if params is not None else []
        self.headers = headers
        self.text = text

    def param(self, name: str) -> str | None:
        """The value of a URI parameter ("" for a flag like ``lr``), None when absent."""
        return find_param(self.params, name)

    def has_param(self, name: str) -> bool:
        return self.param(name) is not None

    @property
    def transport(self) -> str:
        t = self.param("transport")
        if t:
            return t.lower()
        return "tls" if self.scheme == "sips" else "udp"

    @property
    def host_port(self) -> tuple[str, int]:
        host = self.host[1:-1] if self.host.startswith("[") else self.host
        if self.port is not None:
            return host, self.port
        return host, 5061 if self.scheme == "sips" or self.transport == "tls" else 5060

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out += [":", self.password]
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out += [":", str(self.port)]
        for k, v in self.params:
            out += [";", k] if v is None else [";", k, "=", v]
        if self.headers:
            out += ["?", self.headers]
        return "".join(out)

    def __repr__(self) -> str:
        return f"SipUri({str(self)!r})"


def parse_uri(text: str, *, allow_other_schemes: bool = False) -> SipUri:
    """Parse a SIP URI.  Other schemes raise UnsupportedUriScheme (416) unless allowed,
    in which case a SipUri with only ``scheme`` and ``text`` set is returned."""
    t = text.strip(_WS)
    scheme, sep, rest = t.partition(":")
    lscheme = scheme.lower()
    sip_scheme = lscheme in SIP_SCHEMES and scheme.isascii()  # perf: no regex for sip / sips
    if not sep or not (sip_scheme or _SCHEME_RE.fullmatch(scheme)):
        raise SipParseError(f"bad URI {text[:80]!r}")
    if not sip_scheme:
        if allow_other_schemes:
            return SipUri(lscheme, None, "", text=t)
        raise UnsupportedUriScheme(f"unsupported URI scheme {scheme[:20]!r}")
    if not uri_text_ok(rest):
        # controls, SP, non-ASCII (must be %-escaped) and <>" never appear in a SIP URI
        raise SipParseError(f"bad characters in URI {text[:80]!r}")
    user = password = None
    if "@" in rest:
        # the user part may hold ';', '?' and ',' (RFC 4475 intmeth, semiuri); '@' itself
        # is legal nowhere else, so a second one is an error, not a guess
        userinfo, _, hostpart = rest.partition("@")
        if not userinfo or "@" in hostpart:
            raise SipParseError(f"bad userinfo in URI {text[:80]!r}")
        user, colon, pw = userinfo.partition(":")
        if not user:
            raise SipParseError(f"empty user in URI {text[:80]!r}")
        password = pw if colon else None
    else:
        hostpart = rest
    hostpart, _, headers = hostpart.partition("?")
    hostport, *raw_params = hostpart.split(";")
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise SipParseError(f"bad IPv6 reference in {text[:80]!r}")
        host, portpart = hostport[: end + 1], hostport[end + 1 :]
        if portpart and not portpart.startswith(":"):
            raise SipParseError(f"bad host in URI {text[:80]!r}")
        portpart = portpart[1:]
    else:
        host, _, portpart = hostport.partition(":")
    if not host_ok(host):
        raise SipParseError(f"bad host in URI {text[:80]!r}")
    port: int | None = None
    if portpart:
        port = port_number(portpart)
        if not port:
            raise SipParseError(f"bad port in URI {text[:80]!r}")
    params: list[tuple[str, str | None]] = []
    for p in raw_params:
        if not p:
            raise SipParseError(f"empty URI parameter in {text[:80]!r}")
        k, eq, v = p.partition("=")
        if not k:
            raise SipParseError(f"URI parameter without a name in {text[:80]!r}")
        params.append((k, v if eq else None))
    return SipUri(lscheme, user, host, port, params, headers, password, t)


# --- name-addr / addr-spec ---------------------------------------------------------------


class NameAddr:
    """``"Display" <uri>;tag=x`` (or an addr-spec ``uri;tag=x``): header parameters apart."""

    __slots__ = ("_uri", "bracketed", "display", "params", "uri_text")

    def __init__(self, display: str, uri_text: str, params: list[tuple[str, str | None]], bracketed: bool) -> None:
        self.display = display
        self.uri_text = uri_text
        self.params = params
        self.bracketed = bracketed
        self._uri: SipUri | None = None

    @property
    def uri(self) -> SipUri:
        if self._uri is None:
            self._uri = parse_uri(self.uri_text, allow_other_schemes=True)
        return self._uri

    def param(self, name: str) -> str | None:
        return find_param(self.params, name)

    def __str__(self) -> str:
        out = []
        if self.display:
            out += [self.display, " "]
        out += ["<", self.uri_text, ">"]
        for k, v in self.params:
            out += [";", k] if v is None else [";", k, "=", v]
        return "".join(out)


def _parse_params(text: str, where: str) -> list[tuple[str, str | None]]:
    """``;a=b ; c ; d="x;y"`` -> [(a,b),(c,None),(d,'"x;y"')]. Raises on empty parameters."""
    if (
        text[:1] == ";" and '"' not in text
        and " " not in text and "\t" not in text and "\r" not in text and "\n" not in text
    ):
        # the plain spelling ``;name=value;flag``: token names, values without quotes or
        # the whitespace the general code strips.  Perf: found by offsets, so each
        # parameter costs its name, its value and their tuple, no list of pieces and no
        # partition tuple
        params: list[tuple[str, str | None]] = []
        n = len(text)
        i = 1
        while True:
            j = text.find(";", i)
            if j < 0:
                j = n
            eq = text.find("=", i, j)
            if eq < 0:
                k, v = text[i:j], None
            else:
                k, v = text[i:eq], text[eq + 1 : j]
                if not v:
                    return _parse_params_general(text, where)
            if not is_token(k):
                return _parse_params_general(text, where)
            params.append((k, v))
            if j == n:
                return params
            i = j + 1
    return _parse_params_general(text, where)


def _parse_params_general(text: str, where: str) -> list[tuple[str, str | None]]:
    params: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in _WS:
            i += 1
        if i >= n:
            break
        if text[i] != ";":
            raise SipParseError(f"junk after {where}: {text[i:i + 40]!r}")
        i += 1
        j = i
        while j < n and text[j] not in ";=" :
            if text[j] == '"':
                raise SipParseError(f"bad parameter in {where}")
            j += 1
        name = text[i:j].strip(_WS)
        if not name or any(c not in _TOKEN_CHARS for c in name):
            raise SipParseError(f"bad parameter name {name[:30]!r} in {where}")
        value: str | None = None
        if j < n and text[j] == "=":
            j += 1
            while j < n and text[j] in _WS:
                j += 1
            if j < n and text[j] == '"':
                k = _end_of_quoted(text, j)
                value = text[j:k]
                j = k
            else:
                k = j
                while k < n and text[k] not in ";":
                    k += 1
                value = text[j:k].strip(_WS)
                j = k
            if value == "":
                raise SipParseError(f"empty value for parameter {name!r} in {where}")
        params.append((name, value))
        i = j
    return params


def _end_of_quoted(text: str, start: int) -> int:
    """Index just after the closing quote of the quoted string starting at ``start``."""
    i, n = start + 1, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    raise SipParseError("unbalanced quotes")


_ADDR_MEMO: Final[dict[str, NameAddr]] = {}


def shared_name_addr(text: str) -> NameAddr:
    """``parse_name_addr``, remembered: the caller must not edit the result."""
    a = _ADDR_MEMO.get(text)
    if a is None:
        a = parse_name_addr(text)
        remember(_ADDR_MEMO, text, a)
    return a


def parse_name_addr(text: str) -> NameAddr:
    """Parse a From/To/Contact/Route-style value.  Raises SipParseError."""
    t = text.strip(_WS)
    if not t:
        raise SipParseError("empty address")
    display = ""
    i = 0
    if t[0] == '"':
        end = _end_of_quoted(t, 0)
        display = t[:end]
        i = end
        while i < len(t) and t[i] in _WS:
            i += 1
        if i >= len(t) or t[i] != "<":
            raise SipParseError("display name without <uri>")
    lt = t.find("<", i)
    if lt >= 0:
        if not display:
            display = t[:lt].strip(_WS)
            if display and _DISPLAY_RE.fullmatch(display) is None:
                raise SipParseError(f"display name must be quoted: {display[:40]!r}")
        gt = t.find(">", lt)
        if gt < 0:
            raise SipParseError("missing '>'")
        uri_text = t[lt + 1 : gt]
        if uri_text != uri_text.strip(_WS) or not uri_text:
            raise SipParseError("whitespace inside <uri>")
        params = _parse_params(t[gt + 1 :], "address")
        return NameAddr(display, uri_text, params, True)
    # addr-spec: URI parameters cannot be told from header parameters; RFC 3261 20.10
    # says they are header parameters.  An addr-spec must not contain ',', '?' or ';'-URI params.
    semi = t.find(";")
    uri_text = t if semi < 0 else t[:semi]
    uri_text = uri_text.strip(_WS)
    if any(c in _WS for c in uri_text) or "?" in uri_text:
        raise SipParseError(f"bad address {t[:60]!r} (use <...> around URIs with '?' or spaces)")
    params = _parse_params(t[semi:], "address") if semi >= 0 else []
    return NameAddr("", uri_text, params, False)
