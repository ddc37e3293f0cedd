"""The I/O-free security pieces: rate limiter, scanner filter, admission (issue #7).

Time is an argument everywhere, so none of these tests sleeps.
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sip.admission import Admission
from sip.flow import Flow
from sip.message import parse_message
from sip.ratelimit import RateLimiter, Verdict
from sip.scanner import ScannerFilter


def invite(
    call_id: str = "c1", ua: str = "test-phone", method: str = "INVITE", pad: int = 0
) -> bytes:
    return (
        f"{method} sip:1002@192.0.2.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bK-1\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:1001@192.0.2.1>;tag=a\r\n"
        "To: <sip:1002@192.0.2.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"User-Agent: {ua}\r\n"
        + (f"X-Pad: {'p' * pad}\r\n" if pad else "")
        + "Content-Length: 0\r\n\r\n"
    ).encode()


# --- rate limiter -----------------------------------------------------------------------


def test_limiter_allows_up_to_the_limit_then_blocks() -> None:
    rl = RateLimiter(limit=5, window=1.0)
    verdicts = [rl.check("10.0.0.1", 0.01 * i) for i in range(10)]
    assert verdicts[:5] == [Verdict.ALLOW] * 5
    assert all(v != Verdict.ALLOW for v in verdicts[5:])
    assert rl.is_blocked("10.0.0.1")
    assert list(rl.newly_blocked) == ["10.0.0.1"]
    assert rl.check("10.0.0.2", 0.1) == Verdict.ALLOW  # other sources are not affected


def test_answers_to_a_flood_are_bounded_by_the_limit() -> None:
    rl = RateLimiter(limit=10, window=2.0)
    counts = collections.Counter(rl.check("203.0.113.5", i * 1e-5) for i in range(10_000))
    assert counts[Verdict.ALLOW] == 10
    assert counts[Verdict.REJECT] == 10  # at most `limit` answers per window
    assert counts[Verdict.DROP] == 10_000 - 20


def test_a_source_that_keeps_flooding_stays_blocked_and_one_that_slows_is_let_back() -> None:
    rl = RateLimiter(limit=10, window=1.0)
    t = 0.0
    # 100 messages a second for 5 seconds: nothing after the first few gets through
    allowed = 0
    for _ in range(500):
        allowed += rl.check("a", t) == Verdict.ALLOW
        t += 0.01
    assert allowed <= 20
    # then 5 a second: allowed again within about two windows, and all of it after that
    results = []
    for _ in range(50):
        t += 0.2
        results.append(rl.check("a", t))
    assert results[-30:] == [Verdict.ALLOW] * 30
    assert not rl.is_blocked("a")


def test_steady_legitimate_rate_is_never_limited() -> None:
    rl = RateLimiter(limit=20, window=2.0)
    t = 0.0
    for _ in range(5000):  # 9 a second for a long time, below 20 per 2 s
        assert rl.check("phone", t) == Verdict.ALLOW
        t += 1 / 9


def test_entries_expire_and_memory_is_bounded() -> None:
    rl = RateLimiter(limit=5, window=1.0, max_entries=1000)
    for i in range(50_000):  # a flood from very many (spoofed) sources
        rl.check(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 0.0)
        assert len(rl) <= 1000
    assert rl.sweep(10.0) > 0
    assert len(rl) == 0
    # the sweep runs by itself as time goes on
    rl.check("x", 20.0)
    rl.check("y", 25.0)
    assert len(rl) == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.floats(0, 5, allow_nan=False)),
        min_size=1,
        max_size=300,
    )
)
def test_limiter_properties(events: list[tuple[int, float]]) -> None:
    """Any interleaving: memory stays bounded and no source gets more than the limit per
    window plus the previous window's spill-over (the sliding estimate is conservative)."""
    rl = RateLimiter(limit=3, window=1.0, max_entries=8)
    t = 0.0
    allowed: dict[str, list[float]] = collections.defaultdict(list)
    for src, dt in events:
        t += dt
        key = f"s{src}"
        if rl.check(key, t) == Verdict.ALLOW:
            allowed[key].append(t)
        assert len(rl) <= 8
    for times in allowed.values():
        for i, start in enumerate(times):
            in_window = [x for x in times[i:] if x < start + 1.0]
            # without eviction at most 2 * limit fit in any 1 s span; eviction may forget
            # a source, so allow one more burst in that case
            assert len(in_window) <= 3 * 3


