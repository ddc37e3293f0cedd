"""Which relayed registrations are worth a store write.

A phone that re-registers more often than its binding needs (every few seconds, or a
REGISTER storm after an outage) would cost a store write per REGISTER, although nothing
but the expiry moved by a few seconds.  ``RefreshFilter`` lets such a refresh through
only when the stored one has aged: a binding (account, contact) written less than
``min(window, expires / 4)`` seconds ago, to the same system, is not written again.

What the store shows stays right for every phone that keeps refreshing: a skipped
refresh comes at most a quarter of the lifetime after the write, so the phone's next
refresh is written before the stored expiry passes.  Only a phone that stops
refreshing is shown expired up to that much early.  A move to another system, an
unregistration (expires 0), an expiry shorter than the one written (the cap of a prepared
migration) and a first registration are always written.

The filter remembers the writes of the last one or two windows only, so its memory
follows the write rate, not the number of phones (``max_entries`` bounds it further by
shortening the window).
"""

from __future__ import annotations

__all__ = ["RefreshFilter"]


class RefreshFilter:
    def __init__(self, window: float = 10.0, max_entries: int = 100_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._recent: dict[int, tuple[str, float]] = {}
        self._older: dict[int, tuple[str, float]] = {}
        self._rotated = 0.0
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._recent) + len(self._older)

    def fresh(self, account: str, contact: str, system: str, expires: int, now: float) -> bool:
        """Must this binding, relayed at ``now`` with ``expires`` seconds, be written?"""
        key = hash((account, contact))
        if expires <= 0:
            self._recent.pop(key, None)
            self._older.pop(key, None)
            return True
        if now - self._rotated >= self.window or len(self._recent) >= self.max_entries:
            self._older, self._recent, self._rotated = self._recent, {}, now
        expires_at = now + expires
        prev = self._recent.get(key) or self._older.get(key)
        # a refresh moves the stored expiry a little later; an earlier one (a shorter expiry
        # granted: the cap of `dsbc migrate --prepare`) is news, written at once
        if prev is not None and prev[0] == system and 0 <= expires_at - prev[1] <= min(self.window, expires / 4):
            self.skipped += 1
            return False
        self._recent[key] = (system, expires_at)
        return True
