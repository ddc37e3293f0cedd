"""High availability end to end: two `dsbc run` nodes on one Redis store, sipp phones and
two emulated back-end SIP systems (dsbc/emulator/sip_system.py, in this process).

- a migration through node A's control API reaches node B's routing within 100 ms, and
  the store survives a Redis restart with nothing lost (appendonly);
- Redis stopped while sipp calls run through a node: no failed call; a migration made
  meanwhile through the other path (the CLI, straight into Redis, while the node is still
  cut off) is picked up when the node reaches Redis again;
- migration under load: calls at a steady rate and phones re-registering while customers
  move in batches: no failed call (no 503 either), every dialog stays on the system where
  it started, every dialog started after its customer's flip lands on the target
  (`@pytest.mark.slow` runs a longer, bigger version);
- SIGHUP (config reload) during sipp traffic: no failed call, new worker processes.

Phones are on 127.0.0.2 (not trusted peers), the systems on 127.0.0.1.  Every test prints
its numbers (look for "HA:" in the output, or run with -s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dsbc.emulator.sip_system import SipSystem
from tests.peers.dsbc import Dsbc
from tests.peers.proc import find_binary
from tests.peers.redis import RedisServer, TcpProxy
from tests.peers.sipp import SCENARIOS, SippResult, SippServer

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(find_binary("redis-server") is None, reason="redis-server is not installed"),
    pytest.mark.skipif(find_binary("sipp") is None, reason="sipp is not installed"),
]

PHONE_IP = "127.0.0.2"
# the bundled scenarios with the phone's user taken from the injection file ([field0])
UAC = (SCENARIOS / "uac_call.xml").read_text().replace("[caller]", "[field0]")
REGISTER = (
    (SCENARIOS / "register.xml").read_text().replace("[service]", "[field0]").replace("[contact_user]", "[field0]")
)


def customers(n: int) -> list[dict[str, Any]]:
    return [{"customer_id": str(i), "identities": [f"account:u{i}"]} for i in range(n)]


def report(request: pytest.FixtureRequest, text: str) -> None:
    """A line in the test output even without -s."""
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if tr is None or capture is None:
        print(f"HA: {text}")
        return
    with capture.global_and_fixture_disabled():
        tr.write_line(f"\nHA: {request.node.name}: {text}")


# --- the back-end systems, in this process -----------------------------------------------------


class Systems:
    """Source (MR100) and target (MR115) emulated SIP systems on a loop of their own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sip-systems", daemon=True)
        self.source = SipSystem("MR100", "127.0.0.1", 0, ("udp",), answer_all=True, max_expires=120)
        self.target = SipSystem("MR115", "127.0.0.1", 0, ("udp",), answer_all=True, max_expires=120)

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> Systems:
        self.thread.start()
        self.run(self.source.start())
        self.run(self.target.start())
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.source.stop())
            self.run(self.target.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def sip(self) -> dict[str, list[str]]:
        return {"source": [f"udp:127.0.0.1:{self.source.port}"], "target": [f"udp:127.0.0.1:{self.target.port}"]}

    def calls(self) -> list[dict[str, Any]]:
        async def copy() -> list[dict[str, Any]]:
            return [dict(e, methods=list(e["methods"])) for s in (self.source, self.target) for e in s.calls]

        return self.run(copy())  # type: ignore[no-any-return]

    def registered_on(self, system: str, users: list[str]) -> int:
        node = self.source if system == "source" else self.target

        async def count() -> int:
            return sum(1 for u in users if node.registered(u))

        return self.run(count())  # type: ignore[no-any-return]


@pytest.fixture
def systems() -> Iterator[Systems]:
    s = Systems().start()
    yield s
    s.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as r:
        yield r


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., Dsbc]]:
    started: list[Dsbc] = []

    def make(name: str, **kw: Any) -> Dsbc:
        d = Dsbc(tmp_path / name, options_interval=0.5, options_timeout=1.0, **kw)
        started.append(d)
        d.start()
        wait_for(lambda: healthz(d)[0] != 0, 10)  # the control API starts after SIP
        return d

    yield make
    for d in reversed(started):
        with contextlib.suppress(Exception):
            d.stop()


