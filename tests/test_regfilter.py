"""Which relayed registrations the worker writes to the store (dsbc.regfilter)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dsbc.regfilter import RefreshFilter

PHONE = ("1000001", "<sip:1000001@127.0.0.2:5062>")


def test_first_registration_is_written_and_a_quick_refresh_is_not() -> None:
    f = RefreshFilter(window=10.0)
    assert f.fresh(*PHONE, "source", 3600, now=100.0)
    assert not f.fresh(*PHONE, "source", 3600, now=102.0)
    assert f.skipped == 1


def test_a_refresh_after_the_window_is_written() -> None:
    f = RefreshFilter(window=10.0)
    assert f.fresh(*PHONE, "source", 3600, now=100.0)
    assert not f.fresh(*PHONE, "source", 3600, now=109.0)
    assert f.fresh(*PHONE, "source", 3600, now=111.0)


def test_a_move_to_the_other_system_is_written_at_once() -> None:
    f = RefreshFilter()
    assert f.fresh(*PHONE, "source", 3600, now=100.0)
    assert f.fresh(*PHONE, "target", 3600, now=100.5)
    assert not f.fresh(*PHONE, "target", 3600, now=101.0)


def test_unregistration_is_written_and_forgets_the_binding() -> None:
    f = RefreshFilter()
    assert f.fresh(*PHONE, "source", 3600, now=100.0)
    assert f.fresh(*PHONE, "source", 0, now=100.5)
    assert f.fresh(*PHONE, "source", 3600, now=101.0)


def test_other_contacts_of_the_same_account_are_their_own_bindings() -> None:
    f = RefreshFilter()
    assert f.fresh("1000001", "<sip:a@127.0.0.2:5062>", "source", 3600, now=100.0)
    assert f.fresh("1000001", "<sip:a@127.0.0.2:5063>", "source", 3600, now=100.0)


def test_a_short_lifetime_shortens_the_window() -> None:
    """Expires 8: a refresh 3 s later moves the expiry by more than a quarter of it."""
    f = RefreshFilter(window=10.0)
    assert f.fresh(*PHONE, "source", 8, now=100.0)
    assert not f.fresh(*PHONE, "source", 8, now=101.5)
    assert f.fresh(*PHONE, "source", 8, now=103.0)


def test_a_shortened_expiry_is_written_at_once() -> None:
    """Found by an audit: a phone that registered for 600 s and, seconds later, got the
    cap of `dsbc migrate --prepare` (expires 8) kept its 600 s in the store: the shorter
    expiry was taken for a refresh.  A phone switched off then still counted as registered
    (and was waited for by --wait-registrations) for ten minutes instead of 8 s."""
    f = RefreshFilter(window=10.0)
    assert f.fresh(*PHONE, "source", 600, now=100.0)
    assert f.fresh(*PHONE, "source", 8, now=101.0)
    assert not f.fresh(*PHONE, "source", 8, now=101.5)


def test_the_memory_is_bounded_by_rotation() -> None:
    f = RefreshFilter(window=10.0, max_entries=100)
    for i in range(1000):
        assert f.fresh(str(i), "<sip:x@h>", "source", 3600, now=100.0)
    assert len(f) <= 200


@settings(max_examples=200, deadline=None)
@given(
    expires=st.integers(min_value=1, max_value=7200),
    period_share=st.floats(min_value=0.01, max_value=0.95),
    start=st.floats(min_value=0.0, max_value=1e6),
    refreshes=st.integers(min_value=1, max_value=300),
)
def test_a_phone_that_keeps_refreshing_never_looks_expired(
    expires: int, period_share: float, start: float, refreshes: int
) -> None:
    """Whatever its lifetime and refresh period, the expiry in the store (the last one
    written) never passes while the phone is registered."""
    f = RefreshFilter(window=10.0)
    period = max(0.001, expires * period_share)
    stored = None
    now = start
    for _ in range(refreshes):
        if stored is not None:
            assert stored > now, "the store shows a registered phone as expired"
        if f.fresh(*PHONE, "source", expires, now):
            stored = now + expires
        now += period
