"""The control API of a running `dsbc run` (SQLite store): auth, bad input, lookups,
customers, migrations and rollbacks, health, status; and the CLI acting through it.

One node for the module (tests/peers/dsbc.py); back-end SIP nodes are not running, so the
node reports its systems down (health: degraded, still 200).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers.dsbc import Dsbc
from tests.peers.net import free_port

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]

CUSTOMERS = [
    {"customer_id": "1", "identities": ["account:a1", "did:+1 555 0001"]},
    {"customer_id": "2", "identities": ["account:a2"]},
    {"customer_id": "3", "identities": ["account:a3"], "group": "ivr"},
    {"customer_id": "4", "identities": ["account:a4"], "group": "ivr"},
]


def wait_control(d: Dsbc, timeout: float = 10.0) -> None:
    """The control API starts after SIP, a moment after `dsbc run` answers OPTIONS."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if d.control("GET", "/healthz", token=None, timeout=2)[0] in (200, 503):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no control API after {timeout}s:\n{d.log_tail()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dsbc]:
    work = tmp_path_factory.mktemp("control")
    sip = [f"udp:127.0.0.1:{free_port('udp')}"]
    d = Dsbc(work, source=sip, target=[f"udp:127.0.0.1:{free_port('udp')}"],
             customers=CUSTOMERS, extra="\n[log]\njson = true\n")
    d.start()
    wait_control(d)
    yield d
    d.stop()
    assert not d.traceback(), d.traceback()


def test_no_token_or_a_wrong_one_is_401(node: Dsbc) -> None:
    status, body = node.control("GET", "/v1/identities/account/a1", token=None)
    assert status == 401 and "Authorization: Bearer" in body["error"]
    status, body = node.control("GET", "/v1/status", token="nope")
    assert status == 401 and body["error"].startswith("wrong token")
    status, _ = node.control("POST", "/v1/migrations", {"customers": ["1"]}, token="")
    assert status == 401
    # found by an audit: a token with an octet that is not UTF-8 was a 500 and a traceback
    import socket

    with socket.create_connection(("127.0.0.1", node.control_port), timeout=5) as s:
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\xffk\r\n"
                  b"Connection: close\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"wrong token" in answer, answer
    # health and metrics need no token
    assert node.control("GET", "/healthz", token=None)[0] == 200
    assert node.control("GET", "/metrics", token=None)[0] == 200


def test_bad_input_is_400_with_a_reason(node: Dsbc) -> None:
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", "/v1/migrations", b"{not json", "not JSON"),
        ("POST", "/v1/migrations", b"[1, 2]", "JSON object"),
        ("POST", "/v1/migrations", b"[" * 100_000, "nested too deeply"),  # was a 500 (RecursionError)
        ("POST", "/v1/migrations", b'{"customers": ["\\ud800"]}', "surrogates not allowed"),  # was a 500
        ("PUT", "/v1/customers/600", b'{"identities": ["account:\\ud800"]}', "surrogates not allowed"),
        ("POST", "/v1/migrations", {"to": "target"}, "missing field 'customers'"),
        ("POST", "/v1/migrations", {"customers": []}, "non-empty list"),
        ("POST", "/v1/migrations", {"customers": ["a b"]}, "is not a customer id"),
        ("POST", "/v1/migrations", {"customers": ["1"], "to": "elsewhere"}, "not one of source, target"),
        ("POST", "/v1/migrations", {"customers": ["1"], "lock_for": "soon"}, "lock_for"),
        ("POST", "/v1/migrations", {"customers": ["1"], "hurry": True}, "unknown field(s) hurry"),
        # a string is not a flag: "false" used to be truthy (a prepare, a dry run)
        ("POST", "/v1/migrations", {"customers": ["1"], "prepare": "false"}, "prepare: expected true or false"),
        ("POST", "/v1/migrations", {"customers": ["1"], "dry_run": "no"}, "dry_run: expected true or false"),
        ("POST", "/v1/migrations", {"customers": ["1"], "force": 1}, "force: expected true or false"),
        ("PUT", "/v1/customers/9", {"system": "target"}, "missing field 'identities'"),
        ("PUT", "/v1/customers/9", {"identities": None}, "missing field 'identities'"),
        ("PUT", "/v1/customers/9", {"identities": ["did:abc"]}, "identities: did:'abc' is not a number"),
        # found by an audit: these named the identity, not the field
        ("PUT", "/v1/customers/9", {"identities": ["alice"]}, "identities: 'alice' is not KIND:VALUE"),
        ("PUT", "/v1/customers/9", {"identities": [7]}, "identities: identity 7 is not a KIND:VALUE string"),
        ("PUT", "/v1/customers/9", {"identities": ["account:x"], "system": "moon"}, "is not source or target"),
        ("GET", "/v1/identities/colour/blue", None, "unknown identity kind"),
        # found by an audit: ignored silently
        ("PUT", "/v1/customers/8", {"customer_id": "9", "identities": ["account:x8"]},
         "customer_id: '9' in the body is not '8' of the path"),
        ("POST", "/v1/migrations/b-1/rollback", {"bogus": 1}, "unknown field(s) bogus"),
    ]
    for method, path, body, reason in cases:
        status, answer = node.control(method, path, body)
        assert status == 400, (path, body, answer)
        assert reason in answer["error"], (path, body, answer)


