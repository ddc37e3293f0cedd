"""SIP scenarios: calls (CPU per call, highest rate), REGISTER rate, calls over TCP.

Topology (loopback aliases, as phones, dispatcher and systems would be apart):

    sipp uac (127.0.0.2) -> dispatcher (127.0.0.1) -> sipp uas: source 127.0.0.3, target 127.0.0.4

The dispatcher is dsbc (one worker unless said) or Kamailio (children=1, stateless:
benchmarks/peers/kamailio_bench.cfg.tmpl), each with the same 1,000,000 identities; the
caller of each call is drawn from 10,000 of the store's accounts, so every INVITE is an
owner lookup among the million (every tenth customer lives on the target).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from benchmarks.peers.dsbc_bench import DsbcBench
from benchmarks.peers.kamailio_bench import KamailioBench
from benchmarks.system.context import Context, Row
from benchmarks.system.procstat import CpuMeter, wait_idle
from benchmarks.system.sipp_load import Sipp, SippStats
from benchmarks.system.tcp_uac import run_tcp_calls
from tests.peers.net import free_port

PROXY_IP = "127.0.0.1"
UAC_IP = "127.0.0.2"
SOURCE_IP = "127.0.0.3"
TARGET_IP = "127.0.0.4"


@dataclass
class Step:
    rate: float
    stats: SippStats
    cpu: float
    ok: bool
    why: str = ""
    others: list[float] = field(default_factory=list)  # CPU us per call of the runs not kept


class Proxy:
    """A started dispatcher: where to send, whose process tree to measure."""

    def __init__(
        self,
        name: str,
        addr: tuple[str, int],
        pid: int,
        stop: Callable[[], None],
        per_worker: Callable[[], list[dict[str, int]]] | None = None,
    ) -> None:
        self.name = name
        self.addr = addr
        self.pid = pid
        self.stop = stop
        self.per_worker = per_worker


@contextmanager
def backends(ctx: Context, scenario: str, name: str) -> Iterator[tuple[Sipp, Sipp]]:
    d = ctx.dir(f"{name}-uas")
    src = Sipp(d / "source", scenario, local_ip=SOURCE_IP).start()
    try:
        tgt = Sipp(d / "target", scenario, local_ip=TARGET_IP).start()
    except BaseException:
        src.stop()
        raise
    try:
        yield src, tgt
    finally:
        tgt.stop()
        src.stop()


@contextmanager
def dsbc_proxy(
    ctx: Context, name: str, src: Sipp, tgt: Sipp, *, workers: int = 1, tcp: bool = False
) -> Iterator[Proxy]:
    d = ctx.dir(name)
    port = free_port("both", PROXY_IP)
    listen = [f"udp:{PROXY_IP}:{port}"] + ([f"tcp:{PROXY_IP}:{port}"] if tcp else [])
    bench = DsbcBench(
        d,
        ctx.dataset.copy_to(d / "location.db"),
        workers=workers,
        sip={"listen": listen, "max_connections_per_ip": 5000, "max_connections": 20000},
        systems={
            "source": {"sip": [f"udp:{src.local_ip}:{src.local_port}"]},
            "target": {"sip": [f"udp:{tgt.local_ip}:{tgt.local_port}"]},
        },
    )
    ctx.log(f"starting dsbc ({workers} worker(s), {ctx.dataset.identities:,} identities)")
    bench.start()
    try:
        yield Proxy("dsbc", (PROXY_IP, port), bench.pid, bench.stop, bench.worker_counters)
    finally:
        bench.stop()


@contextmanager
def kamailio_proxy(
    ctx: Context, name: str, src: Sipp, tgt: Sipp, *, tcp: bool = False
) -> Iterator[Proxy]:
    k = KamailioBench(
        ctx.dir(name),
        PROXY_IP,
        source=src.addr,
        target=tgt.addr,
        customers=ctx.params.customers,
        tcp=tcp,
    )
    ctx.log(
        f"starting Kamailio (children=1, {ctx.params.customers * 4:,} identities in the htable)"
    )
    k.start()
    try:
        if k.loaded() != ctx.params.customers * 4:
            raise RuntimeError(f"Kamailio loaded {k.loaded()} identities")
        yield Proxy("Kamailio", k.addr, k.pid, k.stop)
    finally:
        k.stop()


def run_calls(
    ctx: Context,
    proxy: Proxy,
    workdir: Path,
    rate: float,
    calls: int,
    scenario: str = "uac_call.xml",
    users: int | None = None,
    clients: int = 1,
) -> Step:
    """``calls`` calls at ``rate`` calls/s from ``clients`` sipp processes (each its own
    socket, so SO_REUSEPORT spreads them over dsbc's workers); CPU of the dispatcher's
    tree over the run."""
    inf = ctx.dataset.users_file(workdir / "users.csv", users or ctx.params.register_users)
    uacs = [
        Sipp(workdir / f"uac{i}" if clients > 1 else workdir, scenario, local_ip=UAC_IP, remote=proxy.addr,
             rate=rate / clients, calls=max(1, calls // clients), inf=inf, timeout=calls / rate + 30)
        for i in range(clients)
    ]  # fmt: skip
    calls = sum(max(1, calls // clients) for _ in uacs)
    meter = CpuMeter(proxy.pid).start()
    for u in uacs:
        u.start()
    stats = [u.wait() for u in uacs]
    cpu = meter.stop()
    st = SippStats(
        successful=sum(s.successful for s in stats),
        failed=sum(s.failed for s in stats),
        created=sum(s.created for s in stats),
        retransmissions=sum(s.retransmissions for s in stats),
        elapsed=max(s.elapsed for s in stats),
    )
    ideal = calls / rate
    why = ""
    if st.failed:
        why = f"{st.failed} failed"
    elif st.successful < calls:
        why = f"{calls - st.successful} calls never completed"
    elif st.elapsed > ideal * 1.25 + 1.5:
        why = f"load generator behind: {calls} calls took {st.elapsed:.1f}s, {ideal:.1f}s offered"
    return Step(rate, st, cpu, not why, why)


def rate_search(
    ctx: Context, label: str, step: Callable[[float, int], Step], start: float, pid: int
) -> tuple[float, list[Step]]:
    """Highest rate with zero failed calls: x1.5 from ``start`` until the first failure
    (halving instead while nothing has passed yet), then two bisections between the last
    good and the first bad rate.  Before each step the dispatcher must be idle again: after
    an overload its socket buffers hold seconds of retransmissions, and the next step
    would inherit them."""
    p = ctx.params
    good, bad, rate = 0.0, 0.0, start
    history: list[Step] = []
    bisections = 0
    for i in range(p.max_steps):
        if i:
            wait_idle(pid)
        s = step(rate, i)
        history.append(s)
        ctx.log(
            f"  {label} {rate:7.0f}/s: {s.stats.successful} ok, {s.stats.failed} failed, "
            f"{s.stats.retransmissions} retrans, cpu {s.cpu:.2f}s {'OK' if s.ok else 'FAIL: ' + s.why}"
        )
        if s.ok:
            good = rate
        else:
            bad = rate
        if not bad:
            rate = rate * 1.5
        elif not good:
            rate = rate / 2
        elif bisections >= 2 or (bad - good) / bad < 0.06:
            break
        else:
            bisections += 1
            rate = (good + bad) / 2
    return good, history


def _cpu_per_call_us(s: Step) -> float:
    return s.cpu / max(1, s.stats.successful) * 1e6


# --- scenarios -------------------------------------------------------------------------
#
# run() starts dsbc and Kamailio side by side on the same back ends, then runs each
# selected measure on one dispatcher at a time, alternating: dsbc, Kamailio, Kamailio,
# dsbc, ...  A change in the host's load between rounds then falls on both, not on
# whichever happened to be measured second.

Search = tuple[float, list[Step]]
TcpResult = tuple[float, int, int, str]
T = TypeVar("T")


@dataclass
class Measures:
    """What one dispatcher gave in the SIP scenarios (one entry per round)."""

    calls_cpu: list[Step] = field(default_factory=list)
    calls_rate: list[Search] = field(default_factory=list)
    register: list[Search] = field(default_factory=list)
    register_all: tuple[int, Search, list[int]] | None = None
    tcp: list[TcpResult] = field(default_factory=list)


def alternate(
    proxies: dict[str, Proxy], rounds: int, one: Callable[[Proxy, int], T]
) -> dict[str, list[T]]:
    """``rounds`` runs of ``one`` per dispatcher, in the order dsbc, Kamailio, Kamailio,
    dsbc, ...; every dispatcher is idle again before each run (an overloaded one drains
    retransmissions for a while)."""
    names = list(proxies)
    out: dict[str, list[T]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            for p in proxies.values():
                wait_idle(p.pid)
            out[name].append(one(proxies[name], i))
    return out


def calls_cpu_once(ctx: Context, proxy: Proxy, i: int) -> Step:
    """One fixed-rate run; of several, the one with the least CPU per call counts (the
    others differ by what the host's other tenants did to the caches, not by the code)."""
    p = ctx.params
    calls = max(1, int(p.call_rate * p.call_seconds))
    s = run_calls(ctx, proxy, ctx.dir(f"calls-cpu-{proxy.name}-{i}"), p.call_rate, calls)
    ctx.log(
        f"  calls-cpu {proxy.name}: {s.stats.successful}/{calls} calls, cpu {s.cpu:.2f}s "
        f"({_cpu_per_call_us(s):.0f} us/call) {s.why}"
    )
    return s


def least_cpu(runs: list[Step]) -> Step:
    passed = [s for s in runs if s.ok] or runs
    best = min(passed, key=_cpu_per_call_us)
    best.others = [_cpu_per_call_us(s) for s in runs if s is not best]
    return best


def calls_rate_search(ctx: Context, proxy: Proxy, i: int) -> Search:
    p = ctx.params

    def step(rate: float, n: int) -> Step:
        return run_calls(
            ctx,
            proxy,
            ctx.dir(f"calls-rate-{proxy.name}-{i}/step{n}"),
            rate,
            max(1, int(rate * p.step_seconds)),
        )

    return rate_search(ctx, f"calls-rate {proxy.name}", step, p.call_start_rate, proxy.pid)


def register_search(
    ctx: Context, proxy: Proxy, label: str, i: int = 0, clients: int = 1, start: float = 0.0
) -> Search:
    p = ctx.params

    def step(rate: float, n: int) -> Step:
        return run_calls(
            ctx,
            proxy,
            ctx.dir(f"register-{label}-{i}/step{n}"),
            rate,
            max(1, int(rate * p.step_seconds)),
            "uac_register.xml",
            clients=clients,
        )

    return rate_search(ctx, f"register {label}", step, start or p.register_start_rate, proxy.pid)


def _tcp_once(ctx: Context, proxy: Proxy, i: int = 0) -> TcpResult:
    """(CPU us per call, calls, connections open at the end, problem).  Every connection is
    opened first; the CPU window covers the calls only (benchmarks/system/tcp_uac.py)."""
    p = ctx.params
    calls = max(1, int(p.tcp_rate * p.tcp_seconds))
    callers = [
        line
        for line in ctx.dataset.users_file(ctx.workdir / "tcp-users.csv", p.register_users)
        .read_text()
        .splitlines()[1:]
        if line
    ]
    meter = CpuMeter(proxy.pid)
    st, still_open = run_tcp_calls(
        proxy.addr,
        UAC_IP,
        callers,
        p.tcp_connections,
        p.tcp_rate,
        calls,
        on_ready=meter.start,
        on_done=meter.stop,
    )
    problem = ""
    if st.failed or st.successful < calls:
        problem = f"{st.failed} failed ({st.reasons}), {st.successful}/{calls} completed"
    if still_open < p.tcp_connections:
        problem += f"; {p.tcp_connections - still_open} connections closed during the run"
    us = meter.seconds / max(1, st.successful) * 1e6
    ctx.log(
        f"  tcp {proxy.name}: {st.successful}/{calls} calls over {still_open} connections, "
        f"cpu {meter.seconds:.2f}s ({us:.0f} us/call) {problem}"
    )
    return us, st.successful, still_open, problem


def least_tcp(runs: list[TcpResult]) -> TcpResult:
    """Each TCP run opens its own connections; the least CPU per call counts."""
    passed = [r for r in runs if not r[3]] or runs
    return min(passed, key=lambda r: r[0])


def best_search(searches: list[Search]) -> tuple[Search, list[float]]:
    """The search that reached the highest rate, and the other searches' rates."""
    best = max(searches, key=lambda s: s[0])
    return best, [s[0] for s in searches if s is not best]


def run(ctx: Context, selected: set[str]) -> None:
    p = ctx.params
    got = {"dsbc": Measures(), "Kamailio": Measures()}
    tcp = "tcp" in selected
    with backends(ctx, "uas.xml", "sip") as (src, tgt):
        with (
            dsbc_proxy(ctx, "sip-dsbc", src, tgt, tcp=tcp) as dp,
            kamailio_proxy(ctx, "sip-Kamailio", src, tgt, tcp=tcp) as kp,
        ):
            both = {"dsbc": dp, "Kamailio": kp}
            if "calls-cpu" in selected:
                for name, runs in alternate(
                    both, p.cpu_runs, lambda x, i: calls_cpu_once(ctx, x, i)
                ).items():
                    got[name].calls_cpu = runs
            if tcp:
                for name, tr in alternate(
                    both, p.cpu_runs, lambda x, i: _tcp_once(ctx, x, i)
                ).items():
                    got[name].tcp = tr
            if "calls-rate" in selected:
                for name, sr in alternate(
                    both, p.search_runs, lambda x, i: calls_rate_search(ctx, x, i)
                ).items():
                    got[name].calls_rate = sr
            if "register" in selected:
                for name, sr in alternate(
                    both, p.search_runs, lambda x, i: register_search(ctx, x, x.name, i)
                ).items():
                    got[name].register = sr
        if "register" in selected:
            workers = max(2, os.cpu_count() or 1)
            with dsbc_proxy(ctx, "sip-dsbc-all", src, tgt, workers=workers) as proxy:
                # phones come from many addresses: two sipp clients per worker, so that
                # SO_REUSEPORT's hash spreads them (one client would land on one worker)
                one = best_search(got["dsbc"].register)[0][0] if got["dsbc"].register else 0.0
                search = register_search(
                    ctx,
                    proxy,
                    "dsbc-all",
                    clients=2 * workers,
                    start=max(one, p.register_start_rate),
                )
                time.sleep(1.2)  # the workers' snapshots are written once a second
                split = [
                    c.get("requests_in:REGISTER", 0)
                    for c in (proxy.per_worker() if proxy.per_worker else [])
                ]
                got["dsbc"].register_all = (workers, search, split)
    d, k = got["dsbc"], got["Kamailio"]
    if d.calls_cpu and k.calls_cpu:
        _calls_cpu_row(ctx, least_cpu(d.calls_cpu), least_cpu(k.calls_cpu))
    if d.calls_rate and k.calls_rate:
        ctx.add(
            _rate_row(
                "SIP calls, UDP, 1 worker",
                "highest rate, 0 failed",
                "calls/s",
                {"dsbc": d.calls_rate, "Kamailio": k.calls_rate},
                ">= 1.0x Kamailio",
                1.0,
            )
        )
    if d.register and k.register:
        row = _rate_row(
            "SIP REGISTER, UDP, 1 worker",
            "highest rate, 0 failed",
            "REGISTER/s",
            {"dsbc": d.register, "Kamailio": k.register},
            ">= 1.0x Kamailio",
            1.0,
            "REGISTER",
        )
        row.note = f"{p.register_users:,} distinct users; " + row.note
        ctx.add(row)
    if d.register_all:
        workers, (allw, hist), split = d.register_all
        note = (
            f"dsbc with {workers} workers on {os.cpu_count()} cores, which {2 * workers} sipp clients and "
            "the 2 sipp back ends share: on this host the load generator takes the cores the workers "
            f"would use; REGISTERs per worker over the search: {' / '.join(f'{n:,}' for n in split) or '?'}; "
            + search_note("dsbc", hist, "REGISTER")
        )
        ctx.add(
            Row(
                f"SIP REGISTER, UDP, {workers} workers",
                "highest rate, 0 failed",
                "REGISTER/s",
                round(allw),
                None,
                "",
                ">= 5,000/s",
                allw >= 5000,
                note,
            )
        )
    if d.tcp and k.tcp:
        _tcp_row(ctx, least_tcp(d.tcp), least_tcp(k.tcp))


def _calls_cpu_row(ctx: Context, d: Step, k: Step) -> None:
    p = ctx.params
    note = (
        f"{d.stats.successful} calls at {p.call_rate:g}/s (6 messages each), callers among "
        f"{p.register_users:,} accounts; the run with the least CPU of {p.cpu_runs} counts"
    )
    for name, s in (("dsbc", d), ("Kamailio", k)):
        if s.others:
            note += f"; {name}'s other run(s): {', '.join(f'{x:.0f}' for x in s.others)} us"
    if not (d.ok and k.ok):
        note += f"; dsbc: {d.why or 'ok'}; Kamailio: {k.why or 'ok'}"
        ctx.errors.append(f"calls-cpu: {note}")
    du, ku = _cpu_per_call_us(d), _cpu_per_call_us(k)
    ctx.add(
        Row(
            "SIP calls, UDP, 1 worker",
            "CPU per call",
            "us",
            round(du, 1),
            round(ku, 1),
            "Kamailio",
            "<= 0.5x Kamailio",
            du <= 0.5 * ku,
            note,
            lower_is_better=True,
        )
    )


def search_note(name: str, hist: list[Step], what: str = "call") -> str:
    """How a rate search ended and what the best passing step cost, for the notes."""
    good = [s for s in hist if s.ok]
    bad = [s for s in hist if not s.ok]
    parts = []
    if bad:
        first = min(bad, key=lambda s: s.rate)
        parts.append(f"{name}: first failure at {first.rate:.0f}/s ({first.why})")
    elif hist:
        parts.append(f"{name}: no failure up to {max(s.rate for s in hist):.0f}/s (the step limit)")
    # CPU per request from the fastest step without retransmissions: a retransmitted
    # request is handled twice but counted once
    clean = [s for s in good if not s.stats.retransmissions] or good
    if clean:
        best = max(clean, key=lambda s: s.rate)
        us = _cpu_per_call_us(best)
        parts.append(
            f"{name} at {best.rate:.0f}/s: {us:.0f} us CPU per {what}"
            + (f", i.e. {1e6 / us:,.0f}/s per busy core" if us else "")
        )
    return "; ".join(parts)


def _rate_row(
    scenario: str,
    metric: str,
    unit: str,
    searches: dict[str, list[Search]],
    target: str,
    factor: float,
    what: str = "call",
) -> Row:
    """The best of each side's searches counts (they alternate, see ``alternate``)."""
    (d, dh), d_other = best_search(searches["dsbc"])
    (k, kh), k_other = best_search(searches["Kamailio"])
    notes = [search_note("dsbc", dh, what), search_note("Kamailio", kh, what)]
    if d_other or k_other:
        notes.append(
            f"the best of {len(searches['dsbc'])} searches per side, run alternately; the other(s): "
            f"dsbc {', '.join(f'{x:,.0f}' for x in d_other)}/s, "
            f"Kamailio {', '.join(f'{x:,.0f}' for x in k_other)}/s"
        )
    return Row(
        scenario,
        metric,
        unit,
        round(d),
        round(k),
        "Kamailio",
        target,
        d >= factor * k if k else None,
        "; ".join(n for n in notes if n),
    )


def _tcp_row(ctx: Context, d: TcpResult, k: TcpResult) -> None:
    p = ctx.params
    note = (
        f"{d[1]} calls at {p.tcp_rate:g}/s round-robin over {p.tcp_connections} connections opened "
        "first (benchmarks/system/tcp_uac.py: sipp -t tn cannot share connections), set-up not "
        "counted; back ends on UDP; Kamailio children=1 + tcp_children=1; the run with the least "
        f"CPU of {p.cpu_runs} counts"
    )
    if d[3] or k[3]:
        note += f"; dsbc: {d[3] or 'ok'}; Kamailio: {k[3] or 'ok'}"
        ctx.errors.append(f"tcp: {note}")
    ctx.add(
        Row(
            f"SIP calls, TCP, {p.tcp_connections:,} connections",
            "CPU per call",
            "us",
            round(d[0], 1),
            round(k[0], 1),
            "Kamailio",
            "<= 1.0x Kamailio",
            bool(d[0]) and d[0] <= k[0],
            note,
            lower_is_better=True,
        )
    )


SCENARIOS = ("calls-cpu", "calls-rate", "register", "tcp")
