"""RADIUS end to end with real peers: radclient (the NAS) -> dsbc -> FreeRADIUS source / target."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dsbc.config import parse_config
from dsbc.radius import packet as rp
from dsbc.radius import start_radius, start_radius_emulator
from dsbc.store.base import LocationStore
from tests.peers.freeradius import FREERADIUS, RADCLIENT, FreeRadius, free_udp_ports, radclient
from tests.test_radius_core import open_test_store

pytestmark = pytest.mark.peers

NAS_SECRET = "nas-secret"
USERS = {"alice": "alicepw", "carol": "carolpw"}


def dsbc_config(src: tuple[list[str], list[str], str], tgt: tuple[list[str], list[str], str]) -> str:
    auth, acct = free_udp_ports(2)

    def q(v: list[str]) -> str:
        return "[" + ", ".join(f'"{x}"' for x in v) + "]"

    return f"""
[store]
url = "sqlite:///unused.db"
lock_hold = 0.5

[systems.source]
name = "MR100"
radius = {q(src[0])}
radius_acct = {q(src[1])}
radius_secret = "{src[2]}"

[systems.target]
name = "MR115"
radius = {q(tgt[0])}
radius_acct = {q(tgt[1])}
radius_secret = "{tgt[2]}"

[radius]
enabled = true
auth_listen = "127.0.0.1:{auth}"
acct_listen = "127.0.0.1:{acct}"
timeout = 1.0
retries = 1

