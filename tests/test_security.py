"""Security on the public address (issue #7), through a real `dsbc run` and scripted nodes:
who may do what, rate limits, scanners, connection caps, slow clients, size limits, the
control API's token, and API sessions that stay with their customer.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers.fakenode import FakeNode
from tests.peers.sipmsg import SipText, parse_message

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]

Factory = Callable[..., Any]
CARRIER = "127.0.0.5"
DEVICE = "127.0.0.6"
OTHER_DEVICE = "127.0.0.7"
SCANNER = "127.0.0.8"
CUSTOMERS = [
    {"customer_id": "100", "identities": ["account:1001"], "system": "source"},
    {"customer_id": "300", "identities": ["account:3003", "did:15550003"], "system": "target"},
]


# --- helpers ---------------------------------------------------------------------------


def options(
    ruri: str, local: tuple[str, int], ua: str = "test-phone", n: int = 0, transport: str = "UDP"
) -> bytes:
    return (
        f"OPTIONS {ruri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {local[0]}:{local[1]};branch=z9hG4bK-sec{n}-{time.monotonic_ns()};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:1001@{local[0]}>;tag=f{n}\r\n"
        f"To: <{ruri}>\r\n"
        f"Call-ID: sec-{n}-{time.monotonic_ns()}@{local[0]}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        f"User-Agent: {ua}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class Udp:
    """A UDP socket on a loopback address, sending to dsbc and collecting answers."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.addr = self.sock.getsockname()

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        self.sock.sendto(data, to)

    def recv_all(self, wait: float = 0.5) -> list[SipText]:
        out = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                break
            out.append(parse_message(data.decode("utf-8", "replace")))
        return out

    def close(self) -> None:
        self.sock.close()


