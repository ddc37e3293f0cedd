"""Faults (issue #7), through real processes: a node that stops answering, answers slowly
or resets connections; a store that stalls; a worker killed with SIGKILL; the disk of the
SQLite store full.  Each test shows that traffic goes on and that nothing committed is lost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers.fakenode import FakeNode
from tests.peers.proc import find_binary

pytestmark = [pytest.mark.peers, pytest.mark.timeout(120)]

Factory = Callable[..., Any]
PHONE = "127.0.0.2"
CUSTOMERS = [
    {"customer_id": "100", "identities": ["account:1001"], "system": "source"},
    {"customer_id": "200", "identities": ["account:1002"], "system": "source"},
    {"customer_id": "300", "identities": ["account:3003"], "system": "target"},
]


# --- a phone made of a UDP socket -------------------------------------------------------------


class UdpPhone:
    """REGISTERs like a phone: retransmits every 0.5 s (RFC 3261 timer E) until answered."""

    def __init__(self, user: str, ip: str = PHONE) -> None:
        self.user = user
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.addr = self.sock.getsockname()
        self.n = 0

    def register(self, dsbc: tuple[str, int], timeout: float = 5.0, contact_tag: str = "") -> tuple[int | None, float]:
        """(status of the final answer or None, seconds it took)."""
        self.n += 1
        host = f"{dsbc[0]}:{dsbc[1]}"
        lh, lp = self.addr
        msg = (
            f"REGISTER sip:{host} SIP/2.0\r\nVia: SIP/2.0/UDP {lh}:{lp};branch=z9hG4bK-ph{self.n}-{time.monotonic_ns()};rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{self.user}@{host}>;tag=p{self.n}\r\nTo: <sip:{self.user}@{host}>\r\n"
            f"Call-ID: reg-{self.user}-{lp}-{self.n}\r\nCSeq: {self.n} REGISTER\r\n"
            f"Contact: <sip:{self.user}{contact_tag}@{lh}:{lp}>\r\nExpires: 300\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        start = time.monotonic()
        deadline = start + timeout
        next_send = start
        while (now := time.monotonic()) < deadline:
            if now >= next_send:
                self.sock.sendto(msg, dsbc)
                next_send = now + 0.5
            self.sock.settimeout(max(0.01, min(next_send, deadline) - time.monotonic()))
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            if data.startswith(b"SIP/2.0 1"):
                continue
            if data.startswith(b"SIP/2.0 "):
                return int(data[8:11]), time.monotonic() - start
        return None, time.monotonic() - start

    def close(self) -> None:
        self.sock.close()


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    return cond()


def db_rows(db: Path, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


def systems_of(db: Path) -> dict[str, str]:
    return dict(db_rows(db, "SELECT customer_id, system FROM customers"))  # type: ignore[arg-type]


@pytest.fixture
def nodes() -> Iterator[tuple[FakeNode, FakeNode]]:
    with FakeNode("udp") as source, FakeNode("udp") as target:
        yield source, target


# --- the store stalls --------------------------------------------------------------------------

STALL_SCRIPT = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
con.execute("BEGIN EXCLUSIVE")
con.execute("INSERT INTO meta VALUES ('stall', 'x') ON CONFLICT(key) DO UPDATE SET value = 'y'")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("ROLLBACK")
print("released", flush=True)
"""


def test_a_stalled_store_stalls_nothing_and_loses_nothing(dsbc_factory: Factory, nodes: Any) -> None:
    source, target = nodes
    d = dsbc_factory(source=[source.uri], target=[target.uri], customers=CUSTOMERS)
    d.wait_nodes_up()
    phone = UdpPhone("1001")
    try:
        assert phone.register(d.sip_addr)[0] == 200
        assert wait_for(lambda: db_rows(d.db, "SELECT account FROM registrations WHERE account = '1001'"))
        # another process holds the store's write lock for 7 s (longer than its 5 s busy timeout)
        stall = subprocess.Popen([sys.executable, "-c", STALL_SCRIPT, str(d.db), "7"], stdout=subprocess.PIPE, text=True)
        assert stall.stdout is not None and stall.stdout.readline().strip() == "locked"
        started = time.monotonic()
        took = []
        others = [UdpPhone(u, ip) for u, ip in (("1002", "127.0.0.3"), ("3003", "127.0.0.4"))]
        while time.monotonic() - started < 5.0:
            for i, p in enumerate([phone, *others]):
                status, secs = p.register(d.sip_addr, timeout=3.0, contact_tag=f"-{i}")
                assert status == 200, f"REGISTER during the stall: {status}"
                took.append(secs)
            time.sleep(0.3)
        # a migration meanwhile fails cleanly (the store is busy), and says so
        r = d.cli("migrate", "--customer", "300", "--to", "source", check=False, timeout=30)
        still_stalled = stall.poll() is None
        assert stall.wait(15) == 0
        assert max(took) < 1.0, f"registrations waited on the store: slowest {max(took):.2f} s"
        if still_stalled:
            assert r.returncode != 0 and "busy" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
            assert systems_of(d.db)["300"] == "target"
            assert db_rows(d.db, "SELECT count(*) FROM audit WHERE customer_id = '300'")[0][0] == 0
        # after the stall: what was relayed during it reaches the store, and a migration works
        assert wait_for(
            lambda: {a for (a,) in db_rows(d.db, "SELECT account FROM registrations")} >= {"1001", "1002", "3003"},
            timeout=10,
        ), db_rows(d.db, "SELECT account, contact FROM registrations")
        r = d.cli("migrate", "--customer", "300", "--to", "source")
        assert systems_of(d.db) == {"100": "source", "200": "source", "300": "source"}
        for p in others:
            p.close()
    finally:
        phone.close()
