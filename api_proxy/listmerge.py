"""One list over two systems: ``get_*_list`` merged as source rows then target rows.

The client's ``offset`` / ``limit`` / ``get_total`` must behave exactly as over one list
``S + T`` where ``S`` is the source's list without exported entities
(``skip_exported=1``) and ``T`` the target's.  The source is asked first, for the
client's window and its total; the target is then asked for what is left of the
window, shifted by the source's total.  Rows pass through as raw JSON (never
re-encoded); only the envelope is rebuilt.

``merge_lists`` takes the fetch as a callable, so the window arithmetic is tested
without sockets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from api_proxy.errors import BadRequest, UpstreamFault, parse_fault

# fetch(system, params) -> (HTTP status, body)
Fetch = Callable[[str, dict[str, Any]], Awaitable[tuple[int, bytes]]]

_envelope = msgspec.json.Decoder(dict[str, msgspec.Raw])
_rows = msgspec.json.Decoder(list[msgspec.Raw])
_int = msgspec.json.Decoder(int)
_enc = msgspec.json.Encoder()


def _non_negative(params: dict[str, Any], key: str) -> int:
    v = params.get(key)
    if v is None or v == "":
        return 0
    if isinstance(v, bool):
        raise BadRequest(f"params.{key} must be a number")
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise BadRequest(f"params.{key} must be a number") from None
    if n < 0:
        raise BadRequest(f"params.{key} must not be negative")
    return n


def _truthy(v: Any) -> bool:
    return v not in (None, 0, "0", "", False)


class _Part(msgspec.Struct):
    envelope: dict[str, msgspec.Raw]
    key: str  # the member holding the rows
    rows: list[msgspec.Raw]
    total: int | None


def _list_member(env: dict[str, msgspec.Raw], list_key: str) -> str:
    """The member holding the rows: ``list_key`` (``get_x_list`` -> ``x_list``), else the
    answer's only array member (``get_phonebook_list`` answers ``phonebook_rec_list``)."""
    if list_key in env:
        return list_key
    arrays = [k for k, v in env.items() if bytes(v)[:1] == b"["]
    return arrays[0] if len(arrays) == 1 else list_key


def _read(system: str, body: bytes, list_key: str) -> _Part:
    try:
        env = _envelope.decode(body)
        key = _list_member(env, list_key)
        rows = _rows.decode(env[key]) if key in env else []
        total = _int.decode(env["total"]) if "total" in env else None
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamFault(f"the {system} system's {list_key} answer is not a list") from None
    return _Part(env, key, rows, total)


def _failed(system: str, status: int, body: bytes) -> tuple[int, bytes]:
    """A system's fault, passed on as it is; any other answer that is not a list (an HTML
    error page) is not passed on as the merged list's JSON."""
    if parse_fault(status, body) is not None:
        return status, body
    raise UpstreamFault(f"the {system} system answered the list with HTTP {status}")


async def _source_total(
    fetch: Fetch, params: dict[str, Any], src: _Part, offset: int, limit: int
) -> int:
    """The source's row count: its total, or what its page shows when it gave none (a
    page shorter than the limit ends the list).  An empty page past the start is the end
    of the list when the row just before it exists (a client paging exactly to the end
    of the source's rows), which one more question tells."""
    if src.total is not None:
        return src.total
    if limit == 0 or len(src.rows) < limit:
        if src.rows or offset == 0:
            return offset + len(src.rows)
        status, body = await fetch("source", dict(params, offset=offset - 1, limit=1))
        if (
            status == 200
            and parse_fault(status, body) is None
            and _read("source", body, src.key).rows
        ):
            return offset
    raise UpstreamFault("the source system did not return the list total")


async def merge_lists(fetch: Fetch, params: dict[str, Any], list_key: str) -> tuple[int, bytes]:
    """(status, body) of the merged list, or the first fault a system answered."""
    offset = _non_negative(params, "offset")
    limit = _non_negative(params, "limit")  # 0 or absent: no limit
    want_total = _truthy(params.get("get_total"))

    sp = dict(params, skip_exported=1, get_total=1)
    status, body = await fetch("source", sp)
    if status != 200 or parse_fault(status, body) is not None:
        return _failed("source", status, body)
    src = _read("source", body, list_key)

    remaining = None if limit == 0 else limit - len(src.rows)
    tgt: _Part | None = None
    src_total = 0
    if remaining is None or remaining > 0 or want_total:
        src_total = await _source_total(fetch, sp, src, offset, limit)
        tp = dict(params, offset=max(0, offset - src_total), get_total=1)
        tp.pop("skip_exported", None)
        if remaining is None:
            tp.pop("limit", None)
        else:
            tp["limit"] = max(remaining, 1)
        status, body = await fetch("target", tp)
        if status != 200 or parse_fault(status, body) is not None:
            return _failed("target", status, body)
        tgt = _read("target", body, src.key)
        if want_total and tgt.total is None:
            raise UpstreamFault("the target system did not return the list total")

    rows = list(src.rows)
    out: dict[str, Any] = dict(src.envelope)
    if tgt is not None:
        out.update(tgt.envelope)
        rows += tgt.rows if remaining is None else tgt.rows[: max(remaining, 0)]
    key = src.key if src.key in src.envelope or tgt is None else tgt.key
    if key != list_key:
        out.pop(list_key, None)
    out[key] = rows
    if want_total:
        out["total"] = src_total + ((tgt.total or 0) if tgt is not None else 0)
    else:
        out.pop("total", None)
    return 200, _enc.encode(out)
