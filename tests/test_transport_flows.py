"""sip.transport: IPv6 datagrams, and flow tokens that must reach only their own connection.

A compiled (mypyc) build checks the ``addr`` annotation of ``datagram_received``: with
``tuple[str, int]`` every IPv6 UDP datagram raised TypeError in the event loop and was lost
(found by the audit: ``udp:[::1]:PORT`` listener, an INVITE from ::1, nothing forwarded).
"""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

from sip.flow import Flow
from sip.message import parse_message
from sip.transport import SipDatagram, SipEndpoint
from tests.test_proxy_core import make_core, request, standard_router


def test_datagram_from_an_ipv6_address_reaches_the_core() -> None:
    core, _ = make_core()
    loop = asyncio.new_event_loop()
    try:
        proto = SipDatagram(SipEndpoint(core, loop))
        v6 = request("OPTIONS", "sip:2000@example.com", src=Flow("udp", "::1", 5062), via="SIP/2.0/UDP [::1]:5062;branch=z9hG4bKv6")
        v4 = request("OPTIONS", "sip:2000@example.com", via="SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKv4")
        proto.datagram_received(v6, ("::1", 5062, 0, 0))
        proto.datagram_received(v4, ("127.0.0.1", 5062))
    finally:
        loop.close()
    assert core.counters["requests_in:OPTIONS"] == 2
    assert core.counters["forwarded:source"] == 2  # From 1001: a source customer


def test_stale_flow_token_does_not_reach_another_connection_with_the_same_id() -> None:
    """Connection ids start again at 1 in a new worker (SIGHUP reload, restart): a call the
    registrar still sends with an old Path token (phone A's connection 1) must not be
    written to the new connection 1 of phone B; it is answered 430 Flow Failed instead."""
    from sip.proxy import Send
    from sip.transport import SipStream

    class FakeTransport:
        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def is_closing(self) -> bool:
            return False

    core, _ = make_core()
    loop = asyncio.new_event_loop()
    try:
        ep = SipEndpoint(core, loop)
        conn = SipStream(ep)
        conn.transport = FakeTransport()  # type: ignore[assignment]
        conn.flow = Flow("tcp", "203.0.113.20", 41000, conn.conn_id, 0)  # phone B
        ep.conns[conn.conn_id] = conn
        invite = request("INVITE", "sip:1001@203.0.113.10:40000;transport=tcp", src=Flow("udp", "10.0.0.1", 5060))
        # phone A's stale token: same connection id, another address
        ep.dispatch([Send("tcp", "203.0.113.10", 40000, invite, conn.conn_id, 0)])
        assert conn.transport.written == []  # type: ignore[union-attr]
        assert core.counters["flow_gone"] == 1
        # the right peer still gets it
        ep.dispatch([Send("tcp", "203.0.113.20", 41000, invite, conn.conn_id, 0)])
        assert conn.transport.written  # type: ignore[union-attr]
    finally:
        loop.close()


def test_a_request_for_a_phone_connection_that_is_closing_gets_430() -> None:
    """A call the registrar sends to a phone whose TCP connection dsbc is closing (it
    sent a broken stream and was answered 400, or it is being shut) was dropped without
    a word; like any flow that is gone, it is answered 430 Flow Failed (RFC 5626 5.3)."""
    from sip.proxy import Send
    from sip.transport import SipStream

    class ClosingTransport:
        def write(self, data: bytes) -> None:
            raise AssertionError("written to a closing connection")

        def is_closing(self) -> bool:
            return True

    core, _ = make_core()
    loop = asyncio.new_event_loop()
    try:
        ep = SipEndpoint(core, loop)
        conn = SipStream(ep)
        conn.transport = ClosingTransport()  # type: ignore[assignment]
        conn.flow = Flow("tcp", "203.0.113.20", 41000, conn.conn_id, 0)
        ep.conns[conn.conn_id] = conn
        invite = request("INVITE", "sip:1001@203.0.113.20:41000;transport=tcp", src=Flow("udp", "10.0.0.1", 5060))
        ep.dispatch([Send("tcp", "203.0.113.20", 41000, invite, conn.conn_id, 0)])
        assert core.counters["flow_gone"] == 1
        assert core.counters["flow_failed_430"] == 1
    finally:
        loop.close()


