"""The WebDispatcher: one HTTP(S) entry point for every virtual host (SPEC section 7).

    proxy = ApiProxy(settings, router)
    await proxy.start()          # listens on settings.listen
    ...
    await proxy.stop()

Connections start on the fast path (``fastpath.py``), which takes the common request
itself and hands the connection to aiohttp (``adopt``) at the first request it does not
take.  On the aiohttp path, per request: pick the virtual host by Host header (and port), read the body only when
routing needs it (a bounded prefix, with an idle timeout), classify it
(``classify.py``), run the realm's flow (``flows.py``) and stream the answer back.
Anything dsbc itself refuses, including requests aiohttp's parser rejects (huge
headers, garbage), is answered in the billing API's fault shape; nothing escapes as an
HTML page or a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any

import aiohttp.web_protocol
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict
from yarl import URL

from api_proxy.apicall import content_type
from api_proxy.classify import classify, needs_body
from api_proxy.errors import (
    BackendUnavailable,
    BadRequest,
    CodingNotImplemented,
    CustomerLocked,
    DispatchError,
    HeadersTooLarge,
    RequestTimeout,
    RequestTooLarge,
    UnknownHost,
    VersionNotSupported,
    fault_body,
)
from api_proxy.fastpath import BODY, BUSY, FastConn
from api_proxy.fastpool import Origin, UpstreamPool
from api_proxy.flows import Flows
from api_proxy.forward import Ctx
from api_proxy.h1 import origin_form
from api_proxy.router import ProxySettings, Router, Vhost, VhostTable
from sip.transport_tls import Handshaking, TlsAcceptor, listening_sockets

log = logging.getLogger("api_proxy")
# aiohttp's placeholder message for a request head it could not parse (None if a later
# aiohttp drops it: its answers then keep aiohttp's HTTP/1.0 status line)
_PARSE_ERROR: RawRequestMessage | None = getattr(aiohttp.web_protocol, "ERROR", None)
#: the version in aiohttp's (llhttp's) refusal of a request line ("Invalid HTTP version:
#: ... b'GET / HTTP/3.0'")
_REFUSED_VERSION = re.compile(r"Invalid HTTP version\b.*?HTTP/(\d\.\d)'", re.DOTALL)
#: llhttp's refusal of HTTP/2's connection preface ("PRI * HTTP/2.0", prior knowledge)
_H2_PREFACE = "Pause on PRI/Upgrade"


def _refused_version(text: str) -> str:
    """The version of a request line aiohttp refused for its version, when its major is
    not 1 (those get 505 like the HTTP/2.0 and 0.9 lines it takes); "" for any other
    refusal (HTTP/1.2 among them: llhttp knows no 1.x but 1.0 and 1.1)."""
    if _H2_PREFACE in text:
        return "2.0"
    m = _REFUSED_VERSION.search(text)
    return m.group(1) if m and not m.group(1).startswith("1") else ""


def answered_in_11(message: RawRequestMessage) -> RawRequestMessage:
    """The request aiohttp makes for a head it could not parse, made to say HTTP/1.1: its
    stand-in says HTTP/1.0, and aiohttp writes the request's version in the answer's status
    line (the fault: 400, 431, 505); a server answers in its own 1.1."""
    if _PARSE_ERROR is None or message is not _PARSE_ERROR:
        return message
    return message._replace(version=HttpVersion11)


def refusal_reason(text: str) -> str:
    """aiohttp's refusal of a request head, fit for the log: its first line, without the
    bytes it quotes (``b'...'``: the lines after it, or the start of an oversized header
    value, quote what the client sent, an ``Authorization: Bearer ...`` or ``Cookie:``
    line among them): a credential must never reach the log, and a log record is one line."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else "?"
    quoted = re.search(r"""\bb['"]""", first)
    if quoted:
        first = first[: quoted.start()]
    return first.strip().rstrip(":").strip() or "?"


def head_too_large(status: int, text: str) -> bool:
    """Whether aiohttp's refusal of a head (``handle_error``'s status and text) was for its
    size: it says 400 for a line or a header over its limits; that is a 431."""
    lower = text.lower()
    return status in (413, 431) or any(s in lower for s in ("too long", "got more than", "too many headers"))


