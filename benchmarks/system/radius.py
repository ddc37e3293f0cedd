"""RADIUS: radclient (the NAS, many requests in parallel) -> dispatcher -> FreeRADIUS home
server; dsbc against FreeRADIUS in proxy mode to the same home server.  Each request is
an Access-Request (PAP) for one of 10,000 accounts among the 1,000,000 identities, so
dsbc looks its owner up; FreeRADIUS proxies everything to one realm."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.peers.dsbc_bench import DsbcBench
from benchmarks.peers.freeradius_bench import PASSWORD, home_server, proxy_server
from benchmarks.system.context import Context, Row
from benchmarks.system.procstat import CpuMeter
from tests.peers.freeradius import free_udp_ports
from tests.peers.proc import PeerError

NAS_SECRET = "nas-secret"
HOME_SECRET = "home-secret"


def requests_file(ctx: Context, path: Path, users: int) -> Path:
    names = [
        ln
        for ln in ctx.dataset.users_file(path.with_suffix(".csv"), users)
        .read_text()
        .splitlines()[1:]
        if ln
    ]
    blocks = [
        f'User-Name = "{u}"\nUser-Password = "{PASSWORD}"\nNAS-IP-Address = 127.0.0.9\nNAS-Port = 1\n'
        for u in names
    ]
    path.write_text("\n".join(blocks))
    return path


def radclient(
    addr: tuple[str, int], reqs: Path, count: int, per_file: int, parallel: int, meter_pid: int
) -> tuple[int, int, float, float]:
    """(accepted, lost, seconds, CPU seconds of the dispatcher)."""
    binary = shutil.which("radclient")
    if binary is None:
        raise PeerError("radclient not found")
    repeat = max(1, count // per_file)
    argv = [
        binary,
        "-q",
        "-s",
        "-p",
        str(parallel),
        "-c",
        str(repeat),
        "-r",
        "1",
        "-t",
        "5",
        "-f",
        str(reqs),
        f"{addr[0]}:{addr[1]}",
        "auth",
        NAS_SECRET,
    ]
    meter = CpuMeter(meter_pid).start()
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    secs = time.monotonic() - t0
    cpu = meter.stop()
    out = r.stdout + r.stderr
    acc = re.search(r"Accepted\s*:\s*(\d+)", out)
    lost = re.search(r"Lost\s*:\s*(\d+)", out)
    if acc is None:
        raise PeerError(f"radclient gave no summary (exit {r.returncode}): {out[-500:]}")
    return int(acc.group(1)), int(lost.group(1)) if lost else 0, secs, cpu


def run(ctx: Context) -> None:
    p = ctx.params
    w = ctx.dir("radius")
    users = min(p.register_users, 10_000)
    reqs = requests_file(ctx, w / "requests.txt", users)
    out: dict[str, tuple[int, int, float, float]] = {}
    with home_server(w / "home", HOME_SECRET) as home:
        auth, acct = free_udp_ports(2)
        d = ctx.dir("radius-dsbc")
        sysconf = {
            "radius": [f"127.0.0.1:{home.port}"],
            "radius_acct": [f"127.0.0.1:{home.port + 1}"],
            "radius_secret": HOME_SECRET,
        }
        bench = DsbcBench(
            d,
            ctx.dataset.copy_to(d / "location.db"),
            systems={"source": sysconf, "target": sysconf},
            radius={
                "enabled": True,
                "auth_listen": f"127.0.0.1:{auth}",
                "acct_listen": f"127.0.0.1:{acct}",
                "timeout": 5.0,
                "retries": 0,
                "clients": [{"address": "127.0.0.1", "secret": NAS_SECRET}],
            },
        )
        ctx.log("starting dsbc (RADIUS dispatcher)")
        bench.start()
        try:
            out["dsbc"] = radclient(
                ("127.0.0.1", auth), reqs, p.radius_requests, users, p.radius_parallel, bench.pid
            )
        finally:
            bench.stop()
        with proxy_server(w / "proxy", NAS_SECRET, home.addr, HOME_SECRET) as px:
            out["FreeRADIUS"] = radclient(
                px.addr, reqs, p.radius_requests, users, p.radius_parallel, px.pid
            )
    for name, (acc, lost, secs, cpu) in out.items():
        ctx.log(f"  {name}: {acc} accepted, {lost} lost in {secs:.2f}s, cpu {cpu:.2f}s")
    (da, dl, ds, dc), (fa, fl, fs, fc) = out["dsbc"], out["FreeRADIUS"]
    d_rate, f_rate = da / ds, fa / fs
    note = (
        f"radclient -p {p.radius_parallel}, {da + dl:,} Access-Requests (PAP) over {users:,} accounts; "
        f"CPU per request: dsbc {dc / max(1, da) * 1e6:.0f} us, FreeRADIUS {fc / max(1, fa) * 1e6:.0f} us; "
        "FreeRADIUS with its stock thread pool (5-32 threads), dsbc's RADIUS in one worker"
    )
    if dl or fl:
        note += f"; lost: dsbc {dl}, FreeRADIUS {fl}"
        ctx.errors.append(f"radius: lost requests: dsbc {dl}, FreeRADIUS {fl}")
    ctx.add(
        Row(
            "RADIUS auth, proxy to FreeRADIUS",
            "requests/s",
            "requests/s",
            round(d_rate),
            round(f_rate),
            "FreeRADIUS proxy",
            ">= 0.5x FreeRADIUS",
            d_rate >= 0.5 * f_rate,
            note,
        )
    )
    ctx.add(
        Row(
            "RADIUS auth, proxy to FreeRADIUS",
            "CPU per request",
            "us",
            round(dc / max(1, da) * 1e6, 1),
            round(fc / max(1, fa) * 1e6, 1),
            "FreeRADIUS proxy",
            "report only",
            None,
            "user + system time of each dispatcher's process tree over the radclient run",
            lower_is_better=True,
        )
    )
