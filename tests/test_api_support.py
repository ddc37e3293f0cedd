"""Shared set-up for the API dispatcher tests (no tests here).

``ApiEnv`` starts two emulated billing systems (source MR100, target MR115) seeded with
the same rows as the location store (SQLite in the test's tmp_path), and dsbc's API
dispatcher in front of them with four virtual hosts:

- ``www.customer.billing.com`` (customer realm),
- ``admin.billing.com`` (admin realm),
- ``prov.billing.com`` (cpe realm),
- ``porting.billing.com`` (porting realm).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import aiohttp

from dsbc.api_service import ApiService, start_api
from dsbc.config import parse_config
from dsbc.emulator.billing import BillingEmulator, sample_rows, start_billing_emulator
from dsbc.store import open_store
from dsbc.store.base import LocationStore

CUSTOMER = "www.customer.billing.com"
ADMIN = "admin.billing.com"
PROV = "prov.billing.com"
PORTING = "porting.billing.com"


def run(fn: Callable[[], Awaitable[None]], timeout: float = 120) -> None:
    asyncio.run(asyncio.wait_for(fn(), timeout))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(
    db: Path,
    src: str,
    tgt: str,
    port: int,
    extra_api: str = "",
    lock_hold: float = 1.0,
    unknown: str = "source",
    vhosts: tuple[tuple[str, str], ...] = (),
) -> str:
    """``vhosts``: (host, realm) of more virtual hosts, on the same two systems."""
    vhosts = (
        (CUSTOMER, "customer"),
        (ADMIN, "admin"),
        (PROV, "cpe"),
        (PORTING, "porting"),
        *vhosts,
    )
    tables = "".join(
        f'\n[[api.vhosts]]\nhost = "{h}"\nrealm = "{r}"\nsource = "{src}"\ntarget = "{tgt}"\n'
        for h, r in vhosts
    )
    return (
        f'[store]\nurl = "sqlite:///{db}"\nlock_hold = {lock_hold}\nunknown = "{unknown}"\n'
        f'[api]\nlisten = ["127.0.0.1:{port}"]\ntimeout = 5.0\nbody_timeout = 1.0\n{extra_api}\n'
        + tables
    )


class ApiEnv:
    def __init__(
        self,
        tmp: Path,
        rows: list[dict[str, Any]] | None = None,
        *,
        compress: bool = False,
        **cfg: Any,
    ) -> None:
        self.tmp = tmp
        self.compress = compress  # the systems gzip their answers (behind nginx gzip on)
        self.rows = rows if rows is not None else sample_rows()
        self.cfg_kw = cfg
        self.source: BillingEmulator
        self.target: BillingEmulator
        self.store: LocationStore
        self.api: ApiService
        self.http: aiohttp.ClientSession

    async def __aenter__(self) -> Self:
        self.source = await start_billing_emulator(
            "MR100", "127.0.0.1", 0, self.rows, system="source", compress=self.compress
        )
        self.target = await start_billing_emulator(
            "MR115", "127.0.0.1", 0, self.rows, system="target", compress=self.compress
        )
        db = self.tmp / "loc.db"
        self.store = open_store(f"sqlite:///{db}")
        self.store.import_rows(self.rows)
        self.cfg = parse_config(
            config_text(db, self.source.url, self.target.url, free_port(), **self.cfg_kw)
        )
        self.store.unknown = self.cfg.store.unknown
        self.api = await start_api(self.cfg, self.store)
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()
        await self.api.stop()
        await self.source.stop()
        await self.target.stop()
        self.store.close()

    @property
    def url(self) -> str:
        return self.api.url

    async def call(
        self,
        host: str,
        name: str,
        params: Any = None,
        auth: Any = None,
        *,
        as_json: bool = False,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, Any]:
        """POST /rest/<name> through dsbc; (status, decoded JSON, response headers)."""
        hdrs = {"Host": host, **(headers or {})}
        if as_json:
            kw: dict[str, Any] = {"json": {"auth_info": auth, "params": params or {}}}
        else:
            data = {"params": json.dumps(params or {})}
            if auth is not None:
                data["auth_info"] = json.dumps(auth)
            kw = {"data": data}
        async with self.http.post(f"{self.url}/rest/{name}", headers=hdrs, **kw) as r:
            body = await r.read()
            try:
                doc = json.loads(body) if body else None
            except ValueError:
                doc = body
            return r.status, doc, r.headers

    async def web_login(self, login: str, password: str, system: str) -> str:
        """Log in through the customer web form; the form redirects (303) and ``system``
        (MR100 / MR115) answered. Returns the Set-Cookie values as a Cookie header."""
        async with self.http.post(
            f"{self.url}/login",
            data={"login": login, "password": password},
            headers={"Host": CUSTOMER},
            allow_redirects=False,
        ) as r:
            assert r.status == 303 and r.headers["X-Billing-System"] == system
            return "; ".join(c.split(";")[0] for c in r.headers.getall("Set-Cookie"))

    def served_by(self, method: str) -> list[str]:
        """Which systems logged ``method`` (in order of the two logs)."""
        out = [e for e in self.source.log if e["method"] == method]
        return ["source"] * len(out) + ["target"] * len(
            [e for e in self.target.log if e["method"] == method]
        )

    def clear_logs(self) -> None:
        self.source.log.clear()
        self.target.log.clear()

    def migrate(self, customer_id: str) -> None:
        """Move a customer: the systems export / import it, the store flips it."""
        self.target.import_customer(self.source.export_customer(int(customer_id)))
        self.store.migrate([customer_id], "target", who="test")
