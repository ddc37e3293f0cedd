"""The RADIUS dispatcher core, I/O-free: bytes and times in, datagrams out.

Also home of ``open_test_store``, the SQLite store the RADIUS and Diameter tests use.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsbc.radius import packet as rp
from dsbc.radius.core import ACCT, AUTH, TO_CLIENT, TO_SERVER, Out, RadiusCore, SystemTarget
from dsbc.radius.service import make_decide
from dsbc.store import LocationStore, open_store

# --- a store for tests ------------------------------------------------------------------


def open_test_store(tmp_path: Path, unknown: str = "source") -> LocationStore:
    """The real SQLite store in the test's folder."""
    return open_store("sqlite:///" + str(tmp_path / "loc.db"), unknown)


# --- helpers ----------------------------------------------------------------------------

NAS = ("10.0.0.1", 40000)
NAS_SECRET = b"nas-secret"
SRC = ("127.0.0.1", 1812)
SRC_ACCT = ("127.0.0.1", 1813)
TGT = ("127.0.0.2", 1812)
TGT_ACCT = ("127.0.0.2", 1813)
SECRETS = {"source": b"src-secret", "target": b"tgt-secret"}


def make_core(store: LocationStore, **kw: Any) -> RadiusCore:
    systems = [SystemTarget("source", "src-secret", [SRC], [SRC_ACCT]),
               SystemTarget("target", "tgt-secret", [TGT], [TGT_ACCT])]
    return RadiusCore([("10.0.0.0/24", NAS_SECRET.decode())], systems, make_decide(store), **kw)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocationStore]:
    s = open_test_store(tmp_path)
    s.put_customer("1", ["account:alice"])
    s.put_customer("2", ["account:bob", "radius:bob@wifi"])
    yield s
    s.close()


def access_request(user: str, ident: int = 1, password: bytes = b"pw", auth: bytes = bytes(range(16)),
                   secret: bytes = NAS_SECRET, extra: list[tuple[int, bytes]] | None = None) -> bytes:
    attrs = [(rp.USER_NAME, user.encode()), (rp.USER_PASSWORD, rp.hide_password(password, secret, auth))]
    attrs += extra or []
    return rp.sign_request(rp.Packet(rp.ACCESS_REQUEST, ident, auth, attrs), secret)


def acct_request(user: str, status: int, session: str, ident: int = 1, secret: bytes = NAS_SECRET,
                 nas_ip: str = "") -> bytes:
    attrs = [(rp.USER_NAME, user.encode()), (rp.ACCT_STATUS_TYPE, struct.pack("!I", status)),
             (rp.ACCT_SESSION_ID, session.encode())]
    if nas_ip:
        attrs.append((rp.NAS_IP_ADDRESS, socket.inet_aton(nas_ip)))
    return rp.sign_request(rp.Packet(rp.ACCOUNTING_REQUEST, ident, rp.ZERO16, attrs), secret)


def server_answer(out: Out, code: int | None = None, secret: bytes | None = None,
                  extra: list[tuple[int, bytes]] | None = None) -> bytes:
    """What a correct server answers to the forwarded request ``out``."""
    req = rp.decode(out.data)
    secret = secret or SECRETS[out.system]
    if code is None:
        code = rp.ACCOUNTING_RESPONSE if req.code == rp.ACCOUNTING_REQUEST else rp.ACCESS_ACCEPT
    attrs = [(rp.REPLY_MESSAGE, f"hello from {out.system}".encode())] + (extra or [])
    attrs += [(rp.PROXY_STATE, v) for v in req.get_all(rp.PROXY_STATE)]
    return rp.sign_response(rp.Packet(code, req.identifier, rp.ZERO16, attrs), req.authenticator, secret)


# --- tests ------------------------------------------------------------------------------


