"""sipp as a load generator and as the back end, without the message traces that the test
harness (tests/peers/sipp.py) keeps: at thousands of calls a second a message log costs
sipp more than the calls.  Statistics come from sipp's own CSV (-trace_stat)."""

from __future__ import annotations

import csv
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from tests.peers.net import free_port, wait_port
from tests.peers.proc import PeerError, PeerProcess, find_binary

SCENARIOS = Path(__file__).resolve().parents[1] / "sipp"
BUFFER = 4 * 1024 * 1024


@dataclass
class SippStats:
    successful: int = 0
    failed: int = 0
    created: int = 0
    retransmissions: int = 0
    elapsed: float = 0.0
    returncode: int | None = None

    @property
    def call_rate(self) -> float:
        return self.created / self.elapsed if self.elapsed else 0.0


def _seconds(text: str) -> float:
    # "00:00:05:123456" (h:m:s:us) or "00:00:05"
    parts = text.strip().split(":")
    try:
        h, m, s = int(parts[0]), int(parts[1]), int(parts[2])
        us = int(parts[3]) if len(parts) > 3 else 0
    except (ValueError, IndexError):
        return 0.0
    return h * 3600 + m * 60 + s + us / 1e6


def read_stats(path: Path) -> SippStats:
    if not path.exists():
        return SippStats()
    rows = list(csv.reader(path.read_text(errors="replace").splitlines(), delimiter=";"))
    if len(rows) < 2:
        return SippStats()
    last = dict(zip(rows[0], rows[-1], strict=False))

    def n(key: str) -> int:
        try:
            return int(last.get(key, "0") or 0)
        except ValueError:
            return 0

    return SippStats(
        successful=n("SuccessfulCall(C)"),
        failed=n("FailedCall(C)"),
        created=n("OutgoingCall(C)") or n("IncomingCall(C)"),
        retransmissions=n("Retransmissions(C)"),
        elapsed=_seconds(last.get("ElapsedTime(C)", "")),
    )


class Sipp:
    """One sipp process.  ``scenario``: a file name in benchmarks/sipp/ or ``sn:uas``."""

    def __init__(
        self,
        workdir: Path,
        scenario: str,
        *,
        local_ip: str,
        local_port: int | None = None,
        remote: tuple[str, int] | None = None,
        transport: str = "u1",
        rate: float | None = None,
        calls: int | None = None,
        limit: int = 5000,
        inf: Path | None = None,
        service: str = "15550009999",
        timeout: float = 60.0,
        recv_timeout_ms: int = 5000,
        extra: Sequence[str] = (),
    ) -> None:
        binary = find_binary("sipp")
        if binary is None:
            raise PeerError("sipp not found (apt-get install sip-tester)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        proto = "tcp" if transport.startswith("t") else "udp"
        self.proto = proto
        self.local_ip = local_ip
        self.local_port = local_port or free_port(proto, local_ip)
        self.timeout = timeout
        argv = [binary]
        if remote is not None:
            argv.append(f"{remote[0]}:{remote[1]}")
        argv += (
            ["-sn", scenario[3:]]
            if scenario.startswith("sn:")
            else ["-sf", str(SCENARIOS / scenario)]
        )
        argv += ["-i", local_ip, "-p", str(self.local_port), "-mi", local_ip, "-t", transport]
        argv += ["-s", service, "-buff_size", str(BUFFER), "-l", str(limit), "-nostdin"]
        if rate is not None:
            argv += ["-r", f"{rate:.3f}".rstrip("0").rstrip("."), "-rp", "1000"]
        if calls is not None:
            argv += ["-m", str(calls)]
        if inf is not None:
            argv += ["-inf", str(inf)]
        if remote is not None:  # a client: every call ends, failed or not, within the bound
            argv += [
                "-recv_timeout",
                str(recv_timeout_ms),
                "-timeout",
                f"{max(1, int(timeout))}s",
                "-timeout_error",
            ]
        argv += ["-trace_stat", "-stf", str(self.workdir / "stats.csv"), "-fd", "1"]
        argv += ["-trace_err", "-error_file", str(self.workdir / "errors.log")]
        argv += list(extra)
        self.argv = argv
        self.proc = PeerProcess(
            f"sipp-{scenario}",
            argv,
            self.workdir / "sipp.log",
            cwd=self.workdir,
            stdout_path=self.workdir / "stdout.log",
        )

    @property
    def addr(self) -> tuple[str, int]:
        return self.local_ip, self.local_port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, ready_timeout: float = 5.0) -> Self:
        self.proc.start()
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                wait_port(self.local_ip, self.local_port, self.proto, timeout=0.1)
                return self
            except TimeoutError:
                pass
            if not self.proc.alive() or time.monotonic() > deadline:
                self.stop()
                raise PeerError(
                    f"sipp did not bind {self.local_ip}:{self.local_port}:\n{self.proc.log_tail()}"
                )

    def stats(self) -> SippStats:
        return read_stats(self.workdir / "stats.csv")

    def wait(self) -> SippStats:
        """Wait for a client run to end by itself (bounded: its -timeout, then a backstop)."""
        code = self.proc.wait(self.timeout + 10.0)
        if code is None:
            code = self.proc.stop(grace=2.0, sig=signal.SIGUSR1)
        else:
            self.proc.stop(grace=0.5)
        st = self.stats()
        st.returncode = code
        return st

    def stop(self) -> SippStats:
        if self.proc.alive():
            code = self.proc.stop(grace=2.0, sig=signal.SIGUSR1)  # USR1: soft exit, final stats
        else:
            code = self.proc.stop(grace=0.5)
        st = self.stats()
        st.returncode = code
        return st

    def errors(self, limit: int = 2000) -> str:
        p = self.workdir / "errors.log"
        return p.read_text(errors="replace")[-limit:] if p.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
