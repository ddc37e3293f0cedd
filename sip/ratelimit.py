"""Per-source rate limiting in the manner of Kamailio's pike, free of I/O (time is an argument).

``RateLimiter(limit, window).check(ip, now)`` counts one message from ``ip`` and says what
to do with it:

* ``Verdict.ALLOW``: under the limit;
* ``Verdict.REJECT``: over the limit, answer it cheaply (503, by the caller);
* ``Verdict.DROP``: over the limit and the source already had its share of answers in this
  window: drop it without a word (answers to a flood are themselves rate limited, so
  dsbc cannot be turned into a reflector).

The rate is a sliding-window estimate built from two fixed windows (the previous window's
count weighted by how much of it still overlaps, plus the current count), the way pike
samples a source over its time unit.  A source is *blocked* while that estimate is above
``limit``: every message counts, blocked or not, so a source that keeps flooding stays
blocked and gets nothing through, and one that slows down below the limit is let through
again within one window.  (A token bucket would let a flood through at the refill rate.)

Memory is bounded: an entry whose last two windows are empty says nothing more than no
entry, and is swept once per window; above ``max_entries`` the oldest entries are
evicted first (a flood from very many spoofed addresses can then make dsbc forget a
blocked source early: it is blocked again on its next burst).

Perf note: one dict lookup, a few float operations and a list mutation per message; no
allocation for a source already seen.  The sweep is O(entries) once per window.
"""

from __future__ import annotations

import collections
import enum
import itertools

__all__ = ["RateLimiter", "Verdict"]


class Verdict(enum.IntEnum):
    ALLOW = 0
    REJECT = 1
    DROP = 2


# entry fields (a list, mutated in place: cheaper than an object with attributes)
_START, _COUNT, _PREV, _ANSWERED, _BLOCKED = range(5)


class RateLimiter:
    """Per-key (source IP) message counter with a block state, bounded in memory."""

    __slots__ = (
        "_entries",
        "_next_sweep",
        "blocked_total",
        "limit",
        "max_entries",
        "newly_blocked",
        "window",
    )

    def __init__(self, limit: int, window: float, max_entries: int = 65536) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if window <= 0:
            raise ValueError("window must be > 0")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.limit = limit
        self.window = window
        self.max_entries = max_entries
        self._entries: dict[str, list[float]] = {}
        self._next_sweep = 0.0
        #: sources that became blocked since the caller last emptied this (for reports);
        #: bounded, the oldest fall off
        self.newly_blocked: collections.deque[str] = collections.deque(maxlen=256)
        #: how many times a source went from allowed to blocked
        self.blocked_total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, key: str, now: float) -> Verdict:
        """Count one message from ``key`` at time ``now``; what to do with it."""
        if now >= self._next_sweep:
            self.sweep(now)
        e = self._entries.get(key)
        window = self.window
        if e is None:
            if len(self._entries) >= self.max_entries:
                self._evict()
            self._entries[key] = [now, 1.0, 0.0, 0.0, 0.0]
            return Verdict.ALLOW
        elapsed = now - e[_START]
        if elapsed >= window:
            # roll: the current window becomes the previous one (or nothing, if a whole
            # window went by in silence)
            e[_PREV] = e[_COUNT] if elapsed < 2 * window else 0.0
            e[_START] = now if elapsed >= 2 * window else e[_START] + window
            e[_COUNT] = 0.0
            e[_ANSWERED] = 0.0
            elapsed = now - e[_START]
        e[_COUNT] += 1.0
        rate = e[_PREV] * (1.0 - elapsed / window) + e[_COUNT]
        if rate <= self.limit:
            e[_BLOCKED] = 0.0
            return Verdict.ALLOW
        if not e[_BLOCKED]:
            e[_BLOCKED] = 1.0
            self.blocked_total += 1
            self.newly_blocked.append(key)
        if e[_ANSWERED] < self.limit:
            e[_ANSWERED] += 1.0
            return Verdict.REJECT
        return Verdict.DROP

    def is_blocked(self, key: str) -> bool:
        e = self._entries.get(key)
        return bool(e is not None and e[_BLOCKED])

    def blocked(self) -> list[str]:
        """The sources blocked on their last message (for status reports)."""
        return [k for k, e in self._entries.items() if e[_BLOCKED]]

    def sweep(self, now: float) -> int:
        """Forget sources silent for two windows; returns how many were forgotten."""
        horizon = 2 * self.window
        stale = [k for k, e in self._entries.items() if now - e[_START] >= horizon]
        for k in stale:
            del self._entries[k]
        self._next_sweep = now + self.window
        return len(stale)

    def _evict(self) -> None:
        # dicts keep insertion order: the first entries are the oldest sources
        n = max(1, self.max_entries // 16)
        for k in list(itertools.islice(self._entries, n)):
            del self._entries[k]