class HeadTimeoutHandler(RequestHandler):
    """aiohttp's connection handler, closing a connection whose request head does not
    arrive within `head_timeout` seconds of the connection or of a next request's first
    octet: aiohttp itself bounds neither (a client that connects and sends nothing, or
    half a head, holds its connection and a file descriptor forever), as nginx's
    ``client_header_timeout`` does.  Used by the API dispatcher and the control API."""

    _head_timer: asyncio.TimerHandle | None = None
    _head_count = 0

    def head_timeout(self) -> float:
        return 10.0

    def head_expired(self) -> None:
        """The hook for a connection closed for its slow head (counted, logged)."""
        log.debug("closing a connection whose request head did not arrive in time")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head_timer()  # the first request's head counts from the connection

    def data_received(self, data: bytes) -> None:
        waiter = getattr(self, "_waiter", None)
        if self._head_timer is None and waiter is not None and not waiter.done():
            self._start_head_timer()  # the first octets of a next request on a keep-alive
        super().data_received(data)

    def _start_head_timer(self) -> None:
        if self.transport is None:  # refused in connection_made (a connection cap)
            return
        self._head_count = getattr(self, "_request_count", 0)
        self._head_timer = self._loop.call_later(self.head_timeout(), self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        waiter = getattr(self, "_waiter", None)
        if getattr(self, "_request_count", 0) == self._head_count and (
            waiter is None or not waiter.done()
        ):
            self.head_expired()
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class _FaultingHandler(HeadTimeoutHandler):
    """aiohttp's connection handler, answering its own errors in the fault shape, and
    closing a connection whose request head does not arrive within ``header_timeout`` of
    its first octet."""

    _counted_ip: str | None = None
    #: set by ``ApiProxy.adopt``: a connection the fast path admitted and hands over
    _adopted_ip: str | None = None
    #: the system a CWMP session on this connection was sent to (``Flows.cpe``): a CPE
    #: that does not return the ACS's cookie stays on it for the session's next requests
    cpe_system = ""

    #: the dispatcher, set by ``_Server.__call__`` (not read through ``_manager``: aiohttp
    #: drops it when the connection is lost, and a request read then still reaches
    #: ``handle_error``)
    proxy: ApiProxy | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        proxy = self.proxy
        if self._adopted_ip is not None:
            self._counted_ip = self._adopted_ip
        elif proxy is not None:
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if not proxy.admit_connection(ip):
                RequestHandler.connection_made(self, transport)
                proxy.metrics["connections_refused"] += 1
                self.force_close()
                return
            self._counted_ip = ip
        super().connection_made(transport)

    def head_timeout(self) -> float:
        proxy = self.proxy
        return proxy.settings.header_timeout if proxy is not None else 10.0

    def head_expired(self) -> None:
        proxy = self.proxy
        if proxy is not None:
            proxy.metrics["client_timeouts"] += 1
        super().head_expired()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted_ip is not None:
            proxy = self.proxy
            if proxy is not None:
                proxy.release_connection(self._counted_ip)
            self._counted_ip = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        proxy = self.proxy
        if request.writer.output_size > 0:
            raise ConnectionError("a response was under way; closing the connection")
        if isinstance(exc, ConnectionError):
            # the client went away while its request was read (wrk stopping mid-body): no one
            # to answer, and nothing wrong with the dispatcher
            if proxy is not None:
                proxy.metrics["client_gone"] += 1
            log.debug("client %s went away during its request: %s", request.remote, exc)
            raise ConnectionError("the client went away")
        text = str(message or exc or "")
        http_status = 500
        version = _refused_version(text) if status == 400 else ""
        if head_too_large(status, text):
            code, why = "request_too_large", "the request line or headers are over the limit"
            http_status = 431
        elif version:
            refused = VersionNotSupported(version)
            code, why, http_status = refused.reason, str(refused), refused.http_status
        elif status == 400:
            code, why = "bad_request", "the request is not valid HTTP"
        else:
            code, why = "internal_error", "the dispatcher could not handle this request"
            log.error("unhandled error on %s", request.path, exc_info=exc)
        if proxy is not None:
            proxy.metrics["faults"] += 1
            proxy.metrics["too_large" if code == "request_too_large" else "bad_requests"] += 1
        log.debug("refused a request from %s: %s", request.remote, refusal_reason(text))
        resp = web.Response(
            status=http_status,
            body=fault_body(f"Server.Dispatcher.{code}", why),
            content_type="application/json",
            charset="utf-8",
        )
        resp.force_close()
        return resp


class _OtherVersion(web.BaseRequest):
    """A request in another HTTP major version than 1 that aiohttp's parser took (llhttp
    reads ``HTTP/2.0`` and ``HTTP/0.9`` request lines as HTTP/1 messages): it gets the
    505 fault (``ApiProxy._handle``).  Made as an HTTP/1.1 request, because aiohttp
    writes the request's own version in the status line of the answer (an
    ``HTTP/2.0 505`` line in HTTP/1 framing would be one more wrong answer)."""

    claimed = ""  # the version the request line claimed ("2.0")


class _Server(web.Server):
    proxy: ApiProxy | None = None

    def __call__(self) -> RequestHandler:
        handler = _FaultingHandler(self, loop=self._loop, **self._kwargs)
        handler.proxy = self.proxy
        return handler

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        version = message.version
        if message is _PARSE_ERROR:
            message = answered_in_11(message)
        elif version.major != 1:
            message = message._replace(version=HttpVersion11, should_close=True)
            request = _OtherVersion(message, payload, protocol, writer, task, self._loop)
            request.claimed = f"{version.major}.{version.minor}"
            return request
        return super()._make_request(message, payload, protocol, writer, task)


class ApiProxy(Flows):
    """The running dispatcher: ``start()``, ``stop()``, ``status()``, ``metrics``."""

    def __init__(self, settings: ProxySettings, router: Router) -> None:
        super().__init__(settings, router)
        self.table = VhostTable(settings.vhosts)
        self._runner: web.ServerRunner | None = None
        self._aio: _Server | None = None
        self._servers: list[asyncio.Server | TlsAcceptor] = []
        #: TLS connections accepted and still in their handshake: they hold a slot of the caps
        self._handshaking = Handshaking("API")
        self.fast_conns: set[FastConn] = set()
        self._pools: dict[tuple[bool, str, int], UpstreamPool] = {}
        self._upstreams: dict[tuple[int, str], tuple[UpstreamPool, Origin]] = {}
        self.addresses: list[tuple[str, int]] = []
        self.tls_addresses: set[tuple[str, int]] = set()  # those of them that take TLS
        self._conns = 0
        self._per_ip: dict[str, int] = {}
        self.metrics.setdefault("connections_refused", 0)
        self.metrics.setdefault("tls_handshake_failed", 0)  # TLS clients that did not finish theirs
        self.metrics.setdefault("fast_path", 0)  # requests the fast path took
        self.metrics.setdefault("handed_over", 0)  # connections it gave to aiohttp
        self.metrics.setdefault("client_gone", 0)  # clients that left while their request was read

    def admit_connection(self, ip: str) -> bool:
        """Count a new client connection, or refuse it (over a cap)."""
        s = self.settings
        if self._conns >= s.max_connections or self._per_ip.get(ip, 0) >= s.max_connections_per_ip:
            return False
        self._conns += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return True

    # the TLS acceptors' gate (sip.transport_tls.Gate): a slot from the accept to the end of
    # the handshake; FastConn.connection_made then counts the connection as any other

    def admit(self, ip: str) -> bool:
        s = self.settings
        if not self._handshaking.take(ip, self._conns, self._per_ip.get(ip, 0),
                                      s.max_connections, s.max_connections_per_ip):
            self.metrics["connections_refused"] += 1
            return False
        return True

    def release(self, ip: str) -> None:
        self._handshaking.release(ip)

    def failed(self, ip: str, exc: BaseException) -> None:
        self.metrics["tls_handshake_failed"] += 1
        self._handshaking.failed(ip, exc)

    def release_connection(self, ip: str) -> None:
        self._conns -= 1
        n = self._per_ip.get(ip, 1) - 1
        if n > 0:
            self._per_ip[ip] = n
        else:
            self._per_ip.pop(ip, None)

    # -- lifecycle ---------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not (s.tls_cert and s.tls_key):
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # never OpenSSL's passphrase prompt on the terminal (dsbc.tls.no_passphrase)
        ctx.load_cert_chain(s.tls_cert, s.tls_key, password=lambda: b"")
        return ctx

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop_time = loop.time
        self.call_at = loop.call_at
        self.call_soon = loop.call_soon
        for b in self.backends.values():
            b.open()
        size = self.settings.max_header_size
        # lingering: after a fault on an unread body, read (and drop) the rest for a
        # moment so the client sees the answer rather than a reset, then close
        server = _Server(
            self.handle,
            max_line_size=size,
            max_field_size=size,
            max_headers=128,
            access_log=None,
            keepalive_timeout=75.0,
            lingering_time=min(1.0, self.settings.body_timeout),
            # bodies pass as sent: a Content-Encoding: gzip upload must reach the back end
            # gzipped (the fast path relays it as it is too), never inflated under that header
            auto_decompress=False,
        )
        server.proxy = self
        self._aio = server
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        tls = self.ssl_context()
        # every connection starts on the fast path, which hands it to ``server`` (aiohttp)
        # at the first request it does not take (fastpath.py)
        listeners = [(a, tls) for a in self.settings.listen]
        listeners += [(a, None) for a in self.settings.plain_listen]
        for (host, port), ctx in listeners:
            if ctx is not None:  # admitted at the accept, before the handshake (sip/transport_tls.py)
                for sock in await listening_sockets(loop, host, port):
                    self._servers.append(TlsAcceptor(
                        loop, sock, lambda: FastConn(self, True), ctx, self.settings.header_timeout, self))
                    addr = sock.getsockname()
                    self.addresses.append((addr[0], addr[1]))
                    self.tls_addresses.add((addr[0], addr[1]))
                continue
            srv = await loop.create_server(
                lambda: FastConn(self, False),
                host,
                port,
                reuse_address=True,
                # a reload's new worker listens beside the one it replaces, which stops
                # accepting as it drains: no moment without a listener (as control.py)
                reuse_port=True,
                backlog=1024,
            )
            self._servers.append(srv)
            for sock in srv.sockets or []:
                addr = sock.getsockname()
                self.addresses.append((addr[0], addr[1]))
        shown = [
            f"{'https' if a in self.tls_addresses else 'http'}://{_hostport(*a)}"
            for a in self.addresses
        ]
        log.info("API dispatcher listening on %s", ", ".join(shown))

    def stop_listening(self) -> None:
        """A drain: accept no more connections (the successor's listener takes them);
        those open are served until ``stop``."""
        for srv in self._servers:
            srv.close()
        self._servers.clear()

    @property
    def busy(self) -> int:
        """Fast-path connections in the middle of a request (its body, or its answer)."""
        return sum(1 for c in self.fast_conns if c.state == BODY or c.state == BUSY)

    async def stop(self, grace: float = 5.0) -> None:
        self.stop_listening()
        # a request being read or answered is finished (a client would see a reset and
        # could not know whether it was done); idle keep-alive connections are closed
        deadline = asyncio.get_running_loop().time() + grace
        while self.busy and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.fast_conns):
            if conn.transport is not None:
                if conn.state == BODY or conn.state == BUSY:
                    conn.transport.abort()
                else:
                    conn.transport.close()
        self.fast_conns.clear()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._upstreams.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.close_backends()

    # -- the fast path's needs ----------------------------------------------------------------

    def adopt(self, transport: asyncio.Transport, data: bytes, ip: str) -> None:
        """Hand a fast-path connection to aiohttp, with the octets it has not consumed."""
        assert self._aio is not None
        self.metrics["handed_over"] += 1
        handler = self._aio()
        assert isinstance(handler, _FaultingHandler)
        handler._adopted_ip = ip
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)

    def upstream(self, vhost: Vhost, system: str) -> tuple[UpstreamPool, Origin]:
        """The keep-alive pool (one per origin) behind ``vhost``'s base URL on ``system``."""
        key = (id(vhost), system)
        found = self._upstreams.get(key)
        if found is None:
            origin = Origin(vhost.base(system))
            pkey = (origin.tls, origin.host, origin.port)
            pool = self._pools.get(pkey)
            if pool is None:
                s = self.settings
                backend = self.backends[system]
                pool = UpstreamPool(
                    asyncio.get_running_loop(),
                    origin,
                    backend,
                    limit=s.pool_size,
                    connect_timeout=s.connect_timeout,
                    timeout=s.timeout,
                    ssl_context=backend.ssl_context,
                )
                self._pools[pkey] = pool
            found = self._upstreams[key] = (pool, origin)
        return found

    def _base_urls(self, system: str) -> list[str]:
        """The base URLs of ``system`` that the virtual hosts send requests to."""
        return sorted({v.base(system) for v in self.settings.vhosts if v.base(system)})

    def status(self) -> dict[str, Any]:
        return {
            "listening": [_hostport(h, p) for h, p in self.addresses],
            "tls": bool(self.settings.tls_cert),
            "vhosts": [
                f"{v.host}{':' + str(v.port) if v.port else ''} ({v.realm})"
                for v in self.settings.vhosts
            ],
            "backends": {name: {**b.status(), "urls": self._base_urls(name)} for name, b in self.backends.items()},
            "metrics": dict(self.metrics),
        }

    # -- requests ----------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.metrics["requests"] += 1
        try:
            return await self._handle(request)
        except DispatchError as exc:
            self._count(exc)
            return self.fault(exc)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            self.metrics["internal_errors"] += 1
            log.exception("API dispatcher error on %s %s", request.method, request.path)
            return self.plain_fault(
                "Server.Dispatcher.internal_error", "the dispatcher could not handle this request"
            )

    def _count(self, exc: DispatchError) -> None:
        if isinstance(exc, UnknownHost):
            self.metrics["unknown_host"] += 1
        elif isinstance(exc, RequestTooLarge):
            self.metrics["too_large"] += 1
        elif isinstance(exc, RequestTimeout):
            self.metrics["client_timeouts"] += 1
        elif isinstance(exc, BadRequest):
            self.metrics["bad_requests"] += 1
        elif isinstance(exc, BackendUnavailable):
            self.metrics["backend_errors"] += 1
        elif isinstance(exc, CustomerLocked):
            pass  # counted as hold_timeouts

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if isinstance(request, _OtherVersion):
            raise VersionNotSupported(request.claimed)
        coding = request.headers.get("Transfer-Encoding")
        if coding is not None and coding.strip(" \t").lower() != "chunked":
            # aiohttp's parser takes any codings before a final chunked (the only one
            # it refuses a request for), and undoes only the chunked
            raise CodingNotImplemented(f"the transfer coding {coding[:40]!r} is not supported")
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        local_port = sock[1] if isinstance(sock, tuple) and len(sock) > 1 else 0
        # aiohttp bounds each line and field (max_line_size / max_field_size) and their
        # number, not the section: max_header_size is the whole section, as documented
        limit = self.settings.max_header_size
        size = 0
        for name, value in request.raw_headers:
            size += len(name) + len(value) + 4
            if size > limit:
                raise HeadersTooLarge(f"the request headers are over {limit} bytes")
        absolute = origin_form(request.raw_path)
        if absolute is not None:
            # the absolute form (what a client sends to a proxy): the URI's authority is the
            # Host (RFC 9112 3.2.2), and the request goes on as its origin form
            headers = CIMultiDict(request.headers)
            headers["Host"] = absolute[0]
            request = request.clone(rel_url=URL(absolute[1], encoded=True), headers=headers)
        vhost = self.table.select(request.headers.get("Host", ""), local_port)
        if vhost is None:
            raise UnknownHost(
                f"no virtual host is configured for {request.headers.get('Host', '')!r}"[:200]
            )
        cl = request.content_length
        if cl is not None and cl > self.settings.max_body_size:
            raise RequestTooLarge(f"the request body is over {self.settings.max_body_size} bytes")
        if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (
            1,
            1,
        ):
            # the low-level server does not answer Expect itself; curl waits 1 s without it
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        target = request.raw_path
        realm = vhost.realm_for(request.path)
        prefix: bytes | None = None
        complete = True
        if request.body_exists and needs_body(realm, request.method, target, request.headers):
            prefix, complete = await self._read_prefix(request)
            if (
                not complete
                and content_type(request.headers)[0] != "multipart/form-data"
                and "/rest/" in request.path
            ):
                raise RequestTooLarge(
                    f"an API request body over {self.settings.route_body_limit} bytes "
                    "must be multipart"
                )
        c = classify(
            realm,
            request.method,
            target,
            request.headers,
            prefix,
            cpe_patterns=self.table.patterns(vhost),
            remote_cookie=self.settings.remote_cookie,
            complete=complete,
        )
        ctx = Ctx(request, vhost, realm, c, prefix, complete)
        return await self.dispatch(ctx)

    async def _read_prefix(self, request: web.BaseRequest) -> tuple[bytes, bool]:
        """Up to route_body_limit bytes of the body; (bytes, whether that is all of it)."""
        cap = self.settings.route_body_limit
        idle = self.settings.body_timeout
        buf = bytearray()
        content = request.content
        while len(buf) <= cap:
            try:
                chunk = await asyncio.wait_for(content.readany(), idle)
            except TimeoutError:
                raise RequestTimeout(f"the client sent no body data for {idle:g} s") from None
            if not chunk:
                return bytes(buf), True
            buf += chunk
        return bytes(buf), False


def _hostport(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (a URL an operator can paste)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

