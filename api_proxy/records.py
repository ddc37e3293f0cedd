"""What the dispatcher remembers: session keys, twin sessions, created entities (pure).

Sessions are stored under a digest of the session id, access token, refresh token or
cookie, never the raw secret.  An admin session made through dsbc is a *twin*: one
session on each system behind the one returned to the client; ``TwinExtra`` (kept as
JSON in ``SessionRecord.extra``) holds each system's credentials, the context system
chosen with ``Session/set_session_context`` and the sibling keys to delete at logout.
A customer or account session is only followed to its system, so its records keep
their sibling keys alone (``key_records``): no raw credential of theirs is stored.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import msgspec

from api_proxy.apicall import ApiCall
from api_proxy.classify import DID_FIELDS
from api_proxy.router import SessionRecord

SYSTEMS = ("source", "target")


def session_key(kind: str, value: str) -> str:
    """``kind`` is sid, at, rt (session id, access / refresh token) or ck (a cookie)."""
    return f"api:{kind}:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def parse_expiry(value: Any, now: float, default_ttl: float) -> float:
    """``expires_at`` as the billing API gives it (epoch number or UTC date-time text)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value) if value > 10**9 else now + float(value)
    if isinstance(value, str) and value and len(value) <= 64:
        # ISO 8601 (3.11's fromisoformat): "2026-12-03 17:07:47", "...T17:07:47.123Z",
        # "...+03:00"; no offset is UTC
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            return now + default_ttl
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    return now + default_ttl


class Creds(msgspec.Struct, omit_defaults=True):
    """One system's credentials for a session."""

    session_id: str = ""
    access_token: str = ""
    refresh_token: str = ""

    def keys(self) -> list[str]:
        out = []
        if self.session_id:
            out.append(session_key("sid", self.session_id))
        if self.access_token:
            out.append(session_key("at", self.access_token))
        if self.refresh_token:
            out.append(session_key("rt", self.refresh_token))
        return out


class LoginResult(msgspec.Struct):
    creds: Creds
    expires_at: float


_login_decoder = msgspec.json.Decoder(dict[str, Any])


def login_result(body: bytes, now: float, default_ttl: float) -> LoginResult | None:
    """The session a successful Session/login (or refresh) answer carries, if any."""
    try:
        doc = _login_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None

    def text(k: str) -> str:
        v = doc.get(k)
        return v if isinstance(v, str) and len(v) <= 4096 else ""

    creds = Creds(text("session_id"), text("access_token"), text("refresh_token"))
    if not (creds.session_id or creds.access_token):
        return None
    return LoginResult(creds, parse_expiry(doc.get("expires_at"), now, default_ttl))


class TwinExtra(msgspec.Struct, omit_defaults=True):
    creds: dict[str, Creds] = {}  # system -> its credentials (one entry: one system only)
    ctx: str = ""  # system chosen by Session/set_session_context
    keys: list[str] = []  # every store key of this session (deleted together)
    #: systems that did not answer the login (rather than refuse it): told apart in the
    #: fault a request that needs one of them gets
    unanswered: list[str] = []
    #: a session dsbc did not make (opened on one system directly, found by probing): it
    #: has no twin, so it is used on its own system alone, its lists unmerged
    learned: bool = False


_extra_decoder = msgspec.json.Decoder(TwinExtra)


def twin_of(record: SessionRecord) -> TwinExtra:
    if not record.extra:
        return TwinExtra()
    try:
        return _extra_decoder.decode(record.extra)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return TwinExtra()


def make_records(
    system: str,
    twin: TwinExtra,
    expires_at: float,
    realm: str,
    customer_id: str = "",
) -> list[SessionRecord]:
    """One record per key of the primary system's credentials, all sharing ``extra``
    (the twin, credentials included: admin realms rewrite them for the other system)."""
    twin.keys = twin.creds.get(system, Creds()).keys()
    extra = msgspec.json.encode(twin).decode()
    return key_records(system, twin.keys, expires_at, realm, customer_id, extra)


def key_records(
    system: str,
    keys: list[str],
    expires_at: float,
    realm: str,
    customer_id: str = "",
    extra: str = "",
) -> list[SessionRecord]:
    """One record per key, all sharing ``extra``, by default the keys alone: what a
    customer or account session needs (it follows its system; a logout deletes the
    sibling keys, a refresh keeps those still valid: ``refreshed_keys``)."""
    if not extra:
        extra = msgspec.json.encode(TwinExtra(keys=keys)).decode()
    return [
        SessionRecord(
            key=k,
            system=system,
            expires_at=expires_at,
            customer_id=customer_id,
            realm=realm,
            extra=extra,
        )
        for k in keys
    ]


