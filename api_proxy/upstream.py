"""The two back ends: keep-alive pools, header rules and body streaming both ways.

One ``aiohttp.ClientSession`` per system with a keep-alive ``TCPConnector`` (a pool per
origin); no cookie jar (the client's cookies are the client's), no automatic
decompression (bytes pass as they are), no automatic headers.

Request bodies are either bytes (an API call routing read, maybe rewritten) or a
stream: the prefix routing read, then the rest of ``request.content`` chunk by chunk,
with an idle timeout per chunk and the size cap.  Response bodies stream to the client
with ``StreamResponse``; a back end that drops mid-body makes dsbc abort the client
connection (a truncated body is never presented as complete).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from api_proxy.errors import BackendUnavailable, RequestTimeout, RequestTooLarge
from api_proxy.h1 import HOP_BY_HOP, MAX_RESPONSE_HEAD
from api_proxy.h1relay import public_cookie, public_refresh, public_url

log = logging.getLogger("api_proxy.upstream")

CHUNK = 64 * 1024


def _connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    out: set[str] = set()
    for v in headers.getall("Connection", []):
        out.update(t.strip().lower() for t in v.split(","))
    return out


def request_headers(
    headers: CIMultiDictProxy[str], remote: str, proto: str, host: str, drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """The client's headers for a back end: hop-by-hop removed, X-Forwarded-* added."""
    skip = HOP_BY_HOP | _connection_listed(headers) | {"host", "content-length", "expect"}
    skip |= {d.lower() for d in drop}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in skip:
            out.add(k, v)
    xff = ", ".join(headers.getall("X-Forwarded-For", ()))  # repeats joined, as nginx does
    out["X-Forwarded-For"] = f"{xff}, {remote}" if xff else remote
    out["X-Forwarded-Proto"] = proto
    out["X-Forwarded-Host"] = host
    out["X-Real-IP"] = remote
    return out


def response_headers(
    headers: CIMultiDictProxy[str], bases: tuple[tuple[str, str], ...], public_origin: str
) -> CIMultiDict[str]:
    """A back end's headers for the client: hop-by-hop removed, Location, Refresh and
    cookie domains made the public host's (what nginx's proxy_redirect /
    proxy_cookie_domain do); ``bases``: ``h1relay.backend_bases`` of the vhost."""
    skip = HOP_BY_HOP | _connection_listed(headers) | {"content-length"}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in skip:
            continue
        if lk == "location":
            v = public_url(v, bases, public_origin)
        elif lk == "refresh":
            v = public_refresh(v, bases, public_origin)
        elif lk == "set-cookie":
            v = public_cookie(v, bases)
        out.add(k, v)
    return out


class BodyState:
    """What happened to a streamed request body (read by the server after a failure)."""

    __slots__ = ("sent", "stalled", "too_large", "writing_since")

    def __init__(self) -> None:
        self.sent = 0
        self.stalled = False
        self.too_large = False
        #: loop time a chunk was handed to the back end's connection, 0.0 while none is
        #: being written (the client's next one is awaited): ``Backend.send`` times it
        self.writing_since = 0.0


