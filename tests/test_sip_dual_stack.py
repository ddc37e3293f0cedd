"""IPv4 and IPv6 on one dsbc (found by an audit): with one advertised address, an IPv6
phone got an IPv4 Record-Route (its ACK and BYE could not leave: "unsuitable transport"),
and an IPv6 node was given an IPv4 Path and Via it could not reach (500 "no corresponding
socket").  Each side now gets dsbc's address of its own family; a call between the two
families gets two Record-Route entries, as Kamailio's double record-routing does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sip.flow import Flow, FlowSigner
from sip.health import HealthChecker, Node
from sip.message import parse_message
from sip.proxy import ProxyCore, ProxySettings
from tests.test_proxy_core import SECRET, request, standard_router

V4, V6 = "192.0.2.10", "2001:db8::10"
NODE4 = Node("source", 0, "udp", "10.0.0.1", 5060)
NODE6 = Node("target", 0, "udp", "2001:db8:1::1", 5060)
PHONE6 = Flow("udp", "2001:db8:2::5", 40000)


def _core(advertise6: str = V6) -> ProxyCore:
    settings = ProxySettings(advertise_host=V4, advertise_host6=advertise6, ports={"udp": 5060},
                             local_addresses=frozenset({(V4, 5060), (V6, 5060)}))
    health = HealthChecker([NODE4, NODE6], interval=5.0, timeout=2.0, local_host=V4, local_port=5099, tag="t")
    return ProxyCore(settings, standard_router(), health, FlowSigner(SECRET))


def _sent(core: ProxyCore, data: bytes, src: Flow) -> object:
    [out] = core.handle_data(data, src, 0.0)
    return parse_message(out.data), out


def test_an_ipv6_phone_calling_through_an_ipv4_node_gets_its_own_family_in_record_route() -> None:
    core = _core()
    inv = request("INVITE", "sip:2000@example.com", src=PHONE6, frm="<sip:1001@example.com>;tag=a",
                  via=f"SIP/2.0/UDP [{PHONE6.ip}]:{PHONE6.port};branch=z9hG4bKv6call;rport")
    msg, out = _sent(core, inv, PHONE6)
    assert out.ip == NODE4.host  # 1001 lives on the source
    rr = msg.values("record-route")
    assert len(rr) == 2, rr
    assert rr[0].startswith(f"<sip:{V4}:5060;") and rr[1].startswith(f"<sip:[{V6}]:5060;"), rr
    assert msg.values("via")[0].startswith(f"SIP/2.0/UDP {V4}:5060;")


def test_an_ipv6_node_is_given_the_ipv6_address_in_via_and_path() -> None:
    core = _core()
    phone4 = Flow("udp", "203.0.113.5", 40000)
    reg = request("REGISTER", "sip:example.com", src=phone4, frm="<sip:2000@example.com>;tag=r",
                  to="<sip:2000@example.com>", headers=["Contact: <sip:2000@203.0.113.5:40000>"])
    msg, out = _sent(core, reg, phone4)
    assert out.ip == NODE6.host  # 2000 lives on the target
    assert msg.values("via")[0].startswith(f"SIP/2.0/UDP [{V6}]:5060;")
    assert msg.values("path")[0].startswith(f"<sip:[{V6}]:5060;")


def test_one_family_one_record_route() -> None:
    core = _core(advertise6="")
    inv = request("INVITE", "sip:2000@example.com", src=PHONE6, frm="<sip:1001@example.com>;tag=a",
                  via=f"SIP/2.0/UDP [{PHONE6.ip}]:{PHONE6.port};branch=z9hG4bKv6one;rport")
    msg, _ = _sent(core, inv, PHONE6)
    assert [r.split(";")[0] for r in msg.values("record-route")] == [f"<sip:{V4}:5060"]


PROBE = """
import socket, sys, time
msg = ("OPTIONS sip:127.0.0.1:{port} SIP/2.0\\r\\nVia: SIP/2.0/TCP 127.0.0.1:5555;branch=z9hG4bKp1\\r\\n"
       "Max-Forwards: 70\\r\\nFrom: <sip:p@x>;tag=1\\r\\nTo: <sip:127.0.0.1>\\r\\nCall-ID: p1\\r\\n"
       "CSeq: 1 OPTIONS\\r\\nContent-Length: 0\\r\\n\\r\\n").encode()
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    for _ in range(100):  # until dsbc listens: bounded, 10 s
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((host, {port}))
            s.sendall(msg)
            print(host, s.recv(200).split(b"\\r\\n")[0].decode())
            break
        except OSError as exc:
            err = exc
            time.sleep(0.1)
        finally:
            s.close()
    else:
        print(host, "error", err)
