"""Fixtures shared by the micro-benchmarks (run with ``python -m pytest benchmarks``)."""

from __future__ import annotations

import pytest

from benchmarks.samples import customer_rows
from dsbc.store.memory import MemoryIndex

#: 250,000 customers x 4 identities
MILLION_CUSTOMERS = 250_000


@pytest.fixture(scope="session")
def million_index() -> MemoryIndex:
    """An in-memory index of 1,000,000 identities (built once per session, ~3 s)."""
    return MemoryIndex.build(customer_rows(MILLION_CUSTOMERS))