def test_access_request_resigned_both_ways(store: LocationStore) -> None:
    core = make_core(store)
    auth = bytes(range(16))
    req = access_request("alice", ident=77, password=b"secret pw", auth=auth,
                         extra=[(rp.PROXY_STATE, b"nas-state")])
    [fwd] = core.handle_request(AUTH, req, NAS, 0.0)
    assert fwd.kind == TO_SERVER and fwd.system == "source" and fwd.addr == SRC
    sent = rp.decode(fwd.data)
    assert rp.verify_message_authenticator(fwd.data, SECRETS["source"]) is True
    pw = rp.unhide_password(sent.get(rp.USER_PASSWORD) or b"", SECRETS["source"], sent.authenticator)
    assert pw == b"secret pw"
    states = sent.get_all(rp.PROXY_STATE)
    assert states[0] == b"nas-state" and len(states) == 2
    [ans] = core.handle_answer("source", fwd.via, server_answer(fwd, extra=[(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16)]),
                               SRC, 0.1)
    assert ans.kind == TO_CLIENT and ans.addr == NAS and ans.via == AUTH
    back = rp.decode(ans.data)
    assert back.identifier == 77 and back.code == rp.ACCESS_ACCEPT
    assert rp.verify_response(ans.data, auth, NAS_SECRET)
    assert rp.verify_message_authenticator(ans.data, NAS_SECRET, auth) is True
    assert back.get_all(rp.PROXY_STATE) == [b"nas-state"]
    assert back.get_text(rp.REPLY_MESSAGE) == "hello from source"


def test_owner_by_radius_identity_and_realm(store: LocationStore) -> None:
    core = make_core(store)
    store.migrate(["2"], "target")
    [fwd] = core.handle_request(AUTH, access_request("bob@wifi"), NAS, 0.0)
    assert fwd.system == "target"
    [fwd] = core.handle_request(AUTH, access_request("bob@elsewhere", ident=2), NAS, 0.0)
    assert fwd.system == "target"
    [fwd] = core.handle_request(AUTH, access_request("nobody", ident=3), NAS, 0.0)
    assert fwd.system == "source"  # store.unknown


def test_chap_challenge_preserved(store: LocationStore) -> None:
    core = make_core(store)
    auth = bytes(range(100, 116))
    raw = rp.encode(rp.Packet(rp.ACCESS_REQUEST, 5, auth, [(rp.USER_NAME, b"alice"), (rp.CHAP_PASSWORD, bytes(17))]))
    [fwd] = core.handle_request(AUTH, raw, NAS, 0.0)
    assert rp.decode(fwd.data).get(rp.CHAP_CHALLENGE) == auth


def test_accounting_session_sticks_across_migration(store: LocationStore) -> None:
    core = make_core(store)
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_START, "s1", 1), NAS, 0.0)
    assert fwd.system == "source" and fwd.addr == SRC_ACCT
    assert rp.verify_accounting_request(fwd.data, SECRETS["source"])
    [ans] = core.handle_answer("source", fwd.via, server_answer(fwd), SRC_ACCT, 0.1)
    assert rp.verify_response(ans.data, rp.decode(acct_request("alice", 1, "s1", 1)).authenticator, NAS_SECRET)
    store.migrate(["1"], "target")
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_INTERIM, "s1", 2), NAS, 1.0)
    assert fwd.system == "source"
    core.handle_answer("source", fwd.via, server_answer(fwd), SRC_ACCT, 1.1)
    # a new session of the migrated customer goes to the target
    [fwd2] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_START, "s2", 3), NAS, 1.2)
    assert fwd2.system == "target"
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_STOP, "s1", 4), NAS, 2.0)
    assert fwd.system == "source"
    core.handle_answer("source", fwd.via, server_answer(fwd), SRC_ACCT, 2.1)
    assert ("10.0.0.1", "s1") not in core.sticky and ("10.0.0.1", "s2") in core.sticky
    rows = core.sticky_snapshot()
    fresh = make_core(store)
    fresh.load_sticky(rows)
    [fwd] = fresh.handle_request(ACCT, acct_request("alice", rp.ACCT_INTERIM, "s2", 5), NAS, 3.0)
    assert fwd.system == "target"


def test_duplicates_answered_from_cache_not_forwarded_twice(store: LocationStore) -> None:
    core = make_core(store)
    req = access_request("alice", ident=9)
    [fwd] = core.handle_request(AUTH, req, NAS, 0.0)
    assert core.handle_request(AUTH, req, NAS, 0.5) == []
    [ans] = core.handle_answer("source", fwd.via, server_answer(fwd), SRC, 0.6)
    [again] = core.handle_request(AUTH, req, NAS, 1.0)
    assert again.kind == TO_CLIENT and again.data == ans.data
    assert core.duplicates == 2 and core.systems["source"].requests == 1
    # a late second answer from the server changes nothing
    assert core.handle_answer("source", fwd.via, server_answer(fwd), SRC, 1.1) == []
    # past the window, the same bytes are a new request
    core.handle_timer(100.0)
    assert core.handle_request(AUTH, req, NAS, 100.0)[0].kind == TO_SERVER


