"""``dsbc run`` with ``sip.workers = 2``: two processes share the SIP port (SO_REUSEPORT).

A registrar node in the test answers REGISTER 200 with the request's Path and Contact
echoed (and OPTIONS 200).  What a user sees:

* REGISTERs from many source ports are spread over both workers and every one gets its
  200 from the node;
* a phone's TCP connection lives in one worker, yet a request the node sends to dsbc over
  UDP (landing in whichever worker the kernel picks) reaches the phone on that connection,
  through the flow token in the Path (hand-over between workers over a Unix socket);
* a worker killed with SIGKILL is restarted by the master and traffic goes on.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sip.errors import SipError
from sip.flow import Flow, FlowSigner
from sip.message import make_response, parse_message
from sip.uri import parse_name_addr
from tests.peers.dsbc import Dsbc
from tests.peers.fakenode import FakeNode

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]

FLOW_SECRET = b"test-flow-secret-0123456789abcdef"  # what tests/peers/dsbc.py configures


class Registrar(FakeNode):
    """Answers REGISTER 200 with the Path and Contact (expires=300) echoed, other requests
    200, and records every message; ``paths[user]`` is the last Path a user registered with."""

    def __init__(self) -> None:
        super().__init__("udp")
        self.paths: dict[str, str] = {}

    def _handle(self, raw: bytes) -> bytes | None:
        with self.lock:
            self.received.append(raw)
        if raw.startswith((b"SIP/", b"ACK ")):
            return None
        try:
            msg = parse_message(raw)
        except SipError:
            return None
        extra: list[tuple[str, str]] = [("x-system", "registrar")]
        if msg.method == "REGISTER":
            path = msg.values("path")
            with self.lock:
                self.paths[parse_name_addr(msg.get("to") or "").uri.user or ""] = ", ".join(path)
            extra += [("path", p) for p in path]
            extra += [("contact", f"{c};expires=300") for c in msg.values("contact")]
        return make_response(msg, 200, "OK", extra, to_tag="reg")


def register(user: str, port: int, transport: str = "UDP", call_id: str = "") -> bytes:
    t = transport.lower()
    return (
        f"REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:{port};branch=z9hG4bKreg{user}{port};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{user}@example.com>;tag=r{port}\r\nTo: <sip:{user}@example.com>\r\n"
        f"Call-ID: {call_id or f'reg-{user}-{port}'}\r\nCSeq: 1 REGISTER\r\n"
        f"Contact: <sip:{user}@127.0.0.1:{port};transport={t}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Dsbc, Registrar]]:
    with Registrar() as node:
        d = Dsbc(tmp_path / "dsbc", source=[f"udp:{node.ip}:{node.port}"], workers=2)
        with d:
            wait_workers(d, 2)
            d.wait_nodes_up()
            yield d, node
        assert not d.traceback(), d.traceback()


def wait_workers(
    d: Dsbc, n: int, timeout: float = 10.0, not_pids: frozenset[int] = frozenset()
) -> dict[int, int]:
    """worker index -> pid, once ``n`` workers (none of ``not_pids``) write snapshots."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {s["worker"]: s["pid"] for s in d.status() if time.time() - s.get("ts", 0) < 3}
        if len(pids) == n and not (set(pids.values()) & set(not_pids)):
            return pids
        time.sleep(0.1)
    raise AssertionError(f"not {n} live workers after {timeout}s: {d.status()}")


def per_worker(d: Dsbc, counter: str) -> dict[int, int]:
    return {
        s["worker"]: s.get("services", {}).get("sip", {}).get("counters", {}).get(counter, 0)
        for s in d.status()
    }


