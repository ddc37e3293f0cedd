"""Operator-side migration logic, shared by the CLI and the control API.

- reading batch files (customer ids, one per line, or a CSV with ``customer_id``), with
  errors that name ``file:line``;
- moving a batch: check the whole batch first (group rule, unknown ids), then lock and
  flip it chunk by chunk, never splitting a group across chunks; unlock on failure;
- counting the batch's phones registered on the new system, and waiting for them;
- a plain-text progress bar and the one-line summary.

Import files and the checks on an import are in `dsbc.imports`.  Nothing here prints:
output goes to the stream the caller passes.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, TextIO

from .imports import ALIASES, InputError, file_format, json_items, read_text
from .store import (
    LOCK_LEASE,
    BatchCancelled,
    Customer,
    LocationStore,
    LockedByBatch,
    MigrationResult,
    StoreError,
    StoreUnavailable,
    new_batch_id,
    some,
)


class BatchAborted(StoreError):
    """A batch stopped part-way (a store failure, Ctrl-C) after some chunks were flipped;
    `result` holds what moved, and str() says how to undo it."""

    def __init__(self, cause: str, result: MigrationResult) -> None:
        self.result = result
        bid = result.batch_id
        super().__init__(
            f"{cause}; {len(result.moved)} customer(s) had already moved to {result.to} in batch "
            f"{bid} (dsbc rollback {bid} moves them back; dsbc migrate again finishes the batch)"
        )


class MigrationInterrupted(StoreError):
    """A running node stops (SIGTERM, a reload) during a batch's lock window: the batch is
    interrupted there (its customers unlocked by `move_batch`), not left to the process exit."""


class StopAwareSleep:
    """`move_batch`'s sleep in a node: once `stop` is set, the sleep under way (a lock window)
    ends at once with MigrationInterrupted, a single time; later ones (the unlock retries that
    follow) sleep as usual."""

    def __init__(self, stop: threading.Event, why: str) -> None:
        self.stop, self.why, self.fired = stop, why, False

    def __call__(self, seconds: float) -> None:
        if self.fired:
            time.sleep(seconds)
        elif self.stop.wait(seconds):
            self.fired = True
            raise MigrationInterrupted(self.why)


# --- batch files --------------------------------------------------------------------------


def check_customer_id(cid: str, where: str) -> str:
    cid = cid.strip()
    if not cid or any(ch.isspace() for ch in cid) or len(cid) > 128:
        raise InputError(f"{where}: {cid!r} is not a customer id")
    return cid


def read_batch(path: str) -> list[str]:
    """Customer ids, one per line (``#`` comments), a CSV file with a customer_id column,
    or JSON (lines or an array) of objects with a customer_id: an import file will do."""
    text = read_text(path)
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    header = [ALIASES.get(h.strip().lower(), h.strip().lower()) for h in first.split(",")]
    ids: dict[str, None] = {}
    if first.lstrip()[:1] in ("{", "["):
        for line, item in json_items(path, text, file_format(path, text)):
            cid = item.get("customer_id") if isinstance(item, dict) else None
            if isinstance(cid, int) and not isinstance(cid, bool):
                cid = str(cid)
            if not isinstance(cid, str):
                raise InputError(f"{path}:{line}: expected an object with a customer_id")
            ids[check_customer_id(cid, f"{path}:{line}")] = None
    elif ";" in first and "," not in first and "customer_id" in first.lower():
        raise InputError(f"{path}:{lines.index(first) + 1}: the columns are separated by ';': a CSV "
                         "batch file is separated by commas (or give customer ids one per line)")
    elif "," in first or header == ["customer_id"]:
        if "customer_id" not in header:
            raise InputError(
                f"{path}:{lines.index(first) + 1}: a CSV batch file needs a customer_id column"
            )
        col = header.index("customer_id")
        reader = csv.reader(io.StringIO(text))
        seen_header = False
        for fields in reader:
            if (
                not fields
                or not any(f.strip() for f in fields)
                or fields[0].lstrip().startswith("#")
            ):
                continue
            if not seen_header:
                seen_header = True
                continue
            if col >= len(fields):
                raise InputError(f"{path}:{reader.line_num}: no customer_id field")
            ids[check_customer_id(fields[col], f"{path}:{reader.line_num}")] = None
    else:
        for n, ln in enumerate(lines, 1):
            ln = ln.split("#", 1)[0]
            if ln.strip():
                ids[check_customer_id(ln, f"{path}:{n}")] = None
    if not ids:
        raise InputError(f"{path}: no customer ids")
    return list(ids)


# --- progress -----------------------------------------------------------------------------


class Progress:
    """``label [#########...........] 1500/3000`` redrawn in place; silent unless enabled."""

    def __init__(
        self, total: int, label: str, stream: TextIO, enabled: bool, width: int = 30
    ) -> None:
        self.total, self.label, self.stream, self.enabled, self.width = (
            total,
            label,
            stream,
            enabled,
            width,
        )
        self.done = 0
        self._shown = False

    def __call__(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        filled = self.width * done // self.total if self.total else self.width
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}"
        )
        self.stream.flush()
        self._shown = True

    def resize(self, total: int) -> None:
        """The total changed (phones no longer waited for): redrawn at the next step."""
        self.total = total

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


# --- moving a batch -----------------------------------------------------------------------


def plan_chunks(ids: list[str], customers: dict[str, Customer], size: int) -> list[list[str]]:
    """Chunks of about `size` ids in the given order; a group's members always share a chunk."""
    units: list[list[str]] = []
    groups: dict[str, list[str]] = {}
    for cid in ids:
        c = customers.get(cid)
        group = c.group if c is not None else ""
        if not group:
            units.append([cid])
        elif group in groups:
            groups[group].append(cid)
        else:
            groups[group] = [cid]
            units.append(groups[group])
    chunks: list[list[str]] = []
    cur: list[str] = []
    for unit in units:
        if cur and len(cur) + len(unit) > size:
            chunks.append(cur)
            cur = []
        cur.extend(unit)
    if cur:
        chunks.append(cur)
    return chunks


def _held(customers: dict[str, Customer]) -> dict[str, str]:
    """Customer id -> the batch that holds it locked."""
    return {cid: c.batch_id for cid, c in customers.items() if c.state == "locked"}


def check_batch(store: LocationStore, ids: list[str], to: str, *, who: str = "cli",
                force: bool = False) -> MigrationResult:
    """What `move_batch` would do, changing nothing of the batch (a dry run): GroupSplitError
    and LockedByBatch as it would raise them.  Like the run, and any node, it first releases
    the locks of batches whose lease ran out (their migration died)."""
    store.release_expired_locks()  # what a dead migration left locked does not count
    check = store.migrate(ids, to, who=who, dry_run=True)
    held = _held(store.customers(check.moved + check.already))
    if held and not force:
        raise LockedByBatch(held)
    return check


def move_batch(
    store: LocationStore,
    ids: list[str],
    to: str,
    *,
    who: str = "cli",
    batch_size: int = 500,
    lock_for: float = 0.0,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    lease: float = LOCK_LEASE,
) -> MigrationResult:
    """Check the whole batch (GroupSplitError, LockedByBatch: nothing changes), then lock
    and flip it in chunks under one batch id.  With `lock_for`, the whole batch is locked
    first and the flip waits that long (the operator's data-copy window).  If anything
    fails or is interrupted, the customers locked and not yet flipped are unlocked again,
    and if some chunks were already flipped, BatchAborted says so.  ``force`` takes over
    customers another batch left locked.  Every lock call renews the batch's `lease`
    (store.lock_lease): if this process dies, its customers are released that long after."""
    store.release_expired_locks()  # what a dead migration left locked does not count
    check = store.migrate(ids, to, who=who, dry_run=True)
    unknown = set(check.unknown)
    known = [cid for cid in ids if cid not in unknown]
    to_lock = set(check.moved)
    customers = store.customers(known)
    held = _held(customers)
    if held and not force:
        raise LockedByBatch(held)
    stale = sorted(cid for cid in held if cid not in to_lock)
    if stale:  # forced: already on `to` but left locked by the other batch
        store.unlock(stale)
    chunks = plan_chunks(known, customers, max(1, batch_size))
    batch_id = new_batch_id()
    while store.audit(batch_id, limit=1):
        batch_id = new_batch_id()
    total = MigrationResult(batch_id, to, unknown=list(check.unknown))
    locked: set[str] = set()
    try:
        if lock_for > 0:
            for chunk in chunks:
                part = [cid for cid in chunk if cid in to_lock]
                # noted before the lock: an interrupt (SIGHUP, Ctrl-C) right after the store
                # committed it must still unlock them (unlocking one not locked changes nothing)
                locked.update(part)
                store.lock(part, batch_id, force=force, lease=lease)  # LockedByBatch: another won
            _hold(store, batch_id, lock_for, lease, sleep)
        for chunk in chunks:
            # again for the chunks locked above: renews the lease, and a batch stalled past it
            # (its locks released, perhaps taken by another batch) is refused, not flipped
            part = [cid for cid in chunk if cid in to_lock]
            if part:
                locked.update(part)
                store.lock(part, batch_id, force=force, lease=lease)
            r = store.migrate(chunk, to, who=who, batch_id=batch_id)
            locked.difference_update(chunk)
            total.moved += r.moved
            total.already += r.already
            total.unknown += r.unknown
            total.warning = r.warning or total.warning
            if progress is not None:
                progress(len(total.moved) + len(total.already))
    except (Exception, KeyboardInterrupt) as exc:
        # only what this batch holds: a lock refused (LockedByBatch) stays the other batch's
        left = _unlock(store, sorted(locked), batch_id, sleep) if locked else []
        if left:
            # the store went away: they would stay locked (SIP 503 after lock_hold) with
            # no word of it; say so, and how to unlock them where they are
            frm = "source" if to == "target" else "target"
            reason = (str(exc) or "interrupted").replace("; nothing was changed", "")
            note = (f"; customer(s) {some(left)} stay locked on {frm} (the store could not be "
                    f"reached to unlock them) until the batch's lease (store.lock_lease, {lease:g} s) "
                    f"runs out: dsbc migrate --force --to {frm} --customer ID ... unlocks them "
                    "where they are now")
            if total.moved:
                raise BatchAborted(reason + note, total) from exc
            raise StoreUnavailable(f"{reason}{note}") from exc
        if total.moved and not isinstance(exc, BatchCancelled):  # (the rollback undid those)
            raise BatchAborted(str(exc) or "interrupted", total) from exc
        raise
    return total


def _hold(store: LocationStore, batch_id: str, seconds: float, lease: float,
          sleep: Callable[[float], None]) -> None:
    """Wait out the lock window, renewing the batch's lease (a lock of no customer) as it goes."""
    step = lease / 3
    while seconds > 0:
        sleep(min(seconds, step))
        seconds -= step
        if seconds > 0:
            store.lock([], batch_id, lease=lease)


UNLOCK_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0)  # 15 s: a store restarted by its supervisor


