"""The common case's route: the system a request goes to unchanged (SPEC section 7).

``plan`` answers, synchronously and without side effects, where a classified request
goes when its flow would only forward it and relay the answer: a followed session, an
owned entity whose customer is not locked, the remote cookie, the default system.
None means the flow does more (a login, a probe, a hold, a twin rewrite, a merge, a
create, a CPE cookie).  The fast path (``fastpath.py``) calls it for every request it
might take, and ``Flows.plan`` / ``Flows.dispatch`` call it too, so both paths route
the common case by this one piece of code.

Compiled with mypyc with the rest of the fast path (``sip/_pure.py``): it reads the
dispatcher through the small ``Dispatcher`` protocol (``Flows`` implements it), the
store through ``Router``, and keeps its enum members in ``Final`` constants.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol

from api_proxy.calltypes import Action, Classified, Credentials, RealmKind, RouteKey
from api_proxy.records import session_key, twin_of
from api_proxy.router import Owner, Router, SessionRecord

MAX_CACHED_KEYS: Final = 4  # store keys a connection remembers (find_session_of)

# enum members looked up once (a class attribute lookup costs ~80 ns, a Final is a C static)
_CUSTOMER: Final = RealmKind.CUSTOMER
_CPE: Final = RealmKind.CPE
_LOGIN: Final = Action.LOGIN
_WEB_LOGIN: Final = Action.WEB_LOGIN
_LOGOUT: Final = Action.LOGOUT
_REFRESH: Final = Action.REFRESH
_SET_CONTEXT: Final = Action.SET_CONTEXT
_LIST: Final = Action.LIST
_ENTITY: Final = Action.ENTITY


class Dispatcher(Protocol):
    """What the plan reads of the dispatcher (``forward.Forwarder``)."""

    router: Router

    def now(self) -> float: ...

    def owner_of(self, keys: Iterable[RouteKey]) -> tuple[RouteKey, Owner] | None: ...


def plan(
    d: Dispatcher, c: Classified, keys: dict[tuple[str, str], str] | None = None
) -> str | None:
    """The system ``c`` goes to unchanged, with its answer relayed as it is; None when
    its flow does more.  ``keys``: a connection's cache of store keys
    (``find_session_of``)."""
    kind = c.kind
    if kind is _CPE:
        return None
    action = c.action
    if action is _LOGIN or action is _WEB_LOGIN:
        return None
    rec = find_session_of(d, c, keys)
    if kind is _CUSTOMER:
        if rec is not None:  # a create: recorded in the store by its flow
            return None if action in (_LOGOUT, _REFRESH) or c.creates else rec.system
        if _names_session(c.creds):
            return None
        if c.keys:
            owner = plain_owner(d, c)
            return owner.system if owner is not None and owner.known else None
        if action is _LOGOUT and c.remote:
            return None  # its flow expires the authorized-by-remote cookie
        return "source" if c.remote else "target"
    # admin realms
    if rec is None and _names_session(c.creds):
        return None
    if action in (_SET_CONTEXT, _LIST) or c.creates:
        return None
    if rec is not None and action in (_LOGOUT, _REFRESH):
        return None
    twin = twin_of(rec) if rec is not None else None
    system = (twin.ctx if twin and twin.ctx else "") or (rec.system if rec else "target")
    if action is _ENTITY:
        found = d.owner_of(c.keys)
        if found is not None:
            owner = plain_owner(d, c)
            if owner is None:
                return None
            system = owner.system
    if rec is not None and system != rec.system:
        return None  # the twin's credentials go instead of the client's
    return system


def _names_session(creds: Credentials) -> bool:
    """``session_keys(creds)`` is not empty (said without building the list; asked only
    when no live session was found: each attribute of a Struct is a Python-level get)."""
    return bool(creds.session_id or creds.access_token or creds.refresh_token)


def plain_owner(d: Dispatcher, c: Classified) -> Owner | None:
    """The owner ``resolve`` would give without holding or refusing (None: it would
    hold, refuse or find nobody)."""
    found = d.owner_of(c.keys)
    if found is None:
        return None
    _, owner = found
    if owner.system == "reject" or owner.state == "locked":
        return None
    return owner


def session_keys(creds: Credentials) -> list[tuple[str, str]]:
    """(key kind, value) pairs naming a session, best first.  A function of this compiled
    module rather than a method of the (interpreted) Struct: the fast path calls it on
    every request."""
    out = []
    if creds.session_id:
        out.append(("sid", creds.session_id))
    if creds.access_token:
        out.append(("at", creds.access_token))
    if creds.refresh_token:
        out.append(("rt", creds.refresh_token))
    return out


def find_session_of(
    d: Dispatcher, c: Classified, keys: dict[tuple[str, str], str] | None = None
) -> SessionRecord | None:
    """The live session the request's credentials name.  ``keys`` caches the store key
    (a SHA-256 digest) of each (kind, credential) for a connection, whose requests
    carry the same token again and again; it holds a few entries at most."""
    now = d.now()
    for kind, value in session_keys(c.creds):
        if keys is None:
            key = session_key(kind, value)
        else:
            key = keys.get((kind, value), "")
            if not key:
                if len(keys) >= MAX_CACHED_KEYS:
                    keys.clear()
                key = keys[(kind, value)] = session_key(kind, value)
        rec = d.router.get_session(key)
        if rec is not None and rec.expires_at > now:
            return rec
    return None
