"""Run sipp scenarios as phones, carriers and answering gateways.

    res = run_sipp("uac_call_to_did", remote=k.addr, service="15550001001", calls=1)
    assert res.ok, res.report()

    with SippServer("uas_answer", local_ip="127.0.0.3") as uas:   # answers calls
        ...                                                       # uas.addr, uas.port
    uas.result.successful

Scenarios: a bundled name (tests/peers/sipp/<name>.xml), a path to an XML file, raw XML
text, or "sn:<builtin>" for sipp's own (-sn uac, uas, regexp, ...). Keywords of the bundled
scenarios ([caller], [expires], [contact_user], [contact_hostport]) get defaults; pass
others with keys={"name": "value"} (sipp's -key). Every run writes its error log, message
trace, statistics CSV and screen into its own workdir.
"""

from __future__ import annotations

import csv
import itertools
import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from tests.peers.net import free_port, wait_port
from tests.peers.proc import PeerError, PeerProcess, find_binary, scratch_dir

__all__ = ["SCENARIOS", "SippError", "SippResult", "SippServer", "run_sipp", "scenario_path"]

SCENARIOS = Path(__file__).with_name("sipp")
_counter = itertools.count(1)
_MSG_SEPARATOR = re.compile(r"^-{20,}.*$", re.MULTILINE)  # between -trace_msg entries
_TRANSPORTS = {"u1": "udp", "un": "udp", "t1": "tcp", "tn": "tcp", "l1": "tls", "ln": "tls"}


class SippError(PeerError):
    """sipp could not run or did not do what the test expected."""


def scenario_path(scenario: str | Path, workdir: Path) -> list[str]:
    """sipp arguments selecting `scenario` (-sf FILE or -sn NAME)."""
    text = str(scenario)
    if text.startswith("sn:"):
        return ["-sn", text[3:]]
    if text.lstrip().startswith("<"):
        path = workdir / "scenario.xml"
        path.write_text(text)
        return ["-sf", str(path)]
    path = Path(text)
    if not path.suffix and not path.is_absolute():
        path = SCENARIOS / f"{text}.xml"
    if not path.exists():
        bundled = sorted(p.stem for p in SCENARIOS.glob("*.xml"))
        raise SippError(f"no sipp scenario {scenario!r}; bundled: {', '.join(bundled)}")
    return ["-sf", str(path)]


@dataclass
class SippResult:
    """What one sipp run did. `ok`: exit status 0, no failed call, at least one success."""

    returncode: int | None
    successful: int
    failed: int
    stdout: str
    stderr: str
    stats: dict[str, str]
    workdir: Path
    argv: list[str] = field(default_factory=list)
    timed_out: bool = False  # exit 255 (sipp's -timeout, or a fatal error) or killed by us

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.failed == 0 and self.successful > 0

    @property
    def errors(self) -> str:
        """sipp's error log (-trace_err): unexpected messages, retransmission timeouts."""
        return _read(self.workdir / "errors.log")

    @property
    def messages(self) -> str:
        """Every SIP message sipp sent and received (-trace_msg)."""
        return _read(self.workdir / "messages.log")

    def received(self, start: str = "") -> list[str]:
        """Received messages (text) whose first line starts with `start` ("SIP/2.0 200")."""
        out = []
        for block in _MSG_SEPARATOR.split(self.messages):
            head, _, body = block.strip("\n").partition("\n\n")
            if "message received" in head and body.startswith(start):
                out.append(body.strip("\n") + "\n")
        return out

    def report(self) -> str:
        """A readable summary for assertion messages."""
        return (
            f"sipp exit {self.returncode}{' (timed out)' if self.timed_out else ''}: "
            f"{self.successful} successful, {self.failed} failed\n"
            f"argv: {' '.join(self.argv)}\n"
            f"--- stderr ---\n{self.stderr[-2000:]}\n"
            f"--- errors ---\n{self.errors[-3000:]}\n"
            f"--- last messages ---\n{self.messages[-4000:]}"
        )

    def check(self) -> SippResult:
        if not self.ok:
            raise SippError(self.report())
        return self


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


