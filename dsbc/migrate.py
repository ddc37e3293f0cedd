"""Operator-side migration logic, shared by the CLI and the control API.

- reading import files (CSV, JSON lines, a JSON array) and batch files, with errors
  that name ``file:line``;
- moving a batch: check the whole batch first (group rule, unknown ids), then lock and
  flip it chunk by chunk, never splitting a group across chunks; unlock on failure;
- counting the batch's phones registered on the new system, and waiting for them;
- a plain-text progress bar and the one-line summary.

Nothing here prints: output goes to the stream the caller passes.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from .store import (
    BadRow,
    Customer,
    CustomerRow,
    LocationStore,
    MigrationResult,
    StoreError,
    clean_row,
    new_batch_id,
)

COLUMNS = ("customer_id", "identities", "system", "group")
ALIASES = {"i_customer": "customer_id", "identity": "identities"}


class InputError(ValueError):
    """An operator file or value that cannot be used; str() is ``file:line: reason``."""


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


# --- import files -------------------------------------------------------------------------


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text") from None


def file_format(path: str, text: str) -> str:
    """ "csv", "jsonl" or "json" (an array): by extension, else by the first character."""
    suffix = Path(path).suffix.lower()
    first = text.lstrip()[:1]
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json" if first == "[" else "jsonl"
    return {"{": "jsonl", "[": "json"}.get(first, "csv")


def _csv_rows(name: str, text: str) -> Iterator[tuple[int, dict[str, object]]]:
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    try:
        for fields in reader:
            line = reader.line_num
            if (
                not fields
                or not any(f.strip() for f in fields)
                or fields[0].lstrip().startswith("#")
            ):
                continue
            if header is None:
                header = [ALIASES.get(h.strip().lower(), h.strip().lower()) for h in fields]
                for h in header:
                    if h not in COLUMNS:
                        raise InputError(
                            f"{name}:{line}: unknown column {h!r} (expected {', '.join(COLUMNS)})"
                        )
                for need in ("customer_id", "identities"):
                    if need not in header:
                        raise InputError(
                            f"{name}:{line}: the header has no {need!r} column "
                            f"(expected {', '.join(COLUMNS)})"
                        )
                continue
            if len(fields) != len(header):
                raise InputError(
                    f"{name}:{line}: {len(fields)} fields, the header has {len(header)}"
                )
            yield line, {h: f.strip() for h, f in zip(header, fields)}
    except csv.Error as exc:
        raise InputError(f"{name}:{reader.line_num}: {exc}") from None
    if header is None:
        raise InputError(f"{name}: empty file (expected a header: {', '.join(COLUMNS)})")


def _jsonl_rows(name: str, text: str) -> Iterator[tuple[int, object]]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{line}: not JSON: {exc.msg}") from None


def _json_array_rows(name: str, text: str) -> Iterator[tuple[int, object]]:
    """The items of a JSON array, each with the line it starts on."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = " \t\r\n"
    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            item, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{exc.lineno}: not JSON: {exc.msg}") from None
        yield line, item
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise InputError(f"{name}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']'")


def read_customers(path: str, lines: dict[str, int] | None = None) -> list[CustomerRow]:
    """Every row of an import file, validated; the first bad row raises InputError (file:line).
    ``lines`` (if given) gets the line of each customer id."""
    text = read_text(path)
    fmt = file_format(path, text)
    items = {"csv": _csv_rows, "jsonl": _jsonl_rows, "json": _json_array_rows}[fmt](path, text)
    rows: list[CustomerRow] = []
    line_of: dict[str, int] = {}
    owner: dict[str, tuple[str, int]] = {}
    for line, item in items:
        if not isinstance(item, dict):
            raise InputError(f"{path}:{line}: expected an object with customer_id and identities")
        try:
            row = clean_row(item)
        except BadRow as exc:
            raise InputError(f"{path}:{line}: {exc}") from None
        if row.customer_id in line_of:
            raise InputError(
                f"{path}:{line}: customer {row.customer_id} is already on line "
                f"{line_of[row.customer_id]}"
            )
        line_of[row.customer_id] = line
        for key in row.identities:
            other = owner.setdefault(key, (row.customer_id, line))
            if other[0] != row.customer_id:
                raise InputError(
                    f"{path}:{line}: {key} already belongs to customer {other[0]} (line {other[1]})"
                )
        rows.append(row)
    if lines is not None:
        lines.update(line_of)
    return rows


