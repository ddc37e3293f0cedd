"""``python -m benchmarks run [--quick] [--scenario NAME ...]``: dsbc against Kamailio,
nginx and FreeRADIUS on this machine, one after the other, results in
benchmarks/RESULTS.md.  See benchmarks/README.md."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.system import runner
from benchmarks.system.context import FULL, QUICK, Context, default_workdir
from benchmarks.system.procstat import loadavg
from benchmarks.system.results import render, write

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the whole-system scenarios and write RESULTS.md")
    r.add_argument("--quick", action="store_true", help="short runs (< 3 minutes), same scenarios")
    r.add_argument(
        "--scenario",
        action="append",
        choices=runner.NAMES,
        metavar="NAME",
        help=f"only this scenario (repeatable): {', '.join(runner.NAMES)}",
    )
    r.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file (default: benchmarks/RESULTS.md for a full run of every "
        "scenario, else $TMPDIR/dsbc-bench-RESULTS.md)",
    )
    r.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="peers' configs and logs (default /tmp/dsbc-bench-PID)",
    )
    r.add_argument("--keep", action="store_true", help="keep the work directory")
    sub.add_parser("list", help="list the scenarios")
    args = ap.parse_args(argv)
    if args.command == "list":
        for name in runner.NAMES:
            print(f"{name:12s} {runner.DESCRIPTIONS[name]}")
        return 0
    params = QUICK if args.quick else FULL
    selected = args.scenario or list(runner.NAMES)
    workdir = args.workdir or default_workdir()
    ctx = Context(params, workdir)
    created = not workdir.exists()  # never delete a directory we did not make
    workdir.mkdir(parents=True, exist_ok=True)
    missing = runner.missing_programs(selected)
    if missing:
        print(f"benchmarks: missing programs: {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.time()
    ctx.load_start = loadavg()
    try:
        runner.run(ctx, selected)
    finally:
        ctx.load_end = loadavg()
        if created and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.time() - started
    out = args.out
    if out is None:
        # only a full run of every scenario replaces the committed results
        full = not args.quick and not args.scenario
        out = HERE / "RESULTS.md" if full else Path(tempfile.gettempdir()) / "dsbc-bench-RESULTS.md"
    cmd = (
        "python -m benchmarks run"
        + (" --quick" if args.quick else "")
        + "".join(f" --scenario {s}" for s in (args.scenario or []))
    )
    text = render(ctx, started, elapsed, cmd)
    write(out, text)
    print(text)
    print(f"written to {out} in {elapsed / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
