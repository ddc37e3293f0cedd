"""Diameter dispatcher end to end over loopback TCP, with the Python credit-control peers."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dsbc.config import parse_config
from dsbc.diameter import codec as dc
from dsbc.diameter import start_diameter
from dsbc.diameter.service import DiameterService
from dsbc.emulator.diameter_peer import CreditControlClient, CreditControlServer
from dsbc.store.base import LocationStore
from tests.test_radius_core import open_test_store

MSISDN = "15550100"
IMSI = "001010000000002"


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(src: tuple[str, int] | None, tgt: tuple[str, int] | None, **diameter: Any) -> str:
    def system(name: str, label: str, addr: tuple[str, int] | None) -> str:
        peer = f'diameter = "{addr[0]}:{addr[1]}"\n' if addr else ""
        return (f'[systems.{name}]\nname = "{label}"\n{peer}'
                f'diameter_host = "ocs.{name}.example"\ndiameter_realm = "{name}.example"\n')

    opts = {"watchdog_interval": 5.0, "reconnect_min": 0.05, "reconnect_max": 0.2, "cer_timeout": 1.0,
            "request_timeout": 2.0} | diameter
    extra = "".join(f"{k} = {v}\n" for k, v in opts.items())
    return (f'[store]\nurl = "sqlite:///unused.db"\nlock_hold = 0.6\n\n'
            f'{system("source", "MR100", src)}\n{system("target", "MR115", tgt)}\n'
            f'[diameter]\nenabled = true\nlisten = "127.0.0.1:{free_tcp_port()}"\n'
            f'origin_host = "dsbc.example"\norigin_realm = "example"\n{extra}')


def seed(store: LocationStore) -> None:
    store.put_customer("1", [f"msisdn:{MSISDN}"], "source")
    store.put_customer("2", [f"imsi:{IMSI}"], "target")
    store.put_customer("3", ["account:carol", "did:15550300"], "source")


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.02)


Scenario = Callable[[DiameterService, CreditControlServer, CreditControlServer, LocationStore], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, src_cer: bool = True, **diameter: Any) -> None:
    store = open_test_store(tmp_path)
    seed(store)

    async def main() -> None:
        src = await CreditControlServer("MR100", "ocs.source.example", "source.example", answer_cer=src_cer).start()
        tgt = await CreditControlServer("MR115", "ocs.target.example", "target.example").start()
        cfg = parse_config(config_text(src.address, tgt.address, **diameter))
        svc = await start_diameter(cfg, store)
        try:
            if src_cer:
                await wait_for(lambda: all(link.is_open for link in svc.links.values()))
            await scenario(svc, src, tgt, store)
        finally:
            await svc.stop()
            await src.stop()
            await tgt.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        store.close()


async def client_for(svc: DiameterService, name: str = "pgw1.example") -> CreditControlClient:
    assert svc.address is not None
    return await CreditControlClient(name, "example", "example").connect(*svc.address)


def test_sessions_routed_by_subscriber_and_sticky_across_migration(tmp_path: Path) -> None:
    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        pgw = await client_for(svc)
        a = await pgw.ccr("pgw1;a", dc.CC_INITIAL, (dc.SUB_E164, "+" + MSISDN))
        assert a.u32(dc.RESULT_CODE) == dc.SUCCESS and a.text(dc.ORIGIN_HOST) == "ocs.source.example"
        assert a.text(dc.SESSION_ID) == "pgw1;a"
        b = await pgw.ccr("pgw1;b", dc.CC_INITIAL, (dc.SUB_IMSI, IMSI))
        assert b.text(dc.ORIGIN_HOST) == "ocs.target.example"
        c = await pgw.ccr("pgw1;c", dc.CC_INITIAL, (dc.SUB_SIP_URI, "sip:carol@example"))
        assert c.text(dc.ORIGIN_HOST) == "ocs.source.example"
        store.migrate(["1"], "target")
        # the session opened before the flip stays on the source until it ends
        for kind in (dc.CC_UPDATE, dc.CC_TERMINATE):
            ans = await pgw.ccr("pgw1;a", kind)
            assert ans.text(dc.ORIGIN_HOST) == "ocs.source.example" and ans.u32(dc.RESULT_CODE) == dc.SUCCESS
        d = await pgw.ccr("pgw1;d", dc.CC_INITIAL, (dc.SUB_E164, MSISDN))
        assert d.text(dc.ORIGIN_HOST) == "ocs.target.example"
        assert [e["type"] for e in src.log if e["session"] == "pgw1;a"] == [1, 2, 3]
        first = src.log[0]
        assert first["route_record"] == ["pgw1.example"]
        assert first["destination_realm"] == "source.example" and first["destination_host"] == "ocs.source.example"
        # a Re-Auth-Request from the target reaches the client that owns the session
        raa = await tgt.re_auth("pgw1;d", "pgw1.example", "example")
        assert raa.u32(dc.RESULT_CODE) == dc.SUCCESS and pgw.log == [{"rar": "pgw1;d", "from": "ocs.target.example"}]
        st = svc.status()
        assert st["systems"]["source"]["requests"] == 4 and st["systems"]["target"]["requests"] == 2, st
        assert st["systems"]["source"]["peer"] == "open" and st["sessions"] == 3, st
        # an unknown session without a subscriber goes by store.unknown (source)
        assert (await pgw.ccr("pgw1;zz", dc.CC_UPDATE)).text(dc.ORIGIN_HOST) == "ocs.source.example"
        await pgw.stop()

    run(tmp_path, scenario)


def test_ims_subscribers_named_by_tel_uri_or_nai_reach_their_owner(tmp_path: Path) -> None:
    """An IMS charging client names its subscriber by a SIP or tel URI holding the number
    (END_USER_SIP_URI "tel:+1...", "sip:+1...@ims;user=phone") or by an NAI user@realm:
    they went by store.unknown (the source) though the number or the account is the
    target customer's."""
    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        store.put_customer("4", ["account:dave", "did:15550400"], "target")
        pgw = await client_for(svc)
        for i, sub in enumerate([(dc.SUB_SIP_URI, "tel:+1-555-0400;phone-context=+1"),
                                 (dc.SUB_SIP_URI, "sip:+15550400@ims.example;user=phone"),
                                 (dc.SUB_SIP_URI, "<sips:15550400@ims.example>"),
                                 (dc.SUB_SIP_URI, "sip:dave@ims.example"),
                                 (dc.SUB_E164, "15550400"),
                                 (dc.SUB_NAI, "dave@ims.example")]):
            a = await pgw.ccr(f"pgw1;ims{i}", dc.CC_INITIAL, sub)
            assert a.text(dc.ORIGIN_HOST) == "ocs.target.example", sub
        # a number nobody has still goes by store.unknown, and the source's own stay there
        a = await pgw.ccr("pgw1;other", dc.CC_INITIAL, (dc.SUB_SIP_URI, "tel:+15550999"))
        assert a.text(dc.ORIGIN_HOST) == "ocs.source.example"
        a = await pgw.ccr("pgw1;carol", dc.CC_INITIAL, (dc.SUB_SIP_URI, "tel:+15550300"))
        assert a.text(dc.ORIGIN_HOST) == "ocs.source.example"
        await pgw.stop()

    run(tmp_path, scenario)


