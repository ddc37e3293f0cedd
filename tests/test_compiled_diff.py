"""The compiled core (mypyc) and its pure-Python source give the same answers.

tests/test_compiled.py runs the core tests once per build; this file runs both builds
side by side on the same inputs, in one process: the compiled modules are imported as
usual and the ``.py`` sources of the same modules are imported again under other names
(``puretwin_sip.message`` ...).  For each input both must give the same result or raise
the same exception class: SIP parsing, editing and answering, URI / name-addr / Via
parsing, TCP framing of a stream cut at every octet, the proxy core's actions on a
message, and the API fast path's head codec and classifier.  mypyc turns a type slip
into a TypeError at run time where Python carries on; such a difference shows here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sip._pure import compiled

ROOT = Path(__file__).resolve().parent.parent
TWIN = "puretwin_"

if not all(compiled().values()):
    pytest.skip("the compiled core is not in use: nothing to compare", allow_module_level=True)


class _TwinFinder(importlib.abc.MetaPathFinder):
    """``puretwin_<package>.<module>``: the ``.py`` file of ``<package>/<module>``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(TWIN):
            return None
        package, *rest = fullname[len(TWIN) :].split(".")
        folder = ROOT / package
        if not rest:
            return importlib.util.spec_from_file_location(
                fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
            )
        return importlib.util.spec_from_file_location(fullname, folder.joinpath(*rest[:-1], rest[-1] + ".py"))


def pure(name: str) -> ModuleType:
    """The pure-Python module ``name`` (``sip.message``), beside the compiled one."""
    import sys

    if not any(isinstance(f, _TwinFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TwinFinder())
    module = importlib.import_module(TWIN + name)
    assert (module.__file__ or "").endswith(".py")
    return module


def both(name: str) -> tuple[ModuleType, ModuleType]:
    module = importlib.import_module(name)
    assert not (module.__file__ or "").endswith(".py"), f"{name} is not the compiled build"
    return module, pure(name)


def outcome(fn: Callable[[], Any]) -> Any:
    """What ``fn()`` gives, or the name of its exception class and its SIP answer."""
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - the class is the result compared
        return ("raised", type(exc).__name__, getattr(exc, "status", None), getattr(exc, "respond", None))


def same(compiled_fn: Callable[[], Any], pure_fn: Callable[[], Any]) -> None:
    c, p = outcome(compiled_fn), outcome(pure_fn)
    assert repr(c) == repr(p), f"compiled: {c!r}\npure:     {p!r}"


# --- SIP -----------------------------------------------------------------------------------

SEEDS = sorted((ROOT / "tests" / "fuzz" / "corpus").glob("*.dat"))
PIECES = [
    b"\x00", b"\xff", b"\xc3\xa9", b"\x85", b"\xa0", b"%", b"%00", b"%zz", b";", b",", b'"', b"\\",
    b"<", b">", b":", b"@", b"[", b"]", b"\r\n", b"\n", b"\r", b" ", b"\t", b"\r\n ", b"-1",
    b"99999999999999999999", b"4294967296", b"0", b"256", b"=", b"sips:", b"tel:", b"[::1]",
    b"l: 0\r\n", b"v: SIP/2.0/UDP [::1]:5060;rport\r\n", b"Content-Length: 5\r\n",
    b"Route: <sip:192.0.2.10;lr>\r\n", b"Contact: *\r\n", b"Expires: 99999999999\r\n",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes], pieces: Sequence[bytes] = PIECES) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 3))
        if op == 0:
            del data[at : at + draw(st.integers(1, 8))]
        elif op == 1:
            data[at:at] = draw(st.sampled_from(pieces))
        elif op == 2 and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        else:
            src = draw(st.integers(0, len(data)))
            data[at:at] = data[src : src + draw(st.integers(1, 30))]
    return bytes(data)


SIP_SEEDS = [p.read_bytes() for p in SEEDS]
MC, MP = both("sip.message")
UC, UP = both("sip.uri")
HC, HP = both("sip.headers")
FC, FP = both("sip.framing")


def _uri(u: Any) -> Any:
    return (u.scheme, u.user, u.password, u.host, u.port, u.params, u.headers, str(u), u.transport, u.host_port)


