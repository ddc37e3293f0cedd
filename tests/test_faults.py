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

    def register(
        self, dsbc: tuple[str, int], timeout: float = 5.0, contact_tag: str = ""
    ) -> tuple[int | None, float]:
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
        call_id = f"reg-{self.user}-{lp}-{self.n}".encode()
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
            if data.startswith(b"SIP/2.0 1") or call_id not in data:
                continue  # provisional, or a late answer to an earlier REGISTER
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


def test_a_stalled_store_stalls_nothing_and_loses_nothing(
    dsbc_factory: Factory, nodes: Any
) -> None:
    source, target = nodes
    d = dsbc_factory(source=[source.uri], target=[target.uri], customers=CUSTOMERS)
    d.wait_nodes_up()
    phone = UdpPhone("1001")
    try:
        assert phone.register(d.sip_addr)[0] == 200
        assert wait_for(
            lambda: db_rows(d.db, "SELECT account FROM registrations WHERE account = '1001'")
        )
        # another process holds the store's write lock for 7 s (longer than its 5 s busy timeout)
        stall = subprocess.Popen(
            [sys.executable, "-c", STALL_SCRIPT, str(d.db), "7"], stdout=subprocess.PIPE, text=True
        )
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
            assert r.returncode != 0 and "busy" in (r.stdout + r.stderr).lower(), (
                r.stdout + r.stderr
            )
            assert systems_of(d.db)["300"] == "target"
            assert db_rows(d.db, "SELECT count(*) FROM audit WHERE customer_id = '300'")[0][0] == 0
        # after the stall: what was relayed during it reaches the store, and a migration works
        assert wait_for(
            lambda: (
                {a for (a,) in db_rows(d.db, "SELECT account FROM registrations")}
                >= {"1001", "1002", "3003"}
            ),
            timeout=10,
        ), db_rows(d.db, "SELECT account, contact FROM registrations")
        r = d.cli("migrate", "--customer", "300", "--to", "source")
        assert systems_of(d.db) == {"100": "source", "200": "source", "300": "source"}
        for p in others:
            p.close()
    finally:
        phone.close()


# --- a worker killed with SIGKILL ----------------------------------------------------------------


def worker_pids(d: Any) -> dict[int, int]:
    return {s["worker"]: s["pid"] for s in d.status() if time.time() - s.get("ts", 0) < 3}


def test_a_killed_worker_is_restarted_and_the_others_keep_serving(
    dsbc_factory: Factory, nodes: Any
) -> None:
    source, target = nodes
    d = dsbc_factory(source=[source.uri], target=[target.uri], customers=CUSTOMERS, workers=2)
    d.wait_nodes_up()
    pids = wait_for(lambda: len(worker_pids(d)) == 2 and worker_pids(d))
    assert pids, d.status()
    phones = [UdpPhone("1001", f"127.0.0.{2 + i % 3}") for i in range(8)]
    try:
        assert all(p.register(d.sip_addr)[0] == 200 for p in phones)
        d.cli("migrate", "--customer", "300", "--to", "source")  # committed before the kill
        assert wait_for(lambda: len(db_rows(d.db, "SELECT contact FROM registrations")) == 8)
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        failures = []
        while time.monotonic() - killed_at < 3.0:
            for p in phones:
                status, _ = p.register(d.sip_addr, timeout=2.0)
                if status != 200:
                    failures.append(status)
        assert failures == [], (f"{len(failures)} registrations failed while a worker was down", d.status())
        new = wait_for(
            lambda: worker_pids(d).get(1) not in (None, pids[1]) and worker_pids(d), timeout=10
        )
        assert new and new[1] != pids[1] and new[0] == pids[0], (pids, new)
        assert d.proc is not None and d.proc.alive
        assert "restarting it" in d.log_tail(200)
        # nothing committed was lost: the migration holds for every worker, old and new
        phone = UdpPhone("3003", "127.0.0.4")
        for _ in range(6):
            assert phone.register(d.sip_addr)[0] == 200
        phone.close()
        assert len([r for r in source.requests("REGISTER") if "3003" in (r.get("to") or "")]) == 6
        assert [r for r in target.requests("REGISTER") if "3003" in (r.get("to") or "")] == []
        assert systems_of(d.db)["300"] == "source"
        assert len(db_rows(d.db, "SELECT contact FROM registrations WHERE account = '1001'")) == 8
    finally:
        for p in phones:
            p.close()


