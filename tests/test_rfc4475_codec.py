"""RFC 4475 torture messages through the codec (sip.message, sip.framing).

``DECISIONS`` states, per file, what the codec does and why, from the ``expect_proxy`` text
in ``index.json``.  Where the RFC lets an element be strict or liberal, the codec is
strict and answers 400: a proxy must not forward what it had to guess about.  Decisions
that belong to the proxy (483 for zeromf, 420 for bext01, 404/501 for unknown methods,
dropping bcast) are not the codec's: those messages parse.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sip.errors import (
    FramingError,
    MessageTooLarge,
    SipError,
    SipParseError,
    UnsupportedUriScheme,
    VersionNotSupported,
)
from sip.framing import NEED_DATA, StreamFramer
from sip.message import SipMessage, make_response, parse_message
from sip.uri import parse_uri, unescape
from tests import conformance

DIR = conformance.RFC4475
INDEX: list[dict[str, Any]] = json.loads((DIR / "index.json").read_text()) if DIR.is_dir() else []

pytestmark = pytest.mark.skipif(not DIR.is_dir(), reason="RFC 4475 corpus not available")

PARSE = "parse"
# file -> (PARSE, why) or (error class, status, why).  The class is matched exactly.
DECISIONS: dict[str, tuple[Any, ...]] = {
    # 3.1.1 valid: all must be accepted
    "wsinv.dat": (PARSE, "well-formed"),
    "intmeth.dat": (PARSE, "well-formed; 404/501 for the unknown method is the proxy's call"),
    "esc01.dat": (PARSE, "well-formed"),
    "escnull.dat": (PARSE, "well-formed"),
    "esc02.dat": (PARSE, "well-formed, unknown method"),
    "lwsdisp.dat": (PARSE, "no LWS before < is accepted (RFC 3261 grammar bug)"),
    "longreq.dat": (PARSE, "well-formed"),
    "dblreq.dat": (PARSE, "REGISTER with Content-Length 0; trailing octets ignored"),
    "semiuri.dat": (PARSE, "well-formed"),
    "transports.dat": (PARSE, "well-formed; unknown transports are kept as written"),
    "mpart01.dat": (PARSE, "well-formed; the binary part is framed by Content-Length"),
    "unreason.dat": (PARSE, "UTF-8 reason phrase"),
    "noreason.dat": (PARSE, "empty reason phrase"),
    # 3.1.2 invalid
    "badinv01.dat": (SipParseError, 400, "extraneous separators (empty Via parameter)"),
    "clerr.dat": (SipParseError, 400, "datagram shorter than Content-Length"),
    "ncl.dat": (FramingError, 400, "negative Content-Length: framing error"),
    "scalar02.dat": (SipParseError, 400, "CSeq > 2**32-1 (strict also on Max-Forwards 300)"),
    "scalarlg.dat": (SipParseError, 400, "response: raised with respond=False, so dropped"),
    "quotbal.dat": (SipParseError, 400, "strict: no inferred closing quote"),
    "ltgtruri.dat": (SipParseError, 400, "strict: <> around the Request-URI"),
    "lwsruri.dat": (SipParseError, 400, "strict: LWS inside the Request-URI"),
    "lwsstart.dat": (SipParseError, 400, "strict: several SP in the request line"),
    "trws.dat": (SipParseError, 400, "strict: trailing SP in the request line"),
    "escruri.dat": (SipParseError, 400, "strict: headers in the Request-URI"),
    "baddate.dat": (PARSE, "the Date header does not matter to a proxy: passed through"),
    "regbadct.dat": (SipParseError, 400, "strict: no inferred <> around a URI with '?'"),
    "badaspec.dat": (SipParseError, 400, "strict: spaces inside the addr-spec"),
    "baddn.dat": (SipParseError, 400, "strict: unquoted display name with ','"),
    "badvers.dat": (VersionNotSupported, 505, "SIP/7.0"),
    "mismatch01.dat": (SipParseError, 400, "CSeq method differs from the request method"),
    "mismatch02.dat": (SipParseError, 400, "CSeq method mismatch (400 allowed instead of 501)"),
    "bigcode.dat": (SipParseError, 400, "response with status > 699: respond=False, dropped"),
    # 3.2 transaction
    "badbranch.dat": (PARSE, "no magic cookie: RFC 2543 matching is the proxy's call"),
    # 3.3 application
    "insuf.dat": (SipParseError, 400, "missing Call-ID, From, To"),
    "unkscm.dat": (UnsupportedUriScheme, 416, "unknown Request-URI scheme"),
    "novelsc.dat": (UnsupportedUriScheme, 416, "soap.beep is never meaningful to us"),
    "unksm2.dat": (PARSE, "unknown schemes in To/From/Contact are not routed on"),
    "bext01.dat": (PARSE, "parses; the proxy answers 420 from Proxy-Require"),
    "invut.dat": (PARSE, "Content-Type is the endpoint's business"),
    "regaut01.dat": (PARSE, "Authorization passed through unmodified"),
    "multi01.dat": (SipParseError, 400, "repeated single-valued headers"),
    "mcl01.dat": (FramingError, 400, "conflicting Content-Length: framing error"),
    "bcast.dat": (PARSE, "parses; the proxy must not forward to 255.255.255.255"),
    "zeromf.dat": (PARSE, "legal; the proxy answers 483"),
    "cparam01.dat": (PARSE, "REGISTER succeeds"),
    "cparam02.dat": (PARSE, "REGISTER succeeds"),
    "regescrt.dat": (PARSE, "REGISTER succeeds; escaped header kept in the Contact"),
    "sdp01.dat": (PARSE, "Accept is the endpoint's business"),
    # 3.4 backward compatibility
    "inv2543.dat": (PARSE, "RFC 2543 INVITE: body is the rest of the datagram"),
}

FILES = [e["file"] for e in INDEX]
VALID = [f for f in FILES if DECISIONS[f][0] == PARSE]
INVALID = [f for f in FILES if DECISIONS[f][0] != PARSE]
COPIED = ("via", "from", "to", "call-id", "cseq")


def load(name: str) -> bytes:
    return (DIR / name).read_bytes() if DIR.is_dir() else b""


def parse(name: str) -> SipMessage:
    return parse_message(load(name))


def test_every_file_has_a_decision() -> None:
    assert len(FILES) == 49
    assert sorted(DECISIONS) == sorted(FILES)


@pytest.mark.parametrize("name", VALID)
def test_valid_messages_parse(name: str) -> None:
    msg = parse(name)
    assert msg.vias and msg.call_id
    msg.cseq  # noqa: B018
    assert load(name).startswith(msg.raw)
    assert msg.raw[msg.body_start :] == msg.body


@pytest.mark.parametrize("name", INVALID)
def test_invalid_messages_raise_their_answer(name: str) -> None:
    cls, status, _why = DECISIONS[name]
    with pytest.raises(SipError) as info:
        parse(name)
    exc = info.value
    assert type(exc) is cls, exc
    assert exc.status == status
    is_request = not load(name).startswith(b"SIP/")
    if is_request:
        assert exc.respond
        assert isinstance(exc.partial, SipMessage)  # type: ignore[attr-defined]
        assert exc.partial.is_request  # type: ignore[attr-defined]
    else:
        # a malformed response is never answered: the proxy drops (and counts) it
        assert exc.respond is False
        assert getattr(exc, "partial", None) is None


@pytest.mark.parametrize("name", [f for f in INVALID if not load(f).startswith(b"SIP/")])
def test_answer_copies_the_request_lines_byte_exact(name: str) -> None:
    with pytest.raises(SipError) as info:
        parse(name)
    exc = info.value
    partial: SipMessage = exc.partial  # type: ignore[attr-defined]
    data = load(name)
    copied = [partial.raw[h.start : h.end] for h in partial.headers if h.name in COPIED]
    assert copied  # every invalid request here has at least a Via
    for line in copied:
        assert line in data  # the request's own octets, folding and all
    resp = make_response(partial, exc.status, exc.reason)
    status_line = f"SIP/2.0 {exc.status} {exc.reason}\r\n".encode()
    assert resp == status_line + b"".join(copied) + b"Content-Length: 0\r\n\r\n"
    # the Via/From/To/Call-ID/CSeq lines are those of the request, in order
    names = [h.name for h in partial.headers if h.name in COPIED]
    for n in ("via", "call-id", "cseq"):
        assert n in names or name == "insuf.dat"


# --- specific fields of valid messages -----------------------------------------------


def test_wsinv_whitespace_folding_and_compact_forms() -> None:
    msg = parse("wsinv.dat")
    assert msg.method == "INVITE"
    assert msg.uri.host == "chair-dnrc.example.com" and msg.uri.params == [("unknownparam", None)]
    # folded From with a quoted display name holding escaped quotes
    assert msg.from_.display == '"J Rosenberg \\\\\\""'
    assert msg.from_.uri_text == "sip:jdrosen@example.com"
    assert msg.from_tag == "98asjd8"
    assert msg.to_tag == "1918181833n"
    assert msg.max_forwards == 68
    assert msg.cseq == (9, "INVITE")
    vias = msg.vias
    assert len(vias) == 3
    assert [v.transport for v in vias] == ["UDP", "TCP", "UDP"]
    assert [v.host for v in vias] == ["192.0.2.2", "spindle.example.com", "192.168.255.111"]
    assert [v.branch for v in vias] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    # compact forms: s (Subject), v (Via), m (Contact)
    names = [h.name for h in msg.headers]
    assert names.count("via") == 2 and "subject" in names and "contact" in names
    assert msg.get("subject") == ""
    assert msg.get("newfangledheader") == "newfangled value continued newfangled value"
    assert msg.get("unknownheaderwithunusualvalue") == ";;,,;;,;"
    assert msg.routes[0].uri.has_param("lr")
    contact = msg.values("contact")
    assert len(contact) == 1 and contact[0].startswith(
        '"Quoted string \\"\\"" <sip:jdrosen@example.com>'
    )
    assert len(msg.body) == 150


def test_intmeth_unknown_method_and_odd_user_part() -> None:
    msg = parse("intmeth.dat")
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.cseq[1] == msg.method
    assert msg.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert msg.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert msg.uri.host == "example.com"
    # NUL, BEL and DEL inside a quoted string survive in the raw octets
    assert b"\x00" in msg.raw and b"\x07" in msg.raw and b"\x7f" in msg.raw


def test_esc01_escapes_kept_and_unescaped_once() -> None:
    msg = parse("esc01.dat")
    assert msg.uri.user == "sips%3Auser%40example.com"
    assert unescape(msg.uri.user) == "sips:user@example.com"
    assert msg.uri.host == "example.net"
    assert unescape(parse_uri(msg.to.uri_text).user or "") == "user"
    contact = parse_uri(msg.values("contact")[0].strip("<>"))
    assert unescape(contact.user or "") == "caller"
    assert [unescape(k) for k, _ in contact.params] == ["lr", "name"]
    assert unescape(contact.params[1][1] or "") == "value%41"  # not recursive


def test_escnull_nul_does_not_shorten_the_user() -> None:
    msg = parse("escnull.dat")
    assert unescape(msg.to.uri.user or "") == "null-\x00-null"
    users = [unescape(parse_uri(c.strip("<>")).user or "") for c in msg.values("contact")]
    assert users == ["\x00", "\x00\x00"]  # two distinct contacts


def test_esc02_percent_in_method_and_two_contacts() -> None:
    msg = parse("esc02.dat")
    assert msg.method == "RE%47IST%45R"
    assert len(msg.values("contact")) == 2


def test_semiuri_user_part_keeps_semicolons() -> None:
    msg = parse("semiuri.dat")
    assert msg.uri.user == "user;par=u%40example.net"
    assert unescape(msg.uri.user) == "user;par=u@example.net"
    assert msg.uri.host == "example.com"
    assert msg.uri.params == []


def test_lwsdisp_display_name_without_space() -> None:
    assert parse("lwsdisp.dat").from_.display == "caller"


def test_longreq_long_values() -> None:
    msg = parse("longreq.dat")
    assert len(msg.vias) == 34
    assert len(msg.call_id) > 100
    assert len(msg.from_tag) > 150
    assert msg.to.display.startswith('"I have a user name of extreme')
    assert msg.to.uri.port == 6000
    assert any(len(k) > 100 for k, _ in msg.to.uri.params)
    assert len(msg.values("contact")) == 1


def test_dblreq_ignores_the_trailing_invite() -> None:
    data = load("dblreq.dat")
    msg = parse_message(data)
    assert msg.method == "REGISTER"
    assert msg.call_id.startswith("dblreq.0ha0isndaksdj")
    assert msg.body == b""
    assert b"INVITE" not in msg.raw
    assert msg.raw == data[: data.index(b"\r\n\r\n") + 4]


def test_transports_five_vias() -> None:
    msg = parse("transports.dat")
    assert [v.transport for v in msg.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert [v.host for v in msg.vias] == [f"t{i}.example.com" for i in range(1, 6)]


def test_mpart01_binary_body_framed_by_content_length() -> None:
    msg = parse("mpart01.dat")
    assert msg.method == "MESSAGE"
    assert len(msg.body) == int(msg.get("content-length") or -1)
    assert b"\x00" in msg.body
    # over a stream too
    f = StreamFramer()
    f.receive_data(load("mpart01.dat"))
    assert f.next_event() == msg.raw


def test_unreason_utf8_reason_phrase() -> None:
    msg = parse("unreason.dat")
    assert msg.status == 200
    assert msg.reason.encode("latin-1").decode("utf-8").startswith("= 2**3 * 5**2 но")


def test_noreason_empty_reason() -> None:
    msg = parse("noreason.dat")
    assert not msg.is_request and msg.status == 100 and msg.reason == ""


def test_inv2543_body_is_rest_of_datagram() -> None:
    data = load("inv2543.dat")
    msg = parse_message(data)
    assert msg.get("content-length") is None
    assert msg.body == data[data.index(b"\r\n\r\n") + 4 :]
    assert msg.body.startswith(b"v=0\r\n") and msg.body.endswith(b"RTP/AVP 0\r\n")
    assert msg.from_tag == "" and msg.top_via.branch == ""
    assert msg.max_forwards is None


def test_inv2543_needs_content_length_on_a_stream() -> None:
    f = StreamFramer()
    f.receive_data(load("inv2543.dat"))
    with pytest.raises(FramingError) as info:
        f.next_event()
    assert info.value.close_connection


def test_zeromf_parses_with_max_forwards_zero() -> None:
    assert parse("zeromf.dat").max_forwards == 0


def test_bext01_parses_with_its_extensions() -> None:
    msg = parse("bext01.dat")
    assert msg.values("proxy-require") == ["noProxiesSupportThis", "norDoAnyProxiesSupportThis"]
    assert msg.values("require") == ["nothingSupportsThis", "nothingSupportsThisEither"]


def test_regaut01_authorization_kept_whole() -> None:
    msg = parse("regaut01.dat")
    assert msg.values("authorization") == ["NoOneKnowsThisScheme opaque-data=here"]


def test_unkscm_to_with_unknown_scheme_is_not_parsed_as_sip() -> None:
    with pytest.raises(UnsupportedUriScheme) as info:
        parse("unkscm.dat")
    assert info.value.partial.ruri.startswith("nobodyKnowsThisScheme:")  # type: ignore[attr-defined]


def test_unksm2_other_schemes_in_to_and_from() -> None:
    msg = parse("unksm2.dat")
    assert msg.to.uri.scheme == "isbn" and msg.from_.uri.scheme == "http"


def test_bcast_second_via_is_broadcast() -> None:
    msg = parse("bcast.dat")
    assert not msg.is_request
    assert msg.vias[1].host == "255.255.255.255"


def test_badvers_is_505_with_partial() -> None:
    with pytest.raises(VersionNotSupported) as info:
        parse("badvers.dat")
    resp = make_response(info.value.partial, 505, "Version Not Supported")  # type: ignore[attr-defined]
    assert resp.startswith(b"SIP/2.0 505 Version Not Supported\r\n")


def test_bigcode_and_scalarlg_are_dropped() -> None:
    for name in ("bigcode.dat", "scalarlg.dat"):
        with pytest.raises(SipError) as info:
            parse(name)
        assert info.value.respond is False


# --- the same files over a stream ------------------------------------------------------


@pytest.mark.parametrize("name", ["ncl.dat", "mcl01.dat"])
def test_bad_content_length_closes_a_stream(name: str) -> None:
    f = StreamFramer()
    f.receive_data(load(name))
    with pytest.raises(FramingError) as info:
        f.next_event()
    assert info.value.close_connection
    with pytest.raises(FramingError):
        parse_message(load(name), datagram=False)


def test_clerr_waits_for_more_data_on_a_stream() -> None:
    f = StreamFramer()
    f.receive_data(load("clerr.dat"))
    assert f.next_event() is NEED_DATA


def test_dblreq_over_a_stream_yields_the_register_first() -> None:
    data = load("dblreq.dat")
    f = StreamFramer()
    f.receive_data(data)
    first = f.next_event()
    assert isinstance(first, bytes) and first.startswith(b"REGISTER")
    assert parse_message(first, datagram=False).method == "REGISTER"


@pytest.mark.parametrize(
    "name",
    [
        f
        for f in VALID
        if b"\r\nContent-Length" in load(f) or b"\r\nl:" in load(f) or b"\r\nL:" in load(f)
    ],
)
def test_valid_messages_frame_on_a_stream(name: str) -> None:
    msg = parse(name)
    f = StreamFramer()
    f.receive_data(msg.raw)
    event = f.next_event()
    assert event == msg.raw
    assert f.next_event() is NEED_DATA
    again = parse_message(event, datagram=False)  # type: ignore[arg-type]
    assert again.raw == msg.raw


def test_max_size_applies_to_torture_messages() -> None:
    data = load("longreq.dat")
    with pytest.raises(MessageTooLarge):
        parse_message(data, max_size=len(data) - 1)
    assert parse_message(data, max_size=len(data)).raw == data
