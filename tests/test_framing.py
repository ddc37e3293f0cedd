"""sip.framing.StreamFramer: unit tests and Hypothesis properties.

Invariants:
  * a stream of N messages and CRLFCRLF pings, cut at ANY points, yields exactly those
    N messages and pings in order, and each framed message parses with datagram=False;
  * a message above max_size raises MessageTooLarge, whatever the cuts;
  * any octets yield messages / PING / NEED_DATA or raise a SipError, nothing else.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sip.errors import FramingError, MessageTooLarge, SipError
from sip.framing import NEED_DATA, PING, PONG, StreamFramer
from sip.message import parse_message

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
import _common  # the fuzz harnesses' invariants, run here under Hypothesis


def msg(
    body: bytes = b"", *, cl: bytes | None = None, call_id: str = "c1", extra: bytes = b""
) -> bytes:
    length = str(len(body)).encode() if cl is None else cl
    return (
        b"OPTIONS sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK-" + call_id.encode() + b"\r\n"
        b"Max-Forwards: 70\r\n"
        b"From: <sip:alice@example.com>;tag=1\r\n"
        b"To: <sip:bob@example.com>\r\n"
        b"Call-ID: " + call_id.encode() + b"\r\n"
        b"CSeq: 1 OPTIONS\r\n" + extra + b"Content-Length: " + length + b"\r\n\r\n" + body
    )


def drain(f: StreamFramer) -> list[object]:
    out: list[object] = []
    for _ in range(10_000):  # bounded: each event consumes input
        ev = f.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
    raise AssertionError("framer did not return NEED_DATA")


def feed(chunks: list[bytes], max_size: int = 65535) -> list[object]:
    f = StreamFramer(max_size=max_size)
    out: list[object] = []
    for c in chunks:
        f.receive_data(c)
        out += drain(f)
    return out


def test_one_message_whole_and_byte_by_byte() -> None:
    m = msg(b"hello\r\n\r\nworld")
    assert feed([m]) == [m]
    assert feed([bytes([b]) for b in m]) == [m]


def test_pings_pongs_and_leading_crlf() -> None:
    m = msg()
    assert feed([b"\r\n\r\n" + m + b"\r\n\r\n\r\n\r\n"]) == [PING, m, PING, PING]
    assert PONG == b"\r\n"
    # a lone CRLF (a pong from the peer) before a message is skipped
    assert feed([b"\r\n" + m]) == [m]
    f = StreamFramer()
    f.receive_data(b"\r\n")
    assert f.next_event() is NEED_DATA  # may still become a ping
    f.receive_data(b"\r\n")
    assert f.next_event() is PING


def test_two_messages_in_one_read() -> None:
    a, b = msg(b"x", call_id="a"), msg(b"yy", call_id="b")
    assert feed([a + b]) == [a, b]
    assert [parse_message(m, datagram=False).call_id for m in feed([a + b])] == ["a", "b"]  # type: ignore[arg-type]


def test_compact_case_and_spacing_of_content_length() -> None:
    for spelled in (b"l: 3", b"L:3", b"content-length   :  3", b"CONTENT-LENGTH:\t3 "):
        m = msg(b"abc").replace(b"Content-Length: 3", spelled)
        assert feed([m + m]) == [m, m]


def test_folded_content_length() -> None:
    # regression: the framer read "" from "Content-Length:\r\n 3" and raised FramingError
    m = msg(b"abc").replace(b"Content-Length: 3", b"Content-Length:\r\n 3")
    assert feed([m]) == [m]
    assert parse_message(m, datagram=False).body == b"abc"


def test_equal_duplicates_accepted_conflicts_rejected() -> None:
    dup = msg(b"abc", extra=b"l: 03\r\n")
    assert feed([dup]) == [dup]
    with pytest.raises(FramingError) as info:
        feed([msg(b"abc", extra=b"l: 4\r\n")])
    assert info.value.close_connection


@pytest.mark.parametrize(
    "cl",
    [
        b"-1",
        b"+3",
        b"3 4",
        b"",
        b"0x3",
        b"\xb2",  # regression: must stay a FramingError (bytes.isdigit is ASCII-only)
    ],
)
def test_bad_content_length(cl: bytes) -> None:
    with pytest.raises(FramingError) as info:
        feed([msg(b"abc", cl=cl)])
    assert info.value.close_connection and info.value.status == 400


def test_missing_content_length() -> None:
    with pytest.raises(FramingError):
        feed([msg().replace(b"Content-Length: 0\r\n", b"")])


def test_huge_content_length_is_too_large() -> None:
    # regression: int() of a 5000-digit Content-Length raised ValueError
    for cl in (b"9" * 5000, b"99999999999", b"70000"):
        with pytest.raises(MessageTooLarge) as info:
            feed([msg(b"abc", cl=cl)])
        assert info.value.status == 513 and info.value.close_connection


def test_max_size_boundary() -> None:
    m = msg(b"z" * 100)
    assert feed([m], max_size=len(m)) == [m]
    with pytest.raises(MessageTooLarge):
        feed([m], max_size=len(m) - 1)
    # a header section that never ends
    with pytest.raises(MessageTooLarge):
        feed(
            [b"OPTIONS sip:x SIP/2.0\r\n"] + [b"X-Pad: " + b"a" * 90 + b"\r\n"] * 20, max_size=1000
        )


def test_oversized_head_error_does_not_depend_on_the_cuts() -> None:
    # regression (fuzz): a head above max_size with a bad Content-Length gave FramingError
    # when it arrived whole and MessageTooLarge when it trickled in
    m = msg(b"", cl=b"-1", extra=b"X-Pad: " + b"a" * 300 + b"\r\n")
    for chunks in ([m], [bytes([b]) for b in m]):
        with pytest.raises(MessageTooLarge):
            feed(chunks, max_size=200)


def test_buffered_and_repeated_need_data() -> None:
    f = StreamFramer()
    m = msg(b"abc")
    f.receive_data(m[:10])
    assert f.next_event() is NEED_DATA and f.next_event() is NEED_DATA
    assert f.buffered == 10
    f.receive_data(m[10:])
    assert f.next_event() == m and f.buffered == 0


def test_rfc4475_style_body_with_crlfcrlf() -> None:
    body = b"\r\n\r\n--boundary\r\n\r\n\x00\x00\r\n\r\n"
    m = msg(body)
    assert feed([m, msg()]) == [m, msg()]


# --- Hypothesis -------------------------------------------------------------------------


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[object], bytes]:
    """A list of expected events (message octets or PING) and the stream that carries them."""
    items: list[object] = []
    for i in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 3)) == 0:
            items.append(PING)
            continue
        body = draw(
            st.binary(max_size=120) | st.sampled_from([b"\r\n\r\n", b"\r\n", b"l: 5\r\n\r\n"])
        )
        spelled = draw(
            st.sampled_from([b"Content-Length: %d", b"l:%d", b"content-length :\r\n %d"])
        )
        m = msg(body, call_id=f"c{i}").replace(
            b"Content-Length: %d" % len(body), spelled % len(body)
        )
        items.append(m)
    stream = b"".join(b"\r\n\r\n" if it is PING else it for it in items)  # type: ignore[misc]
    return items, stream


def cut(data: bytes, points: list[int]) -> list[bytes]:
    idx = sorted({p % (len(data) + 1) for p in points})
    bounds = [0, *idx, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_cuts_yield_the_same_events(
    case: tuple[list[object], bytes], points: list[int]
) -> None:
    items, stream = case
    events = feed(cut(stream, points))
    assert events == items
    for ev in events:
        if ev is not PING:
            assert parse_message(ev, datagram=False).raw == ev  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.lists(st.integers(0, 10_000), max_size=10))
def test_oversized_message_raises_whatever_the_cuts(body: bytes, points: list[int]) -> None:
    m = msg(body)
    stream = msg() + m
    with pytest.raises(MessageTooLarge):
        feed(cut(stream, points), max_size=len(m) - 1)
    assert feed(cut(stream, points), max_size=len(m)) == [msg(), m]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.binary(max_size=80)
        | st.sampled_from(
            [b"\r\n", b"\r\n\r\n", b"l: 2\r\n", b"Content-Length: 99999999999\r\n", b"l:\xb2\r\n"]
        ),
        max_size=12,
    )
)
@example([b"INVITE sip:a SIP/2.0\r\nl: " + b"9" * 5000 + b"\r\n\r\n"])
@example([b"X\r\nl:\r\n 1\r\n\r\nZ"])
def test_any_stream_gives_events_or_sip_error(chunks: list[bytes]) -> None:
    f = StreamFramer(max_size=2000)
    try:
        for c in chunks:
            f.receive_data(c)
            for ev in drain(f):
                assert ev is PING or isinstance(ev, bytes)
                if isinstance(ev, bytes):
                    try:
                        parse_message(ev, datagram=False)
                    except SipError:
                        pass
    except SipError:
        pass


_pieces = st.sampled_from(
    [
        b"\r\n",
        b"\r\n\r\n",
        b"l: 2\r\n",
        b"l: -1\r\n",
        b"Content-Length:\r\n 3\r\n",
        b"X-Pad: " + b"a" * 150 + b"\r\n",
        b"OPTIONS sip:a SIP/2.0\r\n",
        msg(),
        msg(b"ab"),
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_pieces | st.binary(max_size=40), max_size=12),
    st.lists(st.integers(0, 10_000), max_size=20),
)
@example([msg(b"", cl=b"-1", extra=b"X-Pad: " + b"a" * 300 + b"\r\n")], [5])
def test_cuts_never_change_the_outcome(pieces: list[bytes], points: list[int]) -> None:
    """Differential: cut anywhere, the events and the error are those of the whole stream."""
    stream = b"".join(pieces)
    assert _common.framing_events(cut(stream, points), 300) == _common.framing_events([stream], 300)
