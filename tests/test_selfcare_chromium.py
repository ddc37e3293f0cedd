"""The self-care flow in a real headless Chromium, through dsbc.

The browser opens the public host (mapped to dsbc's loopback port with
``--host-resolver-rules``), logs in as alice, who lives on the source, and opens her
invoices: the pages must come from the source, through dsbc, with the
``authorized-by-remote`` cookie set; her logout deletes that cookie too.  Chromium is
driven over the DevTools protocol with aiohttp's websocket client.  Skipped when
Debian's ``chromium`` is not installed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.test_api_support import CUSTOMER, ApiEnv, run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)


class Cdp:
    """A minimal DevTools protocol client: commands with ids, events by name."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)
                self.changed.set()

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        self.next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        data = await asyncio.wait_for(fut, 30)
        if "error" in data:
            raise AssertionError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def wait_event(self, name: str, session: str, since: int, timeout: float = 20) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if any(
                e.get("method") == name and e.get("sessionId") == session
                for e in self.events[since:]
            ):
                return
            self.changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no {name} within {timeout} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


class Page:
    def __init__(self, cdp: Cdp, session: str) -> None:
        self.cdp = cdp
        self.session = session

    async def js(self, expression: str) -> Any:
        r = await self.cdp.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            self.session,
        )
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def loads(self, action: str) -> None:
        """Run ``action`` (JS) and wait for the page it leads to."""
        mark = len(self.cdp.events)
        await self.js(action)
        await self.cdp.wait_event("Page.loadEventFired", self.session, mark)

    async def goto(self, url: str) -> None:
        mark = len(self.cdp.events)
        await self.cdp.send("Page.navigate", {"url": url}, self.session)
        await self.cdp.wait_event("Page.loadEventFired", self.session, mark)


async def start_chromium(profile: Path, port: int) -> tuple[asyncio.subprocess.Process, str]:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        f"--host-resolver-rules=MAP {CUSTOMER} 127.0.0.1",
        "--window-size=1000,700",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    active = profile / "DevToolsActivePort"
    for _ in range(300):
        if active.exists() and len(active.read_text().split()) >= 2:
            dport, path = active.read_text().split()[:2]
            return proc, f"ws://127.0.0.1:{dport}{path}"
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    proc.kill()
    await proc.wait()
    raise AssertionError("chromium did not open its DevTools port")


def test_self_care_login_and_invoices_come_from_the_source(tmp_path: Path) -> None:
    async def main() -> None:
        async with ApiEnv(tmp_path) as env:
            port = int(env.url.rsplit(":", 1)[1])
            public = f"http://{CUSTOMER}:{port}"
            proc, ws_url = await start_chromium(tmp_path / "profile", port)
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.ws_connect(ws_url, max_msg_size=0) as ws,
                ):
                    cdp = Cdp(ws)
                    target = await cdp.send("Target.createTarget", {"url": "about:blank"})
                    att = await cdp.send(
                        "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
                    )
                    page = Page(cdp, att["sessionId"])
                    await cdp.send("Page.enable", {}, page.session)
                    await cdp.send("Network.enable", {}, page.session)

                    await page.goto(public + "/")
                    assert await page.js("document.getElementById('login') !== null")
                    env.clear_logs()
                    await page.loads(
                        "document.getElementById('user').value = 'alice';"
                        "document.getElementById('pass').value = 'secret';"
                        "document.getElementById('submit').click()"
                    )
                    assert await page.js("location.href") == public + "/home"
                    assert "Welcome, Alice" in await page.js("document.body.innerText")
                    assert (
                        await page.js("document.getElementById('system').innerText")
                        == "MR100 self-care"
                    )

                    cookies = (
                        await cdp.send("Network.getCookies", {"urls": [public + "/"]}, page.session)
                    )["cookies"]
                    names = {c["name"]: c["value"] for c in cookies}
                    assert names.get("authorized-by-remote") == "1" and names.get("sc_session")

                    await page.loads("document.getElementById('invoices').click()")
                    assert await page.js("location.pathname") == "/invoices"
                    assert await page.js("document.querySelectorAll('a.invoice').length") == 3
                    fetched = await page.js(
                        "fetch('/invoice/101.pdf').then(async r => [r.status,"
                        " r.headers.get('content-type'), r.headers.get('x-billing-system'),"
                        " (await r.text()).slice(0, 8)])"
                    )
                    assert fetched == [200, "application/pdf", "MR100", "%PDF-1.4"]
                    shot = await cdp.send("Page.captureScreenshot", {"format": "png"}, page.session)
                    (tmp_path / "invoices.png").write_bytes(base64.b64decode(shot["data"]))

                    # every page after the login came from the source, through dsbc
                    after = [e["method"] for e in env.source.log]
                    assert {"web:login", "web:home", "web:invoices", "web:invoice"} <= set(after)
                    assert not [e for e in env.target.log if e["method"] != "web:login"], (
                        env.target.log
                    )
                    assert all(e["host"] == f"{CUSTOMER}:{port}" for e in env.source.log)

                    # logging out deletes authorized-by-remote too: the login page that
                    # follows is the target's, as for any browser that is not signed in
                    await page.goto(public + "/home")
                    await page.loads("document.querySelector('a[href=\"/logout\"]').click()")
                    assert await page.js("location.pathname") == "/"
                    cookies = (
                        await cdp.send("Network.getCookies", {"urls": [public + "/"]}, page.session)
                    )["cookies"]
                    assert not {c["name"] for c in cookies} & {"authorized-by-remote", "sc_session"}
                    assert (
                        await page.js("document.getElementById('system').innerText")
                        == "MR115 self-care"
                    )
                    cdp.task.cancel()
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 10)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()

    run(main, timeout=180)