def _unlock(
    store: LocationStore, ids: list[str], batch_id: str, sleep: Callable[[float], None]
) -> list[str]:
    """Unlock customers a failed batch locked, retrying while the store is away; the ids
    still locked when it gives up (none when it could)."""
    for pause in (0.0, *UNLOCK_RETRIES):
        if pause:
            sleep(pause)
        try:
            store.unlock(ids, batch_id)
            return []
        except StoreError:
            continue
    return ids


# --- registrations ------------------------------------------------------------------------


def phones_by_account(store: LocationStore, ids: list[str]) -> dict[str, int]:
    """Registered contacts per account of these customers, now (take it before the flip)."""
    phones: dict[str, int] = {}
    for reg in store.registrations(ids):
        phones[reg.account] = phones.get(reg.account, 0) + 1
    return phones


def phones_on(store: LocationStore, ids: list[str], system: str, expected: dict[str, int]) -> int:
    """How many of the `expected` phones are registered on `system` now.  Counted per
    account: a phone that re-registers from a new port or connection has a new contact."""
    return count_phones(store, ids, system, expected).on


class PhoneCount(NamedTuple):
    on: int  # of the expected phones, registered on the new system
    of: int  # the expected phones still registered somewhere (on the new system or not yet)


def count_phones(store: LocationStore, ids: list[str], system: str, expected: dict[str, int]) -> PhoneCount:
    """The expected phones registered on `system`, and how many are still to count: a
    phone whose binding on the old system expired without its registering again (switched
    off, unplugged) is no longer waited for."""
    on: dict[str, int] = {}
    live: dict[str, int] = {}
    for reg in store.registrations(ids):
        live[reg.account] = live.get(reg.account, 0) + 1
        if reg.system == system:
            on[reg.account] = on.get(reg.account, 0) + 1
    return PhoneCount(sum(min(on.get(account, 0), n) for account, n in expected.items()),
                      sum(min(live.get(account, 0), n) for account, n in expected.items()))