# --- the disk of the SQLite store is full ------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs (root only: mount); skipped where it cannot be mounted."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Fill the file system up to its last block; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_fails_migrations_cleanly_and_traffic_goes_on(
    dsbc_factory: Factory, nodes: Any, small_disk: Path
) -> None:
    source, target = nodes
    many = [
        {"customer_id": str(1000 + i), "identities": [f"account:{5000 + i}"], "system": "source"}
        for i in range(1500)
    ]
    d = dsbc_factory(
        source=[source.uri],
        target=[target.uri],
        customers=CUSTOMERS + many,
        db=small_disk / "location.db",
    )
    d.wait_nodes_up()
    phone = UdpPhone("1001")
    try:
        assert phone.register(d.sip_addr)[0] == 200
        assert wait_for(lambda: db_rows(d.db, "SELECT 1 FROM registrations WHERE account = '1001'"))
        before = systems_of(d.db)
        audit_before = db_rows(d.db, "SELECT count(*) FROM audit")[0][0]
        # empty the WAL so that every new write needs new blocks, then fill the disk
        con = sqlite3.connect(str(d.db), timeout=10)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        filler = fill(small_disk)
        ids = [c["customer_id"] for c in many]
        batch = d.workdir / "batch.txt"
        batch.write_text("\n".join(ids) + "\n")
        r = d.cli("migrate", "--batch", str(batch), "--to", "target", check=False, timeout=60)
        out = (r.stdout + r.stderr).lower()
        assert r.returncode != 0, out
        assert "full" in out and "nothing was changed" in out, out
        assert "traceback" not in out
        # nothing half-applied: not one customer moved, no audit line, the file is sound
        assert systems_of(d.db) == before
        assert db_rows(d.db, "SELECT count(*) FROM audit")[0][0] == audit_before
        assert db_rows(d.db, "PRAGMA integrity_check") == [("ok",)]
        # an import on the full disk: all or nothing as well
        extra = d.workdir / "more.jsonl"
        extra.write_text(
            "".join(
                json.dumps(
                    {"customer_id": f"x{i}", "identities": [f"account:x{i}"], "system": "target"}
                )
                + "\n"
                for i in range(500)
            )
        )
        r = d.cli("import", str(extra), check=False, timeout=60)
        assert r.returncode != 0 and "traceback" not in (r.stdout + r.stderr).lower(), (
            r.stdout + r.stderr
        )
        assert (
            db_rows(d.db, "SELECT count(*) FROM customers WHERE customer_id LIKE 'x%'")[0][0] == 0
        )
        # SIP goes on while the disk is full (registrations wait in memory)
        for i in range(5):
            assert phone.register(d.sip_addr, contact_tag=f"-full{i}")[0] == 200
        assert d.proc is not None and d.proc.alive
        # space again: the migration goes through whole, the registrations are written
        filler.unlink()
        r = d.cli("migrate", "--batch", str(batch), "--to", "target", timeout=60)
        after = systems_of(d.db)
        assert all(after[i] == "target" for i in ids) and after["100"] == "source"
        assert wait_for(
            lambda: len(db_rows(d.db, "SELECT 1 FROM registrations WHERE account = '1001'")) >= 6,
            timeout=10,
        )
        moved = UdpPhone(str(5000 + 7), "127.0.0.3")
        assert wait_for(
            lambda: moved.register(d.sip_addr)[0] == 200 and target.requests("REGISTER"), timeout=5
        )
        moved.close()
    finally:
        phone.close()


# --- a system's node stops answering, answers slowly, resets connections ----------------------------


def registrations_at(node: Any, user: str) -> int:
    if isinstance(node, FakeNode):
        return len([r for r in node.requests("REGISTER") if f"sip:{user}@" in (r.get("to") or "")])
    return len(node.registrations(user)) if node.registered(user) else 0


