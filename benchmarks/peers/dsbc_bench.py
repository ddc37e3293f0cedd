"""dsbc as the system under test: `dsbc run` with a generated config over a copy of the
benchmark store.  Like tests/peers/dsbc.py (the test harness), but every section is
written here so that a scenario can enable the API or RADIUS dispatcher alone and tune
what a load test needs (max_connections_per_ip for 1,000 connections from one sipp).

    d = DsbcBench(workdir, store=dataset.copy_to(workdir / "location.db"), workers=1,
                  sip={"listen": ["udp:127.0.0.1:5060"], ...}, sources={...}).start()
    d.pid            # the master: CpuMeter(d.pid) covers master and workers
    d.worker_pids()  # RSS per worker
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Self

from benchmarks.system.procstat import children_of
from tests.peers.proc import PeerError, PeerProcess

REPO = Path(__file__).resolve().parents[2]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _table(name: str, values: dict[str, Any]) -> str:
    lines = [f"[{name}]"]
    for k, v in values.items():
        if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)):
            lines.append(f"{k} = {_toml(v)}")
    out = "\n".join(lines) + "\n"
    for k, v in values.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out += f"\n[[{name}.{k}]]\n" + "".join(
                    f"{ik} = {_toml(iv)}\n" for ik, iv in item.items()
                )
    return out + "\n"


class DsbcBench:
    def __init__(
        self,
        workdir: Path,
        store: Path,
        *,
        workers: int = 1,
        sip: dict[str, Any] | None = None,
        systems: dict[str, dict[str, Any]] | None = None,
        api: dict[str, Any] | None = None,
        radius: dict[str, Any] | None = None,
        store_extra: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.run_dir = self.workdir / "run"
        self.config_path = self.workdir / "dsbc.toml"
        sip_cfg: dict[str, Any] = (
            {"enabled": False}
            if sip is None
            else {
                "workers": workers,
                "flow_secret": "bench-flow-secret-0123456789abcdef",
                "options_interval": 1.0,
                "options_timeout": 1.0,
                **sip,
            }
        )
        if sip is None:
            sip_cfg["workers"] = workers
        text = _table(
            "store", {"url": f"sqlite:///{store}", "unknown": "source", **(store_extra or {})}
        )
        for name in ("source", "target"):
            text += _table(
                f"systems.{name}",
                {
                    "name": {"source": "MR100", "target": "MR115"}[name],
                    **(systems or {}).get(name, {}),
                },
            )
        text += _table("sip", sip_cfg)
        text += _table("api", {"enabled": False} if api is None else api)
        text += _table("radius", {"enabled": False} if radius is None else radius)
        text += _table("control", {"enabled": False})
        text += _table("log", {"level": "warning"})
        self.config_path.write_text(text)
        self.proc: PeerProcess | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        return children_of(self.pid) if self.proc is not None else []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DSBC_RUN_DIR"] = str(self.run_dir)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self, timeout: float = 180.0) -> Self:
        self.proc = PeerProcess(
            "dsbc-bench",
            [sys.executable, "-m", "dsbc.cli", "-c", str(self.config_path), "run"],
            self.workdir / "dsbc.log",
            cwd=REPO,
            env=self.env(),
        )
        self.proc.start()
        deadline = time.monotonic() + timeout
        while True:
            if not self.proc.alive():
                raise PeerError(f"dsbc exited at start:\n{self.proc.log_tail()}")
            ready = list(self.run_dir.glob("ready-*")) if self.run_dir.exists() else []
            if len({p.name.split("-")[1] for p in ready}) >= self.workers:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(
                    f"dsbc: {len(ready)}/{self.workers} workers ready after {timeout:.0f}s"
                )
            time.sleep(0.1)

    def worker_counters(self) -> list[dict[str, int]]:
        """Each worker's SIP counters (from its snapshot, written once a second)."""
        out = []
        for p in sorted(self.run_dir.glob("worker-*.json")):
            try:
                snap = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            out.append(dict(snap.get("services", {}).get("sip", {}).get("counters", {})))
        return out

    def counters(self) -> dict[str, int]:
        """The SIP counters summed over the workers' snapshots (written once a second)."""
        total: dict[str, int] = {}
        for p in sorted(self.run_dir.glob("worker-*.json")):
            try:
                snap = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            for k, v in snap.get("services", {}).get("sip", {}).get("counters", {}).items():
                total[k] = total.get(k, 0) + v
        return total

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines) if self.proc is not None else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=10.0)
            self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
