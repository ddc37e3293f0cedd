"""Socket options shared by dsbc's UDP listeners (SIP here, RADIUS in ``dsbc.radius``)."""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

#: a burst (a NAS sending its accounting backlog after a restart, phones re-registering
#: after an outage) overflows the kernel's default 208 KB and is lost before dsbc sees it
BIG_BUFFER = 4 * 1024 * 1024
#: SO_RCVBUFFORCE / SO_SNDBUFFORCE: the socket module names them from Python 3.12 only;
#: these are their values on Linux (asm-generic/socket.h, the value on x86 and ARM)
_FORCE = (
    (getattr(socket, "SO_RCVBUFFORCE", 33), getattr(socket, "SO_SNDBUFFORCE", 32))
    if sys.platform == "linux"
    else (getattr(socket, "SO_RCVBUFFORCE", None), getattr(socket, "SO_SNDBUFFORCE", None))
)


def big_buffers(sock: Any, size: int = BIG_BUFFER) -> None:
    """Receive and send buffers of ``size`` on ``sock``: past ``net.core.rmem_max`` /
    ``wmem_max`` when the process may (root, CAP_NET_ADMIN: SO_RCVBUFFORCE), else up to
    them.  Never fails: a smaller buffer is still a buffer."""
    if sock is None:
        return
    for force, plain in ((_FORCE[0], socket.SO_RCVBUF), (_FORCE[1], socket.SO_SNDBUF)):
        for opt in (force, plain):
            if opt is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
                break
            except OSError:
                continue


#: IP_PKTINFO: the socket module names it from Python 3.12 only; its value on Linux
IP_PKTINFO: int | None = getattr(socket, "IP_PKTINFO", 8 if sys.platform == "linux" else None)
#: room for the one IP_PKTINFO (12 octets) or IPV6_PKTINFO (20) control message asked for
PKTINFO_SPACE = socket.CMSG_SPACE(20)
#: a control message to send with sendmsg: (level, type, data)
Cmsg = tuple[int, int, bytes]


def want_destination(sock: socket.socket) -> bool:
    """Have the kernel tell each datagram's destination address (IP_PKTINFO, or
    IPV6_RECVPKTINFO, which also covers the IPv4 datagrams of a dual-stack socket); False
    where it cannot."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        elif IP_PKTINFO is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        else:
            return False
    except (OSError, AttributeError):
        return False
    return True


def reply_from(ancdata: list[tuple[int, int, bytes]]) -> Cmsg | None:
    """The control message that makes a reply leave from the address a datagram received
    with ``ancdata`` (``recvmsg``) was sent to, or None.  A socket bound to a wildcard
    address otherwise answers from the kernel's choice of source (the route's preferred
    address), which a client that reached another address of the host (a VIP) drops."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo {ifindex, spec_dst, addr}: send from addr, any interface
            return level, kind, struct.pack("=i4s4s", 0, data[8:12], bytes(4))
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            # struct in6_pktinfo {addr, ifindex}: a link-local address needs its interface
            return level, kind, data[:20]
    return None