@pytest.mark.skipif(find_binary("kamailio") is None, reason="kamailio is not installed")
def test_a_node_that_stops_answering_fails_over_within_its_system(
    kamailio_factory: Factory, dsbc_factory: Factory
) -> None:
    source = kamailio_factory("source", extra_trusted=["127.0.0.1"])
    t0 = kamailio_factory("target", extra_trusted=["127.0.0.1"])
    t1 = kamailio_factory("target1", extra_trusted=["127.0.0.1"])
    d = dsbc_factory(
        source=[f"udp:{source.ip}:{source.port}"],
        target=[f"udp:{t.ip}:{t.port}" for t in (t0, t1)],
        customers=CUSTOMERS,
    )
    d.wait_nodes_up()
    phone = UdpPhone("3003")
    try:
        assert phone.register(d.sip_addr)[0] == 200
        assert t0.registered("3003") and not t1.registered("3003")
        assert t0.proc is not None
        t0.proc.send_signal(signal.SIGSTOP)  # hung: the process is there, nothing answers
        try:
            status, took = phone.register(d.sip_addr, timeout=8.0)
            assert status == 200, "no failover to the other node of the same system"
            assert t1.registered("3003")
            assert source.registered("3003") == []  # never the other system
            assert took < 4.0
        finally:
            t0.proc.send_signal(signal.SIGCONT)
        # the node answers again: it is up again and first in line
        assert wait_for(
            lambda: all(n["up"] for n in d.status()[0]["services"]["sip"]["nodes"]), timeout=5
        )
        assert phone.register(d.sip_addr)[0] == 200
        last = f"reg-3003-{phone.addr[1]}-{phone.n}"
        assert wait_for(
            lambda: any(r.get("callid") == last for r in t0.requests("REGISTER")), timeout=3
        )
        assert not any(r.get("callid") == last for r in t1.requests("REGISTER"))
    finally:
        phone.close()


def test_a_slow_node_delays_only_its_own_answers(dsbc_factory: Factory) -> None:
    with FakeNode("udp", delay=1.5) as slow, FakeNode("udp") as spare, FakeNode("udp") as target:
        d = dsbc_factory(source=[slow.uri, spare.uri], target=[target.uri], customers=CUSTOMERS)
        d.wait_nodes_up()
        slow.mode = "slow"  # requests answered 1.5 s late, health pings on time
        a, b = UdpPhone("1001"), UdpPhone("3003", "127.0.0.3")
        try:
            import threading

            result: dict[str, Any] = {}
            t = threading.Thread(
                target=lambda: result.update(a=a.register(d.sip_addr, timeout=6.0))
            )
            t.start()
            fast = [b.register(d.sip_addr) for _ in range(5)]  # meanwhile, another customer
            t.join(10)
            assert all(st == 200 and secs < 0.5 for st, secs in fast), fast
            status, took = result["a"]
            assert status == 200 and 1.3 < took < 4.0  # the late answer was relayed
            assert registrations_at(spare, "1001") == 0  # a slow node is not a dead one
            # slow on health pings too (longer than options_timeout): down, the spare takes over
            slow.mode = "slow_all"
            assert wait_for(
                lambda: not d.status()[0]["services"]["sip"]["nodes"][0]["up"], timeout=6
            )
            status, took = a.register(d.sip_addr)
            assert status == 200 and took < 1.0 and registrations_at(spare, "1001") >= 1
            assert registrations_at(target, "1001") == 0
        finally:
            a.close()
            b.close()


def test_a_node_that_resets_connections_fails_over(dsbc_factory: Factory) -> None:
    with FakeNode("tcp") as resetting, FakeNode("udp") as spare, FakeNode("udp") as target:
        resetting.mode = "reset"
        d = dsbc_factory(
            source=[resetting.uri, spare.uri], target=[target.uri], customers=CUSTOMERS
        )
        phone = UdpPhone("1001")
        try:
            status, took = phone.register(d.sip_addr, timeout=8.0)
            assert status == 200 and took < 4.0, (status, took)
            assert registrations_at(spare, "1001") >= 1 and registrations_at(target, "1001") == 0
            c = d.counters()
            assert c.get("internal_errors", 0) == 0
            # every reset was absorbed: dsbc is still answering
            status, took = phone.register(d.sip_addr)
            assert status == 200 and took < 1.0
            assert d.proc is not None and d.proc.alive
        finally:
            phone.close()