async def stream_body(
    prefix: bytes, content: aiohttp.StreamReader, idle: float, limit: int, state: BodyState
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    if prefix:
        state.sent = len(prefix)
        state.writing_since = loop.time()
        yield prefix  # aiohttp asks for the next chunk once this one is written
        state.writing_since = 0.0
    while True:
        try:
            chunk = await asyncio.wait_for(content.readany(), idle)
        except TimeoutError:
            state.stalled = True
            raise RequestTimeout(f"the client sent no body data for {idle:g} s") from None
        if not chunk:
            return
        state.sent += len(chunk)
        if state.sent > limit:
            state.too_large = True
            raise RequestTooLarge(f"the request body is over {limit} bytes")
        state.writing_since = loop.time()
        yield chunk
        state.writing_since = 0.0


class Backend:
    """One system's client pool and health counters."""

    def __init__(
        self,
        system: str,
        *,
        timeout: float,
        connect_timeout: float,
        pool_size: int,
        verify: bool = True,
        ca: str = "",
    ) -> None:
        self.system = system
        ctx: ssl.SSLContext | bool = True
        if ca:
            ctx = ssl.create_default_context(cafile=ca)
        elif not verify:
            ctx = False
        self.ssl_context = ctx
        self._connector_args: dict[str, Any] = {
            "limit": pool_size,
            "limit_per_host": pool_size,
            "keepalive_timeout": 60.0,
            "ssl": ctx,
            "enable_cleanup_closed": False,
        }
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=timeout
        )
        self.timeout = timeout
        self.session: aiohttp.ClientSession | None = None
        self.requests = 0
        self.errors = 0
        self.last_error = ""
        self.last_error_at = 0.0
        self.last_ok_at = 0.0

    def open(self) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(**self._connector_args),
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                raise_for_status=False,
                # a long header line (a cookie, a CSP) passes as on the fast path, whose
                # limit is the whole head: aiohttp's default is 8190 octets a line
                max_line_size=MAX_RESPONSE_HEAD,
                max_field_size=MAX_RESPONSE_HEAD,
            )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    @property
    def healthy(self) -> bool:
        return self.last_error_at <= self.last_ok_at

    def failed(self, detail: str) -> BackendUnavailable:
        self.errors += 1
        self.last_error = detail
        self.last_error_at = time.time()
        return BackendUnavailable(self.system, detail)

    async def send(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        data: Any,
        state: BodyState | None = None,
    ) -> aiohttp.ClientResponse:
        """Open a request; the caller reads and releases the response."""
        assert self.session is not None, "Backend.open() first"
        self.requests += 1
        try:
            sending = self.session.request(
                method,
                URL(url, encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
                chunked=None,
            )
            resp = await (sending if state is None else self._watched(sending, state))
        except (RequestTimeout, RequestTooLarge):
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            if state is not None and (state.stalled or state.too_large):
                raise (
                    RequestTimeout("the client stopped sending its body")
                    if state.stalled
                    else RequestTooLarge("the request body is too large")
                ) from None
            raise self.failed(_describe(exc)) from None
        self.last_ok_at = time.time()
        return resp

    async def _watched(
        self, sending: Awaitable[aiohttp.ClientResponse], state: BodyState
    ) -> aiohttp.ClientResponse:
        """``sending`` (a request with a streamed body), timed out when the back end takes
        no chunk of it for ``timeout`` seconds, as nginx's ``proxy_send_timeout``: aiohttp
        starts its read timeout once the body is sent, and a back end that stopped
        reading would hold the client for as long as it keeps the connection."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(sending)
        try:
            while True:
                done, _ = await asyncio.wait((task,), timeout=min(1.0, self.timeout))
                if done:
                    return task.result()
                since = state.writing_since
                if since and loop.time() - since >= self.timeout:
                    raise TimeoutError("the back end took none of the body")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def status(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "answered": self.last_ok_at > 0,  # False: no request reached it yet
            "requests": self.requests,
            "errors": self.errors,
            "last_error": self.last_error,
        }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


async def read_small(resp: aiohttp.ClientResponse, cap: int, backend: Backend) -> bytes | None:
    """The whole body if it is at most ``cap`` bytes (None: too large, left unread)."""
    if resp.content_length is not None and resp.content_length > cap:
        return None
    data = b""
    try:
        while len(data) <= cap:
            more = await resp.content.read(cap + 1 - len(data))
            if not more:
                break
            data += more
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        resp.close()
        raise backend.failed(_describe(exc)) from None
    if len(data) > cap:
        resp.close()
        return None
    resp.release()
    return data


class ClientStalled(ConnectionError):
    """The client took none of its answer for ``send_timeout`` seconds (its connection
    is aborted: a ConnectionError, as when a client goes away)."""


class _SendWatch:
    """``out.write`` that gives up on a client that takes nothing of its answer for
    ``send_timeout`` (nginx's ``send_timeout``): it would hold the back-end connection for
    ever.  Only a client that takes nothing is dropped: one that takes its answer slowly (a
    mobile download) needs more than that to empty the write buffer, and keeps going as
    long as the buffer shrinks."""

    __slots__ = ("_cm", "_handle", "_loop", "_mark", "_timeout", "_transport")

    def __init__(self, transport: asyncio.BaseTransport | None, send_timeout: float) -> None:
        self._transport = transport
        self._timeout = send_timeout
        self._loop = asyncio.get_running_loop()
        self._cm: asyncio.Timeout | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._mark = 0

    def _left(self) -> int:
        # uvloop's transports are not asyncio.WriteTransport subclasses: asked by name
        size = getattr(self._transport, "get_write_buffer_size", None)
        return int(size()) if size is not None else 0

    async def write(self, out: web.StreamResponse, data: bytes) -> None:
        try:
            async with asyncio.timeout(None) as cm:
                self._cm = cm
                self._loop.call_soon(self._start)  # runs once write() put the data in the buffer
                try:
                    await out.write(data)
                finally:
                    self._cm = None
                    if self._handle is not None:
                        self._handle.cancel()
                        self._handle = None
        except TimeoutError:
            raise ClientStalled("the client took none of its answer") from None

    def _start(self) -> None:
        if self._cm is not None and self._handle is None:
            self._mark = self._left()
            self._handle = self._loop.call_later(self._timeout, self._check)

    def _check(self) -> None:
        self._handle = None
        cm = self._cm
        if cm is None:
            return
        left = self._left()
        if left < self._mark:  # it took some: another send_timeout from now
            self._mark = left
            self._handle = self._loop.call_later(self._timeout, self._check)
        else:
            cm.reschedule(self._loop.time())


async def relay(
    request: web.BaseRequest,
    resp: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    backend: Backend,
    body: bytes | None = None,
    send_timeout: float = 60.0,
) -> web.StreamResponse:
    """Send a back end's answer to the client, streaming unless ``body`` was read already.

    A back end that breaks off mid-body gets the client connection aborted: the client
    sees a truncated message, never a complete-looking wrong one; so does a client that
    takes none of its answer for ``send_timeout`` seconds (``ClientStalled``)."""
    out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
    watch = _SendWatch(request.transport, send_timeout)
    if body is not None:
        out.content_length = len(body)
    elif resp.content_length is not None:
        out.content_length = resp.content_length
    try:
        try:
            await out.prepare(request)
        except ValueError:
            # aiohttp's client reads header values its server side refuses to write (a
            # control character): an answer the fast path refuses too (h1.H1Error, in the
            # same words); nothing was written yet, so the client gets the fault
            raise backend.failed(
                "the back end's answer is not valid HTTP/1.x: a control character in a header"
            ) from None
        if body is not None:
            if body and request.method != "HEAD":
                await watch.write(out, body)
        elif request.method != "HEAD":
            chunks = resp.content.iter_chunked(CHUNK).__aiter__()
            while True:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    backend.failed("dropped mid-response: " + _describe(exc))
                    log.info(
                        "%s back end broke off a response to %s: %s",
                        backend.system,
                        request.path,
                        _describe(exc),
                    )
                    if request.transport is not None:
                        request.transport.abort()
                    return out
                # a client that went away raises here, as it should
                await watch.write(out, chunk)
        await out.write_eof()
    except ClientStalled:
        log.debug("dropping a client that took none of its answer from %s", request.path)
        if request.transport is not None:
            request.transport.abort()
        raise
    finally:
        resp.release()
        # release() cancels the task still sending a streamed request body (an answer
        # that came before the whole body); wait for it to let go of the client's stream,
        # else aiohttp's drain of the rest of that body finds it still waiting and logs
        # "readany() called while another coroutine is already waiting"
        await resp.wait_for_close()
    return out
