"""The in-memory location index that every store kind (SQLite, Redis) keeps in front of its
backing store.

Hot path: ``lookup(kind, value)`` is one string build and one dict probe, and returns a
`Location` that already exists (one per customer, shared by all its identities), so a
lookup allocates nothing but the key.

Perf note (CPython 3.11, 2-vCPU x86-64 VM; tests/test_store_memory.py has the benchmark
and the 1M-identity RSS check):
- ``lookup`` takes ~0.2 us with 100,000 identities.  With 1,000,000 identities and random
  keys the median is 0.5-0.6 us on an idle VM (~1 us while the VM is busy): a hit costs
  3-4 cache misses (the dict slot, its entry, the key string holding the hash, the
  Location), which is the floor of any CPython dict that size -- a bare ``dict`` of 1M
  str keys measures the same.  Nothing here is worth more than that.
- RSS for 1,000,000 identities held by 250,000 customers (4 each): 185 MB, i.e. ~110
  bytes per identity (key string ~64, dict slot ~40, slot in the customer's tuple 8)
  plus ~300 bytes per customer (record, Location, id string, tuple header, dict slot).
  1,000,000 customers with one identity each: 365 MB.
- What keeps it small: the identity key string is stored once and shared by the index
  dict and the customer's ``identities`` tuple; customer ids are shared by the customer
  record, its Location and the index (no per-identity copy); ``system`` / ``state``
  strings are canonicalised (SQLite hands out a fresh str per row, 1M copies of
  "source" would cost 50 MB); groups and batch ids are shared per load; records are
  ``gc=False`` msgspec Structs (no GC header, never scanned by the collector); the
  loader streams joined rows instead of building per-customer lists first (which
  doubled the peak RSS).
- Loading 1M identities from SQLite (`SqliteStore` open or full reload): 2-3 s.
"""

from __future__ import annotations

import abc
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import msgspec

from .base import (
    KINDS,
    SYSTEMS,
    BadIdentity,
    Customer,
    CustomerRow,
    Location,
    LocationStore,
    MigrationResult,
    StoreError,
    parse_identity,
)

STATES: tuple[str, str] = ("active", "locked")
UNKNOWN_POLICIES: tuple[str, str, str] = ("source", "target", "reject")

# One object per distinct system / state value, whatever the backing store hands out.
_CANON: dict[str, str] = {s: s for s in SYSTEMS + STATES}


def canon(text: str) -> str:
    """The shared str object for a system or state name (unknown text is returned as is)."""
    return _CANON.get(text, text)


class BadRow(StoreError):
    """A customer row (import file, control API body) that cannot be stored; str() says why."""


def normalise_keys(identities: Iterable[str] | str) -> tuple[str, ...]:
    """``"did:+1 555 0100; account:alice"`` (or a list) -> normalised, de-duplicated keys."""
    items = identities.split(";") if isinstance(identities, str) else identities
    keys: dict[str, None] = {}
    for item in items:
        if not isinstance(item, str):
            raise BadIdentity(f"identity {item!r} is not a KIND:VALUE string")
        if not item.strip():
            continue
        kind, value = parse_identity(item)
        odd = _odd_char(value)
        if odd:
            raise BadIdentity(f"{kind}:{value!r} has {odd}")
        if _GLUED.search(value):
            raise BadIdentity(f"{kind}:{value!r} looks like several identities: separate them with ';'")
        if kind == "account" and any(ch.isspace() for ch in value):
            raise BadIdentity(f"account:{value!r} has a space (a SIP user has none; "
                              "identities are separated by ';')")
        keys[f"{kind}:{value}"] = None
    return tuple(keys)


#: another identity glued to a value by a space, comma or bar ("account:a8,did:18"): no
#: phone or API call would ever send that value, the customer's traffic would fall to
#: store.unknown without a word
_GLUED = re.compile(rf"[\s,|]\s*(?:{'|'.join(KINDS)}):", re.IGNORECASE)


