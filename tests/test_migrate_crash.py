"""Migrations that die: `dsbc migrate` killed with SIGKILL in its lock window or in the
middle of its flip, and a `dsbc run` node killed while it runs a migration asked through
its control API (two nodes on one Redis).

Found by an audit: their customers stayed locked forever (every call held, then 503;
RADIUS unanswered) until someone noticed and ran `dsbc migrate --force`, and `dsbc
rollback` of the dead batch said "unknown batch".  Now a batch's locks last its lease
(`store.lock_lease`, renewed while its migration runs): any node releases them when it
runs out, and a rollback of the batch moves back what it flipped and releases the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dsbc.store import LocationStore, open_store
from tests.peers.dsbc import REPO, Dsbc
from tests.peers.net import free_port
from tests.peers.proc import find_binary
from tests.peers.redis import RedisServer

pytestmark = [pytest.mark.peers, pytest.mark.timeout(120)]

N = 20_000


def _customers() -> list[dict[str, Any]]:
    return [{"customer_id": str(i), "identities": [f"account:u{i}"]} for i in range(N)]


def _sip() -> dict[str, list[str]]:
    return {"source": [f"udp:127.0.0.1:{free_port('udp')}"], "target": [f"udp:127.0.0.1:{free_port('udp')}"]}


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def _counts(url: str) -> dict[str, int]:
    s = open_store(url, load=False)
    try:
        return s.counts()
    finally:
        s.close()


def _locked(url: str) -> int:
    c = _counts(url)
    return c["customers.source.locked"] + c["customers.target.locked"]


def _migrate(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dsbc.cli", "-c", str(config), "migrate", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)


def _batch_of(store: LocationStore, cid: str) -> str:
    c = store.customer(cid)
    assert c is not None
    return c.batch_id


def test_sigkill_in_the_lock_window_is_released_by_the_running_node(tmp_path: Path) -> None:
    node = Dsbc(tmp_path / "node", **_sip(), customers=_customers(), store_extra="lock_lease = 1.0")
    ids = tmp_path / "all.txt"
    ids.write_text("\n".join(str(i) for i in range(N)) + "\n")
    with node:
        url = f"sqlite:///{node.db}"
        p = _migrate(node.config_path, "--batch", str(ids), "--lock-for", "60")
        try:
            _wait(lambda: _locked(url) == N, 30, "the batch locked")
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate(timeout=10)
        # lease 1 s, a check every 2 s: released within seconds (bounded loosely: a busy host)
        _wait(lambda: _locked(url) == 0, 15, "the dead batch's locks released")
        r = node.cli("where", "account:u19999")
        assert "system:   source" in r.stdout and "state:    active" in r.stdout, r.stdout
        # the node logs it once the release committed (a moment later on a busy host)
        _wait(lambda: "stopped without unlocking its customers: 20000 released" in node.log_tail(200), 10,
              "the release logged")
        # and the next migration of them just runs (no --force)
        r = node.cli("migrate", "--customer", "0", "--customer", "19999")
        assert r.stdout.startswith("moved 2,"), r.stdout
        assert not node.traceback()


def test_rollback_of_a_batch_killed_in_its_flip(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/loc.db"
    s = open_store(url)
    s.import_rows(_customers())
    config = tmp_path / "dsbc.toml"
    config.write_text(f'[store]\nurl = "{url}"\n')
    ids = tmp_path / "all.txt"
    ids.write_text("\n".join(str(i) for i in range(N)) + "\n")
    p = _migrate(config, "--batch", str(ids), "--batch-size", "5")
    try:
        _wait(lambda: len(s.audit(limit=10)) >= 10, 30, "some chunks flipped")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=10)
    s.refresh()
    batch = s.audit(limit=1)[0].batch_id
    moved = len(s.audit(batch, limit=N))
    counts = s.counts()
    assert counts["customers.target.active"] == moved and moved < N
    assert counts["customers.source.locked"] <= 5  # the chunk between its lock and its flip
    left = counts["customers.source.locked"]
    r = subprocess.run([sys.executable, "-m", "dsbc.cli", "-c", str(config), "rollback", batch],
                       capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert f"moved {moved}, already on source {left}" in r.stdout, r.stdout
    s.refresh()
    assert s.counts()["customers.source.active"] == N
    s.close()


@pytest.mark.skipif(find_binary("redis-server") is None, reason="redis-server is not installed")
def test_node_killed_while_it_runs_a_migration_the_other_node_releases(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        sip = _sip()
        a = Dsbc(tmp_path / "a", **sip, customers=_customers()[:200], store_url=redis.url,
                 store_extra="lock_lease = 1.0")
        b = Dsbc(tmp_path / "b", **sip, store_url=redis.url, store_extra="lock_lease = 1.0")
        with a, b:
            for node in (a, b):
                _wait(lambda node=node: node.control("GET", "/healthz", token=None, timeout=2)[0] == 200,
                      10, "the control API")
            answer: list[Any] = []

            def migrate() -> None:
                try:
                    answer.append(a.control("POST", "/v1/migrations",
                                            {"customers": [str(i) for i in range(200)], "lock_for": 60}))
                except OSError as exc:  # the node died under the call
                    answer.append(exc)

            t = threading.Thread(target=migrate)
            t.start()
            _wait(lambda: _locked(redis.url) == 200, 20, "the batch locked")
            assert a.proc is not None
            a.proc.send_signal(signal.SIGKILL)
            t.join(30)
            assert answer and isinstance(answer[0], OSError), answer
            _wait(lambda: _locked(redis.url) == 0, 15, "node B released the dead batch")
            _wait(lambda: "stopped without unlocking its customers: 200 released" in b.log_tail(200), 10,
                  "the release logged")
            r = b.cli("migrate", "--customer", "7", "--node", b.control_url)
            assert r.stdout.startswith("moved 1,"), r.stdout
            assert not b.traceback()


def test_sigterm_of_a_node_in_a_migrations_lock_window_interrupts_and_unlocks(tmp_path: Path) -> None:
    """Found by an audit: SIGTERM to a node running a control-API migration in its
    --lock-for window: the client got an empty reply, the worker hung until the master
    killed it (8 s), and the customers stayed locked.  The stop now ends the window: the
    batch is interrupted, its customers unlocked, and the client told why (503)."""
    node = Dsbc(tmp_path / "node", **_sip(), customers=_customers()[:50])
    with node:
        _wait(lambda: node.control("GET", "/healthz", token=None, timeout=2)[0] == 200, 10, "the control API")
        answer: list[Any] = []
        t = threading.Thread(target=lambda: answer.append(node.control(
            "POST", "/v1/migrations", {"customers": ["1", "2", "3"], "lock_for": 60})))
        t.start()
        url = f"sqlite:///{node.db}"
        _wait(lambda: _locked(url) == 3, 20, "the batch locked")
        assert node.proc is not None
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(20) == 0
        assert time.monotonic() - t0 < 4
        t.join(10)
        assert answer and answer[0][0] == 503, answer
        assert "the migration was interrupted in its lock window and its customers unlocked" in answer[0][1]["error"]
        assert _locked(url) == 0
        assert not node.traceback()
