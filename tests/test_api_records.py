"""What the dispatcher reads from a login answer and writes for a twin session (pure)."""

from __future__ import annotations

import json

from api_proxy.apicall import parse_call
from api_proxy.records import Creds, created, parse_expiry, rewrite_for


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


def test_a_twin_rewrite_replaces_every_credential_of_the_face_session() -> None:
    """auth_info with both the session id and the access token of the face system's
    session reaches the other system with both of the twin's, not one of each."""
    held, wanted = Creds("S-t", "A-t", "R-t"), Creds("S-s", "A-s", "R-s")
    for auth, want in (
        (
            {"session_id": "S-t", "access_token": "A-t"},
            {"session_id": "S-s", "access_token": "A-s"},
        ),
        ({"session_id": "S-t"}, {"session_id": "S-s"}),
        ({"access_token": "A-t"}, {"access_token": "A-s"}),
        ({"access_token": "A-t", "x": 1}, {"access_token": "A-s", "x": 1}),
    ):
        body = ("auth_info=" + json.dumps(auth)).encode()
        call = parse_call("Customer", "get_customer_info", {}, body)
        new_auth, _, _ = rewrite_for(call, held, wanted)
        assert new_auth == want, (auth, new_auth)
    # the twin has only an access token there: the session id gives way to it
    call = parse_call(
        "Customer", "x", {}, b'auth_info={"session_id": "S-t", "access_token": "A-t"}'
    )
    new_auth, _, _ = rewrite_for(call, held, Creds("", "A-s"))
    assert new_auth == {"access_token": "A-s"}


def test_an_alias_added_to_an_account_is_recorded_with_its_id() -> None:
    """Account/add_alias makes an account alias (a SIP / RADIUS id of its own) under the
    master account's customer: its id routes calls and logins like the account's."""
    body = b'params={"alias_info": {"i_master_account": 203, "id": "alias-203"}}'
    call = parse_call("Account", "add_alias", {}, body)
    assert created(call, {"i_account": 7001}, "3") == (
        "3",
        ["i_account:7001", "account:alias-203"],
    )
