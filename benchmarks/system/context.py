"""What every scenario gets: the parameters of the run (full, --quick or the CI smoke
size), a work directory, the shared data set, and the result rows it appends to."""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.system import data


@dataclass(frozen=True)
class Params:
    name: str
    customers: int  # x 4 identities each
    call_rate: float  # calls/s of the fixed-rate CPU run
    call_seconds: float
    cpu_runs: int  # fixed-rate runs per dispatcher for CPU per call; the least counts
    step_seconds: float  # each step of a rate search
    call_start_rate: float  # first step of the call rate search
    register_start_rate: float
    max_steps: int
    search_runs: int  # rate searches per dispatcher (alternating with the peer); the best counts
    register_users: int  # distinct users (also the callers of the call scenarios)
    tcp_connections: int
    tcp_rate: float
    tcp_seconds: float
    api_seconds: float
    api_connections: int
    merge_rows: int  # rows per back end
    radius_requests: int
    radius_parallel: int
    radius_runs: int  # radclient runs per side; the fastest counts
    migrate_customers: int
    migrate_identities_each: int
    flips: int  # migrations timed for the second-node latency


FULL = Params(
    name="full", customers=250_000,
    call_rate=300, call_seconds=20, cpu_runs=2, step_seconds=4, call_start_rate=300, register_start_rate=500,
    max_steps=10, search_runs=2, register_users=10_000,
    tcp_connections=1_000, tcp_rate=300, tcp_seconds=15,
    api_seconds=10, api_connections=32, merge_rows=1_000,
    radius_requests=30_000, radius_parallel=200, radius_runs=3,
    migrate_customers=10_000, migrate_identities_each=5, flips=100,
)  # fmt: skip
#: --quick: every scenario in under 3 minutes; 400,000 identities (loading a million into
#: Kamailio's htable alone takes 25-35 s)
QUICK = Params(
    name="quick", customers=100_000,
    call_rate=200, call_seconds=4, cpu_runs=1, step_seconds=1.5, call_start_rate=300, register_start_rate=500,
    max_steps=4, search_runs=1, register_users=10_000,
    tcp_connections=1_000, tcp_rate=200, tcp_seconds=3,
    api_seconds=2, api_connections=32, merge_rows=1_000,
    radius_requests=10_000, radius_parallel=200, radius_runs=2,
    migrate_customers=10_000, migrate_identities_each=5, flips=20,
)  # fmt: skip
#: tests/test_benchmarks_smoke.py: every code path, seconds each, no timing meaning
SMOKE = Params(
    name="smoke", customers=2_500,
    call_rate=20, call_seconds=1, cpu_runs=1, step_seconds=1, call_start_rate=20, register_start_rate=20,
    max_steps=1, search_runs=1, register_users=100,
    tcp_connections=20, tcp_rate=20, tcp_seconds=1.5,
    api_seconds=1, api_connections=4, merge_rows=50,
    radius_requests=100, radius_parallel=16, radius_runs=1,
    migrate_customers=100, migrate_identities_each=5, flips=3,
)  # fmt: skip


@dataclass
class Row:
    """One line of RESULTS.md.  ``dsbc`` / ``peer`` are numbers in ``unit`` (None: n/a)."""

    scenario: str
    metric: str
    unit: str
    dsbc: float | None
    peer: float | None = None
    peer_name: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""
    lower_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        if self.dsbc is None or not self.peer:
            return None
        return self.dsbc / self.peer


@dataclass
class Context:
    params: Params
    workdir: Path
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    verbose: bool = True
    load_start: str = ""
    load_end: str = ""
    _dataset: data.Dataset | None = None

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self.log(
            f"  -> {row.scenario}: {row.metric}: dsbc {row.dsbc} {row.peer_name} {row.peer} {row.unit}"
        )
        return row

    def dir(self, name: str) -> Path:
        p = self.workdir / name
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
        return p

    @property
    def dataset(self) -> data.Dataset:
        """The store of ``customers`` x 4 identities (built once per run)."""
        if self._dataset is None:
            self._dataset = data.Dataset.build(
                self.workdir / "data", self.params.customers, self.log
            )
        return self._dataset


def default_workdir() -> Path:
    return Path(os.environ.get("DSBC_BENCH_DIR") or f"/tmp/dsbc-bench-{os.getpid()}")
