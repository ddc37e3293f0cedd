"""The dispatch flows of SPEC section 7, one per realm kind.

- customer / account realms: ``Session/login`` to the target, then the source on an
  authentication fault (a login the store knows goes straight to its owner, held while
  the customer is locked); the session that came back is stored, and everything that
  names it follows it; a browser whose session lives on the source gets the
  ``authorized-by-remote`` cookie and follows it;
- admin realms: one session on each system behind the one returned (a *twin*);
  entity owner first, else a merged list, a create on the target (or the context
  system) recorded in the store, or the session's system;
- cpe: the device's owner; the ACS's session cookie then sticks to that system.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from aiohttp import web

from api_proxy.classify import Action, Classified, RealmKind
from api_proxy.errors import (
    BackendUnavailable,
    BadRequest,
    NoAnswerAtLogin,
    NoSessionOnSystem,
    NotMadeByDispatcher,
    UpstreamFault,
    is_auth_fault,
)
from api_proxy.forward import LIST_ANSWER, Answer, Ctx, Forwarder
from api_proxy.listmerge import merge_lists
from api_proxy.plan import find_session_of, plan, session_keys
from api_proxy.records import (
    Creds,
    TwinExtra,
    created,
    key_records,
    login_result,
    make_records,
    refreshed_keys,
    session_key,
    twin_of,
)
from api_proxy.router import Owner, SessionRecord

log = logging.getLogger("api_proxy.flows")
ORDER = ("target", "source")
#: a system's web server answering for it (its application is down): not an answer of the
#: system's, so a login or session tried in turn goes on to the next system
GATEWAY_ERRORS = frozenset({502, 503, 504})
_doc = msgspec.json.Decoder(dict[str, Any])


def web_login_failed(a: Answer) -> bool:
    """A self-care form login the back end refused: a login that succeeds opens a session,
    so an answer without a cookie (the form again, or a redirect back to it) is a refusal."""
    return not (200 <= a.status < 400 and "Set-Cookie" in a.headers)


class Flows(Forwarder):
    async def dispatch(self, ctx: Ctx) -> web.StreamResponse:
        system = self.plan(ctx.c)
        if system is not None:
            return await self.forward(ctx, system)
        kind = ctx.c.kind
        if kind is RealmKind.CUSTOMER:
            return await self.customer(ctx)
        if kind is RealmKind.CPE:
            return await self.cpe(ctx)
        return await self.admin(ctx)

    # -- the common case ------------------------------------------------------------------

    def plan(self, c: Classified, keys: dict[tuple[str, str], str] | None = None) -> str | None:
        """The system a request goes to unchanged, with its answer relayed as it is; None
        when its flow does more (``plan.plan``, compiled; the fast path calls it
        directly).  ``keys``: a connection's cache of store keys (``find_session_of``)."""
        return plan(self, c, keys)

    # -- sessions in the store -------------------------------------------------------------

    def find_session(self, ctx: Ctx) -> SessionRecord | None:
        return self.find_session_of(ctx.c)

    def find_session_of(
        self, c: Classified, keys: dict[tuple[str, str], str] | None = None
    ) -> SessionRecord | None:
        """The live session the request's credentials name (``plan.find_session_of``)."""
        return find_session_of(self, c, keys)

    def remember(
        self, system: str, twin: TwinExtra, expires_at: float, ctx: Ctx, customer_id: str = ""
    ) -> None:
        if ctx.c.kind is RealmKind.CUSTOMER:  # followed, never rewritten: the keys will do
            keys = twin.creds.get(system, Creds()).keys()
            records = key_records(system, keys, expires_at, ctx.realm, customer_id)
        else:
            records = make_records(system, twin, expires_at, ctx.realm, customer_id)
        self.store_sessions(records)

    def store_sessions(self, records: list[SessionRecord]) -> None:
        # one small store transaction per record, on the loop (a login's worth); a store
        # that cannot take it does not fail the request: the session is found again by
        # probing
        try:
            for rec in records:
                self.router.put_session(rec)
        except Exception:
            self.metrics["store_errors"] += 1
            log.warning("could not store an API session", exc_info=True)

    def forget(self, rec: SessionRecord) -> None:
        try:
            for key in twin_of(rec).keys or [rec.key]:
                self.router.delete_session(key)
        except Exception:
            self.metrics["store_errors"] += 1
            log.warning("could not delete an API session", exc_info=True)

    def reusable(self, ctx: Ctx) -> bool:
        return (ctx.prefix is not None and ctx.complete) or not ctx.request.body_exists

    def remote_cookie(self, ctx: Ctx, system: str) -> list[str]:
        """The authorized-by-remote cookie for a browser whose session is now on ``system``:
        set for the source, else expired (when the browser has it)."""
        if system == "source":
            secure = "; Secure" if ctx.proto == "https" else ""
            return [f"{self.settings.remote_cookie}=1; Path=/; HttpOnly; SameSite=Lax{secure}"]
        return self.expire_remote_cookie(ctx)

    def expire_remote_cookie(self, ctx: Ctx) -> list[str]:
        """The Set-Cookie that deletes the browser's authorized-by-remote cookie (the path
        and no domain, as it was set), or nothing when the browser has none."""
        if not ctx.c.remote:
            return []
        secure = "; Secure" if ctx.proto == "https" else ""
        return [f"{self.settings.remote_cookie}=; Path=/; Max-Age=0{secure}"]

    async def try_in_order(
        self, ctx: Ctx, order: tuple[str, ...] | list[str], web_form: bool = False
    ) -> tuple[Answer, bool]:
        """Ask each system in turn until one does not refuse the credentials.

        Returns the answer and whether it is still a refusal.  A system that does not
        answer is skipped, but if every other one refuses, its silence is the answer."""
        if not self.reusable(ctx):
            order = order[:1]
        unavailable: BackendUnavailable | None = None
        for i, system in enumerate(order):
            last = i == len(order) - 1
            try:
                a = await self.ask(ctx, system)
                if a.status in GATEWAY_ERRORS and not last:
                    # the system's web server answered for its stopped application
                    a.resp.release()
                    raise self.backends[system].failed(f"HTTP {a.status}")
            except BackendUnavailable as exc:
                if last:
                    raise unavailable or exc from None
                unavailable = unavailable or exc
                continue
            refused = (
                web_login_failed(a)
                if web_form
                else (a.body is not None and is_auth_fault(a.status, a.body))
            )
            if refused and not last:
                a.resp.release()
                self.metrics["login_fallbacks"] += 1
                continue
            if refused and unavailable is not None:
                a.resp.release()
                raise unavailable
            return a, refused
        raise AssertionError("unreachable: order is never empty")

    async def probe(self, ctx: Ctx, customer_id: str = "") -> web.StreamResponse:
        """A session (or login) dsbc does not know: the target, then the source; the
        system that accepts it is remembered for the session's next requests."""
        a, refused = await self.try_in_order(ctx, ORDER)
        creds = ctx.c.creds
        if not refused and a.status < 400 and session_keys(creds):
            twin = TwinExtra(
                creds={a.system: Creds(creds.session_id, creds.access_token, creds.refresh_token)},
                learned=True,
            )
            self.remember(a.system, twin, self.now() + self.settings.session_ttl, ctx, customer_id)
            self.metrics["sessions_learned"] += 1
        return await self.answer(ctx, a)

    # -- customer and account realms -------------------------------------------------------

    async def customer(self, ctx: Ctx) -> web.StreamResponse:
        c = ctx.c
        if c.action in (Action.LOGIN, Action.WEB_LOGIN):
            return await self.login(ctx)
        rec = self.find_session(ctx)
        if rec is not None:
            if c.action is Action.LOGOUT:
                return await self.logout(ctx, rec.system, rec)
            if c.action is Action.REFRESH:
                return await self.refresh(ctx, rec)
            if c.creates:  # what the customer adds is routed by every dispatcher at once
                return await self.create(ctx, rec.system, rec.customer_id, {})
            return await self.forward(ctx, rec.system)
        if session_keys(c.creds):
            return await self.probe(ctx)
        if c.keys:  # login and password on each call
            owner = await self.resolve(c.keys)
            if owner is not None and owner.known:
                return await self.forward(ctx, owner.system)
            return await self.probe(ctx)
        if c.action is Action.LOGOUT:  # a browser with the authorized-by-remote cookie
            return await self.logout(ctx, "source" if c.remote else "target")
        return await self.forward(ctx, "source" if c.remote else "target")

    async def login(self, ctx: Ctx) -> web.StreamResponse:
        c = ctx.c
        self.metrics["logins"] += 1
        owner: Owner | None = await self.resolve(c.keys) if c.keys else None
        order = [owner.system] if owner is not None and owner.known else list(ORDER)
        web_form = c.action is Action.WEB_LOGIN
        a, refused = await self.try_in_order(ctx, order, web_form)
        cookies: list[str] = []
        if not refused and a.status < 400:
            if not web_form and a.body is not None:
                res = login_result(a.body, self.now(), self.settings.session_ttl)
                if res is not None:
                    self.remember(
                        a.system,
                        TwinExtra(creds={a.system: res.creds}),
                        res.expires_at,
                        ctx,
                        owner.customer_id if owner else "",
                    )
            cookies = self.remote_cookie(ctx, a.system)
        return await self.answer(ctx, a, cookies)

    async def logout(
        self, ctx: Ctx, system: str, rec: SessionRecord | None = None
    ) -> web.StreamResponse:
        """A logout (API or self-care page) on ``system``.  Once it succeeded, the session's
        records go, and so does the browser's authorized-by-remote cookie: left behind, it
        would send the next visit (another customer's, or this one's after its move) to
        the source's pages."""
        resp = await self.open(ctx, system)
        cookies: list[str] = []
        if resp.status < 400:
            if rec is not None:
                self.forget(rec)
            cookies = self.expire_remote_cookie(ctx)
        return await self.relay(ctx, system, resp, cookies=cookies)

    async def refresh(self, ctx: Ctx, rec: SessionRecord) -> web.StreamResponse:
        """A customer or account session's refresh (admin twins refresh on both systems:
        ``on_both``): its new access token is stored beside the keys still valid."""
        a = await self.ask(ctx, rec.system)
        if a.status == 200 and a.body is not None:
            res = login_result(a.body, self.now(), self.settings.session_ttl)
            if res is not None:
                keys = refreshed_keys(twin_of(rec).keys or [rec.key], res.creds)
                expires = max(res.expires_at, rec.expires_at)
                self.store_sessions(
                    key_records(rec.system, keys, expires, ctx.realm, rec.customer_id)
                )
        return await self.answer(ctx, a)

    # -- admin realms ----------------------------------------------------------------------

    def twin_kw(
        self, rec: SessionRecord | None, twin: TwinExtra | None, system: str
    ) -> dict[str, Any]:
        """How to send on ``system``: with the client's own credentials or the twin's."""
        if rec is None or twin is None or system == rec.system:
            return {}
        wanted = twin.creds.get(system)
        if wanted is None:
            raise self.no_session(twin, system)
        return {"held": twin.creds.get(rec.system, Creds()), "wanted": wanted}

    @staticmethod
    def no_session(twin: TwinExtra, system: str) -> NoSessionOnSystem:
        """The fault for a twin without a session on ``system``: refused at login, or
        silent then (a system that was down: logging in again opens the session), or a
        session dsbc did not make."""
        if twin.learned:
            return NotMadeByDispatcher(system, next(iter(twin.creds), "other"))
        return NoAnswerAtLogin(system) if system in twin.unanswered else NoSessionOnSystem(system)

    async def admin(self, ctx: Ctx) -> web.StreamResponse:
        c = ctx.c
        if c.action is Action.LOGIN:
            return await self.admin_login(ctx)
        rec = self.find_session(ctx)
        if rec is None and session_keys(c.creds):
            return await self.probe(ctx)
        twin = twin_of(rec) if rec is not None else None
        home = (twin.ctx if twin and twin.ctx else "") or (rec.system if rec else "target")
        if c.action is Action.SET_CONTEXT:
            return self.set_context(ctx, rec, twin)
        if c.action in (Action.LOGOUT, Action.REFRESH) and rec is not None and twin is not None:
            return await self.on_both(ctx, rec, twin)
        if c.action is Action.LIST:
            return await self.merged(ctx, rec, twin)
        # creates without an owner go to the target unless the context names a system
        system = (twin.ctx if twin and twin.ctx else "target") if c.creates else home
        owner_cid = ""
        if c.action is Action.ENTITY:
            owner = await self.resolve(c.keys)
            if owner is not None:
                system, owner_cid = owner.system, owner.customer_id
        if c.creates:
            return await self.create(ctx, system, owner_cid, self.twin_kw(rec, twin, system))
        return await self.forward(ctx, system, **self.twin_kw(rec, twin, system))

    async def admin_login(self, ctx: Ctx) -> web.StreamResponse:
        self.metrics["logins"] += 1
        got = await asyncio.gather(*(self.ask(ctx, s) for s in ORDER), return_exceptions=True)
        answers = [a for a in got if isinstance(a, Answer)]
        for a in got:
            if isinstance(a, BaseException) and not isinstance(a, BackendUnavailable):
                for b in answers:
                    b.resp.close()
                raise a
        ok: dict[str, Creds] = {}
        expires = 0.0
        failed: list[str] = []  # answered, but neither with a session nor with a refusal
        for a in answers:
            if a.status == 200 and a.body is not None:
                res = login_result(a.body, self.now(), self.settings.session_ttl)
                if res is not None:
                    ok[a.system] = res.creds
                    expires = max(expires, res.expires_at)
                    continue
            if a.body is None or not is_auth_fault(a.status, a.body):
                failed.append(a.system)  # (a 502 page, a fault of its own)
        silent = [a for a in got if isinstance(a, BackendUnavailable)]
        if silent and not ok:
            # one system refused, the other did not answer: it may have said yes
            for a in answers:
                a.resp.release()
            raise silent[0]
        primary = next((a for a in answers if a.system in ok), answers[0])
        for a in answers:
            if a is not primary:
                a.resp.release()
        if ok:
            # a system that did not answer gets no second try later: that would need the
            # admin's password or API token, kept in the store (shared by every node, on
            # disk) for the session's lifetime, where no other record keeps a secret that
            # outlives its session.  Its requests get a fault that says to log in again.
            unanswered = [exc.system for exc in silent] + failed
            if unanswered:
                log.warning(
                    "admin session opened on the %s system alone: the %s system did not "
                    "answer the login",
                    primary.system,
                    " and ".join(unanswered),
                )
            self.remember(primary.system, TwinExtra(creds=ok, unanswered=unanswered), expires, ctx)
        return await self.answer(ctx, primary)

    def set_context(
        self, ctx: Ctx, rec: SessionRecord | None, twin: TwinExtra | None
    ) -> web.StreamResponse:
        if rec is None or twin is None:
            raise BadRequest(
                "Session/set_session_context with a system needs a session opened through dsbc"
            )
        if ctx.c.context not in twin.creds:
            raise self.no_session(twin, ctx.c.context)
        twin.ctx = ctx.c.context
        self.remember(rec.system, twin, rec.expires_at, ctx, rec.customer_id)
        body = msgspec.json.encode({"success": 1, "system": twin.ctx})
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    async def on_both(self, ctx: Ctx, rec: SessionRecord, twin: TwinExtra) -> web.StreamResponse:
        """Logout or refresh on every system the twin has a session on."""
        systems = [s for s in ORDER if s in twin.creds]
        got = await asyncio.gather(
            *(self.ask(ctx, s, **self.twin_kw(rec, twin, s)) for s in systems),
            return_exceptions=True,
        )
        answers = {a.system: a for a in got if isinstance(a, Answer)}
        if rec.system not in answers:
            for a in answers.values():
                a.resp.release()
            err = next((g for g in got if isinstance(g, BaseException)), None)
            raise err if err is not None else BackendUnavailable(rec.system)
        if ctx.c.action is Action.LOGOUT:
            self.forget(rec)
        else:
            expires = rec.expires_at
            for s, a in answers.items():
                res = (
                    login_result(a.body or b"", self.now(), self.settings.session_ttl)
                    if a.status == 200
                    else None
                )
                if res is not None:
                    old = twin.creds[s]
                    twin.creds[s] = Creds(
                        old.session_id,
                        res.creds.access_token or old.access_token,
                        res.creds.refresh_token or old.refresh_token,
                    )
                    expires = max(expires, res.expires_at)
            self.remember(rec.system, twin, expires, ctx, rec.customer_id)
        for s, a in answers.items():
            if s != rec.system:
                a.resp.release()
        return await self.answer(ctx, answers[rec.system])

    async def merged(
        self, ctx: Ctx, rec: SessionRecord | None, twin: TwinExtra | None
    ) -> web.StreamResponse:
        call = ctx.c.call
        assert call is not None
        if rec is not None and twin is not None and twin.learned:
            # no twin to merge with (GAPS): the list of the session's own system
            return await self.forward(ctx, rec.system)

        async def fetch(system: str, params: dict[str, Any]) -> tuple[int, bytes]:
            kw = self.twin_kw(rec, twin, system)
            a = await self.ask(ctx, system, params=params, cap=LIST_ANSWER, **kw)
            if a.status in GATEWAY_ERRORS:
                a.resp.release()
                raise self.backends[system].failed(f"HTTP {a.status}")
            if a.body is None:
                a.resp.close()
                raise UpstreamFault(
                    f"the {system} system's list answer is over the dispatcher's limit"
                )
            return a.status, a.body

        status, body = await merge_lists(fetch, call.params, ctx.c.list_key)
        self.metrics["lists_merged"] += 1
        return web.Response(status=status, body=body, content_type="application/json", charset="utf-8")

    async def create(
        self, ctx: Ctx, system: str, owner_cid: str, kw: dict[str, Any]
    ) -> web.StreamResponse:
        a = await self.ask(ctx, system, **kw)
        if a.status == 200 and a.body is not None and ctx.c.call is not None:
            try:
                doc = _doc.decode(a.body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                doc = {}
            made = created(ctx.c.call, doc, owner_cid)
            if made is not None:
                try:
                    self.router.record_created(made[0], system, made[1])
                    self.metrics["creates_recorded"] += 1
                except Exception:
                    log.exception("could not record %s on customer %s", made[1], made[0])
        return await self.answer(ctx, a)

    # -- CPE -------------------------------------------------------------------------------

    async def cpe(self, ctx: Ctx) -> web.StreamResponse:
        c = ctx.c
        system = ""
        if c.action is Action.ENTITY:
            owner = await self.resolve(c.keys)
            system = owner.system if owner is not None else ""
        if not system:
            now = self.now()
            for name, value in list(c.cookies.items())[:8]:
                rec = self.router.get_session(session_key("ck", f"{name}={value}"))
                if rec is not None and rec.expires_at > now:
                    system = rec.system
                    break
        conn = ctx.request.protocol
        if not system:
            # a CPE that returns no cookie keeps its CWMP session on one connection (TR-069
            # 3.2.1): its empty POSTs and RPC answers follow the Inform's system
            system = getattr(conn, "cpe_system", "") or self.default_system()
        if hasattr(conn, "cpe_system"):
            conn.cpe_system = system
        resp = await self.open(ctx, system)
        expires = self.now() + self.settings.session_ttl
        pairs = [sc.split(";", 1)[0].strip() for sc in resp.headers.getall("Set-Cookie", [])[:4]]
        self.store_sessions(
            [
                SessionRecord(
                    key=session_key("ck", p), system=system, expires_at=expires, realm=ctx.realm
                )
                for p in pairs
                if "=" in p
            ]
        )
        return await self.relay(ctx, system, resp)