def _addr(n: Any) -> Any:
    return (n.display, n.uri_text, n.params, n.bracketed, str(n), outcome(lambda: _uri(n.uri)))


def _via(v: Any) -> Any:
    return (v.transport, v.host, v.port, v.params, v.text, v.branch, v.response_address())


def sip_view(m: Any, mod: ModuleType) -> Any:
    """Everything a proxy reads from a parsed message, and what it makes of it."""
    def edited() -> bytes:
        e = mod.Editor(m)
        e.prepend("via", "SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKdiff")
        e.set_first_value("via", None)
        e.set_first_value("contact", "<sip:a@192.0.2.1>")
        e.body = b"xy"
        return bytes(e.to_bytes())

    view = [
        m.is_request, m.method, m.ruri, m.status, m.reason, m.version, m.raw, m.body_start,
        m.start_line_end, [(h.name, h.value, h.start, h.end) for h in m.headers],
        outcome(lambda: [_via(v) for v in m.vias]), outcome(lambda: _addr(m.from_)),
        outcome(lambda: _addr(m.to)), outcome(lambda: m.cseq), outcome(lambda: m.call_id),
        outcome(lambda: m.max_forwards), outcome(lambda: [_addr(r) for r in m.routes]),
        outcome(lambda: _uri(m.uri)), outcome(lambda: (m.from_tag, m.to_tag)),
        [outcome(lambda n=h.name: m.values(n)) for h in m.headers],
        outcome(lambda: mod.Editor(m).to_bytes()), outcome(edited),
    ]
    if m.is_request:
        view.append(outcome(lambda: mod.make_response(m, 400, "Bad Request", to_tag="t")))
    return view


def parsed(mod: ModuleType, data: bytes, datagram: bool) -> Any:
    try:
        m = mod.parse_message(data, datagram=datagram)
    except Exception as exc:  # noqa: BLE001 - compared
        partial = getattr(exc, "partial", None)
        return ("raised", type(exc).__name__, getattr(exc, "status", None),
                getattr(exc, "respond", None), None if partial is None else sip_view(partial, mod))
    return ("ok", sip_view(m, mod))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated(SIP_SEEDS))
def test_sip_messages_parse_edit_and_answer_the_same(data: bytes) -> None:
    for datagram in (True, False):
        same(lambda d=datagram: parsed(MC, data, d), lambda d=datagram: parsed(MP, data, d))


TEXT_PIECES = [
    "sip:", "sips:", "tel:", "user", "@", "host", "[::1]", "[fe80::1%eth0]", ":5060", ":99999", ":-1",
    ":0", ":", ";", "transport=tcp", "lr", "=", "?", "&", "h=v", "%", "%41", "%zz", "%00", '"', "\\",
    "<", ">", ",", " ", "\t", "\r\n ", "é", "\x00", "\xff", "€", "\ud800", "1.2.3.4",
    "SIP/2.0/UDP ", "SIP/2.0/TCP", "branch=z9hG4bK", "rport", "received=", "maddr=", "*", "-",
    ".", "1", "٣", "²", "expires=", "tag=",
]
texts = st.lists(st.sampled_from(TEXT_PIECES), max_size=12).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(texts)
def test_uris_addresses_and_vias_parse_the_same(text: str) -> None:
    same(lambda: _uri(UC.parse_uri(text)), lambda: _uri(UP.parse_uri(text)))
    same(lambda: _uri(UC.parse_uri(text, allow_other_schemes=True)),
         lambda: _uri(UP.parse_uri(text, allow_other_schemes=True)))
    same(lambda: _addr(UC.parse_name_addr(text)), lambda: _addr(UP.parse_name_addr(text)))
    same(lambda: _via(HC.parse_via(text)), lambda: _via(HP.parse_via(text)))
    for fn in ("unescape", "is_token", "port_number", "host_ok", "uri_text_ok", "is_digits", "plain_host"):
        same(lambda f=fn: getattr(UC, f)(text), lambda f=fn: getattr(UP, f)(text))
    for fn in ("split_values", "first_comma", "canonical_name"):
        same(lambda f=fn: getattr(HC, f)(text), lambda f=fn: getattr(HP, f)(text))
    same(lambda: MC.parse_cseq(text), lambda: MP.parse_cseq(text))
    same(lambda: _uri(MC.parse_request_uri(text)), lambda: _uri(MP.parse_request_uri(text)))