def test_lookups_customers_migrations_rollback(node: Dsbc) -> None:
    status, body = node.control("GET", "/v1/identities/did/+1-555-0001")
    assert status == 200
    assert {k: body[k] for k in ("customer_id", "system", "state")} == {
        "customer_id": "1", "system": "source", "state": "active"}
    status, body = node.control("GET", "/v1/identities/account/nobody")
    assert status == 404 and body["policy"] == "source"

    status, body = node.control("PUT", "/v1/customers/5", {"identities": ["account:a5", "cpe:00-11-22-33-44-55"],
                                                             "system": "target", "group": ""})
    assert status == 200 and body["created"] and body["identities"] == ["account:a5", "cpe:001122334455"]
    assert node.control("GET", "/v1/identities/cpe/001122334455")[1]["system"] == "target"
    assert node.control("GET", "/v1/customers/5")[1]["identities"] == ["account:a5", "cpe:001122334455"]
    assert node.control("GET", "/v1/customers/nobody")[0] == 404
    # no silent migration (no audit entry, no group check): a PUT naming another system for
    # a stored customer is refused; one that leaves system out keeps it there
    status, body = node.control("PUT", "/v1/customers/5", {"identities": ["account:a5"], "system": "source"})
    assert status == 409 and "dsbc migrate --customer 5 --to source" in body["error"], body
    status, body = node.control("PUT", "/v1/customers/5", {"identities": ["account:a5", "did:5550105"]})
    assert status == 200 and body["system"] == "target" and not body["created"]
    # nor a silent take-over: an identity of another customer (on another system) is refused
    status, body = node.control("PUT", "/v1/customers/6", {"identities": ["account:a1"], "system": "target"})
    assert status == 409 and "account:a1 belongs to customer 1" in body["error"], body
    assert node.control("GET", "/v1/identities/account/a1")[1]["customer_id"] == "1"
    # nor a split group: a new member of "ivr" (on the source) on the target
    status, body = node.control("PUT", "/v1/customers/7", {"identities": ["account:a7"], "system": "target",
                                                             "group": "ivr"})
    assert status == 409 and body["error"].startswith("group 'ivr' would be split (3, 4 on source; 7 on target)")
    assert node.control("GET", "/v1/customers/7")[0] == 404

    status, body = node.control("POST", "/v1/migrations", {"customers": ["1", "2", "x"], "dry_run": True})
    assert status == 200 and (body["moved"], body["unknown"], body["dry_run"]) == (["1", "2"], ["x"], True)
    assert node.control("GET", "/v1/identities/account/a1")[1]["system"] == "source"
    # the system's name in any case, as PUT's "system" and the CSV import take it
    status, body = node.control("POST", "/v1/migrations", {"customers": ["1"], "to": "Target", "dry_run": True})
    assert status == 200 and (body["to"], body["moved"]) == ("target", ["1"]), body

    status, body = node.control("POST", "/v1/migrations", {"customers": ["3"], "to": "target"})
    assert status == 409 and body["group"] == "ivr" and body["missing"] == ["4"]
    assert "must move together" in body["error"]

    status, body = node.control("POST", "/v1/migrations", {"customers": ["1", 2, "x"], "to": "target", "who": "ops"})
    assert status == 200, body
    assert (body["moved"], body["already"], body["unknown"]) == (["1", "2"], [], ["x"])
    batch = body["batch_id"]
    # the node's own index has it at once (read your writes)
    assert node.control("GET", "/v1/identities/account/a1")[1]["system"] == "target"
    again = node.control("POST", "/v1/migrations", {"customers": ["1"]})[1]
    assert again["already"] == ["1"] and again["batch_id"] == ""  # nothing moved: no batch
    # nothing but unknown customers is bad input, as for `dsbc migrate` (exit 2), dry run or not
    for dry in (False, True):
        status, body = node.control("POST", "/v1/migrations", {"customers": ["x", "y"], "dry_run": dry})
        assert status == 404 and body["unknown"] == ["x", "y"], body
        assert body["error"] == "unknown customer(s): x, y"

    assert node.control("POST", "/v1/migrations/b-nope/rollback")[0] == 404
    status, body = node.control("POST", f"/v1/migrations/{batch}/rollback", {"who": "ops"})
    assert status == 200 and sorted(body["moved"]) == ["1", "2"] and body["rolled_back"] == batch
    assert node.control("GET", "/v1/identities/account/a2")[1]["system"] == "source"

    rolled = body["batch_id"]
    status, body = node.control("POST", f"/v1/migrations/{batch}/rollback", {"who": "ops"})
    assert status == 200 and body["moved"] == [] and body["batch_id"] == ""  # twice: no batch of nothing

    status, st = node.control("GET", "/v1/status")
    assert status == 200
    assert [b["batch_id"] for b in st["store"]["batches"]][:2] == [rolled, batch]
    assert st["store"]["counts"]["customers"] == 5
    assert st["node"]["sip_workers"] == 1