def test_a_system_request_for_a_session_dsbc_does_not_know_reaches_the_client_it_names(
        tmp_path: Path) -> None:
    """A Re-Auth-Request (or Abort-Session) into a session this dsbc did not see open (it
    was opened through the node that held the address before keepalived moved it, or
    before a crash) names the PGW in Destination-Host.  That PGW is connected: it gets the
    request, as from any Diameter relay (RFC 6733 6.1.4), not 3002, and the session's
    next requests go to the system that sent it."""
    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        pgw = await client_for(svc)
        raa = await tgt.re_auth("pgw1;elsewhere", "pgw1.example", "example")
        assert raa.u32(dc.RESULT_CODE) == dc.SUCCESS, raa
        assert pgw.log == [{"rar": "pgw1;elsewhere", "from": "ocs.target.example"}]
        ans = await pgw.ccr("pgw1;elsewhere", dc.CC_UPDATE)  # no subscriber: store.unknown is the source
        assert ans.text(dc.ORIGIN_HOST) == "ocs.target.example"
        # a client that is not connected is still 3002, and so is a session of another system's
        raa = await tgt.re_auth("pgw9;x", "pgw9.example", "example")
        assert raa.u32(dc.RESULT_CODE) == dc.UNABLE_TO_DELIVER
        await pgw.ccr("pgw1;mine", dc.CC_INITIAL, (dc.SUB_E164, MSISDN))  # a source session
        raa = await tgt.re_auth("pgw1;mine", "pgw1.example", "example")
        assert raa.u32(dc.RESULT_CODE) == dc.UNABLE_TO_DELIVER
        await pgw.stop()

    run(tmp_path, scenario)


