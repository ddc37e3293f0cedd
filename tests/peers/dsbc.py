"""dsbc itself as a peer: `dsbc run` in a subprocess with a generated config and store.

with Dsbc(tmp_path, source=["udp:127.0.0.1:5070"], target=[...], customers=[...]) as d:
    d.sip_addr            # ("127.0.0.1", port), UDP and TCP
    d.tls_port            # with transports=(..., "tls") and tls=(cert, key)
    d.cli("migrate", "--customer", "42")
    d.status()            # the workers' snapshots
    d.control("GET", "/v1/status")   # the control API: (HTTP status, JSON body)

store_url="redis://127.0.0.1:PORT/0" runs it on a shared store instead of its own SQLite
file (tests/peers/redis.py starts a redis-server); store_extra adds [store] keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from tests.peers.net import free_port, sip_options
from tests.peers.proc import PeerError, PeerProcess

REPO = Path(__file__).resolve().parents[2]
#: sip.flow_secret of every instance (tests sign flow tokens and branches with it)
FLOW_SECRET = "test-flow-secret-0123456789abcdef"


def _toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def first_traceback(log: Path) -> str:
    """The first traceback in a log file with some lines before it, or '' (text or JSON
    log lines alike): an exception that escaped into dsbc's log is a bug."""
    text = log.read_text(errors="replace") if log.exists() else ""
    at = text.find("Traceback (most recent call last)")
    return "" if at < 0 else text[max(0, at - 300) : at + 1500]


class Dsbc:
    def __init__(
        self,
        workdir: Path,
        *,
        source: Sequence[str] = (),
        target: Sequence[str] = (),
        customers: Sequence[dict[str, Any]] = (),
        ip: str = "127.0.0.1",
        port: int | None = None,
        transports: Sequence[str] = ("udp", "tcp"),
        trusted: Sequence[str] = (),
        workers: int = 1,
        lock_hold: float = 2.0,
        unknown: str = "source",
        options_interval: float = 0.5,
        options_timeout: float = 0.5,
        migration_expires: int = 60,
        extra: str = "",
        store_url: str | None = None,
        store_extra: str = "",
        poll_interval: float = 0.1,
        tls: tuple[Path, Path] | None = None,
        sip_extra: str = "",
        api: str = "[api]\nenabled = false\n",
        extra_listen: Sequence[str] = (),
        db: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ip = ip
        self.port = port or free_port("both", ip)
        self.db = Path(db) if db is not None else self.workdir / "location.db"
        self.config_path = self.workdir / "dsbc.toml"
        self.run_dir = self.workdir / "run"
        self.control_port = free_port("tcp")
        listen = [f"{t}:{ip}:{self.port}" for t in transports if t != "tls"]
        # tls: needs a TCP port of its own (the tcp: listener has self.port)
        self.tls_port = free_port("tcp", ip) if "tls" in transports else 0
        if self.tls_port:
            listen.append(f"tls:{ip}:{self.tls_port}")
        listen += list(extra_listen)
        tls_keys = f'tls_cert = "{tls[0]}"\ntls_key = "{tls[1]}"\n' if tls else ""
        self.config_path.write_text(
            f"""[store]
url = "{store_url or f"sqlite:///{self.db}"}"
unknown = "{unknown}"
lock_hold = {lock_hold}
poll_interval = {poll_interval}
{store_extra}

[systems.source]
name = "MR100"
sip = {_toml_list(source)}

[systems.target]
name = "MR115"
sip = {_toml_list(target)}

[sip]
listen = {_toml_list(listen)}
trusted_peers = {_toml_list(trusted)}
workers = {workers}
options_interval = {options_interval}
options_timeout = {options_timeout}
migration_expires = {migration_expires}
flow_secret = "{FLOW_SECRET}"
{tls_keys}{sip_extra}
{api}

[control]
listen = "127.0.0.1:{self.control_port}"
token = "test-token"
{extra}
"""
        )
        if customers:
            lines = [json.dumps(c) for c in customers]
            f = self.workdir / "customers.jsonl"
            f.write_text("\n".join(lines) + "\n")
            self.cli("import", str(f))
        self.proc: PeerProcess | None = None

    @property
    def sip_addr(self) -> tuple[str, int]:
        return self.ip, self.port

    @property
    def hostport(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def control(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = "test-token",
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        """One control API call: (HTTP status, decoded JSON or the text). `body`: a dict
        (sent as JSON) or bytes (sent as they are)."""
        import urllib.error
        import urllib.request

        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        req = urllib.request.Request(
            self.control_url + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DSBC_RUN_DIR"] = str(self.run_dir)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a `dsbc` command against this instance's config."""
        r = subprocess.run(
            [sys.executable, "-m", "dsbc.cli", "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=REPO,
            check=False,  # the exit code is checked below, with dsbc's own message
        )
        if check and r.returncode != 0:
            raise PeerError(f"dsbc {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def start(self, wait: float = 10.0) -> Self:
        self.proc = PeerProcess(
            "dsbc",
            [sys.executable, "-m", "dsbc.cli", "-c", str(self.config_path), "run"],
            self.workdir / "dsbc.log",
            cwd=REPO,
            env=self.env(),
        )
        self.proc.start()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise PeerError(f"dsbc exited at start:\n{self.proc.log_tail()}")
            if sip_options(self.ip, self.port, "udp", timeout=0.3):
                return self
            time.sleep(0.1)
        raise PeerError(f"dsbc did not answer OPTIONS within {wait}s:\n{self.proc.log_tail()}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        code = self.proc.stop(grace=10.0)
        self.proc = None
        return code

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def traceback(self) -> str:
        """The first traceback in the log, or ''."""
        return first_traceback(self.workdir / "dsbc.log")

    def log_tail(self, lines: int = 60) -> str:
        p = self.workdir / "dsbc.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else ""

    def status(self) -> list[dict[str, Any]]:
        """The workers' snapshots (written once a second, one file per process), by worker
        index, the newest last (a reload's replaced worker reports beside its successor)."""
        out = []
        for p in self.run_dir.glob("worker-*.json"):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                pass
        return sorted(out, key=lambda s: (s.get("worker", -1), s.get("ts", 0)))

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for snap in self.status():
            for k, v in snap.get("services", {}).get("sip", {}).get("counters", {}).items():
                total[k] = total.get(k, 0) + v
        return total

    def counters_when(
        self, cond: Callable[[dict[str, int]], bool], timeout: float = 5.0
    ) -> dict[str, int]:
        """The counters once ``cond`` holds for them, or as they are after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        c = self.counters()
        while not cond(c) and time.monotonic() < deadline:
            time.sleep(0.2)
            c = self.counters()
        return c

    def wait_nodes_up(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snaps = self.status()
            if snaps and all(
                all(n["up"] for n in s.get("services", {}).get("sip", {}).get("nodes", []))
                for s in snaps
            ):
                return
            time.sleep(0.2)
        raise PeerError(f"back-end nodes not all up after {timeout}s: {self.status()}")