def test_status_names_the_master_pid(node: Dsbc) -> None:
    """`dsbc status` printed worker 0's pid as the node's: a SIGHUP sent to it did nothing
    (workers ignore it) and a SIGTERM drained worker 0 alone, which the master restarted."""
    status, st = node.control("GET", "/v1/status")
    assert status == 200
    assert node.proc is not None and st["pid"] == node.proc.pid


def test_prepare_and_unprepare(node: Dsbc) -> None:
    status, body = node.control("POST", "/v1/migrations", {"customers": ["2"], "prepare": True})
    assert status == 200 and body["prepared"] == 1, body
    assert node.control("GET", "/v1/customers/2")[1]["expires_cap"] > 0
    status, body = node.control("POST", "/v1/migrations", {"customers": ["2"], "unprepare": True})
    assert status == 200 and body["unprepared"] == 1 and body["dry_run"] is False, body
    assert node.control("GET", "/v1/customers/2")[1]["expires_cap"] == 0
    status, body = node.control("POST", "/v1/migrations", {"customers": ["2"], "prepare": True, "unprepare": True})
    assert status == 400 and "give one" in body["error"]
    # a rollback prepared and postponed: the unprepare names no direction (found by an audit)
    assert node.control("POST", "/v1/migrations", {"customers": ["2"]})[0] == 200
    status, body = node.control("POST", "/v1/migrations", {"customers": ["2"], "to": "source", "prepare": True})
    assert status == 200 and body["prepared"] == 1, body
    status, body = node.control("POST", "/v1/migrations", {"customers": ["2"], "unprepare": True})
    assert status == 200 and body["unprepared"] == 1, body
    assert node.control("GET", "/v1/customers/2")[1]["expires_cap"] == 0
    assert node.control("POST", "/v1/migrations", {"customers": ["2"], "to": "source"})[0] == 200  # as it was


