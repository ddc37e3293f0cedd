"""Store scenario: what holding 1,000,000 identities costs and how fast changes travel.

- RSS of each `dsbc run` worker with the store loaded (two workers);
- ``lookup`` time in the loaded index (random accounts, CPU clock, batches of 1,000);
- migrating 10,000 customers (50,000 identities) with ``dsbc migrate --batch``, on top of
  the million, on SQLite and (when the Redis store is present) on Redis;
- how long a migration takes to be seen by a second node: single-customer migrations at
  random moments, a second process applying changes as a worker does
  (benchmarks/system/node2.py), latency = seen - just before the write, p50 / p99.
"""

from __future__ import annotations

import importlib.util
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.peers.dsbc_bench import REPO, DsbcBench
from benchmarks.system.context import Context, Row
from benchmarks.system.procstat import rss_bytes
from dsbc.store import open_store
from dsbc.store.base import CustomerRow
from dsbc.store.sqlite import SqliteStore

EXTRA_BASE = 9_000_000  # ids of the customers added for the migration


def extra_rows(n: int, each: int) -> list[CustomerRow]:
    rows = []
    for j in range(n):
        i = EXTRA_BASE + j
        keys = [
            f"account:m{i}",
            f"account:m{i}b",
            f"did:1777{i}",
            f"i_account:{i}",
            f"login:m{i}@bench",
        ]
        rows.append(CustomerRow(f"m{i}", tuple(keys[:each]), "source", ""))
    return rows


def rss_per_worker(ctx: Context) -> tuple[list[float], float]:
    d = ctx.dir("store-rss")
    bench = DsbcBench(d, ctx.dataset.copy_to(d / "location.db"), workers=2)
    ctx.log("starting dsbc (2 workers, store only) for RSS")
    bench.start()
    try:
        time.sleep(1.0)
        workers = [rss_bytes(p) / 2**20 for p in bench.worker_pids()]
        master = rss_bytes(bench.pid) / 2**20
    finally:
        bench.stop()
    return workers, master


def lookup_timing(ctx: Context) -> tuple[float, float, float]:
    """(median ns per lookup, p99 of batch medians, decide() median ns) on the loaded index."""
    d = ctx.dir("store-lookup")
    store = SqliteStore(str(ctx.dataset.copy_to(d / "location.db")))
    try:
        from benchmarks.samples import account_of

        rng = random.Random(7)
        n = ctx.params.customers
        keys = [account_of(rng.randrange(n), rng.randrange(2)) for _ in range(1000)]
        lookup = store.lookup
        per: list[float] = []
        for _ in range(300):
            rng.shuffle(keys)
            t0 = time.thread_time_ns()
            for k in keys:
                lookup("account", k)
            per.append((time.thread_time_ns() - t0) / len(keys))
        per.sort()
        from dsbc.sip_service import StoreRouter, TrustedPeers

        router = StoreRouter(store, TrustedPeers([]))
        dec: list[float] = []
        for _ in range(50):
            t0 = time.thread_time_ns()
            for k in keys:
                router.decide((("account", k),))
            dec.append((time.thread_time_ns() - t0) / len(keys))
        return statistics.median(per), per[int(len(per) * 0.99) - 1], statistics.median(dec)
    finally:
        store.close()


def _node2(url: str, poll: float) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.system.node2", url, str(poll)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise RuntimeError(f"second node did not start: {line!r}")
    return p


def migration_and_latency(
    ctx: Context, kind: str, url: str, cfg_dir: Path
) -> tuple[float, float, list[float], float]:
    """(CLI seconds for the batch, store.migrate seconds for a rollback of it, latencies ms,
    seconds for the second node to apply the whole batch)."""
    p = ctx.params
    rows = extra_rows(p.migrate_customers, p.migrate_identities_each)
    store = open_store(url, load=False)
    try:
        store.import_rows(rows)
    finally:
        store.close()
    batch = cfg_dir / "batch.txt"
    batch.write_text("\n".join(r.customer_id for r in rows) + "\n")
    cfg = cfg_dir / "dsbc.toml"
    cfg.write_text(
        f'[store]\nurl = "{url}"\n[sip]\nenabled = false\n[api]\nenabled = false\n[control]\nenabled = false\n'
    )
    poll = 0.2  # store.poll_interval's default
    node = _node2(url, poll)
    seen: dict[str, float] = {}
    batch_seen = threading.Event()
    batch_ids = {r.customer_id for r in rows}

    def reader() -> None:
        assert node.stdout is not None
        for line in node.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "seen":
                seen[parts[2]] = float(parts[1])
                if batch_ids.issubset(seen):
                    batch_seen.set()

    threading.Thread(target=reader, daemon=True).start()
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        t0 = time.time()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "dsbc.cli",
                "-c",
                str(cfg),
                "migrate",
                "--batch",
                str(batch),
                "--to",
                "target",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=300,
            check=False,
        )
        cli = time.time() - t0
        if r.returncode != 0:
            raise RuntimeError(
                f"dsbc migrate exited {r.returncode}: {(r.stderr or r.stdout)[-500:]}"
            )
        batch_seen.wait(60)
        applied = max((seen.get(c, 0.0) for c in batch_ids), default=0.0) - t0
        # single-customer flips at random moments
        rng = random.Random(11)
        flips = [r.customer_id for r in rng.sample(rows, min(p.flips, len(rows)))]
        store = open_store(url, load=False)
        try:
            t1 = time.time()
            rb = store.migrate(
                [r.customer_id for r in rows], "source", who="bench"
            )  # the batch back, timed
            back = time.time() - t1
            if len(rb.moved) != len(rows):
                raise RuntimeError(f"rollback moved {len(rb.moved)} of {len(rows)}")
            time.sleep(poll + 0.3)
            seen.clear()
            starts: dict[str, float] = {}
            for cid in flips:
                time.sleep(rng.uniform(0.05, 0.25))
                starts[cid] = time.time()
                store.migrate([cid], "target", who="bench")
            deadline = time.time() + 5
            while not all(c in seen for c in flips) and time.time() < deadline:
                time.sleep(0.05)
        finally:
            store.close()
        lat = sorted((seen[c] - starts[c]) * 1000 for c in flips if c in seen)
        if len(lat) < len(flips):
            ctx.errors.append(
                f"store ({kind}): the second node saw {len(lat)} of {len(flips)} migrations"
            )
        ctx.log(
            f"  {kind}: CLI batch {cli:.2f}s, store.migrate {back:.2f}s, node 2 applied the batch after "
            f"{applied:.2f}s; flips p50 {statistics.median(lat) if lat else 0:.0f} ms"
        )
        return cli, back, lat, applied
    finally:
        node.kill()
        node.wait()