def test_later_requests_of_a_session_opened_through_another_node_follow_its_destination_host(
        tmp_path: Path) -> None:
    """After keepalived moved the address, a PGW's CCR-Update / -Terminate of a session
    opened through the other node (this one never saw it) names the OCS that answered its
    CCR-Initial in Destination-Host (RFC 4006 5.5.1): it goes to that system, not by
    store.unknown (no Subscription-Id: the source) nor by an owner migrated since."""
    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        pgw = await client_for(svc)
        ans = await pgw.ccr("pgw1;old", dc.CC_UPDATE, dest_host="ocs.target.example")
        assert ans.text(dc.ORIGIN_HOST) == "ocs.target.example"
        # its subscriber is a source customer now: the session still lives on the target
        ans = await pgw.ccr("pgw1;old2", dc.CC_UPDATE, (dc.SUB_E164, MSISDN), dest_host="ocs.target.example")
        assert ans.text(dc.ORIGIN_HOST) == "ocs.target.example"
        ans = await pgw.ccr("pgw1;old2", dc.CC_TERMINATE)
        assert ans.text(dc.ORIGIN_HOST) == "ocs.target.example"
        # an initial request goes by its subscriber, whatever OCS the PGW names
        ans = await pgw.ccr("pgw1;new", dc.CC_INITIAL, (dc.SUB_E164, MSISDN), dest_host="ocs.target.example")
        assert ans.text(dc.ORIGIN_HOST) == "ocs.source.example"
        # a Destination-Host that is no system's goes by owner, as before
        ans = await pgw.ccr("pgw1;old3", dc.CC_UPDATE, (dc.SUB_IMSI, IMSI), dest_host="ocs.elsewhere")
        assert ans.text(dc.ORIGIN_HOST) == "ocs.target.example"
        await pgw.stop()

    run(tmp_path, scenario)


def test_peer_down_unable_to_deliver_then_reconnect(tmp_path: Path) -> None:
    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        pgw = await client_for(svc)
        port = src.address[1]
        await src.stop()
        await wait_for(lambda: not svc.links["source"].is_open)
        ans = await pgw.ccr("s1", dc.CC_INITIAL, (dc.SUB_E164, MSISDN))
        assert ans.u32(dc.RESULT_CODE) == dc.UNABLE_TO_DELIVER and ans.flags & dc.FLAG_E
        assert ans.text(dc.ORIGIN_HOST) == "dsbc.example"
        # the target is unaffected
        assert (await pgw.ccr("s2", dc.CC_INITIAL, (dc.SUB_IMSI, IMSI))).u32(dc.RESULT_CODE) == dc.SUCCESS
        src2 = await CreditControlServer("MR100", "ocs.source.example", "source.example").start(port=port)
        try:
            await wait_for(lambda: svc.links["source"].is_open)
            ans = await pgw.ccr("s3", dc.CC_INITIAL, (dc.SUB_E164, MSISDN))
            assert ans.u32(dc.RESULT_CODE) == dc.SUCCESS and ans.text(dc.ORIGIN_HOST) == "ocs.source.example"
            assert svc.status()["systems"]["source"]["link"]["failures"] >= 1
        finally:
            await pgw.stop()
            await src2.stop()

    run(tmp_path, scenario)


@pytest.mark.parametrize("cause", [dc.DISCONNECT_REBOOTING, dc.DISCONNECT_DO_NOT_WANT_TO_TALK_TO_YOU])
def test_a_peers_dpr_cause_sets_the_reconnect_delay(tmp_path: Path, cause: int) -> None:
    """Found by an audit: a system that sent DPR "do not want to talk to you" (or BUSY) was
    called back after reconnect_min; RFC 6733 5.4.3 invites a reconnection only after
    REBOOTING.  The others now wait reconnect_max."""

    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        link = svc.links["source"]
        loop = asyncio.get_running_loop()
        sent = loop.time()
        await src.conns[0].disconnect(cause)
        await wait_for(lambda: not link.is_open and link.next_retry > sent)
        delay = link.next_retry - sent
        assert (delay >= 5.0) == (cause != dc.DISCONNECT_REBOOTING), delay

    run(tmp_path, scenario, reconnect_min=0.05, reconnect_max=30.0)


