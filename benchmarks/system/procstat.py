"""CPU and memory of process trees, read from the kernel's own accounting (/proc).

A figure such as "CPU per call" is (user + system time of the server's processes over the
run) / calls.  It does not depend on how busy the rest of the machine is, which wall-clock
rates do, so it is the fair measure on a shared, noisy host.  The whole tree counts: a
Kamailio's attendant, timers and receivers, a dsbc master and its workers.  Time of a
child that exits during the run is found in its parent's cutime / cstime once reaped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Self

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    return text.rsplit(")", 1)[1].split()


def children_of(pid: int) -> list[int]:
    """Direct children (every thread's list, /proc/PID/task/TID/children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        out.extend(int(x) for x in text.split())
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if _stat_fields(p) is None:
            continue
        out.append(p)
        todo.extend(children_of(p))
    return out


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) in clock ticks; (0, 0) for a process that is gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0, 0
    # after ")": state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    return int(f[11]) + int(f[12]), int(f[13]) + int(f[14])


def rss_bytes(pid: int) -> int:
    f = _stat_fields(pid)
    return 0 if f is None else int(f[21]) * PAGE


def tree_rss(pid: int) -> dict[int, int]:
    return {p: rss_bytes(p) for p in tree(pid)}


class CpuMeter:
    """CPU seconds used by the process trees under ``roots`` between start() and stop()."""

    def __init__(self, *roots: int) -> None:
        self.roots = [r for r in roots if r]
        self._start: dict[int, tuple[int, int]] = {}
        self.seconds = 0.0

    def _sample(self) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for r in self.roots:
            for p in tree(r):
                out[p] = cpu_ticks(p)
        return out

    def start(self) -> Self:
        self._start = self._sample()
        return self

    def stop(self) -> float:
        end = self._sample()
        total = 0
        for pid, (own, kids) in end.items():
            own0, kids0 = self._start.get(pid, (0, 0))
            total += (own - own0) + (kids - kids0)
        self.seconds = total / CLK_TCK
        return self.seconds

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tree_cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        own, kids = cpu_ticks(p)
        total += own + kids
    return total / CLK_TCK


def wait_idle(pid: int, timeout: float = 20.0, window: float = 0.5, busy: float = 0.04) -> float:
    """Wait until the tree under ``pid`` uses less than ``busy`` of a core over ``window``
    seconds (it has drained its queues); returns the seconds waited."""
    t0 = time.monotonic()
    last = tree_cpu_seconds(pid)
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        now = tree_cpu_seconds(pid)
        if now - last <= busy * window:
            break
        last = now
    return time.monotonic() - t0


def machine() -> dict[str, str]:
    """CPU model, core count, memory and kernel of this host (for RESULTS.md)."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MB"
                break
    except OSError:
        pass
    u = os.uname()
    return {
        "cpu": model,
        "cores": str(os.cpu_count() or 0),
        "memory": mem,
        "kernel": f"{u.sysname} {u.release}",
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
