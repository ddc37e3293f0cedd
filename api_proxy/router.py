"""What the API dispatcher asks of its host: the small ``Router`` protocol.

``api_proxy`` never imports ``dsbc``.  ``dsbc.api_service`` implements this protocol on
the location store (SPEC sections 1 and 2); tests may implement it with a dict.  All
methods are synchronous and served from memory except the session and create writes,
which go to the backing store (one small transaction each).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import msgspec


class Owner(NamedTuple):
    """Who owns an identity now, after the ``store.unknown`` policy."""

    system: str  # "source", "target" or "reject"
    customer_id: str = ""
    state: str = "active"  # "active" or "locked"
    known: bool = True  # False when the policy answered (identity not in the store)


class SessionRecord(msgspec.Struct, kw_only=True):
    """An API / self-care session and the system it lives on.

    ``key`` is a digest made by ``api_proxy.sessions`` (never a raw token); ``extra`` is
    JSON text owned by the dispatcher (the admin's twin session, the sibling keys)."""

    key: str
    system: str
    expires_at: float
    customer_id: str = ""
    realm: str = ""
    extra: str = ""


class Router(Protocol):
    @property
    def lock_hold(self) -> float:
        """Seconds a locked customer's new request is held before customer_locked."""
        ...

    def owner(self, kind: str, value: str) -> Owner | None:
        """The owner of ``kind:value`` (kind: an identity kind, or ``customer`` for a
        customer id).  None when the value is not a valid identity of that kind (the
        caller then ignores that key)."""
        ...

    def default_system(self) -> str:
        """The system for a request that names nothing: ``store.unknown`` (or reject)."""
        ...

    def get_session(self, key: str) -> SessionRecord | None:
        ...

    def put_session(self, record: SessionRecord) -> None:
        ...

    def delete_session(self, key: str) -> None:
        ...

    def record_created(self, customer_id: str, system: str, identities: Sequence[str]) -> None:
        """Add ``kind:value`` identities to a customer (creating it on ``system`` if it is
        new) so that every dispatcher routes them at once."""
        ...


class DictRouter:
    """A Router over plain dicts: for tests, benchmarks and embedding without a store."""

    def __init__(self, unknown: str = "source", lock_hold: float = 2.0) -> None:
        self.unknown = unknown
        self._lock_hold = lock_hold
        self.customers: dict[str, tuple[str, str]] = {}  # id -> (system, state)
        self.identities: dict[str, str] = {}  # "kind:value" -> customer id
        self.sessions: dict[str, SessionRecord] = {}

    @property
    def lock_hold(self) -> float:
        return self._lock_hold

    def add(self, customer_id: str, system: str, identities: Sequence[str] = ()) -> None:
        self.customers[customer_id] = (system, self.customers.get(customer_id, (system, "active"))[1])
        for ident in identities:
            self.identities[ident] = customer_id

    def owner(self, kind: str, value: str) -> Owner | None:
        cid = value if kind == "customer" else self.identities.get(f"{kind}:{value}")
        if cid is None or cid not in self.customers:
            return Owner(self.unknown, "", "active", False)
        system, state = self.customers[cid]
        return Owner(system, cid, state, True)

    def default_system(self) -> str:
        return self.unknown

    def get_session(self, key: str) -> SessionRecord | None:
        return self.sessions.get(key)

    def put_session(self, record: SessionRecord) -> None:
        self.sessions[record.key] = record

    def delete_session(self, key: str) -> None:
        self.sessions.pop(key, None)

    def record_created(self, customer_id: str, system: str, identities: Sequence[str]) -> None:
        if customer_id not in self.customers:
            self.customers[customer_id] = (system, "active")
        for ident in identities:
            self.identities[ident] = customer_id