def test_peer_that_never_answers_cer(tmp_path: Path) -> None:
    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        await wait_for(lambda: svc.links["target"].is_open)
        pgw = await client_for(svc)
        ans = await pgw.ccr("x1", dc.CC_INITIAL, (dc.SUB_E164, MSISDN))
        assert ans.u32(dc.RESULT_CODE) == dc.UNABLE_TO_DELIVER
        await wait_for(lambda: svc.links["source"].failures >= 2, timeout=6)
        assert "capabilities" in svc.links["source"].last_error
        assert (await pgw.ccr("x2", dc.CC_INITIAL, (dc.SUB_IMSI, IMSI))).u32(dc.RESULT_CODE) == dc.SUCCESS
        await pgw.stop()

    run(tmp_path, scenario, src_cer=False, cer_timeout=0.3)


def test_locked_subscriber_held_then_relayed_or_too_busy(tmp_path: Path) -> None:
    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        pgw = await client_for(svc)
        store.lock(["1"], "b1")
        pending = asyncio.ensure_future(pgw.ccr("h1", dc.CC_INITIAL, (dc.SUB_E164, MSISDN)))
        await asyncio.sleep(0.2)
        assert not pending.done()
        store.migrate(["1"], "target")
        assert (await pending).text(dc.ORIGIN_HOST) == "ocs.target.example"
        store.lock(["3"], "b2")
        ans = await pgw.ccr("h2", dc.CC_INITIAL, (dc.SUB_E164, "15550300"))
        assert ans.u32(dc.RESULT_CODE) == dc.TOO_BUSY
        assert svc.status()["held"] == 2
        await pgw.stop()

    run(tmp_path, scenario)


def _raw(hbh: int, avps: bytes, flags: int = 0x80, code: int = dc.CMD_CC, version: int = 1) -> bytes:
    return struct.pack("!IIIII", (version << 24) | (20 + len(avps)), (flags << 24) | code, 4, hbh, hbh) + avps


def test_bad_input_answered_and_dispatcher_alive(tmp_path: Path) -> None:
    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        assert svc.address is not None
        # a request before any CER: 3010 and the connection is closed
        r, w = await asyncio.open_connection(*svc.address)
        w.write(dc.encode(dc.request(dc.CMD_CC, 4, 9, 9, [dc.utf8(dc.SESSION_ID, "n")])))
        ans = dc.decode(await r.read(4096))
        assert ans.u32(dc.RESULT_CODE) == dc.UNKNOWN_PEER and await r.read() == b""
        w.close()
        # after a proper CER: bad AVP length -> 5014, E bit on a request -> 3008, bad group -> 5014
        r, w = await asyncio.open_connection(*svc.address)
        w.write(dc.encode(dc.request(dc.CMD_CE, 0, 1, 1, dc.capabilities("raw.example", "example", ["127.0.0.1"], [4]))))
        assert dc.decode(await r.read(4096)).u32(dc.RESULT_CODE) == dc.SUCCESS
        # (request, result code, the code of the AVP in Failed-AVP: RFC 6733 7.5 says a 5014
        # and a 5005 must name it)
        cases = [
            (_raw(21, struct.pack("!II", 263, 0x40000004)), dc.INVALID_AVP_LENGTH, 263),
            (_raw(22, b"", flags=0xA0), dc.INVALID_HDR_BITS, None),
            (_raw(23, dc.encode_avps([dc.utf8(dc.SESSION_ID, "bad;1"), dc.u32(dc.CC_REQUEST_TYPE, 1),
                                      dc.Avp(dc.SUBSCRIPTION_ID, b"\x00\x00\x01\xc2\x40\x00\x00\x02")])),
             dc.INVALID_AVP_LENGTH, 450),  # the Subscription-Id-Type inside, 2 octets long
            (_raw(26, dc.encode_avps([dc.utf8(dc.SESSION_ID, "bad;2"), dc.Avp(dc.CC_REQUEST_TYPE, b"\x00\x01")])),
             dc.INVALID_AVP_LENGTH, dc.CC_REQUEST_TYPE),  # an Unsigned32 of 2 octets
            (_raw(27, struct.pack("!II", 263, 0x40000008) + b"\x00\x00\x01\x00"), dc.INVALID_AVP_LENGTH, 0x100),  # a header cut short
            (_raw(24, dc.encode_avps([dc.u32(dc.CC_REQUEST_TYPE, 1)])), dc.MISSING_AVP, dc.SESSION_ID),
        ]
        for data, code, failed in cases:
            w.write(data)
            ans = dc.decode(await asyncio.wait_for(r.read(4096), 3))
            assert ans.u32(dc.RESULT_CODE) == code, (ans, code)
            assert ans.hop_by_hop == dc.decode_header(data)[0].hop_by_hop
            assert bool(ans.flags & dc.FLAG_E) == (3000 <= code < 4000)
            fa = ans.find(dc.FAILED_AVP)
            assert [a.code for a in fa.group()] == ([failed] if failed else []) if fa else failed is None, ans
        # a message claiming another version: the stream is off, the connection goes
        w.write(_raw(25, b"", version=2))
        assert await asyncio.wait_for(r.read(), 3) == b""
        w.close()
        # a client that connects and never sends a CER is dropped after cer_timeout
        r, w = await asyncio.open_connection(*svc.address)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        pgw = await client_for(svc)
        assert (await pgw.ccr("ok", dc.CC_INITIAL, (dc.SUB_IMSI, IMSI))).u32(dc.RESULT_CODE) == dc.SUCCESS
        assert svc.status()["bad_messages"] >= 3
        await pgw.stop()

    run(tmp_path, scenario)