def test_udp_listeners_get_big_socket_buffers(tmp_path: Path) -> None:
    """A burst (phones re-registering after an outage, a NAS's accounting backlog after its
    restart) must not overflow the kernel's default 208 KB receive buffer before dsbc reads
    it: SIP and RADIUS listeners ask for 4 MB, past net.core.rmem_max when root."""
    import os
    import socket

    from sip.transport_sockets import BIG_BUFFER

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux reports twice what was set (the bookkeeping overhead)
    want = 2 * BIG_BUFFER if os.geteuid() == 0 else default + 1

    async def sip_buffer() -> int:
        core, _ = make_core()
        ep = SipEndpoint(core, asyncio.get_running_loop())
        await ep.listen([("udp", "127.0.0.1", 0)])
        try:
            sock = ep.udp[0].transport.get_extra_info("socket")  # type: ignore[union-attr]
            return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        finally:
            ep.udp[0].transport.close()  # type: ignore[union-attr]

    async def radius_buffers() -> list[int]:
        from dsbc.config import parse_config
        from dsbc.radius.service import start_radius
        from dsbc.store import open_store
        from tests.peers.net import free_port

        cfg = parse_config(f'[radius]\nenabled = true\nauth_listen = "127.0.0.1:{free_port()}"\n'
                           f'acct_listen = "127.0.0.1:{free_port()}"\n'
                           '[[radius.clients]]\naddress = "127.0.0.1"\nsecret = "nas"\n')
        store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
        svc = await start_radius(cfg, store)
        try:
            return [int(lst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
                    for lst in svc.listeners]
        finally:
            await svc.stop(persist=False)
            store.close()

    assert asyncio.run(sip_buffer()) >= want
    assert all(b >= want for b in asyncio.run(radius_buffers()))


def test_ipv4_peers_on_a_dual_stack_listener_are_known_by_their_ipv4_address() -> None:
    """``udp:[::]:5060`` with IPv4 nodes (found by an audit): the nodes' messages came from
    ::ffff:a.b.c.d (not the node, not trusted, its ping answers not its own) and every send
    to an IPv4 node raised "socket family mismatch" in the event loop."""
    from tests.test_proxy_core import S1

    class FakeV6Transport:
        def __init__(self) -> None:
            self.sent: list[tuple[bytes, tuple[str, int]]] = []

        def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
            if ":" not in addr[0]:
                raise ValueError("socket family mismatch")  # as uvloop says
            self.sent.append((data, addr))

        def is_closing(self) -> bool:
            return False

    core, _ = make_core()
    loop = asyncio.new_event_loop()
    try:
        ep = SipEndpoint(core, loop)
        proto = SipDatagram(ep)
        proto.v6 = True
        proto.transport = FakeV6Transport()  # type: ignore[assignment]
        ep.udp.append(proto)
        # a call from the source's node to a DID: trusted (routed by Request-URI), relayed
        invite = request("INVITE", "sip:15550002000@192.0.2.10", src=Flow("udp", S1.host, S1.port),
                         via=f"SIP/2.0/UDP {S1.host}:{S1.port};branch=z9hG4bKv4map")
        proto.datagram_received(invite, (f"::ffff:{S1.host}", S1.port, 0, 0))
    finally:
        loop.close()
    sent = proto.transport.sent  # type: ignore[union-attr]
    assert core.counters["forwarded:target"] == 1, dict(core.counters)
    assert any(addr[0].startswith("::ffff:") for _, addr in sent), sent  # to the IPv4 node, mapped
    assert core.counters["send_errors"] == 0


def test_a_draining_worker_still_hands_messages_to_the_other_workers(tmp_path: Path) -> None:
    """A worker a reload replaces lets its successor have its IPC name, and serves UDP until
    it has released what it holds for a migration: a request it reads meanwhile for a phone
    on another worker's TCP connection is still handed over (it was dropped as flow_gone)."""
    import os
    import socket

    from dsbc.runner import Worker
    from sip.proxy import Send

    def name(i: int) -> str:  # abstract names, as the runner's
        return f"\0dsbc-test-{os.getpid()}-{i}"

    core, _ = make_core()
    loop = asyncio.new_event_loop()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    other.bind(name(1))
    other.settimeout(2)
    try:
        ep = SipEndpoint(core, loop, worker=0, ipc_name=name)
        own = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        own.bind(name(0))
        ep._ipc = own

        class Sip:
            endpoint = ep

        Worker._release_ipc_name(Sip())
        own2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        own2.bind(name(0))  # the successor can take the name
        own2.close()
        invite = request("INVITE", "sip:1001@203.0.113.10:40000;transport=tcp", src=Flow("udp", "10.0.0.1", 5060))
        ep.dispatch([Send("tcp", "203.0.113.10", 40000, invite, 7, 1)])
        assert invite in other.recv(65535)
        assert core.counters["handovers"] == 1
    finally:
        other.close()
        loop.close()


def test_a_connection_to_a_node_that_never_answers_fails_after_connect_timeout() -> None:
    """Found by an audit: an outgoing TCP connection to a black-holed node waited for the
    kernel's SYN retries (about two minutes) before the node was marked unreachable and its
    messages given up.  A listener whose accept queue is full drops SYNs the same way."""
    import socket

    from sip.proxy import Send

    core, _ = make_core()
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue: later SYNs are dropped, not refused
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)

    async def main() -> None:
        ep = SipEndpoint(core, asyncio.get_running_loop(), connect_timeout=0.5)
        invite = request("INVITE", f"sip:2000@127.0.0.1:{port};transport=tcp")
        ep.dispatch([Send("tcp", "127.0.0.1", port, invite)])
        for _ in range(60):  # bounded: 3 s
            if core.counters["connect_errors"]:
                break
            await asyncio.sleep(0.05)
        assert ("tcp", "127.0.0.1", port) not in ep.by_addr

    try:
        asyncio.run(main())
    finally:
        for c in fillers:
            c.close()
        full.close()
    assert core.counters["connect_errors"] == 1


