"""Codec benchmarks (pytest-benchmark).  Not in testpaths: run on request with

python -m pytest benchmarks/test_bench_codec.py --benchmark-only
"""

from __future__ import annotations

import pytest

from sip.framing import NEED_DATA, StreamFramer
from sip.message import Editor, make_response, parse_message
from tests.test_sip_codec import INVITE, OK200, REGISTER

pytest.importorskip("pytest_benchmark")

MESSAGES = {"REGISTER": REGISTER, "INVITE": INVITE, "200": OK200}


@pytest.mark.parametrize("name", list(MESSAGES))
def test_parse(benchmark, name: str) -> None:  # type: ignore[no-untyped-def]
    data = MESSAGES[name]

    def parse() -> None:
        msg = parse_message(data)
        # what routing touches eagerly
        msg.top_via  # noqa: B018
        msg.from_tag  # noqa: B018
        msg.to_tag  # noqa: B018
        msg.cseq  # noqa: B018

    benchmark(parse)


@pytest.mark.parametrize("name", list(MESSAGES))
def test_edit_forward(benchmark, name: str) -> None:  # type: ignore[no-untyped-def]
    msg = parse_message(MESSAGES[name])

    def edit() -> bytes:
        e = Editor(msg)
        e.prepend("via", "SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bK-bench;rport")
        e.set_first_value("via", msg.vias[0].text + ";received=192.0.2.99")
        return e.to_bytes()

    out = benchmark(edit)
    assert out.count(b"z9hG4bK-bench") == 1


def test_make_response(benchmark) -> None:  # type: ignore[no-untyped-def]
    msg = parse_message(INVITE)
    benchmark(make_response, msg, 180, "Ringing", (), "tag123")


def test_framing_ten_messages(benchmark) -> None:  # type: ignore[no-untyped-def]
    stream = b"".join([REGISTER, INVITE, OK200, b"\r\n\r\n"] * 3 + [INVITE])  # 10 messages, 3 pings
    chunks = [stream[i : i + 1400] for i in range(0, len(stream), 1400)]  # TCP-segment sized

    def frame() -> int:
        f = StreamFramer()
        n = 0
        for c in chunks:
            f.receive_data(c)
            while (ev := f.next_event()) is not NEED_DATA:
                n += isinstance(ev, bytes)
        return n

    assert benchmark(frame) == 10
