"""Sending one request to one system: the building blocks the dispatch flows use.

``Forwarder`` owns the two ``Backend`` pools, the metrics dict and the Router; it turns
a classified request (``Ctx``) into an upstream request for a named system (with the
credentials rewritten for a twin session when asked), relays or buffers the answer,
resolves owners and holds requests of locked customers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from api_proxy import apicall
from api_proxy.classify import Classified, RouteKey
from api_proxy.errors import CustomerLocked, DispatchError, UnknownEntity, fault_body
from api_proxy.h1relay import backend_bases
from api_proxy.records import Creds, rewrite_cookie, rewrite_for
from api_proxy.router import Owner, ProxySettings, Router, Vhost
from api_proxy.upstream import (
    Backend,
    BodyState,
    ClientStalled,
    read_small,
    relay,
    request_headers,
    response_headers,
    stream_body,
)

HOLD_POLL = 0.05  # seconds between looks at a locked customer's state
SMALL_ANSWER = 1 << 20  # answers dsbc reads (logins, creates, faults)
LIST_ANSWER = 64 << 20  # one system's page of a merged list (held to merge it)
METRIC_NAMES = (
    "requests",
    "faults",
    "bad_requests",
    "unknown_host",
    "to_source",
    "to_target",
    "logins",
    "login_fallbacks",
    "sessions_learned",
    "lists_merged",
    "creates_recorded",
    "held",
    "hold_timeouts",
    "backend_errors",
    "upstream_aborts",
    "client_timeouts",
    "too_large",
    "internal_errors",
    "store_errors",
)


def public_host(request: web.BaseRequest, proto: str) -> str:
    """The Host the client named, or (an HTTP/1.0 client that sent none) the address and
    port it reached, as nginx's ``$host:$server_port``; aiohttp's ``request.host`` gives
    the bare address then, and a redirect made public with it sent the client to port 80."""
    host = request.headers.get("Host")
    if host:
        return str(host)  # (str(): aiohttp is Any to pip's isolated type check)
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sock, tuple) or len(sock) < 2:
        return str(request.host)
    addr, port = str(sock[0]), int(sock[1])
    if ":" in addr:
        addr = f"[{addr}]"
    return addr if port == (443 if proto == "https" else 80) else f"{addr}:{port}"


class Ctx:
    """One request being dispatched."""

    __slots__ = (
        "c",
        "complete",
        "path",
        "prefix",
        "proto",
        "public_origin",
        "query",
        "realm",
        "remote",
        "request",
        "vhost",
    )

    def __init__(
        self,
        request: web.BaseRequest,
        vhost: Vhost,
        realm: str,
        c: Classified,
        prefix: bytes | None,
        complete: bool,
    ) -> None:
        self.request = request
        self.vhost = vhost
        self.realm = realm
        self.c = c
        self.prefix = prefix  # the body routing read (all of it when complete), None: no body read
        self.complete = complete
        raw = request.raw_path
        self.path, _, self.query = raw.partition("?")
        self.proto = "https" if request.secure else "http"
        self.public_origin = f"{self.proto}://{public_host(request, self.proto)}"
        self.remote = request.remote or ""


class Answer:
    """A back end's answer, read whole when small (``body`` None: still to stream)."""

    __slots__ = ("body", "headers", "resp", "status", "system")

    def __init__(self, system: str, resp: aiohttp.ClientResponse, body: bytes | None) -> None:
        self.system = system
        self.status = resp.status
        self.headers = resp.headers
        self.body = body
        self.resp = resp


