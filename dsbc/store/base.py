"""The location model and the interface every store (SQLite, Redis) implements.

Hot-path reads (`lookup`, `owner`, `customer`) are served from the in-memory index and never
touch the disk or the network.  Writes go to the backing store in one transaction, and
every process learns of them through `refresh()` (SQLite: a change log polled by the
runner; Redis: pub/sub), which updates the index in place.

Layering: `sip/` and `api_proxy/` never import this module; `dsbc` adapts it to their
small `Router` protocols.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable
from typing import Literal, Self

import msgspec

SYSTEMS: tuple[str, str] = ("source", "target")
# (i_did_number: a DID's id in the billing API, routing API requests that name it)
KINDS: tuple[str, ...] = (
    *("account", "i_account", "did", "login", "cpe", "imsi", "msisdn", "radius"),
    "i_did_number",
)

State = Literal["active", "locked"]


#: seconds a batch's locks outlive its migration's last sign of life (a lock call): what a
#: migration killed between its lock and its flip costs its customers (held, then "try
#: again"), at most, before any node or the next migration releases them
LOCK_LEASE = 30.0


class StoreError(Exception):
    """A store operation the operator asked for cannot be done; str() is the reason."""


class GroupSplitError(StoreError):
    """A migration would split a group; names the group and the missing customers."""

    def __init__(self, group: str, missing: list[str]) -> None:
        self.group = group
        self.missing = missing
        super().__init__(
            f"group {group!r} must move together: missing customer(s) {', '.join(sorted(missing))}"
        )


def some(ids: list[str], limit: int = 20) -> str:
    """``1, 2, 3`` or ``1, 2, ... (120 in all)``."""
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown}, ... ({len(ids)} in all)"


class LockedByBatch(StoreError):
    """Customers of a batch are locked by another batch: a migration in flight (its
    ``--lock-for`` window), or one that died before unlocking them.  Nothing changed."""

    def __init__(self, locked: dict[str, str]) -> None:
        self.locked = locked  # customer id -> the batch holding it
        batches = sorted(set(locked.values()))
        super().__init__(
            f"customer(s) {some(sorted(locked))} locked by batch {', '.join(batches)}: a migration "
            "in progress (run again when it ends), or one that died without unlocking them "
            "(released when its store.lock_lease runs out; --force takes them over now)"
        )


class BatchCancelled(StoreError):
    """A batch was rolled back while its migration still ran: its next lock or flip is
    refused, so it moves nobody after the operator undid it."""

    def __init__(self, batch_id: str) -> None:
        self.batch_id = batch_id
        super().__init__(f"batch {batch_id} was rolled back while it ran: stopped")


class StoreUnavailable(StoreError):
    """The shared store cannot be reached; dispatching goes on from memory, writes are refused."""


class BadIdentity(ValueError):
    """An identity that cannot be normalised; str() names it."""


# --- identities ------------------------------------------------------------------------

_NON_DIGITS = re.compile(r"[\s\-\.\(\)/]")
_HEX = re.compile(r"^[0-9a-f]{12}$")


def normalise(kind: str, value: str) -> str:
    """The canonical form of an identity value (SPEC section 1); BadIdentity if impossible."""
    if kind == "account":  # perf: the SIP router's owner lookup, once per request
        v = value.strip()
        if not v:
            raise BadIdentity("account: empty value")
        return v
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise BadIdentity(f"unknown identity kind {kind!r} (one of {', '.join(KINDS)})")
    v = value.strip()
    if kind in ("did", "i_account", "imsi", "msisdn", "i_did_number"):
        v = _NON_DIGITS.sub("", v)
        if kind in ("did", "msisdn") and v.startswith("+"):
            v = v[1:]
        if not v.isdigit() or not v.isascii():
            raise BadIdentity(f"{kind}:{value!r} is not a number")
        if kind in ("i_account", "i_did_number"):  # a database id: 0042 is the 42 the API sends
            v = v.lstrip("0") or "0"
    elif kind == "cpe":
        v = re.sub(r"[\s:\-\.]", "", v).lower()
        if not _HEX.match(v):
            raise BadIdentity(f"cpe:{value!r} is not a MAC address (12 hex digits)")
    elif not v:
        raise BadIdentity(f"{kind}: empty value")
    return v


def parse_identity(text: str) -> tuple[str, str]:
    """``"did:+1 555 0100"`` -> ``("did", "15550100")``."""
    kind, sep, value = text.partition(":")
    if not sep:
        raise BadIdentity(f"{text!r} is not KIND:VALUE")
    kind = kind.strip().lower()
    return kind, normalise(kind, value)


def identity_key(kind: str, value: str) -> str:
    """The index key of an already-normalised identity."""
    return f"{kind}:{value}"


# --- records ---------------------------------------------------------------------------


class Location(msgspec.Struct, frozen=True, gc=False):
    """Who owns an identity now."""

    customer_id: str
    system: str
    state: str = "active"


class Customer(msgspec.Struct, gc=False):
    customer_id: str
    system: str = "source"
    state: str = "active"
    group: str = ""
    batch_id: str = ""
    expires_cap: int = 0  # >0 while a migration is being prepared (`dsbc migrate --prepare`)
    identities: tuple[str, ...] = ()  # "kind:value" keys


class CustomerRow(msgspec.Struct, frozen=True):
    """A validated customer row (see `memory.clean_row`): what `import_rows` writes."""

    customer_id: str
    identities: tuple[str, ...]  # normalised "kind:value" keys, no duplicates
    system: str | None = None  # None: keep the stored system (new customers start on source)
    group: str = ""


class Decision(msgspec.Struct, frozen=True, gc=False):
    """What the dispatchers act on: the system to use (or "reject"), and why."""

    system: str  # "source", "target" or "reject"
    customer_id: str = ""
    state: str = "active"
    reason: str = ""  # e.g. "did:15550100 -> customer 42" or "unknown identity: store.unknown=source"


class MigrationResult(msgspec.Struct):
    batch_id: str
    to: str
    moved: list[str] = []  # customers that changed system
    already: list[str] = []  # customers already on `to`
    unknown: list[str] = []  # ids not in the store
    dry_run: bool = False
    # committed, but not yet safe from a fail-over (Redis: no replica confirmed it)
    warning: str = ""


class AuditEntry(msgspec.Struct):
    ts: float
    who: str
    customer_id: str
    from_system: str
    to_system: str
    batch_id: str
    note: str = ""  # e.g. "rollback of b-20261202-055012-3f2a"


class BatchSummary(msgspec.Struct):
    """One migration batch as the audit log tells it (`dsbc status`, the control API)."""

    batch_id: str
    ts: float  # when its first customer moved
    who: str
    from_system: str
    to_system: str
    customers: int  # customers it moved
    note: str = ""


class Registration(msgspec.Struct, gc=False):
    """A registration dsbc relayed: written by the SIP workers, read by `dsbc migrate`."""

    account: str
    contact: str
    system: str
    expires_at: float
    customer_id: str = ""


#: seconds a copy of an API session kept in one process may be used before the store is
#: read again (SQLite; Redis tells every node of a change at once): a change made on
#: another node (a refresh, an admin's context, a logout) counts within this (SPEC 2)
SESSION_FRESH = 1.0


class ApiSession(msgspec.Struct, gc=False):
    """An API / self-care session and the system it lives on (keyed by session id or token)."""

    key: str
    system: str
    expires_at: float
    customer_id: str = ""
    realm: str = ""
    extra: str = ""  # JSON text the API dispatcher may keep (e.g. the admin's twin session)


# --- the interface ---------------------------------------------------------------------


class LocationStore(abc.ABC):
    """A location store: an in-memory index in front of a durable backing store."""

    unknown: str = "source"

    # -- hot path: memory only ---------------------------------------------------------

    @abc.abstractmethod
    def lookup(self, kind: str, value: str) -> Location | None:
        """The owner of an already-normalised identity, or None if unknown."""

    @abc.abstractmethod
    def customer(self, customer_id: str) -> Customer | None:
        """The customer record, from memory."""

    def customers(self, customer_ids: Iterable[str]) -> dict[str, Customer]:
        """The known customers among `customer_ids` (a batch read for planning migrations)."""
        found: dict[str, Customer] = {}
        for cid in customer_ids:
            c = self.customer(cid)
            if c is not None:
                found[cid] = c
        return found

    def owners_of(self, keys: Iterable[str]) -> dict[str, str]:
        """identity key ("kind:value") -> owning customer id, for the stored ones among
        ``keys`` (a batch read: an import checks whose identities its rows would take)."""
        out: dict[str, str] = {}
        for k in keys:
            kind, _, value = k.partition(":")
            loc = self.lookup(kind, value)
            if loc is not None:
                out[k] = loc.customer_id
        return out

    @abc.abstractmethod
    def group_members(self, groups: Iterable[str]) -> dict[str, list[str]]:
        """group name -> the stored customers in it, for the groups among ``groups`` that
        have members (a batch read: an import checks that a group stays on one system)."""

    def decide(self, kind: str, value: str) -> Decision:
        """lookup() with the `store.unknown` policy applied."""
        loc = self.lookup(kind, value)
        if loc is None:
            return Decision(self.unknown, "", "active", f"{kind}:{value} unknown -> store.unknown={self.unknown}")
        return Decision(loc.system, loc.customer_id, loc.state, f"{kind}:{value} -> customer {loc.customer_id}")

    # -- change feed ---------------------------------------------------------------------

    @abc.abstractmethod
    def refresh(self) -> list[str]:
        """Apply changes committed by any process since the last call; return the changed customer ids.

        Cheap when nothing changed (one small query); the runner calls it every
        `store.poll_interval` seconds."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """False while the backing store cannot be reached (dispatching goes on from memory)."""

    # -- writes ---------------------------------------------------------------------------

    @abc.abstractmethod
    def put_customer(
        self, customer_id: str, identities: Iterable[str], system: str = "source", group: str = ""
    ) -> None:
        """Create or replace a customer and its identities ("kind:value", normalised here)."""

    @abc.abstractmethod
    def import_rows(
        self, rows: Iterable[dict[str, object] | CustomerRow], progress: Callable[[int], None] | None = None
    ) -> int:
        """Bulk put_customer; rows have customer_id, identities (list or ';'-joined), system?, group?

        (or are CustomerRow already validated); returns the number of customers."""

    @abc.abstractmethod
    def lock(
        self, customer_ids: list[str], batch_id: str, force: bool = False, lease: float = LOCK_LEASE
    ) -> None:
        """Mark customers `locked` by `batch_id` (a batch in flight): dispatchers hold their
        new requests.  Atomic with its check: if another batch holds one of them locked,
        LockedByBatch and nothing changes (``force`` takes them over).  The batch's locks
        last `lease` seconds from now (each lock call renews them): a migration killed
        before it unlocked leaves nothing locked longer (`release_expired_locks`)."""

    @abc.abstractmethod
    def locks(self) -> list[tuple[str, int, float]]:
        """The batches holding customers locked now: (batch id, customers, lease end), the
        oldest lease first (`dsbc status`)."""

    @abc.abstractmethod
    def release_expired_locks(self, now: float | None = None) -> dict[str, int]:
        """Unlock, where they are, the customers of batches whose lease ran out (their
        migration died: SIGKILL, a crashed node); batch id -> customers released."""

    def unlock(self, customer_ids: list[str], batch_id: str | None = None) -> None:
        """Clear `locked` without moving anyone (a batch that was aborted before its flip);
        with `batch_id`, only the customers that batch holds (not another batch's)."""
        by_system: dict[str, list[str]] = {}
        for cid, c in self.customers(customer_ids).items():
            if c.state == "locked" and (batch_id is None or c.batch_id == batch_id):
                by_system.setdefault(c.system, []).append(cid)
        for system, ids in by_system.items():
            self.migrate(ids, system, who="unlock")  # already on `system`: only the state changes

    @abc.abstractmethod
    def migrate(
        self,
        customer_ids: list[str],
        to: str,
        who: str = "cli",
        batch_id: str | None = None,
        dry_run: bool = False,
    ) -> MigrationResult:
        """Flip customers to `to` atomically (system=to, state=active), audit it, enforce groups.

        Customers already on `to` are reported as `already` (and unlocked if they were
        locked); unknown ids are reported, not fatal.  GroupSplitError changes nothing."""

    @abc.abstractmethod
    def rollback(self, batch_id: str, who: str = "cli") -> MigrationResult:
        """Move the customers of a batch back to the system they came from."""

    @abc.abstractmethod
    def prepare(self, customer_ids: list[str], expires: int) -> None:
        """Cap the registration expiry granted to these customers' phones (0 clears it)."""

    @abc.abstractmethod
    def audit(self, batch_id: str | None = None, limit: int = 1000) -> list[AuditEntry]:
        ...

    def batches(self, limit: int = 10) -> list[BatchSummary]:
        """The most recent batches, newest first (from the audit log)."""
        seen: dict[str, BatchSummary] = {}
        for e in reversed(self.audit(limit=100_000)):
            b = seen.get(e.batch_id)
            if b is None:
                if len(seen) == limit:
                    break
                seen[e.batch_id] = BatchSummary(e.batch_id, e.ts, e.who, e.from_system, e.to_system, 1, e.note)
            else:
                b.customers += 1
                b.ts = e.ts
        return list(seen.values())

    # -- registrations (SIP) ---------------------------------------------------------------

    @abc.abstractmethod
    def record_registrations(self, regs: list[Registration]) -> None:
        """Upsert by (account, contact); expires_at <= now removes."""

    @abc.abstractmethod
    def registrations(self, customer_ids: list[str] | None = None) -> list[Registration]:
        ...

    # -- API sessions -----------------------------------------------------------------------

    @abc.abstractmethod
    def put_session(self, session: ApiSession) -> None:
        ...

    @abc.abstractmethod
    def get_session(self, key: str) -> ApiSession | None:
        """Memory first, then the backing store (a session made by another node a moment ago)."""

    @abc.abstractmethod
    def delete_session(self, key: str) -> None:
        ...

    # -- misc ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None:
        ...

    @abc.abstractmethod
    def set_meta(self, key: str, value: str, only_if_absent: bool = False) -> str:
        """Set and return the value (with only_if_absent, the value that won)."""

    @abc.abstractmethod
    def meta_keys(self, prefix: str) -> list[str]:
        """The meta keys that start with ``prefix`` (other nodes' saved pins)."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """customers per system and state, identities, registrations: for `dsbc status`."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