def phones(name: str, remote: tuple[str, int], users: list[str], *, rate: float, calls: int, workdir: Path,
           hold_ms: int = 1500) -> SippServer:
    """sipp calling `echo` from each user in turn (u0, u1, ...), in the background."""
    return SippServer(UAC, local_ip=PHONE_IP, remote=remote, rate=rate, calls=calls, service="echo",
                      inf=[[u] for u in users], duration_ms=hold_ms, timeout=300, workdir=workdir / name).start()


def registrations(remote: tuple[str, int], users: list[str], *, rate: float, calls: int, workdir: Path) -> SippServer:
    return SippServer(REGISTER, local_ip=PHONE_IP, remote=remote, rate=rate, calls=calls,
                      keys={"expires": "120"}, inf=[[u] for u in users], timeout=300,
                      workdir=workdir / "register").start()


def finish(sipp: SippServer, timeout: float) -> SippResult:
    res = sipp.wait(timeout)
    if res is None:
        res = sipp.stop()
    return res


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(step)
    return time.monotonic() - started


def healthz(node: Dsbc) -> tuple[int, Any]:
    """(status, body) of /healthz; (0, None) while the control API does not answer yet."""
    try:
        return node.control("GET", "/healthz", token=None, timeout=2)
    except OSError:  # urllib's URLError, a reset connection
        return 0, None


def system_of(node: Dsbc, user: str) -> str:
    status, body = node.control("GET", f"/v1/identities/account/{user}", timeout=5)
    assert status == 200, body
    return str(body["system"])


def metric(node: Dsbc, name: str) -> float:
    status, text = node.control("GET", "/metrics", token=None)
    assert status == 200
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- two nodes, one store -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_migration_through_a_reaches_b_at_once_and_survives_a_redis_restart(
    request: pytest.FixtureRequest, systems: Systems, redis: RedisServer, nodes: Callable[..., Dsbc]
) -> None:
    sip = systems.sip()
    a = nodes("a", **sip, customers=customers(50), store_url=redis.url)
    b = nodes("b", **sip, store_url=redis.url)
    a.wait_nodes_up()
    b.wait_nodes_up()
    delays: list[float] = []
    for i in range(5):  # five single migrations: the worst one counts
        user = f"u{i}"
        assert system_of(b, user) == "source"
        t0 = time.monotonic()
        status, body = a.control("POST", "/v1/migrations", {"customers": [str(i)], "to": "target"})
        assert status == 200 and body["moved"] == [str(i)], body
        while system_of(b, user) != "target":
            assert time.monotonic() - t0 < 2.0, "node B never saw the migration"
        delays.append(time.monotonic() - t0)
    report(request, f"migration via A seen by B after {', '.join(f'{d * 1000:.0f}' for d in delays)} ms "
                    f"(from the POST to A, through B's control API)")
    assert max(delays) < 0.100

    batches = [x["batch_id"] for x in a.control("GET", "/v1/status")[1]["store"]["batches"]]
    redis.restart()
    for n in (a, b):
        wait_for(lambda n=n: healthz(n)[0] == 200 and healthz(n)[1]["store"]["healthy"], 10)
    # nothing lost: both nodes, and the store read directly, still have every change
    assert [system_of(b, f"u{i}") for i in range(6)] == ["target"] * 5 + ["source"]
    r = a.cli("where", "account:u4")
    assert "system:   target (MR115)" in r.stdout
    st = a.control("GET", "/v1/status")[1]["store"]
    assert [x["batch_id"] for x in st["batches"]] == batches
    assert st["counts"]["customers.target.active"] == 5
    # and it goes on working
    status, body = b.control("POST", "/v1/migrations", {"customers": ["5"], "to": "target"})
    assert status == 200
    wait_for(lambda: system_of(a, "u5") == "target", 2)
    r = a.cli("status")
    assert "store: healthy" in r.stdout


