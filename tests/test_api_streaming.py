"""Bodies stream both ways, back-end connections are kept alive, TLS is terminated."""

from __future__ import annotations

import hashlib
import resource
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.test_api_support import CUSTOMER, ApiEnv, run

BIG = 50 * 1024 * 1024


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_50_mb_invoice_and_a_20_mb_upload_stream_through(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            # a web login as alice (source): the session cookie and the remote cookie
            cookies = await env.web_login("alice", "secret", "MR100")
            assert "authorized-by-remote=1" in cookies and "sc_session=" in cookies
            before = max_rss_mb()
            got = 0
            async with env.http.get(
                f"{env.url}/invoice/101.pdf?size={BIG}",
                headers={"Host": CUSTOMER, "Cookie": cookies},
            ) as r:
                assert r.status == 200 and r.headers["X-Billing-System"] == "MR100"
                assert r.headers["Content-Length"] == str(BIG)
                async for chunk in r.content.iter_chunked(1 << 16):
                    got += len(chunk)
            assert got == BIG
            # nobody on the way held the file (the client, dsbc and the system share this process)
            assert max_rss_mb() - before < 40, f"memory grew by {max_rss_mb() - before:.0f} MB"

            digest = hashlib.sha256()

            async def upload() -> AsyncIterator[bytes]:
                block = bytes(range(256)) * 256
                for _ in range(20 * 1024 * 1024 // len(block)):
                    digest.update(block)
                    yield block

            async with env.http.post(
                f"{env.url}/_emulator/echo",
                data=upload(),
                headers={"Host": CUSTOMER, "Content-Type": "application/octet-stream"},
            ) as r:
                doc = await r.json()
            assert doc["size"] == 20 * 1024 * 1024 and doc["sha256"] == digest.hexdigest()
            assert doc["system"] == "MR115"  # no remote cookie: the target

    run(main)


def test_keep_alive_pool_and_forwarded_headers(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            for _ in range(10):
                st, _, _ = await env.call(CUSTOMER, "Generic/get_version", {})
                assert st == 200
            peers = {e["peer"] for e in env.target.log}
            assert len(peers) == 1, f"10 calls used {len(peers)} connections to the target"
            e = env.target.log[-1]
            assert (e["xff"], e["proto"], e["host"]) == ("127.0.0.1", "http", CUSTOMER)
            async with env.http.get(
                f"{env.url}/", headers={"Host": CUSTOMER, "X-Forwarded-For": "10.9.8.7"}
            ) as r:
                assert r.status == 200
            assert env.target.log[-1]["xff"] == "10.9.8.7, 127.0.0.1"

    run(main)


def test_redirects_and_cookies_are_made_the_public_hosts(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env, env.http.get(
            f"{env.url}/home", headers={"Host": CUSTOMER}, allow_redirects=False
        ) as r:
            assert r.status == 303 and r.headers["Location"] in ("/", f"http://{CUSTOMER}/")

    run(main)


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate"
)
def test_tls_termination(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={CUSTOMER}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )

    async def main() -> None:
        extra = f'tls_cert = "{cert}"\ntls_key = "{key}"'
        async with ApiEnv(tmp_path, extra_api=extra) as env:
            assert env.url.startswith("https://")
            ctx = ssl.create_default_context(cafile=str(cert))
            ctx.check_hostname = False
            async with aiohttp.ClientSession() as http, http.post(
                f"{env.url}/rest/Session/login",
                headers={"Host": CUSTOMER},
                json={"params": {"login": "alice", "password": "secret"}},
                ssl=ctx,
            ) as r:
                assert r.status == 200 and r.headers["X-Billing-System"] == "MR100"
                remote = [c for c in r.headers.getall("Set-Cookie") if "by-remote" in c]
                assert remote and "Secure" in remote[0]
            assert env.source.log[-1]["proto"] == "https"

    run(main)
