"""wrk as the HTTP load generator: fixed connections for the highest rate, and a paced
variant (a Lua ``delay()`` per request) for latency at a chosen fraction of it.

The paced variant draws each pause at random between 0 and twice the mean.  A fixed
pause keeps the connections in step: they all start together, so every 10 ms a burst of
one request per connection arrives at once, and the p99 measures how long the server
takes to work through a burst of a hundred (the back end alone: 2-4 ms at 7,000
requests/s).  Random pauses spread the requests over time, as independent clients do
(the back end alone: 0.6-0.8 ms at the same rate)."""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers.proc import PeerError, find_binary

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int
    non2xx: int
    p50_ms: float
    p99_ms: float
    text: str


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else math.nan


def parse(text: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    reqs = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    pct = {
        m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(\d+)%\s+(\S+)", text, re.MULTILINE)
    }
    return WrkResult(
        rps=float(rps.group(1)) if rps else 0.0,
        requests=int(reqs.group(1)) if reqs else 0,
        errors=sum(int(x) for x in sock.groups()) if sock else 0,
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        p50_ms=pct.get("50", math.nan),
        p99_ms=pct.get("99", math.nan),
        text=text,
    )


def script(path: Path, body: bytes, headers: dict[str, str], delay_ms: int = 0) -> Path:
    lua = ['wrk.method = "POST"', f"wrk.body = {_lua_str(body.decode())}"]
    lua += [f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in headers.items()]
    if delay_ms:
        lua.append(f"function delay() return math.random(0, {2 * int(delay_ms)}) end")
    path.write_text("\n".join(lua) + "\n")
    return path


def _lua_str(s: str) -> str:
    return (
        '"'
        + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        + '"'
    )


def run(url: str, lua: Path, *, connections: int, seconds: float, threads: int = 1) -> WrkResult:
    binary = find_binary("wrk")
    if binary is None:
        raise PeerError("wrk not found")
    argv = [
        binary,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(lua),
        url,
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if r.returncode != 0:
        raise PeerError(f"wrk exited {r.returncode}: {r.stderr.strip()[:500]}")
    return parse(r.stdout)