@pytest.mark.timeout(120)
def test_redis_away_during_traffic(
    request: pytest.FixtureRequest, systems: Systems, redis: RedisServer, nodes: Callable[..., Dsbc], tmp_path: Path
) -> None:
    proxy = TcpProxy(redis.addr)  # node B reaches Redis through it: a partition on demand
    try:
        sip = systems.sip()
        a = nodes("a", **sip, customers=customers(40), store_url=redis.url)
        b = nodes("b", **sip, store_url=proxy.url())
        b.wait_nodes_up()
        users = [f"u{i}" for i in range(40)]
        calls = phones("calls", b.sip_addr, users, rate=10, calls=180, workdir=tmp_path, hold_ms=1000)
        time.sleep(2)
        redis.stop()
        wait_for(lambda: not b.control("GET", "/healthz", token=None)[1]["store"]["healthy"], 5)
        hz = b.control("GET", "/healthz", token=None)
        assert hz[0] == 200 and hz[1]["status"] == "degraded" and "cannot reach" in hz[1]["store"]["reason"]
        wait_for(lambda: metric(b, "dsbc_store_healthy") == 0, 5)
        status, body = a.control("POST", "/v1/migrations", {"customers": ["0"], "to": "target"})
        assert status == 503 and "cannot reach" in body["error"], body
        time.sleep(3)  # calls go on from memory
        proxy.cut()
        redis.start()
        # the other path: the CLI straight into Redis, while node B cannot see it
        r = a.cli("migrate", "--customer", "0", "--customer", "1", "--to", "target")
        assert "moved 2" in r.stdout
        time.sleep(1)
        assert system_of(b, "u0") == "source"  # B is still cut off, dispatching from memory
        proxy.heal()
        took = wait_for(lambda: system_of(b, "u0") == "target" and system_of(b, "u1") == "target", 10)
        wait_for(lambda: b.control("GET", "/healthz", token=None)[1]["store"]["healthy"], 5)
        res = finish(calls, 60)
        assert res.failed == 0 and res.successful == 180, res.report()
        entries = [e for e in systems.calls() if e["from"].startswith("sip:u0@")]
        on_target = [e for e in entries if e["system"] == "MR115"]
        report(request, f"{res.successful} calls, {res.failed} failed while Redis was away; B picked up the "
                        f"migration made meanwhile {took:.2f} s after the partition healed; "
                        f"{len(on_target)} later calls of u0 on the target")
        assert metric(b, "dsbc_store_healthy") == 1
    finally:
        proxy.close()


# --- migration under load ----------------------------------------------------------------------


@dataclass
class Load:
    customers: int
    rate: float  # calls per second
    seconds: float  # of new calls
    hold_ms: int
    batches: int
    register_rate: float
    flips: dict[str, tuple[float, float]] = field(default_factory=dict)  # cid -> (sent, done), wall clock


