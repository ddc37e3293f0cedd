"""``sip.flow_secret_previous``: rotating the flow secret without breaking registrations.

A new ``sip.flow_secret`` signs at once; the Path tokens phones registered with before
the reload still verify while the old secret is listed in ``flow_secret_previous``, and
stop (403) once it is taken out, as after a leak.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from sip.flow import FlowSigner, FlowTokenError
from sip.uri import parse_name_addr
from tests.peers.dsbc import FLOW_SECRET, Dsbc
from tests.test_sip_workers import Registrar, register

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]

NEW_SECRET = "rotated-flow-secret-0123456789abcdef"


def reload(d: Dsbc, text: str) -> None:
    """Write the config, SIGHUP, wait for the new worker to serve and the replaced one to
    be gone: until its drain ends, its UDP socket still takes datagrams (SO_REUSEPORT), by
    design, and answers them with the old configuration."""
    assert d.proc is not None
    d.config_path.write_text(text)
    log = d.workdir / "dsbc.log"
    seen = log.read_text().count("reloading configuration")
    os.kill(d.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = log.read_text().split("reloading configuration")
        if (len(after) - 1 > seen and "worker 0 ready" in after[-1]
                and len(list(d.run_dir.glob("ready-0-*"))) == 1):
            return
        time.sleep(0.1)
    raise AssertionError(f"no reload: {d.log_tail()}")


def message_to_phone(node: Registrar, d: Dsbc, path: str, user: str, port: int, n: int) -> None:
    node.send((
        f"MESSAGE sip:{user}@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {node.ip}:{node.port};branch=z9hG4bKrot{n};rport\r\n"
        f"Route: {path}\r\nMax-Forwards: 70\r\nFrom: <sip:system@example.com>;tag=s{n}\r\n"
        f"To: <sip:{user}@example.com>\r\nCall-ID: rot-{n}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    ).encode(), d.sip_addr)


def answer_at_node(node: Registrar, n: int, timeout: float = 3.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with node.lock:
            for r in node.received:
                if r.startswith(b"SIP/2.0 ") and f"Call-ID: rot-{n}\r\n".encode() in r:
                    return r
        time.sleep(0.05)
    return b""


def test_a_rotated_secret_keeps_old_paths_working_until_it_is_removed(tmp_path: Path) -> None:
    with Registrar() as node:
        d = Dsbc(tmp_path / "dsbc", source=[f"udp:{node.ip}:{node.port}"])
        phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        phone.bind(("127.0.0.1", 0))
        phone.settimeout(3)
        port = phone.getsockname()[1]
        try:
            with d:
                d.wait_nodes_up()
                phone.sendto(register("rot", port), d.sip_addr)
                assert phone.recv(65535).startswith(b"SIP/2.0 200 ")
                old_path = node.paths["rot"]
                config = d.config_path.read_text()
                rotated = config.replace(f'flow_secret = "{FLOW_SECRET}"',
                                         f'flow_secret = "{NEW_SECRET}"\nflow_secret_previous = ["{FLOW_SECRET}"]')
                assert rotated != config
                reload(d, rotated)
                d.wait_nodes_up()

                # the phone registered before the rotation is still reached by its Path
                message_to_phone(node, d, old_path, "rot", port, 1)
                got = phone.recv(65535)
                assert got.startswith(b"MESSAGE sip:rot@") and b"Call-ID: rot-1\r\n" in got, got[:120]

                # what dsbc signs now is signed with the new secret only
                phone.sendto(register("rot", port, call_id="reg-rot-2").replace(b"z9hG4bKreg", b"z9hG4bKre2"), d.sip_addr)
                assert phone.recv(65535).startswith(b"SIP/2.0 200 ")
                token = parse_name_addr(node.paths["rot"]).uri.param("ft") or ""
                FlowSigner(NEW_SECRET.encode()).decode(token)
                with pytest.raises(FlowTokenError):
                    FlowSigner(FLOW_SECRET.encode()).decode(token)

                # taken out (a leak): the old Path no longer reaches the phone
                reload(d, rotated.replace(f'flow_secret_previous = ["{FLOW_SECRET}"]', ""))
                d.wait_nodes_up()
                message_to_phone(node, d, old_path, "rot", port, 2)
                assert answer_at_node(node, 2).startswith(b"SIP/2.0 403 ")
                phone.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    phone.recv(65535)
        finally:
            phone.close()
        assert not d.traceback(), d.traceback()


def test_a_previous_secret_never_signs_and_a_short_one_is_a_config_error(tmp_path: Path) -> None:
    signer = FlowSigner(NEW_SECRET.encode(), [FLOW_SECRET.encode()])
    old = FlowSigner(FLOW_SECRET.encode())
    assert signer.tag("x") != old.tag("x")
    assert signer.tag_ok("x", old.tag("x")) and signer.tag_ok("x", signer.tag("x"))
    assert not signer.tag_ok("x", "\xe9" * 8) and not FlowSigner(NEW_SECRET.encode()).tag_ok("x", old.tag("x"))

    import subprocess
    import sys

    from tests.peers.dsbc import REPO

    d = Dsbc(tmp_path)
    d.config_path.write_text(d.config_path.read_text().replace(
        f'flow_secret = "{FLOW_SECRET}"', f'flow_secret = "{NEW_SECRET}"\nflow_secret_previous = ["short"]'))
    r = subprocess.run([sys.executable, "-m", "dsbc.cli", "-c", str(d.config_path), "run", "--check"],
                       capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert r.returncode == 2 and "flow_secret_previous" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(ValueError):
        FlowSigner(b"short")