def test_drops_are_counted(store: LocationStore) -> None:
    core = make_core(store)
    assert core.handle_request(AUTH, access_request("alice"), ("192.0.2.9", 1), 0.0) == []
    assert core.handle_request(ACCT, acct_request("alice", 1, "x", secret=b"wrong"), NAS, 0.0) == []
    bad_ma = access_request("alice", ident=3, secret=b"wrong", extra=[(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16)])
    assert core.handle_request(AUTH, bad_ma, NAS, 0.0) == []
    eap_unsigned = rp.encode(rp.Packet(rp.ACCESS_REQUEST, 4, bytes(16), [(rp.EAP_MESSAGE, b"\x02\x00\x00\x05\x01")]))
    assert core.handle_request(AUTH, eap_unsigned, NAS, 0.0) == []
    assert core.handle_request(AUTH, b"\x01\x02\x00", NAS, 0.0) == []
    assert core.handle_request(AUTH, acct_request("alice", 1, "y"), NAS, 0.0) == []  # accounting on the auth port
    assert core.drops == {"unknown_client": 1, "bad_authenticator": 3, "truncated": 1, "bad_code": 1}
    assert core.handle_answer("source", 0, b"\x02\x01\x00\x14" + bytes(16), SRC, 0.0) == []
    assert core.drops["unexpected_answer"] == 1


def test_bad_answer_authenticator_dropped(store: LocationStore) -> None:
    core = make_core(store)
    [fwd] = core.handle_request(AUTH, access_request("alice"), NAS, 0.0)
    assert core.handle_answer("source", fwd.via, server_answer(fwd, secret=b"wrong"), SRC, 0.1) == []
    assert core.handle_answer("source", fwd.via, server_answer(fwd), ("127.0.0.9", 1812), 0.1) == []
    assert core.drops == {"bad_answer_authenticator": 1, "unexpected_answer": 1}
    assert len(core.handle_answer("source", fwd.via, server_answer(fwd), SRC, 0.2)) == 1


def test_identifier_space_many_clients(store: LocationStore) -> None:
    core = make_core(store)
    seen: set[tuple[int, int]] = set()
    for port in (1, 2, 3):
        for ident in range(256):
            [fwd] = core.handle_request(AUTH, access_request("alice", ident=ident), ("10.0.0.5", port), 0.0)
            seen.add((fwd.via, rp.decode(fwd.data).identifier))
    assert len(seen) == 3 * 256 and core.systems["source"].ids.slots == 3


def test_timeout_retransmits_then_gives_up(store: LocationStore) -> None:
    core = make_core(store, timeout=1.0, retries=2)
    req = access_request("alice")
    [fwd] = core.handle_request(AUTH, req, NAS, 0.0)
    assert core.get_timer() == 1.0
    r1 = core.handle_timer(1.0)
    r2 = core.handle_timer(2.0)
    assert [o.data for o in r1 + r2] == [fwd.data, fwd.data]
    assert core.handle_timer(3.0) == []
    assert core.drops == {"timeout": 1} and core.systems["source"].ids.in_use == 0
    assert core.status()["systems"]["source"]["servers"]["127.0.0.1:1812"] == "dead"  # type: ignore[index]
    # `dsbc status` counts the timeouts of the server that was silent, not of its system
    from dsbc.metrics import backend_rows

    rows = backend_rows({"services": {"radius": core.status()}})
    failures = {node: n for proto, system, node, _, _, n in rows if system == "source"}
    assert failures["127.0.0.1:1812"] == "1" and set(failures.values()) == {"0", "1"}, failures
    # the NAS's retransmission is tried again
    assert core.handle_request(AUTH, req, NAS, 3.5)[0].kind == TO_SERVER


def test_locked_customer_held_then_relayed_or_dropped(store: LocationStore) -> None:
    core = make_core(store, lock_hold=2.0)
    store.lock(["1"], "b1")
    assert core.handle_request(AUTH, access_request("alice", ident=1), NAS, 0.0) == []
    assert core.get_timer() is not None
    assert core.handle_timer(0.5) == []
    store.migrate(["1"], "target")
    [fwd] = core.handle_timer(1.0)
    assert fwd.system == "target"
    store.lock(["2"], "b2")
    assert core.handle_request(AUTH, access_request("bob", ident=2), NAS, 1.0) == []
    assert core.handle_timer(2.0) == []
    assert core.handle_timer(3.1) == []
    assert core.drops.get("locked") == 1