def run_migration_under_load(request: pytest.FixtureRequest, systems: Systems, redis: RedisServer,
                             nodes: Callable[..., Dsbc], tmp_path: Path, load: Load) -> None:
    sip = systems.sip()
    a = nodes("a", **sip, customers=customers(load.customers), store_url=redis.url)
    b = nodes("b", **sip, store_url=redis.url, lock_hold=2.0)
    b.wait_nodes_up()
    users = [f"u{i}" for i in range(load.customers)]
    total = int(load.rate * load.seconds)
    regs = registrations(b.sip_addr, users, rate=load.register_rate,
                         calls=int(load.register_rate * (load.seconds + 2)), workdir=tmp_path)
    calls = phones("calls", b.sip_addr, users, rate=load.rate, calls=total, workdir=tmp_path, hold_ms=load.hold_ms)
    size = load.customers // load.batches
    gap = load.seconds / (load.batches + 1)
    seen_delays: list[float] = []
    for k in range(load.batches):
        time.sleep(gap)
        ids = [str(i) for i in range(k * size, (k + 1) * size)]
        sent = time.time()
        # locked for half a second first (a data-copy window): their new calls are held, then
        # relayed to the target, none refused (store.lock_hold is 2 s)
        status, body = a.control("POST", "/v1/migrations",
                                 {"customers": ids, "to": "target", "batch_size": 25, "lock_for": 0.5})
        done = time.time()
        assert status == 200 and len(body["moved"]) == size, body
        for cid in ids:
            load.flips[cid] = (sent, done)
        t0 = time.monotonic()
        while system_of(b, f"u{ids[-1]}") != "target":
            assert time.monotonic() - t0 < 2
        seen_delays.append(time.monotonic() - t0)
    res = finish(calls, load.seconds + 60)
    reg = finish(regs, 30)
    entries = systems.calls()
    by_call: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_call.setdefault(e["call_id"], []).append(e)
    name = {"MR100": "source", "MR115": "target"}
    split = [c for c, es in by_call.items() if len(es) > 1]
    unfinished = [c for c, es in by_call.items() if not any("BYE" in e["methods"] for e in es)]
    late, early, on = [], [], {"source": 0, "target": 0}
    margin = 0.25  # the INVITE reached B before B applied the flip (B's lag is measured below)
    for e in entries:
        m = re.match(r"sip:u(\d+)@", e["from"])
        assert m, e
        cid = m.group(1)
        system = name[e["system"]]
        on[system] += 1
        flip = load.flips.get(cid)
        if system == "source" and flip is not None and e["started"] > flip[1] + margin:
            late.append((cid, e["started"] - flip[1]))
        if system == "target" and (flip is None or e["started"] < flip[0]):
            early.append(cid)
    moved_users = [f"u{c}" for c in load.flips]
    on_target = systems.registered_on("target", moved_users)
    held = metric(b, "dsbc_sip_held_total")
    rejected = metric(b, "dsbc_sip_rejected_total")
    report(request, (
        f"{res.successful} calls ({load.rate:g}/s, {load.hold_ms} ms each), {res.failed} failed, "
        f"{reg.successful} REGISTERs ({reg.failed} failed); {len(load.flips)} customers moved in {load.batches} "
        f"batches; dialogs on source {on['source']}, on target {on['target']}, split {len(split)}, "
        f"not ended where they started {len(unfinished)}, started after the flip but on source {len(late)}, "
        f"on target before their flip {len(early)}; held {held:g}, rejected {rejected:g}; "
        f"B saw each batch {max(seen_delays) * 1000:.0f} ms after A answered (worst); "
        f"moved phones registered on target {on_target}/{len(moved_users)}"))
    assert res.failed == 0 and res.successful == total, res.report()
    assert reg.failed == 0, reg.report()
    assert not split and not unfinished
    assert not late, late[:10]
    assert not early, early[:10]
    assert rejected == 0
    assert on["target"] > 0 and on["source"] > 0


@pytest.mark.timeout(150)
def test_migration_under_load(request: pytest.FixtureRequest, systems: Systems, redis: RedisServer,
                              nodes: Callable[..., Dsbc], tmp_path: Path) -> None:
    run_migration_under_load(request, systems, redis, nodes, tmp_path,
                             Load(customers=200, rate=15, seconds=20, hold_ms=2000, batches=4, register_rate=10))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_migration_under_load_long(request: pytest.FixtureRequest, systems: Systems, redis: RedisServer,
                                   nodes: Callable[..., Dsbc], tmp_path: Path) -> None:
    expr = (request.config.option.markexpr or "").replace("not slow", "")
    if "slow" not in expr and not os.environ.get("DSBC_SLOW"):
        pytest.skip("long load run (about 3 minutes): select it with -m slow or DSBC_SLOW=1")
    run_migration_under_load(request, systems, redis, nodes, tmp_path,
                             Load(customers=2000, rate=40, seconds=120, hold_ms=5000, batches=10, register_rate=30))


