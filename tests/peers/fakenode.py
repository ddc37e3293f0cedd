"""A scriptable back-end SIP node for security and fault tests (UDP, TCP or TLS).

    with FakeNode("udp") as node:                 # 127.0.0.1:<free port>
        node.addr                                  # ("127.0.0.1", port)
        node.requests("INVITE")                    # raw requests received, parsed (sipmsg)
        node.send(raw, to=dsbc.sip_addr)           # a request from the node (a trusted peer)
        node.mode = "silent" | "slow" | "slow_all" | "reset"   # faults: stop answering,
                                                 # answer late (OPTIONS too), RST

It answers OPTIONS (the health pings) and every request but ACK with 200 (Record-Route
and Via copied, a To tag added; ``delay`` seconds late in "slow" mode, health pings late
too in "slow_all" mode), answers nothing in "silent" mode, and in "reset" mode closes
stream connections with a TCP reset (UDP: nothing).  ``accepted`` counts stream connections, so a test can see that dsbc reuses one.
Runs in threads; everything is bounded by the socket timeouts and stopped by ``stop()``.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import struct
import threading
import time
from typing import Self

from sip.framing import NEED_DATA, PING, StreamFramer
from tests.peers.net import free_port
from tests.peers.sipmsg import SipText, parse_message

__all__ = ["FakeNode", "response_to"]

_tags = itertools.count(1)


def response_to(
    raw: bytes, status: int = 200, reason: str = "OK", extra: str = "", contact: str = ""
) -> bytes:
    """A response to request ``raw``: Via, Record-Route, From, To (+tag), Call-ID, CSeq,
    and ``contact`` (a URI) as Contact if given."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
    lines = [f"SIP/2.0 {status} {reason}"]
    for line in head[1:]:
        name = line.split(":", 1)[0].strip().lower()
        if name in ("via", "v", "from", "f", "call-id", "i", "cseq", "record-route"):
            lines.append(line)
        elif name in ("to", "t"):
            lines.append(line if ";tag=" in line else f"{line};tag=fn{next(_tags)}")
    if contact:
        lines.append(f"Contact: <{contact}>")
    lines.append("X-System: fakenode")
    if extra:
        lines.append(extra.rstrip("\r\n"))
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class FakeNode:
    def __init__(
        self,
        transport: str = "udp",
        ip: str = "127.0.0.1",
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        delay: float = 2.0,
    ) -> None:
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(transport)
        if transport == "tls" and ssl_context is None:
            raise ValueError("a tls node needs an ssl_context")
        self.transport = transport
        self.ip = ip
        self.port = port or free_port("udp" if transport == "udp" else "tcp", ip)
        self.ssl_context = ssl_context
        self.delay = delay
        self.mode = "answer"
        self.received: list[bytes] = []
        self.accepted = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self.sock: socket.socket | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return self.ip, self.port

    @property
    def uri(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.transport}:{host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Self:
        family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        if self.transport == "udp":
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.bind(self.addr)
            self.sock.settimeout(0.2)
            self._spawn(self._udp_loop)
        else:
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(self.addr)
            self.sock.listen(64)
            self.sock.settimeout(0.2)
            self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(3)
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        if self.sock is not None:
            self.sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    # -- what it saw -----------------------------------------------------------------
    def requests(self, method: str = "") -> list[SipText]:
        with self.lock:
            raws = list(self.received)
        out = []
        for raw in raws:
            if raw.startswith(b"SIP/"):
                continue
            if method and not raw.startswith(method.encode() + b" "):
                continue
            out.append(parse_message(raw.decode("utf-8", "replace")))
        return out

    def responses(self) -> list[SipText]:
        with self.lock:
            return [
                parse_message(r.decode("utf-8", "replace"))
                for r in self.received
                if r.startswith(b"SIP/")
            ]

    # -- sending ---------------------------------------------------------------------
    def send(self, raw: bytes, to: tuple[str, int]) -> None:
        """Send a message from the node's own socket (UDP) or its newest connection."""
        if self.transport == "udp":
            assert self.sock is not None
            self.sock.sendto(raw, to)
        else:
            with self.lock:
                conn = self._conns[-1]
            conn.sendall(raw)

    # -- serving ---------------------------------------------------------------------
    def _handle(self, raw: bytes) -> bytes | None:
        with self.lock:
            self.received.append(raw)
        if raw.startswith((b"SIP/", b"ACK ")):
            return None
        mode = self.mode
        if mode in ("silent", "reset"):
            return None
        if mode == "slow_all" or (mode == "slow" and not raw.startswith(b"OPTIONS ")):
            time.sleep(self.delay)
        if raw.startswith(b"REGISTER "):
            # a registrar: the bindings of the request come back in the 200
            head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
            contacts = [
                h.split(":", 1)[1].strip()
                for h in head
                if h.split(":", 1)[0].strip().lower() in ("contact", "m")
            ]
            extra = "\r\n".join(f"Contact: {c};expires=300" for c in contacts if c != "*")
            return response_to(raw, extra=extra)
        return response_to(
            raw, contact=f"sip:node@{self.ip}:{self.port};transport={self.transport}"
        )

    def _udp_loop(self) -> None:
        assert self.sock is not None
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if self.mode == "slow_all" or (self.mode == "slow" and not data.startswith(b"OPTIONS ")):
                self._spawn(self._udp_reply_later, data, peer)
                continue
            out = self._handle(data)
            if out:
                try:
                    self.sock.sendto(out, peer)
                except OSError:
                    pass

    def _udp_reply_later(self, data: bytes, peer: tuple[str, int]) -> None:
        out = self._handle(data)
        if out and self.sock is not None and not self._stop.is_set():
            try:
                self.sock.sendto(out, peer)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        assert self.sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # RST
                continue
            if self.ssl_context is not None:
                conn.settimeout(3)
                try:
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    conn.close()
                    continue
            conn.settimeout(0.2)
            with self.lock:
                self.accepted += 1
                self._conns.append(conn)
            self._spawn(self._stream_loop, conn)

    def _stream_loop(self, conn: socket.socket) -> None:
        framer = StreamFramer(1 << 20)
        while not self._stop.is_set():
            try:
                data = conn.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            framer.receive_data(data)
            while True:
                event = framer.next_event()
                if event is NEED_DATA:
                    break
                if event is PING:
                    conn.sendall(b"\r\n")
                    continue
                assert isinstance(event, bytes)
                out = self._handle(event)
                if out:
                    try:
                        conn.sendall(out)
                    except OSError:
                        return
