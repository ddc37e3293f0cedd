"""Keep-alive connections to one back-end origin for the fast path: raw asyncio, no aiohttp.

    pool = UpstreamPool(loop, origin, backend, limit=100, connect_timeout=5, timeout=30)
    pool.submit(Exchange(data, method, sink))   # sink: see ``Sink``

One request at a time per connection (no upstream pipelining).  A connection is reused
when its answer was complete and framed (Content-Length, chunked, no body) and the
back end did not say ``Connection: close``.  Idle connections close after
``KEEPALIVE`` seconds, as aiohttp's connector does.

Retries follow aiohttp's client, so a request sent either way meets the same rules: a
request never written is sent on another connection; a request written on a
connection that closed before any octet of the answer came back is sent once more only
when its method is idempotent (GET).  A POST is never sent twice: the client gets
``backend_unavailable``.

Perf note: one timer per connection, re-armed lazily (the deadline is a float updated
on each read; the timer only looks at it when it fires), so a request costs no timer
call; the request goes out with one ``transport.write``.  This module is compiled with
mypyc (``sip/_pure.py``, see ``fastpath``): ``Origin``, ``Exchange``, ``UpstreamConn``
and ``UpstreamPool`` are native classes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections import deque
from typing import Final, Protocol, cast

from api_proxy.h1 import (
    CHUNKED,
    LENGTH,
    MAX_RESPONSE_HEAD,
    NO_BODY,
    ChunkedDecoder,
    H1Error,
    ResponseHead,
    parse_response_head,
    response_head_end,
)
from api_proxy.upstream import Backend

log = logging.getLogger("api_proxy.fastpool")

KEEPALIVE: Final = 60.0
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_INF: Final = float("inf")


def _has_length(head: ResponseHead) -> bool:
    for lname, _, _, _ in head.headers:
        if lname == "content-length":
            return True
    return False


class Sink(Protocol):
    """The client side of an exchange (``fastpath.FastConn``)."""

    def up_head(self, head: ResponseHead) -> None: ...

    def up_data(self, data: bytes, end: bool) -> None: ...

    def up_failed(self, detail: str) -> None:
        """No answer came (nothing was sent to the client yet)."""

    def up_broken(self, detail: str) -> None:
        """The answer broke off after its head was relayed."""


class Origin:
    """Where a vhost's base URL for one system points (computed once, at start)."""

    __slots__ = (
        "host",
        "host_header",
        "origin",
        "port",
        "prefix",
        "server_hostname",
        "tls",
    )

    def __init__(self, base: str) -> None:
        from yarl import URL  # once per origin, never per request

        u = URL(base, encoded=True)
        self.tls = u.scheme == "https"
        self.host = u.raw_host or ""
        self.port = u.port or (443 if self.tls else 80)
        self.server_hostname = u.raw_host if self.tls else None
        self.host_header = u.host_port_subcomponent or self.host
        self.origin = str(u.origin())
        self.prefix = u.raw_path.rstrip("/") if u.raw_path != "/" else ""


class Exchange:
    """One request on its way to a back end."""

    __slots__ = ("conn", "data", "done", "idempotent", "retried", "sink")

    def __init__(self, data: bytes, method: str, sink: Sink) -> None:
        self.data = data
        self.idempotent = method in IDEMPOTENT
        self.retried = False
        self.done = False
        self.sink = sink
        self.conn: UpstreamConn | None = None


def cancel(ex: Exchange) -> None:
    """The client went away: drop the request, and its connection if it was sent."""
    ex.done = True
    conn = ex.conn
    if conn is not None and conn.ex is ex:
        conn.ex = None
        conn.close()


