"""Location stores: `open_store(url)` picks the kind from the URL scheme.

- ``sqlite:///abs/path.db`` (embedded default; see `sqlite_path` for relative forms and
  ``sqlite:///:memory:``)
- ``redis://host:port/db``, ``rediss://...``, ``redis+sentinel://host:port,host:port/service``:
  the shared store (`redis_store.RedisStore`)
"""

from __future__ import annotations

from .base import (
    KINDS,
    LOCK_LEASE,
    SYSTEMS,
    ApiSession,
    AuditEntry,
    BadIdentity,
    BatchCancelled,
    BatchSummary,
    Customer,
    CustomerRow,
    Decision,
    GroupSplitError,
    Location,
    LocationStore,
    LockedByBatch,
    MigrationResult,
    Registration,
    StoreError,
    StoreUnavailable,
    identity_key,
    normalise,
    parse_identity,
    some,
)
from .memory import UNKNOWN_POLICIES, BadRow, MemoryIndex, clean_row, new_batch_id, normalise_keys

__all__ = [
    "KINDS",
    "LOCK_LEASE",
    "SYSTEMS",
    "UNKNOWN_POLICIES",
    "ApiSession",
    "AuditEntry",
    "BadIdentity",
    "BadRow",
    "BatchCancelled",
    "BatchSummary",
    "Customer",
    "CustomerRow",
    "Decision",
    "GroupSplitError",
    "Location",
    "LocationStore",
    "LockedByBatch",
    "MemoryIndex",
    "MigrationResult",
    "Registration",
    "StoreError",
    "StoreUnavailable",
    "clean_row",
    "identity_key",
    "new_batch_id",
    "normalise",
    "normalise_keys",
    "open_store",
    "parse_identity",
    "some",
]


def open_store(
    url: str,
    unknown: str = "source",
    *,
    load: bool = True,
    create: bool = True,
    cache_file: str = "",
) -> LocationStore:
    """Open the store at `url` with the `store.unknown` policy (source, target or reject).

    ``load=False`` (one-shot CLI commands) skips loading the in-memory index: reads then
    query the backing store directly and `refresh()` does nothing.  ``create=False``
    refuses to start an empty store where none exists (a mistyped path).  ``cache_file``
    (Redis only): a local copy of the index to start from while Redis is unreachable."""
    if unknown not in UNKNOWN_POLICIES:
        raise StoreError(f"store.unknown: {unknown!r} is not one of {', '.join(UNKNOWN_POLICIES)}")
    from .redis_conn import masked_url

    scheme = url.partition(":")[0].lower()
    if scheme == "sqlite":
        from .sqlite import SqliteStore, sqlite_path

        return SqliteStore(sqlite_path(url), unknown, load=load, create=create)
    if scheme in ("redis", "rediss", "redis+sentinel"):
        from .redis_store import RedisStore

        try:
            return RedisStore(url, unknown, load=load, create=create, cache_file=cache_file)
        except ValueError as exc:  # redis-py on a URL it cannot use (a port out of range...)
            raise StoreError(f"bad store url {masked_url(url)!r}: {exc}") from None
    raise StoreError(f"unsupported store url {masked_url(url)!r} (sqlite:///path or redis://host:port/db)")