def frames(mod: ModuleType, stream: bytes, step: int) -> list[Any]:
    framer = mod.StreamFramer(max_size=4000)
    out: list[Any] = []
    try:
        for i in range(0, len(stream), step):
            framer.receive_data(stream[i : i + step])
            while (event := framer.next_event()) is not mod.NEED_DATA:
                out.append(event if isinstance(event, bytes) else repr(event))
    except Exception as exc:  # noqa: BLE001 - compared
        out.append(type(exc).__name__)
    return out + [framer.buffered]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(mutated(SIP_SEEDS), min_size=1, max_size=3), st.sampled_from([b"", b"\r\n", b"\r\n\r\n"]))
def test_a_tcp_stream_cut_at_every_octet_frames_the_same(messages: list[bytes], gap: bytes) -> None:
    stream = gap.join(messages)
    whole = frames(FC, stream, len(stream) or 1)
    assert whole == frames(FP, stream, len(stream) or 1)
    for step in range(1, min(len(stream), 40) + 1):
        assert frames(FC, stream, step) == frames(FP, stream, step), f"cut every {step} octets"


# --- the proxy core --------------------------------------------------------------------------

PC, PP = both("sip.proxy")


def _core(proxy: ModuleType) -> Any:
    """The core of tests/test_proxy_core.py, built from ``proxy``'s own package."""
    from tests.test_proxy_core import ADV, NODES, PORT, SECRET, standard_router

    package = proxy.__name__.rpartition(".")[0]
    health_mod = importlib.import_module(package + ".health")
    flow_mod = importlib.import_module(package + ".flow")
    nodes = [health_mod.Node(n.system, n.index, n.transport, n.host, n.port) for n in NODES]
    settings_ = proxy.ProxySettings(
        advertise_host=ADV, ports={"udp": PORT, "tcp": PORT},
        local_addresses=frozenset({(ADV, PORT)}), lock_hold=2.0, retry_after=30,
    )
    health = health_mod.HealthChecker(nodes, interval=5.0, timeout=2.0, local_host=ADV, local_port=5099, tag="test")
    return proxy.ProxyCore(settings_, standard_router(), health, flow_mod.FlowSigner(SECRET)), flow_mod


def _proxy_seeds() -> list[bytes]:
    from tests.test_proxy_core import request

    seeds = [request(m) for m in ("INVITE", "REGISTER", "OPTIONS", "BYE", "ACK", "CANCEL")]
    seeds.append(request("BYE", headers=["Route: <sip:192.0.2.10;lr;dsbc=source.x>"]))
    seeds.append(request("INVITE", "sip:15550002000@192.0.2.10", headers=["Contact: <sip:a@203.0.113.5>"]))
    seeds.append(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK.x\r\n"
                 b"Via: SIP/2.0/UDP 203.0.113.5:40000;rport=40000;received=203.0.113.5\r\n"
                 b"From: <sip:1001@x>;tag=a\r\nTo: <sip:1001@x>;tag=b\r\nCall-ID: c\r\n"
                 b"CSeq: 1 REGISTER\r\nContact: <sip:1001@203.0.113.5>;expires=3600\r\nContent-Length: 0\r\n\r\n")
    return seeds + SIP_SEEDS[:20]


PROXY_SEEDS = _proxy_seeds()
SOURCES = [("udp", "203.0.113.5", 40000, 0, 0), ("tcp", "203.0.113.6", 40001, 7, 1),
           ("udp", "198.51.100.7", 5060, 0, 0), ("udp", "10.0.0.1", 5060, 0, 0)]


def actions(proxy: ModuleType, messages: list[bytes], src: tuple[str, str, int, int, int]) -> list[Any]:
    core, flow_mod = _core(proxy)
    flow = flow_mod.Flow(*src)
    out: list[Any] = []
    for i, data in enumerate(messages):
        sends = outcome(lambda d=data, n=i: [
            (s.transport, s.ip, s.port, s.data, s.conn_id, s.worker) for s in core.handle_data(d, flow, 1000.0 + n)
        ])
        out.append(sends)
    out.append(sorted(dict(core.counters).items()))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(mutated(PROXY_SEEDS), min_size=1, max_size=3), st.sampled_from(SOURCES))