def test_shutdown_sends_dpr(tmp_path: Path) -> None:
    store = open_test_store(tmp_path)
    seed(store)

    async def main() -> None:
        src = await CreditControlServer("MR100", "ocs.source.example", "source.example").start()
        cfg = parse_config(config_text(src.address, None))
        svc = await start_diameter(cfg, store)
        await wait_for(lambda: svc.links["source"].is_open)
        pgw = await client_for(svc)
        server_conn = src.conns[0]
        await asyncio.wait_for(svc.stop(), 5)
        await wait_for(lambda: server_conn.closed.done() and pgw.conns == [])
        assert server_conn.close_reason == "peer sent DPR"
        await src.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        store.close()


class SlowServer(CreditControlServer):
    """Answers each request ``delay`` seconds after it came."""

    delay = 0.3

    def on_request(self, conn: Any, msg: dc.Message) -> None:
        asyncio.get_running_loop().call_later(self.delay, super().on_request, conn, msg)


def test_a_stopping_dispatcher_relays_the_answers_in_flight_before_its_dpr(tmp_path: Path) -> None:
    # a SIGHUP reload or a stop while a CCR waits for its answer: the system's CCA still
    # reaches the PGW (before, the DPRs went out at once and the answer was dropped)
    store = open_test_store(tmp_path)
    seed(store)

    async def main() -> None:
        src = await SlowServer("MR100", "ocs.source.example", "source.example").start()
        cfg = parse_config(config_text(src.address, None))
        svc = await start_diameter(cfg, store)
        await wait_for(lambda: svc.links["source"].is_open)
        pgw = await client_for(svc)
        ccr = asyncio.ensure_future(pgw.ccr("pgw1;stop", dc.CC_INITIAL, (dc.SUB_E164, MSISDN)))
        await wait_for(lambda: svc.router.in_flight() == 1)
        await asyncio.wait_for(svc.stop(), 5)
        ans = await asyncio.wait_for(ccr, 2)
        assert ans.u32(dc.RESULT_CODE) == dc.SUCCESS and ans.text(dc.ORIGIN_HOST) == "ocs.source.example"
        await src.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        store.close()


def test_watchdog_keeps_links_open(tmp_path: Path) -> None:
    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        pgw = await client_for(svc)
        first = svc.links["source"].conn
        # idle links get a DWR every interval; the peers' DWAs keep them open
        await wait_for(lambda: all(link.status()["watchdogs_answered"] >= 2 for link in svc.links.values()))
        assert svc.links["source"].conn is first and first is not None and first.state.value == "open"
        # and dsbc watches its clients the same way
        await wait_for(lambda: all(c.watchdogs_answered >= 1 for c in svc.clients.values()))
        ans = await pgw.ccr("w1", dc.CC_INITIAL, (dc.SUB_IMSI, IMSI))
        assert ans.u32(dc.RESULT_CODE) == dc.SUCCESS
        await pgw.stop()

    run(tmp_path, scenario, watchdog_interval=0.2)


