"""`dsbc replay`: routing reports of recorded captures against the store, and --send.

The tests write their own captures with scapy (UDP and TCP, IPv4 and IPv6, fragments,
pcap and pcapng) and, when tshark is installed, record one for real on the loopback."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

pytest.importorskip("scapy")
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.utils import wrpcap, wrpcapng

from dsbc import cli
from dsbc.store import open_store

DSBC = "198.51.100.1"  # dsbc's own address (sip.listen)
SOURCE_NODE = ("192.0.2.10", 5060)
TARGET_NODE = ("192.0.2.20", 5060)
CARRIER = "203.0.113.5"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z

CSV = """customer_id,identities,system,group
42,account:1001;did:15550001001,source,
43,account:1002,target,
44,account:1003,source,
45,account:1005,source,
"""


def sip(
    start: str, call_id: str | None, frm: str, to: str, cseq: str, *extra: str, body: str = ""
) -> bytes:
    lines = [
        start,
        f"Via: SIP/2.0/UDP 192.0.2.99:5060;branch=z9hG4bK-{call_id or 'x'}-{cseq.split()[0]}",
        "Max-Forwards: 70",
        f"From: <sip:{frm}>;tag=f1",
        f"To: <sip:{to}>",
    ]
    if call_id is not None:
        lines.append(f"Call-ID: {call_id}")
    lines += [f"CSeq: {cseq}", *extra, f"Content-Length: {len(body)}", "", body]
    return "\r\n".join(lines).encode()


REGISTER = sip(
    "REGISTER sip:example.com SIP/2.0",
    "reg-1",
    "1001@example.com",
    "1001@example.com",
    "1 REGISTER",
    "Contact: <sip:1001@192.0.2.100:5060>",
    "Expires: 600",
)
INVITE_DEVICE = sip(
    "INVITE sip:15557770000@example.com SIP/2.0",
    "inv-dev",
    "1002@example.com",
    "15557770000@example.com",
    "1 INVITE",
    "Contact: <sip:1002@192.0.2.101:5062>",
)
RELAYED_INVITE = INVITE_DEVICE.replace(
    b"Via: ", b"Via: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bK-d5abc.def;rport\r\nVia: ", 1
)
INVITE_CARRIER = sip(
    "INVITE sip:+15550001001@198.51.100.1 SIP/2.0",
    "inv-carrier",
    "15551234567@carrier.example",
    "+15550001001@example.com",
    "7 INVITE",
)
CANCEL_CARRIER = sip(
    "CANCEL sip:+15550001001@198.51.100.1 SIP/2.0",
    "inv-carrier",
    "15551234567@carrier.example",
    "+15550001001@example.com",
    "7 CANCEL",
)
BYE_ROUTED = sip(
    "BYE sip:1002@192.0.2.101:5062 SIP/2.0",
    "inv-old",
    "15557770000@example.com",
    "1002@example.com",
    "2 BYE",
    "Route: <sip:198.51.100.1:5060;lr;dsbc=target>",
)
MALFORMED = sip(
    "OPTIONS sip:1001@example.com SIP/2.0", None, "1001@example.com", "x@example.com", "1 OPTIONS"
)
RESPONSE = (
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.99:5060;branch=z9hG4bK-1\r\n"
    b"From: <sip:1001@example.com>;tag=f1\r\nTo: <sip:1001@example.com>;tag=t1\r\n"
    b"Call-ID: reg-1\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"
)
INVITE_UNKNOWN = sip(
    "INVITE sip:15557770001@example.com SIP/2.0",
    "inv-unknown",
    "9999@example.com",
    "15557770001@example.com",
    "1 INVITE",
)
INVITE_LOCKED = sip(
    "INVITE sip:15557770002@example.com SIP/2.0",
    "inv-locked",
    "1005@example.com",
    "15557770002@example.com",
    "1 INVITE",
)
MESSAGE_BIG = sip(
    "MESSAGE sip:1002@example.com SIP/2.0",
    "msg-big",
    "1001@example.com",
    "1002@example.com",
    "1 MESSAGE",
    "Content-Type: text/plain",
    body="x" * 3000,
)
TCP_REGISTER = sip(
    "REGISTER sip:example.com SIP/2.0",
    "reg-tcp",
    "1003@example.com",
    "1003@example.com",
    "1 REGISTER",
    "Contact: <sip:1003@192.0.2.102:40000;transport=tcp>",
)
TCP_OPTIONS = sip(
    "OPTIONS sip:1002@example.com SIP/2.0",
    "opt-tcp",
    "1003@example.com",
    "1002@example.com",
    "2 OPTIONS",
)


def eth() -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def udp4(src: str, sport: int, dst: str, dport: int, payload: bytes, t: float) -> Ether:
    p = eth() / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload
    p.time = T0 + t
    return p


def tcp_segments(t: float, ether: bool = True) -> list:
    """A TCP flow 192.0.2.102:40000 -> dsbc: two SIP messages split across segments, out of
    order, with a retransmission and a pure ACK."""
    stream = TCP_REGISTER + TCP_OPTIONS
    isn = 1000
    cuts = [0, 40, 300, len(TCP_REGISTER), len(TCP_REGISTER) + 10, len(stream)]
    pieces = [(isn + 1 + a, stream[a:b]) for a, b in itertools.pairwise(cuts)]
    # reordered, one retransmitted, the second message's start line split
    order = [pieces[0], pieces[2], pieces[1], pieces[1], pieces[3], pieces[4]]

    def seg(seq: int, data: bytes, flags: str, dt: float) -> object:
        ip = IP(src="192.0.2.102", dst=DSBC) / TCP(sport=40000, dport=5060, seq=seq, flags=flags)
        p = (eth() / ip if ether else ip) / data if data else (eth() / ip if ether else ip)
        p.time = T0 + t + dt
        return p

    out = [seg(isn, b"", "S", 0.0)]
    out += [seg(s, d, "PA", 0.001 * (i + 1)) for i, (s, d) in enumerate(order)]
    back = IP(src=DSBC, dst="192.0.2.102") / TCP(sport=5060, dport=40000, seq=5000, flags="A")
    back = eth() / back if ether else back
    back.time = T0 + t + 0.01
    return out + [back]


def capture_packets() -> list:
    pkts = [
        udp4("192.0.2.100", 5060, DSBC, 5060, REGISTER, 0.0),
        # dsbc's own leg of that REGISTER, as relayed in the capture: to the source node
        udp4(DSBC, 5060, *SOURCE_NODE, REGISTER, 0.001),
        udp4(*SOURCE_NODE, DSBC, 5060, RESPONSE, 0.002),
        udp4("192.0.2.101", 5062, DSBC, 5060, INVITE_DEVICE, 1.0),
        # relayed by another dsbc node (its own Via on top) to the target node
        udp4("198.51.100.9", 5060, *TARGET_NODE, RELAYED_INVITE, 1.001),
        udp4(CARRIER, 5060, DSBC, 5060, INVITE_CARRIER, 2.0),
        udp4(CARRIER, 5060, DSBC, 5060, CANCEL_CARRIER, 2.5),
        udp4(*TARGET_NODE, DSBC, 5060, BYE_ROUTED, 3.0),
        udp4("192.0.2.100", 5060, DSBC, 5060, MALFORMED, 4.0),
        udp4("192.0.2.100", 5060, DSBC, 5060, INVITE_LOCKED, 4.5),
        udp4("192.0.2.100", 5060, DSBC, 5060, b"\r\n\r\n", 4.6),  # keep-alive: not SIP
        udp4("192.0.2.100", 53, "192.0.2.1", 53, b"\x12\x34\x01\x00" + b"\0" * 8, 4.7),  # DNS
    ]
    v6 = eth() / IPv6(src="2001:db8::5", dst="2001:db8::1") / UDP(sport=5060, dport=5060)
    v6 = v6 / INVITE_UNKNOWN
    v6.time = T0 + 5.0
    arp = eth() / ARP()
    arp.time = T0 + 5.1
    big = eth() / IP(src="192.0.2.100", dst=DSBC, id=77) / UDP(sport=5060, dport=5060) / MESSAGE_BIG
    frags = [eth() / f for f in fragment(big[IP], fragsize=1200)]
    for f in frags:
        f.time = T0 + 6.0
    pkts += [v6, arp, *frags, *tcp_segments(7.0)]
    return pkts


# --- fixtures and helpers --------------------------------------------------------------------


def write_config(home: Path, unknown: str = "source") -> None:
    (home / "dsbc.toml").write_text(
        f'[store]\nurl = "sqlite:///{home}/loc.db"\nunknown = "{unknown}"\n\n'
        f'[systems.source]\nname = "MR100"\nsip = ["udp:{SOURCE_NODE[0]}:{SOURCE_NODE[1]}"]\n\n'
        f'[systems.target]\nname = "MR115"\nsip = ["udp:{TARGET_NODE[0]}:{TARGET_NODE[1]}"]\n\n'
        f'[sip]\nlisten = ["udp:{DSBC}:5060", "tcp:{DSBC}:5060"]\ntrusted_peers = ["{CARRIER}"]\n\n'
        '[control]\nlisten = "127.0.0.1:9"\n'
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DSBC_CONFIG", raising=False)
    write_config(tmp_path)
    (tmp_path / "customers.csv").write_text(CSV)
    assert dsbc("import", "customers.csv").exit_code == 0
    s = open_store(f"sqlite:///{tmp_path}/loc.db")
    s.lock(["45"], "batch-in-flight")
    s.close()
    wrpcap(str(tmp_path / "cap.pcap"), capture_packets())
    return tmp_path


def dsbc(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def lines_for(out: str, call_id: str) -> list[str]:
    return [ln for ln in out.splitlines() if f"  {call_id}  " in ln]


def one_line(out: str, call_id: str) -> str:
    found = lines_for(out, call_id)
    assert len(found) == 1, (call_id, out)
    return found[0]


def section(out: str, title: str) -> list[str]:
    lines = out.splitlines()
    i = lines.index(title)
    body = []
    for ln in lines[i + 1 :]:
        if not ln.startswith("  "):
            break
        body.append(ln.strip())
    return body


# --- the report ---------------------------------------------------------------------------------


def test_report_lines_and_summary(home: Path) -> None:
    r = dsbc("replay", "cap.pcap")
    assert r.exit_code == 0, r.output
    out = r.stdout
    reg = one_line(out, "reg-1")
    assert reg.startswith("2023-11-14T22:13:20.000Z  udp 192.0.2.100:5060  REGISTER  reg-1  ")
    assert "source (MR100)  REGISTER -> To account:1001 -> customer 42 (source, active)" in reg
    assert "target (MR115)  From account:1002 -> customer 43 (target, active)" in one_line(
        out, "inv-dev"
    )
    inv, cancel = lines_for(out, "inv-carrier")
    assert (
        "source (MR100)  trusted peer 203.0.113.5 -> R-URI did:15550001001 -> customer 42 "
        "(source, active)"
    ) in inv
    assert "CANCEL" in cancel and "source (MR100)  CANCEL follows its INVITE" in cancel
    assert "target (MR115)  in-dialog: Route carries dsbc=target" in one_line(out, "inv-old")
    bad = [ln for ln in out.splitlines() if "  OPTIONS  -  " in ln]
    assert len(bad) == 1 and "  400  Bad Request: missing Call-ID" in bad[0]
    held = one_line(out, "inv-locked")
    assert (
        "  held  From account:1005 -> customer 45 (source, locked); locked: would be held" in held
    )
    unk = one_line(out, "inv-unknown")
    assert "udp [2001:db8::5]:5060  INVITE" in unk
    assert "source (MR100)  From account:9999 unknown -> store.unknown=source" in unk
    assert "source (MR100)  From account:1001 -> customer 42" in one_line(out, "msg-big")
    assert (
        "tcp 192.0.2.102:40000  REGISTER  reg-tcp  source (MR100)  REGISTER -> To account:1003"
        in one_line(out, "reg-tcp")
    )
    assert "OPTIONS  opt-tcp  source (MR100)  From account:1003 -> customer 44" in one_line(
        out, "opt-tcp"
    )
    # report lines are in capture order; dsbc's own relayed leg and the response are not lines
    calls = [ln.split("  ")[3] for ln in out.splitlines() if ln.startswith("2023-")]
    assert calls == [
        "reg-1",
        "inv-dev",
        "inv-carrier",
        "inv-carrier",
        "inv-old",
        "-",
        "inv-locked",
        "inv-unknown",
        "msg-big",
        "reg-tcp",
        "opt-tcp",
    ]
    assert (
        out.count(
            "\n11 requests, 1 response in 25 packets (4 non-SIP packets skipped; "
            "2 requests sent by dsbc itself (relayed, or health pings; not reported); 1 TCP stream; "
        )
        == 1
    )
    per_system = section(out, "requests per system:")
    assert per_system[0].split() == ["source", "(MR100)", "7"]
    assert sorted(" ".join(x.split()) for x in per_system[1:]) == [
        "400 1",
        "held 1",
        "target (MR115) 2",
    ]
    assert "INVITE 4" in [" ".join(x.split()) for x in section(out, "requests per method:")]
    assert section(out, "unknown identities (top 20):") == ["account:9999             1"]
    assert section(out, "customers seen per system:") == [
        "source (MR100): 3 (42, 44, 45)",
        "target (MR115): 1 (43)",
    ]
    assert "would change" not in out  # the capture sent reg-1 to the source node, as now


def test_in_dialog_requests_follow_their_signed_route_and_pings_are_not_reported(home: Path) -> None:
    """A live dsbc signs its Record-Route (``dsbc=target.<mac>``) and puts the phone's flow
    token in it: an in-dialog request from a trusted peer stays on that system, and one
    from the phone itself goes to the system too (not "toward the device"), as the proxy
    does.  dsbc's own health pings in a capture are not requests to report."""
    ack = sip("ACK sip:15557770000@192.0.2.101:5062 SIP/2.0", "dlg-carrier", "15551234567@carrier.example",
              "+15550001001@example.com", "7 ACK", f"Route: <sip:{DSBC}:5060;lr;dsbc=target.AbCd1234>")
    bye = sip("BYE sip:15557770000@192.0.2.20 SIP/2.0", "dlg-phone", "1002@example.com",
              "15557770000@example.com", "2 BYE",
              f"Route: <sip:{DSBC}:5060;lr;dsbc=source.XyZ98765;ft=QUJDREVGR0g>")
    ping = sip("OPTIONS sip:192.0.2.10:5060 SIP/2.0", "ping-1", "dsbc@198.51.100.2", "192.0.2.10", "1 OPTIONS")
    ping = ping.replace(b"branch=z9hG4bK-ping-1-1", b"branch=z9hG4bK-dsbcping-abc-source.0")
    for name in (b"To: <sip:+15550001001@example.com>", b"To: <sip:15557770000@example.com>"):
        ack, bye = ack.replace(name, name + b";tag=t9"), bye.replace(name, name + b";tag=t9")
    wrpcap(str(home / "dlg.pcap"), [udp4(CARRIER, 5060, DSBC, 5060, ack, 1.0),
                                    udp4("192.0.2.101", 5062, DSBC, 5060, bye, 2.0),
                                    udp4("198.51.100.2", 5060, *SOURCE_NODE, ping, 3.0)])
    out = dsbc("replay", "dlg.pcap").stdout
    assert "target (MR115)  in-dialog: Route carries dsbc=target" in one_line(out, "dlg-carrier")
    assert "source (MR100)  in-dialog: Route carries dsbc=source" in one_line(out, "dlg-phone")
    assert "ping-1" not in out and "1 request sent by dsbc itself (relayed, or a health ping; not reported)" in out


