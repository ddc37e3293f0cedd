"""The benchmark data set: a SQLite location store of N customers x 4 identities
(two SIP accounts, a DID, an i_account; benchmarks/samples.py), built once per run and
copied for each dsbc instance, plus the sipp injection files drawn from it."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from api_proxy.records import session_key
from benchmarks.samples import account_of, identity_keys, system_of
from dsbc.store.base import ApiSession, CustomerRow
from dsbc.store.sqlite import SqliteStore

API_TOKEN = "bench-access-token-0123456789abcdef"


@dataclass
class Dataset:
    dir: Path
    customers: int
    db: Path
    build_seconds: float

    @property
    def identities(self) -> int:
        return self.customers * 4

    @classmethod
    def build(cls, directory: Path, customers: int, log: Callable[[str], None]) -> Dataset:
        directory.mkdir(parents=True, exist_ok=True)
        db = directory / "location.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        log(f"building the store: {customers:,} customers, {customers * 4:,} identities")
        t0 = time.monotonic()
        store = SqliteStore(str(db), load=False)
        try:
            rows = [
                CustomerRow(f"{i:07d}", tuple(identity_keys(i)), system_of(i), "")
                for i in range(customers)
            ]
            store.import_rows(rows)
            # an API session on the source for the API scenario (customer realm, bearer token)
            store.put_session(
                ApiSession(
                    session_key("at", API_TOKEN),
                    "source",
                    time.time() + 86400,
                    "0000000",
                    "customer",
                )
            )
            store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            store.close()
        return cls(directory, customers, db, time.monotonic() - t0)

    def copy_to(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.db, path)
        return path

    def users_file(self, path: Path, n: int, seed: int = 6) -> Path:
        """A sipp -inf file of ``n`` distinct accounts drawn at random from the store."""
        rng = random.Random(seed)
        n = min(n, self.customers * 2)
        picks = rng.sample(range(self.customers * 2), n)
        lines = ["SEQUENTIAL"] + [account_of(p // 2, p % 2) for p in picks]
        path.write_text("\n".join(lines) + "\n")
        return path
