"""The SIP dispatcher end to end: pjsua2 phones and sipp carriers, dsbc, two Kamailio systems.

Phones live on 127.0.0.2/3/4 and carriers on 127.0.0.5, so dsbc tells them from the
systems' nodes (127.0.0.1:<kamailio port>) by IP and port, as SPEC section 6 says.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers.nat import UdpNat
from tests.peers.proc import find_binary
from tests.peers.sipmsg import parse_message
from tests.peers.sipp import run_sipp

pytestmark = [
    pytest.mark.peers,
    pytest.mark.timeout(120),
    pytest.mark.skipif(find_binary("kamailio") is None, reason="kamailio is not installed"),
]

Factory = Callable[..., Any]
DID_A = "15550001001"
DID_B = "15550001002"
CARRIER_IP = "127.0.0.5"

CUSTOMERS = [
    {"customer_id": "100", "identities": ["account:1001", f"did:+{DID_A}"], "system": "source"},
    {"customer_id": "200", "identities": ["account:1002", f"did:{DID_B}"], "system": "source"},
    {"customer_id": "300", "identities": ["account:3003"], "system": "target"},
]


def systems(kamailio_factory: Factory, target_nodes: int = 1) -> tuple[Any, list[Any]]:
    dids = {DID_A: "1001", DID_B: "1002"}
    source = kamailio_factory("source", dids=dids, extra_trusted=["127.0.0.1"])
    targets = [
        kamailio_factory(f"target{i}" if i else "target", dids=dids, extra_trusted=["127.0.0.1"])
        for i in range(target_nodes)
    ]
    return source, targets


def start_dsbc(dsbc_factory: Factory, source: Any, targets: list[Any], **kw: Any) -> Any:
    d = dsbc_factory(
        source=[f"udp:{source.ip}:{source.port}"],
        target=[f"udp:{t.ip}:{t.port}" for t in targets],
        customers=CUSTOMERS,
        trusted=[CARRIER_IP],
        **kw,
    )
    d.wait_nodes_up()
    return d


def cli_background(d: Any, *args: str) -> subprocess.Popen[str]:
    """A `dsbc` command against `d`'s config, running while the test goes on."""
    return subprocess.Popen(
        [sys.executable, "-m", "dsbc.cli", "-c", str(d.config_path), *args],
        env=d.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_locked(d: Any, identity: str, timeout: float = 15.0) -> None:
    """Until `dsbc where` says the identity's customer is locked (a batch in flight)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = d.cli("where", identity, check=False).stdout
        if "locked" in out:
            return
        time.sleep(0.05)
    raise AssertionError(f"{identity} never became locked")


def carrier_call(d: Any, did: str, workdir: Path, transport: str = "udp", hold_ms: int = 300) -> Any:
    return run_sipp(
        "uac_call_to_did",
        d.sip_addr,
        local_ip=CARRIER_IP,
        transport="u1" if transport == "udp" else "t1",
        service=did,
        keys={"caller": "15557654321"},
        duration_ms=hold_ms,
        timeout=15,
        workdir=workdir,
    )


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_register_follows_migration_and_did_calls_reach_the_phone(
    kamailio_factory: Factory, phone_factory: Factory, dsbc_factory: Factory, tmp_workdir: Path, transport: str
) -> None:
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target])
    phone = phone_factory("1001", *d.sip_addr, transport=transport)

    assert phone.register(expires=300) == 200
    assert phone.last_register_response_headers().get("x-system") == ["source"]
    contacts = source.wait_registered("1001")
    assert target.registered("1001") == []
    path = source.registrations("1001")[0].get("Path", "")
    assert d.hostport in path and "ft=" in path  # calls come back through dsbc's flow

    # a carrier calls the customer's number: source system, then back out to the phone
    res = carrier_call(d, DID_A, tmp_workdir, transport)
    assert res.ok, res.report()
    call = phone.wait_incoming_call(timeout=5)
    invite = phone.received_invite(call)
    assert invite.get("X-System") == "source"
    phone.wait_call_state(call, "DISCONNECTED", timeout=5)

    # migrate: the next REGISTER lands on the target, and so do calls to the DID
    out = d.cli("migrate", "--customer", "100", "--to", "target")
    assert "moved 1" in (out.stdout + out.stderr)
    time.sleep(0.3)
    assert phone.register(expires=300) == 200
    assert phone.last_register_response_headers().get("x-system") == ["target"]
    target.wait_registered("1001")
    assert contacts  # registered on the source before

    res = carrier_call(d, f"+{DID_A}", tmp_workdir, transport)
    assert res.ok, res.report()
    call = phone.wait_incoming_call(timeout=5)
    assert phone.received_invite(call).get("X-System") == "target"
    phone.wait_call_state(call, "DISCONNECTED", timeout=5)
    assert [r["ruri"].split("@")[0] for r in target.requests("INVITE")][-1].endswith(DID_A)

    # what happened is in the metrics, by system and method
    time.sleep(1.2)  # workers write their counters once a second
    status, metrics = d.control("GET", "/metrics", token=None)
    assert status == 200
    assert 'dsbc_sip_routed_total{method="REGISTER",system="source"}' in metrics
    assert 'dsbc_sip_routed_total{method="INVITE",system="target"}' in metrics


def test_call_in_progress_survives_migration(
    kamailio_factory: Factory, phone_factory: Factory, dsbc_factory: Factory
) -> None:
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target])
    alice = phone_factory("1001", *d.sip_addr)
    bob = phone_factory("1002", *d.sip_addr, transport="tcp", bind_ip="127.0.0.3")
    assert alice.register() == 200 and bob.register() == 200

    call = alice.call("1002", timeout=8)
    incoming = bob.wait_incoming_call(timeout=5)
    bob.wait_call_state(incoming, "CONFIRMED", timeout=5)
    assert bob.received_invite(incoming).get("X-System") == "source"

    d.cli("migrate", "--customer", "100", "--customer", "200", "--to", "target")
    time.sleep(0.3)
    # both sides keep talking to the system where the dialog started
    assert alice.reinvite(call) == 200
    assert bob.reinvite(incoming) == 200
    reinvites = [r for r in source.requests("INVITE")]
    assert len(reinvites) >= 3
    assert target.requests("INVITE") == []
    assert bob.hangup(incoming) == 200
    alice.wait_call_state(call, "DISCONNECTED", timeout=5)
    assert source.requests("BYE"), "the BYE went through the source system"

    # a new call after the flip starts on the target (both re-register there first)
    assert alice.register() == 200 and bob.register() == 200
    call = alice.call("1002", timeout=8)
    incoming = bob.wait_incoming_call(timeout=5)
    assert bob.received_invite(incoming).get("X-System") == "target"
    assert alice.hangup(call) == 200


def test_cancel_after_flip_follows_its_invite(
    kamailio_factory: Factory, phone_factory: Factory, dsbc_factory: Factory, tmp_workdir: Path
) -> None:
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target])
    phone = phone_factory("1001", *d.sip_addr, auto_answer=None)
    assert phone.register() == 200
    # the carrier calls, the phone rings; the customer moves; the carrier gives up
    result: dict[str, Any] = {}

    def ring() -> None:
        result["res"] = run_sipp(
            "uac_cancel",
            d.sip_addr,
            local_ip=CARRIER_IP,
            service=DID_A,
            keys={"caller": "15557654321"},
            duration_ms=2000,
            timeout=15,
            workdir=tmp_workdir,
        )

    t = threading.Thread(target=ring)
    t.start()
    phone.wait_incoming_call(timeout=5)
    d.cli("migrate", "--customer", "100", "--to", "target")
    t.join(20)
    res = result["res"]
    assert res.ok, res.report()
    assert len(source.requests("CANCEL")) == 1
    assert target.requests("CANCEL") == [] and target.requests("INVITE") == []


def test_natted_phone_gets_its_calls(
    kamailio_factory: Factory, phone_factory: Factory, dsbc_factory: Factory, tmp_workdir: Path
) -> None:
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target])
    with UdpNat(d.sip_addr, inside_ip="127.0.0.1", outside_ip="127.0.0.4") as nat:
        phone = phone_factory("1001", *nat.inside_addr, bind_ip="127.0.0.2")
        assert phone.register() == 200
        reg = source.registrations("1001")[0]
        assert "127.0.0.2" in reg["Address"]  # the Contact says the phone's private address
        res = carrier_call(d, DID_A, tmp_workdir)
        assert res.ok, res.report()
        call = phone.wait_incoming_call(timeout=5)
        phone.wait_call_state(call, "DISCONNECTED", timeout=5)
        assert nat.to_phone > 0  # the INVITE went to the NAT's public side


def test_failover_within_the_owning_system(
    kamailio_factory: Factory, dsbc_factory: Factory, tmp_workdir: Path
) -> None:
    source, targets = systems(kamailio_factory, target_nodes=2)
    d = start_dsbc(dsbc_factory, source, targets)

    def register(user: str) -> Any:
        return run_sipp(
            "register", d.sip_addr, local_ip="127.0.0.2", service=user,
            keys={"contact_hostport": "127.0.0.2:5999", "expires": "60"}, timeout=8, workdir=tmp_workdir,
        )  # fmt: skip

    assert register("3003").ok
    assert targets[0].registered("3003") and not targets[1].registered("3003")
    targets[0].stop()
    time.sleep(1.5)  # a missed OPTIONS ping marks the node down
    res = register("3003")
    assert res.ok, res.report()
    assert targets[1].registered("3003")
    assert source.registered("3003") == []  # never the other system
    targets[1].stop()
    time.sleep(1.5)
    res = register("3003")
    assert not res.ok
    assert any(m.startswith("SIP/2.0 503") for m in res.messages.split("\n\n")) or "503" in res.messages
    reply = parse_message(res.received("SIP/2.0 503")[0])
    assert reply.get("Retry-After")


def phone_of_a_locked_customer(
    kamailio_factory: Factory, phone_factory: Factory, dsbc_factory: Factory, lock_hold: float, lock_for: float
) -> tuple[Any, Any, Any, Any, subprocess.Popen[str]]:
    """Customer 100 (phone 1001) in a batch that stays locked for `lock_for` seconds."""
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target], lock_hold=lock_hold)
    phone = phone_factory("1001", *d.sip_addr)
    mig = cli_background(d, "migrate", "--customer", "100", "--to", "target", "--lock-for", str(lock_for))
    wait_locked(d, "account:1001")
    time.sleep(0.3)  # the workers see the lock within store.poll_interval (0.1 s here)
    return source, target, d, phone, mig


def test_locked_customer_is_held_then_relayed_to_new_system(
    kamailio_factory: Factory, phone_factory: Factory, dsbc_factory: Factory
) -> None:
    source, _, d, phone, mig = phone_of_a_locked_customer(
        kamailio_factory, phone_factory, dsbc_factory, lock_hold=3.0, lock_for=2
    )
    started = time.monotonic()
    assert phone.register(timeout=8) == 200
    waited = time.monotonic() - started
    mig.communicate(timeout=20)
    assert mig.returncode == 0
    assert phone.last_register_response_headers().get("x-system") == ["target"]
    assert source.registered("1001") == []
    assert waited < 3.5  # held, not refused: lock_hold is 3 s
    assert d.counters().get("held", 0) >= 1


def test_lock_outlasting_the_hold_gets_503(
    kamailio_factory: Factory, phone_factory: Factory, dsbc_factory: Factory
) -> None:
    source, target, _, phone, mig = phone_of_a_locked_customer(
        kamailio_factory, phone_factory, dsbc_factory, lock_hold=0.5, lock_for=5
    )
    try:
        status = phone.register(timeout=5)
    finally:
        mig.communicate(timeout=20)
    assert status == 503  # only a lock that outlasts store.lock_hold is refused
    assert source.registered("1001") == [] and target.registered("1001") == []


def test_prepare_caps_expiry_and_wait_registrations_sees_the_phone_move(
    kamailio_factory: Factory, phone_factory: Factory, dsbc_factory: Factory
) -> None:
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target], migration_expires=45)
    phone = phone_factory("1001", *d.sip_addr)
    assert phone.register(expires=600) == 200
    granted = phone.last_register_response_headers().get("contact", [""])[0]
    assert "expires=600" in granted

    out = d.cli("migrate", "--customer", "100", "--prepare")
    assert "45" in out.stdout + out.stderr
    time.sleep(0.4)  # every worker sees the cap
    assert phone.register(expires=600) == 200
    headers = phone.last_register_response_headers()
    assert "expires=45" in headers.get("contact", [""])[0], headers
    assert headers.get("x-system") == ["source"]
    time.sleep(1.5)  # the workers write the registrations they relayed once a second

    mig = cli_background(d, "migrate", "--customer", "100", "--to", "target", "--wait-registrations", "--timeout", "20")
    time.sleep(1.0)
    assert phone.register(expires=600) == 200  # the phone re-registers when its 45 s end
    assert phone.last_register_response_headers().get("x-system") == ["target"]
    stdout, stderr = mig.communicate(timeout=30)
    assert mig.returncode == 0, stdout + stderr
    assert "all 1 phones registered on target" in stdout + stderr


def test_regression_prepare_keeps_counting_the_phones_that_did_not_re_register_yet(
    kamailio_factory: Factory, phone_factory: Factory, dsbc_factory: Factory
) -> None:
    """Found by an audit: two phones of one account registered for 600 s; after `--prepare`
    the desk phone re-registered (capped) and the source's 200 listed the mobile's binding
    too, which dsbc recorded at the cap as well.  Once the cap passed, the mobile (still on
    the source for ten minutes) was no longer counted: the flip said "0/1 phones" and
    --wait-registrations finished without it, and a new --prepare said to wait 4 s."""
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target], migration_expires=4)
    desk = phone_factory("1001", *d.sip_addr, bind_ip="127.0.0.2")
    mobile = phone_factory("1001", *d.sip_addr, bind_ip="127.0.0.3")
    assert desk.register(expires=600) == 200 and mobile.register(expires=600) == 200
    source.wait_registered("1001", count=2)
    time.sleep(1.5)  # the workers write the registrations they relayed once a second
    d.cli("migrate", "--customer", "100", "--prepare")
    time.sleep(0.4)  # every worker sees the cap
    assert desk.register(expires=600) == 200
    assert "expires=4" in desk.last_register_response_headers().get("contact", [""])[0]
    time.sleep(5.5)  # past the cap: the mobile's binding on the source has ~595 s to go
    out = d.cli("migrate", "--customer", "100", "--prepare").stdout
    assert "wait 59" in out, out  # the mobile re-registers with the cap within its 600 s
    assert desk.register(expires=600) == 200  # (a real phone renews by itself within the cap)
    time.sleep(1.5)
    out = d.cli("migrate", "--customer", "100", "--to", "target").stdout
    assert "registered on target: 0/2 phones" in out, out


def test_regression_outbound_phone_over_tcp_registers_with_a_registrar_that_supports_outbound(
    kamailio_factory: Factory, dsbc_factory: Factory
) -> None:
    """Found by an audit: an RFC 5626 phone (+sip.instance, reg-id, Supported: outbound)
    registering over TCP got 439 First Hop Lacks Outbound Support from a Kamailio registrar
    with outbound_mode 1: dsbc's Path had no ";ob".  It registers, and its calls come back
    over its connection."""
    source = kamailio_factory("source", extra_trusted=["127.0.0.1"], outbound_mode=1)
    target = kamailio_factory("target", extra_trusted=["127.0.0.1"], outbound_mode=1)
    d = start_dsbc(dsbc_factory, source, [target])
    with socket.create_connection(d.sip_addr, timeout=5, source_address=("127.0.0.2", 0)) as s:
        s.settimeout(5)
        ip, port = s.getsockname()
        reg = (f"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP {ip}:{port};branch=z9hG4bKob1;rport\r\n"
               "Max-Forwards: 70\r\nFrom: <sip:1001@example.com>;tag=ob1\r\nTo: <sip:1001@example.com>\r\n"
               "Call-ID: outbound-1\r\nCSeq: 1 REGISTER\r\nSupported: outbound, path\r\n"
               f"Contact: <sip:1001@{ip}:{port};transport=tcp>"
               ';+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>";reg-id=1\r\n'
               "Expires: 300\r\nContent-Length: 0\r\n\r\n")
        s.sendall(reg.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += s.recv(4096)
        assert answer.startswith(b"SIP/2.0 200"), answer.decode(errors="replace")
        (binding,) = source.registrations("1001")
        assert ";ob" in binding["Path"], binding
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as carrier:
            carrier.bind((CARRIER_IP, 0))
            cport = carrier.getsockname()[1]
            invite = (f"INVITE sip:1001@{d.hostport} SIP/2.0\r\n"
                      f"Via: SIP/2.0/UDP {CARRIER_IP}:{cport};branch=z9hG4bKcarrier1;rport\r\nMax-Forwards: 70\r\n"
                      f"From: <sip:15557654321@{CARRIER_IP}>;tag=c1\r\nTo: <sip:1001@example.com>\r\n"
                      f"Call-ID: outbound-call-1\r\nCSeq: 1 INVITE\r\nContact: <sip:15557654321@{CARRIER_IP}:{cport}>\r\n"
                      "Content-Length: 0\r\n\r\n")
            carrier.sendto(invite.encode(), d.sip_addr)
            got = b""
            while b"INVITE sip:1001@" not in got:
                got += s.recv(4096)  # over the phone's own connection (socket timeout: 5 s)


def test_call_between_customers_of_the_two_systems(
    kamailio_factory: Factory, phone_factory: Factory, dsbc_factory: Factory
) -> None:
    """A target customer calls a source customer: the target system hands the call it
    cannot place to dsbc (a trusted peer), which routes it by Request-URI to the source."""
    from tests.peers.net import free_port

    dsbc_port = free_port("both")
    source = kamailio_factory("source", dids={DID_A: "1001"}, extra_trusted=["127.0.0.1"])
    target = kamailio_factory("target", extra_trusted=["127.0.0.1"], outbound=("127.0.0.1", dsbc_port))
    d = dsbc_factory(
        source=[f"udp:{source.ip}:{source.port}"],
        target=[f"udp:{target.ip}:{target.port}"],
        customers=CUSTOMERS,
        trusted=[CARRIER_IP],
        port=dsbc_port,
    )
    d.wait_nodes_up()
    alice = phone_factory("1001", *d.sip_addr)
    carol = phone_factory("3003", *d.sip_addr, bind_ip="127.0.0.3")
    assert alice.register() == 200 and carol.register() == 200
    assert source.registered("1001") and target.registered("3003")

    call = carol.call("1001", timeout=8)
    incoming = alice.wait_incoming_call(timeout=5)
    assert alice.received_invite(incoming).all("X-System") == ["target", "source"]
    assert carol.hangup(call) == 200
    alice.wait_call_state(incoming, "DISCONNECTED", timeout=5)


def _tcp_register(d: Any, user: str, local_ip: str, expires: int) -> tuple[socket.socket, bytes]:
    """A phone on one TCP connection that registers and then says nothing (no keep-alives)."""
    s = socket.create_connection(d.sip_addr, timeout=5, source_address=(local_ip, 0))
    port = s.getsockname()[1]
    s.sendall(
        (
            f"REGISTER sip:{d.hostport} SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP {local_ip}:{port};branch=z9hG4bK-reg{user}{port};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{user}@{d.hostport}>;tag=r{port}\r\n"
            f"To: <sip:{user}@{d.hostport}>\r\nCall-ID: reg-{user}-{port}\r\nCSeq: 1 REGISTER\r\n"
            f"Contact: <sip:{user}@{local_ip}:{port};transport=tcp>\r\nExpires: {expires}\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
    )
    return s, _read_stream_message(s)


def _read_stream_message(s: socket.socket, timeout: float = 5.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65535)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk.lstrip(b"\r\n") if not data else chunk
    return data


def test_regression_a_phone_registered_over_tcp_stays_reachable_past_the_idle_timeout(
    kamailio_factory: Factory, dsbc_factory: Factory
) -> None:
    """A phone registered over TCP that sends no keep-alives got its calls until
    sip.tcp_idle_timeout (600 s by default) passed, then 430 Flow Failed for the rest of
    its registration (an hour): dsbc closed the connection its registrar reaches it through.
    Kamailio keeps such a connection for the registration (tcp_connection_lifetime 3605 in
    its default configuration).  A connection that carried no registration still closes."""
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target], workers=2, sip_extra="tcp_idle_timeout = 1.0\n")
    phone, answer = _tcp_register(d, "1001", "127.0.0.2", expires=120)
    assert answer.startswith(b"SIP/2.0 200 "), answer
    idle = socket.create_connection(d.sip_addr, timeout=5, source_address=("127.0.0.3", 0))
    idle.sendall(b"\r\n\r\n")  # a keep-alive, then silence
    assert idle.recv(16) == b"\r\n"
    time.sleep(3.5)  # the idle timeout three times over, the sweep at least twice
    assert d.counters().get("tcp_idle_closed", 0) >= 1  # the connection that registered nothing
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as carrier:
        carrier.bind((CARRIER_IP, 0))
        cport = carrier.getsockname()[1]
        carrier.sendto(
            (
                f"OPTIONS sip:{DID_A}@{d.hostport} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {CARRIER_IP}:{cport};branch=z9hG4bK-idle1;rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:15557654321@{CARRIER_IP}>;tag=c1\r\n"
                f"To: <sip:{DID_A}@{d.hostport}>\r\nCall-ID: idle-call-1\r\nCSeq: 1 OPTIONS\r\n"
                f"Content-Length: 0\r\n\r\n"
            ).encode(),
            d.sip_addr,
        )
        got = _read_stream_message(phone, 5)
        assert got.startswith(b"OPTIONS sip:1001@127.0.0.2:"), got
        assert b"Call-ID: idle-call-1\r\n" in got
    assert d.counters().get("flow_failed_430", 0) == 0
    phone.close()
    idle.close()


def _udp_register(sock: socket.socket, d: Any, tag: str, call_id: str, expires: int) -> bool:
    """Phone 1001 on ``sock`` registers through ``d``: whether a 200 came back."""
    ip, port = sock.getsockname()[:2]
    return _udp_exchange(sock, (
        f"REGISTER sip:{d.hostport} SIP/2.0\nVia: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK-{tag};rport\n"
        f"Max-Forwards: 70\nFrom: <sip:1001@{d.hostport}>;tag={tag}\nTo: <sip:1001@{d.hostport}>\n"
        f"Call-ID: {call_id}\nCSeq: 1 REGISTER\nContact: <sip:1001@{ip}:{port}>\nExpires: {expires}\n"
        f"Content-Length: 0\n\n"), d.sip_addr, "SIP/2.0 200")


def _udp_exchange(sock: socket.socket, text: str, to: tuple[str, int], until: str, timeout: float = 5.0) -> str:
    """Send ``text`` (LF line ends) and return the first message received that starts with
    ``until`` ("" when none came)."""
    sock.sendto(text.replace("\n", "\r\n").encode(), to)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65535).decode("latin-1")
        except TimeoutError:
            break
        if data.startswith(until):
            return data
    return ""


def test_regression_a_carriers_bye_toward_a_system_that_is_down_gets_503(
    kamailio_factory: Factory, dsbc_factory: Factory
) -> None:
    """A phone's in-dialog request whose system is down got 503 with Retry-After (SPEC section
    6), but a carrier's (a trusted peer: its next hop is the node in the route set) was sent
    to the dead node all the same, and the carrier retransmitted its BYE for 32 s."""
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target])
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    phone.bind(("127.0.0.2", 0))
    carrier = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    carrier.bind((CARRIER_IP, 0))
    try:
        pport, cport = phone.getsockname()[1], carrier.getsockname()[1]
        assert _udp_register(phone, d, "r1", "reg-bye503", 120)
        carrier.sendto((
            f"INVITE sip:{DID_A}@{d.hostport} SIP/2.0\nVia: SIP/2.0/UDP {CARRIER_IP}:{cport};branch=z9hG4bK-i1;rport\n"
            f"Max-Forwards: 70\nFrom: <sip:15557654321@{CARRIER_IP}>;tag=c1\nTo: <sip:{DID_A}@{d.hostport}>\n"
            f"Call-ID: bye503\nCSeq: 1 INVITE\nContact: <sip:15557654321@{CARRIER_IP}:{cport}>\n"
            f"Content-Length: 0\n\n").replace("\n", "\r\n").encode(), d.sip_addr)
        phone.settimeout(5)
        invite = parse_message(phone.recv(65535).decode("latin-1"))
        assert invite.method == "INVITE"
        answer = "\n".join(
            ["SIP/2.0 200 OK", *(f"Via: {v}" for v in invite.all("via")),
             *(f"Record-Route: {r}" for r in invite.all("record-route")),
             f"From: {invite.get('from')}", f"To: {invite.get('to')};tag=p1", "Call-ID: bye503", "CSeq: 1 INVITE",
             f"Contact: <sip:1001@127.0.0.2:{pport}>", "Content-Length: 0", "", ""])
        phone.sendto(answer.replace("\n", "\r\n").encode(), d.sip_addr)
        carrier.settimeout(5)
        while not (data := carrier.recv(65535).decode("latin-1")).startswith("SIP/2.0 200"):
            pass
        route = ", ".join(reversed([r.strip() for v in parse_message(data).all("record-route") for r in v.split(",")]))
        source.stop()
        deadline = time.monotonic() + 5
        while (status := d.control("GET", "/healthz")[1]).get("systems_down") != ["source"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        bye = _udp_exchange(carrier, (
            f"BYE sip:1001@127.0.0.2:{pport} SIP/2.0\nVia: SIP/2.0/UDP {CARRIER_IP}:{cport};branch=z9hG4bK-b1;rport\n"
            f"Route: {route}\nMax-Forwards: 70\nFrom: <sip:15557654321@{CARRIER_IP}>;tag=c1\n"
            f"To: <sip:{DID_A}@{d.hostport}>;tag=p1\nCall-ID: bye503\nCSeq: 2 BYE\nContent-Length: 0\n\n"),
            d.sip_addr, "SIP/2.0 ", timeout=3)
        assert bye.startswith("SIP/2.0 503 "), bye
        assert parse_message(bye).get("retry-after") == "30"
    finally:
        phone.close()
        carrier.close()


def test_regression_a_tcp_phones_connection_is_kept_for_its_own_registration_not_its_accounts(
    kamailio_factory: Factory, dsbc_factory: Factory
) -> None:
    """Found by an audit: a registrar's 200 to a REGISTER lists every binding of the account
    (RFC 3261 10.3 item 8), and dsbc kept the TCP connection it went out on open, silent,
    for the longest of them: a phone that registered for 2 s next to its account's mobile
    registered for 600 s held its connection (and a slot of max_connections_per_ip) for
    610 s.  Kamailio keeps it for the expiry of the contacts the REGISTER itself saved."""
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target], sip_extra="tcp_idle_timeout = 1.0\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mobile:
        mobile.bind(("127.0.0.3", 0))
        assert _udp_register(mobile, d, "m1", "reg-mobile", 600)
    desk, answer = _tcp_register(d, "1001", "127.0.0.2", expires=2)
    try:
        assert answer.startswith(b"SIP/2.0 200 "), answer
        assert answer.count(b"expires=") >= 2, answer  # the mobile's binding is listed too
        started = time.monotonic()
        desk.settimeout(20)  # its 2 s and the keep margin (10 s), then the idle timeout
        try:
            closed = desk.recv(4096) == b""
        except TimeoutError:
            closed = False
        # closed once its own registration (and the margin) passed, not after 610 s
        assert closed, f"still open after {time.monotonic() - started:.1f} s"
    finally:
        desk.close()


def test_regression_connections_kept_for_registrations_do_not_lock_a_phone_out_of_the_per_ip_cap(
    kamailio_factory: Factory, dsbc_factory: Factory
) -> None:
    """Found by an audit: since a connection that carried a registration is kept open for it,
    a TCP phone behind a NAT that drops idle mappings (it registers again over a new
    connection; the old one never says anything again) filled sip.max_connections_per_ip
    with silent connections, and its next connection was refused until they expired (an
    hour), where the idle timeout used to free them.  The source's connection silent the
    longest past tcp_idle_timeout makes room (one per sweep), so its retry gets in."""
    source, (target,) = systems(kamailio_factory)
    d = start_dsbc(dsbc_factory, source, [target], sip_extra="tcp_idle_timeout = 1.0\nmax_connections_per_ip = 2\n")
    abandoned = []
    try:
        for _ in range(2):
            s, answer = _tcp_register(d, "1001", "127.0.0.2", expires=60)
            assert answer.startswith(b"SIP/2.0 200 "), answer
            abandoned.append(s)  # open on the phone's side, silent: a mapping the NAT dropped
        time.sleep(2.5)  # past the idle timeout: only their registrations keep them
        deadline = time.monotonic() + 6
        while True:
            try:
                s, answer = _tcp_register(d, "1001", "127.0.0.2", expires=60)
                abandoned.append(s)
            except OSError:  # refused: reset as soon as accepted
                answer = b""
            if answer.startswith(b"SIP/2.0 200 "):
                break
            assert time.monotonic() < deadline, "the phone's new connections are still refused"
            time.sleep(1.0)  # the phone tries again a little later
    finally:
        for s in abandoned:
            s.close()
