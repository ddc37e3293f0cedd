"""The emulated SIP system (dsbc/emulator/sip_system.py) driven by raw UDP/TCP sockets and sipp.

The system runs on its own event loop in a thread (uvloop, and the default asyncio loop for
the parametrised tests), so the test can talk to it with plain blocking sockets that have
timeouts.  Sockets in the test stand in for phones, for the caller, and for dsbc at the Path
address of a registration.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from dsbc.emulator.sip_system import SipSystem
from sip.framing import NEED_DATA, StreamFramer
from sip.message import SipMessage, make_response, parse_message

HOST = "127.0.0.1"
SIPP = shutil.which("sipp")
OFFER = (
    b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 30000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
)


# --- harness ---------------------------------------------------------------------------------


class Node:
    """A SipSystem on its own event loop in a thread."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop,
                 **kw: Any) -> None:
        self.loop = loop_factory()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        kw.setdefault("name", "MR100")
        kw.setdefault("dids", {"15550001001": "1001"})
        self.system = SipSystem(**kw)
        self.run(self.system.start())
        self.port = self.system.port
        self.addr = (HOST, self.port)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def on_loop() -> Any:
            return fn(*args)
        return self.run(on_loop())

    def calls(self) -> list[dict[str, Any]]:
        """A copy of the call log, read on the node's loop."""
        return self.call(lambda: copy.deepcopy(self.system.calls))  # type: ignore[no-any-return]

    def stats(self) -> dict[str, int]:
        return self.call(lambda: dict(self.system.stats))  # type: ignore[no-any-return]

    def close(self) -> None:
        try:
            self.run(self.system.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture(params=["uvloop", "asyncio"])
def node(request: pytest.FixtureRequest) -> Iterator[Node]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    n = Node(factory)
    yield n
    n.close()


@pytest.fixture
def make_node() -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def make(**kw: Any) -> Node:
        nodes.append(Node(**kw))
        return nodes[-1]

    yield make
    for n in nodes:
        n.close()


class Udp:
    """A UDP peer (phone, caller, or dsbc at a Path address)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(3)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sock.sendto(data, addr)

    def recv(self, timeout: float = 3.0) -> SipMessage:
        self.sock.settimeout(timeout)
        data, _addr = self.sock.recvfrom(65535)
        return parse_message(data)

    def expect(self, status: int | None = None, method: str | None = None) -> SipMessage:
        """The next message with that status or method (skipping at most 10 others)."""
        for _ in range(10):
            m = self.recv()
            if (status is not None and m.status == status) or (method is not None and m.method == method):
                return m
        raise AssertionError(f"no {status or method}")

    def silent(self, timeout: float = 0.3) -> bool:
        try:
            self.recv(timeout)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp() -> Iterator[Callable[[], Udp]]:
    socks: list[Udp] = []

    def make() -> Udp:
        socks.append(Udp())
        return socks[-1]

    yield make
    for s in socks:
        s.close()


def request(method: str, ruri: str, port: int, *, call_id: str | None = None, branch: str | None = None,
            cseq: int = 1, to: str | None = None, to_tag: str | None = None, headers: tuple[str, ...] = (),
            body: bytes = b"", transport: str = "UDP", from_user: str = "alice") -> bytes:
    call_id = call_id or uuid.uuid4().hex
    branch = branch or "z9hG4bK" + uuid.uuid4().hex[:16]
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/{transport} {HOST}:{port};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <sip:{from_user}@{HOST}>;tag=f{call_id[:8]}",
        f"To: <{to or ruri}>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        *headers,
    ]
    if body:
        lines.append("Content-Type: application/sdp")
    lines += [f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode() + body


def register(peer: Udp, node: Node, user: str, contact: str, *, path: str | None = None,
             expires: str | None = "3600", call_id: str | None = None, cseq: int = 1) -> SipMessage:
    headers = [f"Contact: {contact}"]
    if path:
        headers.append(f"Path: {path}")
    if expires is not None:
        headers.append(f"Expires: {expires}")
    peer.send(request("REGISTER", f"sip:{HOST}:{node.port}", peer.port, to=f"sip:{user}@{HOST}",
                      call_id=call_id, cseq=cseq, headers=tuple(headers)), node.addr)
    return peer.recv()


def via_of(m: SipMessage) -> list[str]:
    return [f"{v.host}:{v.port}" for v in m.vias]


# --- registrar -------------------------------------------------------------------------------


def test_register_stores_binding_with_path(node: Node, udp: Callable[[], Udp]) -> None:
    dsbc = udp()
    path = f"<sip:{HOST}:{dsbc.port};transport=udp;lr;ft=abc123>"
    contact = '<sip:1001@192.0.2.10:5062;transport=udp>;+sip.instance="<urn:uuid:0001>"'
    ok = register(dsbc, node, "1001", contact, path=path, expires="7200", call_id="reg-1")
    assert ok.status == 200
    assert ok.get("x-system") == "MR100"
    assert ok.to_tag
    assert ok.get("path") == path
    assert ok.get("expires") == "3600"  # capped at max_expires
    [c] = ok.values("contact")
    assert c.startswith("<sip:1001@192.0.2.10:5062;transport=udp>") and "expires=3600" in c
    assert "+sip.instance" in c

    [(got_contact, got_path, expires_at)] = node.call(node.system.registered, "1001")
    assert got_contact == "sip:1001@192.0.2.10:5062;transport=udp"
    assert got_path == [path]
    assert 3590 < expires_at - time.time() <= 3600
    assert node.call(node.system.registered, "+1 555 000 1001")  # a DID of that account

    # a contact's own expires wins over the Expires header
    ok = register(dsbc, node, "1001", "<sip:1001@192.0.2.10:5062;transport=udp>;expires=30",
                  path=path, call_id="reg-1", cseq=2)
    assert ok.get("expires") == "30"
    [(_c, _p, expires_at)] = node.call(node.system.registered, "1001")
    assert expires_at - time.time() <= 30

    # Expires: 0 removes the binding
    ok = register(dsbc, node, "1001", "<sip:1001@192.0.2.10:5062;transport=udp>", path=path,
                  expires="0", call_id="reg-1", cseq=3)
    assert ok.status == 200 and not ok.values("contact")
    assert node.call(node.system.registered, "1001") == []


def test_register_wildcard_and_errors(node: Node, udp: Callable[[], Udp]) -> None:
    phone = udp()
    assert register(phone, node, "2001", f"<sip:2001@{HOST}:{phone.port}>").status == 200
    assert register(phone, node, "2001", f"<sip:2001@{HOST}:{phone.port + 1}>").status == 200
    assert len(node.call(node.system.registered, "2001")) == 2
    assert register(phone, node, "2001", "*", expires="60").status == 400  # * needs Expires: 0
    assert register(phone, node, "2001", "*", expires="0").status == 200
    assert node.call(node.system.registered, "2001") == []
    # a query (no Contact) lists nothing and changes nothing
    phone.send(request("REGISTER", f"sip:{HOST}:{node.port}", phone.port, to=f"sip:2001@{HOST}"), node.addr)
    assert phone.recv().status == 200


# --- calls answered by the system ------------------------------------------------------------


def test_echo_call_udp(node: Node, udp: Callable[[], Udp]) -> None:
    alice = udp()
    call_id = "echo-1"
    ruri = f"sip:echo@{HOST}:{node.port}"
    alice.send(request("INVITE", ruri, alice.port, call_id=call_id, body=OFFER), node.addr)
    assert alice.recv().status == 100
    ringing = alice.recv()
    assert ringing.status == 180 and ringing.to_tag
    ok = alice.recv()
    assert ok.status == 200
    assert ok.to_tag == ringing.to_tag
    assert ok.get("x-system") == "MR100"
    assert ok.get("contact") == f"<sip:MR100@{HOST}:{node.port}>"
    assert b"m=audio" in ok.body and b"RTP/AVP 8 101" in ok.body  # first offered codec + DTMF
    tag = ok.to_tag
    alice.send(request("ACK", f"sip:MR100@{HOST}:{node.port}", alice.port, call_id=call_id, to=ruri,
                       to_tag=tag), node.addr)
    # in the dialog: re-INVITE, OPTIONS, MESSAGE, then BYE
    alice.send(request("INVITE", f"sip:MR100@{HOST}:{node.port}", alice.port, call_id=call_id, to=ruri,
                       to_tag=tag, cseq=2, body=OFFER), node.addr)
    reinvite = alice.expect(status=200)
    assert reinvite.cseq == (2, "INVITE") and b"o=dsbc 1 2 " in reinvite.body
    alice.send(request("ACK", f"sip:MR100@{HOST}:{node.port}", alice.port, call_id=call_id, to=ruri,
                       to_tag=tag, cseq=2), node.addr)
    for n, method in ((3, "OPTIONS"), (4, "MESSAGE")):
        alice.send(request(method, f"sip:MR100@{HOST}:{node.port}", alice.port, call_id=call_id, to=ruri,
                           to_tag=tag, cseq=n), node.addr)
        assert alice.expect(status=200).cseq == (n, method)
    # an UPDATE with an offer (RFC 3311: its 2xx carries the answer), INFO (DTMF) without
    alice.send(request("UPDATE", f"sip:MR100@{HOST}:{node.port}", alice.port, call_id=call_id, to=ruri,
                       to_tag=tag, cseq=5, body=OFFER), node.addr)
    update = alice.expect(status=200)
    assert update.cseq == (5, "UPDATE") and b"m=audio" in update.body
    assert update.get("content-type") == "application/sdp"
    alice.send(request("INFO", f"sip:MR100@{HOST}:{node.port}", alice.port, call_id=call_id, to=ruri,
                       to_tag=tag, cseq=6), node.addr)
    info = alice.expect(status=200)
    assert info.cseq == (6, "INFO") and not info.body
    alice.send(request("BYE", f"sip:MR100@{HOST}:{node.port}", alice.port, call_id=call_id, to=ruri,
                       to_tag=tag, cseq=7), node.addr)
    bye_ok = alice.expect(status=200)
    assert bye_ok.cseq == (7, "BYE") and bye_ok.get("x-system") == "MR100"
    [entry] = [c for c in node.calls() if c["call_id"] == call_id]
    assert entry["mode"] == "local" and entry["system"] == "MR100"
    assert entry["state"] == "ended"
    assert entry["methods"] == ["INVITE", "ACK", "INVITE", "ACK", "OPTIONS", "MESSAGE", "UPDATE", "INFO", "BYE"]
    assert entry["history"][:4] == ["INVITE", "100", "180", "200"]


def test_invite_retransmission_and_2xx_retransmission(make_node: Callable[..., Node],
                                                       udp: Callable[[], Udp]) -> None:
    node = make_node()
    alice = udp()
    invite = request("INVITE", f"sip:echo@{HOST}:{node.port}", alice.port, call_id="rtx-1")
    alice.send(invite, node.addr)
    ok = alice.expect(status=200)
    alice.send(invite, node.addr)  # a retransmission gets the same final answer
    again = alice.expect(status=200)
    assert again.to_tag == ok.to_tag
    # no ACK: the 2xx is retransmitted over UDP (T1 = 0.5 s)
    assert alice.recv(timeout=2).status == 200
    assert len([c for c in node.calls() if c["call_id"] == "rtx-1"]) == 1


def test_cancel_of_a_ringing_local_call(make_node: Callable[..., Node], udp: Callable[[], Udp]) -> None:
    node = make_node(answer_delay=5.0)
    alice = udp()
    # 1001 is a known account (the DID's) that is not registered: the system answers it itself
    ruri = f"sip:15550001001@{HOST}:{node.port}"
    invite = request("INVITE", ruri, alice.port, call_id="cancel-1", branch="z9hG4bKcancel1")
    alice.send(invite, node.addr)
    assert alice.recv().status == 100
    ringing = alice.recv()
    assert ringing.status == 180
    alice.send(request("CANCEL", ruri, alice.port, call_id="cancel-1", branch="z9hG4bKcancel1"), node.addr)
    got = {(m.status, m.cseq[1]) for m in (alice.recv(), alice.recv())}
    assert got == {(200, "CANCEL"), (487, "INVITE")}
    alice.send(request("ACK", ruri, alice.port, call_id="cancel-1", branch="z9hG4bKcancel1",
                       to_tag=ringing.to_tag), node.addr)
    assert alice.silent()
    [entry] = [c for c in node.calls() if c["call_id"] == "cancel-1"]
    assert entry["mode"] == "local" and entry["state"] == "cancelled"


def test_unknown_user_and_other_methods(node: Node, udp: Callable[[], Udp]) -> None:
    alice = udp()
    base = f"{HOST}:{node.port}"
    alice.send(request("INVITE", f"sip:nobody@{base}", alice.port, call_id="nf-1", branch="z9hG4bKnf1"),
               node.addr)
    nf = alice.recv()
    assert nf.status == 404 and nf.to_tag and nf.get("x-system") == "MR100"
    alice.send(request("ACK", f"sip:nobody@{base}", alice.port, call_id="nf-1", branch="z9hG4bKnf1",
                       to_tag=nf.to_tag), node.addr)
    assert alice.silent()  # the ACK of the 404 is absorbed
    assert node.calls()[-1]["mode"] == "rejected"
    cases = [
        ("OPTIONS", f"sip:{base}", 200),  # health ping
        ("MESSAGE", f"sip:nobody@{base}", 404),
        ("MESSAGE", f"sip:echo@{base}", 200),
        ("SUBSCRIBE", f"sip:nobody@{base}", 405),
        ("FOO", f"sip:nobody@{base}", 501),
        ("BYE", f"sip:nobody@{base}", 481),
        ("CANCEL", f"sip:nobody@{base}", 481),
    ]
    for method, ruri, status in cases:
        alice.send(request(method, ruri, alice.port), node.addr)
        m = alice.recv()
        assert (method, m.status) == (method, status)
        assert m.get("x-system") == "MR100"
    alice.send(request("OPTIONS", f"sip:{base}", alice.port), node.addr)
    assert "INVITE" in (alice.recv().get("allow") or "")


# --- calls relayed to registered users through their Path -------------------------------------


def test_invite_to_registered_user_goes_through_path(node: Node, udp: Callable[[], Udp]) -> None:
    dsbc, alice = udp(), udp()
    path = f"<sip:{HOST}:{dsbc.port};transport=udp;lr;ft=tok1>"
    contact = "sip:1001@192.0.2.10:5060"
    assert register(dsbc, node, "1001", f"<{contact}>", path=path).status == 200

    ruri = f"sip:15550001001@{HOST}:{node.port}"  # the DID of 1001
    alice.send(request("INVITE", ruri, alice.port, call_id="relay-1", body=OFFER), node.addr)
    assert alice.recv().status == 100

    inv = dsbc.expect(method="INVITE")
    assert inv.ruri == contact
    assert inv.values("route") == [path]
    assert inv.values("record-route")[0] == f"<sip:{HOST}:{node.port};lr>"
    assert via_of(inv) == [f"{HOST}:{node.port}", f"{HOST}:{alice.port}"]
    assert inv.vias[0].transport == "UDP"
    assert inv.vias[1].param("rport") == str(alice.port)
    assert inv.get("x-system") == "MR100"
    assert inv.max_forwards == 69
    assert inv.body == OFFER

    # dsbc answers as the phone would, with its own Record-Route on top
    rr = [f"<sip:{HOST}:{dsbc.port};lr>", *inv.values("record-route")]
    extra = [("record-route", ", ".join(rr)), ("contact", f"<{contact}>")]
    dsbc.send(make_response(inv, 180, "Ringing", extra, to_tag="callee"), node.addr)
    dsbc.send(make_response(inv, 200, "OK", extra, to_tag="callee", body=OFFER), node.addr)
    ringing = alice.recv()
    ok = alice.recv()
    assert (ringing.status, ok.status) == (180, 200)
    assert via_of(ok) == [f"{HOST}:{alice.port}"]  # our Via popped
    assert ok.get("x-system") == "MR100" and ok.to_tag == "callee"

    # ACK and BYE follow the route set: our Record-Route, then dsbc's
    route = ("Route: " + ", ".join(reversed(rr)),)
    alice.send(request("ACK", contact, alice.port, call_id="relay-1", to=ruri, to_tag="callee",
                       headers=route), node.addr)
    ack = dsbc.expect(method="ACK")
    assert ack.ruri == contact and ack.values("route") == [f"<sip:{HOST}:{dsbc.port};lr>"]
    alice.send(request("BYE", contact, alice.port, call_id="relay-1", to=ruri, to_tag="callee",
                       cseq=2, headers=route), node.addr)
    bye = dsbc.expect(method="BYE")
    dsbc.send(make_response(bye, 200, "OK"), node.addr)
    assert alice.expect(status=200).cseq == (2, "BYE")

    [entry] = [c for c in node.calls() if c["call_id"] == "relay-1"]
    assert entry["mode"] == "relay" and entry["target"] == contact
    assert entry["state"] == "ended"
    assert entry["methods"] == ["INVITE", "ACK", "BYE"]
    assert entry["history"][:3] == ["INVITE", "180", "200"]


def test_a_call_for_a_user_not_registered_here_goes_to_the_dispatcher_once(
    make_node: Callable[..., Node], udp: Callable[[], Udp]
) -> None:
    """`dsbc demo`: a call between customers of the two systems (SPEC 6).  A system with a
    ``peer`` (the dispatcher) sends a call for a user it has no binding for there, as a
    Kamailio with an outbound route does, so the other system's registered phone rings; a
    call that comes back (the user is this system's, not registered) is answered here."""
    dsbc, alice = udp(), udp()
    node = make_node(peer=(HOST, dsbc.port), answer_all=True)
    ruri = f"sip:2002@{HOST}:{node.port}"
    alice.send(request("INVITE", ruri, alice.port, call_id="peer-1", body=OFFER), node.addr)
    assert alice.recv().status == 100
    inv = dsbc.expect(method="INVITE")
    assert inv.ruri == ruri and inv.get("x-system") == "MR100"
    assert inv.values("record-route")[0] == f"<sip:{HOST}:{node.port};lr>"
    assert via_of(inv) == [f"{HOST}:{node.port}", f"{HOST}:{alice.port}"]
    # the dispatcher answers as the other system's phone would: relayed back to the caller
    dsbc.send(make_response(inv, 180, "Ringing", [("record-route", inv.values("record-route")[0])],
                            to_tag="far"), node.addr)
    assert alice.expect(status=180).to_tag == "far"
    # a MESSAGE too; an OPTIONS is answered here (a phone's keep-alive, the demo's check)
    alice.send(request("MESSAGE", ruri, alice.port, call_id="peer-2"), node.addr)
    assert dsbc.expect(method="MESSAGE").call_id == "peer-2"
    alice.send(request("OPTIONS", ruri, alice.port, call_id="peer-3"), node.addr)
    assert alice.expect(status=200).call_id == "peer-3"
    # a call that already passed through this system (the dispatcher sent it back: the
    # user is ours) is served here, not sent round again
    back = request("INVITE", ruri, dsbc.port, call_id="peer-4", body=OFFER)
    back = back.replace(b"\r\nMax-Forwards:", f"\r\nVia: SIP/2.0/UDP {HOST}:{node.port};branch=z9hG4bKx1"
                        "\r\nMax-Forwards:".encode(), 1)
    dsbc.send(back, node.addr)
    assert dsbc.expect(status=200).call_id == "peer-4"
    assert [c["mode"] for c in node.calls()] == ["peer", "local"]


def test_cancel_of_a_relayed_invite(node: Node, udp: Callable[[], Udp]) -> None:
    dsbc, alice = udp(), udp()
    contact = "sip:1001@192.0.2.10:5060"
    register(dsbc, node, "1001", f"<{contact}>", path=f"<sip:{HOST}:{dsbc.port};lr>")
    ruri = f"sip:1001@{HOST}:{node.port}"
    alice.send(request("INVITE", ruri, alice.port, call_id="rc-1", branch="z9hG4bKrc1"), node.addr)
    inv = dsbc.expect(method="INVITE")
    dsbc.send(make_response(inv, 180, "Ringing", to_tag="callee"), node.addr)
    assert alice.expect(status=180)
    alice.send(request("CANCEL", ruri, alice.port, call_id="rc-1", branch="z9hG4bKrc1"), node.addr)
    assert alice.expect(status=200).cseq[1] == "CANCEL"
    cancel = dsbc.expect(method="CANCEL")
    assert cancel.ruri == contact and cancel.top_via.branch == inv.top_via.branch
    dsbc.send(make_response(cancel, 200, "OK"), node.addr)
    dsbc.send(make_response(inv, 487, "Request Terminated", to_tag="callee"), node.addr)
    assert alice.expect(status=487).cseq == (1, "INVITE")
    ack = dsbc.expect(method="ACK")  # the system ACKs the 487 hop by hop
    assert ack.top_via.branch == inv.top_via.branch and ack.to_tag == "callee"
    alice.send(request("ACK", ruri, alice.port, call_id="rc-1", branch="z9hG4bKrc1", to_tag="callee"),
               node.addr)
    assert dsbc.silent()  # the caller's ACK is absorbed
    [entry] = [c for c in node.calls() if c["call_id"] == "rc-1"]
    assert entry["state"] == "cancelled"


def test_a_call_forks_to_every_phone_of_the_account(node: Node, udp: Callable[[], Udp]) -> None:
    """One account registered from two phones: both ring (parallel forking, RFC 3261 16.6,
    as Kamailio's lookup does); the first 2xx goes to the caller and the other phone gets a
    CANCEL; when every phone refuses, the caller gets one final answer; the caller's CANCEL
    reaches both phones and it gets one 487."""
    d1, d2, alice = udp(), udp(), udp()
    register(d1, node, "1001", "<sip:1001@192.0.2.10:5060>", path=f"<sip:{HOST}:{d1.port};lr;ft=one>")
    register(d2, node, "1001", "<sip:1001@192.0.2.11:5060;transport=tcp>",
             path=f"<sip:{HOST}:{d2.port};lr;ft=two>", call_id="second-phone")
    ruri = f"sip:15550001001@{HOST}:{node.port}"

    def ring(call_id: str) -> tuple[SipMessage, SipMessage]:
        alice.send(request("INVITE", ruri, alice.port, call_id=call_id, branch=f"z9hG4bK{call_id}",
                           body=OFFER), node.addr)
        assert alice.expect(status=100)
        i1, i2 = d1.expect(method="INVITE"), d2.expect(method="INVITE")
        assert i1.top_via.branch != i2.top_via.branch
        assert i1.values("route") == [f"<sip:{HOST}:{d1.port};lr;ft=one>"]
        assert i2.ruri == "sip:1001@192.0.2.11:5060;transport=tcp"
        d1.send(make_response(i1, 180, "Ringing", to_tag="p1"), node.addr)
        d2.send(make_response(i2, 183, "Session Progress", to_tag="p2", body=OFFER), node.addr)
        assert {alice.expect(status=180).to_tag, alice.expect(status=183).to_tag} == {"p1", "p2"}
        return i1, i2

    # one answers: the caller gets its 200, the other phone a CANCEL (and its 487 goes no further)
    i1, i2 = ring("fork-1")
    d2.send(make_response(i2, 200, "OK", to_tag="p2", body=OFFER), node.addr)
    assert alice.expect(status=200).to_tag == "p2"
    cancel = d1.expect(method="CANCEL")
    assert cancel.top_via.branch == i1.top_via.branch
    d1.send(make_response(cancel, 200, "OK"), node.addr)
    d1.send(make_response(i1, 487, "Request Terminated", to_tag="p1"), node.addr)
    assert d1.expect(method="ACK").to_tag == "p1"
    assert alice.silent()
    [entry] = [c for c in node.calls() if c["call_id"] == "fork-1"]
    assert entry["state"] == "answered"

    # both refuse: one final answer, the busy one
    i1, i2 = ring("fork-2")
    d1.send(make_response(i1, 486, "Busy Here", to_tag="p1"), node.addr)
    assert d1.expect(method="ACK").to_tag == "p1" and alice.silent()
    d2.send(make_response(i2, 480, "Temporarily Unavailable", to_tag="p2"), node.addr)
    assert d2.expect(method="ACK").to_tag == "p2"
    final = alice.recv()
    assert final.status == 480 and alice.silent()

    # a MESSAGE reaches both phones; the caller gets one 200
    alice.send(request("MESSAGE", ruri, alice.port, call_id="fork-m"), node.addr)
    m1, m2 = d1.expect(method="MESSAGE"), d2.expect(method="MESSAGE")
    d1.send(make_response(m1, 200, "OK", to_tag="p1"), node.addr)
    d2.send(make_response(m2, 200, "OK", to_tag="p2"), node.addr)
    assert alice.expect(status=200).cseq[1] == "MESSAGE" and alice.silent()

    # the caller cancels: both phones get a CANCEL, the caller one 487
    i1, i2 = ring("fork-3")
    alice.send(request("CANCEL", ruri, alice.port, call_id="fork-3", branch="z9hG4bKfork-3"), node.addr)
    assert alice.expect(status=200).cseq[1] == "CANCEL"
    for d, inv, tag in ((d1, i1, "p1"), (d2, i2, "p2")):
        c = d.expect(method="CANCEL")
        assert c.top_via.branch == inv.top_via.branch
        d.send(make_response(c, 200, "OK"), node.addr)
        d.send(make_response(inv, 487, "Request Terminated", to_tag=tag), node.addr)
    assert alice.expect(status=487).cseq == (1, "INVITE") and alice.silent()


def test_an_in_dialog_notify_is_record_routed(node: Node, udp: Callable[[], Udp]) -> None:
    """As Kamailio's default configuration (RFC 6665 4.3): a NOTIFY the system relays in a
    dialog it record-routed gets its Record-Route again (a subscriber may take its route set
    from the first NOTIFY); other in-dialog requests do not."""
    notifier, subscriber = udp(), udp()
    ours = f"<sip:{HOST}:{node.port};lr>"
    route = (f"Route: {ours}, <sip:{HOST}:{subscriber.port};lr>",)
    for method, cseq in (("NOTIFY", 1), ("INFO", 2)):
        notifier.send(request(method, f"sip:1001@{HOST}:{subscriber.port}", notifier.port, call_id="n-1",
                              to_tag="sub", cseq=cseq, headers=route), node.addr)
        got = subscriber.expect(method=method)
        assert got.values("record-route") == ([ours] if method == "NOTIFY" else [])
        assert got.values("route") == [f"<sip:{HOST}:{subscriber.port};lr>"]


def test_relay_over_tcp_path_reuses_the_connection(node: Node, udp: Callable[[], Udp]) -> None:
    alice = udp()
    with socket.create_server((HOST, 0)) as listener:
        listener.settimeout(3)
        lport = listener.getsockname()[1]
        phone = udp()
        register(phone, node, "1001", "<sip:1001@192.0.2.10:5060;transport=tcp>",
                 path=f"<sip:{HOST}:{lport};transport=tcp;lr>")
        conn: socket.socket | None = None
        framer = StreamFramer()
        for i in range(2):
            alice.send(request("INVITE", f"sip:1001@{HOST}:{node.port}", alice.port, call_id=f"tcp-{i}"),
                       node.addr)
            if conn is None:
                conn, _ = listener.accept()
                conn.settimeout(3)
            inv = parse_message(read_framed(conn, framer), datagram=False)
            assert inv.method == "INVITE" and inv.vias[0].transport == "TCP"
            conn.sendall(make_response(inv, 200, "OK", to_tag="callee"))
            assert alice.expect(status=200).call_id == f"tcp-{i}"
        with pytest.raises(TimeoutError):
            listener.settimeout(0.2)
            listener.accept()  # the second INVITE reused the first connection
        assert conn is not None
        conn.close()


def test_unreachable_path_gets_503(node: Node, udp: Callable[[], Udp]) -> None:
    alice, phone = udp(), udp()
    with socket.create_server((HOST, 0)) as s:
        closed = s.getsockname()[1]  # closed again when the block ends
    register(phone, node, "1001", "<sip:1001@192.0.2.10:5060>", path=f"<sip:{HOST}:{closed};transport=tcp;lr>")
    alice.send(request("INVITE", f"sip:1001@{HOST}:{node.port}", alice.port), node.addr)
    assert alice.recv().status == 100
    assert alice.recv().status == 503


# --- robustness and TCP framing ---------------------------------------------------------------


def test_bad_input_is_answered_or_dropped(node: Node, udp: Callable[[], Udp]) -> None:
    alice = udp()
    bad_cseq = request("OPTIONS", f"sip:{HOST}:{node.port}", alice.port).replace(b"CSeq: 1 OPTIONS",
                                                                                  b"CSeq: x OPTIONS")
    alice.send(bad_cseq, node.addr)
    raw, _ = alice.sock.recvfrom(65535)  # the 400 echoes the bad CSeq: not parseable itself
    assert raw.startswith(b"SIP/2.0 400 ") and b"\r\nX-System: MR100\r\n" in raw
    for junk in (b"\x00\xff\xfe garbage", b"hello\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n",
                 b"OPTIONS sip:x SIP/2.0\r\nCall-ID: 1\r\n\r\n", b"\r\n\r\n"):
        alice.send(junk, node.addr)
    assert alice.silent()
    alice.send(request("OPTIONS", f"sip:{HOST}:{node.port}", alice.port), node.addr)
    assert alice.recv().status == 200
    assert node.stats().get("bad", 0) >= 4


def test_mutated_messages_never_break_the_node(make_node: Callable[..., Node], udp: Callable[[], Udp]) -> None:
    node = make_node(answer_all=True)
    alice, dsbc = udp(), udp()
    register(dsbc, node, "1001", "<sip:1001@192.0.2.10:5060>", path=f"<sip:{HOST}:{dsbc.port};lr>")
    rng = random.Random(4475)
    seeds = [
        request("INVITE", f"sip:1001@{HOST}:{node.port}", alice.port, body=OFFER),
        request("REGISTER", f"sip:{HOST}:{node.port}", alice.port, to=f"sip:3001@{HOST}",
                headers=("Contact: <sip:3001@127.0.0.1:5999>", f"Path: <sip:{HOST}:{dsbc.port};lr>")),
        request("BYE", f"sip:echo@{HOST}:{node.port}", alice.port, to_tag="x",
                headers=(f"Route: <sip:{HOST}:{node.port};lr>, <sip:{HOST}:{dsbc.port};lr>",)),
        make_response(parse_message(request("INVITE", "sip:a@b", node.port)), 180, "Ringing"),
    ]
    for i in range(600):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[pos] = rng.choice(b" ;:,<>@\"\r\n\x00=0123456789aZ")
            elif op < 0.7:
                del data[pos : pos + rng.randint(1, 20)]
            else:
                data[pos:pos] = rng.choice([b";", b",", b"\r\n", b" ", b"<", b"%00", b"\r\n\r\n"])
        alice.send(bytes(data), node.addr)
        if i % 50 == 0:
            time.sleep(0.01)  # let the node keep up
    # still alive?  A fresh socket (alice's buffer is full of answers to junk), and a few
    # tries, as a burst of datagrams may have overflowed the node's own buffer
    probe = udp()
    for _ in range(5):
        probe.send(request("OPTIONS", f"sip:{HOST}:{node.port}", probe.port, call_id="alive"), node.addr)
        try:
            if probe.recv(1).call_id == "alive":
                break
        except TimeoutError:
            continue
    else:
        raise AssertionError("no answer to OPTIONS after the fuzz run")
    assert node.stats().get("errors", 0) == 0, "an exception other than SipError escaped"


def read_framed(conn: socket.socket, framer: StreamFramer) -> bytes:
    for _ in range(100):
        ev = framer.next_event()
        if isinstance(ev, bytes):
            return ev
        if ev is NEED_DATA:
            data = conn.recv(65535)
            if not data:
                raise ConnectionError("closed")
            framer.receive_data(data)
    raise AssertionError("no complete message")


def test_tcp_framing_keepalive_and_same_connection_answers(node: Node) -> None:
    with socket.create_connection(node.addr, timeout=3) as c:
        lport = c.getsockname()[1]
        framer = StreamFramer()
        reg = request("REGISTER", f"sip:{HOST}:{node.port}", lport, transport="TCP", to=f"sip:4001@{HOST}",
                      headers=(f"Contact: <sip:4001@{HOST}:{lport};transport=tcp>",))
        opt = request("OPTIONS", f"sip:{HOST}:{node.port}", lport, transport="TCP")
        c.sendall(reg + opt)  # two messages in one segment
        first = parse_message(read_framed(c, framer), datagram=False)
        second = parse_message(read_framed(c, framer), datagram=False)
        assert (first.cseq[1], first.status, second.cseq[1], second.status) == ("REGISTER", 200, "OPTIONS", 200)
        assert node.call(node.system.registered, "4001")
        # a message trickling in pieces
        invite = request("INVITE", f"sip:echo@{HOST}:{node.port}", lport, transport="TCP", body=OFFER)
        for i in range(0, len(invite), 97):
            c.sendall(invite[i : i + 97])
            time.sleep(0.002)
        statuses = [parse_message(read_framed(c, framer), datagram=False).status for _ in range(3)]
        assert statuses == [100, 180, 200]
        ok_contact = node.system.contact_uri("tcp")
        assert "transport=tcp" in ok_contact
        # CRLFCRLF keep-alive -> CRLF
        c.sendall(b"\r\n\r\n")
        assert c.recv(16) == b"\r\n"
        # a stream without Content-Length cannot be framed: 400, then the connection closes
        c.sendall(request("OPTIONS", f"sip:{HOST}:{node.port}", lport, transport="TCP").replace(
            b"Content-Length: 0\r\n", b""))
        bad = parse_message(read_framed(c, framer), datagram=False)
        assert bad.status == 400
        assert c.recv(100) == b""


# --- sipp and the command line -----------------------------------------------------------------


@pytest.mark.skipif(SIPP is None, reason="sipp not installed")
@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_sipp_uac_against_echo(make_node: Callable[..., Node], transport: str) -> None:
    from tests.peers.sipp import run_sipp

    node = make_node()
    res = run_sipp("sn:uac", remote=node.addr, service="echo", calls=3, transport=transport,
                   duration_ms=50, timeout=15)
    assert res.ok, res.report()
    assert [c["state"] for c in node.calls()] == ["ended"] * 3


@pytest.mark.skipif(SIPP is None, reason="sipp not installed")
def test_sipp_call_to_registered_sipp_phone(make_node: Callable[..., Node], udp: Callable[[], Udp]) -> None:
    from tests.peers.sipp import SippServer, run_sipp

    node = make_node()
    with SippServer("uas_answer", timeout=20) as phone:
        uri = f"sip:{HOST}:{phone.port}"
        register(udp(), node, "1001", f"<sip:1001@{HOST}:{phone.port}>", path=f"<{uri};lr>")
        res = run_sipp("uac_call", remote=node.addr, service="15550001001", calls=2, duration_ms=50,
                       timeout=15)
        assert res.ok, res.report()
    relayed = [c for c in node.calls() if c["mode"] == "relay"]
    assert len(relayed) == 2 and all(c["state"] == "ended" for c in relayed)


def test_cli_runs_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsbc.emulator.sip_system", "--name", "MR115", "--port", "0",
         "--did", "15550002002=2002"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("MR115: SIP udp/tcp on 127.0.0.1:"), line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            s.settimeout(3)
            s.sendto(request("OPTIONS", f"sip:{HOST}:{port}", s.getsockname()[1]), (HOST, port))
            answer = parse_message(s.recv(65535))
        assert answer.status == 200 and answer.get("x-system") == "MR115"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
