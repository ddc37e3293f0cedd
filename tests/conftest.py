"""Shared pytest fixtures: peer programs (tests/peers/) started per test and always stopped.

Factories hand out started peers and stop them at teardown, even when the test failed;
on failure the tail of each peer's log is attached to the test report. Anything else a
test starts can join that report with `peer_logs.add(name, path)`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers.proc import find_binary, tail


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "peers: needs real peer programs (kamailio, sipp, ...)")
    config.addinivalue_line("markers", "slow: long load runs (CI runs the short version only)")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Keep each phase's report on the item so fixtures can tell at teardown if it failed.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


class _EscapedErrors(logging.Handler):
    """Collects what asyncio logs when an exception escapes a callback or a task."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError):
            return  # a test's own server task cancelled at teardown (asyncio 3.11 logs it)
        if exc is not None or "exception" in record.getMessage().lower():
            self.seen.append(self.format(record))


@pytest.fixture(autouse=True)
def no_escaped_exceptions() -> Iterator[None]:
    """In-process servers too: an exception that reached asyncio's handler is a bug."""
    handler = _EscapedErrors()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.seen:
        pytest.fail("an exception escaped to asyncio:\n" + handler.seen[0][:3000], pytrace=False)


def node_failed(node: pytest.Item) -> bool:
    return any(
        getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


def require_binary(name: str, hint: str = "") -> str:
    """Path of program `name`, or skip the test saying what to install."""
    path = find_binary(name)
    if path is None:
        pytest.skip(f"{name} is not installed{': ' + hint if hint else ''}")
    return path


def require_pjsua2() -> None:
    from tests.peers.phone import pjsua2_available

    if not pjsua2_available():
        pytest.skip("the pjsua2 module is not installed: pip install pjsua2-python")


class PeerLogs:
    """Log files to show with a failed test (last lines of each)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Callable[[], str]]] = []

    def add(self, name: str, source: Path | Callable[[], str], lines: int = 60) -> None:
        if isinstance(source, Path):
            path = source
            self.entries.append((name, lambda: tail(path, lines)))
        else:
            self.entries.append((name, source))

    def attach(self, item: pytest.Item) -> None:
        for name, read in self.entries:
            try:
                text = read()
            except OSError as exc:
                text = f"(cannot read: {exc})"
            item.add_report_section("teardown", f"log {name}", text)


@pytest.fixture
def tmp_workdir(tmp_path: Path) -> Path:
    """A directory for this test's peer configs and logs (kept by pytest's tmp_path)."""
    work = tmp_path / "peers"
    work.mkdir()
    return work


@pytest.fixture
def peer_logs(request: pytest.FixtureRequest) -> Iterator[PeerLogs]:
    logs = PeerLogs()
    yield logs
    if node_failed(request.node):
        logs.attach(request.node)


@pytest.fixture
def kamailio_factory(tmp_workdir: Path, peer_logs: PeerLogs) -> Iterator[Callable[..., Any]]:
    """make(name="source", **Kamailio kwargs) -> a started Kamailio, stopped at teardown."""
    require_binary("kamailio", "apt-get install kamailio")
    from tests.peers.kamailio import Kamailio

    started: list[Kamailio] = []

    def make(name: str = "source", **kwargs: Any) -> Kamailio:
        kwargs.setdefault("workdir", tmp_workdir / f"kamailio-{name}")
        k = Kamailio(name, **kwargs)
        peer_logs.add(f"kamailio {name}", k.log_path)
        started.append(k)
        return k.start()

    yield make
    for k in reversed(started):
        k.stop()


@pytest.fixture
def phone_factory(tmp_workdir: Path, peer_logs: PeerLogs) -> Iterator[Callable[..., Any]]:
    """make(user, registrar_host, registrar_port, **Phone kwargs) -> a started (not yet
    registered) Phone, stopped at teardown."""
    require_pjsua2()
    from tests.peers.phone import Phone

    started: list[Phone] = []

    def make(user: str, registrar_host: str, registrar_port: int, **kwargs: Any) -> Phone:
        kwargs.setdefault("workdir", tmp_workdir)
        phone = Phone(user, registrar_host, registrar_port, **kwargs)
        peer_logs.add(phone.name, phone.log_tail)
        started.append(phone)
        return phone.start()

    yield make
    for phone in reversed(started):
        phone.stop()


@pytest.fixture
def dsbc_factory(tmp_workdir: Path, peer_logs: PeerLogs) -> Iterator[Callable[..., Any]]:
    """make(**Dsbc kwargs) -> a started `dsbc run` (tests/peers/dsbc.py), stopped at teardown."""
    from tests.peers.dsbc import Dsbc

    started: list[Dsbc] = []

    def make(start: bool = True, **kwargs: Any) -> Dsbc:
        d = Dsbc(tmp_workdir / f"dsbc-{len(started)}", **kwargs)
        peer_logs.add(f"dsbc {len(started)}", d.workdir / "dsbc.log")
        started.append(d)
        return d.start() if start else d

    yield make
    for d in reversed(started):
        d.stop()
    # An exception that escaped into a log means a bug even when the test's own
    # assertions passed (a compiled type check raising in a timer, for one).
    for d in started:
        crashed = d.traceback()
        if crashed:
            pytest.fail(f"dsbc logged an unexpected traceback:\n{crashed}", pytrace=False)
