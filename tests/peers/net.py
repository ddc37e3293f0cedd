"""Loopback networking helpers for peer harnesses: free ports, readiness, aliases.

Readiness is read from /proc/net/{udp,tcp} so that probing never sends a packet or opens a
connection to the program under test (a stray TCP connect shows up in its logs, a stray
UDP bind can steal its port).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

__all__ = [
    "PortTimeout",
    "free_port",
    "is_bound",
    "loopback_alias_works",
    "sip_options",
    "wait_port",
    "wait_port_closed",
]

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


class PortTimeout(TimeoutError):
    """A port did not reach the expected state in time."""


def free_port(kind: str = "udp", host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing is bound to now.

    kind: "udp", "tcp", or "both" (the same number free for UDP and TCP, as a SIP listener
    on both transports needs). The port is released before returning, so a small race with
    other programs remains; ephemeral ports handed out by the kernel make it unlikely.
    """
    if kind not in ("udp", "tcp", "both"):
        raise ValueError(f"kind must be udp, tcp or both, not {kind!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        first = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        with socket.socket(family, first) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
            if kind != "both":
                return port
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as u:
                    u.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free {kind} port on {host} after 200 tries")


def _hex_addr(host: str, port: int) -> tuple[str, str]:
    # /proc/net prints the IPv4 address as a little-endian 32-bit hex number.
    packed = socket.inet_aton(host)
    return packed[::-1].hex().upper() + f":{port:04X}", f"00000000:{port:04X}"


def is_bound(host: str, port: int, proto: str = "udp") -> bool:
    """Is something bound to host:port (or to 0.0.0.0:port)? For TCP: listening."""
    if proto not in ("udp", "tcp"):
        raise ValueError(f"proto must be udp or tcp, not {proto!r}")
    wanted = _hex_addr(host, port)
    table = Path(f"/proc/net/{proto}")
    if not table.exists():  # not Linux: fall back to probing
        return _probe(host, port, proto)
    for line in table.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[1] not in wanted:
            continue
        if proto == "udp" or fields[3] == _LISTEN:
            return True
    return False


def _probe(host: str, port: int, proto: str) -> bool:
    if proto == "tcp":
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, port))
    except OSError:
        return True
    return False


def wait_port(host: str, port: int, proto: str = "udp", timeout: float = 10.0) -> None:
    """Wait until something is bound (UDP) or listening (TCP) on host:port."""
    deadline = time.monotonic() + timeout
    while not is_bound(host, port, proto):
        if time.monotonic() > deadline:
            raise PortTimeout(f"nothing bound to {proto}:{host}:{port} after {timeout:.1f}s")
        time.sleep(0.02)


def wait_port_closed(host: str, port: int, proto: str = "udp", timeout: float = 10.0) -> None:
    """Wait until nothing is bound to host:port any more."""
    deadline = time.monotonic() + timeout
    while is_bound(host, port, proto):
        if time.monotonic() > deadline:
            raise PortTimeout(f"{proto}:{host}:{port} still bound after {timeout:.1f}s")
        time.sleep(0.02)


def loopback_alias_works(host: str = "127.0.0.2") -> bool:
    """Can we bind and exchange a datagram on this loopback alias?

    On Linux the whole 127.0.0.0/8 is local; elsewhere (macOS) aliases need `ifconfig lo0
    alias`. Tests that need a second loopback address skip when this is False.
    """
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
        ):
            a.bind((host, 0))
            b.bind(("127.0.0.1", 0))
            b.settimeout(1.0)
            a.sendto(b"ping", b.getsockname())
            data, src = b.recvfrom(16)
            return data == b"ping" and src[0] == host
    except OSError:
        return False


def sip_options(
    host: str,
    port: int,
    proto: str = "udp",
    timeout: float = 1.0,
    local_ip: str = "127.0.0.1",
) -> str | None:
    """Send one OPTIONS to host:port; return the first response's text, or None.

    A readiness probe for SIP servers (Kamailio, dsbc): "is the SIP layer answering?".
    """
    if proto not in ("udp", "tcp"):
        raise ValueError(f"proto must be udp or tcp, not {proto!r}")
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(timeout)
        s.bind((local_ip, 0))
        lport = s.getsockname()[1]
        tag = f"{lport}{time.monotonic_ns() % 1_000_000}"
        msg = (
            f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/{proto.upper()} {local_ip}:{lport};branch=z9hG4bK-ping{tag};rport\r\n"
            f"Max-Forwards: 70\r\n"
            f"From: <sip:ping@{local_ip}>;tag=p{tag}\r\n"
            f"To: <sip:{host}:{port}>\r\n"
            f"Call-ID: ping-{tag}@{local_ip}\r\n"
            f"CSeq: 1 OPTIONS\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
        try:
            if proto == "udp":
                s.sendto(msg, (host, port))
                data = s.recv(65535)
            else:
                s.connect((host, port))
                s.sendall(msg)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(65535)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return None
    return data.decode(errors="replace") or None