def test_migration_changes_the_report(home: Path) -> None:
    before = dsbc("replay", "cap.pcap").stdout
    assert "source (MR100)  REGISTER -> To account:1001" in one_line(before, "reg-1")
    r = dsbc("migrate", "--customer", "42", "--who", "test")
    assert r.exit_code == 0, r.output
    after = dsbc("replay", "cap.pcap").stdout
    assert (
        "target (MR115)  REGISTER -> To account:1001 -> customer 42 (target, active)"
        in one_line(after, "reg-1")
    )
    assert (
        "target (MR115)  trusted peer 203.0.113.5 -> R-URI did:15550001001"
        in lines_for(after, "inv-carrier")[0]
    )
    assert section(after, "customers seen per system:") == [
        "source (MR100): 2 (44, 45)",
        "target (MR115): 2 (42, 43)",
    ]
    assert section(
        after, "customers that would change system (vs. the capture's own routing):"
    ) == ["42: source (MR100) -> target (MR115) (Call-ID reg-1: sent to 192.0.2.10:5060)"]


def test_unknown_reject_policy_and_json_csv(home: Path) -> None:
    write_config(home, unknown="reject")
    out = dsbc("replay", "cap.pcap").stdout
    assert "  reject 404  From account:9999 unknown -> store.unknown=reject: 404 Not Found" in (
        one_line(out, "inv-unknown")
    )
    r = dsbc("replay", "cap.pcap", "--format", "json")
    doc = json.loads(r.stdout)
    rows = {(x["call_id"], x["method"]): x for x in doc["requests"]}
    carrier = rows[("inv-carrier", "INVITE")]
    assert carrier["system"] == "source" and carrier["customer_id"] == "42"
    assert carrier["identity"] == "did:15550001001" and carrier["decision"] == "source (MR100)"
    assert carrier["time"] == "2023-11-14T22:13:22.000Z" and carrier["src"] == "203.0.113.5:5060"
    assert rows[("inv-unknown", "INVITE")]["status"] == 404
    assert rows[("", "OPTIONS")]["status"] == 400
    s = doc["summary"]
    assert s["requests"] == 11 and s["responses"] == 1 and s["tcp_streams"] == 1
    assert s["unknown_identities"] == {"account:9999": 1}
    assert s["customers"] == {"source": ["42", "44", "45"], "target": ["43"]}
    assert s["skipped_packets"] >= 3  # keep-alive, DNS, ARP (and the TCP flow's reverse ACK)
    r = dsbc("replay", "cap.pcap", "--format", "csv")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("time,transport,src,dst,method,call_id,decision")
    assert len(lines) == 12 and any(",reg-tcp,source (MR100)," in ln for ln in lines)


