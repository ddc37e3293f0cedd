"""Socket options shared by dsbc's UDP listeners (SIP here, RADIUS in ``dsbc.radius``)."""

from __future__ import annotations

import socket
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
