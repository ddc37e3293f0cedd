"""The web side of an emulated billing system: self-care pages, invoices, CPE, TR-069.

- ``GET /`` a login page; ``POST /login`` (``login``, ``password``) answers 303 to
  ``/home`` with the ``sc_session`` cookie, or 401 with the page again;
- ``GET /home``, ``GET /invoices``, ``GET /invoice/<n>.pdf`` (``?size=BYTES`` streams a
  large file without holding it), ``GET /logout``;
- ``GET /prov/<anything naming a MAC>``: the device's configuration, 404 if unknown;
- ``POST /cwmp``: a TR-069 ACS: an ``Inform`` gets an ``InformResponse`` and the
  ``cwmp_session`` cookie, the empty POST that follows gets 204;
- ``/_emulator/echo`` (size and SHA-256 of a streamed upload) and ``/_emulator/drop``
  (a response cut off mid-body) let tests check streaming and failure handling.

Every page names the system (``MR100 self-care``) so a person, or a browser test, sees
which system served it.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import re
import secrets
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dsbc.emulator.billing_data import ApiFault

if TYPE_CHECKING:
    from dsbc.emulator.billing import BillingEmulator

COOKIE = "sc_session"
SYSTEM_HEADER = "X-Billing-System"
_MAC = re.compile(r"(?i)(?<![0-9a-f])([0-9a-f]{2}(?:[:\-]?[0-9a-f]{2}){5})(?![0-9a-f])")
_SERIAL = re.compile(rb"<(?:\w+:)?SerialNumber>([^<]{1,64})<")
CHUNK = 64 * 1024


def log_entry(request: web.Request, what: str, user: str = "") -> dict[str, Any]:
    """What a test may want to know of a request: who sent it, through what."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return {
        "path": request.path,
        "method": what,
        "user": user,
        "remote": request.remote,
        "peer": f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "",
        "xff": ", ".join(request.headers.getall("X-Forwarded-For", ())),
        "proto": request.headers.get("X-Forwarded-Proto", ""),
        "host": request.headers.get("X-Forwarded-Host", ""),
    }


def _page(emu: BillingEmulator, title: str, body: str, status: int = 200) -> web.Response:
    doc = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(emu.name)} self-care: {html.escape(title)}</title></head>"
        f"<body><header id='system'>{html.escape(emu.name)} self-care</header>"
        f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return web.Response(text=doc, status=status, content_type="text/html")


def _login_form(error: str = "") -> str:
    err = f"<p id='error'>{html.escape(error)}</p>" if error else ""
    return (
        f"{err}<form id='login' method='post' action='/login'>"
        "<label>Login <input id='user' name='login' autocomplete='username'></label>"
        "<label>Password <input id='pass' name='password' type='password'></label>"
        "<button id='submit' type='submit'>Log in</button></form>"
    )


