"""The 49 RFC 4475 torture messages sent over UDP to a running dsbc (``dsbc run``).

One source node is a UDP socket in the test (answers the health pings and the marker
OPTIONS, records every request it gets).  Per ``expect_proxy`` in the corpus index:

* well-formed requests are forwarded to the node, every header line but Via and
  Max-Forwards byte-exact (wsinv's UnknownHeaderWithUnusualValue, folded lines, odd
  octets) and the body intact; dblreq without its trailing INVITE octets;
* malformed requests are answered 400 (505 badvers, 416 unkscm / novelsc, 483 zeromf,
  420 bext01 with Unsupported) with the request's own Via / From / Call-ID / CSeq lines;
* responses coming back from the node are relayed when well-formed (UTF-8 and empty
  reason phrases) and dropped when not (bigcode, scalarlg), and bcast is never relayed.

After each message a marker OPTIONS goes through dsbc to the node and back, so every
outcome is read in order without sleeping; at the end the worker is the same process.
"""

from __future__ import annotations

import json
import pathlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sip.errors import SipError
from sip.flow import FlowSigner
from sip.message import SipMessage, make_response, parse_message
from sip.proxy import BRANCH_PREFIX, reply_branch
from tests import conformance
from tests.peers.dsbc import FLOW_SECRET, Dsbc
from tests.peers.fakenode import FakeNode
from tests.peers.sipmsg import parse_message as lenient_parse

DIR = conformance.RFC4475
INDEX: list[dict[str, Any]] = json.loads((DIR / "index.json").read_text()) if DIR.is_dir() else []

pytestmark = [
    pytest.mark.peers,
    pytest.mark.timeout(90),
    pytest.mark.skipif(not DIR.is_dir(), reason="RFC 4475 corpus not available"),
]

FORWARD = "forward"
DROP = "drop"
RELAY = "relay"  # a response from the node, relayed by dsbc
# file -> FORWARD, DROP, RELAY or the status dsbc answers with; the why is expect_proxy's
EXPECT: dict[str, str | int] = {
    "wsinv.dat": FORWARD,
    "intmeth.dat": FORWARD,  # unknown method: a proxy forwards it
    "esc01.dat": FORWARD,
    "escnull.dat": FORWARD,
    "esc02.dat": FORWARD,
    "lwsdisp.dat": FORWARD,
    "longreq.dat": FORWARD,
    "dblreq.dat": FORWARD,  # without the trailing INVITE
    "semiuri.dat": FORWARD,
    "transports.dat": FORWARD,
    "mpart01.dat": FORWARD,
    "unreason.dat": RELAY,
    "noreason.dat": DROP,  # a 100 Trying: never forwarded (RFC 3261 16.7); as a 180 below
    "badinv01.dat": 400,
    "clerr.dat": 400,
    "ncl.dat": 400,
    "scalar02.dat": 400,
    "scalarlg.dat": DROP,
    "quotbal.dat": 400,
    "ltgtruri.dat": 400,
    "lwsruri.dat": 400,
    "lwsstart.dat": 400,
    "trws.dat": 400,
    "escruri.dat": 400,
    "baddate.dat": FORWARD,  # the Date does not matter to a proxy
    "regbadct.dat": 400,
    "badaspec.dat": 400,
    "baddn.dat": 400,
    "badvers.dat": 505,
    "mismatch01.dat": 400,
    "mismatch02.dat": 400,  # 400 is allowed instead of 501
    "bigcode.dat": DROP,
    "badbranch.dat": FORWARD,
    "insuf.dat": 400,
    "unkscm.dat": 416,
    "novelsc.dat": 416,
    "unksm2.dat": FORWARD,
    "bext01.dat": 420,
    "invut.dat": FORWARD,
    "regaut01.dat": FORWARD,
    "multi01.dat": 400,
    "mcl01.dat": 400,
    "bcast.dat": DROP,  # its next Via is 255.255.255.255: never relayed there
    "zeromf.dat": 483,
    "cparam01.dat": FORWARD,
    "cparam02.dat": FORWARD,
    "regescrt.dat": FORWARD,
    "sdp01.dat": FORWARD,
    "inv2543.dat": FORWARD,
}
COPIED = ("via", "from", "call-id", "cseq")
MARKER = "rfc4475-marker-"


class PingNode(FakeNode):
    """A source node that answers dsbc's health pings and the test's marker OPTIONS only."""

    def _handle(self, raw: bytes) -> bytes | None:
        with self.lock:
            self.received.append(raw)
        if not raw.startswith(b"OPTIONS "):
            return None
        try:
            msg = parse_message(raw)
        except SipError:
            return None
        if msg.vias[0].branch.startswith("z9hG4bK-dsbcping") or msg.call_id.startswith(MARKER):
            return make_response(msg, 200, "OK", to_tag="node")
        return None

    def taken(self) -> list[bytes]:
        """The requests received since the last call, pings left out."""
        with self.lock:
            raws, self.received = self.received, []
        return [
            r
            for r in raws
            if not r.startswith(b"SIP/") and b"z9hG4bK-dsbcping" not in r.split(b"\r\n", 2)[1]
        ]


