"""Plain HTTP beside HTTPS on the API dispatcher (nginx's ``listen 80; listen 443 ssl;``).

Phones fetch their configuration files over plain HTTP while self-care runs over HTTPS,
on the same public address: an ``api.listen`` entry ``http:IP:PORT`` never takes TLS,
even when ``api.tls_cert`` is set; a bare ``IP:PORT`` takes it then, as before.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest

from dsbc.api_service import start_api
from dsbc.config import ConfigError, parse_config
from dsbc.emulator.billing import sample_rows, start_billing_emulator
from dsbc.store import open_store
from tests.test_api_support import CUSTOMER, PROV, free_port, run

MAC4 = "0004f2a1b2c4"  # dave's phone (target)


def test_listen_entries_name_their_scheme() -> None:
    cfg = parse_config('[api]\nlisten = ["http:127.0.0.1:8080", "http:[::1]", "127.0.0.1:8443"]\n')
    assert cfg.api.listen[0] == "http:127.0.0.1:8080"
    with pytest.raises(ConfigError, match=r"dsbc.toml:2: api.listen\[0\]: 'https:127.0.0.1' needs tls_cert"):
        parse_config('[api]\nlisten = ["https:127.0.0.1"]\n')
    with pytest.raises(ConfigError, match=r"dsbc.toml:2: api.listen\[0\]: bad port in .127.0.0.1:99999."):
        parse_config('[api]\nlisten = ["http:127.0.0.1:99999"]\n')


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_plain_http_provisioning_beside_https_self_care(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={CUSTOMER}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )

    async def main() -> None:
        rows = sample_rows()
        source = await start_billing_emulator("MR100", "127.0.0.1", 0, rows, system="source")
        target = await start_billing_emulator("MR115", "127.0.0.1", 0, rows, system="target")
        db = tmp_path / "loc.db"
        store = open_store(f"sqlite:///{db}")
        store.import_rows(rows)
        tls_port, http_port = free_port(), free_port()
        vhosts = "".join(
            f'[[api.vhosts]]\nhost = "{h}"\nrealm = "{r}"\n'
            f'source = "{source.url}"\ntarget = "{target.url}"\n'
            for h, r in ((CUSTOMER, "customer"), (PROV, "cpe"))
        )
        cfg = parse_config(
            f'[store]\nurl = "sqlite:///{db}"\n[api]\n'
            f'listen = ["127.0.0.1:{tls_port}", "http:127.0.0.1:{http_port}"]\n'
            f'tls_cert = "{cert}"\ntls_key = "{key}"\n{vhosts}'
        )
        api = await start_api(cfg, store)
        try:
            assert api.url == f"https://127.0.0.1:{tls_port}"
            ctx = ssl.create_default_context(cafile=str(cert))
            ctx.check_hostname = False
            async with aiohttp.ClientSession() as http:
                async with http.get(
                    f"http://127.0.0.1:{http_port}/prov/{MAC4}.cfg", headers={"Host": PROV}
                ) as r:
                    assert r.status == 200 and r.headers["X-Billing-System"] == "MR115"
                assert target.log[-1]["proto"] == "http"
                async with http.get(
                    f"https://127.0.0.1:{tls_port}/", headers={"Host": CUSTOMER}, ssl=ctx
                ) as r:
                    assert r.status == 200 and r.headers["X-Billing-System"] == "MR115"
                assert target.log[-1]["proto"] == "https"
        finally:
            await api.stop()
            await source.stop()
            await target.stop()
            store.close()

    run(main)


def test_ipv6_listeners_are_shown_as_urls_and_addresses_one_can_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The start logged "API dispatcher listening on http://::1:8443" (and "control API on
    http://::1:8080", "radius: auth on ::1:1812"), and dsbc status listed "::1:8443" and a
    RADIUS server "::1:1812": neither a URL nor an address one can paste (found by an
    audit).  IPv6 addresses are written in brackets."""
    import logging

    from dsbc.radius.core import RadiusCore, SystemTarget

    async def main() -> None:
        rows = sample_rows()
        source = await start_billing_emulator("MR100", "::1", 0, rows, system="source")
        target = await start_billing_emulator("MR115", "::1", 0, rows, system="target")
        store = open_store(f"sqlite:///{tmp_path / 'loc.db'}")
        port = free_port()
        cfg = parse_config(f'[api]\nlisten = ["[::1]:{port}"]\nsource = "{source.url}"\ntarget = "{target.url}"\n')
        with caplog.at_level(logging.INFO):
            api = await start_api(cfg, store)
        try:
            assert f"API dispatcher listening on http://[::1]:{port}" in caplog.text
            assert api.proxy.status()["listening"] == [f"[::1]:{port}"]
        finally:
            await api.stop()
            await source.stop()
            await target.stop()
            store.close()

    run(main)
    core = RadiusCore([("::1", "s")], [SystemTarget("source", "s", [("::1", 1812)], [("::1", 1813)])],
                      lambda user, now: None)
    assert list(core.status()["systems"]["source"]["servers"]) == ["[::1]:1812", "[::1]:1813"]
