"""RADIUS servers of both address families in one system, through real sockets.

Found by an audit: dsbc kept one upstream socket per system (and identifier slot), of the
family of the first server it sent to.  With ``radius = ["10.0.0.30:1812",
"[2001:db8::30]:1812"]``, once the IPv4 server was down every request failed to leave for
the IPv6 one (an IPv6 address on an IPv4 socket): the live server was marked down too and
the NAS got no answer at all.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from dsbc.config import parse_config
from dsbc.emulator.billing import sample_rows
from dsbc.emulator.radius_server import start_radius_emulator
from dsbc.radius import packet as rp
from dsbc.radius.service import start_radius
from dsbc.store import open_store
from tests.peers.net import free_port
from tests.test_radius_core import access_request

NAS = b"nas-secret"


def wildcard_config(src: Any, wildcard: str, auth_port: int, acct_port: int) -> str:
    """dsbc's RADIUS on ``wildcard`` in front of the emulated source server ``src``, NAS
    on 127.0.0.0/8."""
    return (f'[systems.source]\nradius = ["127.0.0.1:{src.auth_addr[1]}"]\n'
            f'radius_acct = ["127.0.0.1:{src.acct_addr[1]}"]\nradius_secret = "src-secret"\n'
            f'[radius]\nenabled = true\nauth_listen = "{wildcard}:{auth_port}"\n'
            f'acct_listen = "{wildcard}:{acct_port}"\n'
            f'[[radius.clients]]\naddress = "127.0.0.0/8"\nsecret = "{NAS.decode()}"\n')


def test_a_system_with_an_ipv4_and_an_ipv6_server_fails_over_between_them(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the IPv4 server: down
        silent.bind(("127.0.0.1", 0))
        live = await start_radius_emulator("MR100", "::1", 0, 0, "src-secret")
        auth_port = free_port("udp")
        cfg = parse_config(
            f'[systems.source]\nradius = ["127.0.0.1:{silent.getsockname()[1]}", "[::1]:{live.auth_addr[1]}"]\n'
            f'radius_acct = ["[::1]:{live.acct_addr[1]}"]\nradius_secret = "src-secret"\n'
            f'[radius]\nenabled = true\nauth_listen = "127.0.0.1:{auth_port}"\n'
            f'acct_listen = "127.0.0.1:{free_port("udp")}"\ntimeout = 0.3\nretries = 0\n'
            f'[[radius.clients]]\naddress = "127.0.0.1"\nsecret = "{NAS.decode()}"\n'
        )
        store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
        store.import_rows(sample_rows())
        svc = await start_radius(cfg, store)
        nas = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        nas.setblocking(False)
        nas.bind(("127.0.0.1", 0))
        try:
            answer = b""
            # the NAS retransmits (a new identifier each time here): the first try meets the
            # silent server, a later one the IPv6 server, which answers
            for ident in range(1, 8):
                nas.sendto(access_request("100001", ident=ident, password=b"secret", secret=NAS),
                           ("127.0.0.1", auth_port))
                try:
                    answer = await asyncio.wait_for(loop.sock_recv(nas, 4096), 0.6)
                    break
                except TimeoutError:
                    continue
            assert answer, f"no answer; {svc.status()}"
            assert rp.decode(answer).code == rp.ACCESS_ACCEPT
            assert svc.send_errors == 0
        finally:
            nas.close()
            silent.close()
            await svc.stop(persist=False)
            await live.stop()
            store.close()

    asyncio.run(main())


def test_a_wildcard_listener_answers_from_the_address_the_nas_sent_to(tmp_path: Path) -> None:
    """Found by an audit: with ``auth_listen = "0.0.0.0:1812"`` (the default), a NAS that
    reached dsbc on another address of the host than the route's preferred source (the
    keepalived VIP, a second address) got its answer from that preferred source, and
    dropped it (radclient: "No reply from server").  FreeRADIUS, listening on ``*``, answers
    from the address each request was sent to (IP_PKTINFO); so does dsbc, for both families
    of a ``[::]`` listener too."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        src = await start_radius_emulator("MR100", "127.0.0.1", 0, 0, "src-secret")
        store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
        store.import_rows(sample_rows())
        try:
            for wildcard, to in (("0.0.0.0", "127.0.0.2"), ("[::]", "127.0.0.3"), ("[::]", "::1")):
                auth_port, acct_port = free_port("udp"), free_port("udp")
                cfg = parse_config(wildcard_config(src, wildcard, auth_port, acct_port)
                                   + f'[[radius.clients]]\naddress = "::1"\nsecret = "{NAS.decode()}"\n')
                svc = await start_radius(cfg, store)
                family = socket.AF_INET6 if ":" in to else socket.AF_INET
                nas = socket.socket(family, socket.SOCK_DGRAM)
                nas.setblocking(False)
                nas.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
                try:
                    nas.sendto(access_request("100001", ident=7, password=b"secret", secret=NAS), (to, auth_port))
                    answer, frm = await asyncio.wait_for(loop.sock_recvfrom(nas, 4096), 3)
                    assert frm[:2] == (to, auth_port), (wildcard, frm)
                    assert rp.decode(answer).code == rp.ACCESS_ACCEPT
                    # a retransmission, answered from the cache, leaves from there too
                    nas.sendto(access_request("100001", ident=7, password=b"secret", secret=NAS), (to, auth_port))
                    _, frm = await asyncio.wait_for(loop.sock_recvfrom(nas, 4096), 3)
                    assert frm[:2] == (to, auth_port), (wildcard, frm)
                finally:
                    nas.close()
                    await svc.stop(persist=False)
        finally:
            await src.stop()
            store.close()

    asyncio.run(main())


def test_regression_answers_to_one_nas_port_leave_from_each_requests_own_address(tmp_path: Path) -> None:
    """Found by an audit: the address to answer from was remembered per NAS address and
    port, not per request.  A NAS that sent, from one socket, a request to one address of
    the host (its primary server) and the next to another (its secondary, both served by
    dsbc's wildcard listener) before the first was answered got that first answer from
    the second address, and dropped it (a NAS matches an answer by the server it asked)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        src = await start_radius_emulator("MR100", "127.0.0.1", 0, 0, "src-secret")
        store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
        store.import_rows(sample_rows())
        auth_port, acct_port = free_port("udp"), free_port("udp")
        cfg = parse_config(wildcard_config(src, "0.0.0.0", auth_port, acct_port))
        svc = await start_radius(cfg, store)
        nas = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        nas.setblocking(False)
        nas.bind(("127.0.0.1", 0))
        try:
            sent = {}
            for ident in range(1, 21):  # pairs sent back to back, before the first is answered
                to = "127.0.0.2" if ident % 2 else "127.0.0.3"
                sent[ident] = to
                nas.sendto(access_request("100001", ident=ident, password=b"secret", secret=NAS), (to, auth_port))
            wrong = []
            for _ in sent:
                answer, frm = await asyncio.wait_for(loop.sock_recvfrom(nas, 4096), 3)
                if frm[0] != sent[answer[1]]:
                    wrong.append((answer[1], sent[answer[1]], frm[0]))
            assert wrong == [], f"(identifier, sent to, answered from): {wrong}"
        finally:
            nas.close()
            await svc.stop(persist=False)
            await src.stop()
            store.close()

    asyncio.run(main())