def test_the_proxy_core_sends_the_same(messages: list[bytes], src: tuple[str, str, int, int, int]) -> None:
    same(lambda: actions(PC, messages, src), lambda: actions(PP, messages, src))


# --- the API fast path -------------------------------------------------------------------------

H1C, H1P = both("api_proxy.h1")
CC, CP = both("api_proxy.classify")
API_SEEDS = [p.read_bytes() for p in sorted((ROOT / "tests" / "fuzz" / "corpus-api").glob("*.dat"))]
REQUEST_HEADS = [
    b"POST /rest/Session/login HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nContent-Type: application/json\r\n\r\n",
    b"GET /x?y=1 HTTP/1.1\r\nhost: a:80\r\nConnection: keep-alive, Upgrade\r\nCookie: a=b\r\n\r\n",
]
RESPONSE_HEADS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\nSet-Cookie: a=b; Domain=x; Path=/\r\n\r\n",
    b"HTTP/1.0 302 Found\r\nLocation: http://x/\r\nTransfer-Encoding: chunked\r\n\r\n",
]
HTTP_PIECES = [
    b"\x00", b"\xff", b"\xc3\xa9", b"%", b"%zz", b";", b",", b'"', b"{", b"}", b":", b"=", b"&", b"\r\n",
    b"\n", b"\r", b" ", b"\t", b"-1", b"99999999999999999999", b"1e400", b"null", b"\x85", b"\xa0",
    b'"i_account":1.5', b'"i_account":[1]', b'"i_account":{"a":1}', b'"i_customer":"\\u0000"',
    b"Transfer-Encoding: chunked\r\n", b"Content-Length: 1\r\nContent-Length: 2\r\n", b"+5", b"0x1",
    b"multipart/form-data; boundary=x", b"--x\r\n",
]


def _head(h: Any) -> Any:
    return {name: getattr(h, name) for name in getattr(H1P, type(h).__name__).__slots__}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated(REQUEST_HEADS, HTTP_PIECES), mutated(RESPONSE_HEADS, HTTP_PIECES),
       mutated([b"5\r\nhello\r\n3;x=1\r\nabc\r\n0\r\nT: x\r\n\r\n"], HTTP_PIECES), st.integers(1, 7))
def test_http_heads_and_chunks_parse_the_same(request_head: bytes, response_head: bytes, body: bytes, step: int) -> None:
    same(lambda: _head(H1C.parse_request_head(request_head)) if H1C.parse_request_head(request_head) else None,
         lambda: _head(H1P.parse_request_head(request_head)) if H1P.parse_request_head(request_head) else None)
    same(lambda: _head(H1C.parse_response_head(response_head)), lambda: _head(H1P.parse_response_head(response_head)))
    target = request_head.partition(b" ")[2].partition(b" ")[0].decode("latin-1")
    same(lambda: H1C.origin_form(target), lambda: H1P.origin_form(target))

    def chunks(mod: ModuleType) -> list[Any]:
        decoder = mod.ChunkedDecoder()
        return [decoder.feed(body[i : i + step]) for i in range(0, len(body), step)]

    same(lambda: chunks(H1C), lambda: chunks(H1P))


def _api_input(data: bytes) -> tuple[str, str, str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\n")
    try:
        meta = json.loads(head)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        return "customer", "POST", "/" + head.decode("latin-1"), {"content-type": "application/json"}, body
    headers = meta.get("headers")
    headers = {str(k).lower(): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}
    return str(meta.get("realm", "")), str(meta.get("method", "POST")), str(meta.get("target", "/")), headers, body


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated(API_SEEDS, HTTP_PIECES))
def test_api_requests_classify_the_same(data: bytes) -> None:
    realm, method, target, headers, body = _api_input(data)
    same(lambda: CC.needs_body(realm, method, target, headers), lambda: CP.needs_body(realm, method, target, headers))
    for complete in (True, False):
        same(lambda c=complete: repr(CC.classify(realm, method, target, headers, body, complete=c,
                                                 cpe_patterns=CC.DEFAULT_COMPILED)),
             lambda c=complete: repr(CP.classify(realm, method, target, headers, body, complete=c,
                                                 cpe_patterns=CP.DEFAULT_COMPILED)))