class UpstreamConn(asyncio.Protocol):
    __slots__ = (
        "buf",
        "chunks",
        "deadline",
        "ex",
        "got",
        "head",
        "left",
        "pool",
        "reading_paused",
        "timer",
        "timer_at",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.ex: Exchange | None = None
        self.buf = b""
        self.head: ResponseHead | None = None
        self.left = 0
        self.chunks: ChunkedDecoder | None = None
        self.got = False  # any octet of the answer came
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # its when(), asked once: a Python-level call
        self.reading_paused = False

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: cast, do not assert
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pool.lost(self)
        ex = self.ex
        if ex is not None:
            self.ex = None
            if self.head is not None and self.head.framing not in (LENGTH, CHUNKED, NO_BODY):
                self.pool.finish(self, ex, b"", False)  # read until close: this is the end
                ex.sink.up_data(b"", True)
            else:
                self.pool.broke(self, ex, "Server disconnected", self.got)

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:  # an idle connection must stay silent
            self.close()
            return
        self.got = True
        self.deadline = self.pool.loop.time() + self.pool.timeout
        try:
            self._feed(ex, data)
        except H1Error as exc:
            self.ex = None
            self.close()
            self.pool.broke(self, ex, str(exc), False, final=True)

    def pause_writing(self) -> None:  # requests are small: nothing to throttle
        pass

    def resume_writing(self) -> None:
        pass

    # -- answers ---------------------------------------------------------------------------

    def _feed(self, ex: Exchange, data: bytes) -> None:
        if self.head is None:
            buf = self.buf + data if self.buf else data
            found: ResponseHead | None = None
            while found is None:
                end, start = response_head_end(buf)
                if end < 0 or end > MAX_RESPONSE_HEAD:
                    if len(buf) > MAX_RESPONSE_HEAD:
                        raise H1Error("the back end's answer head is too long")
                    self.buf = buf
                    return
                found = parse_response_head(buf[:end])
                buf = buf[start:]
                if 100 <= found.status < 200:
                    if found.status == 101:
                        raise H1Error("the back end switched protocols")
                    found = None  # 100 Continue and friends: the answer follows
            head = found
            if head.framing == CHUNKED and not head.keep_alive and _has_length(head):
                # RFC 9112 6.3: "ought to be handled as an error"; aiohttp's client
                # (the other path) refuses it too
                raise H1Error("the back end's answer has Content-Length and Transfer-Encoding")
            self.buf = b""
            self.head = head
            self.pool.backend.last_ok_at = time.time()
            ex.sink.up_head(head)
            if head.framing == LENGTH:
                self.left = head.length
            elif head.framing == CHUNKED:
                self.chunks = ChunkedDecoder()
            data = buf
            if head.framing == NO_BODY:
                self._end(ex, data, head.keep_alive)
                ex.sink.up_data(b"", True)
                return
        head = self.head
        if head.framing == LENGTH:
            if len(data) >= self.left:
                rest = data[self.left :]
                body = data[: self.left] if rest else data
                self.left = 0
                self._end(ex, rest, head.keep_alive)
                ex.sink.up_data(body, True)
            else:
                self.left -= len(data)
                ex.sink.up_data(data, False)
        elif head.framing == CHUNKED:
            assert self.chunks is not None
            pieces, rest = self.chunks.feed(data)
            done = self.chunks.done
            if done:
                self._end(ex, rest, head.keep_alive)
            if pieces or done:
                ex.sink.up_data(b"".join(pieces), done)
        elif data:
            ex.sink.up_data(data, False)  # until close

    def _end(self, ex: Exchange, rest: bytes, keep_alive: bool) -> None:
        self.ex = None
        self.head = None
        self.chunks = None
        self.pool.finish(self, ex, rest, keep_alive)

    # -- control ---------------------------------------------------------------------------

    def send(self, ex: Exchange) -> bool:
        """Write the request; False when this connection turned out to be closing."""
        t = self.transport
        if t is None or t.is_closing():
            return False
        self.ex = ex
        ex.conn = self
        self.got = False
        self.head = None
        self.buf = b""
        self._arm(self.pool.loop.time() + self.pool.timeout)
        if self.reading_paused:
            self.resume_reading()
        t.write(ex.data)
        return True

    def idle(self) -> None:
        self._arm(self.pool.loop.time() + KEEPALIVE)

    def _arm(self, deadline: float) -> None:
        """Set the deadline; the timer is re-made only when it would fire too late.  Only
        moving a deadline later may be left to ``_on_timer``: an idle connection's timer
        waits ``KEEPALIVE`` (or for ever while reading is paused), far past a request's
        ``timeout``."""
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
        self.timer = self.pool.loop.call_at(deadline, self._on_timer)
        self.timer_at = deadline

    def _on_timer(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        now = self.pool.loop.time()
        if now < self.deadline:
            self._new_timer(self.deadline)
            return
        ex = self.ex
        self.ex = None
        self.close()
        if ex is not None:
            self.pool.broke(self, ex, "timed out", self.got, final=True)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
            # a client that does not read must not make the back end look silent
            self.deadline = _INF

    def resume_reading(self) -> None:
        if self.transport is not None and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
            self._arm(self.pool.loop.time() + self.pool.timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Connections to one origin, shared by every vhost whose base URL points there."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: Origin,
        backend: Backend,
        *,
        limit: int,
        connect_timeout: float,
        timeout: float,
        ssl_context: ssl.SSLContext | bool,
    ) -> None:
        self.loop = loop
        self.origin = origin
        self.backend = backend
        self.limit = max(1, limit)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        # how aiohttp's ClientConnectorError names the TLS setting (the same fault text)
        self.ssl_shown = "default" if ssl_context is True else str(ssl_context)
        self.ssl: ssl.SSLContext | None = None
        if origin.tls:
            self.ssl = (
                ssl_context
                if isinstance(ssl_context, ssl.SSLContext)
                else ssl.create_default_context()
            )
            if ssl_context is False:
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE
        self.idle_conns: list[UpstreamConn] = []
        self.conns: set[UpstreamConn] = set()
        self.connecting = 0
        self.waiting: deque[Exchange] = deque()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def submit(self, ex: Exchange) -> None:
        self.backend.requests += 1
        self._place(ex)

    def _place(self, ex: Exchange) -> None:
        idle = self.idle_conns
        while idle:
            conn = idle.pop()
            if conn.send(ex):
                return
        self.waiting.append(ex)
        if len(self.conns) + self.connecting < self.limit and self.connecting < len(self.waiting):
            self.connecting += 1
            task = self.loop.create_task(self._connect())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _connect(self) -> None:
        o = self.origin
        try:
            _, proto = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamConn(self),
                    o.host,
                    o.port,
                    ssl=self.ssl,
                    server_hostname=o.server_hostname,
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            self.connecting -= 1
            detail = "timed out" if isinstance(exc, TimeoutError) else self._refused(exc)
            while self.waiting:
                ex = self.waiting.popleft()
                if not ex.done:
                    self._fail(ex, detail)
                    break
            return
        self.connecting -= 1
        if self.closed:
            proto.close()
            return
        t = proto.transport
        if t is None or t.is_closing():
            # closed by the back end before we got here (a partition: accepted, then
            # dropped); ``lost`` may have run already and started no new connection,
            # so the first waiter is answered here, as if this connection broke under it
            proto.close()
            while self.waiting:
                ex = self.waiting.popleft()
                if not ex.done:
                    self.broke(proto, ex, "Server disconnected", False)
                    break
            return
        self.conns.add(proto)
        self._next(proto)

    def _refused(self, exc: BaseException) -> str:
        """The text aiohttp's connector gives for a failed connect (the same fault)."""
        if not isinstance(exc, OSError) or isinstance(exc, ssl.SSLError):
            return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        o = self.origin
        why = exc.strerror or str(exc)
        try:
            ip = ipaddress.ip_address(o.host.strip("[]"))
        except ValueError:
            ip = None
        if ip is not None and exc.errno is not None:
            addr = (str(ip), o.port) if ip.version == 4 else (str(ip), o.port, 0, 0)
            why = f"Connect call failed {addr}"
        return f"Cannot connect to host {o.host_header} ssl:{self.ssl_shown} [{why}]"

    def _next(self, conn: UpstreamConn) -> None:
        while self.waiting:
            ex = self.waiting.popleft()
            if ex.done:
                continue
            if conn.send(ex):
                return
            self.waiting.appendleft(ex)
            return
        conn.idle()
        self.idle_conns.append(conn)

    def finish(self, conn: UpstreamConn, ex: Exchange, rest: bytes, keep_alive: bool) -> None:
        """The answer is complete (the sink was told); keep the connection if it can be."""
        ex.done = True
        if keep_alive and not rest and conn.transport is not None and not self.closed:
            self._next(conn)
        else:
            conn.close()

    def broke(
        self, conn: UpstreamConn, ex: Exchange, detail: str, got: bool, final: bool = False
    ) -> None:
        """The connection failed during ``ex``: retry it where aiohttp would, else tell."""
        if ex.done:
            return
        if not got and not final and ex.idempotent and not ex.retried and not self.closed:
            ex.retried = True
            self._place(ex)
            return
        self._fail(ex, detail, started=conn.head is not None)

    def _fail(self, ex: Exchange, detail: str, started: bool = False) -> None:
        ex.done = True
        if started:
            self.backend.failed("dropped mid-response: " + detail)
            ex.sink.up_broken(detail)
        else:
            self.backend.failed(detail)
            ex.sink.up_failed(detail)

    def lost(self, conn: UpstreamConn) -> None:
        self.conns.discard(conn)
        try:
            self.idle_conns.remove(conn)
        except ValueError:
            pass
        if self.waiting and not self.closed:  # a waiter may open a new one now
            ex = self.waiting.popleft()
            self._place(ex)

    def close(self) -> None:
        self.closed = True
        for conn in list(self.conns):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        self.idle_conns.clear()