def test_a_client_not_in_diameter_clients_gets_3010_and_is_closed(tmp_path: Path) -> None:
    """diameter.clients lists who may connect (RFC 6733 5.3: a CER from an unknown peer is
    answered DIAMETER_UNKNOWN_PEER); a listed client is served as before."""

    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        assert svc.address is not None
        stranger = CreditControlClient("rogue.example", "example", "example")
        with pytest.raises(OSError):  # a CEA with an error result: no open connection (timeout)
            await stranger.connect(*svc.address, timeout=2.0)
        assert svc.status()["refused_peers"] == 1 and src.log == [] and tgt.log == []
        await wait_for(lambda: not svc.clients)  # and dsbc closed the connection
        await stranger.stop()

    run(tmp_path, scenario, clients='["10.0.0.0/8", "192.0.2.7"]')

    async def allowed(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                      store: LocationStore) -> None:
        pgw = await client_for(svc)
        a = await pgw.ccr("pgw1;ok", dc.CC_INITIAL, (dc.SUB_E164, MSISDN))
        assert a.u32(dc.RESULT_CODE) == dc.SUCCESS and svc.status()["refused_peers"] == 0
        await pgw.stop()

    run(tmp_path, allowed, clients='["10.0.0.0/8", "127.0.0.0/8"]')


def test_a_host_that_connects_in_a_loop_cannot_fill_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused CERs and connections closed before their capabilities exchange (garbage, a
    request first) are logged a few times a minute, then counted: one line per connection
    let any host that reaches the port fill the disk."""

    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        assert svc.address is not None
        cer = dc.encode(dc.request(dc.CMD_CE, 0, 1, 1, dc.capabilities("rogue.example", "example", ["127.0.0.1"], [4])))
        garbage = _raw(1, b"", version=2)
        for i in range(60):
            r, w = await asyncio.open_connection(*svc.address)
            w.write(cer if i % 2 else garbage)
            await asyncio.wait_for(r.read(), 3)
            w.close()
        await wait_for(lambda: not svc.clients)
        assert svc.status()["refused_peers"] == 30

    with caplog.at_level("INFO", logger="dsbc.diameter"):
        run(tmp_path, scenario, clients='["10.0.0.0/8", "192.0.2.7"]')
    lines = [r for r in caplog.records if r.name == "dsbc.diameter" and "('127.0.0.1'," in r.getMessage()]
    assert 0 < len(lines) <= 10, [r.getMessage() for r in lines][:20]


def test_diameter_clients_must_be_ips_or_cidrs() -> None:
    from dsbc.config import ConfigError

    with pytest.raises(ConfigError, match=r"diameter.clients.*'pgw1' is not an IP or a CIDR"):
        parse_config(config_text(None, None, clients='["10.0.0.1", "pgw1"]'))


def test_a_successor_binding_at_the_first_chance_finds_the_last_sessions(tmp_path: Path) -> None:
    """A SIGHUP reload: the new worker binds the Diameter port as soon as the old one
    closes it (while the old one still says goodbye to its clients and peers) and loads
    the saved sessions then: they must already hold the old worker's last ones."""
    store = open_test_store(tmp_path)
    seed(store)

    async def main() -> None:
        src = await CreditControlServer("MR100", "ocs.source.example", "source.example").start()
        cfg = parse_config(config_text(src.address, None))
        old = await start_diameter(cfg, store)
        await wait_for(lambda: old.links["source"].is_open)
        pgw = await client_for(old)  # a client to say goodbye to: the stop takes a while
        old.router.load_sessions([["gx;late;1", "source", "pgw1.example", old.loop.time()]])

        async def successor() -> DiameterService:
            while True:  # what the runner does on a reload: bind at the first chance
                try:
                    return await start_diameter(cfg, store)
                except OSError:
                    await asyncio.sleep(0.001)

        new_task = asyncio.ensure_future(successor())
        await asyncio.sleep(0.05)
        await old.stop()
        new = await asyncio.wait_for(new_task, 10)
        try:
            assert "gx;late;1" in new.router.sessions
        finally:
            await new.stop()
            await pgw.close() if hasattr(pgw, "close") else None
            await src.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        store.close()