def test_limiter_rejects_bad_settings() -> None:
    for kwargs in (
        {"limit": 0, "window": 1.0},
        {"limit": 1, "window": 0.0},
        {"limit": 1, "window": 1.0, "max_entries": 0},
    ):
        with pytest.raises(ValueError):
            RateLimiter(**kwargs)  # type: ignore[arg-type]


# --- scanner filter -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ua",
    [
        "friendly-scanner",
        "FRIENDLY-SCANNER",
        "sipvicious 0.3.4",
        "Mozilla sipcli/v1.8",
        "VaxSIPUserAgent/3.1",
        "iWar",
        "sundayddr",
    ],
)
def test_scanner_user_agents_match(ua: str) -> None:
    f = ScannerFilter(
        [
            "friendly-scanner",
            "sipvicious",
            "sipcli",
            "sip-scan",
            "VaxSIPUserAgent",
            "iWar",
            "sundayddr",
        ]
    )
    assert f.match(invite(ua=ua))


def test_scanner_filter_looks_only_at_user_agent_in_the_header_section() -> None:
    f = ScannerFilter(["friendly-scanner"])
    assert not f.match(invite(ua="Linphone/5.2"))
    # the name in another header or in the body is not a scanner
    msg = invite(ua="Linphone").replace(
        b"Content-Length: 0\r\n\r\n",
        b"Subject: friendly-scanner\r\nContent-Length: 28\r\n\r\nUser-Agent: friendly-scanner",
    )
    assert not f.match(msg)
    assert f.match(invite(ua="x").replace(b"User-Agent: x", b"user-agent  :  a friendly-scanner"))
    with pytest.raises(ValueError):
        ScannerFilter([])


# --- admission ------------------------------------------------------------------------------


def make_admission(**kw: object) -> tuple[Admission, collections.Counter[str]]:
    counters: collections.Counter[str] = collections.Counter()
    trusted = {"198.51.100.1"}
    adm = Admission(is_trusted=lambda ip, port: ip in trusted, counters=counters, **kw)  # type: ignore[arg-type]
    return adm, counters


def test_admission_answers_503_then_drops_and_counts() -> None:
    adm, counters = make_admission(limiter=RateLimiter(3, 2.0))
    flow = Flow("udp", "203.0.113.9", 5060)
    out = [adm.check(invite(f"c{i}"), flow, 0.001 * i) for i in range(20)]
    assert out[:3] == [None, None, None]
    answered = [o for o in out[3:] if o]
    assert len(answered) == 3  # bounded answers
    reply = parse_message(answered[0][0].data)
    assert reply.status == 503 and reply.get("retry-after") == "2"
    assert reply.call_id == "c3" and answered[0][0].ip == "203.0.113.9"
    assert counters["rate_limited"] == 17 and counters["rate_limited_answered"] == 3



def test_admission_logs_blocked_sources_within_a_budget(caplog: pytest.LogCaptureFixture) -> None:
    """Each newly blocked source is logged, at most LOG_BURST per rate window; the rest are
    counted in one line at the next window (sources that spoof addresses cannot fill the log)."""
    from sip.admission import LOG_BURST

    adm, _ = make_admission(limiter=RateLimiter(1, 2.0), drop=True)
    with caplog.at_level("WARNING", logger="dsbc.sip.security"):
        for i in range(LOG_BURST + 5):
            src = Flow("udp", f"203.0.113.{i + 1}", 5060)
            adm.check(invite(), src, 0.0)
            adm.check(invite(), src, 0.0)  # over the limit: blocked
        assert sum("is over the rate limit" in r.message for r in caplog.records) == LOG_BURST
        src = Flow("udp", "192.0.2.1", 5060)
        adm.check(invite(), src, 5.0)
        adm.check(invite(), src, 5.0)
    lines = [r.message for r in caplog.records]
    assert "5 more sources over the SIP rate limit not logged in the last 2 s" in lines
    assert lines[-1].startswith("SIP source 192.0.2.1 is over the rate limit")

