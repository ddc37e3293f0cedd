"""docs/SECURITY.md: a SIP source over `sip.rate_limit` is logged once per block, and the
sources blocked now are listed in the status (`rate_limit.blocked`).  They were only in the
workers' internal snapshot files: neither `GET /v1/status` nor `dsbc status` showed them."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.peers.net import free_port


def _flood(port: int, stop: threading.Event) -> None:
    """OPTIONS from one source at about 200/s, at most 10 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        lport = s.getsockname()[1]
        deadline = time.monotonic() + 10
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            i += 1
            s.sendto((f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{lport};"
                      f"branch=z9hG4bKfl{i}\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\n"
                      f"Call-ID: fl{i}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
                      ).encode(), ("127.0.0.1", port))
            time.sleep(0.005)


def test_status_lists_the_sources_blocked_now(dsbc_factory: Callable[..., Any]) -> None:
    node = dsbc_factory(source=[f"udp:127.0.0.1:{free_port('udp')}"],
                        target=[f"udp:127.0.0.1:{free_port('udp')}"],
                        sip_extra="rate_limit = 5\nrate_window = 2.0\n")
    stop = threading.Event()
    flooder = threading.Thread(target=_flood, args=(node.port, stop), daemon=True)
    flooder.start()
    try:
        deadline = time.monotonic() + 8
        blocked: list[str] = []
        while not blocked and time.monotonic() < deadline:
            time.sleep(0.3)
            _, st = node.control("GET", "/v1/status")
            rl = st["node"]["services"]["sip"].get("rate_limit") or {}
            blocked = rl.get("blocked") or []
        assert blocked == ["127.0.0.1"], st["node"]["services"]["sip"]
        assert rl["limit"] == 5 and rl["sources_blocked"] == 1
        text = node.cli("status").stdout
        assert "rate limit: 1 source(s) blocked now: 127.0.0.1" in text, text
    finally:
        stop.set()
        flooder.join(5)