# --- graceful operations -----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sighup_reload_during_traffic_fails_no_call(
    request: pytest.FixtureRequest, systems: Systems, nodes: Callable[..., Dsbc], tmp_path: Path
) -> None:
    node = nodes("node", **systems.sip(), customers=customers(20), workers=2)
    node.wait_nodes_up()
    wait_for(lambda: len(node.status()) == 2, 5)
    pids_before = sorted(s["pid"] for s in node.status())
    calls = phones("calls", node.sip_addr, [f"u{i}" for i in range(20)], rate=20, calls=240,
                   workdir=tmp_path, hold_ms=1000)
    assert node.proc is not None
    for _ in range(2):
        time.sleep(4)
        node.proc.send_signal(signal.SIGHUP)  # the master reloads; workers ignore SIGHUP
    res = finish(calls, 60)
    time.sleep(1.5)
    pids_after = sorted(s["pid"] for s in node.status())
    log = (node.workdir / "dsbc.log").read_text()
    report(request, f"{res.successful} calls, {res.failed} failed across 2 reloads, "
                    f"{res.stats.get('Retransmissions(C)', '?')} retransmissions; workers {pids_before} -> "
                    f"{pids_after}")
    assert res.failed == 0 and res.successful == 240, res.report()
    assert log.count("reloading configuration") == 2
    assert not set(pids_before) & set(pids_after)
    assert node.control("GET", "/healthz", token=None)[1]["status"] == "ok"


@pytest.mark.timeout(90)
def test_node_restarts_from_its_cache_file_while_redis_is_away(
    request: pytest.FixtureRequest, systems: Systems, redis: RedisServer, nodes: Callable[..., Dsbc], tmp_path: Path
) -> None:
    cache = tmp_path / "index.cache"
    node = nodes("node", **systems.sip(), customers=customers(10), store_url=redis.url,
                 store_extra=f'cache_file = "{cache}"')
    assert node.control("POST", "/v1/migrations", {"customers": ["3"], "to": "target"})[0] == 200
    node.stop()
    assert cache.exists()
    redis.stop()
    node.start()  # answers SIP OPTIONS: it dispatches
    wait_for(lambda: healthz(node)[0] == 200, 10)
    assert system_of(node, "u3") == "target" and system_of(node, "u4") == "source"
    hz = node.control("GET", "/healthz", token=None)[1]
    assert hz["store"]["healthy"] is False
    redis.start()
    took = wait_for(lambda: node.control("GET", "/healthz", token=None)[1]["store"]["healthy"], 10)
    report(request, f"restarted from the cache while Redis was away; healthy {took:.1f} s after Redis returned")


@pytest.mark.timeout(60)
def test_sigterm_drains_with_healthz_503(systems: Systems, nodes: Callable[..., Dsbc]) -> None:
    import urllib.error

    node = nodes("node", **systems.sip(), customers=customers(2))
    wait_for(lambda: healthz(node)[0] == 200, 10)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    seen: list[Any] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status, body = node.control("GET", "/healthz", token=None, timeout=1)
        except (urllib.error.URLError, OSError):
            seen.append("refused")
            break
        seen.append((status, body.get("status") if isinstance(body, dict) else body))
        time.sleep(0.01)
    assert (503, "draining") in seen, seen
    assert seen[-1] == "refused"