def test_watchdog_sends_a_dwr_after_each_interval_of_silence() -> None:
    """RFC 3539: Tw restarts on every message from the peer, a DWA included, so an idle link
    gets a DWR every interval (not every other one); a DWR left unanswered for another
    interval closes the connection.  Driven tick by tick with the clock moved by hand."""
    from dsbc.diameter.peer import Connection, ConnState, LocalNode

    class Owner:
        def on_open(self, conn: Connection) -> None: ...
        def on_message(self, conn: Connection, msg: dc.Message) -> None: ...
        def on_closed(self, conn: Connection) -> None: ...

    class Wire:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.sent.append(data)

        def is_closing(self) -> bool:
            return False

        def close(self) -> None: ...

    async def main() -> None:
        conn = Connection(Owner(), LocalNode("dsbc.test", "test", [4]), True, watchdog=5.0)  # type: ignore[arg-type]
        wire = Wire()
        conn.transport = wire  # type: ignore[assignment]
        conn.state = ConnState.OPEN
        loop = asyncio.get_running_loop()
        for _ in range(3):
            conn._last_rx = loop.time() - 5.0  # the last message (a DWA) came one interval ago
            conn._dwr_outstanding = False
            before = len(wire.sent)
            conn._tick()
            assert len(wire.sent) == before + 1 and dc.decode(wire.sent[-1]).code == dc.CMD_DW
        conn._last_rx = loop.time() - 1.0  # heard a second ago: nothing yet
        conn._dwr_outstanding = False
        conn._tick()
        assert len(wire.sent) == 3 and conn.state == ConnState.OPEN
        conn._last_rx = loop.time() - 5.0  # then silent: a DWR, and silent again: closed
        conn._tick()
        conn._last_rx = loop.time() - 10.0
        conn._tick()
        assert len(wire.sent) == 4 and conn.close_reason == "watchdog: no answer to DWR"
        if conn._timer is not None:
            conn._timer.cancel()

    asyncio.run(main())


def test_a_dpr_with_a_malformed_disconnect_cause_still_gets_its_dpa(tmp_path: Path) -> None:
    """Review (rev-aaa): reading the cause of a peer's DPR must not turn a DPR whose
    Disconnect-Cause is not 4 octets into an error answer on a link left open."""

    async def scenario(svc: DiameterService, src: CreditControlServer, tgt: CreditControlServer,
                       store: LocationStore) -> None:
        link = svc.links["source"]
        conn = src.conns[0]
        conn._dpa = asyncio.get_running_loop().create_future()
        conn.send_request(dc.CMD_DP, dc.APP_COMMON, [dc.utf8(dc.ORIGIN_HOST, conn.node.origin_host),
                                                     dc.utf8(dc.ORIGIN_REALM, conn.node.origin_realm),
                                                     dc.Avp(dc.DISCONNECT_CAUSE, b"\x00\x01")])
        await asyncio.wait_for(conn._dpa, 2.0)  # an answer (before the fix: 5014, link kept open)
        await wait_for(lambda: link.conn is None or link.conn.close_reason == "peer sent DPR")

    run(tmp_path, scenario)