def test_pcapng_raw_ip_and_tcp_gap(home: Path) -> None:
    # a raw-IP link type, pcapng, and a TCP flow with a segment missing from the capture
    segs = tcp_segments(0.0, ether=False)  # SYN, p0, p2, p1, p1, p3, p4, reverse ACK
    wrpcapng(str(home / "raw.pcapng"), [s for i, s in enumerate(segs) if i not in (3, 4)])
    out = dsbc("replay", "raw.pcapng").stdout
    assert "reg-tcp" not in out  # cut by the hole: not reported, never half-parsed
    assert "; 1 hole in TCP streams; 1 incomplete message)" in out
    assert "OPTIONS  opt-tcp  source (MR100)" in one_line(out, "opt-tcp")
    wrpcapng(str(home / "whole.pcapng"), segs)
    out = dsbc("replay", "whole.pcapng").stdout
    assert lines_for(out, "reg-tcp") and lines_for(out, "opt-tcp")


def test_a_capture_cut_short_says_so(home: Path) -> None:
    """Found by an audit: `head -c 100 cap.pcap` replayed as "0 requests ... 1 non-SIP
    packet skipped", exit 0, with no word that the file ends inside a packet."""
    segs = tcp_segments(0.0, ether=False)
    for name, write in (("whole.pcap", wrpcap), ("whole.pcapng", wrpcapng)):
        write(str(home / name), segs)
        data = (home / name).read_bytes()
        (home / f"cut-{name}").write_bytes(data[: len(data) - 7])
        assert "cut short" not in dsbc("replay", name).stdout
        r = dsbc("replay", f"cut-{name}")
        assert r.exit_code == 0 and "the file is cut short: its last packet is incomplete" in r.stdout, r.stdout
        assert json.loads(dsbc("replay", f"cut-{name}", "--format", "json").stdout)["summary"]["cut_short"] is True