def statuses(msgs: list[SipText]) -> dict[int, int]:
    out: dict[int, int] = {}
    for m in msgs:
        if m.status is not None:
            out[m.status] = out.get(m.status, 0) + 1
    return out


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed ``sock`` (reading and dropping what it sends), or None."""
    start = time.monotonic()
    deadline = start + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65535)
        except TimeoutError:
            return None
        except (ConnectionResetError, ssl.SSLError, OSError):
            return time.monotonic() - start
        if not data:
            return time.monotonic() - start
    return None


def invite(
    ruri: str, local: tuple[str, int], frm_user: str, extra: str = "", call_id: str = ""
) -> bytes:
    return (
        f"INVITE {ruri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {local[0]}:{local[1]};branch=z9hG4bK-inv-{time.monotonic_ns()};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{frm_user}@example.com>;tag=a1\r\n"
        f"To: <{ruri}>\r\n"
        f"Call-ID: {call_id or f'sec-inv-{time.monotonic_ns()}'}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:{frm_user}@{local[0]}:{local[1]}>\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


@pytest.fixture
def nodes() -> Any:
    with FakeNode("udp") as source, FakeNode("udp") as target:
        yield source, target


def start(
    dsbc_factory: Factory, nodes: tuple[FakeNode, FakeNode], sip_extra: str = "", **kw: Any
) -> Any:
    source, target = nodes
    d = dsbc_factory(
        source=[source.uri],
        target=[target.uri],
        customers=CUSTOMERS,
        trusted=[CARRIER],
        sip_extra=sip_extra,
        **kw,
    )
    d.wait_nodes_up()
    return d


# --- who may do what ---------------------------------------------------------------------


def test_claiming_to_be_a_carrier_does_not_make_a_device_one(
    dsbc_factory: Factory, nodes: Any
) -> None:
    source, target = nodes
    d = start(dsbc_factory, nodes)
    device, carrier = Udp(DEVICE), Udp(CARRIER)
    try:
        # a device writes a carrier's Via, identity headers and a DID as Request-URI:
        # it is routed as a device, by its From user (a source customer)
        forged = invite(
            f"sip:15550003@{d.hostport}",
            device.addr,
            "1001",
            extra=(
                f"Via: SIP/2.0/UDP {CARRIER}:5060;branch=z9hG4bK-fake;received={CARRIER}\r\n"
                f"P-Asserted-Identity: <sip:+15557654321@{CARRIER}>\r\n"
                f"Remote-Party-ID: <sip:carrier@{CARRIER}>;party=calling;screen=yes\r\n"
                f"Record-Route: <sip:{CARRIER};lr>\r\n"
            ),
            call_id="forged-carrier",
        )
        device.send(forged, d.sip_addr)
        assert statuses(device.recv_all(1.0)).get(200) == 1
        assert [r.get("call-id") for r in source.requests("INVITE")] == ["forged-carrier"]
        assert target.requests("INVITE") == []
        # the real carrier, by its address: trusted routing (Request-URI DID -> target)
        carrier.send(
            invite(
                f"sip:15550003@{d.hostport}", carrier.addr, "15557654321", call_id="real-carrier"
            ),
            d.sip_addr,
        )
        assert statuses(carrier.recv_all(1.0)).get(200) == 1
        assert [r.get("call-id") for r in target.requests("INVITE")] == ["real-carrier"]
        # a device pretending to be a system's node (its Via) is still a device
        node_via = f"Via: SIP/2.0/UDP {target.ip}:{target.port};branch=z9hG4bK-node\r\n"
        device.send(
            invite(f"sip:15550003@{d.hostport}", device.addr, "1001", node_via, "fake-node"),
            d.sip_addr,
        )
        device.recv_all(1.0)
        assert "fake-node" in [r.get("call-id") for r in source.requests("INVITE")]
        assert "fake-node" not in [r.get("call-id") for r in target.requests("INVITE")]
    finally:
        device.close()
        carrier.close()


def test_forged_flow_token_is_refused_with_403(dsbc_factory: Factory, nodes: Any) -> None:
    source, _ = nodes
    d = start(dsbc_factory, nodes)
    device = Udp(DEVICE)
    try:
        route = f"Route: <sip:{d.hostport};transport=udp;lr;dsbc=source;ft=AQEAAAAAAAB_AAAGAAAAAAAAAAAAAA>\r\n"
        device.send(
            invite(f"sip:1001@{DEVICE}:5999", device.addr, "3003", route, "forged-ft"), d.sip_addr
        )
        got = device.recv_all(1.0)
        assert statuses(got) == {403: 1}, [m.start_line for m in got]
        assert source.requests("INVITE") == []
        assert (
            d.counters_when(lambda c: c.get("flow_token_rejected", 0) >= 1)["flow_token_rejected"]
            == 1
        )
    finally:
        device.close()


def test_forged_response_is_not_reflected_to_another_address(
    dsbc_factory: Factory, nodes: Any
) -> None:
    """Anyone can write dsbc's Via over a victim's in a response: dsbc must not send it on."""
    d = start(dsbc_factory, nodes)
    attacker, victim = Udp(DEVICE), Udp(OTHER_DEVICE)
    try:
        for n, branch in enumerate(("z9hG4bK-d5" + "ab" * 12 + ".abcdef", "z9hG4bK-d5x.y")):
            attacker.send(
                (
                    "SIP/2.0 200 OK\r\n"
                    f"Via: SIP/2.0/UDP {d.hostport};branch={branch}\r\n"
                    f"Via: SIP/2.0/UDP {victim.addr[0]}:{victim.addr[1]};branch=z9hG4bKv{n}\r\n"
                    "From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
                    f"Call-ID: reflect-{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
                ).encode(),
                d.sip_addr,
            )
        assert victim.recv_all(1.0) == []
        assert d.counters_when(lambda c: c.get("responses_forged", 0) >= 2)["responses_forged"] == 2
        # a real call still gets its answers
        attacker.send(invite(f"sip:2000@{d.hostport}", attacker.addr, "1001"), d.sip_addr)
        assert statuses(attacker.recv_all(1.0)).get(200) == 1
    finally:
        attacker.close()
        victim.close()


def _worker_rss_kb(d: Any) -> int:
    """Resident memory of the (one) SIP worker process of ``d``, in KiB."""
    assert d.proc is not None and d.proc.proc is not None
    pid = d.proc.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for child in children or [str(pid)]:
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def paced_flood(attacker: Any, to: tuple[str, int], datagram: Callable[[int], bytes], n: int = 2000) -> None:
    """``n`` datagrams, paced so that they reach the worker rather than a full buffer."""
    for i in range(n):
        attacker.send(datagram(i), to)
        if i % 50 == 49:
            time.sleep(0.03)


def test_regression_a_flood_of_forged_responses_with_long_via_hosts_does_not_grow_memory(
    dsbc_factory: Factory, nodes: Any
) -> None:
    """Found by an audit: each forged response (dsbc's Via on top, any second Via) left its
    second Via's host in the worker's reply-tag cache, up to 8192 of them: with 30 KB host
    names a worker grew by ~60 MB per 2,000 datagrams from an unauthenticated UDP source,
    and past 500 MB at the cap."""
    d = start(dsbc_factory, nodes)
    attacker = Udp(DEVICE)
    try:
        before = _worker_rss_kb(d)

        def datagram(i: int) -> bytes:
            host = f"h{i:06d}" + "a" * 30000 + ".example"
            return (
                "SIP/2.0 180 Ringing\r\n"
                f"Via: SIP/2.0/UDP {d.hostport};branch=z9hG4bK-d5{i:016x}00000000.0\r\n"
                f"Via: SIP/2.0/UDP {host}:5060;branch=z9hG4bKv{i}\r\n"
                "From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
                f"Call-ID: flood-{i}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
            ).encode()

        paced_flood(attacker, d.sip_addr, datagram)
        forged = d.counters_when(lambda c: c.get("responses_forged", 0) >= 1500, timeout=20)["responses_forged"]
        grown = _worker_rss_kb(d) - before
        assert grown < 20_000, f"{forged} forged responses grew the worker by {grown} KiB"
    finally:
        attacker.close()


def test_regression_a_flood_of_forged_routes_with_long_call_ids_does_not_grow_memory(
    dsbc_factory: Factory, nodes: Any
) -> None:
    """Found by an audit: each in-dialog request naming dsbc in its Route with a forged
    system signature (``;dsbc=source.xxxx``) left its Call-ID in the signer's tag cache
    while it was checked (and refused 403), up to 8192 of them: 30 KB Call-IDs grew a
    worker by ~60 MB per 2,000 datagrams from anyone, and past 500 MB at the cap."""
    d = start(dsbc_factory, nodes)
    attacker = Udp(DEVICE)
    try:
        before = _worker_rss_kb(d)

        def datagram(i: int) -> bytes:
            call_id = f"c{i:06d}" + "a" * 30000
            return (
                f"BYE sip:1001@{DEVICE}:5999 SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {attacker.addr[0]}:{attacker.addr[1]};branch=z9hG4bKr{i};rport\r\n"
                f"Route: <sip:{d.hostport};lr;dsbc=source.AAAAAAAA>\r\nMax-Forwards: 70\r\n"
                "From: <sip:1001@example.com>;tag=1\r\nTo: <sip:2000@example.com>;tag=2\r\n"
                f"Call-ID: {call_id}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
            ).encode()

        paced_flood(attacker, d.sip_addr, datagram)
        rejected = d.counters_when(lambda c: c.get("route_signature_rejected", 0) >= 1500, timeout=20)
        grown = _worker_rss_kb(d) - before
        assert rejected.get("route_signature_rejected", 0) >= 1500, rejected
        assert grown < 20_000, f"forged Routes grew the worker by {grown} KiB"
    finally:
        attacker.close()


# --- rate limits and scanners ------------------------------------------------------------


def test_rate_limit_per_source_with_trusted_peers_exempt(dsbc_factory: Factory, nodes: Any) -> None:
    limit, window = 20, 1.0
    d = start(dsbc_factory, nodes, sip_extra=f"rate_limit = {limit}\nrate_window = {window}\n")
    ruri = f"sip:{d.hostport}"
    carrier, device, other = Udp(CARRIER), Udp(DEVICE), Udp(OTHER_DEVICE)
    try:
        for i in range(100):
            carrier.send(options(ruri, carrier.addr, n=i), d.sip_addr)
        assert statuses(carrier.recv_all(1.5)) == {200: 100}  # trusted: never limited
        for i in range(100):
            device.send(options(ruri, device.addr, n=i), d.sip_addr)
        got = device.recv_all(1.5)
        st = statuses(got)
        assert st.get(200, 0) <= limit + 2 and st.get(200, 0) >= limit - 2, st
        assert 0 < st.get(503, 0) <= limit, st  # answers to the excess are bounded too
        assert len(got) < 100  # the rest was dropped without a word
        assert all(m.get("retry-after") == "1" for m in got if m.status == 503)
        # received / rport, as on every answer dsbc makes (RFC 3581 4: rport MUST get its value)
        nat = f";received={device.addr[0]};rport={device.addr[1]}"
        assert all(nat in (m.get("via") or "") for m in got if m.status == 503), got[-1].get("via")
        other.send(options(ruri, other.addr), d.sip_addr)  # per source: others unaffected
        assert statuses(other.recv_all(1.0)) == {200: 1}
        c = d.counters_when(lambda c: c.get("rate_limited", 0) >= 100 - limit - 2)
        assert c["rate_limited"] >= 100 - limit - 2
        snap = d.status()[0]["services"]["sip"]["rate_limit"]
        assert snap["blocks_total"] >= 1
        time.sleep(2 * window + 0.2)  # the source went quiet: it is let through again
        device.send(options(ruri, device.addr, n=999), d.sip_addr)
        assert statuses(device.recv_all(1.0)) == {200: 1}
        assert "over the rate limit" in d.log_tail(200)  # reported
    finally:
        for s in (carrier, device, other):
            s.close()


def test_rate_limit_drop_mode_is_silent(dsbc_factory: Factory, nodes: Any) -> None:
    d = start(
        dsbc_factory, nodes, sip_extra="rate_limit = 5\nrate_window = 2.0\nrate_limit_drop = true\n"
    )
    device = Udp(DEVICE)
    try:
        for i in range(40):
            device.send(options(f"sip:{d.hostport}", device.addr, n=i), d.sip_addr)
        assert statuses(device.recv_all(1.5)) == {200: 5}
    finally:
        device.close()


def test_scanners_are_dropped_silently(dsbc_factory: Factory, nodes: Any) -> None:
    d = start(dsbc_factory, nodes, sip_extra="drop_scanners = true\n")
    scanner = Udp(SCANNER)
    try:
        for ua in ("friendly-scanner", "sipvicious 0.3.4", "VaxSIPUserAgent/3.1", "sipcli/v1.8"):
            scanner.send(options(f"sip:100@{d.hostport}", scanner.addr, ua=ua), d.sip_addr)
        assert scanner.recv_all(1.0) == []
        scanner.send(options(f"sip:{d.hostport}", scanner.addr, ua="Linphone/5.2"), d.sip_addr)
        assert statuses(scanner.recv_all(1.0)) == {200: 1}
        assert d.counters_when(lambda c: c.get("scanners_dropped", 0) >= 4)["scanners_dropped"] == 4
    finally:
        scanner.close()


# --- connections, slow clients, sizes --------------------------------------------------------


def tcp_connect(d: Any, ip: str) -> socket.socket:
    return socket.create_connection(d.sip_addr, timeout=3, source_address=(ip, 0))


def tcp_options_ok(sock: socket.socket, d: Any) -> bool:
    sock.sendall(options(f"sip:{d.hostport}", sock.getsockname(), transport="TCP"))
    sock.settimeout(2)
    try:
        return sock.recv(65535).startswith(b"SIP/2.0 200")
    except OSError:
        return False


def test_tcp_connection_caps_in_total_and_per_source(dsbc_factory: Factory, nodes: Any) -> None:
    d = start(dsbc_factory, nodes, sip_extra="max_connections = 5\nmax_connections_per_ip = 3\n")
    socks: list[socket.socket] = []
    try:
        mine = [tcp_connect(d, DEVICE) for _ in range(3)]
        socks += mine
        assert all(tcp_options_ok(s, d) for s in mine)
        extra = tcp_connect(d, DEVICE)  # the 4th from one address
        socks.append(extra)
        assert closed_within(extra, 2.0) is not None
        others = [tcp_connect(d, OTHER_DEVICE) for _ in range(2)]
        socks += others
        assert all(tcp_options_ok(s, d) for s in others)
        over = tcp_connect(d, SCANNER)  # the 6th in total
        socks.append(over)
        assert closed_within(over, 2.0) is not None
        assert d.counters_when(lambda c: c.get("tcp_refused", 0) >= 2)["tcp_refused"] == 2
        mine[0].close()  # a freed slot can be used again
        time.sleep(0.3)
        again = tcp_connect(d, DEVICE)
        socks.append(again)
        assert tcp_options_ok(again, d)
    finally:
        for s in socks:
            s.close()


def test_slowloris_idle_and_stalled_connections_are_closed(
    dsbc_factory: Factory, nodes: Any, tmp_path: Path
) -> None:
    from tests.peers.tlsca import TestCA

    ca = TestCA(tmp_path / "ca")
    d = start(
        dsbc_factory,
        nodes,
        sip_extra="tcp_stall_timeout = 1.0\ntcp_idle_timeout = 3.0\n",
        transports=("udp", "tcp", "tls"),
        tls=ca.issue("dsbc", ips=["127.0.0.1"]),
    )
    # a message trickling in one octet at a time: closed about tcp_stall_timeout after it began
    slow = tcp_connect(d, DEVICE)
    msg = options(f"sip:{d.hostport}", slow.getsockname(), transport="TCP")
    start_t = time.monotonic()
    closed = False
    for b in msg[:40]:
        try:
            slow.send(bytes([b]))
        except OSError:
            closed = True
            break
        time.sleep(0.15)
        if closed_within(slow, 0.01) is not None:
            closed = True
            break
    held = time.monotonic() - start_t
    assert closed or closed_within(slow, 2.0) is not None, "the slow client was never closed"
    assert held < 4.0, f"a slowloris client held its connection for {held:.1f} s"
    slow.close()
    # a TLS client that never finishes its handshake
    tls_raw = socket.create_connection((d.ip, d.tls_port), timeout=3, source_address=(DEVICE, 0))
    assert closed_within(tls_raw, 4.0) is not None
    tls_raw.close()
    # a healthy client sending whole messages keeps its connection; an idle one loses it
    ok = tcp_connect(d, OTHER_DEVICE)
    for _ in range(4):
        assert tcp_options_ok(ok, d)
        time.sleep(0.7)
    idle_for = closed_within(ok, 6.0)
    assert idle_for is not None and idle_for >= 2.0
    ok.close()
    c = d.counters_when(
        lambda c: c.get("tcp_stalled_closed", 0) >= 1 and c.get("tcp_idle_closed", 0) >= 1
    )
    assert c.get("tcp_stalled_closed", 0) >= 1 and c.get("tcp_idle_closed", 0) >= 1


def test_message_size_limits_answer_513(dsbc_factory: Factory, nodes: Any) -> None:
    d = start(dsbc_factory, nodes, sip_extra="max_message_size = 2048\n")
    device = Udp(DEVICE)
    try:
        big = options(f"sip:{d.hostport}", device.addr).replace(
            b"Content-Length: 0", b"X-Pad: " + b"p" * 3000 + b"\r\nContent-Length: 0"
        )
        device.send(big, d.sip_addr)
        (too_large,) = device.recv_all(1.0)
        assert too_large.status == 513
        assert f";received={device.addr[0]};rport={device.addr[1]}" in (too_large.get("via") or "")
        device.send(options(f"sip:{d.hostport}", device.addr), d.sip_addr)  # the next one is fine
        assert statuses(device.recv_all(1.0)) == {200: 1}
    finally:
        device.close()
    s = tcp_connect(d, DEVICE)
    try:
        head = options(f"sip:{d.hostport}", s.getsockname(), transport="TCP").replace(
            b"Content-Length: 0", b"Content-Length: 5000"
        )
        s.sendall(head)
        s.settimeout(2)
        assert s.recv(65535).startswith(b"SIP/2.0 513")
        assert closed_within(s, 2.0) is not None
    finally:
        s.close()


# --- control API -------------------------------------------------------------------------------


def http(
    url: str, method: str = "GET", token: str | None = None, body: Any = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", token)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read()
            return r.status, json.loads(text) if text[:1] in (b"{", b"[") else text
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_control_api_refuses_anything_without_its_token(dsbc_factory: Factory, nodes: Any) -> None:
    d = start(dsbc_factory, nodes)
    base = f"http://127.0.0.1:{d.control_port}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if http(f"{base}/healthz")[0] in (200, 503):
                break
        except OSError:
            time.sleep(0.2)
    for method, path, body in (
        ("GET", "/v1/identities/account/1001", None),
        ("GET", "/v1/customers/100", None),
        ("PUT", "/v1/customers/999", {"identities": ["account:9"], "system": "target"}),
        ("POST", "/v1/migrations", {"customers": ["100"], "to": "target"}),
        ("POST", "/v1/migrations/whatever/rollback", {}),
        ("GET", "/v1/status", None),
    ):
        for token in (
            None,
            "Bearer wrong-token",
            "Basic dGVzdC10b2tlbg==",
            "Bearer test-token-and-more",
            "test-token",
        ):
            st, _ = http(base + path, method, token, body)
            assert st == 401, (method, path, token, st)
    # nothing happened: the customer did not move, the new one does not exist
    st, doc = http(f"{base}/v1/identities/account/1001", token="Bearer test-token")
    assert st == 200 and doc["system"] == "source"
    assert http(f"{base}/v1/customers/999", token="Bearer test-token")[0] == 404
    assert http(f"{base}/metrics")[0] == 200  # metrics and health stay open
