"""RADIUS identifiers toward a home server rest before reuse (a server still remembering
the answered request would drop a new one with the same identifier)."""

from __future__ import annotations

import pytest

from dsbc.radius.idspace import IDS_PER_SLOT, REUSE_HOLD, IdExhausted, IdSpace


def test_a_released_identifier_is_not_reused_while_it_rests() -> None:
    ids = IdSpace(max_slots=4)
    taken = [ids.allocate(0.0) for _ in range(IDS_PER_SLOT)]  # the whole first slot
    slot, ident = taken[0]
    ids.release(slot, ident, 10.0)
    # resting: a new slot (socket) is opened instead of reusing it at once
    assert ids.allocate(10.001)[0] == 1
    # rested: it is handed out again, oldest freed first
    assert ids.allocate(10.0 + REUSE_HOLD) == (slot, ident)


def test_with_every_slot_open_a_resting_identifier_is_reused_rather_than_refused() -> None:
    ids = IdSpace(max_slots=1)
    taken = [ids.allocate(0.0) for _ in range(IDS_PER_SLOT)]
    ids.release(*taken[5], 1.0)
    assert ids.allocate(1.001) == taken[5]
    with pytest.raises(IdExhausted):  # 256 in flight on the one allowed slot
        ids.allocate(1.002)


def test_an_ipv4_nas_on_an_ipv6_wildcard_listener_is_a_known_client() -> None:
    """auth_listen = "[::]:1812": IPv4 NASes arrive as ::ffff:a.b.c.d and were dropped as
    unknown clients, silently (found by an audit)."""
    from dsbc.radius.idspace import ClientTable

    table = ClientTable([("127.0.0.0/8", "nas-secret")])
    found = table.find("::ffff:127.0.0.1", 40000)
    assert found is not None and found.secret in (b"nas-secret", "nas-secret")
    assert table.find("::ffff:10.0.0.1", 40000) is None