def test_a_tcp_phones_request_to_a_node_that_just_died_is_answered_503(dsbc_factory: Factory) -> None:
    """Found by an audit: a node reached over TCP that died between two health pings (its
    connection closed, the new one refused) lost the request that found it dead.  A phone
    over UDP retransmits it to the next node, but a phone over TCP or TLS never
    retransmits: it heard nothing for 32 s (Timer F / B).  The transport's error is
    answered as RFC 3261 16.9 says, as a 503 (with Retry-After) from the node; the phone's
    next request goes to the next node of the same system."""
    with FakeNode("tcp") as dying, FakeNode("udp") as spare, FakeNode("udp") as target:
        d = dsbc_factory(source=[dying.uri, spare.uri], target=[target.uri], customers=CUSTOMERS,
                         options_interval=5.0, options_timeout=2.0)
        time.sleep(1.0)  # the first pings answered: the TCP node is up, its connection open
        dying.stop()
        time.sleep(0.3)  # its connection's close is seen
        c = socket.create_connection(d.sip_addr, timeout=5)
        try:
            lhost, lport = c.getsockname()
            for n in (1, 2):
                c.sendall(
                    f"REGISTER sip:{d.ip} SIP/2.0\r\n"
                    f"Via: SIP/2.0/TCP {lhost}:{lport};branch=z9hG4bK-dead-{n};rport\r\n"
                    f"Max-Forwards: 70\r\nFrom: <sip:1001@{d.ip}>;tag=t{n}\r\nTo: <sip:1001@{d.ip}>\r\n"
                    f"Call-ID: dead-node-{n}\r\nCSeq: {n} REGISTER\r\n"
                    f"Contact: <sip:1001@{lhost}:{lport};transport=tcp>\r\nContent-Length: 0\r\n\r\n".encode()
                )
                c.settimeout(3.0)
                answer = c.recv(65535).decode("utf-8", "replace")
                first = answer.split("\r\n", 1)[0]
                if n == 1:
                    assert first == "SIP/2.0 503 Service Unavailable", answer
                    assert "Retry-After:" in answer
                else:  # failed over within the system
                    assert first == "SIP/2.0 200 OK", answer
                    assert registrations_at(spare, "1001") == 1 and registrations_at(target, "1001") == 0
        finally:
            c.close()


# --- an API back end that hangs or resets -----------------------------------------------------------

