"""The peer harnesses proven against a real Kamailio, before dsbc sits in between.

Kamailio plays a back-end SIP system, pjsua2 phones and sipp play phones and carriers.
Every test is bounded in time; the whole file runs in well under a minute.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers.kamailio import Kamailio
from tests.peers.nat import UdpNat
from tests.peers.net import (
    free_port,
    is_bound,
    loopback_alias_works,
    sip_options,
    wait_port,
    wait_port_closed,
)
from tests.peers.phone import CallFailed, PhoneError, pjsua2_available
from tests.peers.proc import find_binary
from tests.peers.sipmsg import parse_message
from tests.peers.sipp import SippServer, run_sipp

pytestmark = [pytest.mark.peers, pytest.mark.timeout(60)]

needs_kamailio = pytest.mark.skipif(
    find_binary("kamailio") is None, reason="kamailio is not installed (apt-get install kamailio)"
)
needs_sipp = pytest.mark.skipif(
    find_binary("sipp") is None, reason="sipp is not installed (apt-get install sip-tester)"
)
needs_pjsua2 = pytest.mark.skipif(
    not pjsua2_available(), reason="pjsua2 is not installed (pip install pjsua2-python)"
)

DID = "15550001001"
Factory = Callable[..., Any]


# -- net -------------------------------------------------------------------------------
def test_free_port_is_free_for_udp_and_tcp() -> None:
    port = free_port("both", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
        u.bind(("127.0.0.1", port))
        t.bind(("127.0.0.1", port))
        assert is_bound("127.0.0.1", port, "udp")
        assert not is_bound("127.0.0.1", port, "tcp")  # bound, not listening
        t.listen()
        wait_port("127.0.0.1", port, "tcp", timeout=1)
    wait_port_closed("127.0.0.1", port, "udp", timeout=1)


def test_loopback_alias() -> None:
    assert loopback_alias_works("127.0.0.1")
    if not loopback_alias_works("127.0.0.2"):
        pytest.skip("no 127.0.0.2 on this host (Linux has the whole 127/8)")


# -- Kamailio --------------------------------------------------------------------------
@needs_kamailio
def test_two_kamailio_side_by_side(kamailio_factory: Factory) -> None:
    source = kamailio_factory("source", dids={DID: "1001"})
    target = kamailio_factory("target", listen_ip="127.0.0.5", tcp=False)
    assert source.port != target.port or source.ip != target.ip
    for k in (source, target):
        for proto in ("udp", "tcp") if k.tcp else ("udp",):
            reply = sip_options(k.ip, k.port, proto)
            assert reply is not None and reply.startswith("SIP/2.0 200"), (k, proto)
            assert parse_message(reply).get("X-System") == k.name
    assert not is_bound(target.ip, target.port, "tcp")
    assert [r["method"] for r in source.requests("OPTIONS")][-2:] == ["OPTIONS", "OPTIONS"]


@needs_kamailio
@needs_pjsua2
def test_call_between_systems_through_outbound(
    kamailio_factory: Factory, phone_factory: Factory
) -> None:
    """A user that is not on `source` is handed to its outbound peer (here: `target`)."""
    target = kamailio_factory("target", listen_ip="127.0.0.5")
    source = kamailio_factory("source", outbound=target.addr)
    alice = phone_factory("1001", *source.addr)
    bob = phone_factory("2002", *target.addr, bind_ip="127.0.0.3")
    assert alice.register() == 200 and bob.register() == 200
    assert source.registered("2002") == [] and target.registered("1001") == []

    call = alice.call("2002", timeout=5)
    incoming = bob.wait_incoming_call(timeout=5)
    assert bob.received_invite(incoming).all("X-System") == ["source", "target"]
    assert alice.hangup(call) == 200
    bob.wait_call_state(incoming, "DISCONNECTED", timeout=5)
    with pytest.raises(CallFailed) as failed:  # unknown on both: target answers 404
        alice.call("3003", timeout=5)
    assert failed.value.status == 404


@needs_kamailio
def test_kamailio_stop_leaves_no_process(tmp_workdir: Path) -> None:
    k = Kamailio("lonely", workdir=tmp_workdir / "k").start()
    assert k.proc is not None
    pgid = k.proc.pid
    k.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert not is_bound(k.ip, k.port or 0, "udp")


@needs_kamailio
def test_kamailio_rejects_bad_listen_address() -> None:
    with pytest.raises(ValueError, match="loopback"):
        Kamailio("x", listen_ip="10.0.0.1")


# -- pjsua2 phones on Kamailio ---------------------------------------------------------
@needs_kamailio
@needs_pjsua2
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_phone_registers(kamailio_factory: Factory, phone_factory: Factory, transport: str) -> None:
    k = kamailio_factory("source")
    phone = phone_factory("1001", *k.addr, transport=transport)
    assert phone.register(expires=120) == 200
    contacts = k.wait_registered("1001")
    assert len(contacts) == 1
    assert contacts[0].startswith(f"sip:1001@{phone.bind_ip}:")
    assert ("transport=tcp" in contacts[0].lower()) == (transport == "tcp")
    reply = phone.last_register_response()
    assert reply is not None and reply.status == 200
    assert reply.get("X-System") == "source"
    assert k.register_log()[-1]["aor"].startswith(f"sip:1001@{k.ip}")
    assert phone.unregister() == 200
    k.wait_registered("1001", count=0)


@needs_kamailio
@needs_pjsua2
def test_phone_to_phone_call_reinvite_and_bye(
    kamailio_factory: Factory, phone_factory: Factory
) -> None:
    k = kamailio_factory("source")
    alice = phone_factory("1001", *k.addr)
    bob = phone_factory("1002", *k.addr, transport="tcp", bind_ip="127.0.0.3")
    assert alice.register() == 200 and bob.register() == 200

    call = alice.call("1002", timeout=5)
    incoming = bob.wait_incoming_call(timeout=5)
    assert bob.wait_call_state(incoming, "CONFIRMED", timeout=5) == "CONFIRMED"
    invite = bob.received_invite(incoming)
    assert invite.get("X-System") == "source"
    assert invite.get("Record-Route") is not None
    assert alice.reinvite(call) == 200
    assert alice.hangup(call) == 200
    assert bob.wait_call_state(incoming, "DISCONNECTED", timeout=5) == "DISCONNECTED"
    assert [m.method for m in bob.received_messages(incoming) if m.is_request][-1] == "BYE"

    call = alice.call("1002", timeout=5)  # now the callee hangs up
    incoming = bob.wait_incoming_call(timeout=5)
    bob.wait_call_state(incoming, "CONFIRMED", timeout=5)
    assert bob.hangup(incoming) == 200
    alice.wait_call_state(call, "DISCONNECTED", timeout=5)

    with pytest.raises(CallFailed) as failed:
        alice.call("9999", timeout=5)
    assert failed.value.status == 404


@needs_kamailio
@needs_pjsua2
def test_dead_phone_agent_raises_instead_of_hanging(
    kamailio_factory: Factory, phone_factory: Factory
) -> None:
    k = kamailio_factory("source")
    phone = phone_factory("1001", *k.addr)
    assert phone.proc is not None
    phone.proc.send_signal(signal.SIGKILL)
    with pytest.raises(PhoneError, match="exit"):
        phone.register(timeout=2)


# -- sipp ------------------------------------------------------------------------------
@needs_kamailio
@needs_sipp
@needs_pjsua2
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_carrier_calls_did_and_phone_answers(
    kamailio_factory: Factory, phone_factory: Factory, tmp_workdir: Path, transport: str
) -> None:
    k = kamailio_factory("source", dids={DID: "1001"})
    phone = phone_factory("1001", *k.addr, transport=transport)
    assert phone.register() == 200

    res = run_sipp(
        "uac_call_to_did",
        k.addr,
        transport="u1" if transport == "udp" else "t1",
        service=DID,
        keys={"caller": "15557654321"},
        duration_ms=200,
        timeout=10,
        workdir=tmp_workdir,
    )
    assert res.ok, res.report()
    assert res.successful == 1
    ok = parse_message(res.received("SIP/2.0 200")[0])
    assert ok.get("X-System") == "source"  # relayed replies carry it too

    call = phone.wait_incoming_call(timeout=5)
    invite = phone.received_invite(call)
    assert invite.start_line.startswith("INVITE sip:1001@")  # DID rewritten to the account
    assert invite.get("X-System") == "source"
    assert "15557654321" in (invite.get("From") or "")
    phone.wait_call_state(call, "DISCONNECTED", timeout=5)  # sipp's BYE arrived
    assert [r["ruri"].split("@")[0] for r in k.requests("INVITE")] == [f"sip:{DID}"]


@needs_kamailio
@needs_sipp
def test_sipp_register_uac_and_uas(kamailio_factory: Factory, tmp_workdir: Path) -> None:
    k = kamailio_factory("target")
    with SippServer("uas_answer", local_ip="127.0.0.3", workdir=tmp_workdir) as uas:
        reg = run_sipp(
            "register",
            k.addr,
            service="2001",
            keys={"contact_hostport": f"{uas.addr[0]}:{uas.addr[1]}", "expires": "60"},
            timeout=5,
            workdir=tmp_workdir,
        )
        assert reg.ok, reg.report()
        assert parse_message(reg.received("SIP/2.0 200")[0]).get("X-System") == "target"
        assert k.registered("2001") == [uas.contact("2001") + ";transport=UDP"]

        call = run_sipp("uac_call", k.addr, service="2001", timeout=5, workdir=tmp_workdir)
        assert call.ok, call.report()
        options = run_sipp("options", k.addr, timeout=5, workdir=tmp_workdir)
        assert options.ok, options.report()
    assert uas.result is not None and uas.result.successful == 1, uas.result_report()
    assert uas.result.received("INVITE")[0].count("Via:") == 2


@needs_sipp
def test_sipp_run_is_bounded_when_nobody_answers(tmp_workdir: Path) -> None:
    silent = ("127.0.0.1", free_port("udp"))
    started = time.monotonic()
    res = run_sipp("options", silent, timeout=1, workdir=tmp_workdir)
    assert time.monotonic() - started < 5
    assert not res.ok and res.timed_out
    assert "OPTIONS sip:" in res.messages


@needs_kamailio
@needs_sipp
@needs_pjsua2
def test_cancel_reaches_ringing_phone(
    kamailio_factory: Factory, phone_factory: Factory, tmp_workdir: Path
) -> None:
    k = kamailio_factory("source")
    phone = phone_factory("1001", *k.addr, auto_answer=None)  # rings, never answers
    assert phone.register() == 200
    res = run_sipp("uac_cancel", k.addr, service="1001", timeout=10, workdir=tmp_workdir)
    assert res.ok, res.report()
    call = phone.wait_incoming_call(timeout=5)
    with pytest.raises(CallFailed):  # ended by the CANCEL before it was ever confirmed
        phone.wait_call_state(call, "CONFIRMED", timeout=5)
    assert phone.call_info(call)["state"] == "DISCONNECTED"
    requests = [m.method for m in phone.received_messages(call) if m.is_request]
    assert requests[:2] == ["INVITE", "CANCEL"]  # then the ACK of the 487, hop by hop


@needs_kamailio
@needs_sipp
def test_path_registration_routes_calls_through_the_path(
    kamailio_factory: Factory, tmp_workdir: Path
) -> None:
    """What dsbc relies on: a REGISTER relayed with Path makes calls come back via Path."""
    k = kamailio_factory("source", dids={DID: "1005"})
    with SippServer("uas_answer", local_ip="127.0.0.6", workdir=tmp_workdir) as edge:
        path = f"<sip:{edge.addr[0]}:{edge.addr[1]};lr;flow=abc>"
        reg = run_sipp(
            REGISTER_WITH_PATH.replace("@PATH@", path),
            k.addr,
            service="1005",
            keys={"contact_hostport": "127.0.0.7:9"},  # the phone itself: never reached
            timeout=5,
            workdir=tmp_workdir,
        )
        assert reg.ok, reg.report()
        assert parse_message(reg.received("SIP/2.0 200")[0]).get("Path") == path
        assert k.registrations("1005")[0]["Path"] == path

        res = run_sipp("uac_call_to_did", k.addr, service=DID, timeout=5, workdir=tmp_workdir)
        assert res.ok, res.report()
    assert edge.result is not None and edge.result.successful == 1, edge.result_report()
    invite = parse_message(edge.result.received("INVITE")[0])
    assert invite.start_line == "INVITE sip:1005@127.0.0.7:9;transport=UDP SIP/2.0"
    assert invite.get("Route") == path


REGISTER_WITH_PATH = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="register with Path">
  <send retrans="500"><![CDATA[
      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      Max-Forwards: 70
      From: <sip:[service]@[remote_ip]:[remote_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: [cseq] REGISTER
      Supported: path
      Path: @PATH@
      Contact: <sip:[service]@[contact_hostport];transport=[transport]>
      Expires: 60
      Content-Length: 0

  ]]></send>
  <recv response="200"/>
</scenario>
"""


