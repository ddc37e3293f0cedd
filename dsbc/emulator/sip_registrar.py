"""The location service of an emulated SIP system: bindings per AOR user (RFC 3261 10.3)
with the Path they were registered through (RFC 3327).  No I/O; time is an argument.

No authentication: any REGISTER is accepted, as the emulator's job is to show where a
registration ended up, not to guard it.
"""

from __future__ import annotations

from typing import Any

from sip.errors import SipParseError
from sip.message import SipMessage
from sip.uri import parse_name_addr

DEFAULT_EXPIRES = 3600


class Binding:
    """One registered contact of a user."""

    __slots__ = ("call_id", "contact", "cseq", "expires_at", "params", "path", "received", "updated")

    def __init__(self, contact: str, params: str, path: list[str], expires_at: float,
                 received: Any, call_id: str, cseq: int, updated: float) -> None:
        self.contact = contact  # the contact URI as written
        self.params = params  # its header parameters other than expires (+sip.instance, reg-id)
        self.path = path  # Path values, top first (the first is the next hop towards the phone)
        self.expires_at = expires_at
        self.received = received  # where the REGISTER came from (a sip_net.Hop)
        self.call_id = call_id
        self.cseq = cseq
        self.updated = updated

    def header_value(self, now: float) -> str:
        left = max(0, int(self.expires_at - now + 0.5))
        return f"<{self.contact}>{self.params};expires={left}"

    def __repr__(self) -> str:
        return f"Binding({self.contact!r}, path={self.path!r})"


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() else None


class Registrar:
    """Bindings by user; ``register`` applies one REGISTER and returns the user's bindings."""

    def __init__(self, max_expires: int = 3600, default_expires: int = DEFAULT_EXPIRES) -> None:
        self.max_expires = max_expires
        self.default_expires = min(default_expires, max_expires)
        self._users: dict[str, dict[str, Binding]] = {}
        #: users that have registered at least once (they are "known" once unregistered)
        self.seen: set[str] = set()

    def register(self, user: str, msg: SipMessage, received: Any, now: float) -> tuple[list[Binding], int | None]:
        """Apply a REGISTER for ``user``; return (current bindings, expires granted to the
        request's contacts or None for a query / removal).  Raises SipParseError (400)."""
        contacts = msg.values("contact")
        header_expires = _int_or_none(msg.get("expires"))
        if msg.get("expires") is not None and header_expires is None:
            raise SipParseError("bad Expires")
        cseq = msg.cseq[0]
        bindings = self._users.setdefault(user, {})
        self.seen.add(user)
        if "*" in contacts:
            if len(contacts) != 1 or header_expires != 0:
                raise SipParseError("Contact: * needs Expires: 0 and no other contact")
            del self._users[user]
            return [], None
        path = msg.values("path")
        for value in path:
            if parse_name_addr(value).uri.scheme not in ("sip", "sips"):
                raise SipParseError("Path must hold SIP URIs")
        granted: int | None = None
        for value in contacts:
            addr = parse_name_addr(value)
            expires = _int_or_none(addr.param("expires"))
            if expires is None:
                expires = header_expires if header_expires is not None else self.default_expires
            expires = min(expires, self.max_expires)
            uri = addr.uri_text
            if expires == 0:
                bindings.pop(uri, None)
                continue
            params = "".join(
                f";{k}" if v is None else f";{k}={v}" for k, v in addr.params if k.lower() != "expires"
            )
            bindings[uri] = Binding(uri, params, list(path), now + expires, received, msg.call_id, cseq, now)
            granted = expires if granted is None else min(granted, expires)
        if not bindings:
            del self._users[user]
        return self.lookup(user, now), granted

    def lookup(self, user: str, now: float) -> list[Binding]:
        """Live bindings of ``user``, most recently refreshed first."""
        bindings = self._users.get(user)
        if not bindings:
            return []
        dead = [uri for uri, b in bindings.items() if b.expires_at <= now]
        for uri in dead:
            del bindings[uri]
        if not bindings:
            del self._users[user]
            return []
        return sorted(bindings.values(), key=lambda b: b.updated, reverse=True)

    def purge(self, now: float) -> None:
        for user in list(self._users):
            self.lookup(user, now)

    def users(self) -> list[str]:
        return sorted(self._users)

    def count(self) -> int:
        return sum(len(b) for b in self._users.values())