def refreshed_keys(old: list[str], new: Creds) -> list[str]:
    """The store keys of a session after a refresh that answered ``new``: its new
    credentials' keys, and the old session id and refresh token keys it did not replace
    (a refresh hands out a new access token; the session id, and the refresh token unless
    a new one came, stay valid).  The old access token's key is dropped."""
    kept = [
        k
        for k in old
        if (k.startswith("api:sid:") and not new.session_id)
        or (k.startswith("api:rt:") and not new.refresh_token)
    ]
    return list(dict.fromkeys([*new.keys(), *kept]))


def rewrite_for(
    call: ApiCall, held: Creds, wanted: Creds
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
    """New (auth_info, params, bearer) replacing the client's credentials ``held`` by
    ``wanted`` (the twin session on another system).  None / "" where nothing changes."""
    auth = None
    if call.auth_info is not None:
        a = dict(call.auth_info)
        named = [k for k in ("session_id", "access_token") if a.get(k)]
        for k in named:  # each credential of the face session is the twin's, or goes
            if getattr(wanted, k):
                a[k] = getattr(wanted, k)
            else:
                del a[k]
        if named and not any(a.get(k) for k in ("session_id", "access_token")):
            k = "session_id" if wanted.session_id else "access_token"
            a[k] = getattr(wanted, k)
        auth = a if a != call.auth_info else None
    params = None
    if call.service == "Session":
        p = dict(call.params)
        for k in ("session_id", "access_token", "refresh_token"):
            if p.get(k) and getattr(held, k) and p[k] == getattr(held, k):
                p[k] = getattr(wanted, k) or p[k]
        params = p if p != call.params else None
    bearer = wanted.access_token if call.bearer and wanted.access_token else ""
    return auth, params, bearer


#: the cookies the billing API sets at a login, read as credentials by ``classify``
SESSION_COOKIES = ("session_id", "access_token")


def rewrite_cookie(header: str, held: Creds, wanted: Creds) -> str | None:
    """The Cookie header with the session cookies naming ``held`` made ``wanted``'s (the
    twin session on another system); None when none of them names ``held``.  Other
    cookies are kept as they are."""
    out: list[str] = []
    changed = False
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name in SESSION_COOKIES and value.strip().strip('"') == getattr(held, name):
            changed = True
            new = getattr(wanted, name)
            if new:
                out.append(f"{name}={new}")
            continue  # (the twin has no such credential there: the other cookie names it)
        if part.strip():
            out.append(part.strip())
    if not changed:
        return None
    if not any(p.partition("=")[0] in SESSION_COOKIES for p in out):
        # the twin's session is named by the other kind of credential
        name = "session_id" if wanted.session_id else "access_token"
        out.append(f"{name}={getattr(wanted, name)}")
    return "; ".join(out)


# --- created entities ---------------------------------------------------------------------------


def _text(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return ""
    if isinstance(v, (int, str)):
        return str(v).strip()[:256]
    return ""


def _info(params: dict[str, Any], name: str) -> dict[str, Any]:
    v = params.get(name)
    return v if isinstance(v, dict) else params


def created(
    call: ApiCall, answer: dict[str, Any], owner_customer: str = ""
) -> tuple[str, list[str]] | None:
    """(customer id, ``kind:value`` identities) of what a successful create made, or None.

    ``Customer/add_customer`` makes a customer (and its ``login``); ``Account/add_account``
    (or ``add_alias``, its ``alias_info``) an ``i_account`` with its ``id``, ``login`` and
    DID (``did_number``, ...: the fields a request names a DID by) under
    ``account_info.i_customer`` (or the owner the request was routed by, e.g. the alias's
    ``i_master_account``, or the customer whose session made it)."""
    p = call.params
    if call.method == "add_customer" or (call.service == "Customer" and "i_customer" in answer):
        cid = _text(answer.get("i_customer"))
        if not cid:
            return None
        info = _info(p, "customer_info")
        idents = [f"login:{v}" for v in [_text(info.get("login"))] if v]
        return cid, idents
    if call.method == "add_account" or (call.service == "Account" and "i_account" in answer):
        iacc = _text(answer.get("i_account"))
        # (an alias, Account/add_alias, is an account id of its own: alias_info)
        info = _info(p, "account_info" if "account_info" in p else "alias_info")
        cid = _text(info.get("i_customer")) or owner_customer
        if not iacc or not cid:
            return None
        idents = [f"i_account:{iacc}"]
        if _text(info.get("id")):
            idents.append(f"account:{_text(info.get('id'))}")
        if _text(info.get("login")):
            idents.append(f"login:{_text(info.get('login'))}")
        idents += [f"did:{v}" for v in dict.fromkeys(_text(info.get(f)) for f in DID_FIELDS) if v]
        return cid, idents
    return None
