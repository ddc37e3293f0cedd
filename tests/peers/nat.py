"""A tiny UDP NAT on loopback: the server sees the NAT's address, the Contact says the phone's.

    with UdpNat(server=dsbc_addr) as nat:                    # outside: 127.0.0.4:<port>
        phone = Phone("1001", *nat.inside_addr, ...)          # the phone sends to the NAT
        ...
        nat.rebind()      # the NAT forgets the binding: a new outside port, as routers do

Packets from the phone to `inside_addr` leave from `outside_addr` to the server; packets
arriving at `outside_addr` from anyone (full cone, endpoint-independent filtering) go to the
phone (the last inside address seen). Payloads are never rewritten, so Via and Contact keep
the phone's own address: exactly what a SIP server behind real NAT must cope with
(rport/received, Path flow tokens).
"""

from __future__ import annotations

import selectors
import socket
import threading
from typing import Self

from tests.peers.net import loopback_alias_works

__all__ = ["UdpNat"]


class UdpNat:
    def __init__(
        self,
        server: tuple[str, int],
        inside_ip: str = "127.0.0.1",
        outside_ip: str = "127.0.0.4",
    ) -> None:
        for ip in (inside_ip, outside_ip):
            if not ip.startswith("127."):
                raise ValueError(f"tests bind loopback only, not {ip}")
        self.server = server
        self.inside_ip = inside_ip
        self.outside_ip = outside_ip
        self.phone: tuple[str, int] | None = None  # learnt from the first inside packet
        self.to_server = 0  # datagrams forwarded outwards
        self.to_phone = 0  # datagrams forwarded inwards
        self.dropped = 0  # arrived outside before any phone was seen
        self._inside: socket.socket | None = None
        self._outside: socket.socket | None = None
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def inside_addr(self) -> tuple[str, int]:
        """Where the phone sends (use it as the phone's registrar / outbound address)."""
        assert self._inside is not None, "not started"
        addr: tuple[str, int] = self._inside.getsockname()
        return addr

    @property
    def outside_addr(self) -> tuple[str, int]:
        """The address the server sees as the packets' source."""
        assert self._outside is not None, "not started"
        addr: tuple[str, int] = self._outside.getsockname()
        return addr

    def start(self) -> Self:
        if not loopback_alias_works(self.outside_ip):
            raise OSError(f"cannot bind {self.outside_ip}: loopback alias missing")
        self._inside = self._bind(self.inside_ip)
        self._sel.register(self._inside, selectors.EVENT_READ, "inside")
        self._bind_outside()
        self._thread = threading.Thread(target=self._run, name="udp-nat", daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _bind(ip: str) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, 0))
        s.setblocking(False)
        return s

    def _bind_outside(self) -> None:
        self._outside = self._bind(self.outside_ip)
        self._sel.register(self._outside, selectors.EVENT_READ, "outside")

    def rebind(self) -> tuple[str, int]:
        """Drop the current binding and take a new outside port (returned). Packets sent to
        the old outside address are lost from now on, as behind a NAT that timed out."""
        with self._lock:
            old = self._outside
            assert old is not None, "not started"
            self._sel.unregister(old)
            old.close()
            self._bind_outside()
            return self.outside_addr

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                events = self._sel.select(timeout=0.05)
                for key, _ in events:
                    self._forward(key.fileobj, key.data)  # type: ignore[arg-type]

    def _forward(self, sock: socket.socket, side: str) -> None:
        assert self._inside is not None and self._outside is not None
        for _ in range(64):  # drain, bounded
            try:
                data, src = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP port unreachable from an earlier send, socket closed
                continue
            try:
                if side == "inside":
                    self.phone = src
                    self._outside.sendto(data, self.server)
                    self.to_server += 1
                elif self.phone is not None:
                    self._inside.sendto(data, self.phone)
                    self.to_phone += 1
                else:
                    self.dropped += 1
            except OSError:
                pass  # the peer's port is closed: a real NAT drops too

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        for s in (self._inside, self._outside):
            if s is not None:
                s.close()
        self._sel.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        inside = self._inside.getsockname() if self._inside else None
        outside = self._outside.getsockname() if self._outside else None
        return f"UdpNat(phone={self.phone} -> {inside} | {outside} -> server={self.server})"