def test_accounting_on_goes_to_both_systems(store: LocationStore) -> None:
    core = make_core(store)
    attrs = [(rp.ACCT_STATUS_TYPE, struct.pack("!I", rp.ACCT_ON)), (rp.NAS_IDENTIFIER, b"nas1")]
    raw = rp.sign_request(rp.Packet(rp.ACCOUNTING_REQUEST, 3, rp.ZERO16, attrs), NAS_SECRET)
    outs = core.handle_request(ACCT, raw, NAS, 0.0)
    assert sorted(o.system for o in outs) == ["source", "target"]
    assert len(core.handle_answer("target", outs[1].via, server_answer(outs[1]), TGT_ACCT, 0.1)) == 1
    assert core.handle_answer("source", outs[0].via, server_answer(outs[0]), SRC_ACCT, 0.2) == []


@pytest.mark.parametrize("status", [rp.ACCT_ON, rp.ACCT_OFF])
def test_accounting_on_or_off_naming_a_user_still_goes_to_both_systems(store: LocationStore, status: int) -> None:
    # some NAS put a User-Name (the NAS's own name, or a customer's) in Accounting-On / -Off:
    # it is still about every session of the NAS, on both systems (RFC 2866 5.1)
    core = make_core(store)
    attrs = [(rp.ACCT_STATUS_TYPE, struct.pack("!I", status)), (rp.USER_NAME, b"alice")]
    raw = rp.sign_request(rp.Packet(rp.ACCOUNTING_REQUEST, 3, rp.ZERO16, attrs), NAS_SECRET)
    assert sorted(o.system for o in core.handle_request(ACCT, raw, NAS, 0.0)) == ["source", "target"]


def test_accounting_on_ends_the_nas_sessions(store: LocationStore) -> None:
    # a NAS that rebooted (Accounting-On) numbers its sessions from 1 again: a new session of
    # another customer that gets an old Acct-Session-Id goes to its own system, not to the
    # system of the session that had the id before the reboot
    core = make_core(store)
    store.migrate(["2"], "target")
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_START, "00000001", 1), NAS, 0.0)
    assert fwd.system == "source"
    core.handle_answer("source", fwd.via, server_answer(fwd), SRC_ACCT, 0.1)
    other = ("10.0.0.2", 40000)
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_START, "00000001", 1), other, 0.2)
    core.handle_answer("source", fwd.via, server_answer(fwd), SRC_ACCT, 0.3)
    attrs = [(rp.ACCT_STATUS_TYPE, struct.pack("!I", rp.ACCT_ON)), (rp.ACCT_SESSION_ID, b"00000000")]
    raw = rp.sign_request(rp.Packet(rp.ACCOUNTING_REQUEST, 2, rp.ZERO16, attrs), NAS_SECRET)
    for out in core.handle_request(ACCT, raw, NAS, 1.0):
        core.handle_answer(out.system, out.via, server_answer(out), out.addr, 1.1)
    assert (NAS[0], "00000001") not in core.sticky and core.sticky_dirty
    [fwd] = core.handle_request(ACCT, acct_request("bob", rp.ACCT_START, "00000001", 3), NAS, 2.0)
    assert fwd.system == "target"
    # the other NAS did not restart: its session keeps its system
    [fwd] = core.handle_request(ACCT, acct_request("bob", rp.ACCT_INTERIM, "00000001", 4), other, 2.1)
    assert fwd.system == "source"