def registers_from_many_ports(d: Dsbc, n: int, tag: str, timeout: float = 8.0) -> list[bytes]:
    """n REGISTERs, each from a socket of its own, retransmitted every 0.5 s (as SIP's
    Timer A would) until answered; the answers, in order (b"" for none)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
        answers = [b""] * n
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(answers):
            for i, s in enumerate(socks):
                if not answers[i]:
                    s.sendto(register(f"{tag}{i}", s.getsockname()[1]), d.sip_addr)
            until = min(deadline, time.monotonic() + 0.5)
            while time.monotonic() < until and not all(answers):
                ready, _, _ = select.select(
                    [s for i, s in enumerate(socks) if not answers[i]], [], [], 0.05
                )
                for s in ready:
                    answers[socks.index(s)] = s.recv(65535)
        return answers
    finally:
        for s in socks:
            s.close()


def test_registers_spread_over_both_workers_all_answered(cluster: tuple[Dsbc, Registrar]) -> None:
    d, _ = cluster
    answers = registers_from_many_ports(d, 48, "spread")
    for a in answers:
        assert a.startswith(b"SIP/2.0 200 ") and b"X-System: registrar" in a, a[:80]
        assert b"Path: <sip:127.0.0.1:" in a  # the Path dsbc added came back with the 200
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        counts = per_worker(d, "requests_in:REGISTER")
        if sum(counts.values()) >= 48:
            break
        time.sleep(0.2)
    assert sum(counts.values()) >= 48, counts
    assert all(v > 0 for v in counts.values()) and len(counts) == 2, counts


class TcpPhone:
    def __init__(self, d: Dsbc, user: str) -> None:
        self.user = user
        self.sock = socket.create_connection(d.sip_addr, timeout=5)
        self.port: int = self.sock.getsockname()[1]
        self.buf = b""

    def read(self, timeout: float = 4.0) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65535)
            except TimeoutError:
                break
            if not chunk:
                break
            self.buf += chunk
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"phone {self.user}: nothing read in {timeout}s")
        msg = head + sep  # our messages have no body (Content-Length: 0)
        self.buf = rest
        return msg


def test_tcp_flow_token_is_handed_over_between_workers(cluster: tuple[Dsbc, Registrar]) -> None:
    d, node = cluster
    signer = FlowSigner(FLOW_SECRET)
    phones: list[TcpPhone] = []
    workers_seen: dict[int, list[TcpPhone]] = {}
    try:
        # phones connect until both workers hold some connections (bounded)
        for i in range(24):
            p = TcpPhone(d, f"tcp{i}")
            phones.append(p)
            p.sock.sendall(register(p.user, p.port, "TCP"))
            ok = p.read()
            assert ok.startswith(b"SIP/2.0 200 "), ok[:80]
            path = node.paths[p.user]
            flow = signer.decode(parse_name_addr(path).uri.param("ft") or "")
            assert (flow.transport, flow.port) == ("tcp", p.port)
            workers_seen.setdefault(flow.worker, []).append(p)
            if len(workers_seen) == 2 and i >= 5:
                break
        assert len(workers_seen) == 2, "every connection landed in one worker"
        before = sum(per_worker(d, "handovers").values())
        # the node sends each phone a MESSAGE over UDP through its Path
        for n, p in enumerate(phones):
            msg = (
                f"MESSAGE sip:{p.user}@127.0.0.1:{p.port};transport=tcp SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {node.ip}:{node.port};branch=z9hG4bKmsg{n};rport\r\n"
                f"Route: {node.paths[p.user]}\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:system@example.com>;tag=s{n}\r\nTo: <sip:{p.user}@example.com>\r\n"
                f"Call-ID: msg-{n}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
            ).encode()
            node.send(msg, d.sip_addr)
        for n, p in enumerate(phones):
            got = p.read()
            assert (
                got.startswith(f"MESSAGE sip:{p.user}@".encode())
                and f"Call-ID: msg-{n}\r\n".encode() in got
            ), got[:120]
            # the phone answers on its connection: back to the node by Via
            p.sock.sendall(
                make_response(parse_message(got, datagram=False), 200, "OK", to_tag=f"p{n}")
            )
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            with node.lock:
                answered = {
                    r.split(b"Call-ID: ", 1)[1].split(b"\r\n", 1)[0]
                    for r in node.received
                    if r.startswith(b"SIP/2.0 200 ") and b"CSeq: 1 MESSAGE" in r
                }
            if len(answered) == len(phones):
                break
            time.sleep(0.05)
        assert answered == {f"msg-{n}".encode() for n in range(len(phones))}
        deadline = time.monotonic() + 4
        while sum(per_worker(d, "handovers").values()) <= before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sum(per_worker(d, "handovers").values()) > before
        assert sum(per_worker(d, "flow_gone").values()) == 0
    finally:
        for p in phones:
            p.sock.close()


def test_a_killed_worker_is_restarted_and_traffic_goes_on(cluster: tuple[Dsbc, Registrar]) -> None:
    d, _ = cluster
    pids = wait_workers(d, 2)
    victim = pids[1]
    os.kill(victim, signal.SIGKILL)
    # while it is down, the other worker serves everyone
    answers = registers_from_many_ports(d, 16, "down")
    assert all(a.startswith(b"SIP/2.0 200 ") for a in answers), [a[:40] for a in answers]
    new = wait_workers(d, 2, timeout=15, not_pids=frozenset({victim}))
    assert new[0] == pids[0] and new[1] != victim
    # the master forgets a dead worker's marker files (they piled up, one set per pid)
    assert not list(d.run_dir.glob(f"*-{victim}")), sorted(p.name for p in d.run_dir.iterdir())
    d.wait_nodes_up()
    answers = registers_from_many_ports(d, 32, "after")
    assert all(a.startswith(b"SIP/2.0 200 ") and b"X-System: registrar" in a for a in answers)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        counts = per_worker(d, "requests_in:REGISTER")
        if counts.get(1, 0) > 0:
            break
        time.sleep(0.2)
    assert counts.get(1, 0) > 0, counts  # the new worker 1 takes its share again
    assert d.proc is not None and d.proc.alive()


def test_flow_tokens_name_the_worker(cluster: tuple[Dsbc, Registrar]) -> None:
    """The Path of a UDP phone carries no connection, whichever worker relayed it."""
    d, node = cluster
    registers_from_many_ports(d, 4, "udpflow")
    signer = FlowSigner(FLOW_SECRET)
    for user in ("udpflow0", "udpflow3"):
        flow = signer.decode(parse_name_addr(node.paths[user]).uri.param("ft") or "")
        assert isinstance(flow, Flow) and flow.transport == "udp" and flow.conn_id == 0


def scrape_counters(d: Dsbc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter series of the node's /metrics (parsed by prometheus_client)."""
    import urllib.request

    parser = pytest.importorskip("prometheus_client.parser")
    with urllib.request.urlopen(d.control_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in parser.text_string_to_metric_families(text) if f.type == "counter"
            for s in f.samples}


