"""The fast paths of the SIP hot path give exactly what the code they replaced gave.

Each perf change in sip/ (see benchmarks/README.md, "where the time goes") keeps the
straightforward version it replaced here, verbatim, as the reference; Hypothesis feeds
both the same octets and the results must be identical, errors included.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sip import message as m
from sip.errors import SipError, SipParseError
from sip.headers import canonical_name, first_comma, split_values
from sip.uri import _TOKEN_CHARS

# --- reference: sip/message.py _parse_header_lines before the single-decode rewrite ------

_FOLD = re.compile(r"\r?\n[ \t]+")
_SP_HTAB = " \t"


def ref_parse_header_lines(
    msg: m.SipMessage, data: bytes, pos: int, head_end: int
) -> SipError | None:
    headers = msg.headers
    error: SipError | None = None
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
        start, pos = pos, end
        colon = text.find(":")
        if colon <= 0:
            error = error or SipParseError(f"bad header line {text[:40].strip()!r}")
            continue
        name = text[:colon].rstrip(" \t")
        if not name or any(c not in _TOKEN_CHARS for c in name):
            error = error or SipParseError(f"bad header name {name[:40]!r}")
            continue
        value = text[colon + 1 :]
        if value.endswith("\n"):
            value = value[:-2] if value.endswith("\r\n") else value[:-1]
        if "\n" in value:
            value = _FOLD.sub(" ", value)
        value = value.strip(_SP_HTAB)
        if "\r" in value or "\n" in value:
            # a bare CR/LF inside a value would let an edited line smuggle in a header
            error = error or SipParseError(f"bare CR or LF in {name[:40]!r}")
            continue
        headers.append(m.Header(canonical_name(name), value, start, end))
    return error


def _headers(
    fn: Callable[[m.SipMessage, bytes, int, int], SipError | None],
    data: bytes,
    pos: int,
    head_end: int,
) -> tuple[list[tuple[str, str, int, int]], object]:
    msg = m.SipMessage(data)
    err = fn(msg, data, pos, head_end)
    got = [(h.name, h.value, h.start, h.end) for h in msg.headers]
    return got, None if err is None else (type(err), str(err))


# header lines built from the pieces that matter: names valid or not (compact, odd case,
# token punctuation, spaces, non-ASCII), values with folding, bare CR / LF, tabs, latin-1
NAMES = st.sampled_from(
    ["Via", "v", "VIA", "From", "f", "To", "t", "Call-ID", "i", "CSeq", "Contact", "m", "l",
     "Content-Length", "Max-Forwards", "Route", "X-Odd.Name!%*_+`'~", "Bad Name", "Bad:Name",
     "", " ", "Caf\xe9", "X\x00", "Subject\t", "Via ", "User-Agent"]
)  # fmt: skip
VALUE_PARTS = st.sampled_from(
    ["SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1", "<sip:a@b>;tag=1", " ", "\t", "a", ",",
     "\r\n ", "\r\n\t", "\n ", "\r", "\n", "\xe9\xff", ":", "\"q\"", "1 INVITE", "70"]
)  # fmt: skip
ENDINGS = st.sampled_from(["\r\n", "\n", "\r\n", ""])


@st.composite
def header_sections(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(NAMES)
        sep = draw(st.sampled_from([":", ": ", " : ", "\t:", "::", ""]))
        value = "".join(draw(st.lists(VALUE_PARTS, max_size=6)))
        lines.append(name + sep + value + draw(ENDINGS))
    return "".join(lines).encode("latin-1")


def check_same(section: bytes, prefix: bytes = b"") -> None:
    data = prefix + section
    pos, end = len(prefix), len(data)
    assert _headers(_decoded_header_lines, data, pos, end) == _headers(
        ref_parse_header_lines, data, pos, end
    )


def _decoded_header_lines(msg: m.SipMessage, data: bytes, pos: int, end: int) -> SipError | None:
    return m._parse_header_lines(msg, data.decode("latin-1"), pos, end)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(header_sections(), st.sampled_from([b"", b"INVITE sip:a@b SIP/2.0\r\n", b"x"]))
@example(b"Via: a\r\n b\r\nFrom:\r\n", b"")
@example(b"Via: a\r\n", b"SIP/2.0 200 OK\r\n")
@example(b"\r\n ", b"")
@example(b"a\rb: c\r\n", b"")
def test_header_lines_match_the_reference(section: bytes, prefix: bytes) -> None:
    check_same(section, prefix)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_header_lines_match_the_reference_on_any_octets(section: bytes) -> None:
    check_same(section)


def ref_find_header_end(data: bytes, start: int, bare_lf: bool = True) -> tuple[int, int]:
    """_find_header_end as it was: bytes.find on the octets."""
    i = data.find(b"\r\n\r\n", start)
    if not bare_lf:
        return (i + 2, i + 4) if i >= 0 else (-1, -1)
    j = data.find(b"\n\n", start, i + 2 if i >= 0 else len(data))
    if j >= 0:
        return j + 1, j + 2
    if i >= 0:
        return i + 2, i + 4
    return -1, -1


@settings(max_examples=1000)
@given(
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b":", b" ", b"\xff", b"\xe9"]), max_size=20)
    .map(b"".join),
    st.booleans(),
)
@example(b"a\r\n\r\nb\n\n", True)
@example(b"a\n\nb\r\n\r\n", False)
def test_header_end_in_the_text_is_the_octet_search(data: bytes, bare_lf: bool) -> None:
    text = data.decode("latin-1")
    assert m._find_header_end(text, 0, bare_lf) == ref_find_header_end(data, 0, bare_lf)


def test_name_cache_is_bounded_and_keeps_only_valid_names() -> None:
    for i in range(m._NAMES_MAX + 50):
        check_same(f"X-Junk-{i}: v\r\nBad Name {i}: v\r\n".encode())
    assert len(m._NAMES) <= m._NAMES_MAX
    assert not any(" " in k for k in m._NAMES)


def test_token_check_is_the_token_set() -> None:
    from sip.uri import is_token

    for c in map(chr, range(0x3000)):
        for text in (c, "a" + c, c + "a", "a" + c + "a"):
            assert is_token(text) == all(x in _TOKEN_CHARS for x in text), repr(text)
    assert not is_token("")


# --- reference: the digit check and Editor.set_first_value's comma scan -----------------


def test_digits_is_is_digits_for_text() -> None:
    from sip.uri import is_digits

    samples = [
        "",
        "0",
        "7",
        "0070",
        "12345678901",
        "1234567890",
        "12a",
        " 1",
        "1 ",
        "+1",
        "-1",
        "1.0",
    ]
    samples += (
        [chr(c) for c in range(256)] + [f"1{chr(c)}" for c in range(256)] + ["\u0661\u0662", "\xb2"]
    )
    for s in samples:
        for n in (3, 5, 10):
            assert m._digits(s, n) == is_digits(s, n), (s, n)


def ref_set_first_value(ed: m.Editor, name: str, new: str | None) -> None:
    """Editor.set_first_value as it was: first_comma scans every value."""
    for idx, h in enumerate(ed.msg.headers):
        if h.name == name and split_values(h.value):
            break
    else:
        raise ValueError(f"no {name} header")
    comma = first_comma(h.value)
    rest = None if comma < 0 else h.value[comma + 1 :]
    if rest is not None and not rest.strip(" \t"):
        rest = None
    if new is None:
        if rest is None:
            ed.delete(idx)
        else:
            ed.set(idx, rest.lstrip(" \t"))
    else:
        ed.set(idx, new if rest is None else f"{new},{rest}")


def _edit(value: str, new: str | None, ref: bool = False) -> tuple[bytes | None, object]:
    data = f"SIP/2.0 200 OK\r\nVia: {value}\r\nVia: SIP/2.0/UDP h2\r\nContent-Length: 0\r\n\r\n"
    raw = data.encode("latin-1")
    msg = m.SipMessage(raw)
    m._parse_header_lines(msg, data, raw.index(b"\n") + 1, raw.index(b"\r\n\r\n") + 2)
    ed = m.Editor(msg)
    try:
        if ref:
            ref_set_first_value(ed, "via", new)
        else:
            ed.set_first_value("via", new)
    except (SipError, ValueError) as exc:
        return None, (type(exc), str(exc))
    return ed.to_bytes(), None


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from(["SIP/2.0/UDP a", ";branch=z", ",", '"', "<", ">", " ", "\\", "x"]),
        max_size=8,
    ),
    st.sampled_from([None, "SIP/2.0/UDP new;received=1.2.3.4"]),
)
def test_set_first_value_matches_the_reference(parts: list[str], new: str | None) -> None:
    value = "".join(parts)
    assert _edit(value, new) == _edit(value, new, ref=True)


# --- sip/proxy.py: flow tokens signed and verified once ----------------------------------


class _NoStore(dict):  # type: ignore[type-arg]
    """A cache that never keeps anything: the core then signs / verifies every time."""

    def __setitem__(self, key: object, value: object) -> None:
        pass


def _cores() -> tuple[Any, Any]:
    from benchmarks.samples import customer_rows, make_core
    from dsbc.store.memory import MemoryIndex

    idx = MemoryIndex.build(customer_rows(100))
    cached: Any = make_core(idx)
    plain: Any = make_core(idx)
    plain._tokens, plain._flows = _NoStore(), _NoStore()
    return cached, plain


def test_flow_token_caches_change_nothing() -> None:
    from benchmarks.samples import NODE, PHONE, account_of, call_flow, register
    from sip.flow import Flow

    cached, plain = _cores()
    phones = [Flow("udp", PHONE[0], PHONE[1] + i) for i in range(3)] + [
        Flow("tcp", PHONE[0], 4000, 7, 0)
    ]
    for rnd in range(3):  # again and again: the second round is served from the caches
        for i, phone in enumerate(phones):
            for _, data, msg_src in call_flow(cached, account_of(i), seq=rnd * 10 + i):
                assert isinstance(msg_src, Flow)
                src = phone if msg_src.ip == PHONE[0] else msg_src
                assert cached.handle_data(data, src, 0.0) == plain.handle_data(data, src, 0.0)
            reg = register(account_of(i), seq=rnd * 10 + i)
            assert cached.handle_data(reg, phone, 0.0) == plain.handle_data(reg, phone, 0.0)
    assert cached._tokens and cached._flows
    assert Flow("udp", *NODE) not in cached._flows.values()


def test_a_forged_flow_token_is_never_cached() -> None:
    from sip.flow import Flow, FlowTokenError

    cached, _ = _cores()
    good = cached._flow_token(Flow("udp", "203.0.113.9", 5060))
    forged = good[:-2] + ("AA" if good[-2:] != "AA" else "BB")
    for n in (1, 2, 3):
        with pytest.raises(FlowTokenError):
            cached._decode_flow(forged)
        assert cached.counters["flow_token_rejected"] == n
    assert forged not in cached._flows
    assert cached._decode_flow(good) == Flow("udp", "203.0.113.9", 5060)


def test_flow_token_caches_are_bounded() -> None:
    from sip.flow import Flow
    from sip.proxy import FLOW_CACHE_SIZE

    cached, _ = _cores()
    for i in range(FLOW_CACHE_SIZE + 100):
        token = cached._flow_token(Flow("udp", "198.51.100.7", 1024 + i))
        assert cached._decode_flow(token).port == 1024 + i
        assert len(cached._tokens) <= FLOW_CACHE_SIZE and len(cached._flows) <= FLOW_CACHE_SIZE


# --- reference: the character loops of sip/uri.py and sip/headers.py ---------------------
# parse_via, _parse_params, split_values, is_digits, the URI character check and the
# display-name check got regex / str.split fast paths for the plain spelling; the general
# code stays for everything else.  Each fast path must give what the general code gives.

from sip import headers as hd
from sip import uri as ur


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        r = fn()
    except SipError as exc:
        return ("error", type(exc).__name__, str(exc))
    if isinstance(r, hd.Via):
        return (r.transport, r.host, r.port, r.params, r.text)
    return r


def ref_is_digits(text: str, max_digits: int = 10) -> bool:
    return 0 < len(text) <= max_digits and all("0" <= c <= "9" for c in text)


def ref_split_values(value: str) -> list[str]:
    if "," not in value:
        v = value.strip(ur._WS)
        return [v] if v else []
    parts: list[str] = []
    start = 0
    while True:
        i = first_comma(value, start)
        if i < 0:
            break
        parts.append(value[start:i].strip(ur._WS))
        start = i + 1
    parts.append(value[start:].strip(ur._WS))
    return parts


_PARAM_ALPHABET = "abzAZ09-.!%*_+`'~;= \t\"\\,:[]@\xa0\x85\r\n\u00e9/"
_VIA_ALPHABET = "SIPsip/2.0UDPTCPudp ;:=[]abc123.-\t\"\xa0,"
plain_params = st.lists(
    st.tuples(
        st.text(alphabet="abcXYZ09-.!%*_+`'~", min_size=1, max_size=8),
        st.one_of(st.none(), st.text(alphabet="abc09.:[]-_=/@", min_size=1, max_size=10)),
    ),
    max_size=5,
).map(lambda ps: "".join(f";{k}" if v is None else f";{k}={v}" for k, v in ps))
plain_vias = st.builds(
    lambda tr, host, port, params: f"SIP/2.0/{tr} {host}{port}{params}",
    st.sampled_from(["UDP", "TCP", "TLS", "udp", "SCTP", "WS", "x.y"]),
    st.sampled_from(["127.0.0.1", "host.example.com", "[::1]", "[2001:db8::9]", "a", "a-", "-a",
                     "a..b", "[::1", "h_st"]),
    st.sampled_from(["", ":5060", ":0", ":65535", ":65536", ":99999", ":", ":123456", ": 5"]),
    plain_params,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(plain_params, st.text(alphabet=_PARAM_ALPHABET, max_size=30)))
@example(";a=b=c;lr")
@example(";a=")
@example(";=b")
@example(" ;a")
@example(";a;")
@example(";a=\"x;y\"")
def test_params_fast_path_matches_the_general_code(text: str) -> None:
    assert _outcome(lambda: ur._parse_params(text, "x")) == _outcome(
        lambda: ur._parse_params_general(text, "x"))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(plain_vias, st.text(alphabet=_VIA_ALPHABET, max_size=40)))
@example("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1;rport")
@example("SIP/2.0/UDP a:0")
@example("SIP/2.0/UDP a:65536;x")
@example("SIP/2.0/UDP host;branch=\"q\"")
@example(" SIP/2.0/UDP host ")
def test_via_fast_path_matches_the_general_code(text: str) -> None:
    assert _outcome(lambda: hd.parse_via(text)) == _outcome(
        lambda: hd._parse_via_general(text, text.strip(ur._WS)))


@settings(max_examples=400)
@given(st.text(alphabet="ab, \t<>\"\\;=", max_size=30))
@example("a,,b")
@example(" , ")
def test_split_values_fast_path_matches_the_reference(value: str) -> None:
    assert _outcome(lambda: split_values(value)) == _outcome(lambda: ref_split_values(value))


def test_is_digits_matches_the_reference() -> None:
    for c in map(chr, range(0x3000)):
        for text in (c, "1" + c, c * 3):
            assert ur.is_digits(text) == ref_is_digits(text), repr(text)
            if c < "\x80":
                assert ur.is_digits(text.encode()) == ref_is_digits(text)
    assert not ur.is_digits("") and not ur.is_digits("1" * 11) and ur.is_digits("1" * 10)


def test_uri_and_display_classes_are_their_char_sets() -> None:
    for c in map(chr, range(0x3000)):
        for text in (c, "a" + c, c + "a"):
            assert ur.uri_text_ok(text) == all(x in ur._URI_CHARS for x in text), repr(text)
        assert (ur._DISPLAY_RE.fullmatch(c) is not None) == (
            c in ur._TOKEN_CHARS or c in ur._WS), repr(c)
    assert ur.uri_text_ok("") and ur._DISPLAY_RE.fullmatch("") is None


@settings(max_examples=500)
@given(st.text(alphabet="aZ09-._[]:é \t", max_size=12))
@example("a-")
@example("a.")
@example("-a")
@example(".a")
@example("a..b")
@example("[::1]")
def test_host_check_is_the_host_regex(text: str) -> None:
    assert ur.host_ok(text) == (ur._HOST_RE.fullmatch(text) is not None)
    if not text.startswith("["):
        assert ur.plain_host(text) == (ur._HOST_RE.fullmatch(text) is not None)


@settings(max_examples=300)
@given(st.one_of(
    st.tuples(*[st.integers(0, 300)] * 4).map(lambda t: ".".join(map(str, t))),
    st.text(alphabet="0123456789.:[]af", max_size=20),
))
@example("01.2.3.4")
@example("[::1]")
def test_is_ip_fast_path_matches_ipaddress(host: str) -> None:
    import ipaddress

    from sip.proxy import _is_ip

    try:
        ipaddress.ip_address(host.strip("[]"))
        expected = True
    except ValueError:
        expected = False
    assert _is_ip(host) == expected


@settings(max_examples=200)
@given(st.text(max_size=40), st.sampled_from([3, 5, 8, 4, 16]))
@example("\udcff", 8)
def test_hash_from_a_copied_state_is_the_plain_blake2b(text: str, size: int) -> None:
    import hashlib

    from sip.proxy import _hash

    data = text.encode("utf-8", "surrogateescape")
    assert _hash(text, size) == hashlib.blake2b(data, digest_size=size).hexdigest()
    assert _hash(text, size) == _hash(text, size)


def test_tag_cache_gives_the_mac_and_stays_bounded() -> None:
    import base64
    import hmac

    from sip.flow import FlowSigner

    key = b"benchmark-flow-secret-0123456789"
    signer = FlowSigner(key)
    for i in range(FlowSigner.TAG_CACHE_SIZE + 50):
        text = f"source|call-{i % 9000}@host"
        mac = hmac.new(key, b"tag|" + text.encode(), "sha256").digest()[:6]
        expected = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        assert signer.tag(text) == expected == signer.tag(text)
        assert len(signer._tags) <= FlowSigner.TAG_CACHE_SIZE
    assert FlowSigner(b"another-secret-0123456789").tag("source|x") != signer.tag("source|x")


def test_port_number_is_the_port_check() -> None:
    for text in ("", "0", "1", "5060", "65535", "65536", "99999", "123456", "5o60", "+5060",
                 " 5060", "\u0665", "00080"):
        expected = int(text) if ur.is_digits(text, 5) and 0 < int(text) < 65536 else 0
        assert ur.port_number(text) == expected, repr(text)
        assert ur.port_number(text) == expected, repr(text)  # the memo gives the same


def test_host_and_port_memos_are_bounded() -> None:
    for i in range(ur.MEMO_SIZE + 100):
        ur.plain_host(f"h{i}.example.com")
        ur.port_number(str(i % 70000))
    ur.plain_host("x" * 10_000)  # long values are checked but never kept
    assert len(ur._HOST_MEMO) <= ur.MEMO_SIZE and len(ur._PORT_MEMO) <= ur.MEMO_SIZE
    assert all(len(k) <= 64 for k in ur._HOST_MEMO)


def test_from_to_and_request_uri_are_shared_by_equal_values_and_the_memos_are_bounded() -> None:
    def msg(frm: str, to: str) -> m.SipMessage:
        return m.parse_message(
            f"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: {frm}\r\n"
            f"To: {to}\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n".encode())

    a, b = msg("<sip:x@h>;tag=1", "<sip:y@h>"), msg("<sip:x@h>;tag=1", "<sip:y@h>;tag=2")
    assert a.from_ is b.from_ and a.from_.param("tag") == "1"
    assert a.to is not b.to and a.to.param("tag") is None and b.to.param("tag") == "2"
    assert a.uri is b.uri and a.uri.user == "a"
    for i in range(ur.MEMO_SIZE + 10):
        msg(f"<sip:x{i}@h>;tag=1", "<sip:y@h>").from_  # noqa: B018
    long = msg("<sip:" + "x" * 300 + "@h>;tag=1", "<sip:y@h>")
    assert long.from_.uri.user == "x" * 300
    for memo in (ur._ADDR_MEMO, m._URI_MEMO):
        assert 0 < len(memo) <= ur.MEMO_SIZE
        assert all(len(k) <= 256 for k in memo)


def ref_with_received(via_text: str, ip: str, port: int) -> str:
    parts = via_text.split(";")
    head, params = parts[0], parts[1:]
    kept = [p for p in params if p.strip().split("=", 1)[0].strip().lower() not in ("received", "rport")]
    return ";".join([head.rstrip()] + [p.strip() for p in kept] + [f"received={ip}", f"rport={port}"])


@settings(max_examples=500)
@given(st.lists(st.sampled_from(["SIP/2.0/UDP h:5060", " ", ";", "=", "rport", "RPort", "received",
                                 "branch", "x", "\t", "1.2.3.4", " = ", "\xa0", "\x85", "\x1c",
                                 "\u0130", "REceived", ";rport", "branch=z9hG4bK1"]),
                max_size=12).map("".join))
@example("SIP/2.0/UDP h:5060;branch=z9hG4bK1;rport")
@example("SIP/2.0/UDP h:5060;branch=z9hG4bK1;rport;")
@example("SIP/2.0/UDP h:5060 ;branch=z9hG4bK1;rport")
@example("SIP/2.0/UDP h:5060;rport")
@example("SIP/2.0/UDP h:5060;rport=1;branch=z9hG4bK1")
@example("SIP/2.0/UDP h:5060\xa0;branch=z9hG4bK1")
@example(";rport")
def test_received_and_rport_are_set_as_the_reference_does(via: str) -> None:
    from sip.proxy import _with_received

    assert _with_received(via, "192.0.2.9", 5062) == ref_with_received(via, "192.0.2.9", 5062)


def ref_to_bytes(ed: m.Editor) -> bytes:
    """Editor.to_bytes as it was before unchanged lines were copied in runs."""
    msg = ed.msg
    raw = msg.raw
    out: list[bytes] = [ed.start_line + b"\r\n" if ed.start_line is not None else raw[: msg.start_line_end]]
    out.extend(ed.top)
    new_body = ed.body is not None
    body = ed.body if ed.body is not None else raw[msg.body_start :]
    has_cl = False
    for i, h in enumerate(msg.headers):
        line = ed.replaced.get(i)
        if h.name == "content-length":
            if new_body:
                if has_cl:
                    continue
                if line is None:
                    line = ed.line("content-length", str(len(body)))
            if line != b"":
                has_cl = True
        if line is None:
            line = raw[h.start : h.end]
            if not line.endswith(b"\n"):
                line += b"\r\n"
        out.append(line)
    out.extend(ed.appended)
    if not has_cl:
        out.append(ed.line("content-length", str(len(body))))
    last = msg.headers[-1].end if msg.headers else msg.start_line_end
    blank = raw[last : msg.body_start]
    out.append(blank if blank in (b"\r\n", b"\n") else b"\r\n")
    out.append(body)
    return b"".join(out)


_EDIT_SAMPLES = [
    (b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:x@h>;tag=1\r\n"
    b"To: <sip:y@h>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 3\r\n\r\nabc"),
    (b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:x@h>;tag=1\r\n"
    b"To: <sip:y@h>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS"),
    (b"SIP/2.0 200 OK\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\nFrom: <sip:x@h>;tag=1\nTo: <sip:y@h>\n"
    b"Call-ID: c\nCSeq: 1 INVITE\nContent-Length: 0\nContent-Length: 0\n\n"),
]


@settings(max_examples=400)
@given(
    st.sampled_from(_EDIT_SAMPLES),
    st.lists(st.tuples(st.sampled_from(["set", "delete", "prepend", "append"]), st.integers(0, 9)), max_size=5),
    st.one_of(st.none(), st.binary(max_size=5)),
)
def test_editor_output_matches_the_reference(data: bytes, edits: list[tuple[str, int]], body: bytes | None) -> None:
    msg = m.parse_message(data)
    ed = m.Editor(msg)
    for op, i in edits:
        if op == "set" and i < len(msg.headers):
            ed.set(i, f"v{i}")
        elif op == "delete" and i < len(msg.headers):
            ed.delete(i)
        elif op == "prepend":
            ed.prepend("record-route", f"<sip:p{i}>")
        elif op == "append":
            ed.append("x-extra", str(i))
    ed.body = body
    assert ed.to_bytes() == ref_to_bytes(ed)