def test_accounting_sessions_of_nas_behind_one_proxy_keep_their_systems(store: LocationStore) -> None:
    # a RADIUS proxy relays for many NAS from one address; their Acct-Session-Ids are unique
    # per NAS only: the same id on two NAS is two sessions, each on its customer's system
    store.migrate(["2"], "target")
    core = make_core(store)
    outs = []
    for i, (user, nas_ip) in enumerate((("alice", "192.0.2.1"), ("bob", "192.0.2.2"))):
        [fwd] = core.handle_request(ACCT, acct_request(user, rp.ACCT_START, "00000001", 10 + i, nas_ip=nas_ip),
                                    NAS, 0.0)
        core.handle_answer(fwd.system, fwd.via, server_answer(fwd), fwd.addr, 0.1)
        outs.append(fwd.system)
    assert outs == ["source", "target"]
    for i, (user, nas_ip, system) in enumerate((("alice", "192.0.2.1", "source"), ("bob", "192.0.2.2", "target"))):
        [fwd] = core.handle_request(ACCT, acct_request(user, rp.ACCT_STOP, "00000001", 20 + i, nas_ip=nas_ip),
                                    NAS, 1.0)
        assert fwd.system == system
        core.handle_answer(fwd.system, fwd.via, server_answer(fwd), fwd.addr, 1.1)
    assert core.sticky == {}
    # an Accounting-On of one of them ends its sessions only
    for i, nas_ip in enumerate(("192.0.2.1", "192.0.2.2")):
        [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_START, "2", 30 + i, nas_ip=nas_ip), NAS, 2.0)
        core.handle_answer(fwd.system, fwd.via, server_answer(fwd), fwd.addr, 2.1)
    attrs = [(rp.ACCT_STATUS_TYPE, struct.pack("!I", rp.ACCT_ON)), (rp.NAS_IP_ADDRESS, socket.inet_aton("192.0.2.1"))]
    raw = rp.sign_request(rp.Packet(rp.ACCOUNTING_REQUEST, 40, rp.ZERO16, attrs), NAS_SECRET)
    core.handle_request(ACCT, raw, NAS, 3.0)
    assert list(core.sticky) == [(f"{NAS[0]}|192.0.2.2", "2")]
    # an Accounting-On naming the NAS by fewer attributes than its sessions do
    core.load_sticky([[f"{NAS[0]}|192.0.2.3|bras-3", "3", "source", 3.0]])
    attrs = [(rp.ACCT_STATUS_TYPE, struct.pack("!I", rp.ACCT_OFF)), (rp.NAS_IDENTIFIER, b"bras-3")]
    raw = rp.sign_request(rp.Packet(rp.ACCOUNTING_REQUEST, 41, rp.ZERO16, attrs), NAS_SECRET)
    core.handle_request(ACCT, raw, NAS, 4.0)
    assert list(core.sticky) == [(f"{NAS[0]}|192.0.2.2", "2")]


def test_a_pin_saved_under_the_source_address_alone_is_still_followed(store: LocationStore) -> None:
    # pins saved before the NAS's own address was part of the key
    core = make_core(store)
    core.load_sticky([[NAS[0], "s1", "source", 0.0]])
    store.migrate(["1"], "target")
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_INTERIM, "s1", 1, nas_ip="192.0.2.1"), NAS, 1.0)
    assert fwd.system == "source"
    core.handle_answer(fwd.system, fwd.via, server_answer(fwd), fwd.addr, 1.1)
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_STOP, "s1", 2, nas_ip="192.0.2.1"), NAS, 2.0)
    assert fwd.system == "source"
    core.handle_answer(fwd.system, fwd.via, server_answer(fwd), fwd.addr, 2.1)
    assert core.sticky == {}


def test_the_rounds_of_an_eap_exchange_stay_on_its_system_across_a_migration(store: LocationStore) -> None:
    # the customer moves between the Access-Challenge and the next Access-Request: that
    # request returns the State of the source's challenge, which the target does not know
    core = make_core(store)
    eap = [(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16), (rp.EAP_MESSAGE, b"\x02\x01\x00\x0a\x01alice")]
    [fwd] = core.handle_request(AUTH, access_request("alice", 1, extra=eap), NAS, 0.0)
    assert fwd.system == "source"
    challenge = server_answer(fwd, rp.ACCESS_CHALLENGE, extra=[(rp.STATE, b"round-1")])
    [ans] = core.handle_answer("source", fwd.via, challenge, SRC, 0.1)
    assert rp.decode(ans.data).get(rp.STATE) == b"round-1"
    store.migrate(["1"], "target")
    [fwd] = core.handle_request(AUTH, access_request("alice", 2, extra=[*eap, (rp.STATE, b"round-1")]), NAS, 1.0)
    assert fwd.system == "source"
    core.handle_answer("source", fwd.via, server_answer(fwd), SRC, 1.1)
    # a new exchange starts on the customer's system; an old State no longer binds
    [fwd] = core.handle_request(AUTH, access_request("alice", 3, extra=eap), NAS, 2.0)
    assert fwd.system == "target"
    core.handle_timer(200.0)
    [fwd] = core.handle_request(AUTH, access_request("alice", 4, extra=[*eap, (rp.STATE, b"round-1")]), NAS, 200.0)
    assert fwd.system == "target"