def test_counters_never_go_back_across_a_reload_and_a_killed_worker(cluster: tuple[Dsbc, Registrar]) -> None:
    """/metrics summed the live workers' counters only: a SIGHUP reload (new workers) or a
    worker killed with SIGKILL made every counter drop by that worker's share, which
    Prometheus' rate() and increase() take for a reset to zero: a burst of everything the
    other worker had counted.  The counters of a worker that is gone are now kept."""
    d, _ = cluster
    assert d.proc is not None
    assert all(a.startswith(b"SIP/2.0 200 ") for a in registers_from_many_ports(d, 24, "m"))
    time.sleep(1.5)  # the workers' snapshots, once a second
    before = scrape_counters(d)
    assert before[("dsbc_sip_requests_total", (("method", "REGISTER"),))] >= 24

    def status_registers() -> int:  # what `dsbc status` shows (GET /v1/status)
        code, st = d.control("GET", "/v1/status")
        assert code == 200, st
        return int(st["node"]["services"]["sip"]["counters"]["requests_in:REGISTER"])

    shown = status_registers()

    def no_decrease(now: dict[tuple[str, tuple[tuple[str, str], ...]], float], when: str) -> None:
        gone = {k: (v, now.get(k)) for k, v in before.items() if now.get(k, -1.0) < v}
        assert not gone, f"{when}: {gone}"
        assert status_registers() >= shown, f"{when}: dsbc status went back"

    pids = wait_workers(d, 2)
    os.kill(d.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # scraped all along the rolling reload
        no_decrease(scrape_counters(d), "during the reload")
        alive = {s["pid"] for s in d.status() if time.time() - s.get("ts", 0) < 3}
        if not alive & set(pids.values()) and len(alive) == 2:
            break
        time.sleep(0.2)
    assert not alive & set(pids.values()), "the reload did not replace the workers"
    no_decrease(after := scrape_counters(d), "after the reload")
    before, shown = after, status_registers()
    os.kill(wait_workers(d, 2)[1], signal.SIGKILL)
    for _ in range(15):
        no_decrease(scrape_counters(d), "after a worker was killed")
        time.sleep(0.2)
    assert all(a.startswith(b"SIP/2.0 200 ") for a in registers_from_many_ports(d, 8, "k"))
    time.sleep(1.5)
    final = scrape_counters(d)
    assert final[("dsbc_sip_requests_total", (("method", "REGISTER"),))] >= 24 + 8
    assert status_registers() >= 24 + 8
