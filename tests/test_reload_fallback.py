"""The master's rolling reload when a new worker fails although the preflight passed
(dsbc/runner.py, `Master.reload`): the worker index must go on serving with the running
configuration, not restart with the new one until the master gives up on the node.

The workers are not forked here (`os.fork` and `os.kill` are replaced): what is checked is
which configuration each worker index is started with, which a real failing worker cannot
show without a fault that the preflight would not catch.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest

from dsbc import runner
from dsbc.config import Config


@pytest.fixture
def master(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[runner.Master, Config, list[tuple[int, int]]]:
    pids = itertools.count(1000)
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "fork", lambda: next(pids))
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    old = Config()
    old.sip.workers = 2
    new = Config()
    new.sip.workers = 2
    monkeypatch.setattr(runner, "load_config", lambda path: new)
    monkeypatch.setattr(runner, "preflight", lambda cfg: cfg)
    monkeypatch.setattr(runner, "check_listeners_free", lambda cfg, running=None: None)
    m = runner.Master(old, str(tmp_path / "dsbc.toml"))
    m.run_dir = tmp_path
    for i in range(2):
        m.spawn(i)
    return m, new, killed


def _outcomes(monkeypatch: pytest.MonkeyPatch, results: dict[str, str]) -> None:
    """`_wait_file` answers by marker name prefix and worker index ("loaded-1", "ready-0")."""
    def wait(self: runner.Master, name: str, pid: int, timeout: float) -> str:
        return results.get("-".join(name.split("-")[:2]), "ok")
    monkeypatch.setattr(runner.Master, "_wait_file", wait)


def test_a_new_worker_that_dies_after_loading_runs_the_old_config_again(
        master: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    m, new, _killed = master
    old = m.cfg
    _outcomes(monkeypatch, {"ready-0": "dead"})
    m.reload()
    assert m.configs[0] is old  # restarted with what it ran, not with the config that failed
    assert m.workers[0] == 1003  # 1000, 1001 at the start, 1002 the new one that died
    assert m.configs[1] is old and m.workers[1] == 1001  # not replaced: still running
    assert m.cfg is old  # nothing was replaced: the master's config is the running one
    assert new is not old


def test_a_failure_further_on_keeps_what_was_replaced(master: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    m, new, _killed = master
    old = m.cfg
    _outcomes(monkeypatch, {"loaded-1": "dead"})
    m.reload()
    assert m.configs[0] is new and m.workers[0] == 1002  # replaced
    assert m.configs[1] is old and m.workers[1] == 1001  # its new worker did not load: the old one stays


def test_a_reload_that_works_moves_every_index(master: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    m, new, killed = master
    _outcomes(monkeypatch, {})
    m.reload()
    assert m.cfg is new and m.configs == {0: new, 1: new} and m.workers == {0: 1002, 1: 1003}
    assert [pid for pid, _sig in killed] == [1000, 1001]  # the old ones were told to drain