class Forwarder:
    def __init__(self, settings: ProxySettings, router: Router) -> None:
        self.settings = settings
        self.router = router
        self.metrics: dict[str, int] = dict.fromkeys(METRIC_NAMES, 0)
        self.holding = 0  # requests waiting in hold() now (a draining worker waits for them)
        self._bases: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        s = settings
        self.backends = {
            name: Backend(
                name,
                timeout=s.timeout,
                connect_timeout=s.connect_timeout,
                pool_size=s.pool_size,
                verify=s.backend_verify,
                ca=s.backend_ca,
            )
            for name in ("source", "target")
        }

    # -- owners and holds ----------------------------------------------------------------------

    def owner_of(self, keys: Iterable[RouteKey]) -> tuple[RouteKey, Owner] | None:
        """The first key the store knows, else the first valid one (unknown policy)."""
        fallback = None
        for k in keys:
            o = self.router.owner(k.kind, k.value)
            if o is None:
                continue
            if o.known:
                return k, o
            if fallback is None:
                fallback = (k, o)
        return fallback

    async def resolve(self, keys: Iterable[RouteKey]) -> Owner | None:
        """The owner of the request, after holding while its customer is locked."""
        found = self.owner_of(keys)
        if found is None:
            return None
        key, owner = found
        if owner.system == "reject":
            raise UnknownEntity(f"{key.kind}:{key.value} is not known (store.unknown = reject)")
        if owner.state == "locked":
            owner = await self.hold(key, owner)
        return owner

    async def hold(self, key: RouteKey, owner: Owner) -> Owner:
        """Wait for a locked customer's flip (SPEC 1), up to the store's lock_hold."""
        self.metrics["held"] += 1
        self.holding += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.router.lock_hold
            while True:
                now = loop.time()
                if now >= deadline:
                    self.metrics["hold_timeouts"] += 1
                    raise CustomerLocked(
                        f"customer {owner.customer_id} is being migrated; try again shortly"
                    )
                await asyncio.sleep(min(HOLD_POLL, deadline - now))
                current = self.router.owner(key.kind, key.value)
                if current is None:
                    return owner._replace(state="active")
                if current.state != "locked":
                    return current
                owner = current
        finally:
            self.holding -= 1

    def default_system(self) -> str:
        system = self.router.default_system()
        if system not in ("source", "target"):
            raise UnknownEntity("this request names no known customer (store.unknown = reject)")
        return system

    # -- sending -------------------------------------------------------------------------------

    def build(
        self,
        ctx: Ctx,
        system: str,
        held: Creds | None = None,
        wanted: Creds | None = None,
        params: dict[str, Any] | None = None,
        identity: bool = False,
    ) -> tuple[str, CIMultiDict[str], Any, BodyState | None]:
        """(url, headers, data, body state) of the request for ``system``.

        ``wanted`` replaces the client's credentials ``held`` (a twin session); ``params``
        replaces the call's params (a list window); ``identity`` asks for an answer without
        content coding (one dsbc reads: a login, a list to merge, a create)."""
        req = ctx.request
        query = ctx.query
        body = ctx.prefix
        auth_info = None
        bearer = ""
        call = ctx.c.call
        if call is not None and wanted is not None and held is not None:
            auth_info, new_params, bearer = rewrite_for(call, held, wanted)
            params = params if params is not None else new_params
        if call is not None and (auth_info is not None or params is not None):
            body, query = apicall.encode(call, body, query, auth_info, params)
        drop = ("authorization",) if bearer else ()
        public = ctx.public_origin.partition("://")[2]
        headers = request_headers(req.headers, ctx.remote, ctx.proto, public, drop)
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        if wanted is not None and held is not None and "Cookie" in headers:
            # a client whose session is in the cookies the login set
            cookie = rewrite_cookie("; ".join(headers.getall("Cookie")), held, wanted)
            if cookie is not None:
                headers["Cookie"] = cookie
        if identity:
            headers["Accept-Encoding"] = "identity"
        url = ctx.vhost.base(system) + ctx.path + (f"?{query}" if query else "")
        if ctx.prefix is not None and ctx.complete:
            return url, headers, body, None  # bytes: can be sent again (a retry, a twin)
        if ctx.prefix is None and not req.body_exists:
            return url, headers, None, None
        # stream: what routing read (maybe rewritten), then the rest of the client's body
        state = BodyState()
        cl = req.content_length
        if cl is not None and body is ctx.prefix:
            headers["Content-Length"] = str(cl)
        data = stream_body(
            body or b"", req.content, self.settings.body_timeout, self.settings.max_body_size, state
        )
        return url, headers, data, state

    async def open(self, ctx: Ctx, system: str, **kw: Any) -> aiohttp.ClientResponse:
        url, headers, data, state = self.build(ctx, system, **kw)
        backend = self.backends[system]
        self.metrics["to_" + system] += 1
        return await backend.send(ctx.request.method, url, headers, data, state)

    async def ask(self, ctx: Ctx, system: str, cap: int = SMALL_ANSWER, **kw: Any) -> Answer:
        """Send and read the answer whole when it is small (else leave it to stream).

        The answer is asked for without content coding: dsbc reads it (a login's session,
        a refusal, a list to merge, a created id), and a back end behind a compressing web
        server (nginx ``gzip on``) would gzip it for a client that accepts gzip."""
        resp = await self.open(ctx, system, identity=True, **kw)
        body = await read_small(resp, cap, self.backends[system])
        return Answer(system, resp, body)

    async def relay(
        self,
        ctx: Ctx,
        system: str,
        resp: aiohttp.ClientResponse,
        body: bytes | None = None,
        cookies: Iterable[str] = (),
    ) -> web.StreamResponse:
        vhost = ctx.vhost
        bases = self._bases.get((vhost.source, vhost.target))
        if bases is None:  # once per vhost, not per answer
            bases = self._bases[(vhost.source, vhost.target)] = backend_bases([vhost.source, vhost.target])
        headers = response_headers(resp.headers, bases, ctx.public_origin)
        for c in cookies:
            headers.add("Set-Cookie", c)
        try:
            return await relay(
                ctx.request, resp, headers, self.backends[system], body, self.settings.send_timeout
            )
        except ClientStalled:
            self.metrics["client_timeouts"] += 1
            raise

    async def answer(
        self, ctx: Ctx, a: Answer, cookies: Iterable[str] = (), body: bytes | None = None
    ) -> web.StreamResponse:
        return await self.relay(ctx, a.system, a.resp, a.body if body is None else body, cookies)

    async def forward(self, ctx: Ctx, system: str, **kw: Any) -> web.StreamResponse:
        """The common case: send to ``system`` and stream the answer back."""
        resp = await self.open(ctx, system, **kw)
        return await self.relay(ctx, system, resp)

    def fault(self, exc: DispatchError) -> web.Response:
        self.metrics["faults"] += 1
        resp = web.Response(
            status=exc.http_status,
            body=exc.body(),
            content_type="application/json",
            charset="utf-8",
        )
        if isinstance(exc, CustomerLocked):
            resp.headers["Retry-After"] = "2"
        if exc.close:
            resp.force_close()
        return resp

    def plain_fault(self, code: str, text: str) -> web.Response:
        self.metrics["faults"] += 1
        return web.Response(
            status=500,
            body=fault_body(code, text),
            content_type="application/json",
            charset="utf-8",
        )

    async def close_backends(self) -> None:
        for b in self.backends.values():
            await b.close()

    def now(self) -> float:
        return time.time()