# -- NAT -------------------------------------------------------------------------------
@needs_kamailio
@needs_sipp
@needs_pjsua2
def test_phone_behind_nat_registers_and_receives_calls(
    kamailio_factory: Factory, phone_factory: Factory, tmp_workdir: Path
) -> None:
    k = kamailio_factory("source", dids={DID: "1001"})
    with UdpNat(server=k.addr) as nat:
        phone = phone_factory("1001", *nat.inside_addr)
        assert phone.register() == 200
        reg = k.registrations("1001")[0]
        assert reg["Address"].startswith(f"sip:1001@{phone.bind_ip}:{phone.local_addr[1]}")
        assert reg["Received"] == "sip:{}:{}".format(*nat.outside_addr)  # the NAT, not the phone

        inbound = nat.to_phone
        res = run_sipp("uac_call_to_did", k.addr, service=DID, timeout=5, workdir=tmp_workdir)
        assert res.ok, res.report()
        phone.wait_incoming_call(timeout=5)
        assert nat.to_phone > inbound  # the INVITE came in through the NAT

        old = nat.outside_addr
        assert nat.rebind() != old
        assert phone.register() == 200  # a new binding, as after a NAT timeout
        assert k.registrations("1001")[0]["Received"] == "sip:{}:{}".format(*nat.outside_addr)
