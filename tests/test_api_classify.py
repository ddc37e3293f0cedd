"""The pure API classifier: formats, actions, owners, and its fuzz invariant."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api_proxy import apicall
from api_proxy import classify as cpe
from api_proxy.classify import Action, RouteKey, classify, needs_body
from api_proxy.errors import BadRequest, is_auth_fault, parse_fault
from api_proxy.router import SettingsError, VhostTable, make_vhost

FORM = {"content-type": "application/x-www-form-urlencoded"}
JSON = {"content-type": "application/json"}


def form(auth: object = None, params: object = None) -> bytes:
    fields = {}
    if auth is not None:
        fields["auth_info"] = json.dumps(auth)
    if params is not None:
        fields["params"] = json.dumps(params)
    return urlencode(fields).encode()


def test_form_json_multipart_query_and_bearer_read_alike() -> None:
    auth, params = {"session_id": "S1"}, {"i_account": 7}
    bodies = [
        (FORM, form(auth, params), ""),
        (JSON, json.dumps({"auth_info": auth, "params": params}).encode(), ""),
        (
            JSON,
            json.dumps({"auth_info": json.dumps(auth), "params": json.dumps(params)}).encode(),
            "",
        ),
        ({}, None, urlencode({"auth_info": json.dumps(auth), "params": json.dumps(params)})),
    ]
    boundary = "XyZ"
    disp = f"--{boundary}\r\nContent-Disposition: form-data; name="
    mp = (
        f'{disp}"auth_info"\r\n\r\n{json.dumps(auth)}\r\n'
        f'{disp}"params"\r\n\r\n{json.dumps(params)}\r\n'
        f'{disp}"file"; filename="a.pdf"\r\n\r\n%PDF...\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    bodies.append(({"content-type": f"multipart/form-data; boundary={boundary}"}, mp, ""))
    for headers, body, query in bodies:
        target = "/rest/Account/get_account_info" + (f"?{query}" if query else "")
        c = classify("admin", "POST", target, headers, body)
        assert c.call is not None and c.call.params == params, headers
        assert c.creds.session_id == "S1"
        assert c.action is Action.ENTITY and c.keys[0] == RouteKey("i_account", "7", "i_account")
    c = classify(
        "customer",
        "POST",
        "/rest/Account/get_account_info",
        {"authorization": "Bearer TOK", **JSON},
        b'{"params":{}}',
    )
    assert c.creds.access_token == "TOK" and c.creds.bearer and c.action is Action.FOLLOW


def test_rewrite_keeps_other_fields_and_formats() -> None:
    body = form({"session_id": "A"}, {"x": 1}) + b"&extra=keep%20me"
    call = apicall.parse_call("Customer", "get_customer_list", FORM, body)
    new, _ = apicall.encode(call, body, "", auth_info={"session_id": "B"})
    assert b"extra=keep+me" in new or b"extra=keep%20me" in new
    again = apicall.parse_call("Customer", "get_customer_list", FORM, new)
    assert again.auth_info == {"session_id": "B"} and again.params == {"x": 1}
    jbody = b'{"auth_info":{"session_id":"A"},"params":{"z":  [1, 2]},"other":true}'
    call = apicall.parse_call("Customer", "get_customer_list", JSON, jbody)
    new, _ = apicall.encode(call, jbody, "", params={"offset": 3})
    assert b'"auth_info":{"session_id":"A"}' in new and b'"other":true' in new
    assert apicall.encode(call, jbody, "") == (jbody, "")  # nothing replaced: byte-exact


def test_actions() -> None:
    login = classify(
        "customer",
        "POST",
        "/rest/Session/login",
        JSON,
        b'{"params":{"login":"alice","password":"x"}}',
    )
    assert login.action is Action.LOGIN and login.keys == (RouteKey("login", "alice", "login"),)
    lst = classify(
        "admin",
        "POST",
        "/rest/Customer/get_customer_list",
        FORM,
        form({"session_id": "s"}, {"offset": 2}),
    )
    assert lst.action is Action.LIST and lst.list_key == "customer_list"
    owned = classify(
        "admin",
        "POST",
        "/rest/Account/get_account_list",
        FORM,
        form({"session_id": "s"}, {"i_customer": 5}),
    )
    assert owned.action is Action.ENTITY and owned.keys[0] == RouteKey(
        "customer", "5", "i_customer"
    )
    create = classify(
        "admin",
        "POST",
        "/rest/Customer/add_customer",
        FORM,
        form({"session_id": "s"}, {"customer_info": {"name": "n", "login": "new"}}),
    )
    assert create.action is Action.CREATE and create.creates and not create.keys
    child = classify(
        "admin",
        "POST",
        "/rest/Account/add_account",
        FORM,
        form({"session_id": "s"}, {"account_info": {"i_customer": 9, "id": "acc1"}}),
    )
    assert child.action is Action.ENTITY and child.creates
    assert child.keys == (RouteKey("customer", "9", "account_info.i_customer"),)
    pattern = classify(
        "admin", "POST", "/rest/Account/get_account_list", FORM, form({}, {"id": "1000%"})
    )
    assert pattern.action is Action.LIST and not pattern.keys
    acct = classify(
        "reseller", "POST", "/rest/Account/get_account_info", FORM, form({}, {"id": "100200"})
    )
    assert acct.keys == (RouteKey("account", "100200", "id"),)
    ctx = classify(
        "admin",
        "POST",
        "/rest/Session/set_session_context",
        JSON,
        b'{"params":{"system":"source"}}',
    )
    assert ctx.action is Action.SET_CONTEXT and ctx.context == "source"
    porting = classify(
        "porting", "POST", "/rest/DID/get_number_info", JSON, b'{"params":{"number":"+1 555 0100"}}'
    )
    assert porting.keys == (RouteKey("did", "+1 555 0100", "number"),)
    web = classify("customer", "POST", "/login", FORM, b"login=bob&password=pw")
    assert web.action is Action.WEB_LOGIN and web.keys[0].value == "bob"
    # a signed-in browser's form that holds a user and a password is no login (it must
    # run once, on the browser's system), unless posted to a login path or PortaBilling's
    # own pb_auth_user form
    add_user = b"username=sipuser7&password=NewSecret1"
    for cookie in ("authorized-by-remote=1", "session_id=abc", "access_token=t"):
        signed_in = {**FORM, "cookie": cookie}
        add = classify("customer", "POST", "/accounts/add", signed_in, add_user)
        assert add.action is Action.FOLLOW, cookie
        relogin = classify("customer", "POST", "/Login", signed_in, add_user)
        assert relogin.action is Action.WEB_LOGIN, cookie
        pb = b"pb_auth_user=bob&pb_auth_password=pw"
        assert classify("customer", "POST", "/", signed_in, pb).action is Action.WEB_LOGIN
    assert classify("customer", "POST", "/accounts/add", FORM, add_user).action is Action.WEB_LOGIN
    many = "&".join(f"f{i}=v" for i in range(400)).encode()
    for body in (many, b"name=\xe9t\xe9", b"%%%"):
        assert classify("customer", "POST", "/settings", FORM, body).action is Action.FOLLOW
    page = classify(
        "customer", "GET", "/invoices", {"cookie": "sc=1; authorized-by-remote=1"}, None
    )
    assert page.action is Action.FOLLOW and page.remote
    refresh = classify(
        "account",
        "POST",
        "/rest/Session/refresh_access_token",
        JSON,
        b'{"params":{"refresh_token":"R"}}',
    )
    assert refresh.action is Action.REFRESH and refresh.creds.refresh_token == "R"


def test_porting_requests_name_their_did_anywhere() -> None:
    """A porting request names its DID in the query, a form or JSON body or the API params
    (found by an audit: only params reached the owner; the rest went to the target)."""
    did = RouteKey("did", "15550103", "body.number")
    for target, headers, body, keys in (
        ("/porting/request", FORM, b"number=15550103&x=1", (did,)),
        ("/porting/request", JSON, b'{"number": 15550103}', (did,)),
        ("/porting/request", {}, b"number=15550103", (did,)),
        ("/porting/request?did=15550103", {}, None, (RouteKey("did", "15550103", "query.did"),)),
        (
            "/porting/request?number=1&phone_number=2",
            FORM,
            b"did_number=3",
            (
                RouteKey("did", "3", "body.did_number"),
                RouteKey("did", "1", "query.number"),
                RouteKey("did", "2", "query.phone_number"),
            ),
        ),
        (
            "/rest/DID/get_number_info",
            JSON,
            b'{"auth_info": {"session_id": "s"}, "number": "15550103"}',
            (did,),
        ),
        (
            "/rest/Porting/get_request_list?number=7",
            FORM,
            form({}, {"did": "15550103"}),
            (RouteKey("did", "15550103", "did"), RouteKey("did", "7", "query.number")),
        ),
    ):
        assert needs_body("porting", "POST", target, headers)
        c = classify("porting", "POST" if body else "GET", target, headers, body)
        assert c.action is Action.ENTITY and c.keys == keys, (target, body)
    # other realms keep to the API params; a body only partly read is not looked into;
    # a body that is no form or JSON object names nothing
    assert not classify("admin", "POST", "/porting/request", FORM, b"number=1").keys
    assert not classify(
        "porting", "POST", "/porting/request", FORM, b"number=1", complete=False
    ).keys
    for headers, body in ((JSON, b"[1]"), (JSON, b"{bad"), (FORM, b"number=\xff"), ({}, b"\x00")):
        c = classify("porting", "POST", "/porting/request", headers, body)
        assert c.action is Action.FOLLOW and not c.keys, body
    assert not needs_body("porting", "POST", "/porting/upload", {"content-type": "text/csv"})


def test_cpe_file_names_and_inform() -> None:
    for path in (
        "/0004f2a1b2c3.cfg",
        "/prov/cfg0004F2A1B2C3.xml",
        "/SEP0004f2a1b2c3.cnf.xml",
        "/p/0004f2a1b2c3-phone.cfg",
        "/cfg?mac=00:04:f2:a1:b2:c3",
        "/dev/00-04-f2-a1-b2-c3/config",
    ):
        c = classify("cpe", "GET", path, {}, None)
        assert c.action is Action.ENTITY and c.keys[0] == RouteKey(
            "cpe", "0004f2a1b2c3", "target"
        ), path
    assert classify("cpe", "GET", "/index.html", {}, None).action is Action.FOLLOW
    inform = (
        b'<soap-env:Envelope xmlns:cwmp="urn:dslforum-org:cwmp-1-0"><soap-env:Body><cwmp:Inform>'
        b"<DeviceId><Manufacturer>Acme</Manufacturer><OUI>0004F2</OUI><ProductClass>GW</ProductClass>"
        b"<SerialNumber>00:04:F2:A1:B2:C3</SerialNumber></DeviceId>"
        b"<ParameterList><ParameterValueStruct><Name>Device.Ethernet.Interface.1.MACAddress</Name>"
        b"<Value>00:04:f2:00:00:01</Value></ParameterValueStruct></ParameterList>"
        b"</cwmp:Inform></soap-env:Body></soap-env:Envelope>"
    )
    assert cpe.inform_macs(inform) == ["0004f2a1b2c3", "0004f2000001"]
    c = classify("cpe", "POST", "/cwmp", {"content-type": "text/xml"}, inform)
    assert c.action is Action.ENTITY and c.keys[0].value == "0004f2a1b2c3"
    # the admin realm does not look for MACs unless patterns are configured
    assert classify("admin", "GET", "/0004f2a1b2c3.cfg", {}, None).action is Action.FOLLOW


@pytest.mark.parametrize(
    "headers,body",
    [
        (FORM, b"params=%7Bnot-json"),
        (FORM, b"params=%5B1%2C2%5D"),
        (JSON, b'{"params": '),
        (JSON, b"[1,2,3]"),
        (JSON, b'{"auth_info": 5}'),
        (FORM, b"\xff\xfe=\xff"),
        ({"content-type": "multipart/form-data"}, b"--x\r\n"),
    ],
)
def test_malformed_requests_raise_bad_request(headers: dict[str, str], body: bytes) -> None:
    with pytest.raises(BadRequest):
        classify("admin", "POST", "/rest/Customer/get_customer_info", headers, body)


def test_needs_body_and_faults() -> None:
    assert needs_body("admin", "POST", "/rest/Customer/get_customer_list", FORM)
    assert not needs_body("customer", "GET", "/invoice/1.pdf", {})
    assert not needs_body(
        "customer", "POST", "/upload", {"content-type": "multipart/form-data; boundary=x"}
    )
    assert needs_body("cpe", "POST", "/cwmp", {"content-type": "text/xml"})
    assert is_auth_fault(500, b'{"faultcode":"Server.Session.auth_failed","faultstring":"x"}')
    assert not is_auth_fault(500, b'{"faultcode":"Server.Customer.not_found","faultstring":"x"}')
    assert not is_auth_fault(200, b'{"session_id":"x"}')
    assert parse_fault(500, b"<html>") is None


REALM = st.sampled_from(["customer", "account", "admin", "reseller", "porting", "cpe", "bogus"])
TARGET = st.one_of(
    st.sampled_from(
        [
            "/rest/Session/login",
            "/rest/Customer/get_customer_list",
            "/rest/Account/add_account",
            "/cwmp",
            "/0004f2a1b2c3.cfg",
            "/login",
            "/",
        ]
    ),
    st.text(max_size=80),
)
CT = st.sampled_from(
    [
        "",
        "application/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=b",
        "text/xml",
        "multipart/form-data",
    ]
)
BODY = st.one_of(
    st.none(),
    st.binary(max_size=300),
    st.builds(
        lambda a, p: json.dumps({"auth_info": a, "params": p}).encode(),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=8),
            lambda c: st.dictionaries(st.text(max_size=8), c, max_size=4),
            max_leaves=8,
        ),
        st.dictionaries(
            st.sampled_from(
                [
                    "i_customer",
                    "i_account",
                    "id",
                    "login",
                    "number",
                    "offset",
                    "account_info",
                    "system",
                ]
            ),
            st.none()
            | st.integers()
            | st.text(max_size=10)
            | st.booleans()
            | st.dictionaries(
                st.sampled_from(["i_customer", "id"]), st.integers() | st.text(max_size=5)
            ),
            max_size=4,
        ),
    ),
    st.builds(
        lambda a, p: form(a, p),
        st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
        st.integers() | st.text(max_size=5),
    ),
)


@settings(max_examples=400, deadline=None)
@given(REALM, st.sampled_from(["GET", "POST", "PUT"]), TARGET, CT, st.text(max_size=60), BODY)
def test_fuzz_any_input_classifies_or_raises_bad_request(
    realm: str, method: str, target: str, ct: str, cookie: str, body: bytes | None
) -> None:
    headers = {"content-type": ct, "cookie": cookie, "authorization": "Bearer " + cookie[:10]}
    try:
        needs_body(realm, method, target, headers)
        c = classify(realm, method, target, headers, body)
    except BadRequest:
        return
    assert isinstance(c.action, Action)
    for k in c.keys:
        assert isinstance(k.value, str) and k.value


def test_virtual_hosts_by_host_port_and_path() -> None:
    src, tgt = "http://100.example:8444", "http://115.example:8444"
    table = VhostTable(
        [
            make_vhost("billing.example.com:8444", "customer", src, tgt),
            make_vhost(
                "billing.example.com", "admin", src, tgt, realm_paths={"/customer": "customer"}
            ),
            make_vhost("*", "cpe", src, tgt, port=8080),
        ]
    )
    assert table.select("billing.example.com:8444", 443).realm == "customer"  # type: ignore[union-attr]
    assert table.select("BILLING.example.com", 8444).realm == "customer"  # type: ignore[union-attr]
    admin = table.select("billing.example.com", 443)
    assert admin is not None and admin.realm == "admin"
    assert admin.realm_for("/customer/rest/Session/login") == "customer"
    assert admin.realm_for("/customerX") == "admin" and admin.realm_for("/rest/x/y") == "admin"
    assert table.select("anything.example", 8080).realm == "cpe"  # type: ignore[union-attr]
    assert table.select("anything.example", 443) is None
    assert table.select("[bad", 443) is None
    with pytest.raises(SettingsError):
        make_vhost("x", "nonsense", src, tgt)
    with pytest.raises(SettingsError):
        make_vhost("x", "admin", "", tgt)


def test_layers_pure_modules_do_no_io_and_api_proxy_never_imports_dsbc() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "api_proxy"
    pure = {"apicall", "calltypes", "classify", "errors", "plan", "records", "router"}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        assert "dsbc" not in names, f"{path.name} imports dsbc"
        if path.stem in pure:
            bad = names & {"asyncio", "socket", "uvloop", "aiohttp", "ssl", "time"}
            assert not bad, f"{path.name} is a pure module but imports {bad}"


def test_session_keys_name_every_credential_best_first() -> None:
    from itertools import product

    from api_proxy.classify import Credentials
    from api_proxy.plan import session_keys

    for sid, at, rt in product(("", "S"), ("", "A"), ("", "R")):
        creds = Credentials(session_id=sid, access_token=at, refresh_token=rt, login="l")
        want = [(k, v) for k, v in (("sid", sid), ("at", at), ("rt", rt)) if v]
        assert session_keys(creds) == want


def test_classifier_speed(benchmark: Any) -> None:
    body = form({"session_id": "0123456789abcdef"}, {"i_customer": 42, "offset": 0, "limit": 50})
    c = benchmark(classify, "admin", "POST", "/rest/Account/get_account_list", FORM, body)
    assert c.action is Action.ENTITY