def _odd_char(text: str) -> str:
    """What makes ``text`` unusable as an id or identity ("" if nothing): a C0/C1 control
    character or DEL (an identity pasted with one would never match what a phone or an API
    call sends, and would print garbage in `dsbc where`), or a lone surrogate (a JSON
    ``"\\ud800"``: not text, no store can write it)."""
    for ch in text:
        o = ord(ch)
        if o < 32 or 127 <= o < 160:
            return "a control character"
        if 0xD800 <= o < 0xE000:
            return "a lone surrogate (not text)"
    return ""


def clean_row(row: dict[str, object]) -> CustomerRow:
    """Validate one customer row (customer_id, identities, system?, group?); BadRow if unusable."""
    unknown = set(row) - {"customer_id", "identities", "system", "group"}
    if unknown:
        raise BadRow(
            f"unknown field(s) {', '.join(sorted(unknown))} "
            "(expected customer_id, identities, system, group)"
        )
    cid = row.get("customer_id")
    if isinstance(cid, int) and not isinstance(cid, bool):
        cid = str(cid)
    if not isinstance(cid, str) or not cid.strip():
        raise BadRow(f"customer_id: {cid!r} is not a customer id")
    cid = cid.strip()
    if any(ch.isspace() for ch in cid) or _odd_char(cid) or len(cid) > 128:
        raise BadRow(
            f"customer_id: {cid!r} is not a customer id (no spaces or control characters, at most 128 characters)"
        )
    ids = row.get("identities", ())
    if ids is None:
        ids = ()
    if not isinstance(ids, (str, list, tuple)):
        raise BadRow(f"identities: expected a list or a ';'-separated string, got {ids!r}")
    try:
        keys = normalise_keys(ids)
    except BadIdentity as exc:
        raise BadRow(str(exc)) from None
    system = row.get("system")
    if system in (None, ""):
        system = None
    elif not isinstance(system, str) or system.strip().lower() not in SYSTEMS:
        raise BadRow(f"system: {system!r} is not source or target")
    else:
        system = canon(system.strip().lower())
    group = row.get("group") or ""
    if not isinstance(group, (str, int)) or isinstance(group, bool) or _odd_char(str(group)):
        raise BadRow(f"group: {group!r} is not a group name")
    return CustomerRow(cid, keys, system, str(group).strip())


def unique_keys(rows: Iterable[CustomerRow]) -> list[str]:
    """The identity keys of `rows`, in order; StoreError if two customers are given the same one."""
    seen: dict[str, str] = {}
    for r in rows:
        for key in r.identities:
            other = seen.setdefault(key, r.customer_id)
            if other != r.customer_id:
                raise StoreError(f"{key} is given to both customer {other} and customer {r.customer_id}")
    return list(seen)