def test_a_server_that_answers_others_is_not_dead_for_one_lost_request(store: LocationStore) -> None:
    """Found by an audit: one request a server dropped (FreeRADIUS discards some silently)
    marked it dead for 30 s although it answered the others, and every request went to the
    system's next server.  Now only a server silent since the request went out is dead."""
    core = make_core(store, timeout=1.0, retries=0)
    assert len(core.handle_request(AUTH, access_request("alice", 1), NAS, 0.0)) == 1
    [fwd] = core.handle_request(AUTH, access_request("alice", 2), NAS, 0.2)
    core.handle_answer("source", fwd.via, server_answer(fwd), SRC, 0.3)
    core.handle_timer(1.5)
    assert core.drops == {"timeout": 1}
    assert core.status()["systems"]["source"]["servers"]["127.0.0.1:1812"] == "up"  # type: ignore[index]
    # silent from the request on: dead
    assert len(core.handle_request(AUTH, access_request("alice", 3), NAS, 2.0)) == 1
    core.handle_timer(3.5)
    assert core.status()["systems"]["source"]["servers"]["127.0.0.1:1812"] == "dead"  # type: ignore[index]


def test_an_accounting_request_with_eap_and_no_message_authenticator_is_dropped(store: LocationStore) -> None:
    # RFC 3579 3.2: FreeRADIUS discards it silently; relayed, it timed out and the server
    # was marked dead for every other request
    core = make_core(store)
    attrs = [(rp.USER_NAME, b"alice"), (rp.ACCT_STATUS_TYPE, struct.pack("!I", rp.ACCT_START)),
             (rp.ACCT_SESSION_ID, b"e1"), (rp.EAP_MESSAGE, b"\x02\x01\x00\x04")]
    raw = rp.sign_request(rp.Packet(rp.ACCOUNTING_REQUEST, 1, rp.ZERO16, attrs), NAS_SECRET)
    assert core.handle_request(ACCT, raw, NAS, 0.0) == []
    assert core.drops == {"bad_authenticator": 1}
    signed = rp.sign_request(rp.Packet(rp.ACCOUNTING_REQUEST, 2, rp.ZERO16,
                                       [*attrs, (rp.MESSAGE_AUTHENTICATOR, rp.ZERO16)]), NAS_SECRET)
    [fwd] = core.handle_request(ACCT, signed, NAS, 0.1)
    assert fwd.system == "source"


def test_status_server_answered_locally(store: LocationStore) -> None:
    core = make_core(store)
    auth = bytes(range(16))
    raw = rp.sign_request(rp.Packet(rp.STATUS_SERVER, 1, auth, [(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16)]), NAS_SECRET)
    [ans] = core.handle_request(AUTH, raw, NAS, 0.0)
    assert ans.kind == TO_CLIENT and rp.verify_response(ans.data, auth, NAS_SECRET)


def test_status_server_on_accounting_port(store: LocationStore) -> None:
    # RFC 5997 4.2: a NAS checks its accounting server with Status-Server on that port too
    core = make_core(store)
    auth = bytes(range(16))
    raw = rp.sign_request(rp.Packet(rp.STATUS_SERVER, 2, auth, [(rp.MESSAGE_AUTHENTICATOR, rp.ZERO16)]), NAS_SECRET)
    [ans] = core.handle_request(ACCT, raw, NAS, 0.0)
    assert ans.kind == TO_CLIENT and rp.decode(ans.data).code == rp.ACCOUNTING_RESPONSE
    assert rp.verify_response(ans.data, auth, NAS_SECRET)
    assert rp.verify_message_authenticator(ans.data, NAS_SECRET, auth) is True


def test_stop_sent_again_with_new_identifier_follows_the_first(store: LocationStore) -> None:
    # the NAS missed the Accounting-Response to its Stop and sends it again with an updated
    # Acct-Delay-Time (so a new Identifier and authenticator, RFC 2866 5.2): it is the
    # same session and goes to the same system, even after the customer moved
    core = make_core(store)
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_START, "s9", 1), NAS, 0.0)
    core.handle_answer("source", fwd.via, server_answer(fwd), SRC_ACCT, 0.1)
    store.migrate(["1"], "target")
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_STOP, "s9", 2), NAS, 1.0)
    assert fwd.system == "source"
    core.handle_answer("source", fwd.via, server_answer(fwd), SRC_ACCT, 1.1)
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_STOP, "s9", 3), NAS, 5.0)
    assert fwd.system == "source"
    core.handle_answer("source", fwd.via, server_answer(fwd), SRC_ACCT, 5.1)
    # a new session of the customer goes to its new system
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_START, "s10", 4), NAS, 6.0)
    assert fwd.system == "target"


