"""The fast path: a lean protocol class for the common API request (SPEC section 7).

Every client connection starts here.  A request is taken when

- its head is plain HTTP/1.1 that ``h1.parse_request_head`` accepts (GET without a
  body, or POST with a Content-Length body of at most ``route_body_limit``), its Host
  names a virtual host and its path has no percent-escapes; and
- the realm's flow would send it, unchanged, to one system and relay the answer
  (``plan.plan``: a followed session, an owned entity whose customer is not locked,
  the remote cookie, the default system).

Such a request is written to a keep-alive connection of ``fastpool`` with one write,
and the answer goes back with one write when it came in one read, head rewritten by
the same rules as ``upstream.response_headers`` plus aiohttp's own (Date, Server,
Content-Type default, Connection: close).

Anything else, at a request boundary, hands the connection to aiohttp
(``ApiProxy.adopt``) with the bytes not yet consumed: logins, twin sessions, merged
lists, creates, CPE, holds, Expect, chunked or large uploads, HTTP/1.0, malformed or
oversized heads (aiohttp answers them with the faults it always gave).  The connection
then stays on aiohttp: the rare path is the proven path.

Timeouts (one lazily re-armed timer): the first head ``header_timeout`` from the
connection or from its first octet, the body ``body_timeout`` of silence, keep-alive
75 s, all as ``server.py`` does.

Compiled with mypyc like ``h1`` and ``fastpool`` (``sip/_pure.py``): ``FastConn`` is a
native class (its ``asyncio.Protocol`` base is a plain Python class, which mypyc
allows), so its attributes are C struct fields and its calls to its own methods, the
pool and the codec are direct C calls.  Keep this module fully annotated, its
constants ``Final``, every attribute set in ``__init__``, and msgspec Structs out.  The
classifier (``classify``, ``apicall``) and the route (``plan``) are compiled too; what
they call in the interpreted modules (the store's Router, settings, Structs) is called
as from Python.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Final, cast

from api_proxy.classify import classify, needs_body
from api_proxy.errors import BackendUnavailable, DispatchError, RequestTimeout
from api_proxy.fastpool import Exchange, Origin, UpstreamPool, cancel
from api_proxy.h1 import (
    LAST_CHUNK,
    LENGTH,
    NO_BODY,
    RequestHead,
    ResponseHead,
    chunk,
    parse_request_head,
)
from api_proxy.h1relay import backend_bases, client_head, fault_bytes, upstream_request
from api_proxy.plan import plan

if TYPE_CHECKING:
    from api_proxy.router import Vhost
    from api_proxy.server import ApiProxy

log = logging.getLogger("api_proxy.fastpath")

#: connection states
HEAD: Final = 0  # waiting for a request head
BODY: Final = 1  # waiting for the rest of its body
BUSY: Final = 2  # the request is with a back end
IDLE: Final = 3  # keep-alive, nothing buffered
GONE: Final = 4  # closed, or handed to aiohttp
KEEPALIVE: Final = 75.0
MAX_BUFFER: Final = 256 * 1024  # pipelined octets read ahead while a request is in flight
_INF: Final = float("inf")
_TO: Final = {"source": "to_source", "target": "to_target"}  # metric names


class FastConn(asyncio.Protocol):
    __slots__ = (
        "bases",
        "buf",
        "deadline",
        "ex",
        "head_len",
        "host",
        "ip",
        "keep_alive",
        "keys",
        "local_port",
        "origin",
        "patterns",
        "pending",
        "pools",
        "proxy",
        "public",
        "realm",
        "req",
        "resp",
        "send_mark",
        "state",
        "system",
        "timer",
        "timer_at",
        "tls",
        "transport",
        "vhost",
        "write_paused",
    )

    def __init__(self, proxy: ApiProxy, tls: bool) -> None:
        self.proxy = proxy
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = HEAD
        self.deadline = _INF
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # its when(), asked once: a Python-level call
        self.ip = ""
        self.local_port = 0
        self.req: RequestHead | None = None
        self.head_len = 0
        self.ex: Exchange | None = None
        self.resp: ResponseHead | None = None
        self.pending: bytes | None = None  # the answer's head, written with its first data
        self.keep_alive = True
        self.write_paused = False
        #: octets waiting in the write buffer when the client last took some (send_timeout)
        self.send_mark = 0
        self.system = ""
        self.origin: Origin | None = None
        self.public = ""  # scheme://Host of the last Host header, for Location rewrites
        self.bases: tuple[tuple[str, str], ...] = ()  # its vhost's back ends, for the same
        self.host: str | None = None  # the last Host header and its virtual host
        self.vhost: Vhost | None = None
        self.realm = ""  # the vhost's realm when it has no realm_paths, else ""
        self.patterns: tuple[re.Pattern[str], ...] = ()  # the vhost's CPE patterns
        self.keys: dict[tuple[str, str], str] = {}  # store keys of credentials seen here
        self.pools: dict[str, tuple[UpstreamPool, Origin]] = {}  # of self.vhost, by system

    # -- asyncio ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: cast, do not assert
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        sock = transport.get_extra_info("sockname")
        self.local_port = sock[1] if isinstance(sock, tuple) and len(sock) > 1 else 0
        proxy = self.proxy
        if not proxy.admit_connection(self.ip):
            proxy.metrics["connections_refused"] += 1
            self.state = GONE
            transport.abort()
            return
        proxy.fast_conns.add(self)
        if not proxy.settings.fast_path:
            self._handover()
            return
        self._arm(proxy.loop_time() + proxy.settings.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.state == GONE:
            return
        self.state = GONE
        self.proxy.fast_conns.discard(self)
        self.proxy.release_connection(self.ip)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ex = self.ex
        if ex is not None:
            self.ex = None
            cancel(ex)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == IDLE or (state == HEAD and not self.buf):
            if self._whole(data):
                return  # sent on: BUSY, no deadline
            if state == IDLE:
                self.state = HEAD
                self.deadline = self.proxy.loop_time() + self.proxy.settings.header_timeout
        elif state == BODY:
            self.deadline = self.proxy.loop_time() + self.proxy.settings.body_timeout
        if state != BUSY and state != GONE:
            self.buf += data
            self._process()
            if self.state == HEAD or self.state == BODY:
                self._arm(self.deadline)  # still waiting: make sure the timer is early enough
        elif state == BUSY:
            self.buf += data
            if len(self.buf) > MAX_BUFFER and self.transport is not None:
                self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.ex
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()
        if self.state == BUSY:
            # a client that takes nothing of its answer for send_timeout is dropped (as
            # nginx's): it would hold the back-end connection under it for ever
            t = self.transport
            self.send_mark = t.get_write_buffer_size() if t is not None else 0
            self._arm(self.proxy.loop_time() + self.proxy.settings.send_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.state == BUSY:
            self.deadline = _INF  # the timer, when it fires, finds nothing to do
        ex = self.ex
        if ex is not None and ex.conn is not None:
            ex.conn.resume_reading()
        elif self.state in (HEAD, BODY) and self.buf:
            self._process()  # a hand-over waited for the write buffer to drain

    # -- requests ---------------------------------------------------------------------------

    def _process(self) -> None:
        proxy = self.proxy
        s = proxy.settings
        buf = self.buf
        req = self.req
        if req is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0 or end > s.max_header_size:
                # a head that ended with bare LFs (an empty line) is aiohttp's to refuse:
                # waiting for a CRLF one would leave the client hanging until the timeout
                if end >= 0 or len(buf) > s.max_header_size or b"\n\n" in buf or b"\n\r\n" in buf:
                    self._handover()
                return
            req = parse_request_head(bytes(buf[: end + 2]))
            if req is None or req.content_length > s.route_body_limit:
                self._handover()
                return
            self.req, self.head_len = req, end + 4
            self.state = BODY
            self.deadline = proxy.loop_time() + s.body_timeout
        need = self.head_len + req.content_length
        if len(buf) < need:
            return
        body = bytes(buf[self.head_len : need]) if req.content_length else b""
        if not self._take(req, body):
            self._handover()
            return
        del buf[:need]
        self.req = None

    def _whole(self, data: bytes) -> bool:
        """The common case, nothing buffered: ``data`` is exactly one whole request that
        the fast path takes.  False: nothing was done, buffer ``data`` and go on."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > self.proxy.settings.max_header_size:
            return False
        req = parse_request_head(data[: end + 2])
        if req is None or end + 4 + req.content_length != len(data):
            return False
        if req.content_length > self.proxy.settings.route_body_limit:
            return False
        return self._take(req, data[end + 4 :] if req.content_length else b"")

    def _vhost(self, host: str) -> Vhost | None:
        """The virtual host a Host header names here (a connection's Host rarely changes)."""
        if host == self.host:
            return self.vhost
        vhost = self.proxy.table.select(host, self.local_port)
        self.host, self.vhost = host, vhost
        self.pools = {}
        # a Vhost is frozen: what each request would ask of it is asked once here
        self.realm = vhost.realm if vhost is not None and not vhost.realm_paths else ""
        self.patterns = self.proxy.table.patterns(vhost) if vhost is not None else ()
        # (the Host value is ASCII: parse_request_head decodes the head as ASCII)
        self.public = ("https://" if self.tls else "http://") + host
        self.bases = backend_bases([vhost.source, vhost.target]) if vhost is not None else ()
        return vhost

    def _take(self, req: RequestHead, body: bytes) -> bool:
        """Classify and send ``req`` when the fast path can; False: hand it over."""
        proxy = self.proxy
        target = req.target
        path, _, query = target.partition("?")
        if "%" in path:
            return False
        index = req.index
        vhost = self._vhost(index["host"])
        if vhost is None:
            return False
        realm = self.realm or vhost.realm_for(path)
        method = req.method
        prefix = body if body and needs_body(realm, method, target, index) else None
        try:
            c = classify(
                realm,
                method,
                target,
                index,
                prefix,
                cpe_patterns=self.patterns,
                remote_cookie=proxy.settings.remote_cookie,
            )
        except DispatchError:
            return False
        system = plan(proxy, c, self.keys)
        if system is None:
            return False
        found = self.pools.get(system)
        if found is None:
            found = self.pools[system] = proxy.upstream(vhost, system)
        pool, origin = found
        data = upstream_request(
            req,
            origin.prefix,
            target if query else path,  # (a bare "?" is dropped)
            origin.host_header,
            self.ip,
            "https" if self.tls else "http",
            body,
        )
        m = proxy.metrics
        m["requests"] += 1
        m["fast_path"] += 1
        m[_TO[system]] += 1
        self.state = BUSY
        self.deadline = _INF
        self.keep_alive = req.keep_alive
        self.system = system
        self.origin = origin
        self.resp = None
        self.ex = ex = Exchange(data, method, self)
        pool.submit(ex)
        return True

    # -- answers (the Sink of fastpool) -----------------------------------------------------

    def up_head(self, head: ResponseHead) -> None:
        self.resp = head
        assert self.origin is not None
        self.pending = client_head(head, self.bases, self.public, self.keep_alive)
        if self.write_paused and self.ex is not None and self.ex.conn is not None:
            self.ex.conn.pause_reading()

    def up_data(self, data: bytes, end: bool) -> None:
        t = self.transport
        if t is None:
            return
        resp = self.resp
        assert resp is not None
        if resp.framing != LENGTH and resp.framing != NO_BODY:
            out = chunk(data) if data else b""
            data = out + LAST_CHUNK if end else out
        if self.pending is not None:
            data = self.pending + data
            self.pending = None
        if data:
            t.write(data)
            if self.write_paused:  # what is left of the back end's read goes in after the pause
                self.send_mark = t.get_write_buffer_size()
        if end:
            self._done()

    def up_failed(self, detail: str) -> None:
        exc = BackendUnavailable(self.system, detail)
        m = self.proxy.metrics
        m["faults"] += 1
        m["backend_errors"] += 1
        if self.transport is not None:
            self.transport.write(fault_bytes(exc, self.keep_alive))
        self._done()

    def up_broken(self, detail: str) -> None:
        if self.pending is not None:
            # the head is still held back (it goes with the first body octets): nothing of
            # the answer was written, so the client gets the fault aiohttp's path gives
            self.pending = None
            self.up_failed(detail)
            return
        log.info("%s back end broke off a response: %s", self.system, detail)
        if self.transport is not None:
            self.transport.abort()

    def _done(self) -> None:
        self.ex = None
        self.resp = None
        t = self.transport
        if t is None:
            return
        if not self.keep_alive:
            self.state = GONE
            t.close()
            self.proxy.fast_conns.discard(self)
            self.proxy.release_connection(self.ip)
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            return
        if self.buf:
            self.state = HEAD
            self._arm(self.proxy.loop_time() + self.proxy.settings.header_timeout)
            if len(self.buf) <= MAX_BUFFER:
                t.resume_reading()
            self.proxy.call_soon(self._process)
        else:
            self.state = IDLE
            self.send_mark = t.get_write_buffer_size()  # the answer's tail not sent yet
            self._arm(self.proxy.loop_time() + KEEPALIVE)

    # -- time -------------------------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        """Set the deadline; the timer is re-made only when it would fire too late."""
        self.deadline = deadline
        timer = self.timer
        if timer is None:
            self._new_timer(deadline)
        elif deadline < self.timer_at:
            timer.cancel()
            self._new_timer(deadline)

    def _new_timer(self, deadline: float) -> None:
        # not timer.when(): uvloop answers a deadline less than 0.5 ms away (or past)
        # with a plain Handle (call_soon), which has no when()
        self.timer = self.proxy.call_at(deadline, self._on_timer)
        self.timer_at = deadline

    def _on_timer(self) -> None:
        self.timer = None
        state = self.state
        if state == GONE or (state == BUSY and not self.write_paused) or self.transport is None:
            return
        now = self.proxy.loop_time()
        if now < self.deadline:
            self._new_timer(self.deadline)
            return
        t = self.transport
        if state == BUSY or state == IDLE:
            left = t.get_write_buffer_size()
            if left and left < self.send_mark:
                # it took some of its answer meanwhile (a slow mobile download, still busy
                # with the tail of an answer the back end finished): as nginx's send_timeout,
                # only a client that takes nothing for that long is dropped
                self.send_mark = left
                self._arm(now + self.proxy.settings.send_timeout)
                return
        if state == BUSY:
            self.proxy.metrics["client_timeouts"] += 1
            log.debug("dropping a client that took none of its answer in time")
            t.abort()  # connection_lost drops the exchange and its back-end connection
        elif state == BODY:
            idle = self.proxy.settings.body_timeout
            exc = RequestTimeout(f"the client sent no body data for {idle:g} s")
            m = self.proxy.metrics
            m["requests"] += 1
            m["client_timeouts"] += 1
            m["faults"] += 1
            t.write(fault_bytes(exc, False))
            t.close()
        else:
            if self.state == HEAD:
                self.proxy.metrics["client_timeouts"] += 1
                log.debug("closing a connection whose request head did not arrive in time")
            t.abort()

    # -- hand-over --------------------------------------------------------------------------

    def _handover(self) -> None:
        """Give this connection, and what it sent that was not consumed, to aiohttp."""
        t = self.transport
        if t is None:
            return
        if self.write_paused:
            t.pause_reading()
            return  # resume_writing comes back here
        self.state = GONE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.proxy.fast_conns.discard(self)
        data = bytes(self.buf)
        self.buf = bytearray()
        self.transport = None
        t.resume_reading()
        self.proxy.adopt(t, data, self.ip)