def held_invite_across(stop: Callable[[Dsbc], None], systems: Systems, nodes: Callable[..., Dsbc],
                       lock_for: float = 1.5, extra: str = "") -> str:
    """An INVITE of a customer whose batch is locked (held, 100 Trying), then `stop(node)`
    (a reload, a stop) while it is held, then the flip: the status line of the final
    answer the phone got ("" for none within 8 s)."""
    import socket
    import subprocess
    import sys

    node = nodes("node", **systems.sip(), customers=customers(2), lock_hold=4.0, extra=extra)
    node.wait_nodes_up()
    mig = subprocess.Popen([sys.executable, "-m", "dsbc.cli", "-c", str(node.config_path), "migrate",
                            "--customer", "1", "--lock-for", str(lock_for)], env=node.env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: node.control("GET", "/v1/identities/account/u1")[1].get("state") == "locked", 10)
        time.sleep(0.3)  # the SIP worker sees the lock within store.poll_interval
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
            phone.bind((PHONE_IP, 0))
            phone.settimeout(0.2)
            port = phone.getsockname()[1]
            sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
            invite = (f"INVITE sip:echo@{node.hostport} SIP/2.0\r\n"
                      f"Via: SIP/2.0/UDP {PHONE_IP}:{port};branch=z9hG4bKheld{port};rport\r\n"
                      f"Max-Forwards: 70\r\nFrom: <sip:u1@{node.ip}>;tag=h{port}\r\nTo: <sip:echo@{node.ip}>\r\n"
                      f"Call-ID: held-{port}\r\nCSeq: 1 INVITE\r\nContact: <sip:u1@{PHONE_IP}:{port}>\r\n"
                      f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}")
            phone.sendto(invite.encode(), node.sip_addr)
            answers: list[str] = []

            def final() -> str:
                try:
                    answers.append(phone.recv(65535).decode("latin-1").split("\r\n", 1)[0])
                except TimeoutError:
                    pass
                return next((a for a in answers if not a.startswith("SIP/2.0 1")), "")

            wait_for(lambda: "SIP/2.0 100 Trying" in answers or bool(final()), 3)
            assert not final(), answers  # held, not answered
            stop(node)
            deadline = time.monotonic() + 8
            while not final() and time.monotonic() < deadline:
                pass
            return final()
    finally:
        mig.wait(20)


@pytest.mark.timeout(90)
def test_request_held_during_a_reload_is_relayed_at_the_flip(systems: Systems, nodes: Callable[..., Dsbc]) -> None:
    """Found by an audit: a worker being replaced by a SIGHUP reload closed its UDP sockets
    first, then released what it held at the flip into them: the held INVITE (a 100 Trying
    already sent, so the phone no longer retransmits) went nowhere and the call failed."""

    def reload(node: Dsbc) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)

    assert held_invite_across(reload, systems, nodes) == "SIP/2.0 200 OK"
    assert [c["system"] for c in systems.calls()] == ["MR115"]


@pytest.mark.timeout(90)
def test_request_held_during_a_stop_is_relayed_at_the_flip(systems: Systems, nodes: Callable[..., Dsbc]) -> None:
    """SIGTERM: the workers finish what they hold before they exit (OPERATIONS.md)."""

    def stop(node: Dsbc) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)

    assert held_invite_across(stop, systems, nodes) == "SIP/2.0 200 OK"
    assert [c["system"] for c in systems.calls()] == ["MR115"]


@pytest.mark.timeout(90)
def test_request_held_when_its_batch_is_rolled_back_goes_to_the_source(
        systems: Systems, nodes: Callable[..., Dsbc]) -> None:
    """Found by an audit: `dsbc rollback` of a batch in its lock window did not stop it; the
    held INVITE went to the source and the customer was flipped anyway a moment later.  Now
    the rollback releases the held call to the source at once and the batch moves nobody."""
    rolled: list[tuple[Dsbc, str]] = []

    def rollback(node: Dsbc) -> None:
        batch = node.control("GET", "/v1/identities/account/u1")[1]["batch_id"]
        rolled.append((node, node.cli("rollback", batch).stdout))

    t0 = time.monotonic()
    assert held_invite_across(rollback, systems, nodes, lock_for=3.0, extra="") == "SIP/2.0 200 OK"
    assert [c["system"] for c in systems.calls()] == ["MR100"]
    node, out = rolled[0]
    assert "moved 0, already on source 1" in out, out
    # held_invite_across waited for the migration to end (its window was 3 s): it moved nobody
    assert time.monotonic() - t0 > 3.0
    who = node.control("GET", "/v1/identities/account/u1")[1]
    assert (who["system"], who["state"]) == ("source", "active"), who


