"""API request classification (``api_proxy.classify``): what the API dispatcher decides
from the request line, headers and body before it picks a back end.  I/O-free."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest

from api_proxy.classify import Action, classify

FORM = {"content-type": "application/x-www-form-urlencoded"}
JSON = {"content-type": "application/json"}


def form(auth: object, params: object) -> bytes:
    return urlencode({"auth_info": json.dumps(auth), "params": json.dumps(params)}).encode()


CASES = {
    "entity-form": (
        "admin",
        "/rest/Account/get_account_info",
        FORM,
        form({"session_id": "0123456789abcdef"}, {"i_account": 42}),
        Action.ENTITY,
    ),
    "entity-json": (
        "admin",
        "/rest/Customer/get_customer_info",
        JSON,
        json.dumps({"auth_info": {"session_id": "S"}, "params": {"i_customer": 7}}).encode(),
        Action.ENTITY,
    ),
    "list-merge": (
        "admin",
        "/rest/Customer/get_customer_list",
        FORM,
        form({"session_id": "S"}, {"offset": 0, "limit": 100}),
        Action.LIST,
    ),
    "login": (
        "account",
        "/rest/Session/login",
        FORM,
        form({}, {"login": "alice", "password": "pw"}),
        Action.LOGIN,
    ),
    "session-follow": (
        "customer",
        "/rest/Account/get_account_info",
        {**FORM, "authorization": "Bearer abc.def"},
        form({}, {}),
        Action.FOLLOW,
    ),
    "cpe-file": ("cpe", "/cfg/0004f2a1b2c3.cfg", {}, None, Action.ENTITY),
}


@pytest.mark.parametrize("case", list(CASES))
def test_classify(benchmark: Any, case: str) -> None:
    realm, target, headers, body, action = CASES[case]
    c = benchmark(classify, realm, "POST" if body else "GET", target, headers, body)
    assert c.action is action
