"""Operator files in, and what an import may not do.

- reading import files (CSV, JSON lines, a JSON array) with errors that name
  ``file:line`` (`read_customers`; `read_text` for batch files too);
- the checks that make an import or a ``PUT /v1/customers`` change nothing
  (`import_refusal`): it may not take a stored customer's identity, move a stored
  customer to the other system (that is `dsbc migrate`, audited), or split a group.

Shared by the CLI and the control API; nothing here prints.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec

from .store import BadRow, CustomerRow, LocationStore, clean_row, some

COLUMNS = ("customer_id", "identities", "system", "group")
ALIASES = {"i_customer": "customer_id", "identity": "identities"}


class InputError(ValueError):
    """An operator file or value that cannot be used; str() is ``file:line: reason``."""


# --- import files -------------------------------------------------------------------------


def read_text(path: str) -> str:
    """The file's text; ``-`` reads standard input (``... | dsbc import -``)."""
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8-sig")
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
    # strict: a quote left open swallows the rest of the file into one field, a quote
    # closed mid-field glued what followed to it; both are errors at the row's first line
    reader = csv.reader(io.StringIO(text), strict=True)
    header: list[str] | None = None
    end = 0  # the last line of the row read before (a quoted field may span lines)
    try:
        for fields in reader:
            line, end = end + 1, reader.line_num
            if (
                not fields
                or not any(f.strip() for f in fields)
                or fields[0].lstrip().startswith("#")
            ):
                continue
            if header is None:
                header = [ALIASES.get(h.strip().lower(), h.strip().lower()) for h in fields]
                if len(fields) == 1 and ";" in fields[0]:  # a spreadsheet's "CSV" in some locales
                    raise InputError(f"{name}:{line}: the columns are separated by ';': dsbc reads "
                                     f"CSV separated by commas ({','.join(COLUMNS)}; identities "
                                     "inside a field are separated by ';')")
                for i, h in enumerate(header):
                    if h not in COLUMNS:
                        raise InputError(
                            f"{name}:{line}: unknown column {h!r} (expected {', '.join(COLUMNS)})"
                        )
                    if h in header[:i]:  # the last one would silently win
                        raise InputError(f"{name}:{line}: column {h!r} twice")
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
        why = "a quote opened here is never closed" if "end of data" in str(exc) else str(exc)
        raise InputError(f"{name}:{end + 1}: {why}") from None
    if header is None:
        raise InputError(f"{name}: no customers in the file (expected a header ({', '.join(COLUMNS)}) and rows)")


def _jsonl_rows(name: str, text: str) -> Iterator[tuple[int, object]]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{line}: not JSON: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number, [[[[... nested
            raise InputError(f"{name}:{line}: not usable JSON: {_json_trouble(exc)}") from None


def _json_trouble(exc: Exception) -> str:
    """Why valid-looking JSON could not be read (json's own message is not for users)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return "a number with more than 4,300 digits" if "digits" in str(exc) else str(exc)


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
        except (ValueError, RecursionError) as exc:
            raise InputError(f"{name}:{line}: not usable JSON: {_json_trouble(exc)}") from None
        yield line, item
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise InputError(f"{name}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']'")


def json_items(path: str, text: str, fmt: str) -> Iterator[tuple[int, object]]:
    """(line, item) of a JSON-lines file (``fmt`` "jsonl") or a JSON array ("json")."""
    return _jsonl_rows(path, text) if fmt == "jsonl" else _json_array_rows(path, text)


def read_customers(
    path: str, lines: dict[str, int] | None = None, grouped: set[str] | None = None
) -> list[CustomerRow]:
    """Every row of an import file, validated; the first bad row raises InputError (file:line).
    ``lines`` (if given) gets the line of each customer id, ``grouped`` the customer ids whose
    row names a group (a CSV with a group column, an object with a "group" key), even an
    empty one: the others keep their stored group (`keep_stored_groups`)."""
    text = read_text(path)
    fmt = file_format(path, text)
    items = {"csv": _csv_rows, "jsonl": _jsonl_rows, "json": _json_array_rows}[fmt](path, text)
    rows: list[CustomerRow] = []
    line_of: dict[str, int] = {}
    owner: dict[str, tuple[str, int]] = {}
    for line, item in items:
        if not isinstance(item, dict):
            raise InputError(f"{path}:{line}: expected an object with customer_id and identities")
        if item.get("identities") is None and "customer_id" in item and set(item) <= set(COLUMNS):
            # a forgotten field would store a customer nothing routes to; [] says "none" on purpose
            # (other faults of the row, such as an unknown field, are told first by clean_row)
            raise InputError(f"{path}:{line}: missing field 'identities' (a list of KIND:VALUE, or [] for none)")
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
        if grouped is not None and "group" in item:
            grouped.add(row.customer_id)
        for key in row.identities:
            other = owner.setdefault(key, (row.customer_id, line))
            if other[0] != row.customer_id:
                raise InputError(
                    f"{path}:{line}: {key} already belongs to customer {other[0]} (line {other[1]})"
                )
        rows.append(row)
    if not rows:  # an empty file, a CSV header alone: a wrong file, not a wish to import nothing
        what = {"csv": f"expected a header ({', '.join(COLUMNS)}) and rows",
                "jsonl": "expected one JSON object per line", "json": "expected an array of objects"}[fmt]
        raise InputError(f"{path}: no customers in the file ({what})")
    if lines is not None:
        lines.update(line_of)
    return rows


def keep_stored_groups(store: LocationStore, rows: list[CustomerRow], grouped: set[str]) -> list[CustomerRow]:
    """``rows`` with the stored group of each stored customer whose row names none (not in
    ``grouped``), as a row that names no system keeps the stored one: a PUT or an import
    that only meant to change identities took the customer out of its group, and the next
    migration split the group (an IVR's access number) without a word."""
    keep = [r.customer_id for r in rows if r.customer_id not in grouped]
    stored = store.customers(keep) if keep else {}
    return [msgspec.structs.replace(r, group=stored[r.customer_id].group)
            if r.customer_id in stored and r.customer_id not in grouped else r for r in rows]


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


