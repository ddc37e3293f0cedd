"""What the dispatcher reads from a back end's login answer (pure)."""

from __future__ import annotations

from api_proxy.records import parse_expiry


def test_session_expiry_with_a_utc_offset() -> None:
    """A login's ``expires_at`` with a UTC offset is that instant (ISO 8601), not the
    default lifetime and not the wall-clock time read as UTC."""
    utc = 1796317667.0  # 2026-12-03 17:07:47 UTC
    for text in (
        "2026-12-03 17:07:47",
        "2026-12-03T17:07:47Z",
        "2026-12-03T17:07:47.123Z",
        "2026-12-03T20:07:47+03:00",
        "2026-12-03T12:07:47-05:00",
        "2026-12-03 17:07:47+0000",
    ):
        assert abs(parse_expiry(text, 0.0, 1.0) - utc) < 1, text
    assert parse_expiry("soon", 100.0, 5.0) == 105.0
