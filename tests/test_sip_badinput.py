"""Bad input through a running dsbc (``dsbc run``, one worker, a FakeNode as the source).

Random and binary datagrams, every truncation of a request, datagrams near 64 KiB,
oversized and malformed TCP streams, a TCP peer that stalls half-way through a message,
CRLFCRLF keep-alives: each gets its answer or is dropped, the worker stays the same
process, and the next good message is handled.  Every loop is bounded in count and time.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.dsbc import Dsbc
from tests.peers.fakenode import FakeNode
from tests.peers.sipmsg import parse_message as lenient_parse

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]

STALL = 1.0  # sip.tcp_stall_timeout for this dsbc


class Env:
    def __init__(self, d: Dsbc, node: FakeNode) -> None:
        self.d = d
        self.node = node
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.seq = 0

    def node_seen(self) -> int:
        with self.node.lock:
            return len(self.node.received)

    def node_since(self, n: int) -> list[bytes]:
        with self.node.lock:
            raws = self.node.received[n:]
        # leave out answers, the health pings and the markers of exchange()
        return [
            r
            for r in raws
            if not r.startswith((b"SIP/", b"OPTIONS sip:127.0.0.1"))
            and b"Call-ID: marker-" not in r
        ]

    def good(self, call_id: str, transport: str = "UDP", port: int | None = None) -> bytes:
        self.seq += 1
        return (
            f"OPTIONS sip:1001@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} 127.0.0.1:{port or self.port};branch=z9hG4bKgood{self.seq};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:1001@example.com>;tag=g{self.seq}\r\n"
            f"To: <sip:1001@example.com>\r\nCall-ID: {call_id}\r\nCSeq: {self.seq} OPTIONS\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()

    def exchange(self, data: bytes, timeout: float = 3.0) -> list[bytes]:
        """Send ``data`` then a good OPTIONS; return what came back before the OPTIONS' 200
        (which proves the worker is alive and still dispatching)."""
        self.seq += 1
        marker = f"marker-{self.seq}"
        if data:
            self.sock.sendto(data, self.d.sip_addr)
        self.sock.sendto(self.good(marker), self.d.sip_addr)
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                pkt, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                break
            if f"Call-ID: {marker}\r\n".encode() in pkt:
                assert pkt.startswith(b"SIP/2.0 200 ") and b"X-System: fakenode" in pkt
                return got
            got.append(pkt)
        raise AssertionError(f"no answer to a good OPTIONS after {data[:60]!r}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("badinput")
    with FakeNode("udp") as node:
        d = Dsbc(
            Path(work),
            source=[f"udp:{node.ip}:{node.port}"],
            sip_extra=f"tcp_stall_timeout = {STALL}\n",
        )
        with d:
            d.wait_nodes_up()
            e = Env(d, node)
            e.pids = {s["worker"]: s["pid"] for s in d.status()}  # type: ignore[attr-defined]
            try:
                yield e
            finally:
                e.sock.close()
            # whatever a test sent, the worker is the process it was at the start
            assert {s["worker"]: s["pid"] for s in d.status()} == e.pids  # type: ignore[attr-defined]
        # and none of it made an exception escape into the log
        assert not d.traceback(), d.traceback()


def invite(env: Env, call_id: str, body: bytes = b"v=0\r\n") -> bytes:
    return (
        f"INVITE sip:2000@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{env.port};branch=z9hG4bK{call_id};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:1001@example.com>;tag=t{call_id}\r\nTo: <sip:2000@example.com>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def status(pkt: bytes) -> int:
    m = lenient_parse(pkt.decode("latin-1"))
    assert not m.is_request, pkt[:80]
    return m.status or 0


# --- UDP ------------------------------------------------------------------------------------


def test_random_and_binary_datagrams_are_dropped(env: Env) -> None:
    rng = random.Random(4475)
    seen = env.node_seen()
    answers: list[bytes] = []
    for i in range(120):
        kind = i % 4
        if kind == 0:
            data = rng.randbytes(rng.randint(1, 1500))
        elif kind == 1:  # text that looks a little like SIP
            words = [
                "INVITE",
                "SIP/2.0",
                "Via:",
                "sip:",
                "@",
                ";",
                ",",
                "<",
                ">",
                "\r\n",
                ":",
                " ",
                "%00",
                "Call-ID:",
                "\t",
            ]
            data = "".join(rng.choice(words) for _ in range(rng.randint(1, 80))).encode()
        elif kind == 2:  # a real start line, then binary
            data = b"OPTIONS sip:1001@example.com SIP/2.0\r\n" + rng.randbytes(rng.randint(0, 600))
        else:  # NULs and high octets
            data = bytes(
                rng.choice([0, 0xFF, 0x80, 0x0D, 0x0A]) for _ in range(rng.randint(1, 300))
            )
        if i % 10 == 9:
            answers += env.exchange(data)
        else:
            env.sock.sendto(data, env.d.sip_addr)
    answers += env.exchange(b"")
    # nothing readable as a request with a Via reached the node, nothing was answered but
    # with an error
    assert env.node_since(seen) == []
    assert all(status(a) >= 400 for a in answers), answers[:3]


def test_every_truncation_of_a_request_is_answered_400_or_dropped(env: Env) -> None:
    full = invite(env, "trunc-1")
    head_end = full.index(b"\r\n\r\n") + 2
    cseq_end = full.index(b"CSeq: 1 INVITE\r\n") + len(b"CSeq: 1 INVITE")
    via_end = full.index(b";rport\r\n") + len(b";rport\r\n")
    for cut in list(range(1, len(full), 3)) + [
        via_end,
        cseq_end,
        cseq_end + 2,
        head_end,
        len(full) - 1,
        len(full),
    ]:
        data = full[:cut]
        seen = env.node_seen()
        back = env.exchange(data)
        at_node = env.node_since(seen)
        via_start = full.index(b"\r\nVia:") + 2
        if cut < via_start + 4:
            expect = "drop"  # no Via line: nothing to answer on
        elif cut < via_end:
            expect = "drop or 400"  # half a Via line: answered on what there is, or dropped
        elif cut in (cseq_end, cseq_end + 2) or cut == len(full):
            expect = "forward"  # complete headers; no Content-Length on UDP means "the rest"
        else:
            expect = "400"
        if expect == "drop":
            assert back == [] and at_node == [], (cut, data[-20:], back)
        elif expect == "drop or 400":
            assert at_node == [] and [status(b) for b in back] in ([], [400]), (
                cut,
                data[-20:],
                back,
            )
        elif expect == "forward":
            assert len(at_node) == 1 and at_node[0].startswith(b"INVITE "), (cut, data[-20:])
            assert [status(b) for b in back] == [200], (cut, back)  # the node's answer, relayed
        else:
            assert at_node == [], (cut, data[-20:])
            assert [status(b) for b in back] == [400], (cut, data[-20:], back)
            assert back[0].split(b"\r\n")[1].startswith(b"Via: SIP/2.0/UDP 127.0.0.1:")


def test_datagrams_near_64k(env: Env) -> None:
    # fits after dsbc's own headers: forwarded, and the node's 200 comes back
    seen = env.node_seen()
    body = b"v=0\r\n" + b"a=x-filler\r\n" * 5300
    data = invite(env, "big-ok", body)
    assert 63000 < len(data) < 65000
    back = env.exchange(data)
    fwd = env.node_since(seen)
    assert len(fwd) == 1 and fwd[0].endswith(body)
    assert [status(b) for b in back] == [200]
    # does not fit once dsbc's Via and Record-Route are added: 513 to the sender
    before = env.node_since(0)
    body = b"a=x\r\n" * 13030
    data = invite(env, "big-513", body)
    assert 65300 < len(data) <= 65507
    back = env.exchange(data)
    assert [status(b) for b in back] == [513]
    # the largest datagram of garbage: dropped
    back = env.exchange(random.Random(7).randbytes(65507))
    assert back == []
    assert len(env.node_since(0)) == len(before)


# --- TCP ------------------------------------------------------------------------------------


def tcp(env: Env) -> socket.socket:
    s = socket.create_connection(env.d.sip_addr, timeout=5)
    s.settimeout(5)
    return s


def read_until_closed(s: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (True) or ``timeout`` passes (False)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65535)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def read_message(s: socket.socket, timeout: float = 5.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(65535)
        if not chunk:
            break
        data += chunk
    return data


def tcp_invite(
    env: Env, s: socket.socket, call_id: str, content_length: str, body: bytes = b""
) -> bytes:
    port = s.getsockname()[1]
    return (
        f"INVITE sip:2000@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bK{call_id}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:1001@example.com>;tag=t{call_id}\r\nTo: <sip:2000@example.com>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: {content_length}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    "value,why",
    [
        ("abc", "not a number"),
        ("-5", "negative (RFC 4475 ncl)"),
        ("5\r\nContent-Length: 7", "conflicting (mcl01)"),
        ("", "empty"),
    ],
)
def test_tcp_bad_content_length_is_answered_400_then_closed(env: Env, value: str, why: str) -> None:
    with tcp(env) as s:
        s.sendall(tcp_invite(env, s, f"badcl-{len(value)}", value, b"v=0\r\n"))
        data, closed = read_until_closed(s)
    assert closed, why
    assert data.startswith(b"SIP/2.0 400 "), (why, data[:80])
    assert f"Call-ID: badcl-{len(value)}\r\n".encode() in data
    # made by dsbc: its Server header, a To tag (RFC 3261 8.2.6.2), received / rport
    to_line = next(line for line in data.split(b"\r\n") if line.startswith(b"To: "))
    assert b";tag=" in to_line and b"\r\nServer: " in data and b";received=" in data, data
    env.exchange(b"")


def test_tcp_message_above_max_message_size_is_answered_513_then_closed(env: Env) -> None:
    with tcp(env) as s:
        # 70000 octets announced: above sip.max_message_size (65535), refused on the head
        s.sendall(tcp_invite(env, s, "toolarge", "70000"))
        data, closed = read_until_closed(s)
    assert closed
    assert data.startswith(b"SIP/2.0 513 "), data[:80]
    # the same with the whole body sent at once: the 513 still arrives, not a reset
    # (regression: dsbc closed with the body unread, the kernel reset the connection and
    # the answer was lost)
    with tcp(env) as s:
        body = b"a=x\r\n" * 14000
        s.sendall(tcp_invite(env, s, "toolarge2", str(len(body))) + body)
        data, closed = read_until_closed(s)
    assert closed
    assert data.startswith(b"SIP/2.0 513 "), data[:80]
    # a header section that never ends within the limit: the connection is closed too
    with tcp(env) as s:
        port = s.getsockname()[1]
        s.sendall(
            f"INVITE sip:2000@example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:{port};branch=z9hG4bKendless\r\n".encode()
        )
        try:
            for _ in range(70):
                s.sendall(b"X-Filler: " + b"y" * 1000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, closed = read_until_closed(s)
    assert closed
    assert data.startswith(b"SIP/2.0 513 "), data[:80]
    env.exchange(b"")


def test_tcp_peer_that_stalls_half_way_is_closed_after_the_stall_timeout(env: Env) -> None:
    before = env.d.counters().get("tcp_stalled_closed", 0)
    with tcp(env) as s:
        msg = tcp_invite(env, s, "stall", "5", b"v=0\r\n")
        s.sendall(msg[: len(msg) // 2])
        t0 = time.monotonic()
        data, closed = read_until_closed(s, timeout=STALL + 4)
        waited = time.monotonic() - t0
    assert closed and data == b""
    assert waited >= STALL * 0.9
    # meanwhile (and after) everyone else is served
    env.exchange(b"")
    deadline = time.monotonic() + 3
    while env.d.counters().get("tcp_stalled_closed", 0) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert env.d.counters().get("tcp_stalled_closed", 0) > before


def test_tcp_keepalive_is_answered_and_the_connection_goes_on(env: Env) -> None:
    with tcp(env) as s:
        for _ in range(3):
            s.sendall(b"\r\n\r\n")
            s.settimeout(3)
            assert s.recv(16) == b"\r\n"
        port = s.getsockname()[1]
        s.sendall(env.good("tcp-after-ping", "TCP", port))
        answer = read_message(s)
        assert answer.startswith(b"SIP/2.0 200 ") and b"Call-ID: tcp-after-ping\r\n" in answer


def test_tcp_good_message_after_garbage_on_another_connection(env: Env) -> None:
    rng = random.Random(11)
    for _ in range(8):
        with tcp(env) as s:
            try:
                s.sendall(rng.randbytes(rng.randint(1, 3000)) + b"\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            data, closed = read_until_closed(s, timeout=2)
        # garbage is answered 400 at most, then the stream is closed
        assert closed
        assert data == b"" or data.startswith(b"SIP/2.0 4"), data[:80]
    with tcp(env) as s:
        s.sendall(env.good("tcp-good", "TCP", s.getsockname()[1]))
        assert read_message(s).startswith(b"SIP/2.0 200 ")
    assert env.d.counters().get("internal_errors", 0) == 0


def test_a_signature_with_non_ascii_octets_is_refused_not_a_traceback(env: Env) -> None:
    """Found by fuzzing what a node sends back: a response whose top Via carried one of
    dsbc's branches with non-ASCII octets where its MAC goes reached hmac.compare_digest
    as a str, which raises TypeError for non-ASCII text: an ERROR with a traceback in the
    log for one datagram from anyone.  The MAC of a dsbc Route is compared the same way."""
    port = env.d.port
    branch = b"z9hG4bK-d5" + b"a" * 16 + b"\xe9" * 8 + b".x"
    response = (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:%d;branch=%s\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bKabc\r\n"
        b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: nonascii-1\r\nCSeq: 1 INVITE\r\n"
        b"Content-Length: 0\r\n\r\n" % (port, branch)
    )
    assert env.exchange(response) == []  # dropped
    for mac in (b"%C3%A9%C3%A9", b"\xc3\xa9"):
        bye = (
            b"BYE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bKna%d;rport\r\n"
            b"Route: <sip:127.0.0.1:%d;lr;dsbc=source.%s>\r\nMax-Forwards: 70\r\n"
            b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: nonascii-2\r\nCSeq: 2 BYE\r\n"
            b"Content-Length: 0\r\n\r\n" % (env.port, len(mac), port, mac)
        )
        answers = env.exchange(bye)
        # a forged signature: 403; raw octets make the Route no URI of dsbc's (the owner's
        # node is the one to refuse it, as any foreign Route of a device's request)
        assert [status(a) for a in answers] == ([403] if b"%" in mac else [200]), answers
    assert not env.d.traceback(), env.d.traceback()