def _p(lat: list[float], q: float) -> float:
    return lat[min(len(lat) - 1, round(q * (len(lat) - 1)))] if lat else float("nan")


def run(ctx: Context) -> None:
    p = ctx.params
    workers, master = rss_per_worker(ctx)
    ids = ctx.dataset.identities
    ctx.add(
        Row(
            "store, 1,000,000 identities" if ids == 1_000_000 else f"store, {ids:,} identities",
            "RSS per worker",
            "MB",
            round(max(workers)),
            None,
            "",
            "<= 300 MB",
            max(workers) <= 300,
            f"workers {', '.join(f'{w:.0f}' for w in workers)} MB, master {master:.0f} MB "
            f"({p.customers:,} customers x 4 identities, SQLite store)",
            lower_is_better=True,
        )
    )
    med, p99, dec = lookup_timing(ctx)
    ctx.add(
        Row(
            "store, lookup",
            "median lookup time",
            "us",
            round(med / 1000, 3),
            None,
            "",
            "<= 1 us",
            med <= 1000,
            f"random accounts among {ids:,} identities, CPU clock, batches of 1,000: p99 of the "
            f"batches {p99 / 1000:.3f} us; the SIP router's whole decide() (normalise + lookup + Decision) "
            f"{dec / 1000:.3f} us",
            lower_is_better=True,
        )
    )
    kinds: list[tuple[str, str, Path]] = []
    d = ctx.dir("store-sqlite")
    kinds.append(("SQLite", f"sqlite:///{ctx.dataset.copy_to(d / 'location.db')}", d))
    redis_server = None
    if importlib.util.find_spec("dsbc.store.redis_store") is not None:
        from tests.peers.redis import RedisServer

        rd = ctx.dir("store-redis")
        redis_server = RedisServer(rd / "server", appendfsync="everysec").start()
        url = redis_server.url
        ctx.log(f"loading {ids:,} identities into Redis")
        store = open_store(url, load=False)
        try:
            store.import_rows(
                CustomerRow(f"{i:07d}", tuple(keys), sysname, "")
                for i, keys, sysname in _dataset_rows(p.customers)
            )
        finally:
            store.close()
        kinds.append(("Redis", url, rd))
    try:
        for kind, url, cfg_dir in kinds:
            cli, back, lat, applied = migration_and_latency(ctx, kind, url, cfg_dir)
            n, each = p.migrate_customers, p.migrate_identities_each
            ctx.add(
                Row(
                    f"store, migrate {n:,} customers ({n * each:,} identities), {kind}",
                    "dsbc migrate --batch",
                    "s",
                    round(cli, 2),
                    None,
                    "",
                    "<= 5 s",
                    cli <= 5.0,
                    f"on top of {ids:,} identities; wall time of the CLI (Python start-up included); "
                    f"store.migrate() of the same batch back: {back:.2f} s; a second node had applied the "
                    f"whole batch {applied:.2f} s after the command started",
                    lower_is_better=True,
                )
            )
            ctx.add(
                Row(
                    f"store, change seen by a second node, {kind}",
                    "p99 latency",
                    "ms",
                    round(_p(lat, 0.99), 1),
                    None,
                    "",
                    "<= 100 ms",
                    _p(lat, 0.99) <= 100,
                    f"{len(lat)} single-customer migrations at random moments; p50 {_p(lat, 0.5):.0f} ms, "
                    f"max {max(lat) if lat else float('nan'):.0f} ms; the second node applies changes every "
                    "store.poll_interval (0.2 s, the default)"
                    + (" and at once on Redis pub/sub" if kind == "Redis" else ""),
                    lower_is_better=True,
                )
            )
    finally:
        if redis_server is not None:
            redis_server.stop()


def _dataset_rows(n: int):  # type: ignore[no-untyped-def]
    from benchmarks.samples import identity_keys, system_of

    for i in range(n):
        yield i, identity_keys(i), system_of(i)
