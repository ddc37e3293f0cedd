"""A real freeDiameter relay in the path: PGW -> freeDiameter -> dsbc -> source / target OCS.

freeDiameter (in its own network namespace, see tests/peers/freediameter.py) connects
to dsbc and to the PGW, exchanges capabilities and watchdogs with both, and relays the
credit-control requests by realm; dsbc routes them by subscriber, and a session keeps
its system across a migration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from dsbc.config import parse_config
from dsbc.diameter import codec as dc
from dsbc.diameter import start_diameter
from dsbc.emulator.diameter_peer import CreditControlClient, CreditControlServer
from tests.peers.freediameter import FreeDiameterRelay, VethNamespace, netns_unavailable
from tests.test_diameter_dispatch import MSISDN, config_text, free_tcp_port, seed, wait_for
from tests.test_radius_core import open_test_store

pytestmark = pytest.mark.peers


@pytest.fixture
def veth() -> VethNamespace:  # type: ignore[misc]
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    ns = VethNamespace()
    try:
        ns.open()
    except OSError as exc:
        pytest.skip(f"cannot create a network namespace: {exc}")
    yield ns
    ns.close()


def test_credit_control_through_freediameter_relay(veth: VethNamespace, tmp_path: Path) -> None:
    store = open_test_store(tmp_path)
    seed(store)
    dsbc_port, pgw_port = free_tcp_port(), free_tcp_port()

    async def main() -> None:
        src = await CreditControlServer("MR100", "ocs.source.example", "source.example").start()
        tgt = await CreditControlServer("MR115", "ocs.target.example", "target.example").start()
        text = config_text(src.address, tgt.address).replace(
            'listen = "127.0.0.1:', f'listen = "{veth.host_ip}:{dsbc_port}"  # ')
        svc = await start_diameter(parse_config(text), store)
        pgw = await CreditControlClient("pgw1.pgw.example", "pgw.example", "example",
                                        host_ip=veth.host_ip).listen(veth.host_ip, pgw_port)
        relay = FreeDiameterRelay(tmp_path / "fd", veth, "relay.example", "relay.example",
                                  [("dsbc.example", veth.host_ip, dsbc_port),
                                   ("pgw1.pgw.example", veth.host_ip, pgw_port)])
        await asyncio.get_running_loop().run_in_executor(None, relay.start)
        try:
            try:
                await wait_for(lambda: bool(svc.router.clients) and pgw._opened.is_set()
                               and relay.is_open("dsbc.example") and relay.is_open("pgw1.pgw.example"), 15)
            except AssertionError:
                pytest.fail("freeDiameter did not connect to dsbc and the PGW:\n" + relay.log_tail())
            assert list(svc.router.clients.values()) == ["relay.example"]
            ans = await pgw.ccr("pgw1;r1", dc.CC_INITIAL, (dc.SUB_E164, MSISDN))
            assert ans.u32(dc.RESULT_CODE) == dc.SUCCESS and ans.text(dc.ORIGIN_HOST) == "ocs.source.example"
            store.migrate(["1"], "target")
            ans = await pgw.ccr("pgw1;r1", dc.CC_UPDATE)
            assert ans.text(dc.ORIGIN_HOST) == "ocs.source.example"
            ans = await pgw.ccr("pgw1;r2", dc.CC_INITIAL, (dc.SUB_E164, MSISDN))
            assert ans.text(dc.ORIGIN_HOST) == "ocs.target.example"
            ans = await pgw.ccr("pgw1;r1", dc.CC_TERMINATE)
            assert ans.text(dc.ORIGIN_HOST) == "ocs.source.example" and ans.u32(dc.RESULT_CODE) == dc.SUCCESS
            assert [e["type"] for e in src.log] == [1, 2, 3]
            assert [e["session"] for e in tgt.log] == ["pgw1;r2"]
            # both relays recorded: freeDiameter's and dsbc's view of the hop before it
            assert src.log[0]["route_record"] == ["pgw1.pgw.example", "relay.example"]
        finally:
            await svc.stop()  # DPR to freeDiameter and the OCS peers
            await asyncio.get_running_loop().run_in_executor(None, relay.stop)
            await pgw.stop()
            await src.stop()
            await tgt.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        store.close()


@asynccontextmanager
async def dsbc_behind_a_relay(veth: VethNamespace, tmp_path: Path, store: Any,
                              **relay_options: Any) -> AsyncIterator[tuple[Any, FreeDiameterRelay]]:
    """dsbc's Diameter listening on the veth's host side, and freeDiameter in the namespace
    with dsbc as its one peer (``relay_options``: how it wants to talk to dsbc)."""
    dsbc_port = free_tcp_port()
    text = config_text(None, None).replace('listen = "127.0.0.1:', f'listen = "{veth.host_ip}:{dsbc_port}"  # ')
    svc = await start_diameter(parse_config(text), store)
    relay = FreeDiameterRelay(tmp_path / "fd", veth, "relay.example", "relay.example",
                              [("dsbc.example", veth.host_ip, dsbc_port)], **relay_options)
    await asyncio.get_running_loop().run_in_executor(None, relay.start)
    try:
        yield svc, relay
    finally:
        await svc.stop()
        await asyncio.get_running_loop().run_in_executor(None, relay.stop)


def test_a_relay_that_wants_tls_after_the_cea_is_told_there_is_no_common_security(
        veth: VethNamespace, tmp_path: Path) -> None:
    """freeDiameter configured for the old TLS method (Inband-Security-Id TLS in its CER, the
    handshake after the CEA): dsbc has no TLS, so it answers the CER with 5017
    DIAMETER_NO_COMMON_SECURITY (RFC 6733 5.3) rather than a success followed by a failed
    handshake, retried forever."""
    store = open_test_store(tmp_path)

    async def main() -> None:
        async with dsbc_behind_a_relay(veth, tmp_path, store, tls_old_method=("dsbc.example",)) as (svc, relay):
            try:
                await wait_for(lambda: "NO_COMMON_SECURITY" in relay.log_path.read_text(errors="replace")
                               or "TLS handshake failed" in relay.log_path.read_text(errors="replace"), 15)
            except AssertionError:
                pytest.fail("freeDiameter did not connect to dsbc:\n" + relay.log_tail())
            log = relay.log_path.read_text(errors="replace")
            assert "NO_COMMON_SECURITY" in log and "TLS handshake failed" not in log, relay.log_tail()
            assert not svc.router.clients

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        store.close()


def test_a_relay_that_starts_with_tls_is_named_in_the_log(veth: VethNamespace, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """freeDiameter's default for a peer is TLS from the first byte; dsbc has none, and its
    log says so (rather than 'bad framing: version 22'), naming the remedy."""
    store = open_test_store(tmp_path)

    async def main() -> None:
        async with dsbc_behind_a_relay(veth, tmp_path, store, tls_on_connect=("dsbc.example",)):
            await wait_for(lambda: "closing" in caplog.text, 15)

    with caplog.at_level(logging.INFO, logger="dsbc.diameter"):
        try:
            asyncio.run(asyncio.wait_for(main(), 60))
        finally:
            store.close()
    assert "TLS" in caplog.text and "No_TLS" in caplog.text, caplog.text


def test_host_ip_address_is_the_address_each_connection_uses(veth: VethNamespace, tmp_path: Path) -> None:
    """dsbc listening on the wildcard (as deploy/dsbc.example.toml does): its CEA to freeDiameter
    and its CER to a system's peer give, in Host-IP-Address, the local address of that
    connection, not what the host name resolves to (127.0.1.1 on a stock Debian)."""
    store = open_test_store(tmp_path)
    dsbc_port = free_tcp_port()

    async def main() -> None:
        cers: asyncio.Queue[dc.Message] = asyncio.Queue()

        async def system_peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            framer = dc.Framer()
            while data := await r.read(4096):
                framer.feed(data)
                while (raw := framer.next_message()) is not None:
                    await cers.put(dc.decode(raw))
            w.close()

        server = await asyncio.start_server(system_peer, veth.host_ip, 0)
        peer_port = server.sockets[0].getsockname()[1]
        text = config_text((veth.host_ip, peer_port), None).replace(
            'listen = "127.0.0.1:', f'listen = "0.0.0.0:{dsbc_port}"  # ')
        svc = await start_diameter(parse_config(text), store)
        relay = FreeDiameterRelay(tmp_path / "fd", veth, "relay.example", "relay.example",
                                  [("dsbc.example", veth.host_ip, dsbc_port)])
        await asyncio.get_running_loop().run_in_executor(None, relay.start)
        try:
            cer = await asyncio.wait_for(cers.get(), 10)
            assert cer.code == dc.CMD_CE and cer.is_request
            assert [dc.decode_address(a.data) for a in cer.find_all(dc.HOST_IP_ADDRESS)] == [veth.host_ip]
            try:
                await wait_for(lambda: bool(svc.router.clients) and relay.is_open("dsbc.example"), 15)
            except AssertionError:
                pytest.fail("freeDiameter did not connect to dsbc:\n" + relay.log_tail())
            log = relay.log_path.read_text(errors="replace")
            cea = next(ln for ln in log.splitlines() if "Capabilities-Exchange-Answer" in ln and "dsbc.example" in ln)
            assert f"Host-IP-Address(257)[-M]={veth.host_ip} " in cea, cea
        finally:
            await svc.stop()
            await asyncio.get_running_loop().run_in_executor(None, relay.stop)
            server.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        store.close()


def test_through_a_freediameter_relay_in_front_of_a_system(veth: VethNamespace, tmp_path: Path) -> None:
    """PGW -> dsbc -> freeDiameter (the source system's Diameter agent) -> the source's OCS.
    With no `diameter_realm` configured, dsbc writes the realm the system's peer gave in its
    CEA as Destination-Realm (the PGW's is dsbc's own realm, which the relay cannot route);
    the OCS's Re-Auth-Request comes back through both agents to the PGW."""
    store = open_test_store(tmp_path)
    seed(store)

    async def main() -> None:
        ocs = await CreditControlServer("MR100", "ocs.source.example", "source.example",
                                        host_ip=veth.host_ip).start(veth.host_ip, free_tcp_port())
        tgt = await CreditControlServer("MR115", "ocs.target.example", "target.example").start()
        relay = FreeDiameterRelay(tmp_path / "fd", veth, "agent.source.example", "source.example",
                                  # dsbc is a known peer (freeDiameter refuses unknown ones); it is
                                  # dsbc that connects, so the address given here is a closed port
                                  [("ocs.source.example", *ocs.address), ("dsbc.example", veth.host_ip, 9)])
        await asyncio.get_running_loop().run_in_executor(None, relay.start)
        text = config_text((veth.ns_ip, 3868), tgt.address).replace(
            'diameter_host = "ocs.source.example"\ndiameter_realm = "source.example"\n', "")
        svc = await start_diameter(parse_config(text), store)
        pgw = None
        try:
            try:
                await wait_for(lambda: all(link.is_open for link in svc.links.values())
                               and relay.is_open("ocs.source.example"), 15)
            except AssertionError:
                pytest.fail("dsbc did not connect to freeDiameter:\n" + relay.log_tail())
            assert svc.links["source"].status()["identity"] == "agent.source.example"
            pgw = await CreditControlClient("pgw1.example", "example", "example").connect(*svc.address)  # type: ignore[misc]
            ans = await pgw.ccr("pgw1;f1", dc.CC_INITIAL, (dc.SUB_E164, MSISDN))
            assert ans.u32(dc.RESULT_CODE) == dc.SUCCESS and ans.text(dc.ORIGIN_HOST) == "ocs.source.example", ans
            assert ocs.log[0]["destination_realm"] == "source.example"
            assert ocs.log[0]["route_record"] == ["pgw1.example", "dsbc.example"]
            raa = await ocs.re_auth("pgw1;f1", "pgw1.example", "example")
            assert raa.u32(dc.RESULT_CODE) == dc.SUCCESS and raa.text(dc.ORIGIN_HOST) == "pgw1.example"
            ans = await pgw.ccr("pgw1;f1", dc.CC_TERMINATE)
            assert ans.u32(dc.RESULT_CODE) == dc.SUCCESS and [e["type"] for e in ocs.log] == [1, 3]
        finally:
            if pgw is not None:
                await pgw.stop()
            await svc.stop()
            await asyncio.get_running_loop().run_in_executor(None, relay.stop)
            await ocs.stop()
            await tgt.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        store.close()