def new_batch_id(now: float | None = None) -> str:
    """A short readable unique batch id such as ``b-20261202-055012-3f2a`` (UTC)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"b-{stamp}-{secrets.token_hex(2)}"


class MemoryIndex:
    """identity key ("kind:value") -> Location, and customer id -> Customer.

    Not thread-safe for writers; readers on the same thread (the asyncio loop) always
    see a consistent record because each customer is replaced, never edited in place.
    """

    __slots__ = ("_by_key", "_customers")

    def __init__(self) -> None:
        self._by_key: dict[str, Location] = {}
        self._customers: dict[str, Customer] = {}

    # -- hot path ---------------------------------------------------------------------

    def lookup(self, kind: str, value: str) -> Location | None:
        return self._by_key.get(f"{kind}:{value}")

    def lookup_key(self, key: str) -> Location | None:
        """lookup() for a caller that already holds the "kind:value" key."""
        return self._by_key.get(key)

    def owner(self, key: str) -> str | None:
        loc = self._by_key.get(key)
        return None if loc is None else loc.customer_id

    def customer(self, customer_id: str) -> Customer | None:
        return self._customers.get(customer_id)

    # -- sizes ------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of identities."""
        return len(self._by_key)

    @property
    def customer_count(self) -> int:
        return len(self._customers)

    def customers(self) -> Iterator[Customer]:
        return iter(self._customers.values())

    # -- updates ----------------------------------------------------------------------

    def put(self, customer: Customer) -> None:
        """Add or replace a customer; an identity owned by another customer moves to this one."""
        cid = customer.customer_id
        by_key = self._by_key
        old = self._customers.get(cid)
        if old is not None:
            keep = set(customer.identities)
            for key in old.identities:
                if key not in keep:
                    cur = by_key.get(key)
                    if cur is not None and cur.customer_id == cid:
                        del by_key[key]
        loc = Location(cid, canon(customer.system), canon(customer.state))
        for key in customer.identities:
            prev = by_key.get(key)
            if prev is not None and prev.customer_id != cid:
                self._drop_identity(prev.customer_id, key)
            by_key[key] = loc
        self._customers[cid] = customer

    def remove(self, customer_id: str) -> None:
        old = self._customers.pop(customer_id, None)
        if old is None:
            return
        for key in old.identities:
            cur = self._by_key.get(key)
            if cur is not None and cur.customer_id == customer_id:
                del self._by_key[key]

    def apply(self, ids: Iterable[str], fresh: dict[str, Customer]) -> None:
        """Bring the customers `ids` up to date: the ones in `fresh` are put, the others removed."""
        for cid in ids:
            c = fresh.get(cid)
            if c is None:
                self.remove(cid)
            else:
                self.put(c)

    def _drop_identity(self, customer_id: str, key: str) -> None:
        other = self._customers.get(customer_id)
        if other is not None:
            ids = tuple(k for k in other.identities if k != key)
            self._customers[customer_id] = msgspec.structs.replace(other, identities=ids)

    # -- bulk load --------------------------------------------------------------------

    @classmethod
    def build(cls, rows: Iterable[tuple[str, str, str, str, str, int, str | None]]) -> MemoryIndex:
        """A new index from joined rows (customer_id, system, state, group, batch_id,
        expires_cap, key or None), sorted by customer_id so that each customer's rows are
        consecutive.  Keys are unique (the backing store's primary key), so no ownership
        checks are needed: this is the fast path for loading a million identities, and it
        keeps no intermediate per-customer structures (they would double the peak RSS)."""
        idx = cls()
        by_key = idx._by_key
        custs = idx._customers
        shared: dict[str, str] = {}  # groups and batch ids repeat across customers: one copy each
        cur: str | None = None
        head: tuple[str, str, str, str, str, int, str | None] | None = None
        keys: list[str] = []

        def flush() -> None:
            assert head is not None
            cid, system, state, group, batch_id, cap, _ = head
            system, state = canon(system), canon(state)
            t = tuple(keys)
            custs[cid] = Customer(
                cid,
                system,
                state,
                shared.setdefault(group, group),
                shared.setdefault(batch_id, batch_id),
                cap or 0,
                t,
            )
            loc = Location(cid, system, state)
            for key in t:
                by_key[key] = loc

        for row in rows:
            if row[0] != cur:
                if head is not None:
                    flush()
                cur, head = row[0], row
                keys = []
            if row[6] is not None:
                keys.append(row[6])
        if head is not None:
            flush()
        return idx


