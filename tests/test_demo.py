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