[[radius.clients]]
address = "127.0.0.1"
secret = "{NAS_SECRET}"
"""


def seed(store: LocationStore) -> None:
    store.put_customer("1", ["account:alice"], "source")
    store.put_customer("2", ["account:carol"], "source")


@pytest.fixture
def freeradius_pair(tmp_path: Path):  # type: ignore[no-untyped-def]
    if FREERADIUS is None or RADCLIENT is None:
        pytest.skip("freeradius / radclient not installed (apt-get install freeradius freeradius-utils)")
    src = FreeRadius("MR100", tmp_path / "fr-source", "source-secret", USERS)
    tgt = FreeRadius("MR115", tmp_path / "fr-target", "target-secret", USERS)
    src.start()
    try:
        tgt.start()
    except Exception:
        src.stop()
        raise
    yield src, tgt
    src.stop()
    tgt.stop()


def test_freeradius_source_then_target_with_sticky_accounting(freeradius_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, tgt = freeradius_pair
    text = dsbc_config(([f"127.0.0.1:{src.auth_port}"], [f"127.0.0.1:{src.acct_port}"], src.secret),
                       ([f"127.0.0.1:{tgt.auth_port}"], [f"127.0.0.1:{tgt.acct_port}"], tgt.secret))
    cfg = parse_config(text)
    store = open_test_store(tmp_path)
    seed(store)

    async def scenario() -> None:
        svc = await start_radius(cfg, store)
        auth, acct = svc.addresses
        try:
            out = await radclient(auth, "auth", NAS_SECRET, "User-Name = alice, User-Password = alicepw")
            assert "Access-Accept" in out and "MR100 accepts alice" in out, out
            out = await radclient(auth, "auth", NAS_SECRET, "User-Name = alice, User-Password = wrong")
            assert "Access-Reject" in out, out
            out = await radclient(acct, "acct", NAS_SECRET,
                                  "User-Name = alice, Acct-Status-Type = Start, Acct-Session-Id = s1")
            assert "Accounting-Response" in out, out

            store.migrate(["1"], "target")

            out = await radclient(auth, "auth", NAS_SECRET, "User-Name = alice, User-Password = alicepw")
            assert "MR115 accepts alice" in out, out
            out = await radclient(auth, "auth", NAS_SECRET, "User-Name = carol, User-Password = carolpw")
            assert "MR100 accepts carol" in out, out
            for attrs in ("User-Name = alice, Acct-Status-Type = Interim-Update, Acct-Session-Id = s1",
                          "User-Name = alice, Acct-Status-Type = Start, Acct-Session-Id = s2",
                          "User-Name = alice, Acct-Status-Type = Stop, Acct-Session-Id = s1",
                          "User-Name = alice, Acct-Status-Type = Stop, Acct-Session-Id = s2"):
                out = await radclient(acct, "acct", NAS_SECRET, attrs)
                assert "Accounting-Response" in out, (attrs, out)
            # a NAS with the wrong secret: dropped (no answer) and counted
            out = await radclient(acct, "acct", "not-the-secret",
                                  "User-Name = alice, Acct-Status-Type = Start, Acct-Session-Id = s9",
                                  timeout=0.5, retries=1)
            assert out == ""
            st = svc.status()
            assert st["drops"] == {"bad_authenticator": 1}, st
            assert st["systems"]["source"]["requests"] == 6 and st["systems"]["target"]["requests"] == 3, st
        finally:
            await svc.stop()

    try:
        asyncio.run(scenario())
    finally:
        store.close()
    assert src.acct_lines() == ["Start alice s1", "Interim-Update alice s1", "Stop alice s1"]
    assert tgt.acct_lines() == ["Start alice s2", "Stop alice s2"]


def _attr_lines(out: str, name: str) -> list[str]:
    return [ln.strip() for ln in out.splitlines() if ln.strip().startswith(name + " ")]


def test_chap_and_ms_chap_keys_reach_the_nas_as_the_server_sent_them(  # type: ignore[no-untyped-def]
        freeradius_pair, tmp_path: Path) -> None:
    """CHAP, MS-CHAP and a 128-octet User-Password through dsbc; the MPPE keys of an
    MS-CHAP Access-Accept (MS-CHAP-MPPE-Keys, hidden with the secret and the Request
    Authenticator) are re-hidden for the NAS: radclient reads the same keys as from the
    server directly."""
    src, tgt = freeradius_pair
    text = dsbc_config(([f"127.0.0.1:{src.auth_port}"], [f"127.0.0.1:{src.acct_port}"], src.secret),
                       ([f"127.0.0.1:{tgt.auth_port}"], [f"127.0.0.1:{tgt.acct_port}"], tgt.secret))
    store = open_test_store(tmp_path)
    store.put_customer("1", ["account:alice"], "source")
    store.put_customer("9", ["account:longpw"], "source")
    src.users["longpw"] = tgt.users["longpw"] = "p" * 128

    async def scenario() -> None:
        svc = await start_radius(parse_config(text), store)
        auth, _ = svc.addresses
        try:
            out = await radclient(auth, "auth", NAS_SECRET, 'User-Name = alice, CHAP-Password = "alicepw"')
            assert "Access-Accept" in out and "MR100 accepts alice" in out, out
            out = await radclient(auth, "auth", NAS_SECRET, f'User-Name = longpw, User-Password = "{"p" * 128}"')
            assert "Access-Accept" in out, out
            mschap = 'User-Name = alice, MS-CHAP-Password = "alicepw"'
            direct = await radclient(("127.0.0.1", src.auth_port), "auth", src.secret, mschap)
            keys = _attr_lines(direct, "MS-CHAP-MPPE-Keys")
            assert "Access-Accept" in direct and keys, direct
            out = await radclient(auth, "auth", NAS_SECRET, mschap)
            assert "Access-Accept" in out and _attr_lines(out, "MS-CHAP-MPPE-Keys") == keys, out
        finally:
            await svc.stop()

    src.stop()
    src.start()  # with the user added
    try:
        asyncio.run(scenario())
    finally:
        store.close()


def _send_and_wait(sock: socket.socket, data: bytes, addr: tuple[str, int], wait: float = 2.0) -> bytes | None:
    sock.settimeout(wait)
    sock.sendto(data, addr)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return None


def test_emulators_duplicates_and_bad_input(tmp_path: Path) -> None:
    """The product's emulated servers behind dsbc; duplicates, junk and unsigned EAP over real sockets."""
    store = open_test_store(tmp_path)
    seed(store)

    async def scenario() -> None:
        e1 = await start_radius_emulator("MR100", "127.0.0.1", 0, 0, "s1")
        e2 = await start_radius_emulator("MR115", "127.0.0.1", 0, 0, "s2")
        cfg = parse_config(dsbc_config(([f"127.0.0.1:{e1.auth_addr[1]}"], [f"127.0.0.1:{e1.acct_addr[1]}"], "s1"),
                                       ([f"127.0.0.1:{e2.auth_addr[1]}"], [f"127.0.0.1:{e2.acct_addr[1]}"], "s2")))
        svc = await start_radius(cfg, store)
        auth, _ = svc.addresses
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        try:
            ra = bytes(range(16))
            req = rp.sign_request(rp.Packet(rp.ACCESS_REQUEST, 42, ra, [
                (rp.USER_NAME, b"carol"), (rp.USER_PASSWORD, rp.hide_password(b"pw", NAS_SECRET.encode(), ra))]),
                NAS_SECRET.encode())
            for junk in (b"", b"\x01", b"\x01\x02\x00\x30" + bytes(16), b"\x01\x02\x00\x16" + bytes(16) + b"\x01\x01"):
                sock.sendto(junk, auth)
            first = await loop.run_in_executor(None, _send_and_wait, sock, req, auth)
            assert first is not None and rp.verify_response(first, ra, NAS_SECRET.encode())
            assert rp.decode(first).get_text(rp.REPLY_MESSAGE) == "MR100 accepts carol"
            again = await loop.run_in_executor(None, _send_and_wait, sock, req, auth)
            assert again == first
            assert len([x for x in e1.log if x["user"] == "carol"]) == 1  # not forwarded twice
            assert e1.log[-1]["password"] == "pw"
            st = svc.status()
            assert st["duplicates"] == 1 and st["drops"] == {"truncated": 3, "bad_attribute": 1}, st
        finally:
            sock.close()
            await svc.stop()
            e1.stop()
            await e2.stop()

    try:
        asyncio.run(scenario())
    finally:
        store.close()


