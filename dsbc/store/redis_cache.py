"""The Redis store's cache file (``store.cache_file``): the index on local disk, so that a
node restarted while Redis is away still dispatches.  Written atomically (a temporary file
renamed over the old one), as msgpack: sequence, epoch, meta values and every customer.

Beside it, ``<cache_file>.meta``: the meta values set while Redis was away (a node's saved
RADIUS accounting pins and Diameter sessions, at a reload or a stop), for the worker that
starts next, until Redis has them."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import msgspec

from .base import Customer
from .memory import MemoryIndex

log = logging.getLogger("dsbc.store")


def write_cache(path: str, seq: int, epoch: str, url: str, meta: dict[str, str],
                customers: list[Customer]) -> None:
    rows = [[c.customer_id, c.system, c.state, c.group, c.batch_id, c.expires_cap,
             list(c.identities)] for c in customers]
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(msgspec.msgpack.encode({"seq": seq, "epoch": epoch, "url": url,
                                            "meta": meta, "customers": rows}))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the store cache %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def read_cache(path: str) -> tuple[MemoryIndex, int, str, dict[str, str], float] | None:
    """(index, sequence, epoch, meta, file time), or None (logged) when there is none."""
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = msgspec.msgpack.decode(f.read())
        mtime = os.path.getmtime(path)
    except (OSError, msgspec.DecodeError) as exc:
        log.warning("no usable store cache %s: %s", path, exc)
        return None

    def rows() -> Iterator[tuple[str, str, str, str, str, int, str | None]]:
        for cid, system, state, group, batch, cap, keys in data["customers"]:
            if not keys:
                yield (cid, system, state, group, batch, cap, None)
            for key in keys:
                yield (cid, system, state, group, batch, cap, key)

    meta = {str(k): str(v) for k, v in (data.get("meta") or {}).items()}
    return MemoryIndex.build(rows()), int(data.get("seq", 0)), str(data.get("epoch", "")), meta, mtime


def write_kept_meta(path: str, values: dict[str, str]) -> None:
    """Replace the kept meta values (atomically); no values: remove the file."""
    if not values:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(msgspec.msgpack.encode(values))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def read_kept_meta(path: str) -> dict[str, str]:
    """The meta values kept while Redis was away ({} when there are none)."""
    try:
        with open(path, "rb") as f:
            data = msgspec.msgpack.decode(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, msgspec.DecodeError) as exc:
        log.warning("no usable kept meta values in %s: %s", path, exc)
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
