"""Concurrent migrations of the same customers, end to end: `dsbc migrate` processes
straight on the store and control API calls to two `dsbc run` nodes, all on one Redis
(and CLI processes on one SQLite file), started together on overlapping customers.

Exactly one batch wins each customer (it is moved once, by one batch, in the audit log);
the others exit 1 (the CLI) or get 409 (the control API) naming a batch that holds them,
and nothing is left locked.  (Found by an audit: the check and the lock were two steps,
so two migrations started in the same instant could both take the same customers.)
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dsbc.store import open_store
from tests.peers.dsbc import REPO, Dsbc
from tests.peers.net import free_port
from tests.peers.proc import find_binary
from tests.peers.redis import RedisServer

pytestmark = [pytest.mark.peers, pytest.mark.timeout(120)]

N = 60
LOCKED = re.compile(r"^customer\(s\) .+ locked by batch (b-[0-9a-z-]+(?:, b-[0-9a-z-]+)*): a migration in progress")


def _customers() -> list[dict[str, Any]]:
    return [{"customer_id": str(i), "identities": [f"account:u{i}"]} for i in range(N)]


def _ranges() -> list[list[str]]:
    """Overlapping batches: every customer is in two or three of them."""
    return [[str(i) for i in range(lo, min(N, lo + 30))] for lo in range(0, N, 10)]


def _cli(config: Path, ids: list[str], workdir: Path, name: str) -> subprocess.Popen[str]:
    batch = workdir / f"{name}.txt"
    batch.write_text("\n".join(ids) + "\n")
    return subprocess.Popen(
        [sys.executable, "-m", "dsbc.cli", "-c", str(config), "migrate", "--batch", str(batch),
         "--lock-for", "0.3", "--who", name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _finish(who: str, p: subprocess.Popen[str]) -> tuple[str, int, str, list[str]]:
    """A CLI migration's outcome: exit 0, or 1 with one line naming the batches holding it."""
    _, err = p.communicate(timeout=60)
    m = LOCKED.match(err)
    assert p.returncode == 0 or (p.returncode == 1 and m and err.count("\n") == 1), (who, err)
    return who, p.returncode, err, m.group(1).split(", ") if m else []


def _check(store_url: str, outcomes: list[tuple[str, int, str, list[str]]]) -> None:
    """outcomes: (who, exit code or HTTP status, stderr or error text, the winners' batches
    named in the refusal).  Exactly one batch per customer, losers name a winner, nothing locked."""
    s = open_store(store_url, load=False)
    try:
        entries = s.audit(limit=10_000)
        counts = s.counts()
        moved = [e.customer_id for e in entries]
        on_target = {cid for cid, c in s.customers([str(i) for i in range(N)]).items() if c.system == "target"}
    finally:
        s.close()
    assert len(moved) == len(set(moved)), "a customer was moved twice"
    assert set(moved) == on_target
    winners = {e.batch_id for e in entries}
    assert counts["customers.source.locked"] == counts["customers.target.locked"] == 0
    won = [o for o in outcomes if o[1] in (0, 200)]
    lost = [o for o in outcomes if o[1] not in (0, 200)]
    assert won, outcomes
    for who, code, text, named in lost:
        assert code in (1, 409), (who, code, text)
        assert named and set(named) <= winners, (who, text, winners)
    assert len(winners) <= len(won)


def test_concurrent_cli_migrations_on_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/loc.db"
    s = open_store(url)
    s.import_rows(_customers())
    s.close()
    config = tmp_path / "dsbc.toml"
    config.write_text(f'[store]\nurl = "{url}"\n')
    for _ in range(2):  # twice: the second round finds most customers moved already
        procs = [(f"cli{k}", _cli(config, ids, tmp_path, f"cli{k}")) for k, ids in enumerate(_ranges())]
        _check(url, [_finish(who, p) for who, p in procs])


@pytest.mark.skipif(find_binary("redis-server") is None, reason="redis-server is not installed")
def test_concurrent_migrations_through_cli_and_two_nodes_on_one_redis(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        sip = {"source": [f"udp:127.0.0.1:{free_port('udp')}"],
               "target": [f"udp:127.0.0.1:{free_port('udp')}"]}
        a = Dsbc(tmp_path / "a", **sip, customers=_customers(), store_url=redis.url)
        b = Dsbc(tmp_path / "b", **sip, store_url=redis.url)
        with a, b:
            for node in (a, b):  # the control API starts after SIP
                deadline = time.monotonic() + 10
                while node.control("GET", "/healthz", token=None, timeout=2)[0] != 200:
                    assert time.monotonic() < deadline, node.log_tail()
                    time.sleep(0.1)
            ranges = _ranges()
            outcomes: list[tuple[str, int, str, list[str]]] = []

            def call(node: Dsbc, who: str, ids: list[str]) -> None:
                time.sleep(0.4)  # about when the CLI processes have started
                status, body = node.control("POST", "/v1/migrations",
                                            {"customers": ids, "to": "target", "lock_for": 0.3, "who": who})
                named = sorted(set(body.get("locked", {}).values())) if isinstance(body, dict) else []
                outcomes.append((who, status, str(body), named))

            threads = [threading.Thread(target=call, args=(node, f"api{k}", ids))
                       for k, (node, ids) in enumerate(zip((a, b, a), ranges[::2], strict=False))]
            procs = [(f"cli{k}", _cli(a.config_path, ids, tmp_path, f"cli{k}"))
                     for k, ids in enumerate(ranges[1::2])]
            for t in threads:
                t.start()
            outcomes += [_finish(who, p) for who, p in procs]
            for t in threads:
                t.join(60)
            assert len(outcomes) == len(threads) + len(procs)
            _check(redis.url, outcomes)
            assert not a.traceback() and not b.traceback()


def test_rollback_through_the_node_stops_its_migration_in_flight(tmp_path: Path) -> None:
    """Found by an audit: the control API ran one store write at a time, a migration's whole
    --lock-for window included: a rollback (or any customer edit) through the same node
    waited for the window to end, the batch flipped meanwhile, and the rollback then had to
    move it back.  The rollback now answers at once and stops the batch (409 for it)."""
    sip = {"source": [f"udp:127.0.0.1:{free_port('udp')}"], "target": [f"udp:127.0.0.1:{free_port('udp')}"]}
    with Dsbc(tmp_path / "node", **sip, customers=_customers()[:5]) as node:
        deadline = time.monotonic() + 10
        while node.control("GET", "/healthz", token=None, timeout=2)[0] != 200:
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.1)
        answer: list[Any] = []
        t = threading.Thread(target=lambda: answer.append(node.control(
            "POST", "/v1/migrations", {"customers": ["1", "2"], "lock_for": 5})))
        t.start()
        deadline = time.monotonic() + 10
        while (who := node.control("GET", "/v1/identities/account/u1")[1])["state"] != "locked":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        status, body = node.control("POST", f"/v1/migrations/{who['batch_id']}/rollback", {})
        assert status == 200 and body["already"] == ["1", "2"], body
        assert time.monotonic() - t0 < 2.0
        status, _ = node.control("PUT", "/v1/customers/9", {"identities": ["account:u9"]})
        assert status == 200 and time.monotonic() - t0 < 3.0
        t.join(20)
        assert answer[0][0] == 409 and "was rolled back while it ran" in answer[0][1]["error"], answer
        for cid in ("1", "2"):
            who = node.control("GET", f"/v1/identities/account/u{cid}")[1]
            assert (who["system"], who["state"]) == ("source", "active"), who
        assert not node.traceback()