def test_unknown_reject_answers_access_reject(tmp_path: Path) -> None:
    s = open_test_store(tmp_path, unknown="reject")
    try:
        core = make_core(s)
        auth = bytes(range(16))
        raw = access_request("nobody", 5, auth=auth, extra=[(rp.PROXY_STATE, b"nas-state")])
        [ans] = core.handle_request(AUTH, raw, NAS, 0.0)
        assert ans.kind == TO_CLIENT and ans.addr == NAS
        pkt = rp.decode(ans.data)
        assert pkt.code == rp.ACCESS_REJECT and pkt.identifier == 5
        assert pkt.get_all(rp.PROXY_STATE) == [b"nas-state"]
        assert rp.verify_response(ans.data, auth, NAS_SECRET)
        assert rp.verify_message_authenticator(ans.data, NAS_SECRET, auth) is True
        # the NAS's retransmission gets the same answer
        assert core.handle_request(AUTH, raw, NAS, 0.5) == [ans]
    finally:
        s.close()


def test_access_answers_to_the_nas_carry_message_authenticator_first(store: LocationStore) -> None:
    """Blast-RADIUS hardening: a home server that sends no Message-Authenticator (FreeRADIUS
    3.2.1 does not) still gets one added, as the first attribute, signed for the NAS."""
    core = make_core(store)
    auth = bytes(range(16))
    for code in (rp.ACCESS_ACCEPT, rp.ACCESS_REJECT, rp.ACCESS_CHALLENGE):
        [fwd] = core.handle_request(AUTH, access_request("alice", ident=code, auth=auth), NAS, 0.0)
        [ans] = core.handle_answer("source", fwd.via, server_answer(fwd, code=code), SRC, 0.1)
        back = rp.decode(ans.data)
        assert back.code == code and back.attrs[0][0] == rp.MESSAGE_AUTHENTICATOR
        assert rp.verify_message_authenticator(ans.data, NAS_SECRET, auth) is True
        assert rp.verify_response(ans.data, auth, NAS_SECRET)
    [fwd] = core.handle_request(ACCT, acct_request("alice", rp.ACCT_START, "s-ma"), NAS, 0.2)
    [ans] = core.handle_answer("source", fwd.via, server_answer(fwd), SRC_ACCT, 0.3)
    assert rp.decode(ans.data).get(rp.MESSAGE_AUTHENTICATOR) is None  # accounting: as it came


def test_eap_challenges_followed_are_bounded(store: LocationStore) -> None:
    core = make_core(store)
    core.CHALLENGES_MAX = 3  # type: ignore[misc]
    for i in range(5):
        [fwd] = core.handle_request(AUTH, access_request("alice", i), NAS, 0.0)
        challenge = server_answer(fwd, rp.ACCESS_CHALLENGE, extra=[(rp.STATE, f"round-{i}".encode())])
        assert len(core.handle_answer("source", fwd.via, challenge, SRC, 0.1)) == 1
    assert len(core._challenges) == 3 and (NAS[0], b"round-4") in core._challenges


def test_a_server_is_untried_until_it_answered(store: LocationStore) -> None:
    """`dsbc status` showed every RADIUS server "up" before a request had reached it (dsbc
    sends no Status-Server probes): now "untried" until its first answer, still counted up
    in dsbc_backend_up, and "DOWN" only once it was silent."""
    from dsbc.metrics import backend_rows

    core = make_core(store, timeout=1.0, retries=0)

    def state() -> str:
        rows = backend_rows({"services": {"radius": core.status()}})
        return {(r[1], r[2]): r[3] for r in rows}[("source", "127.0.0.1:1812")]

    assert state() == "untried"
    [fwd] = core.handle_request(AUTH, access_request("alice", 1), NAS, 0.0)
    assert state() == "untried"
    core.handle_answer("source", fwd.via, server_answer(fwd), SRC, 0.1)
    assert state() == "up"
