"""The scenario list and the order they run in."""

from __future__ import annotations

import functools
import importlib
import traceback
from collections.abc import Callable

from benchmarks.system import sip
from benchmarks.system.context import Context
from tests.peers.proc import find_binary

DESCRIPTIONS = {
    "calls-cpu": "SIP calls over UDP at a fixed rate: CPU per call, dsbc (1 worker) vs Kamailio (children=1)",
    "calls-rate": "SIP calls over UDP: highest rate with zero failed calls, dsbc vs Kamailio",
    "register": "SIP REGISTER, 10,000 users: highest rate, dsbc vs Kamailio, and dsbc with all workers",
    "tcp": "SIP calls from 1,000 persistent TCP connections: CPU per call, dsbc vs Kamailio",
    "api": "API: wrk -> dispatcher -> nginx back end: requests/s and added p99 at half load, dsbc vs nginx",
    "api-merge": "API admin list merge over two back ends of 1,000 rows each: rows/s",
    "radius": "RADIUS auth: radclient -> dispatcher -> FreeRADIUS, dsbc vs FreeRADIUS proxy",
    "store": "store: RSS per worker with 1,000,000 identities, lookup time, migration, second-node latency",
}
NAMES = tuple(DESCRIPTIONS)
SIP = {"calls-cpu", "calls-rate", "register", "tcp"}
PROGRAMS = {
    "calls-cpu": ("sipp", "kamailio"),
    "calls-rate": ("sipp", "kamailio"),
    "register": ("sipp", "kamailio"),
    "tcp": ("sipp", "kamailio", "ss"),
    "api": ("nginx", "wrk"),
    "api-merge": ("nginx", "wrk"),
    "radius": ("freeradius", "radclient"),
    "store": (),
}


def missing_programs(selected: list[str]) -> list[str]:
    need = sorted({p for s in selected for p in PROGRAMS[s]})
    return [p for p in need if find_binary(p) is None]


def _guard(ctx: Context, name: str, fn: Callable[[], None]) -> None:
    """A scenario that breaks is reported in RESULTS.md; the others still run."""
    ctx.log(f"== {name}")
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - report and go on
        ctx.errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:500]}")
        ctx.log(traceback.format_exc())


def run(ctx: Context, selected: list[str]) -> None:
    sip_sel = {s for s in selected if s in SIP}
    if sip_sel:
        _guard(ctx, ", ".join(s for s in NAMES if s in sip_sel), lambda: sip.run(ctx, sip_sel))
    for name in selected:
        if name in SIP:
            continue
        mod = importlib.import_module(f"benchmarks.system.{name.replace('-', '_')}")
        fn: Callable[[Context], None] = mod.run
        _guard(ctx, name, functools.partial(fn, ctx))