@pytest.mark.parametrize("content", [None, b"", b"garbage, not a capture" * 10, "dir"])
def test_bad_capture_files_exit_2(home: Path, content: bytes | str | None) -> None:
    path = home / "bad.pcap"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)  # type: ignore[arg-type]
    r = dsbc("replay", str(path))
    assert r.exit_code == 2, r.output
    err = r.stderr.splitlines()
    assert len(err) == 1 and "bad.pcap" in err[0] and "Traceback" not in r.stderr
    r = dsbc("replay", "cap.pcap", "--send", "127.0.0.1")
    assert r.exit_code == 2 and "--send" in r.stderr
    r = dsbc("replay", "cap.pcap", "--send", "127.0.0.1:9", "--rate", "fast")
    assert r.exit_code == 2 and "--rate" in r.stderr


# --- --send ---------------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5.0)
    yield s
    s.close()


def receive(s: socket.socket, n: int) -> list[bytes]:
    got = []
    for _ in range(n):
        got.append(s.recvfrom(70000)[0])
    s.settimeout(0.2)
    with pytest.raises(TimeoutError):
        s.recvfrom(70000)  # and nothing more
    s.settimeout(5.0)
    return got


def test_send_requests_then_everything(home: Path, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    os.unlink(home / "dsbc.toml")  # --send needs no config and no store
    r = dsbc("replay", "cap.pcap", "--send", f"127.0.0.1:{port}", "--rate", "2000/s")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == (
        f"sent 13 SIP requests to 127.0.0.1:{port} over UDP, 1 response not sent (--all sends them)"
    )
    got = receive(listener, 13)
    assert got[0] == REGISTER and got[1] == REGISTER and MESSAGE_BIG in got
    assert got[-2:] == [TCP_REGISTER, TCP_OPTIONS]  # framed out of the TCP stream
    r = dsbc("replay", "cap.pcap", "--send", f"127.0.0.1:{port}", "--all", "--speed", "1000")
    assert r.stdout.strip() == f"sent 14 SIP messages to 127.0.0.1:{port} over UDP"
    got = receive(listener, 14)
    assert got[2] == RESPONSE
    r = dsbc("replay", "cap.pcap", "--send", f"127.0.0.1:{port}", "--rate", "5000")
    assert r.exit_code == 0, r.output
    sources = set()
    for _ in range(13):
        sources.add(listener.recvfrom(70000)[1])
    assert len(sources) == 1  # one local socket


def test_send_keeps_the_timing(home: Path, listener: socket.socket) -> None:
    pkts = [udp4("192.0.2.100", 5060, DSBC, 5060, REGISTER, t) for t in (0.0, 0.2, 0.4)]
    wrpcap(str(home / "timed.pcap"), pkts)
    port = listener.getsockname()[1]
    start = time.monotonic()
    r = dsbc("replay", "timed.pcap", "--send", f"127.0.0.1:{port}", "--speed", "2")
    elapsed = time.monotonic() - start
    assert r.exit_code == 0 and len(receive(listener, 3)) == 3
    assert elapsed >= 0.2  # 0.4 s of capture at twice the speed


# --- a capture recorded for real -------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_bytes(path: Path, marker: bytes, send: socket.socket, port: int, limit: float) -> bool:
    """Send `marker` until it shows up in the capture file (dumpcap flushes about twice a second)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        send.sendto(marker, ("127.0.0.1", port))
        time.sleep(0.2)
        if path.exists() and marker in path.read_bytes():
            return True
    return False


def test_replay_a_real_tshark_capture(home: Path) -> None:
    from tests.conftest import require_binary

    tshark = require_binary("tshark", "apt-get install tshark")
    port = free_udp_port()
    out = home / "live.pcapng"
    proc = subprocess.Popen(
        [tshark, "-i", "lo", "-f", f"udp port {port}", "-w", str(out), "-a", "duration:20"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    errors: list[str] = []
    started = threading.Event()

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            errors.append(line)
            if "Capture started" in line or "Capturing on" in line:
                started.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        if not started.wait(10.0):
            pytest.skip(f"tshark cannot capture on lo here: {''.join(errors)[-300:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            if not wait_for_bytes(out, b"dsbc-probe", s, port, 8.0):
                pytest.skip("tshark captured nothing on lo")
            for data in (REGISTER, INVITE_DEVICE, MALFORMED):
                s.sendto(data, ("127.0.0.1", port))
            assert wait_for_bytes(out, b"dsbc-end", s, port, 8.0)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    r = dsbc("replay", str(out))
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("20")]
    assert len(lines) == 3, r.stdout
    assert (
        "udp 127.0.0.1:" in lines[0]
        and "  REGISTER  reg-1  source (MR100)  REGISTER -> To account:1001 -> customer 42"
        in lines[0]
    )
    assert "  INVITE  inv-dev  target (MR115)  From account:1002 -> customer 43" in lines[1]
    assert "  400  Bad Request: missing Call-ID" in lines[2]
    assert "\n3 requests, 0 responses in " in r.stdout


@pytest.mark.parametrize("args", [("--speed", "1e-300"), ("--speed", "nan"), ("--speed", "inf"),
                                  ("--rate", "1e-300"), ("--rate", "inf/s"), ("--rate", "nan")])
def test_speeds_and_rates_out_of_range_are_bad_usage(home: Path, args: tuple[str, str]) -> None:
    """Found by an audit: `--speed 1e-300` and `--rate 1e-300` ended in a traceback from
    time.sleep (OverflowError: timestamp out of range), `--speed nan` sent at full speed."""
    r = dsbc("replay", "cap.pcap", "--send", "127.0.0.1:9", *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and args[0] in r.stderr, r.stderr


@pytest.mark.parametrize(("args", "message"), [
    # --help says "With --send": --speed alone was taken and ignored (a report, at no speed)
    (("--speed", "2"), "dsbc replay: --all, --speed and --rate go with --send"),
    (("--all",), "dsbc replay: --all, --speed and --rate go with --send"),
    # no report is made with --send: the format was ignored
    (("--send", "127.0.0.1:9", "--format", "json"), "dsbc replay: --format is the report's: --send makes none"),
    # --rate replaces the capture's timing: --speed was ignored
    (("--send", "127.0.0.1:9", "--rate", "5", "--speed", "2"), "dsbc replay: give --speed or --rate, not both"),
])
def test_options_that_would_be_ignored_are_bad_usage(home: Path, args: tuple[str, ...], message: str) -> None:
    r = dsbc("replay", "cap.pcap", *args)
    assert r.exit_code == 2 and r.stderr.strip() == f"{message} (see dsbc replay --help)", r.output
