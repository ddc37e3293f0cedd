"""The whole-system benchmarks (benchmarks/system/) at a tiny size: correctness only.

Every scenario of ``python -m benchmarks run`` runs here against its real peers
(Kamailio, sipp, nginx, wrk, FreeRADIUS, radclient, redis-server) with the SMOKE
parameters: a store of 10,000 identities, a few dozen calls, one step of each rate
search, a second of wrk.  The tests check that every call, request and migration went
through both dsbc and the peer and that each scenario produced its rows; they assert
nothing about speed (the numbers of a smoke run mean nothing, see benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.__main__ import main as bench_main
from benchmarks.system import api, radius, runner, sip, store
from benchmarks.system.context import SMOKE, Context, Row
from benchmarks.system.results import render
from tests.peers.dsbc import first_traceback

pytestmark = [pytest.mark.peers, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Context]:
    c = Context(SMOKE, tmp_path_factory.mktemp("bench"), verbose=False)
    yield c


@pytest.fixture(autouse=True)
def no_tracebacks(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each scenario: no dsbc it started logged an exception."""
    yield
    if "ctx" in request.fixturenames:
        c: Context = request.getfixturevalue("ctx")
        for log in sorted(c.workdir.rglob("dsbc.log")):
            crashed = first_traceback(log)
            assert not crashed, f"{log}:\n{crashed}"


def need(*scenarios: str) -> None:
    missing = runner.missing_programs(list(scenarios))
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def rows_of(ctx: Context, start: int) -> list[Row]:
    return ctx.rows[start:]


def test_list_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in runner.NAMES)


def test_sip_scenarios_dsbc_and_kamailio(ctx: Context) -> None:
    need("calls-cpu", "tcp")
    start = len(ctx.rows)
    sip.run(ctx, set(sip.SCENARIOS))
    assert ctx.errors == []
    rows = {(r.scenario, r.metric): r for r in rows_of(ctx, start)}
    cpu = rows[("SIP calls, UDP, 1 worker", "CPU per call")]
    # CPU seconds of a few dozen calls can round to 0 ticks: only that they were read
    assert cpu.dsbc is not None and cpu.peer is not None and cpu.dsbc >= 0 and cpu.peer >= 0
    # one step at the smoke rate: every call and REGISTER went through, none failed
    for key in (
        ("SIP calls, UDP, 1 worker", "highest rate, 0 failed"),
        ("SIP REGISTER, UDP, 1 worker", "highest rate, 0 failed"),
    ):
        assert (
            rows[key].dsbc == SMOKE.call_start_rate and rows[key].peer == SMOKE.call_start_rate
        ), rows[key]
    allw = next(
        r
        for r in rows.values()
        if r.scenario.startswith("SIP REGISTER") and "workers" in r.scenario
    )
    assert (
        allw.dsbc == SMOKE.register_start_rate and allw.met is False
    )  # 5,000/s is not a smoke rate
    tcp = rows[(f"SIP calls, TCP, {SMOKE.tcp_connections:,} connections", "CPU per call")]
    assert tcp.dsbc is not None and tcp.peer is not None and tcp.dsbc >= 0, tcp


def test_api_scenarios_dsbc_and_nginx(ctx: Context) -> None:
    need("api", "api-merge")
    start = len(ctx.rows)
    api.run(ctx)
    api.run_merge(ctx)
    assert ctx.errors == []
    rows = rows_of(ctx, start)
    rate, latency, merge = rows
    assert rate.dsbc and rate.peer and latency.dsbc is not None
    assert (
        merge.dsbc and merge.dsbc > 0 and "2 x" in merge.scenario
    )  # the merge checked 2 x 50 rows


def test_radius_scenario_dsbc_and_freeradius(ctx: Context) -> None:
    need("radius")
    start = len(ctx.rows)
    radius.run(ctx)
    assert ctx.errors == []  # nothing lost on either side
    rate, cpu = rows_of(ctx, start)
    assert rate.dsbc and rate.peer and cpu.dsbc is not None and cpu.peer is not None


def test_store_scenario(ctx: Context) -> None:
    start = len(ctx.rows)
    store.run(ctx)
    assert ctx.errors == []  # the second node saw every migration
    rows = rows_of(ctx, start)
    metrics = [r.metric for r in rows]
    assert metrics[:2] == ["RSS per worker", "median lookup time"]
    latency = [r.scenario for r in rows if r.metric == "p99 latency"]
    assert any("SQLite" in s for s in latency)
    assert all(r.dsbc is not None and r.dsbc > 0 for r in rows)


def test_results_table(ctx: Context, tmp_path: Path) -> None:
    text = render(ctx, 0.0, 1.0, "pytest")
    assert "| scenario | metric | dsbc | peer | ratio |" in text
    assert text.count("\n| ") >= 1 + len(ctx.rows)
