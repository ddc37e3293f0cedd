"""The API dispatcher wired to dsbc: config -> ``api_proxy`` settings, store -> Router.

    service = await start_api(cfg, store)
    service.status()          # listening addresses, back-end health, counters
    service.metrics           # plain dict of counters (exposed by the control API)
    await service.stop()

``StoreRouter`` implements ``api_proxy.router.Router`` on a ``LocationStore``: owners from
the in-memory index (with ``store.unknown``), API sessions in the store's session table
(so every worker and node routes a session made on any of them), creates added to the
owning customer's identities at once (SIP and RADIUS route them on the next request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from api_proxy.classify import CpeError
from api_proxy.router import Owner, ProxySettings, SessionRecord, SettingsError, Vhost, make_vhost
from api_proxy.server import ApiProxy
from dsbc.config import Config, api_backends, config_error, parse_api_listen
from dsbc.store.base import SESSION_FRESH, ApiSession, BadIdentity, LocationStore, normalise
from dsbc.writebehind import WriteBehind

log = logging.getLogger("dsbc.api")
MAX_RECORDS = 4096  # SessionRecords kept beside the store's sessions (StoreRouter)


class StoreRouter:
    """The Router protocol over a LocationStore."""

    def __init__(
        self, store: LocationStore, lock_hold: float = 2.0, writer: WriteBehind | None = None
    ) -> None:
        self.store = store
        self._lock_hold = lock_hold
        # session writes go through the write-behind (a stalled store must not hold the
        # loop); this node answers from what it wrote itself (``_local``, the newest
        # version, while the write may be pending: then from the store, which another node
        # may have changed since) and remembers its logouts (``_gone``) until their deletion
        # has landed and no copy can linger in the store's own memory cache
        self.writer = writer
        self._local: dict[str, tuple[ApiSession, float]] = {}  # key -> (session, written at)
        # key -> (the session's expiry, logout at, its deletion written at once)
        self._gone: dict[str, tuple[float, float, bool]] = {}
        self._next_purge = 0.0
        self.collisions = 0  # created entities not recorded: their id is another customer's
        # the SessionRecord made for each ApiSession the store handed out, while the store
        # hands out the same object (records are never changed): no copy per request
        self._records: dict[str, tuple[ApiSession, SessionRecord]] = {}

    @property
    def lock_hold(self) -> float:
        return self._lock_hold

    def owner(self, kind: str, value: str) -> Owner | None:
        store = self.store
        if kind == "customer":
            cid = value.strip()
            if not cid or len(cid) > 128:
                return None
            cust = store.customer(cid)
            if cust is None:
                return Owner(store.unknown, "", "active", False)
            return Owner(cust.system, cust.customer_id, cust.state, True)
        try:
            norm = normalise(kind, value)
        except BadIdentity:
            return None
        loc = store.lookup(kind, norm)
        if loc is None:
            return Owner(store.unknown, "", "active", False)
        return Owner(loc.system, loc.customer_id, loc.state, True)

    def default_system(self) -> str:
        return self.store.unknown

    def get_session(self, key: str) -> SessionRecord | None:
        if self._gone and key in self._gone:
            return None
        mine = self._local.get(key)
        s = None
        if mine is not None:
            s, written = mine
            now = time.time()
            if s.expires_at <= now:
                return None
            if now - written > SESSION_FRESH and self.writer is not None and self.writer.idle:
                del self._local[key]  # landed: the store has it, or a newer one from elsewhere
                s = None
        if s is None:
            s = self.store.get_session(key)
        if s is None:
            return None
        known = self._records.get(key)
        if known is not None and known[0] is s:
            return known[1]
        record = SessionRecord(
            key=s.key,
            system=s.system,
            expires_at=s.expires_at,
            customer_id=s.customer_id,
            realm=s.realm,
            extra=s.extra,
        )
        if len(self._records) >= MAX_RECORDS:
            self._records.clear()
        self._records[key] = (s, record)
        return record

    def put_session(self, record: SessionRecord) -> None:
        session = ApiSession(
            record.key,
            record.system,
            record.expires_at,
            record.customer_id,
            record.realm,
            record.extra,
        )
        if self.writer is None:
            self.store.put_session(session)
            return
        self._gone.pop(session.key, None)
        self._local[session.key] = (session, time.time())
        self._purge()
        self.writer.submit(lambda st: st.put_session(session))

    def delete_session(self, key: str) -> None:
        if self.writer is None:
            self.store.delete_session(key)
            return
        mine = self._local.pop(key, None)
        old = mine[0] if mine is not None else self.store.get_session(key)
        now = time.time()
        self._purge()
        self.writer.submit(lambda st: st.delete_session(key))
        self._gone[key] = (old.expires_at if old is not None else now, now, self.writer.idle)

    def _purge(self) -> None:
        now = time.time()
        if now < self._next_purge:
            return
        self._next_purge = now + 60.0
        # what the store has by now (written, nothing pending) is read from it again: kept
        # here, every login (and logout) would stay in memory until the session expires
        landed = self.writer is not None and self.writer.idle
        for k in [k for k, (until, at, done) in self._gone.items()
                  if until <= now or ((done or landed) and now - at > SESSION_FRESH)]:
            del self._gone[k]
        for k in [k for k, (s, at) in self._local.items()
                  if s.expires_at <= now or (landed and now - at > SESSION_FRESH)]:
            del self._local[k]

    def record_created(self, customer_id: str, system: str, identities: Sequence[str]) -> None:
        cust = self.store.customer(customer_id)
        if cust is not None and cust.system != system:
            # the target starts as a copy of the source, so both systems hand out the same
            # ids: this id is another system's customer (or, rarely, one that moved a poll
            # ago).  Recording would give that customer's routing to the new entity.
            log.warning(
                "not recording what was created for customer %s on %s: the store has "
                "customer %s on %s (ids collide between the systems?)",
                customer_id, system, customer_id, cust.system,
            )
            self.collisions += 1
            return
        new = []
        for ident in identities:
            kind, _, value = ident.partition(":")
            try:
                ident = f"{kind}:{normalise(kind, value)}"
            except BadIdentity:
                log.warning(
                    "not recording %r for customer %s: not a valid identity", ident, customer_id
                )
                continue
            owner = self.store.lookup(*ident.split(":", 1))
            if owner is not None and owner.customer_id != customer_id:
                log.warning(
                    "not recording %s for customer %s on %s: it belongs to customer %s on %s "
                    "(ids collide between the systems?)",
                    ident, customer_id, system, owner.customer_id, owner.system,
                )
                self.collisions += 1
                continue
            new.append(ident)
        if cust is None:
            self.store.put_customer(customer_id, new, system)
        else:
            # no system: the stored one stays.  This node's copy of the customer may be a
            # poll behind a migration another process just committed; writing its system
            # back would silently undo that migration.
            keys = list(dict.fromkeys([*cust.identities, *new]))
            self.store.import_rows(
                [{"customer_id": customer_id, "identities": keys, "group": cust.group}]
            )
        log.info(
            "recorded %s for customer %s on %s",
            ", ".join(new) or "the customer",
            customer_id,
            cust.system if cust else system,
        )


def build_settings(cfg: Config) -> ProxySettings:
    """``[api]`` (with the systems' ``api`` URLs as defaults) as api_proxy settings."""
    api = cfg.api
    default_source, default_target = api_backends(cfg)
    vhosts: list[Vhost] = []
    for i, vh in enumerate(api.vhosts):
        patterns = vh.cpe_patterns or (api.cpe_patterns if vh.realm == "cpe" else [])
        try:
            vhosts.append(
                make_vhost(
                    vh.host,
                    vh.realm,
                    vh.source or default_source,
                    vh.target or default_target,
                    vh.port,
                    patterns,
                    vh.realm_paths,
                )
            )
        except (SettingsError, CpeError, ValueError) as exc:
            key: list[str | int] = ["api", "vhosts", i]
            if "cpe pattern" in str(exc) and not vh.cpe_patterns:
                key = ["api", "cpe_patterns"]
            raise config_error(cfg, key, str(exc)) from None
        new = vhosts[-1]
        for j, other in enumerate(vhosts[:-1]):
            if (other.host, other.port) == (new.host, new.port):  # the second would never be used
                where = f"port {new.port}" if new.port else "any port"
                raise config_error(cfg, ["api", "vhosts", i],
                                   f"host {new.host!r} on {where} is api.vhosts[{j}]'s too")
    try:
        if not api.vhosts and default_source and default_target:
            vhosts.append(make_vhost("*", "customer", default_source, default_target))
        listen: list[tuple[str, int]] = []
        plain: list[tuple[str, int]] = []  # http: entries: never TLS, even with a certificate
        for entry in api.listen:
            host, port, tls = parse_api_listen(entry)
            (plain if tls is False else listen).append((host, port))
    except (SettingsError, CpeError, ValueError) as exc:
        raise config_error(cfg, ["api"], str(exc)) from None
    return ProxySettings(
        listen=listen,
        plain_listen=plain,
        vhosts=vhosts,
        tls_cert=api.tls_cert,
        tls_key=api.tls_key,
        timeout=api.timeout,
        connect_timeout=api.connect_timeout,
        body_timeout=api.body_timeout,
        send_timeout=api.send_timeout,
        header_timeout=api.header_timeout,
        max_connections=api.max_connections,
        max_connections_per_ip=api.max_connections_per_ip,
        # a body over max_body_size must reach the path that answers 413, not the fast path
        route_body_limit=min(api.route_body_limit, api.max_body_size),
        max_body_size=api.max_body_size,
        max_header_size=api.max_header_size,
        session_ttl=api.session_ttl,
        pool_size=api.pool_size,
        backend_verify=api.backend_verify,
        backend_ca=api.backend_ca,
        fast_path=api.fast_path,
    )


class ApiService:
    """A running API dispatcher."""

    def __init__(
        self, proxy: ApiProxy, router: StoreRouter, writer_task: asyncio.Task[None] | None = None
    ) -> None:
        self.proxy = proxy
        self.router = router
        self._writer_task = writer_task

    @property
    def metrics(self) -> dict[str, int]:
        return self.proxy.metrics

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return list(self.proxy.addresses)

    @property
    def url(self) -> str:
        """``http(s)://host:port`` of the first listener (tests and the demo)."""
        host, port = self.proxy.addresses[0]
        scheme = "https" if (host, port) in self.proxy.tls_addresses else "http"
        return f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"

    @property
    def held_count(self) -> int:
        """Requests of customers in flight waiting for their flip (a drain waits for them)."""
        return self.proxy.holding

    def drain(self) -> None:
        """Accept no more connections: on a reload the successor already listens on the
        same ports (SO_REUSEPORT); requests under way are finished by ``stop``."""
        self.proxy.stop_listening()

    async def stop(self) -> None:
        await self.proxy.stop()
        if self._writer_task is not None:
            self._writer_task.cancel()
        if self.router.writer is not None:
            await self.router.writer.close()

    def status(self) -> dict[str, Any]:
        out = self.proxy.status()
        out["store_healthy"] = self.router.store.healthy
        if self.router.writer is not None:
            w = self.router.writer
            out["session_writes"] = {
                "pending": w.pending,
                "written": w.written,
                "dropped": w.dropped,
                "failures": w.failures,
            }
        return out


async def start_api(cfg: Config, store: LocationStore) -> ApiService:
    """Start the API dispatcher of ``cfg.api`` on ``store``; ConfigError on bad settings,
    OSError when a listen address cannot be bound."""
    settings = build_settings(cfg)
    # SQLite: session writes off the loop (a locked database waits out its busy timeout);
    # the Redis store already writes sessions behind the loop itself
    writer = (
        WriteBehind(cfg.store.url, cfg.store.unknown, store)
        if cfg.store.url.startswith("sqlite:")
        else None
    )
    router = StoreRouter(store, cfg.store.lock_hold, writer)
    proxy = ApiProxy(settings, router)
    try:
        await proxy.start()
    except (OSError, ValueError):
        await proxy.stop()
        raise
    task = asyncio.get_running_loop().create_task(writer.run()) if writer is not None else None
    return ApiService(proxy, router, task)