def test_admission_exempts_trusted_peers_and_drop_mode_is_silent() -> None:
    adm, counters = make_admission(limiter=RateLimiter(1, 2.0), drop=True)
    carrier = Flow("udp", "198.51.100.1", 5060)
    assert all(adm.check(invite(f"c{i}"), carrier, 0.0) is None for i in range(100))
    device = Flow("udp", "203.0.113.9", 5060)
    assert adm.check(invite(), device, 0.0) is None
    assert adm.check(invite(), device, 0.0) == []
    assert counters["rate_limited"] == 1 and counters["rate_limited_answered"] == 0


def test_admission_drops_scanners_silently() -> None:
    adm, counters = make_admission(scanners=ScannerFilter(["friendly-scanner"]))
    assert (
        adm.check(
            invite(ua="friendly-scanner", method="OPTIONS"), Flow("udp", "203.0.113.9", 5060), 0.0
        )
        == []
    )
    assert adm.check(invite(ua="Zoiper"), Flow("udp", "203.0.113.9", 5060), 0.0) is None
    assert counters["scanners_dropped"] == 1


def test_admission_answers_oversized_datagram_with_513() -> None:
    adm, counters = make_admission(max_message_size=2000)
    out = adm.check(invite(pad=3000), Flow("udp", "203.0.113.9", 5060), 0.0)
    assert out and parse_message(out[0].data).status == 513
    assert counters["too_large"] == 1
    # a response above the limit is dropped, never answered
    resp = b"SIP/2.0 200 OK\r\n" + invite(pad=3000).split(b"\r\n", 1)[1]
    assert adm.check(resp, Flow("udp", "203.0.113.9", 5060), 0.0) == []


def test_admission_never_answers_ack_or_responses_when_limited() -> None:
    adm, _ = make_admission(limiter=RateLimiter(1, 2.0))
    flow = Flow("udp", "203.0.113.9", 5060)
    adm.check(invite(), flow, 0.0)
    assert adm.check(invite(method="ACK"), flow, 0.0) == []
    assert adm.check(b"SIP/2.0 180 Ringing\r\n" + invite().split(b"\r\n", 1)[1], flow, 0.0) == []
    assert adm.check(b"\x00garbage", flow, 0.0) == []


def test_peer_set_answers_pairs_addresses_and_networks() -> None:
    from dsbc.sip_service import peer_set
    from sip.peers import CACHE_SIZE

    peers = peer_set(["192.0.2.10:5060", "198.51.100.7", "203.0.113.0/24", "[2001:db8::1]:5070"])
    assert peers.contains("192.0.2.10", 5060) and not peers.contains("192.0.2.10", 5061)
    assert peers.contains("198.51.100.7", 1) and peers.contains("198.51.100.7", 65535)
    assert peers.contains("203.0.113.200", 9) and not peers.contains("203.0.114.1", 9)
    assert peers.contains("2001:db8::1", 5070) and not peers.contains("2001:db8::1", 5060)
    assert not peers.contains("not-an-ip", 5060) and not peers.contains("", 0)
    peers.add_addr("192.0.2.99")  # a later addition is seen despite the cache
    assert peers.contains("192.0.2.99", 5060)
    for i in range(CACHE_SIZE + 10):
        peers.contains("10.0.0.1", i % 65536)
    assert len(peers._cache) <= CACHE_SIZE
    assert peers.contains("203.0.113.1", 5) is True