def test_regression_a_request_held_while_draining_is_answered_before_the_sockets_close() -> None:
    """A draining worker (SIGHUP reload, SIGTERM) keeps its UDP sockets until it closes, so
    it still takes requests: one for a customer in flight was held (100 Trying) after the
    drain's last look at what it holds, and the close dropped it: the caller waited for a
    final answer that never came.  What is still held at the close is now answered."""
    router = standard_router()
    router.move("42", state="locked")  # customer 42 (account 1001) is in a batch in flight
    core, _ = make_core(router, lock_hold=2.0)
    port = random.randint(20000, 60000)
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    phone.bind(("127.0.0.1", 0))
    phone.setblocking(False)
    got: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ep = SipEndpoint(core, loop)
        await ep.listen([("udp", "127.0.0.1", port)])
        ep.stop_listening()  # the worker drains (SIGHUP reload / SIGTERM)
        assert core.held_count == 0  # the drain loop would stop waiting now
        p = phone.getsockname()[1]
        phone.sendto(request("INVITE", via=f"SIP/2.0/UDP 127.0.0.1:{p};branch=z9hG4bKdr1;rport"), ("127.0.0.1", port))
        for _ in range(40):  # bounded, 2 s
            await asyncio.sleep(0.05)
            try:
                got.append(parse_message(phone.recv(65535)).status)
            except BlockingIOError:
                pass
            if got:
                break
        await asyncio.sleep(0.2)  # the runner's last pause, then the services stop
        await ep.close()
        await asyncio.sleep(0.05)
        while True:
            try:
                got.append(parse_message(phone.recv(65535)).status)
            except BlockingIOError:
                break

    try:
        asyncio.run(main())
    finally:
        phone.close()
    assert got[0] == 100  # held
    assert got[-1] >= 500, got  # and then answered, not left ringing for ever