def load(name: str) -> bytes:
    return (DIR / name).read_bytes()


def partial_of(data: bytes) -> SipMessage:
    with pytest.raises(SipError) as info:
        parse_message(data)
    partial = getattr(info.value, "partial", None)
    assert isinstance(partial, SipMessage)
    return partial


class Peer:
    """The test's UDP socket: sends to dsbc, reads what comes back."""

    def __init__(self, dsbc_addr: tuple[str, int]) -> None:
        self.dsbc = dsbc_addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.seq = 0

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.dsbc)

    def recv_all_until_marker(self, call_id: str, timeout: float = 3.0) -> list[bytes]:
        """Everything that arrives until the answer to the marker ``call_id`` (included)."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                break
            got.append(data)
            if f"Call-ID: {call_id}\r\n".encode() in data:
                return got
        raise AssertionError(
            f"the marker {call_id} never came back through dsbc; got {[g[:60] for g in got]}"
        )

    def marker(self) -> str:
        self.seq += 1
        call_id = f"{MARKER}{self.seq}"
        self.send(
            (
                f"OPTIONS sip:marker@example.com SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bKmark{self.seq};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:marker@example.com>;tag=m{self.seq}\r\n"
                f"To: <sip:marker@example.com>\r\nCall-ID: {call_id}\r\nCSeq: {self.seq} OPTIONS\r\n"
                f"Content-Length: 0\r\n\r\n"
            ).encode()
        )
        return call_id


def wrap_response(data: bytes, dsbc_port: int, peer_port: int, n: int) -> bytes:
    """A response as a node would send it back through dsbc: dsbc's Via on top, then the
    test socket's, then the message's own Via lines and everything else untouched."""
    status_line, rest = data.split(b"\r\n", 1)
    # a branch dsbc made for the test socket's address: others' answers are not relayed
    branch = reply_branch(FlowSigner(FLOW_SECRET.encode()), f"rfc{n:013d}", "000000", "127.0.0.1", peer_port)
    ours = f"Via: SIP/2.0/UDP 127.0.0.1:{dsbc_port};branch={branch};rport\r\n"
    peer = f"Via: SIP/2.0/UDP 127.0.0.1:{peer_port};branch=z9hG4bKpeer{n};rport={peer_port}\r\n"
    return status_line + b"\r\n" + (ours + peer).encode() + rest


@pytest.fixture
def setup(tmp_path: pathlib.Path) -> Iterator[tuple[Dsbc, PingNode, Peer]]:
    with PingNode("udp") as node:
        d = Dsbc(tmp_path / "dsbc", source=[f"udp:{node.ip}:{node.port}"])
        with d:
            d.wait_nodes_up()
            peer = Peer(d.sip_addr)
            try:
                yield d, node, peer
            finally:
                peer.sock.close()
        assert not d.traceback(), d.traceback()


def check_forwarded(name: str, data: bytes, fwd: bytes) -> None:
    orig = parse_message(data)
    out = parse_message(fwd)
    assert out.method == orig.method and out.ruri == orig.ruri, name
    for h in orig.headers:
        if h.name in ("via", "max-forwards"):
            continue
        if h.name == "route" and not orig.to_tag:
            # a device's preloaded Route on a request out of any dialog is not sent on
            assert out.values("route") == [], f"{name}: a preloaded Route forwarded"
            continue
        line = orig.raw[h.start : h.end]
        assert line in fwd, f"{name}: {line[:80]!r} not forwarded byte-exact"
    assert out.body == orig.body, name
    mf = orig.max_forwards
    assert out.max_forwards == (70 if mf is None else mf - 1), name
    vias = out.vias
    assert vias[0].branch.startswith(BRANCH_PREFIX)
    assert [v.branch for v in vias[1:]] == [v.branch for v in orig.vias], name
    assert vias[1].param("received") == "127.0.0.1" and vias[1].param("rport")


def check_answer(name: str, data: bytes, answer: bytes, status: int) -> None:
    # the answer copies the request's lines as they were, malformed ones included
    m = lenient_parse(answer.decode("latin-1"))
    assert m.status == status, (name, answer[:80])
    assert answer.endswith(b"\r\n\r\n") and b"Content-Length: 0\r\n" in answer
    try:
        req = parse_message(data)
    except SipError:
        req = partial_of(data)
    try:
        top: str | None = req.vias[0].text
    except (SipError, IndexError):
        top = None  # a Via that is what was wrong: copied as it is
    for h in req.headers:
        if h.name in COPIED:
            line = req.raw[h.start : h.end].rstrip(b"\r\n")
            if h.name == "via" and top is not None:
                # the top Via value gets received and rport (RFC 3581 4), the rest is copied
                first = next(a for a in answer.split(b"\r\n") if a.startswith(b"Via: "))
                head = top.split(";", 1)[0].strip().encode("latin-1")
                assert first.startswith(b"Via: " + head) and b";received=" in first and b";rport=" in first, (
                    f"{name}: top Via {first!r}")
                top = None
                continue
            assert line in answer, f"{name}: {h.name} not copied"


def test_every_rfc4475_message_through_dsbc(setup: tuple[Dsbc, PingNode, Peer]) -> None:
    d, node, peer = setup
    assert sorted(EXPECT) == sorted(e["file"] for e in INDEX)
    pid_before = {s["worker"]: s["pid"] for s in d.status()}
    assert pid_before
    node.taken()
    failures: list[str] = []
    for n, entry in enumerate(INDEX):
        name = entry["file"]
        expect = EXPECT[name]
        data = load(name)
        if expect in (RELAY, DROP) and name != "bcast.dat":
            data = wrap_response(data, d.port, peer.port, n)
        peer.send(data)
        got = peer.recv_all_until_marker(peer.marker())
        at_node = node.taken()
        back = got[:-1]  # all but the marker's answer
        assert [r for r in at_node if MARKER.encode() in r], (
            f"{name}: the marker did not reach the node"
        )
        forwarded = [r for r in at_node if MARKER.encode() not in r]
        try:
            if expect == FORWARD:
                assert back == [], f"{name}: unexpected answer {back[0][:80]!r}"
                assert len(forwarded) == 1, f"{name}: {len(forwarded)} requests at the node"
                check_forwarded(name, data, forwarded[0])
            elif expect == RELAY:
                assert forwarded == []
                assert len(back) == 1, f"{name}: {len(back)} messages back"
                relayed = back[0]
                # dsbc's Via removed, the reason phrase (UTF-8 or empty) byte-exact
                assert relayed.split(b"\r\n", 1)[0] == load(name).split(b"\r\n", 1)[0]
                assert BRANCH_PREFIX.encode() not in relayed
            elif expect == DROP:
                assert back == [] and forwarded == [], f"{name}: not dropped"
            else:
                assert forwarded == [], f"{name}: forwarded although answered"
                assert len(back) == 1, f"{name}: {len(back)} answers"
                check_answer(name, data, back[0], int(expect))
        except AssertionError as exc:
            failures.append(str(exc))
    assert failures == [], "\n".join(failures)

    # the specific promises of the RFC's text
    # (the loop above saw them; these restate them with the octets in view)
    wsinv = load("wsinv.dat")
    peer.send(wsinv)
    peer.recv_all_until_marker(peer.marker())
    (fwd,) = [r for r in node.taken() if MARKER.encode() not in r]
    assert b"UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n" in fwd
    dblreq = load("dblreq.dat")
    peer.send(dblreq)
    peer.recv_all_until_marker(peer.marker())
    (fwd,) = [r for r in node.taken() if MARKER.encode() not in r]
    assert fwd.startswith(b"REGISTER ") and b"INVITE" not in fwd and fwd.endswith(b"\r\n\r\n")
    bext = load("bext01.dat")
    peer.send(bext)
    (answer, _) = peer.recv_all_until_marker(peer.marker())
    m = parse_message(answer)
    assert m.status == 420
    assert m.values("unsupported") == ["noProxiesSupportThis", "norDoAnyProxiesSupportThis"]

    # the empty reason phrase, on a status that is relayed
    noreason = load("noreason.dat").replace(b"SIP/2.0 100 \r\n", b"SIP/2.0 180 \r\n", 1)
    assert noreason.startswith(b"SIP/2.0 180 \r\n")
    peer.send(wrap_response(noreason, d.port, peer.port, 99))
    (relayed, _) = peer.recv_all_until_marker(peer.marker())
    assert relayed.startswith(b"SIP/2.0 180 \r\nVia: SIP/2.0/UDP 127.0.0.1:")

    # the worker survived all of it: same process, still dispatching, and it counted
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        c = d.counters()
        if (
            c.get("responses_dropped", 0) >= 3
            and sum(v for k, v in c.items() if k.startswith("bad_requests:")) >= 20
        ):
            break
        time.sleep(0.2)
    c = d.counters()
    assert c.get("responses_dropped", 0) >= 3, c
    assert sum(v for k, v in c.items() if k.startswith("bad_requests:")) >= 20, c
    assert c.get("internal_errors", 0) == 0, c
    assert {s["worker"]: s["pid"] for s in d.status()} == pid_before
    assert d.proc is not None and d.proc.alive()
    peer.recv_all_until_marker(peer.marker())