class IndexedStore(LocationStore):
    """What every store kind (SQLite, Redis) does the same way around its `MemoryIndex`:
    reads from memory once the index is loaded (from the backing store before, or with
    ``load=False``), and row validation for imports.  Subclasses read and write their
    backing store."""

    _mem: MemoryIndex | None = None

    # -- the index --------------------------------------------------------------------

    def _install(self, mem: MemoryIndex) -> list[str]:
        """Swap in a complete new index; every customer id it holds."""
        self._mem = mem
        # perf: the hot path calls the index's bound method directly, one frame less than
        # going through IndexedStore.lookup (about 60 ns of the ~200 ns of a cached lookup)
        self.lookup = mem.lookup  # type: ignore[method-assign]
        return [c.customer_id for c in mem.customers()]

    # -- reads --------------------------------------------------------------------------

    def lookup(self, kind: str, value: str) -> Location | None:
        """From memory (once loaded, the instance attribute set by `_install` answers);
        without a loaded index, from the backing store."""
        mem = self._mem
        if mem is not None:
            return mem.lookup(kind, value)
        c = self._direct_owner(f"{kind}:{value}")
        return None if c is None else Location(c.customer_id, c.system, c.state)

    def customer(self, customer_id: str) -> Customer | None:
        mem = self._mem
        if mem is not None:
            return mem.customer(customer_id)
        return self.customers([customer_id]).get(customer_id)

    def customers(self, customer_ids: Iterable[str]) -> dict[str, Customer]:
        ids = list(dict.fromkeys(customer_ids))
        mem = self._mem
        if mem is not None:
            return {cid: c for cid in ids if (c := mem.customer(cid)) is not None}
        return self._read_customers(ids)

    def owners_of(self, keys: Iterable[str]) -> dict[str, str]:
        mem = self._mem
        if mem is not None:
            return {k: cid for k in keys if (cid := mem.owner(k))}
        return self._direct_owners(list(dict.fromkeys(keys)))

    @abc.abstractmethod
    def _direct_owners(self, keys: Sequence[str]) -> dict[str, str]:
        """`owners_of` from the backing store, read in batches."""

    def group_members(self, groups: Iterable[str]) -> dict[str, list[str]]:
        wanted = [g for g in dict.fromkeys(groups) if g]
        return self._direct_group_members(wanted) if wanted else {}

    @abc.abstractmethod
    def _direct_group_members(self, groups: Sequence[str]) -> dict[str, list[str]]:
        """`group_members` from the backing store (the memory index keeps no group lists)."""

    def _owner_id(self, key: str) -> str:
        if self._mem is not None:
            return self._mem.owner(key) or ""
        c = self._direct_owner(key)
        return "" if c is None else c.customer_id

    @abc.abstractmethod
    def _read_customers(self, ids: Sequence[str]) -> dict[str, Customer]:
        """The known customers among `ids`, from the backing store (no index loaded)."""

    @abc.abstractmethod
    def _direct_owner(self, key: str) -> Customer | None:
        """The customer owning identity `key`, from the backing store (no index loaded)."""

    # -- customers ----------------------------------------------------------------------

    def put_customer(
        self, customer_id: str, identities: Iterable[str], system: str = "source", group: str = ""
    ) -> None:
        row = clean_row(
            {
                "customer_id": customer_id,
                "identities": list(identities),
                "system": system,
                "group": group,
            }
        )
        self._import([row], None)

    def import_rows(
        self,
        rows: Iterable[dict[str, object] | CustomerRow],
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Bulk put_customer.  A row without `system` keeps a stored customer's system (a
        re-import never undoes a migration); new customers start on source."""
        clean: list[CustomerRow] = []
        for i, row in enumerate(rows, 1):
            try:
                clean.append(row if isinstance(row, CustomerRow) else clean_row(row))
            except StoreError as exc:
                raise type(exc)(f"row {i}: {exc}") from None
        return self._import(clean, progress)

    @abc.abstractmethod
    def _import(self, rows: list[CustomerRow], progress: Callable[[int], None] | None) -> int:
        """Write validated rows (`unique_keys` checks them first); the number of customers."""

    # -- migrations ---------------------------------------------------------------------

    def migrate(
        self,
        customer_ids: list[str],
        to: str,
        who: str = "cli",
        batch_id: str | None = None,
        dry_run: bool = False,
    ) -> MigrationResult:
        if to not in SYSTEMS:
            raise StoreError(f"cannot migrate to {to!r}: one of {', '.join(SYSTEMS)}")
        return self._migrate(list(dict.fromkeys(customer_ids)), to, who, batch_id, dry_run)

    @abc.abstractmethod
    def _migrate(
        self, ids: list[str], to: str, who: str, batch_id: str | None, dry_run: bool
    ) -> MigrationResult:
        """migrate() with `to` checked and `ids` de-duplicated."""