def test_customers_locked_by_another_batch_are_refused_409(node: Dsbc) -> None:
    from dsbc.store import open_store

    store = open_store(f"sqlite:///{node.db}")
    try:
        store.lock(["2"], "b-in-flight")
    finally:
        store.close()
    deadline = time.monotonic() + 5  # the node sees the change within store.poll_interval
    while node.control("GET", "/v1/customers/2")[1].get("state") != "locked" and time.monotonic() < deadline:
        time.sleep(0.05)
    status, body = node.control("POST", "/v1/migrations", {"customers": ["1", "2"], "to": "target"})
    assert status == 409 and body["locked"] == {"2": "b-in-flight"}, body
    assert node.control("GET", "/v1/identities/account/a1")[1]["system"] == "source"  # nothing moved
    status, body = node.control("POST", "/v1/migrations", {"customers": ["1", "2"], "dry_run": True})
    assert status == 409 and body["locked"] == {"2": "b-in-flight"}, body  # as the run would
    status, body = node.control("POST", "/v1/migrations", {"customers": ["2"], "to": "target", "force": True})
    assert status == 200 and body["moved"] == ["2"], body
    status, body = node.control("POST", "/v1/migrations", {"customers": ["2"], "to": "source"})
    assert status == 200 and body["moved"] == ["2"], body


def test_a_system_without_sip_nodes_is_down(tmp_path: Path) -> None:
    """[systems.target] with no sip nodes (forgotten): every SIP request of a target
    customer got 503, and /healthz said "ok" ("every system has a node up")."""
    d = Dsbc(tmp_path / "dsbc", source=[f"udp:127.0.0.1:{free_port('udp')}"])
    with d:
        wait_control(d)
        status, body = d.control("GET", "/healthz", token=None)
        assert status == 200 and body["status"] == "degraded" and "target" in body["systems_down"], body
        assert "systems.target.sip: no SIP node while SIP is enabled" in d.log_tail()


def test_health_and_metrics(node: Dsbc) -> None:
    deadline = time.monotonic() + 10  # no back-end SIP node answers: marked down after a few pings
    while True:
        status, body = node.control("GET", "/healthz", token=None)
        if body["status"] == "degraded" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200 and body["status"] == "degraded", body
    assert body["systems_down"] == ["source", "target"] and body["store"]["healthy"] is True
    assert node.control("GET", "/healthz?strict=1", token=None)[0] == 503
    status, text = node.control("GET", "/metrics", token=None)
    assert status == 200
    lines = text.splitlines()
    assert "dsbc_up 1" in lines and "dsbc_store_healthy 1" in lines
    assert any(ln.startswith('dsbc_backend_up{node="udp:127.0.0.1:') and ln.endswith(" 0") for ln in lines)
    assert any(ln.startswith('dsbc_sip_requests_total{method="OPTIONS"}') for ln in lines)
    assert any(ln.startswith('dsbc_customers{state="active",system="source"}') for ln in lines)


def test_cli_through_the_node(node: Dsbc) -> None:
    r = node.cli("where", "account:a4", "--node", "local")
    assert "customer: 4" in r.stdout and "system:   source (MR100)" in r.stdout
    r = node.cli("migrate", "--customer", "3", "--customer", "4", "--node", "local")
    assert "moved 2, already on target 0, unknown 0; batch b-" in r.stdout and "(through http://" in r.stdout
    # as without --node: the batch's phones on the new system (found by an audit: left out)
    assert "; registered on target: 0/0 phones (through http://" in r.stdout, r.stdout
    batch = r.stdout.split("batch ")[1].split()[0].rstrip(";")
    assert node.control("GET", "/v1/identities/account/a3")[1]["system"] == "target"
    r = node.cli("migrate", "--customer", "3", "--to", "source", "--node", node.control_url, check=False)
    assert r.returncode == 2 and "must move together" in r.stderr  # group back to source: 4 missing
    r = node.cli("migrate", "--customer", "5", "--prepare", "--node", "local")
    assert r.stdout.splitlines()[1].startswith("no phone of the batch is registered now"), r.stdout
    r = node.cli("migrate", "--customer", "nobody", "--node", "local", check=False)
    assert r.returncode == 2 and r.stderr.rstrip().endswith("unknown customer(s): nobody"), r.stderr
    r = node.cli("rollback", batch, "--node", "local")
    assert r.stdout.startswith(f"rolled back {batch}: moved 2")
    r = node.cli("where", "account:nobody", "--node", "local", check=False)
    assert r.returncode == 1 and "unknown: would go to source" in r.stdout
    r = node.cli("status")
    assert r.stdout.splitlines()[0].startswith(f"node {node.control_url} (pid ")
    assert "  back ends:" in r.stdout and "sip       source" in r.stdout
    # a node that is not there: one line, exit 1
    r = node.cli("where", "account:a1", "--node", "127.0.0.1:1", check=False)
    assert r.returncode == 1 and r.stderr.startswith("no running node reachable at http://127.0.0.1:1")


