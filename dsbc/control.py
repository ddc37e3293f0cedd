"""The control API (SPEC section 4): health, metrics, lookups, customers and migrations
over HTTP on ``control.listen``, run by worker 0 of ``dsbc run``.

    GET  /healthz                          200 {"status": "ok" | "degraded", ...}, 503 when
                                           draining or no SIP worker is alive
                                           (?strict=1: 503 also while degraded)
    GET  /metrics                          Prometheus text (dsbc/metrics.py)
    GET  /v1/identities/{kind}/{value}     {customer_id, system, state, ...} or 404
    GET  /v1/customers/{customer_id}       the customer record or 404
    PUT  /v1/customers/{customer_id}       {identities: [...], system?, group?}
    POST /v1/migrations                    {customers: [...], to?: "target", dry_run?, prepare?, unprepare?,
                                            lock_for?, batch_size?, who?}
                                           -> {batch_id, moved, already, unknown,
                                               registered: {on, of}, ...}
    POST /v1/migrations/{batch_id}/rollback  {who?}
    GET  /v1/status                        the workers' snapshots summed, store counts, batches

``/v1`` needs ``Authorization: Bearer <control.token>``; with no token configured every
``/v1`` call is refused (401) and says how to set one.  Errors are JSON ``{"error": ...}``:
400 bad input (with the reason), 401, 404 unknown identity / customer / batch (and a
migration naming only unknown customers), 409 a group split or a customer locked by
another batch, 503 the store cannot be written; a request aiohttp cannot parse gets 400
(431 for a head over its limits) in the same shape.

Store writes run in a thread (a big batch must not stop this worker's SIP traffic); their
effect reaches this worker's index through `store.refresh()` on the loop right after, and
every other worker and node through the store's change feed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from api_proxy.server import HeadTimeoutHandler, answered_in_11, head_too_large, refusal_reason

from .config import Config, format_hostport, parse_hostport
from .imports import import_refusal, keep_stored_groups
from .metrics import read_retired, read_snapshots, render, summarize, with_retired, worker_key
from .migrate import (
    BatchAborted,
    MigrationInterrupted,
    StopAwareSleep,
    check_batch,
    longest_registration,
    move_batch,
    phones_by_account,
    phones_on,
)
from .store import (
    SYSTEMS,
    BadIdentity,
    BadRow,
    BatchCancelled,
    GroupSplitError,
    LocationStore,
    LockedByBatch,
    StoreError,
    StoreUnavailable,
    clean_row,
    normalise,
    some,
)

log = logging.getLogger("dsbc.control")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
COUNTS_TTL = 10.0  # seconds a store count is reused by /metrics (a count may scan)
COUNTS_WAIT = 2.0  # seconds /metrics and /v1/status wait for the store (a hung Redis)
MAX_BODY = 64 * 1024 * 1024
#: seconds a client may take to send a request head (from its connection or its first
#: octet), and a body: a slow or silent client is closed (as nginx's client_header_timeout
#: and client_body_timeout), not left holding a connection of worker 0 forever
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 15.0


class ApiError(Exception):
    """An answer other than 200: status and reason (str())."""

    def __init__(self, status: int, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.extra = extra


def _only_unknown(result: Any) -> None:
    """A migration naming nothing but unknown customers is bad input (404, as for one
    unknown customer; `dsbc migrate` exits 2): nothing was done, no batch recorded."""
    if result.unknown and not result.moved and not result.already:
        raise ApiError(404, f"unknown customer(s): {some(result.unknown)}", unknown=result.unknown)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=str) + "\n", status=status,
                        content_type="application/json")


#: the request counters' keys (the first path segment, or the one after /v1/)
_ROUTE_NAMES = frozenset({"healthz", "metrics", "identities", "customers", "migrations", "status"})


def _error(status: int, reason: str, **extra: Any) -> web.Response:
    resp = _json({"error": reason, **extra}, status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="dsbc"'
    return resp


class _JsonErrorHandler(HeadTimeoutHandler):
    """aiohttp's connection handler, answering what aiohttp refuses before any route runs
    (a head it cannot parse, one over its size limits) in the API's JSON shape, and logging
    it at debug level: bad input, not a server error with a traceback; a head that does not
    arrive within HEAD_TIMEOUT closes the connection."""

    def head_timeout(self) -> float:
        return HEAD_TIMEOUT

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("a response was under way; closing the connection")
        if isinstance(exc, ConnectionError):
            # the client went away while its body was read: no one to answer, nothing wrong
            # here (aiohttp closes the connection quietly, as for the API dispatcher)
            log.debug("control API: client %s went away during its request: %s", request.remote, exc)
            raise ConnectionError("the client went away")
        if status >= 500:
            log.error("control API: unhandled error on %s", request.path, exc_info=exc)
            reason = "internal error (the node's log has the details)"
        else:
            text = str(message or exc or "")
            log.debug("control API: refused a request from %s: %s", request.remote, refusal_reason(text))
            if head_too_large(status, text):
                status, reason = 431, "the request is not valid HTTP: its head is over the limits"
            else:
                first = text.strip().splitlines()
                reason = "the request is not valid HTTP" + (f" ({first[0]})" if first else "")
        resp = _error(status, reason)
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class ControlService:
    def __init__(self, cfg: Config, store: LocationStore, run_dir: Path | None) -> None:
        self.cfg = cfg
        self.store = store
        self.run_dir = run_dir
        self.token = cfg.control.token
        self.draining = False
        self.stopping = threading.Event()
        self.started = time.time()  # this worker's start (its grace for the SIP workers)
        #: the node's start: the master's, not this worker's (a restarted worker 0 is no
        #: restart of the node)
        self.node_started = self.started
        #: the runner's hook for customers whose store rows changed (held SIP requests,
        #: API and RADIUS holds are released at once): the writes made here are applied by
        #: ``_catch_up``, so the runner's own refresh never sees them
        self.on_changed: Callable[[list[str]], None] | None = None
        #: the pid `dsbc status` shows: the master's, the one to send SIGHUP / SIGTERM to
        #: (this worker ignores SIGHUP; a SIGTERM drained worker 0 alone, and the master
        #: started it again)
        self.node_pid = os.getpid()
        if run_dir is not None:
            try:
                self.node_started = (run_dir / "master.json").stat().st_mtime
                self.node_pid = int(json.loads((run_dir / "master.json").read_text())["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        self.counters: Counter[str] = Counter()
        self.migrations: Counter[str] = Counter()
        self.moved: Counter[str] = Counter()
        self._counts: tuple[float, dict[str, Any]] = (0.0, {})
        self._reading: asyncio.Future[tuple[dict[str, Any], list[Any]]] | None = None
        self._write_lock = asyncio.Lock()
        self.app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        r = self.app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/v1/identities/{kind}/{value}", self.identity)
        r.add_get("/v1/customers/{customer_id}", self.get_customer)
        r.add_put("/v1/customers/{customer_id}", self.put_customer)
        r.add_post("/v1/migrations", self.migrate)
        r.add_post("/v1/migrations/{batch_id}/rollback", self.rollback)
        r.add_get("/v1/status", self.status_handler)
        self.runner: web.ServerRunner | None = None
        self.site: web.TCPSite | None = None
        self.address: tuple[str, int] = ("", 0)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        host, port = parse_hostport(self.cfg.control.listen, 8080)
        host = host.strip("[]")
        # the application's own handler, served by a Server whose faults are JSON too
        self.app.freeze()
        app = self.app

        def make_request(message: Any, *args: Any) -> web.BaseRequest:
            return app._make_request(answered_in_11(message), *args)

        handler: Any = app._handle  # takes the web.Request its request factory makes
        # (a ServerRunner passes its own keyword arguments to no handler: access_log=None
        # belongs to the Server, or every /healthz poll writes an aiohttp.access line)
        self.runner = web.ServerRunner(_JsonErrorServer(handler, request_factory=make_request, access_log=None),
                                       handle_signals=False)
        await self.runner.setup()
        # reuse_port: on a reload the new worker binds while the old one still drains
        self.site = web.TCPSite(self.runner, host, port, reuse_port=True)
        await self.site.start()
        server = self.site._server
        socks = getattr(server, "sockets", None) or []
        self.address = socks[0].getsockname()[:2] if socks else (host, port)
        log.info("control API on http://%s%s", format_hostport(host, self.address[1]),
                 "" if self.token else " (no control.token: /v1 is refused)")

    def drain(self) -> None:
        """The worker stops: /healthz says 503 while the node drains; on a reload (the
        master marked this worker ``replaced-PID``: the node goes on with a new worker) this
        one stops listening at once instead, and the new one answers."""
        self.draining = True
        self.stopping.set()  # a migration in its lock window stops there and unlocks
        replaced = self.run_dir is not None and (self.run_dir / f"replaced-{os.getpid()}").exists()
        if replaced and self.site is not None:
            server = self.site._server
            if server is not None:
                server.close()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def status(self) -> dict[str, Any]:
        return {"listen": f"{self.address[0]}:{self.address[1]}", "requests": dict(self.counters),
                "migrations": dict(self.migrations), "moved": dict(self.moved)}

    # -- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        name = path.split("/")[2] if path.startswith("/v1/") and path.count("/") >= 2 else path.strip("/")
        # bounded: a scanner's random paths all count as "other", not one key each
        self.counters[name if name in _ROUTE_NAMES else "other"] += 1
        if path.startswith("/v1/") or path == "/v1":
            if not self.token:
                return _error(401, "the control API is disabled until control.token is set "
                                   "(dsbc.toml [control] token = \"...\")")
            auth = request.headers.get("Authorization", "")
            scheme, _, given = auth.partition(" ")
            if not auth:
                return _error(401, "missing Authorization: Bearer <control.token>")
            # surrogateescape: aiohttp keeps a header's non-UTF-8 octets as lone surrogates
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), self.token.encode()
            ):
                return _error(401, "wrong token (Authorization: Bearer <control.token>)")
        try:
            return await handler(request)
        except ApiError as exc:
            resp = _error(exc.status, str(exc), **exc.extra)
            if exc.status == 408:  # the rest of a body that stalled is not worth waiting for
                resp.force_close()
            return resp
        except web.HTTPException as exc:
            if exc.status >= 400:
                resp = _error(exc.status, exc.reason)
                if "Allow" in exc.headers:  # a 405 says which methods the path takes (RFC 9110)
                    resp.headers["Allow"] = exc.headers["Allow"]
                return resp
            raise
        except GroupSplitError as exc:
            return _error(409, str(exc), group=exc.group, missing=exc.missing)
        except LockedByBatch as exc:
            return _error(409, str(exc), locked=exc.locked)
        except BatchCancelled as exc:
            return _error(409, str(exc), batch_id=exc.batch_id)
        except MigrationInterrupted as exc:
            return _error(503, str(exc))
        except BatchAborted as exc:
            r = exc.result
            return _error(503, str(exc), batch_id=r.batch_id, moved=r.moved)
        except StoreUnavailable as exc:
            return _error(503, str(exc))
        except StoreError as exc:
            return _error(400, str(exc))

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {BODY_TIMEOUT:g} s") from None
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
            # a lone surrogate ("\ud800") is valid JSON but not text: no store can write it
            json.dumps(body, ensure_ascii=False).encode()
        except (ValueError, UnicodeError) as exc:
            raise ApiError(400, f"the body is not JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "the body is not JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    async def _write(self, fn: Callable[[], Any], exclusive: bool = True,
                     check: Callable[[], None] | None = None) -> Any:
        """A store write in a thread, one at a time; then this worker's index catches up.
        A migration is not exclusive: it may spend minutes in its lock window, and a rollback
        that stops it, or an edit of another customer, must not wait for that (its own store
        transactions keep it atomic).  ``check`` (it raises to refuse the write) runs first,
        on an index that has applied what other processes committed: a `dsbc migrate` or
        `dsbc import` a moment ago, which the index sees only at its next store.poll_interval."""
        if not exclusive:
            try:
                return await asyncio.to_thread(fn)
            finally:
                self._catch_up()
        async with self._write_lock:
            if check is not None:
                self._catch_up()
                check()
            try:
                return await asyncio.to_thread(fn)
            finally:
                self._catch_up()

    def _catch_up(self) -> None:
        """Apply what the store committed, and tell the runner which customers changed."""
        changed = self.store.refresh()
        if changed and self.on_changed is not None:
            self.on_changed(list(changed))

    # -- health and metrics -----------------------------------------------------------------

    def _snapshots(self) -> list[dict[str, Any]]:
        # a worker a reload stopped (fewer workers) leaves a snapshot that stays fresh for
        # SNAPSHOT_MAX_AGE: not counted (dsbc status said "workers: 3" after 3 -> 1)
        return self._snapshots_and_retired()[0]

    def _snapshots_and_retired(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The fresh snapshots, then the counters of the workers that are gone (in this
        order: see `read_retired`)."""
        snaps = read_snapshots(self.run_dir)
        retired = read_retired(self.run_dir)
        folded = set(retired.get("folded") or [])
        return [s for s in snaps if worker_key(s) not in folded
                and (not isinstance(s.get("worker"), int) or s["worker"] < self.cfg.sip.workers)], retired

    async def healthz(self, request: web.Request) -> web.Response:
        snaps = self._snapshots()
        summary = summarize(snaps)
        store_ok = bool(self.store.healthy)
        nodes = summary["services"].get("sip", {}).get("nodes", [])
        # a system with no SIP node at all is down too: its customers' requests get 503
        no_nodes = {name for name in ("source", "target") if not self.cfg.system(name).sip} if self.cfg.sip.enabled else set()
        systems_down = sorted(
            ({n["system"] for n in nodes} - {n["system"] for n in nodes if n["up"]}) | no_nodes
        )
        body: dict[str, Any] = {
            "workers": summary["workers"],
            "sip_workers": summary["sip_workers"],
            "store": {"healthy": store_ok, "url": _shown_url(self.store, self.cfg.store.url)},
            "systems_down": systems_down,
            "uptime": round(time.time() - self.node_started, 1),
        }
        reason = getattr(self.store, "reason", "")
        if reason:
            body["store"]["reason"] = reason
        if self.draining:
            return _json({"status": "draining", **body}, 503)
        if self.cfg.sip.enabled and summary["sip_workers"] == 0:
            # the control API opens before SIP (worker 0 starts it first): until a SIP worker
            # has reported, the node is starting, not ready for the address (keepalived)
            if time.time() - self.started <= 3:
                return _json({"status": "starting", "reason": "no SIP worker has reported yet", **body}, 503)
            return _json({"status": "down", "reason": "no SIP worker alive", **body}, 503)
        degraded = not store_ok or bool(systems_down)
        status = "degraded" if degraded else "ok"
        strict = request.query.get("strict", "") not in ("", "0", "false", "no")
        return _json({"status": status, **body}, 503 if degraded and strict else 200)

    async def _store_view(self) -> tuple[dict[str, Any], list[Any]]:
        """The store's counts and last 10 batches, read in a thread; StoreError, or
        TimeoutError after COUNTS_WAIT (a Redis that stopped answering holds a read for
        its socket timeout: a Prometheus scrape must not).  One read at a time: the next
        call waits for the one under way rather than start another thread."""
        if self._reading is None or self._reading.done():
            def read() -> tuple[dict[str, Any], list[Any]]:
                return self.store.counts(), self.store.batches(10)

            self._reading = asyncio.ensure_future(asyncio.to_thread(read))
            # an answer nobody waited for (a timeout) must not log "never retrieved"
            self._reading.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.wait_for(asyncio.shield(self._reading), COUNTS_WAIT)

    async def _store_counts(self) -> dict[str, Any]:
        at, counts = self._counts
        if time.monotonic() - at < COUNTS_TTL:
            return counts
        try:
            fresh, last = await self._store_view()
            counts = {**fresh, "_last_batch_ts": last[0].ts if last else 0}
        except (StoreError, TimeoutError) as exc:
            log.debug("counts unavailable: %s", exc or "the store did not answer in time")
            counts = {k: v for k, v in counts.items()}  # the last known ones
        self._counts = (time.monotonic(), counts)
        return counts

    async def metrics(self, request: web.Request) -> web.Response:
        snaps, retired = self._snapshots_and_retired()
        summary = summarize(snaps)
        counts = await self._store_counts()
        extra = {
            "up": not self.draining,
            "counts": {k: v for k, v in counts.items() if not k.startswith("_")},
            "migrations": dict(self.migrations),
            "moved": dict(self.moved),
            "rollbacks": self.counters.get("rollbacks_done", 0),
            "last_batch_ts": counts.get("_last_batch_ts", 0),
        }
        return web.Response(text=render(summary, extra, retired),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    # -- /v1 --------------------------------------------------------------------------------

    async def identity(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        value = request.match_info["value"]
        try:
            norm = normalise(kind, value)
        except BadIdentity as exc:
            raise ApiError(400, str(exc)) from None
        kind = kind.strip().lower()
        loc = self.store.lookup(kind, norm)
        if loc is None:
            policy = self.store.unknown
            raise ApiError(404, f"{kind}:{norm} is unknown", identity=f"{kind}:{norm}",
                           policy=policy)
        out: dict[str, Any] = {"identity": f"{kind}:{norm}", "customer_id": loc.customer_id,
                               "system": loc.system, "state": loc.state}
        c = self.store.customer(loc.customer_id)
        if c is not None:
            out.update(group=c.group, batch_id=c.batch_id, expires_cap=c.expires_cap)
        return _json(out)

    async def get_customer(self, request: web.Request) -> web.Response:
        cid = request.match_info["customer_id"]
        c = self.store.customer(cid)
        if c is None:
            raise ApiError(404, f"customer {cid} is unknown")
        return _json({"customer_id": c.customer_id, "system": c.system, "state": c.state,
                      "group": c.group, "batch_id": c.batch_id, "expires_cap": c.expires_cap,
                      "identities": list(c.identities)})

    async def put_customer(self, request: web.Request) -> web.Response:
        cid = request.match_info["customer_id"]
        body = await self._body(request)
        if body.get("identities") is None:
            raise ApiError(400, "missing field 'identities' (a list of KIND:VALUE)")
        named = body.get("customer_id", cid)
        if str(named) != cid or isinstance(named, bool):  # not silently the path's
            raise ApiError(400, f"customer_id: {named!r} in the body is not {cid!r} of the path")
        row = {"customer_id": cid, **{k: v for k, v in body.items() if k != "customer_id"}}
        try:
            clean = clean_row(row)
        except BadRow as exc:
            reason = str(exc)
            if not reason.startswith(("customer_id:", "identities:", "system:", "group:", "unknown field")):
                reason = f"identities: {reason}"  # a bad identity says which, not where it was
            raise ApiError(400, reason) from None
        named_group = {clean.customer_id} if "group" in body else set()
        existed = False

        def check() -> None:
            nonlocal clean, existed
            existed = self.store.customer(cid) is not None
            # group? is optional: left out, the customer stays in its group (as system: stays put)
            clean = keep_stored_groups(self.store, [clean], named_group)[0]
            refusal = import_refusal(self.store, [clean])
            if refusal is not None:
                raise ApiError(409, refusal[1])

        await self._write(lambda: self.store.import_rows([clean]), check=check)
        c = self.store.customer(clean.customer_id)
        out = {"customer_id": clean.customer_id, "created": not existed,
               "system": c.system if c else clean.system or "source",
               "group": c.group if c else clean.group,
               "identities": list(c.identities) if c else list(clean.identities)}
        return _json(out)

    @staticmethod
    def _ids(body: dict[str, Any]) -> list[str]:
        raw = body.get("customers")
        if raw is None:
            raise ApiError(400, "missing field 'customers' (a list of customer ids)")
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "customers: expected a non-empty list of customer ids")
        ids: dict[str, None] = {}
        for item in raw:
            if isinstance(item, int) and not isinstance(item, bool):
                item = str(item)
            if not isinstance(item, str) or not item.strip() or any(ch.isspace() for ch in item.strip()):
                raise ApiError(400, f"customers: {item!r} is not a customer id")
            ids[item.strip()] = None
        return list(ids)

    @staticmethod
    def _who(body: dict[str, Any], request: web.Request) -> str:
        who = body.get("who") or f"control@{request.remote or '?'}"
        if not isinstance(who, str) or len(who) > 200:
            raise ApiError(400, "who: expected a short string")
        return who

    @staticmethod
    def _flag(body: dict[str, Any], key: str) -> bool:
        """A JSON true / false (a string "false" would be truthy: refused, not guessed)."""
        value = body.get(key, False)
        if not isinstance(value, bool):
            raise ApiError(400, f"{key}: expected true or false, got {value!r}")
        return value

    @staticmethod
    def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
        value = body.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ApiError(400, f"{key}: expected a number between {low:g} and {high:g}")
        return float(value)

    async def migrate(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        ids = self._ids(body)
        to = body.get("to", "target")
        if isinstance(to, str):  # "Target" as PUT's system and the CSV import take it
            to = to.strip().lower()
        if to not in SYSTEMS:
            raise ApiError(400, f"to: {to!r} is not one of {', '.join(SYSTEMS)}")
        who = self._who(body, request)
        dry_run = self._flag(body, "dry_run")
        prepare = self._flag(body, "prepare")
        unprepare = self._flag(body, "unprepare")
        if prepare and unprepare:
            raise ApiError(400, "prepare and unprepare: give one")
        force = self._flag(body, "force")
        lock_for = self._number(body, "lock_for", 0, 0, 600)
        batch_size = int(self._number(body, "batch_size", 500, 1, 100_000))
        unknown_keys = set(body) - {"customers", "to", "who", "dry_run", "prepare", "unprepare", "force",
                                    "lock_for", "batch_size"}
        if unknown_keys:
            raise ApiError(400, f"unknown field(s) {', '.join(sorted(unknown_keys))}")
        if dry_run or prepare or unprepare:
            preparing = (prepare or unprepare) and not dry_run
            if preparing:
                check = await asyncio.to_thread(self.store.migrate, ids, to, who, None, True)
            else:  # what the run would refuse, a dry run refuses (409 locked, group split)
                check = await asyncio.to_thread(lambda: check_batch(self.store, ids, to, who=who, force=force))
            _only_unknown(check)
            out = {"dry_run": True, "batch_id": "", "to": to, "moved": check.moved,
                   "already": check.already, "unknown": check.unknown}
            if preparing and unprepare:  # whichever way the batch was prepared (--to source too)
                known = check.moved + check.already
                await self._write(lambda: self.store.prepare(known, 0))
                out.update(dry_run=False, unprepared=len(known))
            elif preparing:
                expires = self.cfg.sip.migration_expires
                await self._write(lambda: self.store.prepare(check.moved, expires))
                wait = await asyncio.to_thread(longest_registration, self.store, check.moved)
                out.update(dry_run=False, prepared=len(check.moved), expires=expires, wait=round(wait))
            return _json(out)
        try:
            expected = await asyncio.to_thread(phones_by_account, self.store, ids)  # before the flip
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"migration refused: {exc}; nothing was changed") from None
        if self.draining:
            raise ApiError(503, "the node is stopping: migrate through another node, or when it is back")
        sleep = StopAwareSleep(self.stopping, "the node is stopping (SIGTERM or a reload): the migration "
                                              "was interrupted in its lock window and its customers unlocked")
        result = await self._write(lambda: move_batch(self.store, ids, to, who=who, batch_size=batch_size,
                                                      lock_for=lock_for, force=force, sleep=sleep,
                                                      lease=self.cfg.store.lock_lease), exclusive=False)
        _only_unknown(result)
        try:  # the batch committed: a store gone away now only leaves the count unknown
            on: int | None = await asyncio.to_thread(
                phones_on, self.store, result.moved + result.already, to, expected)
        except StoreUnavailable as exc:
            log.warning("migration %s: cannot count the registered phones: %s", result.batch_id, exc)
            on = None
        self.migrations[to] += 1
        self.moved[to] += len(result.moved)
        log.info("migration %s by %s: %d moved to %s, %d already there, %d unknown",
                 result.batch_id, who, len(result.moved), to, len(result.already), len(result.unknown))
        # nothing moved: no batch was recorded, so no id to roll back (as `dsbc migrate` says)
        done: dict[str, Any] = {
            "batch_id": result.batch_id if result.moved else "", "to": to, "moved": result.moved,
            "already": result.already, "unknown": result.unknown, "dry_run": False,
            "registered": None if on is None else {"on": on, "of": sum(expected.values())}}
        if result.warning:  # committed, but no Redis replica confirmed it yet
            done["warning"] = result.warning
        return _json(done)

    async def rollback(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"].strip()
        body = await self._body(request)
        who = self._who(body, request)
        unknown_keys = set(body) - {"who"}
        if unknown_keys:
            raise ApiError(400, f"unknown field(s) {', '.join(sorted(unknown_keys))}")
        try:
            r = await self._write(lambda: self.store.rollback(batch_id, who=who))
        except StoreError as exc:
            if "unknown batch" in str(exc):
                raise ApiError(404, str(exc)) from None
            raise
        self.counters["rollbacks_done"] += 1
        log.info("rollback of %s by %s: batch %s, %d moved", batch_id, who, r.batch_id, len(r.moved))
        # nothing moved (rolled back before): no batch was recorded, as for a migration
        out = {"batch_id": r.batch_id if r.moved else "", "rolled_back": batch_id, "to": r.to, "moved": r.moved,
               "already": r.already, "unknown": r.unknown}
        if r.warning:  # committed, but no Redis replica confirmed it yet
            out["warning"] = r.warning
        return _json(out)

    async def status_handler(self, request: web.Request) -> web.Response:
        snaps, retired = self._snapshots_and_retired()
        out: dict[str, Any] = {"node": with_retired(summarize(snaps), retired), "draining": self.draining,
                               "pid": self.node_pid, "uptime": round(time.time() - self.node_started, 1),
                               "store": {"url": _shown_url(self.store, self.cfg.store.url),
                                         "healthy": bool(self.store.healthy),
                                         "reason": getattr(self.store, "reason", "")}}
        try:
            counts, batches = await self._store_view()
            out["store"]["counts"] = counts
            out["store"]["batches"] = [
                {"batch_id": b.batch_id, "ts": b.ts, "who": b.who, "from": b.from_system,
                 "to": b.to_system, "customers": b.customers, "note": b.note}
                for b in batches
            ]
        except StoreError as exc:
            out["store"]["error"] = str(exc)
        except TimeoutError:
            out["store"]["error"] = f"the store did not answer within {COUNTS_WAIT:g} s"
        return _json(out)


def _shown_url(store: LocationStore, url: str) -> str:
    """The store URL without its password (the Redis store keeps a masked copy)."""
    return str(getattr(store, "url", "") or url)


async def start_control(cfg: Config, store: LocationStore) -> ControlService:
    """Start the control API of ``cfg.control`` (the runner calls it in worker 0)."""
    run_dir = os.environ.get("DSBC_RUN_DIR")
    svc = ControlService(cfg, store, Path(run_dir) if run_dir else None)
    await svc.start()
    return svc