@contextlib.asynccontextmanager
async def emulated_systems(store: LocationStore, client_extra: str = "") -> AsyncIterator[Any]:
    """dsbc's RADIUS dispatcher before the product's two emulated servers (secrets s1, s2);
    ``client_extra``: more keys of the one [[radius.clients]] entry."""
    e1 = await start_radius_emulator("MR100", "127.0.0.1", 0, 0, "s1")
    e2 = await start_radius_emulator("MR115", "127.0.0.1", 0, 0, "s2")
    text = dsbc_config(([f"127.0.0.1:{e1.auth_addr[1]}"], [f"127.0.0.1:{e1.acct_addr[1]}"], "s1"),
                       ([f"127.0.0.1:{e2.auth_addr[1]}"], [f"127.0.0.1:{e2.acct_addr[1]}"], "s2"))
    svc = await start_radius(parse_config(text + client_extra), store)
    try:
        yield svc
    finally:
        await svc.stop()
        e1.stop()
        await e2.stop()


@pytest.mark.skipif(RADCLIENT is None, reason="radclient not installed")
def test_a_client_that_must_sign_loses_its_unsigned_access_requests(tmp_path: Path) -> None:
    """radius.clients[].require_message_authenticator (FreeRADIUS's option of that name,
    against Blast-RADIUS): radclient without a Message-Authenticator gets no answer and the
    drop is counted; with one, the request goes through."""
    store = open_test_store(tmp_path)
    seed(store)

    async def scenario() -> None:
        async with emulated_systems(store, "require_message_authenticator = true\n") as svc:
            auth, _ = svc.addresses
            unsigned = await radclient(auth, "auth", NAS_SECRET, "User-Name=carol,User-Password=pw", timeout=0.5)
            assert unsigned == "", unsigned
            assert svc.status()["drops"] == {"no_message_authenticator": 1}, svc.status()
            signed = await radclient(auth, "auth", NAS_SECRET,
                                     "User-Name=carol,User-Password=pw,Message-Authenticator=0x00")
            assert "Access-Accept" in signed and "MR100 accepts carol" in signed, signed
            # accounting is signed by its Request Authenticator: not concerned
            acct = await radclient(svc.addresses[1], "acct", NAS_SECRET,
                                   "User-Name=carol,Acct-Status-Type=Start,Acct-Session-Id=s1")
            assert "Accounting-Response" in acct, acct

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_an_accounting_session_keeps_its_system_across_a_sighup_reload(
    freeradius_pair, dsbc_factory, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """`dsbc run` with RADIUS: a session started on the source, its customer migrated, the
    configuration reloaded (SIGHUP: a new worker replaces the old one within seconds,
    long before the 30 s periodic save) -- the Stop still reaches the source."""
    import os
    import signal
    import time

    src, tgt = freeradius_pair
    d = dsbc_factory(start=False, source=["udp:127.0.0.1:9"], target=["udp:127.0.0.1:9"],
                     customers=[{"customer_id": "1", "identities": ["account:alice"], "system": "source"}])
    auth, acct = free_udp_ports(2)
    text = d.config_path.read_text()
    for name, fr in (("MR100", src), ("MR115", tgt)):
        text = text.replace(
            f'name = "{name}"\n',
            f'name = "{name}"\nradius = ["127.0.0.1:{fr.auth_port}"]\n'
            f'radius_acct = ["127.0.0.1:{fr.acct_port}"]\nradius_secret = "{fr.secret}"\n',
        )
    text += (f'\n[radius]\nenabled = true\nauth_listen = "127.0.0.1:{auth}"\n'
             f'acct_listen = "127.0.0.1:{acct}"\n\n[[radius.clients]]\naddress = "127.0.0.1"\n'
             f'secret = "{NAS_SECRET}"\n')
    d.config_path.write_text(text)
    d.start()
    deadline = time.monotonic() + 20
    while "worker 0 ready" not in d.log_tail(400) and time.monotonic() < deadline:
        time.sleep(0.05)  # SIP answers first; the RADIUS ports follow
    nas = ("127.0.0.1", acct)

    def account(status: str) -> str:
        return asyncio.run(radclient(nas, "acct", NAS_SECRET,
                                     f"User-Name = alice, Acct-Status-Type = {status}, Acct-Session-Id = r1"))

    assert "Accounting-Response" in account("Start")
    d.cli("migrate", "--customer", "1", "--to", "target")
    assert d.proc is not None and d.proc.proc is not None
    os.kill(d.proc.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "ready" not in d.log_tail(400).rpartition("reloading")[2] and time.monotonic() < deadline:
        time.sleep(0.05)  # the new worker took over
    after = d.log_tail(400).rpartition("reloading")[2]
    assert re.search(r"worker 0 ready: .*\bradius\b", after), after
    # it waited for the old one's RADIUS ports instead of failing on them (uvloop's bind
    # error carries no errno of its own)
    assert "cannot start" not in after, after
    assert "Accounting-Response" in account("Stop")
    assert src.acct_lines() == ["Start alice r1", "Stop alice r1"]
    assert tgt.acct_lines() == []
