"""The Diameter routing core, I/O-free: messages and times in, messages out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dsbc.diameter import codec as dc
from dsbc.diameter.routing import TO_CLIENT, TO_PEER, DiameterRouter, SystemRoute, candidates
from dsbc.diameter.service import make_decide
from dsbc.store import LocationStore
from tests.test_radius_core import open_test_store


def router(store: LocationStore) -> DiameterRouter:
    r = DiameterRouter([SystemRoute("source"), SystemRoute("target", "ocs.t", "t.example")], make_decide(store),
                       "dsbc.example", "example", request_timeout=5.0, lock_hold=1.0)
    r.peer_state("source", True, "ocs.s")
    r.peer_state("target", True, "ocs.t")
    r.client_open(1, "pgw.example")
    return r


def ccr(sid: str, kind: int, sub: tuple[int, str] | None = None, hbh: int = 100, extra: list[dc.Avp] | None = None,
        ) -> dc.Message:
    avps = [dc.utf8(dc.SESSION_ID, sid), dc.u32(dc.CC_REQUEST_TYPE, kind)] + (extra or [])
    if sub:
        avps.append(dc.subscription_id(*sub))
    return dc.request(dc.CMD_CC, dc.APP_CREDIT_CONTROL, hbh, 7, avps, True)


@pytest.fixture
def st(tmp_path: Path) -> Iterator[LocationStore]:
    s = open_test_store(tmp_path)
    s.put_customer("1", ["msisdn:15550100", "imsi:001010000000001"], "source")
    s.put_customer("2", ["account:bob"], "target")
    yield s
    s.close()


def test_candidates_by_subscription_type() -> None:
    m = ccr("s", 1, (dc.SUB_E164, "+15550100"), extra=[dc.utf8(dc.USER_NAME, "bob")])
    m.avps.append(dc.subscription_id(dc.SUB_IMSI, "001"))
    assert candidates(m) == [("msisdn", "15550100"), ("did", "15550100"), ("imsi", "001"),
                             ("account", "bob"), ("radius", "bob")]


def test_candidates_of_uris_and_nais() -> None:
    def of(sub: tuple[int, str] | None, user: str = "") -> list[tuple[str, str]]:
        return candidates(ccr("s", 1, sub, extra=[dc.utf8(dc.USER_NAME, user)] if user else []))

    assert of((dc.SUB_SIP_URI, "tel:+1-555-0100;phone-context=+1")) == [("msisdn", "15550100"), ("did", "15550100")]
    assert of((dc.SUB_SIP_URI, "sip:+15550100;npdi@ims.example;user=phone")) == [
        ("account", "+15550100;npdi"), ("msisdn", "15550100"), ("did", "15550100")]
    assert of((dc.SUB_SIP_URI, "<sips:bob@ims.example>")) == [("account", "bob")]
    assert of((dc.SUB_NAI, "bob@ims.example")) == [
        ("account", "bob@ims.example"), ("radius", "bob@ims.example"), ("account", "bob")]
    assert of(None, "001010000000001@nai.epc.mnc001.mcc001.3gppnetwork.org")[-2:] == [
        ("imsi", "001010000000001"), ("msisdn", "001010000000001")]


def test_hop_by_hop_mapped_both_ways_and_session_pinned(st: LocationStore) -> None:
    r = router(st)
    [fwd] = r.client_request(1, ccr("a", dc.CC_INITIAL, (dc.SUB_IMSI, "001010000000001"), hbh=555), 0.0)
    assert fwd.kind == TO_PEER and fwd.target == "source"
    sent = dc.decode(fwd.data)
    assert sent.hop_by_hop != 555 and sent.end_to_end == 7
    assert [a.text() for a in sent.find_all(dc.ROUTE_RECORD)] == ["pgw.example"]
    ans = dc.answer(sent, dc.SUCCESS, "ocs.s", "s")
    [back] = r.answer_from("source", ans, 0.1)
    assert back.kind == TO_CLIENT and back.target == 1 and dc.decode(back.data).hop_by_hop == 555
    st.migrate(["1"], "target")
    [fwd] = r.client_request(1, ccr("a", dc.CC_UPDATE), 1.0)
    assert fwd.target == "source"
    # the target's Destination-* are rewritten for that system
    [fwd] = r.client_request(1, ccr("b", dc.CC_INITIAL, (dc.SUB_E164, "15550100"),
                                    extra=[dc.utf8(dc.DESTINATION_REALM, "example")]), 1.0)
    sent = dc.decode(fwd.data)
    assert fwd.target == "target" and sent.text(dc.DESTINATION_REALM) == "t.example"
    assert sent.text(dc.DESTINATION_HOST) == "ocs.t"


def test_failed_initial_and_terminate_end_the_session(st: LocationStore) -> None:
    r = router(st)
    [fwd] = r.client_request(1, ccr("a", dc.CC_INITIAL, (dc.SUB_E164, "15550100")), 0.0)
    r.answer_from("source", dc.answer(dc.decode(fwd.data), 5030, "ocs.s", "s"), 0.1)
    assert "a" not in r.sessions
    [fwd] = r.client_request(1, ccr("b", dc.CC_INITIAL, (dc.SUB_E164, "15550100")), 0.0)
    r.answer_from("source", dc.answer(dc.decode(fwd.data), dc.SUCCESS, "ocs.s", "s"), 0.1)
    [fwd] = r.client_request(1, ccr("b", dc.CC_TERMINATE), 0.2)
    r.answer_from("source", dc.answer(dc.decode(fwd.data), dc.SUCCESS, "ocs.s", "s"), 0.3)
    assert r.sessions == {}


def test_timeout_and_peer_down_answer_3002(st: LocationStore) -> None:
    r = router(st)
    r.client_request(1, ccr("a", dc.CC_INITIAL, (dc.SUB_E164, "15550100"), hbh=9), 0.0)
    assert r.handle_timer(0.0) == []  # the first session sweep
    assert r.get_timer() == 5.0
    [fail] = r.handle_timer(5.0)
    ans = dc.decode(fail.data)
    assert ans.u32(dc.RESULT_CODE) == dc.UNABLE_TO_DELIVER and ans.hop_by_hop == 9 and ans.flags & dc.FLAG_E
    assert ans.text(dc.SESSION_ID) == "a"
    r.client_request(1, ccr("b", dc.CC_INITIAL, (dc.SUB_E164, "15550100"), hbh=10), 6.0)
    [fail] = r.peer_state("source", False)
    assert dc.decode(fail.data).hop_by_hop == 10
    [now_down] = r.client_request(1, ccr("c", dc.CC_INITIAL, (dc.SUB_E164, "15550100"), hbh=11), 7.0)
    assert dc.decode(now_down.data).u32(dc.RESULT_CODE) == dc.UNABLE_TO_DELIVER
    assert "c" not in r.sessions and r.status()["systems"]["source"]["peer"] == "down"  # type: ignore[index]


def test_loop_missing_session_and_reject(tmp_path: Path) -> None:
    st = open_test_store(tmp_path, "reject")
    r = router(st)
    loop = ccr("a", 1, extra=[dc.utf8(dc.ROUTE_RECORD, "dsbc.example")])
    assert dc.decode(r.client_request(1, loop, 0.0)[0].data).u32(dc.RESULT_CODE) == dc.LOOP_DETECTED
    nosid = dc.request(dc.CMD_CC, 4, 1, 1, [dc.u32(dc.CC_REQUEST_TYPE, 1)])
    missing = dc.decode(r.client_request(1, nosid, 0.0)[0].data)
    assert missing.u32(dc.RESULT_CODE) == dc.MISSING_AVP
    failed = missing.find(dc.FAILED_AVP)
    assert failed is not None and [a.code for a in dc.decode_avps(failed.data)] == [dc.SESSION_ID]
    unknown = ccr("u", 1, (dc.SUB_E164, "999"))
    assert dc.decode(r.client_request(1, unknown, 0.0)[0].data).u32(dc.RESULT_CODE) == dc.USER_UNKNOWN
    # another application (an S6a ULR) than the credit control dsbc advertised: 3007, not relayed
    ulr = dc.request(316, 16777251, 2, 2, [dc.utf8(dc.SESSION_ID, "s6a;1")])
    [ans] = r.client_request(1, ulr, 0.0)
    got = dc.decode(ans.data)
    assert got.u32(dc.RESULT_CODE) == dc.APPLICATION_UNSUPPORTED and got.flags & dc.FLAG_E and ans.kind == TO_CLIENT
    st.close()


def test_hold_then_too_busy_and_sessions_snapshot(st: LocationStore) -> None:
    r = router(st)
    st.lock(["2"], "b")
    assert r.client_request(1, ccr("h", 1, (dc.SUB_NAI, "bob")), 0.0) == []
    assert r.handle_timer(0.5) == []
    [busy] = r.handle_timer(1.0)
    assert dc.decode(busy.data).u32(dc.RESULT_CODE) == dc.TOO_BUSY
    r.client_request(1, ccr("s", 1, (dc.SUB_E164, "15550100")), 2.0)
    rows = r.sessions_snapshot()
    fresh = router(st)
    fresh.load_sessions(rows)
    assert fresh.client_request(1, ccr("s", 2), 3.0)[0].target == "source"
    r.handle_timer(2.0 + r.SESSION_IDLE + r.SWEEP_EVERY + 1)
    assert r.sessions == {}


def test_a_request_from_a_system_goes_to_the_client_s_newest_connection(st: LocationStore) -> None:
    # the PGW reconnected while its first connection is half-open (the watchdog has not
    # closed it yet): a Re-Auth-Request into its session must reach the live connection
    r = router(st)
    [fwd] = r.client_request(1, ccr("a", dc.CC_INITIAL, (dc.SUB_E164, "15550100")), 0.0)
    r.answer_from("source", dc.answer(dc.decode(fwd.data), dc.SUCCESS, "ocs.s", "s"), 0.1)
    r.client_open(2, "pgw.example")
    rar = dc.request(dc.CMD_RA, dc.APP_CREDIT_CONTROL, 900, 901, [dc.utf8(dc.SESSION_ID, "a")], True)
    [out] = r.peer_request("source", rar, 1.0)
    assert out.kind == TO_CLIENT and out.target == 2
    r.client_closed(2)
    [out] = r.peer_request("source", rar, 2.0)
    assert out.kind == TO_CLIENT and out.target == 1


def test_a_destination_host_naming_dsbc_is_not_relayed_to_a_system(st: LocationStore) -> None:
    # a PGW configured with dsbc as its credit-control server names it in Destination-Host;
    # the source has no diameter_host configured: its OCS must not get dsbc's name
    r = router(st)
    [fwd] = r.client_request(1, ccr("d", dc.CC_INITIAL, (dc.SUB_E164, "15550100"),
                                    extra=[dc.utf8(dc.DESTINATION_HOST, "dsbc.example")]), 0.0)
    assert fwd.target == "source" and dc.decode(fwd.data).find(dc.DESTINATION_HOST) is None
    # the OCS's own name (from the CCA, as RFC 4006 has the PGW send it) is kept
    [fwd] = r.client_request(1, ccr("d", dc.CC_UPDATE, extra=[dc.utf8(dc.DESTINATION_HOST, "ocs.s")]), 1.0)
    assert dc.decode(fwd.data).text(dc.DESTINATION_HOST) == "ocs.s"


def test_a_request_from_a_system_that_already_went_through_dsbc_is_a_loop(st: LocationStore) -> None:
    # a Diameter agent on the system's side that routes dsbc's own request back to it: 3005
    # to the system (RFC 6733 6.1.3), not a request relayed to the PGW as if the OCS sent it
    r = router(st)
    [fwd] = r.client_request(1, ccr("a", dc.CC_INITIAL, (dc.SUB_E164, "15550100")), 0.0)
    back = dc.decode(fwd.data)
    back.avps.append(dc.utf8(dc.ROUTE_RECORD, "dsbc.example"))
    [out] = r.peer_request("source", back, 0.1)
    ans = dc.decode(out.data)
    assert out.kind == TO_PEER and out.target == "source"
    assert ans.u32(dc.RESULT_CODE) == dc.LOOP_DETECTED and ans.flags & dc.FLAG_E and not ans.is_request
