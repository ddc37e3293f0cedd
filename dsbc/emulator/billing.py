"""An emulated billing system: the PortaBilling-style JSON API of one system.

Used by ``dsbc demo`` and the tests, behind dsbc on the demo's public host.  Two of
them stand for the source (e.g. ``MR100``) and the target (``MR115``).  Each serves:

- ``POST /rest/<Service>/<method>`` with ``auth_info`` / ``params`` as form fields,
  multipart parts or a JSON body, or ``Authorization: Bearer``, or the ``session_id`` /
  ``access_token`` cookies a login sets; login by password or
  API token, access tokens with expiry, refresh, ping, logout;
- faults in the billing API's shape (HTTP 500, ``{"faultcode", "faultstring"}``);
- ``get_customer_list`` / ``get_account_list`` with ``offset``, ``limit``,
  ``get_total`` and ``skip_exported``; creates of customers and accounts;
- the self-care pages, invoice download, CPE provisioning and a TR-069 ACS
  (``billing_web.py``).

Every answer carries ``X-Billing-System: <name>`` and is appended to ``handle.log`` so a
test can tell which system served what.

    source = await start_billing_emulator("MR100", "127.0.0.1", 0, rows, system="source")
    record = source.export_customer(3)      # customer 3 moves ...
    target.import_customer(record)          # ... and lives on the target now
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from dsbc.emulator import billing_web
from dsbc.emulator.billing_data import ApiFault, BillingData, Session, auth_failed, flag, window

log = logging.getLogger("dsbc.emulator.billing")

SYSTEM_HEADER = billing_web.SYSTEM_HEADER
Handler = Callable[["BillingEmulator", Session | None, dict[str, Any]], dict[str, Any]]


#: a login's session as cookies, as the billing API sets them beside its answer; a later
#: call without auth_info or a bearer token is authenticated by them
API_COOKIES = ("session_id", "access_token")


def _fault(exc: ApiFault) -> web.Response:
    body = msgspec.json.encode({"faultcode": exc.faultcode, "faultstring": exc.faultstring})
    return web.Response(status=500, body=body, content_type="application/json")


def _json(value: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), content_type="application/json")


def _obj(value: Any, field: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, (str, bytes)):
        try:
            value = msgspec.json.decode(value)
        except msgspec.DecodeError:
            raise ApiFault("Client.Request.bad_json", f"{field}: not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiFault("Client.Request.bad_json", f"{field}: not a JSON object")
    return value


async def read_call(request: web.Request) -> tuple[dict[str, Any], dict[str, Any]]:
    """auth_info and params of an API request, read the way the billing API reads them."""
    raw_auth: Any = request.query.get("auth_info")
    raw_params: Any = request.query.get("params")
    if request.method == "POST" and request.can_read_body:
        ctype = request.content_type
        if ctype == "application/json":
            try:
                doc = msgspec.json.decode(await request.read())
            except msgspec.DecodeError:
                raise ApiFault("Client.Request.bad_json", "the body is not valid JSON") from None
            if not isinstance(doc, dict):
                raise ApiFault("Client.Request.bad_json", "the body is not a JSON object")
            raw_auth, raw_params = doc.get("auth_info", raw_auth), doc.get("params", raw_params)
        else:
            try:
                form = await request.post()
            except (ValueError, HttpProcessingError):
                raise ApiFault("Client.Request.bad_body", "the form body cannot be read") from None
            raw_auth = form.get("auth_info", raw_auth)
            raw_params = form.get("params", raw_params)
            if raw_auth is not None and not isinstance(raw_auth, str):
                raw_auth = raw_auth.file.read()
            if raw_params is not None and not isinstance(raw_params, str):
                raw_params = raw_params.file.read()
    auth = _obj(raw_auth, "auth_info")
    bearer = request.headers.get("Authorization", "")
    if bearer[:7].lower() == "bearer " and "access_token" not in auth:
        auth["access_token"] = bearer[7:].strip()
    if not auth:  # the cookies a login set stand for auth_info
        for name in API_COOKIES:
            if request.cookies.get(name):
                auth[name] = request.cookies[name]
    return auth, _obj(raw_params, "params")


# --- API methods ------------------------------------------------------------------------------


def _need(s: Session | None, *realms: str) -> Session:
    if s is None:
        raise auth_failed()
    if realms and s.realm not in realms:
        raise ApiFault("Server.Session.access_denied", f"not allowed in the {s.realm} realm")
    return s


def _int(params: dict[str, Any], key: str) -> int:
    try:
        return int(params.get(key) or 0)
    except (TypeError, ValueError):
        raise ApiFault("Client.Request.bad_param", f"{key} must be a number") from None


def m_get_version(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    return {"version": emu.name, "system": emu.data.system}


def m_ping(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    sess = emu.data.session_for(
        str(p.get("session_id") or (s.session_id if s else "")), str(p.get("access_token") or "")
    )
    return {"user_id": sess.ref}


def m_logout(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    sess = s or emu.data.session_for(
        str(p.get("session_id") or ""), str(p.get("access_token") or "")
    )
    emu.data.close_session(sess)
    return {"success": 1}


def m_refresh(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    return emu.data.login_answer(emu.data.refresh_session(str(p.get("refresh_token") or "")))


def m_set_context(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    _need(s).context.update(p)
    return {"success": 1}


def m_customer_info(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    s = _need(s)
    own = emu.data.customer_of(s)
    if own is not None:
        cust = emu.data.customers.get(own)
    else:
        cust = emu.data.find_customer(p.get("i_customer"), p.get("login"))
    return {"customer_info": cust.info()} if cust else {}


def m_customer_list(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    _need(s, "admin")
    rows = [
        c.info()
        for _, c in sorted(emu.data.customers.items())
        if not (c.exported and flag(p.get("skip_exported")))
    ]
    if p.get("name"):
        rows = [r for r in rows if str(p["name"]).strip("%") in r["name"]]
    return window(rows, p, "customer_list")


def m_add_customer(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    _need(s, "admin")
    return {"i_customer": emu.data.add_customer(_obj(p.get("customer_info"), "customer_info"))}


def m_account_info(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    s = _need(s)
    acc = (
        emu.data.find_account(p.get("i_account"), p.get("id"))
        if ("i_account" in p or "id" in p)
        else (emu.data.accounts.get(int(s.ref)) if s.realm == "account" else None)
    )
    own = emu.data.customer_of(s)
    if acc is None or (own is not None and acc.i_customer != own):
        return {}
    return {"account_info": acc.info()}


def m_account_list(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    s = _need(s)
    own = emu.data.customer_of(s)
    want = own if own is not None else (_int(p, "i_customer") or None)
    rows = []
    for _, a in sorted(emu.data.accounts.items()):
        cust = emu.data.customers.get(a.i_customer)
        if want is not None and a.i_customer != want:
            continue
        if flag(p.get("skip_exported")) and cust is not None and cust.exported:
            continue
        rows.append(a.info())
    return window(rows, p, "account_list")


def m_add_account(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    s = _need(s, "admin", "customer")
    info = _obj(p.get("account_info"), "account_info")
    own = emu.data.customer_of(s)
    if own is not None:
        info["i_customer"] = own
    return {"i_account": emu.data.add_account(info)}


def m_number_info(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    _need(s)
    acc = emu.data.find_number(str(p.get("number") or p.get("did_number") or ""))
    if acc is None:
        raise ApiFault("Server.DID.not_found", "number not found")
    return {
        "number_info": {"number": acc.did, "i_account": acc.i_account, "i_customer": acc.i_customer}
    }


def m_invoice_list(emu: BillingEmulator, s: Session | None, p: dict[str, Any]) -> dict[str, Any]:
    s = _need(s)
    own = emu.data.customer_of(s)
    i_customer = own if own is not None else _int(p, "i_customer")
    rows = [
        {
            "i_invoice": i_customer * 100 + n,
            "i_customer": i_customer,
            "amount": 10.0 * n,
            "url": f"/invoice/{i_customer * 100 + n}.pdf",
        }
        for n in (1, 2, 3)
    ]
    return window(rows, p, "invoice_list")


METHODS: dict[str, Handler] = {
    "Generic/get_version": m_get_version,
    "Session/ping": m_ping,
    "Session/logout": m_logout,
    "Session/refresh_access_token": m_refresh,
    "Session/set_session_context": m_set_context,
    "Customer/get_customer_info": m_customer_info,
    "Customer/get_customer_list": m_customer_list,
    "Customer/add_customer": m_add_customer,
    "Account/get_account_info": m_account_info,
    "Account/get_account_list": m_account_list,
    "Account/add_account": m_add_account,
    "DID/get_number_info": m_number_info,
    "Invoice/get_invoice_list": m_invoice_list,
}
NO_SESSION = {
    "Generic/get_version",
    "Session/ping",
    "Session/logout",
    "Session/refresh_access_token",
}


class BillingEmulator:
    """A running emulated billing system: ``.url``, ``.stop()``, ``.log``, ``.data``."""

    def __init__(self, data: BillingData, compress: bool = False) -> None:
        self.data = data
        #: gzip answers for clients that accept it, as a billing system behind a web server
        #: with compression on (nginx ``gzip on``, Apache mod_deflate) does
        self.compress = compress
        self.name = data.name
        self.system = data.system
        self.log: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    # -- migration hooks (the tests and the demo move customers with these) ----------------

    def export_customer(self, i_customer: int | str) -> dict[str, Any]:
        """Mark a customer exported here (source) and return the record to import."""
        return self.data.export_record(int(i_customer))

    def import_customer(self, record: dict[str, Any]) -> int:
        """Receive a customer exported by the other system (target)."""
        return self.data.import_record(record)

    def seed(self, rows: Iterable[dict[str, Any]]) -> None:
        self.data.seed(rows)

    # -- serving ----------------------------------------------------------------------------

    async def handle_api(self, request: web.Request) -> web.StreamResponse:
        name = f"{request.match_info['service']}/{request.match_info['method']}"
        entry = billing_web.log_entry(request, name)
        self.log.append(entry)
        try:
            auth, params = await read_call(request)
            entry["params"] = params
            if name == "Session/login":
                login = str(params.get("login") or auth.get("login") or "")
                realm, ref = self.data.authenticate(
                    login,
                    str(params.get("password") or auth.get("password") or ""),
                    str(params.get("token") or auth.get("token") or ""),
                )
                sess = self.data.open_session(realm, ref)
                entry["user"] = f"{realm}:{ref}"
                resp = _json(self.data.login_answer(sess))
                for cookie in API_COOKIES:
                    resp.set_cookie(cookie, getattr(sess, cookie), path="/", httponly=True)
                return resp
            handler = METHODS.get(name)
            if handler is None:
                raise ApiFault("Client.Request.unknown_method", f"unknown method {name}")
            user = self._auth(auth) if (auth or name not in NO_SESSION) else None
            if user is not None:
                entry["user"] = f"{user.realm}:{user.ref}"
            try:
                return _json(handler(self, user, params))
            except (TypeError, ValueError) as exc:  # a param of the wrong type: int("x")
                raise ApiFault("Client.Request.bad_param", f"a param is not valid: {exc}") from None
        except ApiFault as exc:
            entry["fault"] = exc.faultcode
            return _fault(exc)

    def _auth(self, auth: dict[str, Any]) -> Session | None:
        if auth.get("session_id") or auth.get("access_token"):
            return self.data.session_for(
                str(auth.get("session_id") or ""), str(auth.get("access_token") or "")
            )
        if auth.get("login"):
            realm, ref = self.data.authenticate(
                str(auth["login"]), str(auth.get("password") or ""), str(auth.get("token") or "")
            )
            return Session("", "", "", realm, ref, float("inf"))
        raise auth_failed()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._stamp], client_max_size=64 << 20)
        app.router.add_route("*", "/rest/{service}/{method}", self.handle_api)
        billing_web.add_routes(app, self)
        return app

    @web.middleware
    async def _stamp(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            exc.headers[SYSTEM_HEADER] = self.name
            raise
        if not resp.prepared:
            resp.headers[SYSTEM_HEADER] = self.name
            if self.compress and "gzip" in request.headers.get("Accept-Encoding", ""):
                resp.enable_compression(web.ContentCoding.gzip)
        return resp

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        h, p = sock.getsockname()[:2]
        self.url = f"http://{h if ':' not in h else f'[{h}]'}:{p}"
        log.info("billing emulator %s (%s) on %s", self.name, self.system, self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def start_billing_emulator(
    name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    seed: Iterable[dict[str, Any]] | None = None,
    *,
    system: str | None = None,
    session_ttl: float = 3600.0,
    admins: dict[str, str] | None = None,
    compress: bool = False,
) -> BillingEmulator:
    """Start one emulated system on ``host:port`` (0: a free port) and return its handle.

    ``seed`` takes the rows the demo imports into its store (``customer_id``,
    ``identities``, ``system``, optional ``name`` / ``password``, default password
    ``secret``); ``system`` defaults to ``target`` for a name ending in ``target`` or
    ``115``, else ``source``.  Admin login ``admin`` / ``admin`` (API token
    ``admin-api-token``) exists on both.  ``compress``: answers gzipped for clients that
    accept it (a system behind a compressing web server)."""
    if system is None:
        system = "target" if name.lower().endswith(("target", "115")) else "source"
    if system not in ("source", "target"):
        raise ValueError(f"system must be source or target, not {system!r}")
    data = BillingData(name, system, session_ttl, admins)
    if seed is not None:
        data.seed(seed)
    emu = BillingEmulator(data, compress)
    await emu.start(host, port)
    return emu


def sync_systems(
    source: BillingEmulator,
    target: BillingEmulator,
    placement: Iterable[tuple[str, str]],
    copying: Iterable[str] = (),
) -> int:
    """Make the two systems agree with the store after ``dsbc migrate`` / ``rollback``.

    ``placement`` is ``(customer_id, system)`` per customer (e.g. from the store's
    customers); a customer now on the target is exported by the source and imported by
    the target, one back on the source is removed from the target.  ``copying``: source
    customers a batch holds locked (its data-copy window): the target gets their copy
    now, as the operator's export would, so that what the batch held (a login) finds
    them there at the flip.  Returns how many customers moved.  The demo calls this after
    each store refresh."""
    moved = 0
    for cid in copying:
        i = int(cid) if cid.isdigit() else -1
        if i in source.data.customers and i not in target.data.customers:
            target.import_customer(source.export_customer(i))
            source.data.customers[i].exported = False  # still served there until the flip
    for cid, system in placement:
        if not cid.isdigit():
            continue
        i = int(cid)
        src = source.data.customers.get(i)
        on_target = i in target.data.customers
        if system == "target" and src is not None:
            if not on_target:
                target.import_customer(source.export_customer(i))
                moved += 1
            elif not src.exported:
                src.exported = True
        elif system == "source" and src is not None and on_target:
            target.data.remove_record(i)
            src.exported = False
            moved += 1
    return moved


def sample_rows() -> list[dict[str, Any]]:
    """A small sample population (three customers on the source, two on the target).

    The rows import as they are into the location store (``store.import_rows``) and
    seed the emulators, so the demo's store and systems agree.  Passwords: ``secret``."""
    rows: list[dict[str, Any]] = []
    people = [
        ("1", "alice", "source"),
        ("2", "bob", "source"),
        ("3", "carol", "source"),
        ("4", "dave", "target"),
        ("5", "erin", "target"),
    ]
    for cid, login, system in people:
        n = int(cid)
        rows.append(
            {
                "customer_id": cid,
                "system": system,
                "identities": [
                    f"login:{login}",
                    f"account:10000{n}",
                    f"i_account:{100 + n}",
                    f"did:1555010{n}",
                    f"cpe:0004f2a1b2c{n}",
                ],
            }
        )
    return rows