def test_a_link_stopped_as_its_connection_completes_does_not_hang_the_stop() -> None:
    """A reload or stop while a system's link is connecting: Python 3.11's wait_for returns
    the new connection instead of the cancellation when both happen at once; the link must
    still close it and end (the stop of a worker used to wait forever)."""
    from dsbc.diameter.peer import LocalNode, PeerLink

    class Owner:
        def on_open(self, conn: Any) -> None: ...
        def on_message(self, conn: Any, msg: Any) -> None: ...
        def on_closed(self, conn: Any) -> None: ...

    async def main() -> None:
        server = await CreditControlServer("MR100", "ocs.source.example", "source.example").start()
        loop = asyncio.get_running_loop()
        link = PeerLink(Owner(), LocalNode("dsbc.test", "test", [4]), "source", *server.address)  # type: ignore[arg-type]
        real = loop.create_connection
        stops: list[asyncio.Future[None]] = []

        async def connect_then_stop(*args: Any, **kw: Any) -> Any:
            made = await real(*args, **kw)
            loop.call_soon(lambda: stops.append(asyncio.ensure_future(link.stop())))
            return made

        loop.create_connection = connect_then_stop  # type: ignore[method-assign]
        try:
            link.start()
            await wait_for(lambda: bool(stops))
            await asyncio.wait_for(stops[0], 5)
            assert link.conn is None or link.conn.state.value in ("closing", "closed")
        finally:
            loop.create_connection = real  # type: ignore[method-assign]
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_client_told_to_reconnect_at_a_reload_finds_the_successor_listening(tmp_path: Path) -> None:
    """Found by the soak: on a SIGHUP reload the replaced worker closed its Diameter
    listener and at once sent DPR (REBOOTING) to its clients; a PGW reconnects at once,
    while the new worker, which retries the port every 0.1 s (runner._start_optional), was
    not listening yet: connection refused, and a real PGW then waits its Tc timer (30 s)
    with no credit control.  Now a worker being replaced (``handover``) waits, a bounded
    time, for its successor to listen before it says goodbye."""
    from dsbc.diameter.peer import ConnState

    store = open_test_store(tmp_path)
    seed(store)

    async def main() -> None:
        src = await CreditControlServer("MR100", "ocs.source.example", "source.example").start()
        cfg = parse_config(config_text(src.address, None))
        old = await start_diameter(cfg, store)
        await wait_for(lambda: old.links["source"].is_open)
        pgw = await client_for(old)
        assert old.address is not None

        async def successor() -> DiameterService:
            while True:  # the runner's pace (_start_optional)
                try:
                    return await start_diameter(cfg, store)
                except OSError:
                    await asyncio.sleep(0.1)

        old.handover = True  # what the worker sets when the master replaces it
        new_task = asyncio.ensure_future(successor())
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(old.stop())
        await wait_for(lambda: not any(c.state == ConnState.OPEN for c in pgw.conns), 10)
        again = CreditControlClient("pgw1.example", "example", "example")
        try:
            await again.connect(*old.address)  # at once, as a PGW told REBOOTING does
        finally:
            await stopping
            new = await asyncio.wait_for(new_task, 10)
            await again.stop()
            await new.stop()
            await src.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        store.close()


WILDCARD_PROBE = """
import asyncio, sys
from dsbc.config import parse_config
from dsbc.diameter import start_diameter
from dsbc.emulator.diameter_peer import CreditControlClient
from tests.test_radius_core import open_test_store
from pathlib import Path

async def main():
    store = open_test_store(Path(sys.argv[1]))
    cfg = parse_config('[diameter]\\nenabled = true\\nlisten = "[::]:3868"\\nclients = ["127.0.0.1", "::1"]\\n')
    svc = await start_diameter(cfg, store)
    try:
        for host in ("127.0.0.1", "::1"):
            try:
                client = await CreditControlClient("pgw.example", "example", "example").connect(host, 3868, timeout=3)
                print(host, "open")
                await client.stop()
            except OSError as exc:
                print(host, "error", exc.strerror or exc)
    finally:
        await svc.stop()
        store.close()

asyncio.run(asyncio.wait_for(main(), 30))
"""


def test_a_wildcard_listener_takes_ipv4_clients_too(tmp_path: Path) -> None:
    """``listen = "[::]:3868"`` listened on IPv6 only (asyncio sets IPV6_V6ONLY), where SIP's
    and RADIUS's ``[::]`` take both families and the service answers an IPv4 client of a
    dual-stack listener with its IPv4 address: every IPv4 PGW was refused (found by an
    audit).  Run in a network namespace of its own (a wildcard bind)."""
    import os
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root and unshare(1) for a network namespace")
    (tmp_path / "probe.py").write_text(WILDCARD_PROBE)
    try:
        proc = subprocess.run(["unshare", "-n", "bash", "-c",
                               f"ip link set lo up; PYTHONPATH=. {sys.executable} {tmp_path}/probe.py {tmp_path}"],
                              capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[1], check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the namespace run did not end")
    if "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip(f"no network namespace here: {proc.stderr.strip()}")
    assert proc.stdout.splitlines() == ["127.0.0.1 open", "::1 open"], (proc.stdout, proc.stderr)