def test_logs_are_json_lines(node: Dsbc) -> None:
    import json

    lines = [ln for ln in (node.workdir / "dsbc.log").read_text().splitlines() if ln and not ln.startswith("###")]
    assert lines
    records = [json.loads(ln) for ln in lines]
    assert {"ts", "level", "logger", "pid", "msg"} <= set(records[0])
    assert any("control API on http://127.0.0.1" in r["msg"] for r in records)


def test_no_token_configured_refuses_v1(tmp_path: Path) -> None:
    d = Dsbc(tmp_path, source=[f"udp:127.0.0.1:{free_port('udp')}"], target=[])
    text = d.config_path.read_text().replace('token = "test-token"', "")
    d.config_path.write_text(text)
    d.start()
    try:
        wait_control(d)
        status, body = d.control("GET", "/v1/status")
        assert status == 401 and "control.token is set" in body["error"]
        assert d.control("GET", "/healthz", token=None)[0] in (200, 503)
    finally:
        d.stop()


def test_wrong_method_says_allow_and_scanned_paths_stay_one_counter(node: Dsbc) -> None:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(node.control_url + "/v1/customers/1", method="DELETE",
                                 headers={"Authorization": "Bearer test-token"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=10)
    assert ei.value.code == 405
    assert {m.strip() for m in ei.value.headers["Allow"].split(",")} >= {"GET", "PUT"}
    for i in range(30):  # a scanner, no token: one counter, not one key per path
        node.control("GET", f"/admin{i}/login.php", token=None)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        requests = next(s["services"]["control"]["requests"] for s in node.status() if "control" in s["services"])
        if requests.get("other", 0) >= 30:
            break
        time.sleep(0.2)
    assert requests.get("other", 0) >= 30 and not any(k.startswith("admin") for k in requests), requests


def _raw(node: Dsbc, data: bytes) -> tuple[str, dict[str, str], bytes]:
    import socket

    with socket.create_connection(("127.0.0.1", node.control_port), timeout=10) as sock:
        sock.sendall(data)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return lines[0], headers, body


def test_requests_aiohttp_refuses_get_json_faults_too(node: Dsbc) -> None:
    """Was aiohttp's text/plain answer (and its log of an error with a traceback) for a
    request line it cannot parse or a header over 8 KB: every answer is JSON now."""
    cases = [
        (b"BLAH\x01 / HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", "431"),
    ]
    for data, code in cases:
        status, headers, body = _raw(node, data)
        assert status.startswith(f"HTTP/1.1 {code}"), status
        assert headers["content-type"].startswith("application/json"), headers
        assert "not valid HTTP" in json.loads(body)["error"]
    # the node goes on answering, and logged no error for it
    assert node.control("GET", "/healthz", token=None)[0] == 200
    assert "Error handling request" not in node.log_tail()


def test_metrics_and_status_do_not_wait_out_a_hung_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: with Redis stopped (SIGSTOP), /metrics and /v1/status took the
    10 s socket timeout, so Prometheus' scrape failed and `dsbc status` called a live node
    unreachable.  Now they wait COUNTS_WAIT at most, and one read runs at a time."""
    import asyncio
    import threading

    from dsbc import control
    from dsbc.config import Config
    from dsbc.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
    release = threading.Event()
    reads: list[int] = []

    def hung_counts() -> dict[str, int]:
        reads.append(1)
        release.wait(10)
        return {"customers": 0}

    monkeypatch.setattr(store, "counts", hung_counts)
    monkeypatch.setattr(control, "COUNTS_WAIT", 0.2)
    svc = control.ControlService(Config(), store, None)

    async def main() -> None:
        for _ in range(3):
            resp = await asyncio.wait_for(svc.metrics(None), 5)  # type: ignore[arg-type]
            assert resp.status == 200 and "dsbc_" in (resp.text or "")
            svc._counts = (0.0, svc._counts[1])  # as if COUNTS_TTL had passed
        resp = await asyncio.wait_for(svc.status_handler(None), 5)  # type: ignore[arg-type]
        assert json.loads(resp.text or "")["store"]["error"] == "the store did not answer within 0.2 s"
        assert len(reads) == 1  # the hung read was waited for again, not started again
        release.set()

    try:
        asyncio.run(main())
    finally:
        release.set()
        store.close()


def test_workers_a_reload_stopped_are_not_counted(tmp_path: Path) -> None:
    """A reload from 3 workers to 1: the stopped workers' snapshots stay fresh for a few
    seconds, and dsbc status, /healthz and dsbc_workers said 3 (their counters summed in)."""
    from dsbc import control
    from dsbc.config import Config, SipConfig
    from dsbc.store import open_store

    now = time.time()
    for index in range(3):
        (tmp_path / f"worker-{index}.json").write_text(json.dumps(
            {"worker": index, "pid": 100 + index, "ts": now, "services": {"sip": {"running": True}}}))
    store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
    try:
        svc = control.ControlService(Config(sip=SipConfig(workers=1)), store, tmp_path)
        assert [s["worker"] for s in svc._snapshots()] == [0]
        svc = control.ControlService(Config(sip=SipConfig(workers=3)), store, tmp_path)
        assert [s["worker"] for s in svc._snapshots()] == [0, 1, 2]
    finally:
        store.close()


def test_a_migration_whose_registration_count_fails_still_reports_its_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: a store that stopped answering right after the flip (Redis
    restarting) turned the committed migration's answer into 503 "reading registrations
    failed", with no batch id to roll back; and one that did not answer before it said
    "reading registrations failed" without saying that nothing was changed."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from dsbc import control
    from dsbc.config import Config
    from dsbc.store import StoreUnavailable, open_store

    store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
    store.import_rows([{"customer_id": str(i), "identities": [f"account:u{i}"]} for i in (1, 2)])
    reads: list[int] = []

    def away_after_the_flip(*_: object) -> int:
        reads.append(1)
        raise StoreUnavailable("reading registrations failed: cannot reach redis://x")

    monkeypatch.setattr(control, "phones_on", away_after_the_flip)
    cfg = Config()
    cfg.control.token = "t"
    svc = control.ControlService(cfg, store, None)
    auth = {"Authorization": "Bearer t"}

    async def main() -> None:
        async with TestClient(TestServer(svc.app)) as client:
            resp = await client.post("/v1/migrations", json={"customers": ["1"]}, headers=auth)
            body = await resp.json()
            assert resp.status == 200, body
            assert body["batch_id"] and body["moved"] == ["1"] and body["registered"] is None
            monkeypatch.setattr(control, "phones_by_account", away_after_the_flip)
            resp = await client.post("/v1/migrations", json={"customers": ["2"]}, headers=auth)
            body = await resp.json()
            assert resp.status == 503
            assert body["error"].startswith("migration refused: reading registrations failed")
            assert "nothing was changed" in body["error"]

    try:
        asyncio.run(main())
        assert store.customer("1").system == "target"  # type: ignore[union-attr]
        assert store.customer("2").system == "source"  # type: ignore[union-attr]
    finally:
        store.close()


def test_healthz_says_starting_until_a_sip_worker_reports(tmp_path: Path) -> None:
    """Found by a review: worker 0 opens the control API before its SIP listeners (so that a
    reload never leaves /healthz unanswered); on a fresh start /healthz said "ok" for its
    first 3 s while nothing listened on SIP, and keepalived could take the address."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from dsbc import control
    from dsbc.config import Config
    from dsbc.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
    svc = control.ControlService(Config(), store, tmp_path)

    async def main() -> None:
        async with TestClient(TestServer(svc.app)) as client:
            resp = await client.get("/healthz")
            assert resp.status == 503 and (await resp.json())["status"] == "starting"
            (tmp_path / "worker-0.json").write_text(json.dumps(
                {"worker": 0, "pid": 100, "ts": time.time(), "services": {"sip": {"running": True}}}))
            resp = await client.get("/healthz")
            assert resp.status == 200, await resp.text()

    try:
        asyncio.run(main())
    finally:
        store.close()


def test_requests_write_no_access_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Review (rev-aaa): the control API is polled every second (keepalived's /healthz,
    Prometheus): it writes no aiohttp.access line per request, as before its JSON faults."""
    import asyncio
    import socket
    import urllib.request

    from dsbc.config import parse_config
    from dsbc.control import ControlService
    from dsbc.store import open_store

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"sqlite:///{tmp_path}/loc.db"
    cfg = parse_config(f'[store]\nurl = "{url}"\n[systems.source]\nname = "A"\n[systems.target]\nname = "B"\n'
                       f'[sip]\nenabled = false\n[control]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')

    async def scenario() -> None:
        store = open_store(url)
        svc = ControlService(cfg, store, None)
        await svc.start()
        try:
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())
            assert b"status" in body
        finally:
            await svc.stop()
            store.close()

    with caplog.at_level("INFO"):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if r.name == "aiohttp.access"]


def test_slow_and_silent_clients_are_closed(node: Dsbc) -> None:
    """Found by an audit: a client that connected and sent nothing, or half a request head,
    or a head and then not its body, held its connection to worker 0 forever (aiohttp
    bounds none of these): /metrics is often opened to a scraper's network, and enough
    such connections take every file descriptor of the worker that also serves SIP."""
    import socket

    from dsbc.control import BODY_TIMEOUT, HEAD_TIMEOUT

    def closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
        start = time.monotonic()
        sock.settimeout(limit)
        got = b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return time.monotonic() - start, got

    silent = socket.create_connection(("127.0.0.1", node.control_port))
    half = socket.create_connection(("127.0.0.1", node.control_port))
    half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    body = socket.create_connection(("127.0.0.1", node.control_port))
    body.sendall(b"PUT /v1/customers/9 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + b"test-token\r\nContent-Length: 100\r\n\r\n{")
    try:
        for sock in (silent, half):
            took, got = closed_after(sock, HEAD_TIMEOUT + 5)
            assert got == b"" and took < HEAD_TIMEOUT + 4, (took, got)
        took, got = closed_after(body, BODY_TIMEOUT)
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert b"did not arrive" in got
    finally:
        for sock in (silent, half, body):
            sock.close()
    assert node.control("GET", "/healthz", token=None)[0] == 200  # still serving


def test_the_start_says_which_core_runs(node: Dsbc) -> None:
    """Found by an audit: the README says an install without a C compiler "says so", but pip
    hides a successful build's output: only `dsbc --version` told.  The start says it."""
    import re

    text = (node.workdir / "dsbc.log").read_text(errors="replace")
    assert re.search(r"dsbc running with \d+ worker\(s\), config \S+; SIP core and API fast path: "
                     r"(compiled \(mypyc\)|pure Python \(about 2\.5x slower)", text), node.log_tail()


def test_a_client_gone_mid_body_is_no_error(node: Dsbc) -> None:
    """Found by an audit: a client that closed its connection while sending a body (a
    script killed, a curl timeout) left an ERROR and a traceback (ConnectionResetError) in
    the log, where the API dispatcher counts it and says nothing."""
    import socket

    with socket.create_connection(("127.0.0.1", node.control_port), timeout=5) as s:
        s.sendall(b"PUT /v1/customers/9 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token\r\n"
                  b"Content-Length: 100\r\n\r\n{")
        time.sleep(0.3)
    time.sleep(0.5)
    assert node.control("GET", "/healthz", token=None)[0] == 200
    assert "went away" not in node.log_tail() and not node.traceback(), node.log_tail()


def test_a_put_that_names_no_group_keeps_the_customers_group(node: Dsbc) -> None:
    """Found by an audit: SPEC 4 makes group optional (group?), but a PUT that left it out
    (to change identities) took the customer out of its group, and the next migration split
    the group (an IVR's access number) without a word.  Left out, it stays; "" leaves it."""
    status, body = node.control("PUT", "/v1/customers/3", {"identities": ["account:a3", "did:5550303"]})
    assert status == 200 and body["group"] == "ivr", body
    assert node.control("GET", "/v1/customers/3")[1]["group"] == "ivr"
    status, body = node.control("POST", "/v1/migrations", {"customers": ["3"], "dry_run": True})
    assert status == 409 and body["group"] == "ivr" and body["missing"] == ["4"], body
    status, body = node.control("PUT", "/v1/customers/3", {"identities": ["account:a3"], "group": ""})
    assert status == 200 and body["group"] == "", body
    status, body = node.control("PUT", "/v1/customers/3", {"identities": ["account:a3"], "group": "ivr"})
    assert status == 200 and body["group"] == "ivr", body


def test_a_put_checks_what_other_processes_committed_a_moment_ago(tmp_path: Path) -> None:
    """Found by an audit: a PUT right after a `dsbc migrate` or `dsbc import` (another process)
    was checked against worker 0's index before it had caught up (store.poll_interval): a
    new member of the group just moved to the target was refused as a group split ("2, 3
    on source"), and one added on the source, which does split it, was taken; an identity
    the CLI had just given another customer was taken over.  A PUT first applies what the
    store committed."""
    d = Dsbc(tmp_path, source=[f"udp:127.0.0.1:{free_port('udp')}"], target=[f"udp:127.0.0.1:{free_port('udp')}"],
             customers=CUSTOMERS, poll_interval=30.0)  # the index catches up only when told
    d.start()
    try:
        wait_control(d)
        d.cli("migrate", "--customer", "3", "4", "--to", "target")
        status, body = d.control("PUT", "/v1/customers/5", {"identities": ["account:a5"], "system": "target",
                                                            "group": "ivr"})
        assert status == 200 and body["group"] == "ivr", body
        status, body = d.control("PUT", "/v1/customers/6", {"identities": ["account:a6"], "system": "source",
                                                            "group": "ivr"})
        assert status == 409 and "would be split" in body["error"], body
        (tmp_path / "more.jsonl").write_text(json.dumps({"customer_id": "7", "identities": ["account:a7"]}) + "\n")
        d.cli("import", str(tmp_path / "more.jsonl"))
        status, body = d.control("PUT", "/v1/customers/8", {"identities": ["account:a7"]})
        assert status == 409 and "belongs to customer 7" in body["error"], body
        assert d.cli("where", "account:a7").stdout.splitlines()[1] == "customer: 7"
    finally:
        d.stop()
    assert not d.traceback(), d.traceback()


def test_where_through_a_node_tells_the_nodes_policy_for_an_unknown_identity(node: Dsbc, tmp_path: Path) -> None:
    """Found by an audit: `dsbc where --node URL` of an identity the node does not know said
    what the *local* config's store.unknown would do (from an operator's desk: the default,
    source), not what that node does with it."""
    import subprocess
    import sys

    desk = tmp_path / "desk.toml"
    desk.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "desk.db"}"\nunknown = "reject"\n'
                    f'[control]\ntoken = "test-token"\n')
    r = subprocess.run([sys.executable, "-m", "dsbc.cli", "-c", str(desk), "where", "--node", node.control_url,
                        "account:nobody"], capture_output=True, text=True, timeout=60, env=node.env(), check=False)
    assert r.returncode == 1 and r.stdout.strip() == "account:nobody: unknown: would go to source (store.unknown)", r


def test_a_write_through_the_control_api_tells_the_services_which_customers_changed(tmp_path: Path) -> None:
    """Found by an audit: worker 0 applied its control-API writes to its index itself and
    dropped the list of changed customers, so when it did so before its poll did, the SIP,
    API and RADIUS services never heard of the flip: a request they held for the batch
    went at its store.lock_hold deadline (or a ping's re-check), not at the flip."""
    import asyncio

    from dsbc import control
    from dsbc.config import Config
    from dsbc.store import open_store

    url = f"sqlite:///{tmp_path / 'loc.db'}"
    store = open_store(url, create=True)
    store.put_customer("1", ["account:a1"], "source")
    store.refresh()
    writer = open_store(url)  # what `fn` commits, as another connection would
    svc = control.ControlService(Config(), store, None)
    told: list[list[str]] = []
    svc.on_changed = told.append
    try:
        asyncio.run(svc._write(lambda: writer.migrate(["1"], "target")))
    finally:
        writer.close()
        store.close()
    assert told == [["1"]]