@pytest.mark.timeout(90)
def test_api_login_held_during_a_reload_is_relayed_at_the_flip(systems: Systems, nodes: Callable[..., Dsbc],
                                                               tmp_path: Path) -> None:
    """Found by an audit: a reload waited only for the SIP requests a worker held; the
    worker then stopped reading the store while an API login (or a RADIUS / Diameter
    request) of a customer in flight was still held, so the flip never reached it and the
    login got `customer_locked` once store.lock_hold was over."""
    import json
    import subprocess
    import sys
    import urllib.parse
    import urllib.request

    from dsbc.emulator.billing import sample_rows, start_billing_emulator
    from tests.peers.net import free_port

    rows = sample_rows()
    source = systems.run(start_billing_emulator("MR100", "127.0.0.1", 0, [dict(r, system="source") for r in rows]))
    target = systems.run(start_billing_emulator("MR115", "127.0.0.1", 0, [dict(r, system="target") for r in rows]))
    port = free_port("tcp")
    api = (f'[api]\nlisten = ["127.0.0.1:{port}"]\n\n[[api.vhosts]]\nhost = "*"\nrealm = "customer"\n'
           f'source = "{source.url}"\ntarget = "{target.url}"\n')
    try:
        node = nodes("node", **systems.sip(), customers=[dict(r, system="source") for r in rows], lock_hold=4.0,
                     api=api, workers=2)

        def call(method: str, params: dict[str, Any], auth: dict[str, Any] | None = None) -> Any:
            form = {"params": json.dumps(params)} | ({"auth_info": json.dumps(auth)} if auth else {})
            req = urllib.request.Request(f"http://127.0.0.1:{port}/rest/{method}",
                                         data=urllib.parse.urlencode(form).encode())
            try:
                with urllib.request.urlopen(req, timeout=15) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return json.loads(exc.read())

        mig = subprocess.Popen([sys.executable, "-m", "dsbc.cli", "-c", str(node.config_path), "migrate",
                                "--customer", "1", "--lock-for", "1.5"], env=node.env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: node.control("GET", "/v1/identities/login/alice")[1].get("state") == "locked", 10)
            time.sleep(0.3)  # the workers see the lock within store.poll_interval
            got: list[Any] = []
            login = threading.Thread(target=lambda: got.append(call("Session/login",
                                                                    {"login": "alice", "password": "secret"})))
            login.start()
            time.sleep(0.3)  # held
            assert node.proc is not None
            node.proc.send_signal(signal.SIGHUP)
            login.join(15)
        finally:
            mig.wait(20)
        assert got and "session_id" in got[0], got
        wait_for(lambda: healthz(node)[0] == 200, 10)
        assert call("Generic/get_version", {}, {"session_id": got[0]["session_id"]})["system"] == "target"
    finally:
        systems.run(source.stop())
        systems.run(target.stop())