def test_regression_a_flow_token_of_another_nodes_worker_gets_430(tmp_path: Path) -> None:
    """Two dsbc nodes share the flow secret (behind one floating address): a registrar may
    send a call with a Path token that the other node wrote, naming a TCP connection of a
    worker this node does not have (the other node runs more workers).  The node must
    hear 430 Flow Failed at once (RFC 5626 5.3), as for any flow that is gone; the request
    was dropped without an answer, and the system retransmitted it until its timer ran out
    (found by the audit: a call to a TCP phone after a keepalived fail-over rang nothing
    for 32 s)."""
    import time

    from sip.flow import FlowSigner
    from tests.peers.dsbc import FLOW_SECRET, Dsbc
    from tests.peers.fakenode import FakeNode
    from tests.test_tls import in_dialog, wait_node_response

    with FakeNode("udp") as node:
        d = Dsbc(tmp_path / "dsbc", source=[node.uri], target=[], workers=1,
                 customers=[{"customer_id": "100", "identities": ["account:1001"], "system": "source"}])
        d.start()
        try:
            d.wait_nodes_up()
            signer = FlowSigner(FLOW_SECRET.encode())
            for worker in (0, 7):  # this node's own worker (a gone connection), another node's
                token = signer.encode(Flow("tcp", "127.0.0.2", 40000, 3, worker))
                path = f"<sip:{d.ip}:{d.port};transport=udp;lr;ft={token}>"
                inv = in_dialog("INVITE", "sip:1001@127.0.0.2:40000;transport=tcp", [path], f"other-node-{worker}", 1,
                                f"SIP/2.0/UDP {node.ip}:{node.port};branch=z9hG4bK-on-{worker};rport",
                                "<sip:2000@example.com>;tag=n1", "<sip:1001@example.com>")
                node.send(inv.replace("\n", "\r\n").encode(), d.sip_addr)
                failed = wait_node_response(node, 430)
                assert failed.get("call-id") == f"other-node-{worker}"
                node.received.clear()
                time.sleep(0.1)
        finally:
            d.stop()


def test_regression_a_burst_handed_to_another_worker_waits_for_it_instead_of_430() -> None:
    """With two workers, a burst of calls from a system to phones on TCP/TLS connections of
    the other worker (a node's datagrams all reach one worker) got 430 Flow Failed for
    connected phones: the kernel queues only net.unix.max_dgram_qlen (10) datagrams on the
    other worker's hand-over socket before it reads, and sendto's EAGAIN was taken for a
    gone flow (found by the audit: 4 of 120 phones).  What does not fit waits, in order."""
    import os
    import struct

    from sip.proxy import Send
    from sip.transport import _IPC_HEAD, _IPC_HEAD_SIZE

    def name(i: int) -> str:
        return f"\0dsbc-test-burst-{os.getpid()}-{i}"

    core, _ = make_core()
    loop = asyncio.new_event_loop()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    other.bind(name(1))
    other.setblocking(False)
    own = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    own.bind(name(0))
    own.setblocking(False)
    try:
        ep = SipEndpoint(core, loop, worker=0, ipc_name=name)
        ep._ipc = own
        calls = [request("INVITE", "sip:1001@203.0.113.10:40000;transport=tcp", src=Flow("udp", "10.0.0.1", 5060),
                         call_id=f"burst-{i}", branch=f"z9hG4bKburst{i}") for i in range(60)]
        # the other worker is busy; (keep: a REGISTER's 2xx keeps the phone's connection)
        ep.dispatch([Send("tcp", "203.0.113.10", 40000, c, 7, 1, keep=130) for c in calls])
        got: list[bytes] = []

        async def read_as_the_other_worker() -> None:
            deadline = loop.time() + 3
            while len(got) < len(calls) and loop.time() < deadline:
                try:
                    got.append(other.recv(65535))
                except BlockingIOError:
                    await asyncio.sleep(0.005)

        loop.run_until_complete(read_as_the_other_worker())
        assert core.counters["flow_failed_430"] == 0 and core.counters["flow_gone"] == 0
        assert [g[-len(c):] for g, c in zip(got, calls, strict=True)] == calls  # all, in order
        assert core.counters["handovers"] == len(calls)
        assert {struct.unpack(_IPC_HEAD, g[:_IPC_HEAD_SIZE])[:3] for g in got} == {(7, 40000, 130)}
    finally:
        other.close()
        own.close()
        loop.close()
