"""The data of one emulated billing system: customers, accounts, users and sessions.

Plain Python, no I/O: ``billing.py`` serves it as a PortaBilling-style JSON API and
``billing_web.py`` as self-care pages.  Two instances stand for the two systems of a
migration: the source keeps customers that moved as ``exported`` (hidden from lists
with ``skip_exported`` and refused at login, their old sessions still valid), the
target receives them with ``import_record``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_PASSWORD = "secret"


class ApiFault(Exception):
    """A billing API fault: HTTP 500 with {faultcode, faultstring}."""

    def __init__(self, faultcode: str, faultstring: str) -> None:
        super().__init__(faultstring)
        self.faultcode = faultcode
        self.faultstring = faultstring


def auth_failed() -> ApiFault:
    return ApiFault("Server.Session.auth_failed", "Authentication failed")


@dataclass
class Customer:
    i_customer: int
    name: str
    login: str = ""
    password: str = DEFAULT_PASSWORD
    exported: bool = False
    i_parent: int = 0

    def info(self) -> dict[str, Any]:
        return {
            "i_customer": self.i_customer,
            "name": self.name,
            "login": self.login,
            "i_parent": self.i_parent or None,
            "exported": 1 if self.exported else 0,
        }


@dataclass
class Account:
    i_account: int
    id: str
    i_customer: int
    login: str = ""
    password: str = DEFAULT_PASSWORD
    did: str = ""
    mac: str = ""

    def info(self) -> dict[str, Any]:
        return {
            "i_account": self.i_account,
            "id": self.id,
            "i_customer": self.i_customer,
            "login": self.login or None,
            "did_number": self.did or None,
            "mac": self.mac or None,
        }


@dataclass
class Session:
    session_id: str
    access_token: str
    refresh_token: str
    realm: str  # "admin", "customer" or "account"
    ref: str  # admin login, i_customer or i_account (as text)
    expires_at: float
    context: dict[str, Any] = field(default_factory=dict)


def fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


class BillingData:
    """One system's customers, accounts, admin users and sessions."""

    def __init__(
        self,
        name: str,
        system: str,
        session_ttl: float = 3600.0,
        admins: dict[str, str] | None = None,
        id_base: int | None = None,
    ) -> None:
        self.name = name
        self.system = system
        self.session_ttl = session_ttl
        self.customers: dict[int, Customer] = {}
        self.accounts: dict[int, Account] = {}
        self.admins: dict[str, str] = dict(admins or {"admin": "admin"})
        self.admin_tokens: dict[str, str] = {"admin": "admin-api-token"}
        self.sessions: dict[str, Session] = {}  # by session id
        self.tokens: dict[str, str] = {}  # access token -> session id
        self.refresh: dict[str, str] = {}  # refresh token -> session id
        base = id_base if id_base is not None else (5000 if system == "target" else 1000)
        self._next_customer = base
        self._next_account = base * 10

    # -- seeding ------------------------------------------------------------------------

    def seed(self, rows: Iterable[dict[str, Any]]) -> None:
        """Load store-style rows: ``customer_id``, ``identities`` (list or ';'-joined),
        ``system``, optional ``name`` and ``password``.  Rows on this system are live;
        on the source, rows now on the target are kept as exported."""
        for row in rows:
            where = str(row.get("system") or "source")
            if where != self.system and not (self.system == "source" and where == "target"):
                continue
            idents = row.get("identities") or []
            if isinstance(idents, str):
                idents = [p for p in idents.split(";") if p]
            self._add_row(row, [str(i) for i in idents], exported=where != self.system)

    def _add_row(self, row: dict[str, Any], idents: list[str], exported: bool) -> None:
        cid_text = str(row["customer_id"])
        i_customer = int(cid_text) if cid_text.isdigit() else self._new_customer_id()
        password = str(row.get("password") or DEFAULT_PASSWORD)
        by_kind: dict[str, list[str]] = {}
        for ident in idents:
            kind, _, value = ident.partition(":")
            by_kind.setdefault(kind.strip().lower(), []).append(value.strip())
        logins = by_kind.get("login", [])
        login = logins[0] if logins else ""
        name = str(row.get("name") or (login.capitalize() if login else f"Customer {cid_text}"))
        cust = Customer(i_customer, name, login, password, exported)
        self.customers[i_customer] = cust
        ids = by_kind.get("account", [])
        iacc = by_kind.get("i_account", [])
        for n in range(max(len(ids), len(iacc))):
            i_account = int(_digits(iacc[n]) or 0) if n < len(iacc) else self._new_account_id()
            acc_id = ids[n] if n < len(ids) else str(i_account)
            acc = Account(
                i_account,
                acc_id,
                i_customer,
                logins[n + 1] if n + 1 < len(logins) else "",
                password,
            )
            self.accounts[i_account] = acc
        first = next((a for a in self.accounts.values() if a.i_customer == i_customer), None)
        if first is not None:
            dids = by_kind.get("did", [])
            macs = by_kind.get("cpe", [])
            first.did = _digits(dids[0]) if dids else ""
            first.mac = macs[0].replace(":", "").replace("-", "").lower() if macs else ""

    def _new_customer_id(self) -> int:
        while self._next_customer in self.customers:
            self._next_customer += 1
        self._next_customer += 1
        return self._next_customer - 1

    def _new_account_id(self) -> int:
        while self._next_account in self.accounts:
            self._next_account += 1
        self._next_account += 1
        return self._next_account - 1

    # -- migration ------------------------------------------------------------------------

    def export_record(self, i_customer: int) -> dict[str, Any]:
        """Mark a customer exported (source side) and return what the target imports."""
        cust = self.customers.get(int(i_customer))
        if cust is None:
            raise KeyError(f"{self.name}: no customer {i_customer}")
        cust.exported = True
        return {
            "customer": asdict(cust),
            "accounts": [
                asdict(a) for a in self.accounts.values() if a.i_customer == cust.i_customer
            ],
        }

    def import_record(self, record: dict[str, Any]) -> int:
        c = dict(record["customer"])
        c["exported"] = False
        cust = Customer(**c)
        self.customers[cust.i_customer] = cust
        for a in record.get("accounts", []):
            acc = Account(**a)
            self.accounts[acc.i_account] = acc
        return cust.i_customer

    def remove_record(self, i_customer: int) -> None:
        """Forget a customer and its accounts (the target side of a rollback)."""
        self.customers.pop(int(i_customer), None)
        for i_account in [
            a.i_account for a in self.accounts.values() if a.i_customer == i_customer
        ]:
            del self.accounts[i_account]

    # -- sessions -------------------------------------------------------------------------

    def authenticate(self, login: str, password: str = "", token: str = "") -> tuple[str, str]:
        """(realm, ref) of a user whose password or API token matches."""
        if login in self.admins and (
            (password and password == self.admins[login])
            or (token and token == self.admin_tokens.get(login))
        ):
            return "admin", login
        if not password:
            raise auth_failed()
        for cust in self.customers.values():
            if (
                cust.login
                and cust.login == login
                and cust.password == password
                and not cust.exported
            ):
                return "customer", str(cust.i_customer)
        for acc in self.accounts.values():
            owner = self.customers.get(acc.i_customer)
            if (
                (acc.login == login or acc.id == login)
                and acc.password == password
                and owner is not None
                and not owner.exported
            ):
                return "account", str(acc.i_account)
        raise auth_failed()

    def open_session(self, realm: str, ref: str, now: float | None = None) -> Session:
        now = time.time() if now is None else now
        s = Session(
            secrets.token_hex(16),
            secrets.token_urlsafe(24),
            secrets.token_urlsafe(24),
            realm,
            ref,
            now + self.session_ttl,
        )
        self.sessions[s.session_id] = s
        self.tokens[s.access_token] = s.session_id
        self.refresh[s.refresh_token] = s.session_id
        return s

    def session_for(
        self, session_id: str = "", access_token: str = "", now: float | None = None
    ) -> Session:
        now = time.time() if now is None else now
        sid = session_id or self.tokens.get(access_token, "")
        if session_id and access_token and self.tokens.get(access_token) != session_id:
            raise auth_failed()  # two credentials of different sessions
        s = self.sessions.get(sid)
        if s is None or s.expires_at <= now:
            raise auth_failed()
        return s

    def close_session(self, s: Session) -> None:
        self.sessions.pop(s.session_id, None)
        self.tokens.pop(s.access_token, None)
        self.refresh.pop(s.refresh_token, None)

    def refresh_session(self, refresh_token: str, now: float | None = None) -> Session:
        now = time.time() if now is None else now
        s = self.sessions.get(self.refresh.get(refresh_token, ""))
        if s is None:
            raise ApiFault(
                "Server.Session.refresh_access_token.invalid_refresh_token", "Invalid refresh token"
            )
        self.tokens.pop(s.access_token, None)
        s.access_token = secrets.token_urlsafe(24)
        s.expires_at = now + self.session_ttl
        self.tokens[s.access_token] = s.session_id
        return s

    def login_answer(self, s: Session) -> dict[str, Any]:
        return {
            "session_id": s.session_id,
            "access_token": s.access_token,
            "refresh_token": s.refresh_token,
            "expires_at": fmt_time(s.expires_at),
        }

    # -- queries --------------------------------------------------------------------------

    def customer_of(self, s: Session) -> int | None:
        if s.realm == "customer":
            return int(s.ref)
        if s.realm == "account":
            acc = self.accounts.get(int(s.ref))
            return acc.i_customer if acc else None
        return None

    def add_customer(self, info: dict[str, Any]) -> int:
        i_customer = self._new_customer_id()
        self.customers[i_customer] = Customer(
            i_customer,
            str(info.get("name") or f"Customer {i_customer}"),
            str(info.get("login") or ""),
            str(info.get("password") or DEFAULT_PASSWORD),
            False,
            int(info.get("i_parent") or 0),
        )
        return i_customer

    def add_account(self, info: dict[str, Any]) -> int:
        i_customer = int(info.get("i_customer") or 0)
        if i_customer not in self.customers:
            raise ApiFault("Server.Account.customer_not_found", f"customer {i_customer} not found")
        i_account = self._new_account_id()
        self.accounts[i_account] = Account(
            i_account,
            str(info.get("id") or i_account),
            i_customer,
            str(info.get("login") or ""),
            str(info.get("password") or DEFAULT_PASSWORD),
            _digits(str(info.get("did_number") or "")),
        )
        return i_account

    def find_account(self, i_account: Any = None, id: Any = None) -> Account | None:
        if i_account is not None:
            return self.accounts.get(int(i_account)) if str(i_account).isdigit() else None
        return next((a for a in self.accounts.values() if a.id == str(id)), None)

    def find_customer(self, i_customer: Any = None, login: Any = None) -> Customer | None:
        if i_customer is not None:
            return self.customers.get(int(i_customer)) if str(i_customer).isdigit() else None
        return next((c for c in self.customers.values() if c.login == str(login)), None)

    def find_device(self, mac: str) -> Account | None:
        mac = mac.lower()
        return next((a for a in self.accounts.values() if a.mac == mac), None)

    def find_number(self, number: str) -> Account | None:
        n = _digits(number)
        return next((a for a in self.accounts.values() if n and a.did == n), None)


def flag(value: Any) -> bool:
    """A boolean param as the billing API reads it (its schema's integer): 0, "0", "" and
    null are false."""
    return value not in (None, 0, "0", "", False)


def count(params: dict[str, Any], key: str) -> int:
    """A non-negative integer param (``offset``, ``limit``); a fault when it is not one."""
    value = params.get(key)
    if value is None or value == "":
        return 0
    try:
        n = int(value) if not isinstance(value, bool) else -1
    except (TypeError, ValueError):
        raise ApiFault("Client.Request.bad_param", f"{key} must be a number") from None
    if n < 0:
        raise ApiFault("Client.Request.bad_param", f"{key} must not be negative")
    return n


def window(rows: list[dict[str, Any]], params: dict[str, Any], key: str) -> dict[str, Any]:
    """``offset`` / ``limit`` / ``get_total`` over a list, as the billing API does them."""
    offset = count(params, "offset")
    limit = count(params, "limit")
    page = rows[offset : offset + limit] if limit > 0 else rows[offset:]
    out: dict[str, Any] = {key: page}
    if flag(params.get("get_total")):
        out["total"] = len(rows)
    return out
