"""Back-end health by OPTIONS pings: timeouts, answers, forged answers."""

from __future__ import annotations

from sip.health import HealthChecker, Node
from sip.message import make_response, parse_message


def _checker() -> HealthChecker:
    nodes = [Node("target", 0, "udp", "127.0.0.10", 5060), Node("target", 1, "udp", "127.0.0.11", 5060)]
    return HealthChecker(nodes, interval=1.0, timeout=0.5, tag="t-secret")


def _answer(ping: bytes) -> object:
    return parse_message(make_response(parse_message(ping), 200, "OK"))


def test_silent_node_goes_down_and_traffic_fails_over_within_the_system() -> None:
    h = _checker()
    pings = h.handle_timer(0.0)
    assert [p.node.index for p in pings] == [0, 1]
    h.handle_response(_answer(pings[1].data), 0.1, "127.0.0.11")  # node 1 answers, node 0 does not
    h.handle_timer(0.6)
    assert h.pick("target") == Node("target", 1, "udp", "127.0.0.11", 5060)
    assert h.pick("source") is None  # never the other system


def test_an_answer_from_another_address_does_not_keep_a_dead_node_up() -> None:
    h = _checker()
    pings = h.handle_timer(0.0)
    h.handle_response(_answer(pings[0].data), 0.1, "203.0.113.66")  # forged, from elsewhere
    h.handle_response(_answer(pings[1].data), 0.1, "127.0.0.11")
    h.handle_timer(0.6)
    states = {s["node"]: s["up"] for s in h.status()}
    assert states == {"udp:127.0.0.10:5060": False, "udp:127.0.0.11:5060": True}


def test_a_node_comes_back_on_its_next_answer() -> None:
    h = _checker()
    h.handle_timer(0.0)
    h.handle_timer(0.6)
    assert h.pick("target") is None
    pings = h.handle_timer(1.0)
    h.handle_response(_answer(pings[0].data), 1.05, "127.0.0.10")
    assert h.pick("target") == Node("target", 0, "udp", "127.0.0.10", 5060)


def test_a_node_answering_5xx_is_down_and_4xx_or_2xx_up() -> None:
    """503 (overloaded, in maintenance) from a node means it will not serve: its traffic
    goes to the other node of the system.  A node that does not do OPTIONS (405) lives."""
    h = _checker()
    pings = h.handle_timer(0.0)
    busy = parse_message(make_response(parse_message(pings[0].data), 503, "Service Unavailable"))
    h.handle_response(busy, 0.1, "127.0.0.10")
    no_options = parse_message(make_response(parse_message(pings[1].data), 405, "Method Not Allowed"))
    h.handle_response(no_options, 0.1, "127.0.0.11")
    states = {s["node"]: s["up"] for s in h.status()}
    assert states == {"udp:127.0.0.10:5060": False, "udp:127.0.0.11:5060": True}
    assert h.pick("target") == Node("target", 1, "udp", "127.0.0.11", 5060)
    pings = h.handle_timer(1.0)
    h.handle_response(_answer(pings[0].data), 1.05, "127.0.0.10")  # back once it answers 200
    assert {s["node"]: s["up"] for s in h.status()}["udp:127.0.0.10:5060"] is True


def test_a_timeout_check_run_late_by_a_stalled_loop_waits_for_one_read_of_the_socket() -> None:
    """A worker that was busy (or paused) runs its ping timer late, before it reads the
    answer waiting in the socket: the node is judged again a moment later, not marked
    down on a silence dsbc did not listen to.  A node that is silent then too is down."""
    h = _checker()
    pings = h.handle_timer(0.0)
    h.handle_timer(1.7)  # 1.2 s late
    assert [s["up"] for s in h.status()] == [True, True]
    recheck = h.get_timer()
    assert recheck is not None and 1.7 < recheck < 1.8
    h.handle_response(_answer(pings[0].data), 1.701, "127.0.0.10")  # read once the loop polls
    h.handle_timer(recheck)
    assert {s["node"]: s["up"] for s in h.status()} == {"udp:127.0.0.10:5060": True, "udp:127.0.0.11:5060": False}
    # a check that is late again right after (the loop still busy) does not wait twice
    h2 = _checker()
    h2.handle_timer(0.0)
    h2.handle_timer(1.7)
    h2.handle_timer(3.0)
    assert h2.pick("target") is None


def test_a_node_not_heard_from_yet_comes_after_one_that_answered() -> None:
    """A reload that adds a node before a live one (or a dead node listed first): as soon as
    the live node answers its first ping, it is picked, not the silent one presumed up."""
    h = _checker()
    assert h.pick("target") == Node("target", 0, "udp", "127.0.0.10", 5060)  # nobody heard yet
    pings = h.handle_timer(0.0)
    h.handle_response(_answer(pings[1].data), 0.01, "127.0.0.11")
    assert h.pick("target") == Node("target", 1, "udp", "127.0.0.11", 5060)
    h.handle_response(_answer(pings[0].data), 0.02, "127.0.0.10")
    assert h.pick("target") == Node("target", 0, "udp", "127.0.0.10", 5060)  # order again


def test_a_node_going_down_and_up_is_logged_once_each(caplog: object) -> None:
    """The operator's first sign that a system's calls fail over or get 503 (found by an
    audit: a node going down was only visible in `dsbc status`)."""
    import logging

    import pytest

    assert isinstance(caplog, pytest.LogCaptureFixture)
    caplog.set_level(logging.INFO, "dsbc.sip")
    h = _checker()
    h.handle_timer(0.0)
    h.handle_timer(0.6)  # both silent: down
    h.handle_timer(0.7)
    pings = h.handle_timer(1.0)
    h.handle_response(_answer(pings[0].data), 1.05, "127.0.0.10")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "sip: node target/0 udp:127.0.0.10:5060 is down: no answer to OPTIONS in 0.5 s"),
        ("WARNING", "sip: node target/1 udp:127.0.0.11:5060 is down: no answer to OPTIONS in 0.5 s"),
        ("INFO", "sip: node target/0 udp:127.0.0.10:5060 is up again: answered OPTIONS 200"),
    ]