def wait_registrations(
    store: LocationStore,
    ids: list[str],
    system: str,
    expected: dict[str, int],
    timeout: float,
    progress: Callable[[int], None] | None = None,
    interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    resize: Callable[[int], None] | None = None,
) -> PhoneCount:
    """Poll until every expected phone still registered is registered on `system`, or
    `timeout` passes; the count (``of`` shrinks as the bindings of phones that are off expire
    on the old system: ``resize`` hears of it).  A store that does not answer (Redis
    restarting: the nodes keep the registrations they relay and write them when it is back)
    is asked again until then; raises its StoreUnavailable if it is still away at the end."""
    deadline = clock() + timeout
    count = PhoneCount(0, sum(expected.values()))
    while True:
        away: StoreUnavailable | None = None
        try:
            now = count_phones(store, ids, system, expected)
            if now.of != count.of and resize is not None:
                resize(now.of)
            count = now
        except StoreUnavailable as exc:
            away = exc
        if progress is not None:
            progress(count.on)
        if away is None and count.on >= count.of:
            return count
        if clock() >= deadline:
            if away is not None:
                raise away
            return count
        sleep(min(interval, max(0.0, deadline - clock())))


def longest_registration(store: LocationStore, ids: list[str], now: float | None = None) -> float:
    """Seconds until the batch's last current registration expires (0 if none)."""
    now = time.time() if now is None else now
    return max((r.expires_at - now for r in store.registrations(ids)), default=0.0)


# --- summaries ----------------------------------------------------------------------------


def summary(result: MigrationResult, phones: tuple[int, int] | None = None) -> str:
    """``moved 480, already on target 20, unknown 0; batch b-...; registered on target: 312/480
    phones`` (``would move ...`` for a dry run)."""
    verb = "would move" if result.dry_run else "moved"
    counts = f"already on {result.to} {len(result.already)}, unknown {len(result.unknown)}"
    parts = [f"{verb} {len(result.moved)}, {counts}"]
    if result.batch_id and not result.dry_run:
        # a batch that moved nobody is not in the audit log: `dsbc rollback` would not know it
        parts.append(f"batch {result.batch_id}" if result.moved else "no batch (nothing moved)")
    if phones is not None:
        parts.append(f"registered on {result.to}: {phones[0]}/{phones[1]} phones")
    return "; ".join(parts)