def system_changes(store: LocationStore, rows: list[CustomerRow]) -> list[tuple[CustomerRow, str]]:
    """Rows that would put a stored customer on another system, with its stored system: an
    import or a PUT is no migration (no audit entry, no group check), so these are refused
    and the operator is pointed to `dsbc migrate`."""
    out: list[tuple[CustomerRow, str]] = []
    for row in rows:
        if row.system is None:
            continue
        c = store.customer(row.customer_id)
        if c is not None and c.system != row.system:
            out.append((row, c.system))
    return out


def identity_takeovers(store: LocationStore, rows: list[CustomerRow]) -> list[tuple[CustomerRow, str, str]]:
    """(row, identity key, its stored owner) for each identity a row would take from a
    stored customer that is not itself among ``rows``: an import or a PUT replaces a
    customer's identities, so taking one silently re-homes another customer's live
    account (to another system, if it lives elsewhere).  Moving an identity between
    customers is done by giving both rows in one file."""
    ids = {r.customer_id for r in rows}
    owners = store.owners_of(k for r in rows for k in r.identities)
    out: list[tuple[CustomerRow, str, str]] = []
    for r in rows:
        for k in r.identities:
            other = owners.get(k)
            if other and other != r.customer_id and other not in ids:
                out.append((r, k, other))
    return out


def group_splits(store: LocationStore, rows: list[CustomerRow]) -> list[tuple[CustomerRow, dict[str, list[str]]]]:
    """(a row of the group, system -> members) for each group that ``rows`` would leave on
    both systems, counting the group's stored members the rows do not name: a group moves
    together (SPEC: an IVR's access number), so an import or a PUT may not split one."""
    named = {r.customer_id: r for r in rows}
    groups = {r.group for r in rows if r.group}
    if not groups:
        return []
    stored_members = store.group_members(groups)
    others = {cid for ms in stored_members.values() for cid in ms if cid not in named}
    stored = store.customers([*(r.customer_id for r in rows if r.group), *others])
    members: dict[str, dict[str, str]] = {g: {} for g in groups}  # group -> customer -> system
    for g, ms in stored_members.items():
        for cid in ms:
            if cid not in named and cid in stored:
                members[g][cid] = stored[cid].system
    for r in rows:
        if r.group:
            known = stored.get(r.customer_id)
            members[r.group][r.customer_id] = r.system or (known.system if known else "source")
    out: list[tuple[CustomerRow, dict[str, list[str]]]] = []
    for r in rows:
        where = members.pop(r.group, None) if r.group else None
        if where and len(set(where.values())) > 1:
            by_system: dict[str, list[str]] = {}
            for cid, system in sorted(where.items()):
                by_system.setdefault(system, []).append(cid)
            out.append((r, by_system))
    return out


def group_split_text(group: str, by_system: dict[str, list[str]]) -> str:
    where = "; ".join(f"{some(ids, 5)} on {system}" for system, ids in sorted(by_system.items()))
    return (f"group {group!r} would be split ({where}): its members move together, with "
            "`dsbc migrate` (or name the group's members on one system)")


def import_refusal(store: LocationStore, rows: list[CustomerRow]) -> tuple[CustomerRow, str, int] | None:
    """Why an import or a PUT of ``rows`` must change nothing: (the first offending row, the
    reason, how many such findings), or None.  It may not take a stored customer's identity,
    move a stored customer to the other system, or split a group."""
    taken = identity_takeovers(store, rows)
    if taken:
        row, key, other = taken[0]
        return row, f"customer {row.customer_id}: {takeover_text(key, other)}", len(taken)
    changes = system_changes(store, rows)
    if changes:
        row, stored = changes[0]
        return row, system_change_text(row, stored), len(changes)
    splits = group_splits(store, rows)
    if splits:
        row, by_system = splits[0]
        return row, group_split_text(row.group, by_system), len(splits)
    return None