"""


def test_a_tcp_wildcard_listener_takes_ipv4_too(tmp_path: Path) -> None:
    """``tcp:[::]`` listened on IPv6 only (asyncio sets IPV6_V6ONLY) while ``udp:[::]``
    took both, and ``tcp:0.0.0.0`` beside it is refused as the same port: IPv4 phones
    could not connect.  Run in a network namespace of its own (a wildcard bind)."""
    import os
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root and unshare(1) for a network namespace")
    port = 25060
    cfg = tmp_path / "dsbc.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/loc.db"\n[systems.source]\nsip = ["udp:127.0.0.2:25070"]\n'
                   f'[sip]\nlisten = ["udp:[::]:{port}", "tcp:[::]:{port}"]\n[api]\nenabled = false\n'
                   '[control]\nenabled = false\n')
    (tmp_path / "probe.py").write_text(PROBE.replace("{port}", str(port)))
    # dsbc's own pid, not a subshell's: the namespace lives as long as dsbc does
    script = (f"ip link set lo up; {sys.executable} -m dsbc.cli run -c {cfg} > {tmp_path}/dsbc.log 2>&1 & "
              f"DSBC=$!; {sys.executable} {tmp_path}/probe.py; kill $DSBC; wait $DSBC")
    try:
        proc = subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True,
                              timeout=60, cwd=Path(__file__).resolve().parents[1], check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the namespace run did not end")
    if "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip(f"no network namespace here: {proc.stderr.strip()}")
    assert proc.stdout.splitlines() == ["127.0.0.1 SIP/2.0 200 OK", "::1 SIP/2.0 200 OK"], (
        proc.stdout, proc.stderr, (tmp_path / "dsbc.log").read_text())


def test_a_node_written_in_a_long_ipv6_form_is_pinged_up(dsbc_factory: Any) -> None:
    """``udp:[0:0::1]:P`` (or upper case, or leading zeros): the node's answers came from
    ``::1``, which was not the node dsbc pinged, so it stayed down for good and every
    request of its system got 503 (found by an audit)."""
    import socket
    import time

    from tests.peers.fakenode import FakeNode
    from tests.peers.net import free_port

    with FakeNode("udp", ip="::1") as node:
        port = free_port("both")
        long_form = f"udp:[0:0:0::0001]:{node.port}"
        d = dsbc_factory(port=port, source=[long_form], target=[long_form], extra_listen=[f"udp:[::1]:{port}"])
        deadline = time.monotonic() + 10
        while len(node.requests("OPTIONS")) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # options_timeout (0.5 s) past the pings answered: down by now if unmatched
        d.wait_nodes_up(timeout=0.1)
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as phone:
            phone.bind(("::1", 0))
            phone.settimeout(5)
            src = Flow("udp", "::1", phone.getsockname()[1])
            phone.sendto(request("REGISTER", f"sip:[::1]:{port}", src=src, to="<sip:1001@example.com>",
                                 via=f"SIP/2.0/UDP [::1]:{src.port};branch=z9hG4bKlong1;rport"), ("::1", port))
            assert phone.recv(65535).startswith(b"SIP/2.0 200 "), d.log_tail()