class _SippRun:
    """Builds the sipp command line and collects the result (shared by both modes)."""

    def __init__(
        self,
        scenario: str | Path,
        *,
        remote: tuple[str, int] | str | None,
        local_ip: str,
        local_port: int | None,
        transport: str,
        calls: int | None,
        rate: float | None,
        service: str | None,
        keys: Mapping[str, str] | None,
        inf: Path | Sequence[Sequence[str]] | None,
        duration_ms: int | None,
        extra_args: Sequence[str],
        timeout: float,
        workdir: Path | None,
        binary: str,
    ) -> None:
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {sorted(_TRANSPORTS)}, not {transport!r}")
        if not local_ip.startswith("127."):
            raise ValueError(f"tests bind loopback only, not {local_ip}")
        found = find_binary(binary)
        if found is None:
            raise SippError(f"{binary} not found in PATH")
        name = Path(str(scenario)).stem.replace("sn:", "")
        if workdir is None:
            self.workdir = scratch_dir(f"sipp-{name}-")
        else:
            self.workdir = Path(workdir) / f"sipp-{name}-{next(_counter)}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.local_ip = local_ip
        self.proto = _TRANSPORTS[transport]
        self.local_port = local_port or free_port("udp" if self.proto == "udp" else "tcp", local_ip)
        argv = [found]
        if remote is not None:
            argv.append(remote if isinstance(remote, str) else f"{remote[0]}:{remote[1]}")
        argv += scenario_path(scenario, self.workdir)
        argv += ["-i", local_ip, "-p", str(self.local_port), "-t", transport, "-mi", local_ip]
        if calls is not None:
            argv += ["-m", str(calls)]
        if rate is not None:
            argv += ["-r", str(rate), "-rp", "1000"]
        if service is not None:
            argv += ["-s", service]
        if duration_ms is not None:
            argv += ["-d", str(duration_ms)]
        all_keys = {
            "caller": "15550000000",
            "expires": "3600",
            "contact_user": service or "sipp",
            "contact_hostport": f"{local_ip}:{self.local_port}",
        }
        all_keys.update(keys or {})
        for k, v in all_keys.items():
            argv += ["-key", k, str(v)]
        if inf is not None:
            if not isinstance(inf, Path | str):
                path = self.workdir / "inject.csv"
                rows = ["SEQUENTIAL"] + [";".join(r) for r in inf]
                path.write_text("\n".join(rows) + "\n")
                inf = path
            argv += ["-inf", str(inf)]
        # -timeout alone waits for calls in progress and can hang: -timeout_error quits.
        argv += ["-timeout", f"{max(1, int(timeout))}s", "-timeout_error", "-nostdin"]
        argv += [
            "-trace_err", "-error_file", str(self.workdir / "errors.log"),
            "-trace_msg", "-message_file", str(self.workdir / "messages.log"),
            "-trace_stat", "-stf", str(self.workdir / "stats.csv"), "-fd", "1",
            "-trace_screen", "-screen_file", str(self.workdir / "screen.log"),
        ]  # fmt: skip
        argv += list(extra_args)
        self.argv = argv
        self.proc = PeerProcess(
            f"sipp-{name}",
            argv,
            self.workdir / "stderr.log",
            cwd=self.workdir,
            stdout_path=self.workdir / "stdout.log",
        )

    @property
    def addr(self) -> tuple[str, int]:
        return (self.local_ip, self.local_port)

    def result(self, returncode: int | None, timed_out: bool) -> SippResult:
        stats = _last_stats(self.workdir / "stats.csv")
        return SippResult(
            returncode=returncode,
            successful=_int(stats.get("SuccessfulCall(C)")),
            failed=_int(stats.get("FailedCall(C)")),
            stdout=_read(self.workdir / "stdout.log"),
            stderr=_read(self.workdir / "stderr.log"),
            stats=stats,
            workdir=self.workdir,
            argv=self.argv,
            timed_out=timed_out,
        )


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _last_stats(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    rows = [r for r in csv.reader(path.read_text(errors="replace").splitlines(), delimiter=";")]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


def run_sipp(
    scenario: str | Path,
    remote: tuple[str, int] | str,
    local_ip: str = "127.0.0.1",
    local_port: int | None = None,
    transport: str = "u1",
    calls: int = 1,
    rate: float | None = None,
    service: str | None = None,
    *,
    keys: Mapping[str, str] | None = None,
    inf: Path | Sequence[Sequence[str]] | None = None,
    duration_ms: int | None = 0,
    extra_args: Sequence[str] = (),
    timeout: float = 20.0,
    workdir: Path | None = None,
    binary: str = "sipp",
) -> SippResult:
    """Run sipp until it has processed `calls` calls (or `timeout` seconds); never raises
    for a failed scenario: look at result.ok / result.report(), or call result.check().

    transport: u1 (UDP, one socket), un, t1 (TCP, one connection), tn.
    inf: a CSV file for -inf, or rows (written as a SEQUENTIAL file): [field0];[field1]...
    duration_ms: the <pause/> length in the bundled call scenarios (-d).
    """
    run = _SippRun(
        scenario, remote=remote, local_ip=local_ip, local_port=local_port,
        transport=transport, calls=calls, rate=rate, service=service, keys=keys, inf=inf,
        duration_ms=duration_ms, extra_args=extra_args, timeout=timeout, workdir=workdir,
        binary=binary,
    )  # fmt: skip
    run.proc.start()
    # sipp's own -timeout ends it first; this is the backstop for a wedged sipp.
    code = run.proc.wait(timeout + 5.0)
    timed_out = code is None or code == 255
    if code is None:
        code = run.proc.stop(grace=1.0, sig=signal.SIGUSR1)
    else:
        run.proc.stop(grace=0.5)
    return run.result(code, timed_out)


class SippServer:
    """sipp in the background (a UAS by default) until stop(); stop() returns its result.

    Ready when its SIP port is bound. `result` holds the SippResult after stop().
    """

    def __init__(
        self,
        scenario: str | Path = "uas_answer",
        local_ip: str = "127.0.0.1",
        local_port: int | None = None,
        transport: str = "u1",
        *,
        remote: tuple[str, int] | str | None = None,
        calls: int | None = None,
        rate: float | None = None,
        service: str | None = None,
        keys: Mapping[str, str] | None = None,
        inf: Path | Sequence[Sequence[str]] | None = None,
        duration_ms: int | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = 300.0,
        workdir: Path | None = None,
        binary: str = "sipp",
    ) -> None:
        self._run = _SippRun(
            scenario, remote=remote, local_ip=local_ip, local_port=local_port,
            transport=transport, calls=calls, rate=rate, service=service, keys=keys, inf=inf,
            duration_ms=duration_ms, extra_args=extra_args, timeout=timeout,
            workdir=workdir, binary=binary,
        )  # fmt: skip
        self.result: SippResult | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return self._run.addr

    @property
    def port(self) -> int:
        return self._run.local_port

    @property
    def workdir(self) -> Path:
        return self._run.workdir

    def contact(self, user: str = "sipp") -> str:
        suffix = ";transport=tcp" if self._run.proto == "tcp" else ""
        return f"sip:{user}@{self.addr[0]}:{self.addr[1]}{suffix}"

    def start(self, timeout: float = 5.0) -> Self:
        proc = self._run.proc
        proc.start()
        deadline = time.monotonic() + timeout
        ip, port = self.addr
        while True:
            try:
                wait_port(ip, port, self._run.proto, timeout=0.1)
                return self
            except TimeoutError:
                pass
            if not proc.alive() or time.monotonic() > deadline:
                self.stop()
                raise SippError(f"sipp server did not bind {ip}:{port}\n" + self.result_report())

    def alive(self) -> bool:
        return self._run.proc.alive()

    def wait(self, timeout: float) -> SippResult | None:
        """Wait for sipp to end by itself (with calls=N: after N calls)."""
        if self._run.proc.wait(timeout) is None:
            return None
        return self.stop()

    def stop(self) -> SippResult:
        if self.result is None:
            proc = self._run.proc
            code = proc.returncode()
            if code is None:  # USR1: soft exit, writes the final statistics
                code = proc.stop(grace=2.0, sig=signal.SIGUSR1)
            else:
                proc.stop(grace=0.5)
            self.result = self._run.result(code, timed_out=False)
        return self.result

    def result_report(self) -> str:
        return (self.result or self._run.result(self._run.proc.returncode(), False)).report()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