def takeover_text(key: str, other: str) -> str:
    return (f"{key} belongs to customer {other}: to move it, give customer {other}'s row "
            f"without it in the same import (or PUT customer {other} without it first)")


def system_change_text(row: CustomerRow, stored: str) -> str:
    return (f"customer {row.customer_id} is on {stored}, not {row.system}: move it with "
            f"`dsbc migrate --customer {row.customer_id} --to {row.system}` (audited, groups "
            "checked), or leave system out to keep it where it is")


# --- batch files --------------------------------------------------------------------------


def check_customer_id(cid: str, where: str) -> str:
    cid = cid.strip()
    if not cid or any(ch.isspace() for ch in cid) or len(cid) > 128:
        raise InputError(f"{where}: {cid!r} is not a customer id")
    return cid


def read_batch(path: str) -> list[str]:
    """Customer ids, one per line (``#`` comments), or a CSV file with a customer_id column."""
    text = read_text(path)
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    header = [ALIASES.get(h.strip().lower(), h.strip().lower()) for h in first.split(",")]
    ids: dict[str, None] = {}
    if "," in first or header == ["customer_id"]:
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


def move_batch(
    store: LocationStore,
    ids: list[str],
    to: str,
    *,
    who: str = "cli",
    batch_size: int = 500,
    lock_for: float = 0.0,
    progress: Callable[[int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> MigrationResult:
    """Check the whole batch (GroupSplitError: nothing changes), then lock and flip it in
    chunks under one batch id.  With `lock_for`, the whole batch is locked first and the
    flip waits that long (the operator's data-copy window).  If anything fails or is
    interrupted, the customers locked and not yet flipped are unlocked again, and if some
    chunks were already flipped, BatchAborted says so."""
    check = store.migrate(ids, to, who=who, dry_run=True)
    unknown = set(check.unknown)
    known = [cid for cid in ids if cid not in unknown]
    to_lock = set(check.moved)
    chunks = plan_chunks(known, store.customers(known), max(1, batch_size))
    batch_id = new_batch_id()
    while store.audit(batch_id, limit=1):
        batch_id = new_batch_id()
    total = MigrationResult(batch_id, to, unknown=list(check.unknown))
    locked: set[str] = set()
    try:
        if lock_for > 0:
            for chunk in chunks:
                part = [cid for cid in chunk if cid in to_lock]
                store.lock(part, batch_id)
                locked.update(part)
            sleep(lock_for)
        for chunk in chunks:
            part = [cid for cid in chunk if cid in to_lock and cid not in locked]
            if part:
                store.lock(part, batch_id)
                locked.update(part)
            r = store.migrate(chunk, to, who=who, batch_id=batch_id)
            locked.difference_update(chunk)
            total.moved += r.moved
            total.already += r.already
            total.unknown += r.unknown
            if progress is not None:
                progress(len(total.moved) + len(total.already))
    except (Exception, KeyboardInterrupt) as exc:
        if locked:
            try:
                store.unlock(sorted(locked))
            except StoreError:
                pass  # the original error says more; `dsbc migrate` again unlocks them
        if total.moved:
            raise BatchAborted(str(exc) or "interrupted", total) from exc
        raise
    return total


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
    on: dict[str, int] = {}
    for reg in store.registrations(ids):
        if reg.system == system:
            on[reg.account] = on.get(reg.account, 0) + 1
    return sum(min(on.get(account, 0), n) for account, n in expected.items())


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
) -> int:
    """Poll until every expected phone is registered on `system` or `timeout` passes; the count."""
    want = sum(expected.values())
    deadline = clock() + timeout
    while True:
        done = phones_on(store, ids, system, expected)
        if progress is not None:
            progress(done)
        if done >= want or clock() >= deadline:
            return done
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


def some(ids: list[str], limit: int = 20) -> str:
    """``1, 2, 3`` or ``1, 2, ... (120 in all)``."""
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown}, ... ({len(ids)} in all)"
