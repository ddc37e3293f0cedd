"""Redis URLs and connections for the shared store.

- ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS)
- ``redis+sentinel://[:password@]host:port,host:port/service[/db]``: the master of a
  Sentinel set; after a fail-over the next command finds the new master.

A ``?prefix=name:`` query parameter puts the keys under another prefix (two stores in
one Redis database); the default is ``dsbc:``.

Every client is made with explicit socket timeouts and without redis-py's automatic
retries: a stalled Redis must cost a dispatcher worker one short timeout, not several,
and a write that timed out must not be sent twice behind the operator's back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .base import StoreError

DEFAULT_PREFIX = "dsbc:"


@dataclass
class RedisTarget:
    """Where the store lives; `client()` makes a connection pool with the given timeouts."""

    url: str  # as written (with the password)
    display: str  # for messages and status: the password replaced by ***
    prefix: str = DEFAULT_PREFIX
    sentinels: list[tuple[str, int]] = field(default_factory=list)
    service: str = ""
    db: int = 0
    password: str | None = None
    username: str | None = None
    plain_url: str = ""  # redis:// or rediss:// without our own query parameters

    def client(self, timeout: float, connect_timeout: float | None = None, **extra: Any) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout if connect_timeout is not None else timeout,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": True,
        }
        kwargs.update(extra)
        if not self.sentinels:
            return redis.Redis.from_url(self.plain_url, **kwargs)
        from redis.sentinel import Sentinel

        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            self.sentinels,
            sentinel_kwargs={
                "socket_timeout": kwargs["socket_timeout"],
                "socket_connect_timeout": kwargs["socket_connect_timeout"],
            },
            socket_timeout=kwargs["socket_timeout"],
            socket_connect_timeout=kwargs["socket_connect_timeout"],
        )
        kwargs.pop("socket_timeout")
        kwargs.pop("socket_connect_timeout")
        return sentinel.master_for(  # type: ignore[no-untyped-call]
            self.service,
            db=self.db,
            password=self.password,
            username=self.username,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout if connect_timeout is not None else timeout,
            **kwargs,
        )


def masked_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ***, for a message about a
    URL that could not be parsed (everything up to its last "@" counts as the user part:
    too much is hidden rather than too little)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, tail = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{tail}"


def _url_options(scheme: str) -> set[str]:
    """The query options a store URL may carry besides ``prefix``: for redis:// and
    rediss://, what redis-py turns into the connection's keyword arguments; none for a
    Sentinel URL (its connections are made from the host list)."""
    if scheme not in ("redis", "rediss"):
        return set()
    import inspect

    from redis import connection as rc

    # not URL_QUERY_ARGUMENT_PARSERS' names: it parses ?timeout= for BlockingConnectionPool,
    # which the plain pool hands to the connection (a TypeError at the first command)
    names = {"username", "password", "client_name"}
    names |= set(inspect.signature(rc.ConnectionPool.__init__).parameters) - {
        "self", "connection_class", "connection_kwargs"}
    classes = [getattr(rc, "AbstractConnection", None), rc.Connection]
    if scheme == "rediss":
        classes.append(rc.SSLConnection)
    for cls in filter(None, classes):
        names |= {p.name for p in inspect.signature(cls.__init__).parameters.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY} - {"self"}
    return names


_HOSTPORT = re.compile(r"^\[?([^\]\s]+?)\]?(?::(\d+))?$")


def parse_redis_url(url: str) -> RedisTarget:
    """A RedisTarget for a store URL; StoreError naming what is wrong."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise StoreError(f"bad store url {masked_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    prefix = query.pop("prefix", DEFAULT_PREFIX) or DEFAULT_PREFIX
    netloc = parts.netloc
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if pw else None
    shown_netloc = (f"{username or ''}:***@" if password else (f"{username}@" if username else "")) + hosts
    rest = urlencode(query)
    display = urlunsplit((scheme, shown_netloc, parts.path, rest, ""))
    if not hosts:
        raise StoreError(f"bad store url {display!r}: no host")
    unknown = sorted(set(query) - _url_options(scheme))
    if unknown:  # redis-py raised a TypeError at the first command; a Sentinel URL ignored it
        takes = "prefix= only" if scheme == "redis+sentinel" else "prefix= and redis-py's options"
        raise StoreError(f"bad store url {display!r}: unknown option {unknown[0]!r} (a {scheme}:// URL "
                         f"takes {takes}, e.g. ssl_ca_certs= for rediss://)")
    if scheme in ("redis", "rediss"):
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise StoreError(f"bad store url {display!r}: the database must be a number, not {path!r}")
        plain = urlunsplit((scheme, netloc, parts.path, rest, ""))
        return RedisTarget(url, display, prefix, db=int(path or 0), password=password,
                           username=username, plain_url=plain)
    if scheme != "redis+sentinel":
        raise StoreError(f"not a redis url: {display!r}")
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        m = _HOSTPORT.match(item.strip())
        if not m:
            raise StoreError(f"bad store url {display!r}: bad sentinel address {item!r}")
        sentinels.append((m.group(1), int(m.group(2) or 26379)))
    bits = [b for b in parts.path.split("/") if b]
    if not bits:
        raise StoreError(
            f"bad store url {display!r}: name the Sentinel service "
            "(redis+sentinel://host:port,host:port/SERVICE[/db])"
        )
    db = bits[1] if len(bits) > 1 else "0"
    if not db.isdigit() or len(bits) > 2:
        raise StoreError(f"bad store url {display!r}: expected /SERVICE or /SERVICE/DB")
    return RedisTarget(url, display, prefix, sentinels=sentinels, service=bits[0], db=int(db),
                       password=password, username=username)