BILLING_SCRIPT = """
import asyncio, json, sys
from dsbc.emulator.billing import sample_rows, start_billing_emulator

async def main():
    src = await start_billing_emulator("MR100", "127.0.0.1", 0, sample_rows(), system="source")
    tgt = await start_billing_emulator("MR115", "127.0.0.1", 0, sample_rows(), system="target")
    print(json.dumps({"source": src.url, "target": tgt.url}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""
HOST = "www.customer.billing.com"


@pytest.fixture
def urls() -> Iterator[dict[str, str]]:
    """The two emulated billing systems, in a child process: {"source": url, "target": url}."""
    billing = subprocess.Popen(
        [sys.executable, "-c", BILLING_SCRIPT],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert billing.stdout is not None
        yield json.loads(billing.stdout.readline())
    finally:
        billing.kill()
        billing.wait(5)


def api_call(
    base: str,
    name: str,
    params: dict[str, Any],
    auth: dict[str, Any] | None = None,
    timeout: float = 10,
) -> tuple[int, Any, float]:
    import urllib.error
    import urllib.parse
    import urllib.request

    form = {"params": json.dumps(params)}
    if auth:
        form["auth_info"] = json.dumps(auth)
    req = urllib.request.Request(
        f"{base}/rest/{name}", data=urllib.parse.urlencode(form).encode(), headers={"Host": HOST}
    )
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.monotonic() - start
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body[:1] == b"{" else body, time.monotonic() - start


def test_an_api_back_end_that_hangs_or_resets_affects_only_its_own_customers(
    dsbc_factory: Factory, urls: dict[str, str]
) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlsplit

    from dsbc.emulator.billing import sample_rows
    from tests.peers.net import free_port
    from tests.peers.redis import TcpProxy

    src = urlsplit(urls["source"])
    proxy = TcpProxy((src.hostname or "127.0.0.1", src.port or 80))
    api_port = free_port("tcp")
    api = (
        f'[api]\nlisten = ["127.0.0.1:{api_port}"]\ntimeout = 2.0\nconnect_timeout = 1.0\n'
        f'[[api.vhosts]]\nhost = "{HOST}"\nrealm = "customer"\n'
        f'source = "http://127.0.0.1:{proxy.port}"\ntarget = "{urls["target"]}"\n'
    )
    d = dsbc_factory(customers=sample_rows(), api=api)
    base = f"http://127.0.0.1:{api_port}"
    assert wait_for(lambda: _up(base), timeout=10)
    st, alice, _ = api_call(base, "Session/login", {"login": "alice", "password": "secret"})
    assert st == 200, alice
    st, dave, _ = api_call(base, "Session/login", {"login": "dave", "password": "secret"})
    assert st == 200, dave

    def alice_info() -> tuple[int, Any, float]:
        return api_call(base, "Customer/get_customer_info", {}, {"session_id": alice["session_id"]})

    def dave_info() -> tuple[int, Any, float]:
        return api_call(base, "Customer/get_customer_info", {}, {"session_id": dave["session_id"]})

    with ThreadPoolExecutor(4) as pool:
        for fault in ("stall", "cut"):
            getattr(proxy, fault)()
            time.sleep(0.3)  # the relay's threads notice (they poll every 0.1 s)
            hung = pool.submit(alice_info)
            others = [dave_info() for _ in range(5)]  # meanwhile, the target's customer
            st, doc, took = hung.result(15)
            assert st == 500 and doc["faultcode"] == "Server.Dispatcher.backend_unavailable", (
                fault,
                doc,
            )
            assert took < 4.0, f"{fault}: a fault after {took:.1f} s"
            assert all(
                s == 200 and t < 1.0 and o["customer_info"]["login"] == "dave" for s, o, t in others
            ), others
            proxy.heal()
            # the source answers again and alice's session (remembered by dsbc) still works
            st, doc, _ = (
                wait_for(lambda: (r := alice_info())[0] == 200 and r, timeout=5) or alice_info()
            )
            assert st == 200 and doc["customer_info"]["login"] == "alice"
    assert d.proc is not None and d.proc.alive
    proxy.close()


def _up(base: str) -> bool:
    try:
        api_call(base, "Session/ping", {}, timeout=1)
        return True
    except OSError:
        return False


def test_a_stalled_store_stalls_neither_api_logins_nor_sip(
    dsbc_factory: Factory, nodes: Any, urls: dict[str, str]
) -> None:
    from dsbc.emulator.billing import sample_rows
    from tests.peers.net import free_port

    source, target = nodes
    api_port = free_port("tcp")
    api = (
        f'[api]\nlisten = ["127.0.0.1:{api_port}"]\ntimeout = 3.0\n'
        f'[[api.vhosts]]\nhost = "{HOST}"\nrealm = "customer"\nsource = "{urls["source"]}"\ntarget = "{urls["target"]}"\n'
    )
    rows = [*sample_rows(), *CUSTOMERS]
    d = dsbc_factory(source=[source.uri], target=[target.uri], customers=rows, api=api)
    d.wait_nodes_up()
    base = f"http://127.0.0.1:{api_port}"
    assert wait_for(lambda: _up(base), timeout=10)
    phone = UdpPhone("1001")
    stall = subprocess.Popen(
        [sys.executable, "-c", STALL_SCRIPT, str(d.db), "6"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert stall.stdout is not None and stall.stdout.readline().strip() == "locked"
        logins = []
        for user in ("alice", "dave", "bob"):
            st, doc, took = api_call(base, "Session/login", {"login": user, "password": "secret"})
            assert st == 200, doc
            logins.append((user, doc, took))
            status, secs = phone.register(d.sip_addr, timeout=3)
            assert status == 200 and secs < 1.0, (status, secs)
        assert max(t for _, _, t in logins) < 1.5, [(u, round(t, 2)) for u, _, t in logins]
        # the sessions work at once (this node remembers them) ...
        for user, doc, _ in logins:
            st, info, took = api_call(
                base, "Customer/get_customer_info", {}, {"session_id": doc["session_id"]}
            )
            assert st == 200 and info["customer_info"]["login"] == user and took < 1.5
    finally:
        stall.wait(15)
        phone.close()
    # ... and reach the store once it is free again: nothing was lost
    from api_proxy.records import session_key

    want = {session_key("sid", doc["session_id"]) for _, doc, _ in logins}
    keys = wait_for(
        lambda: want <= (k := {k for (k,) in db_rows(d.db, "SELECT key FROM sessions")}) and k,
        timeout=10,
    )
    assert keys and want <= keys, keys