class Web:
    def __init__(self, emu: BillingEmulator) -> None:
        self.emu = emu
        self.cwmp_sessions: dict[str, str] = {}  # cookie -> device MAC

    def _session(self, request: web.Request) -> Any:
        sid = request.cookies.get(COOKIE, "")
        try:
            return self.emu.data.session_for(sid) if sid else None
        except ApiFault:
            return None

    def _logged(self, request: web.Request, what: str, user: str = "") -> None:
        self.emu.log.append(log_entry(request, what, user))

    async def index(self, request: web.Request) -> web.StreamResponse:
        self._logged(request, "web:index")
        if self._session(request) is not None:
            raise web.HTTPSeeOther("/home")
        return _page(self.emu, "Log in", _login_form())

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        login, password = str(form.get("login", "")), str(form.get("password", ""))
        self._logged(request, "web:login", login)
        try:
            realm, ref = self.emu.data.authenticate(login, password)
        except ApiFault:
            return _page(self.emu, "Log in", _login_form("Login failed"), status=401)
        if realm == "admin":
            return _page(
                self.emu, "Log in", _login_form("Administrators use the admin portal"), status=401
            )
        sess = self.emu.data.open_session(realm, ref)
        resp = web.HTTPSeeOther("/home")
        resp.set_cookie(COOKIE, sess.session_id, path="/", httponly=True, samesite="Lax")
        raise resp

    async def home(self, request: web.Request) -> web.StreamResponse:
        sess = self._session(request)
        self._logged(request, "web:home", sess.ref if sess else "")
        if sess is None:
            raise web.HTTPSeeOther("/")
        cust = self.emu.data.customers.get(self.emu.data.customer_of(sess) or -1)
        name = cust.name if cust else sess.ref
        return _page(
            self.emu,
            f"Welcome, {name}",
            f"<p id='served-by'>Served by {html.escape(self.emu.name)}</p>"
            "<a id='invoices' href='/invoices'>Invoices</a> <a href='/logout'>Log out</a>",
        )

    async def invoices(self, request: web.Request) -> web.StreamResponse:
        sess = self._session(request)
        self._logged(request, "web:invoices", sess.ref if sess else "")
        if sess is None:
            raise web.HTTPSeeOther("/")
        i_customer = self.emu.data.customer_of(sess) or 0
        numbers = [i_customer * 100 + n for n in (1, 2, 3)]
        items = "".join(
            f"<li><a class='invoice' href='/invoice/{k}.pdf'>Invoice {k}</a></li>" for k in numbers
        )
        return _page(self.emu, "Invoices", f"<ul id='invoice-list'>{items}</ul>")

    async def invoice(self, request: web.Request) -> web.StreamResponse:
        sess = self._session(request)
        self._logged(request, "web:invoice", sess.ref if sess else "")
        if sess is None:
            raise web.HTTPSeeOther("/")
        number = request.match_info["number"]
        try:
            size = int(request.query.get("size", "0"))
        except ValueError:
            size = 0
        head = (f"%PDF-1.4\n% {self.emu.name} invoice {number}\n").encode()
        if size <= 0:
            body = head + b"1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
            return web.Response(body=body, content_type="application/pdf")
        resp = web.StreamResponse(
            headers={"Content-Type": "application/pdf", SYSTEM_HEADER: self.emu.name}
        )
        resp.content_length = size
        await resp.prepare(request)
        block = (head + b"0" * CHUNK)[:CHUNK]
        left = size
        while left > 0:
            n = min(left, CHUNK)
            await resp.write(block[:n])
            left -= n
        await resp.write_eof()
        return resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        sess = self._session(request)
        if sess is not None:
            self.emu.data.close_session(sess)
        resp = web.HTTPSeeOther("/")
        resp.del_cookie(COOKIE, path="/")
        raise resp

    async def provision(self, request: web.Request) -> web.StreamResponse:
        m = _MAC.search(request.path_qs)
        mac = re.sub(r"[:\-]", "", m.group(1)).lower() if m else ""
        self._logged(request, "cpe:provision", mac)
        acc = self.emu.data.find_device(mac) if mac else None
        if acc is None:
            raise web.HTTPNotFound(text=f"{self.emu.name}: no device {mac or '?'}\n")
        text = (
            f"# {self.emu.name} configuration for {mac}\n"
            f"account.1.user = {acc.id}\naccount.1.password = {acc.password}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def cwmp(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b"Inform" in body:
            m = _SERIAL.search(body)
            serial = m.group(1).decode("ascii", "replace") if m else ""
            mac = re.sub(r"[:\-\s]", "", serial).lower()
            self._logged(request, "cwmp:inform", mac)
            cookie = secrets.token_hex(8)
            self.cwmp_sessions[cookie] = mac
            resp = web.Response(
                text="<soap-env:Envelope "
                "xmlns:soap-env='http://schemas.xmlsoap.org/soap/envelope/' "
                "xmlns:cwmp='urn:dslforum-org:cwmp-1-0'><soap-env:Body><cwmp:InformResponse>"
                "<MaxEnvelopes>1</MaxEnvelopes></cwmp:InformResponse>"
                "</soap-env:Body></soap-env:Envelope>",
                content_type="text/xml",
            )
            resp.set_cookie("cwmp_session", cookie, path="/")
            return resp
        known = self.cwmp_sessions.get(request.cookies.get("cwmp_session", ""))
        self._logged(request, "cwmp:empty", known or "")
        if known is None:
            raise web.HTTPUnauthorized(text="no CWMP session\n")
        return web.Response(status=204)

    async def echo(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        except ConnectionResetError:  # the sender gave up: nothing to answer
            return web.Response(status=400)
        self._logged(request, "test:echo", str(size))
        return web.json_response(
            {
                "size": size,
                "sha256": digest.hexdigest(),
                "system": self.emu.name,
                "chunked": request.headers.get("Transfer-Encoding", ""),
            }
        )

    async def drop(self, request: web.Request) -> web.StreamResponse:
        after = int(request.query.get("after", "1000"))
        self._logged(request, "test:drop", str(after))
        resp = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", SYSTEM_HEADER: self.emu.name}
        )
        resp.content_length = after * 10
        await resp.prepare(request)
        await resp.write(b"x" * after)
        await asyncio.sleep(0.05)
        if request.transport is not None:
            request.transport.abort()
        return resp


def add_routes(app: web.Application, emu: BillingEmulator) -> None:
    w = Web(emu)
    app.router.add_get("/", w.index)
    app.router.add_post("/login", w.login)
    app.router.add_get("/home", w.home)
    app.router.add_get("/invoices", w.invoices)
    app.router.add_get("/invoice/{number}.pdf", w.invoice)
    app.router.add_get("/logout", w.logout)
    app.router.add_route("GET", "/prov/{tail:.*}", w.provision)
    app.router.add_post("/cwmp", w.cwmp)
    app.router.add_post("/_emulator/echo", w.echo)
    app.router.add_get("/_emulator/drop", w.drop)
