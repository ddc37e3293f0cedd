"""benchmarks/RESULTS.md: one table of every scenario, dsbc beside its peer."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from benchmarks.system.context import Context, Row
from benchmarks.system.procstat import machine


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _ratio(r: Row) -> str:
    x = r.ratio
    return "-" if x is None else f"{x:.2f}x"


def _met(r: Row) -> str:
    return {True: "yes", False: "**no**", None: "-"}[r.met]


def code_version() -> str:
    """The commit the measured code comes from (and whether the tree had changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{rev}{' with uncommitted changes' if dirty else ''}" if rev else "unknown"


def render(ctx: Context, started: float, elapsed: float, command: str) -> str:
    m = machine()
    short = f"{m['cpu']}, {m['cores']} cores"
    date = time.strftime("%Y-%m-%d", time.gmtime(started))
    lines = [
        "# dsbc benchmark results",
        "",
        (
            f"Written by `{command}` ({ctx.params.name} run, {elapsed / 60:.1f} min) on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, code at commit "
            f"{code_version()}.  How each figure is "
            "measured, what the peers run and where the time goes: [README.md](README.md#benchmarks)."
        ),
        "",
        (
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, {m['kernel']}; load average "
            f"at the start {ctx.load_start}, at the end {ctx.load_end} (a shared host: CPU figures "
            "come from /proc accounting and hold under noise, rates and latencies do not)."
        ),
        "",
        (
            f"Data: {ctx.params.customers * 4:,} identities ({ctx.params.customers:,} customers x 4) in "
            "dsbc's store and in Kamailio's htable; callers and registering users drawn from "
            f"{ctx.params.register_users:,} of its accounts.  Ratio = dsbc / peer.  CPU figures: lower "
            "is better; rates: higher is better."
        ),
        "",
        "| scenario | metric | dsbc | peer | ratio | target | met | machine | date |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ctx.rows:
        peer = f"{_num(r.peer)} ({r.peer_name})" if r.peer is not None else "-"
        lines.append(
            f"| {r.scenario} | {r.metric} ({r.unit}) | {_num(r.dsbc)} | {peer} | {_ratio(r)} | "
            f"{r.target or '-'} | {_met(r)} | {short} | {date} |"
        )
    lines += ["", "## Notes per row", ""]
    for r in ctx.rows:
        if r.note:
            lines.append(f"- **{r.scenario}, {r.metric}**: {r.note}")
    if ctx.errors:
        lines += ["", "## Problems seen during the run", ""]
        lines += [f"- {e}" for e in ctx.errors]
    missed = [r for r in ctx.rows if r.met is False]
    lines += ["", "## Targets missed", ""]
    if missed:
        lines += [
            f"- {r.scenario}, {r.metric}: dsbc {_num(r.dsbc)} {r.unit}, target {r.target}"
            for r in missed
        ]
        lines += [
            "",
            (
                "Where the time goes and what was done about it: "
                "[README.md, where the time goes](README.md#where-the-time-goes)."
            ),
        ]
    else:
        lines.append("- none")
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    path.write_text(text)
