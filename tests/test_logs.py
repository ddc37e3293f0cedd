"""What an operator finds in dsbc's log (a real `dsbc run` at debug level): no secret
ever (Authorization, Cookie, tokens), one line per event."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.peers.dsbc import Dsbc
from tests.peers.net import free_port

pytestmark = [pytest.mark.peers, pytest.mark.timeout(60)]

SECRETS = ("LeakedBearer", "LeakedCookie", "LeakedControlToken")


def raw_http(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(head)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def test_a_malformed_request_head_logs_no_credentials(tmp_path: Path) -> None:
    """aiohttp's refusal of a malformed head quotes the offending header line, and dsbc
    logged it at debug level on three lines: an `Authorization: Bearer` token or a
    session cookie with a stray control octet landed in the log (API dispatcher and
    control API alike).  The reason alone is logged now, on one line."""
    api_port = free_port("tcp")
    api = (f'[api]\nlisten = ["127.0.0.1:{api_port}"]\n[[api.vhosts]]\nhost = "*"\n'
           'realm = "customer"\nsource = "http://127.0.0.1:9"\ntarget = "http://127.0.0.1:9"\n')
    d = Dsbc(tmp_path, api=api, extra='\n[log]\nlevel = "debug"\n')
    with d:
        heads = [
            (b"POST /rest/Session/login HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer LeakedBearer\x01\r\n"
             b"Content-Length: 0\r\n\r\n"),
            b"GET / HTTP/1.1\r\nHost: x\r\nCookie: sid=LeakedCookie\x7f;\r\n\r\n",
            b"GET /v1/status HTTP/1.1\r\nAuthorization: Bearer LeakedControlToken\x00\r\n\r\n",
            # over the header size limit: the start of the line was quoted
            b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer LeakedBearer" + b"z" * 20000 + b"\r\n\r\n",
        ]
        for port in (api_port, d.control_port):
            for head in heads:
                assert raw_http(port, head).startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ", b"HTTP/1.1 500 "))
        d.control("GET", "/healthz")  # the refusals above are logged by now
    log = (tmp_path / "dsbc.log").read_text(errors="replace")
    assert "refused a request" in log  # logged at debug, ...
    assert not [s for s in SECRETS if s in log], log  # ... without what the client sent
    stray = [line for line in log.splitlines() if line and not line[:4].isdigit() and not line.startswith("###")]
    assert not stray, f"lines that are no log record of their own: {stray}"


def test_a_reload_to_json_logs_switches_the_master_too(tmp_path: Path) -> None:
    """`[log] json = true` (or a new level) applied by a SIGHUP reload reached the new
    workers only: the master went on writing text lines ("reload refused ...", "worker
    ... exited"), which a log shipper parsing one JSON object per line chokes on."""
    import json
    import os
    import signal
    import time

    d = Dsbc(tmp_path)
    with d:
        assert d.proc is not None
        master = d.proc.pid
        text = d.config_path.read_text()
        d.config_path.write_text(text + '\n[log]\njson = true\n')
        os.kill(d.proc.pid, signal.SIGHUP)
        log = tmp_path / "dsbc.log"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and '"worker 0 ready' not in log.read_text():
            time.sleep(0.1)
        d.config_path.write_text(text + '\n[log]\njson = true\nbogus = 1\n')  # refused
        os.kill(d.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "bogus" not in log.read_text():
            time.sleep(0.1)
    lines = log.read_text().splitlines()
    after = lines[next(i for i, line in enumerate(lines) if "reloading configuration" in line) + 1:]
    assert any("bogus" in line for line in after), lines
    # the replaced worker writes its last lines (draining) as its configuration says
    assert not [line for line in after if f"[{master}]:" in line], after
    assert [json.loads(line) for line in after if line.startswith("{") and f'"pid": {master},' in line]


@pytest.mark.parametrize("url", [
    "redis://:StorePassw0rd@127.0.0.1:notaport/0",   # redis-py refuses the port
    "redis://dsbc:StorePassw0rd@127.0.0.1:99999/0",
    "reddis://:StorePassw0rd@127.0.0.1:6379/0",       # a mistyped scheme
])
def test_a_bad_store_url_is_named_without_its_password(tmp_path: Path, url: str) -> None:
    """`dsbc run --check` (systemctl reload) and a start or reload refused for a store URL
    that could not be parsed quoted the URL whole, the Redis password with it, on the
    terminal and in the journal; other store errors showed it as ***."""
    import subprocess
    import sys

    from tests.peers.dsbc import REPO

    cfg = tmp_path / "dsbc.toml"
    cfg.write_text(f'[store]\nurl = "{url}"\n[sip]\nenabled = false\n[api]\nenabled = false\n'
                   '[control]\nenabled = false\n')
    r = subprocess.run([sys.executable, "-m", "dsbc.cli", "-c", str(cfg), "run", "--check"],
                       capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert r.returncode == 2 and "store.url" in r.stderr, r.stderr
    assert "StorePassw0rd" not in r.stdout + r.stderr, r.stderr
    assert ":***@" in r.stderr, r.stderr


def test_a_reload_that_changes_the_flow_secret_says_what_it_breaks(tmp_path: Path) -> None:
    """Every key applies on a reload; a new sip.flow_secret too, silently, and with it every
    Path and Record-Route token dsbc gave out stopped verifying (403 toward registered
    phones, and in the calls in progress).  The reload now warns."""
    import os
    import signal
    import time

    from tests.peers.dsbc import FLOW_SECRET

    d = Dsbc(tmp_path)
    with d:
        assert d.proc is not None
        d.config_path.write_text(d.config_path.read_text().replace(FLOW_SECRET, "another-secret-0123456789abcdef"))
        os.kill(d.proc.pid, signal.SIGHUP)
        log = tmp_path / "dsbc.log"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = log.read_text()
            if "reloading" in text and "worker 0 ready" in text.split("reloading")[-1]:
                break
            time.sleep(0.1)
    text = log.read_text()
    assert "WARNING" in text and "sip.flow_secret changes" in text, text
    assert "another-secret" not in text and FLOW_SECRET not in text


def test_the_log_says_where_sip_listens(tmp_path: Path) -> None:
    """The API, RADIUS, Diameter and the control API log their addresses at the start; SIP
    said only "worker 0 ready: sip" (Kamailio lists its sockets): which port after a reload
    that changed sip.listen, which advertised address?"""
    d = Dsbc(tmp_path)
    with d:
        d.control("GET", "/healthz")
    text = (tmp_path / "dsbc.log").read_text()
    assert f"SIP listening on udp:{d.hostport}, tcp:{d.hostport}, advertised as {d.ip}" in text, text
    assert text.count("SIP listening on") == 1  # worker 0's line, not one per worker