@pytest.mark.timeout(90)
def test_healthz_keeps_answering_through_a_reload_that_waits_for_held_requests(
        systems: Systems, nodes: Callable[..., Dsbc]) -> None:
    """Found by an audit: on a reload the replaced worker's control API closed at once, and
    the new worker opened its own only after the RADIUS and Diameter ports, which the old
    one frees when its drain ends: while it waited for a request held for a migration,
    /healthz was refused for seconds, two failed checks for keepalived (deploy/
    keepalived.conf: interval 1, fall 2), which gave the address away on a routine reload."""
    refused: list[float] = []
    done = threading.Event()

    def watch(node: Dsbc) -> None:
        since = None
        while not done.is_set():
            up = healthz(node)[0] == 200
            now = time.monotonic()
            if not up and since is None:
                since = now
            elif up and since is not None:
                refused.append(now - since)
                since = None
            time.sleep(0.02)

    def reload(node: Dsbc) -> None:
        threading.Thread(target=watch, args=(node,), daemon=True).start()
        time.sleep(0.1)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)

    try:
        from tests.peers.net import free_port

        radius = (f'\n[radius]\nenabled = true\nauth_listen = "127.0.0.1:{free_port("udp")}"\n'
                  f'acct_listen = "127.0.0.1:{free_port("udp")}"\n\n'
                  '[[radius.clients]]\naddress = "127.0.0.0/8"\nsecret = "nas-secret"\n')
        assert held_invite_across(reload, systems, nodes, lock_for=2.5, extra=radius) == "SIP/2.0 200 OK"
        time.sleep(1.0)
    finally:
        done.set()
    assert max(refused, default=0.0) < 1.0, refused


@pytest.mark.timeout(90)
def test_api_accepts_connections_throughout_a_reload(systems: Systems, nodes: Callable[..., Dsbc]) -> None:
    """Found by the soak: on a SIGHUP reload the API listener of the replaced worker closed
    when its drain ended, and the new worker could bind the port only then (no
    SO_REUSEPORT, unlike the control API): API clients got "connection refused" for a
    moment on every reload (and resets: requests under way were aborted), where nginx's
    reload refuses none."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from dsbc.emulator.billing import sample_rows, start_billing_emulator
    from tests.peers.net import free_port

    rows = sample_rows()
    source = systems.run(start_billing_emulator("MR100", "127.0.0.1", 0, rows, system="source"))
    target = systems.run(start_billing_emulator("MR115", "127.0.0.1", 0, rows, system="target"))
    port = free_port("tcp")
    api = (f'[api]\nlisten = ["127.0.0.1:{port}"]\n\n[[api.vhosts]]\nhost = "*"\nrealm = "customer"\n'
           f'source = "{source.url}"\ntarget = "{target.url}"\n')
    failures: list[str] = []
    answered = 0
    done = threading.Event()

    def client() -> None:
        nonlocal answered
        form = urllib.parse.urlencode({"params": json.dumps({"login": "alice", "password": "secret"})}).encode()
        while not done.is_set():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/rest/Session/login", data=form,
                                         headers={"Connection": "close"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
                answered += 1
            except urllib.error.HTTPError as exc:
                failures.append(f"HTTP {exc.code} {exc.read()[:200]!r}")
            except OSError as exc:
                failures.append(repr(exc))
            time.sleep(0.005)

    try:
        node = nodes("node", **systems.sip(), customers=rows, api=api)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert node.proc is not None
        for _ in range(2):
            before = {p.name for p in node.run_dir.glob("ready-0-*")}
            node.proc.send_signal(signal.SIGHUP)
            wait_for(lambda before=before: {p.name for p in node.run_dir.glob("ready-0-*")} - before, 20)
            time.sleep(1.5)  # the replaced worker's drain ends
        done.set()
        for t in threads:
            t.join(15)
    finally:
        done.set()
        systems.run(source.stop())
        systems.run(target.stop())
    assert answered > 50
    assert not [f for f in failures if "Refused" in f or "HTTP" in f], failures[:5]
    # what is left: a connection the kernel queued on the replaced worker's listener the
    # moment it closed it (SO_REUSEPORT), reset unless net.ipv4.tcp_migrate_req moves it
    # to the new one (docs/GAPS.md): one per reload at most, none with the sysctl
    migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    allowed = 0 if migrate.exists() and migrate.read_text().strip() == "1" else 2
    assert len(failures) <= allowed, failures[:5]
