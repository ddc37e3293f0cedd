"""Owner lookup among 1,000,000 identities (the SIP / RADIUS / API hot path).

Target (ISSUE #6): median <= 1 us.  pytest-benchmark reports; nothing here asserts a time.
"""

from __future__ import annotations

import random
from typing import Any

from benchmarks.samples import account_of
from dsbc.store.memory import MemoryIndex

from .conftest import MILLION_CUSTOMERS


def test_lookup_hit_one_million(benchmark: Any, million_index: MemoryIndex) -> None:
    assert len(million_index) == 1_000_000
    loc = benchmark(million_index.lookup, "account", account_of(123_457))
    assert loc is not None and loc.customer_id == "0123457"


def test_lookup_random_keys_one_million(benchmark: Any, million_index: MemoryIndex) -> None:
    """Random accounts: every lookup misses the CPU caches, as real traffic does."""
    rng = random.Random(6)
    users = [account_of(rng.randrange(MILLION_CUSTOMERS), rng.randrange(2)) for _ in range(4096)]
    lookup = million_index.lookup

    def run() -> int:
        found = 0
        for u in users:
            found += lookup("account", u) is not None
        return found

    # one round = 4096 lookups: divide the reported time by 4096
    assert benchmark(run) == len(users)


def test_lookup_miss_one_million(benchmark: Any, million_index: MemoryIndex) -> None:
    assert benchmark(million_index.lookup, "account", "no-such-user") is None
