"""`dsbc demo --check`: the demo starts, routes one request of each kind, migrates, stops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers.dsbc import first_traceback

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_demo_check_routes_each_protocol_and_follows_a_migration(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dsbc.cli", "demo", "--check", "--dir", str(tmp_path / "demo"),
         "--sip-port", "0", "--api-port", "0"],
        capture_output=True, text=True, timeout=100, cwd=REPO, check=False,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "SIP OPTIONS from account 100001: SIP/2.0 200 OK from MR100" in out
    assert "SIP OPTIONS from account 100004: SIP/2.0 200 OK from MR115" in out
    assert "RADIUS Access-Request 100001: code 2 MR100" in out
    assert "RADIUS Access-Request 100004: code 2 MR115" in out
    assert "API admin Customer/get_customer_list: 5 customers merged from both systems" in out
    assert "API Session/login alice: HTTP 200" in out
    assert "moved 1" in out
    assert "after the migration: answered by MR115" in out
    crashed = first_traceback(tmp_path / "demo" / "dsbc.log")
    assert not crashed, crashed
    # the config it wrote is a valid dsbc config that the CLI can use
    where = subprocess.run(
        [sys.executable, "-m", "dsbc.cli", "-c", str(tmp_path / "demo" / "dsbc.toml"), "where", "account:100001"],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert "target" in where.stdout and "MR115" in where.stdout


@pytest.mark.timeout(120)
def test_the_demo_removes_the_temporary_directory_it_made(tmp_path: Path) -> None:
    """Each `dsbc demo` without --dir left a dsbc-demo-* directory (config, SQLite store,
    logs) in /tmp behind it.  The banner names the directory, and it goes when the demo ends."""
    import os

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "dsbc.cli", "demo", "--duration", "0", "--sip-port", "0", "--api-port", "0"],
                       capture_output=True, text=True, timeout=100, cwd=REPO, env=env, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Config, store and logs: {tmp_path}/dsbc-demo-" in r.stdout, r.stdout
    assert "removed when the demo stops" in r.stdout, r.stdout
    assert not list(tmp_path.glob("dsbc-demo-*")), list(tmp_path.iterdir())


def test_the_demo_never_gives_one_port_to_two_listeners(tmp_path: Path) -> None:
    """Found by an audit: `dsbc demo --sip-port 8081` (the control API's preferred port), or
    --sip-port and --api-port alike, or a port the kernel handed out twice, went to two
    listeners: "dsbc exited; see .../dsbc.log" (api.listen ... is sip.listen[1]'s too)."""
    from dsbc.demo import Demo

    for sip, api in ((8081, 8081), (1812, 1813), (0, 0)):
        ports = Demo(tmp_path, sip, api).ports
        assert len(set(ports.values())) == len(ports), ports


@pytest.mark.parametrize("args", [("--sip-port", "70000"), ("--api-port", "-5"), ("--duration", "nan"),
                                  ("--duration", "inf"), ("--duration", "-1")])
def test_bad_demo_options_are_one_line_exit_2(args: tuple[str, str]) -> None:
    """Found by an audit: --sip-port 70000 ended in a traceback (OverflowError from bind),
    --duration nan in one from asyncio (cannot convert float NaN to integer)."""
    r = subprocess.run([sys.executable, "-m", "dsbc.cli", "demo", *args], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and args[0] in r.stderr, r.stderr


def test_ctrl_c_while_the_demo_starts_stops_it_cleanly(tmp_path: Path) -> None:
    """Found by an audit: a Ctrl-C while the demo started (the terminal signals the whole
    process group) reached dsbc too, which died in its imports with a traceback in its log,
    and the demo said "dsbc exited; see .../dsbc.log" (exit 1), as if dsbc had failed."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "dsbc.cli", "demo", "--dir", str(tmp_path),
                             "--sip-port", "0", "--api-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "dsbc.log").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "dsbc.log").exists(), "the demo never started dsbc"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "dsbc.log").read_text()
    assert proc.returncode == 130, (out, err, log[-2000:])
    assert "dsbc exited" not in err and "Traceback" not in err, err
    assert not first_traceback(tmp_path / "dsbc.log"), (tmp_path / "dsbc.log").read_text()
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"{tmp_path}/dsbc.toml"], capture_output=True, text=True, check=False)
    assert not left.stdout.strip(), f"dsbc left running: {left.stdout}"
