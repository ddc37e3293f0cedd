"""sip.uri: SIP URIs, name-addr values and %-unescaping, with Hypothesis properties:
any text parses into a SipUri or raises a SipError; generated URIs keep their text."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sip.errors import SipError, SipParseError, UnsupportedUriScheme
from sip.uri import NameAddr, SipUri, is_digits, parse_name_addr, parse_uri, unescape


def test_full_uri() -> None:
    u = parse_uri(
        "sips:alice:secret@Example.COM:5071;transport=TCP;lr;maddr=239.1.1.1?subject=hi&priority=urgent"
    )
    assert (u.scheme, u.user, u.password, u.host, u.port) == (
        "sips",
        "alice",
        "secret",
        "Example.COM",
        5071,
    )
    assert u.params == [("transport", "TCP"), ("lr", None), ("maddr", "239.1.1.1")]
    assert u.param("TRANSPORT") == "TCP" and u.transport == "tcp"
    assert u.param("lr") == "" and u.has_param("lr") and not u.has_param("ttl")
    assert u.headers == "subject=hi&priority=urgent"
    assert str(u) == u.text


def test_defaults_and_host_port() -> None:
    assert parse_uri("sip:h").host_port == ("h", 5060)
    assert parse_uri("sips:h").host_port == ("h", 5061)
    assert parse_uri("sip:h;transport=tls").host_port == ("h", 5061)
    assert parse_uri("sip:[2001:db8::1]:5070").host_port == ("2001:db8::1", 5070)
    assert parse_uri("sip:[2001:db8::1]").port is None
    assert parse_uri("SIP:h").scheme == "sip"
    assert parse_uri("  sip:h \t").text == "sip:h"


def test_other_schemes() -> None:
    with pytest.raises(UnsupportedUriScheme) as info:
        parse_uri("tel:+1555")
    assert info.value.status == 416
    u = parse_uri("http://www.example.com", allow_other_schemes=True)
    assert u.scheme == "http" and u.host == "" and u.text == "http://www.example.com"


def test_rfc4475_user_parts() -> None:
    u = parse_uri(
        "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com"
    )
    assert u.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert u.host == "example.com" and u.params == [] and u.headers == ""
    assert parse_uri("sip:user;par=u%40example.net@example.com").user == "user;par=u%40example.net"


@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip:@h",  # regression: an empty user was accepted
        "sip:a@b@h",  # regression: two '@' were split at the last one
        "sip:h;=v",  # regression: a parameter without a name
        "sip:h;",
        "sip:h;;lr",
        "sip:h:0",
        "sip:h:65536",
        "sip:h:5o60",
        "sip:h:\xb2",  # regression: '\xb2'.isdigit() is True
        "sip:h:" + "9" * 5000,  # regression: int() of 5000 digits raises ValueError
        "sip:h\x1c",  # regression: str.strip() removed \x1c, the URI kept it
        "sip:h\x85",
        "sip:a\x00b@h",
        "sip:caf\xe9@h",  # non-ASCII must be %-escaped
        "sip:a b@h",
        "sip:<h>",
        'sip:"h"',
        "sip:[::1",
        "sip:[::1]x",
        "sip:-h",
        "sip:h_",
        "1sip:h",
        "si p:h",
        "sip\n:h",  # regression: re.match('...$') accepted a trailing newline: 416 not 400
        ":h",
        "h",
        "",
    ],
    ids=lambda v: ascii(v)[:40],
)
def test_bad_uris_are_400(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_uri(text)


def test_unescape_once_and_keep_invalid_escapes() -> None:
    assert unescape("value%25%34%31") == "value%41"
    assert unescape("%00%00") == "\x00\x00"
    assert unescape("%Z%45") == "%ZE"
    assert unescape("100%") == "100%"
    assert unescape("caf%C3%A9") == "café"
    assert unescape("%ff") == "\udcff"  # invalid UTF-8 kept distinct (surrogateescape)
    assert unescape("plain") == "plain"


def test_is_digits() -> None:
    assert is_digits("0") and is_digits(b"123") and is_digits("9" * 10)
    assert (
        not is_digits("")
        and not is_digits("9" * 11)
        and not is_digits("\xb2")
        and not is_digits("-1")
    )
    assert not is_digits(b"\xb2") and not is_digits("١")  # Arabic-Indic one


# --- name-addr --------------------------------------------------------------------------


def test_name_addr_forms() -> None:
    a = parse_name_addr(
        '"Alice \\"A\\" Liddell" <sip:alice@example.com;transport=tcp>;tag=abc;x="y;z"'
    )
    assert a.display == '"Alice \\"A\\" Liddell"' and a.bracketed
    assert a.uri.param("transport") == "tcp"
    assert a.param("tag") == "abc" and a.param("X") == '"y;z"'
    b = parse_name_addr("sip:bob@example.com;tag=1")
    assert not b.bracketed and b.uri_text == "sip:bob@example.com" and b.param("tag") == "1"
    c = parse_name_addr("Bob<sip:bob@example.com>")
    assert c.display == "Bob"
    d = parse_name_addr("<urn:service:sos>")
    assert d.uri.scheme == "urn"
    assert str(parse_name_addr(' "A"  <sip:a@b> ;tag=1')) == '"A" <sip:a@b>;tag=1'
    assert isinstance(parse_name_addr("<sip:a@b>"), NameAddr)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        '"unterminated <sip:a@b>',
        '"A" sip:a@b',
        "Bell, Alexander <sip:a@b>",
        "<sip:a@b",
        "< sip:a@b>",
        "<>",
        "sip:a@b?x=y",
        "sip:a @b",
        "<sip:a@b>;",
        "<sip:a@b>;tag=",
        "<sip:a@b> junk",
        '<sip:a@b>;"x"',
    ],
)
def test_bad_name_addrs(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_name_addr(text)


# --- Hypothesis -------------------------------------------------------------------------

URI_ALPHABET = st.sampled_from(
    list("sip:SIPS@;=?&[]<>\"%0123456789abcdefxyz.-_~!*'()+$,/ \t\r\n\x00\x7f\xb2\xe9")
)


def check_uri_text(text: str) -> None:
    try:
        u = parse_uri(text)
    except SipError:
        return
    assert isinstance(u, SipUri)
    u.host_port  # noqa: B018
    u.transport  # noqa: B018
    str(u)
    for field in (u.user, u.password):
        if field is not None:
            unescape(field)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
@example("sip:h:\xb2")
@example("sip:h:" + "9" * 5000)
@example("sip\n:h")
def test_any_text_gives_uri_or_sip_error(text: str) -> None:
    check_uri_text(text)
    check_uri_text("sip:" + text)
    try:
        parse_name_addr(text)
    except SipError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.text(URI_ALPHABET, max_size=60))
def test_uri_like_text_gives_uri_or_sip_error(text: str) -> None:
    check_uri_text("sip:" + text)
    check_uri_text("sips:" + text)
    try:
        na = parse_name_addr(text)
        try:
            na.uri  # noqa: B018
        except SipError:
            pass
    except SipError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_unescape_any_text(data: bytes) -> None:
    text = data.decode("latin-1")
    out = unescape(text)
    assert len(out) <= len(text)
    assert unescape(text.replace("%", "%25")) == text  # escaping '%' is undone exactly once


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
_pchar = st.text("abcdefghijklmnopqrstuvwxyzABC0123456789-_.!~*'()&+$", min_size=1, max_size=10)


@st.composite
def sip_uris(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    scheme = draw(st.sampled_from(["sip", "sips"]))
    user = draw(st.none() | _pchar | _pchar.map(lambda s: s + "%40x"))
    password = draw(st.none() | _pchar) if user else None
    if draw(st.booleans()):
        host = ".".join(draw(st.lists(_label, min_size=1, max_size=3)))
        if host[0] == "-" or host[-1] == "-":
            host = "h" + host + "h"
    else:
        host = "[2001:db8::" + format(draw(st.integers(0, 0xFFFF)), "x") + "]"
    port = draw(st.none() | st.integers(1, 65535))
    params = draw(st.lists(st.tuples(_pchar, st.none() | _pchar), max_size=4))
    headers = draw(st.sampled_from(["", "subject=hi", "a=b&c=d"]))
    text = f"{scheme}:"
    if user:
        text += user + (f":{password}" if password else "") + "@"
    text += host + (f":{port}" if port else "")
    text += "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)
    text += f"?{headers}" if headers else ""
    return text, {
        "scheme": scheme,
        "user": user,
        "password": password,
        "host": host,
        "port": port,
        "params": params,
        "headers": headers,
    }


@settings(max_examples=120, deadline=None)
@given(sip_uris())
def test_generated_uris_parse_to_their_fields(case: tuple[str, dict[str, object]]) -> None:
    text, fields = case
    u = parse_uri(text)
    for k, v in fields.items():
        assert getattr(u, k) == v, k
    assert str(u) == text
    assert parse_name_addr(f'"X" <{text}>;tag=1').uri.host == fields["host"]
